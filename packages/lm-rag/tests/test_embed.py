"""Embedders against sentence-transformers called directly, and a real OpenAI-compatible HTTP server."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sentence_transformers import SentenceTransformer

from lmstack.rag import EmbeddingError, RAGConfigError
from lmstack.rag.embed import (
    Embedder,
    EmbeddingCache,
    OpenAIEmbedder,
    SentenceTransformerEmbedder,
    default_embedding_model_path,
    embed_with_cache,
    load_embedder,
)

os.environ["HF_HUB_OFFLINE"] = "1"


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


TEXTS = ["The cat sat on the mat.", "Faiss searches vectors.", "", "Ünïcödé text — with dashes", "a " * 400]


@pytest.fixture(scope="module")
def reference() -> SentenceTransformer:
    return SentenceTransformer(str(default_embedding_model_path()), device="cpu")


@pytest.fixture(scope="module")
def embedder() -> SentenceTransformerEmbedder:
    return SentenceTransformerEmbedder(device="cpu", batch_size=2)


def test_sentence_transformer_matches_direct_call(
    embedder: SentenceTransformerEmbedder, reference: SentenceTransformer
) -> None:
    assert isinstance(embedder, Embedder)
    got = embedder.embed(TEXTS)
    ref = reference.encode(TEXTS, normalize_embeddings=True)
    assert got.dtype == np.float32 and got.shape == (len(TEXTS), 384) and embedder.dim == 384
    np.testing.assert_allclose(got, ref, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert embedder.embed([]).shape == (0, 384)
    assert embedder.max_tokens == 256
    count = embedder.tokenizer_counter()
    assert (
        count("hello world")
        == 2
        == len(reference.tokenizer("hello world", add_special_tokens=False)["input_ids"])
    )


def test_prefixes_are_applied_and_fingerprinted(
    embedder: SentenceTransformerEmbedder, reference: SentenceTransformer
) -> None:
    prefixed = SentenceTransformerEmbedder(device="cpu", query_prefix="query: ", document_prefix="passage: ")
    prefixed._model = embedder.model  # same weights, no second load
    np.testing.assert_allclose(
        prefixed.embed(["x"], is_query=True),
        reference.encode(["query: x"], normalize_embeddings=True),
        atol=1e-5,
    )
    np.testing.assert_allclose(
        prefixed.embed(["x"]), reference.encode(["passage: x"], normalize_embeddings=True), atol=1e-5
    )
    assert prefixed.fingerprint != embedder.fingerprint


def test_fingerprint_stable_across_copies(tmp_path: Path, embedder: SentenceTransformerEmbedder) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(default_embedding_model_path(), copy)
    assert SentenceTransformerEmbedder(copy).fingerprint == embedder.fingerprint
    assert embedder.fingerprint.startswith("st:")
    config = copy / "1_Pooling" / "config.json"
    config.write_text(config.read_text().replace("true", "false", 1))
    assert SentenceTransformerEmbedder(copy).fingerprint != embedder.fingerprint
    with pytest.raises(EmbeddingError, match=str(tmp_path / "nowhere")):
        SentenceTransformerEmbedder(tmp_path / "nowhere")


def test_load_embedder(tmp_path: Path) -> None:
    assert isinstance(load_embedder(), SentenceTransformerEmbedder)
    assert load_embedder("default").fingerprint == load_embedder(default_embedding_model_path()).fingerprint
    with pytest.raises(RAGConfigError, match="--embed-model"):
        load_embedder("http://127.0.0.1:1/v1")
    with load_embedder("http://127.0.0.1:1/v1/", model="m", api_key="k") as remote:  # type: ignore[attr-defined]
        assert isinstance(remote, OpenAIEmbedder)
        assert remote.fingerprint == "openai:http://127.0.0.1:1/v1:m:None"
    with pytest.raises(EmbeddingError, match="nowhere"):
        load_embedder(tmp_path / "nowhere")


# --- a real OpenAI-compatible server on loopback -----------------------------------------------------


class Server:
    def __init__(self, model: SentenceTransformer) -> None:
        self.script: list[str] = []  # what the next requests do instead of answering: "500", "400", "short"
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        app = FastAPI()

        @app.post("/v1/embeddings")
        async def embeddings(request: Request) -> JSONResponse:
            body = await request.json()
            self.bodies.append(body)
            self.headers.append(dict(request.headers))
            action = self.script.pop(0) if self.script else ""
            if action == "500":
                return JSONResponse({"error": {"message": "overloaded"}}, status_code=500)
            if action == "400":
                return JSONResponse({"error": {"message": "input too long for model"}}, status_code=400)
            texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
            vectors = model.encode(texts, normalize_embeddings=False)
            data = [
                {"object": "embedding", "index": i, "embedding": v.tolist()} for i, v in enumerate(vectors)
            ]
            data.reverse()  # servers may answer out of order: clients sort by index
            if action == "short":
                data = data[1:]
            return JSONResponse(
                {
                    "object": "list",
                    "data": data,
                    "model": body["model"],
                    "usage": {"prompt_tokens": 1, "total_tokens": 1},
                }
            )

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(reference: SentenceTransformer) -> Iterator[Server]:
    srv = Server(reference)
    srv.start()
    yield srv
    srv.stop()


def test_openai_embedder_matches_local(server: Server, embedder: SentenceTransformerEmbedder) -> None:
    with OpenAIEmbedder(server.url + "/", "minilm", api_key="secret", batch_size=2) as remote:
        got = remote.embed(TEXTS)
        assert len(server.bodies) == 3  # 5 texts in batches of 2
        np.testing.assert_allclose(got, embedder.embed(TEXTS), atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
        assert server.bodies[0] == {"input": TEXTS[:2], "model": "minilm", "encoding_format": "float"}
        assert server.headers[0]["authorization"] == "Bearer secret"
        assert remote.dim == 384 and len(server.bodies) == 3  # learned from the reply: no probe
    server.bodies.clear()
    probe = OpenAIEmbedder(server.url, "minilm", dimensions=None)
    assert probe.dim == 384 and server.bodies[-1]["input"] == ["dim"]
    probe.close()
    fixed = OpenAIEmbedder(server.url, "minilm", dimensions=384)
    fixed.embed(["a"])
    assert server.bodies[-1]["dimensions"] == 384 and fixed.fingerprint == f"openai:{server.url}:minilm:384"
    fixed.close()


def test_official_openai_client_sends_the_same_shape(server: Server) -> None:
    server.bodies.clear()
    client = openai.OpenAI(base_url=server.url, api_key="secret", max_retries=0)
    result = client.embeddings.create(model="minilm", input=TEXTS[:2], encoding_format="float")
    official = server.bodies[-1]
    with OpenAIEmbedder(server.url, "minilm") as remote:
        ours_vectors = remote.embed(TEXTS[:2])
    assert set(server.bodies[-1]) == set(official) and server.bodies[-1] == official
    theirs = np.array([d.embedding for d in sorted(result.data, key=lambda d: d.index)], dtype=np.float32)
    np.testing.assert_allclose(
        ours_vectors, theirs / np.linalg.norm(theirs, axis=1, keepdims=True), atol=1e-6
    )


def test_openai_embedder_error_paths(server: Server) -> None:
    with OpenAIEmbedder(server.url, "minilm", max_retries=2) as remote:
        server.script[:] = ["500"]
        server.bodies.clear()
        assert remote.embed(["retried"]).shape == (1, 384)
        assert len(server.bodies) == 2  # the 500, then the success
        server.script[:] = ["400"]
        with pytest.raises(EmbeddingError, match=r"400.*input too long for model"):
            remote.embed(["bad"])
        server.script[:] = ["short"]
        with pytest.raises(EmbeddingError, match="1 embeddings for 2 inputs"):
            remote.embed(["one", "two"])
        server.script[:] = ["500", "500", "500"]
        with pytest.raises(EmbeddingError, match=r"500.*overloaded.*after 3 attempts"):
            remote.embed(["x"])
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    with (
        OpenAIEmbedder(f"http://127.0.0.1:{dead}/v1", "m", max_retries=1) as remote,
        pytest.raises(EmbeddingError, match="could not reach"),
    ):
        remote.embed(["x"])


def test_embedding_cache_and_embed_with_cache(tmp_path: Path, embedder: SentenceTransformerEmbedder) -> None:
    cache = EmbeddingCache(tmp_path / "emb.sqlite")
    texts = ["alpha", "beta", "alpha", "gamma"]
    vectors, embedded = embed_with_cache(embedder, texts, cache, batch_size=2)
    assert embedded == 3 and len(cache) == 3  # "alpha" twice, embedded once
    np.testing.assert_allclose(vectors, embedder.embed(texts), atol=1e-5)
    again, embedded = embed_with_cache(embedder, texts, cache)
    assert embedded == 0
    np.testing.assert_array_equal(again, vectors)
    changed = ["alpha", "beta", "alpha", "gamma!"]
    vectors2, embedded = embed_with_cache(embedder, changed, cache)
    assert embedded == 1 and len(cache) == 4
    np.testing.assert_allclose(vectors2[3], embedder.embed(["gamma!"])[0], atol=1e-5)
    # another embedder's vectors are separate; a reopened cache keeps everything (committed per put)
    cache.close()
    reopened = EmbeddingCache(tmp_path / "emb.sqlite")
    assert len(reopened) == 4
    assert reopened.get("other", [text_hash("alpha")]) == {}
    got = reopened.get(embedder.fingerprint, [text_hash("beta"), text_hash("nope")])
    assert set(got) == {text_hash("beta")}
    np.testing.assert_array_equal(got[text_hash("beta")], vectors[1])
    _, embedded = embed_with_cache(embedder, texts, None)
    assert embedded == 3
    reopened.close()
