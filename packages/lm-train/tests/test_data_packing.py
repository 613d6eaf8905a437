"""Packing: every token once and in order, sample-local positions and attention, and packed == unpacked."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmstack.core import PackedAttention, Tokenizer
from lmstack.train import DataConfig, build_dataset, tokenize_dataset
from lmstack.train.data import IGNORE_INDEX, PackedDataset, PaddedDataset
from lmstack.train.data._packing import best_fit_bins, collate_packed, collate_padded


@pytest.fixture
def chat_data(
    tmp_path: Path, tokenizer: Tokenizer, write_jsonl: Callable[..., Path], chats: Callable[..., list[Any]]
) -> Any:
    path = write_jsonl("chats.jsonl", chats(60, seed=1))
    texts = write_jsonl("docs.jsonl", [{"text": " ".join(["word"] * n)} for n in (3, 40, 90, 7)])
    return tokenize_dataset(DataConfig(paths=[str(path), str(texts)]), tokenizer)


def test_every_sample_once_in_order_with_local_positions(chat_data: Any) -> None:
    length = 320
    assert int(chat_data.lengths.max()) <= length
    packed = PackedDataset(chat_data, length, pad_id=3, seed=7, window=16)
    seen: list[int] = []
    padding = 0
    for index in range(len(packed)):
        item = packed[index]
        assert item.input_ids.shape == item.labels.shape == item.position_ids.shape == (length,)
        cu = item.cu_seqlens.tolist()
        assert cu[0] == 0 and cu[-1] == length
        pieces = packed.bin_pieces(index)
        for (sample, start, count), lo, hi in zip(pieces, cu[:-1], cu[1:], strict=False):
            assert start == 0 and count == hi - lo
            original = chat_data[sample]
            assert item.input_ids[lo:hi].tolist() == original.input_ids.tolist()
            assert item.labels[lo:hi].tolist() == original.labels.tolist()
            assert item.labels[lo] == IGNORE_INDEX  # no prediction across the boundary
            assert item.position_ids[lo:hi].tolist() == list(range(hi - lo))
            seen.append(sample)
        used = sum(count for _, _, count in pieces)
        assert used <= length and item.num_padding == length - used
        if item.num_padding:
            assert len(cu) == len(pieces) + 2  # the padding is a segment of its own
            assert (item.input_ids[used:] == 3).all() and (item.labels[used:] == IGNORE_INDEX).all()
            assert item.position_ids[used:].tolist() == list(range(length - used))
        else:
            assert len(cu) == len(pieces) + 1
        # The core backend derives the same segments from the positions.
        assert PackedAttention.from_positions(item.position_ids[None]).cu_seqlens.tolist() == cu
        padding += item.num_padding
    assert sorted(seen) == list(range(len(chat_data)))
    stats = packed.stats
    assert stats.padding == padding and stats.bins == len(packed)
    assert stats.padding_ratio == pytest.approx(padding / (len(packed) * length))
    assert stats.tokens == chat_data.num_tokens and stats.loss_tokens == chat_data.num_loss_tokens
    # Deterministic for a seed; another seed packs differently.
    again = PackedDataset(chat_data, length, pad_id=3, seed=7, window=16)
    assert [again.bin_pieces(i) for i in range(len(again))] == [
        packed.bin_pieces(i) for i in range(len(packed))
    ]
    other = PackedDataset(chat_data, length, pad_id=3, seed=8, window=16)
    assert [other.bin_pieces(i) for i in range(len(other))] != [
        packed.bin_pieces(i) for i in range(len(packed))
    ]


def _first_fit(lengths: list[int], capacity: int) -> int:
    free: list[int] = []
    for size in lengths:
        for i, space in enumerate(free):
            if space >= size:
                free[i] -= size
                break
        else:
            free.append(capacity - size)
    return len(free)


def _next_fit(lengths: list[int], capacity: int) -> int:
    bins, space = 0, 0
    for size in lengths:
        if size > space:
            bins, space = bins + 1, capacity
        space -= size
    return bins


def test_best_fit_beats_naive_packing_on_skewed_lengths() -> None:
    rng = random.Random(0)
    capacity = 2048
    # Skewed: many short chats, a tail of long ones (log-normal, as in real SFT data).
    lengths = [min(capacity, max(8, int(rng.lognormvariate(5.5, 1.0)))) for _ in range(3000)]
    bins = list(best_fit_bins(lengths, capacity, window=1000))
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
    for b in bins:  # no bin mixes items from different windows
        assert len({i // 1000 for i in b}) == 1
    total = sum(lengths)

    def waste(n: int) -> float:
        return 1 - total / (n * capacity)

    ours, first, naive = len(bins), _first_fit(lengths, capacity), _next_fit(lengths, capacity)
    assert waste(ours) < 0.01
    assert ours < first < naive and waste(naive) > 0.1


def test_truncate_drop_and_split(tokenizer: Tokenizer, write_jsonl: Callable[..., Path], chats: Any) -> None:
    docs = [{"text": " ".join(f"w{i}" for i in range(n))} for n in (5, 200, 300)]
    path = write_jsonl("mix.jsonl", docs)
    chat_path = write_jsonl("c.jsonl", chats(10, seed=2, max_turns=4))
    data = tokenize_dataset(DataConfig(paths=[str(path), str(chat_path)]), tokenizer)
    length = 64
    over = int((data.lengths > length).sum())
    assert over >= 3
    truncated = PackedDataset(data, length, pad_id=0, on_overflow="truncate")
    assert truncated.stats.truncated + truncated.stats.no_loss == over or truncated.stats.truncated == over
    assert truncated.stats.pieces == len(data) - truncated.stats.no_loss
    dropped = PackedDataset(data, length, pad_id=0, on_overflow="drop")
    assert dropped.stats.dropped == over and dropped.stats.pieces == len(data) - over
    assert dropped.stats.loss_tokens == sum(
        int(data[i].loss_mask.sum()) for i in range(len(data)) if len(data[i]) <= length
    )
    split = PackedDataset(data, length, pad_id=0, on_overflow="split", shuffle=False)
    # Pieces of a split document overlap by one token, so every token after the first is a target once.
    doc = 2  # the 300-word document
    pieces = sorted(p for i in range(len(split)) for p in split.bin_pieces(i) if p[0] == doc)
    ids = data[doc].input_ids.tolist()
    rebuilt = ids[: pieces[0][2]]
    for (_, start, count), (_, prev_start, prev_count) in zip(pieces[1:], pieces[:-1], strict=True):
        assert start == prev_start + prev_count - 1
        rebuilt += ids[start + 1 : start + count]
    assert rebuilt == ids
    assert split.stats.loss_tokens == data.num_loss_tokens - sum(
        int(data[i].loss_mask.sum()) - int(data[i].loss_mask[:length].sum())
        for i in range(len(data))
        if data.is_chat(i) and len(data[i]) > length
    )
    for i in range(len(split)):
        assert split[i].input_ids.shape == (length,)
    padded = PaddedDataset(data, length, pad_id=0, on_overflow="truncate")
    assert max(len(padded[i]) for i in range(len(padded))) == length


def _loss_and_grads(
    model: torch.nn.Module, run: Callable[[], torch.Tensor]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad()
    loss = run()
    loss.backward()
    return loss.detach(), [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]


def _summed_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over labels != -100 (labels unshifted, as the batches give them)."""
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX,
        reduction="sum",
    )  # fmt: skip


