"""`lmstack rag serve`'s HTTP API on a real uvicorn server: auth, search, answers (JSON and SSE), ingestion,
OpenAI embeddings and errors, checked against the index, the assistant and the embedder called directly."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import threading
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import filelock
import httpx
import numpy as np
import openai
import pytest

from lmstack.infer import LLM, CompletionOutput, RequestOutput, SamplingParams
from lmstack.rag._index import Index
from lmstack.rag.answer import Assistant
from lmstack.rag.server import RagServerConfig, create_app, running

os.environ.setdefault("HF_HUB_OFFLINE", "1")

KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SCRIPT = "The Zephyr-9 battery lasts 42 minutes [1]. A full charge takes 90 minutes [2][9]."
CLEAN = "The Zephyr-9 battery lasts 42 minutes [1]. A full charge takes 90 minutes [2]."

DOCS = {
    "battery.md": "# Battery\n\nThe Zephyr-9 drone battery lasts 42 minutes of flight on a full charge. "
    "Charging the battery from empty takes 90 minutes with the bundled charger.",
    "modes.md": "# Flight modes\n\nThe Zephyr-9 has three flight modes: cinematic, sport and follow-me. "
    "Sport mode raises the top speed of the drone to 72 km/h.",
    "firmware.md": "# Firmware\n\nUpdate the Zephyr-9 firmware from the Skyward app: connect the drone, open "
    "Settings and press Update. An update takes about five minutes.",
    "warranty.md": "# Warranty\n\nEvery Zephyr-9 drone has a two-year warranty covering motor and battery "
    "defects. "
    "Crash damage is covered by the optional SkyCare plan.",
}
RELATED = [
    "How long does the Zephyr-9 battery last?",
    "How long does it take to charge the drone battery?",
    "What flight modes does the Zephyr-9 have?",
    "What is the top speed of the drone in sport mode?",
    "How do I update the Zephyr-9 firmware?",
    "How long does a firmware update take?",
    "What does the Zephyr-9 warranty cover?",
    "Is crash damage covered for the drone?",
]
UNRELATED = [
    "What is a good recipe for banana bread?",
    "Who won the football world cup in 1998?",
    "How do I knit a wool scarf?",
    "What is the capital of Peru?",
    "Recommend a romantic comedy movie",
    "How many bones are in the human hand?",
    "What time does the bakery open on Sunday?",
    "Tell me a joke about cats",
]


class ScriptedLLM:
    """Answers every chat with SCRIPT (LLMProtocol's chat and stream; the rest is not needed here).

    ``hang`` makes the stream stop after its first piece until it is cancelled; ``closed`` is set when the
    stream ends for any reason, so a test can see that a disconnect cancelled the model request."""

    def __init__(self, hang: bool = False) -> None:
        self.hang = hang
        self.closed = threading.Event()
        self.messages: list[Sequence[Mapping[str, Any]]] = []

    @property
    def tokenizer(self) -> Any:
        raise NotImplementedError

    @staticmethod
    def _output(text: str, done: bool) -> RequestOutput:
        finish = "stop" if done else None
        return RequestOutput(
            "scripted", None, [], [CompletionOutput(0, text, finish_reason=finish)], finished=done
        )

    def chat(self, messages: Any, sampling_params: SamplingParams | None = None) -> list[RequestOutput]:
        self.messages.append(messages)
        return [self._output(SCRIPT, True)]

    async def stream(
        self, prompt: Any, sampling_params: SamplingParams | None = None
    ) -> AsyncIterator[RequestOutput]:
        self.messages.append(prompt)
        pieces = [SCRIPT[i : i + 7] for i in range(0, len(SCRIPT), 7)]
        try:
            for n, piece in enumerate(pieces):
                yield self._output(piece, n == len(pieces) - 1)
                if self.hang:
                    await asyncio.Event().wait()  # until the request is cancelled
        finally:
            self.closed.set()

    def generate(self, *args: Any, **kwargs: Any) -> list[RequestOutput]:
        raise NotImplementedError

    def loglikelihood(self, *args: Any, **kwargs: Any) -> list[tuple[float, bool]]:
        raise NotImplementedError

    def loglikelihood_rolling(self, *args: Any, **kwargs: Any) -> list[float]:
        raise NotImplementedError


@pytest.fixture(scope="module")
def index(calibrated_index: Any) -> Index:
    return calibrated_index("docs", DOCS, RELATED, UNRELATED)


@pytest.fixture(scope="module")
def llm() -> ScriptedLLM:
    return ScriptedLLM()


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("roots")
    inside, outside = base / "allowed", base / "outside"
    inside.mkdir()
    outside.mkdir()
    (inside / "glossary.md").write_text(
        "# Glossary\n\nA rotor guard is a plastic ring that protects propellers."
    )
    (outside / "secret.md").write_text("# Secret\n\nThe vault code is 1234.")
    return {"inside": inside, "outside": outside}


@pytest.fixture(scope="module")
def server(index: Index, llm: ScriptedLLM, roots: dict[str, Path]) -> Iterator[str]:
    config = RagServerConfig(api_keys=[KEY], ingest_roots=[roots["inside"]])
    with running(create_app(index, Assistant(index, llm, k=4), config)) as url:
        yield url


@pytest.fixture
def client(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, headers=AUTH, timeout=60) as c:
        yield c


def sse_events(response: httpx.Response) -> list[tuple[str, Any]]:
    """(event, data) of each server-sent event; ``("", "[DONE]")`` for the terminator."""
    events, name = [], ""
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[len("event: ") :]
        elif line.startswith("data: "):
            data = line[len("data: ") :]
            events.append((name, data if data == "[DONE]" else json.loads(data)))
            name = ""
    return events


def test_health(index: Index, client: httpx.Client, server: str) -> None:
    body = httpx.get(f"{server}/health").json()  # no key needed
    assert body == {
        "status": "ok",
        "documents": len(index.documents()),
        "chunks": len(index),
        "generation": index.store.generation,
        "calibrated": True,
    }
    assert body["documents"] >= len(DOCS)


def test_auth(server: str) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for method, path in (("POST", "/search"), ("POST", "/query"), ("GET", "/v1/models")):
            r = httpx.request(
                method, f"{server}{path}", headers=headers, json={"query": "x", "question": "x"}
            )
            assert r.status_code == 401, (headers, path)
            error = r.json()["error"]
            assert error["type"] == "authentication_error" and error["message"]
            assert r.headers["www-authenticate"] == "Bearer"
    assert httpx.post(f"{server}/search", headers=AUTH, json={"query": "battery"}).status_code == 200


def test_search_equals_index_search(index: Index, client: httpx.Client) -> None:
    for query, mode in (("How long does the battery last?", "hybrid"), ("sport mode speed", "bm25")):
        body = client.post("/search", json={"query": query, "k": 3, "mode": mode}).json()
        expected = index.retrieve(query, 3, mode=mode)
        assert [(h["source"], h["text"]) for h in body["hits"]] == [(h.source, h.text) for h in expected.hits]
        assert [h["score"] for h in body["hits"]] == pytest.approx([h.score for h in expected.hits])
        assert [h["metadata"]["chunk_id"] for h in body["hits"]] == [h.chunk_id for h in expected.hits]
        assert body["relevant"] == expected.relevant
        assert body["probability"] == pytest.approx(expected.probability)
    filtered = client.post(
        "/search", json={"query": "drone", "k": 5, "filters": {"source": "*warranty.md"}}
    ).json()
    assert {h["source"] for h in filtered["hits"]} == {"docs/warranty.md"}


def test_query_json(index: Index, client: httpx.Client) -> None:
    question = RELATED[0]
    body = client.post("/query", json={"question": question}).json()
    assert body["answer"] == CLEAN  # the citation of passage 9, never shown, is removed
    assert body["refused"] is False and body["reason"] is None
    assert [c["number"] for c in body["citations"]] == [1, 2]
    hits = index.search(question, 4)
    assert [p["source"] for p in body["passages"]] == [h.source for h in hits]
    assert body["citations"][0]["source"] == hits[0].source
    fewer = client.post("/query", json={"question": question, "k": 2}).json()
    assert len(fewer["passages"]) == 2


def test_query_stream(client: httpx.Client) -> None:
    question = RELATED[1]
    whole = client.post("/query", json={"question": question}).json()
    with client.stream("POST", "/query", json={"question": question, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    names = [name for name, _ in events]
    assert names[0] == "passages" and names[-2:] == ["done", ""] and events[-1][1] == "[DONE]"
    assert set(names[1:-2]) == {"delta"} and len(names) > 5
    assert [p["source"] for p in events[0][1]["passages"]] == [p["source"] for p in whole["passages"]]
    assert "".join(data["text"] for name, data in events if name == "delta") == CLEAN
    assert events[-2][1] == whole


def test_query_refusal_stream_starts_with_passages(client: httpx.Client, index: Index) -> None:
    question = UNRELATED[0]
    assert not index.retrieve(question, 4).relevant  # the gate's own verdict, the reference
    with client.stream("POST", "/query", json={"question": question, "stream": True}) as r:
        events = sse_events(r)
    assert [name for name, _ in events] == ["passages", "delta", "done", ""]
    assert events[0][1]["passages"] == [] and events[2][1]["reason"] == "unrelated"


def test_stream_disconnect_cancels_the_model(index: Index) -> None:
    hanging = ScriptedLLM(hang=True)
    with (
        running(create_app(index, Assistant(index, hanging))) as url,
        httpx.Client(base_url=url, timeout=60) as c,
    ):
        with c.stream("POST", "/query", json={"question": RELATED[2], "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("event: delta"):
                    break  # the model is now waiting inside its stream; hang up
        assert hanging.closed.wait(30)


def test_query_without_model(index: Index) -> None:
    with running(create_app(index)) as url:
        r = httpx.post(f"{url}/query", json={"question": "anything"})
        assert r.status_code == 400 and "--model" in r.json()["error"]["message"]
        assert httpx.post(f"{url}/search", json={"query": "battery"}).status_code == 200  # no key configured


def test_errors(client: httpx.Client) -> None:
    r = client.post("/search", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = client.post("/search", json={"query": "x", "k": 0, "mode": "fuzzy"})
    error = r.json()["error"]
    assert r.status_code == 422 and error["param"] == "k"
    assert "k:" in error["message"] and "mode:" in error["message"]
    r = client.post("/search", json={"query": "x", "filters": {"page": {"near": 3}}})
    assert r.status_code == 400 and "Traceback" not in r.text
    r = client.get("/nowhere")
    assert r.status_code == 404 and "/search" in r.json()["error"]["message"]
    assert client.get("/search").status_code == 405


def test_ingest_upload_then_search(index: Index, client: httpx.Client) -> None:
    text = b"# Glimmerwort tea\n\nBrew glimmerwort leaves for seven minutes in water at 80 degrees."
    files = [("files", ("../../sneaky name?.md", text, "text/markdown"))]
    report = client.post("/ingest", files=files).json()
    assert report["added"] == ["uploads/sneaky name_.md"] and report["chunks_added"] >= 1
    assert (index.path / "uploads" / "sneaky name_.md").read_bytes() == text
    hits = client.post("/search", json={"query": "how long to brew glimmerwort tea", "k": 1}).json()["hits"]
    assert hits[0]["source"] == "uploads/sneaky name_.md"
    assert client.get("/health").json()["generation"] == report["generation"]


def test_ingest_paths_inside_and_outside_roots(
    index: Index, client: httpx.Client, roots: dict[str, Path]
) -> None:
    report = client.post("/ingest", json={"paths": [str(roots["inside"])]}).json()
    assert report["added"] == ["allowed/glossary.md"]
    r = client.post("/ingest", json={"paths": [str(roots["outside"] / "secret.md")]})
    assert r.status_code == 403 and str(roots["outside"] / "secret.md") in r.json()["error"]["message"]
    link = roots["inside"] / "escape"
    link.symlink_to(roots["outside"], target_is_directory=True)
    try:
        r = client.post("/ingest", json={"paths": [str(link)]})
        assert r.status_code == 403 and r.json()["error"]["code"] == "outside_roots"
    finally:
        link.unlink()
    assert client.post("/ingest", json={"paths": [str(roots["inside"] / "nope.md")]}).status_code == 404
    assert "docs/secret.md" not in index.documents() and not any("secret" in d for d in index.documents())


def test_ingest_limits_and_lock(index: Index, tmp_path: Path) -> None:
    config = RagServerConfig(max_upload_bytes=2000, ingest_lock_timeout_s=0.2)
    with running(create_app(index, config=config)) as url:
        big = [("files", ("big.md", b"# Big\n\n" + b"word " * 1000, "text/markdown"))]
        r = httpx.post(f"{url}/ingest", files=big)
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
        assert not (index.path / "uploads" / "big.md").exists()
        small = [("files", ("small.md", b"# Small\n\nA small note about rotor guards.", "text/markdown"))]
        with filelock.FileLock(str(index.path / "write.lock")):  # another writer holds the index
            r = httpx.post(f"{url}/ingest", files=small)
        assert r.status_code == 409 and "another process" in r.json()["error"]["message"]
    with running(create_app(index, config=RagServerConfig(ingest_enabled=False))) as url:
        assert httpx.post(f"{url}/ingest", files=small).status_code == 403


def test_embeddings_with_openai_client(index: Index, server: str) -> None:
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY)
    texts = ["How long does the battery last?", "sport mode", "数据"]
    expected = index.embedder.embed(texts)
    as_floats = client.embeddings.create(model="anything", input=texts, encoding_format="float")
    assert [d.index for d in as_floats.data] == [0, 1, 2]
    assert np.array_equal(np.asarray([d.embedding for d in as_floats.data], dtype=np.float32), expected)
    assert as_floats.model == client.models.list().data[0].id
    assert as_floats.usage.prompt_tokens > 0 and as_floats.usage.total_tokens == as_floats.usage.prompt_tokens
    alone = index.embedder.embed(texts[:1])[0]  # batching moves the last bits: compare like with like
    as_base64 = client.embeddings.create(model="anything", input=texts[0])  # the client asks for base64
    assert np.array_equal(np.asarray(as_base64.data[0].embedding, dtype=np.float32), alone)
    raw = httpx.post(f"{server}/v1/embeddings", headers=AUTH,
                     json={"input": texts[:1], "encoding_format": "base64"}).json()  # fmt: skip
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert np.array_equal(decoded, alone)
    same_dim = client.embeddings.create(
        model="x", input="a", dimensions=index.embedder.dim, encoding_format="float"
    )
    assert len(same_dim.data[0].embedding) == index.embedder.dim
    for bad in ({"dimensions": 64}, {"input": [[1, 2, 3]]}, {"input": [5, 6]}, {"input": [""]},
                {"input": ["a"] * 2049}, {"encoding_format": "int8"}):  # fmt: skip
        with pytest.raises(openai.BadRequestError):
            client.embeddings.create(**{"model": "x", "input": "a", **bad})


def test_query_with_a_real_model(index: Index, tiny_model_dir: Path) -> None:
    llm = LLM(tiny_model_dir)
    try:
        assistant = Assistant(index, llm, k=2, sampling_params=SamplingParams(max_tokens=6, temperature=0.0))
        question = RELATED[4]
        with running(create_app(index, assistant)) as url:
            body = httpx.post(f"{url}/query", json={"question": question}, timeout=120).json()
            with httpx.stream(
                "POST", f"{url}/query", json={"question": question, "stream": True}, timeout=120
            ) as r:
                events = sse_events(r)
        reference = assistant.ask(question)  # the same greedy generation, called directly
        assert body == reference.to_dict()
        assert body["answer"] and [p["source"] for p in body["passages"]] == [
            h.source for h in index.search(question, 2)
        ]
        assert events[-2] == ("done", body) and events[-1][1] == "[DONE]"
        assert "".join(data["text"] for name, data in events if name == "delta") == body["answer"]
    finally:
        llm.close()
