"""Serving latency and throughput: ``lmstack serve`` vs ``transformers serve``, same model, same run.

Both are OpenAI-compatible FastAPI/uvicorn servers with continuous batching over a paged KV cache
(transformers' with ``--continuous-batching``), each in its own process on loopback, fp32 on the
CPU, with the same KV cache and per-step token budget. The client (httpx, in this process) streams
``/v1/completions``, greedy, exactly 64 tokens each, at concurrency 1, 8 and 32, max(8, 2 x
concurrency) requests per level, each level on its own prompts, after two warm-up requests. Per
request: time to first token (TTFT: until the first chunk holding text) and time per output token
after it (TPOT: first to last chunk over the tokens after the first); per level: their p50/p99 and
output tokens/s over the level's wall clock. The servers run one after the other, lmstack first, so
they never compete for the CPU. Only sanity is asserted: every request completed with its 64
tokens, and both servers saw the same prompt lengths.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import _serving_servers as servers
import _serving_workload as wl

LEVELS = (1, 8, 32)
WARMUP = 2


def _requests(concurrency: int) -> int:
    return max(8, 2 * concurrency)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> wl.ModelInfo:
    return wl.build_model(tmp_path_factory.mktemp("serve"))


def _sweep(server: servers.Server, texts: list[str]) -> list[wl.Level]:
    """Warm up, then run every level on its own slice of the prompts."""
    wl.run_level(server.base_url, server.model, server.extra_body, texts[:WARMUP], WARMUP)
    levels, start = [], WARMUP
    for concurrency in LEVELS:
        level = texts[start : start + _requests(concurrency)]
        levels.append(wl.run_level(server.base_url, server.model, server.extra_body, level, concurrency))
        start += len(level)
    return levels


@pytest.mark.benchmark
def test_serving_latency_vs_transformers_serve(
    benchmark: pytest.FixtureRequest, model: wl.ModelInfo, tmp_path: Path
) -> None:
    texts = wl.prompts(WARMUP + sum(_requests(c) for c in LEVELS))
    results: dict[str, list[wl.Level]] = {}

    def run() -> None:
        with servers.lmstack(model, tmp_path / "lmstack.log") as server:
            results["lmstack"] = _sweep(server, texts)
        with servers.transformers_serve(model, tmp_path / "transformers.log") as server:
            results["transformers"] = _sweep(server, texts)

    benchmark.pedantic(run, rounds=1, iterations=1)

    lines = [
        f"model: {model.path.name}, fp32, CPU; {wl.MAX_TOKENS} output tokens per request, prompts of "
        f"{min(s.prompt_tokens for lv in results['lmstack'] for s in lv.samples)}-"
        f"{max(s.prompt_tokens for lv in results['lmstack'] for s in lv.samples)} tokens",
        "baseline: transformers serve --continuous-batching (its paged-attention continuous batching)",
        f"{'server':>12} {'conc':>4} {'reqs':>4} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} "
        f"{'TPOT p99':>9} {'tok/s':>7} {'vs tf':>6}",
    ]
    for name, levels in results.items():
        for i, level in enumerate(levels):
            for s in level.samples:
                assert s.error is None, f"{name} at concurrency {level.concurrency}: {s.error}"
                assert s.completion_tokens == wl.MAX_TOKENS, (name, level.concurrency, s.completion_tokens)
                assert math.isfinite(s.ttft), f"{name} streamed no text for a request: {s}"
            theirs = results["transformers"][i]
            # The same prompts, tokenized by each server: the prompt token counts must agree too.
            assert [s.prompt_tokens for s in level.samples] == [s.prompt_tokens for s in theirs.samples]
            ratio = level.tokens_per_s / theirs.tokens_per_s
            stats = {
                "ttft_p50_ms": level.ms("ttft", 50), "ttft_p99_ms": level.ms("ttft", 99),
                "tpot_p50_ms": level.ms("tpot", 50), "tpot_p99_ms": level.ms("tpot", 99),
                "tokens_per_s": level.tokens_per_s,
            }  # fmt: skip
            for key, value in stats.items():
                benchmark.extra_info[f"{name}_c{level.concurrency}_{key}"] = round(value, 1)
            if name == "lmstack":
                benchmark.extra_info[f"tokens_per_s_ratio_c{level.concurrency}"] = round(ratio, 2)
            lines.append(
                f"{name:>12} {level.concurrency:>4} {len(level.samples):>4} {stats['ttft_p50_ms']:7.0f}ms "
                f"{stats['ttft_p99_ms']:7.0f}ms {stats['tpot_p50_ms']:7.1f}ms {stats['tpot_p99_ms']:7.1f}ms "
                f"{stats['tokens_per_s']:7.1f} {f'{ratio:5.2f}x' if name == 'lmstack' else '-':>6}"
            )
    same = sum(
        a.text == b.text
        for ours, theirs in zip(results["lmstack"], results["transformers"], strict=True)
        for a, b in zip(ours.samples, theirs.samples, strict=True)
    )
    total = sum(len(level.samples) for level in results["lmstack"])
    benchmark.extra_info["identical_texts"] = f"{same}/{total}"
    lines.append(f"greedy texts identical on both servers: {same}/{total} requests")
    print("\n" + "\n".join(lines))
