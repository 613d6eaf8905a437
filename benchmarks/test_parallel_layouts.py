"""Scale-out: per-process tokens/s, communication share and memory of every ``parallel:`` layout.

``nox -s bench -- -k parallel`` (or ``.venv/bin/pytest benchmarks/test_parallel_layouts.py -m benchmark
--benchmark-only -s``). One seeded random Llama (7.8M parameters: hidden 256, 8 layers, 8 heads / 4 KV
heads, MLP 768, the world-trained BPE vocabulary of 2,992 ids, untied) trains through lmstack-train's
``train_loop`` on the bundled world's pretraining texts, packed into bins of 256 tokens, 8 bins a step on
every layout (the same bins in the same order: every layout's losses equal one process's), fp32, on 4
CPU processes under gloo, one ``torchrun`` launch per layout:

* ``1 process`` (the baseline), ``ddp`` (``run.data_parallel: ddp``, no ``parallel:`` section);
* ``dp_shard=4`` (FSDP2), ``dp_shard=2 x tp=2``, ``tp=4``, ``tp=2 x pp=2``, ``pp=4``,
  ``dp_shard=2 x sp=2`` (Ulysses), ``sp=4`` (ring) and ``dp_shard=2 x pp=2`` (interleaved 1F1B, 2
  stages per rank).

Each layout runs 2 warm-up steps, 4 timed steps (tokens/s: a step lasts until its slowest rank is done)
and 2 steps under ``torch.profiler``, whose collectives give the communication share (in flight: the
union of the collectives' profiler ranges on any thread over the steps' wall time; exposed: the part of
that with no compute op running on the training thread; ``_parallel_workload`` says exactly what is
counted). Every process runs one torch thread (``OMP_NUM_THREADS=1``); where there are fewer cores than
4 processes they are oversubscribed, which slows every multi-process layout and shows up as
communication (a rank waiting for a peer that has no core is waiting in a collective). The figures are
for comparing layouts with one another, not speed records. Printed, and written to
``.benchmarks/parallel_layouts.json``. Asserted (sanity only): every layout ran, learned exactly what one
process learns (the losses of every step within 1e-4 relative: fp32, only the summation order differs),
saw collectives (and one process none). 7:18 on 2 shared cores (the run in lm-train's README).

``test_parallel_layouts_gpu`` (marker ``gpu``, not run without a GPU) is the same script at a larger size,
ready to run in one call on a GPU machine::

    .venv/bin/python -m pytest benchmarks/test_parallel_layouts.py -m gpu -s -q -p no:cacheprovider

Llama-3.2-1B's layer shape (hidden 2048, MLP 8192, 16 layers, 32 heads / 8 KV heads) with a 32,000
vocabulary, untied (1.1B parameters), bins of 2,048 tokens, 16 a step, bf16 autocast over fp32 weights,
NCCL, one process per GPU on every GPU of the node (the layouts with ``world`` in place of 4; one GPU
runs the 1-process baseline only); the GPUs' name and count head the output, also written to
``.benchmarks/parallel_layouts_gpu.json``. ``test_parallel_layouts_gpu_code_path_on_cpu`` runs that
code (bf16 autocast, the profiler, the report) on 2 CPU processes with a tiny model.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import _parallel_workload as pw

OUT = Path(__file__).resolve().parents[1] / ".benchmarks"


def _extra_info(benchmark: Any, results: dict[str, dict[str, Any]]) -> None:
    for name, r in results.items():
        if "error" in r:
            benchmark.extra_info[name] = {"error": r["error"][-500:]}
            continue
        benchmark.extra_info[name] = {
            "tokens_per_s": round(r["tokens_per_s"], 1),
            "tokens_per_s_per_process": round(r["tokens_per_s_per_process"], 1),
            "comm_share": round(r["comm_share"], 4),
            "exposed_share": round(r["exposed_share"], 4),
            "peak_memory_mib": round(r["peak_memory_bytes"] / 2**20, 1),
        }


def _check(results: dict[str, dict[str, Any]], plan: pw.Plan, *, rel: float, all_steps: bool) -> None:
    """Sanity: every layout ran all its steps, learned what one process learns, and saw collectives."""
    failed = {n: r["error"] for n, r in results.items() if "error" in r}
    assert not failed, failed
    one = results["1 process"]
    assert one["comm_share"] == 0 and one["comm_by_kind"] == {}, one
    for name, r in results.items():
        assert len(r["losses"]) == plan.total_steps and all(map(math.isfinite, r["losses"])), name
        assert r["profiled_steps"] == plan.profiled_steps, name
        steps = range(plan.total_steps) if all_steps else range(1)
        for i in steps:
            assert r["losses"][i] == pytest.approx(one["losses"][i], rel=rel), (name, i)
        assert 0 <= r["exposed_share"] <= r["comm_share"] + 1e-9 <= 1 + 1e-9, name
        if r["nproc"] > 1:
            assert r["comm_share"] > 0 and r["comm_by_kind"], f"{name}: no collective was seen"


@pytest.mark.benchmark
def test_parallel_layouts_on_4_cpu_processes(benchmark: Any, tmp_path: Path) -> None:
    results, lines = benchmark.pedantic(pw.run_bench, args=("cpu", tmp_path), rounds=1, iterations=1)
    print("\n" + "\n".join(lines))
    pw.write_json(OUT / "parallel_layouts.json", results, lines)
    _extra_info(benchmark, results)
    assert len(results) == 10, sorted(results)  # the baseline and the nine 4-process layouts
    _check(results, pw.PLANS["cpu"], rel=1e-4, all_steps=True)


@pytest.mark.gpu
@pytest.mark.benchmark
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is false)"
)
def test_parallel_layouts_gpu(benchmark: Any, tmp_path: Path) -> None:
    results, lines = benchmark.pedantic(pw.run_bench, args=("gpu", tmp_path), rounds=1, iterations=1)
    print("\n" + "\n".join(lines))
    pw.write_json(OUT / "parallel_layouts_gpu.json", results, lines)
    _extra_info(benchmark, results)
    assert lines[0].startswith(f"machine: {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}")
    # bf16 autocast: a layout splits the bf16 matrix products differently, so the first step's loss
    # (ln 32,000 = 10.4 at random init) agrees to about 1e-3 relative, later steps drift further.
    _check(results, pw.PLANS["gpu"], rel=1e-2, all_steps=False)
    # 10 steps from ln(32,000) = 10.4, where 29,000 of the ids never occur, fall far more than 0.2.
    for name, r in results.items():
        assert r["losses"][-1] < r["losses"][0] - 0.2, f"{name}: the loss did not fall"


SMOKE_LAYOUTS = ("1 process", "dp_shard=2 (FSDP2)", "tp=2", "pp=2 (interleaved, 2 stages/rank)")


@pytest.mark.benchmark
def test_parallel_layouts_gpu_code_path_on_cpu(benchmark: Any, tmp_path: Path) -> None:
    """The GPU benchmark's code (bf16 autocast, profiling, the report) on 2 CPU processes, tiny model."""
    results, lines = benchmark.pedantic(
        pw.run_bench, args=("smoke", tmp_path), kwargs={"only": SMOKE_LAYOUTS}, rounds=1, iterations=1
    )
    print("\n" + "\n".join(lines))
    assert sorted(results) == sorted(SMOKE_LAYOUTS)
    # bf16 autocast on the CPU: the first step's loss agrees to bf16's precision.
    _check(results, pw.PLANS["smoke"], rel=1e-2, all_steps=False)
    assert lines[0].startswith("machine: CPU") and "bf16 autocast" in lines[2]
    assert all(any(line.startswith(name + " ") for line in lines) for name in SMOKE_LAYOUTS)


