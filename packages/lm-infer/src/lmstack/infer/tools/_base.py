"""What tool-call parsing returns, the streamer and parser interfaces, and the helpers they share."""

from __future__ import annotations

import json
import re
import secrets
import string
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from lmstack.infer._outputs import ToolCall

__all__ = [
    "ContentSink",
    "JsonSpan",
    "ParsedReply",
    "ReplyDelta",
    "ReplyStreamer",
    "ToolCallDelta",
    "ToolParser",
    "call_of",
    "collect",
    "json_call",
    "new_tool_call_id",
]

_ALPHANUMERIC = string.ascii_letters + string.digits
_ID_LENGTHS = {"openai": 24, "mistral": 9}


def new_tool_call_id(style: str = "openai") -> str:
    """A fresh id for a tool call.

    Args:
        style: ``"openai"`` for ``call_`` and 24 random letters and digits (OpenAI's shape), or
            ``"mistral"`` for 9 random letters and digits, the only shape Mistral's chat templates accept.

    Returns:
        The id.

    Raises:
        ValueError: ``style`` is neither.
    """
    length = _ID_LENGTHS.get(style)
    if length is None:
        raise ValueError(f"unknown tool call id style {style!r}: use 'openai' or 'mistral'")
    body = "".join(secrets.choice(_ALPHANUMERIC) for _ in range(length))
    return body if style == "mistral" else "call_" + body


@dataclass
class ParsedReply:
    """A whole reply split into its content and its tool calls.

    Attributes:
        content: The text outside the calls, or None when that is only whitespace.
        tool_calls: The calls, in the order the model made them.
    """

    content: str | None
    tool_calls: list[ToolCall] = field(default_factory=list)


@dataclass
class ToolCallDelta:
    """A piece of one tool call while a reply streams, in OpenAI's ``delta.tool_calls[]`` shape.

    The first delta of a call carries its ``index``, ``id`` and ``name`` (and maybe arguments);
    later ones carry only ``index`` and the next piece of ``arguments``. Concatenating a call's
    ``arguments`` pieces gives its whole arguments JSON text.

    Attributes:
        index: Which call of the reply this is (0 for the first).
        id: The call's id on its first delta, else None.
        name: The function's name on its first delta, else None.
        arguments: The next piece of the arguments' JSON text (may be ``""``).
    """

    index: int
    id: str | None
    name: str | None
    arguments: str

    def to_openai(self) -> dict[str, Any]:
        """The delta as an entry of an OpenAI stream chunk's ``delta.tool_calls``."""
        function: dict[str, Any] = {"arguments": self.arguments}
        out: dict[str, Any] = {"index": self.index}
        if self.id is not None:
            out.update(id=self.id, type="function")
        if self.name is not None:
            function["name"] = self.name
        out["function"] = function
        return out


@dataclass
class ReplyDelta:
    """What one streamed piece of a reply adds: some content, or a piece of a tool call.

    Attributes:
        content: Text outside the calls, or None.
        tool_call: A piece of a call, or None.
    """

    content: str | None = None
    tool_call: ToolCallDelta | None = None


class ReplyStreamer(ABC):
    """Splits a reply into content and tool calls as its text arrives.

    Feed it each piece of generated text, then call :meth:`finish` once at the end. Content is given
    out as it comes, except text that may still turn out to be part of a call, which is held back
    until that is decided; text that turns out not to be a well-formed call comes out as content.

    Attributes:
        calls: Every call given out so far, complete.
    """

    def __init__(self) -> None:
        self.calls: list[ToolCall] = []

    @abstractmethod
    def feed(self, delta_text: str) -> list[ReplyDelta]:
        """Takes the next piece of the reply's text and returns what can be given out now."""

    @abstractmethod
    def finish(self) -> list[ReplyDelta]:
        """Ends the reply and returns what was still held back."""

    def _call(self, name: str, arguments: str, id_style: str) -> ReplyDelta:
        """Records a whole call and returns its one delta."""
        call = ToolCall(id=new_tool_call_id(id_style), name=name, arguments=arguments)
        self.calls.append(call)
        return ReplyDelta(tool_call=ToolCallDelta(len(self.calls) - 1, call.id, name, arguments))


