"""InternLM2 checkpoints (packed wqkv, their own names and config keys) load and equal the Llama layout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from lmstack.core import ModelConfig, load_pretrained, save_pretrained


def _pack_wqkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, kv_heads: int) -> torch.Tensor:
    """Build InternLM2's packed matrix head by head: per kv head, its query heads, then k, then v."""
    d = q.shape[0] // heads
    g = heads // kv_heads
    rows = []
    for h in range(kv_heads):
        for j in range(g):
            qh = h * g + j
            rows.append(q[qh * d : (qh + 1) * d])
        rows.append(k[h * d : (h + 1) * d])
        rows.append(v[h * d : (h + 1) * d])
    return torch.cat(rows, dim=0)


def _write_internlm2(hf_llama: Any, out: Path, *, bias: bool, rope_scaling: dict[str, Any] | None) -> None:
    cfg = hf_llama.config
    sd = hf_llama.state_dict()
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    tensors = {
        "model.tok_embeddings.weight": sd["model.embed_tokens.weight"],
        "model.norm.weight": sd["model.norm.weight"],
        "output.weight": sd["lm_head.weight"],
    }
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        tensors[p + "attention.wqkv.weight"] = _pack_wqkv(
            sd[a + "q_proj.weight"], sd[a + "k_proj.weight"], sd[a + "v_proj.weight"], heads, kv_heads
        )
        tensors[p + "attention.wo.weight"] = sd[a + "o_proj.weight"]
        if bias:
            tensors[p + "attention.wqkv.bias"] = _pack_wqkv(
                sd[a + "q_proj.bias"], sd[a + "k_proj.bias"], sd[a + "v_proj.bias"], heads, kv_heads
            )
            tensors[p + "attention.wo.bias"] = sd[a + "o_proj.bias"]
        tensors[p + "feed_forward.w1.weight"] = sd[p + "mlp.gate_proj.weight"]
        tensors[p + "feed_forward.w3.weight"] = sd[p + "mlp.up_proj.weight"]
        tensors[p + "feed_forward.w2.weight"] = sd[p + "mlp.down_proj.weight"]
        tensors[p + "attention_norm.weight"] = sd[p + "input_layernorm.weight"]
        tensors[p + "ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
    out.mkdir(parents=True)
    # Two shards with an index, as real InternLM2 checkpoints come.
    names = sorted(tensors)
    half = len(names) // 2
    shards = {
        "model-00001-of-00002.safetensors": names[:half],
        "model-00002-of-00002.safetensors": names[half:],
    }
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: tensors[k].contiguous() for k in keys}, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, file))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    # The InternLM2 spelling of the config: its own keys, rope_theta + rope_scaling {"type": ...}.
    config = {
        "architectures": ["InternLM2ForCausalLM"],
        "auto_map": {"AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
        "model_type": "internlm2",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "hidden_act": "silu",
        "bias": bias,
        "rope_theta": cfg.rope_parameters["rope_theta"],
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": False,
        "attn_implementation": "eager",
        "torch_dtype": "float32",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    (out / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("bias", "heads", "kv_heads", "rope_scaling"),
    [
        (False, 6, 2, None),
        (True, 8, 8, None),
        # InternLM2.5's long-context setting: dynamic NTK in the old `type` spelling.
        (False, 6, 3, {"type": "dynamic", "factor": 2.0}),
    ],
)
def test_internlm2_layout_loads_equal_to_llama_layout_and_saves_for_transformers(
    tmp_path: Path, tiny_config: Any, hf_model: Any, bias: bool, heads: int, kv_heads: int, rope_scaling: Any
) -> None:
    import transformers

    raw = tiny_config(
        "llama", num_attention_heads=heads, num_key_value_heads=kv_heads, attention_bias=bias,
        max_position_embeddings=16, hidden_size=48,
    )  # fmt: skip
    if rope_scaling is not None:
        raw["rope_scaling"] = {"rope_type": rope_scaling["type"], "factor": rope_scaling["factor"]}
    reference = hf_model(raw)  # Llama layout, transformers' own implementation
    _write_internlm2(reference, tmp_path / "internlm2", bias=bias, rope_scaling=rope_scaling)

    model = load_pretrained(tmp_path / "internlm2")
    assert model.config.model_type == "internlm2"
    assert model.config.qkv_bias is bias and model.config.o_bias is bias and not model.config.mlp_bias
    ids = torch.randint(
        0, raw["vocab_size"], (2, 21)
    )  # longer than max_position_embeddings: dynamic NTK kicks in
    with torch.no_grad():
        expected = reference(ids).logits
        assert (model(ids) - expected).abs().max() <= 1e-4

    # Saved in the Llama layout, which transformers loads without remote code.
    save_pretrained(model, tmp_path / "as-llama")
    written = json.loads((tmp_path / "as-llama" / "config.json").read_text())
    assert written["model_type"] == "llama" and "auto_map" not in written
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "as-llama", attn_implementation="eager"
    )
    with torch.no_grad():
        assert (reloaded(ids).logits - expected).abs().max() <= 1e-4


def test_internlm2_config_keys() -> None:
    cfg = ModelConfig.from_dict(
        {
            "model_type": "internlm2", "vocab_size": 92544, "hidden_size": 4096, "intermediate_size": 14336,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "bias": False,
            "rope_theta": 50000000, "rope_scaling": {"type": "dynamic", "factor": 2.5},
            "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
        }
    )  # fmt: skip
    assert cfg.head_dim == 128 and cfg.num_kv_groups == 4
    assert (
        cfg.rope_scaling is not None
        and cfg.rope_scaling.rope_type == "dynamic"
        and cfg.rope_scaling.factor == 2.5
    )
    assert cfg.rope_theta == 50000000.0
