"""Planning a chat request with tools or a response format: the prompt, the constraint, the reply's parser."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from lmstack.core import LMStackError, Tokenizer
from lmstack.infer._errors import InvalidRequestError
from lmstack.infer._outputs import ToolCall
from lmstack.infer._sampling_params import SamplingParams
from lmstack.infer.tools._base import (
    JsonSpan,
    ParsedReply,
    ReplyDelta,
    ReplyStreamer,
    ToolCallDelta,
    ToolParser,
    call_of,
    new_tool_call_id,
)
from lmstack.infer.tools._choice import (
    check_tools,
    named_schema,
    required_schema,
    resolve_tool_choice,
    response_format_schema,
)
from lmstack.infer.tools._parsers import detect_tool_parser, get_tool_parser

logger = logging.getLogger(__name__)

__all__ = ["ChatMode", "ChatPlan", "plan_chat"]

ChatMode = Literal["text", "json", "auto", "required", "named"]

_DEFAULT_PARSER = "hermes"
_logged: set[tuple[str, int]] = set()  # (what, hash of the template) already logged


def _log_once(level: int, what: str, template: str, message: str, *args: Any) -> None:
    """Logs ``message`` once per chat template (a server would otherwise repeat it on every request)."""
    key = (what, hash(template))
    if key in _logged:
        return
    if len(_logged) > 1024:
        _logged.clear()
    _logged.add(key)
    logger.log(level, message, *args)


def _bad_message(index: int, problem: str) -> InvalidRequestError:
    return InvalidRequestError(f"messages[{index}] {problem}", param="messages")


def _content_text(content: Any, index: int) -> str:
    """A message's content as text: a string, or text parts joined by newlines."""
    if isinstance(content, str):
        return content
    if not isinstance(content, Sequence) or isinstance(content, (bytes, Mapping)):
        raise _bad_message(
            index, f"content must be a string or a list of text parts, got {type(content).__name__}"
        )
    texts: list[str] = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            raise _bad_message(
                index, f"content parts must be {{'type': 'text', 'text': ...}}, got {part!r:.80}"
            )
    return "\n".join(texts)


def _history_call(call: Any, index: int, names: dict[str, str]) -> dict[str, Any]:
    """An assistant's earlier tool call, with its arguments parsed for templates that ``tojson`` them."""
    function = call.get("function") if isinstance(call, Mapping) else None
    name = function.get("name") if isinstance(function, Mapping) else None
    if not isinstance(name, str) or not name:
        raise _bad_message(index, "tool_calls entries must be {'id': ..., 'type': 'function', 'function': "
                           "{'name': ..., 'arguments': '<JSON text>'}}")  # fmt: skip
    assert isinstance(function, Mapping) and isinstance(call, Mapping)
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            arguments = parsed
    out = {key: value for key, value in call.items() if value is not None}
    out["type"] = out.get("type", "function")
    out["function"] = {**function, "name": name, "arguments": arguments}
    if isinstance(call.get("id"), str):
        names[call["id"]] = name
    return out


