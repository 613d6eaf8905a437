"""W4A16 GEMM: 4-bit AutoAWQ-layout weights dequantized inside a Triton matmul, with its torch reference.

Laid out kernel → launcher → module (inference only: no autograd function). The kernel reads the
AutoAWQ "GEMM" layout that :mod:`lmstack.infer.quant._packing` writes and transformers/vLLM read, as is:
``qweight`` int32 ``[K, N / 8]`` (eight 4-bit codes per int32, nibble ``i`` holding column
``8c + AWQ_ORDER[i]``), ``qzeros`` int32 ``[K / group, N / 8]`` in the same nibble order and ``scales``
``[K / group, N]``. Each program computes a ``[BLOCK_M, BLOCK_N]`` tile of ``y = x @ W^T``: per
``BLOCK_K`` slice of the input it loads the packed words, shifts each output column's nibble out,
subtracts the group's zero point, multiplies by its scale, and feeds ``tl.dot`` with float32
accumulation. ``BLOCK_K`` divides the group size, so one slice needs one row of scales and zeros.

The dequantized weight equals the reference's bit for bit (``(q - zero) * scale`` is exact in float32
before the one rounding to the activations' dtype); only the order of the float32 sums differs.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmstack.infer._errors import InferError
from lmstack.infer.kernels._triton_utils import check_device, jit_kernel, tl
from lmstack.infer.quant._packing import pack_awq, quantize_groupwise, unpack_awq

__all__ = ["W4A16Linear", "w4a16_gemm", "w4a16_gemm_reference"]

logger = logging.getLogger(__name__)


def w4a16_gemm_reference(
    x: Tensor, qweight: Tensor, qzeros: Tensor, scales: Tensor, bias: Tensor | None = None
) -> Tensor:
    """``x @ W^T (+ bias)`` with ``W`` dequantized from the AutoAWQ layout to ``x``'s dtype by torch.

    Args:
        x: ``[..., K]`` activations.
        qweight: int32 ``[K, N / 8]``.
        qzeros: int32 ``[K / group, N / 8]``.
        scales: ``[K / group, N]``.
        bias: Optional ``[N]``.

    Returns:
        ``[..., N]`` in ``x``'s dtype.
    """
    w = unpack_awq(qweight, qzeros, scales).dequantize(x.dtype)  # [N, K]
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def _w4a16_kernel(
    x_ptr,
    qw_ptr,
    qz_ptr,
    s_ptr,
    bias_ptr,
    y_ptr,
    M,
    N,
    K,
    group_size,
    stride_xm,
    stride_qw,
    stride_qz,
    stride_s,
    stride_ym,
    HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    # Column j of a group of eight sits in nibble (j // 2) + 4 * (j % 2): the inverse of AWQ_ORDER.
    j = rn % 8
    shifts = ((j // 2) + 4 * (j % 2)) * 4
    packed_col = rn // 8
    x_ty = x_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + kk[None, :], mask=m_ok[:, None], other=0.0)
        packed = tl.load(
            qw_ptr + kk[:, None].to(tl.int64) * stride_qw + packed_col[None, :], mask=n_ok[None, :]
        )
        q = (packed >> shifts[None, :]) & 0xF  # [BLOCK_K, BLOCK_N] codes
        g = k0 // group_size
        zp = tl.load(qz_ptr + g * stride_qz + packed_col, mask=n_ok, other=0)
        z = (zp >> shifts) & 0xF
        s = tl.load(s_ptr + g * stride_s + rn, mask=n_ok, other=0.0).to(tl.float32)
        w = ((q - z[None, :]).to(tl.float32) * s[None, :]).to(x_ty)
        if IEEE:
            acc += tl.dot(x, w, input_precision="ieee")
        else:
            acc += tl.dot(x, w)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rm[:, None].to(tl.int64) * stride_ym + rn[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _block_m(m: int) -> int:
    # tl.dot needs at least 16 rows; decode batches are small, prefill chunks large.
    return 16 if m <= 16 else 32 if m <= 32 else 64


def w4a16_gemm(
    x: Tensor, qweight: Tensor, qzeros: Tensor, scales: Tensor, bias: Tensor | None = None
) -> Tensor:
    """``x @ W^T (+ bias)`` with the Triton kernel, ``W`` read from the AutoAWQ GEMM layout.

    Args:
        x: ``[..., K]`` activations: float16 (the W4A16 case), bfloat16 or float32 (then the matmul
            runs in full float32, not TF32).
        qweight: int32 ``[K, N / 8]``.
        qzeros: int32 ``[K / group, N / 8]``.
        scales: ``[K / group, N]`` (float16 in AutoAWQ checkpoints).
        bias: Optional ``[N]``.

    Returns:
        ``[..., N]`` in ``x``'s dtype, accumulated in float32.

    Raises:
        InferError: The tensors do not form one AutoAWQ layout, or the group size is not a multiple of 32.
        KernelUnavailableError: Triton cannot run on these tensors.
    """
    check_device(x, qweight, qzeros, scales)
    k = x.shape[-1]
    n = qweight.shape[1] * 8
    groups = qzeros.shape[0]
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise InferError(f"qweight and qzeros must be int32, got {qweight.dtype} and {qzeros.dtype}.")
    if qweight.shape[0] != k or groups == 0 or k % groups:
        raise InferError(
            f"x has {k} input features but qweight is {tuple(qweight.shape)} with {groups} groups; "
            "pass the layer's own AutoAWQ tensors."
        )
    group_size = k // groups
    if group_size % 32:
        raise InferError(f"the W4A16 kernel needs a group size that is a multiple of 32, got {group_size}.")
    if qzeros.shape[1] * 8 != n or scales.shape != (groups, n):
        raise InferError(
            f"inconsistent AWQ tensors: qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, "
            f"scales {tuple(scales.shape)}."
        )
    if bias is not None and bias.shape != (n,):
        raise InferError(f"bias has shape {tuple(bias.shape)}, expected ({n},).")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    qweight, qzeros, scales = qweight.contiguous(), qzeros.contiguous(), scales.contiguous()
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m:
        block_m = _block_m(m)
        block_n = 64 if m <= 64 else 128
        block_k = math.gcd(group_size, 128)  # divides the group: one scale row per slice
        grid = (-(-m // block_m), -(-n // block_n))
        jit_kernel(_w4a16_kernel)[grid](
            x2,
            qweight,
            qzeros,
            scales,
            y if bias is None else bias,
            y,
            m,
            n,
            k,
            group_size,
            x2.stride(0),
            qweight.stride(0),
            qzeros.stride(0),
            scales.stride(0),
            y.stride(0),
            HAS_BIAS=bias is not None,
            IEEE=x.dtype == torch.float32,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            num_warps=4,
        )
    return y.view(*x.shape[:-1], n)


class W4A16Linear(nn.Module):
    """A frozen linear layer with 4-bit group-quantized weights in the AutoAWQ GEMM layout.

    The buffers are named as AutoAWQ checkpoints name them (``qweight``, ``qzeros``, ``scales``,
    ``bias``), so a checkpoint's tensors load straight in. ``kernels`` picks the implementation:
    ``"triton"`` runs :func:`w4a16_gemm`, ``"torch"`` dequantizes and multiplies
    (:func:`w4a16_gemm_reference`).

    Args:
        qweight: int32 ``[in, out / 8]``.
        qzeros: int32 ``[in / group, out / 8]``.
        scales: ``[in / group, out]``.
        bias: Optional ``[out]``.
        kernels: ``"triton"`` or ``"torch"`` (resolve ``"auto"`` first with
            :func:`~lmstack.infer.kernels._dispatch.resolve_kernels`).
    """

    qweight: Tensor
    qzeros: Tensor
    scales: Tensor
    bias: Tensor | None

    def __init__(
        self,
        qweight: Tensor,
        qzeros: Tensor,
        scales: Tensor,
        bias: Tensor | None = None,
        kernels: str = "torch",
    ) -> None:
        super().__init__()
        if kernels not in ("triton", "torch"):
            raise InferError(f"W4A16Linear runs 'triton' or 'torch' kernels, got {kernels!r}.")
        self.in_features = qweight.shape[0]
        self.out_features = qweight.shape[1] * 8
        self.group_size = self.in_features // max(qzeros.shape[0], 1)
        self.kernels = kernels
        self.register_buffer("qweight", qweight)
        self.register_buffer("qzeros", qzeros)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", bias)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, group_size: int = 128, kernels: str = "torch") -> W4A16Linear:
        """Quantize ``linear`` round-to-nearest (4-bit, asymmetric, per group) and pack it.

        Args:
            linear: The float layer (``[out, in]`` weight; ``out`` a multiple of 8).
            group_size: Input columns per group (a multiple of 32 dividing ``in``).
            kernels: ``"triton"`` or ``"torch"``.
        """
        qweight, qzeros, scales = pack_awq(quantize_groupwise(linear.weight, 4, group_size))
        device = linear.weight.device
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(qweight.to(device), qzeros.to(device), scales.to(device), bias, kernels)

    def forward(self, x: Tensor) -> Tensor:
        """``x @ W^T + b`` over the last dimension, ``[..., in]`` to ``[..., out]`` in ``x``'s dtype."""
        if self.kernels == "triton":
            return w4a16_gemm(x, self.qweight, self.qzeros, self.scales, self.bias)
        return w4a16_gemm_reference(x, self.qweight, self.qzeros, self.scales, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"group_size={self.group_size}, kernels={self.kernels!r}"
        )
