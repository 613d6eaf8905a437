"""Readers for local task data: JSON lines, JSON, CSV and parquet (and Hugging Face ``datasets``, optional).

Every reader returns the rows of one split as a list of dicts, in file order. Values are typed as
Hugging Face ``datasets`` would load them for lm-evaluation-harness (a CSV column of integers holds ints),
because lm-eval's prompts depend on it: an integer target is an index into the choices.
A malformed row is a :class:`DatasetError` naming the file and the line.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from lmstack.eval._errors import DatasetError
from lmstack.eval.tasks._config import DatasetConfig

__all__ = ["read_data_file", "read_split"]

Doc = dict[str, Any]


def read_split(dataset: DatasetConfig, split: str) -> list[Doc]:
    """Read one split of a dataset: its files' rows, concatenated in order."""
    if dataset.format == "hf":
        return _read_hf(dataset, split)
    files = dataset.data_files.get(split)
    if files is None:
        raise DatasetError(
            f"the dataset has no split {split!r}; its data_files name "
            f"{', '.join(sorted(dataset.data_files)) or 'none'}"
        )
    rows: list[Doc] = []
    for path in files:
        rows.extend(read_data_file(path, dataset.format))
    return rows


def read_data_file(path: str | Path, fmt: str) -> list[Doc]:
    """Read every row of one local file in format ``jsonl``, ``json``, ``csv`` or ``parquet``."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"data file {path} does not exist", path=path)
    if fmt in ("json", "jsonl"):
        return _read_json(path)
    if fmt == "csv":
        return _read_csv(path)
    if fmt == "parquet":
        return _read_parquet(path)
    raise DatasetError(f"unknown data format {fmt!r} for {path}", path=path)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(f"cannot read data file {path}: {err}", path=path) from err


def _row(value: Any, path: Path, line: int) -> Doc:
    if not isinstance(value, dict):
        raise DatasetError(
            f"{path}:{line}: a row must be a JSON object, got {type(value).__name__}", path=path, line=line
        )
    return value


def _read_json(path: Path) -> list[Doc]:
    """A JSON array of objects, or JSON lines (what Hugging Face's ``json`` builder reads either way)."""
    text = _read_text(path)
    stripped = text.lstrip()
    if stripped.startswith("["):
        return _read_json_array(text, path)
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise DatasetError(
                f"{path}:{number}: malformed JSON row: {err.msg}", path=path, line=number
            ) from err
        rows.append(_row(value, path, number))
    return rows


def _read_json_array(text: str, path: Path) -> list[Doc]:
    # Decode element by element so that a bad row is named by its line, not just "somewhere in the file".
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    rows: list[Doc] = []

    def line_at(offset: int) -> int:
        return text.count("\n", 0, offset) + 1

    def skip_space(offset: int) -> int:
        while offset < len(text) and text[offset] in " \t\r\n":
            offset += 1
        return offset

    pos = skip_space(pos)
    if pos < len(text) and text[pos] == "]":
        return rows
    while True:
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise DatasetError(
                f"{path}:{err.lineno}: malformed JSON row: {err.msg}", path=path, line=err.lineno
            ) from err
        rows.append(_row(value, path, line_at(pos)))
        pos = skip_space(end)
        if pos < len(text) and text[pos] == ",":
            pos = skip_space(pos + 1)
            continue
        if pos < len(text) and text[pos] == "]":
            break
        line = line_at(pos)
        raise DatasetError(f"{path}:{line}: expected ',' or ']' after a row", path=path, line=line)
    rest = text[pos + 1 :].strip()
    if rest:
        line = line_at(len(text) - len(text[pos + 1 :].lstrip()))
        raise DatasetError(f"{path}:{line}: unexpected text after the JSON array", path=path, line=line)
    return rows


def _read_csv(path: Path) -> list[Doc]:
    text = _read_text(path)
    reader = csv.reader(text.splitlines(keepends=True))
    try:
        header = next(reader)
    except StopIteration:
        return []
    except csv.Error as err:
        raise DatasetError(f"{path}:1: malformed CSV header: {err}", path=path, line=1) from err
    records: list[tuple[int, list[str]]] = []
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            raise DatasetError(
                f"{path}:{reader.line_num}: malformed CSV row: {err}", path=path, line=reader.line_num
            ) from err
        if not cells:
            continue
        if len(cells) != len(header):
            raise DatasetError(
                f"{path}:{reader.line_num}: row has {len(cells)} fields, the header has {len(header)}",
                path=path,
                line=reader.line_num,
            )
        records.append((reader.line_num, cells))
    columns = [_column_type([cells[i] for _, cells in records]) for i in range(len(header))]
    return [
        {name: convert(cell) for name, convert, cell in zip(header, columns, cells, strict=True)}
        for _, cells in records
    ]


def _column_type(cells: list[str]) -> Any:
    """A column's converter, as pandas infers: int if every filled cell is one, else float, else str."""
    filled = [cell for cell in cells if cell != ""]
    for kind in (int, float):
        try:
            for cell in filled:
                kind(cell)
        except ValueError:
            continue
        if filled:
            return lambda cell, kind=kind: None if cell == "" else kind(cell)
    return lambda cell: None if cell == "" else cell


def _read_parquet(path: Path) -> list[Doc]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise DatasetError(
            f"reading {path} needs pyarrow: pip install 'lmstack-eval[parquet]'", path=path
        ) from err
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises several unrelated types for a bad file
        raise DatasetError(f"{path}: not a readable parquet file: {err}", path=path) from err
    return [dict(row) for row in rows]


def _read_hf(dataset: DatasetConfig, split: str) -> list[Doc]:
    try:
        import datasets  # type: ignore[import-not-found,unused-ignore]
    except ImportError as err:
        raise DatasetError(
            f"dataset {dataset.path!r} is read with Hugging Face datasets, which is not installed: "
            "pip install datasets, or use local jsonl/json/csv/parquet files"
        ) from err
    files = {name: [str(p) for p in paths] for name, paths in dataset.data_files.items()} or None
    try:
        loaded = datasets.load_dataset(dataset.path, dataset.name, data_files=files, split=split)
    except Exception as err:  # datasets raises many types; keep its message
        raise DatasetError(f"datasets.load_dataset({dataset.path!r}, split={split!r}) failed: {err}") from err
    return [dict(row) for row in loaded]
