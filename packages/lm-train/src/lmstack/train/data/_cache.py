"""The pre-tokenized dataset and its on-disk cache.

Tokenized samples are stored flat, so a dataset of any size is opened in O(1) memory (memory-mapped)
and sample ``i`` is two slices:

* ``input_ids.bin``: every sample's ids, concatenated, ``int32``;
* ``loss_mask.bin``: one byte per token, 1 where the token is trained on;
* ``offsets.bin``: ``int64``, ``num_samples + 1`` entries: sample ``i`` is ``offsets[i]:offsets[i+1]``;
* ``kinds.bin``: one byte per sample, 1 for a conversation, 0 for a text document;
* ``meta.json``: the format version, the cache key, the counts and the preparation stats.

With ``cache_dir`` set, the dataset lives in ``cache_dir/<key>``, where the key hashes everything the
result depends on: each data file's absolute path, size and modification time, the tokenizer's
content (vocabulary, merges, special tokens), the chat templates, and the config fields that change
tokenization (format, fields, txt_mode, train_on, add_eos, error policies). A later run with the same
key opens it without tokenizing; any change gives a new key. ``max_length``, packing and shuffling are
applied afterwards and do not invalidate it.

Writes are atomic (lmstack-core's :func:`~lmstack.core.atomic_directory`): files go to a hidden
staging sibling, ``meta.json`` last, and it takes the key's place only when complete, so the entry is
at every instant absent, or complete (a corrupt entry found on disk is replaced the same way). A
crash leaves only the hidden directory, never read (and removed by a later build on the same host once
its process is gone). When two processes build the same key at once, each puts a complete, equal
entry in place, and whichever lands last stays.
Without ``cache_dir`` the dataset is written to a private temporary directory removed when the
dataset object is garbage collected or the process exits.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import weakref
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, TypeVar

import numpy as np
from numpy.typing import NDArray
from tqdm.auto import tqdm

from lmstack.core import Tokenizer, atomic_directory
from lmstack.core.tokenizer import INTERNLM2_CHAT_TEMPLATE
from lmstack.train.data._config import DataConfig
from lmstack.train.data._errors import DataError, SkipPolicy
from lmstack.train.data._formats import iter_samples
from lmstack.train.data._readers import resolve_data_files
from lmstack.train.data._stats import DataStats
from lmstack.train.data._tokenize import ChatTemplateError, SampleTokenizer, TokenizedSample

logger = logging.getLogger(__name__)

__all__ = ["CACHE_VERSION", "TokenizedDataset", "cache_key", "tokenize_dataset"]

CACHE_VERSION = 1
"""Bumped whenever the cache layout or the tokenization rules change."""

_FILES = ("input_ids.bin", "loss_mask.bin", "offsets.bin", "kinds.bin")
_BATCH = 512  # samples rendered and tokenized per batched call


class TokenizedDataset:
    """Tokenized samples in the flat on-disk layout (see the module docs), memory-mapped.

    Build one with :func:`tokenize_dataset`, or open an existing directory with :meth:`open`.

    Attributes:
        directory: Where the files are.
        stats: What preparation read and skipped.
        cache_hit: Whether it was reused from the cache rather than tokenized now.
    """

    def __init__(self, directory: str | os.PathLike[str], *, cache_hit: bool = False) -> None:
        self.directory = Path(directory)
        meta = _read_meta(self.directory)
        if meta is None:
            raise DataError(f"{self.directory} is not a complete tokenized dataset (no valid meta.json)")
        self._meta = meta
        self.stats = DataStats(**meta.get("stats", {}))
        self.cache_hit = cache_hit
        self.num_samples = int(meta["num_samples"])
        self.num_tokens = int(meta["num_tokens"])
        self.num_loss_tokens = int(meta["num_loss_tokens"])
        self._arrays: dict[str, np.ndarray] | None = None
        self._owner_pid: int | None = None

    @classmethod
    def open(cls, directory: str | os.PathLike[str]) -> TokenizedDataset:
        """Opens a tokenized dataset directory (a cache entry).

        Args:
            directory: The directory.

        Returns:
            The dataset.

        Raises:
            DataError: The directory is missing, incomplete or corrupt.
        """
        path = Path(directory)
        if _read_meta(path) is None or not _sizes_ok(path):
            raise DataError(f"{path} is not a complete tokenized dataset (missing or truncated files)")
        return cls(path, cache_hit=True)

    # -- arrays (opened lazily, per process) --------------------------------------------------------

    def _open(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            arrays: dict[str, np.ndarray] = {}
            for name, dtype, count in (
                ("input_ids", np.int32, self.num_tokens),
                ("loss_mask", np.uint8, self.num_tokens),
                ("offsets", np.int64, self.num_samples + 1),
                ("kinds", np.uint8, self.num_samples),
            ):
                if count == 0:
                    arrays[name] = np.zeros(0, dtype=dtype)
                else:
                    arrays[name] = np.memmap(
                        self.directory / f"{name}.bin", dtype=dtype, mode="r", shape=(count,)
                    )
            self._arrays = arrays
        return self._arrays

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_arrays"] = None  # each process maps the files itself (no copy through pickling)
        state.pop("_finalizer", None)
        return state

    @property
    def offsets(self) -> NDArray[np.int64]:
        """Sample boundaries: sample ``i`` holds tokens ``offsets[i]:offsets[i+1]``."""
        return self._open()["offsets"]

    @property
    def lengths(self) -> NDArray[np.int64]:
        """The length in tokens of every sample."""
        return np.diff(np.asarray(self.offsets, dtype=np.int64)).astype(np.int64)

    @property
    def input_ids(self) -> NDArray[np.int32]:
        """All token ids, concatenated (memory-mapped)."""
        return self._open()["input_ids"]

    @property
    def loss_mask(self) -> NDArray[np.uint8]:
        """All loss flags, concatenated (memory-mapped)."""
        return self._open()["loss_mask"]

    def is_chat(self, index: int) -> bool:
        """Whether sample ``index`` is a conversation (else a text document)."""
        return bool(self._open()["kinds"][index])

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> TokenizedSample:
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"sample {index} out of range for {self.num_samples} samples")
        index %= self.num_samples
        arrays = self._open()
        start, end = int(arrays["offsets"][index]), int(arrays["offsets"][index + 1])
        return TokenizedSample(
            input_ids=np.array(arrays["input_ids"][start:end], dtype=np.int32),
            loss_mask=np.array(arrays["loss_mask"][start:end], dtype=np.bool_),
            is_chat=bool(arrays["kinds"][index]),
        )

    def __repr__(self) -> str:
        return (
            f"TokenizedDataset({str(self.directory)!r}, samples={self.num_samples}, tokens={self.num_tokens})"
        )


# ------------------------------------------------------------------------------------------------
# metadata and validation
# ------------------------------------------------------------------------------------------------


def _read_meta(directory: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("version") != CACHE_VERSION or not meta.get("complete"):
        return None
    if not all(isinstance(meta.get(k), int) for k in ("num_samples", "num_tokens", "num_loss_tokens")):
        return None
    return meta


def _sizes_ok(directory: Path) -> bool:
    meta = _read_meta(directory)
    if meta is None:
        return False
    n, t = meta["num_samples"], meta["num_tokens"]
    expected = {"input_ids.bin": 4 * t, "loss_mask.bin": t, "offsets.bin": 8 * (n + 1), "kinds.bin": n}
    try:
        return all((directory / name).stat().st_size == size for name, size in expected.items())
    except OSError:
        return False


# ------------------------------------------------------------------------------------------------
# the cache key
# ------------------------------------------------------------------------------------------------


def _tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    digest = hashlib.sha256()
    digest.update(tokenizer.backend_tokenizer.to_str().encode("utf-8"))
    digest.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True).encode("utf-8"))
    digest.update(json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id]).encode("utf-8"))
    return digest.hexdigest()


def cache_key(files: list[Path], tokenizer: Tokenizer, config: DataConfig) -> str:
    """The key of a tokenized dataset in the cache (see the module docs for what it covers).

    Args:
        files: The resolved data files.
        tokenizer: The tokenizer.
        config: The data config.

    Returns:
        A hex digest.

    Raises:
        DataError: A data file cannot be stat'ed.
    """
    entries = []
    for file in files:
        try:
            stat = file.stat()
        except OSError as exc:
            raise DataError(f"cannot read {file}: {exc}") from exc
        entries.append([os.path.abspath(file), stat.st_size, stat.st_mtime_ns])
    payload = {
        "version": CACHE_VERSION,
        "files": entries,
        "tokenizer": _tokenizer_fingerprint(tokenizer),
        "templates": tokenizer.chat_templates or {"builtin": INTERNLM2_CHAT_TEMPLATE},
        "chat_template": config.chat_template,
        "config": {
            name: getattr(config, name)
            for name in (
                "format",
                "text_field",
                "messages_field",
                "txt_mode",
                "train_on",
                "add_eos",
                "on_malformed",
                "on_empty_assistant",
            )
        },
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()[:40]


# ------------------------------------------------------------------------------------------------
# building
# ------------------------------------------------------------------------------------------------


class _Writer:
    """Appends tokenized samples to the flat files of a staging directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._handles: dict[str, IO[bytes]] = {}
        for name in ("input_ids", "loss_mask", "kinds"):
            self._handles[name] = open(directory / f"{name}.bin", "wb")  # noqa: SIM115 - closed in close()
        self.offsets = array("q", [0])
        self.num_tokens = 0
        self.num_loss_tokens = 0

    def add(self, sample: TokenizedSample) -> None:
        ids = np.ascontiguousarray(sample.input_ids, dtype=np.int32)
        mask = np.ascontiguousarray(sample.loss_mask, dtype=np.uint8)
        self._handles["input_ids"].write(ids.tobytes())
        self._handles["loss_mask"].write(mask.tobytes())
        self._handles["kinds"].write(b"\x01" if sample.is_chat else b"\x00")
        self.num_tokens += int(ids.shape[0])
        self.num_loss_tokens += int(mask.sum())
        self.offsets.append(self.num_tokens)

    def finish(self, meta: dict[str, Any]) -> None:
        # No fsync here: atomic_directory flushes the whole entry before it takes its place.
        (self.directory / "offsets.bin").write_bytes(np.frombuffer(self.offsets, dtype=np.int64).tobytes())
        self.close()
        (self.directory / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()


_T = TypeVar("_T")


def _batches(samples: Iterator[_T], size: int) -> Iterator[list[_T]]:
    batch: list[_T] = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _tokenize_into(
    directory: Path,
    files: list[Path],
    tokenizer: Tokenizer,
    config: DataConfig,
    key: str,
    show_progress: bool | None,
) -> None:
    stats = DataStats()
    sample_tokenizer = SampleTokenizer(
        tokenizer, train_on=config.train_on, add_eos=config.add_eos, chat_template=config.chat_template
    )
    writer = _Writer(directory)
    skip_malformed = SkipPolicy(config.on_malformed, "data.on_malformed")
    try:
        progress = tqdm(
            desc="tokenizing", unit=" samples", disable=None if show_progress is None else not show_progress
        )
        with progress:
            for batch in _batches(iter_samples(files, config, stats), _BATCH):
                rendered = []
                for sample in batch:
                    try:
                        rendered.append(sample_tokenizer.render(sample))
                    except ChatTemplateError:
                        raise
                    except DataError as exc:
                        skip_malformed(exc)
                        stats.skipped_malformed += 1
                for tokenized in sample_tokenizer.encode(rendered):
                    writer.add(tokenized)
                stats.samples += len(rendered)
                progress.update(len(batch))
        if stats.samples == 0:
            raise DataError(
                f"no usable samples in {len(files)} data file(s) ({stats.records} records, "
                f"{stats.skipped_malformed} malformed, {stats.skipped_empty} empty skipped)"
            )
        stats.tokens = writer.num_tokens
        stats.loss_tokens = writer.num_loss_tokens
        writer.finish(
            {
                "version": CACHE_VERSION,
                "key": key,
                "complete": True,
                "num_samples": stats.samples,
                "num_tokens": writer.num_tokens,
                "num_loss_tokens": writer.num_loss_tokens,
                "files": [str(f) for f in files],
                "tokenizer": tokenizer.name_or_path,
                "stats": {k: v for k, v in stats.as_dict().items() if k != "padding_ratio"},
            }
        )
    finally:
        writer.close()


def tokenize_dataset(
    config: DataConfig, tokenizer: Tokenizer, *, show_progress: bool | None = None
) -> TokenizedDataset:
    """Reads, converts and tokenizes the data of ``config``, or reuses the cached result.

    Args:
        config: The data config (``paths``, formats, ``train_on``, ``cache_dir`` ...).
        tokenizer: The model's tokenizer.
        show_progress: Show a progress bar (None: only on a terminal).

    Returns:
        The tokenized dataset; ``cache_hit`` tells whether tokenization was skipped.

    Raises:
        DataError: Missing files, a malformed record (``on_malformed="fail"``), an empty assistant turn
            (``on_empty_assistant="fail"``), no usable sample at all, or an unwritable cache directory.
        ChatTemplateError: The chat template cannot be used to mask the loss.
    """
    files = resolve_data_files(config.paths)
    key = cache_key(files, tokenizer, config)
    if config.cache_dir is None:
        directory = Path(tempfile.mkdtemp(prefix="lmstack-data-"))
        try:
            _tokenize_into(directory, files, tokenizer, config, key, show_progress)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        dataset = TokenizedDataset(directory)
        _remove_on_collect(dataset, directory)
        logger.info("tokenized %d samples (%d tokens)", dataset.num_samples, dataset.num_tokens)
        return dataset

    root = Path(config.cache_dir).expanduser()
    final = root / key
    if final.is_dir():
        if _sizes_ok(final):
            logger.info("reusing pre-tokenized data from %s", final)
            return TokenizedDataset(final, cache_hit=True)
        logger.warning("the cache entry %s is incomplete or corrupt: tokenizing again", final)
    try:
        with atomic_directory(final) as staging:
            _tokenize_into(staging, files, tokenizer, config, key, show_progress)
    except OSError as exc:
        # Another process put the same entry in place first (renaming onto it then fails).
        if not _sizes_ok(final):
            raise DataError(f"cannot write the cache entry {final}: {exc}") from exc
        logger.info("another process cached %s first; using its copy", final)
    dataset = TokenizedDataset(final)
    logger.info("tokenized %d samples (%d tokens) into %s", dataset.num_samples, dataset.num_tokens, final)
    return dataset


def _remove_on_collect(dataset: TokenizedDataset, directory: Path) -> None:
    pid = os.getpid()

    def cleanup() -> None:
        if os.getpid() == pid:  # never from a forked data-loader worker
            shutil.rmtree(directory, ignore_errors=True)

    dataset._finalizer = weakref.finalize(dataset, cleanup)  # type: ignore[attr-defined]
