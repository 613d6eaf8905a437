"""The planner's choices for published configurations, beside the layouts torchtitan and InternEvo report.

``python published.py`` prints the Markdown table of lmstack-train's README ("Planning a layout");
``test_plan.py`` recomputes it and checks that the README still holds every row as written, so a
change of the cost model that changes a choice cannot go unnoticed.

Sources (what they report is copied into ``Row.published``; nothing else is claimed):

* [tt-bench] torchtitan ``benchmarks/llama3_h100_202412_torchtitan.md`` (pytorch/torchtitan; the runs
  of the TorchTitan paper, arXiv 2410.06511): Llama 3.1 on H100s with 96 GB HBM2e at 500 W, 400 Gb/s
  per GPU between hosts, sequence length 8192 (the llama3 train configs'), torch.compile and Float8
  where stated.
* [tt-a100] torchtitan ``docs/performance.md`` at commit 4d88a8a (Dec 2024): Llama 3 8B and 70B with
  FSDP2 on 64 A100 80GB, local batch 1, sequence length 8192 (``train_configs/llama3_*.toml`` there).
* [evo] InternEvo ``doc/en/train_performance.md`` (InternLM/InternEvo at c628a8c): InternLM-7B on 8 to
  1024 A100 80GB, 4 x 100 Gb RoCE per node, sequence length 2048, micro_bsz 2 x micro_num 4 per GPU,
  no activation checkpointing, ``tp=1, zero1=8`` (optimizer states sharded over the 8 GPUs of a node,
  weights replicated: closest here is HSDP with ``dp_shard=8``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from lmstack.train.plan import Cluster, Layout, PlanError, Workload, estimate, model_preset, parse_cluster
from lmstack.train.plan._cost import Precision
from lmstack.train.plan._search import plan

_GIB = 2**30


@dataclass(frozen=True)
class Row:
    """One published configuration."""

    model: str
    cluster: str
    seq_len: int
    global_batch: int
    published: str  # the layout, as the source gives it, and what it measured
    source: str
    layout: Layout | None = None  # the published layout in the planner's terms, to predict it too
    inter_node_gbps: float | None = None  # the source's network, where it differs from the preset
    memory_gib: float | None = None  # the source's device memory, where it differs from the preset

    def cluster_spec(self) -> Cluster:
        cluster = parse_cluster(self.cluster)
        if self.inter_node_gbps is not None:
            cluster = dataclasses.replace(cluster, inter_node_gbps=self.inter_node_gbps)
        if self.memory_gib is not None:
            name = f"{cluster.device.split('-')[0]} ({self.memory_gib:g} GiB)"
            cluster = dataclasses.replace(cluster, memory_gib=self.memory_gib, device=name)
        return cluster


_TT = "[tt-bench]"
_NR = "not reported"
ROWS = (
    Row("llama3-8b", "8xH100", 8192, 16, "FSDP 8, local batch 2, selective AC: 5,762 TPS, 82.4 GiB", _TT,
        Layout(dp_shard=8, micro_batch=2, activation_checkpointing=True), memory_gib=89.4),
    Row("llama3-8b", "64xA100-80G", 8192, 64,
        "FSDP 64, local batch 1, selective AC: 2,904-2,973 WPS, 56.8-58.2% MFU", "[tt-a100]",
        Layout(dp_shard=64, micro_batch=1, activation_checkpointing=True)),
    Row("llama3-8b", "128xH100", 8192, 256, "FSDP 128, local batch 2, selective AC: 5,605 TPS, 67.0 GiB",
        _TT, Layout(dp_shard=128, micro_batch=2, activation_checkpointing=True), memory_gib=89.4),
    Row("llama3-8b", "512xH100", 8192, 1024, _NR, "-"),
    Row("llama3-8b", "1024xH100", 8192, 2048, _NR, "-"),
    Row("internlm-7b", "8xA100-80G", 2048, 64, "tp 1, zero1 8, micro 2 x 4, no AC: 4,078 TGS", "[evo]",
        Layout(dp_shard=8, micro_batch=2), inter_node_gbps=50),
    Row("internlm-7b", "64xA100-80G", 2048, 512, "tp 1, zero1 8, micro 2 x 4, no AC: 3,944 TGS", "[evo]",
        Layout(dp_replicate=8, dp_shard=8, micro_batch=2), inter_node_gbps=50),
    Row("internlm-7b", "512xA100-80G", 2048, 4096, "tp 1, zero1 8, micro 2 x 4, no AC: 3,835 TGS", "[evo]",
        Layout(dp_replicate=64, dp_shard=8, micro_batch=2), inter_node_gbps=50),
    Row("internlm-7b", "1024xA100-80G", 2048, 8192, "tp 1, zero1 8, micro 2 x 4, no AC: 3,625 TGS", "[evo]",
        Layout(dp_replicate=128, dp_shard=8, micro_batch=2), inter_node_gbps=50),
    Row("llama3-70b", "8xH100", 8192, 16, _NR, "-"),
    Row("llama3-70b", "64xA100-80G", 8192, 64, "FSDP 64, local batch 1, full AC: 331 WPS, 51.7% MFU",
        "[tt-a100]", Layout(dp_shard=64, micro_batch=1, activation_checkpointing=True)),
    Row("llama3-70b", "256xH100", 8192, 512,
        "FSDP 32 x TP 8, local batch 16, full AC, compile + Float8: 829 TPS, 71.9 GiB", _TT,
        Layout(dp_shard=32, tp=8, micro_batch=16, activation_checkpointing=True), memory_gib=89.4),
    Row("llama3-70b", "512xH100", 8192, 1024, _NR, "-"),
    Row("llama3-70b", "1024xH100", 8192, 2048, _NR, "-"),
    Row("llama3.1-405b", "512xH100", 8192, 256,
        "FSDP 8 x TP 8 x PP 8, local batch 32, full AC, compile + Float8 + async TP: 1F1B 100 TPS, "
        "82.5 GiB; interleaved 1F1B 128 TPS, 72.7 GiB", _TT,
        Layout(dp_shard=8, tp=8, pp=8, micro_batch=1, activation_checkpointing=True), memory_gib=89.4),
)  # fmt: skip


def _layout(e_layout: Layout, micro_batches: int) -> str:
    ac = "AC" if e_layout.activation_checkpointing else "no AC"
    return f"{e_layout.describe()}, micro {e_layout.micro_batch} x {micro_batches}, {ac}"


def _choice(row: Row, precision: Precision) -> str:
    config, cluster = model_preset(row.model), row.cluster_spec()
    try:
        best = plan(
            config, Workload(row.seq_len, row.global_batch, precision=precision), cluster, top=1
        ).best[0]
    except PlanError as exc:
        message = str(exc)
        return "none fits" + (
            message[message.index(": the smallest") :].split(" (")[0] if "smallest" in message else ""
        )
    return (
        f"{_layout(best.layout, best.micro_batches)}: {best.memory.peak / _GIB:.1f} GiB, "
        f"{best.tokens_per_s_per_device:,.0f} tok/s/GPU"
    )


def row_cells(row: Row) -> list[str]:
    """The table's cells for ``row``: the planner's choices and its prediction for the published layout.

    The choice is made for lmstack's bf16 (autocast) and for bf16-mp (FSDP mixed precision, the
    precision of the published runs); the published layout is predicted in bf16-mp.
    """
    config, cluster = model_preset(row.model), row.cluster_spec()
    if row.layout is None:
        theirs = "-"
    else:
        try:
            workload = Workload(row.seq_len, row.global_batch, precision="bf16-mp")
            e = estimate(config, row.layout, workload, cluster)
            theirs = f"{e.memory.peak / _GIB:.1f} GiB, {e.tokens_per_s_per_device:,.0f} tok/s/GPU"
            if not e.fits:
                theirs += " (does not fit)"
        except PlanError as exc:
            theirs = f"cannot run here: {exc}"
    return [
        row.model,
        f"{cluster.world_size} x {cluster.device}",
        f"{row.seq_len} x {row.global_batch}",
        _choice(row, "bf16"),
        _choice(row, "bf16-mp"),
        row.published,
        row.source,
        theirs,
    ]


HEADER = [
    "model",
    "GPUs",
    "seq x batch",
    "plan's choice, bf16 (lmstack's autocast)",
    "plan's choice, bf16-mp",
    "published layout (measured)",
    "source",
    "plan's prediction for the published layout (bf16-mp)",
]


def markdown_table() -> str:
    """The README table."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row_cells(row)) + " |" for row in ROWS]
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
