"""Packing tokenized samples into fixed-length bins, and the padded alternative.

**Bins.** :class:`PackedDataset` fills bins of exactly ``max_length`` tokens with whole samples by
best-fit decreasing (:func:`best_fit_bins`): the (shuffled) samples are taken ``window`` at a time;
within a window they are placed longest first, each into the open bin whose free space fits it most
tightly, or into a new bin. Bins never mix samples more than ``window`` positions apart in the shuffled
order, packing costs ``O(window)`` memory and about ``O(n log window)`` time, and with a window of a
thousand samples the padding left is typically well under 1-2% (versus 10-30% for a greedy
"append until full" packer on skewed lengths). The plan depends only on the sample lengths, the seed
and the window, so bins are computed once, deterministically, and addressed by index.

**A bin** holds, for ``L = max_length`` tokens:

* ``input_ids [L]``: the samples back to back, then padding (the pad id);
* ``labels [L]``: **unshifted** (``labels[t]`` is the target of the logits at ``t - 1``, as in
  ``transformers``), -100 where no loss is taken: on prompt tokens, on padding, and on **the first
  token of every sample**, so the last token of one sample is never trained to predict the first
  token of the next. The usual shifted loss ``cross_entropy(logits[:, :-1], labels[:, 1:])`` is
  therefore exactly the sum of the per-sample losses;
* ``position_ids [L]``: restarting at 0 for every sample, and for the padding;
* ``cu_seqlens``: cumulative segment lengths ``[0, len0, len0+len1, ..., L]``, where the padding at
  the end is **a segment of its own** (so attention stays within each sample, padding attends only to
  padding, and :class:`lmstack.core.PackedAttention` — which needs every token in some segment —
  accepts the bin as is; ``PackedAttention.from_positions(position_ids)`` finds the same segments).

**Overflow.** A sample longer than ``max_length`` is cut to its first ``max_length`` tokens
(``truncate``), left out (``drop``), or for text documents cut into pieces of ``max_length`` tokens that
overlap by one token, so every token is still predicted exactly once (``split``; chats are truncated).
A truncated conversation left with no trained token is left out (counted as ``no_loss``).

:class:`PaddedDataset` applies the same overflow rules but yields one sample per row; its
:func:`collate_padded` pads a batch to its longest row (right padding, with an attention mask).
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, Literal, TypeVar

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor
from torch.utils.data import Dataset

from lmstack.core import DenseAttention, PackedAttention
from lmstack.train.data._cache import TokenizedDataset
from lmstack.train.data._errors import DataError
from lmstack.train.data._stats import DataStats
from lmstack.train.data._tokenize import IGNORE_INDEX, TokenizedSample

logger = logging.getLogger(__name__)

__all__ = [
    "PackedBatch",
    "PackedBin",
    "PackedDataset",
    "PaddedBatch",
    "PaddedDataset",
    "best_fit_bins",
    "collate_packed",
    "collate_padded",
]

Overflow = Literal["truncate", "drop", "split"]


# ------------------------------------------------------------------------------------------------
# the packing algorithm
# ------------------------------------------------------------------------------------------------


def best_fit_bins(
    lengths: Sequence[int] | NDArray[np.integer], capacity: int, window: int = 1024
) -> Iterator[list[int]]:
    """Best-fit decreasing bin packing over consecutive windows of items.

    Args:
        lengths: The item sizes, in the order they arrive (each at most ``capacity``).
        capacity: The size of a bin.
        window: How many consecutive items are packed together; the bins of a window are closed
            before the next window starts, so memory stays ``O(window)``.

    Yields:
        Bins, each a list of item indices (in placement order: longest first), window by window.

    Raises:
        ValueError: An item is larger than ``capacity`` or not positive, or ``window < 1``.
    """
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    sizes = [int(x) for x in lengths]
    for begin in range(0, len(sizes), window):
        indices = sorted(range(begin, min(len(sizes), begin + window)), key=lambda i: (-sizes[i], i))
        bins: list[list[int]] = []
        free: list[tuple[int, int]] = []  # (space left, bin number), sorted
        for i in indices:
            size = sizes[i]
            if not 0 < size <= capacity:
                raise ValueError(f"item {i} has size {size}, outside 1..{capacity}")
            slot = bisect.bisect_left(free, (size, -1))
            if slot < len(free):
                space, number = free.pop(slot)
                bins[number].append(i)
                space -= size
            else:
                number = len(bins)
                bins.append([i])
                space = capacity - size
            if space > 0:
                bisect.insort(free, (space, number))
        yield from bins


# ------------------------------------------------------------------------------------------------
# bins and batches
# ------------------------------------------------------------------------------------------------


@dataclass
class PackedBin:
    """One packed row of ``L`` tokens (see the module docs for the conventions).

    Attributes:
        input_ids: ``[L]`` token ids (``int64``).
        labels: ``[L]`` unshifted labels, -100 where no loss is taken.
        position_ids: ``[L]`` positions, restarting at 0 for every sample and for the padding.
        cu_seqlens: ``[segments + 1]`` cumulative segment lengths (``int32``); padding is the last
            segment when there is any.
        num_padding: Padding tokens at the end.
    """

    input_ids: Tensor
    labels: Tensor
    position_ids: Tensor
    cu_seqlens: Tensor
    num_padding: int = 0


_B = TypeVar("_B", "PackedBatch", "PaddedBatch")


def _moved(batch: _B, device: torch.device | str, non_blocking: bool) -> _B:
    """A copy of a batch with every tensor field on ``device``."""
    tensors = {f.name: getattr(batch, f.name) for f in fields(batch)}
    moved: dict[str, Any] = {
        k: v.to(device, non_blocking=non_blocking) for k, v in tensors.items() if isinstance(v, Tensor)
    }
    out = replace(batch, **moved)
    keep_host_boundaries(batch, out)
    return out


def keep_host_boundaries(source: Any, moved: Any) -> None:
    """Let a moved batch keep its sample boundaries in host memory too.

    The attention reads them there (the CPU kernels, the checks) instead of synchronising with the
    accelerator the batch moved to, which would stall every micro-batch.
    """
    host = host_boundaries(source)
    if host is not None:
        moved._host_cu_seqlens = host


def host_boundaries(batch: Any) -> Tensor | None:
    """The batch's ``cu_seqlens`` in host memory, if it has them there (:func:`keep_host_boundaries`)."""
    host: Tensor | None = getattr(batch, "_host_cu_seqlens", None)
    cu_seqlens = getattr(batch, "cu_seqlens", None)  # padded batches have none
    if host is None and cu_seqlens is not None and cu_seqlens.device.type == "cpu":
        host = cu_seqlens
    return host


