"""Structured outputs and tool calling through the real server and the official openai client.

The tiny model has random weights: without a constraint it would never write JSON, so every valid
output here is the grammar's doing. Outputs are checked with ``json.loads`` and ``jsonschema``.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from lmstack.core import ConfigError, Tokenizer
from lmstack.infer import LLM, SamplingParams
from lmstack.infer.server import ServerConfig

MODEL = "tiny"
KEY = {"Authorization": "Bearer sk-test"}
CHAT = [{"role": "user", "content": "hi"}]

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10}, "zip": {"type": "integer"}},
            "required": ["city"],
        },
    },
    "required": ["name", "role", "address"],
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 14}},
            "required": ["zone"],
        },
    },
}
TOOLS = [WEATHER, CLOCK]
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}

# A Hermes-style tool template (Qwen2.5's layout, written for these tests): tools in a system turn,
# calls as <tool_call> JSON, results as <tool_response> in a user turn.
HERMES = (
    "{%- if tools %}<|im_start|>system\nYou may call functions:\n<tools>\n"
    "{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}\n</tools>\n"
    'Answer with <tool_call>\n{"name": <name>, "arguments": <object>}\n</tool_call><|im_end|>\n{% endif %}'
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant\n"
    "{%- if message.content %}{{ message.content }}{% endif %}"
    "{%- for call in message.tool_calls %}\n<tool_call>\n"
    '{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}\n</tool_call>'
    "{%- endfor %}<|im_end|>\n"
    "{%- elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}\n"
    "</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _check_call(name: str, arguments: str) -> None:
    assert name in SCHEMAS, name
    jsonschema.validate(json.loads(arguments), SCHEMAS[name])


def _stream_chat(client: openai.OpenAI, **request: Any) -> tuple[str, dict[int, dict[str, Any]], str | None]:
    """Content, tool calls reassembled by index, and the finish reason of a streamed chat reply."""
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(model=MODEL, stream=True, **request):
        for choice in chunk.choices:
            delta = choice.delta
            content += delta.content or ""
            for part in delta.tool_calls or []:
                if part.index not in calls:  # the first delta of a call names it
                    assert part.id and part.type == "function" and part.function.name, part
                    calls[part.index] = {"id": part.id, "name": part.function.name, "arguments": ""}
                else:
                    assert part.id is None and part.function.name is None, part
                calls[part.index]["arguments"] += part.function.arguments or ""
            finish = choice.finish_reason or finish
    return content, calls, finish


@pytest.fixture(scope="module")
def hermes_dir(long_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 2k-context tiny model (tools make long prompts) with the Hermes-style tool template."""
    out = tmp_path_factory.mktemp("hermes") / "model"
    shutil.copytree(long_model_dir, out)
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = HERMES
    config_path.write_text(json.dumps(config))
    return out


# -- response_format -------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_response_format_validates(live, stream: bool) -> None:
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": PERSON, "strict": True},
    }
    client = live.openai()
    for seed in range(3):
        request = {"messages": CHAT, "max_tokens": 120, "seed": seed, "response_format": response_format,
                   "extra_body": {"guided_json_fit": True}}  # fmt: skip
        if stream:
            content, calls, finish = _stream_chat(client, **request)
            assert not calls
        else:
            reply = client.chat.completions.create(model=MODEL, **request)
            content, finish = reply.choices[0].message.content, reply.choices[0].finish_reason
            assert reply.choices[0].message.tool_calls is None
        value = json.loads(content)
        jsonschema.validate(value, PERSON)
        assert set(value) <= set(PERSON["properties"])  # strict: no other keys
        assert finish == "stop"


@pytest.mark.parametrize("stream", [False, True])
def test_json_object_response_format_is_an_object(live, stream: bool) -> None:
    client = live.openai()
    request = {
        "messages": CHAT,
        "max_tokens": 60,
        "seed": 1,
        "response_format": {"type": "json_object"},
        "n": 2,
        "extra_body": {"guided_json_fit": True},  # a random model's JSON completes within max_tokens
    }
    if stream:
        texts = ["", ""]
        for chunk in client.chat.completions.create(model=MODEL, stream=True, **request):
            for choice in chunk.choices:
                texts[choice.index] += choice.delta.content or ""
    else:
        reply = client.chat.completions.create(model=MODEL, **request)
        texts = [choice.message.content for choice in reply.choices]
    for text in texts:
        assert isinstance(json.loads(text), dict), text


