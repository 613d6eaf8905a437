"""Running the application with uvicorn: in the foreground (``lmstack rag serve``) or a background thread."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI

from lmstack.infer import LLM, LLMProtocol, RemoteLLM
from lmstack.rag._errors import RAGError
from lmstack.rag._index import Index
from lmstack.rag.answer import Assistant
from lmstack.rag.server._app import create_app
from lmstack.rag.server._config import RagServerConfig

__all__ = ["load_llm", "running", "serve"]

logger = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """uvicorn serving ``app`` on a socket bound beforehand, calling ``on_ready(host, port)`` once started."""

    def __init__(self, app: FastAPI, sock: socket.socket, on_ready: Callable[[str, int], None]) -> None:
        # log_config=None: the command (or the embedding application) configures logging, not uvicorn
        super().__init__(
            uvicorn.Config(app, log_config=None, ws="none", lifespan="on", timeout_graceful_shutdown=5)
        )
        self.sock = sock
        self.on_ready = on_ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup([self.sock])
        if self.started:
            bound = self.sock.getsockname()
            self.on_ready(str(bound[0]), int(bound[1]))


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``, bound before anything slow loads: a busy port fails at once."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family)
    except OSError as exc:
        raise RAGError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; pick another --port or --host"
        ) from exc


@contextlib.contextmanager
def running(
    app: FastAPI, host: str = "127.0.0.1", port: int = 0, *, timeout_s: float = 30.0
) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a background thread while the ``with`` block runs.

    For notebooks, tests and applications that embed the server; the server stops (lifespan shutdown
    included) when the block ends.

    Args:
        app: The application (from :func:`create_app`).
        host: Address to listen on.
        port: Port; 0 picks a free one.
        timeout_s: How long to wait for the server to start.

    Yields:
        The server's base URL, e.g. ``http://127.0.0.1:51234``.

    Raises:
        RAGError: The address cannot be bound, or the server did not start.
    """
    sock = _bind(host, port)
    ready = threading.Event()
    server = _Server(app, sock, lambda *_: ready.set())
    thread = threading.Thread(target=server.run, name="lmstack-rag-server", daemon=True)
    thread.start()
    try:
        if not ready.wait(timeout_s):
            raise RAGError(f"the server on {host}:{port} did not start within {timeout_s} s; see the log")
        bound_host, bound_port = sock.getsockname()[:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        yield f"http://{shown}:{bound_port}"
    finally:
        server.should_exit = True
        thread.join(timeout_s)
        sock.close()


def load_llm(model: str | os.PathLike[str], *, api_key: str | None = None, **llm_options: Any) -> LLMProtocol:
    """The model to answer with: an ``http(s)://`` URL (OpenAI-compatible server) or a model directory.

    Args:
        model: A model directory (loaded with :class:`~lmstack.infer.LLM`) or a server's base URL (a
            :class:`~lmstack.infer.RemoteLLM`).
        api_key: The server's API key (remote models only).
        **llm_options: ``LLM`` options for a local model (``device``, ``dtype``, engine settings).
    """
    text = str(model)
    if text.startswith(("http://", "https://")):
        return RemoteLLM(text, api_key=api_key)
    if not Path(text).is_dir():
        raise RAGError(
            f"--model {text} is neither a model directory nor an http(s) URL of an OpenAI-compatible server"
        )
    return LLM(text, **llm_options)


def serve(
    index_path: str | os.PathLike[str],
    *,
    model: str | os.PathLike[str] | LLMProtocol | None = None,
    host: str = "127.0.0.1",
    port: int = 8100,
    config: RagServerConfig | None = None,
    api_key_for_model: str | None = None,
    k: int = 4,
    on_ready: Callable[[str, int], None] | None = None,
    **llm_options: Any,
) -> None:
    """Serve an index over HTTP until SIGINT or SIGTERM.

    The address is bound before the index and the model load, so a busy port fails at once.

    Args:
        index_path: The index directory.
        model: What answers ``/query`` and chat messages: a local model directory, the URL of an
            OpenAI-compatible server, an LLM object, or None (search, ingestion and embeddings only).
        host: Address to listen on.
        port: Port; 0 picks a free one (``on_ready`` tells which).
        config: Keys, secrets and limits.
        api_key_for_model: The API key of a remote model's server.
        k: Passages per answer.
        on_ready: Called with the bound host and port once the server accepts requests.
        **llm_options: ``LLM`` options for a local model.

    Raises:
        RAGError: The address cannot be bound, the index cannot be opened, or the model cannot be loaded.
    """
    sock = _bind(host, port)
    index: Index | None = None
    llm: LLMProtocol | None = None
    owned = False
    try:
        index = Index.open(Path(index_path))
        if isinstance(model, str | os.PathLike):
            llm, owned = load_llm(model, api_key=api_key_for_model, **llm_options), True
        else:
            llm = model
        assistant = Assistant(index, llm, k=k) if llm is not None else None
        app = create_app(index, assistant, config)
        logger.info("serving %s on http://%s:%d", index.path, *sock.getsockname()[:2])
        _Server(app, sock, on_ready or (lambda *_: None)).run()
    finally:
        sock.close()
        if owned and llm is not None:
            close = getattr(llm, "close", None)
            if close is not None:
                close()
        if index is not None:
            index.close()
