"""The W4A16 dequantize-GEMM Triton kernel in Triton's CPU interpreter, against torch references.

Three independent references: the kernel's own torch reference (unpack the AutoAWQ layout with
``unpack_awq``, dequantize, ``F.linear``); the codes *before* packing (``GroupQuant.dequantize``), so the
kernel's nibble decoding is checked against the quantizer rather than against the unpacker; and a
qweight packed by hand from AutoAWQ's documented nibble order.

Tolerances: the dequantized weight is exact (``(q - zero) * scale`` in float32 before one rounding, the
same as the reference), so only summation order differs. float32 (full-precision dot, no TF32): 1e-5
relative. float16: the float32 accumulator is rounded once to float16 at the end, while the reference
may accumulate in another order: about one float16 ulp of the output (2**-11 relative), so 2e-3.
"""

from __future__ import annotations

import os

# Before triton is imported: triton.jit wraps its own standard library for the interpreter only when
# the variable is set at import time.
os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch
import torch.nn.functional as F
from torch import nn

tl = pytest.importorskip("triton.language")
if type(tl.sum).__name__ != "InterpretedFunction":
    pytest.fail(
        "triton was imported before TRITON_INTERPRET=1 was set, so its kernels cannot run on CPU here; "
        "set TRITON_INTERPRET=1 in the environment (or the tests' conftest) before anything imports triton.",
        pytrace=False,
    )

from lmstack.infer._errors import InferError  # noqa: E402
from lmstack.infer.kernels._w4a16 import W4A16Linear, w4a16_gemm, w4a16_gemm_reference  # noqa: E402
from lmstack.infer.quant._packing import AWQ_ORDER, pack_awq, quantize_groupwise  # noqa: E402

TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.float16: {"rtol": 2e-3, "atol": 2e-3}}


@pytest.fixture(autouse=True)
def _interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _quantized(out_f: int, in_f: int, group: int, seed: int = 0) -> tuple:
    torch.manual_seed(seed)
    quant = quantize_groupwise(0.05 * torch.randn(out_f, in_f), 4, group)
    return quant, pack_awq(quant)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    ("m", "k", "n", "group"),
    [
        (1, 256, 72, 128),  # one decode token, the AutoAWQ default group size
        (7, 256, 40, 128),  # N not a multiple of the 64-column tile
        (19, 96, 24, 32),  # smallest group size, several K slices
        (33, 192, 136, 96),  # a group size that is a multiple of 32 but not a power of two; M > 32
    ],
)
@pytest.mark.parametrize("with_bias", [False, True])
def test_w4a16_matches_references(
    m: int, k: int, n: int, group: int, dtype: torch.dtype, with_bias: bool
) -> None:
    quant, (qweight, qzeros, scales) = _quantized(n, k, group, seed=m)
    x = torch.randn(m, k).to(dtype)
    bias = torch.randn(n).to(dtype) if with_bias else None
    got = w4a16_gemm(x, qweight, qzeros, scales, bias)
    assert got.shape == (m, n) and got.dtype == dtype
    torch.testing.assert_close(got, w4a16_gemm_reference(x, qweight, qzeros, scales, bias), **TOL[dtype])
    # Independent of the unpacker: the quantizer's codes, with the fp16 scales the checkpoint stores.
    quant.scales = scales.t().float()
    w = quant.dequantize(torch.float32).to(dtype).double()
    expected = x.double() @ w.T + (0 if bias is None else bias.double())
    torch.testing.assert_close(got.double(), expected, **TOL[dtype])


def test_w4a16_leading_dims_and_strided_rows() -> None:
    _, (qweight, qzeros, scales) = _quantized(72, 128, 32)
    x = torch.randn(2, 5, 200).to(torch.float16)[..., 50:178]  # rows with a stride of 200
    got = w4a16_gemm(x, qweight, qzeros, scales)
    assert got.shape == (2, 5, 72)
    torch.testing.assert_close(got, w4a16_gemm_reference(x, qweight, qzeros, scales), **TOL[torch.float16])
    assert w4a16_gemm(x[:0], qweight, qzeros, scales).shape == (0, 5, 72)


def test_w4a16_reads_autoawq_nibble_order() -> None:
    # A qweight packed by hand from the documented order: nibble i of packed column c holds output
    # column 8c + AWQ_ORDER[i]. Code of (input row r, output column j) = (r + 3 j) % 16; zero 8; scale 1.
    k, n = 32, 16
    codes = torch.tensor([[(r + 3 * j) % 16 for j in range(n)] for r in range(k)], dtype=torch.int64)
    qweight = torch.zeros(k, n // 8, dtype=torch.int64)
    for c in range(n // 8):
        for i, col in enumerate(AWQ_ORDER):
            qweight[:, c] |= codes[:, 8 * c + col] << (4 * i)
    qweight = torch.where(qweight >= 2**31, qweight - 2**32, qweight).to(torch.int32)
    zero_word = sum(8 << (4 * i) for i in range(8))
    qzeros = torch.full((1, n // 8), zero_word - 2**32, dtype=torch.int64).to(torch.int32)
    scales = torch.ones(1, n, dtype=torch.float16)
    x = torch.eye(k)  # y = W^T: row r of y is input row r of the dequantized weight
    got = w4a16_gemm(x, qweight, qzeros, scales)
    assert torch.equal(got, (codes - 8).float())


def test_w4a16_rejects_bad_layouts() -> None:
    _, (qweight, qzeros, scales) = _quantized(72, 256, 128)
    x = torch.randn(3, 256).to(torch.float16)
    with pytest.raises(InferError, match="input features"):
        w4a16_gemm(torch.randn(3, 200).half(), qweight, qzeros, scales)
    with pytest.raises(InferError, match="inconsistent AWQ tensors"):
        w4a16_gemm(x, qweight, qzeros, scales[:, :64])
    with pytest.raises(InferError, match="int32"):
        w4a16_gemm(x, qweight.to(torch.int64), qzeros, scales)
    _, (qw16, qz16, s16) = _quantized(72, 64, 16)
    with pytest.raises(InferError, match="multiple of 32"):
        w4a16_gemm(torch.randn(3, 64).half(), qw16, qz16, s16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_w4a16_linear_module(dtype: torch.dtype) -> None:
    torch.manual_seed(3)
    linear = nn.Linear(256, 72, bias=True)
    triton_layer = W4A16Linear.from_linear(linear, group_size=128, kernels="triton")
    torch_layer = W4A16Linear.from_linear(linear, group_size=128, kernels="torch")
    assert set(dict(triton_layer.named_buffers())) == {"qweight", "qzeros", "scales", "bias"}
    x = torch.randn(2, 7, 256).to(dtype)
    got = triton_layer(x)
    torch.testing.assert_close(got, torch_layer(x), **TOL[dtype])
    # 4-bit round-to-nearest stays close to the float layer (a loose, quantization-sized bound).
    ref = F.linear(x.float(), linear.weight.detach(), linear.bias.detach())
    assert (got.float() - ref).abs().max() < 0.1 * ref.abs().max()
    with pytest.raises(InferError, match="'triton' or 'torch'"):
        W4A16Linear(triton_layer.qweight, triton_layer.qzeros, triton_layer.scales, kernels="auto")
