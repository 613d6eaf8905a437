"""The random model the SFT and serving benchmarks share: an 11.7M-parameter llama, world-trained BPE."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


def bench_llama(texts: Iterable[str], seed: int) -> tuple[Any, Any]:
    """A BPE tokenizer (4,096 merges at most) trained on ``texts`` and a seeded random llama over it.

    Hidden 384, 6 layers, 6 heads / 2 KV heads, context 1,024, fp32: small enough for a CPU benchmark,
    big enough that the matrix multiplies, not Python, dominate a step.

    Returns:
        ``(model, tokenizer)``: an ``lmstack.core.CausalLM`` and an ``lmstack.core.Tokenizer``.
    """
    from lmstack.core import CausalLM, ModelConfig, train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(iter(texts), vocab_size=4096)
    torch.manual_seed(seed)
    config = ModelConfig(
        model_type="llama", vocab_size=tokenizer.vocab_size, hidden_size=384, intermediate_size=1024,
        num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    return CausalLM(config), tokenizer
