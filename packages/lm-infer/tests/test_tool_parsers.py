"""Tool-call parsers on recorded replies of each format, whole and streamed in many chunkings."""

from __future__ import annotations

import json
import random
import re
from typing import Any

import pytest

from lmstack.infer import InvalidRequestError
from lmstack.infer.tools import (
    TOOL_PARSERS,
    ParsedReply,
    ReplyStreamer,
    ToolParser,
    detect_tool_parser,
    get_tool_parser,
    new_tool_call_id,
)

# Each sample: (reply text, expected content, expected calls as (name, arguments object)).
Sample = tuple[str, str | None, list[tuple[str, dict[str, Any]]]]

PARIS = ("get_weather", {"city": "Paris", "unit": "C"})
TOKYO = ("get_weather", {"city": "Tokyo", "unit": "C"})
NESTED = {
    "query": '北京天气 ☀️ "quoted" and </tool_call>-free',
    "filters": {"date": {"from": "2024-01-01", "to": None}, "tags": ["a", "b]c", "{d}"]},
    "limit": 3,
    "exact": False,
    "note": 'a lone \\" quote, then a } brace and a \\ backslash',
}
NESTED_JSON = json.dumps(NESTED, ensure_ascii=False)

HERMES: list[Sample] = [
    (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call>',
        None,
        [PARIS],
    ),
    (
        "I'll look up both cities.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call>\n<tool_call>\n'
        '{"name": "get_weather", "arguments": {"city": "Tokyo", "unit": "C"}}\n</tool_call>',
        "I'll look up both cities.",
        [PARIS, TOKYO],
    ),
    (
        "First Paris.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call>\nThen Tokyo.\n'
        '<tool_call>{"arguments": {"city": "Tokyo", "unit": "C"}, "name": "get_weather"}</tool_call>\n'
        "Done < 3 calls.",
        "First Paris.\n\nThen Tokyo.\n\nDone < 3 calls.",
        [PARIS, TOKYO],
    ),
    (
        '<think>\nThe user wants a search.\n</think>\n\n<tool_call>\n{"name": "search", "arguments": '
        + NESTED_JSON
        + "}\n</tool_call>",
        "<think>\nThe user wants a search.\n</think>",
        [("search", NESTED)],
    ),
    ("The weather in Paris is sunny, 21 °C.", "The weather in Paris is sunny, 21 °C.", []),
    ("  \n", None, []),
    ("", None, []),
    # malformed: each is left as content, and a later good call is still found
    (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par',
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par',
        [],
    ),
    (
        '<tool_call>\n{"name": "get_weather", "arguments": {city: Paris}}\n</tool_call>',
        '<tool_call>\n{"name": "get_weather", "arguments": {city: Paris}}\n</tool_call>',
        [],
    ),
    (
        '<tool_call>\n{"arguments": {"city": "Paris"}}\n</tool_call>',
        '<tool_call>\n{"arguments": {"city": "Paris"}}\n</tool_call>',
        [],
    ),
    (
        '<tool_call>\n{"name": "get_weather", "arguments": ["Paris"]}\n</tool_call>',
        '<tool_call>\n{"name": "get_weather", "arguments": ["Paris"]}\n</tool_call>',
        [],
    ),
    (
        '<tool_call>\n{"name": "", "arguments": {}}\n</tool_call> then <tool_call>{"name": "get_weather", '
        '"arguments": {"city": "Paris", "unit": "C"}}</tool_call>',
        '<tool_call>\n{"name": "", "arguments": {}}\n</tool_call> then',
        [PARIS],
    ),
    (
        '<tool_call>{"name": "a"<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", '
        '"unit": "C"}}</tool_call>',
        '<tool_call>{"name": "a"',
        [PARIS],
    ),
    ("a stray </tool_call> and <tool_ca", "a stray </tool_call> and <tool_ca", []),
    # the end marker eaten by a stop string: a whole body at the end is still a call
    (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n',
        None,
        [PARIS],
    ),
    # arguments encoded twice (seen from small Qwen models), and no arguments at all
    (
        '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\", \\"unit\\": \\"C\\"}"}'
        '</tool_call><tool_call>{"name": "now"}</tool_call>',
        None,
        [PARIS, ("now", {})],
    ),
]

