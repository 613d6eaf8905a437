"""The element-wise Triton kernels (RMSNorm, fused add + RMSNorm, rotary, SiLU-and-mul), their dispatch,
and apply_kernels, run in Triton's CPU interpreter against core's torch modules.

Every test sets ``TRITON_INTERPRET=1`` through an autouse fixture (the kernels wrap ``triton.jit`` on
first launch, once per interpreter mode, so the variable takes effect here and leaks nowhere else).
Shapes are small and odd on purpose: hidden 72 (not a power of two: masked tails), 7 tokens, head_dim
40 (half of it, 20, is not a power of two either) and 64.

Tolerances and why:

* float32: ~1e-5 relative. The kernels sum squares in a different order and use the device's rsqrt.
* float16: 2e-3 relative (about two float16 ulps, 2 * 2**-11 ~ 1e-3) plus a small absolute floor.
  Core rounds to float16 after each op (the cast of the normed value, ``silu`` then ``* up``, each
  rotary product and the sum); the kernels keep float32 and round once, or a float32 rounding
  difference flips one float16 rounding: a result one ulp away.
"""

from __future__ import annotations

import os

# Before triton is imported: triton.jit wraps its own standard library (tl.sum...) for the interpreter
# only when the variable is set at import time.
os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch
import torch.nn.functional as F

tl = pytest.importorskip("triton.language")
if type(tl.sum).__name__ != "InterpretedFunction":
    pytest.fail(
        "triton was imported before TRITON_INTERPRET=1 was set, so its kernels cannot run on CPU here; "
        "set TRITON_INTERPRET=1 in the environment (or the tests' conftest) before anything imports triton.",
        pytrace=False,
    )

from lmstack.core import CausalLM, ModelConfig  # noqa: E402
from lmstack.core._config import RopeScaling  # noqa: E402
from lmstack.core.model import MLP, Attention, DecoderLayer, RMSNorm, RotaryEmbedding, apply_rotary  # noqa: E402
from lmstack.infer._errors import InferError  # noqa: E402
from lmstack.infer.kernels import _dispatch  # noqa: E402
from lmstack.infer.kernels._activation import TritonMLP, silu_and_mul, silu_and_mul_reference  # noqa: E402
from lmstack.infer.kernels._dispatch import apply_kernels, resolve_kernels  # noqa: E402
from lmstack.infer.kernels._rmsnorm import (  # noqa: E402
    TritonDecoderLayer,
    TritonRMSNorm,
    fused_add_rmsnorm,
    fused_add_rmsnorm_reference,
    rmsnorm,
    rmsnorm_reference,
)
from lmstack.infer.kernels._rotary import TritonAttention, rotary, rotary_inplace, rotary_reference  # noqa: E402

DTYPES = [torch.float32, torch.float16]
TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.float16: {"rtol": 2e-3, "atol": 2e-3}}


@pytest.fixture(autouse=True)
def _interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("LMSTACK_KERNELS", raising=False)


def _core_norm(dim: int, dtype: torch.dtype, eps: float = 1e-6) -> RMSNorm:
    norm = RMSNorm(dim, eps, dtype=dtype)
    with torch.no_grad():
        norm.weight.copy_(1.0 + 0.5 * torch.randn(dim))  # not all ones, so the weight's role shows
    return norm


# -- RMSNorm ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 72), (2, 3, 72), (1, 40)])
def test_rmsnorm_matches_core(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    norm = _core_norm(shape[-1], dtype)
    x = (3 * torch.randn(shape)).to(dtype)
    with torch.no_grad():
        expected = norm(x)
        got = rmsnorm(x, norm.weight, norm.eps)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    torch.testing.assert_close(got, expected, **TOL[dtype])
    torch.testing.assert_close(rmsnorm_reference(x, norm.weight, norm.eps), expected, rtol=0, atol=0)


def test_rmsnorm_promotes_like_core() -> None:
    # A float32 weight over float16 activations gives float32, as core's ``weight * x.to(dtype)`` does.
    torch.manual_seed(1)
    norm = _core_norm(72, torch.float32)
    x = torch.randn(7, 72).to(torch.float16)
    with torch.no_grad():
        expected = norm(x)
        got = rmsnorm(x, norm.weight, norm.eps)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, **TOL[torch.float16])


def test_rmsnorm_strided_rows() -> None:
    # Rows of a wider buffer (a view with a row stride of 100) are read where they lie.
    torch.manual_seed(2)
    buf = torch.randn(7, 100)
    x = buf[:, 10:82]
    w = torch.randn(72)
    torch.testing.assert_close(rmsnorm(x, w, 1e-5), rmsnorm_reference(x, w, 1e-5), **TOL[torch.float32])


