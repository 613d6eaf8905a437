"""The vector index: inner-product search over unit vectors with stable int64 ids (faiss)."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from lmstack.rag._errors import RAGConfigError, StoreError

__all__ = ["VectorIndex", "VectorIndexConfig", "fsync_dir", "resolve_kind"]

logger = logging.getLogger(__name__)

_KINDS = ("auto", "flat", "hnsw", "ivfpq")
_APPROXIMATE = ("hnsw", "ivfpq")
# k-means wants about 39 training points per centroid; PQ has 256 centroids per sub-quantizer.
_POINTS_PER_CENTROID = 39
_PQ_MIN_TRAIN = 256 * _POINTS_PER_CENTROID
_MAX_TRAIN = 256 * 1024  # a sample this large trains as well as all the vectors, and much faster
# Approximate kinds cannot drop vectors in place; past this share of tombstones the index is rebuilt.
_TOMBSTONE_REBUILD = 0.3
# Restricted searches over this many allowed vectors or fewer are done exactly.
_EXACT_SUBSET = 4096


@dataclass(frozen=True)
class VectorIndexConfig:
    """How the vector index is built and searched.

    Attributes:
        kind: ``auto`` (exact below ``exact_below`` vectors, ``approximate`` from there), ``flat`` (exact),
            ``hnsw`` or ``ivfpq``.
        exact_below: With ``auto``: the vector count from which the approximate kind is used.
        approximate: What ``auto`` switches to: ``hnsw`` or ``ivfpq``.
        hnsw_m: HNSW neighbours per node.
        hnsw_ef_construction: HNSW candidate list length while building.
        hnsw_ef_search: HNSW candidate list length while searching (at least ``k`` is used).
        ivf_nlist: IVF lists; None picks about ``4 * sqrt(n)``, at most ``n // 39``.
        pq_m: PQ sub-quantizers (must divide the dimension); None picks one near ``dim // 8``.
        ivf_nprobe: IVF lists visited per query.
        refine: IVF-PQ: re-rank the candidates with the exact vectors (keeps them in memory too).
        refine_k_factor: IVF-PQ with refine: candidates re-ranked per result wanted.
    """

    kind: str = "auto"
    exact_below: int = 50_000
    approximate: str = "hnsw"
    hnsw_m: int = 32
    hnsw_ef_construction: int = 80
    # recall@10 0.977 at 1M clustered vectors, 0.935 with 96 (benchmarks/test_rag_vectors.py)
    hnsw_ef_search: int = 192
    ivf_nlist: int | None = None
    pq_m: int | None = None
    ivf_nprobe: int = 32
    refine: bool = True
    refine_k_factor: float = 8.0

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise RAGConfigError(
                f"vector index kind must be one of {', '.join(_KINDS)}, got {self.kind!r}", field="kind"
            )
        if self.approximate not in _APPROXIMATE:
            raise RAGConfigError(
                f"approximate must be 'hnsw' or 'ivfpq', got {self.approximate!r}", field="approximate"
            )
        minimums = {
            "exact_below": 0,
            "hnsw_m": 2,
            "hnsw_ef_construction": 1,
            "hnsw_ef_search": 1,
            "ivf_nprobe": 1,
        }
        for name, low in minimums.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise RAGConfigError(f"{name} must be an integer >= {low}, got {value!r}", field=name)
        for name in ("ivf_nlist", "pq_m"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise RAGConfigError(f"{name} must be None or a positive integer, got {value!r}", field=name)
        if not self.refine_k_factor >= 1:
            raise RAGConfigError(
                f"refine_k_factor must be >= 1, got {self.refine_k_factor!r}", field="refine_k_factor"
            )

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-able dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VectorIndexConfig:
        """Settings from :meth:`to_dict`'s output; unknown keys are an error.

        Raises:
            RAGConfigError: An unknown key or an invalid value.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RAGConfigError(
                f"unknown vector index settings {unknown}; known: {sorted(known)}", field=unknown[0]
            )
        return cls(**dict(data))


