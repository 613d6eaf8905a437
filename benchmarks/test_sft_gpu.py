"""SFT tokens/s and peak GPU memory on one GPU: lmstack-train (eager, compiled) against TRL ``SFTTrainer``.

Ready to run in one call when a GPU is lent (written where there was none; about 5 minutes on one H200)::

    .venv/bin/python -m pytest benchmarks/test_sft_gpu.py -m gpu -s -q -p no:cacheprovider

One seeded random llama of TinyLlama-1.1B's shape (hidden 2048, MLP 5632, 22 layers, 32 heads / 4 KV
heads, vocabulary 32,000, untied; the tokenizer is the world-trained BPE of the CPU benchmark, so only its
2,992 ids are ever looked up), fp32 weights, steps under bf16 autocast. The same 640 chats as the CPU SFT
benchmark (``_sft_workload``: loss on the assistant turns), AdamW at a constant lr, 3 warm-up + 9
measured steps of about 4,050 real tokens (lmstack: 2 best-fit bins of 2,048), one process per side
(``_sft_probe.py --device cuda``):

* ``lmstack``: ``lmstack.train.recipes.sft``, ``precision: bfloat16``;
* ``lmstack-compiled``: the same with ``run.compile: true``; the warm-up steps' time beyond the median
  measured step is reported as its compile time;
* ``trl-padding-free``: ``SFTTrainer(padding_free=True)``, ``bf16=True``, the batch flattened into one row;
* ``trl-packed``: ``SFTTrainer(packing=True)`` (BFD into 2 sequences of 2,048 a step), ``bf16=True``.

The Hugging Face model uses FlashAttention-2 where ``flash_attn`` is installed, else SDPA (the table's
configurations say which; ``SFT_BENCH_HF_ATTENTION=sdpa`` forces one). Reported per side: real tokens per
second over the measured steps (every step ends with ``torch.cuda.synchronize``), eager lmstack's speed-up
over it, ``torch.cuda.max_memory_allocated``, padding waste, losses; the GPU's name and memory and the
torch/CUDA versions head the output, which is also written to ``.benchmarks/sft_gpu.json``. Asserted
(sanity only): every side that ran took all its steps with finite losses that fell, from about lmstack's
first loss, on about lmstack's real tokens.

``test_sft_gpu_code_path_on_cpu`` runs the same code (probe flags, bf16 autocast, report) on the CPU with
the small model for 3 steps, to prove the path runs where no GPU is.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import _sft_workload as wl
from _sft_probe import run_side, warmup_extra_seconds

SIDES = ("lmstack", "lmstack-compiled", "trl-padding-free", "trl-packed")
TIMEOUT_S = 420
"""Per side: a bound, not a target; a side that runs past it is reported as failed."""
OUT = Path(__file__).resolve().parents[1] / ".benchmarks" / "sft_gpu.json"


def _machine(device: str) -> list[str]:
    """The device and software the numbers were measured on."""
    versions = f"torch {torch.__version__}, CUDA {torch.version.cuda}"
    if find_spec("trl") is not None:
        import transformers
        import trl

        versions += f", transformers {transformers.__version__}, TRL {trl.__version__}"
    versions += f", flash_attn {'installed' if find_spec('flash_attn') else 'not installed'}"
    if device != "cuda":
        return [f"device: CPU (a code-path check; no GPU figures), {versions}"]
    props = torch.cuda.get_device_properties(0)
    return [f"device: {torch.cuda.get_device_name(0)}, {props.total_memory / 2**30:.0f} GiB, {versions}"]


def _row(name: str, r: dict[str, Any], ours: dict[str, Any], plan: wl.Plan) -> tuple[str, ...]:
    rate, our_rate = r["tokens"] / r["seconds"], ours["tokens"] / ours["seconds"]
    peak = f"{r['peak_cuda'] / 2**30:.1f}" if "peak_cuda" in r else "-"
    return (
        name, f"{rate:.0f}", f"{our_rate / rate:.2f}x", peak, f"{1 - r['tokens'] / r['slots']:.1%}",
        f"{r['tokens'] / plan.measured_steps:.0f}", f"{r['losses'][0]:.3f}->{r['losses'][-1]:.3f}",
        f"{warmup_extra_seconds(r['step_seconds'], plan.warmup_steps):.1f}", f"{r['setup_seconds']:.1f}",
    )  # fmt: skip


HEADER = (
    ("side", "tok/s", "lmstack x", "peak CUDA", "padding", "tok/step", "loss", "warm-up", "setup"),
    ("", "", "", "GiB", "waste", "(real)", "first->last", "extra s", "s"),
)


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    lines = [*HEADER, *rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADER[0]))]
    return [
        " ".join([line[0].ljust(widths[0]), *(c.rjust(n) for c, n in zip(line[1:], widths[1:], strict=True))])
        for line in lines
    ]


def run_bench(plan: str, device: str, tmp_path: Path) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Build the workload for ``plan``, run every side on ``device`` under bf16 autocast; report.

    Returns:
        The results by side (a failed side holds ``error``) and the report's lines.
    """
    workload = tmp_path / "workload"
    w = wl.build(workload, plan)
    p = w.steps
    flags = ("--device", device, "--precision", "bfloat16")
    # The other benchmarks pin one thread per process; here the host only feeds the GPU (or, on the CPU
    # check, proves the path), so the environment's threads are left alone.
    sides = [s for s in SIDES if not s.startswith("trl") or find_spec("trl") is not None]
    results = {s: run_side(s, workload, tmp_path / s, *flags, timeout=TIMEOUT_S) for s in sides}
    ran = {n: r for n, r in results.items() if "error" not in r}
    vocab = f"vocabulary {w.vocab_size} (the tokenizer's {w.tokenizer_vocab_size} ids are used)"
    lines = [
        *_machine(device),
        f"model: llama ({p.model} shape), {w.params / 1e6:.0f}M parameters, {vocab}, random init, fp32 "
        "weights, bf16 autocast",
        f"data: {w.num_samples} chats, {w.mean_length:.1f} tokens on average; steps: {p.warmup_steps} "
        f"warm-up + {p.measured_steps} measured; a step: lmstack {p.lmstack_bins} bins x {p.max_length}, TRL "
        f"padding-free {w.hf_batch_size} samples, TRL packed {p.lmstack_bins} sequences",
        "",
    ]
    if "lmstack" in ran:
        lines += _table([_row(n, r, ran["lmstack"], p) for n, r in ran.items()])
    lines += [
        *(f"{n}: FAILED: {r['error']}" for n, r in results.items() if "error" in r),
        *(
            f"{n}: graphs compiled per step: {r['compiled_graphs']}"
            for n, r in ran.items()
            if "compiled_graphs" in r
        ),
        "",
        "'lmstack x': eager lmstack's tokens/s over the side's; warm-up extra: the warm-up steps' time "
        "beyond as many median measured steps (compile time on lmstack-compiled)",
        "configurations:",
        *(f"  {n}: {json.dumps(r['config'])}" for n, r in ran.items()),
    ]
    return results, lines


