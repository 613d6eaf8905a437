"""Tools: a Python function with a JSON schema built from its type hints and docstring (``@tool``)."""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import logging
import re
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pydantic
import pydantic_core

from lmstack.agent._errors import ToolArgumentError, ToolError

__all__ = ["Tool", "ToolOutput", "tool"]

logger = logging.getLogger(__name__)

# OpenAI's rule for function names.
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# Google docstring sections that end the summary and the Args block.
_SECTIONS = {
    "args",
    "arguments",
    "parameters",
    "params",
    "returns",
    "return",
    "yields",
    "raises",
    "example",
    "examples",
    "note",
    "notes",
    "attributes",
    "see also",
    "warning",
    "warnings",
    "todo",
}
_ARG_LINE = re.compile(r"^\s*\*{0,2}(?P<name>[A-Za-z_]\w*)\s*(?:\((?P<type>[^)]*)\))?\s*:\s*(?P<desc>.*)$")
# JSON-schema keywords whose value is one subschema, a list of them, or a name -> subschema map.
_SUB_ONE = ("items", "additionalProperties", "not", "if", "then", "else", "contains")
_SUB_LIST = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUB_MAP = ("properties", "$defs", "definitions", "patternProperties")


@dataclass
class ToolOutput:
    """What running a tool gives back to an agent. Tools never raise into the agent loop.

    Attributes:
        ok: The tool ran and succeeded.
        content: The text fed back to the model: the result, or the error message when not ``ok``.
        data: The raw return value (when ``ok``; built-in tools also keep it on failure where there is one).
    """

    ok: bool
    content: str
    data: Any = None


def _parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """A Google docstring's summary (the text before the first section) and its ``Args:`` descriptions."""
    lines = inspect.cleandoc(doc or "").splitlines()
    summary: list[str] = []
    args: dict[str, str] = {}
    section: str | None = None
    indent = 0
    current: str | None = None
    for line in lines:
        stripped = line.strip()
        header = stripped[:-1].strip().lower() if stripped.endswith(":") else None
        if header in _SECTIONS and (len(line) - len(line.lstrip())) == 0:
            section, current, indent = header, None, 0
            continue
        if section is None:
            summary.append(stripped)
        elif section in ("args", "arguments", "parameters", "params") and stripped:
            line_indent = len(line) - len(line.lstrip())
            match = _ARG_LINE.match(line)
            if match and (current is None or line_indent <= indent):
                current, indent = match["name"], line_indent
                args[current] = match["desc"].strip()
            elif current is not None:
                args[current] = f"{args[current]} {stripped}".strip()
    # The summary is the paragraphs before the first section, joined into one line each.
    paragraphs = " ".join(summary).strip()
    return re.sub(r"\s+", " ", paragraphs), args


def _clean_schema(schema: Any) -> Any:
    """Drop pydantic's generated ``title`` keys (noise for a model) without touching property names."""
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "title" and isinstance(value, str):
            continue
        if key in _SUB_MAP and isinstance(value, dict):
            out[key] = {name: _clean_schema(sub) for name, sub in value.items()}
        elif key in _SUB_LIST and isinstance(value, list):
            out[key] = [_clean_schema(sub) for sub in value]
        elif key in _SUB_ONE:
            out[key] = _clean_schema(value)
        else:
            out[key] = value
    return out


def _describe_type(schema: Mapping[str, Any], defs: Mapping[str, Any] | None = None) -> str:
    """A short human name of what a property's schema expects (for error messages)."""
    defs = defs or {}
    if "$ref" in schema:
        name = str(schema["$ref"]).rsplit("/", 1)[-1]
        target = defs.get(name)
        if isinstance(target, Mapping) and target.get("type") != "object":
            return _describe_type(target, defs)
        return f"an object ({name})"
    if "enum" in schema:
        return "one of " + ", ".join(json.dumps(v) for v in schema["enum"])
    if "const" in schema:
        return json.dumps(schema["const"])
    if "anyOf" in schema:
        return " or ".join(_describe_type(sub, defs) for sub in schema["anyOf"])
    kind = schema.get("type")
    if kind == "array":
        items = schema.get("items")
        return (
            f"an array (items: {_describe_type(items, defs)})"
            if isinstance(items, dict) and items
            else "an array"
        )
    names = {
        "string": "a string",
        "integer": "an integer",
        "number": "a number",
        "boolean": "a boolean (true or false)",
        "object": "an object",
        "null": "null",
    }
    return names.get(str(kind), "any JSON value") if kind else "any JSON value"


