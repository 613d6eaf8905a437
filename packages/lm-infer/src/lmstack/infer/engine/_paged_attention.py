"""The paged KV cache and the attention backend that reads and writes it (torch implementation).

The cache holds, per layer, ``num_blocks`` blocks of ``block_size`` token slots for keys and values.
A sequence owns a list of blocks (its block table); token ``p`` of a sequence lives in slot
``block_table[p // block_size] * block_size + p % block_size``.

One engine step runs one forward over a flattened batch: decode tokens of many sequences and
prefill chunks of others, all in a single row. :class:`PagedAttention` is the lmstack-core attention
backend for that step: for every layer it writes the new keys and values into their slots, then
attends each query over its own sequence's cached keys. The per-step index tensors are built once in
the constructor, so the per-layer work is a scatter, two gathers and SDPA calls, with no Python loop
over sequences. Sequences are split into single-token queries (decode) and multi-token chunks
(prefill), each padded only to its own group's longest query, so one long prefill chunk does not pad
hundreds of decode queries; within each, a few buckets of similar context length bound the padding
of keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lmstack.core import ModelConfig

__all__ = ["KVCache", "PagedAttention", "kv_bytes_per_block"]


def kv_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes across all layers (keys and values)."""
    assert config.num_key_value_heads is not None and config.head_dim is not None
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
    return per_token * block_size * torch.empty((), dtype=dtype).element_size()


