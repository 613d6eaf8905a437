"""The scale-out benchmark's workload, layouts, launcher and communication accounting.

One seeded random Llama trains for a few steps under each ``parallel:`` layout of a list, every layout
its own ``torchrun`` launch of ``_parallel_driver.py`` (so that each has its own process group and its
own peak memory), on the same packed bins of the bundled world's pretraining texts, with the same global
batch per optimizer step. The driver times every step, profiles the last ones with ``torch.profiler``
and writes one JSON file per rank; :func:`launch` reads them back and :func:`run_bench` tabulates.

What "communication" means here (:func:`comm_stats`): the profiled steps' wall time is the union of the
driver's step ranges (``STEP_RANGE``) on the training thread. On the CPU, a collective is in flight
while any of its profiler events is open on any thread: gloo's own ranges (``gloo:all_reduce``,
``gloo:send`` ... on gloo's worker threads or, for point-to-point, the training thread), the c10d
dispatch ops (``c10d::allreduce_`` ...) and the functional collectives' ops and waits
(``_c10d_functional::wait_tensor``). Overlapping events (a c10d op and its gloo range, a wait and the
collective it waits for) count once: the share is the length of the union of their intervals over the
wall time. Time a rank spends waiting for a slower peer is inside those ranges, so it counts as
communication. *Exposed* communication is the part of that union during which the training thread runs
no compute op (a ``cpu_op`` that neither is nor encloses a collective): what the step could not hide
behind computation (gloo collectives mostly block the training thread; DDP's bucketed all-reduces and
FSDP2's prefetched all-gathers can overlap). On CUDA, in flight means an NCCL kernel running on the
GPU, and exposed the part of that with no other kernel running on the GPU.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import math
import os
import random
import statistics
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DRIVER = Path(__file__).resolve().parent / "_parallel_driver.py"
STEP_RANGE = "lmstack_bench::step"
"""The ``record_function`` range the driver puts around each profiled optimizer step."""

SHAPES: dict[str, dict[str, Any]] = {
    # 7.8M parameters with the world tokenizer's 2,992 ids (hidden 256, 8 layers): 8 heads / 4 KV heads
    # and a 768-wide MLP split over tp=4, 8 layers cut into 4 pipeline stages (pp=4, or pp=2 x 2
    # interleaved stages per rank). The vocabulary is the tokenizer's.
    "cpu": {
        "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 8, "num_attention_heads": 8,
        "num_key_value_heads": 4, "max_position_embeddings": 1024, "tie_word_embeddings": False,
    },
    # Llama-3.2-1B's layer shape (hidden 2048, MLP 8192, 16 layers, 32 heads / 8 KV heads, rope theta
    # 500,000) with a 32,000 vocabulary, untied: 1.1B parameters. Only the tokenizer's ids are looked
    # up; the head still computes all 32,000 logits.
    "gpu": {
        "vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
        "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 4096,
        "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
    },
    # The code-path check: the CPU shape, smaller (4 layers, 4 heads / 2 KV heads).
    "tiny": {
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 512, "tie_word_embeddings": False,
    },
}  # fmt: skip
"""Model shapes by name (``ModelConfig`` fields; ``vocab_size`` defaults to the tokenizer's)."""


@dataclass(frozen=True)
class Plan:
    """A model size and how every layout trains it.

    Attributes:
        name: The plan's key in :data:`PLANS`.
        shape: The model shape (a key of :data:`SHAPES`).
        seq_len: Tokens per packed bin.
        global_bins: Bins per optimizer step over all data-parallel ranks (the same for every layout).
        max_micro_bins: The most bins one micro-batch of a data-parallel rank holds; a rank's share of
            the step is cut into the fewest equal micro-batches that respect it (pipelines take the
            rank's whole share as their microbatches, one bin each).
        warmup_steps: Steps before any measurement (first-touch allocations, lazy initialisation).
        measured_steps: Steps timed without the profiler (tokens/s).
        profiled_steps: Steps after those, under ``torch.profiler`` (communication share).
        device: ``cpu`` (gloo) or ``cuda`` (NCCL, one GPU per process).
        precision: ``float32``, or ``bfloat16`` autocast (fp32 weights).
        world: Processes of the parallel layouts; None: every GPU of the node.
        lr: Peak learning rate (1 warm-up step, cosine decay).
    """

    name: str
    shape: str
    seq_len: int
    global_bins: int
    max_micro_bins: int
    warmup_steps: int
    measured_steps: int
    profiled_steps: int
    device: str
    precision: str
    world: int | None
    lr: float = 3e-4

    @property
    def total_steps(self) -> int:
        """Every step a layout runs."""
        return self.warmup_steps + self.measured_steps + self.profiled_steps


PLANS = {
    # 8 bins of 256 tokens a step (2,048 tokens); 2 warm-up + 4 timed + 2 profiled steps per layout.
    "cpu": Plan("cpu", "cpu", seq_len=256, global_bins=8, max_micro_bins=4, warmup_steps=2,
                measured_steps=4, profiled_steps=2, device="cpu", precision="float32", world=4),
    # 16 bins of 2,048 tokens a step (32,768 tokens), bf16 autocast, NCCL over every GPU of the node.
    "gpu": Plan("gpu", "gpu", seq_len=2048, global_bins=16, max_micro_bins=4, warmup_steps=3,
                measured_steps=5, profiled_steps=2, device="cuda", precision="bfloat16", world=None),
    # The GPU plan's code (bf16 autocast, profiling, the report) on 2 CPU processes, tiny and short.
    "smoke": Plan("smoke", "tiny", seq_len=64, global_bins=4, max_micro_bins=2, warmup_steps=1,
                  measured_steps=1, profiled_steps=1, device="cpu", precision="bfloat16", world=2),
}  # fmt: skip
"""The plans by name."""


# -- layouts -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """One way to spread the training over processes.

    Attributes:
        name: What the table calls it.
        nproc: Processes (torchrun ``--nproc_per_node``).
        parallel: The ``parallel:`` section (``ParallelConfig`` fields); None: plain data parallelism
            as ``data_parallel`` says (and one process when ``nproc`` is 1).
        data_parallel: ``run.data_parallel`` (``ddp`` or ``fsdp``).
    """

    name: str
    nproc: int
    parallel: dict[str, Any] | None = None
    data_parallel: str = "ddp"

    @property
    def dp_size(self) -> int:
        """Data-parallel ranks: how many different bins a step reads at once."""
        if self.parallel is None:
            return self.nproc
        return int(self.parallel.get("dp_replicate", 1)) * int(self.parallel.get("dp_shard", 1))

    def batching(self, plan: Plan) -> tuple[int, int]:
        """``(run.batch_size, run.grad_accum)`` that make the plan's global batch on this layout.

        Raises:
            ValueError: The global batch does not split over this layout's data-parallel ranks.
        """
        if plan.global_bins % self.dp_size:
            raise ValueError(f"{self.name}: {plan.global_bins} bins do not split over {self.dp_size} ranks")
        share = plan.global_bins // self.dp_size
        accum = next(a for a in range(1, share + 1) if share % a == 0 and share // a <= plan.max_micro_bins)
        return share // accum, accum


def _name(parallel: dict[str, Any]) -> str:
    dims = [
        f"{k}={parallel[k]}" for k in ("dp_replicate", "dp_shard", "tp", "sp", "pp") if parallel.get(k, 1) > 1
    ]
    name = " x ".join(dims)
    if parallel.get("sp", 1) > 1:
        name += f" ({parallel.get('sp_attention', 'ulysses')})"
    if parallel.get("pp_schedule") == "interleaved":
        name += f" (interleaved, {parallel['pp_stages_per_rank']} stages/rank)"
    if name == f"dp_shard={parallel.get('dp_shard')}":
        name += " (FSDP2)"
    return name


def layouts(world: int, model: dict[str, Any]) -> list[Layout]:
    """The benchmark's layouts on ``world`` processes, those the model's shape allows, and 1 process.

    On 4 processes: ddp, fsdp (``dp_shard=4``), ``dp_shard=2 x tp=2``, ``tp=4``, ``tp=2 x pp=2``,
    ``pp=4``, ``dp_shard=2 x sp=2`` (Ulysses), ``sp=4`` (ring) and ``pp=2`` interleaved (2 stages per
    rank) ``x dp_shard=2``. Other world sizes take the same list with ``world`` in place of 4 and
    ``world / 2`` in place of 2 where a layout pairs two degrees; duplicates are dropped.

    Args:
        world: Processes of the parallel layouts.
        model: The model's shape (``num_attention_heads``, ``num_key_value_heads``, ``intermediate_size``,
            ``num_hidden_layers``).
    """
    out = [Layout("1 process", 1)]
    if world < 2:
        return out
    out.append(Layout("ddp (run.data_parallel)", world))
    half = world // 2 if world % 2 == 0 else 0
    candidates: list[dict[str, Any]] = [
        {"dp_shard": world},
        {"dp_shard": half, "tp": 2},
        {"dp_shard": 1, "tp": world},
        {"dp_shard": 1, "tp": 2, "pp": half},
        {"dp_shard": 1, "pp": world},
        {"dp_shard": half, "sp": 2, "sp_attention": "ulysses"},
        {"dp_shard": 1, "sp": world, "sp_attention": "ring"},
        {"dp_shard": half, "pp": 2, "pp_schedule": "interleaved", "pp_stages_per_rank": 2},
    ]
    heads, kv = model["num_attention_heads"], model["num_key_value_heads"]
    seen: set[str] = set()
    for p in candidates:
        degrees = [p.get(k, 1) for k in ("dp_shard", "tp", "sp", "pp")]
        if min(degrees) < 1 or math.prod(degrees) != world:
            continue
        tp, sp, pp = p.get("tp", 1), p.get("sp", 1), p.get("pp", 1)
        if heads % tp or kv % tp or model["intermediate_size"] % tp:
            continue  # tensor parallelism splits whole heads and the MLP width evenly
        if p.get("sp_attention") == "ulysses" and (heads % sp or kv % sp):
            continue  # Ulysses trades the sequence split for a head split
        if pp * p.get("pp_stages_per_rank", 1) > model["num_hidden_layers"]:
            continue
        key = json.dumps({k: v for k, v in p.items() if v != 1}, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        out.append(Layout(_name(p), world, p))
    return out


# -- the workload --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """A built workload (``workload.json`` in its directory).

    Attributes:
        plan: Its plan's name.
        tokenizer: The tokenizer directory.
        data: The pretraining texts (``{"text": ...}`` JSON lines).
        model: The model's ``ModelConfig`` fields.
        params: Parameters of the model.
        tokenizer_vocab_size: Ids the tokenizer has (the model's vocabulary may be larger).
        documents: Texts in ``data``.
    """

    plan: str
    tokenizer: str
    data: str
    model: dict[str, Any]
    params: int
    tokenizer_vocab_size: int
    documents: int

    @staticmethod
    def load(directory: Path) -> Workload:
        """The workload built in ``directory``."""
        return Workload(**json.loads((directory / "workload.json").read_text()))


def _world_texts() -> list[str]:
    """The bundled world's pretraining texts, in a seeded order."""
    sys.path.insert(0, str(ROOT / "examples" / "world"))
    import world

    texts = [r["text"] for r in world.build_files(seed=0)["pretrain.jsonl"]]
    random.Random(0).shuffle(texts)
    return texts


def build(directory: Path, plan: str) -> Workload:
    """Train the BPE tokenizer, write the texts and the model's config; return the workload.

    Args:
        directory: Where to write them.
        plan: A key of :data:`PLANS`.
    """
    import torch

    from lmstack.core import CausalLM, ModelConfig, train_bpe_tokenizer

    p = PLANS[plan]
    directory.mkdir(parents=True, exist_ok=True)
    texts = _world_texts()
    tokenizer = train_bpe_tokenizer(iter(texts), vocab_size=4096)
    tokenizer.save_pretrained(directory / "tokenizer")
    data = directory / "pretrain.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    model = {
        "model_type": "llama", "vocab_size": tokenizer.vocab_size, "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id, **SHAPES[p.shape],
    }  # fmt: skip
    with torch.device("meta"):  # counts parameters without allocating the GPU shape's 4 GiB
        params = sum(t.numel() for t in CausalLM(ModelConfig(**model)).parameters())
    w = Workload(
        plan=plan, tokenizer=str(directory / "tokenizer"), data=str(data), model=model, params=params,
        tokenizer_vocab_size=tokenizer.vocab_size, documents=len(texts),
    )  # fmt: skip
    (directory / "workload.json").write_text(json.dumps(asdict(w), indent=1))
    return w


