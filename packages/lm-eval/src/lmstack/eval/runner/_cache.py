"""The answer cache: SQLite (WAL), one row per (model fingerprint, call key), committed per batch.

Every answer is committed as soon as the batch that produced it returns, so a run that is killed
(SIGKILL included) and restarted asks the model only for what is not in the cache yet. Rows hold the
request as JSON too, so a cache is self-describing and :func:`merge_caches` can check what it joins.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmstack.eval._errors import EvalError

__all__ = ["AnswerCache", "CacheError", "ModelInfo", "merge_caches"]

_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS models (
    fingerprint TEXT PRIMARY KEY, name TEXT NOT NULL, kind TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS answers (
    fingerprint TEXT NOT NULL,
    key TEXT NOT NULL,
    request TEXT NOT NULL,
    answer TEXT NOT NULL,
    PRIMARY KEY (fingerprint, key)
) WITHOUT ROWID;
"""
# SQLite caps bound parameters per statement (999 in old builds): look keys up in chunks.
_CHUNK = 500


class CacheError(EvalError):
    """A cache file is unreadable, of another schema, or conflicts with another being merged."""


@dataclass(frozen=True)
class ModelInfo:
    """Which model answered: what results name and what the cache is keyed by.

    Attributes:
        name: A readable name (the model directory's name, or the served model's name).
        fingerprint: A hash that changes whenever the answers could (see :mod:`._fingerprint`).
        kind: ``local`` (:class:`lmstack.infer.LLM`), ``remote`` (:class:`lmstack.infer.RemoteLLM`),
            ``reference`` (:class:`lmstack.eval.TransformersLLM`) or
            ``custom`` (another LLM-protocol object).
    """

    name: str
    fingerprint: str
    kind: str


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


class AnswerCache:
    """Answers of a model to requests, in one SQLite file (or in memory when ``path`` is None).

    Args:
        path: The cache file; created (with its directory) when missing. None keeps answers in memory.
    """

    def __init__(self, path: str | Path | None) -> None:
        self.path = None if path is None else Path(path)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(":memory:" if self.path is None else str(self.path), timeout=60)
            if self.path is not None:
                self._db.execute("PRAGMA journal_mode=WAL")
                # WAL + NORMAL: a committed batch survives the process being killed (not a power cut).
                self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            row = self._db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            if row is None:
                with self._db:
                    self._db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(_SCHEMA_VERSION),))
            elif row[0] != str(_SCHEMA_VERSION):
                raise CacheError(
                    f"cache {self.path} has schema {row[0]}, this lmstack-eval reads {_SCHEMA_VERSION}; "
                    "use another --cache file"
                )
        except sqlite3.DatabaseError as err:
            raise CacheError(f"cannot open the cache {self.path}: {err}") from err

    def __repr__(self) -> str:
        return f"AnswerCache({str(self.path) if self.path else ':memory:'!r})"

    def close(self) -> None:
        """Close the database (idempotent)."""
        self._db.close()

    def __enter__(self) -> AnswerCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add_model(self, model: ModelInfo) -> None:
        """Record a model's name and kind under its fingerprint (for rescoring without the model)."""
        with self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO models VALUES (?, ?, ?)", (model.fingerprint, model.name, model.kind)
            )

    def set_meta(self, key: str, value: str) -> None:
        """Record a run setting (such as a model's rolling window) that rescoring needs."""
        with self._db:
            self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def get_meta(self, key: str) -> str | None:
        """A setting recorded by :meth:`set_meta`, or None."""
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def models(self) -> list[ModelInfo]:
        """The models that have answers (or were recorded) in this cache."""
        rows = self._db.execute("SELECT name, fingerprint, kind FROM models ORDER BY name").fetchall()
        return [ModelInfo(*row) for row in rows]

    def get(self, fingerprint: str, keys: Sequence[str]) -> dict[str, Any]:
        """The cached answers among ``keys`` for one model: key -> answer (missing keys are absent)."""
        found: dict[str, Any] = {}
        for start in range(0, len(keys), _CHUNK):
            chunk = list(keys[start : start + _CHUNK])
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(
                f"SELECT key, answer FROM answers WHERE fingerprint = ? AND key IN ({marks})",
                [fingerprint, *chunk],
            )
            found.update((key, json.loads(answer)) for key, answer in rows)
        return found

    def put(self, fingerprint: str, items: Iterable[tuple[str, Mapping[str, Any], Any]]) -> None:
        """Store ``(key, request, answer)`` rows and commit them in one transaction."""
        rows = [(fingerprint, key, _dumps(request), _dumps(answer)) for key, request, answer in items]
        with self._db:
            self._db.executemany("INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?)", rows)

    def count(self, fingerprint: str | None = None) -> int:
        """How many answers the cache holds (for one model when ``fingerprint`` is given)."""
        if fingerprint is None:
            return int(self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0])
        query = "SELECT COUNT(*) FROM answers WHERE fingerprint = ?"
        return int(self._db.execute(query, (fingerprint,)).fetchone()[0])

    def rows(self) -> Iterator[tuple[str, str, str, str]]:
        """Every ``(fingerprint, key, request JSON, answer JSON)`` row."""
        yield from self._db.execute("SELECT fingerprint, key, request, answer FROM answers")

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._db:
            yield self._db


def merge_caches(sources: Sequence[str | Path], into: str | Path) -> int:
    """Join shard caches into one.

    Rows already in ``into`` or repeated across sources must carry the same answer: a key answered
    differently is an error (naming the key and the files) and ``into`` is left as it was.

    Args:
        sources: The cache files to read (each must exist).
        into: The cache file to add them to (created when missing).

    Returns:
        The number of answers added.

    Raises:
        CacheError: A source is missing or unreadable, or two answers for one key differ.
    """
    for source in sources:
        if not Path(source).is_file():
            raise CacheError(f"cache file {source} does not exist")
    seen: dict[tuple[str, str], tuple[str, str]] = {}
    if Path(into).exists():
        with closing(AnswerCache(into)) as existing:
            seen = {(fp, key): (answer, str(into)) for fp, key, _, answer in existing.rows()}
    new_rows: list[tuple[str, str, str, str]] = []
    new_models: list[ModelInfo] = []
    for source in sources:
        with closing(AnswerCache(source)) as cache:
            new_models.extend(cache.models())
            for fp, key, request, answer in cache.rows():
                before = seen.get((fp, key))
                if before is None:
                    seen[(fp, key)] = (answer, str(source))
                    new_rows.append((fp, key, request, answer))
                elif before[0] != answer:
                    raise CacheError(
                        f"caches disagree: {before[1]} and {source} hold different answers for "
                        f"request {key} of model {fp[:16]}; nothing was merged"
                    )
    # One transaction, opened only once every row is checked: a failed merge leaves `into` as it was.
    with closing(AnswerCache(into)) as target, target._transaction() as db:
        db.executemany("INSERT INTO answers VALUES (?, ?, ?, ?)", new_rows)
        db.executemany(
            "INSERT OR REPLACE INTO models VALUES (?, ?, ?)",
            [(m.fingerprint, m.name, m.kind) for m in new_models],
        )
    return len(new_rows)
