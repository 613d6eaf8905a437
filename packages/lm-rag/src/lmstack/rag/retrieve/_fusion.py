"""Combining and diversifying rankings: reciprocal rank fusion and maximal marginal relevance."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .._errors import RAGConfigError

__all__ = ["mmr", "reciprocal_rank_fusion"]


def reciprocal_rank_fusion(
    rankings: Sequence[Sequence[int]], *, k: int = 60, weights: Sequence[float] | None = None
) -> list[tuple[int, float]]:
    """Fuse rankings by reciprocal rank (Cormack et al., 2009).

    Each id scores the sum over the rankings that contain it of ``weight / (k + rank)``, rank counted
    from 1. An id repeated within one ranking counts at its first (best) rank only.

    Args:
        rankings: Ranked id lists, best first (e.g. dense and BM25 results).
        k: The smoothing constant; larger values flatten the advantage of the top ranks.
        weights: One weight a ranking (default 1 each).

    Returns:
        ``(id, fused score)`` pairs, best first; equal scores keep the order of first appearance
        (ranking by ranking, rank by rank).

    Raises:
        RAGConfigError: ``k`` below 0, or a weights list of another length than the rankings.
    """
    if k < 0:
        raise RAGConfigError(f"reciprocal rank fusion needs k >= 0, got {k}", field="k")
    if weights is None:
        weights = [1.0] * len(rankings)
    elif len(weights) != len(rankings):
        raise RAGConfigError(
            f"{len(weights)} weights for {len(rankings)} rankings; pass one weight a ranking"
        )
    fused: dict[int, float] = {}
    for ranking, weight in zip(rankings, weights, strict=True):
        seen: set[int] = set()
        for rank, item in enumerate(ranking, start=1):
            if item in seen:
                continue
            seen.add(item)
            fused[item] = fused.get(item, 0.0) + weight / (k + rank)
    # dicts keep insertion order, and sorted() is stable: ties stay in order of first appearance.
    return sorted(fused.items(), key=lambda pair: -pair[1])


def mmr(query: np.ndarray, candidates: np.ndarray, k: int, *, lambda_: float = 0.7) -> list[int]:
    """Pick ``k`` candidates by maximal marginal relevance (Carbonell and Goldstein, 1998).

    Each step takes the candidate maximising ``lambda_ * sim(query, c) - (1 - lambda_) * max sim(c, s)``
    over those already selected ``s``, with cosine similarity as the inner product of unit vectors.

    Args:
        query: The query embedding, shape ``(dim,)``, unit length.
        candidates: Candidate embeddings, shape ``(n, dim)``, unit length.
        k: How many to select (at most ``n``).
        lambda_: Relevance weight in [0, 1]: 1 ranks by similarity alone, lower values favour diversity.

    Returns:
        Indices into ``candidates`` in selection order; equal scores go to the lower index.

    Raises:
        RAGConfigError: Mismatched shapes or ``lambda_`` outside [0, 1].
    """
    if not 0.0 <= lambda_ <= 1.0:
        raise RAGConfigError(f"mmr needs 0 <= lambda_ <= 1, got {lambda_}", field="lambda_")
    q = np.asarray(query, dtype=np.float64).reshape(-1)
    c = np.asarray(candidates, dtype=np.float64)
    if c.size == 0 or k <= 0:
        return []
    if c.ndim != 2 or c.shape[1] != q.shape[0]:
        raise RAGConfigError(f"mmr got a query of shape {q.shape} and candidates of shape {c.shape}")
    relevance = c @ q
    # Highest similarity to anything selected so far; -inf until the first pick so it does not count.
    redundancy = np.full(len(c), -np.inf)
    chosen: list[int] = []
    available = np.ones(len(c), dtype=bool)
    for _ in range(min(k, len(c))):
        penalty = np.where(np.isfinite(redundancy), redundancy, 0.0)
        score = np.where(available, lambda_ * relevance - (1.0 - lambda_) * penalty, -np.inf)
        pick = int(np.argmax(score))
        chosen.append(pick)
        available[pick] = False
        redundancy = np.maximum(redundancy, c @ c[pick])
    return chosen