@dataclass
class PackedBatch:
    """A batch of packed bins, ready for the model with :class:`lmstack.core.PackedAttention`.

    Attributes:
        input_ids: ``[B, L]`` token ids.
        labels: ``[B, L]`` unshifted labels (-100: no loss; every sample's first token is -100).
        position_ids: ``[B, L]`` positions restarting per sample.
        cu_seqlens: Cumulative segment lengths over the ``B * L`` flattened tokens (``int32``).
        max_seqlen: The longest segment.
        num_tokens: Real (non-padding) tokens.
        num_loss_tokens: Tokens that carry the loss (``labels != -100``), for normalising a summed
            loss over gradient-accumulation steps and ranks.

    Example:
        >>> logits = model(batch.input_ids, batch.position_ids, batch.attention())  # doctest: +SKIP
    """

    input_ids: Tensor
    labels: Tensor
    position_ids: Tensor
    cu_seqlens: Tensor
    max_seqlen: int
    num_tokens: int
    num_loss_tokens: int

    def attention(self, use_flash: bool | None = None) -> PackedAttention:
        """The attention backend that keeps attention inside each sample."""
        return PackedAttention(
            self.cu_seqlens, max_seqlen=self.max_seqlen, use_flash=use_flash,
            host_cu_seqlens=host_boundaries(self),
        )  # fmt: skip

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedBatch:
        """The batch on another device (``cu_seqlens`` moves too)."""
        return _moved(self, device, non_blocking)


@dataclass
class PaddedBatch:
    """A batch of samples, one per row, right-padded (the unpacked alternative).

    Attributes:
        input_ids: ``[B, T]`` token ids.
        labels: ``[B, T]`` unshifted labels (-100 on padding and untrained tokens).
        position_ids: ``[B, T]`` positions ``0..T-1``.
        attention_mask: ``[B, T]``, 1 for real tokens, 0 for padding.
        num_tokens: Real (non-padding) tokens.
        num_loss_tokens: Tokens that carry the loss.
        num_padding: Padding tokens.
    """

    input_ids: Tensor
    labels: Tensor
    position_ids: Tensor
    attention_mask: Tensor
    num_tokens: int
    num_loss_tokens: int
    num_padding: int

    def attention(self) -> DenseAttention:
        """Causal attention that ignores the padding."""
        return DenseAttention(self.attention_mask)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PaddedBatch:
        """The batch on another device."""
        return _moved(self, device, non_blocking)


