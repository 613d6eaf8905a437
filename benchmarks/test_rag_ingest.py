"""Ingestion throughput of ``lmstack.rag.Index``: a full ingest, then an incremental one against a rebuild.

A generated corpus (``_rag_workload.write_corpus``: ``RAG_BENCH_FILES`` Markdown files, default 2,000, with
headings, paragraphs, lists and code, sized around ``RAG_BENCH_FILE_BYTES``, default 600, but never less than
a title and one paragraph: about 2.1 MB and 4,400 chunks by default, a few minutes on 2 CPU cores) is
ingested with the default embedder (all-MiniLM-L6-v2 through sentence-transformers, on the CPU) and the
default chunking. The embedder is wrapped so that every ``embed`` call is timed and its texts recorded. In
the same run:

* reading + chunking alone: ``discover``, ``read_document`` and ``chunk_document`` over the corpus with the
  embedder's token counter (what ingest does before embedding), timed by itself;
* a full ingest into a new index: its seconds, chunks/s and MB/s, split into embedding (the embed calls
  inside it), BM25 build + commit (from the end of the last embed call to the end of the ingest) and the rest
  (reading, chunking, hashing, rows);
* ``RAG_BENCH_EDIT_SHARE`` (default 1%) of the files edited (one paragraph each replaced), then an incremental
  re-ingest of the same folder into the same index: seconds and chunks re-embedded;
* the baseline: the edited corpus ingested from scratch into another new index (no embedding cache).

Asserted: the full ingest wrote the chunks that chunking alone produced and embedded each distinct text
once; the incremental ingest updated exactly the edited files and embedded exactly their new chunk texts
(those that were not in the corpus before); the incremental index and the rebuilt one hold the same chunks.
The speed-up of the incremental ingest over the rebuild is reported.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import _rag_workload as wl

from lmstack.rag import Index
from lmstack.rag.embed import SentenceTransformerEmbedder
from lmstack.rag.ingest import ChunkingConfig, chunk_document, discover, read_document

FILES = int(os.environ.get("RAG_BENCH_FILES", "2000"))
FILE_BYTES = int(os.environ.get("RAG_BENCH_FILE_BYTES", "600"))
EDIT_SHARE = float(os.environ.get("RAG_BENCH_EDIT_SHARE", "0.01"))


def _read_and_chunk(folder: Path, counter: Any) -> tuple[dict[str, list[str]], float]:
    """Every source's chunk texts, as ingest would cut them, and the seconds it took."""
    start = time.perf_counter()
    config = ChunkingConfig()
    texts = {}
    for path, source in discover([folder]):
        texts[source] = [c.text for c in chunk_document(read_document(path, source=source), config, counter)]
    return texts, time.perf_counter() - start


def _chunks_of(index: Index) -> set[tuple[str, int, str]]:
    return {(c.source, c.ordinal, c.text) for _, c in index.store.iter_chunks()}


