"""CausalLM.prepare_for_inference: fused q/k/v and gate/up, packed weights, same logits, HF checkpoints."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lmstack.core import CausalLM, CheckpointError, ConfigError, ModelConfig, load_pretrained, save_pretrained
from lmstack.core.model import DecoderLayer, cpu_kernels
from lmstack.core.model._inference_layout import resolve_layout

# Every layout where this machine runs it: "onednn" needs a CPU torch with oneDNN, "gemv" a C compiler
# (CI's machines have both; test_cpu_kernels.py asserts the kernel builds there).
LAYOUTS = (
    ["dense"]
    + (["onednn"] if resolve_layout("auto", torch.device("cpu"), torch.float32) == "onednn" else [])
    + (["gemv"] if cpu_kernels.available() else [])
)


def _model(
    model_type: str, *, tied: bool = False, dtype: torch.dtype = torch.float32, seed: int = 0
) -> CausalLM:
    """A tiny random model with random biases and norm weights, so a misplaced bias or split shows."""
    raw: dict[str, Any] = {
        "model_type": model_type, "vocab_size": 97, "hidden_size": 48, "intermediate_size": 68,
        "num_hidden_layers": 2, "num_attention_heads": 6, "num_key_value_heads": 2,
        "max_position_embeddings": 64, "tie_word_embeddings": tied,
    }  # fmt: skip
    if model_type == "internlm2":
        raw["bias"] = True  # InternLM2's packed wqkv and wo biases
    torch.manual_seed(seed)
    model = CausalLM(ModelConfig.from_dict(raw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(mean=1.0 if "norm" in name else 0.0, std=0.1)
    return model.to(dtype)


def _layer(model: CausalLM, i: int) -> DecoderLayer:
    layer = model.model.layers[i]
    assert isinstance(layer, DecoderLayer)
    return layer


def _ids(batch: int = 3, tokens: int = 13) -> torch.Tensor:
    return torch.randint(0, 97, (batch, tokens), generator=torch.Generator().manual_seed(1))


CASES = [("llama", False), ("llama", True), ("qwen2", False), ("qwen2", True), ("internlm2", False)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("model_type", "tied"), CASES)
def test_prepared_logits_equal_unprepared_fp32(model_type: str, tied: bool, layout: str) -> None:
    model = _model(model_type, tied=tied)
    assert model.config.qkv_bias is (model_type != "llama")
    reference = copy.deepcopy(model)
    ids = _ids()
    assert model.prepare_for_inference(layout) is model  # type: ignore[arg-type]
    assert model.inference_layout == layout
    attn, mlp = _layer(model, 0).self_attn, _layer(model, 0).mlp
    assert (
        not hasattr(attn, "q_proj")
        and attn.qkv_proj is not None
        and attn.qkv_proj.out_features == 48 + 2 * 16
    )
    assert not hasattr(mlp, "gate_proj") and mlp.gate_up_proj is not None
    if tied:  # the output head still shares the embedding matrix
        assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        # fp32 on both sides: only the GEMMs' summation order differs (oneDNN vs MKL, one GEMM vs three).
        assert (model(ids) - reference(ids)).abs().max().item() <= 1e-5
        last = torch.tensor([12, 25, 38])  # each row's last token, as the serving engine asks
        assert (model(ids, logits_indices=last) - reference(ids)[:, -1]).abs().max().item() <= 1e-5
        for few in (ids[:1, :1], ids[:1, :4]):  # one and four rows: the gemv layout's own kernel
            assert (model(few) - reference(few)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("layout", LAYOUTS)
def test_prepared_logits_close_to_unprepared_bf16(layout: str) -> None:
    if layout == "gemv":
        with pytest.raises(ConfigError, match="runs float32 weights"):
            _model("qwen2", dtype=torch.bfloat16).prepare_for_inference("gemv")
        return
    if layout == "onednn" and resolve_layout("auto", torch.device("cpu"), torch.bfloat16) != "onednn":
        pytest.skip("this CPU has no oneDNN bfloat16 support")
    model = _model("qwen2", dtype=torch.bfloat16)
    reference = copy.deepcopy(model)
    model.prepare_for_inference(layout)  # type: ignore[arg-type]
    ids = _ids()
    with torch.no_grad():
        got, expected = model(ids).float(), reference(ids).float()
    # bf16 keeps 8 bits of mantissa: each GEMM's output is rounded to bf16, and a different summation
    # order (fused GEMM, oneDNN kernels) moves a result by up to one bf16 ulp (~0.4% relative), which
    # the following layers carry on. So: within a few ulps of the logits' scale, not bit-equal.
    scale = expected.abs().max().item()
    assert (got - expected).abs().max().item() <= 0.01 * scale
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean().item() >= 0.95


def test_prepared_model_matches_transformers(tiny_config: Any, hf_model: Any) -> None:
    """Against an independent reference: transformers' qwen2 (q/k/v biases) on the same weights."""
    raw = tiny_config("qwen2", max_position_embeddings=32)
    hf = hf_model(raw)
    ours = CausalLM(ModelConfig.from_dict(hf.config.to_dict())).eval()
    ours.load_state_dict(hf.state_dict())
    ours.prepare_for_inference()
    ids = _ids(2, 17)
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize(("model_type", "tied"), [("qwen2", False), ("llama", True), ("internlm2", False)])
def test_save_pretrained_of_prepared_model_writes_the_hf_tensors(
    tmp_path: Path, model_type: str, tied: bool
) -> None:
    model = _model(model_type, tied=tied)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    save_pretrained(model, tmp_path / "before")
    model.prepare_for_inference()
    assert list(model.state_dict()) == list(expected)  # same names, same order
    save_pretrained(model, tmp_path / "after")

    before, after = (
        load_file(tmp_path / "before" / "model.safetensors"),
        load_file(tmp_path / "after" / "model.safetensors"),
    )
    assert sorted(after) == sorted(before)
    assert "model.layers.0.self_attn.q_proj.weight" in after and "model.layers.1.mlp.up_proj.weight" in after
    if model_type != "llama":
        assert "model.layers.0.self_attn.k_proj.bias" in after
    for name, tensor in after.items():
        assert torch.equal(tensor, before[name]), name
        assert torch.equal(tensor, expected[name]), name

    reloaded = load_pretrained(tmp_path / "after")
    with torch.no_grad():
        assert torch.equal(reloaded(_ids()), _model(model_type, tied=tied)(_ids()))


