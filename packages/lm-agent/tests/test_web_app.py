"""The web app over real HTTP on loopback (uvicorn, httpx): the page, SSE events in order, errors, cancels."""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from graph_script import FINAL, QUESTION, scripted_llm, write_corpus

from lmstack.agent.graph import EVENT_SCHEMA_VERSION, EVENT_TYPES, AgentEvent, GraphSearchAgent
from lmstack.agent.tools import LocalSearchServer, SearxNGSearch
from lmstack.agent.web import create_app, running

SCRIPT = [
    AgentEvent("start", {"question": "q"}, 0.0),
    AgentEvent("node_added", {"name": "a", "question": "qa", "parents": []}, 0.1),
    AgentEvent("node_added", {"name": "b", "question": "qb", "parents": ["a"]}, 0.1),
    AgentEvent(
        "node_answer",
        {"node": "a", "answer": "A [[1]]", "citations": [{"n": 1, "url": "u", "title": "t"}]},
        0.2,
    ),
    AgentEvent("answer_delta", {"text": "Ünïcode\nline [1]"}, 0.3),
    AgentEvent(
        "final_answer",
        {"answer": "Ünïcode\nline [1]", "references": [{"n": 1, "url": "u", "title": "t"}]},
        0.3,
    ),
    AgentEvent("done", {"seconds": 0.4}, 0.4),
]


class FakeAgent:
    """Yields ``events`` and then does what ``then`` does (raise, or wait until cancelled)."""

    def __init__(self, events: list[AgentEvent], then: Callable[[], Any] | None = None) -> None:
        self.events = events
        self.then = then
        self.questions: list[str] = []
        self.closed = threading.Event()
        self.cancelled = threading.Event()

    async def astream(self, question: str) -> AsyncIterator[AgentEvent]:
        self.questions.append(question)
        try:
            for event in self.events:
                yield event
            if self.then is not None:
                await self.then()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        finally:
            self.closed.set()


def read_sse(
    response: httpx.Response, on_comment: Callable[[str], None] | None = None
) -> Iterator[dict[str, Any]]:
    """An independent SSE reader: events are blank-line separated, data lines joined, comments skipped."""
    data: list[str] = []
    for line in response.iter_lines():
        if line == "":
            if data:
                yield json.loads("\n".join(data))
                data = []
        elif line.startswith(":"):
            if on_comment is not None:
                on_comment(line)
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    assert not data, "the stream ended inside an event"


@pytest.fixture
def serve_agent() -> Iterator[Callable[..., str]]:
    stack: list[Any] = []

    def start(factory: Callable[[], Any], **options: Any) -> str:
        context = running(create_app(factory, **options))
        stack.append(context)
        return context.__enter__()

    yield start
    for context in reversed(stack):
        context.__exit__(None, None, None)