def _ivf_nlist(config: VectorIndexConfig, n: int) -> int:
    if config.ivf_nlist is not None:
        return config.ivf_nlist
    return max(1, min(int(4 * math.sqrt(n)), n // _POINTS_PER_CENTROID))


def _pq_m(config: VectorIndexConfig, dim: int) -> int:
    if config.pq_m is not None:
        if dim % config.pq_m:
            raise RAGConfigError(f"pq_m={config.pq_m} must divide the dimension {dim}", field="pq_m")
        return config.pq_m
    target = max(1, dim // 8)
    # the divisor of dim nearest the target (ties: the larger, finer quantization)
    return min((m for m in range(1, dim + 1) if dim % m == 0), key=lambda m: (abs(m - target), -m))


def resolve_kind(config: VectorIndexConfig, n: int) -> str:
    """The index kind ``config`` asks for with ``n`` vectors: ``flat``, ``hnsw`` or ``ivfpq``.

    IVF-PQ needs enough vectors to train (``max(256, nlist) * 39``); below that it is ``flat``.
    """
    kind = config.kind
    if kind == "auto":
        kind = "flat" if n < config.exact_below else config.approximate
    if kind == "ivfpq" and n < max(_PQ_MIN_TRAIN, _ivf_nlist(config, n) * _POINTS_PER_CENTROID):
        logger.debug("%d vectors are too few to train IVF-PQ; using an exact flat index", n)
        return "flat"
    return kind


def fsync_dir(path: Path) -> None:
    """Flush a directory entry to disk (no-op where the filesystem refuses)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _as_ids(ids: np.ndarray) -> np.ndarray:
    out = np.ascontiguousarray(np.asarray(ids).reshape(-1), dtype=np.int64)
    if out.size and out.min() < 0:
        raise RAGConfigError("vector ids must be non-negative", field="ids")
    return out


def _as_matrix(vectors: np.ndarray, dim: int, what: str) -> np.ndarray:
    arr = np.asarray(vectors, dtype=np.float32)
    if arr.ndim == 1 and arr.shape[0] == dim:
        arr = arr.reshape(1, dim)
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise RAGConfigError(f"{what} must have shape (n, {dim}), got {arr.shape}", field=what)
    if not np.isfinite(arr).all():
        raise RAGConfigError(f"{what} contain NaN or infinite values", field=what)
    return np.ascontiguousarray(arr)


def _kind_of(inner: Any) -> str:
    if isinstance(inner, faiss.IndexHNSW):
        return "hnsw"
    if isinstance(inner, (faiss.IndexRefine, faiss.IndexIVF)):
        return "ivfpq"
    if isinstance(inner, faiss.IndexFlat):
        return "flat"
    raise StoreError(f"unsupported faiss index type {type(inner).__name__} in the vector index")


class VectorIndex:
    """Inner-product search over unit vectors with stable int64 ids.

    A faiss ``IndexIDMap2`` around a flat, HNSW or IVF-PQ index. Flat indexes drop removed vectors at
    once; HNSW and IVF-PQ cannot, so removed ids become tombstones (their slot's id set to -1, saved
    with the index) that searches skip, and the index is rebuilt from its own exact vectors once
    tombstones pass 30% (IVF-PQ without ``refine`` keeps no exact vectors: :attr:`needs_rebuild` tells
    the owner to rebuild it).

    Not safe for concurrent mutation; concurrent searches are fine.
    """

    def __init__(self, index: Any, config: VectorIndexConfig | None = None) -> None:
        if not isinstance(index, faiss.IndexIDMap2):
            raise StoreError(f"a vector index must be a faiss IndexIDMap2, got {type(index).__name__}")
        self._map = index
        self._inner: Any = faiss.downcast_index(index.index)
        self.kind: str = _kind_of(self._inner)
        self.dim: int = int(index.d)
        self.config = config if config is not None else self._config_from_index()
        self._apply_search_settings()
        self._ids = faiss.vector_to_array(index.id_map).astype(np.int64)
        self._changed()

    # -- construction ------------------------------------------------------------------------------

    @classmethod
    def build(
        cls, dim: int, ids: np.ndarray, vectors: np.ndarray, config: VectorIndexConfig = VectorIndexConfig()
    ) -> VectorIndex:
        """Build an index of ``config``'s kind for these vectors.

        Args:
            dim: Vector length.
            ids: ``(n,)`` distinct non-negative ids.
            vectors: ``(n, dim)`` unit vectors.
            config: The kind and its parameters; ``auto`` picks by ``n``.

        Returns:
            The index; :attr:`kind` says what was built.

        Raises:
            RAGConfigError: Bad shapes, duplicate or negative ids, or a ``pq_m`` that does not divide ``dim``.
        """
        if dim < 1:
            raise RAGConfigError(f"dim must be positive, got {dim}", field="dim")
        id_arr = _as_ids(ids)
        matrix = _as_matrix(vectors, dim, "vectors")
        if matrix.shape[0] != id_arr.shape[0]:
            raise RAGConfigError(f"{id_arr.shape[0]} ids for {matrix.shape[0]} vectors", field="ids")
        if np.unique(id_arr).shape[0] != id_arr.shape[0]:
            raise RAGConfigError("vector ids must be distinct", field="ids")
        kind = resolve_kind(config, matrix.shape[0])
        inner = cls._new_inner(kind, dim, matrix, config)
        id_map = faiss.IndexIDMap2(inner)
        if matrix.shape[0]:
            id_map.add_with_ids(matrix, id_arr)
        return cls(id_map, config)

    @staticmethod
    def _new_inner(kind: str, dim: int, train: np.ndarray, config: VectorIndexConfig) -> Any:
        if kind == "flat":
            return faiss.IndexFlatIP(dim)
        if kind == "hnsw":
            hnsw = faiss.IndexHNSWFlat(dim, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            hnsw.hnsw.efConstruction = config.hnsw_ef_construction
            hnsw.hnsw.efSearch = config.hnsw_ef_search
            return hnsw
        n = train.shape[0]
        nlist = _ivf_nlist(config, n)
        quantizer = faiss.IndexFlatIP(dim)
        ivf = faiss.IndexIVFPQ(quantizer, dim, nlist, _pq_m(config, dim), 8, faiss.METRIC_INNER_PRODUCT)
        ivf.nprobe = min(config.ivf_nprobe, nlist)
        index: Any = ivf
        if config.refine:
            index = faiss.IndexRefineFlat(ivf)
            index.k_factor = config.refine_k_factor
        sample = train
        if n > _MAX_TRAIN:
            rows = np.random.default_rng(0).choice(n, _MAX_TRAIN, replace=False)
            sample = train[np.sort(rows)]
        logger.debug(
            "training IVF-PQ (nlist=%d, pq_m=%d) on %d vectors", nlist, _pq_m(config, dim), len(sample)
        )
        index.train(sample)
        return index

    def _config_from_index(self) -> VectorIndexConfig:
        inner = self._inner
        if self.kind == "hnsw":
            return VectorIndexConfig(kind="hnsw", hnsw_ef_search=int(inner.hnsw.efSearch))
        if self.kind == "ivfpq":
            refine = isinstance(inner, faiss.IndexRefine)
            ivf = faiss.extract_index_ivf(inner)
            return VectorIndexConfig(
                kind="ivfpq",
                ivf_nprobe=int(ivf.nprobe),
                refine=refine,
                refine_k_factor=float(inner.k_factor) if refine else 8.0,
            )
        return VectorIndexConfig(kind="flat")

    def _apply_search_settings(self) -> None:
        if self.kind == "hnsw":
            self._inner.hnsw.efSearch = self.config.hnsw_ef_search
        elif self.kind == "ivfpq":
            ivf = faiss.extract_index_ivf(self._inner)
            ivf.nprobe = min(self.config.ivf_nprobe, int(ivf.nlist))
            if isinstance(self._inner, faiss.IndexRefine):
                self._inner.k_factor = self.config.refine_k_factor

    # -- bookkeeping -------------------------------------------------------------------------------

    def _changed(self) -> None:
        """Recompute the lookup tables after the id map changed."""
        live = self._ids >= 0
        self._num_live = int(live.sum())
        order = np.argsort(self._ids, kind="stable")
        self._sorted_ids = self._ids[order]
        self._sorted_pos = order.astype(np.int64)
        self._live_bitmap: np.ndarray | None = (
            None if self._num_live == self._ids.shape[0] else np.packbits(live, bitorder="little")
        )

    def _positions(self, ids: np.ndarray) -> np.ndarray:
        """Internal positions of the live ids among ``ids`` (absent ids are skipped)."""
        ids = np.unique(np.asarray(ids, dtype=np.int64).reshape(-1))
        ids = ids[ids >= 0]
        if ids.size == 0 or self._sorted_ids.size == 0:
            return np.zeros(0, dtype=np.int64)
        where = np.searchsorted(self._sorted_ids, ids)
        where = np.minimum(where, self._sorted_ids.shape[0] - 1)
        found = self._sorted_ids[where] == ids
        return self._sorted_pos[where[found]]

    @property
    def ids(self) -> np.ndarray:
        """The live ids, in insertion order."""
        return self._ids[self._ids >= 0].copy()

    @property
    def num_tombstones(self) -> int:
        """Removed vectors still occupying slots (HNSW, IVF-PQ)."""
        return int(self._ids.shape[0] - self._num_live)

    @property
    def _exact_storage(self) -> bool:
        return self.kind != "ivfpq" or isinstance(self._inner, faiss.IndexRefine)

    @property
    def needs_rebuild(self) -> bool:
        """True when tombstones pass 30% and the index cannot compact itself (IVF-PQ without refine)."""
        return self.num_tombstones > _TOMBSTONE_REBUILD * max(1, self._ids.shape[0])

    def __len__(self) -> int:
        return self._num_live

    def __contains__(self, item: object) -> bool:
        return isinstance(item, (int, np.integer)) and self._positions(np.array([item])).size > 0

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """The stored vectors of ``ids`` (all must be present; exact unless IVF-PQ without refine).

        Raises:
            StoreError: An id is not in the index.
        """
        id_arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        pos = self._positions(id_arr)
        if pos.shape[0] != np.unique(id_arr).shape[0]:
            raise StoreError("reconstruct() was asked for ids that are not in the vector index")
        order = {int(self._ids[p]): i for i, p in enumerate(pos)}
        vectors = self._vectors_at(pos)
        return vectors[[order[int(i)] for i in id_arr]]

    def _vectors_at(self, positions: np.ndarray) -> np.ndarray:
        if positions.size == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        source = self._inner
        if self.kind == "ivfpq":
            if isinstance(source, faiss.IndexRefine):
                source = faiss.downcast_index(source.refine_index)
            else:
                faiss.extract_index_ivf(source).make_direct_map()
        return np.asarray(
            source.reconstruct_batch(np.ascontiguousarray(positions, dtype=np.int64)), dtype=np.float32
        )

    # -- mutation ----------------------------------------------------------------------------------

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add vectors under new ids.

        Raises:
            RAGConfigError: Bad shapes, negative or duplicate ids, or an id already in the index.
        """
        id_arr = _as_ids(ids)
        matrix = _as_matrix(vectors, self.dim, "vectors")
        if matrix.shape[0] != id_arr.shape[0]:
            raise RAGConfigError(f"{id_arr.shape[0]} ids for {matrix.shape[0]} vectors", field="ids")
        if id_arr.size == 0:
            return
        if np.unique(id_arr).shape[0] != id_arr.shape[0] or self._positions(id_arr).size:
            raise RAGConfigError("ids added to the vector index must be new and distinct", field="ids")
        self._map.add_with_ids(matrix, id_arr)
        self._ids = np.concatenate([self._ids, id_arr])
        self._changed()

    def remove(self, ids: np.ndarray) -> None:
        """Remove ``ids`` (ids not in the index are ignored)."""
        positions = self._positions(np.asarray(ids))
        if positions.size == 0:
            return
        if self.kind == "flat":
            self._map.remove_ids(faiss.IDSelectorBatch(np.ascontiguousarray(self._ids[positions])))
            self._ids = faiss.vector_to_array(self._map.id_map).astype(np.int64)
            self._changed()
            return
        self._ids[positions] = -1
        faiss.copy_array_to_vector(self._ids, self._map.id_map)
        self._map.construct_rev_map()
        self._changed()
        if self.needs_rebuild and self._exact_storage:
            self._compact()

    def _compact(self) -> None:
        """Rebuild the inner index from its live exact vectors, dropping the tombstones."""
        live = np.nonzero(self._ids >= 0)[0]
        vectors = self._vectors_at(live)
        ids = self._ids[live]
        logger.debug("rebuilding the %s index without %d tombstones", self.kind, self.num_tombstones)
        rebuilt = VectorIndex.build(self.dim, ids, vectors, self.config)
        self._map, self._inner, self.kind = rebuilt._map, rebuilt._inner, rebuilt.kind
        self._ids = rebuilt._ids
        self._changed()

    # -- search ------------------------------------------------------------------------------------

    def search(
        self, queries: np.ndarray, k: int, *, allowed_ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best ids by inner product for each query.

        Args:
            queries: ``(m, dim)`` (or ``(dim,)``) unit vectors.
            k: Results per query.
            allowed_ids: Search only among these ids (a metadata filter); None searches all.

        Returns:
            ``(scores, ids)``, ``(m, k)`` float32 and int64, best first; ``-1`` ids and ``-inf`` scores
            where fewer than ``k`` vectors qualify.

        Raises:
            RAGConfigError: Bad query shape or negative ``k``.
        """
        q = _as_matrix(queries, self.dim, "queries")
        if k < 0:
            raise RAGConfigError(f"k must be >= 0, got {k}", field="k")
        m = q.shape[0]
        scores = np.full((m, k), -np.inf, dtype=np.float32)
        labels = np.full((m, k), -1, dtype=np.int64)
        if k == 0 or m == 0 or self._num_live == 0:
            return scores, labels
        bitmap = self._live_bitmap
        eligible = self._num_live
        if allowed_ids is not None:
            positions = self._positions(np.asarray(allowed_ids))
            if positions.size == 0:
                return scores, labels
            if self.kind != "flat" and positions.size <= _EXACT_SUBSET and self._exact_storage:
                return self._exact_over(q, k, positions)
            mask = np.zeros(self._ids.shape[0], dtype=bool)
            mask[positions] = True
            bitmap = np.packbits(mask, bitorder="little")
            eligible = int(positions.size)
        found_scores, found_pos = self._inner_search(q, k, bitmap)
        if self.kind != "flat" and bitmap is not None:
            # A filtered graph walk or probe can stop short of k results although more qualify:
            # those rows are answered by an exact scan over the eligible vectors.
            want = min(k, eligible)
            short = np.nonzero((found_pos >= 0).sum(axis=1) < want)[0]
            if short.size:
                pos = np.nonzero(np.unpackbits(bitmap, bitorder="little")[: self._ids.shape[0]])[0]
                s2, p2 = self._exact_over(q[short], k, pos, as_positions=True)
                found_scores[short], found_pos[short] = s2, p2
        valid = found_pos >= 0
        labels[valid] = self._ids[found_pos[valid]]
        scores[valid] = found_scores[valid]
        return scores, labels

    def _inner_search(
        self, q: np.ndarray, k: int, bitmap: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        sel = None if bitmap is None else faiss.IDSelectorBitmap(self._ids.shape[0], faiss.swig_ptr(bitmap))
        params: Any
        if self.kind == "hnsw":
            params = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]
            params.efSearch = max(self.config.hnsw_ef_search, k)
        elif self.kind == "ivfpq":
            ivf = faiss.extract_index_ivf(self._inner)
            params = faiss.SearchParametersIVF()
            params.nprobe = int(ivf.nprobe)
            if sel is not None:
                params.sel = sel
            if isinstance(self._inner, faiss.IndexRefine):
                base = params
                params = faiss.IndexRefineSearchParameters()
                params.k_factor = float(self._inner.k_factor)
                params.base_index_params = base
        else:
            params = faiss.SearchParameters()
        if sel is not None:
            params.sel = sel
        k_inner = min(k, self._ids.shape[0])
        found_scores, found_pos = self._inner.search(q, k_inner, params=params)
        del sel, bitmap  # the selector points into the bitmap: both live until the search is done
        if k_inner < k:
            pad = k - k_inner
            found_scores = np.pad(found_scores, ((0, 0), (0, pad)), constant_values=-np.inf)
            found_pos = np.pad(found_pos, ((0, 0), (0, pad)), constant_values=-1)
        found_scores = np.where(found_pos >= 0, found_scores, -np.inf).astype(np.float32)
        return found_scores, found_pos.astype(np.int64)

    def _exact_over(
        self, q: np.ndarray, k: int, positions: np.ndarray, *, as_positions: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k over the vectors at ``positions`` (ids, or positions when ``as_positions``)."""
        vectors = self._vectors_at(positions)
        sims = q @ vectors.T
        take = min(k, positions.shape[0])
        top = np.argpartition(-sims, take - 1, axis=1)[:, :take]
        top_scores = np.take_along_axis(sims, top, axis=1)
        order = np.argsort(-top_scores, axis=1, kind="stable")
        top = np.take_along_axis(top, order, axis=1)
        scores = np.full((q.shape[0], k), -np.inf, dtype=np.float32)
        out = np.full((q.shape[0], k), -1, dtype=np.int64)
        scores[:, :take] = np.take_along_axis(top_scores, order, axis=1)
        chosen = positions[top]
        out[:, :take] = chosen if as_positions else self._ids[chosen]
        return scores, out

    # -- persistence -------------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        """Write the index to ``path`` atomically (temp sibling, fsync, rename).

        Raises:
            StoreError: The file could not be written.
        """
        path = Path(path)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        try:
            faiss.write_index(self._map, str(tmp))
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except (OSError, RuntimeError) as exc:
            tmp.unlink(missing_ok=True)
            raise StoreError(f"could not write the vector index {path}: {exc}") from exc
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(path.parent)

    @classmethod
    def load(cls, path: Path, *, config: VectorIndexConfig | None = None) -> VectorIndex:
        """Read an index written by :meth:`save`.

        Args:
            path: The file.
            config: Search settings to apply (ef_search, nprobe, ...); None keeps the saved ones.

        Raises:
            FileNotFoundError: No file at ``path``.
            StoreError: The file is not a vector index.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(path)
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as exc:
            raise StoreError(f"{path} is not a readable faiss index: {exc}") from exc
        return cls(index, config)

    def __repr__(self) -> str:
        return (
            f"VectorIndex(kind={self.kind!r}, dim={self.dim}, size={len(self)}, "
            f"tombstones={self.num_tombstones})"
        )
