"""Preference data: formats, completion-only loss masks through the chat template, and packed pairs."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lmstack.core import PackedAttention, Tokenizer, train_bpe_tokenizer
from lmstack.train import DataConfig, DataError
from lmstack.train.data import IGNORE_INDEX, ChatTemplateError
from lmstack.train.data._preference import (
    PreferenceSample,
    PreferenceStats,
    PreferenceTokenizer,
    iter_preference_samples,
    tokenize_preferences,
)
from lmstack.train.data._preference_packing import (
    KTOBatch,
    PaddedPreferenceBatch,
    PreferenceBatch,
    PreferencePackedDataset,
    PreferencePaddedDataset,
    build_preference_dataset,
    fit_unit,
)

ROOT = Path(__file__).resolve().parents[3]


def _read(path: Path, **config: Any) -> tuple[list[PreferenceSample], PreferenceStats]:
    stats = PreferenceStats()
    fmt = config.pop("format", "preference")
    samples = list(
        iter_preference_samples([path], DataConfig(paths=[str(path)], **config), format=fmt, stats=stats)
    )
    return samples, stats


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


# ------------------------------------------------------------------------------------------------
# formats
# ------------------------------------------------------------------------------------------------


def test_trl_text_and_message_lists(write_jsonl: Callable[..., Path]) -> None:
    path = write_jsonl(
        "trl.jsonl",
        [
            {"prompt": "What is 2+2?", "chosen": "4.", "rejected": "5."},
            {
                "prompt": [{"role": "system", "content": "Be terse."}, _user("Hi")],
                "chosen": [_assistant("Hello!")],
                "rejected": [_assistant("Go away.")],
            },
            # The chosen/rejected lists continue the prompt: turns before the last join it.
            {
                "prompt": [_user("Hi")],
                "chosen": [_assistant("Hello"), _user("Bye"), _assistant("Goodbye!")],
                "rejected": [_assistant("Hello"), _user("Bye"), _assistant("Whatever.")],
            },
            # TRL's implicit prompt: whole conversations sharing their first turns.
            {
                "chosen": [_user("Sky?"), _assistant("Blue.")],
                "rejected": [_user("Sky?"), _assistant("Green.")],
            },
            {"prompt": "Q", "chosen": {"role": "assistant", "content": "A"}, "rejected": {"content": "B"}},
        ],
    )
    samples, stats = _read(path)
    assert [s.prompt for s in samples] == [
        [_user("What is 2+2?")],
        [{"role": "system", "content": "Be terse."}, _user("Hi")],
        [_user("Hi"), _assistant("Hello"), _user("Bye")],
        [_user("Sky?")],
        [_user("Q")],
    ]
    assert [(s.chosen["content"], s.rejected["content"]) for s in samples] == [
        ("4.", "5."),
        ("Hello!", "Go away."),
        ("Goodbye!", "Whatever."),
        ("Blue.", "Green."),
        ("A", "B"),
    ]
    assert all(s.is_pair and s.chosen["role"] == s.rejected["role"] == "assistant" for s in samples)
    assert stats.formats == {"trl": 5} and stats.records == 5 and stats.skipped_malformed == 0
    assert samples[0].source == str(path) and [s.line for s in samples] == [1, 2, 3, 4, 5]


def test_openai_messages_with_two_endings(write_jsonl: Callable[..., Path]) -> None:
    path = write_jsonl(
        "messages.jsonl",
        [
            {"messages": [_user("Hi")], "chosen": _assistant("Hello."), "rejected": "Bye."},
            {"conv": [_user("Yo")], "chosen": "Hey.", "rejected": _assistant("No.")},
        ],
    )
    samples, stats = _read(path, messages_field=None, on_malformed="skip")
    assert [(s.prompt, s.chosen, s.rejected) for s in samples] == [
        ([_user("Hi")], _assistant("Hello."), _assistant("Bye."))
    ]
    assert stats.formats == {"messages": 1} and stats.skipped_malformed == 1
    custom = write_jsonl(
        "custom.jsonl", [{"conv": [_user("Yo")], "chosen": "Hey.", "rejected": _assistant("No.")}]
    )
    samples, _ = _read(custom, messages_field="conv")
    assert samples[0].prompt == [_user("Yo")] and samples[0].rejected == _assistant("No.")


def test_ultrafeedback_best_and_worst_ties_skipped(write_jsonl: Callable[..., Path]) -> None:
    path = write_jsonl(
        "uf.jsonl",
        [
            {
                "instruction": "Name a color.",
                "completions": [
                    {"response": "Blue.", "overall_score": 7.5},
                    {"response": "Red.", "overall_score": 9},
                    {"response": "Dog.", "overall_score": 2},
                    {"response": "Unscored."},
                ],
            },
            {"prompt": "Tie?", "completions": [{"text": "a", "score": 3}, {"text": "b", "score": 3}]},
            {
                "prompt": [_user("Rated")],
                "completions": [{"text": "good", "rating": 5}, {"text": "bad", "rating": 1}],
            },
        ],
    )
    samples, stats = _read(path)
    assert [(s.prompt[-1]["content"], s.chosen["content"], s.rejected["content"]) for s in samples] == [
        ("Name a color.", "Red.", "Dog."),
        ("Rated", "good", "bad"),
    ]
    assert stats.ties == 1 and stats.formats == {"ultrafeedback": 2} and stats.skipped_malformed == 0
    assert "1 tied records skipped" in stats.summary()


def test_kto_rows_and_unpaired_pairs(write_jsonl: Callable[..., Path]) -> None:
    kto = write_jsonl(
        "kto.jsonl",
        [
            {"prompt": "Hi", "completion": "Hello.", "label": True},
            {"prompt": [_user("Hi")], "completion": [_assistant("Ugh.")], "label": False},
        ],
    )
    samples, stats = _read(kto, format="kto")
    assert [(s.prompt, s.chosen["content"], s.label) for s in samples] == [
        ([_user("Hi")], "Hello.", True),
        ([_user("Hi")], "Ugh.", False),
    ]
    assert not samples[0].is_pair and stats.formats == {"kto": 2}
    with pytest.raises(DataError, match="no rejected"):
        _ = samples[0].rejected
    # KTO rows cannot be read as pairs; pairs read as KTO become two labelled samples.
    with pytest.raises(DataError, match=r"kto\.jsonl:1: .*data.format: kto"):
        _read(kto)
    pairs = write_jsonl("pairs.jsonl", [{"prompt": "Q", "chosen": "yes", "rejected": "no"}])
    samples, _ = _read(pairs, format="kto")
    assert [(s.chosen["content"], s.label) for s in samples] == [("yes", True), ("no", False)]


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"prompt": "Q", "chosen": "A"}, "missing field 'rejected'"),
        ({"chosen": "A", "rejected": "B"}, "missing field 'prompt'"),
        ({"prompt": "Q", "chosen": "Same.", "rejected": "Same."}, "chosen and rejected are identical"),
        ({"prompt": [_user("Q"), _assistant("x")], "chosen": "A", "rejected": "B"}, "ends with an assistant"),
        (
            {"prompt": [{"role": "robot", "content": "Q"}], "chosen": "A", "rejected": "B"},
            "unknown role 'robot'",
        ),
        (
            {"prompt": "Q", "chosen": [_assistant("a")], "rejected": [_user("u"), _assistant("b")]},
            "different turns",
        ),
        ({"prompt": "", "chosen": "A", "rejected": "B"}, "prompt is empty"),
        ({"prompt": "Q", "chosen": 3, "rejected": "B"}, "chosen must be text"),
        ({"prompt": "Q", "completions": [{"response": "a", "score": 1}]}, "a pair needs two"),
    ],
)
def test_malformed_rows_named_by_file_and_line(
    write_jsonl: Callable[..., Path], record: dict[str, Any], message: str
) -> None:
    good: dict[str, Any] = {"prompt": "Fine", "chosen": "yes", "rejected": "no"}
    if "completions" in record:
        good = {
            "prompt": "Fine",
            "completions": [{"response": "a", "score": 2}, {"response": "b", "score": 1}],
        }
    path = write_jsonl("bad.jsonl", [good, good, record])
    with pytest.raises(DataError, match=rf"bad\.jsonl:3: .*{message}.*on_malformed=skip"):
        _read(path)
    samples, stats = _read(path, on_malformed="skip")
    assert len(samples) == 2 and stats.skipped_malformed == 1 and stats.records == 3


def test_empty_completion_follows_the_empty_assistant_policy(write_jsonl: Callable[..., Path]) -> None:
    path = write_jsonl(
        "empty.jsonl",
        [{"prompt": "Q", "chosen": "A", "rejected": "B"}, {"prompt": "Q", "chosen": " ", "rejected": "B"}],
    )
    with pytest.raises(DataError, match=r"empty\.jsonl:2: chosen is empty.*on_empty_assistant=skip"):
        _read(path)
    samples, stats = _read(path, on_empty_assistant="skip")
    assert len(samples) == 1 and stats.skipped_empty == 1


def test_unknown_keys_and_wrong_mode(write_jsonl: Callable[..., Path]) -> None:
    path = write_jsonl("odd.jsonl", [{"question": "Q", "answer": "A"}])
    with pytest.raises(
        DataError, match=r"odd\.jsonl:1: cannot tell the preference format .*answer, question"
    ):
        _read(path)
    with pytest.raises(DataError, match="not a preference format"):
        _read(path, format="alpaca")


# ------------------------------------------------------------------------------------------------
# tokenizing: the loss lands exactly on the completion
# ------------------------------------------------------------------------------------------------


def _trained_text(tokenizer: Tokenizer, ids: np.ndarray, mask: np.ndarray) -> str:
    assert mask.any()
    first = int(np.argmax(mask))
    assert mask[first:].all(), "the trained tokens must be one run at the end"
    return tokenizer.decode(ids[first:].tolist())


MULTI_TURN_PROMPT = [
    {"role": "system", "content": "You are a helpful assistant."},
    _user("What is 12+30?"),
    _assistant("12+30=42."),
    _user("And the capital of Zorbia, é 你好?"),
]


def test_masks_exactly_on_the_completion(tokenizer: Tokenizer) -> None:
    sample = PreferenceSample(
        MULTI_TURN_PROMPT, [_assistant("The capital of Zorbia is Quill 你好!"), _assistant("It is Paris.")]
    )
    item = PreferenceTokenizer(tokenizer)([sample])[0]
    prompt_text = tokenizer.apply_chat_template(MULTI_TURN_PROMPT, add_generation_prompt=True)
    assert isinstance(prompt_text, str)
    assert item.prompt_ids.tolist() == tokenizer.encode(prompt_text, add_special_tokens=False)
    for k, completion in enumerate(sample.completions):
        sequence = item.sequence(k)
        full = tokenizer.apply_chat_template([*MULTI_TURN_PROMPT, completion])
        assert isinstance(full, str)
        # The sequence is the whole rendering (minus the trailing newline), tokenized as SFT does.
        assert sequence.input_ids.tolist() == tokenizer.encode(full.rstrip(), add_special_tokens=False)
        # The loss covers the completion and its end-of-turn token, nothing of the prompt
        # (not the earlier assistant turn "12+30=42.").
        expected = tokenizer.encode(completion["content"] + "<|im_end|>", add_special_tokens=False)
        assert sequence.input_ids[sequence.loss_mask].tolist() == expected
        assert (
            _trained_text(tokenizer, sequence.input_ids, sequence.loss_mask)
            == completion["content"] + "<|im_end|>"
        )
        assert not sequence.loss_mask[: len(item.prompt_ids)].any()
    assert item.sequence(0).input_ids[: len(item.prompt_ids)].tolist() == item.prompt_ids.tolist()
    assert item.sequence(1).input_ids[: len(item.prompt_ids)].tolist() == item.prompt_ids.tolist()


def test_second_template_and_kto(tokenizer: Tokenizer, llama3_template: str) -> None:
    sample = PreferenceSample([_user("  Hi there  ")], [_assistant("  Hello!  ")], label=False)
    item = PreferenceTokenizer(tokenizer, chat_template=llama3_template)([sample])[0]
    sequence = item.sequence(0)
    assert item.label is False and len(item.completion_ids) == 1
    assert _trained_text(tokenizer, sequence.input_ids, sequence.loss_mask) == "Hello!<|eot_id|>"
    assert tokenizer.decode(sequence.input_ids[:1].tolist()) == "<s>"


def test_template_without_generation_prompt(tokenizer: Tokenizer) -> None:
    template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}</s>\n{% endfor %}"
    sample = PreferenceSample([_user("12+30?")], [_assistant("42."), _assistant("41.")])
    item = PreferenceTokenizer(tokenizer, chat_template=template)([sample])[0]
    assert [
        _trained_text(tokenizer, item.sequence(k).input_ids, item.sequence(k).loss_mask) for k in (0, 1)
    ] == [
        "42.</s>",
        "41.</s>",
    ]
    assert tokenizer.decode(item.prompt_ids.tolist()).endswith("[assistant]")


def test_template_rendering_the_last_turn_differently_is_refused(tokenizer: Tokenizer) -> None:
    # A reasoning-style template: the generation prompt opens a <think> block that the rendered
    # assistant turn does not have.
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
    )
    sample = PreferenceSample([_user("Q")], [_assistant("A"), _assistant("B")], source="x.jsonl", line=4)
    with pytest.raises(
        ChatTemplateError, match=r"x\.jsonl:4: the chat template is not prefix-stable.*chosen"
    ):
        PreferenceTokenizer(tokenizer, chat_template=template)([sample])


def test_prompt_tokens_not_a_prefix_is_a_malformed_record(write_jsonl: Callable[..., Path]) -> None:
    # A tokenizer that merges "\n\n": the generation prompt ends with "\n", so a completion starting
    # with "\n\n" re-tokenizes the prompt's last token.
    merging = train_bpe_tokenizer(
        iter(["one\n\n\ntwo\n\n\nthree"] * 50),
        vocab_size=280,
        special_tokens=("<s>", "</s>", "<|im_start|>", "<|im_end|>"),
    )
    rows = [
        {"prompt": "one", "chosen": "two", "rejected": "three"},
        {"prompt": "one", "chosen": "\n\ntwo", "rejected": "three"},
    ]
    path = write_jsonl("merge.jsonl", rows)
    with pytest.raises(
        DataError, match=r"merge\.jsonl:2: the prompt's tokens are not a prefix .*on_malformed=skip"
    ):
        tokenize_preferences(DataConfig(paths=[str(path)]), merging, format="preference")
    data = tokenize_preferences(
        DataConfig(paths=[str(path)], on_malformed="skip"), merging, format="preference"
    )
    assert len(data) == 1 and data.stats.skipped_malformed == 1


def test_tokenized_dataset_and_cache(
    tmp_path: Path, tokenizer: Tokenizer, write_jsonl: Callable[..., Path]
) -> None:
    path = write_jsonl("p.jsonl", _world_rows()[:20])
    config = DataConfig(paths=[str(path)], cache_dir=str(tmp_path / "cache"))
    first = tokenize_preferences(config, tokenizer, format="preference")
    again = tokenize_preferences(config, tokenizer, format="preference")
    kto = tokenize_preferences(config, tokenizer, format="kto")
    assert not first.cache_hit and again.cache_hit and not kto.cache_hit
    assert first.data.directory == again.data.directory != kto.data.directory
    assert first.key == again.key == first.data.directory.name != kto.key
    assert len(first) == 20 and first.paired and len(kto) == 40 and not kto.paired
    assert kto.labels.tolist() == [True, False] * 20 and kto.stats.desirable == kto.stats.undesirable == 20
    reference = PreferenceTokenizer(tokenizer)(list(iter_preference_samples([path], config)))
    for i in range(20):
        a, b, k0, k1 = first[i], again[i], kto[2 * i], kto[2 * i + 1]
        assert a.prompt_ids.tolist() == b.prompt_ids.tolist() == reference[i].prompt_ids.tolist()
        assert [c.tolist() for c in a.completion_ids] == [c.tolist() for c in reference[i].completion_ids]
        assert k0.completion_ids[0].tolist() == a.completion_ids[0].tolist() and k0.label is True
        assert k1.completion_ids[0].tolist() == a.completion_ids[1].tolist() and k1.label is False
    assert again.stats.samples == 20 and again.stats.loss_tokens == sum(
        sum(len(c) for c in first[i].completion_ids) for i in range(20)
    )


# ------------------------------------------------------------------------------------------------
# packing
# ------------------------------------------------------------------------------------------------


def _world_rows() -> list[dict[str, Any]]:
    sys.path.insert(0, str(ROOT / "examples" / "world"))
    import world

    return world.build_files(seed=0, params=world.PRESETS["default"])["preferences.jsonl"]


@pytest.fixture(scope="module")
def world_preferences(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled world's 2,675 preference pairs (1,275 fact, 200 arithmetic, 600 unknown, 600 known)."""
    path = tmp_path_factory.mktemp("world") / "preferences.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _world_rows()), encoding="utf-8")
    return path


