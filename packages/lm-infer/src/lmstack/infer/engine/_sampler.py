"""Batched token sampling: penalties, greedy, temperature, top-k, top-p, min-p and log-probs.

The engine keeps a :class:`SamplingState`: each running sequence's parameters in preallocated per-row
tensors (written once, when it joins) and, for rows with a penalty, running counts of its output
tokens (updated with each step's sampled tokens). Each step gathers the sampled rows into a
:class:`SamplingTensors` (:meth:`SamplingState.tensors`); :meth:`SamplingTensors.build` makes the
same from parameters and whole histories (tests, one-off use). :class:`Sampler` then turns a
``[N, V]`` logits tensor into one token per row with whole-batch tensor operations. The only
Python loop on the hot path is over *seeded* rows, which draw their random numbers from their own
generator so that a seeded request's tokens do not depend on what else is in the batch.

Processing order, per row:

1. penalties on the logits: repetition (prompt and output tokens), then frequency and presence
   (output tokens only);
2. ``min_tokens``: the end-of-sequence and ``stop_token_ids`` logits are set to ``-inf`` while the
   output is shorter than ``min_tokens``; guided rows (``guided_*`` constraints): every token the
   row's grammar does not allow next is set to ``-inf``;
3. greedy rows (``temperature == 0`` or ``top_k == 1``) take ``argmax`` of these logits;
4. the other rows: divide by the temperature, keep the ``top_k`` largest, then the top-p nucleus of
   what is left (renormalised), then drop tokens below ``min_p`` times the most likely one, and
   sample from the softmax of the remaining logits.

Log-probs are those of the *processed* logits of steps 1-2: ``log_softmax`` after penalties, the
``min_tokens`` mask and the grammar mask, before temperature and truncation. They describe the
model's (penalised) distribution rather than the truncated one the token was drawn from, so a token
sampled at high temperature or from a narrow nucleus still gets a meaningful log-prob (never 0 just
because top-k kept one token), and a greedy row's token is always the one with the highest reported
log-prob.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lmstack.infer._sampling_params import SamplingParams

__all__ = ["Sampler", "SamplerOutput", "SamplingState", "SamplingTensors", "make_generator"]

_MASK64 = (1 << 64) - 1


def _splitmix64(value: int) -> int:
    # SplitMix64's finaliser: nearby (seed, index) pairs get unrelated generator seeds.
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def make_generator(seed: int, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """Creates the random generator of one completion of a seeded request.

    Each of a request's ``n`` completions gets its own stream, and the stream depends only on
    ``(seed, index)``, never on the engine's state or the other requests.

    Args:
        seed: The request's ``SamplingParams.seed`` (any int; negative and large values are fine).
        index: Which of the request's ``n`` completions, from 0.
        device: Device of the logits the generator will sample for.

    Returns:
        A freshly seeded generator on ``device``.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(_splitmix64(_splitmix64(seed & _MASK64) ^ (index & _MASK64)))
    return generator


