"""The persistent batch: per-sequence step inputs kept in preallocated tensors across steps.

vLLM v1's ``InputBatch`` idea. Every running sequence owns a row (given when it is first scheduled,
freed when it finishes, fails or is aborted; kept through a preemption). The row holds the
sequence's block table (``[rows, max_blocks]``), the last token it sampled and its sampling
parameters (:class:`~lmstack.infer.engine._sampler.SamplingState`, same row numbers). Each step
copies only what changed into the tables (a new block now and then, the sampled tokens), and builds
the flattened batch's token ids, positions and KV slots with a few tensor operations over the
scheduled rows instead of Python loops over their tokens.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from lmstack.infer._sampling_params import SamplingParams
from lmstack.infer.engine._sampler import SamplingState
from lmstack.infer.engine._scheduler import ScheduledSeq
from lmstack.infer.engine._sequence import Sequence

__all__ = ["InputBatch", "StepInputs"]


@dataclass
class StepInputs:
    """One step's flattened batch.

    Attributes:
        token_ids: ``[N]`` int64 token ids (on the model's device).
        positions: ``[N]`` int64 positions (on the model's device).
        slot_mapping: ``[N]`` int64 KV-cache slot of each token (on the CPU; the attention backend
            moves it).
        sample_at: ``[S']`` int64 index in the batch of the last token of each sampling sequence (on
            the model's device), or None when none samples.
        sampled: The scheduled entries that sample, in the order of ``sample_at``.
        sampled_rows: Their rows.
    """

    token_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    sample_at: torch.Tensor | None
    sampled: list[ScheduledSeq]
    sampled_rows: list[int]


class _RowState:
    """What the batch knows of one row's sequence, to copy only what changed."""

    __slots__ = ("num_blocks", "preemptions", "row")

    def __init__(self, row: int, preemptions: int) -> None:
        self.row = row
        self.num_blocks = 0  # block-table entries already copied into the tensor
        self.preemptions = preemptions  # a preemption clears the block table: copy it afresh


class InputBatch:
    """Rows of the running sequences: block tables, last tokens and sampling parameters.

    Args:
        max_blocks_per_seq: The most KV blocks one sequence can hold (its context or the whole cache).
        block_size: Token slots per block.
        device: The model's device (token ids, positions and the sampler's tensors live there).
        sampling: The rows' sampling state (its rows are this batch's rows).
        capacity: Rows allocated up front; the tables double when rows run out.
    """

    def __init__(
        self,
        max_blocks_per_seq: int,
        block_size: int,
        device: torch.device,
        sampling: SamplingState,
        capacity: int = 8,
    ) -> None:
        self.block_size = block_size
        self.device = device
        self.sampling = sampling
        self._rows: dict[int, _RowState] = {}  # seq_id -> its row
        # Block tables on the CPU: they are written from the block manager's Python lists.
        self.block_tables = torch.zeros(capacity, max_blocks_per_seq, dtype=torch.int64)
        self.last_tokens = torch.zeros(capacity, dtype=torch.int64, device=device)

    @property
    def num_rows(self) -> int:
        """Rows in use."""
        return len(self._rows)

    def row_of(self, seq: Sequence) -> int | None:
        """The row of a sequence, or None when it has none."""
        state = self._rows.get(seq.seq_id)
        return None if state is None else state.row

    def add(self, seq: Sequence, params: SamplingParams, generator: torch.Generator | None) -> int:
        """Give a joining sequence a row; its parameters are written once, here.

        Args:
            seq: The sequence.
            params: Its request's sampling parameters.
            generator: Its own generator (seeded requests) or None.

        Returns:
            Its row.
        """
        row = self.sampling.add(params, seq.prompt_token_ids, seq.output_token_ids, generator)
        if row >= self.block_tables.shape[0]:
            size = max(row + 1, 2 * self.block_tables.shape[0])
            tables = torch.zeros(size, self.block_tables.shape[1], dtype=torch.int64)
            tables[: self.block_tables.shape[0]] = self.block_tables
            self.block_tables = tables
            last = torch.zeros(size, dtype=torch.int64, device=self.device)
            last[: self.last_tokens.shape[0]] = self.last_tokens
            self.last_tokens = last
        if seq.output_token_ids:
            self.last_tokens[row] = seq.output_token_ids[-1]
        self._rows[seq.seq_id] = _RowState(row, seq.num_preemptions)
        return row

    def remove(self, seq: Sequence) -> None:
        """Free the row of a sequence that left; a no-op when it has none."""
        state = self._rows.pop(seq.seq_id, None)
        if state is not None:
            self.sampling.remove(state.row)

    def prepare(self, scheduled: Seq[ScheduledSeq], rows: Seq[int]) -> StepInputs:
        """Build a step's flattened token ids, positions and KV slots.

        Args:
            scheduled: The step's scheduled sequences, in batch order; each has a row.
            rows: Their rows, in the same order.

        Returns:
            The step's inputs.
        """
        bs = self.block_size
        lens: list[int] = []
        starts: list[int] = []
        sampled: list[ScheduledSeq] = []
        sampled_rows: list[int] = []
        sample_at: list[int] = []
        all_last = True  # every entry is one token, its sequence's last sampled one
        total = 0
        tables = self.block_tables
        for item, row in zip(scheduled, rows, strict=True):
            seq, n = item.seq, item.num_tokens
            state = self._rows[seq.seq_id]
            table = seq.block_table
            if state.preemptions != seq.num_preemptions:
                state.preemptions, state.num_blocks = seq.num_preemptions, 0
            if len(table) > state.num_blocks:  # new blocks: copy only those
                new = table[state.num_blocks :]
                tables[row, state.num_blocks : len(table)] = torch.tensor(new, dtype=torch.int64)
                state.num_blocks = len(table)
            # The last sampled token is in the table only for a decode token (not a 1-token chunk of
            # a prompt, or of a recompute after preemption, that ends before the last token).
            if n != 1 or not item.samples or item.start < len(seq.prompt_token_ids):
                all_last = False
            lens.append(n)
            starts.append(item.start)
            total += n
            if item.samples:
                sample_at.append(total - 1)
                sampled.append(item)
                sampled_rows.append(row)
        rows_t = torch.tensor(rows, dtype=torch.int64)
        starts_t = torch.tensor(starts, dtype=torch.int64)
        if total == len(rows):  # decode only: one token per row
            positions, token_rows = starts_t, rows_t
        else:
            lens_t = torch.tensor(lens, dtype=torch.int64)
            offsets = torch.cumsum(lens_t, 0) - lens_t  # first batch index of each entry
            positions = torch.arange(total) + torch.repeat_interleave(starts_t - offsets, lens_t)
            token_rows = torch.repeat_interleave(rows_t, lens_t)
        # torch.div/remainder: the `//` and `%` operators go through a slow Python wrapper.
        block = tables[token_rows, torch.div(positions, bs, rounding_mode="floor")]
        slots = block * bs + torch.remainder(positions, bs)
        if all_last:
            # Decode steps read the sampled tokens straight from the table (never from the lists).
            token_ids = self.last_tokens.index_select(0, rows_t.to(self.device))
        else:
            ids: list[int] = []
            for item in scheduled:
                ids.extend(item.seq.token_ids_slice(item.start, item.end))
            token_ids = torch.tensor(ids, dtype=torch.int64, device=self.device)
        return StepInputs(
            token_ids=token_ids,
            positions=positions.to(self.device),
            slot_mapping=slots,
            sample_at=torch.tensor(sample_at, dtype=torch.int64, device=self.device) if sample_at else None,
            sampled=sampled,
            sampled_rows=sampled_rows,
        )

    def record(self, rows: Seq[int], token_ids: Seq[int]) -> None:
        """Store a step's sampled tokens: each row's last token, and its penalty counts.

        Args:
            rows: Rows that took a token this step.
            token_ids: The token each took.
        """
        if not rows:
            return
        index = torch.tensor(rows, dtype=torch.int64, device=self.device)
        self.last_tokens.index_copy_(0, index, torch.tensor(token_ids, dtype=torch.int64, device=self.device))
        self.sampling.record(rows, token_ids)