def pad_id_of(tokenizer: Any) -> int:
    """The id that pads batches: the tokenizer's pad token, else its eos token, else 0."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return int(tokenizer.eos_token_id) if tokenizer.eos_token_id is not None else 0


def collate_packed(bins: Sequence[PackedBin]) -> PackedBatch:
    """Stacks packed bins (all of the same length) into a :class:`PackedBatch`.

    Args:
        bins: The bins.

    Returns:
        The batch; ``cu_seqlens`` covers the rows one after another.

    Raises:
        DataError: No bins, or bins of different lengths.
    """
    if not bins:
        raise DataError("collate_packed() needs at least one bin")
    length = int(bins[0].input_ids.shape[0])
    if any(int(b.input_ids.shape[0]) != length for b in bins):
        raise DataError("packed bins of one batch must all have the same length")
    cu = [torch.zeros(1, dtype=torch.int32)]
    for row, item in enumerate(bins):
        cu.append(item.cu_seqlens[1:].to(torch.int32) + row * length)
    cu_seqlens = torch.cat(cu)
    labels = torch.stack([b.labels for b in bins])
    return PackedBatch(
        input_ids=torch.stack([b.input_ids for b in bins]),
        labels=labels,
        position_ids=torch.stack([b.position_ids for b in bins]),
        cu_seqlens=cu_seqlens,
        max_seqlen=int((cu_seqlens[1:] - cu_seqlens[:-1]).max()),
        num_tokens=len(bins) * length - sum(b.num_padding for b in bins),
        num_loss_tokens=int((labels != IGNORE_INDEX).sum()),
    )


def collate_padded(
    samples: Sequence[TokenizedSample], *, pad_id: int, pad_to_multiple_of: int | None = None
) -> PaddedBatch:
    """Right-pads samples to the longest one into a :class:`PaddedBatch`.

    Args:
        samples: Tokenized samples (labels are taken from their loss masks; the first token of each
            carries no loss).
        pad_id: The padding token id.
        pad_to_multiple_of: Round the row length up to a multiple of this.

    Returns:
        The batch.

    Raises:
        DataError: No samples.
    """
    if not samples:
        raise DataError("collate_padded() needs at least one sample")
    longest = max(len(s) for s in samples)
    if pad_to_multiple_of:
        longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    batch = len(samples)
    input_ids = torch.full((batch, longest), pad_id, dtype=torch.long)
    labels = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((batch, longest), dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(sample)
        input_ids[row, :n] = torch.from_numpy(sample.input_ids.astype(np.int64))
        labels[row, :n] = torch.from_numpy(sample.labels)
        labels[row, 0] = IGNORE_INDEX
        mask[row, :n] = 1
    real = int(mask.sum())
    return PaddedBatch(
        input_ids=input_ids,
        labels=labels,
        position_ids=torch.arange(longest).expand(batch, longest).clone(),
        attention_mask=mask,
        num_tokens=real,
        num_loss_tokens=int((labels != IGNORE_INDEX).sum()),
        num_padding=batch * longest - real,
    )


# ------------------------------------------------------------------------------------------------
# overflow: samples -> pieces
# ------------------------------------------------------------------------------------------------


@dataclass
class _Pieces:
    sample: NDArray[np.int64]  # which sample
    start: NDArray[np.int64]  # first token within the sample
    length: NDArray[np.int64]  # tokens taken


def _plan_pieces(data: TokenizedDataset, max_length: int, on_overflow: Overflow, stats: DataStats) -> _Pieces:
    if on_overflow not in ("truncate", "drop", "split"):
        raise DataError(f"on_overflow must be 'truncate', 'drop' or 'split', got {on_overflow!r}")
    lengths = data.lengths.astype(np.int64)
    offsets = np.asarray(data.offsets)
    mask = data.loss_mask
    fits = (lengths <= max_length) & (lengths > 0)
    sample = [np.flatnonzero(fits)]
    start = [np.zeros(int(fits.sum()), dtype=np.int64)]
    length = [lengths[fits]]
    loss_tokens = int(data.num_loss_tokens)
    for i in np.flatnonzero(lengths > max_length).tolist():
        n = int(lengths[i])
        base = int(offsets[i])
        whole = int(np.count_nonzero(mask[base : base + n]))
        if on_overflow == "drop":
            stats.dropped += 1
            loss_tokens -= whole
            continue
        stats.truncated += 1
        if on_overflow == "split" and not data.is_chat(i):
            # Pieces overlap by one token: a piece's first token only conditions (its label is -100),
            # and it was the previous piece's last target, so every token is predicted exactly once.
            stride = max_length - 1
            begins = list(range(0, n - 1, stride))
            for b in begins:
                sample.append(np.array([i]))
                start.append(np.array([b]))
                length.append(np.array([min(max_length, n - b)]))
            continue
        kept = int(np.count_nonzero(mask[base + 1 : base + max_length]))
        loss_tokens -= whole - kept
        if kept == 0:
            stats.no_loss += 1
            continue
        sample.append(np.array([i]))
        start.append(np.array([0]))
        length.append(np.array([max_length]))
    pieces = _Pieces(
        sample=np.concatenate(sample).astype(np.int64),
        start=np.concatenate(start).astype(np.int64),
        length=np.concatenate(length).astype(np.int64),
    )
    if pieces.sample.shape[0] == 0:
        raise DataError(
            f"no sample fits: all {data.num_samples} samples are longer than max_length={max_length} and "
            f"data.on_overflow={on_overflow!r}"
        )
    stats.pieces = int(pieces.sample.shape[0])
    stats.tokens = int(pieces.length.sum())
    stats.loss_tokens = loss_tokens
    return pieces


def _piece(data: TokenizedDataset, pieces: _Pieces, k: int) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Ids and unshifted labels of piece ``k`` (its first label is -100)."""
    base = int(data.offsets[int(pieces.sample[k])]) + int(pieces.start[k])
    n = int(pieces.length[k])
    ids = np.asarray(data.input_ids[base : base + n], dtype=np.int64)
    labels = np.where(np.asarray(data.loss_mask[base : base + n], dtype=np.bool_), ids, IGNORE_INDEX)
    labels[0] = IGNORE_INDEX
    return ids, labels


