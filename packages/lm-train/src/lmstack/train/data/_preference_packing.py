"""Packing preference pairs (and KTO samples) into bins, and the padded alternative.

**Units.** A pair is one unit of two sequences, ``prompt + chosen`` and ``prompt + rejected``; a KTO
sample is a unit of one sequence. Units are packed whole: best-fit decreasing over the units' total
lengths (:func:`~lmstack.train.data._packing.best_fit_bins`, ``window`` units at a time, after a
seeded shuffle), so a pair's chosen and rejected always sit in the same bin, back to back (chosen
first), and a pair is never split across bins.

**A bin** follows the SFT conventions (:mod:`lmstack.train.data._packing`): ``input_ids``,
unshifted ``labels`` (-100 on prompts, padding and every sequence's first token; the completion's
tokens otherwise), ``position_ids`` restarting at 0 for every sequence and for the padding, and
``cu_seqlens`` with the padding as a segment of its own. It adds, per segment (sequence), which unit
of the bin it belongs to and which completion it is, and per unit its index in the dataset.

**Batches.** :class:`PreferenceBatch` (pairs) and :class:`KTOBatch` (KTO) carry, as tensors so that a
loss needs no host synchronisation: ``segment_ids`` (the segment of every token, to sum per-token
log-probs per sequence with ``index_add_``: :meth:`PreferenceBatch.segment_sum`), each segment's
unit within the batch (-1 for padding), and per unit the segment of its chosen and of its rejected
(KTO: of its completion, and its label), plus the units' indices in the dataset (for cached
reference log-probs). :class:`PaddedPreferenceBatch` is the padded alternative (rows ``0..P-1`` the
chosen sequences, rows ``P..2P-1`` the rejected ones, right padding and an attention mask), for
comparisons and benchmarks; :class:`PaddedKTOBatch` its KTO counterpart.

**Overflow** (``on_overflow``, as for SFT). A unit longer than ``max_length`` (a pair's two sequences
together) is left out with ``drop``; with ``truncate`` (and ``split``, which has no meaning for a pair
and acts as ``truncate``) it is cut by :func:`fit_unit`: first the prompt, keeping its **end** (the
tokens nearest the reply), but only as far as needed and never below ``max_length // (2n)`` tokens
for ``n`` completions; then the completions, keeping their beginnings, with the room left shared
fairly (a short completion keeps all of its tokens and the rest goes to the longer one). Each kept
completion has at least one token, so every sequence still carries a loss. Dropped and cut units are
counted in ``stats.dropped`` and ``stats.truncated``; ``stats.padding_ratio`` reports the padding.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, Literal, TypeVar

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor
from torch.utils.data import Dataset

from lmstack.core import DenseAttention, PackedAttention, Tokenizer
from lmstack.train.data._config import DataConfig
from lmstack.train.data._errors import DataError
from lmstack.train.data._packing import (
    best_fit_bins,
    collate_padded,
    host_boundaries,
    keep_host_boundaries,
    pad_id_of,
)
from lmstack.train.data._preference import PreferenceStats, TokenizedPreferences, tokenize_preferences
from lmstack.train.data._tokenize import IGNORE_INDEX, TokenizedSample

logger = logging.getLogger(__name__)

__all__ = [
    "KTOBatch",
    "PaddedKTOBatch",
    "PaddedPreferenceBatch",
    "PreferenceBatch",
    "PreferenceBin",
    "PreferencePackedDataset",
    "PreferencePaddedDataset",
    "PreferenceUnit",
    "build_preference_dataset",
    "collate_preference_bins",
    "collate_preference_padded",
    "fit_unit",
    "preference_rows",
]

Overflow = Literal["truncate", "drop", "split"]

_T = TypeVar("_T")


def _moved(batch: _T, device: torch.device | str, non_blocking: bool) -> _T:
    """A copy of a batch dataclass with every tensor field on ``device``."""
    moved: dict[str, Any] = {}
    for f in fields(batch):  # type: ignore[arg-type]
        value = getattr(batch, f.name)
        if isinstance(value, Tensor):
            moved[f.name] = value.to(device, non_blocking=non_blocking)
    out = replace(batch, **moved)  # type: ignore[type-var]
    keep_host_boundaries(batch, out)
    return out


# ------------------------------------------------------------------------------------------------
# overflow
# ------------------------------------------------------------------------------------------------


def fit_unit(prompt_length: int, completion_lengths: Sequence[int], max_length: int) -> tuple[int, list[int]]:
    """How much of a unit to keep so that its sequences fit ``max_length`` together (module docs).

    Args:
        prompt_length: The prompt's tokens (repeated in each sequence).
        completion_lengths: Each completion's tokens.
        max_length: The room for all the unit's sequences.

    Returns:
        The prompt tokens to keep (from its end) and each completion's tokens to keep (from its start).

    Raises:
        DataError: ``max_length`` is below two tokens per sequence.
    """
    n = len(completion_lengths)
    if max_length < 2 * n:
        raise DataError(f"max_length={max_length} leaves less than 2 tokens to each of {n} sequences")
    total = n * prompt_length + sum(completion_lengths)
    if total <= max_length:
        return prompt_length, list(completion_lengths)
    floor = max(1, max_length // (2 * n))
    prompt = min(prompt_length, max(floor, (max_length - sum(completion_lengths)) // n))
    room = max_length - n * prompt
    keep = [0] * n
    # Water-filling, shortest first: each takes at most an equal share of what is left.
    for left, k in enumerate(sorted(range(n), key=lambda i: (completion_lengths[i], i))):
        keep[k] = min(completion_lengths[k], room // (n - left))
        room -= keep[k]
    return prompt, keep


@dataclass
class _Plan:
    unit: NDArray[np.int64]  # index into TokenizedPreferences
    prompt: NDArray[np.int64]  # prompt tokens kept (from its end)
    completions: NDArray[np.int64]  # [units, n] completion tokens kept (from their start)

    @property
    def lengths(self) -> NDArray[np.int64]:
        return self.completions.sum(axis=1) + self.completions.shape[1] * self.prompt


def _plan(
    data: TokenizedPreferences, max_length: int, on_overflow: Overflow, stats: PreferenceStats
) -> _Plan:
    if on_overflow not in ("truncate", "drop", "split"):
        raise DataError(f"on_overflow must be 'truncate', 'drop' or 'split', got {on_overflow!r}")
    n = data.per_unit
    seq = data.sequence_lengths.astype(np.int64)
    prompt = data.prompt_lengths.reshape(-1, n)[:, 0].astype(np.int64)
    completions = seq - prompt[:, None]
    total = seq.sum(axis=1)
    keep_prompt = prompt.copy()
    keep_completions = completions.copy()
    kept = total <= max_length
    for i in np.flatnonzero(total > max_length).tolist():
        if on_overflow == "drop":
            stats.dropped += 1
            continue
        p, c = fit_unit(int(prompt[i]), completions[i].tolist(), max_length)
        keep_prompt[i] = p
        keep_completions[i] = c
        kept[i] = True
        stats.truncated += 1
    units = np.flatnonzero(kept).astype(np.int64)
    if units.shape[0] == 0:
        raise DataError(
            f"no preference sample fits: all {len(data)} are longer than max_length={max_length} and "
            f"data.on_overflow={on_overflow!r}"
        )
    plan = _Plan(units, keep_prompt[units], keep_completions[units])
    stats.pieces = int(units.shape[0]) * n
    stats.tokens = int(plan.lengths.sum())
    stats.loss_tokens = int(plan.completions.sum())
    return plan


@dataclass
class PreferenceUnit:
    """A pair (or KTO sample) after overflow handling: its sequences, ready for a bin or a row.

    Attributes:
        index: Its index in the :class:`~lmstack.train.data.TokenizedPreferences`.
        sequences: ``[prompt + chosen, prompt + rejected]`` or ``[prompt + completion]``, the loss on
            the completions only.
        label: KTO's label; None for a pair.
    """

    index: int
    sequences: list[TokenizedSample]
    label: bool | None = None


def _unit(data: TokenizedPreferences, plan: _Plan, k: int) -> PreferenceUnit:
    index = int(plan.unit[k])
    item = data[index]
    prompt = item.prompt_ids[item.prompt_ids.shape[0] - int(plan.prompt[k]) :]
    sequences = []
    for j, completion in enumerate(item.completion_ids):
        ids = np.concatenate([prompt, completion[: int(plan.completions[k, j])]]).astype(np.int32)
        mask = np.zeros(ids.shape[0], dtype=np.bool_)
        mask[prompt.shape[0] :] = True
        mask[0] = False
        sequences.append(TokenizedSample(input_ids=ids, loss_mask=mask, is_chat=True))
    return PreferenceUnit(index=index, sequences=sequences, label=item.label)


# ------------------------------------------------------------------------------------------------
# bins and batches
# ------------------------------------------------------------------------------------------------


@dataclass
class PreferenceBin:
    """One packed row of ``L`` tokens holding whole pairs (or KTO samples).

    Attributes:
        input_ids: ``[L]`` token ids (``int64``).
        labels: ``[L]`` unshifted labels, -100 where no loss is taken.
        position_ids: ``[L]`` positions, restarting at 0 for every sequence and for the padding.
        cu_seqlens: ``[S + 1]`` cumulative segment lengths (``int32``); padding is the last segment.
        segment_unit: ``[S]`` the unit of this bin (``0..U-1``) each segment belongs to; -1 for padding.
        segment_completion: ``[S]`` which completion each segment is (0 chosen, 1 rejected; 0 for
            KTO); -1 for padding.
        unit_index: ``[U]`` each unit's index in the dataset.
        unit_label: ``[U]`` KTO labels (bool); None for pairs.
        num_padding: Padding tokens at the end.
    """

    input_ids: Tensor
    labels: Tensor
    position_ids: Tensor
    cu_seqlens: Tensor
    segment_unit: Tensor
    segment_completion: Tensor
    unit_index: Tensor
    unit_label: Tensor | None = None
    num_padding: int = 0


@dataclass
class _PackedFields:
    input_ids: Tensor
    labels: Tensor
    position_ids: Tensor
    cu_seqlens: Tensor
    max_seqlen: int
    segment_ids: Tensor
    num_tokens: int
    num_loss_tokens: int

    def attention(self, use_flash: bool | None = None) -> PackedAttention:
        """The attention backend that keeps attention inside each sequence."""
        return PackedAttention(
            self.cu_seqlens, max_seqlen=self.max_seqlen, use_flash=use_flash,
            host_cu_seqlens=host_boundaries(self),
        )  # fmt: skip

    @property
    def num_segments(self) -> int:
        """Segments (sequences, plus one per padded row) in the batch."""
        return int(self.cu_seqlens.shape[0]) - 1

    def segment_sum(self, values: Tensor) -> Tensor:
        """Sums a per-token ``[B, L]`` tensor (such as masked log-probs) per segment, without a host sync.

        Args:
            values: ``[B, L]`` values, on the batch's device.

        Returns:
            ``[S]`` sums, one per segment (padding segments included).
        """
        out = torch.zeros(self.num_segments, dtype=values.dtype, device=values.device)
        return out.index_add_(0, self.segment_ids.reshape(-1), values.reshape(-1))


@dataclass
class PreferenceBatch(_PackedFields):
    """A batch of packed bins of pairs, for the model with :class:`lmstack.core.PackedAttention`.

    Attributes:
        input_ids: ``[B, L]`` token ids.
        labels: ``[B, L]`` unshifted labels (-100: no loss; the completions' tokens carry it).
        position_ids: ``[B, L]`` positions restarting per sequence.
        cu_seqlens: ``[S + 1]`` cumulative segment lengths over the ``B * L`` flattened tokens.
        max_seqlen: The longest segment.
        segment_ids: ``[B, L]`` the segment (``0..S-1``) of every token.
        num_tokens: Real (non-padding) tokens.
        num_loss_tokens: Tokens whose label is not -100.
        segment_pair: ``[S]`` the pair (``0..P-1``, batch order) of each segment; -1 for padding.
        segment_is_chosen: ``[S]`` whether a segment is a chosen sequence.
        chosen_segments: ``[P]`` the segment of each pair's chosen sequence.
        rejected_segments: ``[P]`` the segment of each pair's rejected sequence.
        pair_index: ``[P]`` each pair's index in the dataset.
        num_pairs: ``P``.

    Example:
        >>> logps = batch.segment_sum(token_logps)  # doctest: +SKIP
        >>> chosen, rejected = logps[batch.chosen_segments], logps[batch.rejected_segments]  # doctest: +SKIP
    """

    segment_pair: Tensor
    segment_is_chosen: Tensor
    chosen_segments: Tensor
    rejected_segments: Tensor
    pair_index: Tensor
    num_pairs: int

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PreferenceBatch:
        """The batch on another device (every tensor moves)."""
        return _moved(self, device, non_blocking)


def preference_rows(batch: PreferenceBatch) -> list[PreferenceBatch]:
    """A packed batch as one batch per row (bin), each numbered from 0 (pairs never cross rows).

    Pipeline parallelism runs each bin as a microbatch, and its last stage computes each bin's loss
    from that bin alone.
    """
    rows, length = batch.input_ids.shape
    out = []
    for r in range(rows):
        seg = batch.segment_ids[r]
        s0, s1 = int(seg[0]), int(seg[-1]) + 1
        cu = batch.cu_seqlens[s0 : s1 + 1] - r * length
        pairs = batch.segment_pair[s0:s1]
        real = pairs >= 0
        p0 = int(pairs[real].min()) if bool(real.any()) else 0
        p1 = int(pairs[real].max()) + 1 if bool(real.any()) else 0
        labels = batch.labels[r : r + 1]
        seg_lengths = (cu[1:] - cu[:-1]).to(torch.int64)
        out.append(
            PreferenceBatch(
                input_ids=batch.input_ids[r : r + 1],
                labels=labels,
                position_ids=batch.position_ids[r : r + 1],
                cu_seqlens=cu,
                max_seqlen=int(seg_lengths.max()),
                segment_ids=(seg - s0).unsqueeze(0),
                num_tokens=int(seg_lengths[real].sum()),
                num_loss_tokens=int((labels != IGNORE_INDEX).sum()),
                segment_pair=torch.where(real, pairs - p0, pairs),
                segment_is_chosen=batch.segment_is_chosen[s0:s1],
                chosen_segments=batch.chosen_segments[p0:p1] - s0,
                rejected_segments=batch.rejected_segments[p0:p1] - s0,
                pair_index=batch.pair_index[p0:p1],
                num_pairs=p1 - p0,
            )
        )
    return out


@dataclass
class KTOBatch(_PackedFields):
    """A batch of packed bins of KTO samples (one sequence each, with a label).

    Attributes:
        input_ids: ``[B, L]`` token ids.
        labels: ``[B, L]`` unshifted labels (-100: no loss; the completions' tokens carry it).
        position_ids: ``[B, L]`` positions restarting per sequence.
        cu_seqlens: ``[S + 1]`` cumulative segment lengths over the ``B * L`` flattened tokens.
        max_seqlen: The longest segment.
        segment_ids: ``[B, L]`` the segment of every token.
        num_tokens: Real (non-padding) tokens.
        num_loss_tokens: Tokens whose label is not -100.
        segment_sample: ``[S]`` the sample (``0..N-1``) of each segment; -1 for padding.
        completion_segments: ``[N]`` each sample's segment.
        kto_labels: ``[N]`` bool: whether each sample's completion is desirable.
        sample_index: ``[N]`` each sample's index in the dataset.
        num_samples: ``N``.
    """

    segment_sample: Tensor
    completion_segments: Tensor
    kto_labels: Tensor
    sample_index: Tensor
    num_samples: int

    def to(self, device: torch.device | str, non_blocking: bool = False) -> KTOBatch:
        """The batch on another device (every tensor moves)."""
        return _moved(self, device, non_blocking)


@dataclass
class PaddedPreferenceBatch:
    """Pairs one sequence per row, right-padded: the unpacked alternative.

    Attributes:
        input_ids: ``[2P, T]``: rows ``0..P-1`` the chosen sequences, rows ``P..2P-1`` the rejected
            ones (pair ``i`` is rows ``i`` and ``P + i``).
        labels: ``[2P, T]`` unshifted labels (-100 on prompts, padding and each row's first token).
        position_ids: ``[2P, T]`` positions ``0..T-1``.
        attention_mask: ``[2P, T]``, 1 for real tokens.
        pair_index: ``[P]`` each pair's index in the dataset.
        num_pairs: ``P``.
        num_tokens: Real tokens.
        num_loss_tokens: Tokens that carry the loss.
        num_padding: Padding tokens.
    """

    input_ids: Tensor
    labels: Tensor
    position_ids: Tensor
    attention_mask: Tensor
    pair_index: Tensor
    num_pairs: int
    num_tokens: int
    num_loss_tokens: int
    num_padding: int

    def attention(self) -> DenseAttention:
        """Causal attention that ignores the padding."""
        return DenseAttention(self.attention_mask)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PaddedPreferenceBatch:
        """The batch on another device."""
        return _moved(self, device, non_blocking)


@dataclass
class PaddedKTOBatch:
    """KTO samples one per row, right-padded.

    Attributes:
        input_ids: ``[N, T]`` token ids.
        labels: ``[N, T]`` unshifted labels.
        position_ids: ``[N, T]`` positions.
        attention_mask: ``[N, T]``, 1 for real tokens.
        kto_labels: ``[N]`` bool: whether each completion is desirable.
        sample_index: ``[N]`` each sample's index in the dataset.
        num_samples: ``N``.
        num_tokens: Real tokens.
        num_loss_tokens: Tokens that carry the loss.
        num_padding: Padding tokens.
    """

    input_ids: Tensor
    labels: Tensor
    position_ids: Tensor
    attention_mask: Tensor
    kto_labels: Tensor
    sample_index: Tensor
    num_samples: int
    num_tokens: int
    num_loss_tokens: int
    num_padding: int

    def attention(self) -> DenseAttention:
        """Causal attention that ignores the padding."""
        return DenseAttention(self.attention_mask)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PaddedKTOBatch:
        """The batch on another device."""
        return _moved(self, device, non_blocking)


def collate_preference_bins(bins: Sequence[PreferenceBin]) -> PreferenceBatch | KTOBatch:
    """Stacks bins (all of one length, all pairs or all KTO) into a batch.

    Args:
        bins: The bins.

    Returns:
        A :class:`PreferenceBatch` for pairs, a :class:`KTOBatch` for KTO samples.

    Raises:
        DataError: No bins, bins of different lengths, or pairs mixed with KTO samples.
    """
    if not bins:
        raise DataError("collate_preference_bins() needs at least one bin")
    length = int(bins[0].input_ids.shape[0])
    if any(int(b.input_ids.shape[0]) != length for b in bins):
        raise DataError("packed bins of one batch must all have the same length")
    kto = bins[0].unit_label is not None
    if any((b.unit_label is not None) != kto for b in bins):
        raise DataError("a batch cannot mix pairs and KTO samples")
    cu = [torch.zeros(1, dtype=torch.int32)]
    segment_units = []
    unit_offset = 0
    for row, item in enumerate(bins):
        cu.append(item.cu_seqlens[1:].to(torch.int32) + row * length)
        units = item.segment_unit.clone()
        units[units >= 0] += unit_offset
        segment_units.append(units)
        unit_offset += int(item.unit_index.shape[0])
    cu_seqlens = torch.cat(cu)
    seg_lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    segment_unit = torch.cat(segment_units)
    segment_completion = torch.cat([b.segment_completion for b in bins])
    labels = torch.stack([b.labels for b in bins])
    segment_ids = torch.repeat_interleave(torch.arange(seg_lengths.shape[0]), seg_lengths).reshape(
        len(bins), length
    )
    real = segment_unit >= 0
    common: dict[str, Any] = {
        "input_ids": torch.stack([b.input_ids for b in bins]),
        "labels": labels,
        "position_ids": torch.stack([b.position_ids for b in bins]),
        "cu_seqlens": cu_seqlens,
        "max_seqlen": int(seg_lengths.max()),
        "segment_ids": segment_ids,
        "num_tokens": len(bins) * length - sum(b.num_padding for b in bins),
        "num_loss_tokens": int((labels != IGNORE_INDEX).sum()),
    }
    index = torch.cat([b.unit_index for b in bins])
    segments = torch.arange(seg_lengths.shape[0])
    if kto:
        # Each KTO sample has exactly one segment, in unit order.
        return KTOBatch(
            **common,
            segment_sample=segment_unit,
            completion_segments=segments[real],
            kto_labels=torch.cat([b.unit_label for b in bins if b.unit_label is not None]),
            sample_index=index,
            num_samples=unit_offset,
        )
    # Pairs are laid out chosen then rejected, so the real segments in order are (c0, r0, c1, r1, ...).
    pair_segments = segments[real].reshape(-1, 2)
    return PreferenceBatch(
        **common,
        segment_pair=segment_unit,
        segment_is_chosen=real & (segment_completion == 0),
        chosen_segments=pair_segments[:, 0].contiguous(),
        rejected_segments=pair_segments[:, 1].contiguous(),
        pair_index=index,
        num_pairs=unit_offset,
    )


def collate_preference_padded(
    units: Sequence[PreferenceUnit], *, pad_id: int, pad_to_multiple_of: int | None = None
) -> PaddedPreferenceBatch | PaddedKTOBatch:
    """Pads units into rows: a pair's chosen in the first half of the rows, its rejected in the second.

    Args:
        units: Pairs, or KTO samples (not mixed).
        pad_id: The padding token id.
        pad_to_multiple_of: Round the row length up to a multiple of this.

    Returns:
        A :class:`PaddedPreferenceBatch` for pairs, a :class:`PaddedKTOBatch` for KTO samples.

    Raises:
        DataError: No units, or pairs mixed with KTO samples.
    """
    if not units:
        raise DataError("collate_preference_padded() needs at least one unit")
    kto = units[0].label is not None
    if any((u.label is not None) != kto for u in units):
        raise DataError("a batch cannot mix pairs and KTO samples")
    index = torch.tensor([u.index for u in units], dtype=torch.int64)
    if kto:
        rows = collate_padded(
            [u.sequences[0] for u in units], pad_id=pad_id, pad_to_multiple_of=pad_to_multiple_of
        )
        return PaddedKTOBatch(
            input_ids=rows.input_ids,
            labels=rows.labels,
            position_ids=rows.position_ids,
            attention_mask=rows.attention_mask,
            kto_labels=torch.tensor([bool(u.label) for u in units], dtype=torch.bool),
            sample_index=index,
            num_samples=len(units),
            num_tokens=rows.num_tokens,
            num_loss_tokens=rows.num_loss_tokens,
            num_padding=rows.num_padding,
        )
    sequences = [u.sequences[0] for u in units] + [u.sequences[1] for u in units]
    rows = collate_padded(sequences, pad_id=pad_id, pad_to_multiple_of=pad_to_multiple_of)
    return PaddedPreferenceBatch(
        input_ids=rows.input_ids,
        labels=rows.labels,
        position_ids=rows.position_ids,
        attention_mask=rows.attention_mask,
        pair_index=index,
        num_pairs=len(units),
        num_tokens=rows.num_tokens,
        num_loss_tokens=rows.num_loss_tokens,
        num_padding=rows.num_padding,
    )


# ------------------------------------------------------------------------------------------------
# datasets
# ------------------------------------------------------------------------------------------------


class _PlannedUnits:
    def __init__(
        self, data: TokenizedPreferences, max_length: int, *, pad_id: int, on_overflow: Overflow = "truncate"
    ) -> None:
        if max_length < 2 * data.per_unit:
            raise DataError(f"max_length must be at least {2 * data.per_unit}, got {max_length}")
        self.data = data
        self.max_length = int(max_length)
        self.pad_id = int(pad_id)
        self.on_overflow = on_overflow
        self.paired = data.paired
        self.stats = replace(data.stats, formats=dict(data.stats.formats))
        self._plan = _plan(data, self.max_length, on_overflow, self.stats)

    def unit(self, k: int) -> PreferenceUnit:
        """Planned unit ``k`` (``0..units-1``, in the order of the files), after overflow handling."""
        return _unit(self.data, self._plan, k)

    @property
    def num_units(self) -> int:
        """Pairs (or KTO samples) kept after overflow handling."""
        return int(self._plan.unit.shape[0])


class PreferencePackedDataset(_PlannedUnits, Dataset[PreferenceBin]):
    """Pairs (or KTO samples) packed whole into bins of ``max_length`` tokens, addressable by index.

    The bins are computed once from the units' lengths (deterministic for a given ``seed``).

    Args:
        data: The tokenized preference data.
        max_length: Tokens per bin.
        pad_id: The padding token id.
        on_overflow: What to do with units longer than ``max_length`` (see the module docs).
        seed: Seed of the shuffle before packing.
        shuffle: Shuffle the units before packing (else pack them in the order of the files).
        window: Units packed together by best-fit decreasing.

    Attributes:
        stats: Preparation and packing counters (``padding_ratio``, ``truncated``, ``dropped`` ...).
    """

    def __init__(
        self,
        data: TokenizedPreferences,
        max_length: int,
        *,
        pad_id: int,
        on_overflow: Overflow = "truncate",
        seed: int = 0,
        shuffle: bool = True,
        window: int = 1024,
    ) -> None:
        super().__init__(data, max_length, pad_id=pad_id, on_overflow=on_overflow)
        count = self.num_units
        order = np.random.default_rng(seed).permutation(count) if shuffle else np.arange(count)
        lengths = self._plan.lengths
        members: list[int] = []
        bounds = [0]
        for bin_items in best_fit_bins(lengths[order], self.max_length, window):
            members.extend(int(order[i]) for i in bin_items)
            bounds.append(len(members))
        self._members = np.asarray(members, dtype=np.int64)
        self._bounds = np.asarray(bounds, dtype=np.int64)
        self.stats.bins = len(bounds) - 1
        self.stats.padding = self.stats.bins * self.max_length - self.stats.tokens
        logger.info("packed preferences: %s", self.stats.summary())

    def __len__(self) -> int:
        return int(self._bounds.shape[0] - 1)

    def bin_units(self, index: int) -> list[int]:
        """The planned units (see :meth:`unit`) in bin ``index``, in order."""
        lo, hi = int(self._bounds[index]), int(self._bounds[index + 1])
        return self._members[lo:hi].tolist()

    def __getitem__(self, index: int) -> PreferenceBin:
        if not -len(self) <= index < len(self):
            raise IndexError(f"bin {index} out of range for {len(self)} bins")
        index %= len(self)
        ids_parts: list[NDArray[np.int64]] = []
        label_parts: list[NDArray[np.int64]] = []
        pos_parts: list[NDArray[np.int64]] = []
        cu = [0]
        segment_unit: list[int] = []
        segment_completion: list[int] = []
        unit_index: list[int] = []
        unit_label: list[bool] = []
        for local, k in enumerate(self.bin_units(index)):
            unit = self.unit(k)
            unit_index.append(unit.index)
            unit_label.append(bool(unit.label))
            for j, sequence in enumerate(unit.sequences):
                ids = sequence.input_ids.astype(np.int64)
                labels = sequence.labels
                labels[0] = IGNORE_INDEX
                ids_parts.append(ids)
                label_parts.append(labels)
                pos_parts.append(np.arange(ids.shape[0], dtype=np.int64))
                cu.append(cu[-1] + ids.shape[0])
                segment_unit.append(local)
                segment_completion.append(j)
        pad = self.max_length - cu[-1]
        if pad > 0:
            ids_parts.append(np.full(pad, self.pad_id, dtype=np.int64))
            label_parts.append(np.full(pad, IGNORE_INDEX, dtype=np.int64))
            pos_parts.append(np.arange(pad, dtype=np.int64))
            cu.append(self.max_length)
            segment_unit.append(-1)
            segment_completion.append(-1)
        return PreferenceBin(
            input_ids=torch.from_numpy(np.concatenate(ids_parts)),
            labels=torch.from_numpy(np.concatenate(label_parts)),
            position_ids=torch.from_numpy(np.concatenate(pos_parts)),
            cu_seqlens=torch.tensor(cu, dtype=torch.int32),
            segment_unit=torch.tensor(segment_unit, dtype=torch.int64),
            segment_completion=torch.tensor(segment_completion, dtype=torch.int64),
            unit_index=torch.tensor(unit_index, dtype=torch.int64),
            unit_label=None if self.paired else torch.tensor(unit_label, dtype=torch.bool),
            num_padding=pad,
        )

    def collate(self, bins: Sequence[PreferenceBin]) -> PreferenceBatch | KTOBatch:
        """Collates bins into a batch (:func:`collate_preference_bins`)."""
        return collate_preference_bins(bins)


class PreferencePaddedDataset(_PlannedUnits, Dataset[PreferenceUnit]):
    """Pairs (or KTO samples) one unit per item, with the same overflow rules as the packed dataset.

    Item ``i`` is the ``i``-th unit kept, in the order of the files; :meth:`collate` pads a batch of
    them (:func:`collate_preference_padded`).

    Args:
        data: The tokenized preference data.
        max_length: The most tokens of a unit's sequences together (as for a bin).
        pad_id: The padding token id.
        on_overflow: What to do with units longer than ``max_length``.
    """

    def __len__(self) -> int:
        return self.num_units

    def __getitem__(self, index: int) -> PreferenceUnit:
        if not -len(self) <= index < len(self):
            raise IndexError(f"item {index} out of range for {len(self)} items")
        return self.unit(index % len(self))

    def collate(self, units: Sequence[PreferenceUnit]) -> PaddedPreferenceBatch | PaddedKTOBatch:
        """Pads units into a batch (:func:`collate_preference_padded`)."""
        return collate_preference_padded(units, pad_id=self.pad_id)


def build_preference_dataset(
    config: DataConfig,
    tokenizer: Tokenizer,
    *,
    format: str | None = None,
    show_progress: bool | None = None,
) -> PreferencePackedDataset | PreferencePaddedDataset:
    """Reads, tokenizes (or reuses the cache) and packs the preference data of ``config``.

    Args:
        config: The data config (``pack``, ``max_length``, ``on_overflow``, ``shuffle``,
            ``shuffle_seed``, ``pack_window`` and what :func:`tokenize_preferences` uses).
        tokenizer: The model's tokenizer; its pad token pads (else its eos token, else id 0).
        format: The preference mode, overriding ``config.format`` (``preference``, ``kto`` ...).
        show_progress: Show a progress bar while tokenizing (None: only on a terminal).

    Returns:
        A :class:`PreferencePackedDataset` when ``config.pack``, else a
        :class:`PreferencePaddedDataset`.

    Raises:
        DataError: See :func:`tokenize_preferences`; also when no unit fits.
    """
    data = tokenize_preferences(config, tokenizer, format=format, show_progress=show_progress)
    pad_id = pad_id_of(tokenizer)
    dataset: PreferencePackedDataset | PreferencePaddedDataset
    if config.pack:
        dataset = PreferencePackedDataset(
            data,
            config.max_length,
            pad_id=pad_id,
            on_overflow=config.on_overflow,
            seed=config.shuffle_seed,
            shuffle=config.shuffle,
            window=config.pack_window,
        )
    else:
        dataset = PreferencePaddedDataset(
            data, config.max_length, pad_id=pad_id, on_overflow=config.on_overflow
        )
    logger.info("preference data: %s", dataset.stats.summary())
    return dataset
