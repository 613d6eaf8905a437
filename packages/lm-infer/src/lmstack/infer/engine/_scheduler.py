"""Continuous batching: which sequences run how many tokens in the next engine step.

Every step the engine calls :meth:`Scheduler.schedule`, runs one forward over the scheduled tokens of
all sequences (flattened), samples the sequences whose chunk reached their last token
(:attr:`ScheduledSeq.samples`), appends the sampled tokens, and calls :meth:`Scheduler.update`.

Policy:

1. **Running sequences first, in arrival order.** Each needs its uncomputed tokens: 1 for a decoding
   sequence, more for one still in chunked prefill, and gets ``min(need, remaining budget)``. When
   the budget is spent the remaining running sequences wait one step (they keep their blocks). When
   the block manager cannot allocate for a sequence, the most recently arrived running sequence is
   *preempted* (its blocks freed, ``num_computed_tokens`` reset to 0, status ``WAITING``,
   ``num_preemptions`` += 1, pushed to the *front* of the waiting queue) and the allocation retried;
   if the sequence needing blocks is itself the most recent one, it is the one preempted. The oldest
   running sequence therefore always makes progress (it fits alone, see ``add``), so there is no
   livelock. Preempting the youngest keeps FIFO: the oldest requests finish first.
2. **Then waiting sequences, strict FIFO**, while budget and ``max_num_seqs`` allow: the prefix-cache
   hits are reused, and a chunk of ``min(uncomputed tokens, remaining budget)`` is allocated.
   Admission stops at the first sequence that does not fit (no overtaking: a large request at the
   head is not starved by smaller ones behind it, at the price of some idle capacity meanwhile).
   Nothing is admitted in a step that preempted: memory is short, and the blocks just freed are
   better left to the running sequences' next tokens than to a new prompt that would be preempted.
3. **Preemption is by recompute**: a readmitted sequence recomputes all of ``all_token_ids`` (prompt
   and the tokens generated so far, reusing whatever the prefix cache still holds), so generation
   continues exactly where it stopped.
4. A sequence is never scheduled for 0 tokens. A chunk that ends at the sequence's last token makes
   the engine sample it.

With ``enable_chunked_prefill=False`` an admitted sequence's uncomputed tokens (its whole prompt, or
prompt and output after a preemption, less prefix-cache hits) run in one step, so
``max_num_batched_tokens`` must be at least ``max_model_len`` (checked by :class:`SchedulerConfig`,
as vLLM does) instead of growing the budget for one prompt. Such a prefill waits at the head of the
queue until the running sequences' decode tokens leave enough budget.

Requests are validated once, by the engine, before they reach :meth:`Scheduler.add`: none is longer
than ``max_model_len`` or needs more KV blocks than the whole cache. As a safety net, a waiting
sequence that does not fit even an empty cache (only possible if the engine let a sequence grow
past ``max_total_tokens``) fails alone, reported in the next :attr:`SchedulerOutput.failed`,
instead of blocking the queue.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from lmstack.core import ConfigError
from lmstack.infer.engine._block_manager import BlockManager
from lmstack.infer.engine._sequence import Sequence, SequenceStatus

__all__ = ["ScheduledSeq", "Scheduler", "SchedulerConfig", "SchedulerOutput"]


@dataclass
class SchedulerConfig:
    """Limits of one engine step.

    Attributes:
        max_model_len: The model's context length: no sequence may exceed it.
        max_num_seqs: Most sequences in one step (and running at once).
        max_num_batched_tokens: Token budget of one step: prefill chunks plus decode tokens.
        enable_chunked_prefill: Split long prompts into chunks over several steps, batched with the
            decode tokens of running sequences. Without it a prompt is prefilled whole, so
            ``max_num_batched_tokens`` must be ``>= max_model_len``.

    Raises:
        ConfigError: If a limit is not positive, or chunked prefill is off and the token budget is
            below ``max_model_len``.
    """

    max_model_len: int
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if value <= 0:
                raise ConfigError(f"{name} must be positive, got {value}", field=name)
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ConfigError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_model_len "
                f"({self.max_model_len}) when chunked prefill is disabled: a whole prompt runs in one "
                "step; raise max_num_batched_tokens, lower max_model_len or enable chunked prefill",
                field="max_num_batched_tokens",
            )


@dataclass
class ScheduledSeq:
    """One sequence's share of a step: ``num_tokens`` tokens from ``seq.num_computed_tokens`` on.

    ``start`` and ``end`` are snapshots taken when scheduled, so they stay valid after the engine
    appends a sampled token (and until :meth:`Scheduler.update`).

    Attributes:
        seq: The sequence.
        num_tokens: Tokens to run this step (at least 1).
        start: Position of the first of them (``seq.num_computed_tokens`` when scheduled).
        end: ``start + num_tokens``.
    """

    seq: Sequence
    num_tokens: int
    start: int = field(init=False)
    end: int = field(init=False)
    _num_tokens_at_schedule: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.start = self.seq.num_computed_tokens
        self.end = self.start + self.num_tokens
        self._num_tokens_at_schedule = self.seq.num_tokens

    @property
    def samples(self) -> bool:
        """Whether the chunk reaches the sequence's last token, so the engine samples a new one."""
        return self.end == self._num_tokens_at_schedule


