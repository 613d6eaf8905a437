"""AWQ's calibration and search (lmstack.infer.quant._awq) on tiny random models built here.

References are independent of the code under test: the float model's own logits (folding must not
change them), round-to-nearest through ``fake_quantize`` (what AWQ must match with alpha 0 and beat
with outlier channels), and per-group output errors computed with a plain matmul per group.
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
import torch
from torch import nn

from lmstack.core import CausalLM, ModelConfig, Tokenizer, train_bpe_tokenizer
from lmstack.infer._errors import InferError
from lmstack.infer.quant._awq import (
    DEFAULT_CALIBRATION,
    _fold,
    _search_clip,
    awq_quantize,
    calibration_tokens,
)
from lmstack.infer.quant._packing import fake_quantize, quantize_groupwise

WORDS = ("the river city of amber glass was founded by seven quiet traders who sold salt and silk").split()  # noqa: SIM905


def _texts(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 20))) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return train_bpe_tokenizer(iter(_texts()), vocab_size=300, min_frequency=2)


def _model(
    tokenizer: Tokenizer,
    *,
    kv_heads: int = 4,
    model_type: str = "llama",
    bias: bool = False,
    tied: bool = False,
    seed: int = 0,
) -> CausalLM:
    torch.manual_seed(seed)
    extra = {"qkv_bias": bias, "o_bias": bias, "mlp_bias": bias} if model_type == "llama" else {}
    config = ModelConfig(
        model_type=model_type, vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=96,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=kv_heads,
        tie_word_embeddings=tied, **extra,
    )  # fmt: skip
    model = CausalLM(config)
    model.reset_parameters(std=0.1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)  # reset_parameters zeroes them: make the folding of biases matter
            elif name.endswith("layernorm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def _linears(model: CausalLM) -> list[nn.Linear]:
    found = []
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        found += [a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj]
    return found


def _rtn(model: CausalLM, group_size: int, bits: int = 4) -> CausalLM:
    """A copy with every decoder-layer linear quantized to nearest (the baseline)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for lin in _linears(model):
            lin.weight.copy_(fake_quantize(lin.weight, bits, group_size))
    return model


def _logits(model: CausalLM, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


CONFIGS = {
    "llama-mha-biases": {"kv_heads": 4, "bias": True},
    "llama-gqa-tied": {"kv_heads": 2, "tied": True},
    "qwen2-gqa": {"kv_heads": 2, "model_type": "qwen2"},
}


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_folding_scales_leaves_the_float_model_unchanged(tokenizer: Tokenizer, kind: str) -> None:
    model = _model(tokenizer, **CONFIGS[kind])  # type: ignore[arg-type]
    ids = calibration_tokens(tokenizer, _texts(seed=1), n_samples=2, seq_len=48)
    before = _logits(model, ids)
    # Random scales over four orders of magnitude, folded into every block AWQ uses.
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in model.model.layers:
            a, m = layer.self_attn, layer.mlp

            def rand(n: int) -> torch.Tensor:
                return 10 ** (torch.rand(n, generator=gen) * 4 - 2)

            _fold(layer.input_layernorm, [a.q_proj, a.k_proj, a.v_proj], rand(64))
            if a.v_proj.out_features == a.o_proj.in_features:
                _fold(a.v_proj, [a.o_proj], rand(64))
            _fold(layer.post_attention_layernorm, [m.gate_proj, m.up_proj], rand(64))
            _fold(m.up_proj, [m.down_proj], rand(96))
    after = _logits(model, ids)
    assert not torch.equal(before, after)  # the weights did change...
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)  # ...and fp32 rounding is all it shows


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_awq_without_clipping_keeps_the_float_model(tokenizer: Tokenizer, kind: str) -> None:
    model = _model(tokenizer, **CONFIGS[kind])  # type: ignore[arg-type]
    ids = calibration_tokens(tokenizer, _texts(seed=1), n_samples=2, seq_len=48)
    before = _logits(model, ids)
    embed = model.model.embed_tokens.weight.clone()
    result = awq_quantize(
        model,
        tokenizer,
        _texts(),
        group_size=32,
        n_samples=4,
        seq_len=64,
        n_grid=5,
        clip=False,
        progress=False,
    )
    gqa = CONFIGS[kind].get("kv_heads") == 2
    assert set(result.layers[0].scales) == (
        {"qkv", "gate_up", "up_down"} if gqa else {"qkv", "v_o", "gate_up", "up_down"}
    )
    assert any(b.alpha > 0 for layer in result.layers for b in layer.scales.values())  # something was folded
    torch.testing.assert_close(_logits(model, ids), before, rtol=1e-4, atol=1e-4)
    assert torch.equal(model.model.embed_tokens.weight, embed)
    if CONFIGS[kind].get("tied"):
        assert model.lm_head.weight is model.model.embed_tokens.weight