# -- tools ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("parallel", [True, False])
def test_tool_choice_required_returns_valid_calls_streamed_and_not(live, parallel: bool) -> None:
    client = live.openai()
    request = {"messages": CHAT, "max_tokens": 120, "temperature": 0, "tools": TOOLS,
               "tool_choice": "required", "parallel_tool_calls": parallel}  # fmt: skip
    reply = client.chat.completions.create(model=MODEL, **request)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert calls and (parallel or len(calls) == 1)
    for call in calls:
        assert call.type == "function" and re.fullmatch(r"call_[A-Za-z0-9]{24}", call.id)
        _check_call(call.function.name, call.function.arguments)
    assert len({call.id for call in calls}) == len(calls)

    content, streamed, finish = _stream_chat(client, **request)
    assert finish == "tool_calls" and not content
    # Greedy: the stream carries the same calls, piece by piece.
    assert [(c["name"], c["arguments"]) for _, c in sorted(streamed.items())] == [
        (call.function.name, call.function.arguments) for call in calls
    ]


@pytest.mark.parametrize("stream", [False, True])
def test_a_named_function_is_called_with_valid_arguments(live, stream: bool) -> None:
    client = live.openai()
    request = {"messages": CHAT, "max_tokens": 60, "seed": 3, "tools": TOOLS,
               "tool_choice": {"type": "function", "function": {"name": "get_time"}}}  # fmt: skip
    if stream:
        content, streamed, finish = _stream_chat(client, **request)
        calls = [(c["name"], c["arguments"]) for _, c in sorted(streamed.items())]
    else:
        reply = client.chat.completions.create(model=MODEL, **request)
        message, finish = reply.choices[0].message, reply.choices[0].finish_reason
        content = message.content
        calls = [(c.function.name, c.function.arguments) for c in message.tool_calls]
    assert not content and finish == "tool_calls"
    assert [name for name, _ in calls] == ["get_time"]
    _check_call(*calls[0])


def test_a_tool_call_round_trip_renders_through_the_template(start_server, hermes_dir: Path) -> None:
    arguments = {"city": "paris", "unit": "c"}
    history = [
        {"role": "user", "content": "weather in paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": json.dumps(arguments)}}
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    ]  # fmt: skip
    # What the template must render: the arguments as an object (templates `tojson` them).
    rendered = [dict(m) for m in history]
    rendered[1] = {**history[1], "content": "", "tool_calls": [
        {**history[1]["tool_calls"][0], "function": {"name": "get_weather", "arguments": arguments}}
    ]}  # fmt: skip
    tokenizer = Tokenizer.from_pretrained(hermes_dir)
    text = tokenizer.apply_chat_template(rendered, tools=[WEATHER], add_generation_prompt=True)
    assert isinstance(text, str)
    assert '"arguments": {"city": "paris", "unit": "c"}' in text and "<tool_response>" in text
    assert '"name": "get_weather"' in text.split("<|im_start|>user")[0]  # the tools' system turn
    with start_server(model=hermes_dir) as server:
        reply = server.openai().chat.completions.create(
            model=MODEL, messages=history, tools=[WEATHER], max_tokens=4, temperature=0
        )
    assert reply.usage.prompt_tokens == len(tokenizer.encode(text, add_special_tokens=False))
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_tool_choice_auto_returns_plain_text_as_content(start_server, hermes_dir: Path) -> None:
    tokenizer = Tokenizer.from_pretrained(hermes_dir)
    prompt = tokenizer.apply_chat_template(CHAT, tools=TOOLS, add_generation_prompt=True)
    reference = LLM(hermes_dir)
    try:
        [expected] = reference.generate([prompt], SamplingParams(temperature=0, max_tokens=12))
    finally:
        reference.close()
    text = expected.outputs[0].text
    assert "<tool_call>" not in text and text.strip()  # the random model writes no call
    request = {"messages": CHAT, "tools": TOOLS, "tool_choice": "auto", "max_tokens": 12, "temperature": 0}
    with start_server(model=hermes_dir) as server:
        client = server.openai()
        reply = client.chat.completions.create(model=MODEL, **request)
        streamed = _stream_chat(client, **request)
    choice = reply.choices[0]
    assert choice.message.tool_calls is None
    assert choice.message.content == text.strip() or choice.message.content == text
    assert choice.finish_reason == expected.outputs[0].finish_reason
    assert streamed == (choice.message.content, {}, choice.finish_reason)