@pytest.mark.parametrize("dtype", DTYPES)
def test_rmsnorm_backward_matches_core(dtype: torch.dtype) -> None:
    torch.manual_seed(3)
    norm = _core_norm(72, dtype)
    x = (2 * torch.randn(2, 7, 72)).to(dtype)
    dy = torch.randn(2, 7, 72).to(dtype)
    x_ref = x.clone().requires_grad_(True)
    norm(x_ref).backward(dy)
    w_grad_ref = norm.weight.grad.clone()  # type: ignore[union-attr]
    norm.weight.grad = None
    x_k = x.clone().requires_grad_(True)
    out = rmsnorm(x_k, norm.weight, norm.eps)
    assert out.grad_fn is not None and "RMSNormFunction" in type(out.grad_fn).__name__
    out.backward(dy)
    # Gradients: the same formula in float32; float16 adds the rounding of the stored gradients and,
    # for the weight, a float32 sum over 14 rows where torch sums float16 products.
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 5e-3, "atol": 5e-3}
    torch.testing.assert_close(x_k.grad, x_ref.grad, **tol)
    torch.testing.assert_close(norm.weight.grad, w_grad_ref, **tol)


def test_rmsnorm_backward_float64_gradcheck_against_analytic() -> None:
    # The kernel's float32 backward against torch's float64 autograd of the same function
    # (a gradcheck-style comparison: the analytic Jacobian-vector product, independent of core).
    torch.manual_seed(4)
    x = torch.randn(5, 40, dtype=torch.float64)
    w = torch.randn(40, dtype=torch.float64)
    dy = torch.randn(5, 40, dtype=torch.float64)
    x64, w64 = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    (w64 * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6)).backward(dy)
    x32, w32 = x.float().requires_grad_(True), w.float().requires_grad_(True)
    rmsnorm(x32, w32, 1e-6).backward(dy.float())
    torch.testing.assert_close(x32.grad.double(), x64.grad, rtol=1e-4, atol=1e-5)  # type: ignore[union-attr]
    torch.testing.assert_close(w32.grad.double(), w64.grad, rtol=1e-4, atol=1e-5)  # type: ignore[union-attr]


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rmsnorm(dtype: torch.dtype) -> None:
    torch.manual_seed(5)
    norm = _core_norm(72, dtype)
    x = torch.randn(2, 7, 72).to(dtype)
    residual = torch.randn(2, 7, 72).to(dtype)
    with torch.no_grad():
        total = residual + x
        expected = norm(total)
        out, new_residual = fused_add_rmsnorm(x, residual, norm.weight, norm.eps)
    assert torch.equal(new_residual, total)  # the same IEEE add in the same dtype
    torch.testing.assert_close(out, expected, **TOL[dtype])
    ref_out, ref_total = fused_add_rmsnorm_reference(x, residual, norm.weight, norm.eps)
    assert torch.equal(ref_total, total)
    torch.testing.assert_close(ref_out, expected, rtol=0, atol=0)


def test_fused_add_rmsnorm_inplace_writes_the_residual_storage() -> None:
    torch.manual_seed(6)
    w = torch.randn(72)
    x, residual = torch.randn(7, 72), torch.randn(7, 72)
    expected_total = x + residual
    expected = rmsnorm_reference(expected_total, w, 1e-6)
    x_before = x.clone()
    out, total = fused_add_rmsnorm(x, residual, w, 1e-6, inplace=True)
    assert total.data_ptr() == residual.data_ptr()
    assert torch.equal(residual, expected_total) and torch.equal(x, x_before)
    torch.testing.assert_close(out, expected, **TOL[torch.float32])
    # A strided residual cannot be written in place: a new tensor comes back and the input is intact.
    buf = torch.randn(7, 100)
    strided = buf[:, :72]
    kept = strided.clone()
    _, total2 = fused_add_rmsnorm(x, strided, w, 1e-6, inplace=True)
    assert torch.equal(strided, kept) and torch.equal(total2, x + kept)


# -- rotary ----------------------------------------------------------------------------------------------

SCALINGS = {
    "none": None,
    "linear": RopeScaling(rope_type="linear", factor=4.0),
    "dynamic": RopeScaling(rope_type="dynamic", factor=2.0),
    "llama3": RopeScaling(
        rope_type="llama3",
        factor=8.0,
        original_max_position_embeddings=16,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
    ),
    "yarn": RopeScaling(rope_type="yarn", factor=4.0, original_max_position_embeddings=16),
}