def normalise_messages(messages: Any) -> list[dict[str, Any]]:
    """OpenAI chat messages as chat templates read them.

    ``developer`` becomes ``system``, content parts are joined into text, assistant ``tool_calls``
    keep OpenAI's shape with ``function.arguments`` parsed to a dict (kept as text when it does not
    parse), and a ``tool`` message without a ``name`` gets the name of the call it answers.

    Raises:
        InvalidRequestError: ``param="messages"``, the message naming the entry at fault.
    """
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence) or not messages:
        raise InvalidRequestError(
            "messages must be a non-empty list of {'role': ..., 'content': ...} objects", param="messages"
        )
    names: dict[str, str] = {}
    out: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) and callable(getattr(message, "model_dump", None)):
            message = message.model_dump()
        if not isinstance(message, Mapping):
            raise _bad_message(
                index, f"must be an object with 'role' and 'content', got {type(message).__name__}"
            )
        turn = {key: value for key, value in message.items() if value is not None}
        role = turn.get("role")
        if not isinstance(role, str) or not role:
            raise _bad_message(index, f"needs a string 'role' (such as 'user'), got {role!r}")
        turn["role"] = "system" if role == "developer" else role
        if "content" in turn:
            turn["content"] = _content_text(turn["content"], index)
        calls = turn.get("tool_calls")
        if calls is not None:
            if role != "assistant" or not isinstance(calls, list):
                raise _bad_message(index, "tool_calls must be a list, on an assistant message")
            turn["tool_calls"] = [_history_call(call, index, names) for call in calls]
        elif "content" not in turn:
            raise _bad_message(index, f"(role {role!r}) has no 'content'")
        if role == "tool":
            call_id = turn.get("tool_call_id")
            if call_id is not None and not isinstance(call_id, str):
                raise _bad_message(index, f"tool_call_id must be a string, got {call_id!r}")
            if "name" not in turn and call_id in names:
                turn["name"] = names[call_id]
        out.append(turn)
    return out


def _constrained(params: SamplingParams, schema: dict[str, Any], *, fit: bool = False) -> SamplingParams:
    """A copy of ``params`` that constrains the output to ``schema``.

    With ``fit`` (tool calls), ``guided_json_fit`` is switched on unless the caller chose: a call
    must come back whole even from a weak model, and a call cut by ``max_tokens`` is no call.

    The schema is built from parts already checked here, so the copy skips ``SamplingParams``'
    own meta-schema check (milliseconds per request); ``dataclasses.replace`` still runs where the
    combination itself is refused (``min_tokens`` with a constraint), for its error.
    """
    if params.min_tokens:
        return dataclasses.replace(params, guided_json=schema)  # raises, naming min_tokens
    out = copy.copy(params)
    out.guided_json = schema
    if fit and out.guided_json_fit is None:
        out.guided_json_fit = True
    return out


def _template_source(tokenizer: Tokenizer, chat_template: str | None, tools: bool) -> str:
    """The text of the template that will render the conversation (as the tokenizer picks it)."""
    templates = tokenizer.chat_templates
    if chat_template is not None:
        return templates.get(chat_template, chat_template)
    if tools and "tool_use" in templates:
        return templates["tool_use"]
    return templates.get("default", "")


class _TextStreamer(ReplyStreamer):
    """Everything is content."""

    def feed(self, delta_text: str) -> list[ReplyDelta]:
        return [ReplyDelta(content=delta_text)] if delta_text else []

    def finish(self) -> list[ReplyDelta]:
        return []


class _NamedStreamer(ReplyStreamer):
    """The whole reply is one call's arguments: the call opens with the first text, then streams."""

    def __init__(self, name: str, id_style: str) -> None:
        super().__init__()
        self._name = name
        self._id_style = id_style

    def feed(self, delta_text: str) -> list[ReplyDelta]:
        if not delta_text:
            return []
        if not self.calls:
            call = ToolCall(id=new_tool_call_id(self._id_style), name=self._name, arguments=delta_text)
            self.calls.append(call)
            return [ReplyDelta(tool_call=ToolCallDelta(0, call.id, call.name, delta_text))]
        self.calls[0].arguments += delta_text
        return [ReplyDelta(tool_call=ToolCallDelta(0, None, None, delta_text))]

    def finish(self) -> list[ReplyDelta]:
        return []


