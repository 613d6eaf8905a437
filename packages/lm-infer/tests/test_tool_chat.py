"""plan_chat: prompts with tools and tool history, the constraint of each mode, and reading replies."""

from __future__ import annotations

import json
import logging
import random
import re
from pathlib import Path
from typing import Any

import jsonschema
import llguidance
import pytest

from lmstack.core import Tokenizer
from lmstack.infer import InvalidRequestError, SamplingParams
from lmstack.infer.tools import ChatPlan, ParsedReply, ReplyStreamer, check_tools, plan_chat

# A Hermes-style template: tools in the system turn, earlier calls as <tool_call> blocks with their
# arguments rendered by tojson, tool results as <tool_response> in a user turn.
TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n"
    "{% if messages[0].role == 'system' %}{{ messages[0].content }}\n\n{% endif %}"
    "You may call functions. Their signatures:\n<tools>\n"
    "{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}"
    '</tools>\nCall one as <tool_call>\n{"name": <name>, "arguments": <object>}\n</tool_call><|im_end|>\n'
    "{% elif messages[0].role == 'system' %}"
    "<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n{% endif %}"
    "{% for message in messages %}"
    "{% if message.role == 'system' %}"
    "{% elif message.role == 'assistant' %}<|im_start|>assistant\n"
    "{% if message.content %}{{ message.content }}\n{% endif %}"
    "{% for call in message.tool_calls or [] %}<tool_call>\n"
    '{"name": {{ call.function.name | tojson }}, "arguments": {{ call.function.arguments | tojson }}}\n'
    "</tool_call>\n{% endfor %}<|im_end|>\n"
    "{% elif message.role == 'tool' %}<|im_start|>user\n"
    '<tool_response name="{{ message.name }}" id="{{ message.tool_call_id }}">\n{{ message.content }}\n'
    "</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PLAIN = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
MISTRAL_LIKE = "{% if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}" + PLAIN

WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "minLength": 1},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    },
}
SEARCH: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "search",
        "parameters": {
            "type": "object",
            "properties": {"query": {"type": "string"}, "filters": {"$ref": "#/$defs/Filters"}},
            "required": ["query"],
            "$defs": {
                "Filters": {
                    "type": "object",
                    "properties": {"year": {"type": "integer", "minimum": 1900}, "tags": {"type": "array"}},
                }
            },
        },
    },
}
NOW: dict[str, Any] = {"type": "function", "function": {"name": "now"}}
TOOLS = [WEATHER, SEARCH, NOW]

ROUND_TRIP: list[dict[str, Any]] = [
    {"role": "developer", "content": "Be brief."},
    {"role": "user", "content": [{"type": "text", "text": "Weather"}, {"type": "text", "text": "in Paris?"}]},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_abc",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_abc", "content": "21 C and sunny"},
]
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(model_dir)


def plan(
    tokenizer: Tokenizer, messages: Any = USER, params: SamplingParams | None = None, **kw: Any
) -> ChatPlan:
    kw.setdefault("chat_template", TEMPLATE)
    return plan_chat(tokenizer, messages, params or SamplingParams(max_tokens=64), **kw)


def validator(schema: Any) -> jsonschema.protocols.Validator:
    assert isinstance(schema, dict)
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    cls.check_schema(schema)
    return cls(schema)


def stream(streamer: ReplyStreamer, pieces: list[str]) -> ParsedReply:
    deltas = [delta for piece in pieces for delta in streamer.feed(piece)]
    deltas += streamer.finish()
    content = "".join(d.content for d in deltas if d.content is not None)
    arguments: dict[int, str] = {}
    for delta in deltas:
        if delta.tool_call is not None:
            call = delta.tool_call
            if call.index not in arguments:
                assert (
                    call.id == streamer.calls[call.index].id and call.name == streamer.calls[call.index].name
                )
            else:
                assert call.id is None and call.name is None
            arguments[call.index] = arguments.get(call.index, "") + call.arguments
    assert [arguments[i] for i in sorted(arguments)] == [c.arguments for c in streamer.calls]
    return ParsedReply(content if content.strip() else None, list(streamer.calls))


