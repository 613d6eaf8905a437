"""RMSNorm and residual-add + RMSNorm as Triton kernels, with their torch references.

Laid out kernel → launcher → autograd function → module. The kernels compute exactly what core's
:class:`~lmstack.core.model.RMSNorm` does: the mean of squares and the scaling in float32, the normed
value cast back to the input dtype, then multiplied by the weight in the output dtype (the promotion of
weight and input dtypes). The fused variant first adds the residual in the input dtype, as the
decoder layer's ``x + attn(x)`` does, and writes that sum out as the new residual stream.

One program normalises one row (``[C]`` at once, ``C`` padded to a power of two): the kernel reads
each row once and writes it once (twice with the residual), which is what a memory-bound kernel can do.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from lmstack.core.model import AttentionBackend, DecoderLayer, RMSNorm
from lmstack.infer.kernels._triton_utils import check_device, jit_kernel, next_power_of_2, tl

__all__ = [
    "TritonDecoderLayer",
    "TritonRMSNorm",
    "fused_add_rmsnorm",
    "fused_add_rmsnorm_reference",
    "rmsnorm",
    "rmsnorm_reference",
]

logger = logging.getLogger(__name__)

# Rows of the backward pass one program walks through (its weight-gradient partial sums them).
_BWD_ROWS_PER_PROGRAM = 16


# -- references ------------------------------------------------------------------------------------------


def rmsnorm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Core's RMSNorm in plain torch: ``weight * (x / rms(x))``, the rms in float32, cast back."""
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def fused_add_rmsnorm_reference(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """``(rmsnorm(x + residual), x + residual)`` in plain torch (the sum in the inputs' dtype)."""
    total = x + residual
    return rmsnorm_reference(total, weight, eps), total


# -- kernels ---------------------------------------------------------------------------------------------


def _rmsnorm_fwd_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    rstd_ptr,
    n_cols,
    stride_x,
    stride_res,
    stride_out,
    stride_res_out,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    STORE_RSTD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # The sum rounds to the input dtype, as torch's ``x + residual`` does.
        x = x + tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
        tl.store(res_out_ptr + row * stride_res_out + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x32 * x32, axis=0) / n_cols + eps)
    if STORE_RSTD:
        tl.store(rstd_ptr + row, rstd)
    normed = (x32 * rstd).to(x_ptr.dtype.element_ty)
    out_ty = out_ptr.dtype.element_ty
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_out + cols, w.to(out_ty) * normed.to(out_ty), mask=mask)


