"""The model, workload, schemas and measurements of the guided-decoding benchmark.

A random-init llama of the generation benchmark's shape (hidden 512, 8 layers, GQA 8/4, ~40M
parameters, fp32, CPU) over a real byte-level BPE vocabulary (the grammar library walks the tokens'
bytes), trained on text bundled in the repository: the world's pretraining texts, the READMEs and
changelogs, the examples and the libraries' sources, up to 16,000 tokens. Prompts are token ids drawn
from that vocabulary at the mixed workload's prompt lengths (16-512, seeded).

Three JSON schemas: ``NESTED_SCHEMA``, the realistic one (enums, arrays, required fields, a nested
object), whose outputs end early; ``ENDLESS_SCHEMA``, an object holding an integer array with far more
``minItems`` than 128 tokens can write, so a constrained request generates exactly as many tokens as an
unconstrained one with ``ignore_eos`` and the two throughputs compare like for like; and variants of
the nested one with a renamed property, each of which misses the grammar cache. The tokenizer's
vocabulary follows the repository's text, so its size (about 15.6k when written) drifts a little.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
import _generation_workload as gen_wl  # noqa: E402  (a sibling module, found through sys.path)

SEED = 0
BATCH = 32
MAX_TOKENS = 128
VOCAB_LIMIT = 16000
# Text the tokenizer learns from, beside the world's pretraining texts (relative to the repository).
CORPUS_GLOBS = (
    "README.md", "packages/*/README.md", "packages/*/CHANGELOG.md", "examples/**/*.md", "examples/**/*.py",
    "examples/**/*.txt", "examples/**/*.jsonl", "packages/*/src/**/*.py",
)  # fmt: skip
# The generation benchmark's model shape (~40M parameters with a 16k vocabulary).
MODEL_SHAPE: dict[str, Any] = {
    "model_type": "llama", "hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8,
    "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 1024,
}  # fmt: skip
# The library comparison compiles JSON as the engine does, compact (these separators, no free
# whitespace), in both libraries.
JSON_SEPARATORS = (",", ":")

NESTED_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "kind": {"enum": ["city", "person", "creature", "invention"]},
        "founded": {"type": "integer", "minimum": 800, "maximum": 1600},
        "tags": {"type": "array", "items": {"type": "string"}},
        "location": {
            "type": "object",
            "properties": {
                "country": {"type": "string"},
                "river": {"enum": ["Orlen", "Vask", "Tamber", "none"]},
            },
            "required": ["country", "river"],
            "additionalProperties": False,
        },
        "verified": {"type": "boolean"},
    },
    "required": ["name", "kind", "tags", "location"],
    "additionalProperties": False,
}
# One instance of NESTED_SCHEMA: the fixed token sequence the library comparison masks along.
NESTED_INSTANCE: dict[str, Any] = {
    "name": "Kadadell",
    "kind": "city",
    "founded": 1204,
    "tags": ["river port", "salt trade"],
    "location": {"country": "Velmora", "river": "Vask"},
    "verified": True,
}
ENDLESS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"values": {"type": "array", "items": {"type": "integer"}, "minItems": 10000}},
    "required": ["values"],
}


def nested_variant(index: int) -> dict[str, Any]:
    """NESTED_SCHEMA with its ``name`` property renamed after ``index``: same shape, distinct constraint."""
    schema = copy.deepcopy(NESTED_SCHEMA)
    schema["properties"] = {(f"name{index}" if key == "name" else key): value
                            for key, value in schema["properties"].items()}  # fmt: skip
    schema["required"] = [f"name{index}" if key == "name" else key for key in schema["required"]]
    return schema


# -- the model ------------------------------------------------------------------------------------------


def corpus() -> list[str]:
    """The tokenizer's training texts: the bundled world's pretraining texts and the repository's text."""
    sys.path.insert(0, str(ROOT / "examples" / "world"))
    import world

    texts = [row["text"] for row in world.build_files(seed=SEED)["pretrain.jsonl"]]
    paths = sorted({path for pattern in CORPUS_GLOBS for path in ROOT.glob(pattern)})
    return texts + [path.read_text(encoding="utf-8") for path in paths]


