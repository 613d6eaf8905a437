"""KV-cache quantization quality on the trained default model: perplexity, greedy agreement, bytes a token.

For the float32, int8 and int4 caches, in one run, on the quickstart's trained default model (an
earlier ``out/quickstart`` run, ``KV_BENCH_MODEL``/``KV_BENCH_WORLD``, or trained here):

* **perplexity through the cache** on held-out text (fresh wordings of the world's articles, never
  trained on): each text goes through the model once with the engine's kernel attention backend
  (torch references), which writes every key and value into a paged cache (quantizing them for int8
  and int4) and then attends over what it stored, so every query sees exactly the keys a decode step
  would read. The float cache's perplexity is also checked against the model's dense forward.
* **greedy agreement** with the float cache over 100 prompts (the world's held-out questions and
  article openings, as chats and as plain text), 32 new tokens each, through ``LLM``: sequences
  identical, and the mean position of the first differing token.
* **KV bytes a token** (``LLMEngine.kv_bytes_per_token``) and the tokens a 1 GiB budget holds.

Figures go to stdout and ``.benchmarks/kv_quant_quality.json``; asserted: the float cache reproduces the
dense forward, and int8 stays closer to float than int4 does.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from lmstack.core import CausalLM, Tokenizer, load_pretrained
from lmstack.infer import LLM, SamplingParams
from lmstack.infer.engine._kernel_attention import KernelPagedAttention
from lmstack.infer.kernels import PagedKV, QuantizedKVLayout

sys.path.insert(0, str(Path(__file__).parent))
import _world_model as wm

BLOCK = 16
NEW_TOKENS = 32
N_PROMPTS = 100


def _cache(model: CausalLM, kind: str, slots: int) -> PagedKV:
    cfg = model.config
    assert cfg.num_key_value_heads is not None and cfg.head_dim is not None
    if kind == "float32":
        shape = (cfg.num_hidden_layers, slots, cfg.num_key_value_heads, cfg.head_dim)
        return PagedKV(torch.zeros(shape), torch.zeros(shape))
    layout = QuantizedKVLayout(8 if kind == "int8" else 4, cfg.head_dim)
    return layout.allocate(cfg.num_hidden_layers, slots, cfg.num_key_value_heads)


@torch.no_grad()
def _nll_through_cache(model: CausalLM, ids: list[int], kind: str) -> float:
    """Summed negative log-likelihood of ``ids[1:]`` with attention reading a ``kind`` paged cache."""
    n = len(ids)
    blocks = -(-n // BLOCK)
    cache = _cache(model, kind, blocks * BLOCK)
    attn = KernelPagedAttention(cache, BLOCK, torch.arange(n), [n], [n], [list(range(blocks))], "torch")
    logits = model(torch.tensor([ids]), torch.arange(n)[None], attn)[0, :-1].float()
    return float(-torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None]).sum())


@torch.no_grad()
def _nll_dense(model: CausalLM, ids: list[int]) -> float:
    logits = model(torch.tensor([ids]))[0, :-1].float()
    return float(-torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None]).sum())


def _prompts(world_dir: Path, tokenizer: Tokenizer) -> list[Any]:
    heldout = [r for r in wm.world.read_jsonl(world_dir / "heldout.jsonl") if r["kind"] == "fact"]
    chats = [[{"role": "user", "content": r["question"]}] for r in heldout]
    openings = [" ".join(t.split()[:12]) for t in wm.heldout_texts(world_dir, 2, stream="kv-bench-prompts")]
    prompts: list[Any] = [*chats, *openings][:N_PROMPTS]
    assert len(prompts) == N_PROMPTS, len(prompts)
    return prompts


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


@pytest.mark.benchmark
def test_kv_cache_quantization_quality(benchmark: Any, tmp_path_factory: pytest.TempPathFactory) -> None:
    model_dir, world_dir, source = wm.default_model(tmp_path_factory.mktemp("kv"), "KV_BENCH")
    model = load_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = Tokenizer.from_pretrained(model_dir)
    texts = [tokenizer.encode(t)[: model.config.max_position_embeddings] for t in wm.heldout_texts(world_dir)]
    prompts = _prompts(world_dir, tokenizer)
    f: dict[str, Any] = {"model": source, "texts": len(texts), "tokens": sum(len(t) - 1 for t in texts)}

    def measure() -> None:
        dense = sum(_nll_dense(model, ids) for ids in texts)
        f["ppl dense forward"] = math.exp(dense / f["tokens"])
        outputs: dict[str, list[list[int]]] = {}
        for kind in ("float32", "int8", "int4"):
            nll = sum(_nll_through_cache(model, ids, kind) for ids in texts)
            f[f"ppl {kind} cache"] = math.exp(nll / f["tokens"])
            llm = LLM(model_dir, dtype=torch.float32, kv_cache_dtype=kind)
            f[f"{kind} kv bytes a token"] = llm.engine.kv_bytes_per_token
            f[f"{kind} tokens in 1 GiB"] = (1 << 30) // llm.engine.kv_bytes_per_token
            params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
            chats = [p for p in prompts if isinstance(p, list)]
            plain = [p for p in prompts if isinstance(p, str)]
            got = llm.chat(chats, params, use_tqdm=False) + llm.generate(plain, params, use_tqdm=False)
            outputs[kind] = [o.outputs[0].token_ids for o in got]
            llm.close()
        for kind in ("int8", "int4"):
            pairs = list(zip(outputs[kind], outputs["float32"], strict=True))
            f[f"{kind} sequences identical to float32"] = sum(a == b for a, b in pairs)
            f[f"{kind} mean first differing token"] = sum(_first_difference(a, b) for a, b in pairs) / len(
                pairs
            )
            f[f"{kind} perplexity delta"] = f[f"ppl {kind} cache"] - f["ppl float32 cache"]

    benchmark.pedantic(measure, rounds=1, iterations=1)
    f["prompts"] = len(prompts)
    out = Path(os.environ.get("LMSTACK_BENCH_DIR", Path(__file__).resolve().parent.parent / ".benchmarks"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "kv_quant_quality.json").write_text(json.dumps(f, indent=2) + "\n")
    print("\n" + "\n".join(f"  {k:<40} {v}" for k, v in f.items()))
    for key, value in f.items():
        if isinstance(value, (int, float)):
            benchmark.extra_info[key] = value
    # The float cache computes what the dense forward does (same keys, another summation order).
    assert f["ppl float32 cache"] == pytest.approx(f["ppl dense forward"], rel=1e-4)
    assert abs(f["int8 perplexity delta"]) <= abs(f["int4 perplexity delta"])
