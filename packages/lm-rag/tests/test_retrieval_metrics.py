from __future__ import annotations

import math

import pytest

from lmstack.rag import RAGConfigError
from lmstack.rag.retrieve import (
    dedupe_sources,
    hit_at_k,
    ndcg_at_k,
    reciprocal_rank,
    score_rankings,
)


def test_relevant_at_rank_three() -> None:
    ranked = ["a", "b", "c", "d"]
    assert reciprocal_rank(ranked, {"c"}) == pytest.approx(1 / 3)
    assert reciprocal_rank(ranked, {"c"}, k=2) == 0.0
    assert ndcg_at_k(ranked, {"c"}, 5) == pytest.approx(1 / math.log2(4))
    assert hit_at_k(ranked, {"c"}, 2) == 0.0 and hit_at_k(ranked, {"c"}, 3) == 1.0


def test_ndcg_ideal_uses_min_of_relevant_and_k() -> None:
    # two relevant, found at ranks 1 and 3; IDCG puts them at 1 and 2
    assert ndcg_at_k(["x", "q", "y"], {"x", "y"}, 3) == pytest.approx((1 + 0.5) / (1 + 1 / math.log2(3)))
    # five relevant but k=2: IDCG over two places, so a perfect top 2 scores 1
    assert ndcg_at_k(["a", "b"], set("abcde"), 2) == pytest.approx(1.0)
    # a repeated relevant item gains once
    assert ndcg_at_k(["a", "a"], {"a", "b"}, 2) == pytest.approx(1 / (1 + 1 / math.log2(3)))
    assert ndcg_at_k(["a"], set(), 3) == 0.0 and reciprocal_rank([], {"a"}) == 0.0


def test_dedupe_sources_keeps_first_occurrence() -> None:
    assert dedupe_sources(["b.md", "a.md", "b.md", "c.md", "a.md"]) == ["b.md", "a.md", "c.md"]


def test_score_rankings_means() -> None:
    scores = score_rankings([["a", "b"], ["x", "y", "z"]], [{"b"}, {"q"}], ks=(1, 2))
    assert scores.n == 2
    assert scores.hit == {1: 0.0, 2: 0.5}
    assert scores.mrr == pytest.approx(0.25)
    assert scores.ndcg[2] == pytest.approx((1 / math.log2(3)) / 2)
    assert scores.to_dict() == {
        "n": 2,
        "mrr": pytest.approx(0.25),
        "hit@1": 0.0,
        "hit@2": 0.5,
        "ndcg@1": 0.0,
        "ndcg@2": pytest.approx((1 / math.log2(3)) / 2),
    }
    assert score_rankings([], []).mrr == 0.0


def test_metric_errors() -> None:
    with pytest.raises(RAGConfigError, match="2 rankings for 1"):
        score_rankings([["a"], ["b"]], [{"a"}])
    with pytest.raises(RAGConfigError, match="at least 1"):
        hit_at_k(["a"], {"a"}, 0)