def _rope_config(head_dim: int, scaling: RopeScaling | None) -> ModelConfig:
    return ModelConfig(
        model_type="llama",
        vocab_size=64,
        hidden_size=72,
        intermediate_size=100,
        num_hidden_layers=1,
        num_attention_heads=3,
        num_key_value_heads=1,
        head_dim=head_dim,
        max_position_embeddings=16,  # small, so positions below run past it (dynamic NTK, yarn)
        rope_theta=10000.0,
        rope_scaling=scaling,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [40, 64])
@pytest.mark.parametrize("kind", list(SCALINGS))
def test_rotary_matches_core_every_scaling(kind: str, head_dim: int, dtype: torch.dtype) -> None:
    torch.manual_seed(7)
    config = _rope_config(head_dim, SCALINGS[kind])
    rope = RotaryEmbedding(config)
    b, t, hq, hkv = 2, 7, 3, 1
    positions = torch.randint(0, 40, (b, t))
    # Dynamic NTK: each token's own sequence length (one request within the context, one beyond it).
    seq_lens = torch.tensor([[12] * t, [40] * t]) if kind == "dynamic" else None
    cos, sin = rope(positions, seq_lens, dtype=dtype)
    # q and k as views of one fused qkv output, as Attention produces them (strided token rows).
    qkv = torch.randn(b, t, (hq + 2 * hkv) * head_dim).to(dtype)
    q, k, v = qkv.split([hq * head_dim, hkv * head_dim, hkv * head_dim], dim=-1)
    q, k, v = q.view(b, t, hq, head_dim), k.view(b, t, hkv, head_dim), v.view(b, t, hkv, head_dim)
    expected_q, expected_k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    v_before = v.clone()
    rotary_inplace(q, k, cos, sin)
    torch.testing.assert_close(q, expected_q, **TOL[dtype])
    torch.testing.assert_close(k, expected_k, **TOL[dtype])
    assert torch.equal(v, v_before)  # the rest of the buffer is untouched


def test_rotary_out_of_place_and_reference() -> None:
    torch.manual_seed(8)
    q, k = torch.randn(1, 7, 4, 40), torch.randn(1, 7, 2, 40)
    cos, sin = torch.randn(1, 7, 40), torch.randn(1, 7, 40)  # arbitrary tables: no symmetry assumed
    q0, k0 = q.clone(), k.clone()
    got_q, got_k = rotary(q, k, cos, sin)
    ref_q, ref_k = rotary_reference(q, k, cos, sin)
    assert torch.equal(q, q0) and torch.equal(k, k0)
    torch.testing.assert_close(got_q, ref_q, **TOL[torch.float32])
    torch.testing.assert_close(got_k, ref_k, **TOL[torch.float32])


def test_rotary_rejects_bad_shapes() -> None:
    q, k = torch.randn(1, 7, 4, 40), torch.randn(1, 7, 2, 40)
    with pytest.raises(ValueError, match="cos"):
        rotary_inplace(q, k, torch.randn(1, 7, 38), torch.randn(1, 7, 40))
    with pytest.raises(ValueError, match="even head_dim"):
        rotary_inplace(
            torch.randn(1, 7, 4, 5), torch.randn(1, 7, 2, 5), torch.randn(1, 7, 5), torch.randn(1, 7, 5)
        )


# -- SiLU-and-mul ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_fused_and_split(dtype: torch.dtype) -> None:
    torch.manual_seed(9)
    x = (3 * torch.randn(2, 7, 2 * 50)).to(dtype)
    gate, up = x.chunk(2, dim=-1)
    expected = F.silu(gate) * up
    torch.testing.assert_close(silu_and_mul(x), expected, **TOL[dtype])
    torch.testing.assert_close(silu_and_mul(gate, up), expected, **TOL[dtype])
    torch.testing.assert_close(silu_and_mul_reference(x), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="even"):
        silu_and_mul(torch.randn(3, 5))


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_backward(dtype: torch.dtype) -> None:
    torch.manual_seed(10)
    x = (3 * torch.randn(7, 2 * 50)).to(dtype)
    dy = torch.randn(7, 50).to(dtype)
    x_ref = x.clone().requires_grad_(True)
    g, u = x_ref.chunk(2, dim=-1)
    (F.silu(g) * u).backward(dy)
    x_k = x.clone().requires_grad_(True)
    out = silu_and_mul(x_k)
    assert out.grad_fn is not None
    out.backward(dy)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 5e-3, "atol": 5e-3}
    torch.testing.assert_close(x_k.grad, x_ref.grad, **tol)


