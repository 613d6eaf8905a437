"""The paged KV cache and the attention backend that reads and writes it (the CPU kernel, or torch).

The cache holds, per layer, ``num_blocks`` blocks of ``block_size`` token slots for keys and values.
A sequence owns a list of blocks (its block table); token ``p`` of a sequence lives in slot
``block_table[p // block_size] * block_size + p % block_size``.

One engine step runs one forward over a flattened batch: decode tokens of many sequences and
prefill chunks of others, all in a single row. :class:`PagedAttention` is the lmstack-core attention
backend for that step: for every layer it writes the new keys and values into their slots, then
attends each query over its own sequence's cached keys. The per-step index tensors are built once in
the constructor, so the per-layer work is a scatter and one kernel call (or a few SDPA calls), with
no Python loop over sequences.

**The CPU kernel (float32 cache).** Where lmstack-core's CPU kernels build, every query row (decode
tokens and prefill chunks alike) is read in place by :func:`lmstack.core.model.cpu_kernels.paged_attention`,
which follows each sequence's block table itself: nothing is gathered or padded, whatever the tables'
layout. Measured on the 2-core CPU (8 heads / 4 KV heads of 64, one layer, block size 16), against the
torch paths below: 64 decoding sequences of 100-700 tokens on scattered blocks 2.0-3.3 ms against
19.8-21.8; a prefill of 512 tokens 6.2-8.5 ms against 8.3 (the lmstack-infer README has the table).

**Torch (other dtypes and devices, or no kernels).** Two ways to read the keys, chosen per sequence:

* **Zero-copy (decode).** When a decoding sequence's blocks are consecutive (the block manager lays
  sequences out in fixed-size regions for this), its keys are one run of slots. The runs of a batch
  start at multiples of a common stride, so one ``as_strided`` view of the cache is a
  ``[rows, kv_heads, keys, head_dim]`` tensor SDPA reads in place; rows of the view that belong to
  no scheduled sequence (idle regions between them) get a zero query and are dropped. Measured on
  the 2-core CPU (decode, batch 1-32, 128-1,024 tokens) this takes 1.1-2.5x less CPU time per
  layer than gathering, and 6x at batch 32 x 1,024 tokens on the 56M model, where gathering copies
  64 MiB a layer. torch's FlexAttention was measured too: a minute to compile for each new shape on
  CPU and slower per call, so not used.
* **Gathering (prefill chunks, fragmented or prefix-shared tables).** Whole blocks are gathered
  into a padded batch. Decode queries and prefill chunks are padded only to their own group's
  longest query, and a few buckets of similar context length bound the padding of keys.

Both fold grouped-query heads into query rows (``[S, kv_heads, group * Q, D]``) instead of SDPA's
``enable_gqa``: on CPU that was measured several times slower on the strided view, and no faster on
gathered keys.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lmstack.core import ModelConfig
from lmstack.core.model import cpu_kernels

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
        # Each layer's views, made once: indexing the cache anew costs ~1 us a call, twice per layer.
        self.layer_keys, self.layer_values = self.keys.unbind(0), self.values.unbind(0)

    @property
    def nbytes(self) -> int:
        """Memory held by the cache."""
        return 2 * self.keys.numel() * self.keys.element_size()


@dataclass
class _Group:
    """Index tensors for one gathered group of sequences (decode or prefill), padded to its longest query."""

    token_index: Tensor  # [S * Q] flat token index of each (sequence, query) pair; 0 where padded
    key_blocks: Tensor  # [S * B] the blocks holding each sequence's keys, in order (0 where unused)
    mask: Tensor  # [S, 1, Q, K] bool: query may attend key (K = B * block_size)
    out_rows: Tensor  # positions in [S * Q] of the real queries
    out_tokens: Tensor  # their flat token indices
    shape: tuple[int, int, int]  # (S, Q, B)
    folded: dict[int, Tensor]  # per GQA group size: the mask repeated for its rows, made on first use


@dataclass
class _Strided:
    """A zero-copy group of decoding sequences: their keys are rows of one strided view of the cache."""

    first_slot: int  # cache slot where row 0's keys start
    stride: int  # slots between the starts of consecutive rows
    rows: int  # rows of the view (scheduled sequences plus idle rows between them)
    num_keys: int  # keys per row (the group's longest context)
    row_of: Tensor  # [M] row of each member
    token_index: Tensor  # [M] flat token index of each member's query
    mask: Tensor  # [rows, 1, 1, num_keys] bool
    dense: bool  # rows == members, in order: no scatter needed


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
        use_kernel: Read the cache with lmstack-core's CPU kernel (float32 cache on the CPU only); None:
            wherever it applies and the kernels build here. False keeps the torch path (tests compare them).

    Attributes:
        num_zero_copy: How many of the step's sequences are read in place (all with the kernel; with
            torch, those decoding on consecutive blocks); the others are gathered.

    Raises:
        ValueError: ``use_kernel=True`` for a cache the kernel cannot read.
        ConfigError: With the kernel, a block table shorter than its sequence (``PagedRows.build``
            checks every row against its table).
    """

    def __init__(
        self,
        cache: KVCache,
        slot_mapping: Tensor,
        query_lens: Sequence[int],
        context_lens: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        window_sizes: Sequence[int | None] = (None,),
        *,
        use_kernel: bool | None = None,
    ) -> None:
        self.cache = cache
        device = cache.keys.device
        self.slot_mapping = slot_mapping.to(device)
        self.num_tokens = int(sum(query_lens))
        windows = sorted(set(window_sizes), key=lambda w: -1 if w is None else w)
        readable = device.type == "cpu" and cache.keys.dtype == torch.float32
        if use_kernel is None:
            use_kernel = readable and cpu_kernels.available()
        elif use_kernel and not readable:
            raise ValueError("the CPU attention kernel reads a float32 cache on the CPU only.")
        self._kernel_rows: dict[int | None, cpu_kernels.PagedRows] | None = None
        self._torch_args = (query_lens, context_lens, block_tables, windows)
        self._groups: dict[int | None, list[_Group]] | None = None
        self._strided: dict[int | None, list[_Strided]] = {}
        if use_kernel:
            self._kernel_rows = _kernel_rows(query_lens, context_lens, block_tables, windows, cache)
            # Every sequence is read in place.
            self.num_zero_copy = len(query_lens)
        else:
            self._plan_torch()
            self.num_zero_copy = sum(int(p.row_of.numel()) for p in self._strided[windows[0]])

    def _plan_torch(self) -> None:
        """The torch path's index tensors (see the module's docstring)."""
        query_lens, context_lens, block_tables, windows = self._torch_args
        cache, device = self.cache, self.cache.keys.device
        starts = [0]
        for n in query_lens:
            starts.append(starts[-1] + n)
        bs = cache.block_size
        decode: list[int] = []
        runs: dict[int, int] = {}  # decoding sequence -> first slot of its consecutive blocks
        prefill: list[int] = []
        for i, n in enumerate(query_lens):
            if n != 1:
                prefill.append(i)
                continue
            used = list(block_tables[i][: -(-context_lens[i] // bs)])
            if used and used == list(range(used[0], used[0] + len(used))):
                runs[i] = used[0] * bs
            else:
                decode.append(i)
        self._groups = {w: [] for w in windows}
        self._strided = {w: [] for w in windows}
        total_slots = cache.num_blocks * bs
        for members in _buckets(list(runs), context_lens):
            plans = [
                self._plan_strided(members, runs, starts, context_lens, w, total_slots, device)
                for w in windows
            ]
            if plans[0] is None:
                decode.extend(members)  # too sparse a view: gather them instead
                continue
            for w, plan in zip(windows, plans, strict=True):
                assert plan is not None
                self._strided[w].append(plan)
        for kind in (sorted(decode), prefill):
            for members in _buckets(kind, context_lens):
                for w in windows:
                    self._groups[w].append(
                        self._build(members, starts, query_lens, context_lens, block_tables, w, device)
                    )

    @staticmethod
    def _plan_strided(
        members: list[int],
        runs: dict[int, int],
        starts: list[int],
        context_lens: Sequence[int],
        window: int | None,
        total_slots: int,
        device: torch.device,
    ) -> _Strided | None:
        """The strided view for decoding sequences with consecutive blocks, or None if too sparse."""
        order = sorted(members, key=lambda i: runs[i])
        first = runs[order[0]]
        stride = 0
        for i in order:
            stride = math.gcd(stride, runs[i] - first)
        stride = stride or 1
        if len({runs[i] for i in order}) != len(order):
            return None  # two sequences on one run cannot be two rows of the view
        rows = (runs[order[-1]] - first) // stride + 1
        num_keys = max(context_lens[i] for i in order)
        # Idle rows cost attention work: allow at most as many as there are members (the block
        # manager's regions keep running sequences packed at the low end of the cache).
        if rows > 2 * len(order) or runs[order[-1]] + num_keys > total_slots:
            return None
        row_of = torch.tensor([(runs[i] - first) // stride for i in order], dtype=torch.long)
        ctx = torch.ones(rows, dtype=torch.long)  # idle rows see key 0 only, so softmax stays finite
        ctx[row_of] = torch.tensor([context_lens[i] for i in order], dtype=torch.long)
        k_pos = torch.arange(num_keys)
        mask = k_pos[None, :] < ctx[:, None]
        if window is not None:
            mask &= k_pos[None, :] > ctx[:, None] - 1 - window
        return _Strided(
            first_slot=first,
            stride=stride,
            rows=rows,
            num_keys=num_keys,
            row_of=row_of.to(device),
            token_index=torch.tensor([starts[i] for i in order], dtype=torch.long, device=device),
            mask=mask[:, None, None, :].to(device),
            dense=rows == len(order),
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
            folded={},
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
        keys, values = self.cache.layer_keys[layer_idx], self.cache.layer_values[layer_idx]
        if kf.dtype is not keys.dtype:
            kf, vf = kf.to(keys.dtype), vf.to(values.dtype)
        keys.index_copy_(0, self.slot_mapping, kf)
        values.index_copy_(0, self.slot_mapping, vf)
        if self._kernel_rows is not None and cpu_kernels.plain_tensors(qf):
            as_float = qf if qf.dtype is torch.float32 else qf.float()
            found = cpu_kernels.paged_attention(
                as_float, keys, values, self._kernel_rows[window], scale=scale
            )
            return (found if found.dtype is q.dtype else found.to(q.dtype)).view(shape)
        if self._groups is None:  # planned for the kernel, handed a tensor subclass: torch's path after all
            self._plan_torch()
        assert self._groups is not None
        out = torch.empty_like(qf)
        hq, hkv, d = qf.shape[1], keys.shape[1], qf.shape[2]
        g = hq // hkv
        for plan in self._strided[window]:
            self._attend_strided(plan, qf, keys, values, out, scale)
        bs = self.cache.block_size
        key_blocks, value_blocks = keys.view(-1, bs, hkv, d), values.view(-1, bs, hkv, d)
        for group in self._groups[window]:
            s, q_max, n_blocks = group.shape
            # Whole blocks are gathered (large contiguous copies), with index_select on flat indices:
            # both several times faster on CPU than gathering token slots with advanced indexing.
            qg = qf.index_select(0, group.token_index).view(s, q_max, hkv, g, d)
            kg = key_blocks.index_select(0, group.key_blocks).view(s, n_blocks * bs, hkv, d).to(qf.dtype)
            vg = value_blocks.index_select(0, group.key_blocks).view(s, n_blocks * bs, hkv, d).to(qf.dtype)
            if q_max == 1:  # the [S, 1, 1, K] mask broadcasts over the group's rows
                qr, mask = qg.view(s, hkv, g, d), group.mask
            else:  # row q * g + j is query q of head j of the group
                qr = qg.permute(0, 2, 1, 3, 4).reshape(s, hkv, q_max * g, d)
                if g not in group.folded:
                    group.folded[g] = group.mask.repeat_interleave(g, dim=2)
                mask = group.folded[g]
            o = F.scaled_dot_product_attention(
                qr, kg.transpose(1, 2), vg.transpose(1, 2), attn_mask=mask, scale=scale
            )  # [S, Hkv, Q * g, D]
            o = o.view(s, hkv, q_max, g, d).permute(0, 2, 1, 3, 4)  # [S, Q, Hkv, g, D]
            rows = o.reshape(s * q_max, hq, d).index_select(0, group.out_rows)
            out.index_copy_(0, group.out_tokens, rows)
        return out.reshape(shape)

    @staticmethod
    def _attend_strided(
        plan: _Strided, qf: Tensor, keys: Tensor, values: Tensor, out: Tensor, scale: float
    ) -> None:
        hq, d = qf.shape[1], qf.shape[2]
        hkv = keys.shape[1]
        n, t = plan.rows, plan.num_keys
        st = keys.stride()
        size, strides = (n, hkv, t, d), (plan.stride * st[0], st[1], st[0], st[2])
        kv = keys.as_strided(size, strides, keys.storage_offset() + plan.first_slot * st[0])
        vv = values.as_strided(size, strides, values.storage_offset() + plan.first_slot * st[0])
        if kv.dtype != qf.dtype:  # a cache stored in another dtype costs a copy here
            kv, vv = kv.to(qf.dtype), vv.to(qf.dtype)
        qm = qf.index_select(0, plan.token_index)  # [M, Hq, D]
        if not plan.dense:
            qm = qf.new_zeros(n, hq, d).index_copy_(0, plan.row_of, qm)
        o = F.scaled_dot_product_attention(
            qm.view(n, hkv, hq // hkv, d), kv, vv, attn_mask=plan.mask, scale=scale
        ).view(n, hq, d)
        if not plan.dense:
            o = o.index_select(0, plan.row_of)
        out.index_copy_(0, plan.token_index, o)


def _kernel_rows(
    query_lens: Sequence[int],
    context_lens: Sequence[int],
    block_tables: Sequence[Sequence[int]],
    windows: Sequence[int | None],
    cache: KVCache,
) -> dict[int | None, cpu_kernels.PagedRows]:
    """Each query row's table and key range for the CPU kernel, per sliding window (None: full)."""
    row_table: list[int] = []
    row_end: list[int] = []
    for i, (n, c) in enumerate(zip(query_lens, context_lens, strict=True)):
        # The chunk is the tail of its sequence's context: its rows end at c - n + 1 .. c (causal).
        row_table += [i] * n
        row_end += range(c - n + 1, c + 1)
    zero = [0] * len(row_end)
    return {
        w: cpu_kernels.PagedRows.build(
            block_tables,
            row_table,
            zero if w is None else [max(0, e - w) for e in row_end],
            row_end,
            cache.block_size,
        )
        for w in windows
    }


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