class ToolParser(ABC):
    """Finds the tool calls in a model's reply, in the format its chat template taught it.

    Attributes:
        name: The parser's name (``--tool-call-parser``).
        needs_special_tokens: The format's markers are special tokens, so the reply must be decoded
            with ``skip_special_tokens=False`` for the parser to see them.
        id_style: The shape of the call ids this model family expects back in the history
            (see :func:`new_tool_call_id`).
    """

    name: ClassVar[str]
    needs_special_tokens: ClassVar[bool] = False
    id_style: ClassVar[str] = "openai"

    def extract(self, text: str) -> ParsedReply:
        """Splits a whole reply into its content and its calls.

        Args:
            text: The reply's text.

        Returns:
            The content (stripped at both ends; None when only whitespace) and the calls. A marker
            that never completes or a call that is not well-formed JSON stays in the content.
        """
        return collect(self.streamer(), [text])

    @abstractmethod
    def streamer(self) -> ReplyStreamer:
        """A new streamer for one reply; it gives out exactly what :meth:`extract` would find."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def collect(streamer: ReplyStreamer, pieces: Sequence[str]) -> ParsedReply:
    """Runs a streamer over the pieces of a reply and joins what it gave out.

    Args:
        streamer: A fresh streamer.
        pieces: The reply's text, in pieces.

    Returns:
        The joined content (None when only whitespace) and the calls.
    """
    deltas = [delta for piece in pieces for delta in streamer.feed(piece)]
    deltas += streamer.finish()
    content = "".join(delta.content for delta in deltas if delta.content is not None)
    return ParsedReply(content if content.strip() else None, list(streamer.calls))


def call_of(value: Any, *, argument_keys: tuple[str, ...], require_arguments: bool) -> tuple[str, str] | None:
    """The ``(name, arguments JSON text)`` of a call object, or None when it is not a well-formed call.

    A call has a non-empty string ``name`` and an object under the first of ``argument_keys`` it
    has (arguments given as the JSON text of an object are accepted too); without any of those keys
    its arguments are ``{}`` unless ``require_arguments``.
    """
    if not isinstance(value, dict):
        return None
    name = value.get("name")
    if not isinstance(name, str) or not name.strip():
        return None
    key = next((key for key in argument_keys if key in value), None)
    if key is None and require_arguments:
        return None
    arguments = {} if key is None else value[key]
    if isinstance(arguments, str):  # some models encode the arguments twice
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return name.strip(), json.dumps(arguments, ensure_ascii=False)


def json_call(
    text: str, *, argument_keys: tuple[str, ...] = ("arguments", "parameters")
) -> tuple[str, str] | None:
    """The call that ``text`` holds as one JSON object (whitespace around it allowed), or None."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return call_of(value, argument_keys=argument_keys, require_arguments=False)


class ContentSink:
    """Gives out a reply's content stripped at both ends, as it streams.

    Leading whitespace is dropped until the first other character; a run of whitespace is held
    until something other than whitespace follows it, and dropped if the reply ends first.
    """

    def __init__(self) -> None:
        self._started = False
        self._held = ""

    def push(self, text: str) -> str:
        """Takes the next piece of content and returns what can be given out now."""
        if not self._started:
            text = text.lstrip()
            if not text:
                return ""
            self._started = True
        body = text.rstrip()
        if not body:
            self._held += text
            return ""
        out = self._held + body
        self._held = text[len(body) :]
        return out


class JsonSpan:
    """Finds where a JSON object or array closes, reading its text piece by piece.

    It tracks strings (and their escapes) and the nesting depth only, not full JSON validity:
    what it delimits is then parsed with :func:`json.loads`.
    """

    _IN_STRING = re.compile(r'["\\]')
    _OUTSIDE = re.compile(r'["{}\[\]]')

    def __init__(self) -> None:
        self.depth = 0
        self._in_string = False
        self._escaped = False

    def advance(self, text: str, start: int) -> int:
        """Reads ``text[start:]`` (the first call starts at the opening bracket).

        Returns:
            The index just past the bracket that closes the value, or -1 when it has not closed yet.
        """
        pos = start
        end = len(text)
        while pos < end:
            if self._escaped:
                self._escaped = False
                pos += 1
                continue
            pattern = self._IN_STRING if self._in_string else self._OUTSIDE
            found = pattern.search(text, pos)
            if found is None:
                return -1
            char = found.group()
            pos = found.end()
            if self._in_string:
                if char == "\\":
                    self._escaped = True
                else:
                    self._in_string = False
            elif char == '"':
                self._in_string = True
            elif char in "{[":
                self.depth += 1
            else:
                self.depth -= 1
                if self.depth <= 0:
                    return pos
        return -1
