"""SiLU-and-multiply (SwiGLU's gate) as a Triton kernel, with backward and its torch reference.

Laid out kernel → launcher → autograd function → module. ``silu(gate) * up`` is computed in float32
and rounded once to the activations' dtype (core's ``F.silu(gate) * up`` rounds after the SiLU and
after the product, so float16 results can differ from core's in the last bit). The kernel reads
gate and up through row strides, so the fused ``gate_up_proj`` output ``[..., 2F]`` is consumed where it
lies, without the copy that ``chunk`` + a contiguous kernel would need.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lmstack.core.model import MLP
from lmstack.infer.kernels._triton_utils import check_device, jit_kernel, next_power_of_2, tl

__all__ = ["TritonMLP", "silu_and_mul", "silu_and_mul_reference"]

logger = logging.getLogger(__name__)

# Columns one program handles: large enough to stream, small enough to keep many programs per row.
_MAX_BLOCK = 1024


def _split(x: Tensor, up: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(gate, up)``: the two halves of ``x``'s last dimension, or ``x`` and ``up`` as given."""
    if up is not None:
        if up.shape != x.shape:
            raise ValueError(f"gate {tuple(x.shape)} and up {tuple(up.shape)} must have the same shape.")
        return x, up
    if x.shape[-1] % 2:
        raise ValueError(f"the fused gate/up input needs an even last dimension, got {x.shape[-1]}.")
    gate, up = x.chunk(2, dim=-1)
    return gate, up


def silu_and_mul_reference(x: Tensor, up: Tensor | None = None) -> Tensor:
    """Core's ``silu(gate) * up`` in torch (``x`` is ``[..., 2F]``, or the gate when ``up`` is given)."""
    gate, up = _split(x, up)
    return F.silu(gate) * up


def _silu_mul_fwd_kernel(
    gate_ptr,
    up_ptr,
    out_ptr,
    n_cols,
    stride_gate,
    stride_up,
    stride_out,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(gate_ptr + row * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * stride_up + cols, mask=mask, other=0.0).to(tl.float32)
    out = g * tl.sigmoid(g) * u
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def _silu_mul_bwd_kernel(
    dy_ptr,
    gate_ptr,
    up_ptr,
    dgate_ptr,
    dup_ptr,
    n_cols,
    stride_dy,
    stride_gate,
    stride_up,
    stride_dgate,
    stride_dup,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dy = tl.load(dy_ptr + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + row * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * stride_up + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    # d silu(g) / dg = sigmoid(g) * (1 + g * (1 - sigmoid(g)))
    dgate = dy * u * sig * (1.0 + g * (1.0 - sig))
    dup = dy * g * sig
    tl.store(dgate_ptr + row * stride_dgate + cols, dgate.to(dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dup_ptr + row * stride_dup + cols, dup.to(dup_ptr.dtype.element_ty), mask=mask)


def _rows(t: Tensor) -> Tensor:
    """``t`` as ``[rows, F]`` with a unit stride along ``F`` (a view when possible)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _grid(n_rows: int, n_cols: int) -> tuple[tuple[int, int], int]:
    block = min(_MAX_BLOCK, next_power_of_2(n_cols))
    return (n_rows, -(-n_cols // block)), block


def _launch_fwd(gate: Tensor, up: Tensor) -> Tensor:
    check_device(gate, up)
    g2, u2 = _rows(gate), _rows(up)
    n, f = g2.shape
    out = torch.empty((n, f), dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
    if n and f:
        grid, block = _grid(n, f)
        jit_kernel(_silu_mul_fwd_kernel)[grid](
            g2, u2, out, f, g2.stride(0), u2.stride(0), out.stride(0), BLOCK=block, num_warps=4
        )
    return out.view(*gate.shape[:-1], f)


class _SiluMulFunction(torch.autograd.Function):
    """``silu(gate) * up`` with the Triton forward and backward kernels."""

    @staticmethod
    def forward(ctx: Any, gate: Tensor, up: Tensor) -> Tensor:
        ctx.save_for_backward(gate, up)
        return _launch_fwd(gate, up)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor, Tensor]:
        gate, up = ctx.saved_tensors
        g2, u2, dy2 = _rows(gate), _rows(up), _rows(dy)
        n, f = g2.shape
        dgate = torch.empty((n, f), dtype=gate.dtype, device=gate.device)
        dup = torch.empty((n, f), dtype=up.dtype, device=up.device)
        if n and f:
            grid, block = _grid(n, f)
            jit_kernel(_silu_mul_bwd_kernel)[grid](
                dy2,
                g2,
                u2,
                dgate,
                dup,
                f,
                dy2.stride(0),
                g2.stride(0),
                u2.stride(0),
                dgate.stride(0),
                dup.stride(0),
                BLOCK=block,
                num_warps=4,
            )
        return dgate.view(gate.shape), dup.view(up.shape)


def silu_and_mul(x: Tensor, up: Tensor | None = None) -> Tensor:
    """``silu(gate) * up`` with the Triton kernel (differentiable).

    Args:
        x: The fused ``[..., 2F]`` gate/up projection output (gate first, as core's ``gate_up_proj``
            lays it out), or the ``[..., F]`` gate when ``up`` is given.
        up: The ``[..., F]`` up projection, or None when ``x`` holds both.

    Returns:
        ``[..., F]`` in the inputs' dtype.

    Raises:
        ValueError: The shapes do not pair up.
        KernelUnavailableError: Triton cannot run on these tensors.
    """
    gate, up = _split(x, up)
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return _SiluMulFunction.apply(gate, up)  # type: ignore[no-any-return]
    return _launch_fwd(gate, up)


class TritonMLP(MLP):
    """Core's :class:`~lmstack.core.model.MLP` with SiLU-and-multiply fused in one Triton kernel."""

    def forward(self, x: Tensor) -> Tensor:
        if self.gate_up_proj is not None:
            return self.down_proj(silu_and_mul(self.gate_up_proj(x)))
        return self.down_proj(silu_and_mul(self.gate_proj(x), self.up_proj(x)))
