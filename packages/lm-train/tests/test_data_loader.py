"""Deterministic batches with an exact, O(1) resumable position (no batch replayed or skipped)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from lmstack.core import Tokenizer
from lmstack.train import DataConfig, ResumableLoader, TrainError, build_dataset
from lmstack.train.data import DataPosition, PackedBatch


@pytest.fixture
def packed(tokenizer: Tokenizer, write_jsonl: Callable[..., Path], chats: Callable[..., list[Any]]) -> Any:
    path = write_jsonl("c.jsonl", chats(80, seed=6, max_turns=1))
    return build_dataset(DataConfig(paths=[str(path)], max_length=128), tokenizer)


def _key(batch: PackedBatch) -> list[list[int]]:
    return batch.input_ids.tolist()


def test_resume_continues_exactly_without_replay(packed: Any) -> None:
    assert len(packed) >= 12
    reference = ResumableLoader(packed, batch_size=2, seed=3)
    per_epoch = len(reference)
    stream = [_key(b) for _ in range(3) for b in reference]  # three uninterrupted epochs
    assert len(stream) == 3 * per_epoch
    assert reference.position == DataPosition(3, 0)

    loader = ResumableLoader(packed, batch_size=2, seed=3)
    got = []
    states = []
    for batch in loader:  # stop part-way through the first epoch
        got.append(_key(batch))
        states.append(loader.state_dict())
        if len(got) == per_epoch - 2:
            break
    saved = states[-1]
    assert (saved["epoch"], saved["index"]) == (0, per_epoch - 2)

    resumed = ResumableLoader(packed, batch_size=2, seed=3)
    resumed.load_state_dict(saved)
    fetched = {"n": 0}
    original = packed.__class__.__getitem__

    def counting(self: Any, index: int) -> Any:
        fetched["n"] += 1
        return original(self, index)

    packed.__class__.__getitem__ = counting
    try:
        first_after = next(iter(resumed))
    finally:
        packed.__class__.__getitem__ = original
    assert fetched["n"] == 2  # only the one batch was read: nothing replayed
    got.append(_key(first_after))
    for _ in range(3):
        got.extend(_key(b) for b in resumed)
    assert got == stream


def test_epochs_reshuffle_and_ranks_split_the_global_batch(packed: Any) -> None:
    single = ResumableLoader(packed, batch_size=4, seed=1)
    epoch0, epoch1 = single.epoch_batches(0), single.epoch_batches(1)
    assert epoch0 != epoch1
    for epoch in (epoch0, epoch1):  # each item at most once per epoch; the remainder is left out
        flat = [i for batch in epoch for i in batch]
        assert len(set(flat)) == len(flat) == len(single) * 4 and set(flat) <= set(range(len(packed)))
    ranks = [ResumableLoader(packed, batch_size=2, seed=1, rank=r, world_size=2) for r in (0, 1)]
    for step, indices in enumerate(epoch0):
        assert ranks[0].epoch_batches(0)[step] + ranks[1].epoch_batches(0)[step] == indices
    ordered = ResumableLoader(packed, batch_size=4, shuffle=False)
    assert ordered.epoch_batches(0)[0] == [0, 1, 2, 3]


def test_workers_give_the_same_batches_and_position(packed: Any) -> None:
    plain = [_key(b) for b in ResumableLoader(packed, batch_size=2, seed=2)]
    loader = ResumableLoader(packed, batch_size=2, seed=2, num_workers=2)
    got = []
    for batch in loader:
        got.append(_key(batch))
        assert loader.position.index == len(got)  # counts batches handed out, not prefetched
        if len(got) == 3:
            break
    resumed = ResumableLoader(packed, batch_size=2, seed=2, num_workers=2)
    resumed.load_state_dict(loader.state_dict())
    got.extend(_key(b) for b in resumed)
    assert got == plain


def test_batches_feed_the_model_directly(
    packed: Any, tokenizer: Tokenizer, tiny_model: Callable[[int], Any]
) -> None:
    batch = next(iter(ResumableLoader(packed, batch_size=2)))
    logits = tiny_model(tokenizer.vocab_size)(batch.input_ids, batch.position_ids, batch.attention())
    assert logits.shape == (2, 128, tokenizer.vocab_size) and torch.isfinite(logits).all()
    assert batch.to("cpu").cu_seqlens.dtype == torch.int32


def test_mismatched_state_and_bad_settings_are_refused(packed: Any) -> None:
    loader = ResumableLoader(packed, batch_size=2, seed=3)
    with pytest.raises(TrainError, match=r"global batch of 4 \(batch_size=4 x 1"):
        loader.load_state_dict({**loader.state_dict(), "batch_size": 4})
    # The same global batch over another number of ranks points at the same items: accepted.
    two = ResumableLoader(packed, batch_size=1, seed=3, rank=1, world_size=2)
    two.load_state_dict({**loader.state_dict(), "index": 1})
    assert two.position == DataPosition(0, 1)
    with pytest.raises(TrainError, match="outside the"):
        loader.set_position(DataPosition(0, len(loader) + 1))
    with pytest.raises(TrainError, match="fewer than one global batch"):
        ResumableLoader(packed, batch_size=len(packed) + 1)
    with pytest.raises(TrainError, match=r"rank 2 is not in 0\.\.1"):
        ResumableLoader(packed, batch_size=1, rank=2, world_size=2)