def test_page_is_served_and_speaks_the_schema_version(serve_agent: Callable[..., str]) -> None:
    url = serve_agent(lambda: FakeAgent([]))
    page = httpx.get(url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    match = re.search(r"const SCHEMA_VERSION = (\d+);", page.text)
    assert match is not None and int(match.group(1)) == EVENT_SCHEMA_VERSION
    # the page handles every event type of the schema
    for event_type in EVENT_TYPES:
        assert re.search(rf"\b{event_type}\(ev\)", page.text), event_type
    assert httpx.get(url + "/api/health").json() == {
        "status": "ok",
        "event_schema_version": EVENT_SCHEMA_VERSION,
    }


def test_search_streams_every_event_in_order(serve_agent: Callable[..., str]) -> None:
    agent = FakeAgent(SCRIPT)
    url = serve_agent(lambda: agent)
    with httpx.stream("GET", url + "/api/search", params={"q": "  what is q?  "}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        got = list(read_sse(response))
    assert got == [event.to_json() for event in SCRIPT]
    assert got[0]["v"] == EVENT_SCHEMA_VERSION
    assert agent.questions == ["what is q?"]


@pytest.mark.parametrize("where", ["agent", "factory"])
def test_a_failing_search_ends_with_error_then_done(serve_agent: Callable[..., str], where: str) -> None:
    async def boom() -> None:
        raise RuntimeError("the model fell over")

    if where == "agent":
        url = serve_agent(lambda: FakeAgent(SCRIPT[:2], then=boom))
    else:
        url = serve_agent(lambda: (_ for _ in ()).throw(RuntimeError("the model fell over")))
    with httpx.stream("GET", url + "/api/search", params={"q": "q"}) as response:
        got = list(read_sse(response))
    expected_head = [e.to_json() for e in SCRIPT[:2]] if where == "agent" else []
    assert got[: len(expected_head)] == expected_head
    error, done = got[len(expected_head) :]
    assert error["type"] == "error" and error["message"] == "RuntimeError: the model fell over"
    assert done["type"] == "done" and done["seconds"] >= 0
    assert error["v"] == done["v"] == EVENT_SCHEMA_VERSION


def test_bad_questions_are_refused(serve_agent: Callable[..., str]) -> None:
    url = serve_agent(lambda: FakeAgent(SCRIPT))
    for params in ({}, {"q": "   "}, {"q": "x" * 4001}):
        reply = httpx.get(url + "/api/search", params=params)
        assert reply.status_code == 400, params
        assert reply.json()["error"]["param"] == "q"


def test_disconnect_cancels_the_search(serve_agent: Callable[..., str]) -> None:
    async def forever() -> None:
        await asyncio.Event().wait()  # a model that never answers

    agent = FakeAgent(SCRIPT[:1], then=forever)
    url = serve_agent(lambda: agent)
    with httpx.stream("GET", url + "/api/search", params={"q": "q"}) as response:
        first = next(read_sse(response))
        assert first["type"] == "start"
    # the client has gone: the search, idle inside the model call, is cancelled and its generator closed
    assert agent.cancelled.wait(10) and agent.closed.wait(10)


def test_keepalive_comments_while_the_search_is_quiet(serve_agent: Callable[..., str]) -> None:
    release = threading.Event()

    async def quiet() -> None:
        while not release.is_set():
            await asyncio.sleep(0.005)

    url = serve_agent(lambda: FakeAgent(SCRIPT[:1], then=quiet), keepalive_s=0.02)
    comments: list[str] = []

    def on_comment(line: str) -> None:
        comments.append(line)
        release.set()

    with httpx.stream("GET", url + "/api/search", params={"q": "q"}) as response:
        got = list(read_sse(response, on_comment))
    assert comments and comments[0] == ": keep-alive"
    assert got == [SCRIPT[0].to_json()]


def test_a_real_graph_search_through_the_app(serve_agent: Callable[..., str], tmp_path: Path) -> None:
    with LocalSearchServer(write_corpus(tmp_path / "docs")) as local:
        pages = f"{local.url}/pages"
        llm = scripted_llm()
        url = serve_agent(lambda: GraphSearchAgent(llm, SearxNGSearch(local.url)))
        with httpx.stream("GET", url + "/api/search", params={"q": QUESTION}, timeout=60) as response:
            events = list(read_sse(response))
    types = [e["type"] for e in events]
    assert types[0] == "start" and types[-2:] == ["final_answer", "done"]
    assert all(e["v"] == EVENT_SCHEMA_VERSION for e in events)
    assert [e["name"] for e in events if e["type"] == "node_added"] == ["kadadell_river", "velm_sea"]
    index = {(e["type"], e.get("name", e.get("node"))): i for i, e in enumerate(events)}
    # the child node starts only after its parent answered
    assert index[("node_answer", "kadadell_river")] < index[("node_started", "velm_sea")]
    final = events[-2]
    assert final["answer"] == FINAL.replace("[[", "[").replace("]]", "]")
    read = {e["url"] for e in events if e["type"] == "page_read"}
    assert [r["url"] for r in final["references"]] == [f"{pages}/kadadell", f"{pages}/velm"]
    assert {r["url"] for r in final["references"]} <= read


def test_disconnect_cancels_under_asgi_spec_2_4() -> None:
    # Servers speaking ASGI 2.4 (where Starlette only notices a departed client when a write fails) must
    # cancel an idle search too: drive the app as such a server would.
    async def forever() -> None:
        await asyncio.Event().wait()

    agent = FakeAgent(SCRIPT[:1], then=forever)
    app = create_app(lambda: agent)
    sent: list[dict[str, Any]] = []

    async def main() -> None:
        first_body = asyncio.Event()
        requests = iter([{"type": "http.request", "body": b"", "more_body": False}])

        async def receive() -> dict[str, Any]:
            message = next(requests, None)
            if message is not None:
                return message
            await first_body.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)
            if message["type"] == "http.response.body" and message.get("body"):
                first_body.set()

        scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
            "method": "GET", "scheme": "http", "path": "/api/search", "raw_path": b"/api/search",
            "query_string": b"q=hello", "root_path": "", "headers": [], "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 80),
        }  # fmt: skip
        await asyncio.wait_for(app(scope, receive, send), 10)

    asyncio.run(main())
    assert agent.cancelled.is_set() and agent.closed.is_set()
    assert sent[0]["status"] == 200
    assert sent[1]["body"].decode() == f"data: {json.dumps(SCRIPT[0].to_json())}\n\n"
