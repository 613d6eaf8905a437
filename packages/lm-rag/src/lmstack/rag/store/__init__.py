"""The index store: chunks, vectors and artifacts on disk, one writer, atomic generations.

* :class:`Store`: an index directory (SQLite for rows, faiss for vectors, artifacts per generation);
  readers never see a half-written index, and a killed writer leaves the last commit intact.
* :class:`WriteTransaction`: what one :meth:`Store.writer` block changes, committed together.
* :class:`VectorIndex` and :class:`VectorIndexConfig`: flat, HNSW or IVF-PQ search with stable ids.
"""

from __future__ import annotations

from lmstack.rag.store._store import DocumentRecord, Store, WriteTransaction
from lmstack.rag.store._vector import VectorIndex, VectorIndexConfig

__all__ = ["DocumentRecord", "Store", "VectorIndex", "VectorIndexConfig", "WriteTransaction"]
