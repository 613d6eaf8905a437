"""Gate features: what a search already returned, turned into numbers that say "on topic or not"."""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..retrieve import QueryStats, bm25_tokenize

__all__ = ["FEATURE_NAMES", "gate_features"]

FEATURE_NAMES: tuple[str, ...] = (
    "dense_top1",
    "dense_margin",
    "dense_mean",
    "bm25_norm",
    "idf_coverage",
    "known_fraction",
    "top_overlap",
    "topk_overlap",
    "log_terms",
)
"""The features :func:`gate_features` returns, in order:

- ``dense_top1``: the best dense (cosine) score.
- ``dense_margin``: the best dense score minus the mean of the others in the top k (how clearly one hit
  stands out).
- ``dense_mean``: the mean of the top-k dense scores (how much of the collection is near the query).
- ``bm25_norm``: the best BM25 score over :attr:`QueryStats.max_score_bound`, in [0, 1].
- ``idf_coverage``, ``known_fraction``: from :class:`QueryStats` (are the query's words in the collection).
- ``top_overlap``: idf-weighted share of the query terms that occur in the best hit's text.
- ``topk_overlap``: the same over all the top hits' texts together.
- ``log_terms``: ``log(1 + number of query terms)`` (short queries score differently).
"""


def _finite(value: float) -> float:
    return value if math.isfinite(value) else 0.0


def _weighted_overlap(stats: QueryStats, present: set[str]) -> float:
    if not stats.terms:
        return 0.0
    idfs = stats.idfs if len(stats.idfs) == len(stats.terms) else (1.0,) * len(stats.terms)
    total = sum(idfs)
    if total <= 0:
        # Every idf 0 (a term in every document): weigh terms equally instead.
        idfs, total = (1.0,) * len(stats.terms), float(len(stats.terms))
    return sum(w for t, w in zip(stats.terms, idfs, strict=True) if t in present) / total


def gate_features(
    query: str,
    dense_scores: Sequence[float],
    bm25_scores: Sequence[float],
    stats: QueryStats,
    top_texts: Sequence[str],
) -> dict[str, float]:
    """Relevance-gate features of one search (see :data:`FEATURE_NAMES`); no model is called.

    Args:
        query: The query (kept for the signature's symmetry with search; the terms come from ``stats``).
        dense_scores: The dense retriever's top-k scores, best first; may be empty.
        bm25_scores: BM25's top-k scores, best first; may be empty.
        stats: :meth:`BM25Index.query_stats` of the query.
        top_texts: The texts of the top hits, best first; may be empty.

    Returns:
        Every name in :data:`FEATURE_NAMES` mapped to a finite float (0 where there is nothing to measure).
    """
    del query  # the terms, tokenized once, travel in stats
    dense = [float(s) for s in dense_scores if math.isfinite(float(s))]
    top1 = dense[0] if dense else 0.0
    rest = dense[1:]
    margin = top1 - sum(rest) / len(rest) if rest else 0.0
    mean = sum(dense) / len(dense) if dense else 0.0
    best_bm25 = float(bm25_scores[0]) if len(bm25_scores) else 0.0
    bm25_norm = min(max(best_bm25 / stats.max_score_bound, 0.0), 1.0) if stats.max_score_bound > 0 else 0.0
    texts = [set(bm25_tokenize(t)) for t in top_texts]
    top_overlap = _weighted_overlap(stats, texts[0]) if texts else 0.0
    topk_overlap = _weighted_overlap(stats, set().union(*texts)) if texts else 0.0
    features = {
        "dense_top1": top1,
        "dense_margin": margin,
        "dense_mean": mean,
        "bm25_norm": bm25_norm,
        "idf_coverage": stats.idf_coverage,
        "known_fraction": stats.known_fraction,
        "top_overlap": top_overlap,
        "topk_overlap": topk_overlap,
        "log_terms": math.log1p(stats.num_terms),
    }
    return {name: _finite(float(features[name])) for name in FEATURE_NAMES}
