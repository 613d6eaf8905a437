from __future__ import annotations

import math
import random

import bm25s
import pytest

from lmstack.rag import RAGConfigError, StoreError
from lmstack.rag.retrieve import BM25Index, bm25_tokenize

CORPUS = ["apple banana apple", "banana cherry", "cherry durian fig grape"]


def lucene_idf(df: int, n: int) -> float:
    return math.log(1 + (n - df + 0.5) / (df + 0.5))


def lucene_tf(tf: int, dl: int, avgdl: float, k1: float = 1.2, b: float = 0.75) -> float:
    return tf / (tf + k1 * (1 - b + b * dl / avgdl))


def test_tokenizer_words_numbers_and_stopwords() -> None:
    assert bm25_tokenize("The State-of-the-Art isn't 3.14 FAST") == ["state", "art", "isn", "3", "14", "fast"]
    assert bm25_tokenize("this is not what it was") == ["not"]
    # NFKC: full-width letters and digits become ASCII; casefold turns ß into ss.
    assert bm25_tokenize("\uff27\uff30\uff35\uff11\uff12 Straße") == ["gpu12", "strasse"]  # full-width GPU12
    # combining marks stay inside their word (Devanagari vowel signs, virama)
    assert bm25_tokenize("नमस्ते, мир!") == ["नमस्ते", "мир"]
    assert bm25_tokenize("") == [] and bm25_tokenize(" -- ' ") == []


def test_tokenizer_cjk_characters_and_bigrams() -> None:
    assert bm25_tokenize("向量检索") == ["向", "量", "检", "索", "向量", "量检", "检索"]
    assert bm25_tokenize("GPU显存") == ["gpu", "显", "存", "显存"]
    assert bm25_tokenize("カタ한국") == ["カ", "タ", "한", "국", "カタ", "タ한", "한국"]
    assert bm25_tokenize("字") == ["字"]


def test_scores_match_hand_computed_lucene_bm25() -> None:
    index = BM25Index.build([10, 20, 30], CORPUS)
    avgdl = 3.0
    hits = index.search("apple", 5)
    assert [i for i, _ in hits] == [10]
    assert hits[0][1] == pytest.approx(lucene_idf(1, 3) * lucene_tf(2, 3, avgdl), rel=1e-6)

    hits = dict(index.search("banana cherry", 5))
    assert set(hits) == {10, 20, 30}
    idf2 = lucene_idf(2, 3)
    assert hits[20] == pytest.approx(2 * idf2 * lucene_tf(1, 2, avgdl), rel=1e-6)
    assert hits[10] == pytest.approx(idf2 * lucene_tf(1, 3, avgdl), rel=1e-6)
    assert hits[30] == pytest.approx(idf2 * lucene_tf(1, 4, avgdl), rel=1e-6)
    assert index.search("kiwi", 5) == [] and index.search("", 5) == [] and index.search("apple", 0) == []


def test_ranking_matches_bm25s_used_directly() -> None:
    rng = random.Random(0)
    words = [f"w{i}" for i in range(40)]
    texts = [" ".join(rng.choices(words, k=rng.randint(3, 30))) for _ in range(60)]
    ids = list(range(1000, 1060))
    index = BM25Index.build(ids, texts, k1=1.5, b=0.6)
    reference = bm25s.BM25(k1=1.5, b=0.6, method="lucene")
    reference.index([bm25_tokenize(t) for t in texts], show_progress=False)
    for _ in range(20):
        query = " ".join(rng.choices(words, k=3))
        docs, scores = reference.retrieve([bm25_tokenize(query)], k=10, show_progress=False)
        ours = index.search(query, 10)
        assert [s for _, s in ours] == pytest.approx(scores[0].tolist(), rel=1e-5)
        # same documents, except that bm25s may break a tie at the cut differently
        cut = scores[0][-1]
        above = {ids[d] for d, s in zip(docs[0], scores[0], strict=True) if s > cut + 1e-6}
        assert above <= {i for i, _ in ours}
        all_scores = dict(index.search(query, 60))
        assert all(abs(all_scores[i] - cut) < 1e-5 for i, _ in ours if i not in above)


