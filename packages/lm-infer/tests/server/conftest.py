"""Fixtures for the server tests: real uvicorn servers on loopback, serving the tiny test model."""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

import uvicorn  # noqa: E402

from lmstack.infer import LLM  # noqa: E402
from lmstack.infer.server import ServerConfig, create_app  # noqa: E402
from lmstack.infer.server._serve import _Server  # noqa: E402

MODEL = "tiny"
API_KEY = "sk-test"

_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
_SAMPLE = re.compile(rf"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{{{_LABEL}(?:,{_LABEL})*\}})? (\S+)$")


def parse_metrics(text: str) -> dict[str, float]:
    """Samples of a Prometheus text exposition, keyed ``name{labels}`` (labels as written)."""
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        assert match, f"not a Prometheus sample line: {line!r}"
        samples[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return samples


@dataclass
class LiveServer:
    """A server running in a background thread, and clients for it."""

    base_url: str
    llm: LLM
    server: _Server
    app: Any

    @property
    def state(self) -> Any:
        return self.app.state.lmstack

    def openai(self, **options: Any) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=60, **options
        )

    def async_openai(self, **options: Any) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url=f"{self.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=60, **options
        )

    def http(self, **options: Any) -> httpx.Client:
        options.setdefault("timeout", 60)
        return httpx.Client(base_url=self.base_url, headers={"Authorization": f"Bearer {API_KEY}"}, **options)

    def metrics(self) -> dict[str, float]:
        response = httpx.get(f"{self.base_url}/metrics", timeout=30)
        assert response.status_code == 200
        return parse_metrics(response.text)

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait until no request is in flight and every KV block is free again."""
        engine = self.llm.engine
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.state.in_flight == 0 and engine.num_free_blocks == engine.num_blocks:
                return
            time.sleep(0.02)
        raise AssertionError(
            f"not idle after {timeout}s: {self.state.in_flight} in flight, "
            f"{engine.num_blocks - engine.num_free_blocks} KV blocks used"
        )


@contextlib.contextmanager
def running_server(llm: LLM, **config: Any) -> Iterator[LiveServer]:
    """Serve ``llm`` with uvicorn on a free loopback port (the same server class ``lmstack serve`` runs)."""
    config.setdefault("model_name", MODEL)
    config.setdefault("api_keys", [API_KEY])
    app = create_app(llm, ServerConfig(**config))
    settings = uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, ws="none", lifespan="on")
    server = _Server(settings, app.state.lmstack, None)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield LiveServer(f"http://127.0.0.1:{port}", llm, server, app)
    finally:
        server.should_exit = True
        thread.join(60)
        assert not thread.is_alive(), "the server did not shut down"


def slow_down(llm: LLM, seconds: float) -> None:
    """Make every engine step take at least ``seconds`` (so requests stay in flight long enough)."""
    step = llm.engine.step

    def slow_step() -> Any:
        time.sleep(seconds)
        return step()

    llm.engine.step = slow_step  # type: ignore[method-assign]


@pytest.fixture(scope="session")
def reference(model_dir: Path) -> LLM:
    """A local LLM on the same model: what the server's answers must equal."""
    return LLM(model_dir)


@pytest.fixture(scope="session")
def live(model_dir: Path) -> Iterator[LiveServer]:
    """One server shared by the tests that do not stop or slow it."""
    with running_server(LLM(model_dir), max_body_bytes=1 << 20) as server:
        yield server


@pytest.fixture
def start_server(model_dir: Path) -> Callable[..., contextlib.AbstractContextManager[LiveServer]]:
    """Start a server of its own (with a fresh LLM, of ``model`` or the tiny model) for a test that changes
    or stops it."""

    def start(
        *, slow: float = 0.0, engine: dict[str, Any] | None = None, model: Path | None = None, **config: Any
    ) -> Any:
        llm = LLM(model or model_dir, **(engine or {}))
        if slow:
            slow_down(llm, slow)
        return running_server(llm, **config)

    return start
