"""The engine on lmstack's kernels: Triton (under TRITON_INTERPRET=1 on CPU) and quantized KV caches.

References: transformers' greedy tokens (the float cache, on either kernel set), and the torch path of
the same engine for the quantized caches (same codes, so the same tokens on either kernel set).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

from lmstack.core import ConfigError
from lmstack.infer import LLM, SamplingParams
from lmstack.infer.engine import EngineConfig

pytest.importorskip("triton")


def _prompts(n: int, vocab: int, seed: int, shared_prefix: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(3, vocab) for _ in range(shared_prefix)]
    return [prefix + [rng.randrange(3, vocab) for _ in range(rng.randint(1, 20))] for _ in range(n)]


@pytest.fixture(scope="module")
def hf_model(model_dir: Path) -> Any:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    model.generation_config.eos_token_id = None
    return model


def _hf_greedy(model: Any, prompt: list[int], max_new: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False, eos_token_id=None,
            pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        )  # fmt: skip
    return out[0, len(prompt) :].tolist()


def _greedy(llm: LLM, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=max_new, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.engine.num_free_blocks == llm.engine.num_blocks  # nothing leaked
    return [o.outputs[0].token_ids for o in outs]


# Small blocks and a small step budget: prefill is chunked, decode and prefill share steps, and the
# shared prefix is served from the prefix cache, so every branch of the kernel backend runs.
SETUP = {"block_size": 4, "max_num_batched_tokens": 24}


def test_triton_engine_greedy_equals_transformers(model_dir: Path, hf_model: Any) -> None:
    llm = LLM(model_dir, kernels="triton", **SETUP)
    assert llm.engine.kernels == "triton"
    assert type(llm.engine.model.model.norm).__name__ == "TritonRMSNorm"  # the modules were switched
    vocab = llm.engine.vocab_size
    prompts = _prompts(4, vocab, seed=1) + _prompts(3, vocab, seed=2, shared_prefix=9)
    got = _greedy(llm, prompts, 6)
    for prompt, tokens in zip(prompts, got, strict=True):
        assert tokens == _hf_greedy(hf_model, prompt, 6), prompt


@pytest.mark.parametrize("kv", ["int8", "int4"])
def test_quantized_kv_cache_same_tokens_on_triton_and_torch(model_dir: Path, kv: str) -> None:
    vocab = LLM(model_dir, num_kv_blocks=8).engine.vocab_size
    prompts = _prompts(4, vocab, seed=3) + _prompts(2, vocab, seed=4, shared_prefix=9)
    torch_llm = LLM(model_dir, kv_cache_dtype=kv, kernels="torch", **SETUP)
    triton_llm = LLM(model_dir, kv_cache_dtype=kv, kernels="triton", **SETUP)
    # The same quantizer writes bit-identical codes on both paths; attention agrees to rounding.
    assert _greedy(torch_llm, prompts, 6) == _greedy(triton_llm, prompts, 6)


def test_int8_kv_cache_keeps_greedy_tokens_and_int4_stays_close(model_dir: Path, hf_model: Any) -> None:
    vocab = LLM(model_dir, num_kv_blocks=8).engine.vocab_size
    prompts = _prompts(8, vocab, seed=5)
    want = [_hf_greedy(hf_model, p, 8) for p in prompts]
    # int8 codes are within scale/2 of each value (1/510 of its head's range): this model's greedy
    # margins are wider than that, so the tokens are the float model's.
    assert _greedy(LLM(model_dir, kv_cache_dtype="int8", **SETUP), prompts, 8) == want
    # int4 codes are 17x coarser, and this model's weights are scaled up (std 0.25) so its logits swing
    # hard: count the first tokens (no error carried over) on 40 prompts. Measured: 29/40 (int8: 40/40).
    many = _prompts(40, vocab, seed=5)
    first = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    ref = [o.outputs[0].token_ids[0] for o in LLM(model_dir, **SETUP).generate(many, first, use_tqdm=False)]
    int4 = LLM(model_dir, kv_cache_dtype="int4", **SETUP)
    got4 = [o.outputs[0].token_ids[0] for o in int4.generate(many, first, use_tqdm=False)]
    assert sum(a == b for a, b in zip(got4, ref, strict=True)) >= 25


def test_quantized_cache_holds_more_tokens_in_the_same_bytes(model_dir: Path) -> None:
    budget = 64 * 1024
    engines = {kv: LLM(model_dir, kv_cache_memory=budget, kv_cache_dtype=kv).engine for kv in
               ("float32", "float16", "int8", "int4")}  # fmt: skip
    cfg = engines["int8"].model.config
    layers, heads, d = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    # Bytes a token: keys and values of every layer and KV head; quantized, plus an fp16 scale and zero.
    assert engines["float32"].kv_bytes_per_token == 2 * layers * heads * d * 4
    assert engines["float16"].kv_bytes_per_token == 2 * layers * heads * d * 2
    assert engines["int8"].kv_bytes_per_token == 2 * layers * heads * (d + 4)
    assert engines["int4"].kv_bytes_per_token == 2 * layers * heads * (d // 2 + 4)
    blocks = {kv: e.num_blocks for kv, e in engines.items()}
    assert blocks["int8"] >= 3 * blocks["float32"] and blocks["int4"] >= 5 * blocks["float32"]
    for kv, engine in engines.items():
        assert blocks[kv] == budget // (engine.kv_bytes_per_token * engine.config.block_size)
    # Against fp16 the scale and zero weigh more at this head_dim (16): 1.6x and 2.7x here; at a real
    # model's head_dim of 128 the same formula gives 256 / 132 = 1.94x and 256 / 68 = 3.76x.
    assert blocks["int8"] >= 1.5 * blocks["float16"] and blocks["int4"] >= 2.5 * blocks["float16"]


def test_bad_kernel_and_cache_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="kv_cache_dtype"):
        EngineConfig(kv_cache_dtype="int3")
    with pytest.raises(ConfigError, match="not a float dtype"):
        EngineConfig(kv_cache_dtype=torch.int8)
    with pytest.raises(ConfigError, match="kernels"):
        EngineConfig(kernels="cuda")
