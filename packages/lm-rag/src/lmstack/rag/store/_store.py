"""The index directory: chunks and vectors in SQLite, a faiss index and artifacts per generation.

Layout of an index directory::

    meta.sqlite            documents, chunks (text, metadata, vector), caller state, the generation
    vectors-<gen>.faiss    the vector index of generation <gen>
    <name>-<gen>           artifacts written by callers at commit (the BM25 index, ...)
    embeddings.sqlite      the embedding cache
    write.lock             held by the one writer

A commit writes the files of generation ``gen + 1`` beside those of ``gen``, then flips the generation in
the same SQLite transaction as every row change. Until that COMMIT the old generation is what every
reader loads; after it, the new one. Files of a generation newer than the committed one are leftovers of
a killed writer, and the next writer removes them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar

import faiss
import filelock
import numpy as np

from lmstack.core import atomic_directory
from lmstack.rag._errors import IndexLockedError, RAGConfigError, StoreError
from lmstack.rag._types import Chunk, Document
from lmstack.rag.embed import EmbeddingCache
from lmstack.rag.embed._protocol import Closing
from lmstack.rag.store._vector import VectorIndex, VectorIndexConfig, fsync_dir, resolve_kind

__all__ = ["DocumentRecord", "Store", "WriteTransaction"]

logger = logging.getLogger(__name__)

_META = "meta.sqlite"
_EMBEDDINGS = "embeddings.sqlite"
_LOCK = "write.lock"
_GENERATION_FILE = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9_.-]*?)-(?P<gen>\d+)(?P<ext>\.faiss)?$")
_ARTIFACT_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.]*$")
_SQLITE_MAX_VARS = 900
_PAGE = 1000
_LOAD_RETRIES = 20
_DEFAULT_VECTOR_CONFIG = VectorIndexConfig()

_SCHEMA = """
CREATE TABLE info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE documents (
    source TEXT PRIMARY KEY, content_hash TEXT NOT NULL, kind TEXT NOT NULL, size INTEGER NOT NULL,
    chunk_count INTEGER NOT NULL, ingested_at TEXT NOT NULL, metadata TEXT NOT NULL
);
CREATE TABLE chunks (
    id INTEGER PRIMARY KEY AUTOINCREMENT, source TEXT NOT NULL, ordinal INTEGER NOT NULL,
    start_offset INTEGER NOT NULL, end_offset INTEGER NOT NULL, text TEXT NOT NULL, metadata TEXT NOT NULL,
    vector BLOB NOT NULL
);
CREATE INDEX chunks_by_source ON chunks (source);
"""


@dataclass(frozen=True)
class DocumentRecord:
    """What the index knows about one ingested document.

    Attributes:
        source: The document's :attr:`~lmstack.rag.Document.source`.
        content_hash: SHA-256 of the file's bytes when it was ingested.
        kind: The reader's kind (``markdown``, ``pdf``, ...).
        size: Size in bytes (the document's ``size`` metadata, else its text's UTF-8 length).
        chunk_count: Chunks it was split into.
        ingested_at: When it was stored, ISO 8601 UTC.
        metadata: The document's metadata.
    """

    source: str
    content_hash: str
    kind: str
    size: int
    chunk_count: int
    ingested_at: str
    metadata: Mapping[str, Any] = field(default_factory=dict)


def _dumps(value: Any, what: str) -> str:
    try:
        return json.dumps(value, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise RAGConfigError(f"{what} must be JSON-serialisable: {exc}", field=what) from exc


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    return conn


def _chunk_from_row(row: Sequence[Any]) -> Chunk:
    source, ordinal, start, end, text, metadata = row
    return Chunk(
        text=text, source=source, ordinal=ordinal, start=start, end=end, metadata=json.loads(metadata)
    )


def _iter_chunks(conn: sqlite3.Connection, lock: AbstractContextManager[Any]) -> Iterator[tuple[int, Chunk]]:
    """Every chunk with its id, in id order, read in pages (so memory stays small) under ``lock``."""
    last = -1
    while True:
        with lock:
            rows = conn.execute(
                "SELECT id, source, ordinal, start_offset, end_offset, text, metadata FROM chunks "
                "WHERE id > ? ORDER BY id LIMIT ?",
                (last, _PAGE),
            ).fetchall()
        for row in rows:
            yield row[0], _chunk_from_row(row[1:])
        if len(rows) < _PAGE:
            return
        last = rows[-1][0]


def _fsync_tree(path: Path) -> None:
    if path.is_dir():
        for dirpath, _, names in os.walk(path):
            for name in names:
                with open(Path(dirpath, name), "rb") as fh:
                    os.fsync(fh.fileno())
            fsync_dir(Path(dirpath))
    elif path.is_file():
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _link_or_copy(src: Path, dst: Path) -> None:
    """Give the next generation a file of this one without copying (files are never written in place)."""
    if src.is_dir():
        shutil.copytree(src, dst, copy_function=lambda a, b: _link_or_copy(Path(a), Path(b)))
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


class Store(Closing):
    """An index directory: rows in SQLite, vectors in faiss, artifacts and a write lock.

    ``meta.sqlite`` (SQLite in WAL mode: documents, chunks with their vectors, state),
    ``vectors-<gen>.faiss``, artifacts ``<name>-<gen>`` (written by callers, e.g. the BM25 index),
    ``embeddings.sqlite`` (:class:`~lmstack.rag.embed.EmbeddingCache`) and ``write.lock``.

    Any number of processes may read an index while one writes (:meth:`writer`). A reader sees one
    committed generation: the vector index it loaded, until :meth:`refresh` moves it to a newer one
    (row lookups such as :meth:`chunks` read the newest committed rows; ids the loaded vector index
    returns that a later commit deleted are simply absent). Safe to share between threads.

    Attributes:
        path: The index directory.
        settings: The caller's settings stored at creation (embedder fingerprint, chunking, ...).
        dim: Vector length.
        vector_config: How the vector index is built.
        generation: The committed generation this object has loaded.
        vector_index: The vector index of :attr:`generation`.
    """

    FORMAT_VERSION: ClassVar[int] = 1

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = path
        self._conn = conn
        self._lock = threading.RLock()
        self._cache: EmbeddingCache | None = None
        self.settings: dict[str, Any] = {}
        self.dim = 0
        self.vector_config = VectorIndexConfig()
        self.generation = -1
        self.vector_index: VectorIndex
        self._load()

    # -- creating and opening ----------------------------------------------------------------------

    @staticmethod
    def exists(path: str | Path) -> bool:
        """Whether ``path`` is an index directory."""
        return (Path(path) / _META).is_file()

    @classmethod
    def create(
        cls,
        path: str | Path,
        *,
        settings: Mapping[str, Any],
        dim: int,
        vector_config: VectorIndexConfig = _DEFAULT_VECTOR_CONFIG,
    ) -> Store:
        """Create an empty index (generation 0) and open it.

        Creation is atomic: the directory appears complete or not at all.

        Args:
            path: A directory that does not exist or is empty.
            settings: JSON-able settings the caller owns (embedder fingerprint, chunking, ...).
            dim: Vector length.
            vector_config: How the vector index is built.

        Raises:
            StoreError: ``path`` is already an index, or a non-empty directory, or a file.
            RAGConfigError: ``settings`` is not JSON-able or ``dim`` is not positive.
        """
        target = Path(path)
        if cls.exists(target):
            raise StoreError(f"{target} is already an index: open it (Store.open) instead of creating it")
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise StoreError(
                f"{target} exists and is not an empty directory: choose a new or empty one for the index"
            )
        if dim < 1:
            raise RAGConfigError(f"dim must be positive, got {dim}", field="dim")
        info = {
            "format_version": _dumps(cls.FORMAT_VERSION, "format_version"),
            "dim": _dumps(dim, "dim"),
            "settings": _dumps(dict(settings), "settings"),
            "vector_config": _dumps(vector_config.to_dict(), "vector_config"),
            "generation": "0",
        }
        empty = VectorIndex.build(dim, np.zeros(0, np.int64), np.zeros((0, dim), np.float32), vector_config)
        with atomic_directory(target) as staging:
            conn = _connect(staging / _META)
            try:
                conn.executescript(_SCHEMA)
                conn.executemany("INSERT INTO info VALUES (?, ?)", list(info.items()))
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                conn.close()
            empty.save(staging / "vectors-0.faiss")
            EmbeddingCache(staging / _EMBEDDINGS).close()
            (staging / _LOCK).touch()
        logger.debug("created index %s (dim %d)", target, dim)
        return cls.open(target)

    @classmethod
    def open(cls, path: str | Path) -> Store:
        """Open an existing index at its newest committed generation.

        Raises:
            StoreError: No index at ``path``, not an index, or written by an incompatible format version.
        """
        target = Path(path)
        if not target.exists():
            raise StoreError(
                f"no index at {target}: build one with `lmstack rag ingest PATH... --index {target}`"
            )
        if not cls.exists(target):
            raise StoreError(
                f"{target} is not an lmstack-rag index (it has no {_META}): pass the directory given to "
                f"`lmstack rag ingest --index`"
            )
        try:
            conn = sqlite3.connect(
                target / _META, timeout=30.0, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open {target / _META}: {exc}") from exc
        try:
            return cls(target, conn)
        except BaseException:
            conn.close()
            raise

    def _info(self) -> dict[str, Any]:
        try:
            rows = self._conn.execute("SELECT key, value FROM info").fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path / _META} is not a readable index database: {exc}") from exc
        return {key: json.loads(value) for key, value in rows}

    def _read_generation(self) -> int:
        try:
            row = self._conn.execute("SELECT value FROM info WHERE key = 'generation'").fetchone()
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path / _META} is not a readable index database: {exc}") from exc
        if row is None:
            raise StoreError(f"{self.path / _META} has no generation: the index is damaged; rebuild it")
        return int(row[0])

    def _load(self) -> None:
        """Load the newest committed generation (retrying if a writer deletes its files meanwhile)."""
        with self._lock:
            info = self._info()
            version = info.get("format_version")
            if version != self.FORMAT_VERSION:
                raise StoreError(
                    f"{self.path} has index format version {version}; this lmstack-rag reads version "
                    f"{self.FORMAT_VERSION}: rebuild the index with `lmstack rag ingest`"
                )
            missing = None
            for _ in range(_LOAD_RETRIES):
                generation = int(info["generation"])
                config = VectorIndexConfig.from_dict(info["vector_config"])
                try:
                    index = VectorIndex.load(self.path / f"vectors-{generation}.faiss", config=config)
                except FileNotFoundError as exc:
                    missing = exc
                    info = self._info()
                    if int(info["generation"]) == generation:
                        break
                    continue  # a writer two generations ahead removed it: take the newer one
                self.settings = dict(info["settings"])
                self.dim = int(info["dim"])
                self.vector_config = config
                self.vector_index = index
                self.generation = generation
                return
            raise StoreError(
                f"the vector index of generation {info['generation']} is missing from {self.path} "
                f"({missing}): the index is damaged; rebuild it with `lmstack rag ingest`"
            )

    def refresh(self) -> bool:
        """Load the newest committed generation if a writer committed one since.

        Returns:
            True if a newer generation was loaded.
        """
        with self._lock:
            if self._read_generation() == self.generation:
                return False
            self._load()
            return True

    # -- reading -----------------------------------------------------------------------------------

    @property
    def embedding_cache(self) -> EmbeddingCache:
        """The index's embedding cache (``embeddings.sqlite``), opened on first use."""
        with self._lock:
            if self._cache is None:
                self._cache = EmbeddingCache(self.path / _EMBEDDINGS)
            return self._cache

    def documents(self) -> dict[str, DocumentRecord]:
        """Every document in the index, by source."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT source, content_hash, kind, size, chunk_count, ingested_at, metadata FROM documents "
                "ORDER BY source"
            ).fetchall()
        return {
            source: DocumentRecord(source, content_hash, kind, size, count, when, json.loads(metadata))
            for source, content_hash, kind, size, count, when, metadata in rows
        }

    def _select_by_ids(self, columns: str, ids: Sequence[int]) -> list[tuple[Any, ...]]:
        unique = list(dict.fromkeys(int(i) for i in ids))
        rows: list[tuple[Any, ...]] = []
        with self._lock:
            for i in range(0, len(unique), _SQLITE_MAX_VARS):
                part = unique[i : i + _SQLITE_MAX_VARS]
                marks = ",".join("?" * len(part))
                rows += self._conn.execute(
                    f"SELECT id, {columns} FROM chunks WHERE id IN ({marks})", part
                ).fetchall()
        return rows

    def chunks(self, ids: Sequence[int]) -> dict[int, Chunk]:
        """The chunks with these ids; ids not in the index are absent from the result."""
        rows = self._select_by_ids("source, ordinal, start_offset, end_offset, text, metadata", ids)
        return {row[0]: _chunk_from_row(row[1:]) for row in rows}

    def vectors(self, ids: Sequence[int]) -> dict[int, np.ndarray]:
        """The stored (exact) vectors of these chunk ids; ids not in the index are absent."""
        rows = self._select_by_ids("vector", ids)
        return {row[0]: np.frombuffer(row[1], dtype=np.float32).copy() for row in rows}

    def iter_chunks(self) -> Iterator[tuple[int, Chunk]]:
        """Every chunk with its id, in id order (read in pages, so memory stays small)."""
        return _iter_chunks(self._conn, self._lock)

    def num_chunks(self) -> int:
        """How many chunks the index holds."""
        with self._lock:
            (count,) = self._conn.execute("SELECT COUNT(*) FROM chunks").fetchone()
        return int(count)

    def state(self, key: str) -> Any | None:
        """A JSON value a writer stored with :meth:`WriteTransaction.set_state`; None if never set."""
        with self._lock:
            row = self._conn.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def artifact_path(self, name: str) -> Path | None:
        """The file or directory ``<name>-<generation>`` if this generation has that artifact."""
        path = self.path / f"{name}-{self.generation}"
        return path if path.exists() else None

    # -- writing -----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def writer(self, *, timeout_s: float = 10.0) -> Iterator[WriteTransaction]:
        """Take the index's one write lock and yield a transaction, committed on a clean exit.

        Entering refreshes to the newest generation and removes files a killed writer left. On a clean
        exit with changes, generation ``gen + 1`` is written and committed; on an exception nothing
        changes (rows rolled back, new files removed) and the exception propagates.

        Args:
            timeout_s: Seconds to wait for another writer to finish.

        Raises:
            IndexLockedError: Another process held the lock for ``timeout_s``.
        """
        lock = filelock.FileLock(str(self.path / _LOCK))
        try:
            lock.acquire(timeout=timeout_s)
        except filelock.Timeout as exc:
            raise IndexLockedError(
                f"{self.path} is being written by another process (lock {self.path / _LOCK} held for "
                f"{timeout_s:g}s): wait for it to finish, or pass a longer timeout"
            ) from exc
        try:
            with self._lock:
                self.refresh()
                self._remove_stale_files(keep={self.generation - 1, self.generation})
            conn = _connect(self.path / _META)
            try:
                conn.execute("BEGIN IMMEDIATE")
                txn = WriteTransaction(self, conn)
                try:
                    yield txn
                except BaseException:
                    txn._abort()
                    raise
                txn._finish()
            finally:
                conn.close()
        finally:
            lock.release()

    def _remove_stale_files(self, keep: set[int]) -> None:
        """Remove generation files not in ``keep`` and hidden temp files (only under the write lock)."""
        for entry in self.path.iterdir():
            if entry.name.startswith(".") and ".tmp-" in entry.name:
                _remove(entry)
                continue
            match = _GENERATION_FILE.match(entry.name)
            if match is None:
                continue
            is_vectors = match["name"] == "vectors" and match["ext"] == ".faiss"
            if (is_vectors or match["ext"] is None) and int(match["gen"]) not in keep:
                logger.debug("removing %s (generation %s)", entry.name, match["gen"])
                _remove(entry)

    def _adopt(self, generation: int, index: VectorIndex, config: VectorIndexConfig) -> None:
        with self._lock:
            self.vector_index = index
            self.vector_config = config
            self.generation = generation

    def close(self) -> None:
        """Close the database connections."""
        with self._lock:
            self._conn.close()
            if self._cache is not None:
                self._cache.close()
                self._cache = None

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r}, generation={self.generation}, chunks={len(self.vector_index)})"


class WriteTransaction:
    """The changes of one :meth:`Store.writer` block, committed together as the next generation.

    Row changes go straight into one open SQLite transaction (``BEGIN IMMEDIATE``); vector index
    changes and artifacts wait for the commit.

    Attributes:
        changed: Whether there is anything to commit.
    """

    def __init__(self, store: Store, conn: sqlite3.Connection) -> None:
        self._store = store
        self._conn = conn
        self._base = store.generation
        self._added: dict[int, np.ndarray] = {}
        self._removed: set[int] = set()
        self._artifacts: dict[str, Callable[[Path], None]] = {}
        self._config: VectorIndexConfig | None = None
        self.changed = False

    @property
    def generation(self) -> int:
        """The generation this transaction will commit."""
        return self._base + 1

    # -- changes -----------------------------------------------------------------------------------

    def _drop_chunks(self, source: str) -> int:
        ids = [row[0] for row in self._conn.execute("SELECT id FROM chunks WHERE source = ?", (source,))]
        self._conn.execute("DELETE FROM chunks WHERE source = ?", (source,))
        for chunk_id in ids:
            if self._added.pop(chunk_id, None) is None:
                self._removed.add(chunk_id)
        return len(ids)

    def upsert_document(self, doc: Document, chunks: Sequence[Chunk], vectors: np.ndarray) -> list[int]:
        """Store a document with its chunks and their vectors, replacing any earlier version.

        Args:
            doc: The document.
            chunks: Its chunks (each with ``source == doc.source``).
            vectors: ``(len(chunks), dim)`` unit vectors, one per chunk.

        Returns:
            The new chunks' ids (never reused, even after deletion).

        Raises:
            RAGConfigError: Chunks of another document, or vectors of the wrong shape.
        """
        dim = self._store.dim
        matrix = np.asarray(vectors, dtype=np.float32)
        if matrix.shape != (len(chunks), dim):
            raise RAGConfigError(
                f"{doc.source}: expected vectors of shape ({len(chunks)}, {dim}), got {matrix.shape}",
                field="vectors",
            )
        if not np.isfinite(matrix).all():
            raise RAGConfigError(f"{doc.source}: vectors contain NaN or infinite values", field="vectors")
        for chunk in chunks:
            if chunk.source != doc.source:
                raise RAGConfigError(
                    f"chunk of {chunk.source!r} passed with document {doc.source!r}: upsert each document "
                    "with its own chunks",
                    field="chunks",
                )
        self._drop_chunks(doc.source)
        size = doc.metadata.get("size")
        if not isinstance(size, int):
            size = len(doc.text.encode("utf-8"))
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self._conn.execute(
            "INSERT OR REPLACE INTO documents VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                doc.source,
                doc.content_hash,
                doc.kind,
                size,
                len(chunks),
                now,
                json.dumps(dict(doc.metadata), default=str),
            ),
        )
        ids: list[int] = []
        for chunk, vector in zip(chunks, matrix, strict=True):
            cursor = self._conn.execute(
                "INSERT INTO chunks (source, ordinal, start_offset, end_offset, text, metadata, vector) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    chunk.source,
                    chunk.ordinal,
                    chunk.start,
                    chunk.end,
                    chunk.text,
                    json.dumps(dict(chunk.metadata), default=str),
                    np.ascontiguousarray(vector).tobytes(),
                ),
            )
            chunk_id = int(cursor.lastrowid or 0)
            ids.append(chunk_id)
            self._added[chunk_id] = vector
        self.changed = True
        return ids

    def delete_document(self, source: str) -> int:
        """Remove a document and its chunks.

        Returns:
            How many chunks were removed (0 if the document was not in the index).
        """
        count = self._drop_chunks(source)
        cursor = self._conn.execute("DELETE FROM documents WHERE source = ?", (source,))
        if count or cursor.rowcount:
            self.changed = True
        return count

    def iter_chunks(self) -> Iterator[tuple[int, Chunk]]:
        """Every chunk with its id as this transaction leaves them (its own changes included), by id."""
        return _iter_chunks(self._conn, contextlib.nullcontext())

    def set_state(self, key: str, value: Any) -> None:
        """Store a JSON value under ``key`` (read back with :meth:`Store.state`).

        Raises:
            RAGConfigError: ``value`` is not JSON-serialisable.
        """
        self._conn.execute("INSERT OR REPLACE INTO state VALUES (?, ?)", (key, _dumps(value, key)))
        self.changed = True

    def add_artifact(self, name: str, write: Callable[[Path], None]) -> None:
        """Have ``write(path)`` create the artifact ``<name>-<gen+1>`` (a file or a directory) at commit.

        Artifacts not added again are carried over to the next generation unchanged (hard links).

        Raises:
            RAGConfigError: ``name`` is not a letter followed by letters, digits, ``_`` or ``.``, or is
                ``vectors``.
        """
        if not _ARTIFACT_NAME.match(name) or name == "vectors":
            raise RAGConfigError(
                f"artifact name {name!r} must be a letter followed by letters, digits, '_' or '.' "
                "(and not 'vectors')",
                field="name",
            )
        self._artifacts[name] = write
        self.changed = True

    def set_vector_config(self, config: VectorIndexConfig) -> None:
        """Build the vector index with ``config`` from this commit on (the index is rebuilt at commit)."""
        if config != self._store.vector_config:
            self._config = config
            self._conn.execute(
                "UPDATE info SET value = ? WHERE key = 'vector_config'",
                (_dumps(config.to_dict(), "vector_config"),),
            )
            self.changed = True

    # -- commit ------------------------------------------------------------------------------------

    def _finish(self) -> None:
        if not self.changed:
            self._conn.execute("ROLLBACK")
            return
        new = self.generation
        try:
            index, config = self._save_vectors()
            self._write_artifacts()
            fsync_dir(self._store.path)
            self._commit_rows()
        except BaseException:
            self._abort()
            raise
        self._store._adopt(new, index, config)
        # Keep the previous generation for readers that loaded it a moment ago.
        self._store._remove_stale_files(keep={new - 1, new})
        logger.debug("committed generation %d of %s", new, self._store.path)

    def _build_vector_index(self) -> tuple[VectorIndex, VectorIndexConfig]:
        """The vector index for the next generation: the current one updated, or rebuilt when needed."""
        store = self._store
        config = self._config or store.vector_config
        current = store.vector_index
        (count,) = self._conn.execute("SELECT COUNT(*) FROM chunks").fetchone()
        rebuild = self._config is not None or resolve_kind(config, int(count)) != current.kind
        if not rebuild:
            index = VectorIndex(faiss.clone_index(current._map), config)  # readers keep the old one
            if self._removed:
                index.remove(np.fromiter(self._removed, dtype=np.int64))
            if self._added:
                index.add(np.fromiter(self._added, dtype=np.int64), np.stack(list(self._added.values())))
            if not index.needs_rebuild:
                return index, config
        rows = self._conn.execute("SELECT id, vector FROM chunks ORDER BY id").fetchall()
        ids = np.fromiter((row[0] for row in rows), dtype=np.int64, count=len(rows))
        vectors = np.zeros((len(rows), store.dim), dtype=np.float32)
        for i, row in enumerate(rows):
            vectors[i] = np.frombuffer(row[1], dtype=np.float32)
        logger.debug("rebuilding the vector index of %s from %d stored vectors", store.path, len(rows))
        return VectorIndex.build(store.dim, ids, vectors, config), config

    def _save_vectors(self) -> tuple[VectorIndex, VectorIndexConfig]:
        """Commit stage 1: write ``vectors-<gen+1>.faiss``."""
        store = self._store
        target = store.path / f"vectors-{self.generation}.faiss"
        if not (self._added or self._removed or self._config):
            _link_or_copy(store.path / f"vectors-{self._base}.faiss", target)
            return store.vector_index, store.vector_config
        index, config = self._build_vector_index()
        index.save(target)
        return index, config

    def _write_artifacts(self) -> None:
        """Commit stage 2: write the new artifacts as ``<name>-<gen+1>`` and carry the others over."""
        path = self._store.path
        for name, write in self._artifacts.items():
            tmp = path / f".{name}-{self.generation}.tmp-{os.getpid()}"
            _remove(tmp)
            write(tmp)
            if not tmp.exists():
                raise StoreError(f"the writer of artifact {name!r} did not create {tmp}")
            _fsync_tree(tmp)
            os.replace(tmp, path / f"{name}-{self.generation}")
        for entry in path.iterdir():
            match = _GENERATION_FILE.match(entry.name)
            if (
                match is not None
                and match["ext"] is None
                and int(match["gen"]) == self._base
                and match["name"] not in self._artifacts
            ):
                _link_or_copy(entry, path / f"{match['name']}-{self.generation}")

    def _commit_rows(self) -> None:
        """Commit stage 3: flip the generation with every row change in one SQLite COMMIT."""
        self._conn.execute("UPDATE info SET value = ? WHERE key = 'generation'", (str(self.generation),))
        self._conn.execute("COMMIT")

    def _abort(self) -> None:
        """Undo everything: roll the rows back and remove the files of the uncommitted generation."""
        if self._conn.in_transaction:
            self._conn.execute("ROLLBACK")
        path = self._store.path
        for entry in path.iterdir():
            match = _GENERATION_FILE.match(entry.name)
            if (match is not None and int(match["gen"]) == self.generation) or (
                entry.name.startswith(".") and f"-{self.generation}.tmp-" in entry.name
            ):
                _remove(entry)
