"""Bad requests: each gets a clear 4xx in OpenAI's error shape, and none disturbs a concurrent request."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from lmstack.infer import LLM, SamplingParams

MODEL = "tiny"
KEY = {"Authorization": "Bearer sk-test"}
CHAT = [{"role": "user", "content": "hi"}]
LONG = "the quick brown fox " * 80  # well over the tiny model's 256-token context
DEEP = 100_000  # levels of nesting: far past Python's recursion limit


def _body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


@dataclass(frozen=True)
class Case:
    """A bad request and the error it must get."""

    name: str
    path: str
    body: bytes | None
    status: int = 400
    param: str | None = None
    code: str | None = None
    words: tuple[str, ...] = ()
    method: str = "POST"

    @property
    def headers(self) -> dict[str, str]:
        return {"Content-Type": "application/json"} if self.body is not None else {}


COMPLETIONS, CHAT_PATH = "/v1/completions", "/v1/chat/completions"
CONTEXT = "context_length_exceeded"

CASES = [
    Case(
        "malformed-json",
        COMPLETIONS,
        b'{"model": "tiny", "prompt": ',
        code="invalid_json",
        words=("not valid JSON",),
    ),
    Case("not-an-object", CHAT_PATH, b"[1, 2]", code="invalid_json", words=("JSON object",)),
    Case("empty-body", COMPLETIONS, b"", code="invalid_json", words=("empty",)),
    Case(
        "invalid-utf8",
        COMPLETIONS,
        b'{"model": "tiny", "prompt": "\xff\xfe"}',
        code="invalid_json",
        words=("UTF-8",),
    ),
    Case(
        "deeply-nested-json",
        COMPLETIONS,
        b"[" * DEEP + b"]" * DEEP,
        code="invalid_json",
        words=("nested too deeply",),
    ),
    Case(
        "deeply-nested-field",
        COMPLETIONS,
        b'{"model": "tiny", "prompt": ' + b"[" * DEEP + b"]" * DEEP + b"}",
        code="invalid_json",
        words=("nested too deeply",),
    ),
    Case(
        "lone-surrogate",
        COMPLETIONS,
        b'{"model": "tiny", "prompt": "\\ud800"}',
        code="invalid_json",
        words=("surrogate",),
    ),
    Case(
        "string-max-tokens",
        COMPLETIONS,
        _body(model=MODEL, prompt="a", max_tokens="5"),
        param="max_tokens",
        words=("max_tokens", "integer"),
    ),
    Case(
        "string-temperature",
        CHAT_PATH,
        _body(model=MODEL, messages=CHAT, temperature="hot"),
        param="temperature",
        words=("temperature",),
    ),
    Case("bool-n", COMPLETIONS, _body(model=MODEL, prompt="a", n=True), param="n"),
    Case(
        "prompt-wrong-type",
        COMPLETIONS,
        _body(model=MODEL, prompt={"text": "a"}),
        param="prompt",
        words=("prompt must be",),
    ),
    Case("messages-not-list", CHAT_PATH, _body(model=MODEL, messages="hi"), param="messages"),
    Case("empty-messages", CHAT_PATH, _body(model=MODEL, messages=[]), param="messages"),
    Case(
        "bad-role",
        CHAT_PATH,
        _body(model=MODEL, messages=[{"role": "wizard", "content": "x"}]),
        param="messages.0.role",
        words=("role",),
    ),
    Case(
        "image-part",
        CHAT_PATH,
        _body(model=MODEL, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
        param="messages.0.content",
        words=("text parts",),
    ),
    Case("missing-model", COMPLETIONS, _body(prompt="a"), param="model", words=("missing", "model")),
    Case(
        "unknown-field",
        COMPLETIONS,
        _body(model=MODEL, prompt="a", temprature=0),
        param="temprature",
        code="unknown_field",
        words=("unknown field", "temprature"),
    ),
    Case(
        "negative-max-tokens",
        COMPLETIONS,
        _body(model=MODEL, prompt="a", max_tokens=-1),
        param="max_tokens",
        words=("max_tokens", "greater than or equal to 0"),
    ),
    Case(
        "huge-max-tokens",
        COMPLETIONS,
        _body(model=MODEL, prompt="a", max_tokens=10**9),
        param="prompt",
        code=CONTEXT,
        words=("256", "1000000000"),
    ),
    Case(
        "chat-huge-max-tokens",
        CHAT_PATH,
        _body(model=MODEL, messages=CHAT, max_completion_tokens=10**6),
        param="messages",
        code=CONTEXT,
        words=("256",),
    ),
    Case(
        "zero-chat-max-tokens",
        CHAT_PATH,
        _body(model=MODEL, messages=CHAT, max_tokens=0),
        param="max_tokens",
        words=("at least 1",),
    ),
    Case(
        "huge-n", COMPLETIONS, _body(model=MODEL, prompt="a", n=100000), param="n", words=("n must be", "128")
    ),
    Case(
        "bad-top-p", CHAT_PATH, _body(model=MODEL, messages=CHAT, top_p=1.5), param="top_p", words=("top_p",)
    ),
    Case(
        "huge-logprobs",
        COMPLETIONS,
        _body(model=MODEL, prompt="a", logprobs=50),
        param="logprobs",
        words=("logprobs", "20"),
    ),
    Case(
        "huge-top-logprobs",
        CHAT_PATH,
        _body(model=MODEL, messages=CHAT, logprobs=True, top_logprobs=50),
        param="top_logprobs",
        words=("20",),
    ),
    Case(
        "top-logprobs-without-logprobs",
        CHAT_PATH,
        _body(model=MODEL, messages=CHAT, top_logprobs=2),
        param="top_logprobs",
        words=("logprobs",),
    ),
    Case(
        "prompt-too-long",
        COMPLETIONS,
        _body(model=MODEL, prompt=LONG, max_tokens=4),
        param="prompt",
        code=CONTEXT,
        words=("maximum context length is 256", "the prompt has"),
    ),
    Case(
        "chat-too-long",
        CHAT_PATH,
        _body(model=MODEL, messages=[{"role": "user", "content": LONG}]),
        param="messages",
        code=CONTEXT,
        words=("256",),
    ),
    Case(
        "token-ids-outside-vocab",
        COMPLETIONS,
        _body(model=MODEL, prompt=[1, 2, 99999]),
        param="prompt",
        words=("vocabulary",),
    ),
    Case(
        "long-token-id-prompt",  # one prompt of 300 ids, not a batch of 300
        COMPLETIONS,
        _body(model=MODEL, prompt=[5] * 300),
        param="prompt",
        code=CONTEXT,
        words=("maximum context length is 256", "has 300 tokens"),
    ),
    Case(
        "batch-too-large",
        COMPLETIONS,
        _body(model=MODEL, prompt=["a"] * 257),
        param="prompt",
        words=("at most 256 prompts", "257"),
    ),
    Case(
        "token-ids-outside-vocab-in-a-batch",
        COMPLETIONS,
        _body(model=MODEL, prompt=[[1, 2], [3, 99999]]),
        param="prompt",
        words=("prompt 1:", "vocabulary"),
    ),
    Case(
        "token-ids-outside-vocab-streamed",  # refused before the stream starts
        COMPLETIONS,
        _body(model=MODEL, prompt=[1, 99999], stream=True),
        param="prompt",
        words=("vocabulary",),
    ),
    Case(
        "seed-over-int64",
        COMPLETIONS,
        _body(model=MODEL, prompt="a", seed=2**63),
        param="seed",
        words=("seed", "9223372036854775807"),
    ),
    Case(
        "seed-under-int64",
        CHAT_PATH,
        _body(model=MODEL, messages=CHAT, seed=-(2**63) - 1),
        param="seed",
        words=("seed",),
    ),
    Case("empty-stop-string", COMPLETIONS, _body(model=MODEL, prompt="a", stop=[""]), param="stop[0]"),
    Case(
        "legacy-functions",
        CHAT_PATH,
        _body(model=MODEL, messages=CHAT, functions=[{"name": "f", "parameters": {}}]),
        param="functions",
        code="unsupported_parameter",
        words=("not supported", "tools"),
    ),
    Case(
        "tool-without-function",
        CHAT_PATH,
        _body(model=MODEL, messages=CHAT, tools=[{"type": "function"}]),
        param="tools",
        words=("tools[0].function",),
    ),
    Case(
        "invalid-json-schema",
        CHAT_PATH,
        _body(
            model=MODEL,
            messages=CHAT,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}},
        ),
        param="response_format",
        words=("not a valid JSON schema",),
    ),
    Case(
        "stream-options-without-stream",
        CHAT_PATH,
        _body(model=MODEL, messages=CHAT, stream_options={"include_usage": True}),
        param="stream_options",
    ),
    Case(
        "unknown-model",
        COMPLETIONS,
        _body(model="gpt-9", prompt="a"),
        status=404,
        param="model",
        code="model_not_found",
        words=("gpt-9", "tiny"),
    ),
    Case(
        "unknown-model-card",
        "/v1/models/gpt-9",
        None,
        status=404,
        param="model",
        code="model_not_found",
        method="GET",
    ),
    Case(
        "unknown-route",
        "/v1/engines",
        None,
        status=404,
        code="404",
        words=("no such endpoint",),
        method="GET",
    ),
    Case("wrong-method", COMPLETIONS, None, status=405, code="405", words=("not allowed",), method="GET"),
    Case(
        "body-too-large",
        COMPLETIONS,
        b'{"prompt": "' + b"x" * (2 << 20) + b'"}',
        status=413,
        code="request_too_large",
        words=("limit",),
    ),
]

AUTH_CASES = [
    ("missing-key", {}, ["missing API key", "Bearer"]),
    ("wrong-key", {"Authorization": "Bearer nope"}, ["invalid API key"]),
    ("wrong-scheme", {"Authorization": "Basic sk-test"}, ["invalid API key"]),
]


def _check_error(
    response: httpx.Response, status: int, param: str | None, code: str | None, words: Sequence[str]
):
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    for word in words:
        assert word in error["message"], error["message"]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_request_gets_a_clear_openai_error(live, case: Case) -> None:
    with live.http() as client:
        response = client.request(case.method, case.path, content=case.body, headers=case.headers)
    _check_error(response, case.status, case.param, case.code, case.words)


@pytest.mark.parametrize(("headers", "words"), [c[1:] for c in AUTH_CASES], ids=[c[0] for c in AUTH_CASES])
def test_missing_or_wrong_api_key_is_401(live, headers, words) -> None:
    response = httpx.post(
        f"{live.base_url}/v1/completions", json={"model": MODEL, "prompt": "a"}, headers=headers
    )
    _check_error(response, 401, None, "invalid_api_key", words)
    assert httpx.get(f"{live.base_url}/v1/models", headers=headers).status_code == 401


def test_health_and_metrics_need_no_key(live) -> None:
    assert httpx.get(f"{live.base_url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{live.base_url}/metrics").status_code == 200


def test_bad_requests_do_not_disturb_a_concurrent_stream(live, reference: LLM) -> None:
    prompt = "seven wizards quietly"
    [expected] = reference.generate([prompt], SamplingParams(temperature=0, max_tokens=40))

    async def run() -> tuple[str, list[httpx.Response]]:
        async with httpx.AsyncClient(base_url=live.base_url, headers=KEY, timeout=60) as client:
            streaming = asyncio.Event()

            async def good() -> str:
                body = {"model": MODEL, "prompt": prompt, "max_tokens": 40, "temperature": 0, "stream": True}
                parts = []
                async with client.stream("POST", "/v1/completions", json=body) as response:
                    assert response.status_code == 200
                    async for line in response.aiter_lines():
                        if line.startswith("data: {"):
                            parts.append(json.loads(line[6:])["choices"][0]["text"])
                            streaming.set()
                return "".join(parts)

            stream = asyncio.create_task(good())
            await asyncio.wait_for(streaming.wait(), 60)  # the bad requests arrive mid-stream
            bad = [
                client.request(case.method, case.path, content=case.body, headers={**case.headers, **KEY})
                for case in CASES
            ]
            responses = await asyncio.gather(*bad)
            return await stream, responses

    text, responses = asyncio.run(run())
    assert text == expected.outputs[0].text
    for case, response in zip(CASES, responses, strict=True):
        assert response.status_code == case.status, (case.name, response.text)
    live.wait_idle()


def test_null_fields_take_their_defaults(live) -> None:
    nulls = ("n", "max_tokens", "stream", "logprobs", "temperature", "stop", "echo", "stream_options")
    body = {"model": MODEL, "prompt": "the", "ignore_eos": True, **dict.fromkeys(nulls)}
    with live.http() as client:
        response = client.post("/v1/completions", json=body)
        empty = client.post("/v1/completions", json={"model": MODEL, "prompt": "the", "max_tokens": 0})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 16  # OpenAI's legacy default
    assert empty.status_code == 200
    assert empty.json()["choices"][0]["text"] == "" and empty.json()["usage"]["completion_tokens"] == 0


def test_bad_json_is_answered_without_a_traceback_in_the_log(live, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    deep = [case for case in CASES if case.name.startswith("deeply-nested")]
    with live.http() as client:
        for case in deep:
            response = client.post(case.path, content=case.body, headers=case.headers)
            _check_error(response, 400, None, "invalid_json", case.words)
    logged = [record for record in caplog.records if record.exc_info or record.levelno >= logging.ERROR]
    assert not logged, [record.getMessage() for record in logged]
    assert "Traceback" not in caplog.text


def test_a_chat_over_the_context_without_max_tokens_says_what_was_computed(live) -> None:
    with live.http() as client:
        response = client.post(
            CHAT_PATH, json={"model": MODEL, "messages": [{"role": "user", "content": LONG}]}
        )
    _check_error(response, 400, "messages", CONTEXT, ("no room", "256"))
    message = response.json()["error"]["message"]
    assert "max_tokens" not in message  # the client did not send it
    prompt_tokens = len(live.llm.render_chat([{"role": "user", "content": LONG}]))
    assert f"{prompt_tokens} tokens" in message


def test_the_seed_range_is_openais(live) -> None:
    with live.http() as client:
        for seed in (2**63 - 1, -(2**63)):
            body = {"model": MODEL, "prompt": "the", "max_tokens": 2, "seed": seed}
            response = client.post(COMPLETIONS, json=body)
            assert response.status_code == 200, response.text
