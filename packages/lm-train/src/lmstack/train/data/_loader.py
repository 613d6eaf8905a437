"""Batches in a deterministic order that a run can resume exactly, and the one-call data builder.

:class:`ResumableLoader` orders a dataset's items (packed bins, or samples) by a permutation that
depends only on ``(seed, epoch)``, cuts it into global batches of ``batch_size * world_size`` items,
and gives rank ``r`` the ``r``-th slice of each: so two processes with ``batch_size=4`` see exactly the
items of one process with ``batch_size=8``. Its position is ``(epoch, index)``: the epoch, and how many
batches of it the caller has received. Resuming from a saved position starts at the next batch in
O(1) — nothing is read or replayed. Items left over after the last full global batch of an epoch are
not used in that epoch (a different set each epoch, as the permutation changes).

The position counts batches handed to the caller, not batches prefetched by data-loader workers, so it
is exact with ``num_workers > 0`` too: save ``loader.state_dict()`` with the checkpoint after the step
that consumed the batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
import torch.utils.data

from lmstack.core import Tokenizer
from lmstack.train.data._cache import tokenize_dataset
from lmstack.train.data._config import DataConfig
from lmstack.train.data._errors import DataError, TrainConfigError, TrainError
from lmstack.train.data._packing import PackedDataset, PaddedDataset, pad_id_of

logger = logging.getLogger(__name__)

__all__ = ["DataPosition", "ResumableLoader", "build_dataset"]

B = TypeVar("B", covariant=True)


class _CollatingDataset(Protocol[B]):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...

    def collate(self, items: Sequence[Any]) -> B: ...


@dataclass(frozen=True)
class DataPosition:
    """Where a run is in its data.

    Attributes:
        epoch: The current epoch (from 0).
        index: Batches of this epoch already handed out (the next batch is number ``index``).
    """

    epoch: int = 0
    index: int = 0


class ResumableLoader(Generic[B]):
    """Iterates a dataset in batches, deterministically, with an exact, O(1) resumable position.

    Args:
        dataset: A :class:`PackedDataset` or :class:`PaddedDataset` (anything with ``__len__``,
            ``__getitem__`` and ``collate``).
        batch_size: Items (bins or samples) per batch on this rank.
        seed: Seed of the per-epoch shuffle.
        shuffle: Shuffle every epoch (else items in order).
        rank: This process's rank in data parallelism.
        world_size: The number of data-parallel processes.
        num_workers: Data-loader worker processes (0: load in this process).
        pin_memory: Pin batches in page-locked memory (for faster host-to-GPU copies).
        collate_fn: Builds a batch from items (default: the dataset's ``collate``).

    Raises:
        TrainError: A bad rank or batch size, or fewer items than one global batch.

    Example:
        >>> loader = ResumableLoader(dataset, batch_size=8, seed=0)  # doctest: +SKIP
        >>> for batch in loader:  # doctest: +SKIP
        ...     step(batch)
        ...     save(model, loader.state_dict())
    """

    def __init__(
        self,
        dataset: _CollatingDataset[B],
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        pin_memory: bool = False,
        collate_fn: Callable[[Sequence[Any]], B] | None = None,
    ) -> None:
        if batch_size < 1:
            raise TrainError(f"batch_size must be at least 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise TrainError(f"rank {rank} is not in 0..{world_size - 1}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.collate_fn: Callable[[Sequence[Any]], B] = collate_fn or dataset.collate
        self.num_items = len(dataset)
        self._batches_per_epoch = self.num_items // (batch_size * world_size)
        if self._batches_per_epoch == 0:
            raise TrainError(
                f"the dataset has {self.num_items} items, fewer than one global batch "
                f"({batch_size} x {world_size} ranks); lower the batch size or add data"
            )
        self._epoch = 0
        self._index = 0

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return self._batches_per_epoch

    @property
    def position(self) -> DataPosition:
        """The current position (the next batch is ``position.index`` of ``position.epoch``)."""
        return DataPosition(self._epoch, self._index)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The item indices of every batch of ``epoch`` on this rank.

        Args:
            epoch: The epoch.

        Returns:
            One list of ``batch_size`` item indices per batch.
        """
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_items)
        else:
            order = np.arange(self.num_items)
        step = self.batch_size * self.world_size
        first = self.rank * self.batch_size
        return [
            order[b * step + first : b * step + first + self.batch_size].tolist()
            for b in range(self._batches_per_epoch)
        ]

    def __iter__(self) -> Iterator[B]:
        """Yields the rest of the current epoch's batches; the epoch then advances."""
        epoch = self._epoch
        batches = self.epoch_batches(epoch)[self._index :]
        if self.num_workers > 0 and batches:
            loader: torch.utils.data.DataLoader[Any] = torch.utils.data.DataLoader(
                self.dataset,  # type: ignore[arg-type]
                batch_sampler=batches,
                collate_fn=self.collate_fn,
                num_workers=self.num_workers,
                pin_memory=self.pin_memory,
            )
            for batch in loader:
                self._index += 1
                yield batch
        else:
            for indices in batches:
                batch = self.collate_fn([self.dataset[i] for i in indices])
                self._index += 1
                yield batch
        if self._epoch == epoch and self._index >= self._batches_per_epoch:
            self._epoch = epoch + 1
            self._index = 0

    def set_position(self, position: DataPosition) -> None:
        """Moves to a position (the next batch will be ``position.index`` of ``position.epoch``).

        Args:
            position: The position.

        Raises:
            TrainError: The index is beyond the epoch.
        """
        if position.epoch < 0 or not 0 <= position.index <= self._batches_per_epoch:
            raise TrainError(
                f"data position {position} is outside the {self._batches_per_epoch} batches of an epoch"
            )
        self._epoch, self._index = position.epoch, position.index

    def state_dict(self) -> dict[str, Any]:
        """The position and what it is valid for, to save with a checkpoint."""
        return {
            "epoch": self._epoch,
            "index": self._index,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "num_items": self.num_items,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores a position saved by :meth:`state_dict`.

        Args:
            state: The saved state.

        Raises:
            TrainError: The state was saved with another dataset size, seed or global batch (the saved
                position would then point at other data). The global batch is ``batch_size x
                world_size``: a run resumes on another number of data-parallel ranks when the global
                batch stays the same (4 ranks of 2 where 2 ranks of 4 saved), since every global batch
                holds the same items either way.
        """
        if "batch_size" in state and "world_size" in state:
            saved = int(state["batch_size"]) * int(state["world_size"])
            if saved != self.batch_size * self.world_size:
                raise TrainError(
                    f"cannot resume the data position: it was saved with a global batch of {saved} "
                    f"(batch_size={state['batch_size']} x {state['world_size']} data-parallel ranks), but "
                    f"this run has {self.batch_size * self.world_size} (batch_size={self.batch_size} x "
                    f"{self.world_size}); keep batch_size x data-parallel ranks the same to resume"
                )
        for key in ("num_items", "seed", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise TrainError(
                    f"cannot resume the data position: it was saved with {key}={state[key]!r}, but this run "
                    f"has {key}={getattr(self, key)!r}; resume with the same data and batch settings"
                )
        self.set_position(DataPosition(int(state["epoch"]), int(state["index"])))


def build_dataset(
    config: DataConfig, tokenizer: Tokenizer, *, show_progress: bool | None = None
) -> PackedDataset | PaddedDataset:
    """Reads, tokenizes (or reuses the cache) and packs the data of ``config``.

    Args:
        config: The data config.
        tokenizer: The model's tokenizer; its pad token pads (else its eos token, else id 0).
        show_progress: Show a progress bar while tokenizing (None: only on a terminal).

    Returns:
        A :class:`PackedDataset` when ``config.pack``, else a :class:`PaddedDataset`.

    Raises:
        DataError: See :func:`tokenize_dataset`; also when no sample is left after overflow handling.
    """
    if config.format in ("preference", "kto", "trl", "ultrafeedback"):
        raise TrainConfigError(
            f"data.format: {config.format} is preference data, which the pretrain, sft and lora recipes "
            "cannot train on; use lmstack train dpo|orpo|simpo|rm (pairs) or kto (unpaired rows)",
            field="data.format",
        )
    data = tokenize_dataset(config, tokenizer, show_progress=show_progress)
    pad_id = pad_id_of(tokenizer)
    dataset: PackedDataset | PaddedDataset
    if config.pack:
        dataset = PackedDataset(
            data,
            config.max_length,
            pad_id=pad_id,
            on_overflow=config.on_overflow,
            seed=config.shuffle_seed,
            shuffle=config.shuffle,
            window=config.pack_window,
        )
    else:
        dataset = PaddedDataset(data, config.max_length, pad_id=pad_id, on_overflow=config.on_overflow)
    if len(dataset) == 0:
        raise DataError("no data left after handling over-length samples")
    logger.info("data: %s", dataset.stats.summary())
    return dataset