def test_the_servers_tool_call_parser_reads_auto_replies(
    start_server, model_dir: Path, reference: LLM
) -> None:
    with pytest.raises(ConfigError, match="tool_call_parser"):
        ServerConfig(tool_call_parser="nope")
    messages = [{"role": "user", "content": "the quick brown fox"}]
    params = SamplingParams(temperature=0, max_tokens=40)
    internlm2 = LLM(model_dir, tool_call_parser="internlm2")
    try:
        [want] = internlm2.chat(messages, params, tools=TOOLS)
    finally:
        internlm2.close()
    [hermes] = reference.chat(messages, params, tools=TOOLS)  # the default for a template without markers
    # InternLM2's markers are special tokens: its parser has them kept in the text, hermes does not.
    assert want.outputs[0].text != hermes.outputs[0].text
    with start_server(tool_call_parser="internlm2") as server:
        reply = server.openai().chat.completions.create(
            model=MODEL, messages=messages, tools=TOOLS, max_tokens=40, temperature=0
        )
    assert reply.choices[0].message.content == want.outputs[0].text
    assert reply.choices[0].message.tool_calls is None


# -- completions -------------------------------------------------------------------------------------


def test_completions_take_response_format_and_guided_fields(live) -> None:
    client = live.openai()
    reply = client.completions.create(
        model=MODEL,
        prompt="the",
        max_tokens=40,
        seed=0,
        extra_body={"response_format": {"type": "json_object"}, "guided_json_fit": True},
    )
    assert isinstance(json.loads(reply.choices[0].text), dict)
    schema = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}
    reply = client.completions.create(
        model=MODEL,
        prompt="the",
        max_tokens=120,
        extra_body={"response_format": schema, "guided_json_fit": True},
    )
    jsonschema.validate(json.loads(reply.choices[0].text), PERSON)
    reply = client.completions.create(
        model=MODEL,
        prompt=["the", "a dog"],
        max_tokens=20,
        n=2,
        extra_body={"guided_regex": r"[0-9]{3}-[a-z]{2}"},
    )
    assert len(reply.choices) == 4
    for choice in reply.choices:
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", choice.text), choice.text
    chunks = client.completions.create(model=MODEL, prompt="the", max_tokens=10, stream=True,
                                       extra_body={"guided_choice": ["yes", "no", "maybe not"]})  # fmt: skip
    assert "".join(chunk.choices[0].text for chunk in chunks) in ("yes", "no", "maybe not")


def test_chat_takes_vllm_guided_fields(live) -> None:
    client = live.openai()
    grammar = 'root ::= "(" [a-c]+ ")"'
    reply = client.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        max_tokens=10,
        extra_body={"guided_grammar": grammar, "guided_decoding_backend": "llguidance"},
    )
    assert re.fullmatch(r"\([a-c]+\)", reply.choices[0].message.content)
    reply = client.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        max_tokens=60,
        extra_body={"guided_json": json.dumps(WEATHER["function"]["parameters"]), "guided_json_fit": True},
    )
    jsonschema.validate(json.loads(reply.choices[0].message.content), SCHEMAS["get_weather"])


# -- bad requests ----------------------------------------------------------------------------------

