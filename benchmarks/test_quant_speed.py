"""Weight-only quantization speed: single-stream decode of fp32, int8 and int4 weights, lmstack vs llama.cpp.

The engine-speed benchmark's seeded ~56M llama (fp32, two threads), in one run:

* lmstack ``LLM`` on the float32 checkpoint and on ``lmstack quantize rtn`` int8 (per channel) and int4
  (groups of 128), each with the lm head left float (the default) and quantized too (``--lm-head``);
* llama.cpp (llama-cpp-python) on GGUF f32, q8_0 and q4_0 files of the same weights written by
  ``lmstack convert --to gguf`` (llama.cpp's q8_0/q4_0 quantize every matrix, the output head included).

Every lmstack engine here is a one-sequence engine (``max_num_seqs=1``), as llama.cpp runs one sequence:
its float32 matrices (all of fp32's, the float head of int8/int4) take core's ``gemv`` layout.

Decode tok/s is measured as in the engine-speed benchmark (time for 1 + n tokens minus time for 1), in
interleaved rounds within three groups (fp32 with f32; fp32, int8 and int8 +head with q8_0; the same for
4 bits), medians reported; each ratio is taken within one group. The
issue's goals, reported and not asserted: int8 >= 1.6x our fp32, int4 >= 2.5x, each >= 0.8x llama.cpp's
matching type. Greedy agreement with the float model over the first 32 tokens is reported for each.
Figures go to stdout, ``extra_info`` and ``.benchmarks/quant_speed.json``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import _engine_speed as es

PROMPT_LEN = 32
NEW_TOKENS = 128
PARITY = 32
ROUNDS = 3  # interleaved rounds per group


class _QuantizedRunner(es.LmstackRunner):
    """lmstack's ``LLM`` on a quantized copy of the checkpoint (``quantize_model`` in memory)."""

    def __init__(self, path: Path, bits: int, lm_head: bool) -> None:
        from lmstack.core import load_pretrained, train_bpe_tokenizer
        from lmstack.infer import LLM
        from lmstack.infer.quant import quantize_model

        model = load_pretrained(path, dtype=torch.float32)
        quantize_model(model, "rtn", bits=bits, group_size=128, lm_head=lm_head)
        tokenizer = train_bpe_tokenizer(iter(["benchmark text " * 20]), vocab_size=300, min_frequency=1)
        self.llm = LLM(model, tokenizer, kv_cache_memory="2GB", max_num_seqs=1)
        self.weight_layout = model.inference_layout


def _agree(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


@pytest.mark.benchmark
def test_quantized_decode_vs_llama_cpp(benchmark: Any, tmp_path: Path) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    pytest.importorskip("gguf")
    path, n_params = es.build_model(tmp_path / "llama-56m")
    threads_before = torch.get_num_threads()
    torch.set_num_threads(es.THREADS)
    f: dict[str, Any] = {"parameters": n_params, "threads": es.THREADS}
    prompt = es.prompts(1, PROMPT_LEN, seed=1)[0]

    def measure() -> None:
        from lmstack.core import export_gguf

        runners: dict[str, Any] = {"lmstack fp32": lambda: es.LmstackRunner(path, max_num_seqs=1)}
        for bits in (8, 4):
            for head in (False, True):
                label = f"lmstack int{bits}" + (" +head" if head else "")
                runners[label] = lambda bits=bits, head=head: _QuantizedRunner(path, bits, head)
        for kind in ("f32", "q8_0", "q4_0"):
            gguf = export_gguf(path, tmp_path / f"m-{kind}.gguf", type=kind, placeholder_vocab=True)
            f[f"gguf_{kind}_mb"] = gguf.stat().st_size / 1e6
            runners[f"llama.cpp {kind}"] = lambda gguf=gguf: es.LlamaCppRunner(gguf)
        tokens: dict[str, list[int]] = {}
        # Each group is measured in interleaved rounds (medians), so a host whose speed drifts slows
        # the systems compared alike; lmstack fp32 is in every group, and each ratio is taken within
        # its group (``<label> tok/s`` of fp32: its median over all groups' rounds).
        groups = {
            "f32": ["lmstack fp32", "llama.cpp f32"],
            "8": ["lmstack fp32", "lmstack int8", "lmstack int8 +head", "llama.cpp q8_0"],
            "4": ["lmstack fp32", "lmstack int4", "lmstack int4 +head", "llama.cpp q4_0"],
        }
        rounds: dict[str, list[float]] = {label: [] for label in runners}
        for group, labels in groups.items():
            live = {label: runners[label]() for label in labels}
            try:
                group_rounds: dict[str, list[float]] = {label: [] for label in labels}
                for _ in range(ROUNDS):
                    for label, runner in live.items():
                        rate, tokens[label] = es.decode_rate(runner, prompt, NEW_TOKENS, repeats=1)
                        group_rounds[label].append(rate)
                for label, rates in group_rounds.items():
                    rounds[label].extend(rates)
                    f[f"{label} tok/s in group {group}"] = float(statistics.median(rates))
            finally:
                for runner in live.values():
                    runner.close()
        for label, rates in rounds.items():
            f[f"{label} tok/s"] = float(statistics.median(rates))
        for label in runners:
            reference = "llama.cpp f32" if label.startswith("llama.cpp") else "lmstack fp32"
            f[f"{label} same greedy tokens as {reference}"] = _agree(tokens[label], tokens[reference])
        f["lmstack fp32 same greedy tokens as llama.cpp f32"] = _agree(
            tokens["lmstack fp32"], tokens["llama.cpp f32"]
        )

    try:
        benchmark.pedantic(measure, rounds=1, iterations=1)
    finally:
        torch.set_num_threads(threads_before)

    def within(group: str, a: str, b: str) -> float:
        return f[f"{a} tok/s in group {group}"] / f[f"{b} tok/s in group {group}"]

    ratios = {
        "int8 vs our fp32 (goal 1.6)": within("8", "lmstack int8 +head", "lmstack fp32"),
        "int4 vs our fp32 (goal 2.5)": within("4", "lmstack int4 +head", "lmstack fp32"),
        "int8 vs llama.cpp q8_0 (goal 0.8)": within("8", "lmstack int8 +head", "llama.cpp q8_0"),
        "int4 vs llama.cpp q4_0 (goal 0.8)": within("4", "lmstack int4 +head", "llama.cpp q4_0"),
        "fp32 vs llama.cpp f32": within("f32", "lmstack fp32", "llama.cpp f32"),
    }
    f["ratios"] = ratios
    f["machine"] = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "llama_cpp_python": llama_cpp.__version__}  # fmt: skip
    for key, value in f.items():
        if isinstance(value, (int, float)):
            benchmark.extra_info[key] = value
    out = Path(os.environ.get("LMSTACK_BENCH_DIR", Path(__file__).resolve().parent.parent / ".benchmarks"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "quant_speed.json").write_text(json.dumps(f, indent=2) + "\n")
    lines = [f"\n56M llama, {es.THREADS} threads, single-stream decode of {NEW_TOKENS} tokens:"]
    lines += [f"  {k:<44} {v:8.1f}" for k, v in f.items() if "tok/s" in k]
    lines += [f"  {k:<52} {v:4d}" for k, v in f.items() if "same greedy" in k]
    lines += [f"  {k:<44} {v:8.2f}x" for k, v in ratios.items()]
    print("\n".join(lines))
    # What is asserted: both float systems run the same model (their greedy tokens agree).
    assert f["lmstack fp32 same greedy tokens as llama.cpp f32"] >= PARITY, f
