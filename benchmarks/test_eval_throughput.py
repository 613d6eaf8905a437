"""Wall time of one multiple-choice evaluation: lmstack-eval against lm-evaluation-harness ``--model hf``.

The same task (1,000 questions, 4 choices of 2-6 words, every question opening with the same
instruction paragraph) as one lm-evaluation-harness task YAML over a local jsonl file, on the same
random ~11.7M-parameter llama (``_bench_model.py``), fp32 on the CPU, in the same process and the same
run:

* ``lm-eval``: ``lm_eval.simple_evaluate(model="hf", model_args="pretrained=DIR,dtype=float32",
  batch_size=32)``, its model load included;
* ``lmstack``: ``lmstack.eval.evaluate(LLM(DIR), yaml, cache=None)``, its model load included.

Both run with the same number of torch intra-op threads (1 by default, ``EVAL_BENCH_THREADS`` to
change), one after the other. Reported: wall and process-CPU seconds of each, both accuracies, the
largest per-choice log-likelihood difference and the speed-up. Asserted: the same scores (acc and
acc_norm within 0.1 points, log-likelihoods within 1e-4), not the speed (the goal, >= 2x, is reported).
``EVAL_BENCH_PROFILE=1`` runs lmstack once more under cProfile and prints where its time goes.
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import _eval_workload as wl

THREADS = int(os.environ.get("EVAL_BENCH_THREADS", "1"))
PROFILE = os.environ.get("EVAL_BENCH_PROFILE", "") not in ("", "0")
LM_EVAL_BATCH_SIZE = 32
GOAL = 2.0


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("eval")
    task = wl.build_task(root / "task")
    return wl.build_model(task, root / "llama"), task


@pytest.mark.benchmark
def test_eval_throughput_vs_lm_evaluation_harness(
    benchmark: pytest.FixtureRequest,
    setup: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model_dir, task = setup
    for name, value in {
        "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error",
    }.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    runs: dict[str, wl.Run] = {}
    load = {"before": os.getloadavg()}

    def run() -> None:
        runs["lmstack"] = wl.run_lmstack(model_dir, task)
        runs["lm-eval"] = wl.run_lm_eval(model_dir, task, LM_EVAL_BATCH_SIZE)
        load["after"] = os.getloadavg()

    try:
        benchmark.pedantic(run, rounds=1, iterations=1)
        profile = ""
        if PROFILE:
            profiler = cProfile.Profile()
            profiler.runcall(wl.run_lmstack, model_dir, task)
            stream = io.StringIO()
            pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(15)
            profile = "where lmstack's time goes (cProfile, top 15 by own time):\n" + stream.getvalue()
    finally:
        torch.set_num_threads(threads)

    ours, theirs = runs["lmstack"], runs["lm-eval"]
    assert len(ours.loglikelihoods) == len(theirs.loglikelihoods) == wl.NUM_QUESTIONS
    worst = max(
        abs(a - b)
        for mine, ref in zip(ours.loglikelihoods, theirs.loglikelihoods, strict=True)
        for a, b in zip(mine, ref, strict=True)
    )
    speedup, cpu_speedup = theirs.seconds / ours.seconds, theirs.cpu_seconds / ours.cpu_seconds
    lines = [
        f"task: {wl.NUM_QUESTIONS} questions x 4 choices, one shared instruction; model: llama ~11.7M, fp32, "
        f"CPU, {THREADS} torch thread(s) on both sides; lm-eval batch_size={LM_EVAL_BATCH_SIZE}",
        "load average (1 min) before/after: " + " / ".join(f"{load[k][0]:.1f}" for k in ("before", "after")),
    ]
    for name, r in runs.items():
        lines.append(
            f"{name:>8}: {r.seconds:7.1f} s wall, {r.cpu_seconds:7.1f} s CPU; acc {r.acc:.4f}, "
            f"acc_norm {r.acc_norm:.4f}"
        )
        benchmark.extra_info[name] = {
            "seconds": round(r.seconds, 2), "cpu_seconds": round(r.cpu_seconds, 2), "acc": r.acc,
            "acc_norm": r.acc_norm,
        }  # fmt: skip
    benchmark.extra_info["speedup_wall"] = round(speedup, 2)
    benchmark.extra_info["speedup_cpu"] = round(cpu_speedup, 2)
    benchmark.extra_info["max_loglikelihood_difference"] = worst
    lines.append(
        f"lmstack speed-up: {speedup:.2f}x wall, {cpu_speedup:.2f}x CPU (goal >= {GOAL:.0f}x); largest "
        f"per-choice log-likelihood difference {worst:.2e}"
    )
    print("\n" + "\n".join(lines) + ("\n" + profile if profile else ""))
    for metric in ("acc", "acc_norm"):
        assert getattr(ours, metric) == pytest.approx(getattr(theirs, metric), abs=1e-3), metric
    assert worst < 1e-4