class _RequiredStreamer(ReplyStreamer):
    """Reads a ``"required"`` reply, a JSON array of calls: each call goes out when its object closes.

    From text the grammar would not allow on, the rest is content, as is an unfinished call when
    the reply is cut short.
    """

    def __init__(self, plan: ChatPlan) -> None:
        super().__init__()
        self._plan = plan
        self._buf = ""
        self._pos = 0  # how far the text is read
        self._mark = 0  # where the text not yet given out starts
        self._item = 0  # where the call being read starts
        self._state = "before"  # before, array, item, after, content
        self._span = JsonSpan()

    def feed(self, delta_text: str) -> list[ReplyDelta]:
        self._buf += delta_text
        out: list[ReplyDelta] = []
        buf = self._buf
        while self._state != "content":
            if self._state == "item":
                end = self._span.advance(buf, self._pos)
                if end < 0:
                    self._pos = len(buf)
                    return out
                call = self._plan._required_call(_loads(buf[self._item : end]))
                if call is None:
                    break
                out.append(self._call(*call, self._plan.id_style))
                self._state, self._pos, self._mark = "array", end, end
                continue
            self._pos = len(buf) - len(buf[self._pos :].lstrip())
            if self._pos == len(buf):
                return out
            char = buf[self._pos]
            if (self._state, char) == ("before", "["):
                self._state = "array"
            elif (self._state, char) == ("array", "]"):
                self._state, self._mark = "after", self._pos + 1
            elif (self._state, char) == ("array", "{"):
                self._state, self._item, self._span = "item", self._pos, JsonSpan()
                continue
            elif (self._state, char) != ("array", ","):
                break
            self._pos += 1
        self._state = "content"
        return out + self._rest()

    def _rest(self) -> list[ReplyDelta]:
        rest = self._buf[self._mark :]
        if not rest.strip():  # whitespace waits for what follows it (and is dropped at the end)
            return []
        self._mark = len(self._buf)
        return [ReplyDelta(content=rest)]

    def finish(self) -> list[ReplyDelta]:
        return self._rest() if self._state not in ("after", "content") else []


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


class _FirstCallOnly(ReplyStreamer):
    """Passes on content and the first call only (``parallel_tool_calls=False`` with ``"auto"``)."""

    def __init__(self, inner: ReplyStreamer) -> None:
        super().__init__()
        self._inner = inner

    def _keep(self, deltas: list[ReplyDelta]) -> list[ReplyDelta]:
        self.calls = self._inner.calls[:1]
        return [delta for delta in deltas if delta.tool_call is None or delta.tool_call.index == 0]

    def feed(self, delta_text: str) -> list[ReplyDelta]:
        return self._keep(self._inner.feed(delta_text))

    def finish(self) -> list[ReplyDelta]:
        return self._keep(self._inner.finish())


