"""The model's own pieces: each module has a forward, and RoPE tables are built once per length."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lmstack.core import CausalLM, DenseAttention, ModelConfig

TOL = 1e-4


def _model(tiny_config: Any, **overrides: Any) -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(ModelConfig.from_dict(tiny_config(**overrides))).eval()


def _ids(tokens: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 97, (batch, tokens), generator=torch.Generator().manual_seed(seed))


def test_transformer_has_its_own_forward(tiny_config: Any) -> None:
    model = _model(tiny_config)
    ids = _ids(11)
    positions = torch.arange(11).expand(2, 11)
    with torch.no_grad():
        # The Hugging Face "model." prefix: embeddings, layers and final norm, a module of its own.
        hidden = model.model(ids, positions, DenseAttention())
        assert hidden.shape == (2, 11, 48)
        torch.testing.assert_close(model.lm_head(hidden), model(ids), rtol=0, atol=0)
        torch.testing.assert_close(model.hidden_states(ids, positions, DenseAttention()), hidden)


def test_rope_table_built_once_per_length(tiny_config: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(tiny_config)
    rotary = model.model.rotary
    builds = {"n": 0}
    inv_freq = rotary.inv_freq

    def counting(device: torch.device | None = None) -> torch.Tensor:
        builds["n"] += 1
        return inv_freq(device)

    monkeypatch.setattr(rotary, "inv_freq", counting)
    with torch.no_grad():
        for tokens, expected_builds in ((10, 1), (10, 1), (3, 1), (40, 2), (20, 2), (40, 2)):
            model(_ids(tokens))
            assert builds["n"] == expected_builds, f"after a {tokens}-token forward"
        model.to(torch.float64)  # another dtype: the table is rebuilt in it
        model(_ids(5))
        assert builds["n"] == 3
    # Against the textbook formula: angle = position * theta ** (-2i / head_dim), halves repeated.
    positions = torch.tensor([[0, 1, 7, 39], [63, 64, 100, 2]])
    cos, sin = rotary(positions)  # 100 is past the table: it grows
    dim = 8
    inv = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    angles = positions.to(torch.float64)[..., None] * inv
    angles = torch.cat((angles, angles), dim=-1)
    torch.testing.assert_close(cos.double(), angles.cos(), rtol=0, atol=1e-5)
    torch.testing.assert_close(sin.double(), angles.sin(), rtol=0, atol=1e-5)
    assert cos.dtype == torch.float32


@pytest.mark.parametrize(
    "rope_scaling",
    [
        None,
        {"rope_type": "dynamic", "factor": 3.0},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    ],
)
def test_one_model_over_growing_and_shrinking_lengths_matches_transformers(
    tiny_config: Any, hf_model: Any, rope_scaling: dict[str, Any] | None
) -> None:
    # The cached tables must not leak between calls: a long call (dynamic NTK past the context) and a
    # short one after it each give the reference's logits.
    raw = tiny_config(max_position_embeddings=16)
    if rope_scaling is not None:
        raw["rope_scaling"] = rope_scaling
    hf = hf_model(raw)
    ours = CausalLM(ModelConfig.from_dict(hf.config.to_dict())).eval()
    ours.load_state_dict(hf.state_dict())
    with torch.no_grad():
        for tokens in (5, 29, 7, 40, 12):
            ids = _ids(tokens, seed=tokens)
            assert (ours(ids) - hf(ids).logits).abs().max().item() <= TOL, f"{tokens} tokens"


def test_rope_accepts_empty_and_negative_positions(tiny_config: Any) -> None:
    rotary = _model(tiny_config).model.rotary
    cos, sin = rotary(torch.zeros(2, 0, dtype=torch.long))
    assert cos.shape == sin.shape == (2, 0, 8)
    cos, _ = rotary(torch.tensor([[-1, 2]]))  # padding positions some callers use
    torch.testing.assert_close(cos[0, 0], rotary(torch.tensor([[1]]))[0][0, 0], rtol=0, atol=1e-6)
