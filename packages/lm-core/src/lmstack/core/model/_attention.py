"""Attention backends: the seam between the model and whatever holds its keys and values.

Each attention layer computes q, k and v, rotates q and k, and hands ``(layer_idx, q, k, v)`` to
the backend passed to the model's forward. The backend decides everything else: which keys a query
sees (causal, per packed sample, a sliding window) and where keys live (nowhere for dense and packed
attention; in paged KV blocks for lmstack-infer, which implements :class:`AttentionBackend` itself).
"""

from __future__ import annotations

import functools
import logging
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

from lmstack.core._errors import LMStackError

__all__ = ["AttentionBackend", "DenseAttention", "PackedAttention", "flash_attn_available"]

logger = logging.getLogger(__name__)


@runtime_checkable
class AttentionBackend(Protocol):
    """What an attention layer calls to attend; implement it to add a backend.

    Shapes: ``q`` is ``[B, T, Hq, D]``; ``k`` and ``v`` are ``[B, T, Hkv, D]`` with ``Hq`` a
    multiple of ``Hkv`` (grouped-query attention). The result is ``[B, T, Hq, D]``.
    A paged-cache backend would store ``k``/``v`` for ``layer_idx`` and attend over its blocks.
    """

    def attend(
        self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, *, scale: float, window: int | None
    ) -> Tensor:
        """Return the attention output for the tokens of this call.

        Args:
            layer_idx: Index of the calling decoder layer.
            q: Rotated queries ``[B, T, Hq, D]``.
            k: Rotated keys ``[B, T, Hkv, D]``.
            v: Values ``[B, T, Hkv, D]``.
            scale: Softmax scale (``D ** -0.5`` for this family).
            window: Sliding-window size of this layer (a query sees itself and the ``window - 1``
                keys before it), or None for full causal attention.
        """
        ...


def _sdpa(q: Tensor, k: Tensor, v: Tensor, *, scale: float, mask: Tensor | None, causal: bool) -> Tensor:
    """SDPA on ``[B, T, H, D]`` tensors, grouped-query aware, returning ``[B, T, Hq, D]``."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    out = F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=mask,
        is_causal=causal and mask is None,
        scale=scale,
        enable_gqa=k.shape[1] != q.shape[1],
    )
    return out.transpose(1, 2)


def _causal_mask(t: int, window: int | None, device: torch.device) -> Tensor:
    """``[T, T]`` boolean mask: True where query i may see key j."""
    i = torch.arange(t, device=device).unsqueeze(1)
    j = torch.arange(t, device=device).unsqueeze(0)
    allowed = j <= i
    if window is not None:
        allowed &= j > i - window
    return allowed


class DenseAttention:
    """Causal attention over a padded batch, with no cache (tests, scoring, simple generation).

    Args:
        padding_mask: Optional ``[B, T]`` mask, 1/True for real tokens and 0/False for padding
            (left or right). Padded keys are never attended to; outputs at padded query positions
            are defined but meaningless.
    """

    def __init__(self, padding_mask: Tensor | None = None) -> None:
        self.padding_mask = padding_mask.bool() if padding_mask is not None else None

    def attend(
        self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, *, scale: float, window: int | None
    ) -> Tensor:
        """See :meth:`AttentionBackend.attend`."""
        b, t = q.shape[:2]
        if self.padding_mask is None and (window is None or window >= t):
            return _sdpa(q, k, v, scale=scale, mask=None, causal=True)
        mask = _causal_mask(t, window, q.device).expand(b, 1, t, t)
        if self.padding_mask is not None:
            if self.padding_mask.shape != (b, t):
                raise LMStackError(
                    f"padding_mask has shape {tuple(self.padding_mask.shape)} but the batch is {(b, t)}."
                )
            keys = self.padding_mask[:, None, None, :]
            # A padded query would see no key at all (NaN softmax); let it see itself instead.
            eye = torch.eye(t, dtype=torch.bool, device=q.device)
            mask = (mask & keys) | eye
        return _sdpa(q, k, v, scale=scale, mask=mask, causal=False)


@functools.cache
def flash_attn_available() -> bool:
    """Whether flash-attn's varlen kernel can be imported (an optional extra: ``lmstack-core[flash]``)."""
    try:
        import flash_attn  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA build raising something else
        return False
    return True


