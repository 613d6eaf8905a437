"""What the built-in tasks share: documents from a loader function, and finding their data files."""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from lmstack.eval._errors import DatasetError, TaskConfigError
from lmstack.eval.tasks._config import TaskConfig
from lmstack.eval.tasks._task import Task

__all__ = ["BuiltinTask", "Doc", "Loader", "data_root", "find_file", "read_jsonl"]

Doc = dict[str, Any]
Loader = Callable[[str, Path], list[Doc]]


class BuiltinTask(Task):
    """A :class:`Task` whose documents come from a loader (a file format's reader and its preprocessing).

    The config's ``dataset.data_files`` name the files of each split, so results and errors point at
    them; the loader decides how one file's rows become documents (a CSV without header, a filtered
    JSON-lines file, ...).

    Args:
        config: The task definition.
        load: ``load(split, path) -> documents`` for each file of a split.
        expected: Split -> the files it should have, in words, for the error when it has none.
    """

    def __init__(
        self, config: TaskConfig, load: Loader, *, expected: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(config)
        self._load = load
        self._expected = dict(expected or {})

    def _read(self, split: str) -> list[Doc]:
        try:
            files = self.config.dataset.data_files.get(split, ())
            if not files:
                hint = self._expected.get(split)
                raise DatasetError(
                    f"no data file for split {split!r}" + (f": expected {hint}" if hint else "")
                )
            return [doc for path in files for doc in self._load(split, path)]
        except DatasetError as err:
            raise type(err)(f"task {self.name}: {err}", path=err.path, line=err.line) from err


def data_root(task: str, data_dir: str | os.PathLike[str] | None, wants: str) -> Path:
    """``data_dir`` as a folder that exists, or an error saying what the task reads from it.

    Args:
        task: The task's name.
        data_dir: What the user passed.
        wants: The files the task reads, in words (named in the error).
    """
    if data_dir is None:
        raise TaskConfigError(f"task {task!r} reads local files: pass data_dir, a folder holding {wants}")
    root = Path(data_dir)
    if not root.is_dir():
        raise DatasetError(
            f"task {task!r}: data_dir {root} is not a folder (it should hold {wants})", path=root
        )
    return root


def find_file(task: str, root: Path, names: Iterable[str], *, below: bool = True) -> Path:
    """The first of ``names`` in ``root`` (or, with ``below``, anywhere under it), or an error naming them.

    Args:
        task: The task's name.
        root: The data folder.
        names: Acceptable file names, preferred first.
        below: Also look in subfolders (for names distinctive enough not to be found by accident).
    """
    names = list(names)
    for name in names:
        if (root / name).is_file():
            return root / name
    for name in names if below else ():
        found = sorted(root.rglob(name))
        if found:
            return found[0]
    raise DatasetError(
        f"task {task!r}: {root} has no {' or '.join(names)}" + (" (nor has any subfolder)" if below else ""),
        path=root,
    )


def read_jsonl(path: Path, convert: Callable[[Doc], Doc | None], what: str) -> list[Doc]:
    """The documents ``convert`` makes of a JSON-lines file's rows (``.gz`` too); ``None`` drops a row.

    A row that is not JSON, or that ``convert`` cannot read (a missing key, a wrong type), is a
    :class:`DatasetError` naming the file and the line.

    Args:
        path: The file.
        convert: Row -> document, or ``None`` to skip the row.
        what: The format's name, for errors (``"GSM8K"``).
    """
    if not path.is_file():
        raise DatasetError(f"data file {path} does not exist", path=path)
    try:
        raw = path.read_bytes()
        text = (gzip.decompress(raw) if path.suffix == ".gz" else raw).decode("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(f"cannot read data file {path}: {err}", path=path) from err
    docs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            doc = convert(json.loads(line))
        except json.JSONDecodeError as err:
            raise DatasetError(
                f"{path}:{number}: malformed JSON row: {err.msg}", path=path, line=number
            ) from err
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as err:
            raise DatasetError(
                f"{path}:{number}: not a {what} row ({type(err).__name__}: {err})", path=path, line=number
            ) from err
        if doc is not None:
            docs.append(doc)
    return docs
