"""One generation request as the scheduler and the KV block manager see it.

A :class:`Sequence` carries the token ids (prompt, then generated output), how many of them already
have their K/V in the paged cache, the KV blocks that hold them, and its lifecycle status. The engine
creates one per request (per sample when a request asks for several) and appends sampled tokens to
``output_token_ids``; the scheduler and the block manager own the rest of the bookkeeping.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

__all__ = ["Sequence", "SequenceStatus"]


class SequenceStatus(enum.Enum):
    """Where a sequence is in its life: queued, being computed, or finished (and why)."""

    WAITING = "waiting"
    """Queued for admission: new, or preempted and waiting to be recomputed. Holds no KV blocks."""
    RUNNING = "running"
    """Admitted: holds KV blocks and is scheduled (prefill chunks, then one decode token) each step."""
    FINISHED_STOPPED = "finished_stopped"
    """Finished on a stop token or stop string."""
    FINISHED_LENGTH = "finished_length"
    """Finished because it reached ``max_tokens`` or the model's context length."""
    FINISHED_ABORTED = "finished_aborted"
    """Aborted by the client."""
    FINISHED_ERROR = "finished_error"
    """Failed on its own (e.g. can never fit the KV cache); :attr:`Sequence.error` says why."""

    @property
    def is_finished(self) -> bool:
        """Whether this status is one of the ``FINISHED_*`` ones."""
        return self not in (SequenceStatus.WAITING, SequenceStatus.RUNNING)


# eq=False: sequences compare and hash by identity, so they can live in sets and dict keys.
@dataclass(eq=False)
class Sequence:
    """A prompt and its generated tokens, with their KV-cache bookkeeping.

    Attributes:
        seq_id: Engine-unique id, increasing with arrival order (the scheduler's FIFO key).
        request_id: The id of the request this sequence belongs to (several sequences may share one).
        prompt_token_ids: The prompt's token ids (shared by a request's samples; never mutated).
        max_total_tokens: Prompt plus ``max_tokens``, capped at the model's context length. The
            scheduler rejects a sequence whose ``max_total_tokens`` could never fit the KV cache.
        output_token_ids: Tokens generated so far; the engine appends to it after sampling. The
            engine's :class:`~lmstack.infer.CompletionOutput` holds this same list as its
            ``token_ids`` (generated ids are kept once), so it is only ever appended to.
        num_computed_tokens: How many leading tokens of :attr:`all_token_ids` have their K/V in the
            cache (reset to 0 when the sequence is preempted).
        num_cached_prompt_tokens: How many of those came from the prefix cache at the latest
            (re)admission, for statistics.
        block_table: The KV block ids holding this sequence's tokens, in order; token ``i`` lives in
            block ``block_table[i // block_size]`` at offset ``i % block_size``.
        status: Where the sequence is in its life.
        num_preemptions: How many times the scheduler preempted it (and recomputed it later).
        error: Why it failed, when ``status`` is :attr:`SequenceStatus.FINISHED_ERROR`.
        block_hashes: Prefix-cache digests of its full blocks, filled lazily by the block manager.
            Full blocks never change (tokens are only appended), so they survive preemption.
        cache_salt: Set where this sequence's K/V depend on more than its tokens (dynamic-NTK RoPE
            past the trained context rotates a prompt by its whole length, so the salt is that
            length): its blocks are shared only with sequences of the same salt.
    """

    seq_id: int
    request_id: str
    prompt_token_ids: list[int]
    max_total_tokens: int
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_prompt_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    num_preemptions: int = 0
    error: str | None = None
    block_hashes: list[bytes] = field(default_factory=list, repr=False)
    cache_salt: int | None = None

    @property
    def all_token_ids(self) -> list[int]:
        """The prompt followed by the generated tokens (a new list)."""
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        """``len(all_token_ids)``, without building the list."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens whose K/V are not in the cache yet (1 for a decoding sequence)."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        """Whether the sequence has finished, for whatever reason."""
        return self.status.is_finished

    def token_ids_slice(self, start: int, end: int) -> list[int]:
        """Tokens ``all_token_ids[start:end]``, without copying the whole sequence.

        Args:
            start: First position (inclusive), ``>= 0``.
            end: Last position (exclusive), ``<= num_tokens``.

        Returns:
            The token ids in ``[start, end)``.
        """
        num_prompt = len(self.prompt_token_ids)
        if end <= num_prompt:
            return self.prompt_token_ids[start:end]
        if start >= num_prompt:
            return self.output_token_ids[start - num_prompt : end - num_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - num_prompt]