def chunkings(text: str) -> list[list[str]]:
    out = [[text], list(text)]
    for seed in range(8):
        rng = random.Random(seed)
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 12))))
        out.append([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)])
    return out


def calls_of(reply: ParsedReply) -> list[tuple[str, Any]]:
    return [(call.name, json.loads(call.arguments)) for call in reply.tool_calls]


# -- the prompt -------------------------------------------------------------------------------------


def test_prompt_renders_tools_and_the_round_trip(tokenizer: Tokenizer) -> None:
    result = plan(tokenizer, ROUND_TRIP, tools=[WEATHER])
    text = tokenizer.decode(result.prompt_ids)
    assert result.prompt_ids == tokenizer.encode(text, add_special_tokens=False)
    # the tools, as the template's tojson writes the normalised OpenAI entries
    assert json.dumps(check_tools([WEATHER])[0]) in text
    # developer became system; text parts were joined
    assert text.startswith("<|im_start|>system\nBe brief.\n\nYou may call functions.")
    assert "<|im_start|>user\nWeather\nin Paris?<|im_end|>" in text
    # the earlier call, its arguments parsed so that tojson writes an object, not a string
    call = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
    assert f"<tool_call>\n{call}\n</tool_call>" in text
    # the tool result, named after the call it answers
    assert '<tool_response name="get_weather" id="call_abc">\n21 C and sunny\n</tool_response>' in text
    assert text.endswith("<|im_start|>assistant\n")


def test_unparsable_history_arguments_are_kept_as_text(tokenizer: Tokenizer) -> None:
    messages = [dict(m) for m in ROUND_TRIP]
    messages[2] = {
        **messages[2],
        "tool_calls": [{"id": "c1", "function": {"name": "now", "arguments": "oops{"}}],
    }
    text = tokenizer.decode(plan(tokenizer, messages, tools=[WEATHER, NOW]).prompt_ids)
    assert '{"name": "now", "arguments": "oops{"}' in text


def test_tool_choice_none_renders_tools_but_replies_in_text(tokenizer: Tokenizer) -> None:
    params = SamplingParams(max_tokens=8)
    result = plan(tokenizer, USER, params, tools=[WEATHER], tool_choice="none")
    assert result.mode == "text" and not result.offers_tools
    assert result.params == params and result.params.guided_kind is None
    assert "get_weather" in tokenizer.decode(result.prompt_ids)
    reply = result.parse('<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>')
    assert (
        reply.content == '<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>'
        and not reply.tool_calls
    )


def test_text_mode_changes_nothing(tokenizer: Tokenizer) -> None:
    params = SamplingParams(max_tokens=8, temperature=0)
    result = plan(tokenizer, USER, params)
    assert result.mode == "text" and result.tools is None and result.parser is None
    assert result.params == params
    direct = tokenizer.apply_chat_template(USER, add_generation_prompt=True, chat_template=TEMPLATE)
    assert isinstance(direct, str)
    assert result.prompt_ids == tokenizer.encode(direct, add_special_tokens=False)
    assert result.parse(" hi there ") == ParsedReply(" hi there ", [])
    assert stream(result.streamer(), [" hi", " there "]).content == " hi there "


def test_template_without_tools_warns_once(tokenizer: Tokenizer, caplog: pytest.LogCaptureFixture) -> None:
    template = PLAIN + "{# warn-once test #}"
    with caplog.at_level(logging.INFO, logger="lmstack.infer.tools"):
        for _ in range(3):
            result = plan(tokenizer, USER, tools=[WEATHER], chat_template=template)
    warnings = [
        r for r in caplog.records if r.levelno == logging.WARNING and "does not render `tools`" in r.message
    ]
    infos = [r for r in caplog.records if r.levelno == logging.INFO and "'hermes'" in r.message]
    assert len(warnings) == 1 and len(infos) == 1
    assert "get_weather" not in tokenizer.decode(result.prompt_ids)
    assert result.parser is not None and result.parser.name == "hermes"


# -- response_format --------------------------------------------------------------------------------


def test_json_object(tokenizer: Tokenizer) -> None:
    result = plan(tokenizer, response_format={"type": "json_object"})
    assert result.mode == "json" and not result.offers_tools
    assert result.params.guided_json == {"type": "object"}
    assert result.parse('{"a": 1}') == ParsedReply('{"a": 1}', [])
    assert plan(tokenizer, response_format={"type": "text"}).params.guided_kind is None