def _x(name: str, ts: float, dur: float, *, tid: int = 1, cat: str = "cpu_op") -> dict[str, Any]:
    return {"ph": "X", "name": name, "ts": ts, "dur": dur, "pid": 7, "tid": tid, "cat": cat}


@pytest.mark.benchmark
def test_parallel_comm_accounting(benchmark: Any) -> None:
    """The interval arithmetic behind the shares, on hand-made traces whose answers are worked out here."""
    cpu_trace = [
        _x(pw.STEP_RANGE, 0, 100, cat="user_annotation"),
        _x(pw.STEP_RANGE, 200, 100, cat="user_annotation"),
        # gloo's worker thread: 10-30, and 90-210 which straddles the gap between the steps (90-100 and
        # 200-210 count); the c10d op that issued the first sits inside it and counts once.
        _x("gloo:all_reduce", 10, 20, tid=2, cat="user_annotation"),
        _x("gloo:all_gather", 90, 120, tid=2, cat="user_annotation"),
        _x("c10d::allreduce_", 10, 2),
        _x("aten::mm", 20, 5),  # compute while the all-reduce is in flight: 5 us hidden
        _x("aten::add", 40, 20),  # encloses a wait: not compute
        _x("_c10d_functional::wait_tensor", 45, 10),
        _x("aten::mul", 60, 10),  # compute with nothing in flight
        _x("gloo:all_reduce", 400, 50, tid=2, cat="user_annotation"),  # after the profiled steps
    ]
    stats = benchmark.pedantic(pw.comm_stats, args=(cpu_trace, "cpu"), rounds=1, iterations=1)
    assert stats.steps == 2 and stats.wall_us == 200
    assert stats.in_flight_us == 20 + 10 + 10 + 10  # 10-30, 45-55, 90-100, 200-210
    assert stats.exposed_us == 50 - 5
    assert stats.by_kind == {"all_reduce": 20, "all_gather": 20}
    gpu_trace = [
        _x(pw.STEP_RANGE, 0, 50, cat="user_annotation"),
        _x("ncclDevKernel_ReduceScatter_Sum_f32_RING_LL", 0, 10, tid=9, cat="kernel"),
        _x("ampere_sgemm_128x64_nn", 5, 15, tid=10, cat="kernel"),
        _x("nccl:reduce_scatter", 0, 1, cat="user_annotation"),  # CPU-side enqueue: not the transfer
    ]
    stats = pw.comm_stats(gpu_trace, "cuda")
    assert (stats.wall_us, stats.in_flight_us, stats.exposed_us) == (50, 10, 5)
    assert stats.by_kind == {"reduce_scatter": 10}
    with pytest.raises(ValueError, match="no 'lmstack_bench::step' range"):
        pw.comm_stats(cpu_trace[2:], "cpu")
    assert pw.subtract([(0, 10), (20, 30)], [(5, 25)]) == [(0, 5), (25, 30)]