class KVCache:
    """Key and value storage for every layer: ``[layers, num_blocks * block_size, kv_heads, head_dim]``.

    Args:
        config: The model's configuration (layers, kv heads, head dim).
        num_blocks: Number of blocks.
        block_size: Token slots per block.
        dtype: Storage dtype.
        device: Storage device.
    """

    def __init__(
        self, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        assert config.num_key_value_heads is not None and config.head_dim is not None
        shape = (
            config.num_hidden_layers,
            num_blocks * block_size,
            config.num_key_value_heads,
            config.head_dim,
        )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def nbytes(self) -> int:
        """Memory held by the cache."""
        return 2 * self.keys.numel() * self.keys.element_size()


@dataclass
class _Group:
    """Index tensors for one group of sequences (decode or prefill), padded to its longest query."""

    token_index: Tensor  # [S * Q] flat token index of each (sequence, query) pair; 0 where padded
    key_blocks: Tensor  # [S * B] the blocks holding each sequence's keys, in order (0 where unused)
    mask: Tensor  # [S, 1, Q, K] bool: query may attend key (K = B * block_size)
    out_rows: Tensor  # positions in [S * Q] of the real queries
    out_tokens: Tensor  # their flat token indices
    shape: tuple[int, int, int]  # (S, Q, B)


class PagedAttention:
    """Attention backend over a paged KV cache for one engine step.

    Args:
        cache: The KV cache.
        slot_mapping: ``[N]`` cache slot of each token in the flattened batch.
        query_lens: Tokens of each sequence in this step (they are consecutive in the batch).
        context_lens: Each sequence's length after this step (cached tokens plus this step's).
        block_tables: Each sequence's block table.
        window_sizes: Sliding windows used by the model's layers (None for full attention); masks are
            precomputed for each distinct window.
    """

    def __init__(
        self,
        cache: KVCache,
        slot_mapping: Tensor,
        query_lens: Sequence[int],
        context_lens: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        window_sizes: Sequence[int | None] = (None,),
    ) -> None:
        self.cache = cache
        device = cache.keys.device
        self.slot_mapping = slot_mapping.to(device)
        self.num_tokens = int(sum(query_lens))
        starts = [0]
        for n in query_lens:
            starts.append(starts[-1] + n)
        decode = [i for i, n in enumerate(query_lens) if n == 1]
        prefill = [i for i, n in enumerate(query_lens) if n > 1]
        windows = sorted(set(window_sizes), key=lambda w: -1 if w is None else w)
        self._groups: dict[int | None, list[_Group]] = {w: [] for w in windows}
        for kind in (decode, prefill):
            for members in _buckets(kind, context_lens):
                for w in windows:
                    self._groups[w].append(
                        self._build(members, starts, query_lens, context_lens, block_tables, w, device)
                    )

    def _build(
        self,
        members: list[int],
        starts: list[int],
        query_lens: Sequence[int],
        context_lens: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        window: int | None,
        device: torch.device,
    ) -> _Group:
        bs = self.cache.block_size
        q_lens = torch.tensor([query_lens[i] for i in members], dtype=torch.long)
        ctx = torch.tensor([context_lens[i] for i in members], dtype=torch.long)
        q_max = int(q_lens.max())
        n_blocks = -(-int(ctx.max()) // bs)
        k_max = n_blocks * bs
        tables = torch.zeros(len(members), n_blocks, dtype=torch.long)
        for row, i in enumerate(members):
            used = block_tables[i][: -(-context_lens[i] // bs)]
            tables[row, : len(used)] = torch.tensor(used, dtype=torch.long)
        q_pos = torch.arange(q_max)
        valid = q_pos[None, :] < q_lens[:, None]  # [S, Q]
        first = torch.tensor([starts[i] for i in members], dtype=torch.long)
        token_index = torch.where(valid, first[:, None] + q_pos[None, :], torch.zeros((), dtype=torch.long))
        # Absolute position of each query: the chunk is the tail of the sequence's context.
        abs_q = (ctx - q_lens)[:, None] + q_pos[None, :]  # [S, Q]
        k_pos = torch.arange(k_max)
        mask = (k_pos[None, None, :] <= abs_q[:, :, None]) & (k_pos[None, None, :] < ctx[:, None, None])
        if window is not None:
            mask &= k_pos[None, None, :] > abs_q[:, :, None] - window
        # Padded queries attend to key 0 only, so their (discarded) softmax stays finite.
        mask |= (~valid)[:, :, None] & (k_pos[None, None, :] == 0)
        flat_valid = valid.reshape(-1)
        return _Group(
            token_index=token_index.reshape(-1).to(device),
            key_blocks=tables.reshape(-1).to(device),
            mask=mask[:, None].to(device),
            out_rows=torch.nonzero(flat_valid).flatten().to(device),
            out_tokens=token_index.reshape(-1)[flat_valid].to(device),
            shape=(len(members), q_max, n_blocks),
        )

    def attend(
        self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, *, scale: float, window: int | None
    ) -> Tensor:
        """Write this step's keys and values into the cache, then attend. See lmstack.core's protocol."""
        shape = q.shape
        qf = q.reshape(-1, *q.shape[2:])  # [N, Hq, D]
        kf, vf = k.reshape(-1, *k.shape[2:]), v.reshape(-1, *v.shape[2:])
        if qf.shape[0] != self.num_tokens:
            raise ValueError(f"the step was planned for {self.num_tokens} tokens but got {qf.shape[0]}.")
        keys, values = self.cache.keys[layer_idx], self.cache.values[layer_idx]
        keys.index_copy_(0, self.slot_mapping, kf.to(keys.dtype))
        values.index_copy_(0, self.slot_mapping, vf.to(values.dtype))
        out = torch.empty_like(qf)
        hq, hkv, d = qf.shape[1], keys.shape[1], qf.shape[2]
        bs = self.cache.block_size
        key_blocks, value_blocks = keys.view(-1, bs, hkv, d), values.view(-1, bs, hkv, d)
        for group in self._groups[window]:
            s, q_max, n_blocks = group.shape
            # Whole blocks are gathered (large contiguous copies), with index_select on flat indices:
            # both several times faster on CPU than gathering token slots with advanced indexing.
            qg = qf.index_select(0, group.token_index).view(s, q_max, hq, d)
            kg = key_blocks.index_select(0, group.key_blocks).view(s, n_blocks * bs, hkv, d).to(qf.dtype)
            vg = value_blocks.index_select(0, group.key_blocks).view(s, n_blocks * bs, hkv, d).to(qf.dtype)
            o = F.scaled_dot_product_attention(
                qg.transpose(1, 2),
                kg.transpose(1, 2),
                vg.transpose(1, 2),
                attn_mask=group.mask,
                scale=scale,
                enable_gqa=hkv != hq,
            ).transpose(1, 2)  # [S, Q, Hq, D]
            rows = o.reshape(s * q_max, hq, d).index_select(0, group.out_rows)
            out.index_copy_(0, group.out_tokens, rows)
        return out.reshape(shape)


def _buckets(members: list[int], context_lens: Sequence[int], max_buckets: int = 6) -> list[list[int]]:
    """Split sequences into a few groups of similar context length.

    Each group is padded to its longest context, so mixing a 30-token and a 700-token sequence would
    make the short one cost as much as the long one. Starting from the longest, a bucket takes
    sequences down to 2/3 of its longest; the last bucket takes whatever is left.
    """
    order = sorted(members, key=lambda i: -context_lens[i])
    buckets: list[list[int]] = []
    for i in order:
        if buckets and (
            len(buckets) == max_buckets or 3 * context_lens[i] >= 2 * context_lens[buckets[-1][0]]
        ):
            buckets[-1].append(i)
        else:
            buckets.append([i])
    return buckets
