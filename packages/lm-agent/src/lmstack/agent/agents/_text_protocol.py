"""Tool calls written as text, for backends without native tool calling, read with a tolerant parser.

The prompt asks for ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks. Models,
small local ones above all, drift from any format, so the parser also takes a fenced ``json`` block or
a bare JSON object holding ``name`` and ``arguments``, and JSON with single quotes, trailing commas or
Python's ``True``/``False``/``None`` where the repair is unambiguous. Nothing here runs model output:
it is read as data only.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lmstack.agent.tools import Tool

__all__ = [
    "TextCall",
    "TextReply",
    "arguments_from_input",
    "find_json_objects",
    "loads_lenient",
    "parse_tool_calls",
    "text_protocol_prompt",
    "tools_listing",
]

_NAME_KEYS = ("name", "tool", "tool_name", "function")
_ARGUMENT_KEYS = ("arguments", "parameters", "args", "input", "tool_input")
_PY_LITERALS = {"True": "true", "False": "false", "None": "null"}

_TAG_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.DOTALL | re.IGNORECASE)
_FENCE = re.compile(r"```[ \t]*([\w-]*)[ \t]*\n(.*?)```", re.DOTALL)
_FENCE_EDGES = re.compile(r"^\s*```[\w-]*\s*\n?|\n?\s*```\s*$")


@dataclass
class TextCall:
    """One tool call read from a reply's text.

    Attributes:
        name: The tool's name, as written.
        arguments: The arguments as written: usually a dict, maybe a JSON string or something else
            (checked when the call is prepared).
        raw: The text the call was read from.
    """

    name: str
    arguments: Any
    raw: str


@dataclass
class TextReply:
    """A reply split into its calls and the rest.

    Attributes:
        content: The reply's text with the calls taken out.
        calls: The well-formed calls, in order.
        errors: One message per malformed call, saying what was wrong (fed back to the model).
    """

    content: str
    calls: list[TextCall] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _skip_string(text: str, start: int) -> int:
    """The index just past the string literal opening at ``start`` (or the end of the text)."""
    quote, i = text[start], start + 1
    while i < len(text) and text[i] != quote:
        i += 2 if text[i] == "\\" else 1
    return i + 1


def _repair(text: str) -> str:
    """JSON from near-JSON: single-quoted strings, trailing commas, Python literals."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == '"':
            end = _skip_string(text, i)
            out.append(text[i:end])
            i = end
        elif ch == "'":
            end = min(_skip_string(text, i), n)
            body = text[i + 1 : end - 1].replace("\\'", "'")
            # Re-quote: escape the double quotes the single-quoted string held.
            out.append('"' + re.sub(r'(?<!\\)"', r'\\"', body) + '"')
            i = end
        elif ch == ",":
            j = i + 1
            while j < n and text[j].isspace():
                j += 1
            if j >= n or text[j] not in "}]":
                out.append(ch)
            i += 1
        elif ch.isalpha() or ch == "_":
            j = i
            while j < n and (text[j].isalnum() or text[j] == "_"):
                j += 1
            word = text[i:j]
            out.append(_PY_LITERALS.get(word, word))
            i = j
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def loads_lenient(text: str) -> Any:
    """Parse JSON, repairing single quotes, trailing commas and Python literals if it must.

    Raw newlines inside strings are accepted (models write code arguments that way).

    Args:
        text: The JSON text, optionally inside a Markdown code fence.

    Returns:
        The parsed value.

    Raises:
        ValueError: The text is not JSON even after the repairs (the message says where).
    """
    text = _FENCE_EDGES.sub("", text.strip()).strip()
    try:
        return json.loads(text, strict=False)
    except json.JSONDecodeError as first:
        try:
            return json.loads(_repair(text), strict=False)
        except json.JSONDecodeError:
            raise ValueError(f"{first.msg} at line {first.lineno} column {first.colno}") from None


def find_json_objects(text: str) -> Iterator[tuple[int, int]]:
    """The ``(start, end)`` spans of the outermost balanced ``{...}`` in a text.

    Braces inside string literals (either quote) do not count.

    Args:
        text: Any text.

    Yields:
        Each outermost object's span, in order.
    """
    i, n = 0, len(text)
    while i < n:
        if text[i] != "{":
            i += 1
            continue
        depth, j = 0, i
        while j < n:
            ch = text[j]
            if ch in "\"'" and depth:
                j = _skip_string(text, j)
                continue
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    break
            j += 1
        if j >= n:
            return
        yield i, j + 1
        i = j + 1


def _call_from(value: Any, raw: str, *, need_arguments: bool) -> TextCall | None:
    """A call from a parsed object holding a name (and arguments), else None."""
    if not isinstance(value, dict):
        return None
    inner = value.get("function")
    if isinstance(inner, dict) and "name" in inner:  # OpenAI's {"type": "function", "function": {...}}
        value = inner
    name = next((value[k] for k in _NAME_KEYS if isinstance(value.get(k), str)), None)
    key = next((k for k in _ARGUMENT_KEYS if k in value), None)
    if name is None or (key is None and need_arguments):
        return None
    return TextCall(name=name.strip(), arguments=value[key] if key else {}, raw=raw)


