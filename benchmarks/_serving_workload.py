"""The model, prompts and streaming client of the serving benchmark.

A random-init llama-type model (hidden 384, 6 layers, GQA 6/2, 11.7M parameters) with a byte-level
BPE tokenizer learned from the bundled world's pretraining texts, saved with lmstack-core so both
servers load the very same directory. Prompts are seeded runs of the world's articles, 16-256 words
(about 20-300 tokens), each starting from its own article so no two prompts share a prefix. Every
request is a streamed ``/v1/completions`` call, greedy, that generates exactly ``MAX_TOKENS`` tokens.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
SEED = 0
MAX_TOKENS = 64
PROMPT_WORDS = (16, 256)
# The KV cache both servers get, in blocks of BLOCK_SIZE tokens (32,768 tokens: the 32 longest requests
# need about 10,500), and the token budget of one step.
BLOCK_SIZE = 16
NUM_KV_BLOCKS = 2048
MAX_BATCH_TOKENS = 2048


@dataclass(frozen=True)
class ModelInfo:
    """The saved model directory and what the servers need to size their KV caches."""

    path: Path
    kv_bytes_per_block: int


def build_model(directory: Path) -> ModelInfo:
    """Save the random model and its tokenizer under ``directory``."""
    from _bench_model import bench_llama

    from lmstack.core import save_pretrained

    model, tokenizer = bench_llama(_world_texts("pretrain.jsonl"), SEED)
    config = model.config
    # Tokens with no text of their own (special tokens, lone bytes of multi-byte characters) get a zero
    # output row: their logit is 0, below the best of the ~2,700 random rows, so greedy decoding never
    # picks them. Every generated token then streams text on both servers (transformers sends nothing
    # for a token until its text is complete), and the clock reads the tokens off the text chunks.
    silent = [i for i in range(tokenizer.vocab_size) if not _printable(tokenizer.decode([i], True))]
    with torch.no_grad():
        model.lm_head.weight[silent] = 0
    path = save_pretrained(model, directory / "llama-serve", tokenizer=tokenizer)
    head_dim = config.hidden_size // config.num_attention_heads
    # K and V, every layer, fp32 (the checkpoint's dtype, which both servers keep).
    per_block = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * BLOCK_SIZE * 4
    return ModelInfo(path, per_block)


def prompts(n: int, seed: int = SEED) -> list[str]:
    """``n`` seeded prompts of mixed lengths, each starting with a different article."""
    articles = _world_texts("articles.jsonl")
    assert n <= len(articles), f"only {len(articles)} articles for {n} prompts"
    rng = random.Random(seed)
    order = rng.sample(range(len(articles)), len(articles))
    out = []
    for i in range(n):
        words: list[str] = []
        target = rng.randint(*PROMPT_WORDS)
        j = i
        while len(words) < target:
            words += articles[order[j % len(order)]].split()
            j += 1
        out.append(" ".join(words[:target]))
    return out


def _printable(text: str) -> bool:
    return bool(text) and "\ufffd" not in text


def _world_texts(name: str) -> list[str]:
    sys.path.insert(0, str(ROOT / "examples" / "world"))
    import world

    return [row["text"] for row in world.build_files(seed=SEED)[name]]


# -- the client -----------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One streamed request as the client saw it (times in seconds from sending it)."""

    ttft: float = float("nan")
    last: float = float("nan")
    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None

    @property
    def tpot(self) -> float:
        """Time per output token after the first."""
        return (self.last - self.ttft) / max(1, self.completion_tokens - 1)


@dataclass
class Level:
    """All requests of one concurrency level, and the wall-clock time they took together."""

    concurrency: int
    samples: list[Sample] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def output_tokens(self) -> int:
        return sum(s.completion_tokens for s in self.samples)

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds

    def ms(self, metric: str, q: int) -> float:
        """The ``q``-th percentile of ``ttft`` or ``tpot`` in milliseconds (linear interpolation)."""
        values = [getattr(s, metric) * 1000 for s in self.samples]
        return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


async def _one(client: httpx.AsyncClient, body: dict[str, Any]) -> Sample:
    """Send one streamed completion; the first token is the first chunk holding text."""
    sample = Sample()
    start = time.perf_counter()
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            sample.error = f"HTTP {response.status_code}: {(await response.aread())[:300]!r}"
            return sample
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            now = time.perf_counter() - start
            if "error" in event:
                sample.error = str(event["error"])[:300]
                break
            for choice in event.get("choices") or []:
                if choice.get("text"):
                    if sample.text == "":
                        sample.ttft = now
                    sample.text += choice["text"]
                sample.last = now
            if event.get("usage"):
                sample.prompt_tokens = event["usage"]["prompt_tokens"]
                sample.completion_tokens = event["usage"]["completion_tokens"]
    if sample.error is None and sample.completion_tokens == 0:
        sample.error = "the stream ended without a usage chunk"
    return sample


async def _level(
    base_url: str, bodies: Sequence[dict[str, Any]], concurrency: int
) -> tuple[list[Sample], float]:
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as client:

        async def gated(body: dict[str, Any]) -> Sample:
            async with gate:
                return await _one(client, body)

        start = time.perf_counter()
        samples = await asyncio.gather(*(gated(b) for b in bodies))
        return list(samples), time.perf_counter() - start


def run_level(
    base_url: str, model: str, extra_body: dict[str, Any], texts: Sequence[str], concurrency: int
) -> Level:
    """Stream one request per prompt, ``concurrency`` at a time; the clock covers them all."""
    common = {"model": model, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True, **extra_body}
    bodies = [{**common, "prompt": text} for text in texts]
    samples, seconds = asyncio.run(_level(base_url, bodies, concurrency))
    return Level(concurrency, samples, seconds)
