"""Rendering chat templates: a model's own Jinja2 template, exactly as Hugging Face renders it.

Templates come from checkpoints found on the internet, so they are untrusted code: they run in
Jinja2's immutable sandbox, see only plain JSON-like data, and cannot store dunder attributes.
The environment (trim_blocks, lstrip_blocks, loop controls, ``tojson``, ``raise_exception``,
``strftime_now``, the ``{% generation %}`` tag) matches what the templates in the wild are written
against, so that a template renders here byte for byte as it does in ``transformers``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, NoReturn

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lmstack.core._errors import TokenizerError

logger = logging.getLogger(__name__)

__all__ = ["INTERNLM2_CHAT_TEMPLATE", "compile_chat_template", "render_chat_template", "validate_messages"]

INTERNLM2_CHAT_TEMPLATE: str = (
    "{% if bos_token is defined and bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% elif message['content'] is iterable %}"
    "{% for part in message['content'] %}"
    "{% if part is string %}{{ part }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""InternLM2 ChatML: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per turn after the bos token.

With ``add_generation_prompt`` it ends with ``<|im_start|>assistant\\n``. Content may be a string or
a list of content parts, of which the ``text`` parts are kept.
"""

# Reasoning is passed under several names; templates read "reasoning_content", gpt-oss reads "thinking".
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class _TemplateRaised(jinja2.exceptions.TemplateError):
    """``raise_exception()`` was called from inside a template."""


def _raise_exception(message: str) -> NoReturn:
    raise _TemplateRaised(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes HTML characters and sorts keys; templates expect plain json.dumps.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _TemplateDict:
    """A ``dict`` global that builds dicts but exposes none of the type's attributes."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """``namespace()`` that refuses underscore-prefixed names, so templates cannot reach internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # same signature trick as Jinja's Namespace
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes on a namespace (got {name!r})"
            )


class _GenerationTag(jinja2.ext.Extension):
    """Accepts ``{% generation %}...{% endgeneration %}`` and renders its body unchanged.

    Templates mark assistant turns with it for assistant-token masks; rendering must not fail on it.
    """

    tags = {"generation"}  # noqa: RUF012 - Jinja reads this class attribute

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return str(caller())


@functools.lru_cache(maxsize=64)
def compile_chat_template(template: str) -> jinja2.Template:
    """Compiles a chat template once; later calls with the same text reuse the compiled template.

    Args:
        template: The Jinja2 source of the template.

    Returns:
        The compiled template.

    Raises:
        TokenizerError: The template has a syntax error.
    """
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise TokenizerError(
            f"the chat template has a syntax error on line {exc.lineno}: {exc.message}. "
            f"Near: {_line(template, exc.lineno)!r}. Fix the template or pass another with chat_template=."
        ) from exc


def _line(text: str, lineno: int | None) -> str:
    lines = text.splitlines()
    if lineno is None or not 1 <= lineno <= len(lines):
        return text[:80]
    return lines[lineno - 1][:120]