class PackedAttention:
    """Many samples packed into one row: attention never crosses a sample boundary.

    Tokens of all rows are taken as one flattened sequence of ``B * T`` tokens, split into samples by
    ``cu_seqlens`` (cumulative lengths: ``[0, len0, len0 + len1, ..., B * T]``). Positions are expected
    to restart at 0 for each sample (see :meth:`from_positions`).

    Uses flash-attn's varlen kernel when it is installed and the tensors are fp16/bf16 on CUDA,
    and an exact torch path (causal SDPA per sample) otherwise.

    Args:
        cu_seqlens: 1-D integer tensor of cumulative sample lengths, starting at 0.
        max_seqlen: Length of the longest sample (computed when omitted).
        use_flash: Force (True) or forbid (False) flash-attn; None picks automatically.
    """

    def __init__(
        self, cu_seqlens: Tensor, max_seqlen: int | None = None, use_flash: bool | None = None
    ) -> None:
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or int(cu_seqlens[0]) != 0:
            raise LMStackError(
                "cu_seqlens must be a 1-D tensor [0, len0, len0+len1, ...] with at least one sample."
            )
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        if bool((lengths <= 0).any()):
            raise LMStackError(
                "cu_seqlens must be strictly increasing (every sample needs at least one token)."
            )
        self.cu_seqlens = cu_seqlens.to(torch.int32)
        self.max_seqlen = int(lengths.max()) if max_seqlen is None else max_seqlen
        # Host copy of the boundaries for the torch path: one sync here instead of one per layer.
        self._bounds = [int(x) for x in cu_seqlens.tolist()]
        self.use_flash = use_flash

    @classmethod
    def from_positions(cls, positions: Tensor, use_flash: bool | None = None) -> PackedAttention:
        """Derive sample boundaries from positions that restart at 0 for every sample.

        Args:
            positions: ``[B, T]`` or ``[N]`` positions; a new sample starts wherever a position is 0
                and at every row start.
            use_flash: See the class arguments.
        """
        flat = positions.reshape(-1)
        starts = flat == 0
        if positions.dim() == 2:
            starts = starts.reshape(positions.shape).clone()
            starts[:, 0] = True
            starts = starts.reshape(-1)
        else:
            starts = starts.clone()
            starts[0] = True
        idx = torch.nonzero(starts).flatten()
        cu = torch.cat([idx, torch.tensor([flat.numel()], device=flat.device)])
        return cls(cu, use_flash=use_flash)

    def _flash(self, q: Tensor, k: Tensor, v: Tensor, scale: float, window: int | None) -> Tensor:
        from flash_attn import flash_attn_varlen_func

        cu = self.cu_seqlens.to(q.device)
        window_size = (-1, -1) if window is None else (window - 1, 0)
        return flash_attn_varlen_func(
            q, k, v, cu, cu, self.max_seqlen, self.max_seqlen, softmax_scale=scale, causal=True,
            window_size=window_size,
        )  # fmt: skip

    def attend(
        self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, *, scale: float, window: int | None
    ) -> Tensor:
        """See :meth:`AttentionBackend.attend`."""
        shape = q.shape
        n = shape[0] * shape[1]
        if self._bounds[-1] != n:
            raise LMStackError(f"cu_seqlens covers {self._bounds[-1]} tokens but the batch holds {n}.")
        qf, kf, vf = q.reshape(n, *q.shape[2:]), k.reshape(n, *k.shape[2:]), v.reshape(n, *v.shape[2:])
        flash = self.use_flash
        if flash is None:
            flash = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and flash_attn_available()
        if flash:
            return self._flash(qf, kf, vf, scale, window).reshape(shape)
        pieces = []
        for start, end in zip(self._bounds[:-1], self._bounds[1:], strict=True):
            length = end - start
            mask = None if window is None or window >= length else _causal_mask(length, window, q.device)
            pieces.append(
                _sdpa(
                    qf[None, start:end],
                    kf[None, start:end],
                    vf[None, start:end],
                    scale=scale,
                    mask=mask,
                    causal=True,
                )
            )
        return torch.cat(pieces, dim=1).reshape(shape)
