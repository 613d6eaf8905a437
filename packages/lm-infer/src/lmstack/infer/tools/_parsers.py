"""The tool-call parsers: Hermes/Qwen, InternLM2, Llama 3 JSON and Mistral, whole replies and streams.

Every parser is a :class:`ReplyStreamer` at heart; :meth:`ToolParser.extract` runs one over the
whole text, so a reply parses the same however its text was cut into pieces. A streamer decides
only on what it has read: content before a possible call marker goes out at once, text that may
still be a marker is held, and a call region that turns out malformed gives its marker back as
content and is read again from just after it (so nothing is lost and a later call is still found).
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from typing import ClassVar

from lmstack.infer._errors import InvalidRequestError
from lmstack.infer.tools._base import (
    ContentSink,
    JsonSpan,
    ReplyDelta,
    ReplyStreamer,
    ToolParser,
    call_of,
    json_call,
)

__all__ = [
    "TOOL_PARSERS",
    "HermesToolParser",
    "InternLM2ToolParser",
    "Llama3JsonToolParser",
    "MistralToolParser",
    "detect_tool_parser",
    "get_tool_parser",
]

# (name, arguments JSON text) of each call a region holds, or None when the region is malformed.
_Calls = list[tuple[str, str]] | None


def _prefix_hold(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that is a proper start of ``marker``."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:size]):
            return size
    return 0


_ARGS = "[ARGS]"
_CALL_ID = "[CALL_ID]"
_NAME_CHARS = re.compile(r"[A-Za-z0-9_.\-]*")
_ID_CHARS = re.compile(r"[A-Za-z0-9]*")
_SPACE = re.compile(r"\s*")


def _skip(chars: re.Pattern[str], text: str, pos: int) -> int:
    """Where the run of ``chars`` (a pattern ending in ``*``) that starts at ``pos`` ends."""
    match = chars.match(text, pos)
    return pos if match is None else match.end()


class _Region(ABC):
    """Finds where the call that starts at a marker ends, as the reply's text grows."""

    @abstractmethod
    def scan(self, text: str, final: bool) -> tuple[int, _Calls] | None:
        """Reads ``text``, which begins with the start marker.

        Args:
            text: The reply's undecided text, from the marker on.
            final: The reply has ended: decide now.

        Returns:
            None while undecided; else ``(end, calls)``: the region is ``text[:end]`` and holds
            ``calls``, or ``calls`` is None and the region is malformed.
        """


class _JsonBodyRegion(_Region):
    """One JSON object between a start and an end marker (an end marker inside a string is text).

    An unclosed one is accepted when the reply ends right after the object (a stop string may have
    eaten the end marker).
    """

    def __init__(self, start: str, end: str, argument_keys: tuple[str, ...]) -> None:
        self._end = end
        self._keys = argument_keys
        self._pos = len(start)
        self._phase = "open"  # open, value, close
        self._span = JsonSpan()
        self._value = (0, 0)

    def scan(self, text: str, final: bool) -> tuple[int, _Calls] | None:
        bad: tuple[int, _Calls] = (0, None)
        if self._phase == "open":
            self._pos = _skip(_SPACE, text, self._pos)
            if self._pos == len(text):
                return bad if final else None
            if text[self._pos] != "{":
                return bad
            self._phase, self._value = "value", (self._pos, self._pos)
        if self._phase == "value":
            end = self._span.advance(text, self._pos)
            if end < 0:
                self._pos = len(text)
                return bad if final else None
            self._phase, self._pos, self._value = "close", end, (self._value[0], end)
        self._pos = _skip(_SPACE, text, self._pos)
        rest = text[self._pos : self._pos + len(self._end)]
        if rest == self._end or (final and not rest):
            call = json_call(text[self._value[0] : self._value[1]], argument_keys=self._keys)
            return self._pos + len(rest), None if call is None else [call]
        return None if self._end.startswith(rest) and not final else bad


