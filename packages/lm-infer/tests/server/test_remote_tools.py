"""Tool calls and structured outputs through the LLM protocol: the local LLM, and RemoteLLM against a server.

Greedy decoding under the same constraint gives the same calls locally and remotely; every call's
arguments and every JSON reply are checked with ``jsonschema``. ``reference`` is a local LLM on the
model the ``live`` server serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from lmstack.infer import LLM, InvalidRequestError, RemoteInvalidRequestError, RemoteLLM, SamplingParams

CHAT = [{"role": "user", "content": "hi"}]
SCHEMAS: dict[str, dict[str, Any]] = {
    "search": {
        "type": "object",
        "properties": {
            "query": {"type": "string", "maxLength": 12},
            "top_k": {"type": "integer", "minimum": 1, "maximum": 5},
            "sources": {"type": "array", "items": {"enum": ["web", "wiki"]}, "maxItems": 2},
        },
        "required": ["query", "top_k"],
    },
    "add": {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"],
    },
}
TOOLS = [
    {"type": "function", "function": {"name": name, "parameters": schema}} for name, schema in SCHEMAS.items()
]
ANSWER = {
    "type": "object",
    "properties": {"answer": {"enum": ["yes", "no"]}, "score": {"type": "number"}},
    "required": ["answer", "score"],
    "additionalProperties": False,
}
GREEDY = SamplingParams(temperature=0, max_tokens=100)


def _calls(out: Any) -> list[tuple[str, str]]:
    """A sample's calls as (name, arguments), each checked against its tool's schema."""
    calls = out.tool_calls
    assert calls is not None
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
    return [(call.name, call.arguments) for call in calls]


@pytest.fixture
def local(reference: LLM) -> LLM:
    return reference


@pytest.fixture
def remote(live, model_dir: Path) -> Iterator[RemoteLLM]:
    with RemoteLLM(live.base_url, api_key="sk-test", tokenizer=model_dir, max_retries=0) as client:
        yield client


# -- the local LLM ------------------------------------------------------------------------------------


def test_local_chat_with_tools_required_and_named(local: LLM) -> None:
    [required] = local.chat(CHAT, GREEDY, tools=TOOLS, tool_choice="required")
    out = required.outputs[0]
    assert _calls(out) and out.text == "" and out.finish_reason == "stop"
    [single] = local.chat(CHAT, GREEDY, tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    assert len(_calls(single.outputs[0])) == 1
    named = local.chat([CHAT, CHAT], SamplingParams(max_tokens=40, seed=0, n=2), tools=TOOLS,
                       tool_choice={"type": "function", "function": {"name": "add"}})  # fmt: skip
    for request in named:
        for sample in request.outputs:
            assert [name for name, _ in _calls(sample)] == ["add"] and sample.text == ""


def test_local_chat_response_format_and_no_tools(local: LLM) -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER}}
    [out] = local.chat(
        CHAT, SamplingParams(max_tokens=40, seed=2, guided_json_fit=True), response_format=response_format
    )
    jsonschema.validate(json.loads(out.outputs[0].text), ANSWER)
    assert out.outputs[0].tool_calls is None  # no tools offered
    [plain] = local.chat(CHAT, SamplingParams(temperature=0, max_tokens=8))
    [expected] = local.generate([local.render_chat(CHAT)], SamplingParams(temperature=0, max_tokens=8))
    assert plain.outputs[0].text == expected.outputs[0].text and plain.outputs[0].tool_calls is None


def test_local_chat_refuses_bad_tool_input_before_generating(local: LLM) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        local.chat(CHAT, GREEDY, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})
    assert caught.value.param == "tool_choice"
    with pytest.raises(InvalidRequestError) as caught:
        local.chat(CHAT, SamplingParams(guided_regex="(?<=a)b"))
    assert caught.value.param == "guided_regex"
    assert local.engine.num_requests == 0
    with pytest.raises(InvalidRequestError) as caught:
        LLM(local.engine.model, local.tokenizer, tool_call_parser="nope")
    assert caught.value.param == "tool_call_parser"


# -- RemoteLLM against lmstack serve -----------------------------------------------------------------


def test_remote_chat_with_tools_equals_local(remote: RemoteLLM, local: LLM) -> None:
    [got] = remote.chat(CHAT, GREEDY, tools=TOOLS, tool_choice="required")
    [want] = local.chat(CHAT, GREEDY, tools=TOOLS, tool_choice="required")
    assert _calls(got.outputs[0]) == _calls(want.outputs[0])
    assert got.outputs[0].text == "" and got.outputs[0].finish_reason == "tool_calls"
    named = {"type": "function", "function": {"name": "search"}}
    [got] = asyncio.run(remote.achat(CHAT, GREEDY, tools=TOOLS, tool_choice=named))
    assert [name for name, _ in _calls(got.outputs[0])] == ["search"]


def test_remote_chat_without_calls_has_an_empty_list(remote: RemoteLLM, local: LLM) -> None:
    params = SamplingParams(temperature=0, max_tokens=8)
    [got] = remote.chat(CHAT, params, tools=TOOLS, tool_choice="none")
    [want] = local.chat(CHAT, params, tools=TOOLS, tool_choice="none")
    assert got.outputs[0].text == want.outputs[0].text
    [auto] = remote.chat(CHAT, params, tools=TOOLS)  # "auto": the random model writes no call
    assert auto.outputs[0].tool_calls == [] and auto.outputs[0].text == want.outputs[0].text.strip()
    [untooled] = remote.chat(CHAT, params)
    assert untooled.outputs[0].tool_calls is None


def test_remote_stream_reassembles_tool_call_deltas(remote: RemoteLLM, local: LLM) -> None:
    body = {"tools": TOOLS, "tool_choice": "required"}

    async def collect() -> list[Any]:
        async with contextlib.aclosing(remote.stream(CHAT, GREEDY, extra_body=body)) as stream:
            return [out async for out in stream]

    outs = asyncio.run(collect())
    last = outs[-1].outputs[0]
    assert outs[-1].finished and last.finish_reason == "tool_calls"
    [want] = local.chat(CHAT, GREEDY, tools=TOOLS, tool_choice="required")
    assert _calls(last) == _calls(want.outputs[0])
    assert all(o.outputs[0].tool_calls is None for o in outs[:-1] if o.outputs)


def test_remote_response_format_and_guided_generate(remote: RemoteLLM) -> None:
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": ANSWER, "strict": True},
    }
    [out] = remote.chat(
        CHAT, SamplingParams(max_tokens=40, seed=5, guided_json_fit=True), response_format=response_format
    )
    jsonschema.validate(json.loads(out.outputs[0].text), ANSWER)
    pattern = r"(red|green) [0-9]{2,4}"
    outs = remote.generate(["the", "a lazy dog"], SamplingParams(max_tokens=20, seed=1, guided_regex=pattern))
    for request in outs:
        assert re.fullmatch(pattern, request.outputs[0].text), request.outputs[0].text
    [choice] = remote.generate("the", SamplingParams(max_tokens=10, guided_choice=["left", "right"]))
    assert choice.outputs[0].text in ("left", "right")


def test_remote_errors_name_the_field(remote: RemoteLLM) -> None:
    with pytest.raises(RemoteInvalidRequestError) as caught:
        remote.chat(CHAT, GREEDY, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})
    assert caught.value.param == "tool_choice" and caught.value.status_code == 400
    with pytest.raises(RemoteInvalidRequestError) as caught:
        remote.generate("the", SamplingParams(max_tokens=4, guided_regex="(?<=a)b"))
    assert caught.value.param == "guided_regex"