def test_cjk_and_mixed_queries_find_their_documents() -> None:
    texts = [
        "The embedding model maps passages to vectors.",
        "向量检索使用近似最近邻索引来加速查询。",
        "当GPU显存不足时，请减小batch size。",  # noqa: RUF001
        "日本語の文書も検索できます。",
    ]
    index = BM25Index.build([1, 2, 3, 4], texts)
    assert index.search("检索", 2)[0][0] == 2
    assert index.search("向量", 2)[0][0] == 2
    assert index.search("显存 batch", 2)[0][0] == 3
    assert index.search("GPU 不足", 2)[0][0] == 3
    assert index.search("文書の検索", 2)[0][0] == 4
    assert index.search("embedding vectors", 2)[0][0] == 1


def test_allowed_ids_filter_and_ties_in_build_order() -> None:
    index = BM25Index.build([5, 6, 7, 8], ["red fox", "red fox", "red fox", "blue fox"])
    assert [i for i, _ in index.search("red", 2)] == [5, 6]
    assert [i for i, _ in index.search("red", 10, allowed_ids={6, 7, 99})] == [6, 7]
    assert index.search("red", 10, allowed_ids=set()) == []
    full = index.search("fox", 10)
    assert index.search("fox", 10, allowed_ids=[8, 5]) == [(i, s) for i, s in full if i in (8, 5)]


def test_query_stats_hand_computed() -> None:
    index = BM25Index.build([0, 1, 2], CORPUS)
    stats = index.query_stats("the apple and a kiwi")
    idf_apple = lucene_idf(1, 3)
    assert stats.num_terms == 2 and stats.terms == ("apple", "kiwi")
    assert stats.known_fraction == 0.5
    # kiwi is unknown: counted at the idf of a term in one document, which equals apple's here
    assert stats.idf_coverage == pytest.approx(0.5)
    assert stats.max_score_bound == pytest.approx(idf_apple)
    stats = index.query_stats("banana apple")
    assert stats.idf_coverage == 1.0 and stats.known_fraction == 1.0
    assert stats.max_score_bound == pytest.approx(lucene_idf(2, 3) + idf_apple)
    empty = index.query_stats("the of")
    assert (empty.num_terms, empty.known_fraction, empty.idf_coverage, empty.max_score_bound) == (
        0,
        0.0,
        0.0,
        0.0,
    )


@pytest.mark.parametrize("method", ["lucene", "robertson", "atire", "bm25l", "bm25+"])
def test_max_score_bound_bounds_every_score(method: str) -> None:
    rng = random.Random(1)
    words = [f"t{i}" for i in range(15)]
    texts = [" ".join(rng.choices(words, k=rng.randint(1, 12))) for _ in range(25)]
    index = BM25Index.build(list(range(25)), texts, method=method)
    for _ in range(20):
        query = " ".join(rng.choices([*words, "zz"], k=rng.randint(1, 4)))
        bound = index.query_stats(query).max_score_bound
        assert all(score <= bound + 1e-5 for _, score in index.search(query, 25))


def test_save_load_round_trip(tmp_path) -> None:
    texts = ["alpha beta", "beta gamma 检索", "gamma delta"]
    index = BM25Index.build([3, 1, 2], texts, k1=0.9, b=0.4, method="atire")
    index.save(tmp_path / "bm25")
    loaded = BM25Index.load(tmp_path / "bm25")
    assert len(loaded) == 3 and loaded.ids == (3, 1, 2)
    assert (loaded.k1, loaded.b, loaded.method) == (0.9, 0.4, "atire")
    for query in ["beta", "gamma delta", "检索 alpha", "nothing"]:
        assert loaded.search(query, 3) == index.search(query, 3)
        assert loaded.query_stats(query) == index.query_stats(query)


def test_empty_index(tmp_path) -> None:
    for index in (BM25Index.build([], []), BM25Index.build([1, 2], ["the", ""])):
        assert index.search("anything", 5) == []
        stats = index.query_stats("anything")
        assert stats.known_fraction == 0.0 and stats.max_score_bound == 0.0
        assert all(math.isfinite(v) for v in (stats.idf_coverage, *stats.idfs))
    BM25Index.build([], []).save(tmp_path / "e")
    loaded = BM25Index.load(tmp_path / "e")
    assert len(loaded) == 0 and loaded.search("x", 3) == []


def test_errors(tmp_path) -> None:
    with pytest.raises(RAGConfigError, match="repeated ids"):
        BM25Index.build([1, 1], ["a", "b"])
    with pytest.raises(RAGConfigError, match="2 ids for 1 texts"):
        BM25Index.build([1, 2], ["a"])
    with pytest.raises(RAGConfigError, match="unknown BM25 method"):
        BM25Index.build([1], ["a"], method="tfidf")
    with pytest.raises(StoreError, match="rebuild"):
        BM25Index.load(tmp_path / "missing")