PERSON: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "pets": {
            "type": "array",
            "items": {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}}},
        },
        "meta": {"type": "object", "properties": {"x": {"type": "integer"}}, "additionalProperties": True},
    },
    "required": ["name"],
}


def test_json_schema_strict_closes_objects(tokenizer: Tokenizer) -> None:
    format_ = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    schema = plan(tokenizer, response_format=format_).params.guided_json
    assert isinstance(schema, dict)
    given, strict = validator(PERSON), validator(schema)
    good = {"name": "Ada", "pets": [{"kind": "cat"}], "meta": {"x": 1, "extra": True}}
    assert given.is_valid(good) and strict.is_valid(good)
    for extra in ({**good, "age": 3}, {**good, "pets": [{"kind": "dog", "age": 2}]}):
        assert given.is_valid(extra) and not strict.is_valid(extra)
    assert schema["properties"]["meta"]["additionalProperties"] is True  # an explicit choice is kept
    assert "additionalProperties" not in PERSON  # the caller's schema is not changed

    loose = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    assert plan(tokenizer, response_format=loose).params.guided_json == PERSON


@pytest.mark.parametrize(
    "response_format",
    [
        {"type": "xml"},
        "json_object",
        {"type": "json_schema"},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}},
        {"type": "json_schema", "json_schema": {"name": 3, "schema": {}}},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "strict": "yes"}},
    ],
)
def test_bad_response_format(tokenizer: Tokenizer, response_format: Any) -> None:
    with pytest.raises(InvalidRequestError) as info:
        plan(tokenizer, response_format=response_format)
    assert info.value.param == "response_format"


def test_response_format_conflicts(tokenizer: Tokenizer) -> None:
    json_object = {"type": "json_object"}
    with pytest.raises(InvalidRequestError, match="guided_regex") as info:
        plan(tokenizer, params=SamplingParams(guided_regex="[a-z]+"), response_format=json_object)
    assert info.value.param == "response_format"
    for choice in (None, "auto", "required"):
        with pytest.raises(InvalidRequestError) as info:
            plan(tokenizer, tools=[WEATHER], tool_choice=choice, response_format=json_object)
        assert info.value.param == "response_format"
    allowed = plan(tokenizer, tools=[WEATHER], tool_choice="none", response_format=json_object)
    assert allowed.mode == "json" and allowed.params.guided_json == {"type": "object"}
    with pytest.raises(InvalidRequestError) as info:
        plan(tokenizer, params=SamplingParams(min_tokens=2), response_format=json_object)
    assert info.value.param == "min_tokens"


# -- tools and tool_choice --------------------------------------------------------------------------


def test_auto_uses_the_templates_parser(tokenizer: Tokenizer) -> None:
    params = SamplingParams(max_tokens=64)
    result = plan(tokenizer, USER, params, tools=TOOLS)
    assert result.mode == "auto" and result.offers_tools and result.params == params
    assert result.parser is not None and result.parser.name == "hermes"
    text = (
        'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
        '</tool_call>\n<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>'
    )
    reply = result.parse(text)
    assert reply.content == "Checking."
    assert calls_of(reply) == [("get_weather", {"city": "Paris", "unit": "celsius"}), ("now", {})]
    assert all(re.fullmatch(r"call_[A-Za-z0-9]{24}", call.id) for call in reply.tool_calls)

    single = plan(tokenizer, USER, params, tools=TOOLS, parallel_tool_calls=False)
    assert calls_of(single.parse(text)) == calls_of(reply)[:1]
    for pieces in chunkings(text):
        streamed = stream(single.streamer(), pieces)
        assert streamed.content == "Checking." and calls_of(streamed) == calls_of(reply)[:1]


