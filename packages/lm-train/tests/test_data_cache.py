"""The pre-tokenization cache: reused when nothing changed, rebuilt when anything did, never half-written."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lmstack.core import Tokenizer
from lmstack.train import DataConfig, DataError, SampleTokenizer, tokenize_dataset
from lmstack.train.data import TokenizedDataset, _cache


@pytest.fixture
def setup(
    tmp_path: Path, write_jsonl: Callable[..., Path], chats: Callable[..., list[Any]]
) -> tuple[Path, DataConfig]:
    path = write_jsonl("chats.jsonl", chats(40, seed=4))
    return path, DataConfig(paths=[str(path)], cache_dir=str(tmp_path / "cache"))


def _entries(config: DataConfig) -> list[str]:
    assert config.cache_dir is not None
    return sorted(p.name for p in Path(config.cache_dir).iterdir())


def _forbid_tokenizing(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the tokenizer was called although the cache should have been used")

    monkeypatch.setattr(SampleTokenizer, "render", fail)
    monkeypatch.setattr(SampleTokenizer, "encode", fail)
    monkeypatch.setattr(Tokenizer, "apply_chat_template", fail)


def test_second_run_hits_the_cache(
    setup: tuple[Path, DataConfig], tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, config = setup
    first = tokenize_dataset(config, tokenizer)
    assert not first.cache_hit and len(_entries(config)) == 1
    with monkeypatch.context() as patch:
        _forbid_tokenizing(patch)
        second = tokenize_dataset(config, tokenizer)
    assert second.cache_hit and second.directory == first.directory
    assert second.stats == first.stats and second.stats.samples == 40
    for i in range(len(first)):
        np.testing.assert_array_equal(first[i].input_ids, second[i].input_ids)
        np.testing.assert_array_equal(first[i].loss_mask, second[i].loss_mask)
    # Packing settings are applied after the cache: changing them reuses it.
    with monkeypatch.context() as patch:
        _forbid_tokenizing(patch)
        again = tokenize_dataset(DataConfig(**{**vars(config), "max_length": 64, "pack": False}), tokenizer)
    assert again.cache_hit
    # The layout is flat, compact and documented.
    assert (first.directory / "input_ids.bin").stat().st_size == 4 * first.num_tokens
    assert (first.directory / "loss_mask.bin").stat().st_size == first.num_tokens
    assert TokenizedDataset.open(first.directory).num_samples == 40


def test_changes_invalidate_the_cache(
    setup: tuple[Path, DataConfig], tokenizer: Tokenizer, llama3_template: str, chats: Any
) -> None:
    path, config = setup
    first = tokenize_dataset(config, tokenizer)
    # A changed data file (same name) gives a new key.
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(
            '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}\n'
        )
    changed = tokenize_dataset(config, tokenizer)
    assert not changed.cache_hit and changed.directory != first.directory and len(changed) == 41
    # Another chat template, another key.
    templated = tokenize_dataset(DataConfig(**{**vars(config), "chat_template": llama3_template}), tokenizer)
    assert not templated.cache_hit and templated.directory not in (first.directory, changed.directory)
    # So does train_on, and another tokenizer.
    everything = tokenize_dataset(DataConfig(**{**vars(config), "train_on": "all"}), tokenizer)
    assert not everything.cache_hit and everything.num_loss_tokens > changed.num_loss_tokens
    from lmstack.core import train_bpe_tokenizer

    other = train_bpe_tokenizer(iter(["another corpus entirely"] * 20), vocab_size=300)
    assert not tokenize_dataset(config, other).cache_hit
    assert len(_entries(config)) == 5


def test_an_interrupted_write_leaves_no_usable_entry(
    setup: tuple[Path, DataConfig], tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, config = setup
    monkeypatch.setattr(_cache, "_BATCH", 8)
    calls = {"n": 0}
    encode = SampleTokenizer.encode

    def crash_on_third(self: SampleTokenizer, rendered: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # as if interrupted mid-write
        return encode(self, rendered)

    with monkeypatch.context() as patch:
        patch.setattr(SampleTokenizer, "encode", crash_on_third)
        with pytest.raises(KeyboardInterrupt):
            tokenize_dataset(config, tokenizer)
    assert _entries(config) == []  # nothing left that looks like (or is) an entry
    assert tokenize_dataset(config, tokenizer).cache_hit is False


_KILLED_WRITER = """
import os, sys
from lmstack.core import Tokenizer
from lmstack.train import DataConfig, SampleTokenizer, tokenize_dataset
from lmstack.train.data import _cache

_cache._BATCH = 8
encode, calls = SampleTokenizer.encode, []

def die_on_third(self, rendered):
    calls.append(1)
    if len(calls) == 3:
        os._exit(9)
    return encode(self, rendered)

SampleTokenizer.encode = die_on_third
config = DataConfig(paths=[sys.argv[1]], cache_dir=sys.argv[2])
tokenize_dataset(config, Tokenizer.from_pretrained(sys.argv[3]))
"""


def test_a_killed_writer_and_a_corrupt_entry_are_not_used(
    setup: tuple[Path, DataConfig], tokenizer: Tokenizer
) -> None:
    _, config = setup
    good = tokenize_dataset(config, tokenizer)
    key = good.directory.name
    root = good.directory.parent
    # The finished entry gets truncated on disk.
    ids = good.directory / "input_ids.bin"
    os.truncate(ids, ids.stat().st_size - 4)
    with pytest.raises(DataError, match="not a complete tokenized dataset"):
        TokenizedDataset.open(good.directory)
    # A writer replacing it is killed mid-write (os._exit: no cleanup, as SIGKILL): it leaves its
    # staging directory, and the entry exactly as it was.
    tokenizer.save_pretrained(root.parent / "tokenizer")
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_WRITER, config.paths[0], str(root), str(root.parent / "tokenizer")]
    )
    assert killed.returncode == 9
    (staging,) = [p for p in root.iterdir() if p.name.startswith(f".{key}.tmp-")]
    assert (staging / "input_ids.bin").is_file()
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == [key]
    assert ids.stat().st_size == 4 * good.num_tokens - 4
    rebuilt = tokenize_dataset(config, tokenizer)
    assert not rebuilt.cache_hit and rebuilt.directory == good.directory
    assert ids.stat().st_size == 4 * rebuilt.num_tokens
    assert not staging.exists()  # the dead writer's leftovers are cleaned up
    assert tokenize_dataset(config, tokenizer).cache_hit


def test_without_cache_dir_the_temporary_copy_goes_away(
    setup: tuple[Path, DataConfig], tokenizer: Tokenizer
) -> None:
    path, _ = setup
    data = tokenize_dataset(DataConfig(paths=[str(path)]), tokenizer)
    directory = data.directory
    assert directory.is_dir() and len(data) == 40
    del data
    import gc

    gc.collect()
    assert not directory.exists()


def test_no_usable_sample_is_an_error(
    tmp_path: Path, tokenizer: Tokenizer, write_jsonl: Callable[..., Path]
) -> None:
    path = write_jsonl("empty.jsonl", [{"text": " "}])
    with pytest.raises(DataError, match=r"no usable samples.*1 records.*1 empty"):
        tokenize_dataset(DataConfig(paths=[str(path)], cache_dir=str(tmp_path / "c")), tokenizer)
    assert list((tmp_path / "c").iterdir()) == []