@pytest.mark.gpu
@pytest.mark.benchmark
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is false)"
)
def test_sft_gpu(benchmark: Any, tmp_path: Path) -> None:
    results, lines = benchmark.pedantic(
        run_bench, args=("tinyllama", "cuda", tmp_path), rounds=1, iterations=1
    )
    print("\n" + "\n".join(lines))
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps({"report": lines, "results": results}, indent=1))
    ran = {n: r for n, r in results.items() if "error" not in r}
    assert "lmstack" in ran, results["lmstack"].get("error")
    ours = ran["lmstack"]
    for name, r in ran.items():
        benchmark.extra_info[name] = {
            "tokens_per_s": round(r["tokens"] / r["seconds"], 1),
            "peak_cuda_gib": round(r["peak_cuda"] / 2**30, 2),
        }
        # Sanity only: 12 steps of a 1.1B model at lr 3e-4 from ln(32,000) = 10.4 fall far more than 0.5.
        assert r["steps"] == wl.PLANS["tinyllama"].total_steps and r["finite"], name
        first, last = r["losses"][0], sum(r["losses"][-3:]) / 3
        assert last < first - 0.5, f"{name}: loss did not decrease ({first:.3f} -> {last:.3f})"
        assert abs(first - ours["losses"][0]) < 0.25, f"{name}: first loss {first:.3f} vs lmstack's"
        # 49 samples a step over 9 steps: their total varies by about 4% (one standard deviation).
        assert abs(r["tokens"] / ours["tokens"] - 1) < 0.15, f"{name}: {r['tokens']} real tokens vs lmstack's"


@pytest.mark.benchmark
def test_sft_gpu_code_path_on_cpu(benchmark: Any, tmp_path: Path) -> None:
    """The GPU benchmark's code (probe flags, bf16 autocast, the report) on the CPU, small model, 3 steps."""
    results, lines = benchmark.pedantic(run_bench, args=("smoke", "cpu", tmp_path), rounds=1, iterations=1)
    print("\n" + "\n".join(lines))
    plan = wl.PLANS["smoke"]
    # lmstack-compiled fails (cleanly, in the report) where this lmstack-train has no compile option yet.
    from lmstack.train._loop import RunConfig

    compiled = ["lmstack-compiled"] if "compile" in {f.name for f in dataclasses.fields(RunConfig)} else []
    trl = [s for s in SIDES if s.startswith("trl") and find_spec("trl") is not None]
    needed = ["lmstack", *compiled, *trl]
    for name in needed:
        r = results[name]
        assert "error" not in r, (name, r.get("error"))
        assert r["steps"] == plan.total_steps and r["finite"], name
        assert r["config"]["precision"] == "bfloat16", r["config"]
        assert "peak_cuda" not in r, name
        assert any(line.startswith(name + " ") for line in lines), name
    assert lines[0].startswith("device: CPU")
