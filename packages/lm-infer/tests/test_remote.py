"""RemoteLLM against scripted servers (httpx.MockTransport), a silent socket and a real model's log-probs.

End-to-end tests against the real `lmstack serve` application are in test_remote_server.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from transformers.convert_slow_tokenizer import bytes_to_unicode

from lmstack.core import DenseAttention, Tokenizer
from lmstack.infer import (
    LLM,
    InferError,
    InvalidRequestError,
    LLMProtocol,
    RemoteConnectionError,
    RemoteError,
    RemoteInvalidRequestError,
    RemoteLLM,
    RemoteTimeoutError,
    RemoteUnsupportedError,
    SamplingParams,
    TokenizerUnavailableError,
)
from lmstack.infer._byte_level import BYTE_TO_CHAR, CHAR_TO_BYTE
from lmstack.infer.remote import RemoteRequestOutput, Usage
from lmstack.infer.remote._http import RetryPolicy, normalize_base_url, parse_retry_after
from lmstack.infer.remote._request import sampling_fields
from lmstack.infer.remote._sse import SSEDecoder

BASE = "http://testserver:8000"
Handler = Callable[[httpx.Request], Any]


def eventually(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Whether ``condition`` holds within ``timeout`` seconds (polled)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def make(handler: Handler, **kwargs: Any) -> RemoteLLM:
    kwargs.setdefault("model", "m")
    kwargs.setdefault("backoff_base", 0.001)
    kwargs.setdefault("backoff_max", 0.01)
    return RemoteLLM(BASE, transport=httpx.MockTransport(handler), **kwargs)


def completion(text: str = "hi", finish: str = "stop", **choice: Any) -> dict[str, Any]:
    return {
        "id": "cmpl-1",
        "object": "text_completion",
        "model": "m",
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish, **choice}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }


def error(status: int, message: str, headers: dict[str, str] | None = None) -> httpx.Response:
    body = {"error": {"message": message, "type": "invalid_request_error", "code": None}}
    return httpx.Response(status, json=body, headers=headers)


# -- construction, protocol ----------------------------------------------------------------------------


def test_base_url_is_normalised() -> None:
    assert normalize_base_url("http://h:8000") == "http://h:8000/v1"
    assert normalize_base_url("http://h:8000/") == "http://h:8000/v1"
    assert normalize_base_url("http://h:8000/v1/") == "http://h:8000/v1"
    assert normalize_base_url("https://x.org/openai/v1") == "https://x.org/openai/v1"
    with pytest.raises(InferError, match="http"):
        RemoteLLM("localhost:8000")


def test_satisfies_the_protocol_with_and_without_tokenizer(model_dir: Path) -> None:
    with RemoteLLM(BASE) as bare:
        assert isinstance(bare, LLMProtocol)
        with pytest.raises(TokenizerUnavailableError, match="tokenizer="):
            _ = bare.tokenizer
        assert getattr(bare, "tokenizer", None) is None
    with RemoteLLM(BASE, tokenizer=model_dir) as remote:
        assert isinstance(remote, LLMProtocol)
        assert isinstance(remote.tokenizer, Tokenizer)
        tok = Tokenizer.from_pretrained(model_dir)
        assert RemoteLLM(BASE, tokenizer=tok).tokenizer is tok


def test_sampling_params_map_to_openai_fields() -> None:
    plain = sampling_fields(SamplingParams(), chat=False)
    assert plain == {"n": 1, "temperature": 1.0, "top_p": 1.0, "max_tokens": 16}
    assert "max_tokens" not in sampling_fields(SamplingParams(max_tokens=None), chat=True)
    p = SamplingParams(
        n=2, max_tokens=5, temperature=0.5, top_p=0.9, top_k=7, min_p=0.1, repetition_penalty=1.2,
        presence_penalty=0.5, frequency_penalty=-0.5, seed=3, stop=["x"], stop_token_ids=[4], logprobs=2,
        min_tokens=1, ignore_eos=True, skip_special_tokens=False, include_stop_str_in_output=True,
    )  # fmt: skip
    fields = sampling_fields(p, chat=False)
    assert fields == {
        "n": 2, "temperature": 0.5, "top_p": 0.9, "max_tokens": 5, "stop": ["x"], "seed": 3,
        "presence_penalty": 0.5, "frequency_penalty": -0.5, "logprobs": 2, "top_k": 7, "min_p": 0.1,
        "repetition_penalty": 1.2, "min_tokens": 1, "stop_token_ids": [4], "ignore_eos": True,
        "skip_special_tokens": False, "include_stop_str_in_output": True,
    }  # fmt: skip
    chat = sampling_fields(p, chat=True)
    assert chat["logprobs"] is True and chat["top_logprobs"] == 2


# -- generate / chat / models --------------------------------------------------------------------------


def test_generate_sends_each_prompt_and_parses_the_answer(model_dir: Path) -> None:
    seen: list[dict[str, Any]] = []
    second_answered = asyncio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append(body)
        assert request.url.path == "/v1/completions"
        assert request.headers["authorization"] == "Bearer sk-test"
        if body["prompt"] == "first":  # answer out of order: the later prompt first
            await second_answered.wait()
            return httpx.Response(200, json=completion(" one", "length", token_ids=[7, 8], stop_reason=None))
        reply = completion(" fox", "stop", stop_reason="x")
        reply["usage"]["prompt_tokens_details"] = {"cached_tokens": 2}
        second_answered.set()
        return httpx.Response(200, json=reply)

    with make(handler, api_key="sk-test", tokenizer=model_dir) as remote:
        outs = remote.generate(["first", [5, 6]], SamplingParams(temperature=0, max_tokens=4))
        assert [json.dumps(b["prompt"]) for b in seen] == ['"first"', "[5, 6]"] or len(seen) == 2
        assert all(b["model"] == "m" and b["max_tokens"] == 4 and b["temperature"] == 0 for b in seen)
        first, second = outs
        assert isinstance(first, RemoteRequestOutput) and first.finished
        assert first.prompt == "first" and first.prompt_token_ids == remote.tokenizer.encode("first")
        assert first.outputs[0].text == " one" and first.outputs[0].token_ids == [7, 8]  # the server's ids
        assert first.outputs[0].finish_reason == "length"
        assert second.prompt is None and second.prompt_token_ids == [5, 6]
        # No ids from the server: the local tokenizer's.
        assert second.outputs[0].token_ids == remote.tokenizer.encode(" fox", add_special_tokens=False)
        assert second.outputs[0].stop_reason == "x" and second.num_cached_tokens == 2
        assert second.usage == Usage(3, 2, 5, 2)
        assert remote.usage.total_tokens == 10


def test_generate_logprobs_become_token_id_dicts(model_dir: Path) -> None:
    tok = Tokenizer.from_pretrained(model_dir)
    fox, jumps = tok.encode("fox", add_special_tokens=False), tok.encode(" jumps", add_special_tokens=False)
    assert len(fox) == len(jumps) == 1
    logprobs = {
        "tokens": ["fox", " jumps"],
        "token_logprobs": [-0.5, -1.0],
        "top_logprobs": [{"fox": -0.5, " jumps": -2.0}, {" jumps": -1.0}],
        "text_offset": [0, 3],
    }

    def handler(request: httpx.Request) -> httpx.Response:
        assert json.loads(request.content)["logprobs"] == 1
        return httpx.Response(200, json=completion("fox jumps", logprobs=logprobs))

    with make(handler, tokenizer=tok) as remote:
        (out,) = remote.generate("x", SamplingParams(logprobs=1))
    sample = out.outputs[0]
    assert sample.token_ids == fox + jumps
    assert sample.logprobs == [{fox[0]: -0.5, jumps[0]: -2.0}, {jumps[0]: -1.0}]
    assert sample.cumulative_logprob == pytest.approx(-1.5)


def test_chat_posts_messages() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        assert request.url.path == "/v1/chat/completions"
        assert body["messages"] == [{"role": "user", "content": body["messages"][0]["content"]}]
        assert body["chat_template_kwargs"] == {"x": 1}
        reply = {"id": "c", "choices": [{"index": 0, "message": {"role": "assistant",
                 "content": body["messages"][0]["content"].upper()}, "finish_reason": "stop"}]}  # fmt: skip
        return httpx.Response(200, json=reply)

    with make(handler, extra_body={"chat_template_kwargs": {"x": 1}}) as remote:
        outs = remote.chat([[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]])
        assert [o.outputs[0].text for o in outs] == ["A", "B"]
        assert remote.chat([{"role": "user", "content": "c"}])[0].outputs[0].text == "C"
        with pytest.raises(InvalidRequestError):
            remote.chat([])


def test_models_and_picking_the_only_one() -> None:
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "only", "object": "model"}]})
        assert json.loads(request.content)["model"] == "only"
        return httpx.Response(200, json=completion())

    with make(handler, model=None) as remote:
        assert remote.models() == ["only"]
        remote.generate(["a", "b", "c"])
        assert remote.model == "only"
        assert calls.count("/v1/models") == 2  # models() once, then once to pick it

    def two(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"data": [{"id": "a"}, {"id": "b"}]})

    with make(two, model=None) as remote, pytest.raises(InferError, match=r"2 models \('a', 'b'\).*model="):
        remote.generate("x")


def test_invalid_prompts_are_refused_before_sending() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise AssertionError("nothing should be sent")

    with make(handler) as remote:
        for bad in ([], [""], [3.5]):
            with pytest.raises(InvalidRequestError):
                remote.generate(bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidRequestError, match="sampling parameter sets"):
            remote.generate(["a", "b"], [SamplingParams()])


# -- retries, errors, timeouts -------------------------------------------------------------------------


def scripted(*steps: Any) -> tuple[Handler, list[float]]:
    """A handler answering with ``steps`` in turn (a response, or an exception to raise); then 200s."""
    times: list[float] = []
    queue = list(steps)

    def handler(request: httpx.Request) -> httpx.Response:
        times.append(time.monotonic())
        step = queue.pop(0) if queue else httpx.Response(200, json=completion("ok"))
        if isinstance(step, Exception):
            raise step
        return step

    return handler, times


@pytest.mark.parametrize(
    "failure",
    [
        error(429, "slow down"),
        error(500, "oops"),
        error(503, "busy"),
        httpx.ConnectError("refused"),
        httpx.ReadTimeout("slow"),
        httpx.RemoteProtocolError("peer closed"),
    ],
    ids=["429", "500", "503", "connect", "read-timeout", "protocol"],
)
def test_transient_failures_are_retried(failure: Any) -> None:
    handler, times = scripted(failure, failure)
    with make(handler, max_retries=2) as remote:
        assert remote.generate("x")[0].outputs[0].text == "ok"
    assert len(times) == 3


def test_retry_after_is_honoured() -> None:
    handler, times = scripted(
        error(429, "slow down", {"Retry-After": "0.3"}), error(503, "busy", {"retry-after-ms": "200"})
    )
    with make(handler, max_retries=2, backoff_max=5) as remote:
        remote.generate("x")
    assert times[1] - times[0] >= 0.29
    assert times[2] - times[1] >= 0.19
    assert (
        parse_retry_after(httpx.Headers({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}), now=1445412470)
        == 10
    )
    assert parse_retry_after(httpx.Headers({"Retry-After": "soon"})) is None


def test_backoff_is_exponential_with_jitter_and_capped() -> None:
    policy = RetryPolicy(5, backoff_base=1.0, backoff_max=6.0)
    for retry, ceiling in enumerate([1, 2, 4, 6, 6]):
        delays = [policy.delay(retry) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 1
    assert policy.delay(0, retry_after=100) == 6.0


def test_retries_run_out_with_a_clear_error() -> None:
    handler, times = scripted(*[error(503, "overloaded")] * 3)
    with make(handler, max_retries=2) as remote, pytest.raises(RemoteError) as info:
        remote.generate("x")
    assert len(times) == 3
    assert (
        info.value.status_code == 503 and "overloaded" in str(info.value) and "3 attempts" in str(info.value)
    )

    handler, times = scripted(*[httpx.ConnectError("refused")] * 2)
    with make(handler, max_retries=1) as remote, pytest.raises(RemoteConnectionError, match="server running"):
        remote.generate("x")
    assert len(times) == 2


@pytest.mark.parametrize("status", [400, 401, 404, 422])
def test_client_errors_are_not_retried(status: int) -> None:
    handler, times = scripted(error(status, "max_tokens must be at most 10"))
    with make(handler, max_retries=3) as remote, pytest.raises(RemoteError) as info:
        remote.generate("x")
    assert len(times) == 1
    assert info.value.status_code == status and info.value.server == "http://testserver:8000/v1"
    assert "max_tokens must be at most 10" in str(info.value) and f"HTTP {status}" in str(info.value)
    assert isinstance(info.value, InvalidRequestError) == (status in (400, 422))
    assert isinstance(info.value, RemoteInvalidRequestError) == (status in (400, 422))


def test_error_bodies_in_other_shapes_are_surfaced() -> None:
    handler, _ = scripted(httpx.Response(400, json={"detail": "bad field"}))
    with make(handler) as remote, pytest.raises(RemoteError, match="bad field"):
        remote.generate("x")
    handler, _ = scripted(httpx.Response(400, text="plain words"))
    with make(handler) as remote, pytest.raises(RemoteError, match="plain words"):
        remote.generate("x")
    handler, _ = scripted(httpx.Response(200, text="<html>"))
    with make(handler) as remote, pytest.raises(RemoteError, match="not JSON"):
        remote.generate("x")


@pytest.fixture
def silent_server() -> Iterator[tuple[str, list[socket.socket]]]:
    """A socket that accepts connections and never answers."""
    sock = socket.create_server(("127.0.0.1", 0))
    sock.settimeout(0.05)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                accepted.append(sock.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", accepted
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    sock.close()


def test_a_server_that_never_answers_times_out(silent_server: tuple[str, list[socket.socket]]) -> None:
    url, accepted = silent_server
    remote = RemoteLLM(url, "m", timeout=0.2, max_retries=1, backoff_base=0.001)
    start = time.monotonic()
    with remote, pytest.raises(RemoteTimeoutError, match=r"timed out.*timeout="):
        remote.generate("x")
    assert time.monotonic() - start >= 0.4  # each attempt waited out its timeout
    assert len(accepted) == 2  # the first attempt and one retry


def test_connection_refused() -> None:
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    remote = RemoteLLM(f"http://127.0.0.1:{port}", "m", max_retries=1, backoff_base=0.001)
    with remote, pytest.raises(RemoteConnectionError, match=f"127.0.0.1:{port}"):
        remote.generate("x")


# -- concurrency, cancellation, lifecycle ----------------------------------------------------------------


class InFlight:
    def __init__(self) -> None:
        self.now = self.peak = self.total = 0

    async def handler(self, request: httpx.Request) -> httpx.Response:
        self.now += 1  # the handler runs on the client's one event loop: no lock needed
        self.total += 1
        self.peak = max(self.peak, self.now)
        try:
            await asyncio.sleep(0.02)
        finally:
            self.now -= 1
        return httpx.Response(200, json=completion(json.loads(request.content)["prompt"]))


def test_sync_generate_runs_requests_concurrently_up_to_the_limit() -> None:
    counter = InFlight()
    with make(counter.handler, max_concurrency=4) as remote:
        outs = remote.generate([f"p{i}" for i in range(24)])
    assert [o.outputs[0].text for o in outs] == [f"p{i}" for i in range(24)]
    assert counter.peak == 4 and counter.total == 24


def test_async_calls_share_the_limit() -> None:
    counter = InFlight()

    async def main(remote: RemoteLLM) -> list[list[RemoteRequestOutput]]:
        return await asyncio.gather(*(remote.agenerate([f"{k}-{i}" for i in range(5)]) for k in range(4)))

    with make(counter.handler, max_concurrency=3) as remote:
        results = asyncio.run(main(remote))
    assert [[o.outputs[0].text for o in outs] for outs in results] == [
        [f"{k}-{i}" for i in range(5)] for k in range(4)
    ]
    assert counter.peak == 3 and counter.total == 20


def test_one_failure_cancels_the_rest_of_the_batch() -> None:
    started: list[str] = []
    cancelled: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        prompt = json.loads(request.content)["prompt"]
        if prompt == "bad":
            return error(400, "bad prompt")
        started.append(prompt)
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(prompt)
            raise
        return httpx.Response(200, json=completion())

    with make(handler) as remote:
        with pytest.raises(RemoteInvalidRequestError, match="bad prompt"):
            remote.generate(["slow1", "bad", "slow2"])  # returns at once, not after the others' 10 s
        assert eventually(lambda: sorted(cancelled) == sorted(started))


def test_cancelling_an_async_call_cancels_its_requests() -> None:
    started, cancelled = threading.Event(), threading.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        started.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return httpx.Response(200, json=completion())

    async def main(remote: RemoteLLM) -> None:
        task = asyncio.ensure_future(remote.agenerate("x"))
        assert await asyncio.to_thread(started.wait, 10)  # the request is in flight
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with make(handler) as remote:
        asyncio.run(main(remote))
        assert cancelled.wait(5)


def test_close_ends_requests_in_flight_and_refuses_new_ones() -> None:
    started = threading.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        started.set()
        await asyncio.sleep(10)
        return httpx.Response(200, json=completion())

    remote = make(handler)
    errors: list[BaseException] = []

    def call() -> None:
        try:
            remote.generate("x")
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    assert started.wait(10)  # the request is in flight
    remote.close()
    thread.join(5)
    assert len(errors) == 1 and isinstance(errors[0], InferError) and "closed" in str(errors[0])
    with pytest.raises(InferError, match="closed"):
        remote.generate("x")
    remote.close()  # idempotent


# -- server-sent events -------------------------------------------------------------------------------------


def test_sse_decoder_handles_any_split_of_the_bytes() -> None:
    raw = (
        "\ufeff: a comment\r\n"
        'data: {"a": 1}\r\n\r\n'
        "event: error\ndata: line one\ndata:line two\nid: 7\n\n"
        "data: caf\u00e9\r\rretry: 10\ndata: [DONE]\n\n"
        "data: no blank line at the end"
    ).encode()
    expected = [
        ("message", '{"a": 1}', None),
        ("error", "line one\nline two", "7"),
        ("message", "caf\u00e9", "7"),
        ("message", "[DONE]", "7"),
        ("message", "no blank line at the end", "7"),
    ]
    for size in (1, 2, 3, 5, 7, len(raw)):
        decoder = SSEDecoder()
        events = []
        for i in range(0, len(raw), size):
            events += decoder.feed(raw[i : i + size])
        events += decoder.flush()
        assert [(e.event, e.data, e.id) for e in events] == expected, size


class Chunks(httpx.AsyncByteStream):
    """A response body delivered in the given pieces, with a pause between them; records its closing."""

    def __init__(self, pieces: list[bytes], pause: float = 0.0, then_wait: bool = False) -> None:
        self.pieces, self.pause, self.then_wait = pieces, pause, then_wait
        self.closed = asyncio.Event()
        self.closed_flag = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for piece in self.pieces:
            yield piece
            await asyncio.sleep(self.pause)
        if self.then_wait:
            await asyncio.sleep(30)

    async def aclose(self) -> None:
        self.closed_flag = True


def sse(*objects: Any) -> bytes:
    return b"".join(f"data: {o if isinstance(o, str) else json.dumps(o)}\n\n".encode() for o in objects)


def split_odd(data: bytes, size: int = 7) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def chunk(text: str, finish: str | None = None, index: int = 0, **extra: Any) -> dict[str, Any]:
    return {"id": "cmpl-s", "model": "m", "choices": [{"index": index, "text": text, "finish_reason": finish,
                                                       **extra}]}  # fmt: skip


def collect(
    remote: RemoteLLM, prompt: Any, params: SamplingParams | None = None
) -> list[RemoteRequestOutput]:
    async def main() -> list[RemoteRequestOutput]:
        async with contextlib.aclosing(remote.stream(prompt, params)) as stream:
            return [out async for out in stream]

    return asyncio.run(main())


def test_stream_yields_deltas_and_attaches_usage_to_the_last() -> None:
    body = sse(
        chunk("The"), chunk(" quick", token_ids=[5, 6]), chunk(" fox", "length"),
        {"id": "cmpl-s", "choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 3,
                                                  "total_tokens": 5}},
        "[DONE]",
    )  # fmt: skip

    def handler(request: httpx.Request) -> httpx.Response:
        payload = json.loads(request.content)
        assert payload["stream"] is True and payload["stream_options"] == {"include_usage": True}
        return httpx.Response(
            200, headers={"content-type": "text/event-stream"}, stream=Chunks(split_odd(body))
        )

    with make(handler) as remote:
        outs = collect(remote, "go", SamplingParams(max_tokens=3))
        assert [o.outputs[0].text for o in outs] == ["The", " quick", " fox"]
        assert outs[1].outputs[0].token_ids == [5, 6]
        assert [o.finished for o in outs] == [False, False, True]
        assert outs[-1].outputs[0].finish_reason == "length" and outs[-1].request_id == "cmpl-s"
        assert outs[-1].usage == Usage(2, 3, 5)
        assert all(o.prompt == "go" for o in outs)
        assert remote.usage.total_tokens == 5


def test_stream_chat_skips_the_role_chunk_and_tracks_n_samples() -> None:
    def delta(
        index: int, content: str | None, finish: str | None = None, role: bool = False
    ) -> dict[str, Any]:
        d: dict[str, Any] = {"content": content} if content is not None else {}
        if role:
            d["role"] = "assistant"
        return {"id": "chat-s", "choices": [{"index": index, "delta": d, "finish_reason": finish}]}

    body = sse(delta(0, None, role=True), delta(1, None, role=True), delta(0, "A"), delta(1, "B"),
               delta(0, "a", "stop"), delta(1, "", "length"), "[DONE]")  # fmt: skip

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/chat/completions"
        return httpx.Response(200, stream=Chunks(split_odd(body, 11)))

    with make(handler) as remote:
        outs = collect(remote, [{"role": "user", "content": "hi"}], SamplingParams(n=2))
    assert [[(c.index, c.text, c.finish_reason) for c in o.outputs] for o in outs] == [
        [(0, "A", None)], [(1, "B", None)], [(0, "a", "stop")], [(1, "", "length")],
    ]  # fmt: skip
    assert [o.finished for o in outs] == [False, False, False, True]
    assert outs[-1].usage is None


def test_stream_error_mid_stream_is_raised_after_the_deltas_before_it() -> None:
    body = sse(
        chunk("Hel"), {"error": {"message": "engine died", "type": "server_error", "code": 500}}, "[DONE]"
    )

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=Chunks([body]))

    async def main(remote: RemoteLLM) -> list[str]:
        got: list[str] = []
        with pytest.raises(RemoteError, match="engine died") as info:
            async for out in remote.stream("x"):
                got.append(out.outputs[0].text)
        assert info.value.status_code == 500
        return got

    with make(handler) as remote:
        assert asyncio.run(main(remote)) == ["Hel"]


def test_stream_cut_off_without_done_is_an_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=Chunks([sse(chunk("Hel"))]))

    with make(handler) as remote, pytest.raises(RemoteError, match="ended before the request finished"):
        collect(remote, "x")


def test_stream_failures_before_the_first_event_are_retried() -> None:
    handler, times = scripted(error(503, "busy"), httpx.ConnectError("refused"))

    def wrapped(request: httpx.Request) -> httpx.Response:
        if len(times) < 2:
            return handler(request)
        times.append(time.monotonic())
        return httpx.Response(200, stream=Chunks([sse(chunk("ok", "stop"), "[DONE]")]))

    with make(wrapped, max_retries=2) as remote:
        assert [o.outputs[0].text for o in collect(remote, "x")] == ["ok"]
    assert len(times) == 3
    with make(scripted(error(400, "no"))[0]) as remote, pytest.raises(RemoteInvalidRequestError, match="no"):
        collect(remote, "x")


class Breaks(Chunks):
    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.pieces[0]
        raise httpx.ReadError("connection reset")


def test_a_stream_that_breaks_after_events_is_not_replayed() -> None:
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(200, stream=Breaks([sse(chunk("Hel"))]))

    async def main(remote: RemoteLLM) -> list[str]:
        got: list[str] = []
        with pytest.raises(RemoteConnectionError, match="broke off"):
            async for out in remote.stream("x"):
                got.append(out.outputs[0].text)
        return got

    with make(handler, max_retries=3) as remote:
        assert asyncio.run(main(remote)) == ["Hel"]
    assert len(calls) == 1


def test_closing_a_stream_early_closes_the_response() -> None:
    bodies: list[Chunks] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(Chunks([sse(chunk(f"t{i}")) for i in range(100)], pause=0.01, then_wait=True))
        return httpx.Response(200, stream=bodies[-1])

    async def main(remote: RemoteLLM) -> list[str]:
        got: list[str] = []
        async with contextlib.aclosing(remote.stream("x")) as stream:
            async for out in stream:
                got.append(out.outputs[0].text)
                if len(got) == 2:
                    break
        return got

    with make(handler) as remote:
        assert asyncio.run(main(remote)) == ["t0", "t1"]
        assert eventually(lambda: bodies[0].closed_flag)


# -- loglikelihood ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm(model_dir: Path) -> Iterator[LLM]:
    engine = LLM(model_dir, num_kv_blocks=64)
    yield engine
    engine.close()


def echo_body(llm: LLM, prompt: str | list[int], generated: int, style: str) -> dict[str, Any]:
    """What an OpenAI-style server answers to echo + logprobs=1, computed with a real model.

    ``style="vllm"`` spells tokens as vLLM does (a lone byte of a character is U+FFFD, special tokens by
    name); ``style="openai"`` spells a token that is part of a character as ``bytes:\\x..``.
    """
    tok = llm.tokenizer
    ids = tok.encode(prompt) if isinstance(prompt, str) else list(prompt)
    model = llm.engine.model
    with torch.inference_mode():
        logits = model(torch.tensor([ids]), torch.arange(len(ids))[None], DenseAttention())[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)

    def spell(token_id: int) -> str:
        text = tok.decode([token_id])
        if style == "openai" and "\ufffd" in text:
            piece = tok.id_to_token(token_id) or ""
            data = bytes(_GPT2_BYTES[ch] for ch in piece)
            return "bytes:" + "".join(f"\\x{b:02x}" for b in data)
        return text

    tokens = [spell(t) for t in ids]
    offsets, position = [], 0
    for text in tokens:
        offsets.append(position)
        position += len(text)
    token_logprobs: list[float | None] = [None]
    top: list[dict[str, float] | None] = [None]
    for i in range(1, len(ids)):
        row = logprobs[i - 1]
        best = int(row.argmax())
        token_logprobs.append(float(row[ids[i]]))
        top.append({spell(best): float(row[best]), tokens[i]: float(row[ids[i]])})
    n = len(ids) + generated
    for _ in range(generated):  # a made-up generated token, which the client must drop
        tokens.append("zz")
        offsets.append(position)
        token_logprobs.append(-1.0)
        top.append({"zz": -1.0})
    text = prompt if isinstance(prompt, str) else tok.decode(ids)
    return {
        "id": "cmpl-e",
        "choices": [{"index": 0, "text": text + "zz" * generated, "finish_reason": "length", "logprobs": {
            "tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets,
        }}],
        "usage": {"prompt_tokens": len(ids), "completion_tokens": generated, "total_tokens": n},
    }  # fmt: skip


# The byte-level alphabet from an independent reference (transformers' copy of GPT-2's).
_GPT2_BYTES = {char: byte for byte, char in bytes_to_unicode().items()}


def test_byte_level_alphabet_is_gpt2s() -> None:
    from tokenizers.pre_tokenizers import ByteLevel

    assert bytes_to_unicode() == BYTE_TO_CHAR
    assert {byte: char for char, byte in CHAR_TO_BYTE.items()} == BYTE_TO_CHAR
    assert set(ByteLevel.alphabet()) == set(CHAR_TO_BYTE)


def echo_server(
    llm: LLM, style: str = "vllm", refuse_zero: bool = False
) -> tuple[Handler, list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append(body)
        assert body["echo"] is True and body["logprobs"] == 1 and body["temperature"] == 0
        if refuse_zero and body["max_tokens"] == 0:
            return error(400, "max_tokens must be at least 1")
        return httpx.Response(200, json=echo_body(llm, body["prompt"], body["max_tokens"], style))

    return handler, seen


TEXT_PAIRS = [
    ("the quick brown", " fox"),  # the space is its own token here
    ("the quick brown fox", " jumps over a lazy dog."),
    ("seven wizards quietly", " hex jovial zebras"),
    ("a lazy dog while", " the"),
    ("the quick", " brown fox jumps over the lazy dog while seven wizards"),
    ("caf\u00e9 \u65e5\u672c the quick", " fox"),  # characters split over byte tokens in the context
]


@pytest.mark.parametrize("style", ["vllm", "openai"])
def test_loglikelihood_matches_the_local_engine(llm: LLM, style: str) -> None:
    tok = llm.tokenizer
    (greedy,) = llm.generate("the quick brown", SamplingParams(temperature=0, max_tokens=3))
    pairs = [*TEXT_PAIRS, ("the quick brown", greedy.outputs[0].text)]
    for context, continuation in pairs:  # the boundary falls between tokens
        ids = tok.encode(context + continuation)
        assert ids[: len(tok.encode(context))] == tok.encode(context)
    handler, seen = echo_server(llm, style)
    with make(handler, tokenizer=llm.tokenizer) as remote:
        got = remote.loglikelihood(pairs)
        assert all(body["max_tokens"] == 0 for body in seen)
        want = llm.loglikelihood(pairs)
        assert [g for _, g in got] == [w for _, w in want]
        assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in want], rel=1e-4, abs=1e-4)
        assert any(g for _, g in want) and not all(g for _, g in want)

        # Token-id pairs are sent as ids and scored as given; an empty context starts from bos.
        id_pairs = [(tok.encode("the quick"), tok.encode(" fox", add_special_tokens=False)),
                    ([], tok.encode("the lazy dog", add_special_tokens=False))]  # fmt: skip
        got_ids = remote.loglikelihood(id_pairs)
        assert seen[-1]["prompt"][0] == tok.bos_token_id or seen[-2]["prompt"][0] == tok.bos_token_id
        want_ids = llm.loglikelihood(id_pairs)
        assert [g for _, g in got_ids] == [w for _, w in want_ids]
        assert [lp for lp, _ in got_ids] == pytest.approx([lp for lp, _ in want_ids], rel=1e-4, abs=1e-4)


def test_loglikelihood_boundary_tokens_and_whitespace(llm: LLM) -> None:
    tok = llm.tokenizer
    handler, _ = echo_server(llm, "openai")
    with make(handler, tokenizer=tok) as remote:
        # A token spanning the boundary belongs to the continuation: "b|rown" is scored from the "br" token.
        whole = tok.encode("the quick brown")
        texts = [tok.decode([t]) for t in whole]
        split = texts.index("br")
        (got,) = remote.loglikelihood([("the quick b", "rown")])
        (want,) = llm.loglikelihood([(whole[:split], whole[split:])])
        assert got[0] == pytest.approx(want[0], rel=1e-4, abs=1e-4) and got[1] == want[1]
        # Characters split over byte tokens in the continuation: exact when the server spells such
        # tokens as bytes (OpenAI, lmstack serve).
        pair = ("the quick brown", " caf\u00e9 \u65e5\u672c")
        ((got_lp, got_greedy),) = remote.loglikelihood([pair])
        ((want_lp, want_greedy),) = llm.loglikelihood([pair])
        assert got_lp == pytest.approx(want_lp, rel=1e-4, abs=1e-4) and got_greedy == want_greedy
        # The context's trailing whitespace moves to the continuation, as in lm-evaluation-harness.
        (got,) = remote.loglikelihood([("the quick ", "brown")])
        (want,) = llm.loglikelihood([("the quick", " brown")])
        assert got[0] == pytest.approx(want[0], rel=1e-4, abs=1e-4) and got[1] == want[1]
        with pytest.raises(InvalidRequestError, match="empty"):
            remote.loglikelihood([("context", "")])
        with pytest.raises(InvalidRequestError, match="two strings"):
            remote.loglikelihood([("context", [1, 2])])  # type: ignore[list-item]
        assert remote.loglikelihood([]) == []
    with make(handler) as bare, pytest.raises(InvalidRequestError, match=r"context is empty.*tokenizer="):
        bare.loglikelihood([([], [5, 6])])


def test_loglikelihood_falls_back_to_max_tokens_1(llm: LLM) -> None:
    handler, seen = echo_server(llm, refuse_zero=True)
    pairs = TEXT_PAIRS[:2]
    with make(handler) as remote:
        got = remote.loglikelihood(pairs)
        assert [b["max_tokens"] for b in seen[-2:]] == [1, 1]
    want = llm.loglikelihood(pairs)
    assert [g for _, g in got] == [w for _, w in want]
    assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in want], rel=1e-4, abs=1e-4)


@pytest.mark.parametrize(
    "answer",
    [
        httpx.Response(200, json=completion("", "length")),  # logprobs: null
        httpx.Response(200, json=completion("", "length", logprobs={"tokens": [], "token_logprobs": []})),
        httpx.Response(
            200,
            json=completion(
                "not the prompt", logprobs={"tokens": ["x"], "token_logprobs": [-1], "top_logprobs": [None]}
            ),
        ),
        error(400, "echo is not supported with logprobs for this model"),
        error(404, "This is a chat model and not supported in the v1/completions endpoint."),
    ],
    ids=["null", "empty", "no-echo", "400-echo", "404-chat-model"],
)
def test_loglikelihood_without_prompt_logprobs_is_a_clear_error(answer: httpx.Response) -> None:
    handler, times = scripted(answer)
    with make(handler) as remote, pytest.raises(RemoteUnsupportedError) as info:
        remote.loglikelihood([("the prompt", " here")])
    message = str(info.value)
    assert "http://testserver:8000/v1" in message and "echo" in message and "loglikelihood" in message
    assert len(times) == 1


def test_loglikelihood_other_refusals_keep_their_error() -> None:
    handler, _ = scripted(error(400, "the prompt is too long for the context"))
    with make(handler) as remote, pytest.raises(RemoteInvalidRequestError, match="too long"):
        remote.loglikelihood([("the prompt", " here")])


def test_async_loglikelihood(llm: LLM) -> None:
    handler, _ = echo_server(llm)
    with make(handler) as remote:
        got = asyncio.run(remote.aloglikelihood(TEXT_PAIRS[:3]))
    assert [g for _, g in got] == [w for _, w in llm.loglikelihood(TEXT_PAIRS[:3])]
