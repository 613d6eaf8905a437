"""Embeddings cached by (embedder fingerprint, text hash) in a SQLite file of their own."""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from lmstack.rag._errors import EmbeddingError, StoreError
from lmstack.rag._types import text_hash
from lmstack.rag.embed._protocol import Closing, Embedder

__all__ = ["EmbeddingCache", "embed_with_cache"]

logger = logging.getLogger(__name__)

_SQLITE_MAX_VARS = 900  # below SQLite's default limit on bound parameters


class EmbeddingCache(Closing):
    """Vectors by (embedder fingerprint, text hash), so unchanged text is never embedded twice.

    Every :meth:`put` commits at once: an ingest killed halfway keeps what it had embedded.
    Safe to share between threads; several processes may use one file (SQLite WAL).

    Args:
        path: The SQLite file; created with its parent directory if missing.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(
                self.path, timeout=30.0, isolation_level=None, check_same_thread=False
            )
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS embeddings (fingerprint TEXT NOT NULL, hash TEXT NOT NULL, "
                "dim INTEGER NOT NULL, vector BLOB NOT NULL, PRIMARY KEY (fingerprint, hash)) WITHOUT ROWID"
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the embedding cache {self.path}: {exc}") from exc
        self._lock = threading.Lock()

    def get(self, fingerprint: str, hashes: Sequence[str]) -> dict[str, np.ndarray]:
        """The cached vectors among ``hashes`` for one embedder; hashes not cached are absent."""
        out: dict[str, np.ndarray] = {}
        unique = list(dict.fromkeys(hashes))
        with self._lock:
            for i in range(0, len(unique), _SQLITE_MAX_VARS):
                part = unique[i : i + _SQLITE_MAX_VARS]
                marks = ",".join("?" * len(part))
                rows = self._conn.execute(
                    f"SELECT hash, dim, vector FROM embeddings WHERE fingerprint = ? AND hash IN ({marks})",
                    (fingerprint, *part),
                ).fetchall()
                for key, dim, blob in rows:
                    vector = np.frombuffer(blob, dtype=np.float32)
                    if vector.shape[0] == dim:
                        out[key] = vector
        return out

    def put(self, fingerprint: str, items: Mapping[str, np.ndarray]) -> None:
        """Store vectors by text hash for one embedder, committed before returning."""
        rows = []
        for key, vector in items.items():
            vec = np.ascontiguousarray(vector, dtype=np.float32).reshape(-1)
            rows.append((fingerprint, key, int(vec.shape[0]), vec.tobytes()))
        if not rows:
            return
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.executemany("INSERT OR REPLACE INTO embeddings VALUES (?, ?, ?, ?)", rows)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def __len__(self) -> int:
        with self._lock:
            (count,) = self._conn.execute("SELECT COUNT(*) FROM embeddings").fetchone()
        return int(count)

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self._conn.close()


def embed_with_cache(
    embedder: Embedder,
    texts: Sequence[str],
    cache: EmbeddingCache | None,
    *,
    batch_size: int = 256,
    use_tqdm: bool | None = None,
) -> tuple[np.ndarray, int]:
    """Vectors for ``texts`` in order, embedding only the distinct texts the cache does not hold.

    Each batch goes into the cache as soon as it is embedded, so an interrupted call loses at most
    one batch of work.

    Args:
        embedder: Embeds the texts (as documents, not queries).
        texts: The texts.
        cache: Where vectors are looked up and stored; None embeds everything (still once per distinct text).
        batch_size: Texts per call to ``embedder.embed`` (and per cache commit).
        use_tqdm: Show a progress bar; None shows one when more than 1000 texts need embedding.

    Returns:
        ``(vectors, embedded)``: the ``(len(texts), dim)`` float32 vectors, and how many texts were
        actually embedded.

    Raises:
        EmbeddingError: The embedder returned the wrong number or length of vectors.
    """
    hashes = [text_hash(t) for t in texts]
    found: dict[str, np.ndarray] = cache.get(embedder.fingerprint, hashes) if cache is not None else {}
    todo: dict[str, str] = {}
    for key, text in zip(hashes, texts, strict=True):
        if key not in found and key not in todo:
            todo[key] = text
    dim = embedder.dim
    keys = list(todo)
    show = use_tqdm if use_tqdm is not None else len(keys) > 1000
    with tqdm(total=len(keys), desc="embedding", unit="text", disable=not show) as bar:
        for i in range(0, len(keys), batch_size):
            part = keys[i : i + batch_size]
            vectors = embedder.embed([todo[k] for k in part])
            if vectors.shape != (len(part), dim):
                raise EmbeddingError(
                    f"embedder {embedder.fingerprint} returned shape {vectors.shape} for {len(part)} texts "
                    f"of dimension {dim}"
                )
            batch = {k: np.asarray(v, dtype=np.float32) for k, v in zip(part, vectors, strict=True)}
            if cache is not None:
                cache.put(embedder.fingerprint, batch)
            found.update(batch)
            bar.update(len(part))
    out = np.zeros((len(texts), dim), dtype=np.float32)
    for row, key in enumerate(hashes):
        vec = found[key]
        if vec.shape[0] != dim:
            raise EmbeddingError(
                f"the cache holds a vector of length {vec.shape[0]} for embedder {embedder.fingerprint}, "
                f"which embeds into {dim}; delete the cache file {getattr(cache, 'path', '')}"
            )
        out[row] = vec
    logger.debug("embedded %d of %d texts (%d cached)", len(keys), len(texts), len(texts) - len(keys))
    return out, len(keys)