def test_auto_with_a_special_token_parser(tokenizer: Tokenizer) -> None:
    params = SamplingParams(max_tokens=16)
    result = plan(tokenizer, USER, params, tools=[WEATHER], tool_call_parser="internlm2")
    assert result.parser is not None and result.parser.name == "internlm2"
    assert result.params.skip_special_tokens is False and params.skip_special_tokens is True
    assert result.params.max_tokens == 16
    mistral = plan(tokenizer, USER, tools=[WEATHER], chat_template=MISTRAL_LIKE)
    assert mistral.parser is not None and mistral.parser.name == "mistral"
    assert mistral.params.skip_special_tokens is False
    assert mistral.id_style == "mistral"
    with pytest.raises(InvalidRequestError) as info:
        plan(tokenizer, USER, tools=[WEATHER], tool_call_parser="nope")
    assert info.value.param == "tool_call_parser"


def test_required_schema_accepts_only_valid_calls(tokenizer: Tokenizer) -> None:
    params = SamplingParams(max_tokens=64, temperature=0.5, stop=["</s>"])
    result = plan(tokenizer, USER, params, tools=TOOLS, tool_choice="required")
    assert params.guided_json is None  # the caller's parameters are not changed
    assert (result.params.max_tokens, result.params.temperature, result.params.stop) == (64, 0.5, ["</s>"])
    assert result.mode == "required" and result.offers_tools and result.parser is None
    schema = result.params.guided_json
    assert isinstance(schema, dict)
    check = validator(schema)
    paris = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
    search = {"name": "search", "arguments": {"query": "lmstack", "filters": {"year": 2024, "tags": ["x"]}}}
    now = {"name": "now", "arguments": {}}
    assert check.is_valid([paris]) and check.is_valid([paris, search, now])
    bad = [
        [],  # at least one call
        [{"name": "get_time", "arguments": {}}],  # unknown tool
        [{"name": "get_weather", "arguments": {"city": "Paris"}}],  # missing a required argument
        [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "kelvin"}}],  # not in the enum
        [{"name": "search", "arguments": {"query": "x", "filters": {"year": 1800}}}],  # through the $ref
        [{**paris, "id": "call_1"}],  # nothing but name and arguments
        [{"name": "get_weather"}],
        paris,  # an array, not one object
    ]
    for instance in bad:
        assert not check.is_valid(instance), instance

    single = validator(plan(tokenizer, USER, tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
                       .params.guided_json)  # fmt: skip
    assert single.is_valid([paris]) and not single.is_valid([paris, now])


def test_strict_tools_are_closed(tokenizer: Tokenizer) -> None:
    strict = {"type": "function", "function": {**WEATHER["function"], "strict": True}}
    paris = {"city": "Paris", "unit": "celsius"}
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        schema = plan(tokenizer, USER, tools=[strict], tool_choice=choice).params.guided_json
        assert isinstance(schema, dict)
        check = validator(schema)
        instance: Any = paris if isinstance(choice, dict) else [{"name": "get_weather", "arguments": paris}]
        extra: Any = {**paris, "x": 1}
        assert check.is_valid(instance)
        assert not check.is_valid(
            extra if isinstance(choice, dict) else [{"name": "get_weather", "arguments": extra}]
        )
    loose = validator(plan(tokenizer, USER, tools=[WEATHER], tool_choice="required").params.guided_json)
    assert loose.is_valid([{"name": "get_weather", "arguments": {**paris, "x": 1}}])


def test_named_function(tokenizer: Tokenizer) -> None:
    choice = {"type": "function", "function": {"name": "search"}}
    result = plan(tokenizer, USER, tools=TOOLS, tool_choice=choice)
    assert result.mode == "named" and result.tool_name == "search" and result.offers_tools
    assert result.params.guided_json == SEARCH["function"]["parameters"]
    check = validator(result.params.guided_json)
    assert check.is_valid({"query": "x", "filters": {"year": 2000}})
    assert not check.is_valid({"filters": {}}) and not check.is_valid({"query": "x", "filters": {"year": 1}})


# -- reading replies --------------------------------------------------------------------------------

REQUIRED_OUTPUTS = [
    '[{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}]',
    '[{"name": "search", "arguments": {"query": "a \\"quoted\\" [x] {y}", "filters": {"tags": ["}"]}}}, '
    '{"name": "now", "arguments": {}}]',
    '[ {"name":"now","arguments":{}} ,{"name":"get_weather","arguments":{"city":"東京","unit":"celsius"}}]\n',
]


@pytest.mark.parametrize("text", REQUIRED_OUTPUTS)
def test_required_parse_and_stream(tokenizer: Tokenizer, text: str) -> None:
    result = plan(tokenizer, USER, tools=TOOLS, tool_choice="required")
    assert isinstance(result.params.guided_json, dict)
    expected = json.loads(text)
    validator(result.params.guided_json).validate(expected)
    reply = result.parse(text)
    assert reply.content is None
    assert calls_of(reply) == [(item["name"], item["arguments"]) for item in expected]
    assert len({call.id for call in reply.tool_calls}) == len(expected)
    for pieces in chunkings(text):
        streamed = stream(result.streamer(), pieces)
        assert streamed.content is None
        assert [(c.name, c.arguments) for c in streamed.tool_calls] == [
            (c.name, c.arguments) for c in reply.tool_calls
        ]


def test_required_reply_cut_short(tokenizer: Tokenizer) -> None:
    result = plan(tokenizer, USER, tools=TOOLS, tool_choice="required")
    text = '[{"name": "now", "arguments": {}}, {"name": "get_weather", "arguments": {"city": "Pa'
    assert result.parse(text) == ParsedReply(text, [])
    streamed = stream(result.streamer(), list(text))
    assert calls_of(streamed) == [("now", {})]  # already given out while streaming
    assert streamed.content == ', {"name": "get_weather", "arguments": {"city": "Pa'
    assert result.parse('[{"name": "get_time", "arguments": {}}]').tool_calls == []
    # text the grammar would not allow (a server that ignored it) is content, streamed or not
    text = "Sorry,  I cannot call tools."
    assert result.parse(text) == ParsedReply(text, [])
    assert stream(result.streamer(), list(text)) == ParsedReply(text, [])
    assert result.parse("[]") == ParsedReply("[]", [])


def test_named_parse_and_stream(tokenizer: Tokenizer) -> None:
    result = plan(
        tokenizer, USER, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}}
    )
    text = '{"city": "Paris", "unit": "celsius"}'
    reply = result.parse(text)
    assert reply.content is None and [(c.name, c.arguments) for c in reply.tool_calls] == [
        ("get_weather", text)
    ]
    for pieces in chunkings(text):
        streamed = stream(result.streamer(), pieces)
        assert streamed.content is None
        assert [(c.name, c.arguments) for c in streamed.tool_calls] == [("get_weather", text)]
    first = result.streamer().feed('{"ci')  # the call opens with the first token
    assert len(first) == 1 and first[0].tool_call is not None
    assert (first[0].tool_call.index, first[0].tool_call.name, first[0].tool_call.arguments) == (
        0,
        "get_weather",
        '{"ci',
    )
    for bad in ('{"city": "Pa', '["Paris"]', ""):
        assert result.parse(bad) == ParsedReply(bad or None, [])