@dataclass
class ChatPlan:
    """A chat request made ready for the engine, and how to read its replies.

    Attributes:
        prompt_ids: The rendered conversation's token ids.
        params: The sampling parameters to generate with: the caller's, with the constraint the
            request implies (``guided_json``) and ``skip_special_tokens=False`` where the parser
            needs the special markers.
        mode: ``"text"`` (free text; also ``tool_choice="none"``), ``"json"`` (``response_format``
            JSON), ``"auto"`` (free text, calls parsed out of it), ``"required"`` (a JSON array of
            calls, under a grammar) or ``"named"`` (the reply is the named function's arguments).
        tools: The checked tools (rendered into the prompt), or None.
        parser: The tool-call parser in ``"auto"`` mode, else None.
        tool_name: The function forced in ``"named"`` mode, else None.
        parallel_tool_calls: Whether a reply may hold several calls. In ``"auto"`` mode only its
            first call is kept when this is False (``"required"`` limits the array to one instead).
        id_style: The shape of the call ids given out (Mistral models expect 9 characters).
    """

    prompt_ids: list[int]
    params: SamplingParams
    mode: ChatMode
    tools: list[dict[str, Any]] | None = None
    parser: ToolParser | None = None
    tool_name: str | None = None
    parallel_tool_calls: bool = True
    id_style: str = "openai"

    @property
    def offers_tools(self) -> bool:
        """Whether replies are read for tool calls (``CompletionOutput.tool_calls`` is then a list)."""
        return self.mode in ("auto", "required", "named")

    def _required_call(self, item: Any) -> tuple[str, str] | None:
        """The call a ``"required"`` array item holds: one of the tools, with object arguments."""
        names = {tool["function"]["name"] for tool in self.tools or ()}
        call = call_of(item, argument_keys=("arguments",), require_arguments=True)
        if call is None or call[0] not in names or set(item) != {"name", "arguments"}:
            return None
        return call

    def parse(self, text: str) -> ParsedReply:
        """Splits a whole reply into content and calls, as this plan's mode reads it.

        Text and JSON modes give the text as content. ``"auto"`` runs the parser. ``"required"``
        reads the JSON array of calls and ``"named"`` the arguments object; a reply that is not what
        the grammar asks for (such as one cut short by ``max_tokens``) is content, with no calls.
        """
        if self.mode in ("text", "json"):
            return ParsedReply(text, [])
        if self.mode == "auto":
            assert self.parser is not None
            reply = self.parser.extract(text)
            if not self.parallel_tool_calls:
                reply.tool_calls = reply.tool_calls[:1]
            return reply
        content = ParsedReply(text if text.strip() else None, [])
        value = _loads(text)
        if self.mode == "named":
            if not isinstance(value, dict):
                return content
            assert self.tool_name is not None
            return ParsedReply(None, [ToolCall(new_tool_call_id(self.id_style), self.tool_name, text)])
        if not isinstance(value, list) or not value:
            return content
        calls = [self._required_call(item) for item in value]
        if any(call is None for call in calls):
            return content
        return ParsedReply(
            None, [ToolCall(new_tool_call_id(self.id_style), *call) for call in calls if call is not None]
        )

    def streamer(self) -> ReplyStreamer:
        """A streamer for one reply (one per choice).

        For a complete reply it gives out what :meth:`parse` finds. ``"named"`` streams the
        arguments from the first token; ``"required"`` gives out each call when its object closes;
        in those modes a reply cut short keeps what was already given out.
        """
        if self.mode == "auto":
            assert self.parser is not None
            inner = self.parser.streamer()
            return inner if self.parallel_tool_calls else _FirstCallOnly(inner)
        if self.mode == "named":
            assert self.tool_name is not None
            return _NamedStreamer(self.tool_name, self.id_style)
        if self.mode == "required":
            return _RequiredStreamer(self)
        return _TextStreamer()


