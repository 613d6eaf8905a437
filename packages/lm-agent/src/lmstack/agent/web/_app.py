"""The graph search agent's web app: one page, and the search's events streamed as server-sent events.

``GET /`` serves the page (``static/index.html``: no build step, vanilla JS and SVG); ``GET
/api/search?q=...`` runs a new agent from ``agent_factory`` and streams each :class:`AgentEvent` as
``data: {json}`` lines. A client that goes away cancels its search at once, even while the search is
waiting on the model; a search that fails ends with an ``error`` event and a ``done`` event.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import json
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any

import uvicorn
from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from lmstack.agent._errors import AgentError
from lmstack.agent.graph import EVENT_SCHEMA_VERSION, AgentEvent

if TYPE_CHECKING:
    from lmstack.agent.graph import GraphSearchAgent

__all__ = ["create_app", "running", "serve"]

logger = logging.getLogger(__name__)

MAX_QUESTION_CHARS = 4000


def _page() -> str:
    return importlib.resources.files("lmstack.agent.web").joinpath("static/index.html").read_text("utf-8")


def _sse(payload: dict[str, Any]) -> str:
    # json.dumps never emits a raw newline, so one event is always one data line
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _agent_events(
    agent_factory: Callable[[], GraphSearchAgent], question: str, put: Callable[[dict[str, Any] | None], None]
) -> None:
    """Run one search, handing each event's JSON to ``put`` (then None); failures become error + done."""
    start = time.perf_counter()
    try:
        agent = agent_factory()
        events = agent.astream(question)
        try:
            async for event in events:
                put(event.to_json())
        finally:  # a cancelled search closes the agent's generator, which cancels its own tasks
            close = getattr(events, "aclose", None)
            if close is not None:
                await close()
    except Exception as exc:  # reported to the page, which shows it; the server goes on
        logger.warning("search for %r failed: %s: %s", question[:80], type(exc).__name__, exc)
        elapsed = time.perf_counter() - start
        put(AgentEvent("error", {"message": f"{type(exc).__name__}: {exc}"}, elapsed).to_json())
        put(AgentEvent("done", {"seconds": round(elapsed, 6)}, elapsed).to_json())
    finally:
        put(None)


async def _event_lines(
    agent_factory: Callable[[], GraphSearchAgent], question: str, keepalive_s: float
) -> AsyncIterator[str]:
    """The search's events as SSE lines, with a comment line whenever nothing happened for ``keepalive_s``.

    The search runs in its own task, so waiting for the next event can time out without disturbing it;
    closing this generator (the client left) cancels that task, and with it the search.
    """
    queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    search = asyncio.ensure_future(_agent_events(agent_factory, question, queue.put_nowait))
    getter: asyncio.Future[dict[str, Any] | None] | None = None
    try:
        while True:
            getter = getter or asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({getter}, timeout=keepalive_s)
            if not done:
                yield ": keep-alive\n\n"  # proxies and browsers keep an idle stream open
                continue
            payload, getter = getter.result(), None
            if payload is None:
                return
            yield _sse(payload)
    finally:
        for task in (search, getter):
            if task is not None:
                task.cancel()
        await asyncio.gather(search, *([getter] if getter else []), return_exceptions=True)


class _CancellingStream(StreamingResponse):
    """A streamed response that stops producing the moment the client disconnects.

    Starlette notices a departed client only when a write fails; a search may wait on the model for a
    long time between events, so the body's producer races a task that reads the disconnect message.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def disconnected() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        body = asyncio.ensure_future(self.stream_response(send))
        gone = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({body, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            body.cancel()
            gone.cancel()
            outcomes = await asyncio.gather(body, gone, return_exceptions=True)
        if isinstance(outcomes[0], Exception) and not isinstance(outcomes[0], OSError):
            raise outcomes[0]  # a bug, not a client that left mid-write


def create_app(agent_factory: Callable[[], GraphSearchAgent], *, keepalive_s: float = 15.0) -> FastAPI:
    """The web app: the search page and its event stream.

    Routes: ``GET /`` (the page), ``GET /api/search?q=QUESTION`` (``text/event-stream``: one ``data:``
    line per event, each ``AgentEvent.to_json()``; 400 for a missing or too long question) and ``GET
    /api/health`` (``{"status": "ok", "event_schema_version": N}``).

    Args:
        agent_factory: Makes the agent for each search (each request runs its own, so concurrent
            searches share nothing but what the factory shares, such as the LLM).
        keepalive_s: Seconds without events after which a keep-alive comment is sent.

    Returns:
        The FastAPI application (serve it with uvicorn, or :func:`serve` / :func:`running`).
    """
    app = FastAPI(title="lmstack agent", docs_url=None, redoc_url=None, openapi_url=None)
    page = _page()

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

    @app.get("/api/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "event_schema_version": EVENT_SCHEMA_VERSION}

    @app.get("/api/search", response_model=None)
    async def search(q: str = "") -> Response:
        question = q.strip()
        problem = None
        if not question:
            problem = "the question is empty: pass it as /api/search?q=..."
        elif len(question) > MAX_QUESTION_CHARS:
            problem = f"the question has {len(question)} characters; the limit is {MAX_QUESTION_CHARS}"
        if problem:
            return JSONResponse({"error": {"message": problem, "param": "q"}}, status_code=400)
        return _CancellingStream(
            _event_lines(agent_factory, question, keepalive_s),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    return app


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket, bound before uvicorn starts: a busy port fails at once and port 0 is known."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family)
    except OSError as exc:
        raise AgentError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; pick another port") from exc


def _base_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _server(app: FastAPI) -> uvicorn.Server:
    # log_config=None: the command line (or the host application) configures logging, not uvicorn
    return uvicorn.Server(
        uvicorn.Config(app, log_config=None, lifespan="off", ws="none", timeout_graceful_shutdown=5)
    )


def serve(
    app: FastAPI, *, host: str = "127.0.0.1", port: int = 8200, on_ready: Callable[[str], None] | None = None
) -> None:
    """Serve ``app`` with uvicorn in the foreground until interrupted.

    Args:
        app: The application from :func:`create_app`.
        host: The address to listen on.
        port: The port; 0 picks a free one.
        on_ready: Called with the base URL once the socket listens.

    Raises:
        AgentError: The address cannot be bound.
    """
    sock = _listen(host, port)
    if on_ready is not None:
        on_ready(_base_url(sock))
    _server(app).run(sockets=[sock])


@contextlib.contextmanager
def running(
    app: FastAPI, *, host: str = "127.0.0.1", port: int = 0, timeout_s: float = 30.0
) -> Iterator[str]:
    """Serve ``app`` in a background thread while the ``with`` block runs (tests, notebooks).

    Args:
        app: The application from :func:`create_app`.
        host: The address to listen on.
        port: The port; 0 picks a free one.
        timeout_s: How long to wait for the server to start.

    Yields:
        The base URL, e.g. ``http://127.0.0.1:51234``.

    Raises:
        AgentError: The address cannot be bound, or the server did not start in time.
    """
    sock = _listen(host, port)
    server = _server(app)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="lmstack-agent-web", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise AgentError("the agent web server did not start")
        time.sleep(0.01)
    try:
        yield _base_url(sock)
    finally:
        server.should_exit = True
        thread.join(timeout=timeout_s)
        sock.close()
