"""torchrun driver of the scale-out benchmark: train one layout, time and profile its steps, per rank.

Usage (``_parallel_workload.launch`` runs it)::

    torchrun --standalone --nproc_per_node N _parallel_driver.py WORKLOAD_DIR RUN_DIR LAYOUT_JSON

Every rank builds the same seeded random model from the workload's config and calls lmstack-train's
``train_loop`` with the layout's ``parallel:`` section (or ``run.data_parallel`` alone) for the plan's
warm-up + measured + profiled steps. The loop's own step (``_Training.train_step``) is wrapped to read
the clock around it (after ``torch.cuda.synchronize`` on a GPU, so the step's kernels are in its time)
and to run the profiled steps under ``torch.profiler`` inside a ``STEP_RANGE`` range; the final model is
not written (nothing here needs it, and gathering a 1B model would only add minutes). Each rank writes
``rank-R.json``: its step times and CPU times, the steps' global real tokens, losses, its communication
accounting (``_parallel_workload.comm_stats`` over its chrome trace, which is then deleted unless
``PARALLEL_BENCH_KEEP_TRACES=1``) and memory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).parent))
import _parallel_workload as pw

from lmstack.core import CausalLM, ModelConfig, Tokenizer
from lmstack.train import DataConfig, OptimConfig, ParallelConfig, RunConfig, train_loop
from lmstack.train._loop import _Training


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(workload_dir: Path, run_dir: Path, layout_json: str) -> None:
    started = time.perf_counter()
    logging.basicConfig(level=logging.WARNING)
    layout = pw.Layout(**json.loads(layout_json))
    w = pw.Workload.load(workload_dir)
    plan = pw.PLANS[w.plan]
    rank = int(os.environ.get("RANK", "0"))
    cuda = plan.device == "cuda"
    baseline = 0 if cuda else _rss()
    batch_size, grad_accum = layout.batching(plan)
    first_profiled = plan.warmup_steps + plan.measured_steps
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    profiler = profile(activities=activities)
    times: dict[int, tuple[float, float, int]] = {}
    memory: dict[str, int] = {}
    trace = run_dir / f"trace-{rank}.json"
    train_step = _Training.train_step

    def timed_step(self: _Training, step: int) -> dict[str, Any]:
        profiled = step >= first_profiled
        if step == first_profiled:
            # The peak before the profiler holds its events (ru_maxrss never comes down again).
            memory["peak"] = int(torch.cuda.max_memory_allocated()) if cuda else _rss()
            profiler.start()
        tokens_before = self.tokens_seen
        with record_function(pw.STEP_RANGE) if profiled else contextlib.nullcontext():
            t0, c0 = time.perf_counter(), time.process_time()
            record = train_step(self, step)
            if cuda:
                torch.cuda.synchronize()
            times[step] = (
                time.perf_counter() - t0,
                time.process_time() - c0,
                self.tokens_seen - tokens_before,
            )
        if step == plan.total_steps - 1:
            profiler.stop()
            profiler.export_chrome_trace(str(trace))
        return record

    _Training.train_step = timed_step  # type: ignore[method-assign]
    _Training.save_final = lambda self, save_model=None: None  # type: ignore[method-assign,assignment]

    tokenizer = Tokenizer.from_pretrained(w.tokenizer)
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(**w.model))  # the same weights on every rank and in every layout
    result = train_loop(
        model,
        tokenizer,
        DataConfig(
            paths=[w.data], format="text", train_on="all", max_length=plan.seq_len, on_overflow="split"
        ),
        OptimConfig(lr=plan.lr, warmup_steps=1),
        RunConfig(
            output_dir=str(run_dir), max_steps=plan.total_steps, batch_size=batch_size, grad_accum=grad_accum,
            save_every=0, device=plan.device, precision=plan.precision,  # type: ignore[arg-type]
            data_parallel=layout.data_parallel,  # type: ignore[arg-type]
            tensorboard=False, measure_activations=False, log_every=1,
        ),
        parallel=ParallelConfig(**layout.parallel) if layout.parallel is not None else None,
    )  # fmt: skip
    events = json.loads(trace.read_text())["traceEvents"]
    if os.environ.get("PARALLEL_BENCH_KEEP_TRACES", "") in ("", "0"):
        trace.unlink()
    comm = pw.comm_stats(events, plan.device)
    steps = list(range(plan.total_steps))
    out = {
        "rank": rank,
        "batching": {"batch_size": batch_size, "grad_accum": grad_accum},
        "step_seconds": [times[s][0] for s in steps],
        "step_cpu_seconds": [times[s][1] for s in steps],
        "step_tokens": [times[s][2] for s in steps],
        "measured": list(range(plan.warmup_steps, first_profiled)),
        "losses": result.losses,
        "comm": {
            "wall_us": comm.wall_us, "in_flight_us": comm.in_flight_us, "exposed_us": comm.exposed_us,
            "by_kind": comm.by_kind, "steps": comm.steps,
        },
        "peak_memory_kind": result.peak_memory_kind,
        "peak_memory": memory["peak"],
        "baseline_memory": baseline,
        "layout": result.layout or result.data_parallel,
        "setup_seconds": time.perf_counter() - started - result.seconds,
    }  # fmt: skip
    (run_dir / f"rank-{rank}.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