INTERNLM2: list[Sample] = [
    (
        '<|action_start|><|plugin|>\n{"name": "get_weather", "parameters": {"city": "Paris", "unit": "C"}}'
        "<|action_end|>\n",
        None,
        [PARIS],
    ),
    (
        "I need the weather first.<|action_start|><|plugin|>\n"
        '{"name": "search", "parameters": ' + NESTED_JSON + "}<|action_end|><|im_end|>",
        "I need the weather first.",
        [("search", NESTED)],
    ),
    (
        "Two lookups.<|action_start|><|plugin|>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}<|action_end|>\n'
        '<|action_start|><|plugin|>\n{"name": "get_weather", "parameters": {"city": "Tokyo", "unit": "C"}}'
        "<|action_end|>",
        "Two lookups.",
        [PARIS, TOKYO],
    ),
    ("It is sunny in Paris.<|im_end|>", "It is sunny in Paris.", []),
    (
        "Let me compute.<|action_start|><|interpreter|>\n```python\nprint(2 ** 10)\n```<|action_end|>",
        "Let me compute.\n```python\nprint(2 ** 10)\n```",
        [],
    ),
    (
        '<|action_start|><|plugin|>\n{"name": "get_weather", "parameters": {"city": "Par',
        '{"name": "get_weather", "parameters": {"city": "Par',
        [],
    ),
    (
        '<|action_start|><|plugin|>\n{"name": "get_weather", "parameters": "Paris"}<|action_end|>',
        '{"name": "get_weather", "parameters": "Paris"}',
        [],
    ),
    ("a <|not closed and <|action_", "a <|not closed and <|action_", []),
]

LLAMA3: list[Sample] = [
    ('{"name": "get_weather", "parameters": {"city": "Paris", "unit": "C"}}', None, [PARIS]),
    ('<|python_tag|>{"name": "search", "parameters": ' + NESTED_JSON + "}", None, [("search", NESTED)]),
    (
        '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "C"}}; '
        '{"name": "get_weather", "arguments": {"city": "Tokyo", "unit": "C"}}',
        None,
        [PARIS, TOKYO],
    ),
    ("\n\nThe weather in Paris is sunny.", "The weather in Paris is sunny.", []),
    ("<b>bold</b> claim", "<b>bold</b> claim", []),
    ('{"city": "Paris"}', '{"city": "Paris"}', []),
    ('{"name": "Bob", "age": 3}', '{"name": "Bob", "age": 3}', []),
    (
        '{"name": "get_weather", "parameters": {"city": "Par',
        '{"name": "get_weather", "parameters": {"city": "Par',
        [],
    ),
    (
        '{"name": "get_weather", "parameters": {"city": "Paris"}} Let me know!',
        '{"name": "get_weather", "parameters": {"city": "Paris"}} Let me know!',
        [],
    ),
    ('{"name": "get_weather", "parameters": [1]}', '{"name": "get_weather", "parameters": [1]}', []),
    ("<|python_tag|>print('hi')", "<|python_tag|>print('hi')", []),
]

MISTRAL: list[Sample] = [
    (
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}]',
        None,
        [PARIS],
    ),
    (
        'Checking both.[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}, '
        '{"name": "search", "arguments": ' + NESTED_JSON + "}]",
        "Checking both.",
        [PARIS, ("search", NESTED)],
    ),
    ('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "C"}', None, [PARIS]),
    (
        '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "C"}'
        '[TOOL_CALLS]get_weather[CALL_ID]a1B2c3D4e[ARGS]{"city": "Tokyo", "unit": "C"}',
        None,
        [PARIS, TOKYO],
    ),
    ('[TOOL_CALLS]search{"query": "x"}', None, [("search", {"query": "x"})]),
    ("Sure, it is sunny.", "Sure, it is sunny.", []),
    (
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Par',
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Par',
        [],
    ),
    ("[TOOL_CALLS] I cannot call that.", "[TOOL_CALLS] I cannot call that.", []),
    (
        '[TOOL_CALLS] [{"arguments": {"city": "Paris"}}]',
        '[TOOL_CALLS] [{"arguments": {"city": "Paris"}}]',
        [],
    ),
    ('[TOOL_CALLS]get_weather[ARGS]"Paris"', '[TOOL_CALLS]get_weather[ARGS]"Paris"', []),
    ("[TOOL_CALLS] []", "[TOOL_CALLS] []", []),
    ("[TOOL_CALLS]get_weather[AR", "[TOOL_CALLS]get_weather[AR", []),
    ("see [TOOL_CALL", "see [TOOL_CALL", []),
]

