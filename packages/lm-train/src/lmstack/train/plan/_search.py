"""The search: every layout the model and cluster allow, predicted, filtered by memory, ranked by speed.

A candidate is a choice of ``dp_replicate x dp_shard x tp x sp x pp`` whose product is the cluster's
device count, a micro-batch size and activation checkpointing on or off (and, with a pipeline, 1, 2
or 4 stages per rank). What lmstack's parallel code cannot run is skipped: ``tp`` must fit in a node
and divide the query heads, the key/value heads and the feed-forward width; ``sp`` must divide the
sequence and the query heads left per tensor-parallel rank; ``pp x stages`` must divide the layers
(and a tied embedding cannot be split); the global batch must divide over the data-parallel ranks and
the micro-batch over each rank's share; a pipeline needs at least ``pp`` micro-batches (and interleaved
1F1B a whole number of rounds). One limit of lmstack's loop today is kept too
(:data:`PIPELINE_MICRO_BATCH`): a pipeline micro-batch of one packed bin. Layouts whose predicted
peak exceeds the usable memory are dropped; the rest are ranked by step time (the same as tokens per
second per device: the device count is fixed), in steps of 1% (the model is no more accurate than
that: within a step the smaller peak memory comes first).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from lmstack.core import ModelConfig
from lmstack.train.plan._cluster import Cluster
from lmstack.train.plan._cost import Estimate, Layout, Workload, estimate
from lmstack.train.plan._errors import PlanError

__all__ = ["Checkpointing", "PlanResult", "candidate_layouts", "plan"]

logger = logging.getLogger(__name__)

Checkpointing = Literal["auto", "on", "off"]

#: Step times within this fraction of each other rank as equal (then the smaller peak memory wins).
SPEED_TOLERANCE = 0.01

#: Pipeline stages per rank tried (interleaved 1F1B above 1).
STAGES_PER_RANK = (1, 2, 4)

#: What lmstack's training loop runs today (``lmstack.train._parallel``): a pipeline's micro-batch is
#: one packed bin. The cost model estimates any layout; the search proposes only these.
PIPELINE_MICRO_BATCH = 1


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _parallel_degrees(
    config: ModelConfig, workload: Workload, cluster: Cluster
) -> Iterator[tuple[int, int, int]]:
    """``(pp, tp, sp)`` triples lmstack can run (the rest of the devices go to data parallelism)."""
    assert config.num_key_value_heads is not None
    world = cluster.world_size
    for pp in _divisors(world):
        if config.num_hidden_layers % pp or (pp > 1 and config.tie_word_embeddings):
            continue
        for tp in _divisors(world // pp):
            if tp > cluster.gpus_per_node:
                continue
            if (
                config.num_attention_heads % tp
                or config.num_key_value_heads % tp
                or config.intermediate_size % tp
            ):
                continue
            for sp in _divisors(world // (pp * tp)):
                if workload.seq_len % sp or (config.num_attention_heads // tp) % sp:
                    continue
                yield pp, tp, sp


def candidate_layouts(
    config: ModelConfig,
    workload: Workload,
    cluster: Cluster,
    *,
    checkpointing: Checkpointing = "auto",
) -> Iterator[Layout]:
    """Every layout of ``cluster.world_size`` devices that lmstack can run ``workload`` with.

    Args:
        config: The model.
        workload: Sequence length and global batch.
        cluster: Its device count and node size bound the degrees.
        checkpointing: ``auto`` tries with and without activation checkpointing; ``on``/``off`` fix it.
    """
    world = cluster.world_size
    ckpt = {"auto": (False, True), "on": (True,), "off": (False,)}[checkpointing]
    for pp, tp, sp in _parallel_degrees(config, workload, cluster):
        dp = world // (pp * tp * sp)
        if workload.global_batch % dp:
            continue
        per_rank = workload.global_batch // dp
        for dp_replicate in _divisors(dp):
            for micro_batch in _divisors(per_rank):
                m = per_rank // micro_batch
                if pp > 1 and (m < pp or micro_batch != PIPELINE_MICRO_BATCH):
                    continue
                for v in STAGES_PER_RANK if pp > 1 else (1,):
                    if config.num_hidden_layers % (pp * v):
                        continue
                    if v > 1 and m % max(1, m // pp):
                        continue
                    for on in ckpt:
                        yield Layout(
                            dp_replicate=dp_replicate,
                            dp_shard=dp // dp_replicate,
                            tp=tp,
                            sp=sp,
                            pp=pp,
                            micro_batch=micro_batch,
                            activation_checkpointing=on,
                            stages_per_rank=v,
                        )


@dataclass(frozen=True)
class PlanResult:
    """What :func:`plan` found.

    Attributes:
        best: The fastest layouts that fit, fastest first.
        searched: Layouts predicted.
        fitting: Of those, how many fit in memory.
        workload: The workload planned for.
        cluster: The cluster planned for.
    """

    best: list[Estimate]
    searched: int
    fitting: int
    workload: Workload
    cluster: Cluster


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def plan(
    config: ModelConfig,
    workload: Workload,
    cluster: Cluster,
    *,
    top: int = 5,
    checkpointing: Checkpointing = "auto",
) -> PlanResult:
    """Predict every candidate layout and return the ``top`` fastest that fit in memory.

    Args:
        config: The model.
        workload: Sequence length, global batch, precision, gradient sync.
        cluster: Devices and links (its device count is the world size).
        top: How many layouts to return.
        checkpointing: ``auto``, ``on`` or ``off`` (see :func:`candidate_layouts`).

    Raises:
        PlanError: No layout of the cluster's device count can run the workload (the message says
            what to change), or none fits in memory (the message gives the smallest one's need).
    """
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise PlanError(f"top must be a positive integer, got {top!r}.")
    if checkpointing not in ("auto", "on", "off"):
        raise PlanError(f"activation checkpointing must be auto, on or off, got {checkpointing!r}.")
    estimates = [
        estimate(config, layout, workload, cluster)
        for layout in candidate_layouts(config, workload, cluster, checkpointing=checkpointing)
    ]
    world = cluster.world_size
    if not estimates:
        dps = sorted({world // (pp * tp * sp) for pp, tp, sp in _parallel_degrees(config, workload, cluster)})
        if not dps:
            raise PlanError(
                f"no layout of {world} devices can run this model: no tensor/sequence/pipeline degrees "
                "divide its heads, sequence and layers within nodes of "
                f"{cluster.gpus_per_node}; use another device count."
            )
        raise PlanError(
            f"no layout of {world} devices can run a global batch of {workload.global_batch} sequences: "
            f"it must be divisible by the data-parallel degree, which can be {', '.join(map(str, dps))} "
            f"here (a pipeline also needs at least pp micro-batches); choose a global batch that is a "
            f"multiple of one of them, or another device count."
        )
    fitting = [e for e in estimates if e.fits]
    usable = _gib(cluster.usable_bytes)
    logger.info("predicted %d layouts, %d fit in %s", len(estimates), len(fitting), usable)
    if not fitting:
        smallest = min(estimates, key=lambda e: e.memory.peak)
        raise PlanError(
            f"no layout fits in the {_gib(cluster.usable_bytes)} usable per device "
            f"({cluster.usable_memory:.0%} of {cluster.memory_gib:g} GiB): the smallest needs "
            f"{_gib(smallest.memory.peak)} ({smallest.layout.describe()}, micro-batch "
            f"{smallest.layout.micro_batch}, checkpointing "
            f"{'on' if smallest.layout.activation_checkpointing else 'off'}); use more or larger "
            "devices, a shorter --seq-len, or --grad-sync microbatch."
        )
    # The model is not accurate to a percent: layouts within 1% of one another's speed count as
    # equally fast and the one with more memory to spare comes first.
    fastest = min(e.time.step for e in fitting)
    fitting.sort(
        key=lambda e: (
            math.floor((e.time.step / fastest - 1) / SPEED_TOLERANCE),
            e.memory.peak,
            e.time.step,
        )
    )
    return PlanResult(
        best=fitting[:top], searched=len(estimates), fitting=len(fitting), workload=workload, cluster=cluster
    )