BAD_SCHEMA = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}
# Valid JSON Schema, but llguidance's regex engine has no look-behind: refused when compiled.
UNCOMPILABLE = {
    "type": "object",
    "properties": {"a": {"type": "string", "pattern": "(?<=a)b"}},
    "required": ["a"],
}
CHAT_PATH, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
BAD = [
    ("invalid-schema", CHAT_PATH, {"response_format": BAD_SCHEMA}, "response_format"),
    (
        "json-schema-without-schema",
        CHAT_PATH,
        {"response_format": {"type": "json_schema"}},
        "response_format",
    ),
    (
        "uncompilable-schema",
        CHAT_PATH,
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": UNCOMPILABLE}}},
        "response_format",
    ),
    (
        "uncompilable-tool-schema",
        CHAT_PATH,
        {
            "tools": [{"type": "function", "function": {"name": "f", "parameters": UNCOMPILABLE}}],
            "tool_choice": "required",
        },
        "tools",
    ),
    ("rejected-regex", CHAT_PATH, {"guided_regex": "(?<=a)b"}, "guided_regex"),
    ("rejected-regex-completions", COMPLETIONS, {"guided_regex": "a{3,1}"}, "guided_regex"),
    ("bad-grammar", CHAT_PATH, {"guided_grammar": "root ::= undefined_rule"}, "guided_grammar"),
    ("bad-lark-grammar", COMPLETIONS, {"guided_grammar": "start: foo"}, "guided_grammar"),
    ("invalid-guided-json", COMPLETIONS, {"guided_json": {"type": 5}}, "guided_json"),
    ("two-guided-fields", COMPLETIONS, {"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    (
        "unknown-tool",
        CHAT_PATH,
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        "tool_choice",
    ),
    ("required-without-tools", CHAT_PATH, {"tool_choice": "required"}, "tool_choice"),
    (
        "guided-json-and-response-format",
        CHAT_PATH,
        {"guided_json": PERSON, "response_format": {"type": "json_object"}},
        "response_format",
    ),
    (
        "guided-json-and-response-format-completions",
        COMPLETIONS,
        {"guided_json": PERSON, "response_format": {"type": "json_object"}},
        "response_format",
    ),
    (
        "bad-tool",
        CHAT_PATH,
        {"tools": [{"type": "function", "function": {"description": "no name"}}]},
        "tools",
    ),
    (
        "other-backend",
        CHAT_PATH,
        {"guided_regex": "a", "guided_decoding_backend": "xgrammar"},
        "guided_decoding_backend",
    ),
    (
        "whitespace-pattern",
        COMPLETIONS,
        {"guided_json": PERSON, "guided_whitespace_pattern": " "},
        "guided_whitespace_pattern",
    ),
    ("legacy-functions", CHAT_PATH, {"functions": [{"name": "f", "parameters": {}}]}, "functions"),
    (
        "function-message",
        CHAT_PATH,
        {"messages": [{"role": "function", "name": "f", "content": "1"}]},
        "messages.0",
    ),
]


def _bad_body(path: str, fields: dict[str, Any]) -> dict[str, Any]:
    base: dict[str, Any] = {"model": MODEL, "max_tokens": 8}
    base.update({"messages": CHAT} if path == CHAT_PATH else {"prompt": "the"})
    return {**base, **fields}


@pytest.mark.parametrize(
    ("path", "fields", "param"), [case[1:] for case in BAD], ids=[case[0] for case in BAD]
)
def test_bad_constraints_and_tools_are_400_naming_the_field(
    live, path: str, fields: dict[str, Any], param: str
) -> None:
    with live.http() as client:
        response = client.post(path, json=_bad_body(path, fields))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error" and error["message"]


def test_an_uncompilable_constraint_never_stalls_a_concurrent_request(live, reference: LLM) -> None:
    prompt = "seven wizards quietly"
    [expected] = reference.generate([prompt], SamplingParams(temperature=0, max_tokens=40))
    # Distinct bad constraints: none of them is in the compile cache yet.
    bad: list[dict[str, Any]] = [{"guided_regex": f"(?<=a)b{i}"} for i in range(4)]
    for i in range(4):
        schema = {"type": "object", "properties": {f"k{i}": {"type": "string", "pattern": "(?<!x)y"}}}
        bad.append(
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}
        )

    async def run() -> tuple[str, list[httpx.Response]]:
        client = live.async_openai()
        stream = await client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=40, temperature=0, stream=True
        )
        first = await anext(aiter(stream))  # the good request is running: now the bad ones arrive
        paths = [COMPLETIONS if "guided_regex" in fields else CHAT_PATH for fields in bad]
        async with httpx.AsyncClient(base_url=live.base_url, headers=KEY, timeout=60) as http:
            refused = [
                http.post(path, json=_bad_body(path, fields)) for path, fields in zip(paths, bad, strict=True)
            ]
            responses = await asyncio.gather(*refused)
        rest = [chunk.choices[0].text async for chunk in stream]
        await client.close()
        return first.choices[0].text + "".join(rest), list(responses)

    text, responses = asyncio.run(run())
    assert text == expected.outputs[0].text
    for fields, response in zip(bad, responses, strict=True):
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == next(iter(fields))
    live.wait_idle()