def test_fit_unit_cuts_the_prompt_start_then_the_completions() -> None:
    assert fit_unit(10, [5, 7], 64) == (10, [5, 7])  # fits
    assert fit_unit(30, [5, 7], 64) == (26, [5, 7])  # the prompt alone is cut, as far as needed
    assert fit_unit(40, [20, 30], 64) == (16, [16, 16])  # prompt at its floor (64 // 4), then fair shares
    assert fit_unit(16, [4, 60], 64) == (16, [4, 28])  # the short completion keeps all, the rest goes on
    assert fit_unit(4, [3, 100], 64) == (4, [3, 53])  # the short completion keeps all of its tokens
    assert fit_unit(4, [100], 16) == (4, [12])  # KTO: one sequence
    with pytest.raises(DataError):
        fit_unit(4, [3, 3], 3)


def test_packed_pairs_invariants(world_preferences: Path, tokenizer: Tokenizer) -> None:
    data = tokenize_preferences(DataConfig(paths=[str(world_preferences)]), tokenizer, format="preference")
    n_pairs = len(_world_rows())
    assert len(data) == n_pairs and data.stats.samples == n_pairs
    length = 512
    packed = PreferencePackedDataset(data, length, pad_id=3, seed=5, window=64)
    seen: list[int] = []
    padding = 0
    for b in range(len(packed)):
        item = packed[b]
        cu = item.cu_seqlens.tolist()
        assert cu[0] == 0 and cu[-1] == length
        assert item.input_ids.shape == item.labels.shape == item.position_ids.shape == (length,)
        assert PackedAttention.from_positions(item.position_ids[None]).cu_seqlens.tolist() == cu
        units = item.unit_index.tolist()
        real = len(units) * 2
        # Segments: (chosen, rejected) of each pair, back to back, then the padding segment.
        assert item.segment_unit.tolist()[:real] == [u for u in range(len(units)) for _ in (0, 1)]
        assert item.segment_completion.tolist()[:real] == [0, 1] * len(units)
        assert len(cu) - 1 == real + (1 if item.num_padding else 0)
        for local, index in enumerate(units):
            reference = data[index]
            for k in (0, 1):
                lo, hi = cu[2 * local + k], cu[2 * local + k + 1]
                sequence = reference.sequence(k)
                assert item.input_ids[lo:hi].tolist() == sequence.input_ids.tolist()
                assert item.labels[lo:hi].tolist() == sequence.labels.tolist()
                assert item.labels[lo] == IGNORE_INDEX
                assert item.position_ids[lo:hi].tolist() == list(range(hi - lo))
        if item.num_padding:
            assert (item.labels[-item.num_padding :] == IGNORE_INDEX).all()
            assert item.segment_unit[-1] == -1 and item.segment_completion[-1] == -1
        seen.extend(units)
        padding += item.num_padding
    assert sorted(seen) == list(range(n_pairs))  # every pair exactly once, never split
    stats = packed.stats
    assert stats.bins == len(packed) and stats.padding == padding and stats.truncated == stats.dropped == 0
    assert stats.padding_ratio == pytest.approx(padding / (len(packed) * length))
    # Near the lower bound of ceil(tokens / L) bins with a full window, and no worse than next-fit.
    wide = PreferencePackedDataset(data, 1024, pad_id=3, seed=5, window=1024)
    lower = -(-wide.stats.tokens // 1024)
    assert lower <= wide.stats.bins <= 1.06 * lower, wide.stats.summary()
    next_fit, room = 0, 0
    for total in data.sequence_lengths.sum(axis=1)[np.random.default_rng(5).permutation(n_pairs)].tolist():
        if total > room:
            next_fit, room = next_fit + 1, 1024
        room -= total
    assert wide.stats.bins < next_fit
    assert wide.stats.padding_ratio == pytest.approx(1 - wide.stats.tokens / (1024 * wide.stats.bins))
    # Deterministic for a seed, different for another.
    again = PreferencePackedDataset(data, length, pad_id=3, seed=5, window=64)
    assert [again.bin_units(b) for b in range(len(again))] == [
        packed.bin_units(b) for b in range(len(packed))
    ]
    other = PreferencePackedDataset(data, length, pad_id=3, seed=6, window=64)
    assert [other.bin_units(b) for b in range(len(other))] != [
        packed.bin_units(b) for b in range(len(packed))
    ]


def test_batch_indices_select_each_pairs_sequences(world_preferences: Path, tokenizer: Tokenizer) -> None:
    data = tokenize_preferences(DataConfig(paths=[str(world_preferences)]), tokenizer, format="preference")
    packed = PreferencePackedDataset(data, 512, pad_id=3, seed=0)
    batch = packed.collate([packed[0], packed[1], packed[2]])
    assert isinstance(batch, PreferenceBatch)
    assert batch.num_pairs == batch.pair_index.shape[0] == batch.chosen_segments.shape[0]
    assert (batch.segment_pair[batch.chosen_segments] == torch.arange(batch.num_pairs)).all()
    assert (batch.segment_pair[batch.rejected_segments] == torch.arange(batch.num_pairs)).all()
    assert (
        batch.segment_is_chosen[batch.chosen_segments].all()
        and not batch.segment_is_chosen[batch.rejected_segments].any()
    )
    assert batch.segment_ids.shape == batch.input_ids.shape
    # Trained tokens per segment = each pair's completion lengths.
    counts = batch.segment_sum((batch.labels != IGNORE_INDEX).to(torch.float32))
    for p, index in enumerate(batch.pair_index.tolist()):
        chosen, rejected = (len(c) for c in data[index].completion_ids)
        assert counts[batch.chosen_segments[p]] == chosen and counts[batch.rejected_segments[p]] == rejected
    assert batch.num_loss_tokens == int(counts.sum())
    moved = batch.to("cpu")
    assert isinstance(moved, PreferenceBatch) and moved.num_pairs == batch.num_pairs


def test_packed_equals_padded_per_sequence_logps(
    world_preferences: Path, tokenizer: Tokenizer, tiny_model: Callable[[int], Any]
) -> None:
    data = tokenize_preferences(DataConfig(paths=[str(world_preferences)]), tokenizer, format="preference")
    model = tiny_model(tokenizer.vocab_size)
    packed = PreferencePackedDataset(data, 512, pad_id=3, seed=0)
    padded = PreferencePaddedDataset(data, 512, pad_id=3)
    batch = packed.collate([packed[0], packed[1]])
    assert isinstance(batch, PreferenceBatch) and batch.num_pairs >= 4 and packed.stats.truncated == 0
    with torch.no_grad():
        logits = model(batch.input_ids, batch.position_ids, batch.attention(use_flash=False))
        target = batch.labels[:, 1:]
        logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, target.clamp(min=0)[..., None])[
            ..., 0
        ]
        token_logps = torch.nn.functional.pad(logp * (target != IGNORE_INDEX), (1, 0))
        per_segment = batch.segment_sum(token_logps)
        rows = padded.collate([padded[i] for i in batch.pair_index.tolist()])
        assert isinstance(rows, PaddedPreferenceBatch) and rows.input_ids.shape[0] == 2 * batch.num_pairs
        dense = model(rows.input_ids, rows.position_ids, rows.attention())
        target = rows.labels[:, 1:]
        logp = torch.log_softmax(dense[:, :-1].float(), -1).gather(-1, target.clamp(min=0)[..., None])[..., 0]
        per_row = (logp * (target != IGNORE_INDEX)).sum(-1)
    p = batch.num_pairs
    torch.testing.assert_close(per_segment[batch.chosen_segments], per_row[:p], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(per_segment[batch.rejected_segments], per_row[p:], atol=1e-4, rtol=1e-5)


def test_overflow_truncates_keeping_the_prompt_end_or_drops(
    write_jsonl: Callable[..., Path], tokenizer: Tokenizer
) -> None:
    long_prompt = " ".join(["the river of zorbia"] * 20)
    rows = [
        {"prompt": long_prompt, "chosen": "Yes it is.", "rejected": "No."},
        {"prompt": "Short?", "chosen": "Fine.", "rejected": "Bad."},
    ]
    path = write_jsonl("long.jsonl", rows)
    data = tokenize_preferences(DataConfig(paths=[str(path)]), tokenizer, format="preference")
    full = data[0]
    limit = 64
    assert sum(len(full.prompt_ids) + len(c) for c in full.completion_ids) > limit
    packed = PreferencePackedDataset(data, limit, pad_id=3, shuffle=False)
    assert packed.stats.truncated == 1 and packed.num_units == 2
    unit = packed.unit(0)
    keep_prompt, keep = fit_unit(len(full.prompt_ids), [len(c) for c in full.completion_ids], limit)
    assert keep == [len(c) for c in full.completion_ids]  # the completions are kept whole
    for k, sequence in enumerate(unit.sequences):
        assert (
            sequence.input_ids.tolist()
            == full.prompt_ids[-keep_prompt:].tolist() + full.completion_ids[k].tolist()
        )
        assert sequence.loss_mask.sum() == len(full.completion_ids[k])
    assert sum(len(s) for s in unit.sequences) <= limit
    dropped = PreferencePackedDataset(data, limit, pad_id=3, on_overflow="drop", shuffle=False)
    assert dropped.stats.dropped == 1 and dropped.num_units == 1 and dropped.unit(0).index == 1


def test_kto_packing_with_labels(world_preferences: Path, tokenizer: Tokenizer, tmp_path: Path) -> None:
    config = DataConfig(paths=[str(world_preferences)], max_length=256, shuffle_seed=3)
    dataset = build_preference_dataset(config, tokenizer, format="kto")
    assert isinstance(dataset, PreferencePackedDataset) and dataset.stats.truncated == 0
    data = dataset.data
    seen = []
    for b in range(len(dataset)):
        item = dataset[b]
        assert item.unit_label is not None and item.unit_label.shape == item.unit_index.shape
        assert item.segment_completion.tolist()[: len(item.unit_index)] == [0] * len(item.unit_index)
        seen.extend(item.unit_index.tolist())
    assert sorted(seen) == list(range(len(data))) == list(range(2 * len(_world_rows())))
    batch = dataset.collate([dataset[0], dataset[1]])
    assert isinstance(batch, KTOBatch)
    assert batch.kto_labels.tolist() == [bool(data.labels[i]) for i in batch.sample_index.tolist()]
    assert (batch.segment_sample[batch.completion_segments] == torch.arange(batch.num_samples)).all()
    counts = batch.segment_sum((batch.labels != IGNORE_INDEX).to(torch.int64))
    for n, index in enumerate(batch.sample_index.tolist()):
        assert counts[batch.completion_segments[n]] == len(data[index].completion_ids[0])
    padded = build_preference_dataset(
        DataConfig(paths=[str(world_preferences)], pack=False), tokenizer, format="kto"
    )
    assert isinstance(padded, PreferencePaddedDataset) and len(padded) == len(data)
    rows = padded.collate([padded[0], padded[1]])
    assert rows.kto_labels.tolist() == [True, False]  # type: ignore[union-attr]


def test_summary_reports_padding(
    world_preferences: Path, tokenizer: Tokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="lmstack.train.data._preference_packing"):
        dataset = build_preference_dataset(
            DataConfig(paths=[str(world_preferences)], max_length=256), tokenizer
        )
    assert f"padding {dataset.stats.padding_ratio:.2%}" in caplog.text
    assert "formats trl=" in dataset.stats.summary()