def test_a_grid_of_only_zero_is_round_to_nearest(tokenizer: Tokenizer) -> None:
    model = _model(tokenizer)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    result = awq_quantize(
        model, tokenizer, _texts(), group_size=32, n_samples=2, seq_len=64, n_grid=1, clip=False
    )
    for layer in result.layers:
        for block in layer.scales.values():
            assert block.alpha == 0.0
            assert torch.equal(block.scales, torch.ones_like(block.scales))
            assert block.loss == block.loss_rtn
    for key, value in model.state_dict().items():
        assert torch.equal(value, original[key]), key


def _outlier_model(tokenizer: Tokenizer, seed: int) -> CausalLM:
    """A model whose norms give four input channels 25x the others' size, as trained LLMs have."""
    model = _model(tokenizer, kv_heads=2, seed=seed)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[[3, 17, 40, 58]] *= 25.0
    return model


@pytest.mark.parametrize("seed", [0, 1])
def test_awq_beats_round_to_nearest_with_outlier_channels(tokenizer: Tokenizer, seed: int) -> None:
    model = _outlier_model(tokenizer, seed)
    texts = _texts()
    ids = calibration_tokens(tokenizer, texts, n_samples=4, seq_len=64)  # the calibration set itself
    reference = _logits(model, ids)
    rtn_err = (_logits(_rtn(model, 32), ids) - reference).pow(2).mean()
    awq = copy.deepcopy(model)
    result = awq_quantize(awq, tokenizer, texts, group_size=32, n_samples=4, seq_len=64, n_grid=10)
    awq_err = (_logits(_rtn(awq, 32), ids) - reference).pow(2).mean()
    # The construction matters: RTN is visibly off, and the search did scale the outlier blocks.
    assert rtn_err > 1e-3
    assert all(layer.scales["qkv"].alpha > 0 and layer.scales["gate_up"].alpha > 0 for layer in result.layers)
    assert awq_err < 0.8 * rtn_err, (float(awq_err), float(rtn_err))


