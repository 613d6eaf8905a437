"""The Llama-family model and its attention backends."""

from lmstack.core.model._attention import (
    AttentionBackend,
    DenseAttention,
    PackedAttention,
    flash_attn_available,
)
from lmstack.core.model._rope import RotaryEmbedding, apply_rotary
from lmstack.core.model._transformer import MLP, Attention, CausalLM, DecoderLayer, RMSNorm, Transformer

__all__ = [
    "MLP",
    "Attention",
    "AttentionBackend",
    "CausalLM",
    "DecoderLayer",
    "DenseAttention",
    "PackedAttention",
    "RMSNorm",
    "RotaryEmbedding",
    "Transformer",
    "apply_rotary",
    "flash_attn_available",
]