@dataclass
class SchedulerOutput:
    """What one step runs.

    Attributes:
        scheduled: Sequences to run, running ones first (by arrival), then newly admitted ones.
        preempted: Sequences preempted this step (back in the waiting queue, blocks freed).
        failed: Sequences that outgrew the whole cache (see the module docstring): status
            ``FINISHED_ERROR``, ``error`` set, no blocks.
        num_batched_tokens: Sum of ``num_tokens`` over ``scheduled``.
    """

    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    failed: list[Sequence] = field(default_factory=list)
    num_batched_tokens: int = 0

    @property
    def is_empty(self) -> bool:
        """Whether nothing runs this step."""
        return not self.scheduled


class Scheduler:
    """FIFO continuous-batching scheduler with chunked prefill and preemption by recompute.

    See the module docstring for the policy.

    Args:
        config: Step limits.
        block_manager: The KV-cache block manager; the scheduler allocates, commits and frees blocks.
    """

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        # Invariant: every running sequence arrived before every waiting one (strict FIFO admission,
        # youngest-first preemption), so pushing a preempted sequence to the front keeps arrival order.
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []

    @property
    def num_waiting(self) -> int:
        """Sequences waiting for admission."""
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        """Sequences holding KV blocks."""
        return len(self._running)

    @property
    def has_unfinished(self) -> bool:
        """Whether a sequence is waiting or running."""
        return bool(self._waiting or self._running)

    @property
    def waiting(self) -> list[Sequence]:
        """The waiting queue, front first (a copy)."""
        return list(self._waiting)

    @property
    def running(self) -> list[Sequence]:
        """The running sequences, by arrival (a copy)."""
        return list(self._running)

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence.

        The engine validated the request before (see ``LLMEngine.add_request``): the prompt is not
        empty, ``len(prompt) < max_total_tokens <= max_model_len``, and ``max_total_tokens`` fits
        the whole KV cache. Nothing is checked again here.

        Args:
            seq: A new sequence (status ``WAITING``, no blocks, nothing computed), with a ``seq_id``
                greater than every sequence added before.

        Raises:
            ValueError: If the sequence is not new, or its ``seq_id`` breaks arrival order.
        """
        if seq.status is not SequenceStatus.WAITING or seq.block_table or seq.num_computed_tokens:
            raise ValueError(f"sequence {seq.seq_id} is not new (status {seq.status.name})")
        last = self._waiting[-1] if self._waiting else self._running[-1] if self._running else None
        if last is not None and seq.seq_id <= last.seq_id:
            raise ValueError(f"seq_id {seq.seq_id} arrives after seq_id {last.seq_id}: ids must increase")
        self._waiting.append(seq)

    def abort(self, request_id: str) -> list[Sequence]:
        """Abort every waiting or running sequence of a request and free its blocks.

        Args:
            request_id: The request.

        Returns:
            The aborted sequences (status ``FINISHED_ABORTED``); empty if none was unfinished.
        """
        aborted = [seq for seq in self._running if seq.request_id == request_id]
        aborted_waiting = [seq for seq in self._waiting if seq.request_id == request_id]
        if aborted:
            self._running = [seq for seq in self._running if seq.request_id != request_id]
        if aborted_waiting:
            self._waiting = deque(seq for seq in self._waiting if seq.request_id != request_id)
        for seq in aborted:
            self.block_manager.free(seq)
        aborted.extend(aborted_waiting)
        for seq in aborted:
            seq.status = SequenceStatus.FINISHED_ABORTED
        return aborted

    def schedule(self) -> SchedulerOutput:
        """Choose the sequences and token counts of the next step, allocating their KV blocks.

        Returns:
            The step's plan; see the module docstring for the policy.
        """
        out = SchedulerOutput()
        bm = self.block_manager
        budget = self.config.max_num_batched_tokens
        chunking = self.config.enable_chunked_prefill

        # 1. Running sequences, oldest first; the youngest are preempted when blocks run out.
        index = 0
        while index < len(self._running) and budget > 0:
            seq = self._running[index]
            need = seq.num_uncomputed_tokens
            num = min(need, budget)
            if need <= 0 or (not chunking and num < need):
                # Nothing to compute (the engine has not appended a token), or a whole prefill that
                # cannot run with the budget left: skip it this step.
                index += 1
                continue
            while not bm.allocate(seq, num):
                victim = self._running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                out.scheduled.append(ScheduledSeq(seq, num))
                budget -= num
                index += 1

        # 2. Waiting sequences, strict FIFO, unless this step preempted.
        while not out.preempted and self._waiting and budget > 0:
            if len(self._running) >= self.config.max_num_seqs:
                break
            seq = self._waiting[0]
            hits = bm.match_prefix(seq)
            need = seq.num_tokens - len(hits) * bm.block_size
            num = min(need, budget)
            if not chunking and num < need:
                if budget == self.config.max_num_batched_tokens:
                    # Cannot happen for requests add() accepted, unless the engine overran max_total_tokens.
                    self._fail_head(out, f"{need} tokens to prefill exceed max_num_batched_tokens")
                    continue
                break
            if not bm.allocate(seq, num, prefix_blocks=hits):
                if not self._running:
                    # Every block is free and it still does not fit: it never will (the engine overran
                    # max_total_tokens); fail it rather than block the queue for ever.
                    self._fail_head(out, f"{seq.num_tokens} tokens do not fit the whole KV cache")
                    continue
                break
            self._waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self._running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, num))
            budget -= num

        out.num_batched_tokens = self.config.max_num_batched_tokens - budget
        return out

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self._waiting.appendleft(seq)

    def _fail_head(self, out: SchedulerOutput, error: str) -> None:
        seq = self._waiting.popleft()
        seq.status = SequenceStatus.FINISHED_ERROR
        seq.error = error
        out.failed.append(seq)

    def update(self, scheduled: list[ScheduledSeq], finished: set[int]) -> list[Sequence]:
        """Record a step's results: advance computed tokens, register full blocks, retire finished ones.

        Args:
            scheduled: ``SchedulerOutput.scheduled`` of the step, after the engine appended sampled
                tokens to the sampling sequences.
            finished: ``seq_id`` of the sequences the engine found finished after this step. The engine
                sets their status (``FINISHED_STOPPED`` or ``FINISHED_LENGTH``) first; one left
                ``RUNNING`` is marked ``FINISHED_STOPPED``.

        Returns:
            The finished sequences, their blocks freed, in arrival order.
        """
        for item in scheduled:
            seq = item.seq
            if not seq.block_table:
                # Aborted (and freed) while the step ran. Finished ones still commit: their last full
                # blocks are worth caching.
                continue
            seq.num_computed_tokens += item.num_tokens
            self.block_manager.commit(seq)
        if not finished:
            return []
        done = [seq for seq in self._running if seq.seq_id in finished]
        if done:
            self._running = [seq for seq in self._running if seq.seq_id not in finished]
        for seq in done:
            self.block_manager.free(seq)
            if not seq.is_finished:
                seq.status = SequenceStatus.FINISHED_STOPPED
        return done