SAMPLES = {"hermes": HERMES, "internlm2": INTERNLM2, "llama3_json": LLAMA3, "mistral": MISTRAL}
ALL = [(name, index, sample) for name, samples in SAMPLES.items() for index, sample in enumerate(samples)]
IDS = [f"{name}-{index}" for name, index, _ in ALL]


def check_reply(reply: ParsedReply, content: str | None, calls: list[tuple[str, dict[str, Any]]]) -> None:
    assert reply.content == content
    assert [(call.name, json.loads(call.arguments)) for call in reply.tool_calls] == calls
    for call in reply.tool_calls:
        assert call.type == "function"
        assert isinstance(json.loads(call.arguments), dict)


def stream(streamer: ReplyStreamer, pieces: list[str]) -> ParsedReply:
    """Feeds the pieces, checks every delta's shape, and joins what came out."""
    deltas = [delta for piece in pieces for delta in streamer.feed(piece)]
    deltas += streamer.finish()
    content = ""
    arguments: dict[int, str] = {}
    for delta in deltas:
        assert (delta.content is None) != (delta.tool_call is None)
        if delta.content is not None:
            assert delta.content
            content += delta.content
            continue
        part = delta.tool_call
        assert part is not None
        if part.index not in arguments:  # a call's first delta: id and name, the next index
            assert part.index == len(arguments)
            assert part.id == streamer.calls[part.index].id
            assert part.name == streamer.calls[part.index].name
            arguments[part.index] = ""
        else:
            assert part.id is None and part.name is None
        arguments[part.index] += part.arguments
    assert [arguments[index] for index in sorted(arguments)] == [call.arguments for call in streamer.calls]
    return ParsedReply(content or None, list(streamer.calls))


def chunkings(text: str) -> list[list[str]]:
    """Whole, one character at a time, every two-piece split, and seeded random cuts."""
    out = [[text], list(text)]
    out += [[text[:cut], text[cut:]] for cut in range(1, len(text))]
    for seed in range(12):
        rng = random.Random(seed)
        pieces, pos = [], 0
        while pos < len(text):
            size = rng.choice([1, 1, 2, 3, 5, 8, 13])
            pieces.append(text[pos : pos + size])
            pos += size
        out.append(pieces)
    return out


def same(a: ParsedReply, b: ParsedReply) -> bool:
    return a.content == b.content and [(c.name, c.arguments) for c in a.tool_calls] == [
        (c.name, c.arguments) for c in b.tool_calls
    ]


@pytest.mark.parametrize(("name", "index", "sample"), ALL, ids=IDS)
def test_extract_recorded_reply(name: str, index: int, sample: Sample) -> None:
    text, content, calls = sample
    check_reply(get_tool_parser(name).extract(text), content, calls)


@pytest.mark.parametrize(("name", "index", "sample"), ALL, ids=IDS)
def test_stream_equals_extract_in_every_chunking(name: str, index: int, sample: Sample) -> None:
    parser = get_tool_parser(name)
    text, content, calls = sample
    whole = parser.extract(text)
    for pieces in chunkings(text):
        assert "".join(pieces) == text
        streamed = stream(parser.streamer(), pieces)
        assert same(streamed, whole), pieces
    check_reply(whole, content, calls)


def test_stream_gives_content_before_the_call_ends() -> None:
    streamer = get_tool_parser("hermes").streamer()
    assert [d.content for d in streamer.feed("Let me check")] == ["Let me check"]
    # "<tool_c" may begin a marker: held (with the whitespace before it) until decided
    assert [d.content for d in streamer.feed(" the weather.\n<tool_c")] == [" the weather."]
    assert streamer.feed('all>\n{"name": "get_weather", "arguments": {"city": ') == []
    out = streamer.feed('"Paris"}}\n</tool_call>')
    assert len(out) == 1 and out[0].tool_call is not None
    assert out[0].tool_call.name == "get_weather" and json.loads(out[0].tool_call.arguments) == {
        "city": "Paris"
    }
    assert [d.content for d in streamer.feed(" done")] == ["\n done"]
    assert streamer.finish() == []