# -- communication accounting --------------------------------------------------------------------------

COMM_PREFIXES = ("gloo:", "nccl:", "c10d::", "_c10d_functional::", "c10d_functional::", "record_param_comms")
"""Names of the profiler events (CPU side) that are collectives, their dispatch or their waits."""

KINDS = (
    ("all_to_all", ("all_to_all", "alltoall")),
    ("reduce_scatter", ("reduce_scatter", "reducescatter")),
    ("all_gather", ("all_gather", "allgather")),
    ("all_reduce", ("all_reduce", "allreduce")),
    ("send/recv", ("send", "recv")),
    ("broadcast", ("broadcast",)),
    ("barrier", ("barrier",)),
)


def comm_kind(name: str) -> str:
    """The collective an event name belongs to (``other`` when none fits)."""
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def is_comm_event(event: dict[str, Any], device: str) -> bool:
    """Whether a chrome-trace event is communication on ``device`` (see the module docstring)."""
    name = str(event.get("name", ""))
    if device == "cuda":
        return event.get("cat") == "kernel" and "nccl" in name.lower()
    return event.get("cat") in ("cpu_op", "user_annotation") and name.startswith(COMM_PREFIXES)


Interval = tuple[float, float]


def union(intervals: Iterable[Interval]) -> list[Interval]:
    """Sorted, disjoint intervals covering the same points as ``intervals``."""
    out: list[Interval] = []
    for a, b in sorted(i for i in intervals if i[1] > i[0]):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def length(intervals: Sequence[Interval]) -> float:
    """Total length of disjoint intervals."""
    return sum(b - a for a, b in intervals)