def grammar_accepts(tokenizer: Tokenizer, schema: dict[str, Any], text: str) -> bool:
    """Whether the grammar library the engine uses takes ``text`` whole under ``schema``."""
    lltok = llguidance.LLTokenizer(
        tokenizer.backend_tokenizer.to_str(), n_vocab=tokenizer.vocab_size, eos_token=tokenizer.eos_token_id
    )
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, lltok)
    assert not is_error, messages
    matcher = llguidance.LLMatcher(lltok, grammar, log_level=0)
    return matcher.consume_tokens(tokenizer.encode(text, add_special_tokens=False)) and matcher.is_accepting()


def test_constraints_compile_and_match_in_llguidance(tokenizer: Tokenizer) -> None:
    required = plan(tokenizer, USER, tools=TOOLS, tool_choice="required").params.guided_json
    assert isinstance(required, dict)
    for text in REQUIRED_OUTPUTS:
        assert grammar_accepts(tokenizer, required, text.strip())
    for text in (
        '[{"name": "get_time", "arguments": {}}]',
        '[{"name": "get_weather", "arguments": {"city": "Paris", "unit": "kelvin"}}]',
        '[{"name": "search", "arguments": {"query": "x", "filters": {"year": 1800}}}]',  # through the $ref
        "[]",
    ):
        assert not grammar_accepts(tokenizer, required, text), text
    named = plan(
        tokenizer, USER, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "search"}}
    )
    assert isinstance(named.params.guided_json, dict)
    assert grammar_accepts(tokenizer, named.params.guided_json, '{"query": "x", "filters": {"year": 2000}}')
    assert not grammar_accepts(tokenizer, named.params.guided_json, '{"filters": {}}')
    format_ = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    strict = plan(tokenizer, response_format=format_).params.guided_json
    assert isinstance(strict, dict)
    assert grammar_accepts(tokenizer, strict, '{"name": "Ada", "pets": [{"kind": "cat"}]}')
    assert not grammar_accepts(tokenizer, strict, '{"name": "Ada", "age": 3}')


