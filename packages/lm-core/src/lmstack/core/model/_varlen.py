"""Variable-length attention over packed samples, as single operators the compiler sees whole.

Two implementations behind :class:`~lmstack.core.PackedAttention`, each one call per layer:

* :func:`varlen_attention` (CPU): a custom operator (``lmstack::varlen_attention``) that runs torch's
  CPU flash-attention kernel over each sample and keeps the log-sum-exp for its backward operator.
  Measured on the 2-core CPU this project targets (fp32, one thread, forward + backward of bins of 512
  tokens, 5-6 samples each), per-sample flash kernels take 6.3 ms (4 heads, D 32) and 19.7 ms (8 heads,
  D 64) against 16.0 ms and 53.2 ms for one masked SDPA over the whole bin, which computes every
  off-diagonal block; FlexAttention has no CPU backward in torch 2.13. As an operator with fixed-shape
  inputs (the boundaries padded to one slot per token), a compiled decoder layer treats it as one node:
  no graph break, and no recompilation when the packing changes.
* :func:`flex_varlen_attention`: FlexAttention with a document-causal block mask built once per
  packed batch (and window); compiled, it skips the blocks that cross a sample boundary. The path for
  GPUs without flash-attn.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any

import torch
from torch import Tensor

__all__ = ["flex_varlen_attention", "padded_cu_seqlens", "varlen_attention"]


def padded_cu_seqlens(cu_seqlens: Tensor, num_tokens: int) -> Tensor:
    """Sample boundaries on the host, padded to ``num_tokens + 1`` entries (the last one repeated).

    Every batch of ``num_tokens`` tokens then hands the operator a tensor of the same shape, so a
    compiled layer does not recompile when the number of samples changes.
    """
    cu = cu_seqlens.to(device="cpu", dtype=torch.int64)
    out = torch.full((num_tokens + 1,), int(cu[-1]), dtype=torch.int64)
    out[: cu.numel()] = cu
    return out


def _bounds(cu_seqlens: Tensor) -> list[tuple[int, int]]:
    """The non-empty ``(start, end)`` spans of padded boundaries."""
    values = cu_seqlens.tolist()
    return [(a, b) for a, b in itertools.pairwise(values) if b > a]


def _window_mask(length: int, window: int, dtype: torch.dtype) -> Tensor:
    """Additive ``[L, L]`` mask: causal, and no further back than ``window - 1`` keys."""
    i = torch.arange(length).unsqueeze(1)
    j = torch.arange(length).unsqueeze(0)
    allowed = (j <= i) & (j > i - window)
    return torch.zeros(length, length, dtype=dtype).masked_fill(~allowed, float("-inf"))


def _span(x: Tensor, start: int, end: int) -> Tensor:
    """Tokens ``start:end`` of ``[N, H, D]`` as the ``[1, H, L, D]`` view the kernels take."""
    return x[start:end].transpose(0, 1).unsqueeze(0)


def _kernel_args(length: int, window: int, dtype: torch.dtype) -> dict[str, Any]:
    if window > 0 and window < length:
        return {"is_causal": False, "attn_mask": _window_mask(length, window, dtype)}
    return {"is_causal": True, "attn_mask": None}


@torch.library.custom_op("lmstack::varlen_attention", mutates_args=(), device_types="cpu")
def _varlen_forward(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, scale: float, window: int
) -> tuple[Tensor, Tensor]:
    out = torch.empty_like(q)
    lse = torch.zeros(q.shape[1], q.shape[0], dtype=torch.float32)
    for start, end in _bounds(cu_seqlens):
        how = _kernel_args(end - start, window, q.dtype)
        o, logsumexp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            _span(q, start, end), _span(k, start, end), _span(v, start, end), 0.0, how["is_causal"],
            attn_mask=how["attn_mask"], scale=scale,
        )  # fmt: skip
        out[start:end] = o[0].transpose(0, 1)
        lse[:, start:end] = logsumexp[0]
    return out, lse


@_varlen_forward.register_fake
def _(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, scale: float, window: int
) -> tuple[Tensor, Tensor]:
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("lmstack::varlen_attention_backward", mutates_args=(), device_types="cpu")
def _varlen_backward(
    grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu_seqlens: Tensor,
    scale: float, window: int,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    for start, end in _bounds(cu_seqlens):
        how = _kernel_args(end - start, window, q.dtype)
        gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            _span(grad, start, end), _span(q, start, end), _span(k, start, end), _span(v, start, end),
            _span(out, start, end), lse[None, :, start:end], 0.0, how["is_causal"],
            attn_mask=how["attn_mask"], scale=scale,
        )  # fmt: skip
        dq[start:end], dk[start:end], dv[start:end] = (
            gq[0].transpose(0, 1),
            gk[0].transpose(0, 1),
            gv[0].transpose(0, 1),
        )
    return dq, dk, dv


@_varlen_backward.register_fake
def _(
    grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu_seqlens: Tensor,
    scale: float, window: int,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    q, k, v, cu_seqlens, scale, window = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.scale, ctx.window = scale, window


def _backward(ctx: Any, grad_out: Tensor, grad_lse: Tensor | None) -> tuple[Tensor | None, ...]:
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = _varlen_backward(grad_out.contiguous(), q, k, v, out, lse, cu_seqlens, ctx.scale, ctx.window)
    return dq, dk, dv, None, None, None


_varlen_forward.register_autograd(_backward, setup_context=_setup_context)


def varlen_attention(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, *, scale: float, window: int | None
) -> Tensor:
    """Causal attention inside each packed sample of flat ``[N, H, D]`` tokens (CPU tensors).

    Args:
        q: ``[N, Hq, D]`` queries.
        k: ``[N, Hkv, D]`` keys (``Hq`` a multiple of ``Hkv``).
        v: ``[N, Hkv, D]`` values.
        cu_seqlens: Host ``int64`` boundaries ``[0, len0, ...]``, possibly padded by repeating the last
            entry (:func:`padded_cu_seqlens`).
        scale: Softmax scale.
        window: Sliding window (a query sees itself and ``window - 1`` keys before it), or None.

    Returns:
        ``[N, Hq, D]``.
    """
    out, _ = _varlen_forward(q, k, v, cu_seqlens, scale, -1 if window is None else window)
    return out


@functools.cache
def _compiled_flex() -> Any:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def document_block_mask(segment_ids: Tensor, window: int | None) -> Any:
    """FlexAttention's block mask for document-causal attention over flat tokens.

    Args:
        segment_ids: ``[N]`` the sample of every token (equal ids: same sample; consecutive runs).
        window: Sliding window, or None.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    n = segment_ids.numel()

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        allowed = (segment_ids[q_idx] == segment_ids[kv_idx]) & (kv_idx <= q_idx)
        if window is not None:
            allowed = allowed & (q_idx - kv_idx < window)
        return allowed

    return create_block_mask(mask_mod, 1, None, n, n, device=segment_ids.device)


def flex_varlen_attention(
    q: Tensor, k: Tensor, v: Tensor, block_mask: Any, *, scale: float, compiled: bool = True
) -> Tensor:
    """Attention of flat ``[N, H, D]`` tokens through FlexAttention with a :func:`document_block_mask`.

    Args:
        q: ``[N, Hq, D]``.
        k: ``[N, Hkv, D]``.
        v: ``[N, Hkv, D]``.
        block_mask: From :func:`document_block_mask`.
        scale: Softmax scale.
        compiled: Run the compiled kernel (False: FlexAttention's eager reference, for tests).
    """
    from torch.nn.attention.flex_attention import flex_attention

    fn = _compiled_flex() if compiled else flex_attention
    qh, kh, vh = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # [1, H, N, D]
    out = fn(qh, kh, vh, block_mask=block_mask, scale=scale, enable_gqa=kh.shape[1] != qh.shape[1])
    return out[0].transpose(0, 1)
