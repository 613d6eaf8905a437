from __future__ import annotations

import numpy as np
import pytest

from lmstack.rag import RAGConfigError
from lmstack.rag.retrieve import mmr, reciprocal_rank_fusion


def test_rrf_hand_computed() -> None:
    fused = reciprocal_rank_fusion([[1, 2, 3], [3, 1, 4]], k=60)
    expected = {1: 1 / 61 + 1 / 62, 2: 1 / 62, 3: 1 / 63 + 1 / 61, 4: 1 / 63}
    assert [i for i, _ in fused] == [1, 3, 2, 4]
    assert dict(fused) == pytest.approx(expected)


def test_rrf_weights_ties_and_repeats() -> None:
    fused = reciprocal_rank_fusion([[1, 2], [2, 1]], k=0, weights=[2.0, 1.0])
    assert [i for i, _ in fused] == [1, 2]
    assert [s for _, s in fused] == pytest.approx([2.0 + 0.5, 1.0 + 1.0])
    # equal scores keep the order of first appearance: 7 (ranking 0) before 9 (ranking 1)
    assert [i for i, _ in reciprocal_rank_fusion([[7], [9]])] == [7, 9]
    assert [i for i, _ in reciprocal_rank_fusion([[9], [7]])] == [9, 7]
    # a repeated id counts at its best rank only
    assert dict(reciprocal_rank_fusion([[5, 5, 6]], k=1)) == pytest.approx({5: 1 / 2, 6: 1 / 4})
    assert reciprocal_rank_fusion([]) == [] and reciprocal_rank_fusion([[], []]) == []


def test_rrf_errors() -> None:
    with pytest.raises(RAGConfigError, match="1 weights for 2 rankings"):
        reciprocal_rank_fusion([[1], [2]], weights=[1.0])
    with pytest.raises(RAGConfigError, match="k >= 0"):
        reciprocal_rank_fusion([[1]], k=-1)


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def reference_mmr(q: np.ndarray, c: np.ndarray, k: int, lam: float) -> list[int]:
    chosen: list[int] = []
    while len(chosen) < min(k, len(c)):
        best, best_score = -1, -np.inf
        for i in range(len(c)):
            if i in chosen:
                continue
            redundancy = max((float(c[i] @ c[j]) for j in chosen), default=0.0)
            score = lam * float(c[i] @ q) - (1 - lam) * redundancy
            if score > best_score:
                best, best_score = i, score
        chosen.append(best)
    return chosen


def test_mmr_lambda_one_sorts_by_similarity() -> None:
    rng = np.random.default_rng(0)
    q = unit(rng.normal(size=8))
    c = unit(rng.normal(size=(12, 8)))
    assert mmr(q, c, 12, lambda_=1.0) == np.argsort(-(c @ q), kind="stable").tolist()
    assert mmr(q, c, 5, lambda_=1.0) == np.argsort(-(c @ q), kind="stable")[:5].tolist()


def test_mmr_picks_the_distinct_candidate_second() -> None:
    q = unit(np.array([1.0, 1.0, 0.0]))
    a = unit(np.array([1.0, 0.2, 0.0]))
    distinct = unit(np.array([0.1, 1.0, 0.0]))  # a little less similar to q than a, far from a
    c = unit(np.stack([a, a, a + np.array([0.0, 0.0, 0.01]), distinct]))
    assert mmr(q, c, 1) == [0]
    assert mmr(q, c, 2) == [0, 3]
    assert mmr(q, c, 2, lambda_=1.0)[1] != 3  # pure relevance takes a duplicate


@pytest.mark.parametrize("lam", [0.0, 0.3, 0.7, 1.0])
def test_mmr_matches_a_plain_loop(lam: float) -> None:
    rng = np.random.default_rng(3)
    q = unit(rng.normal(size=6))
    c = unit(rng.normal(size=(15, 6)))
    assert mmr(q, c, 7, lambda_=lam) == reference_mmr(q, c, 7, lam)


def test_mmr_edges_and_errors() -> None:
    q = np.ones(3) / np.sqrt(3)
    assert mmr(q, np.zeros((0, 3)), 3) == []
    assert mmr(q, np.eye(3), 0) == []
    assert sorted(mmr(q, np.eye(3), 10)) == [0, 1, 2]
    with pytest.raises(RAGConfigError, match="shape"):
        mmr(q, np.eye(4), 2)
    with pytest.raises(RAGConfigError, match="lambda_"):
        mmr(q, np.eye(3), 2, lambda_=1.5)


# -- metadata filters (they choose the allowed ids the retrievers fuse over) --------------------------

from lmstack.rag.retrieve import matches_filters, validate_filters  # noqa: E402

CHUNK = {"page": 3, "kind": "pdf", "headings": ["Install", "GPU setup"], "draft": False, "title": "Guide"}


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        (None, True),
        ({}, True),
        ({"source": "docs/*.pdf"}, True),
        ({"source": "*/guide.pdf"}, True),
        ({"source": "docs/*.md"}, False),
        ({"source": ["a.md", "docs/guide.*"]}, True),
        ({"kind": "pdf"}, True),
        ({"kind": "PDF"}, False),
        ({"kind": ["md", "pdf"]}, True),
        ({"page": 3}, True),
        ({"page": 3.0}, True),
        ({"page": "3"}, False),
        ({"page": {"gte": 2, "lte": 3}}, True),
        ({"page": {"gt": 3}}, False),
        ({"page": {"lt": 3}}, False),
        ({"headings": "GPU*"}, True),
        ({"headings": "Install"}, True),
        ({"headings": ["Usage", "Install"]}, True),
        ({"headings": "Usage"}, False),
        ({"draft": False}, True),
        ({"draft": 0}, False),
        ({"title": {"gte": 1}}, False),
        ({"sheet": "Q3"}, False),
        ({"kind": "pdf", "page": {"gte": 4}}, False),
    ],
)
def test_matches_filters(filters: dict | None, expected: bool) -> None:
    assert matches_filters(filters, "docs/guide.pdf", CHUNK) is expected


@pytest.mark.parametrize(
    ("filters", "message"),
    [
        ({"page": {"from": 1}}, "range operators"),
        ({"page": {}}, "range operators"),
        ({"page": {"gte": "1"}}, "finite number"),
        ({"page": {"gte": True}}, "finite number"),
        ({"kind": []}, "empty list"),
        ({"kind": [["a"]]}, "use a string"),
        ({"kind": None}, "use a string"),
        ({"page": float("nan")}, "finite"),
        ({"source": 3}, "glob"),
        ({"source": {"gte": 1}}, "glob"),
        ({3: "x"}, "non-empty strings"),
        (["kind"], "mapping"),
    ],
)
def test_validate_filters_rejects_bad_shapes(filters: object, message: str) -> None:
    with pytest.raises(RAGConfigError, match=message):
        validate_filters(filters)  # type: ignore[arg-type]


def test_validate_filters_normalises() -> None:
    assert validate_filters({"source": "a*", "kind": ["md"], "page": {"gte": 1}}) == {
        "source": ("a*",),
        "kind": ("md",),
        "page": {"gte": 1},
    }
    assert validate_filters(None) == {}