@pytest.mark.benchmark
def test_rag_ingest_throughput(benchmark: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    corpus = tmp_path / "corpus"
    size = wl.write_corpus(corpus, FILES, FILE_BYTES)
    embedder = wl.TimedEmbedder(SentenceTransformerEmbedder(use_tqdm=False))
    counter = embedder.tokenizer_counter()
    out: dict[str, Any] = {}

    def run() -> None:
        out["chunks"], out["chunk_s"] = _read_and_chunk(corpus, counter)
        index = Index.create(tmp_path / "index", embedder=embedder)  # loads the model (not timed)
        embedder.reset()
        out["full"] = index.ingest(corpus, use_tqdm=False)
        out["full_embed_s"], out["full_tail_s"] = embedder.seconds, time.perf_counter() - embedder.last_end
        out["full_texts"] = list(embedder.texts)

        out["edited"] = wl.edit_files(corpus, EDIT_SHARE)
        embedder.reset()
        out["incremental"] = index.ingest(corpus, use_tqdm=False)
        out["incremental_embed_s"], out["incremental_texts"] = embedder.seconds, list(embedder.texts)
        out["incremental_chunks"] = _chunks_of(index)
        index.close()

        rebuilt = Index.create(tmp_path / "rebuilt", embedder=embedder)
        embedder.reset()
        out["rebuild"] = rebuilt.ingest(corpus, use_tqdm=False)
        out["rebuild_embed_s"] = embedder.seconds
        out["rebuilt_chunks"] = _chunks_of(rebuilt)
        rebuilt.close()

    load_before = os.getloadavg()[0]
    benchmark.pedantic(run, rounds=1, iterations=1)
    load_after = os.getloadavg()[0]

    full, incremental, rebuild = out["full"], out["incremental"], out["rebuild"]
    chunks: dict[str, list[str]] = out["chunks"]
    num_chunks = sum(len(t) for t in chunks.values())
    mb = size / 1e6
    rest_s = full.seconds - out["full_embed_s"] - out["full_tail_s"]
    # What the incremental ingest must embed: the edited files' chunk texts that the corpus did not have.
    edited_sources = sorted(f"{corpus.name}/{p.relative_to(corpus).as_posix()}" for p in out["edited"])
    after, _ = _read_and_chunk(corpus, counter)
    before_texts = {t for texts in chunks.values() for t in texts}
    expected = {t for s in edited_sources for t in after[s]} - before_texts
    speedup = rebuild.seconds / incremental.seconds

    lines = [
        f"corpus: {len(chunks)} Markdown files, {mb:.2f} MB, {num_chunks} chunks (default chunking, MiniLM "
        f"tokens); embedder all-MiniLM-L6-v2 on the CPU; {os.cpu_count()} CPUs, load average "
        f"{load_before:.1f} -> {load_after:.1f}",
        f"{'stage':<44} {'seconds':>8} {'chunks/s':>9} {'MB/s':>7}",
        f"{'read + chunk alone (discover, read, chunk)':<44} {out['chunk_s']:8.2f} "
        f"{num_chunks / out['chunk_s']:9.0f} {mb / out['chunk_s']:7.2f}",
        f"{'full ingest':<44} {full.seconds:8.2f} {full.chunks_added / full.seconds:9.1f} "
        f"{mb / full.seconds:7.3f}",
        f"{'  of which embedding':<44} {out['full_embed_s']:8.2f} {full.embedded / out['full_embed_s']:9.1f}",
        f"{'  of which BM25 build + commit':<44} {out['full_tail_s']:8.2f}",
        f"{'  of which reading, chunking, hashing, rows':<44} {rest_s:8.2f}",
        f"incremental re-ingest after editing {len(edited_sources)} files ({EDIT_SHARE:.0%}): "
        f"{incremental.seconds:.2f} s, {incremental.embedded} chunks re-embedded "
        f"({out['incremental_embed_s']:.2f} s embedding), {incremental.chunks_added} chunks written, "
        f"{incremental.chunks_removed} removed",
        f"baseline, rebuilding from scratch: {rebuild.seconds:.2f} s ({rebuild.embedded} embedded, "
        f"{out['rebuild_embed_s']:.2f} s embedding); incremental speed-up {speedup:.1f}x",
    ]
    print("\n" + "\n".join(lines))
    benchmark.extra_info.update(
        {
            "files": len(chunks), "megabytes": round(mb, 3), "chunks": num_chunks,
            "read_chunk_s": round(out["chunk_s"], 2), "full_s": round(full.seconds, 2),
            "full_chunks_per_s": round(full.chunks_added / full.seconds, 1),
            "full_mb_per_s": round(mb / full.seconds, 4), "full_embed_s": round(out["full_embed_s"], 2),
            "full_commit_s": round(out["full_tail_s"], 2), "full_rest_s": round(rest_s, 2),
            "edited_files": len(edited_sources), "incremental_s": round(incremental.seconds, 2),
            "incremental_embedded": incremental.embedded, "rebuild_s": round(rebuild.seconds, 2),
            "incremental_speedup": round(speedup, 1),
        }
    )  # fmt: skip

    assert not full.skipped and not rebuild.skipped, (full.skipped, rebuild.skipped)
    assert full.chunks_added == num_chunks and len(full.added) == FILES
    assert full.embedded == len(out["full_texts"]) == len(before_texts)
    assert sorted(incremental.updated) == edited_sources and not incremental.added and not incremental.deleted
    assert len(incremental.unchanged) == FILES - len(edited_sources)
    assert incremental.embedded == len(out["incremental_texts"])
    assert set(out["incremental_texts"]) == expected and len(out["incremental_texts"]) == len(expected)
    assert out["incremental_chunks"] == out["rebuilt_chunks"]