def _plain(value: Any) -> Any:
    """Rebuilds ``value`` from plain JSON-like types; anything else becomes an inert ``<TypeName>``.

    Objects carry methods the sandbox does not know to be dangerous, so templates never see them.
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_plain(item) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    model_dump = getattr(value, "model_dump", None)
    if callable(model_dump):  # pydantic models, such as OpenAI SDK messages
        return _plain(model_dump())
    item = getattr(value, "item", None)
    if callable(item) and type(value).__module__ == "numpy":  # numpy scalars
        return _plain(item())
    return f"<{type(value).__name__}>"


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Checks that ``messages`` is a conversation and returns a plain, normalised copy.

    Keys whose value is None are dropped (APIs send ``content=None`` next to ``tool_calls``, which
    templates handle as a missing key), and reasoning given under one of its names is visible under
    the others, as Hugging Face does.

    Args:
        messages: A non-empty sequence of mappings, each with a string ``role`` and a ``content``
            (a string or a list of content parts; it may be absent or None on a message that
            carries ``tool_calls``).

    Returns:
        The messages as plain dicts, safe to hand to a template.

    Raises:
        TokenizerError: ``messages`` is not of that shape; the message says which entry is wrong.
    """
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise TokenizerError(
            "messages must be a list of dicts such as [{'role': 'user', 'content': 'Hi'}], "
            f"got {type(messages).__name__}: {_short(messages)}"
        )
    if len(messages) == 0:
        raise TokenizerError("messages is empty: a chat template needs at least one message")
    out: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        if dataclasses.is_dataclass(message) and not isinstance(message, type):
            message = _plain(message)
        elif not isinstance(message, Mapping) and callable(getattr(message, "model_dump", None)):
            message = message.model_dump()
        if not isinstance(message, Mapping):
            raise TokenizerError(
                f"messages[{index}] must be a dict with 'role' and 'content', got "
                f"{type(message).__name__}: {_short(message)}"
            )
        plain = {key: value for key, value in message.items() if value is not None}
        role = plain.get("role")
        if not isinstance(role, str):
            raise TokenizerError(
                f"messages[{index}] needs a string 'role' (such as 'user' or 'assistant'), "
                f"got {_short(message)}"
            )
        content = plain.get("content")
        if "content" not in plain and "tool_calls" not in plain:
            raise TokenizerError(f"messages[{index}] (role {role!r}) has no 'content': {_short(message)}")
        if content is not None and not isinstance(content, (str, Sequence)):
            raise TokenizerError(
                f"messages[{index}]['content'] must be a string or a list of content parts, got "
                f"{type(content).__name__}"
            )
        plain = _plain(plain)
        reasoning = next((plain[key] for key in _REASONING_FIELDS if plain.get(key) is not None), None)
        if reasoning is not None:
            plain = {"thinking": reasoning, **plain, "reasoning_content": reasoning}
        out.append(plain)
    return out


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def render_chat_template(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = False,
    tools: Sequence[Mapping[str, Any]] | None = None,
    special_tokens: Mapping[str, str] | None = None,
    **template_kwargs: Any,
) -> str:
    """Renders a conversation with a chat template.

    Args:
        template: The Jinja2 source of the template.
        messages: The conversation (see :func:`validate_messages`).
        add_generation_prompt: End with the header that starts an assistant turn.
        tools: JSON schemas of the tools the model may call, or None.
        special_tokens: Named special tokens (``bos_token`` ...) made visible to the template;
            ``template_kwargs`` of the same name win.
        **template_kwargs: Further variables for the template (``documents``, ``enable_thinking`` ...).

    Returns:
        The rendered text.

    Raises:
        TokenizerError: Bad messages or tools, a template syntax error, ``raise_exception()`` called by
            the template, or any other error while rendering.
    """
    chat = validate_messages(messages)
    tool_schemas: list[Any] | None = None
    if tools is not None:
        if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
            raise TokenizerError(f"tools must be a list of JSON-schema dicts, got {type(tools).__name__}")
        for index, tool in enumerate(tools):
            if not isinstance(tool, Mapping):
                raise TokenizerError(
                    f"tools[{index}] must be a JSON-schema dict, got {type(tool).__name__}: {_short(tool)}"
                )
        tool_schemas = _plain(list(tools))
    compiled = compile_chat_template(template)
    variables: dict[str, Any] = {"documents": None, **(special_tokens or {}), **_plain(template_kwargs)}
    variables.update(messages=chat, tools=tool_schemas, add_generation_prompt=add_generation_prompt)
    try:
        return compiled.render(**variables)
    except _TemplateRaised as exc:
        raise TokenizerError(f"the chat template refused the conversation: {exc.message}") from exc
    except jinja2.exceptions.SecurityError as exc:
        raise TokenizerError(f"the chat template tried an unsafe operation: {exc}") from exc
    except jinja2.TemplateError as exc:
        raise TokenizerError(f"rendering the chat template failed: {type(exc).__name__}: {exc}") from exc
    except Exception as exc:
        # Templates are code: a TypeError or KeyError inside one is a template problem, not ours.
        raise TokenizerError(f"rendering the chat template failed: {type(exc).__name__}: {exc}") from exc
