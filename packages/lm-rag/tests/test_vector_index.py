"""VectorIndex against exact references: numpy brute force and faiss exact search."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

from lmstack.rag import RAGConfigError
from lmstack.rag.store import VectorIndex, VectorIndexConfig


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(
    queries: np.ndarray, ids: np.ndarray, vectors: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    sims = queries.astype(np.float64) @ vectors.astype(np.float64).T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    scores = np.full((len(queries), k), -np.inf)
    out = np.full((len(queries), k), -1, dtype=np.int64)
    take = order.shape[1]
    scores[:, :take] = np.take_along_axis(sims, order, axis=1)
    out[:, :take] = ids[order]
    return scores, out


def clustered(rng: np.random.Generator, centres: np.ndarray, n: int) -> np.ndarray:
    # A mixture of Gaussians: tight clusters around random centres, like embeddings of related texts.
    x = centres[rng.integers(0, len(centres), n)] + 0.1 * rng.normal(size=(n, centres.shape[1]))
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize(("n", "k"), [(1, 5), (37, 10), (257, 300)])
def test_flat_search_equals_numpy_brute_force(n: int, k: int) -> None:
    rng = np.random.default_rng(n)
    dim = 24
    ids = rng.choice(10_000, n, replace=False).astype(np.int64)
    x = unit(rng, n, dim)
    q = unit(rng, 13, dim)
    index = VectorIndex.build(dim, ids, x, VectorIndexConfig(kind="flat"))
    assert index.kind == "flat" and len(index) == n
    scores, got = index.search(q, k)
    ref_scores, ref_ids = brute_force(q, ids, x, k)
    assert got.dtype == np.int64 and scores.dtype == np.float32 and got.shape == (13, k)
    np.testing.assert_array_equal(got, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=1e-6)
    if k > n:
        assert np.all(got[:, n:] == -1) and np.all(np.isneginf(scores[:, n:]))


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_remove_then_search_and_allowed_ids(kind: str) -> None:
    rng = np.random.default_rng(1)
    dim, n, k = 16, 500, 20
    ids = np.arange(n, dtype=np.int64) * 2 + 1
    x = unit(rng, n, dim)
    q = unit(rng, 7, dim)
    index = VectorIndex.build(dim, ids, x, VectorIndexConfig(kind=kind))
    gone = ids[rng.choice(n, 100, replace=False)]
    index.remove(gone)
    index.remove(np.array([999_999]))  # absent: ignored
    keep = ~np.isin(ids, gone)
    assert len(index) == n - 100
    scores, got = index.search(q, k)
    _, ref = brute_force(q, ids[keep], x[keep], k)
    assert not np.isin(got, gone).any()
    if kind == "flat":
        np.testing.assert_array_equal(got, ref)
    else:
        assert np.mean([len(set(a) & set(b)) / k for a, b in zip(got, ref, strict=True)]) >= 0.95
    # allowed_ids: a small subset (exact path) and a large one (selector path), both with removed ids in it
    for allowed in (ids[::25], ids[: n // 2 + 50]):
        mask = keep & np.isin(ids, allowed)
        scores, got = index.search(q, k, allowed_ids=allowed)
        ref_scores, ref = brute_force(q, ids[mask], x[mask], k)
        assert set(got[got >= 0].tolist()) <= set(ids[mask].tolist())
        if kind == "flat" or mask.sum() <= k:
            np.testing.assert_array_equal(got, ref)
            np.testing.assert_allclose(scores, ref_scores, atol=1e-6)
        else:
            assert (got >= 0).sum(axis=1).min() == min(k, int(mask.sum()))
    empty_scores, none = index.search(q, k, allowed_ids=np.array([10**9]))
    assert np.all(none == -1) and np.all(np.isneginf(empty_scores))
    # re-adding a removed id is allowed; adding a live one is not
    index.add(gone[:1], x[ids == gone[0]])
    assert gone[0] in index
    with pytest.raises(RAGConfigError):
        index.add(ids[keep][:1], x[keep][:1])


def test_hnsw_compacts_after_many_removals() -> None:
    rng = np.random.default_rng(2)
    ids = np.arange(300, dtype=np.int64)
    x = unit(rng, 300, 8)
    index = VectorIndex.build(8, ids, x, VectorIndexConfig(kind="hnsw"))
    index.remove(ids[:50])
    assert index.num_tombstones == 50
    index.remove(ids[50:120])  # past 30%: rebuilt from its exact vectors
    assert index.num_tombstones == 0 and len(index) == 180 and index.kind == "hnsw"
    np.testing.assert_array_equal(np.sort(index.ids), ids[120:])
    np.testing.assert_allclose(index.reconstruct(ids[[150, 121]]), x[[150, 121]], atol=1e-7)


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_approximate_recall_at_10(kind: str) -> None:
    rng = np.random.default_rng(3)
    dim, n = 64, 20_000
    centres = rng.normal(size=(200, dim)) / 8
    x = clustered(rng, centres, n)
    q = clustered(rng, centres, 200)
    ids = np.arange(n, dtype=np.int64) + 100
    exact = faiss.IndexFlatIP(dim)
    exact.add(x)
    _, ref = exact.search(q, 10)
    index = VectorIndex.build(dim, ids, x, VectorIndexConfig(kind=kind))
    assert index.kind == kind
    _, got = index.search(q, 10)
    recall = np.mean([len(set(a) & set(b + 100)) / 10 for a, b in zip(got, ref, strict=True)])
    assert recall >= 0.95, recall
    # tombstones are skipped
    index.remove(ids[:1000])
    _, got = index.search(q, 10)
    assert not np.isin(got, ids[:1000]).any() and (got >= 0).all()


def test_ivfpq_too_few_vectors_stays_flat() -> None:
    rng = np.random.default_rng(4)
    index = VectorIndex.build(16, np.arange(500), unit(rng, 500, 16), VectorIndexConfig(kind="ivfpq"))
    assert index.kind == "flat"


def test_auto_switches_kind_at_exact_below() -> None:
    rng = np.random.default_rng(5)
    config = VectorIndexConfig(kind="auto", exact_below=100, approximate="hnsw")
    x = unit(rng, 100, 8)
    assert VectorIndex.build(8, np.arange(99), x[:99], config).kind == "flat"
    assert VectorIndex.build(8, np.arange(100), x, config).kind == "hnsw"


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_save_load_round_trip(tmp_path: Path, kind: str) -> None:
    rng = np.random.default_rng(6)
    n = 12_000 if kind == "ivfpq" else 400
    ids = np.arange(n, dtype=np.int64) * 3
    x = unit(rng, n, 32)
    q = unit(rng, 5, 32)
    index = VectorIndex.build(32, ids, x, VectorIndexConfig(kind=kind, pq_m=8))
    index.remove(ids[:10])
    before = index.search(q, 10)
    path = tmp_path / "v.faiss"
    index.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["v.faiss"]  # no temp file left
    loaded = VectorIndex.load(path)
    assert loaded.kind == kind and len(loaded) == n - 10 and loaded.num_tombstones == index.num_tombstones
    after = loaded.search(q, 10)
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_allclose(after[0], before[0], atol=1e-6)


def test_config_validation_and_json_round_trip() -> None:
    config = VectorIndexConfig(kind="ivfpq", ivf_nlist=64, pq_m=8, refine=False)
    assert VectorIndexConfig.from_dict(config.to_dict()) == config
    for bad in ({"kind": "lsh"}, {"approximate": "flat"}, {"hnsw_m": 1}, {"ivf_nlist": 0}, {"ivf_nprobe": 0}):
        with pytest.raises(RAGConfigError) as err:
            VectorIndexConfig(**bad)  # type: ignore[arg-type]
        assert err.value.field == next(iter(bad))
    with pytest.raises(RAGConfigError):
        VectorIndexConfig.from_dict({"kind": "flat", "nope": 1})
    with pytest.raises(RAGConfigError) as err:
        VectorIndex.build(
            30, np.arange(10_000), np.ones((10_000, 30)), VectorIndexConfig(kind="ivfpq", pq_m=7)
        )
    assert err.value.field == "pq_m"
