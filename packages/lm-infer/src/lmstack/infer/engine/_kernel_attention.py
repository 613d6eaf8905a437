"""The engine's attention backend over :mod:`lmstack.infer.kernels`: Triton kernels or their torch references.

:class:`~lmstack.infer.engine._paged_attention.PagedAttention` is the CPU engine's float path (it reads
decoding sequences in place through a strided view). This backend is the other one, used when

* the engine runs the Triton kernels (``EngineConfig(kernels="triton")``, the default on CUDA), or
* the KV cache is quantized (``kv_cache_dtype="int8"`` or ``"int4"``), on any device: codes are
  quantized as they are written and dequantized as attention reads them, by the Triton kernels or by
  their torch references on CPU.

Per layer it writes the step's keys and values into their slots (:func:`~lmstack.infer.kernels.write_kv`)
and then attends: :func:`~lmstack.infer.kernels.decode_attention` (split-K) when every sequence of the
step decodes one token, else :func:`~lmstack.infer.kernels.prefill_attention` over the whole flattened
batch (decode rows are one-token chunks to it). Index tensors are built once per step, in the
constructor, with the host-side maxima passed along so that no kernel launch waits on the device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

from lmstack.infer.kernels import (
    PagedKV,
    decode_attention,
    decode_attention_torch,
    prefill_attention,
    prefill_attention_torch,
    write_kv,
    write_kv_torch,
)

__all__ = ["KernelPagedAttention"]


class KernelPagedAttention:
    """Attention backend for one engine step over a :class:`~lmstack.infer.kernels.PagedKV` cache.

    Args:
        cache: Every layer's cache tensors (float, or int8/int4 codes with scales and zero points).
        block_size: Token slots per block.
        slot_mapping: ``[N]`` cache slot of each token of the flattened batch.
        query_lens: Tokens of each sequence in this step (consecutive in the batch).
        context_lens: Each sequence's length after this step.
        block_tables: Each sequence's block table.
        impl: ``"triton"`` (the kernels) or ``"torch"`` (their references, the CPU path).
    """

    def __init__(
        self,
        cache: PagedKV,
        block_size: int,
        slot_mapping: Tensor,
        query_lens: Sequence[int],
        context_lens: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        impl: Literal["triton", "torch"],
    ) -> None:
        device = cache.keys.device
        self.cache = cache
        self.block_size = block_size
        self.impl = impl
        self.slot_mapping = slot_mapping.to(device)
        self.decode_only = all(n == 1 for n in query_lens)
        width = max((len(t) for t in block_tables), default=1) or 1
        tables = torch.zeros((len(block_tables), width), dtype=torch.int32)
        for row, table in enumerate(block_tables):
            if table:
                tables[row, : len(table)] = torch.tensor(table, dtype=torch.int32)
        self.block_tables = tables.to(device)
        self.context_lens = torch.tensor(list(context_lens), dtype=torch.int32, device=device)
        self.max_context_len = max(context_lens, default=1)
        cu = [0]
        for n in query_lens:
            cu.append(cu[-1] + n)
        self.cu_seqlens_q = torch.tensor(cu, dtype=torch.int32, device=device)
        self.max_query_len = max(query_lens, default=1)
        self._layers: dict[int, PagedKV] = {}

    def _layer(self, index: int) -> PagedKV:
        layer = self._layers.get(index)
        if layer is None:
            layer = self._layers[index] = self.cache.layer(index)
        return layer

    def attend(
        self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, *, scale: float, window: int | None = None
    ) -> Tensor:
        """Store this step's ``k``/``v`` (``[1, N, Hkv, D]``), then attend ``q`` (``[1, N, Hq, D]``)."""
        cache = self._layer(layer_idx)
        write: Callable[..., None] = write_kv if self.impl == "triton" else write_kv_torch
        write(cache, k[0], v[0], self.slot_mapping)
        triton = self.impl == "triton"
        if self.decode_only:
            decode = decode_attention if triton else decode_attention_torch
            extra = {"max_context_len": self.max_context_len} if triton else {}
            out = decode(q[0], cache, self.block_tables, self.context_lens,
                         block_size=self.block_size, scale=scale, window=window, **extra)  # fmt: skip
        else:
            prefill = prefill_attention if triton else prefill_attention_torch
            extra = {"max_query_len": self.max_query_len} if triton else {}
            out = prefill(q[0], cache, self.cu_seqlens_q, self.context_lens, self.block_tables,
                          block_size=self.block_size, scale=scale, window=window, **extra)  # fmt: skip
        return out[None]