def _flat_ids(sequences: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (row, id) index tensors of every token of ``sequences``, without padding."""
    lengths = torch.tensor([len(seq) for seq in sequences], dtype=torch.int64)
    ids = torch.tensor(list(itertools.chain.from_iterable(sequences)), dtype=torch.int64)
    rows = torch.repeat_interleave(torch.arange(len(sequences), dtype=torch.int64), lengths)
    return rows, ids


@dataclass
class SamplingTensors:
    """The sampling parameters of one step's batch of ``N`` sequences, as tensors.

    Build it with :meth:`build`. Per-row parameters are ``[N]`` tensors on the logits' device; the
    ``do_*`` flags say whether any row needs a processing stage, so the sampler skips the others
    without reading tensors back from the device.

    Attributes:
        temperature: ``[N]`` float32; 1.0 on greedy rows (they never divide by it).
        top_p: ``[N]`` float32.
        top_k: ``[N]`` int64; ``vocab_size`` where top-k is disabled or ``k > vocab_size``.
        min_p: ``[N]`` float32.
        repetition_penalty: ``[N]`` float32.
        presence_penalty: ``[N]`` float32.
        frequency_penalty: ``[N]`` float32.
        greedy: ``[N]`` bool; rows that take the argmax.
        output_counts: ``[N, V]`` float32 count of each token in each row's output, or None when no
            row has a presence or frequency penalty.
        seen_mask: ``[N, V]`` bool, tokens in each row's prompt or output, or None when no row has a
            repetition penalty.
        suppress: ``(rows, ids)`` index tensors of the logits masked for ``min_tokens``, or None.
        allowed: ``(rows, mask)``: the guided rows (``[G]`` int64) and the tokens each may take
            (``[G, V]`` bool), or None when no row is constrained.
        generators: Per row, its own generator (seeded requests) or None (the shared default one).
        max_logprobs: The most top log-probs any row asked for (0 when none did).
        vocab_size: ``V``.
        all_greedy: Every row is greedy.
        do_top_k: Some row has top-k enabled.
        do_top_p: Some row has ``top_p < 1``.
        do_min_p: Some row has ``min_p > 0``.
        need_logprobs: Some row asked for log-probs (``logprobs`` not None); without, the sampler
            skips the log-softmax normaliser (a ``logsumexp`` over the vocabulary each step).
    """

    temperature: torch.Tensor
    top_p: torch.Tensor
    top_k: torch.Tensor
    min_p: torch.Tensor
    repetition_penalty: torch.Tensor
    presence_penalty: torch.Tensor
    frequency_penalty: torch.Tensor
    greedy: torch.Tensor
    output_counts: torch.Tensor | None
    seen_mask: torch.Tensor | None
    suppress: tuple[torch.Tensor, torch.Tensor] | None
    generators: tuple[torch.Generator | None, ...]
    max_logprobs: int
    vocab_size: int
    all_greedy: bool
    do_top_k: bool
    do_top_p: bool
    do_min_p: bool
    allowed: tuple[torch.Tensor, torch.Tensor] | None = None
    need_logprobs: bool = True

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        prompt_ids: Sequence[Sequence[int]],
        output_ids: Sequence[Sequence[int]],
        generators: Sequence[torch.Generator | None],
        vocab_size: int,
        device: torch.device | str,
        *,
        eos_token_ids: Sequence[int] = (),
        allowed: tuple[Sequence[int], torch.Tensor] | None = None,
    ) -> SamplingTensors:
        """Builds the tensors for one step.

        Token counts are built with one ``scatter_add`` over the flattened histories, not a loop
        over tokens, and only when some row needs them. Nothing is validated here (this runs every
        step): the engine checked each request's token ids once, when it was added.

        Args:
            params: Each row's sampling parameters (a request with ``n > 1`` has ``n`` rows).
            prompt_ids: Each row's prompt token ids (for the repetition penalty).
            output_ids: Each row's generated token ids so far.
            generators: Each row's own generator (see :func:`make_generator`) or None. A seeded
                row's generator must be on ``device``.
            vocab_size: Width ``V`` of the logits.
            device: Device of the logits.
            eos_token_ids: The model's end-of-sequence ids, masked out while a row (without
                ``ignore_eos``) has fewer than ``min_tokens`` output tokens.
            allowed: The guided rows and the ``[G, V]`` bool mask of the tokens each may take next
                (from the engine's grammar matchers), or None when no row is constrained.

        The prompts, outputs, ``stop_token_ids`` and ``eos_token_ids`` must hold ids in
        ``[0, vocab_size)``.

        Returns:
            The batch's sampling tensors.

        Raises:
            ValueError: The sequences do not all have one entry per row.
        """
        n = len(params)
        if not len(prompt_ids) == len(output_ids) == len(generators) == n:
            raise ValueError(
                f"params, prompt_ids, output_ids and generators need one entry per row, got "
                f"{n}, {len(prompt_ids)}, {len(output_ids)} and {len(generators)}"
            )

        greedy = [p.greedy for p in params]
        # top_k == 1 rows are greedy too, so the value in the other stages does not matter for them.
        top_k = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
        do_repetition = any(p.repetition_penalty != 1.0 for p in params)
        do_counts = any(p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in params)

        output_counts = seen_mask = None
        if do_repetition or do_counts:
            out_rows, out_ids = _flat_ids(output_ids)
            flat = (out_rows * vocab_size + out_ids).to(device)
            counts = torch.zeros(n * vocab_size, dtype=torch.float32, device=device)
            counts.scatter_add_(0, flat, torch.ones(flat.numel(), dtype=torch.float32, device=device))
            counts = counts.view(n, vocab_size)
            if do_counts:
                output_counts = counts
            if do_repetition:
                prompt_rows, prompt_ids_flat = _flat_ids(prompt_ids)
                seen = counts > 0
                seen.view(-1)[(prompt_rows * vocab_size + prompt_ids_flat).to(device)] = True
                seen_mask = seen

        suppress = None
        suppress_rows: list[int] = []
        suppress_ids: list[int] = []
        for row, (p, out) in enumerate(zip(params, output_ids, strict=True)):
            if len(out) < p.min_tokens:
                ids = {*(p.stop_token_ids or ()), *(() if p.ignore_eos else eos_token_ids)}
                suppress_rows.extend([row] * len(ids))
                suppress_ids.extend(sorted(ids))
        if suppress_rows:
            suppress = (
                torch.tensor(suppress_rows, dtype=torch.int64, device=device),
                torch.tensor(suppress_ids, dtype=torch.int64, device=device),
            )

        # One host-to-device copy for all float parameters rather than one per tensor.
        floats = torch.tensor(
            [
                [1.0 if g else p.temperature for p, g in zip(params, greedy, strict=True)],
                [p.top_p for p in params],
                [p.min_p for p in params],
                [p.repetition_penalty for p in params],
                [p.presence_penalty for p in params],
                [p.frequency_penalty for p in params],
            ],
            dtype=torch.float32,
        ).to(device)
        temperature, top_p, min_p, repetition, presence, frequency = floats.unbind(0)
        sampled = [p for p in params if not p.greedy]
        return cls(
            temperature=temperature,
            top_p=top_p,
            top_k=torch.tensor(top_k, dtype=torch.int64, device=device),
            min_p=min_p,
            repetition_penalty=repetition,
            presence_penalty=presence,
            frequency_penalty=frequency,
            greedy=torch.tensor(greedy, dtype=torch.bool, device=device),
            output_counts=output_counts,
            seen_mask=seen_mask,
            suppress=suppress,
            generators=tuple(generators),
            max_logprobs=min(max((p.logprobs or 0 for p in params), default=0), vocab_size),
            vocab_size=vocab_size,
            all_greedy=all(greedy),
            do_top_k=any(0 < p.top_k < vocab_size for p in sampled),
            do_top_p=any(p.top_p < 1.0 for p in sampled),
            do_min_p=any(p.min_p > 0.0 for p in sampled),
            allowed=None
            if allowed is None
            else (torch.tensor(list(allowed[0]), dtype=torch.int64, device=device), allowed[1].to(device)),
        )


class SamplingState:
    """The running sequences' sampling parameters and penalty histories, kept across steps.

    The engine gives every running sequence a row when it joins and frees the row when it leaves;
    the row's parameters are written once, into preallocated per-row tensors, and each step's
    :class:`SamplingTensors` gathers the sampled rows from them (:meth:`tensors`) instead of being
    rebuilt from every request's parameters. Rows with a penalty also get a slot in a ``[P, V]``
    table of output-token counts and a ``[P, V]`` mask of seen tokens (prompt and output), updated
    with each step's sampled tokens (:meth:`record`), so no step re-flattens the token histories.
    Slot 0 of those tables stays all zero: rows without a penalty point at it.

    Tables grow by doubling when rows or penalty slots run out; nothing shrinks.

    Args:
        vocab_size: Width ``V`` of the logits.
        device: Device of the logits (the tensors live there).
        eos_token_ids: The model's end-of-sequence ids (masked while a row is under ``min_tokens``).
        capacity: Rows allocated up front.
    """

    def __init__(
        self,
        vocab_size: int,
        device: torch.device | str,
        *,
        eos_token_ids: Sequence[int] = (),
        capacity: int = 8,
    ) -> None:
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self._eos = tuple(eos_token_ids)
        self._capacity = 0
        # temperature, top_p, min_p, repetition, presence, frequency: one gather serves all six.
        self._floats = torch.empty(6, 0, dtype=torch.float32, device=self.device)
        self._top_k = torch.empty(0, dtype=torch.int64, device=self.device)
        self._greedy = torch.empty(0, dtype=torch.bool, device=self.device)
        self._slot = torch.empty(0, dtype=torch.int64, device=self.device)  # penalty slot, 0 = none
        self._params: list[SamplingParams | None] = []
        self._generators: list[torch.Generator | None] = []
        self._outputs: list[Sequence[int] | None] = []  # each row's output list (the sequence's own)
        self._free_rows: list[int] = []
        # Penalty tables; slot 0 is the shared all-zero row.
        self._counts = torch.zeros(1, vocab_size, dtype=torch.float32, device=self.device)
        self._seen = torch.zeros(1, vocab_size, dtype=torch.bool, device=self.device)
        self._free_slots: list[int] = []
        self._slots_used = 1
        # How many live rows need each stage, so the flags cost nothing per step.
        # Live rows that are non-greedy, use top-k, top-p, min-p, a repetition penalty, a
        # presence/frequency penalty.
        self._num_stages = [0] * 6
        self._logprobs: dict[int, int] = {}  # row -> logprobs asked, for rows that asked
        self._num_logprob_rows = 0  # live rows with logprobs not None (0 asks for the chosen token's)
        self._min_tokens: dict[int, tuple[int, list[int]]] = {}  # row -> (min_tokens, ids to mask)
        self._grow(capacity)

    @property
    def num_rows(self) -> int:
        """Rows in use."""
        return self._capacity - len(self._free_rows)

    def _grow(self, capacity: int) -> None:
        extra = capacity - self._capacity
        if extra <= 0:
            return
        dev = self.device
        self._floats = torch.cat([self._floats, torch.ones(6, extra, dtype=torch.float32, device=dev)], 1)
        self._top_k = torch.cat([self._top_k, torch.full((extra,), self.vocab_size, device=dev)])
        self._greedy = torch.cat([self._greedy, torch.ones(extra, dtype=torch.bool, device=dev)])
        self._slot = torch.cat([self._slot, torch.zeros(extra, dtype=torch.int64, device=dev)])
        self._params.extend([None] * extra)
        self._generators.extend([None] * extra)
        self._outputs.extend([None] * extra)
        # Popped from the end: lowest rows first, so a small batch stays in the first rows.
        self._free_rows = list(range(capacity - 1, self._capacity - 1, -1)) + self._free_rows
        self._capacity = capacity

    def _take_slot(self) -> int:
        if self._free_slots:
            return self._free_slots.pop()
        if self._slots_used == self._counts.shape[0]:
            size = self._counts.shape[0]
            self._counts = torch.cat([self._counts, torch.zeros_like(self._counts)])
            self._seen = torch.cat([self._seen, torch.zeros_like(self._seen)])
            assert self._counts.shape[0] == 2 * size
        self._slots_used += 1
        return self._slots_used - 1

    def add(
        self,
        params: SamplingParams,
        prompt_ids: Sequence[int],
        output_ids: Sequence[int],
        generator: torch.Generator | None,
    ) -> int:
        """Gives a joining sequence a row and writes its parameters (once, for its whole life).

        Args:
            params: Its sampling parameters.
            prompt_ids: Its prompt (seen tokens of the repetition penalty).
            output_ids: Its output list; kept by reference (``min_tokens`` reads its length), and any
                tokens already in it are counted now.
            generator: Its own generator (seeded requests) or None.

        Returns:
            The row.
        """
        # Everything that reads the parameters comes first: a bad one raises before any change.
        greedy = params.greedy
        vocab = self.vocab_size
        floats = torch.tensor(
            [
                1.0 if greedy else params.temperature,
                params.top_p,
                params.min_p,
                params.repetition_penalty,
                params.presence_penalty,
                params.frequency_penalty,
            ],
            dtype=torch.float32,
        )
        top_k = params.top_k if 0 < params.top_k < vocab else vocab
        flags = self._flags(params)
        repetition = params.repetition_penalty != 1.0
        penalised = repetition or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
        out = torch.tensor(list(output_ids), dtype=torch.int64) if penalised and output_ids else None
        prompt = torch.tensor(list(prompt_ids), dtype=torch.int64) if repetition and prompt_ids else None

        if not self._free_rows:
            self._grow(2 * self._capacity)
        row = self._free_rows.pop()
        self._floats[:, row] = floats.to(self.device)
        self._top_k[row] = top_k
        self._greedy[row] = greedy
        self._params[row] = params
        self._generators[row] = generator
        self._outputs[row] = output_ids
        self._apply_flags(row, flags, +1)
        if penalised:
            slot = self._take_slot()
            self._slot[row] = slot
            if out is not None:
                out = out.to(self.device)
                ones = torch.ones_like(out, dtype=torch.float32)
                self._counts[slot].index_put_((out,), ones, accumulate=True)
                self._seen[slot, out] = True
            if prompt is not None:
                self._seen[slot, prompt.to(self.device)] = True
        return row

    def remove(self, row: int) -> None:
        """Frees the row of a sequence that left (finished, aborted or failed)."""
        params = self._params[row] if 0 <= row < self._capacity else None
        if params is None:
            raise ValueError(f"sampling row {row} is not in use")
        self._apply_flags(row, self._flags(params), -1)
        slot = int(self._slot[row])
        if slot:
            self._counts[slot].zero_()
            self._seen[slot].zero_()
            self._free_slots.append(slot)
            self._slot[row] = 0
        self._params[row] = self._generators[row] = self._outputs[row] = None
        self._free_rows.append(row)

    def _flags(self, p: SamplingParams) -> tuple[tuple[bool, ...], int | None, tuple[int, list[int]] | None]:
        """Which stages a row needs, its top log-probs asked and its ``min_tokens`` mask."""
        sampling = not p.greedy
        stages = (
            sampling,
            sampling and 0 < p.top_k < self.vocab_size,
            sampling and p.top_p < 1.0,
            sampling and p.min_p > 0.0,
            p.repetition_penalty != 1.0,
            p.presence_penalty != 0.0 or p.frequency_penalty != 0.0,
        )
        masked = None
        if p.min_tokens > 0:
            ids = {*(p.stop_token_ids or ()), *(() if p.ignore_eos else self._eos)}
            if ids:
                masked = (p.min_tokens, sorted(ids))
        return stages, p.logprobs, masked

    def _apply_flags(
        self, row: int, flags: tuple[tuple[bool, ...], int | None, tuple[int, list[int]] | None], sign: int
    ) -> None:
        stages, logprobs, masked = flags
        self._num_stages = [n + sign * flag for n, flag in zip(self._num_stages, stages, strict=True)]
        self._num_logprob_rows += sign * (logprobs is not None)
        if sign > 0:
            if logprobs:
                self._logprobs[row] = logprobs
            if masked is not None:
                self._min_tokens[row] = masked
        else:
            self._logprobs.pop(row, None)
            self._min_tokens.pop(row, None)

    def tensors(
        self, rows: Sequence[int], *, allowed: tuple[Sequence[int], torch.Tensor] | None = None
    ) -> SamplingTensors:
        """This step's :class:`SamplingTensors` for the sampled ``rows``, gathered from the tables.

        Equal to :meth:`SamplingTensors.build` over the same rows' parameters and histories, except
        that the ``do_*`` flags and ``max_logprobs`` describe every live row (a stage that runs for
        a row not needing it leaves that row unchanged), and the penalty tensors are present while
        any live row has a penalty.

        Args:
            rows: The sampled rows, in the order of the logits' rows.
            allowed: As for :meth:`SamplingTensors.build`, with indices into ``rows``.

        Returns:
            The step's sampling tensors.
        """
        index = torch.tensor(rows, dtype=torch.int64, device=self.device)
        floats = self._floats.index_select(1, index)
        temperature, top_p, min_p, repetition, presence, frequency = floats.unbind(0)
        output_counts = seen_mask = None
        if self._num_stages[4] or self._num_stages[5]:
            slots = self._slot.index_select(0, index)
            if self._num_stages[5]:
                output_counts = self._counts.index_select(0, slots)
            if self._num_stages[4]:
                seen_mask = self._seen.index_select(0, slots)
        suppress = None
        if self._min_tokens:
            suppress_rows: list[int] = []
            suppress_ids: list[int] = []
            for i, row in enumerate(rows):
                entry = self._min_tokens.get(row)
                out = self._outputs[row]
                if entry is not None and out is not None and len(out) < entry[0]:
                    suppress_rows.extend([i] * len(entry[1]))
                    suppress_ids.extend(entry[1])
            if suppress_rows:
                suppress = (
                    torch.tensor(suppress_rows, dtype=torch.int64, device=self.device),
                    torch.tensor(suppress_ids, dtype=torch.int64, device=self.device),
                )
        greedy = self._greedy.index_select(0, index)
        # Exact over the sampled rows: an all-greedy step must not draw noise (from the default
        # generator) because a sampling row elsewhere in the batch is still prefilling.
        all_greedy = self._num_stages[0] == 0 or bool(greedy.all())
        return SamplingTensors(
            temperature=temperature,
            top_p=top_p,
            top_k=self._top_k.index_select(0, index),
            min_p=min_p,
            repetition_penalty=repetition,
            presence_penalty=presence,
            frequency_penalty=frequency,
            greedy=greedy,
            output_counts=output_counts,
            seen_mask=seen_mask,
            suppress=suppress,
            generators=tuple(self._generators[row] for row in rows),
            max_logprobs=min(max(self._logprobs.values(), default=0), self.vocab_size),
            vocab_size=self.vocab_size,
            all_greedy=all_greedy,
            do_top_k=self._num_stages[1] > 0,
            do_top_p=self._num_stages[2] > 0,
            do_min_p=self._num_stages[3] > 0,
            allowed=None
            if allowed is None
            else (
                torch.tensor(list(allowed[0]), dtype=torch.int64, device=self.device),
                allowed[1].to(self.device),
            ),
            need_logprobs=self._num_logprob_rows > 0,
        )

    def record(self, rows: Sequence[int], token_ids: Sequence[int]) -> None:
        """Adds a step's sampled tokens to their rows' penalty counts (one scatter for the batch).

        Args:
            rows: Rows that took a token this step.
            token_ids: The token each took, in the same order.
        """
        if not (self._num_stages[4] or self._num_stages[5]) or not rows:
            return
        index = torch.tensor(rows, dtype=torch.int64, device=self.device)
        tokens = torch.tensor(token_ids, dtype=torch.int64, device=self.device)
        slots = self._slot.index_select(0, index)
        live = slots > 0  # slot 0 (no penalty) must stay zero
        self._counts.index_put_((slots, tokens), live.to(torch.float32), accumulate=True)
        self._seen[slots, tokens] = self._seen[slots, tokens] | live


@dataclass
class SamplerOutput:
    """What :class:`Sampler` produced for one step.

    Attributes:
        token_ids: ``[N]`` int64, the chosen token of each row.
        logprobs: ``[N]`` float32, each chosen token's log-prob under the processed distribution
            (``log_softmax`` of the logits after penalties and the ``min_tokens`` mask, before
            temperature and truncation); None when no row asked for log-probs
            (:attr:`SamplingTensors.need_logprobs` false).
        top_logprobs: ``(values, ids)``, both ``[N, K]`` (float32, int64), the ``K`` largest
            log-probs of that same distribution in descending order, ``K`` being the most any row
            asked for; slice ``[:, :k]`` for a row that asked for ``k``. None when no row asked.
    """

    token_ids: torch.Tensor
    logprobs: torch.Tensor | None
    top_logprobs: tuple[torch.Tensor, torch.Tensor] | None


def _apply_penalties(logits: torch.Tensor, t: SamplingTensors) -> None:
    """Applies the repetition, frequency and presence penalties to float32 ``logits`` in place."""
    if t.seen_mask is not None:
        penalty = t.repetition_penalty.unsqueeze(1)
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits.copy_(torch.where(t.seen_mask, penalised, logits))
    if t.output_counts is not None:
        logits -= t.frequency_penalty.unsqueeze(1) * t.output_counts
        logits -= t.presence_penalty.unsqueeze(1) * (t.output_counts > 0)


def _truncate(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """Masks (to ``-inf``) the tokens that top-k, top-p and min-p drop; returns new logits."""
    if t.do_top_k or t.do_top_p:
        # One descending sort serves both: top-k cuts by rank, top-p by the cumulative mass of
        # the ranks top-k kept.
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(logits.shape[-1], device=logits.device)
        drop = ranks.unsqueeze(0) >= t.top_k.unsqueeze(1)
        if t.do_top_p:
            probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
            mass_before = probs.cumsum(dim=-1) - probs
            # top_p == 1 rows keep everything explicitly: rounding can push the running sum to 1
            # before the tail, and a row's result must not depend on its neighbours' settings.
            nucleus_drop = (mass_before >= t.top_p.unsqueeze(1)) & (t.top_p < 1).unsqueeze(1)
            drop |= nucleus_drop
        logits = logits.masked_fill(torch.zeros_like(drop).scatter_(1, order, drop), float("-inf"))
    if t.do_min_p:
        # p_i >= min_p * p_max  <=>  logit_i >= logit_max + log(min_p): no softmax needed, and
        # the ratio is the same before and after renormalising over the top-k/top-p survivors.
        threshold = logits.amax(dim=-1, keepdim=True) + torch.log(t.min_p).unsqueeze(1)
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    return logits


def _exponential_noise(rows: int, vocab: int, t: SamplingTensors, device: torch.device) -> torch.Tensor:
    """Exp(1) noise for the race; a seeded row's comes from its own generator only."""
    noise = torch.empty(rows, vocab, dtype=torch.float32, device=device)
    seeded = [row for row, g in enumerate(t.generators) if g is not None]
    if len(seeded) < rows:
        noise.exponential_()  # one draw from the default generator for all unseeded rows
    for row in seeded:
        noise[row].exponential_(generator=t.generators[row])
    return noise


def _check_shape(logits: torch.Tensor, t: SamplingTensors) -> None:
    if logits.dim() != 2 or logits.shape[0] != len(t.generators) or logits.shape[1] != t.vocab_size:
        raise ValueError(
            f"logits must be [{len(t.generators)}, {t.vocab_size}] for this batch, got {list(logits.shape)}"
        )


def _untouched(t: SamplingTensors) -> bool:
    """No penalty, ``min_tokens`` mask or constraint changes this batch's logits."""
    return t.output_counts is None and t.seen_mask is None and t.suppress is None and t.allowed is None


class Sampler:
    """Chooses the next token of every row of a batch (see the module docstring for the stages)."""

    def __call__(self, logits: torch.Tensor, t: SamplingTensors) -> SamplerOutput:
        """Samples one token per row.

        Args:
            logits: ``[N, V]`` logits of the last position of each sequence, any float dtype; they
                are not modified (work happens on a float32 copy).
            t: The batch's :class:`SamplingTensors`.

        Returns:
            The chosen tokens with their log-probs.

        Raises:
            ValueError: ``logits`` is not ``[N, V]`` matching ``t``.
        """
        with torch.no_grad():
            if t.all_greedy and not t.need_logprobs and _untouched(t):
                # Nothing changes the logits and no log-probs are asked: the argmax of the logits as
                # they are (exact in any float dtype), without the float32 copy of the vocabulary.
                _check_shape(logits, t)
                return SamplerOutput(token_ids=logits.argmax(dim=-1), logprobs=None, top_logprobs=None)
            processed = self._processed(logits, t)
            token_ids = processed.argmax(dim=-1)
            if not t.all_greedy:
                probs = self._sampling_probs(processed, t)
                # Exponential race: argmax(p_i / E_i) with E_i ~ Exp(1) picks i with probability
                # p_i, one independent draw per row, so a row's outcome depends on its own noise only.
                noise = _exponential_noise(probs.shape[0], probs.shape[1], t, probs.device)
                # Exp(1) can return 0; a zero-probability token must not win by 0/0 = nan.
                sampled = (probs / noise.clamp_min_(torch.finfo(torch.float32).tiny)).argmax(dim=-1)
                token_ids = torch.where(t.greedy, token_ids, sampled)

            if not t.need_logprobs:  # 46 us a step at one row, 0.9 ms at 32, over a 32k vocabulary
                return SamplerOutput(token_ids=token_ids, logprobs=None, top_logprobs=None)
            normaliser = processed.logsumexp(dim=-1, keepdim=True)
            chosen = processed.gather(1, token_ids.unsqueeze(1)) - normaliser
            top = None
            if t.max_logprobs > 0:
                values, ids = processed.topk(t.max_logprobs, dim=-1)
                top = (values - normaliser, ids)
        return SamplerOutput(token_ids=token_ids, logprobs=chosen.squeeze(1), top_logprobs=top)

    def probs(self, logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
        """Returns the distribution each row's token is drawn from, without sampling.

        The same stages as :meth:`__call__` (for checks, and for callers such as speculative
        decoding that need the target distribution); greedy rows get a one-hot at their argmax.

        Args:
            logits: ``[N, V]`` logits, as for :meth:`__call__`.
            t: The batch's :class:`SamplingTensors`.

        Returns:
            ``[N, V]`` float32 probabilities; each row sums to 1.

        Raises:
            ValueError: ``logits`` is not ``[N, V]`` matching ``t``.
        """
        with torch.no_grad():
            processed = self._processed(logits, t)
            one_hot = torch.zeros_like(processed).scatter_(1, processed.argmax(dim=-1, keepdim=True), 1.0)
            if t.all_greedy:
                return one_hot
            return torch.where(t.greedy.unsqueeze(1), one_hot, self._sampling_probs(processed, t))

    @staticmethod
    def _processed(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
        """Float32 copy of ``logits`` after the penalties and the ``min_tokens`` mask."""
        _check_shape(logits, t)
        processed = logits.to(dtype=torch.float32, copy=True)
        _apply_penalties(processed, t)
        if t.suppress is not None:
            processed[t.suppress] = float("-inf")
        if t.allowed is not None:
            rows, mask = t.allowed
            processed[rows] = processed[rows].masked_fill(~mask, float("-inf"))
        return processed

    @staticmethod
    def _sampling_probs(processed: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
        """Temperature, top-k, top-p and min-p, then softmax (greedy rows' values are meaningless)."""
        return _truncate(processed / t.temperature.unsqueeze(1), t).softmax(dim=-1)
