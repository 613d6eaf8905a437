"""Retrieval parts: BM25, rank fusion, MMR, cross-encoder reranking, metadata filters and metrics.

The index (:mod:`lmstack.rag.store`) combines them; each part also works on its own.
"""

from __future__ import annotations

from ._bm25 import BM25Index, QueryStats
from ._filters import matches_filters, validate_filters
from ._fusion import mmr, reciprocal_rank_fusion
from ._metrics import (
    RetrievalScores,
    dedupe_sources,
    hit_at_k,
    ndcg_at_k,
    reciprocal_rank,
    score_rankings,
)
from ._rerank import CrossEncoderReranker
from ._tokenize import STOPWORDS, bm25_tokenize

__all__ = [
    "STOPWORDS",
    "BM25Index",
    "CrossEncoderReranker",
    "QueryStats",
    "RetrievalScores",
    "bm25_tokenize",
    "dedupe_sources",
    "hit_at_k",
    "matches_filters",
    "mmr",
    "ndcg_at_k",
    "reciprocal_rank",
    "reciprocal_rank_fusion",
    "score_rankings",
    "validate_filters",
]