def _rmsnorm_bwd_kernel(
    dy_ptr,
    x_ptr,
    w_ptr,
    rstd_ptr,
    dx_ptr,
    dw_ptr,
    n_rows,
    n_cols,
    stride_dy,
    stride_x,
    stride_dx,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(ROWS):
        row = (pid * ROWS + i).to(tl.int64)
        m = mask & ((cols * 0 + row) < n_rows)  # a block mask (the interpreter rejects scalar ones)
        x = tl.load(x_ptr + row * stride_x + cols, mask=m, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * stride_dy + cols, mask=m, other=0.0).to(tl.float32)
        # Clamped rather than masked (a scalar load); past-the-end rows have x = dy = 0 anyway.
        rstd = tl.load(rstd_ptr + tl.minimum(row, n_rows - 1))
        xhat = x * rstd
        # The weight multiplied the normed value after its cast to the input dtype.
        dw += dy * xhat.to(x_ptr.dtype.element_ty).to(tl.float32)
        g = dy * w
        # d/dx of g . (x * rstd(x)) = rstd * (g - xhat * mean(g * xhat))
        dx = (g - xhat * (tl.sum(g * xhat, axis=0) / n_cols)) * rstd
        tl.store(dx_ptr + row * stride_dx + cols, dx.to(dx_ptr.dtype.element_ty), mask=m)
    tl.store(dw_ptr + pid * n_cols + cols, dw, mask=mask)


# -- launchers -------------------------------------------------------------------------------------------


def _rows(t: Tensor) -> Tensor:
    """``t`` as ``[rows, C]`` with a unit stride along ``C`` (a view when possible)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _num_warps(block: int) -> int:
    return 4 if block <= 2048 else 8 if block <= 8192 else 16


def _launch_fwd(
    x: Tensor, residual: Tensor | None, weight: Tensor, eps: float, *, inplace: bool, store_rstd: bool
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Run the forward kernel over ``x``'s rows: ``(out, new_residual or None, rstd or None)``."""
    check_device(x, weight, *(() if residual is None else (residual,)))
    c = x.shape[-1]
    if weight.shape != (c,):
        raise ValueError(f"RMSNorm weight has shape {tuple(weight.shape)}, expected ({c},).")
    x2 = _rows(x)
    n = x2.shape[0]
    out = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    res2 = res_out = rstd = None
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(
                f"residual {tuple(residual.shape)} {residual.dtype} must match x {tuple(x.shape)} {x.dtype}."
            )
        res2 = _rows(residual)
        # In place only into the caller's own storage (a copy made by _rows would be thrown away).
        in_place = inplace and res2.data_ptr() == residual.data_ptr() and residual.is_contiguous()
        res_out = res2 if in_place else torch.empty_like(res2)
    if store_rstd:
        rstd = torch.empty(n, dtype=torch.float32, device=x.device)
    if n:
        block = next_power_of_2(c)
        jit_kernel(_rmsnorm_fwd_kernel)[(n,)](
            x2,
            x2 if res2 is None else res2,
            weight,
            out,
            x2 if res_out is None else res_out,
            out if rstd is None else rstd,
            c,
            x2.stride(0),
            0 if res2 is None else res2.stride(0),
            out.stride(0),
            0 if res_out is None else res_out.stride(0),
            eps,
            HAS_RESIDUAL=res2 is not None,
            STORE_RSTD=rstd is not None,
            BLOCK=block,
            num_warps=_num_warps(block),
        )
    new_res = None if res_out is None else res_out.view(x.shape)
    return out.view(*x.shape[:-1], c), new_res, rstd


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm with the Triton forward and backward kernels."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        out, _, rstd = _launch_fwd(x, None, weight, eps, inplace=False, store_rstd=True)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x, weight, rstd = ctx.saved_tensors
        c = x.shape[-1]
        x2, dy2 = _rows(x), _rows(dy)
        n = x2.shape[0]
        dx = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
        programs = max(1, -(-n // _BWD_ROWS_PER_PROGRAM))
        dw_part = torch.empty((programs, c), dtype=torch.float32, device=x.device)
        if n:
            block = next_power_of_2(c)
            jit_kernel(_rmsnorm_bwd_kernel)[(programs,)](
                dy2,
                x2,
                weight,
                rstd,
                dx,
                dw_part,
                n,
                c,
                dy2.stride(0),
                x2.stride(0),
                dx.stride(0),
                ROWS=_BWD_ROWS_PER_PROGRAM,
                BLOCK=block,
                num_warps=_num_warps(block),
            )
        else:
            dw_part.zero_()
        dw = dw_part.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx.view(x.shape), dw, None


def rmsnorm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm over the last dimension with the Triton kernel (differentiable in ``x`` and ``weight``).

    Args:
        x: ``[..., C]`` activations (float32, float16 or bfloat16).
        weight: ``[C]`` scale.
        eps: Added to the mean of squares.

    Returns:
        ``[..., C]`` in the promotion of ``weight``'s and ``x``'s dtypes, as core's RMSNorm returns.

    Raises:
        KernelUnavailableError: Triton cannot run on these tensors (see ``check_device``).
    """
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _RMSNormFunction.apply(x, weight, eps)  # type: ignore[no-any-return]
    return _launch_fwd(x, None, weight, eps, inplace=False, store_rstd=False)[0]


def fused_add_rmsnorm(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float, *, inplace: bool = False
) -> tuple[Tensor, Tensor]:
    """``(rmsnorm(x + residual), x + residual)`` in one pass over the rows.

    Args:
        x: ``[..., C]`` activations.
        residual: The residual stream, same shape and dtype as ``x``.
        weight: ``[C]`` scale.
        eps: Added to the mean of squares.
        inplace: Write the sum into ``residual``'s storage (when it is contiguous) instead of a new
            tensor. Ignored while autograd records, where the sum is an ordinary torch add.

    Returns:
        The normed sum and the sum (the new residual stream).
    """
    if torch.is_grad_enabled() and (x.requires_grad or residual.requires_grad or weight.requires_grad):
        total = x + residual
        return rmsnorm(total, weight, eps), total
    out, new_residual, _ = _launch_fwd(x, residual, weight, eps, inplace=inplace, store_rstd=False)
    assert new_residual is not None
    return out, new_residual


# -- modules ---------------------------------------------------------------------------------------------


class TritonRMSNorm(RMSNorm):
    """Core's :class:`~lmstack.core.model.RMSNorm` computed by the Triton kernel (with backward)."""

    def forward(self, x: Tensor) -> Tensor:
        return rmsnorm(x, self.weight, self.eps)


class TritonDecoderLayer(DecoderLayer):
    """Core's :class:`~lmstack.core.model.DecoderLayer` with the residual add fused into the second norm."""

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, attn: AttentionBackend, rows: Tensor | None = None
    ) -> Tensor:
        if rows is not None:  # core's rows-only last layer (training on few loss tokens): unfused
            return super().forward(x, cos, sin, attn, rows)
        a = self.self_attn(self.input_layernorm(x), cos, sin, attn)
        norm = self.post_attention_layernorm
        # The sum goes into the attention output, a temporary this layer owns (never into its input x).
        h, x = fused_add_rmsnorm(x, a, norm.weight, norm.eps, inplace=True)
        return x + self.mlp(h)