def test_prepare_is_idempotent_and_refuses_what_it_cannot_serve() -> None:
    model = _model("llama")
    model.prepare_for_inference()
    layer0 = _layer(model, 0).self_attn.qkv_proj
    model.prepare_for_inference()  # a second engine over the same model: nothing changes
    assert _layer(model, 0).self_attn.qkv_proj is layer0

    with pytest.raises(CheckpointError, match="unprepared CausalLM"):
        model.load_state_dict(_model("llama").state_dict())
    model.train()
    with pytest.raises(ConfigError, match="cannot be trained"):
        model(_ids())

    class LoraLike(nn.Linear):
        pass

    wrapped = _model("llama")
    _layer(wrapped, 1).self_attn.q_proj = LoraLike(48, 48)
    with pytest.raises(ConfigError, match=r"model\.layers\.1\.self_attn\.q_proj is LoraLike"):
        wrapped.prepare_for_inference()
    with pytest.raises(ConfigError, match="unknown weight layout"):
        _model("llama").prepare_for_inference("packed")  # type: ignore[arg-type]


def test_unprepared_model_is_unchanged() -> None:
    model = _model("qwen2")
    assert model.inference_layout is None
    assert isinstance(_layer(model, 0).self_attn.q_proj, nn.Linear)
    assert _layer(model, 0).self_attn.qkv_proj is None and _layer(model, 0).mlp.gate_up_proj is None


@pytest.mark.parametrize(("model_type", "tied"), CASES)
def test_a_prepared_model_counts_the_same_parameters(model_type: str, tied: bool) -> None:
    model = _model(model_type, tied=tied)
    before = model.num_parameters()
    assert model.prepare_for_inference("dense").num_parameters() == before


@pytest.mark.skipif(not cpu_kernels.available(), reason="the gemv kernel needs a C compiler (CI has gcc)")
@pytest.mark.parametrize("tied", [False, True])
def test_gemv_layout_sends_few_rows_to_the_kernel_and_many_to_onednn(
    tied: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _model("llama", tied=tied)
    reference = copy.deepcopy(model)
    model.prepare_for_inference("gemv")
    calls: list[int] = []
    real = cpu_kernels.gemv

    def spy(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        calls.append(x.numel() // x.shape[-1])
        return real(x, weight, bias)

    monkeypatch.setattr(cpu_kernels, "gemv", spy)
    ids = _ids(1, 5)
    with torch.no_grad():
        # One row: every projection (4 per layer, 2 layers) and the head, tied or not, in the kernel.
        assert (model(ids[:, :1]) - reference(ids[:, :1])).abs().max().item() <= 1e-5
        assert calls == [1] * 9
        calls.clear()
        # Five rows: a GEMM (oneDNN over the plain matrix), except the head's single logits row.
        got = model(ids, logits_indices=torch.tensor([4]))
        assert (got - reference(ids)[:, -1]).abs().max().item() <= 1e-5
        assert calls == [1]