def test_stream_holds_only_a_possible_marker() -> None:
    streamer = get_tool_parser("hermes").streamer()
    out = streamer.feed("x <tool")
    assert [d.content for d in out] == ["x"]
    out = streamer.feed("box> y")  # "<toolbox>" is no marker: given out
    assert "".join(d.content or "" for d in out) == " <toolbox> y"


def test_mistral_ids_have_mistrals_shape() -> None:
    reply = get_tool_parser("mistral").extract(MISTRAL[3][0])
    assert len(reply.tool_calls) == 2
    for call in reply.tool_calls:
        assert re.fullmatch(r"[A-Za-z0-9]{9}", call.id)
    reply = get_tool_parser("hermes").extract(HERMES[1][0])
    for call in reply.tool_calls:
        assert re.fullmatch(r"call_[A-Za-z0-9]{24}", call.id)
    assert reply.tool_calls[0].id != reply.tool_calls[1].id


def test_new_tool_call_id() -> None:
    ids = {new_tool_call_id() for _ in range(500)}
    assert len(ids) == 500
    assert all(re.fullmatch(r"call_[A-Za-z0-9]{24}", one) for one in ids)
    assert re.fullmatch(r"[A-Za-z0-9]{9}", new_tool_call_id("mistral"))
    with pytest.raises(ValueError, match="mistral"):
        new_tool_call_id("anthropic")


def test_registry_and_special_tokens() -> None:
    assert set(TOOL_PARSERS) == {"hermes", "internlm2", "llama3_json", "mistral"}
    for name, cls in TOOL_PARSERS.items():
        parser = get_tool_parser(name)
        assert isinstance(parser, ToolParser) and isinstance(parser, cls) and parser.name == name
    assert get_tool_parser("internlm2").needs_special_tokens
    assert get_tool_parser("mistral").needs_special_tokens
    assert not get_tool_parser("hermes").needs_special_tokens
    assert not get_tool_parser("llama3_json").needs_special_tokens
    with pytest.raises(InvalidRequestError, match="hermes, internlm2, llama3_json, mistral") as info:
        get_tool_parser("qwen")
    assert info.value.param == "tool_call_parser"


QWEN25 = (  # the tools part of Qwen2.5's template
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {{- \"\\n\\n# Tools\\n\\nYou may call one "
    "or more functions to assist with the user query.\\n\\nYou are provided with function signatures "
    'within <tools></tools> XML tags:\\n<tools>" }}\n    {%- for tool in tools %}\n        {{- "\\n" }}\n'
    '        {{- tool | tojson }}\n    {%- endfor %}\n    {{- "\\n</tools>\\n\\nFor each function call, '
    "return a json object with function name and arguments within <tool_call></tool_call> XML tags:"
    '\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}'
    '\\n</tool_call><|im_end|>\\n" }}\n{%- endif %}'
)
INTERNLM2_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'tool' %}<|im_start|>environment name=<|plugin|>\n"
    "{{ message['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
)
LLAMA31 = (
    '{{- "Given the following functions, please respond with a JSON for a function call with its proper '
    'arguments that best answers the given prompt.\\n\\n" }}\n{{- \'Respond in the format {"name": function '
    'name, "parameters": dictionary of argument name and its value}.\' }}'
)
LLAMA_TAG = "{%- if builtin_tools is defined %}{{- '<|python_tag|>' + tool_call.name }}{%- endif %}"
MISTRAL_TEMPLATE = "{%- if tools %}{{- '[AVAILABLE_TOOLS] [' }}{%- endif %}{{- '[TOOL_CALLS] ' }}"
CHATML = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        (QWEN25, "hermes"),
        ("{{ '<tool_call>\\n' + call | tojson + '\\n</tool_call>' }}", "hermes"),
        (INTERNLM2_TEMPLATE, "internlm2"),
        ("{{ '<|action_start|><|plugin|>\\n' }}", "internlm2"),
        (LLAMA31, "llama3_json"),
        (LLAMA_TAG, "llama3_json"),
        (MISTRAL_TEMPLATE, "mistral"),
        ("{{ '[TOOL_CALLS]' + tool_calls | tojson }}", "mistral"),
        (CHATML, None),
        ("", None),
        (None, None),
    ],
)
def test_detect_tool_parser(template: str | None, expected: str | None) -> None:
    assert detect_tool_parser(template) == expected
