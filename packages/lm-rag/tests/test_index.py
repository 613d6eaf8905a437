# ruff: noqa: RUF001 - the Chinese documents are written with full-width commas, as Chinese is
"""Index: ingestion (incremental, bad input, crash safety), search vs exact references, filters, the gate."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

from lmstack.rag import GateError, Index, IndexLockedError, RAGConfigError, StoreError
from lmstack.rag.embed import SentenceTransformerEmbedder, default_embedding_model_path
from lmstack.rag.retrieve import reciprocal_rank_fusion


class CountingEmbedder:
    """The default embedder, counting the texts it embeds (what incremental ingest must keep small)."""

    def __init__(self, inner: SentenceTransformerEmbedder) -> None:
        self.inner = inner
        self.texts: list[str] = []

    @property
    def fingerprint(self) -> str:
        return self.inner.fingerprint

    @property
    def dim(self) -> int:
        return self.inner.dim

    def embed(self, texts, *, is_query: bool = False):
        if not is_query:
            self.texts.extend(texts)
        return self.inner.embed(texts, is_query=is_query)

    def tokenizer_counter(self):
        return self.inner.tokenizer_counter()


@pytest.fixture
def corpus(tmp_path: Path, make_corpus):
    folder = tmp_path / "docs"
    topics = make_corpus(folder, 100)
    return folder, topics


@pytest.fixture
def built(tmp_path: Path, corpus, embedder):
    folder, topics = corpus
    index = Index.create(tmp_path / "index", embedder=embedder)
    report = index.ingest(folder, use_tqdm=False)
    yield index, report, folder, topics
    index.close()


def snapshot(index: Index, queries: list[str]) -> list[list[tuple[str, int, float, str]]]:
    return [[(h.source, h.chunk_id, round(h.score, 6), h.text) for h in index.search(q, 5)] for q in queries]


def test_ingest_report_and_sources(built) -> None:
    index, report, _, topics = built
    assert sorted(report.added) == [f"docs/{stem}.md" for stem in sorted(topics)]
    assert report.updated == report.deleted == report.skipped == []
    assert report.chunks_added == len(index) > 0
    assert report.embedded == report.chunks_added  # a fresh cache: every chunk text embedded once
    assert index.documents() == sorted(report.added)


def test_dense_search_equals_exact_search_with_sentence_transformers(built) -> None:
    index, _, _, topics = built
    model = SentenceTransformer(str(default_embedding_model_path()), device="cpu")
    chunks = list(index.store.iter_chunks())
    ids = np.array([i for i, _ in chunks])
    matrix = model.encode([c.text for _, c in chunks], normalize_embeddings=True)
    for stem in list(topics)[:5]:
        name, _ = topics[stem]
        query = f"When was {name} first recorded?"
        scores = matrix @ model.encode([query], normalize_embeddings=True)[0]
        expected = ids[np.argsort(-scores, kind="stable")[:5]].tolist()
        hits = index.search(query, 5, mode="dense")
        assert [h.chunk_id for h in hits] == expected
        np.testing.assert_allclose([h.score for h in hits], np.sort(scores)[::-1][:5], atol=1e-4)


def test_hybrid_is_the_reciprocal_rank_fusion_of_dense_and_bm25(built) -> None:
    index, _, _, topics = built
    name, _ = topics["doc007"]
    query = f"what colour is {name} painted"
    dense = [h.chunk_id for h in index.search(query, 50, mode="dense", candidates=50)]
    sparse = [h.chunk_id for h in index.search(query, 50, mode="bm25", candidates=50)]
    fused = reciprocal_rank_fusion([dense, sparse])
    hits = index.search(query, 5, candidates=50)
    assert [h.chunk_id for h in hits] == [i for i, _ in fused[:5]]
    assert hits[0].source == "docs/doc007.md"
    assert {"dense_rank", "bm25_rank"} <= set(hits[0].metadata)


def test_exact_name_found_by_every_mode(built) -> None:
    index, _, _, topics = built
    for stem in ("doc003", "doc050", "doc099"):
        name, _ = topics[stem]
        for mode in ("hybrid", "dense", "bm25"):
            assert index.search(f"Tell me about {name}.", 3, mode=mode)[0].source == f"docs/{stem}.md", mode


def test_incremental_ingest_reembeds_only_the_changed_file(tmp_path: Path, corpus, embedder) -> None:
    folder, topics = corpus
    counting = CountingEmbedder(embedder)
    index = Index.create(tmp_path / "index", embedder=counting)
    first = index.ingest(folder, use_tqdm=False)
    assert len(counting.texts) == first.chunks_added
    generation = first.generation

    # Nothing changed: nothing read, embedded or committed.
    counting.texts.clear()
    again = index.ingest(folder, use_tqdm=False)
    assert not again.changed and len(again.unchanged) == 100 and counting.texts == []
    assert again.generation == generation

    # One file of a hundred changes: only its new chunk texts are embedded.
    path = folder / "doc042.md"
    old_chunks = {c.text for _, c in index.store.iter_chunks() if c.source == "docs/doc042.md"}
    path.write_text(
        path.read_text(encoding="utf-8").replace("every spring", "every autumn"), encoding="utf-8"
    )
    counting.texts.clear()
    report = index.ingest(folder, use_tqdm=False)
    new_chunks = {c.text for _, c in index.store.iter_chunks() if c.source == "docs/doc042.md"}
    assert report.updated == ["docs/doc042.md"] and len(report.unchanged) == 99
    assert sorted(counting.texts) == sorted(new_chunks - old_chunks) and 0 < len(counting.texts) <= len(
        new_chunks
    )
    assert report.embedded == len(counting.texts)
    assert "every autumn" in index.search(f"{topics['doc042'][0]} painted autumn", 1)[0].text

    # A new file is added, a removed one deleted; other folders' documents are kept.
    other = tmp_path / "other"
    other.mkdir()
    (other / "note.md").write_text("# Zebulor\n\nZebulor is a lighthouse.\n", encoding="utf-8")
    index.ingest(other, use_tqdm=False)
    (folder / "doc001.md").unlink()
    (folder / "new.md").write_text("# Quorvan\n\nQuorvan is a windmill by the sea.\n", encoding="utf-8")
    report = index.ingest(folder, use_tqdm=False)
    assert report.added == ["docs/new.md"] and report.deleted == ["docs/doc001.md"]
    assert "other/note.md" in index.documents() and "docs/doc001.md" not in index.documents()
    assert all(h.source != "docs/doc001.md" for h in index.search(topics["doc001"][0], 10))
    index.close()


def test_bad_files_are_skipped_with_reasons_and_the_rest_ingested(tmp_path: Path, embedder) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "good.md").write_text("# Good\n\nThe Velmora bridge opens at dawn.\n", encoding="utf-8")
    (folder / "corrupt.pdf").write_bytes(b"%PDF-1.4\n" + os.urandom(300))
    (folder / "empty.txt").write_bytes(b"")
    (folder / "binary.txt").write_bytes(bytes(range(256)) * 8)
    (folder / "latin1.txt").write_bytes("Caf\xe9 cr\xe8me".encode("latin-1"))
    (folder / "huge.md").write_text("# Huge\n\n" + "word " * 30_000, encoding="utf-8")
    index = Index.create(tmp_path / "index", embedder=embedder)
    report = index.ingest(folder, max_bytes=100_000, use_tqdm=False)
    reasons = dict(report.skipped)
    assert report.added == ["mixed/good.md"]
    assert set(reasons) == {
        f"mixed/{n}" for n in ("corrupt.pdf", "empty.txt", "binary.txt", "latin1.txt", "huge.md")
    }
    assert "PDF" in reasons["mixed/corrupt.pdf"]
    assert "empty" in reasons["mixed/empty.txt"]
    assert "binary" in reasons["mixed/binary.txt"]
    assert "UTF-8" in reasons["mixed/latin1.txt"]
    assert "limit" in reasons["mixed/huge.md"]
    assert index.search("Velmora bridge", 1)[0].source == "mixed/good.md"
    for source, reason in report.skipped:
        assert f"skipped {source}: {reason}" in report.summary()
    index.close()


def test_chinese_and_mixed_documents(tmp_path: Path, embedder) -> None:
    folder = tmp_path / "zh"
    folder.mkdir()
    (folder / "vector.md").write_text(
        "# 向量检索\n\n向量检索把文档切成小块，再用嵌入模型计算相似度。\n", encoding="utf-8"
    )
    (folder / "cook.md").write_text(
        "# 做饭\n\n红烧肉需要酱油、冰糖和八角，小火慢炖一个小时。\n", encoding="utf-8"
    )
    (folder / "mixed.md").write_text(
        "# Deploy\n\n部署服务时，先运行 lmstack serve，然后检查端口。\n", encoding="utf-8"
    )
    index = Index.create(tmp_path / "index", embedder=embedder)
    index.ingest(folder, use_tqdm=False)
    assert index.search("检索", 1, mode="bm25")[0].source == "zh/vector.md"
    assert index.search("红烧肉怎么做", 1, mode="bm25")[0].source == "zh/cook.md"
    assert index.search("怎么部署 serve", 1)[0].source == "zh/mixed.md"
    index.close()


def test_filters(built) -> None:
    index, _, _, topics = built
    name, _ = topics["doc010"]
    hits = index.search(name, 5, filters={"source": "docs/doc02*.md"})
    assert hits and all(h.source.startswith("docs/doc02") for h in hits)
    hits = index.search(name, 5, filters={"headings": "History"})
    assert hits and all("History" in h.metadata["headings"] for h in hits)
    assert index.search(name, 5, filters={"source": "nowhere/*"}) == []
    with pytest.raises(RAGConfigError):
        index.search(name, 5, filters={"page": {"between": 3}})


def test_mmr_diversity_changes_order_but_keeps_best(built) -> None:
    index, _, _, topics = built
    query = f"{topics['doc005'][0]} history"
    plain = index.search(query, 5, mode="dense")
    diverse = index.search(query, 5, mode="dense", diversity=0.3)
    assert diverse[0].chunk_id == plain[0].chunk_id
    assert len({h.chunk_id for h in diverse}) == 5


def test_bad_queries(built) -> None:
    index = built[0]
    with pytest.raises(RAGConfigError, match="empty"):
        index.search("   ")
    with pytest.raises(RAGConfigError, match="mode"):
        index.search("x", mode="sparse")
    with pytest.raises(RAGConfigError, match="k must"):
        index.search("x", 0)


def test_open_errors(tmp_path: Path, built, embedder) -> None:
    with pytest.raises(StoreError, match="no index"):
        Index.open(tmp_path / "missing")
    with pytest.raises(StoreError):
        Index.create(built[0].path, embedder=embedder)


def test_gate_calibration_is_stored_and_used(tmp_path: Path, built) -> None:
    index, _, _, topics = built
    with pytest.raises(GateError, match="calibrate"):
        index.is_relevant("anything")
    names = [topics[s][0] for s in sorted(topics)]
    related = [f"When was {n} first recorded?" for n in names[:30]] + [
        f"What colour is {n}?" for n in names[30:60]
    ]
    unrelated = [
        "How do I boil an egg?", "What is the capital of France?", "Who won the football match yesterday?",
        "Can someone review my pull request?", "good morning everyone", "What time is lunch?",
        "How many legs does a spider have?", "Is it going to rain tomorrow?", "What is 17 times 23?",
        "Recommend a good science fiction novel", "How do I install numpy on Windows?", "thanks!",
        "What is the boiling point of water?", "Who painted the Mona Lisa?",
        "Where is the nearest train station?",
        "Happy birthday Tom!", "How do I center a div in CSS?", "What's a good name for a cat?",
        "How far is the moon?", "Who wrote Hamlet?",
    ]  # fmt: skip
    calibration, _ = index.calibrate(related, unrelated, use_tqdm=False)
    assert calibration.n_related == 60 and calibration.n_unrelated == 20
    reopened = Index.open(index.path, embedder=index.embedder)
    assert reopened.calibration is not None
    assert reopened.calibration.to_dict() == calibration.to_dict()
    assert reopened.is_relevant(f"In which year was {names[70]} first recorded?")
    assert not reopened.is_relevant("What is the tallest mountain on Earth?")
    reopened.close()


_CHILD = textwrap.dedent(
    """
    import sys, threading
    from pathlib import Path
    from lmstack.rag import Index
    from lmstack.rag.embed import SentenceTransformerEmbedder
    from lmstack.rag.store import WriteTransaction

    index_dir, folder, marker, stage = sys.argv[1:5]
    inner = SentenceTransformerEmbedder()

    def block():
        Path(marker).write_text("blocked")
        threading.Event().wait()  # until SIGKILL

    class Blocking:
        fingerprint = inner.fingerprint
        dim = inner.dim
        def tokenizer_counter(self):
            return inner.tokenizer_counter()
        def embed(self, texts, *, is_query=False):
            if stage == "embedding" and not is_query:
                block()
            return inner.embed(texts, is_query=is_query)

    if stage == "upserts":
        original = WriteTransaction.upsert_document
        calls = [0]
        def upsert(self, *args, **kwargs):
            calls[0] += 1
            if calls[0] == 30:
                block()
            return original(self, *args, **kwargs)
        WriteTransaction.upsert_document = upsert
    Index.open(index_dir, embedder=Blocking()).ingest(folder, use_tqdm=False)
    """
)


@pytest.mark.parametrize("stage", ["embedding", "upserts"])
def test_sigkill_during_ingest_leaves_the_old_index_answering_as_before(
    tmp_path: Path, built, stage: str
) -> None:
    index, _, folder, topics = built
    queries = [f"When was {topics[s][0]} first recorded?" for s in ("doc001", "doc020", "doc042", "doc077")]
    before = snapshot(index, queries)
    documents, generation = index.documents(), index.store.generation
    for path in sorted(folder.glob("*.md"))[:60]:  # change most files, so the killed ingest had much to do
        path.write_text(path.read_text(encoding="utf-8").replace("spring", "winter"), encoding="utf-8")
    marker = tmp_path / "marker"
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(index.path), str(folder), str(marker), stage],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert child.poll() is None, child.stderr.read().decode() if child.stderr else ""
            assert time.monotonic() < deadline, "the child never reached the stage"
            time.sleep(0.05)
        # While it holds the write lock, another writer is refused.
        with pytest.raises(IndexLockedError):
            index.ingest(folder, lock_timeout_s=0.2, use_tqdm=False)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        if child.stderr:
            child.stderr.close()
    reopened = Index.open(index.path, embedder=index.embedder)
    assert reopened.store.generation == generation
    assert reopened.documents() == documents
    assert snapshot(reopened, queries) == before
    # The lock died with the writer: the next ingest commits everything.
    report = reopened.ingest(folder, use_tqdm=False)
    assert len(report.updated) == 60 and report.generation == generation + 1
    assert "winter" in reopened.search(queries[0].replace("first recorded", "painted winter"), 1)[0].text
    reopened.close()


def test_a_reader_sees_a_writers_commit(tmp_path: Path, built, embedder) -> None:
    index, _, folder, _ = built
    reader = Index.open(index.path, embedder=embedder)
    assert not reader.search("Xylophorn observatory", 3, mode="bm25")
    (folder / "late.md").write_text("# Xylophorn\n\nXylophorn is an observatory.\n", encoding="utf-8")
    index.ingest(folder, use_tqdm=False)
    assert reader.search("Xylophorn observatory", 1, mode="bm25")[0].source == "docs/late.md"
    reader.close()


def test_searches_go_on_while_another_thread_ingests(tmp_path: Path, built) -> None:
    import threading

    index, _, folder, topics = built
    query = f"When was {topics['doc030'][0]} first recorded?"
    expected = [h.chunk_id for h in index.search(query, 3)]
    for path in sorted(folder.glob("*.md"))[50:]:
        path.write_text(
            path.read_text(encoding="utf-8") + "\nIt is also known for its bells.\n", encoding="utf-8"
        )
    started, results, errors = threading.Event(), [], []

    def ingest() -> None:
        try:
            started.set()
            index.ingest(folder, use_tqdm=False)
        except Exception as error:  # surfaced below
            errors.append(error)

    writer = threading.Thread(target=ingest)
    writer.start()
    started.wait()
    while writer.is_alive():
        results.append([h.chunk_id for h in index.search(query, 3)])
    writer.join()
    assert not errors and results
    # Every search saw a complete generation: the old one (same hits) or the new one (doc030 unchanged).
    assert all(ids == expected for ids in results)
    assert index.search(f"{topics['doc060'][0]} bells", 1)[0].source == "docs/doc060.md"


def test_gate_features_do_not_depend_on_how_the_hits_are_ranked(built) -> None:
    index, _, _, topics = built
    query = f"What colour is {topics['doc033'][0]}?"
    reference = index.retrieve(query).features
    for options in ({"mode": "bm25"}, {"mode": "dense", "candidates": 5}, {"diversity": 0.4}, {"k": 1}):
        assert index.retrieve(query, **options).features == reference, options
