"""Rotary position embedding applied to q and k by a Triton kernel, with its torch reference.

Laid out kernel → launcher → module (no autograd function: training rotates with core's
:func:`~lmstack.core.model.apply_rotary`, which autograd differentiates).

Design: the kernel takes the per-token ``cos``/``sin`` tables that core's
:class:`~lmstack.core.model.RotaryEmbedding` computes once per forward for all layers, rather than an
inverse-frequency table. Every scaling kind core supports (linear, dynamic NTK with a length per
request, Llama-3, YaRN with its attention factor) then gives core's result by construction, the
scaling logic lives in one place, and the kernel is a pure memory-bound rotation: it reads q, k and
the two tables once and writes q and k back in place.

The rotation is the "rotate half" convention of the Llama family:
``out[:D/2] = x1 * cos1 - x2 * sin1`` and ``out[D/2:] = x2 * cos2 + x1 * sin2``, computed in float32
and rounded once to the activations' dtype (core rounds after each product and the sum, so float16
results can differ from core's in the last bit).
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from lmstack.core.model import Attention, AttentionBackend, apply_rotary
from lmstack.infer.kernels._triton_utils import check_device, jit_kernel, next_power_of_2, tl

__all__ = ["TritonAttention", "rotary", "rotary_inplace", "rotary_reference"]

logger = logging.getLogger(__name__)

# At most this many heads per program (a [BLOCK_H, D/2] tile per half): all of a token's heads at
# common head counts, so each program reads its cos/sin row once.
_MAX_BLOCK_H = 16


def rotary_reference(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Core's rotation of ``q`` and ``k`` (``[B, T, H, D]``) by ``cos``/``sin`` (``[B, T, D]``), a copy."""
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


def _rotary_kernel(
    x_ptr,
    cos_ptr,
    sin_ptr,
    seq_len,
    n_heads,
    stride_xb,
    stride_xt,
    stride_xh,
    stride_cb,
    stride_ct,
    stride_sb,
    stride_st,
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    token = tl.program_id(0)
    b = (token // seq_len).to(tl.int64)
    t = (token % seq_len).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_HALF)
    col_ok = cols < HALF
    x_ty = x_ptr.dtype.element_ty
    # The tables are cast to the activations' dtype first, as core's apply_rotary does.
    c_row = cos_ptr + b * stride_cb + t * stride_ct
    s_row = sin_ptr + b * stride_sb + t * stride_st
    c1 = tl.load(c_row + cols, mask=col_ok, other=0.0).to(x_ty).to(tl.float32)
    c2 = tl.load(c_row + HALF + cols, mask=col_ok, other=0.0).to(x_ty).to(tl.float32)
    s1 = tl.load(s_row + cols, mask=col_ok, other=0.0).to(x_ty).to(tl.float32)
    s2 = tl.load(s_row + HALF + cols, mask=col_ok, other=0.0).to(x_ty).to(tl.float32)
    ptr = x_ptr + b * stride_xb + t * stride_xt + heads[:, None] * stride_xh + cols[None, :]
    mask = (heads[:, None] < n_heads) & col_ok[None, :]
    x1 = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptr, (x1 * c1[None, :] - x2 * s1[None, :]).to(x_ty), mask=mask)
    tl.store(ptr + HALF, (x2 * c2[None, :] + x1 * s2[None, :]).to(x_ty), mask=mask)


def _check(x: Tensor, cos: Tensor, sin: Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"rotary takes [batch, tokens, heads, head_dim] tensors, got {tuple(x.shape)}.")
    b, t, _, d = x.shape
    if d % 2:
        raise ValueError(f"rotary needs an even head_dim, got {d}.")
    for name, table in (("cos", cos), ("sin", sin)):
        if table.shape != (b, t, d):
            raise ValueError(f"{name} has shape {tuple(table.shape)}, expected {(b, t, d)}.")
        if table.stride(-1) != 1:
            raise ValueError(f"{name} needs a unit stride along head_dim.")
    if x.stride(-1) != 1:
        raise ValueError("rotary needs a unit stride along head_dim (q/k views of a projection are fine).")


def _rotate_(x: Tensor, cos: Tensor, sin: Tensor) -> None:
    b, t, h, d = x.shape
    if b * t == 0 or h == 0:
        return
    half = d // 2
    block_half = next_power_of_2(half)
    block_h = min(next_power_of_2(h), _MAX_BLOCK_H)
    grid = (b * t, -(-h // block_h))
    jit_kernel(_rotary_kernel)[grid](
        x,
        cos,
        sin,
        t,
        h,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        cos.stride(0),
        cos.stride(1),
        sin.stride(0),
        sin.stride(1),
        HALF=half,
        BLOCK_HALF=block_half,
        BLOCK_H=block_h,
        num_warps=max(1, min(4, block_h * block_half // 256)),
    )


def rotary_inplace(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> None:
    """Rotate ``q`` and ``k`` in place by the per-token tables, with the Triton kernel.

    Args:
        q: ``[B, T, Hq, D]`` queries; any strides with a unit stride along ``D`` (views of a fused
            qkv projection's output work, and are rotated where they lie).
        k: ``[B, T, Hkv, D]`` keys, same rules.
        cos: ``[B, T, D]``, as :class:`~lmstack.core.model.RotaryEmbedding` returns for the positions.
        sin: ``[B, T, D]``.

    Raises:
        ValueError: Shapes do not match or a tensor's last dimension is strided.
        KernelUnavailableError: Triton cannot run on these tensors.
    """
    check_device(q, k, cos, sin)
    for x in (q, k):
        _check(x, cos, sin)
    _rotate_(q, cos, sin)
    _rotate_(k, cos, sin)


def rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Out-of-place :func:`rotary_inplace`: rotated copies of ``q`` and ``k``."""
    q, k = q.clone(), k.clone()
    rotary_inplace(q, k, cos, sin)
    return q, k


class TritonAttention(Attention):
    """Core's :class:`~lmstack.core.model.Attention` with rotary applied in place by the Triton kernel.

    q and k are rotated where they lie in the projection's output (no copies). While autograd records
    (training), core's out-of-place rotation runs instead: the kernel has no backward.
    """

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attn: AttentionBackend) -> Tensor:
        b, t, _ = x.shape
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split(self.qkv_proj.sizes, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(b, t, -1, self.head_dim)  # [B, T, Hq, D]
        k = k.view(b, t, -1, self.head_dim)  # [B, T, Hkv, D]
        v = v.view(b, t, -1, self.head_dim)
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)  # differentiable
        else:
            rotary_inplace(q, k, cos, sin)
        out = attn.attend(self.layer_idx, q, k, v, scale=self.scale, window=self.window)
        return self.o_proj(out.reshape(b, t, -1))