def test_packed_equals_unpacked_loss_and_gradients(
    tokenizer: Tokenizer, chat_data: Any, tiny_model: Callable[[int], Any]
) -> None:
    model = tiny_model(tokenizer.vocab_size)
    pad_id = tokenizer.pad_token_id
    assert pad_id is not None
    assert int(chat_data.lengths.max()) <= 320  # nothing truncated: each sample can run alone
    packed = PackedDataset(chat_data, 320, pad_id=pad_id, seed=1)
    bins = [packed[i] for i in range(4)]
    batch = collate_packed(bins)
    assert batch.input_ids.shape == (4, 320) and len(batch.cu_seqlens) > 4 + 4
    samples = [chat_data[s] for i in range(len(bins)) for s, _, _ in packed.bin_pieces(i)]
    assert batch.num_loss_tokens == sum(int(s.loss_mask.sum()) for s in samples)

    def run_packed() -> torch.Tensor:
        logits = model(batch.input_ids, batch.position_ids, batch.attention(use_flash=False))
        return _summed_loss(logits, batch.labels)

    def run_alone() -> torch.Tensor:
        total = torch.zeros(())
        for sample in samples:
            ids = torch.from_numpy(sample.input_ids.astype(np.int64))[None]
            total = total + _summed_loss(model(ids), torch.from_numpy(sample.labels)[None])
        return total

    def run_padded() -> torch.Tensor:
        padded = collate_padded(samples, pad_id=pad_id)
        logits = model(padded.input_ids, padded.position_ids, padded.attention())
        return _summed_loss(logits, padded.labels)

    loss_p, grads_p = _loss_and_grads(model, run_packed)
    loss_a, grads_a = _loss_and_grads(model, run_alone)
    loss_d, grads_d = _loss_and_grads(model, run_padded)
    assert len(grads_p) == len(grads_a) == len(list(model.parameters()))
    torch.testing.assert_close(loss_p, loss_a, rtol=1e-5, atol=0)
    torch.testing.assert_close(loss_d, loss_a, rtol=1e-5, atol=0)
    for gp, ga, gd in zip(grads_p, grads_a, grads_d, strict=True):
        scale = ga.abs().max()
        assert (gp - ga).abs().max() <= 1e-5 * scale
        assert (gd - ga).abs().max() <= 1e-5 * scale


def test_build_dataset_from_config(
    tokenizer: Tokenizer, write_jsonl: Callable[..., Path], chats: Any
) -> None:
    path = write_jsonl("c.jsonl", chats(30, seed=5))
    packed = build_dataset(DataConfig(paths=[str(path)], max_length=256), tokenizer)
    assert isinstance(packed, PackedDataset) and packed.stats.samples == 30
    assert "padding" in packed.stats.summary() and packed.stats.as_dict()["bins"] == len(packed)
    padded = build_dataset(DataConfig(paths=[str(path)], max_length=256, pack=False), tokenizer)
    assert isinstance(padded, PaddedDataset) and len(padded) == 30
    batch = padded.collate([padded[0], padded[1], padded[2]])
    assert batch.num_padding == int((batch.attention_mask == 0).sum())
    assert (batch.labels[batch.attention_mask == 0] == IGNORE_INDEX).all()