class _MarkerParser(ToolParser):
    """A format whose calls start with a fixed marker, anywhere in the reply."""

    start: ClassVar[str]

    @abstractmethod
    def region(self) -> _Region:
        """A fresh reader of the call region at a start marker."""

    def hold(self, text: str) -> int:
        """How many characters at the end of undecided content may still begin a marker."""
        return _prefix_hold(text, self.start)

    def clean(self, text: str) -> str:
        """Content as the user should see it (markers that are not calls removed)."""
        return text

    def streamer(self) -> ReplyStreamer:
        """A new streamer for one reply; it gives out exactly what :meth:`extract` would find."""
        return _MarkerStreamer(self)


class _MarkerStreamer(ReplyStreamer):
    def __init__(self, parser: _MarkerParser) -> None:
        super().__init__()
        self._parser = parser
        self._buf = ""
        self._region: _Region | None = None
        self._sink = ContentSink()

    def feed(self, delta_text: str) -> list[ReplyDelta]:
        self._buf += delta_text
        return self._run(final=False)

    def finish(self) -> list[ReplyDelta]:
        return self._run(final=True)

    def _content(self, text: str, out: list[ReplyDelta]) -> None:
        piece = self._sink.push(self._parser.clean(text))
        if piece:
            out.append(ReplyDelta(content=piece))

    def _run(self, final: bool) -> list[ReplyDelta]:
        out: list[ReplyDelta] = []
        parser = self._parser
        while True:
            if self._region is None:
                start = self._buf.find(parser.start)
                if start < 0:
                    cut = len(self._buf) - (0 if final else parser.hold(self._buf))
                    self._content(self._buf[:cut], out)
                    self._buf = self._buf[cut:]
                    return out
                self._content(self._buf[:start], out)
                self._buf = self._buf[start:]
                self._region = parser.region()
            result = self._region.scan(self._buf, final)
            if result is None:
                return out
            end, calls = result
            self._region = None
            if calls is None:  # give the marker back and read on from just after it
                self._content(self._buf[: len(parser.start)], out)
                self._buf = self._buf[len(parser.start) :]
                continue
            out.extend(self._call(name, arguments, parser.id_style) for name, arguments in calls)
            self._buf = self._buf[end:]


class HermesToolParser(_MarkerParser):
    """Hermes 2/3 and Qwen2/2.5/3: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``.

    A reply may hold several calls, with content before, between and after them.
    """

    name = "hermes"
    start = "<tool_call>"
    end = "</tool_call>"

    def region(self) -> _Region:
        """A fresh reader of the call region at a start marker."""
        return _JsonBodyRegion(self.start, self.end, ("arguments", "parameters"))


_SPECIAL = re.compile(r"<\|[A-Za-z0-9_]+\|>")
_SPECIAL_START = re.compile(r"<(?:\|[A-Za-z0-9_]*\|?)?")


class InternLM2ToolParser(_MarkerParser):
    """InternLM2/2.5 chat: ``<|action_start|><|plugin|>{"name": ..., "parameters": {...}}<|action_end|>``.

    The markers are special tokens (decode with ``skip_special_tokens=False``); other special
    markers (``<|im_end|>``, an ``<|interpreter|>`` action's markers) are removed from the content.
    """

    name = "internlm2"
    needs_special_tokens = True
    start = "<|action_start|><|plugin|>"
    end = "<|action_end|>"

    def region(self) -> _Region:
        """A fresh reader of the call region at a start marker."""
        return _JsonBodyRegion(self.start, self.end, ("parameters", "arguments"))

    def hold(self, text: str) -> int:
        """How many characters at the end of undecided content may still begin a marker."""
        held = _prefix_hold(text, self.start)
        last = text.rfind("<")
        if last >= 0 and _SPECIAL_START.fullmatch(text, last):
            held = max(held, len(text) - last)
        return held

    def clean(self, text: str) -> str:
        """Content without special markers."""
        return _SPECIAL.sub("", text)


