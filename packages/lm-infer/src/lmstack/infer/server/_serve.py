"""Run the server with uvicorn: bind, load the model, serve until SIGINT or SIGTERM, shut down cleanly."""

from __future__ import annotations

import logging
import os
import signal
import socket
from collections.abc import Callable
from types import FrameType
from typing import Any

import uvicorn

from lmstack.infer._errors import InferError
from lmstack.infer._llm import LLM
from lmstack.infer.server._api_server import create_app
from lmstack.infer.server._config import ServerConfig
from lmstack.infer.server._state import ServerState

__all__ = ["serve"]

logger = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """uvicorn's server, draining the application before uvicorn's own shutdown.

    uvicorn alone would wait for open requests and then cancel them mid-response; here new
    connections stop, in-flight requests get the configured time to finish, and the rest end with
    a clean error (the LLM is closed) before uvicorn closes the connections. A second SIGINT ends
    the wait at once, and the process exits as interrupted.
    """

    def __init__(
        self, config: uvicorn.Config, state: ServerState, on_ready: Callable[[str, int], None] | None
    ) -> None:
        super().__init__(config)
        self._state = state  # the application's shared state (app.state.lmstack)
        self._on_ready = on_ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self._on_ready is not None and sockets:
            host, port = sockets[0].getsockname()[:2]
            self._on_ready(str(host), int(port))

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # SIGTERM is how a server is normally stopped: after the drain the process exits with status 0
        # (uvicorn would raise the signal again after shutting down, killing the process with it).
        # SIGINT keeps uvicorn's handling: a second one forces the exit, and the command reports it.
        if sig == signal.SIGTERM:
            self.should_exit = True
        else:
            super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()  # stop accepting first, then drain
        for sock in sockets or []:
            sock.close()
        await self._state.shutdown(self._state.config.shutdown_timeout, stop_now=lambda: self.force_exit)
        await super().shutdown(None)
        if self.force_exit:
            # uvicorn skips the application's lifespan shutdown on a forced exit, which leaves the
            # lifespan task to be cancelled with a traceback; ours is quick (the LLM is closed now).
            await self.lifespan.shutdown()


def _bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (uvicorn listens on it), or an error saying what to change."""
    sock: socket.socket | None = None
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        if sock is not None:
            sock.close()
        raise InferError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; pick another --port or --host."
        ) from exc
    return sock


def serve(
    model: str | os.PathLike[str] | LLM,
    config: ServerConfig | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    on_ready: Callable[[str, int], None] | None = None,
    **llm_options: Any,
) -> None:
    """Serve a model over OpenAI's HTTP API until SIGINT or SIGTERM.

    The address is bound before the model loads, so a busy port fails at once. On SIGINT or
    SIGTERM the server stops accepting connections, lets in-flight requests finish for up to
    ``config.shutdown_timeout`` seconds, ends the rest with an error and closes the LLM.

    Args:
        model: A model directory (loaded with ``LLM(model, **llm_options)``) or an ``LLM`` to serve
            (closed when the server stops).
        config: Model name, API keys and limits (default: ``ServerConfig()``).
        host: Address to listen on.
        port: Port to listen on; 0 picks a free one (``on_ready`` tells which).
        on_ready: Called with the bound host and port once the server accepts requests.
        **llm_options: ``LLM`` options (``dtype``, ``device`` and ``EngineConfig`` fields).

    Raises:
        InferError: if the address cannot be bound.
    """
    sock = _bind(host, port)
    try:
        llm = model if isinstance(model, LLM) else LLM(model, **llm_options)
        config = config or ServerConfig()
        app = create_app(llm, config)
        uv_config = uvicorn.Config(
            app,
            log_config=None,  # the lmstack command configures logging
            ws="none",
            lifespan="on",
            # Our drain already ran; this only bounds uvicorn's own wait for closing connections.
            timeout_graceful_shutdown=5,
        )
        logger.info("serving %s on http://%s:%d", config.model_name, *sock.getsockname()[:2])
        _Server(uv_config, app.state.lmstack, on_ready).run(sockets=[sock])
    finally:
        sock.close()
