"""The random models the benchmarks share: llamas of published shapes over a world-trained BPE tokenizer."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

SHAPES: dict[str, dict[str, Any]] = {
    # 11.7M parameters: small enough for a CPU benchmark, big enough that the matrix multiplies, not
    # Python, dominate a step. Its vocabulary is the tokenizer's.
    "small": {
        "hidden_size": 384, "intermediate_size": 1024, "num_hidden_layers": 6, "num_attention_heads": 6,
        "num_key_value_heads": 2, "max_position_embeddings": 1024,
    },
    # SmolLM-135M's shape (HuggingFaceTB/SmolLM-135M config.json), at random init.
    "smollm": {
        "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 2048,
        "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
    },
    # TinyLlama-1.1B's shape (TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T config.json), random init.
    "tinyllama": {
        "vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
        "num_attention_heads": 32, "num_key_value_heads": 4, "max_position_embeddings": 2048,
        "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
    },
}  # fmt: skip
"""Model shapes by name. Where a shape fixes ``vocab_size`` above the tokenizer's (4,096 ids), the embedding
rows past the tokenizer's ids are never looked up; they still cost their share of the lm head."""


def bench_llama(texts: Iterable[str], seed: int, size: str = "small") -> tuple[Any, Any]:
    """A BPE tokenizer (4,096 merges at most) trained on ``texts`` and a seeded random llama over it.

    Args:
        texts: The corpus the tokenizer learns from.
        seed: Seed of the weights (normal, std 0.02).
        size: A key of :data:`SHAPES`; ``small`` (hidden 384, 6 layers, 6 heads / 2 KV heads, context
            1,024, fp32) is the default every benchmark used before the others existed.

    Returns:
        ``(model, tokenizer)``: an ``lmstack.core.CausalLM`` and an ``lmstack.core.Tokenizer``.
    """
    from lmstack.core import CausalLM, ModelConfig, train_bpe_tokenizer

    if size not in SHAPES:
        raise ValueError(f"unknown model size {size!r}; choose one of {', '.join(SHAPES)}")
    tokenizer = train_bpe_tokenizer(iter(texts), vocab_size=4096)
    shape = {"vocab_size": tokenizer.vocab_size, **SHAPES[size]}
    if shape["vocab_size"] < tokenizer.vocab_size:
        raise ValueError(f"{size}: vocabulary {shape['vocab_size']} < the tokenizer's {tokenizer.vocab_size}")
    torch.manual_seed(seed)
    config = ModelConfig(
        model_type="llama", bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **shape,
    )  # fmt: skip
    return CausalLM(config), tokenizer
