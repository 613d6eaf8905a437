"""The two servers of the serving benchmark, each in its own process on 127.0.0.1.

- ``lmstack serve PATH --port 0``: the address is read off the line it prints once it is ready.
- ``transformers serve PATH --continuous-batching``: transformers' own OpenAI-compatible server
  (FastAPI and uvicorn too), with its paged-attention continuous batching; it takes no port 0, so a
  free port is picked first, and it is ready when ``/health`` answers.

Both get the same KV cache (``NUM_KV_BLOCKS`` blocks of ``BLOCK_SIZE`` tokens), the same per-step
token budget (``MAX_BATCH_TOKENS``) and the checkpoint's dtype (fp32) on the CPU. Each side is told
to ignore the end-of-sequence token in its own words, so every request generates ``MAX_TOKENS``.
"""

from __future__ import annotations

import contextlib
import json
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _serving_workload as wl
import httpx

START_TIMEOUT_S = 180


@dataclass(frozen=True)
class Server:
    """A running server: where to send requests, the model name, and the fields it needs added."""

    name: str
    base_url: str
    model: str
    extra_body: dict[str, Any]


@contextlib.contextmanager
def lmstack(model: wl.ModelInfo, log: Path) -> Iterator[Server]:
    """``lmstack serve`` on the model; requests add vLLM's ``ignore_eos``."""
    command = [
        sys.executable, "-m", "lmstack.core", "serve", str(model.path), "--port", "0",
        "--kv-cache-memory", str(wl.NUM_KV_BLOCKS * model.kv_bytes_per_block),
        "--block-size", str(wl.BLOCK_SIZE), "--max-num-batched-tokens", str(wl.MAX_BATCH_TOKENS),
    ]  # fmt: skip
    ready = re.compile(r"lmstack serve: .* on (http://\S+)/v1")
    with _process(command, log) as process:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (found := ready.search(log.read_text())):
            _check_alive(process, command, log, deadline)
            time.sleep(0.2)
        extra = {"ignore_eos": True, "stream_options": {"include_usage": True}}
        yield Server("lmstack", found.group(1), str(model.path), extra)


@contextlib.contextmanager
def transformers_serve(model: wl.ModelInfo, log: Path) -> Iterator[Server]:
    """``transformers serve --continuous-batching`` on the model; eos is disabled per request.

    Its ``generation_config`` request field replaces the model's generation config: with
    ``eos_token_id: -1`` continuous batching never stops a request early (its "disabled" value).
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable, "-m", "transformers.cli.transformers", "serve", str(model.path),
        "--continuous-batching", "--device", "cpu", "--host", "127.0.0.1", "--port", str(port),
        "--cb-block-size", str(wl.BLOCK_SIZE), "--cb-num-blocks", str(wl.NUM_KV_BLOCKS),
        "--cb-max-batch-tokens", str(wl.MAX_BATCH_TOKENS),
    ]  # fmt: skip
    base_url = f"http://127.0.0.1:{port}"
    with _process(command, log) as process:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _healthy(base_url):
            _check_alive(process, command, log, deadline)
            time.sleep(0.5)
        extra = {"generation_config": json.dumps({"do_sample": False, "eos_token_id": -1})}
        yield Server("transformers", base_url, str(model.path), extra)


@contextlib.contextmanager
def _process(command: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``command`` with its output in ``log``; SIGTERM it (then SIGKILL) on the way out."""
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield process
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _healthy(base_url: str) -> bool:
    try:
        return httpx.get(f"{base_url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _check_alive(process: subprocess.Popen[bytes], command: list[str], log: Path, deadline: float) -> None:
    """Raise, with the end of the server's output, if it died or is still not ready at ``deadline``."""
    if process.poll() is not None or time.monotonic() > deadline:
        code = process.returncode
        why = "never got ready" if code is None else f"exited with status {code}"
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"{shlex.join(command)} {why}:\n{tail}")
