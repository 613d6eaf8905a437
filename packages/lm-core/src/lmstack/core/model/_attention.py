"""Attention backends: the seam between the model and whatever holds its keys and values.

Each attention layer computes q, k and v, rotates q and k, and hands ``(layer_idx, q, k, v)`` to
the backend passed to the model's forward. The backend decides everything else: which keys a query
sees (causal, per packed sample, a sliding window) and where keys live (nowhere for dense and packed
attention; in paged KV blocks for lmstack-infer, which implements :class:`AttentionBackend` itself).
"""

from __future__ import annotations

import functools
import itertools
import logging
from typing import Any, Literal, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

from lmstack.core._errors import LMStackError
from lmstack.core.model._varlen import (
    document_block_mask,
    flex_varlen_attention,
    padded_cu_seqlens,
    varlen_attention,
)

__all__ = ["AttentionBackend", "DenseAttention", "PackedAttention", "PackedImpl", "flash_attn_available"]

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


PackedImpl = Literal["auto", "varlen", "flex", "flash", "sdpa"]
"""How :class:`PackedAttention` computes: see its ``impl`` argument."""


class PackedAttention:
    """Many samples packed into one row: attention never crosses a sample boundary.

    Tokens of all rows are taken as one flattened sequence of ``B * T`` tokens, split into samples by
    ``cu_seqlens`` (cumulative lengths: ``[0, len0, len0 + len1, ..., B * T]``). Positions are expected
    to restart at 0 for each sample (see :meth:`from_positions`).

    Every implementation but the reference makes one call per layer; ``auto`` picks by device, as
    measured (see :mod:`lmstack.core.model._varlen`): flash-attn's varlen kernel for fp16/bf16 on CUDA
    when it is installed, FlexAttention with a document-causal block mask elsewhere on CUDA, and on CPU
    a custom operator over torch's CPU flash kernels (FlexAttention has no CPU backward).

    Args:
        cu_seqlens: 1-D integer tensor of cumulative sample lengths, starting at 0.
        max_seqlen: Length of the longest sample (computed when omitted).
        use_flash: Force (True) or forbid (False) flash-attn; None picks automatically. Kept for
            compatibility: ``impl`` says more.
        impl: ``auto``; ``varlen`` (CPU tensors only); ``flex`` (FlexAttention, compiled; CPU has
            its forward only); ``flash`` (flash-attn, CUDA fp16/bf16); ``sdpa`` (the reference: one
            causal SDPA per sample, any device).
        host_cu_seqlens: The same boundaries in host memory, when ``cu_seqlens`` is on an accelerator:
            the CPU paths and the checks read them instead of synchronising with the device. Without
            them, boundaries on an accelerator are not checked (that would need a sync).
    """

    def __init__(
        self,
        cu_seqlens: Tensor,
        max_seqlen: int | None = None,
        use_flash: bool | None = None,
        *,
        impl: PackedImpl = "auto",
        host_cu_seqlens: Tensor | None = None,
    ) -> None:
        if impl not in ("auto", "varlen", "flex", "flash", "sdpa"):
            raise LMStackError(
                f"unknown PackedAttention impl {impl!r}; use auto, varlen, flex, flash or sdpa."
            )
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise LMStackError(
                "cu_seqlens must be a 1-D tensor [0, len0, len0+len1, ...] with at least one sample."
            )
        host = host_cu_seqlens if host_cu_seqlens is not None else None
        if host is None and cu_seqlens.device.type == "cpu":
            host = cu_seqlens
        self._host: Tensor | None = None
        self._bounds: list[int] | None = None
        if host is not None:
            self._host = host.to(torch.int64)
            self._check(self._host)
        self.cu_seqlens = cu_seqlens.to(torch.int32)
        if max_seqlen is None and self._host is not None:
            max_seqlen = int((self._host[1:] - self._host[:-1]).max())
        self._max_seqlen = max_seqlen
        if use_flash is not None and impl == "auto":
            impl = "flash" if use_flash else "auto"
        self.use_flash = use_flash
        self.impl: PackedImpl = impl
        # Everything a compiled layer reads is settled here, outside the traced region: host values
        # read inside it would break the graph (or, as guards, recompile it for every packing).
        self._total: int | None = None
        self._padded_host: Tensor | None = None
        if self._host is not None:
            self._total = int(self._host[-1])
            self._padded_host = padded_cu_seqlens(self._host, self._total)
        self._flash_ok = cu_seqlens.is_cuda and flash_attn_available()
        self._block_masks: dict[int | None, Any] = {}

    @staticmethod
    def _check(host: Tensor) -> None:
        lengths = host[1:] - host[:-1]
        if int(host[0]) != 0:
            raise LMStackError("cu_seqlens must be a 1-D tensor [0, len0, len0+len1, ...] starting at 0.")
        if bool((lengths <= 0).any()):
            raise LMStackError(
                "cu_seqlens must be strictly increasing (every sample needs at least one token)."
            )

    @property
    def max_seqlen(self) -> int:
        """The longest sample (read from the device once when neither it nor host boundaries were given)."""
        if self._max_seqlen is None:
            self._max_seqlen = int((self.cu_seqlens[1:] - self.cu_seqlens[:-1]).max())
        return self._max_seqlen

    def host_bounds(self) -> list[int]:
        """The boundaries as Python ints (a device sync when only device boundaries were given)."""
        if self._bounds is None:
            if self._host is None:
                self._host = self.cu_seqlens.to("cpu", torch.int64)
                self._check(self._host)
            self._bounds = [int(x) for x in self._host.tolist()]
        return self._bounds

    @classmethod
    def from_positions(
        cls, positions: Tensor, use_flash: bool | None = None, *, impl: PackedImpl = "auto"
    ) -> PackedAttention:
        """Derive sample boundaries from positions that restart at 0 for every sample.

        Args:
            positions: ``[B, T]`` or ``[N]`` positions; a new sample starts wherever a position is 0
                and at every row start.
            use_flash: See the class arguments.
            impl: See the class arguments.
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
        return cls(cu, use_flash=use_flash, impl=impl)

    def resolve(self, q: Tensor) -> PackedImpl:
        """The implementation ``auto`` stands for with these queries (others are returned as they are)."""
        if self.impl != "auto":
            return self.impl
        if q.is_cuda:
            if q.dtype in (torch.float16, torch.bfloat16) and self._flash_ok:
                return "flash"
            return "flex"
        return "varlen" if q.device.type == "cpu" else "sdpa"

    def _flash(self, q: Tensor, k: Tensor, v: Tensor, scale: float, window: int | None) -> Tensor:
        from flash_attn import flash_attn_varlen_func

        cu = self.cu_seqlens.to(q.device)
        window_size = (-1, -1) if window is None else (window - 1, 0)
        return flash_attn_varlen_func(
            q, k, v, cu, cu, self.max_seqlen, self.max_seqlen, softmax_scale=scale, causal=True,
            window_size=window_size,
        )  # fmt: skip

    def _varlen(self, q: Tensor, k: Tensor, v: Tensor, scale: float, window: int | None) -> Tensor:
        if q.device.type != "cpu":
            raise LMStackError(f"PackedAttention impl='varlen' runs on CPU tensors; these are on {q.device}.")
        if self._padded_host is None:
            self._padded_host = padded_cu_seqlens(torch.tensor(self.host_bounds()), q.shape[0])
        return varlen_attention(q, k, v, self._padded_host, scale=scale, window=window)

    def block_mask(self, window: int | None, device: torch.device) -> Any:
        """FlexAttention's document-causal block mask for ``window``: built once, shared by every layer."""
        # Built outside any compiled region (a graph break there, not host work traced into it). The
        # decorator is applied here, not at import: torch.compiler imports dynamo, which imports
        # triton, and lmstack-infer's CPU tests must set TRITON_INTERPRET before anything does.
        return torch.compiler.disable(self._build_block_mask)(window, device)

    def _build_block_mask(self, window: int | None, device: torch.device) -> Any:
        if window not in self._block_masks:
            cu = self.cu_seqlens.to(device)
            positions = torch.arange(int(self._total or cu[-1]), device=device, dtype=cu.dtype)
            segment_ids = torch.searchsorted(cu[1:].contiguous(), positions, right=True)
            self._block_masks[window] = document_block_mask(segment_ids, window)
        return self._block_masks[window]

    def _flex(self, q: Tensor, k: Tensor, v: Tensor, scale: float, window: int | None) -> Tensor:
        # Compiled FlexAttention lowers to a CPU kernel too, but without a backward there.
        compiled = q.is_cuda or not torch.is_grad_enabled()
        mask = self.block_mask(window, q.device)
        return flex_varlen_attention(q, k, v, mask, scale=scale, compiled=compiled)

    def _reference(self, q: Tensor, k: Tensor, v: Tensor, scale: float, window: int | None) -> Tensor:
        bounds = self.host_bounds()
        pieces = []
        for start, end in itertools.pairwise(bounds):
            length = end - start
            mask = None if window is None or window >= length else _causal_mask(length, window, q.device)
            pieces.append(
                _sdpa(
                    q[None, start:end],
                    k[None, start:end],
                    v[None, start:end],
                    scale=scale,
                    mask=mask,
                    causal=True,
                )
            )
        return torch.cat(pieces, dim=1)[0]

    def supports_rows(self) -> bool:
        """Whether :meth:`attend_rows` runs here: boundaries on the CPU (a training batch there)."""
        return self.cu_seqlens.device.type == "cpu"

    def attend_rows(
        self,
        layer_idx: int,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        rows: Tensor,
        *,
        scale: float,
        window: int | None,
    ) -> Tensor:
        """Attention of the queries at the flat token indices ``rows`` only, over their samples' keys.

        What :meth:`lmstack.core.CausalLM.forward` uses for its last layer when only some tokens'
        logits are wanted (the loss positions of a fine-tuning batch): the other tokens' queries,
        output projection and feed-forward are never computed.

        Args:
            layer_idx: Index of the calling decoder layer.
            q: ``[N, Hq, D]`` rotated queries of the ``N`` rows.
            k: ``[B, T, Hkv, D]`` rotated keys of every token.
            v: ``[B, T, Hkv, D]`` values of every token.
            rows: ``[N]`` ascending flat indices into the ``B * T`` tokens.
            scale: Softmax scale.
            window: Sliding window, or None.

        Returns:
            ``[N, Hq, D]``.
        """
        n = k.shape[0] * k.shape[1]
        kf, vf = k.reshape(n, *k.shape[2:]), v.reshape(n, *v.shape[2:])
        bounds = self.host_bounds()
        if bounds[-1] != n:
            raise LMStackError(f"cu_seqlens covers {bounds[-1]} tokens but the batch holds {n}.")
        host_rows = rows.to("cpu")
        if host_rows.numel() > 1 and bool((host_rows[1:] <= host_rows[:-1]).any()):
            raise LMStackError("attend_rows needs strictly ascending row indices.")
        # Rows of each sample: a contiguous run, since rows ascend.
        edges = torch.searchsorted(host_rows, torch.tensor(bounds)).tolist()
        pieces = []
        for sample, (lo, hi) in enumerate(itertools.pairwise(edges)):
            if hi == lo:
                continue
            start = bounds[sample]
            local = host_rows[lo:hi] - start  # query positions inside the sample
            keys = int(local[-1]) + 1  # no query of this sample sees past its last row
            j = torch.arange(keys)
            allowed = j[None, :] <= local[:, None]
            if window is not None:
                allowed &= j[None, :] > local[:, None] - window
            pieces.append(
                _sdpa(
                    q[None, lo:hi], kf[None, start : start + keys], vf[None, start : start + keys],
                    scale=scale, mask=allowed.to(q.device), causal=False,
                )[0]
            )  # fmt: skip
        return torch.cat(pieces, dim=0) if pieces else q.new_zeros(q.shape)

    def attend(
        self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, *, scale: float, window: int | None
    ) -> Tensor:
        """See :meth:`AttentionBackend.attend`."""
        shape = q.shape
        n = shape[0] * shape[1]
        if self._total is not None and self._total != n:
            raise LMStackError(f"cu_seqlens covers {self._total} tokens but the batch holds {n}.")
        qf, kf, vf = q.reshape(n, *q.shape[2:]), k.reshape(n, *k.shape[2:]), v.reshape(n, *v.shape[2:])
        impl = self.resolve(q)
        if impl == "flash":
            out = self._flash(qf, kf, vf, scale, window)
        elif impl == "varlen":
            out = self._varlen(qf, kf, vf, scale, window)
        elif impl == "flex":
            out = self._flex(qf, kf, vf, scale, window)
        else:
            out = self._reference(qf, kf, vf, scale, window)
        return out.reshape(shape)
