"""The Store: errors, generations, one writer across processes, and crash safety under SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lmstack.rag import Chunk, Document, IndexLockedError, RAGConfigError, StoreError
from lmstack.rag.store import Store, VectorIndexConfig

DIM = 8


def make_doc(source: str, n: int, seed: int) -> tuple[Document, list[Chunk], np.ndarray]:
    rng = np.random.default_rng(seed)
    doc = Document(source=source, text="t" * 10 * n, kind="text", content_hash=f"hash-{source}-{seed}")
    chunks = [
        Chunk(
            text=f"{source} chunk {i} v{seed}",
            source=source,
            ordinal=i,
            start=10 * i,
            end=10 * i + 10,
            metadata={"headings": ["H", str(i)]},
        )
        for i in range(n)
    ]
    v = rng.normal(size=(n, DIM)).astype(np.float32)
    return doc, chunks, v / np.linalg.norm(v, axis=1, keepdims=True)


def snapshot(store: Store) -> dict[str, Any]:
    q = np.random.default_rng(99).normal(size=(4, DIM)).astype(np.float32)
    scores, ids = store.vector_index.search(q / np.linalg.norm(q, axis=1, keepdims=True), 6)
    chunk_ids = [i for i, _ in store.iter_chunks()]
    art = store.artifact_path("bm25")
    return {
        "generation": store.generation,
        "documents": {s: (r.content_hash, r.chunk_count) for s, r in store.documents().items()},
        "chunks": dict(store.iter_chunks()),
        "vectors": {i: v.tolist() for i, v in store.vectors(chunk_ids).items()},
        "ids": ids.tolist(),
        "scores": scores.tolist(),
        "state": store.state("stage"),
        "artifact": None if art is None else art.read_text(),
    }


def files(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if not p.name.startswith("meta.sqlite-"))


def test_create_and_open_errors(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=r"no index at .*lmstack rag ingest"):
        Store.open(tmp_path / "missing")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    with pytest.raises(StoreError, match="not an lmstack-rag index"):
        Store.open(tmp_path / "notes")
    with pytest.raises(StoreError, match="not an empty directory"):
        Store.create(tmp_path / "notes", settings={}, dim=DIM)
    (tmp_path / "empty").mkdir()
    with Store.create(tmp_path / "empty", settings={"embedder": "st:x"}, dim=DIM) as store:
        assert store.generation == 0 and store.num_chunks() == 0 and store.settings == {"embedder": "st:x"}
    assert Store.exists(tmp_path / "empty") and not Store.exists(tmp_path / "notes")
    with pytest.raises(StoreError, match="already an index: open it"):
        Store.create(tmp_path / "empty", settings={}, dim=DIM)
    with pytest.raises(RAGConfigError):
        Store.create(tmp_path / "bad", settings={"x": object()}, dim=DIM)
    assert not (tmp_path / "bad").exists()  # nothing half-created
    # another format version is refused
    import sqlite3

    conn = sqlite3.connect(tmp_path / "empty" / "meta.sqlite")
    conn.execute("UPDATE info SET value = '99' WHERE key = 'format_version'")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="format version 99"):
        Store.open(tmp_path / "empty")


def test_upsert_delete_state_and_search(tmp_path: Path) -> None:
    store = Store.create(tmp_path / "ix", settings={}, dim=DIM)
    a, b = make_doc("a.md", 3, 1), make_doc("b.md", 4, 2)
    with store.writer() as w:
        ids_a = w.upsert_document(*a)
        ids_b = w.upsert_document(*b)
        w.set_state("stage", {"n": 1})
        assert w.changed
    assert store.generation == 1 and store.num_chunks() == 7
    assert ids_a == [1, 2, 3] and ids_b == [4, 5, 6, 7]
    assert store.chunks(ids_a)[2] == Chunk(**{**a[1][1].__dict__, "metadata": {"headings": ["H", "1"]}})
    np.testing.assert_array_equal(store.vectors([5])[5], b[2][1])
    assert store.state("stage") == {"n": 1} and store.state("absent") is None
    rec = store.documents()["b.md"]
    assert (rec.content_hash, rec.kind, rec.size, rec.chunk_count) == ("hash-b.md-2", "text", 40, 4)

    # replacing a.md: its old chunks leave the index, new ids are fresh
    a2 = make_doc("a.md", 2, 3)
    with store.writer() as w:
        ids_a2 = w.upsert_document(*a2)
    assert ids_a2 == [8, 9] and store.chunks(ids_a) == {}
    all_ids = np.array(ids_b + ids_a2)
    all_vecs = np.concatenate([b[2], a2[2]])
    q = np.random.default_rng(7).normal(size=(3, DIM)).astype(np.float32)
    _, got = store.vector_index.search(q, 10)
    order = np.argsort(-(q @ all_vecs.T), axis=1)
    np.testing.assert_array_equal(got[:, :6], all_ids[order])
    assert np.all(got[:, 6:] == -1)

    # deleting b.md, then deleting and re-adding a.md: ids are never reused
    with store.writer() as w:
        assert w.delete_document("b.md") == 4
        assert w.delete_document("nope.md") == 0
        w.delete_document("a.md")
        ids_a3 = w.upsert_document(*make_doc("a.md", 1, 4))
    assert ids_a3 == [10] and set(store.documents()) == {"a.md"} and len(store.vector_index) == 1
    assert [i for i, _ in store.iter_chunks()] == [10]
    # a transaction with no changes commits nothing
    with store.writer() as w:
        assert not w.changed
    assert store.generation == 3
    with store.writer() as w, pytest.raises(RAGConfigError):
        w.upsert_document(a[0], b[1], b[2])  # chunks of another document


def test_artifacts_per_generation_cleanup_and_refresh(tmp_path: Path) -> None:
    store = Store.create(tmp_path / "ix", settings={}, dim=DIM)
    reader = Store.open(tmp_path / "ix")
    with store.writer() as w:
        w.upsert_document(*make_doc("a.md", 3, 1))
        w.add_artifact("bm25", lambda p: p.write_text("g1"))
        w.add_artifact("graph", lambda p: (p.mkdir(), (p / "part").write_text("d1")))
    assert store.artifact_path("bm25") == tmp_path / "ix" / "bm25-1"
    assert reader.generation == 0 and reader.artifact_path("bm25") is None and len(reader.vector_index) == 0
    assert reader.refresh() and reader.generation == 1 and len(reader.vector_index) == 3
    assert not reader.refresh()
    assert reader.artifact_path("bm25").read_text() == "g1"  # type: ignore[union-attr]

    with store.writer() as w:
        w.set_state("stage", 2)
        w.add_artifact("bm25", lambda p: p.write_text("g2"))
    # graph was not rewritten: carried over; generation 0's files are gone, 1 is kept for readers
    assert (store.artifact_path("graph") / "part").read_text() == "d1"  # type: ignore[operator]
    assert files(tmp_path / "ix") == [
        "bm25-1",
        "bm25-2",
        "embeddings.sqlite",
        "graph-1",
        "graph-2",
        "meta.sqlite",
        "vectors-1.faiss",
        "vectors-2.faiss",
        "write.lock",
    ]
    assert reader.artifact_path("bm25").read_text() == "g1"  # type: ignore[union-attr]
    with store.writer() as w:
        w.set_state("stage", 3)
    assert "bm25-1" not in files(tmp_path / "ix") and store.artifact_path("bm25").read_text() == "g2"  # type: ignore[union-attr]
    # a reader two generations behind finds its files gone and loads the newest generation
    assert reader.refresh() and reader.generation == 3 and reader.state("stage") == 3
    with store.writer() as w, pytest.raises(RAGConfigError):
        w.add_artifact("bad name", lambda p: None)


def test_failing_transaction_changes_nothing(tmp_path: Path) -> None:
    store = Store.create(tmp_path / "ix", settings={}, dim=DIM)
    with store.writer() as w:
        w.upsert_document(*make_doc("a.md", 3, 1))
        w.upsert_document(*make_doc("b.md", 2, 2))
        w.add_artifact("bm25", lambda p: p.write_text("g1"))
        w.set_state("stage", 1)
    before, listing = snapshot(store), files(tmp_path / "ix")

    with pytest.raises(KeyError), store.writer() as w:
        w.upsert_document(*make_doc("a.md", 5, 3))
        w.delete_document("b.md")
        w.set_state("stage", 2)
        raise KeyError("boom")
    assert snapshot(store) == before and files(tmp_path / "ix") == listing

    def failing_artifact(path: Path) -> None:
        path.write_text("partial")
        raise OSError("disk full")

    # failing at commit, after the vector index of the next generation was written
    with pytest.raises(OSError, match="disk full"), store.writer() as w:
        w.upsert_document(*make_doc("c.md", 2, 4))
        w.add_artifact("bm25", failing_artifact)
    assert snapshot(store) == before and files(tmp_path / "ix") == listing
    assert snapshot(Store.open(tmp_path / "ix")) == before
    # and the next transaction commits normally, without reusing anything
    with store.writer() as w:
        assert w.upsert_document(*make_doc("c.md", 1, 5)) == [6]
    assert store.generation == 2


def test_auto_kind_rebuild_and_vector_config(tmp_path: Path) -> None:
    config = VectorIndexConfig(kind="auto", exact_below=20, approximate="hnsw")
    store = Store.create(tmp_path / "ix", settings={}, dim=DIM, vector_config=config)
    with store.writer() as w:
        w.upsert_document(*make_doc("a.md", 15, 1))
    assert store.vector_index.kind == "flat"
    with store.writer() as w:
        w.upsert_document(*make_doc("b.md", 10, 2))
    assert store.vector_index.kind == "hnsw" and len(store.vector_index) == 25
    with store.writer() as w:
        w.set_vector_config(VectorIndexConfig(kind="flat"))
    reopened = Store.open(tmp_path / "ix")
    assert reopened.vector_config.kind == "flat" and reopened.vector_index.kind == "flat"
    assert sorted(reopened.vector_index.ids.tolist()) == list(range(1, 26))


# --- other processes: one writer, and SIGKILL at every commit stage --------------------------------

CHILD = textwrap.dedent(
    """
    import sys, threading
    from pathlib import Path
    import numpy as np
    sys.path.insert(0, {tests!r})
    from test_store import make_doc
    from lmstack.rag.store import Store
    from lmstack.rag.store import _store

    stage, index, marker = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])

    def block():
        marker.write_text("blocked")
        threading.Event().wait()  # until the parent kills us

    def after(name):
        original = getattr(_store.WriteTransaction, name)
        def wrapped(self, *args):
            result = original(self, *args)
            block()
            return result
        setattr(_store.WriteTransaction, name, wrapped)

    if stage == "hold":
        store = Store.open(index)
        with store.writer():
            block()

    store = Store.create(index, settings={{"embedder": "test"}}, dim={dim})
    with store.writer() as w:
        w.upsert_document(*make_doc("a.md", 4, 1))
        w.upsert_document(*make_doc("b.md", 3, 2))
        w.add_artifact("bm25", lambda p: p.write_text("g1"))
        w.set_state("stage", 1)

    if stage == "after_vectors":
        after("_save_vectors")
    elif stage == "after_artifacts":
        after("_write_artifacts")
    elif stage == "before_commit":
        original = _store.WriteTransaction._commit_rows
        def wrapped(self):
            block()
            original(self)
        _store.WriteTransaction._commit_rows = wrapped
    elif stage == "mid_upserts":
        calls = []
        original = _store.WriteTransaction.upsert_document
        def wrapped(self, *args):
            calls.append(1)
            result = original(self, *args)
            if len(calls) == 2:
                block()
            return result
        _store.WriteTransaction.upsert_document = wrapped

    with store.writer() as w:
        w.upsert_document(*make_doc("a.md", 6, 3))
        w.upsert_document(*make_doc("c.md", 5, 4))
        w.delete_document("b.md")
        w.add_artifact("bm25", lambda p: p.write_text("g2"))
        w.set_state("stage", 2)
    """
).format(tests=str(Path(__file__).parent), dim=DIM)


def spawn(tmp_path: Path, stage: str, index: Path) -> tuple[subprocess.Popen[bytes], Path]:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    marker = tmp_path / f"{stage}.marker"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(script), stage, str(index), str(marker)], env=env, stderr=subprocess.PIPE
    )
    return proc, marker


def wait_for(marker: Path, proc: subprocess.Popen[bytes], deadline_s: float = 120.0) -> None:
    end = time.monotonic() + deadline_s
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"child exited early: {proc.stderr.read().decode()[-3000:]}")  # type: ignore[union-attr]
        assert time.monotonic() < end, "child never reached its stage"
        time.sleep(0.02)


def kill(proc: subprocess.Popen[bytes]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def test_second_writer_in_another_process_is_locked_out(tmp_path: Path) -> None:
    index = tmp_path / "ix"
    Store.create(index, settings={}, dim=DIM).close()
    proc, marker = spawn(tmp_path, "hold", index)
    try:
        wait_for(marker, proc)
        store = Store.open(index)
        with pytest.raises(IndexLockedError, match=r"write\.lock"), store.writer(timeout_s=0.2):
            pass
    finally:
        kill(proc)
    with store.writer(timeout_s=30) as w:  # the OS released the dead holder's lock
        w.set_state("stage", "after")
    assert store.generation == 1 and Store.open(index).state("stage") == "after"


def test_sigkill_at_each_commit_stage_leaves_generation_1(tmp_path: Path) -> None:
    stages = ["mid_upserts", "after_vectors", "after_artifacts", "before_commit"]
    children = {s: spawn(tmp_path, s, tmp_path / s) for s in stages}  # in parallel: startup is slow
    try:
        for stage, (proc, marker) in children.items():
            index = tmp_path / stage
            wait_for(marker, proc)
            # while the writer is blocked, a reader sees generation 1, complete
            during = snapshot(Store.open(index))
            assert during["generation"] == 1 and during["state"] == 1 and during["artifact"] == "g1"
            assert set(during["documents"]) == {"a.md", "b.md"} and len(during["chunks"]) == 7
            kill(proc)
            store = Store.open(index)
            assert snapshot(store) == during, stage
            if stage == "after_vectors":
                assert "vectors-2.faiss" in files(index)  # the orphan a killed writer left
            if stage in ("after_artifacts", "before_commit"):
                assert "bm25-2" in files(index)
            # the next writer removes the orphans, then commits generation 2
            with store.writer(timeout_s=30) as w:
                assert not any(n.endswith("-2") or n == "vectors-2.faiss" for n in files(index)), stage
                assert not any(p.name.startswith(".") for p in index.iterdir())
                ids = w.upsert_document(*make_doc("d.md", 2, 5))
            assert ids[0] > max(during["chunks"])
            after = snapshot(Store.open(index))
            assert after["generation"] == 2 and set(after["documents"]) == {"a.md", "b.md", "d.md"}
            assert after["artifact"] == "g1"  # carried over
    finally:
        for proc, _ in children.values():
            if proc.poll() is None:
                kill(proc)