# ------------------------------------------------------------------------------------------------
# datasets
# ------------------------------------------------------------------------------------------------


class _PlannedSamples:
    """What both datasets start from: the samples cut or dropped to fit ``max_length`` (the pieces)."""

    def __init__(
        self, data: TokenizedDataset, max_length: int, *, pad_id: int, on_overflow: Overflow = "truncate"
    ) -> None:
        if max_length < 2:
            raise DataError(f"max_length must be at least 2, got {max_length}")
        self.data = data
        self.max_length = int(max_length)
        self.pad_id = int(pad_id)
        self.stats = replace(data.stats, formats=dict(data.stats.formats))
        self._pieces = _plan_pieces(data, self.max_length, on_overflow, self.stats)
        # Pieces are numbered samples-that-fit first (the shuffled packing plan rests on that
        # numbering); this is their order in the files, for unshuffled use.
        self._file_order = np.lexsort((self._pieces.start, self._pieces.sample))


class PackedDataset(_PlannedSamples, Dataset[PackedBin]):
    """Tokenized samples packed into bins of ``max_length`` tokens, addressable by index.

    The bins are computed once from the sample lengths (deterministic for a given ``seed``), so bin
    ``i`` is always the same and a run can resume at any bin without replaying the ones before.

    Args:
        data: The tokenized samples.
        max_length: Tokens per bin.
        pad_id: The padding token id.
        on_overflow: What to do with samples longer than ``max_length`` (see the module docs).
        seed: Seed of the shuffle before packing.
        shuffle: Shuffle the samples before packing (else pack them in the order of the files).
        window: Samples packed together by best-fit decreasing (see :func:`best_fit_bins`).

    Attributes:
        stats: Preparation and packing counters (padding ratio, truncated, dropped ...).
    """

    def __init__(
        self,
        data: TokenizedDataset,
        max_length: int,
        *,
        pad_id: int,
        on_overflow: Overflow = "truncate",
        seed: int = 0,
        shuffle: bool = True,
        window: int = 1024,
    ) -> None:
        super().__init__(data, max_length, pad_id=pad_id, on_overflow=on_overflow)
        count = self._pieces.sample.shape[0]
        order = np.random.default_rng(seed).permutation(count) if shuffle else self._file_order
        members: list[int] = []
        bounds = [0]
        for bin_items in best_fit_bins(self._pieces.length[order], self.max_length, window):
            members.extend(int(order[i]) for i in bin_items)
            bounds.append(len(members))
        self._members = np.asarray(members, dtype=np.int64)
        self._bounds = np.asarray(bounds, dtype=np.int64)
        self.stats.bins = len(bounds) - 1
        self.stats.padding = self.stats.bins * self.max_length - self.stats.tokens
        logger.info("packed: %s", self.stats.summary())

    def __len__(self) -> int:
        return int(self._bounds.shape[0] - 1)

    def bin_pieces(self, index: int) -> list[tuple[int, int, int]]:
        """What bin ``index`` holds: ``(sample index, first token, token count)`` per piece, in order."""
        lo, hi = int(self._bounds[index]), int(self._bounds[index + 1])
        p = self._pieces
        return [(int(p.sample[k]), int(p.start[k]), int(p.length[k])) for k in self._members[lo:hi].tolist()]

    def __getitem__(self, index: int) -> PackedBin:
        if not -len(self) <= index < len(self):
            raise IndexError(f"bin {index} out of range for {len(self)} bins")
        index %= len(self)
        lo, hi = int(self._bounds[index]), int(self._bounds[index + 1])
        ids_parts: list[NDArray[np.int64]] = []
        label_parts: list[NDArray[np.int64]] = []
        pos_parts: list[NDArray[np.int64]] = []
        cu = [0]
        for k in self._members[lo:hi].tolist():
            ids, labels = _piece(self.data, self._pieces, k)
            ids_parts.append(ids)
            label_parts.append(labels)
            pos_parts.append(np.arange(ids.shape[0], dtype=np.int64))
            cu.append(cu[-1] + ids.shape[0])
        pad = self.max_length - cu[-1]
        if pad > 0:
            ids_parts.append(np.full(pad, self.pad_id, dtype=np.int64))
            label_parts.append(np.full(pad, IGNORE_INDEX, dtype=np.int64))
            pos_parts.append(np.arange(pad, dtype=np.int64))
            cu.append(self.max_length)
        return PackedBin(
            input_ids=torch.from_numpy(np.concatenate(ids_parts)),
            labels=torch.from_numpy(np.concatenate(label_parts)),
            position_ids=torch.from_numpy(np.concatenate(pos_parts)),
            cu_seqlens=torch.tensor(cu, dtype=torch.int32),
            num_padding=pad,
        )

    def collate(self, bins: Sequence[PackedBin]) -> PackedBatch:
        """Collates bins into a batch (:func:`collate_packed`)."""
        return collate_packed(bins)