def _group_errors(w: torch.Tensor, q: torch.Tensor, x: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[out, groups]`` mean over tokens of the squared output error of each group, one matmul a group."""
    cols = range(0, w.shape[1], group_size)
    return torch.stack(
        [((x[:, c : c + group_size] @ (q - w)[:, c : c + group_size].T) ** 2).mean(0) for c in cols], dim=1
    )


def test_clipping_never_increases_the_group_output_error() -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    # Heavy-tailed weights (Student-t, 3 dof) so that clipping the largest value often pays.
    w = torch.distributions.StudentT(3.0).sample((48, 96)) * 0.02
    x = torch.randn(200, 96, generator=gen) * (1 + 4 * torch.rand(96, generator=gen))
    found = _search_clip(w, x, bits=4, group_size=32, n_grid=20, max_shrink=0.5)
    plain = _group_errors(w, fake_quantize(w, 4, 32), x, 32)
    clipped = _group_errors(w, fake_quantize(w, 4, 32, clip=found.max_val), x, 32)
    assert (clipped <= plain * (1 + 1e-5) + 1e-12).all()
    shrunk = found.max_val < w.abs().reshape(48, 3, 32).amax(-1)
    assert shrunk.float().mean() > 0.2  # clipping was chosen for many groups...
    assert (clipped[shrunk] < plain[shrunk]).all()  # ...and only where it lowered the error
    assert found.loss <= found.loss_before
    torch.testing.assert_close(torch.tensor(found.loss), clipped.mean(), rtol=1e-4, atol=0)


def test_clips_are_applied_and_reported(tokenizer: Tokenizer) -> None:
    model = _outlier_model(tokenizer, 0)
    result = awq_quantize(model, tokenizer, _texts(), group_size=32, n_samples=4, seq_len=64, n_grid=10)
    values = result.clip_values()
    assert set(values) == {
        f"model.layers.{i}.{p}" for i in range(2)
        for p in ("self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    }  # fmt: skip
    modules = dict(model.named_modules())
    for name, clip in values.items():
        w = modules[name].weight
        groups = w.reshape(w.shape[0], -1, 32)
        assert (groups.abs() <= clip.unsqueeze(-1)).all()
        # The weights are already clamped: RTN with or without the clips gives the same codes.
        assert torch.equal(quantize_groupwise(w, 4, 32).q, quantize_groupwise(w, 4, 32, clip=clip).q)
    for layer in result.layers:
        for found in layer.clips.values():
            assert found.loss <= found.loss_before
    assert "layer 1:" in result.summary()


def test_calibration_tokens_from_a_jsonl_file(tokenizer: Tokenizer, tmp_path: Path) -> None:
    texts = _texts(n=100)
    path = tmp_path / "articles.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
    stream: list[int] = []
    for t in texts:
        if stream:
            stream.append(tokenizer.eos_token_id)  # type: ignore[arg-type]
        stream += tokenizer.encode(t, add_special_tokens=False)
    ids = calibration_tokens(tokenizer, path, n_samples=3, seq_len=40)
    assert ids.shape == (3, 40)
    assert ids[0].tolist() == stream[:40]  # evenly spaced over the stream, first and last block at its ends
    assert ids[-1].tolist() == stream[-40:]
    few = calibration_tokens(tokenizer, texts[:2], n_samples=3, seq_len=1000)
    assert few.shape[0] == 1 and few.shape[1] < 1000


def test_default_calibration_file_missing_says_how_to_make_it(
    tokenizer: Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert not DEFAULT_CALIBRATION.exists()
    with pytest.raises(InferError, match=r"examples/world/generate\.py"):
        calibration_tokens(tokenizer)
    (tmp_path / "bad.jsonl").write_text('{"title": "no text"}\n')
    with pytest.raises(InferError, match="'text'"):
        calibration_tokens(tokenizer, tmp_path / "bad.jsonl")


def test_bad_settings_and_prepared_models_are_refused(tokenizer: Tokenizer) -> None:
    model = _model(tokenizer)  # in_features 64 and 96
    with pytest.raises(
        InferError, match=r"group_size 64 does not divide the in_features \[96\].*group_size=32"
    ):
        awq_quantize(model, tokenizer, _texts(), group_size=64)
    with pytest.raises(InferError, match="group_size 0"):
        awq_quantize(model, tokenizer, _texts(), group_size=0)
    with pytest.raises(InferError, match="bit width 5"):
        awq_quantize(model, tokenizer, _texts(), bits=5, group_size=32)
    with pytest.raises(InferError, match="n_grid"):
        awq_quantize(model, tokenizer, _texts(), group_size=32, n_grid=0)
    prepared = copy.deepcopy(model).prepare_for_inference()
    with pytest.raises(InferError, match="prepared for inference"):
        awq_quantize(prepared, tokenizer, _texts(), group_size=32)
    lora_like = copy.deepcopy(model)
    lora_like.model.layers[1].mlp.up_proj = nn.Sequential(lora_like.model.layers[1].mlp.up_proj)  # type: ignore[assignment]
    with pytest.raises(InferError, match=r"model\.layers\.1\.mlp\.up_proj is Sequential"):
        awq_quantize(lora_like, tokenizer, _texts(), group_size=32)