def _render_default(value: Any) -> str:
    """A tool result as text for the model: strings as they are, anything else as JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(pydantic_core.to_jsonable_python(value, fallback=str), ensure_ascii=False, default=str)


class Tool:
    """A function an agent may call, with the JSON schema of its parameters.

    Usually made with :func:`tool`. Calling the tool (``my_tool(...)``) calls the plain function; agents use
    :meth:`acall`, which validates the model's arguments and never raises.

    Args:
        fn: The function (sync or async). Every parameter needs a type hint; ``*args``/``**kwargs`` are not
            allowed (a model cannot fill them).
        name: The name the model calls it by (default: the function's name); ``[A-Za-z0-9_-]{1,64}``.
        description: What it does, for the model (default: the docstring's summary).
        timeout_s: Seconds a call may take before it fails with a timeout result (None: no limit). A sync
            function that overruns keeps running in its worker thread; its result is dropped.
        render: Turns the function's return value into the :class:`ToolOutput` (or text) fed back to the
            model (default: strings as they are, anything else JSON-encoded).

    Attributes:
        name: The tool's name.
        description: Its description.
        parameters: The JSON schema (``type: object``) of its arguments.
        timeout_s: The per-call time limit, or None.
        fn: The plain function.

    Raises:
        ToolError: The function cannot be a tool (bad name, missing type hint, ``*args``...).
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        name: str | None = None,
        description: str | None = None,
        timeout_s: float | None = None,
        render: Callable[[Any], ToolOutput | str] | None = None,
    ) -> None:
        self.fn = fn
        self.name = name if name is not None else getattr(fn, "__name__", "")
        if not _NAME.match(self.name):
            raise ToolError(
                f"tool name {self.name!r} is not allowed: use 1 to 64 letters, digits, '_' or '-' "
                "(pass name=...)"
            )
        if timeout_s is not None and timeout_s <= 0:
            raise ToolError(f"tool {self.name!r}: timeout_s must be positive, got {timeout_s}")
        self.timeout_s = timeout_s
        self._render = render
        summary, arg_docs = _parse_docstring(inspect.getdoc(fn))
        self.description = description if description is not None else summary
        self._model, self._fields = self._build_model(fn, arg_docs)
        schema = _clean_schema(self._model.model_json_schema(by_alias=True))
        schema.setdefault("properties", {})
        self.parameters: dict[str, Any] = schema
        functools.update_wrapper(self, fn, updated=())  # type: ignore[arg-type]

    def _build_model(
        self, fn: Callable[..., Any], arg_docs: Mapping[str, str]
    ) -> tuple[type[pydantic.BaseModel], dict[str, str]]:
        """A pydantic model of the parameters, plus its field names -> parameter names."""
        try:
            signature = inspect.signature(fn)
            hints = typing.get_type_hints(fn, include_extras=True)
        except (TypeError, ValueError, NameError) as exc:
            raise ToolError(f"tool {self.name!r}: cannot read the signature or type hints: {exc}") from exc
        definitions: dict[str, Any] = {}
        fields: dict[str, str] = {}
        for index, (param_name, param) in enumerate(signature.parameters.items()):
            if param.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
                raise ToolError(
                    f"tool {self.name!r}: *{param_name} / **{param_name} cannot be filled by a model; "
                    "give every parameter a name and a type"
                )
            if param_name not in hints:
                raise ToolError(
                    f"tool {self.name!r}: parameter {param_name!r} has no type hint; annotate it "
                    "(str, int, float, bool, list[...], Literal[...], a pydantic model...)"
                )
            default = ... if param.default is inspect.Parameter.empty else param.default
            # Fields get neutral names and the parameter name as alias: any name works ("schema", "model_x").
            field_name = f"p{index}"
            fields[field_name] = param_name
            definitions[field_name] = (
                hints[param_name],
                pydantic.Field(default, alias=param_name, description=arg_docs.get(param_name)),
            )
        try:
            model = pydantic.create_model(  # type: ignore[call-overload]
                f"{self.name}_arguments",
                __config__=pydantic.ConfigDict(extra="forbid", arbitrary_types_allowed=False),
                **definitions,
            )
            model.model_json_schema(by_alias=True)
        except (pydantic.PydanticSchemaGenerationError, pydantic.PydanticUserError, TypeError) as exc:
            raise ToolError(f"tool {self.name!r}: a parameter type has no JSON schema: {exc}") from exc
        return model, fields

    def spec(self) -> dict[str, Any]:
        """The tool as an entry of OpenAI's ``tools``: ``{"type": "function", "function": {...}}``."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }

    def validate(self, arguments: Mapping[str, Any] | str) -> dict[str, Any]:
        """Check a call's arguments against the parameters and return the keyword arguments to call with.

        Args:
            arguments: The arguments as a mapping, or as JSON text (an empty string means no arguments).

        Returns:
            The keyword arguments, coerced to the annotated types (``"3"`` -> ``3`` for an ``int``, a dict
            -> the pydantic model), defaults filled in.

        Raises:
            ToolArgumentError: Not a JSON object, a missing or unknown field, or a value of the wrong type;
                the message names each field at fault and what was expected, for the model to fix its call.
        """
        if isinstance(arguments, str):
            text = arguments.strip()
            if not text:
                parsed: Any = {}
            else:
                try:
                    parsed = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise ToolArgumentError(
                        f"{self.name}: the arguments are not valid JSON ({exc.msg} at position {exc.pos}); "
                        f"send one JSON object with {self._expected_fields()}"
                    ) from exc
        else:
            parsed = arguments
        if not isinstance(parsed, Mapping):
            raise ToolArgumentError(
                f"{self.name}: the arguments must be a JSON object with {self._expected_fields()}, "
                f"got {type(parsed).__name__}"
            )
        try:
            model = self._model.model_validate(dict(parsed))
        except pydantic.ValidationError as exc:
            raise ToolArgumentError(f"{self.name}: invalid arguments: {self._explain(exc)}") from exc
        return {param: getattr(model, field) for field, param in self._fields.items()}

    def _expected_fields(self) -> str:
        properties = self.parameters.get("properties", {})
        if not properties:
            return "no fields"
        required = set(self.parameters.get("required", []))
        defs = self.parameters.get("$defs", {})
        parts = [
            f"{name!r}: {_describe_type(schema, defs)}{'' if name in required else ' (optional)'}"
            for name, schema in properties.items()
        ]
        return "the fields " + "; ".join(parts)

    def _explain(self, exc: pydantic.ValidationError) -> str:
        """One clause per validation error: the field, what was wrong, and what was expected."""
        properties = self.parameters.get("properties", {})
        defs = self.parameters.get("$defs", {})
        clauses: list[str] = []
        for error in exc.errors(include_url=False):
            loc = [str(part) for part in error.get("loc", ())]
            field = ".".join(loc) if loc else "(arguments)"
            top = properties.get(loc[0]) if loc else None
            kind = error.get("type", "")
            if kind == "missing":
                expected = (
                    f" ({_describe_type(top, defs)})" if isinstance(top, dict) and len(loc) == 1 else ""
                )
                clauses.append(f"missing required field {field!r}{expected}")
            elif kind == "extra_forbidden":
                known = ", ".join(repr(name) for name in properties) or "none"
                clauses.append(f"unknown field {field!r} (the fields are: {known})")
            else:
                value = json.dumps(error.get("input"), default=str)
                if len(value) > 80:
                    value = value[:77] + "..."
                expected = (
                    f"; expected {_describe_type(top, defs)}"
                    if isinstance(top, dict) and len(loc) == 1
                    else ""
                )
                clauses.append(f"field {field!r}: {error.get('msg')}, got {value}{expected}")
        return "; ".join(clauses)

    async def acall(self, arguments: Mapping[str, Any] | str) -> ToolOutput:
        """Validate the arguments and run the tool; every failure becomes a ``ToolOutput(ok=False)``.

        A sync function runs in a worker thread so the event loop keeps serving other steps; an async one is
        awaited. Cancelling the awaiting task still cancels it.

        Args:
            arguments: The call's arguments (mapping or JSON text).

        Returns:
            The result: ``ok`` with the rendered value, or not ``ok`` with a message saying what went wrong
            (bad arguments, ``"<tool> timed out after N s"``, ``"<tool> failed: <Type>: <message>"``).
        """
        try:
            kwargs = self.validate(arguments)
        except ToolArgumentError as exc:
            return ToolOutput(ok=False, content=str(exc))
        try:
            if inspect.iscoroutinefunction(self.fn):
                run: Any = self.fn(**kwargs)
            else:
                run = asyncio.to_thread(self._call_sync, kwargs)
            value = await (asyncio.wait_for(run, self.timeout_s) if self.timeout_s is not None else run)
            if inspect.isawaitable(value):  # a sync function that returned a coroutine
                value = await (asyncio.wait_for(value, self.timeout_s) if self.timeout_s else value)
        except asyncio.TimeoutError:
            return ToolOutput(ok=False, content=f"{self.name} timed out after {self.timeout_s:g} s")
        except Exception as exc:
            logger.debug("tool %s failed", self.name, exc_info=True)
            return ToolOutput(ok=False, content=f"{self.name} failed: {type(exc).__name__}: {exc}")
        return self._output(value)

    def _call_sync(self, kwargs: dict[str, Any]) -> Any:
        return self.fn(**kwargs)

    def _output(self, value: Any) -> ToolOutput:
        if isinstance(value, ToolOutput):
            return value
        try:
            rendered = self._render(value) if self._render is not None else _render_default(value)
        except Exception as exc:
            return ToolOutput(
                ok=False, content=f"{self.name} failed: cannot render its result: {type(exc).__name__}: {exc}"
            )
        if isinstance(rendered, ToolOutput):
            return rendered
        return ToolOutput(ok=True, content=rendered, data=value)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"Tool(name={self.name!r}, parameters={list(self.parameters.get('properties', {}))})"


@typing.overload
def tool(fn: Callable[..., Any], /) -> Tool: ...


@typing.overload
def tool(
    fn: None = None,
    /,
    *,
    name: str | None = None,
    description: str | None = None,
    timeout_s: float | None = None,
) -> Callable[[Callable[..., Any]], Tool]: ...


def tool(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    name: str | None = None,
    description: str | None = None,
    timeout_s: float | None = None,
) -> Tool | Callable[[Callable[..., Any]], Tool]:
    """Make a function a :class:`Tool`: bare (``@tool``) or with options (``@tool(timeout_s=5)``).

    The parameters' JSON schema comes from the type hints (str, int, float, bool, list[...], dict, Literal,
    Optional, Enum, pydantic models; a parameter with a default is optional) and the Google docstring: its
    summary is the description, its ``Args:`` lines describe the properties.

    Example:
        >>> @tool
        ... def add(a: int, b: int = 1) -> int:
        ...     '''Add two integers.
        ...
        ...     Args:
        ...         a: The first.
        ...         b: The second.
        ...     '''
        ...     return a + b
        >>> add.spec()["function"]["parameters"]["required"]
        ['a']

    Args:
        fn: The function (when used bare).
        name: The tool's name (default: the function's).
        description: The description (default: the docstring's summary).
        timeout_s: Per-call time limit in seconds (None: none).

    Returns:
        The tool, or a decorator making one.
    """

    def wrap(function: Callable[..., Any]) -> Tool:
        return Tool(function, name=name, description=description, timeout_s=timeout_s)

    return wrap(fn) if fn is not None else wrap