def build_model() -> tuple[Any, Any]:
    """A byte-level BPE tokenizer trained on :func:`corpus` and a seeded random llama over its vocabulary.

    Returns:
        ``(model, tokenizer)``: an ``lmstack.core.CausalLM`` (eval mode, fp32) and its ``Tokenizer``.
    """
    from lmstack.core import CausalLM, ModelConfig, train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(iter(corpus()), vocab_size=VOCAB_LIMIT)
    torch.manual_seed(SEED)
    special = {name: getattr(tokenizer, name) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
    config = ModelConfig(**MODEL_SHAPE, vocab_size=tokenizer.vocab_size, **special)
    return CausalLM(config).eval(), tokenizer


def new_llm(model: Any, tokenizer: Any) -> Any:
    """An ``LLM`` over the model with a fresh engine (an empty grammar cache) and room for the whole batch."""
    from lmstack.infer import LLM

    return LLM(model, tokenizer, kv_cache_memory="1GB")


def _plain_ids(tokenizer: Any) -> list[int]:
    special = set(tokenizer.all_special_ids)
    return [i for i in range(tokenizer.vocab_size) if i not in special]


def prompts(tokenizer: Any, n: int = BATCH, seed: int = SEED) -> list[list[int]]:
    """``n`` prompts at the mixed workload's lengths (16-512), ids drawn from the non-special vocabulary."""
    ids = _plain_ids(tokenizer)
    rng = random.Random(seed)
    return [[rng.choice(ids) for _ in range(len(r.prompt))] for r in gen_wl.workload(seed, n=n)]


def fixed_prompt(tokenizer: Any, length: int, seed: int) -> list[int]:
    """A seeded prompt of ``length`` non-special token ids (distinct seeds: no shared prefix to cache)."""
    ids = _plain_ids(tokenizer)
    rng = random.Random(seed)
    return [rng.choice(ids) for _ in range(length)]


# -- measurements ---------------------------------------------------------------------------------------


def timed_generate(llm: Any, batch: Sequence[list[int]], params: Any) -> tuple[float, list[Any]]:
    """Serve the whole batch in one ``LLM.generate`` call; returns (seconds, completions in order)."""
    start = time.perf_counter()
    outs = llm.generate(list(batch), params, use_tqdm=False)
    seconds = time.perf_counter() - start
    for out in outs:
        assert out.error is None, out.error
    return seconds, [out.outputs[0] for out in outs]


@dataclass
class Streamed:
    """One request served through ``LLM.stream``: its tokens, text, how it ended, and when tokens came.

    ``gaps`` are the seconds between consecutive outputs that carry tokens (one token each, one per
    engine step): their median is the per-token time, robust to the odd stall that other work on a
    shared machine causes.
    """

    seconds: float
    gaps: list[float]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None


def timed_stream(llm: Any, prompt: list[int], params: Any) -> Streamed:
    """Serve one request through ``LLM.stream`` and time each output."""

    async def consume() -> Streamed:
        start = time.perf_counter()
        arrivals: list[float] = []
        result = Streamed(0.0, [])
        async for out in llm.stream(prompt, params):
            assert out.error is None, out.error
            delta = out.outputs[0]
            if delta.token_ids:
                arrivals.append(time.perf_counter())
            result.token_ids += delta.token_ids
            result.text += delta.text
            result.finish_reason = delta.finish_reason
        result.seconds = arrivals[-1] - start
        result.gaps = [b - a for a, b in itertools.pairwise(arrivals)]
        return result

    return asyncio.run(consume())


def first_token_seconds(llm: Any, prompt: list[int], params: Any) -> float:
    """Seconds from ``LLM.stream`` until its first output (the request is aborted right after)."""

    async def first() -> float:
        start = time.perf_counter()
        stream = llm.stream(prompt, params)
        out = await stream.__anext__()
        seconds = time.perf_counter() - start
        await stream.aclose()
        assert out.error is None, out.error
        assert out.outputs[0].token_ids, "the first streamed output carries no token"
        return seconds

    return asyncio.run(first())


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``repeats`` calls of ``run``."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def llg_tokenizer(tokenizer: Any) -> Any:
    """llguidance's tokenizer of ``tokenizer`` (from its ``tokenizer.json``)."""
    import llguidance

    return llguidance.LLTokenizer(
        tokenizer.backend_tokenizer.to_str(), n_vocab=tokenizer.vocab_size, eos_token=[tokenizer.eos_token_id]
    )


def is_json_prefix(lltokenizer: Any, schema: dict[str, Any], token_ids: Sequence[int]) -> bool:
    """Whether ``token_ids`` spell a prefix of some JSON document valid under ``schema``.

    Checked by a matcher compiled here from the schema as given, with llguidance's default JSON options
    (any whitespace): a superset of what the engine's compact grammar allows.
    """
    import llguidance

    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
    matcher = llguidance.LLMatcher(lltokenizer, grammar, log_level=0)
    return bool(matcher.consume_tokens(list(token_ids))) and not matcher.is_error()


# -- the grammar libraries, side by side ----------------------------------------------------------------


def compare_libraries(tokenizer: Any, repeats: int = 5, mask_repeats: int = 20) -> dict[str, dict[str, Any]]:
    """llguidance vs xgrammar on NESTED_SCHEMA over the benchmark tokenizer, timed on this machine.

    Per library: building its tokenizer (once per model), compiling the schema cold (median over
    ``repeats`` distinct variants), filling one row's mask at each token of NESTED_INSTANCE (median
    and mean, microseconds) and filling the masks of 32 matchers at 32 different points of that
    instance, batched and one by one (median of ``mask_repeats``). Every token of the instance must be
    allowed by both libraries' masks, and both must accept the complete instance.

    Returns:
        ``{"llguidance": {...}, "xgrammar": {...}}``, times in milliseconds (``*_ms``) or microseconds
        (``*_us``), plus ``allowed_first`` (tokens allowed at the start) and ``instance_tokens``.
    """
    import llguidance
    import llguidance.torch as llg_torch
    import xgrammar

    overrides: Any = {"whitespace_flexible": False, "item_separator": JSON_SEPARATORS[0],
                      "key_separator": JSON_SEPARATORS[1]}  # fmt: skip
    ids = tokenizer.encode(json.dumps(NESTED_INSTANCE, separators=JSON_SEPARATORS), add_special_tokens=False)
    vocab_size = tokenizer.vocab_size
    eos = tokenizer.eos_token_id

    start = time.perf_counter()
    lltok = llg_tokenizer(tokenizer)
    llg_tok_ms = (time.perf_counter() - start) * 1e3
    start = time.perf_counter()
    encoded = [""] * vocab_size
    for token, index in tokenizer.get_vocab().items():
        encoded[index] = token
    info = xgrammar.TokenizerInfo(
        encoded, xgrammar.VocabType.BYTE_LEVEL, vocab_size=vocab_size, stop_token_ids=[eos]
    )
    compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
    xgr_tok_ms = (time.perf_counter() - start) * 1e3

    def llg_compile(schema: dict[str, Any]) -> Any:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=overrides)
        matcher = llguidance.LLMatcher(lltok, grammar, log_level=0)
        assert not matcher.is_error(), matcher.get_error()
        return matcher

    def xgr_compile(schema: dict[str, Any]) -> Any:
        text = json.dumps(schema)
        return compiler.compile_json_schema(text, any_whitespace=False, separators=JSON_SEPARATORS)

    variants = iter(range(10**6))
    llg_compile_ms = median_seconds(lambda: llg_compile(nested_variant(next(variants))), repeats) * 1e3
    xgr_compile_ms = median_seconds(lambda: xgr_compile(nested_variant(next(variants))), repeats) * 1e3
    compiled = xgr_compile(NESTED_SCHEMA)

    def allowed(bitmask: torch.Tensor, row: int, token: int) -> bool:
        return bool((int(bitmask[row, token // 32]) >> (token % 32)) & 1)

    # One row, token by token: fill the mask, check the instance's token is allowed, advance.
    llg_matcher, xgr_matcher = llg_compile(NESTED_SCHEMA), xgrammar.GrammarMatcher(compiled)
    llg_mask = llg_torch.allocate_token_bitmask(1, vocab_size)
    xgr_mask = xgrammar.allocate_token_bitmask(1, vocab_size)
    llg_times, xgr_times, allowed_first = [], [], {}
    for step, token in enumerate(ids):
        start = time.perf_counter()
        llg_torch.fill_next_token_bitmask(llg_matcher, llg_mask, 0)
        llg_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        xgr_matcher.fill_next_token_bitmask(xgr_mask, 0)
        xgr_times.append(time.perf_counter() - start)
        if step == 0:
            allowed_first = {name: sum(allowed(m, 0, t) for t in range(vocab_size))
                             for name, m in (("llguidance", llg_mask), ("xgrammar", xgr_mask))}  # fmt: skip
        assert allowed(llg_mask, 0, token) and allowed(xgr_mask, 0, token), f"token {step} masked out"
        assert llg_matcher.consume_token(token) and xgr_matcher.accept_token(token)
    assert llg_matcher.is_accepting() and xgr_matcher.accept_token(eos), "the whole instance is not accepted"

    # 32 rows, each at its own point of the instance.
    llg_rows, xgr_rows = [], []
    for row in range(BATCH):
        a, b = llg_compile(NESTED_SCHEMA), xgrammar.GrammarMatcher(compiled)
        for token in ids[: row * (len(ids) - 1) // BATCH]:
            assert a.consume_token(token) and b.accept_token(token)
        llg_rows.append(a)
        xgr_rows.append(b)
    executor = llguidance.LLExecutor()
    batch_matcher = xgrammar.BatchGrammarMatcher()
    llg_batch = llg_torch.allocate_token_bitmask(BATCH, vocab_size)
    xgr_batch = xgrammar.allocate_token_bitmask(BATCH, vocab_size)
    pairs = [(m, row) for row, m in enumerate(llg_rows)]

    def llg_loop() -> None:
        for row, m in enumerate(llg_rows):
            llg_torch.fill_next_token_bitmask(m, llg_batch, row)

    def xgr_loop() -> None:
        for row, m in enumerate(xgr_rows):
            m.fill_next_token_bitmask(xgr_batch, row)

    llg_batch_s = median_seconds(
        lambda: llg_torch.fill_next_token_bitmask_par(executor, pairs, llg_batch), mask_repeats
    )
    xgr_batch_s = median_seconds(
        lambda: batch_matcher.batch_fill_next_token_bitmask(xgr_rows, xgr_batch), mask_repeats
    )
    figures = {
        "llguidance": (
            llg_tok_ms,
            llg_compile_ms,
            llg_times,
            llg_batch_s,
            median_seconds(llg_loop, mask_repeats),
        ),
        "xgrammar": (
            xgr_tok_ms,
            xgr_compile_ms,
            xgr_times,
            xgr_batch_s,
            median_seconds(xgr_loop, mask_repeats),
        ),
    }
    return {
        name: {
            "tokenizer_ms": tok_ms,
            "compile_ms": compile_ms,
            "token_mask_median_us": statistics.median(times) * 1e6,
            "token_mask_mean_us": statistics.mean(times) * 1e6,
            "batch_mask_ms": batch_s * 1e3,
            "loop_mask_ms": loop_s * 1e3,
            "allowed_first": allowed_first[name],
            "instance_tokens": len(ids),
        }
        for name, (tok_ms, compile_ms, times, batch_s, loop_s) in figures.items()
    }
