"""Clients that leave, graceful shutdown, and the ``lmstack serve`` command itself."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from lmstack.core._cli import main
from lmstack.infer import LLM, SamplingParams

MODEL = "tiny"
KEY = {"Authorization": "Bearer sk-test"}
LONG_STREAM = {"model": MODEL, "max_tokens": 200, "ignore_eos": True, "stream": True}


def _read_events(lines: Iterator[str], count: int) -> list[dict]:
    events = []
    for line in lines:
        if line.startswith("data: {"):
            events.append(json.loads(line[6:]))
            if len(events) == count:
                break
    return events


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"prompt": "the quick"}),
        ("/v1/completions", {"prompt": ["the", "a dog", "hex"], "n": 2}),  # several engine requests
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ],
    ids=["completion", "batch", "chat"],
)
def test_a_client_leaving_mid_stream_aborts_its_request_and_frees_its_blocks(
    start_server, path, body
) -> None:
    with start_server(slow=0.01) as server:
        engine = server.llm.engine
        with server.http() as client, client.stream("POST", path, json={**LONG_STREAM, **body}) as response:
            assert response.status_code == 200
            _read_events(response.iter_lines(), 3)
            assert engine.num_free_blocks < engine.num_blocks  # the request holds KV blocks now
        # Leaving the block closed the connection: the server must abort at once, not after 200 tokens.
        server.wait_idle(timeout=5)
        assert engine.num_requests == 0
        assert server.metrics()["lmstack_generation_tokens_total"] < 100


def test_a_client_leaving_a_non_streamed_request_aborts_it(start_server) -> None:
    with start_server(slow=0.01) as server:
        body = {"model": MODEL, "prompt": "the", "max_tokens": 200, "ignore_eos": True}
        with server.http(timeout=httpx.Timeout(60, read=0.5)) as client, pytest.raises(httpx.ReadTimeout):
            client.post("/v1/completions", json=body)
        server.wait_idle(timeout=5)
        metrics = server.metrics()
        assert metrics['lmstack_requests_total{endpoint="/v1/completions",status="499"}'] == 1
        assert metrics["lmstack_generation_tokens_total"] < 150


def test_shutdown_lets_in_flight_streams_finish_and_refuses_new_requests(
    start_server, reference: LLM
) -> None:
    with start_server(slow=0.01, shutdown_timeout=30) as server:
        body = {"model": MODEL, "prompt": "the lazy dog", "max_tokens": 30, "temperature": 0, "stream": True}
        with server.http() as client, client.stream("POST", "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            first = _read_events(lines, 1)
            server.server.should_exit = True  # what SIGTERM does
            deadline = time.monotonic() + 5
            while not server.state.draining and time.monotonic() < deadline:
                time.sleep(0.01)
            assert server.state.draining
            rest = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        text = "".join(e["choices"][0]["text"] for e in first + rest)
        [expected] = reference.generate(["the lazy dog"], SamplingParams(temperature=0, max_tokens=30))
        assert text == expected.outputs[0].text
        assert rest[-1]["choices"][0]["finish_reason"] == "length"
        server.server.should_exit = True
    assert server.state.closed and server.llm.engine.num_requests == 0


def test_shutdown_ends_requests_past_the_timeout_with_a_clean_error(start_server) -> None:
    with start_server(slow=0.02, shutdown_timeout=0.3) as server:
        body = {**LONG_STREAM, "messages": [{"role": "user", "content": "hi"}]}
        with server.http() as client, client.stream("POST", "/v1/chat/completions", json=body) as response:
            events = response.iter_lines()
            _read_events(events, 2)
            server.server.should_exit = True
            lines = [line for line in events if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        error = json.loads(lines[-2][6:])["error"]
        assert error["type"] == "server_error" and error["code"] == "shutting_down"
        assert "retry" in error["message"]
    assert server.llm.engine.num_free_blocks == server.llm.engine.num_blocks


def test_lmstack_serve_cli_serves_openai_clients_and_drains_on_sigterm(
    model_dir: Path, reference: LLM
) -> None:
    script = Path(sys.executable).with_name("lmstack")
    # An int8 KV cache (--kv-cache-dtype): on this model its greedy tokens are the float cache's
    # (test_engine_kernels checks that against transformers), so the float reference still applies.
    # --weight-layout gemv: one-row steps through core's compiled kernel, batched ones through oneDNN.
    args = [str(script), "serve", str(model_dir), "--port", "0", "--api-key", "sk-cli", "--served-model-name",
            MODEL, "--max-queue", "8", "--max-num-seqs", "16", "--kv-cache-dtype", "int8",
            "--weight-layout", "gemv"]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # the ready line, printed once the server accepts requests
        assert line.startswith(f"lmstack serve: {MODEL} on http://127.0.0.1:"), (line, proc.stderr.read())
        base = line.split(" on ", 1)[1].split()[0]
        client = openai.OpenAI(base_url=base, api_key="sk-cli", max_retries=0, timeout=60)

        response = client.completions.create(model=MODEL, prompt="the quick", max_tokens=6, temperature=0)
        [expected] = reference.generate(["the quick"], SamplingParams(temperature=0, max_tokens=6))
        assert response.choices[0].text == expected.outputs[0].text
        chat = [{"role": "user", "content": "hello"}]
        [expected_chat] = reference.chat(chat, SamplingParams(temperature=0, max_tokens=6))
        events = client.chat.completions.create(
            model=MODEL, messages=chat, max_tokens=6, temperature=0, stream=True
        )
        parts = [c.choices[0].delta.content or "" for c in events if c.choices]
        assert "".join(parts) == expected_chat.outputs[0].text

        # SIGTERM while a stream is running: the stream still completes, then the process exits 0.
        stream = client.completions.create(model=MODEL, prompt="a", max_tokens=60, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})  # fmt: skip
        chunks = [next(stream)]
        proc.send_signal(signal.SIGTERM)
        chunks.extend(stream)
        assert sum(1 for c in chunks if c.choices[0].text or c.choices[0].finish_reason) >= 1
        assert chunks[-1].choices[0].finish_reason == "length"
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_lmstack_serve_without_the_extra_says_how_to_install_it(monkeypatch, capsys, model_dir: Path) -> None:
    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi now fails, as if not installed
    assert main(["serve", str(model_dir)]) == 2
    assert "pip install 'lmstack-infer[server]'" in capsys.readouterr().err


def test_lmstack_serve_reports_a_busy_port(model_dir: Path, capsys) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", str(model_dir), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "--port" in err


def test_lmstack_infer_imports_without_fastapi() -> None:
    code = (
        "import sys\n"
        "sys.modules['fastapi'] = sys.modules['uvicorn'] = None\n"
        "import lmstack.infer\n"
        "from lmstack.infer.server import ServerConfig\n"
        "try:\n"
        "    from lmstack.infer.server import create_app\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 0, result.stderr
    assert "pip install 'lmstack-infer[server]'" in result.stdout


def test_a_stream_with_two_clients_one_leaving_keeps_the_other(start_server, reference: LLM) -> None:
    with start_server(slow=0.005) as server:
        result: dict[str, str] = {}

        def stay() -> None:
            body = {"model": MODEL, "prompt": "hex zebras", "max_tokens": 25, "temperature": 0}
            with server.http() as client:
                result["text"] = client.post("/v1/completions", json=body).json()["choices"][0]["text"]

        thread = threading.Thread(target=stay)
        thread.start()
        leaving = {**LONG_STREAM, "prompt": "the"}
        with server.http() as client, client.stream("POST", "/v1/completions", json=leaving) as response:
            _read_events(response.iter_lines(), 2)
        thread.join(30)
        [expected] = reference.generate(["hex zebras"], SamplingParams(temperature=0, max_tokens=25))
        assert result["text"] == expected.outputs[0].text
        server.wait_idle(timeout=5)


def test_a_second_ctrl_c_ends_the_drain_at_once_and_quietly(long_model_dir: Path) -> None:
    script = Path(sys.executable).with_name("lmstack")
    args = [str(script), "serve", str(long_model_dir), "--port", "0", "--served-model-name", MODEL,
            "--max-num-seqs", "4", "--shutdown-timeout", "600"]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finish_reasons: list[str | None] = []
    streaming = threading.Event()

    def read_a_long_stream(base: str) -> None:
        body = {"model": MODEL, "prompt": "the", "max_tokens": 2000, "ignore_eos": True, "stream": True}
        try:
            with httpx.stream("POST", f"{base}/completions", json=body, timeout=120) as response:
                for line in response.iter_lines():
                    if line.startswith("data: {") and '"choices"' in line:
                        finish_reasons.append(json.loads(line[6:])["choices"][0]["finish_reason"])
                        streaming.set()
        except httpx.HTTPError:
            pass  # the server went away mid-stream
        streaming.set()

    try:
        line = proc.stdout.readline()
        assert line.startswith(f"lmstack serve: {MODEL} on http://127.0.0.1:"), (line, proc.stderr.read())
        reader = threading.Thread(target=read_a_long_stream, args=(line.split(" on ", 1)[1].split()[0],))
        reader.start()
        assert streaming.wait(60)
        proc.send_signal(signal.SIGINT)
        logged = []
        for err in proc.stderr:  # the server says when it starts waiting for the stream to finish
            logged.append(err)
            if "shutting down: waiting" in err:
                break
        assert "shutting down: waiting" in logged[-1], logged
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130  # interrupted, as the lmstack command reports it
        reader.join(60)
        stderr = "".join(logged) + proc.stderr.read()
        assert "Traceback" not in stderr and "CancelledError" not in stderr, stderr
        assert "length" not in finish_reasons  # ended mid-way: the second Ctrl-C did not wait for it
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
