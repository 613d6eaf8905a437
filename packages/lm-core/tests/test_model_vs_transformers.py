"""The model's logits equal transformers' on the same weights (fp32, max abs diff <= 1e-4)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lmstack.core import CausalLM, DenseAttention, ModelConfig

TOL = 1e-4  # fp32 on both sides; the only differences are summation order inside matmuls and softmax

ROPE_KINDS: dict[str, dict[str, Any] | None] = {
    "none": None,
    "linear": {"rope_type": "linear", "factor": 2.5},
    # max_position_embeddings is 16 below, so a 29-token input exercises the dynamic base change.
    "dynamic": {"rope_type": "dynamic", "factor": 3.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8,
    },
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 24.0},
}


def _ours_from_hf(hf: Any) -> CausalLM:
    config = ModelConfig.from_dict(hf.config.to_dict())
    ours = CausalLM(config).eval()
    ours.load_state_dict(hf.state_dict(), strict=not config.tie_word_embeddings)
    ours.tie_weights()
    return ours


def _compare(hf_model: Any, raw: dict[str, Any], batch: int = 2, tokens: int = 29, seed: int = 0) -> float:
    hf = hf_model(raw, seed=seed)
    ours = _ours_from_hf(hf)
    ids = torch.randint(0, raw["vocab_size"], (batch, tokens), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    assert got.shape == expected.shape
    return (got - expected).abs().max().item()


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "internlm3"])
@pytest.mark.parametrize("rope", list(ROPE_KINDS))
def test_logits_match_every_type_and_rope_kind(
    tiny_config: Any, hf_model: Any, model_type: str, rope: str
) -> None:
    raw = tiny_config(model_type, max_position_embeddings=16)
    if model_type == "mistral":
        raw["sliding_window"] = None
    if model_type == "internlm3":
        raw["head_dim"] = 10  # internlm3 configs name head_dim explicitly (hidden 48 / 6 heads would be 8)
    if ROPE_KINDS[rope] is not None:
        raw["rope_scaling"] = dict(ROPE_KINDS[rope])
    assert _compare(hf_model, raw) <= TOL


@pytest.mark.parametrize(
    ("heads", "kv_heads", "hidden", "tied"),
    [(6, 6, 36, False), (6, 3, 60, True), (8, 1, 48, False), (4, 2, 24, True), (5, 5, 70, True)],
)
@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_logits_match_gqa_ratios_odd_sizes_and_tied_embeddings(
    tiny_config: Any, hf_model: Any, model_type: str, heads: int, kv_heads: int, hidden: int, tied: bool
) -> None:
    raw = tiny_config(
        model_type,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        hidden_size=hidden,
        intermediate_size=hidden * 2 + 3,
        vocab_size=131,
        num_hidden_layers=3,
        tie_word_embeddings=tied,
    )
    assert _compare(hf_model, raw, batch=3, tokens=13) <= TOL


@pytest.mark.parametrize("model_type", ["llama", "internlm3"])
def test_attention_and_mlp_bias(tiny_config: Any, hf_model: Any, model_type: str) -> None:
    raw = tiny_config(model_type, attention_bias=True, mlp_bias=True, head_dim=8)
    assert _compare(hf_model, raw) <= TOL


def test_mistral_sliding_window_matches_and_matters(tiny_config: Any, hf_model: Any) -> None:
    raw = tiny_config("mistral", sliding_window=5)
    assert _compare(hf_model, raw, tokens=23) <= TOL
    # The window must change the result, or the comparison above proves nothing about it.
    hf = hf_model(raw)
    ours = _ours_from_hf(hf)
    full = CausalLM(ours.config.replace(sliding_window=None, layer_types=None)).eval()
    full.load_state_dict(ours.state_dict())
    ids = torch.randint(0, 97, (1, 23))
    with torch.no_grad():
        assert (ours(ids) - full(ids)).abs().max() > 1e-3


def test_qwen2_per_layer_sliding_window(tiny_config: Any, hf_model: Any) -> None:
    raw = tiny_config(
        "qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1, num_hidden_layers=3
    )
    config = ModelConfig.from_dict(raw)
    assert config.layer_types == ("full_attention", "sliding_attention", "sliding_attention")
    assert _compare(hf_model, raw, tokens=19) <= TOL


def test_padded_batch_matches_transformers_attention_mask(tiny_config: Any, hf_model: Any) -> None:
    raw = tiny_config("llama")
    hf = hf_model(raw)
    ours = _ours_from_hf(hf)
    ids = torch.randint(0, 97, (3, 11))
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    mask[2, :7] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, position_ids=positions).logits
        got = ours(ids, positions, DenseAttention(mask))
    real = mask.bool()
    assert (got[real] - expected[real]).abs().max() <= TOL


def test_logits_indices_select_tokens(tiny_config: Any, hf_model: Any) -> None:
    raw = tiny_config("llama")
    ours = _ours_from_hf(hf_model(raw))
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        full = ours(ids).reshape(-1, 97)
        picked = ours(ids, logits_indices=torch.tensor([8, 17]))
    torch.testing.assert_close(picked, full[[8, 17]])