def intersect(xs: Sequence[Interval], ys: Sequence[Interval]) -> list[Interval]:
    """The intersection of two sorted disjoint interval lists."""
    out: list[Interval] = []
    i = j = 0
    while i < len(xs) and j < len(ys):
        a, b = max(xs[i][0], ys[j][0]), min(xs[i][1], ys[j][1])
        if a < b:
            out.append((a, b))
        if xs[i][1] < ys[j][1]:
            i += 1
        else:
            j += 1
    return out


def subtract(xs: Sequence[Interval], ys: Sequence[Interval]) -> list[Interval]:
    """``xs`` without the points of ``ys`` (both sorted and disjoint)."""
    out: list[Interval] = []
    j = 0
    for a, b in xs:
        while j < len(ys) and ys[j][1] <= a:
            j += 1
        k, start = j, a
        while k < len(ys) and ys[k][0] < b:
            if ys[k][0] > start:
                out.append((start, ys[k][0]))
            start = max(start, ys[k][1])
            k += 1
        if start < b:
            out.append((start, b))
    return out


def _span(event: dict[str, Any]) -> Interval:
    start = float(event["ts"])
    return start, start + float(event.get("dur", 0.0))


@dataclass
class CommStats:
    """Communication within the profiled steps of one rank (microseconds).

    Attributes:
        wall_us: The profiled steps' wall time.
        in_flight_us: Time some collective was in flight.
        exposed_us: The part of ``in_flight_us`` with no compute running (see the module docstring).
        by_kind: In-flight time of each kind of collective by the transport's events (kinds may overlap
            one another; gloo runs a reduce-scatter as an all-reduce and names it so).
        steps: Profiled steps found in the trace.
    """

    wall_us: float
    in_flight_us: float
    exposed_us: float
    by_kind: dict[str, float] = field(default_factory=dict)
    steps: int = 0