@pytest.mark.benchmark
def test_parallel_layouts_on_4_processes_are_the_issues_list(benchmark: Any) -> None:
    found = benchmark.pedantic(pw.layouts, args=(4, pw.SHAPES["cpu"]), rounds=1, iterations=1)
    names = [lay.name for lay in found]
    assert names == [
        "1 process", "ddp (run.data_parallel)", "dp_shard=4 (FSDP2)", "dp_shard=2 x tp=2", "tp=4",
        "tp=2 x pp=2", "pp=4", "dp_shard=2 x sp=2 (ulysses)", "sp=4 (ring)",
        "dp_shard=2 x pp=2 (interleaved, 2 stages/rank)",
    ]  # fmt: skip
    plan = pw.PLANS["cpu"]
    for lay in found:
        bs, accum = lay.batching(plan)
        assert bs * accum * lay.dp_size == plan.global_bins and bs <= plan.max_micro_bins, lay.name
    # 8 GPUs: the same list with 8 and 4; 2: the pairs collapse (tp=2 once), 1: the baseline alone.
    eight = [lay.name for lay in pw.layouts(8, pw.SHAPES["gpu"])]
    assert "dp_shard=4 x tp=2" in eight and "tp=8" in eight and "tp=2 x pp=4" in eight and len(eight) == 10
    two = [lay.name for lay in pw.layouts(2, pw.SHAPES["tiny"])]
    assert two.count("tp=2") == 1 and len(two) == 8
    assert [lay.name for lay in pw.layouts(1, pw.SHAPES["gpu"])] == ["1 process"]
