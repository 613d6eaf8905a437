"""Streaming readers for training data files: JSON Lines, JSON arrays, Parquet and plain text.

Every reader is a generator that holds one record (or one Parquet batch) at a time, so a corpus
larger than memory can be read. Each yields :class:`RawRecord` ``(source, line, record)``: ``line`` is
the 1-based line where the record starts (JSON Lines, a JSON array's element, text), or the 0-based
row (Parquet). Supported files:

* ``.jsonl`` — one JSON value per line; blank lines are ignored.
* ``.json`` — a JSON array, streamed element by element with an incremental decoder (the whole file
  is never loaded, though one element is). A ``.json`` file that starts with ``{`` is read as JSON
  Lines, as Hugging Face ``datasets`` does.
* ``.parquet`` — read batch by batch with pyarrow (``pip install 'lmstack-train[parquet]'``); a row
  becomes a dict of its columns.
* ``.txt`` — one document per blank-line-separated paragraph, per line, or the whole file
  (``txt_mode``); a document is yielded as a ``str``.
* ``.jsonl.gz``, ``.json.gz`` and ``.txt.gz`` are decompressed on the fly.

A malformed line (bad JSON, bad UTF-8) raises :class:`~lmstack.train.DataError` naming the file and
line, or is skipped and counted with ``on_malformed="skip"``. A syntax error inside a JSON array
always raises: after it, the following elements cannot be found reliably (convert such a file to JSON
Lines to skip bad records).
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, Literal, NamedTuple

from lmstack.train.data._errors import DataError, SkipPolicy
from lmstack.train.data._stats import DataStats

logger = logging.getLogger(__name__)

__all__ = ["SUPPORTED_SUFFIXES", "RawRecord", "read_records", "resolve_data_files"]

SUPPORTED_SUFFIXES: tuple[str, ...] = (
    ".jsonl",
    ".json",
    ".parquet",
    ".txt",
    ".jsonl.gz",
    ".json.gz",
    ".txt.gz",
)
"""File name endings the readers understand."""

_CHUNK = 1 << 20  # characters read at a time from a JSON array
_GLOB_CHARS = frozenset("*?[")


class RawRecord(NamedTuple):
    """One record as read from a file, before any format is applied.

    Attributes:
        source: The file it came from.
        line: The 1-based line where it starts, or the 0-based Parquet row.
        record: The decoded JSON value, the Parquet row as a dict, or the text document as a str.
    """

    source: str
    line: int
    record: Any


def _suffix(path: Path) -> str | None:
    name = path.name.lower()
    for suffix in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return None


def resolve_data_files(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Expands data paths into the list of files to read, in a stable order.

    Args:
        paths: Files, directories (every supported file under them, recursively, sorted; hidden
            files skipped) and glob patterns (``data/*.jsonl``, ``**`` allowed).

    Returns:
        The files, each once, in the order given (sorted within a directory or pattern).

    Raises:
        DataError: No paths, a path that does not exist, a pattern that matches nothing, or a file of
            an unsupported kind.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise DataError("no data paths given: set data.paths to one or more files, directories or patterns")
    found: list[Path] = []
    for item in paths:
        text = os.fspath(item)
        path = Path(text).expanduser()
        if path.is_file():
            if _suffix(path) is None:
                raise DataError(
                    f"{text}: unsupported data file type; supported: {', '.join(SUPPORTED_SUFFIXES)}"
                )
            found.append(path)
        elif path.is_dir():
            inside = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and _suffix(p) is not None
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not inside:
                raise DataError(
                    f"{text}: the directory holds no data files ({', '.join(SUPPORTED_SUFFIXES)})"
                )
            found.extend(inside)
        elif _GLOB_CHARS & set(text):
            matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(text), recursive=True))
            matches = [m for m in matches if m.is_file() and _suffix(m) is not None]
            if not matches:
                raise DataError(f"{text}: the pattern matches no data files")
            found.extend(matches)
        else:
            raise DataError(f"{text}: no such data file or directory")
    unique: list[Path] = []
    seen: set[str] = set()
    for path in found:
        key = os.path.realpath(path)
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique


def _open_binary(path: Path) -> IO[bytes]:
    try:
        if path.name.lower().endswith(".gz"):
            return gzip.open(path, "rb")  # type: ignore[return-value]
        return open(path, "rb")
    except OSError as exc:
        raise DataError(f"cannot open {path}: {exc}") from exc


_OnMalformed = Callable[[int, str], None]
"""What a reader calls with the line and the problem of a malformed line."""


def _malformed_lines(
    source: str, on_malformed: str, stats: DataStats | None
) -> tuple[SkipPolicy, _OnMalformed]:
    """The ``data.on_malformed`` policy of one file, and the function its readers call on a bad line."""
    policy = SkipPolicy(on_malformed, "data.on_malformed")

    def malformed(line: int, message: str) -> None:
        policy(DataError(message, source=source, line=line))
        if stats is not None:  # skipped (a failing policy has raised)
            stats.skipped_malformed += 1
            stats.records += 1

    return policy, malformed


def _read_jsonl(path: Path, malformed: _OnMalformed, first_line: int = 1) -> Iterator[RawRecord]:
    source = str(path)
    with _open_binary(path) as handle:
        try:
            for lineno, raw in enumerate(handle, 1):
                if lineno < first_line or not raw.strip():
                    continue
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    malformed(lineno, f"not valid UTF-8 ({exc.reason} at byte {exc.start})")
                    continue
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as exc:
                    malformed(lineno, f"malformed JSON: {exc.msg} (column {exc.colno})")
                    continue
                yield RawRecord(source, lineno, record)
        except (OSError, EOFError) as exc:  # a truncated .gz
            raise DataError(f"cannot read {path}: {exc}") from exc


def _read_json(path: Path, malformed: _OnMalformed) -> Iterator[RawRecord]:
    """Streams the elements of a top-level JSON array with ``raw_decode`` over a sliding buffer."""
    source = str(path)
    decoder = json.JSONDecoder()
    with _open_binary(path) as binary:
        handle = io.TextIOWrapper(binary, encoding="utf-8")
        buf = ""
        pos = 0
        line = 1  # line number of buf[pos]
        eof = False

        def fill() -> None:
            nonlocal buf, pos, eof
            try:
                chunk = handle.read(max(_CHUNK, len(buf) - pos))
            except UnicodeDecodeError as exc:
                raise DataError(f"not valid UTF-8 near line {line}: {exc.reason}", source=source) from exc
            except (OSError, EOFError) as exc:
                raise DataError(f"cannot read {path}: {exc}") from exc
            if not chunk:
                eof = True
            buf = buf[pos:] + chunk
            pos = 0

        def skip_space() -> None:
            nonlocal pos, line
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n\ufeff":
                    if buf[pos] == "\n":
                        line += 1
                    pos += 1
                if pos < len(buf) or eof:
                    return
                fill()

        skip_space()
        if pos >= len(buf):
            return  # an empty file holds no records
        if buf[pos] == "{":
            # JSON Lines under a .json name.
            handle.close()
            yield from _read_jsonl(path, malformed)
            return
        if buf[pos] != "[":
            raise DataError(
                f"a .json data file must hold a JSON array of records (or JSON Lines), found {buf[pos]!r}",
                source=source,
                line=line,
            )
        pos += 1
        first = True
        while True:
            skip_space()
            if pos >= len(buf):
                raise DataError(
                    "the JSON array is not closed (the file ends early)", source=source, line=line
                )
            if buf[pos] == "]":
                return
            if not first:
                if buf[pos] != ",":
                    raise DataError(
                        f"expected ',' or ']' between array elements, found {buf[pos]!r}; a syntax "
                        "error inside a JSON array cannot be skipped (convert the file to JSON Lines to "
                        "skip bad records)",
                        source=source,
                        line=line,
                    )
                pos += 1
                skip_space()
                if pos >= len(buf):
                    raise DataError("the JSON array is not closed", source=source, line=line)
            first = False
            while True:
                try:
                    record, end = decoder.raw_decode(buf, pos)
                except json.JSONDecodeError as exc:
                    if not eof:
                        fill()
                        continue
                    at = line + buf.count("\n", pos, exc.pos)
                    raise DataError(
                        f"malformed JSON: {exc.msg}; a syntax error inside a JSON array cannot be skipped "
                        "(convert the file to JSON Lines to skip bad records)",
                        source=source,
                        line=at,
                    ) from exc
                if end >= len(buf) and not eof:
                    fill()  # a number at the end of the buffer may continue in the next chunk
                    continue
                break
            yield RawRecord(source, line, record)
            line += buf.count("\n", pos, end)
            pos = end


def _read_txt(path: Path, mode: str, malformed: _OnMalformed) -> Iterator[RawRecord]:
    source = str(path)
    with _open_binary(path) as handle:
        try:
            if mode == "file":
                data = handle.read()
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError as exc:
                    malformed(data.count(b"\n", 0, exc.start) + 1, f"not valid UTF-8 ({exc.reason})")
                    return
                if text.strip():
                    yield RawRecord(source, 1, text)
                return
            paragraph: list[str] = []
            start = 0
            for lineno, raw in enumerate(handle, 1):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    malformed(lineno, f"not valid UTF-8 ({exc.reason})")
                    continue
                if mode == "line":
                    stripped = text.rstrip("\r\n")
                    if stripped.strip():
                        yield RawRecord(source, lineno, stripped)
                    continue
                if text.strip():
                    if not paragraph:
                        start = lineno
                    paragraph.append(text)
                elif paragraph:
                    yield RawRecord(source, start, "".join(paragraph).rstrip("\r\n"))
                    paragraph = []
            if paragraph:
                yield RawRecord(source, start, "".join(paragraph).rstrip("\r\n"))
        except (OSError, EOFError) as exc:
            raise DataError(f"cannot read {path}: {exc}") from exc


def _read_parquet(path: Path) -> Iterator[RawRecord]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise DataError(
            f"{path}: reading Parquet needs pyarrow; install it with pip install 'lmstack-train[parquet]'"
        ) from exc
    source = str(path)
    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for corrupt files
        raise DataError(f"cannot read {path} as Parquet: {exc}") from exc
    row = 0
    with parquet:
        try:
            for batch in parquet.iter_batches(batch_size=1024):
                for record in batch.to_pylist():
                    yield RawRecord(source, row, record)
                    row += 1
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"cannot read {path} as Parquet near row {row}: {exc}") from exc


def read_records(
    path: str | os.PathLike[str],
    *,
    txt_mode: Literal["paragraph", "line", "file"] = "paragraph",
    on_malformed: Literal["skip", "fail"] = "fail",
    stats: DataStats | None = None,
) -> Iterator[RawRecord]:
    """Streams the records of one data file.

    Args:
        path: A ``.jsonl``, ``.json``, ``.parquet`` or ``.txt`` file (``.gz`` for the text kinds).
        txt_mode: How a text file splits into documents: ``paragraph`` (blank-line separated), ``line``
            or ``file``.
        on_malformed: ``fail`` raises on a malformed line; ``skip`` skips it and counts it in
            ``stats.skipped_malformed``.
        stats: Counters to update (``files``, ``records``, ``skipped_malformed``).

    Yields:
        The records, in file order.

    Raises:
        DataError: An unreadable or unsupported file, or a malformed line when ``on_malformed`` is
            ``fail`` (the message names the file and line).
    """
    file = Path(path)
    kind = _suffix(file)
    if kind is None:
        raise DataError(f"{file}: unsupported data file type; supported: {', '.join(SUPPORTED_SUFFIXES)}")
    if not file.is_file():
        raise DataError(f"{file}: no such data file")
    if txt_mode not in ("paragraph", "line", "file"):
        raise DataError(f"txt_mode must be 'paragraph', 'line' or 'file', got {txt_mode!r}")
    policy, malformed = _malformed_lines(str(file), on_malformed, stats)
    base = kind.removesuffix(".gz")
    records: Iterator[RawRecord]
    if base == ".jsonl":
        records = _read_jsonl(file, malformed)
    elif base == ".json":
        records = _read_json(file, malformed)
    elif base == ".parquet":
        records = _read_parquet(file)
    else:
        records = _read_txt(file, txt_mode, malformed)
    if stats is not None:
        stats.files += 1
    for record in records:
        if stats is not None:
            stats.records += 1
        yield record
    if policy.count:
        logger.warning("%s: skipped %d malformed records", file, policy.count)
