"""Config parsing: both RoPE spellings, defaults per type, and errors that name the field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lmstack.core import ConfigError, ModelConfig, load_config


def test_both_rope_spellings_give_the_same_config(tiny_config: Any) -> None:
    old = tiny_config(rope_theta=500000.0, rope_scaling={"type": "linear", "factor": 4.0})
    new = tiny_config(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 500000.0})
    del new["rope_theta"]
    a, b = ModelConfig.from_dict(old), ModelConfig.from_dict(new)
    assert a == b
    assert a.rope_theta == 500000.0 and a.rope_scaling is not None and a.rope_scaling.factor == 4.0


def test_default_rope_type_is_no_scaling(tiny_config: Any) -> None:
    cfg = ModelConfig.from_dict(tiny_config(rope_parameters={"rope_type": "default", "rope_theta": 1e6}))
    assert cfg.rope_scaling is None and cfg.rope_theta == 1e6


def test_to_dict_round_trips_and_transformers_reads_it(tiny_config: Any) -> None:
    import transformers

    raw = tiny_config(
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32},
        some_future_key=123,
    )  # fmt: skip
    cfg = ModelConfig.from_dict(raw)
    out = cfg.to_dict()
    assert ModelConfig.from_dict(out) == cfg
    assert out["some_future_key"] == 123  # unknown keys survive a round trip
    hf = transformers.AutoConfig.for_model(**out)
    assert hf.rope_parameters["rope_type"] == "llama3" and hf.rope_parameters["factor"] == 8.0


@pytest.mark.parametrize(
    ("change", "field", "pattern"),
    [
        ({"model_type": "gpt2"}, "model_type", "not supported"),
        ({"model_type": "qwen"}, "model_type", "Did you mean 'qwen2'"),
        ({"hidden_size": None}, "hidden_size", "missing required field 'hidden_size'"),
        ({"num_attention_heads": "8"}, "num_attention_heads", "positive integer"),
        ({"num_key_value_heads": 4}, "num_key_value_heads", "multiple of"),
        ({"hidden_act": "gelu"}, "hidden_act", "not supported"),
        ({"rope_scaling": {"type": "longrope", "factor": 2.0}}, "rope_scaling.rope_type", "longrope"),
        ({"rope_scaling": {"type": "linear"}}, "rope_scaling.factor", "needs a 'factor'"),
        ({"rope_scaling": {"type": "linear", "factor": -1}}, "rope_scaling.factor", "positive"),
        (
            {"rope_scaling": {"type": "llama3", "factor": 8.0}},
            "rope_scaling.low_freq_factor",
            "low_freq_factor",
        ),
        ({"rope_scaling": {"type": "linear", "factor": 2.0, "fator": 1}}, "rope_scaling.fator", "unknown"),
        ({"rope_theta": "big"}, "rope_theta", "number"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor", "not supported"),
    ],
)
def test_invalid_configs_name_the_field(
    tiny_config: Any, change: dict[str, Any], field: str, pattern: str
) -> None:
    raw = tiny_config()
    raw.update(change)
    with pytest.raises(ConfigError, match=pattern) as info:
        ModelConfig.from_dict(raw)
    assert info.value.field == field


def test_type_defaults(tiny_config: Any) -> None:
    mistral = tiny_config("mistral")
    mistral.pop("max_position_embeddings")
    assert ModelConfig.from_dict(mistral).sliding_window == 4096  # the reference default
    assert ModelConfig.from_dict({**mistral, "sliding_window": None}).sliding_window is None
    qwen = ModelConfig.from_dict(tiny_config("qwen2"))
    assert qwen.qkv_bias and not qwen.o_bias and qwen.sliding_window is None
    internlm3 = tiny_config("internlm3")
    assert ModelConfig.from_dict(internlm3).head_dim == 128  # as transformers' InternLM3Config defaults


def test_load_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no config\.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 3}))
    with pytest.raises(ConfigError, match="no 'model_type'"):
        load_config(tmp_path / "config.json")


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "internlm2", "internlm3"])
def test_config_built_in_code_survives_to_dict_and_back(model_type: str) -> None:
    cfg = ModelConfig(
        model_type=model_type, vocab_size=11, hidden_size=16, intermediate_size=24,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    back = ModelConfig.from_dict(cfg.to_dict())
    assert (back.qkv_bias, back.o_bias, back.mlp_bias) == (cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias)
    assert cfg.qkv_bias is (model_type == "qwen2")


@pytest.mark.parametrize(
    ("model_type", "biases"),
    [
        ("qwen2", {"qkv_bias": False}),
        ("mistral", {"qkv_bias": True}),
        ("llama", {"qkv_bias": True, "o_bias": False}),
    ],
)
def test_bias_patterns_a_type_cannot_express_are_refused(model_type: str, biases: dict[str, bool]) -> None:
    with pytest.raises(ConfigError, match="cannot have qkv_bias") as info:
        ModelConfig(
            model_type=model_type, vocab_size=11, hidden_size=16, intermediate_size=24,
            num_hidden_layers=2, num_attention_heads=4, **biases,
        )  # fmt: skip
    assert info.value.field == "qkv_bias"