# -- dispatch --------------------------------------------------------------------------------------------


def test_resolve_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_kernels("torch", "cpu") == "torch"
    assert resolve_kernels("triton", "cpu") == "triton"  # the interpreter is on
    assert resolve_kernels("auto", "cpu") == "torch"
    monkeypatch.setenv("LMSTACK_KERNELS", "triton")
    assert resolve_kernels("auto", "cpu") == "triton"  # the override wins over auto...
    assert resolve_kernels("torch", "cpu") == "torch"  # ...but not over an explicit choice
    monkeypatch.setenv("LMSTACK_KERNELS", "fast")
    with pytest.raises(InferError, match="LMSTACK_KERNELS"):
        resolve_kernels("auto", "cpu")
    monkeypatch.delenv("LMSTACK_KERNELS")
    with pytest.raises(InferError, match="unknown kernels choice"):
        resolve_kernels("cuda", "cpu")
    monkeypatch.delenv("TRITON_INTERPRET")
    assert resolve_kernels("auto", "cuda") == "triton"  # a device object needs no GPU to be named
    with pytest.raises(InferError, match="TRITON_INTERPRET=1"):
        resolve_kernels("triton", "cpu")
    monkeypatch.setenv("LMSTACK_KERNELS", "triton")
    with pytest.raises(InferError, match="LMSTACK_KERNELS=triton on a CPU"):
        resolve_kernels("auto", "cpu")
    monkeypatch.setattr(_dispatch, "triton_available", lambda: False)
    monkeypatch.delenv("LMSTACK_KERNELS")
    assert resolve_kernels("auto", "cuda") == "torch"
    with pytest.raises(InferError, match="needs triton"):
        resolve_kernels("triton", "cuda")


# -- apply_kernels on a tiny llama -----------------------------------------------------------------------


def _tiny_llama(dtype: torch.dtype) -> CausalLM:
    torch.manual_seed(11)
    config = ModelConfig(
        model_type="llama",
        vocab_size=96,
        hidden_size=72,
        intermediate_size=100,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA
        head_dim=40,
        rope_scaling=RopeScaling(rope_type="linear", factor=2.0),
    )
    model = CausalLM(config).to(dtype)
    with torch.no_grad():  # non-trivial norm weights, so the norms' weights matter
        for module in model.modules():
            if isinstance(module, RMSNorm):
                module.weight.copy_(1.0 + 0.3 * torch.randn_like(module.weight))
    return model.eval()


# Logit tolerances: float32 differs by summation order only; float16 carries the one-ulp differences of
# each kernel through two layers and the output head (logits here are ~0.1-1, float16 ulp ~1e-3).
LOGIT_TOL = {torch.float32: {"rtol": 1e-4, "atol": 1e-5}, torch.float16: {"rtol": 1e-2, "atol": 5e-3}}


@pytest.mark.parametrize("prepared", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_apply_kernels_same_logits(dtype: torch.dtype, prepared: bool) -> None:
    model = _tiny_llama(dtype)
    if prepared:
        model.prepare_for_inference()  # fused qkv and gate_up: the path the engine serves
    ids = torch.randint(0, 96, (2, 7))
    keys = list(model.state_dict())
    with torch.no_grad():
        expected = model(ids)
        apply_kernels(model)
        got = model(ids)
    assert type(model.model.norm) is TritonRMSNorm
    layer = model.model.layers[0]
    assert type(layer) is TritonDecoderLayer
    assert type(layer.self_attn) is TritonAttention and type(layer.mlp) is TritonMLP
    assert type(layer.input_layernorm) is TritonRMSNorm
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(got, expected, **LOGIT_TOL[dtype])
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    apply_kernels(model)  # a second call changes nothing
    assert type(model.model.layers[0]) is TritonDecoderLayer


def test_apply_kernels_trains_like_core() -> None:
    # With autograd on, the Triton modules keep gradients right (RMSNorm and SiLU-mul through their
    # backward kernels, rotary and the residual add through core's torch ops).
    model = _tiny_llama(torch.float32).train()
    ids = torch.randint(0, 96, (2, 7))
    model(ids).logsumexp(-1).sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}  # type: ignore[union-attr]
    model.zero_grad(set_to_none=True)
    apply_kernels(model)
    model(ids).logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_apply_kernels_refuses_cpu_without_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _tiny_llama(torch.float32)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(InferError, match="TRITON_INTERPRET"):
        apply_kernels(model)
    assert type(model.model.layers[0]) is DecoderLayer  # nothing was switched
    assert type(model.model.layers[0].mlp) is MLP and type(model.model.layers[0].self_attn) is Attention