def comm_stats(events: Sequence[dict[str, Any]], device: str) -> CommStats:
    """Account the communication of one rank's chrome trace (``traceEvents``) over its step ranges.

    Args:
        events: The trace's events (complete events, ``ph: X``, are used).
        device: ``cpu`` or ``cuda`` (what counts as communication and compute; module docstring).

    Raises:
        ValueError: The trace has no ``STEP_RANGE`` event.
    """
    complete = [e for e in events if e.get("ph") == "X" and "ts" in e]
    steps = [e for e in complete if e.get("name") == STEP_RANGE]
    if not steps:
        raise ValueError(f"no {STEP_RANGE!r} range in the trace: the profiled steps were not recorded")
    window = union(_span(e) for e in steps)
    main = (steps[0].get("pid"), steps[0].get("tid"))
    comm = [e for e in complete if is_comm_event(e, device)]
    in_flight = intersect(union(_span(e) for e in comm), window)
    if device == "cuda":
        compute_events = [e for e in complete if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
        compute = union(_span(e) for e in compute_events if not is_comm_event(e, device))
    else:
        # A training-thread op that encloses a collective (a backward node whose hook reduce-scatters, an
        # op whose tensor subclass waits) is not compute: only ops without one inside count.
        on_main = [e for e in complete if (e.get("pid"), e.get("tid")) == main]
        starts = sorted(_span(e)[0] for e in on_main if is_comm_event(e, device))
        compute_spans = []
        for e in on_main:
            if e.get("cat") != "cpu_op" or is_comm_event(e, device):
                continue
            a, b = _span(e)
            k = bisect.bisect_right(starts, a)
            if k < len(starts) and starts[k] < b:
                continue
            compute_spans.append((a, b))
        compute = union(compute_spans)
    exposed = subtract(in_flight, compute)
    # By kind: the transport's own events only (gloo's ranges, NCCL's kernels), named as the transport
    # names them; a c10d dispatch op or a functional wait says nothing the transport's range does not.
    by_kind: dict[str, list[Interval]] = {}
    for e in comm:
        name = str(e["name"])
        if device == "cuda" or name.startswith(("gloo:", "nccl:")):
            by_kind.setdefault(comm_kind(name), []).append(_span(e))
    return CommStats(
        wall_us=length(window),
        in_flight_us=length(in_flight),
        exposed_us=length(exposed),
        by_kind={k: length(intersect(union(v), window)) for k, v in sorted(by_kind.items())},
        steps=len(steps),
    )


# -- launching -----------------------------------------------------------------------------------------


def launch(
    layout: Layout, workload: Path, run_dir: Path, *, timeout: float, threads: str | None = "1"
) -> dict[str, Any]:
    """Train one layout under torchrun; its ranks' measurements (``{"error": ...}`` when it failed).

    Args:
        layout: The layout.
        workload: The workload directory (its plan says the steps and the device).
        run_dir: The layout's run directory (metrics.jsonl, the ranks' JSON files).
        timeout: Seconds before the launch is killed and reported as failed.
        threads: ``OMP_NUM_THREADS`` of every rank; None leaves the environment's.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = threads
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(layout.nproc),
        str(DRIVER), str(workload), str(run_dir), json.dumps(asdict(layout)),
    ]  # fmt: skip
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    (run_dir / "torchrun.log").write_text(proc.stdout + proc.stderr)
    ranks = sorted(run_dir.glob("rank-*.json"))
    if proc.returncode != 0 or len(ranks) != layout.nproc:
        tail = "\n".join(proc.stderr.strip().splitlines()[-25:])
        return {"error": f"torchrun exited with {proc.returncode}:\n{tail}"}
    return summarize([json.loads(p.read_text()) for p in ranks], layout)


def summarize(ranks: list[dict[str, Any]], layout: Layout) -> dict[str, Any]:
    """One layout's figures from its ranks' JSON: throughput, communication shares, memory, losses.

    A step's time is its slowest rank's (the step is not over before every rank is); tokens are the
    step's real tokens over all data-parallel ranks (every rank reports the same global count).
    """
    first = ranks[0]
    measured = first["measured"]
    seconds = sum(max(r["step_seconds"][i] for r in ranks) for i in measured)
    tokens = sum(first["step_tokens"][i] for i in measured)
    cpu = statistics.fmean(sum(r["step_cpu_seconds"][i] for i in measured) for r in ranks)
    shares = [r["comm"]["in_flight_us"] / r["comm"]["wall_us"] for r in ranks]
    exposed = [r["comm"]["exposed_us"] / r["comm"]["wall_us"] for r in ranks]
    kinds: dict[str, float] = {}
    for r in ranks:
        for kind, us in r["comm"]["by_kind"].items():
            kinds[kind] = kinds.get(kind, 0.0) + us / r["comm"]["wall_us"] / len(ranks)
    return {
        "nproc": layout.nproc,
        "parallel": layout.parallel,
        "batching": first["batching"],
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "tokens_per_s_per_process": tokens / seconds / layout.nproc,
        "tokens_per_cpu_s_per_process": tokens / layout.nproc / cpu,
        "comm_share": statistics.fmean(shares),
        "comm_share_range": [min(shares), max(shares)],
        "exposed_share": statistics.fmean(exposed),
        "exposed_share_range": [min(exposed), max(exposed)],
        "comm_by_kind": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
        "profiled_steps": first["comm"]["steps"],
        "peak_memory_bytes": max(r["peak_memory"] for r in ranks),
        "peak_memory_kind": first["peak_memory_kind"],
        "train_memory_bytes": max(r["peak_memory"] - r["baseline_memory"] for r in ranks),
        "losses": first["losses"],
        "layout": first["layout"],
        "setup_seconds": max(r["setup_seconds"] for r in ranks),
    }


# -- the run and its report ----------------------------------------------------------------------------


def machine(device: str, world: int) -> str:
    """The machine the figures come from, in words."""
    import platform

    import torch

    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        memory = props.total_memory / 2**30
        gpus = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)} ({memory:.0f} GiB)"
        return f"{gpus}, NCCL, one GPU per process; torch {torch.__version__}, CUDA {torch.version.cuda}"
    cpu = platform.machine()
    with contextlib.suppress(OSError):
        info = Path("/proc/cpuinfo").read_text().splitlines()
        names = [ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    cores = os.cpu_count() or 0
    return (
        f"CPU: {cores} cores ({cpu}), gloo, OMP_NUM_THREADS=1 per process ({world} processes on {cores} "
        f"cores: {'oversubscribed' if world > cores else 'one core each'}); torch {torch.__version__}"
    )


HEADER = (
    ("layout", "procs", "batch", "tok/s", "tok/s", "tok/CPU-s", "comm in flight", "exposed", "largest",
     "peak", "train", "loss"),
    ("", "", "x accum", "total", "per proc", "per proc", "% mean (min-max)", "% mean (min-max)",
     "collectives (% in flight)", "MiB", "MiB", "first->last"),
)  # fmt: skip


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    lines = [*HEADER, *rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADER[0]))]
    return [
        " ".join([line[0].ljust(widths[0]), *(c.rjust(n) for c, n in zip(line[1:], widths[1:], strict=True))])
        for line in lines
    ]


def _pct(mean: float, span: Sequence[float]) -> str:
    return f"{mean:.0%} ({span[0]:.0%}-{span[1]:.0%})".replace("%", "")


def row(name: str, r: dict[str, Any]) -> tuple[str, ...]:
    """One layout's line of the table."""
    b = r["batching"]
    kinds = ", ".join(f"{k} {v:.0%}" for k, v in list(r["comm_by_kind"].items())[:2]) or "-"
    return (
        name, str(r["nproc"]), f"{b['batch_size']}x{b['grad_accum']}", f"{r['tokens_per_s']:.0f}",
        f"{r['tokens_per_s_per_process']:.0f}", f"{r['tokens_per_cpu_s_per_process']:.0f}",
        _pct(r["comm_share"], r["comm_share_range"]), _pct(r["exposed_share"], r["exposed_share_range"]),
        kinds, f"{r['peak_memory_bytes'] / 2**20:.0f}", f"{r['train_memory_bytes'] / 2**20:.0f}",
        f"{r['losses'][0]:.3f}->{r['losses'][-1]:.3f}",
    )  # fmt: skip


def run_bench(
    plan_name: str, root: Path, *, world: int | None = None, only: Sequence[str] | None = None
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Build the plan's workload in ``root``, train every layout (one torchrun launch each), report.

    Args:
        plan_name: A key of :data:`PLANS`.
        root: A scratch directory (the workload and every layout's run directory).
        world: Processes of the parallel layouts (default: the plan's; for the GPU plan, every GPU).
        only: Run only the layouts with these names (default: all).

    Returns:
        The results by layout name (a failed layout holds ``error``) and the report's lines.
    """
    import time

    plan = PLANS[plan_name]
    if world is None:
        if plan.world is not None:
            world = plan.world
        else:
            import torch

            world = torch.cuda.device_count()
    w = build(root / "workload", plan_name)
    todo = [lay for lay in layouts(world, w.model) if only is None or lay.name in only]
    threads = "1" if plan.device == "cpu" else None
    timeout = 600.0 if plan.device == "cuda" else 300.0
    load = [os.getloadavg()[0]]
    started = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    for i, lay in enumerate(todo):
        results[lay.name] = launch(
            lay, root / "workload", root / f"layout-{i}", timeout=timeout, threads=threads
        )
    load.append(os.getloadavg()[0])
    ran = {n: r for n, r in results.items() if "error" not in r}
    m = w.model
    shape = (
        f"hidden {m['hidden_size']}, MLP {m['intermediate_size']}, {m['num_hidden_layers']} layers, "
        f"{m['num_attention_heads']} heads / {m['num_key_value_heads']} KV heads, "
        f"vocabulary {m['vocab_size']}"
    )
    if m["vocab_size"] > w.tokenizer_vocab_size:
        shape += f" (the tokenizer's {w.tokenizer_vocab_size} ids are used)"
    precision = "fp32" if plan.precision == "float32" else "fp32 weights, bf16 autocast"
    tokens = plan.global_bins * plan.seq_len
    lines = [
        f"machine: {machine(plan.device, world)}",
        f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average (1 min) before/after: "
        f"{load[0]:.1f} / {load[1]:.1f}; all launches took {time.perf_counter() - started:.0f} s",
        f"model: llama, {w.params / 1e6:.1f}M parameters ({shape}, untied), random init (seed 0), "
        f"{precision}",
        f"data: the world's {w.documents} pretraining texts packed into bins of {plan.seq_len} tokens; "
        f"{plan.global_bins} bins ({tokens:,} token slots) per optimizer step on every layout, the same bins "
        "in the same order",
        f"steps per layout: {plan.warmup_steps} warm-up, {plan.measured_steps} timed (tok/s), "
        f"{plan.profiled_steps} profiled (communication); AdamW, lr {plan.lr}",
        "",
        *_table([row(n, r) for n, r in ran.items()]),
        *(f"{n}: FAILED: {r['error']}" for n, r in results.items() if "error" in r),
        "",
        "tok/s: real tokens of the timed steps over their time (a step lasts until its slowest rank is "
        "done); per proc: divided by the processes; tok/CPU-s: per process, over its CPU time",
        "comm in flight: time some collective (gloo range, c10d op or functional wait, on any thread; "
        "overlaps counted once) is open, over the profiled steps' wall time, mean over ranks (min-max); "
        "waiting for a slower peer and posted receives count",
        "exposed: the part of that with no compute op running on the training thread; largest "
        "collectives: by the transport's names (gloo runs a reduce-scatter as an all_reduce)",
        f"peak: the largest rank's {'CUDA max allocated' if plan.device == 'cuda' else 'peak RSS'} before "
        "profiling; train: its growth over the process after the imports",
    ]
    return results, lines


def write_json(path: Path, results: dict[str, Any], lines: list[str]) -> None:
    """Write the report and the figures to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"report": lines, "results": results}, indent=1))