class _MistralRegion(_Region):
    """A Mistral call region: ``[TOOL_CALLS]``, then a JSON array of calls or ``name[ARGS]{...}``.

    An optional ``[CALL_ID]id`` may follow the name; ``[ARGS]`` may be missing when special tokens
    were skipped.
    """

    def __init__(self, start: str) -> None:
        self._pos = len(start)
        self._phase = "start"
        self._value_start = 0
        self._name = ""
        self._span = JsonSpan()

    def scan(self, text: str, final: bool) -> tuple[int, _Calls] | None:
        bad: tuple[int, _Calls] = (0, None)
        while True:
            if self._phase in ("start", "args"):
                self._pos = _skip(_SPACE, text, self._pos)
                if self._pos == len(text):
                    return bad if final else None
                char = text[self._pos]
                if self._phase == "start" and char == "[":
                    self._phase = "array"
                elif self._phase == "args" and char == "{":
                    self._phase = "object"
                elif self._phase == "start" and _skip(_NAME_CHARS, char, 0):
                    self._phase = "name"
                else:
                    return bad
                self._value_start = self._pos
            elif self._phase in ("array", "object"):
                end = self._span.advance(text, self._pos)
                if end < 0:
                    self._pos = len(text)
                    return bad if final else None
                return end, self._calls(text[self._value_start : end])
            else:  # "name" or "call_id"
                chars = _NAME_CHARS if self._phase == "name" else _ID_CHARS
                stop = _skip(chars, text, self._pos)
                self._pos = stop
                if self._phase == "name":
                    self._name = text[self._value_start : stop]
                nexts = (_ARGS, _CALL_ID) if self._phase == "name" else (_ARGS,)
                marker = next((marker for marker in nexts if text.startswith(marker, stop)), None)
                if marker is not None:
                    self._phase = "args" if marker == _ARGS else "call_id"
                    self._pos = stop + len(marker)
                elif self._phase == "name" and text.startswith("{", stop):
                    self._phase = "args"
                elif any(marker.startswith(text[stop:]) for marker in nexts):  # may still grow into one
                    return bad if final else None
                else:
                    return bad

    def _calls(self, value_text: str) -> _Calls:
        try:
            value = json.loads(value_text)
        except ValueError:
            return None
        if self._phase == "object":
            value = {"name": self._name, "arguments": value}
        if not isinstance(value, list):
            value = [value]
        keys = ("arguments", "parameters")
        calls = [call_of(item, argument_keys=keys, require_arguments=False) for item in value]
        if not calls or any(call is None for call in calls):
            return None
        return [call for call in calls if call is not None]


class MistralToolParser(_MarkerParser):
    """Mistral: ``[TOOL_CALLS] [{"name": ..., "arguments": {...}}]`` or ``[TOOL_CALLS]name[ARGS]{...}``.

    The JSON array is the format of tokenizers up to v7; from v11 on each call is its own
    ``[TOOL_CALLS]name[ARGS]{...}``.

    ``[TOOL_CALLS]`` is a special token (decode with ``skip_special_tokens=False``); call ids are
    9 letters and digits, the shape Mistral's templates check.
    """

    name = "mistral"
    needs_special_tokens = True
    id_style = "mistral"
    start = "[TOOL_CALLS]"

    def region(self) -> _Region:
        """A fresh reader of the call region at a start marker."""
        return _MistralRegion(self.start)


_PYTHON_TAG = "<|python_tag|>"


def _llama3_calls(text: str) -> list[tuple[str, str]] | None:
    """The calls of a Llama 3 JSON reply (objects separated by ``;``), or None when it is not one."""
    body = text.strip()
    if body.startswith(_PYTHON_TAG):
        body = body[len(_PYTHON_TAG) :].lstrip()
    decoder = json.JSONDecoder()
    calls: list[tuple[str, str]] = []
    pos = 0
    while True:
        try:
            value, pos = decoder.raw_decode(body, pos)
        except ValueError:
            return None
        call = call_of(value, argument_keys=("parameters", "arguments"), require_arguments=True)
        if call is None:
            return None
        calls.append(call)
        pos = _skip(_SPACE, body, pos)
        if pos < len(body) and body[pos] == ";":
            pos = _skip(_SPACE, body, pos + 1)
        elif pos < len(body):
            return None
        if pos == len(body):
            return calls