def _calls_in(value: Any, raw: str, *, need_arguments: bool) -> list[TextCall] | None:
    """The calls in a parsed value (an object or a list of them), or None when it holds none."""
    items = value if isinstance(value, list) else [value]
    calls = [_call_from(item, raw, need_arguments=need_arguments) for item in items]
    if not calls or any(call is None for call in calls):
        return None
    return [call for call in calls if call is not None]


def _looks_like_call(text: str) -> bool:
    return bool(re.search(r"""["']name["']""", text)) and bool(re.search(r"""["']arguments["']""", text))


def _snippet(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def parse_tool_calls(text: str) -> TextReply:
    """Find the tool calls in a reply written under the text protocol.

    ``<tool_call>`` blocks win; without them, fenced code blocks and then bare JSON objects that
    hold a ``name`` and ``arguments`` (or ``parameters``) are calls. A ``<tool_call>`` block that is
    not a call, or a block that looks like one but is not JSON, is reported in ``errors``.

    Args:
        text: The model's reply.

    Returns:
        The calls, the malformed ones' errors and the text around them.
    """
    reply = TextReply(content=text)
    spans: list[tuple[int, int]] = []
    tagged = list(_TAG_BLOCK.finditer(text))
    for match in tagged:
        spans.append(match.span())
        body = match.group(1).strip()
        try:
            value = loads_lenient(body)
        except ValueError as exc:
            reply.errors.append(f"the <tool_call> block is not valid JSON ({exc}): {_snippet(body)}")
            continue
        calls = _calls_in(value, body, need_arguments=False)
        if calls is None:
            reply.errors.append(
                'a <tool_call> block must hold one object {"name": "<tool>", "arguments": {...}}, got: '
                + _snippet(body)
            )
        else:
            reply.calls.extend(calls)
    if not tagged:
        candidates = [(m.span(), m.group(2)) for m in _FENCE.finditer(text)]
        if not candidates:
            candidates = [((a, b), text[a:b]) for a, b in find_json_objects(text)]
        for span, body in candidates:
            try:
                value = loads_lenient(body)
            except ValueError as exc:
                if _looks_like_call(body):
                    spans.append(span)
                    reply.errors.append(f"the tool call is not valid JSON ({exc}): {_snippet(body)}")
                continue
            calls = _calls_in(value, body, need_arguments=True)
            if calls is not None:
                spans.append(span)
                reply.calls.extend(calls)
    for start, end in sorted(spans, reverse=True):
        text = text[:start] + text[end:]
    reply.content = text.strip()
    return reply


def tools_listing(tools: Sequence[Tool]) -> str:
    """The tools as a prompt lists them: name, description and JSON schema of the arguments."""
    lines = []
    for t in tools:
        schema = json.dumps(t.parameters, ensure_ascii=False)
        lines.append(f"- {t.name}: {t.description}\n  arguments (JSON schema): {schema}")
    return "\n".join(lines)


def text_protocol_prompt(tools: Sequence[Tool]) -> str:
    """The system prompt's part that teaches the text protocol for these tools."""
    return (
        "You can call these tools:\n"
        f"{tools_listing(tools)}\n\n"
        "To call a tool, write a block like this, with the arguments as a JSON object:\n"
        '<tool_call>\n{"name": "<tool name>", "arguments": {"<argument>": <value>}}\n</tool_call>\n'
        "Write one block per call; several blocks in one reply run at the same time. After your calls, "
        "stop: the results come back to you in <tool_result> blocks. When you know the answer, reply "
        "with the answer only, without any <tool_call> block."
    )


def _single_parameter(tool: Tool) -> tuple[str, Mapping[str, Any]] | None:
    """The tool's one parameter (or its one required parameter), with its schema, if it has one."""
    properties: Mapping[str, Any] = tool.parameters.get("properties") or {}
    required = [name for name in tool.parameters.get("required") or [] if name in properties]
    names = list(properties) if len(properties) == 1 else required if len(required) == 1 else []
    return (names[0], properties[names[0]]) if names else None


def arguments_from_input(tool: Tool, raw: str) -> Any:
    """Arguments for ``tool`` from an input written as text (ReAct's Action Input, a ReWOO step).

    A JSON object is the arguments. Anything else is the value of the tool's single (or single
    required) parameter: the text as written for a string parameter, else its JSON value. What is
    left (no such parameter) is returned as the text, and fails validation with a clear message.

    Args:
        tool: The tool called.
        raw: The input's text.

    Returns:
        The arguments, a dict unless the input could not be read as one.
    """
    raw = raw.strip()
    try:
        value: Any = loads_lenient(raw) if raw else {}
    except ValueError:
        value = raw
    if isinstance(value, dict):
        parameter = _single_parameter(tool)
        # A lone object for a tool whose only parameter is an object is that parameter's value.
        if parameter and parameter[0] not in value and parameter[1].get("type") == "object":
            return {parameter[0]: value}
        return value
    parameter = _single_parameter(tool)
    if parameter is None:
        return raw
    name, schema = parameter
    if schema.get("type") == "string":
        return {name: value if isinstance(value, str) else raw}
    return {name: value}
