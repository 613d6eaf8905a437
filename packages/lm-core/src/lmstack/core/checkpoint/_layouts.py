"""Name mappings between checkpoint layouts and lmstack's (the Hugging Face Llama layout).

llama, mistral, qwen2 and internlm3 checkpoints use lmstack's names already. InternLM2 names its
modules differently and packs q, k and v into one ``wqkv`` matrix whose rows are grouped by key/value
head: for each kv head, its ``g`` query heads, then its key, then its value (``g`` = query heads per kv
head). Unpacking happens tensor by tensor while loading.
"""

from __future__ import annotations

import re

from torch import Tensor

from lmstack.core._config import ModelConfig

__all__ = ["IGNORED_KEYS", "map_key", "unpack_internlm2_wqkv"]

# Buffers some older checkpoints saved that carry no weights.
IGNORED_KEYS = re.compile(r".*(rotary_emb\.inv_freq|\.masked_bias|\.attn\.bias)$")

_INTERNLM2 = [
    (re.compile(r"^model\.tok_embeddings\.weight$"), "model.embed_tokens.weight"),
    (re.compile(r"^output\.weight$"), "lm_head.weight"),
    (re.compile(r"^model\.norm\.weight$"), "model.norm.weight"),
    (
        re.compile(r"^model\.layers\.(\d+)\.attention_norm\.weight$"),
        r"model.layers.\1.input_layernorm.weight",
    ),
    (
        re.compile(r"^model\.layers\.(\d+)\.ffn_norm\.weight$"),
        r"model.layers.\1.post_attention_layernorm.weight",
    ),
    (
        re.compile(r"^model\.layers\.(\d+)\.attention\.wo\.(weight|bias)$"),
        r"model.layers.\1.self_attn.o_proj.\2",
    ),
    (
        re.compile(r"^model\.layers\.(\d+)\.feed_forward\.w1\.weight$"),
        r"model.layers.\1.mlp.gate_proj.weight",
    ),
    (re.compile(r"^model\.layers\.(\d+)\.feed_forward\.w3\.weight$"), r"model.layers.\1.mlp.up_proj.weight"),
    (
        re.compile(r"^model\.layers\.(\d+)\.feed_forward\.w2\.weight$"),
        r"model.layers.\1.mlp.down_proj.weight",
    ),
]
_WQKV = re.compile(r"^model\.layers\.(\d+)\.attention\.wqkv\.(weight|bias)$")


def map_key(config: ModelConfig, key: str) -> list[str] | None:
    """Map a checkpoint tensor name to lmstack parameter name(s).

    Returns:
        One name for a plain rename, three (q, k, v) for InternLM2's packed ``wqkv``, or None when
        the name is not part of this layout.
    """
    if config.model_type != "internlm2":
        return [key]
    m = _WQKV.match(key)
    if m:
        prefix = f"model.layers.{m.group(1)}.self_attn"
        return [f"{prefix}.{p}_proj.{m.group(2)}" for p in ("q", "k", "v")]
    for pattern, repl in _INTERNLM2:
        if pattern.match(key):
            return [pattern.sub(repl, key)]
    return None


def unpack_internlm2_wqkv(config: ModelConfig, packed: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Split InternLM2's packed ``wqkv`` weight (or bias) into q, k and v in Llama layout."""
    assert config.num_key_value_heads is not None and config.head_dim is not None
    g, d, hkv = config.num_kv_groups, config.head_dim, config.num_key_value_heads
    rest = packed.shape[1:]  # (hidden,) for a weight, () for a bias
    grouped = packed.reshape(hkv, g + 2, d, *rest)
    q = grouped[:, :g].reshape(hkv * g * d, *rest).contiguous()
    k = grouped[:, g].reshape(hkv * d, *rest).contiguous()
    v = grouped[:, g + 1].reshape(hkv * d, *rest).contiguous()
    return q, k, v