def test_mistral_template_gets_mistral_ids(tokenizer: Tokenizer) -> None:
    result = plan(tokenizer, USER, tools=TOOLS, tool_choice="required", chat_template=MISTRAL_LIKE)
    reply = result.parse(REQUIRED_OUTPUTS[0])
    assert re.fullmatch(r"[A-Za-z0-9]{9}", reply.tool_calls[0].id)


# -- bad input --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "param"),
    [
        ({"tools": {"type": "function"}}, "tools"),
        ({"tools": []}, "tools"),
        ({"tools": ["get_weather"]}, "tools"),
        ({"tools": [{"type": "retrieval", "function": {"name": "x"}}]}, "tools"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "get weather"}}]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "x" * 65}}]}, "tools"),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        (
            {"tools": [{"type": "function", "function": {"name": "x", "parameters": {"type": "objekt"}}}]},
            "tools",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "x", "parameters": {"type": "string"}}}]},
            "tools",
        ),
        ({"tools": [{"type": "function", "function": {"name": "x", "description": 3}}]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "x", "strict": "yes"}}]}, "tools"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}},
            "tool_choice",
        ),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function"}}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": 3}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool_choice"),
        (
            {"tools": [WEATHER], "tool_choice": "required", "params": SamplingParams(guided_choice=["a"])},
            "tool_choice",
        ),
        (
            {"tools": [WEATHER], "tool_choice": "required", "params": SamplingParams(min_tokens=1)},
            "min_tokens",
        ),
        ({"tools": [WEATHER], "parallel_tool_calls": "no"}, "parallel_tool_calls"),
        ({"messages": "hi"}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": ["hi"]}, "messages"),
        ({"messages": [{"content": "hi"}]}, "messages"),
        ({"messages": [{"role": "user"}]}, "messages"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages",
        ),
        ({"messages": [{"role": "user", "content": "hi", "tool_calls": []}]}, "messages"),
        (
            {"messages": [{"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}]},
            "messages",
        ),
        ({"messages": [{"role": "tool", "content": "x", "tool_call_id": 7}]}, "messages"),
        ({"chat_template": "{{ raise_exception('roles must alternate') }}"}, "messages"),
    ],
)
def test_bad_input_names_the_parameter(tokenizer: Tokenizer, kw: dict[str, Any], param: str) -> None:
    messages = kw.pop("messages", USER)
    params = kw.pop("params", None)
    with pytest.raises(InvalidRequestError) as info:
        plan(tokenizer, messages, params, **kw)
    assert info.value.param == param, info.value


def test_tool_errors_name_the_entry() -> None:
    with pytest.raises(InvalidRequestError, match=r"tools\[1\]\.function\.name 'get_weather' is given twice"):
        check_tools([WEATHER, WEATHER])
    with pytest.raises(
        InvalidRequestError, match=r"tools\[0\]\.function\.parameters is not a valid JSON schema"
    ):
        check_tools([{"type": "function", "function": {"name": "x", "parameters": {"type": "objekt"}}}])


def test_check_tools_normalises() -> None:
    f = {"name": "f", "parameters": {"properties": {"a": {"type": "integer"}}}, "strict": False}
    tools = check_tools([{"function": {"name": "now"}}, {"type": "function", "function": f}])
    assert tools == [
        {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}},
        {
            "type": "function",
            "function": {
                "name": "f",
                "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}},
                "strict": False,
            },
        },
    ]