class PaddedDataset(_PlannedSamples, Dataset[TokenizedSample]):
    """Tokenized samples one per row, with the same overflow rules as :class:`PackedDataset`.

    Item ``i`` is the ``i``-th sample (or piece of a split sample) in the order of the files.

    Args:
        data: The tokenized samples.
        max_length: The longest row.
        pad_id: The padding token id (used by :meth:`collate`).
        on_overflow: What to do with samples longer than ``max_length``.

    Attributes:
        stats: Preparation and overflow counters (padding depends on batching: see
            :attr:`PaddedBatch.num_padding`).
    """

    def __len__(self) -> int:
        return int(self._pieces.sample.shape[0])

    def __getitem__(self, index: int) -> TokenizedSample:
        if not -len(self) <= index < len(self):
            raise IndexError(f"item {index} out of range for {len(self)} items")
        k = int(self._file_order[index % len(self)])  # item i is the i-th piece in file order
        ids, labels = _piece(self.data, self._pieces, k)
        return TokenizedSample(
            input_ids=ids.astype(np.int32),
            loss_mask=labels != IGNORE_INDEX,
            is_chat=self.data.is_chat(int(self._pieces.sample[k])),
        )

    def collate(self, samples: Sequence[TokenizedSample]) -> PaddedBatch:
        """Pads samples into a batch (:func:`collate_padded`)."""
        return collate_padded(samples, pad_id=self.pad_id)
