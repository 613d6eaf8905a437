"""Retrieval quality: hit@k, reciprocal rank and nDCG over ranked source lists."""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from .._errors import RAGConfigError

__all__ = ["RetrievalScores", "dedupe_sources", "hit_at_k", "ndcg_at_k", "reciprocal_rank", "score_rankings"]


def _check_k(k: int) -> None:
    if k < 1:
        raise RAGConfigError(f"a cutoff k must be at least 1, got {k}", field="k")


def hit_at_k(ranked: Sequence[str], relevant: Collection[str], k: int) -> float:
    """1.0 when any of the first ``k`` results is relevant, else 0.0.

    Args:
        ranked: Result identifiers (e.g. sources), best first.
        relevant: The relevant identifiers.
        k: The cutoff, at least 1.

    Returns:
        1.0 or 0.0.
    """
    _check_k(k)
    return 1.0 if any(r in relevant for r in ranked[:k]) else 0.0


def reciprocal_rank(ranked: Sequence[str], relevant: Collection[str], k: int | None = None) -> float:
    """One over the rank (from 1) of the first relevant result; 0.0 when none is found.

    Args:
        ranked: Result identifiers, best first.
        relevant: The relevant identifiers.
        k: Look only at the first ``k`` results (default: all).

    Returns:
        The reciprocal rank, in [0, 1].
    """
    if k is not None:
        _check_k(k)
    for rank, item in enumerate(ranked[:k] if k is not None else ranked, start=1):
        if item in relevant:
            return 1.0 / rank
    return 0.0


def ndcg_at_k(ranked: Sequence[str], relevant: Collection[str], k: int) -> float:
    """Normalised discounted cumulative gain with binary gains.

    DCG sums ``1 / log2(rank + 1)`` over the relevant results in the first ``k`` (a repeated result
    gains once); the ideal DCG puts ``min(len(relevant), k)`` relevant results on top.

    Args:
        ranked: Result identifiers, best first.
        relevant: The relevant identifiers.
        k: The cutoff, at least 1.

    Returns:
        nDCG in [0, 1]; 0.0 when nothing is relevant.
    """
    _check_k(k)
    seen: set[str] = set()
    dcg = 0.0
    for rank, item in enumerate(ranked[:k], start=1):
        if item in relevant and item not in seen:
            seen.add(item)
            dcg += 1.0 / math.log2(rank + 1)
    ideal = sum(1.0 / math.log2(rank + 1) for rank in range(1, min(len(relevant), k) + 1))
    return dcg / ideal if ideal > 0 else 0.0


def dedupe_sources(ranked: Sequence[str]) -> list[str]:
    """Turn a chunk-level ranking of sources into a document-level one (each source at its first rank).

    Args:
        ranked: The source of each ranked chunk, best first.

    Returns:
        Distinct sources in order of first occurrence.
    """
    return list(dict.fromkeys(ranked))


@dataclass(frozen=True)
class RetrievalScores:
    """Mean retrieval metrics over a set of queries.

    Attributes:
        n: Number of queries.
        hit: Mean hit@k for each cutoff k.
        mrr: Mean reciprocal rank over each full ranking (its length is the cutoff).
        ndcg: Mean nDCG@k for each cutoff k.
    """

    n: int
    hit: dict[int, float]
    mrr: float
    ndcg: dict[int, float]

    def to_dict(self) -> dict[str, float | int]:
        """A flat JSON-ready dict: ``n``, ``mrr``, ``hit@k`` and ``ndcg@k`` for each k."""
        out: dict[str, float | int] = {"n": self.n, "mrr": self.mrr}
        out.update({f"hit@{k}": v for k, v in self.hit.items()})
        out.update({f"ndcg@{k}": v for k, v in self.ndcg.items()})
        return out


def score_rankings(
    rankings: Sequence[Sequence[str]], relevant: Sequence[Collection[str]], ks: Sequence[int] = (1, 3, 5, 10)
) -> RetrievalScores:
    """Average hit@k, MRR and nDCG@k over queries.

    Args:
        rankings: One ranked identifier list a query (deduplicate with :func:`dedupe_sources` first for
            document-level scores).
        relevant: The relevant identifiers of each query, aligned with ``rankings``.
        ks: The cutoffs.

    Returns:
        The means (0.0 for no queries).

    Raises:
        RAGConfigError: Mismatched lengths or a cutoff below 1.
    """
    if len(rankings) != len(relevant):
        raise RAGConfigError(
            f"{len(rankings)} rankings for {len(relevant)} relevance sets; pass one per query"
        )
    for k in ks:
        _check_k(k)
    n = len(rankings)

    def mean(values: list[float]) -> float:
        return sum(values) / n if n else 0.0

    pairs = list(zip(rankings, relevant, strict=True))
    return RetrievalScores(
        n=n,
        hit={k: mean([hit_at_k(r, rel, k) for r, rel in pairs]) for k in ks},
        mrr=mean([reciprocal_rank(r, rel) for r, rel in pairs]),
        ndcg={k: mean([ndcg_at_k(r, rel, k) for r, rel in pairs]) for k in ks},
    )