class _Llama3Streamer(ReplyStreamer):
    """Streams a Llama 3 JSON reply.

    A reply that opens with ``{`` (or ``<|python_tag|>``) may be calls: it is held to the end and
    then parsed whole; any other reply is content, given out as it comes.
    """

    def __init__(self, parser: ToolParser) -> None:
        super().__init__()
        self._id_style = parser.id_style
        self._buf = ""
        self._mode = "undecided"
        self._sink = ContentSink()

    def _content(self, text: str) -> list[ReplyDelta]:
        piece = self._sink.push(text)
        return [ReplyDelta(content=piece)] if piece else []

    def feed(self, delta_text: str) -> list[ReplyDelta]:
        if self._mode == "content":
            return self._content(delta_text)
        self._buf += delta_text
        if self._mode == "undecided":
            head = self._buf.lstrip()
            if head.startswith(("{", _PYTHON_TAG)):
                self._mode = "calls"
            elif head and not _PYTHON_TAG.startswith(head):
                self._mode = "content"
                text, self._buf = self._buf, ""
                return self._content(text)
        return []

    def finish(self) -> list[ReplyDelta]:
        text, self._buf = self._buf, ""
        calls = _llama3_calls(text) if self._mode == "calls" else None
        if calls is None:
            return self._content(text)
        return [self._call(name, arguments, self._id_style) for name, arguments in calls]


class Llama3JsonToolParser(ToolParser):
    """Llama 3.1/3.2 JSON tool calling: the reply is ``{"name": ..., "parameters": {...}}``.

    The arguments may also be under ``"arguments"``; the reply may start with ``<|python_tag|>``
    and hold several calls separated by ``;``. A reply that is not entirely such calls is content.
    A reply that opens with ``{`` is held back while it streams until it ends, since only its end
    tells whether it was a call.
    """

    name = "llama3_json"

    def streamer(self) -> ReplyStreamer:
        """A new streamer for one reply; it gives out exactly what :meth:`extract` would find."""
        return _Llama3Streamer(self)


TOOL_PARSERS: dict[str, type[ToolParser]] = {
    parser.name: parser
    for parser in (HermesToolParser, InternLM2ToolParser, Llama3JsonToolParser, MistralToolParser)
}
"""The tool-call parsers by name (``--tool-call-parser NAME``)."""


def get_tool_parser(name: str) -> ToolParser:
    """The tool-call parser called ``name``.

    Args:
        name: One of :data:`TOOL_PARSERS`.

    Returns:
        A parser (parsers keep no state; each reply gets its own streamer).

    Raises:
        InvalidRequestError: No parser has that name (``param="tool_call_parser"``).
    """
    parser = TOOL_PARSERS.get(name) if isinstance(name, str) else None
    if parser is None:
        raise InvalidRequestError(
            f"unknown tool call parser {name!r}: use one of {', '.join(sorted(TOOL_PARSERS))}",
            param="tool_call_parser",
        )
    return parser()


# What each family's chat template writes, in the order checked (Qwen and Hermes templates quote
# only <tool_call>; Llama 3.1's asks for "parameters" JSON and knows <|python_tag|>).
_TEMPLATE_MARKERS = (
    ("internlm2", ("<|action_start|>", "<|plugin|>")),
    ("mistral", ("[TOOL_CALLS]", "[AVAILABLE_TOOLS]")),
    ("hermes", ("<tool_call>",)),
    ("llama3_json", (_PYTHON_TAG, '"parameters": dictionary of argument name')),
)


def detect_tool_parser(chat_template: str | None) -> str | None:
    """The tool-call parser a chat template's model speaks, judged by the markers the template writes.

    Args:
        chat_template: The template's text, or None.

    Returns:
        ``"internlm2"``, ``"mistral"``, ``"hermes"``, ``"llama3_json"``, or None when the template
        shows none of their markers.
    """
    if not chat_template:
        return None
    for name, markers in _TEMPLATE_MARKERS:
        if any(marker in chat_template for marker in markers):
            return name
    return None