def plan_chat(
    tokenizer: Tokenizer,
    messages: Any,
    params: SamplingParams,
    *,
    tools: Any = None,
    tool_choice: Any = None,
    response_format: Any = None,
    parallel_tool_calls: bool = True,
    tool_call_parser: str | None = None,
    chat_template: str | None = None,
    add_generation_prompt: bool = True,
    **template_kwargs: Any,
) -> ChatPlan:
    """Renders a chat request and decides how its replies are constrained and read (OpenAI semantics).

    Args:
        tokenizer: The model's tokenizer (its chat template renders the conversation).
        messages: OpenAI chat messages, including assistant ``tool_calls`` and ``tool`` results.
        params: The request's sampling parameters (not changed; the plan holds a copy).
        tools: OpenAI ``tools`` (see :func:`check_tools`); rendered by the template's ``tools``.
        tool_choice: ``"none"``, ``"auto"`` (the default with tools), ``"required"`` or
            ``{"type": "function", "function": {"name": ...}}``.
        response_format: ``{"type": "text" | "json_object" | "json_schema", ...}`` or None.
        parallel_tool_calls: Allow several calls in one reply.
        tool_call_parser: The parser for ``"auto"`` (a :data:`TOOL_PARSERS` name); by default the
            one the chat template's markers show, else ``"hermes"``.
        chat_template: A template string or the name of one of the tokenizer's templates.
        add_generation_prompt: End the prompt with the header of an assistant turn.
        **template_kwargs: Further template variables (``enable_thinking`` ...).

    Returns:
        The plan: prompt ids, constrained sampling parameters, and how to parse the replies.

    Raises:
        InvalidRequestError: With ``param`` naming the field at fault: ``messages`` (malformed, or
            the template refused them), ``tools``, ``tool_choice`` (unknown, without tools, naming
            a missing function, or together with a ``guided_*`` constraint), ``response_format``
            (malformed, an invalid schema, together with tools or a ``guided_*`` constraint),
            ``parallel_tool_calls``, ``tool_call_parser``, or ``min_tokens`` (not allowed with a
            constraint).
    """
    checked = check_tools(tools) if tools is not None else None
    schema = response_format_schema(response_format)
    choice, tool_name = resolve_tool_choice(tool_choice, checked)
    if not isinstance(parallel_tool_calls, bool):
        raise InvalidRequestError(f"parallel_tool_calls must be a bool, got {parallel_tool_calls!r}",
                                  param="parallel_tool_calls")  # fmt: skip
    explicit = get_tool_parser(tool_call_parser) if tool_call_parser is not None else None
    if schema is not None and params.guided_kind is not None:
        raise InvalidRequestError(f"response_format and {params.guided_kind} are both given; use one",
                                  param="response_format")  # fmt: skip
    if schema is not None and choice != "none":
        raise InvalidRequestError("response_format JSON cannot be combined with tools unless tool_choice is "
                                  "'none'; drop one of them", param="response_format")  # fmt: skip
    if choice in ("required", "named") and params.guided_kind is not None:
        raise InvalidRequestError(f"tool_choice {tool_choice!r} constrains the reply and cannot be combined "
                                  f"with {params.guided_kind}", param="tool_choice")  # fmt: skip

    conversation = normalise_messages(messages)
    template = _template_source(tokenizer, chat_template, checked is not None)
    if checked and "tools" not in template:
        _log_once(
            logging.WARNING,
            "no-tools",
            template,
            "the chat template does not render `tools`: the model will not see the %d tool(s) it is offered "
            "(tool_choice 'required' or a named function still produce a valid call)",
            len(checked),
        )
    try:
        text = tokenizer.apply_chat_template(
            conversation,
            add_generation_prompt=add_generation_prompt,
            tools=checked,
            chat_template=chat_template,
            **template_kwargs,
        )
    except LMStackError as exc:
        raise InvalidRequestError(f"cannot render the conversation with the chat template: {exc}",
                                  param="messages") from None  # fmt: skip
    assert isinstance(text, str)
    prompt_ids = tokenizer.encode(text, add_special_tokens=False)

    if checked is None or choice == "none":
        mode: ChatMode = "text" if schema is None else "json"
        plan_params = copy.copy(params) if schema is None else _constrained(params, schema)
        return ChatPlan(prompt_ids, plan_params, mode, tools=checked, parallel_tool_calls=parallel_tool_calls)

    parser = explicit
    if parser is None:
        detected = detect_tool_parser(template)
        if detected is None:
            _log_once(
                logging.INFO,
                "parser",
                template,
                "no tool-call format recognised in the chat template; parsing tool calls as %r "
                "(choose another with tool_call_parser)",
                _DEFAULT_PARSER,
            )
        parser = get_tool_parser(detected or _DEFAULT_PARSER)
    plan = ChatPlan(prompt_ids, copy.copy(params), "auto", tools=checked,
                    parallel_tool_calls=parallel_tool_calls, id_style=parser.id_style)  # fmt: skip
    if choice == "auto":
        plan.parser = parser
        if parser.needs_special_tokens:  # the parser must see the special tokens of its markers
            plan.params.skip_special_tokens = False
    elif choice == "required":
        plan.mode = "required"
        plan.params = _constrained(params, required_schema(checked, parallel_tool_calls), fit=True)
    else:
        tool = next(tool for tool in checked if tool["function"]["name"] == tool_name)
        plan.mode, plan.tool_name = "named", tool_name
        plan.params = _constrained(params, named_schema(tool), fit=True)
    return plan
