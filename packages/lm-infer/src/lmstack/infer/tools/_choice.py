"""OpenAI's ``tools``, ``tool_choice`` and ``response_format``: checked, and turned into JSON schemas."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Mapping
from typing import Any

from lmstack.infer._errors import InvalidRequestError
from lmstack.infer._sampling_params import check_json_schema

__all__ = [
    "check_tools",
    "named_schema",
    "required_schema",
    "resolve_tool_choice",
    "response_format_schema",
    "strict_schema",
]

_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}

# JSON Schema keywords whose value is a subschema, a list of them, or a map of names to them.
_ONE = ("additionalProperties", "additionalItems", "contains", "not", "if", "then", "else", "propertyNames",
        "unevaluatedProperties", "unevaluatedItems", "items")  # fmt: skip
_LIST = ("allOf", "anyOf", "oneOf", "prefixItems", "items")
_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _walk(schema: Any, visit: Callable[[dict[str, Any]], None]) -> None:
    """Calls ``visit`` on every (sub)schema dict of ``schema``, parents first."""
    if not isinstance(schema, dict):
        return
    visit(schema)
    for key in _ONE:
        if isinstance(schema.get(key), dict):
            _walk(schema[key], visit)
    for key in _LIST:
        if isinstance(schema.get(key), list):
            for item in schema[key]:
                _walk(item, visit)
    for key in _MAP:
        if isinstance(schema.get(key), dict):
            for item in schema[key].values():
                _walk(item, visit)


def _check_schema(schema: Any, what: str, param: str) -> dict[str, Any]:
    """``schema`` if it is a JSON schema object valid under its meta-schema (checks are cached)."""
    if not isinstance(schema, Mapping):
        raise InvalidRequestError(f"{what} must be a JSON schema object, got {_short(schema)}", param=param)
    return check_json_schema(dict(schema), what, param)


def strict_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``schema`` closed as OpenAI's strict mode closes it.

    Every object schema that lists ``properties`` and does not say ``additionalProperties`` gets
    ``additionalProperties: false``.
    """
    out = copy.deepcopy(schema)

    def close(node: dict[str, Any]) -> None:
        if isinstance(node.get("properties"), dict) and "additionalProperties" not in node:
            node["additionalProperties"] = False

    _walk(out, close)
    return out


def check_tools(tools: Any) -> list[dict[str, Any]]:
    """Checks OpenAI ``tools`` and returns normalised copies.

    Args:
        tools: A non-empty list of ``{"type": "function", "function": {"name": ..., "description": ...,
            "parameters": <JSON schema>, "strict": bool}}`` (only ``name`` is required; ``type``
            defaults to ``"function"``).

    Returns:
        One ``{"type": "function", "function": {...}}`` per tool, with ``parameters`` defaulting to
        ``{"type": "object", "properties": {}}`` and ``"type": "object"`` added where a schema
        leaves its type out.

    Raises:
        InvalidRequestError: ``param="tools"``; the message names the entry at fault
            (``tools[1].function.name``): not a list, an unknown tool type, a missing, malformed or
            repeated name, a bad description or ``strict``, or parameters that are not an object
            schema valid under the JSON Schema meta-schema.
    """
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, (list, tuple)):
        raise InvalidRequestError(
            f"tools must be a list of {{'type': 'function', 'function': {{...}}}}, got {_short(tools)}",
            param="tools",
        )
    if not tools:
        raise InvalidRequestError("tools is empty: leave it out or list a function", param="tools")
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for index, tool in enumerate(tools):
        where = f"tools[{index}]"
        if not isinstance(tool, Mapping):
            raise InvalidRequestError(f"{where} must be an object, got {_short(tool)}", param="tools")
        if tool.get("type", "function") != "function":
            raise InvalidRequestError(
                f"{where}.type must be 'function' (the only tool type served), got {tool.get('type')!r}",
                param="tools",
            )
        function = tool.get("function")
        if not isinstance(function, Mapping):
            raise InvalidRequestError(f"{where}.function must be an object with a 'name'", param="tools")
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise InvalidRequestError(
                f"{where}.function.name must be 1 to 64 letters, digits, '_' or '-', got {name!r}",
                param="tools",
            )
        if name in seen:
            raise InvalidRequestError(
                f"{where}.function.name {name!r} is given twice; names must be unique", param="tools"
            )
        seen.add(name)
        checked: dict[str, Any] = {"name": name}
        description = function.get("description")
        if description is not None:
            if not isinstance(description, str):
                raise InvalidRequestError(f"{where}.function.description must be a string", param="tools")
            checked["description"] = description
        parameters = function.get("parameters")
        if parameters is None:
            checked["parameters"] = copy.deepcopy(_EMPTY_PARAMETERS)
        else:
            schema = copy.deepcopy(_check_schema(parameters, f"{where}.function.parameters", "tools"))
            kind = schema.setdefault("type", "object")
            if kind != "object":
                raise InvalidRequestError(
                    f"{where}.function.parameters must describe an object (type 'object'), got type {kind!r}",
                    param="tools",
                )
            checked["parameters"] = schema
        strict = function.get("strict")
        if strict is not None:
            if not isinstance(strict, bool):
                raise InvalidRequestError(
                    f"{where}.function.strict must be a bool, got {strict!r}", param="tools"
                )
            checked["strict"] = strict
        out.append({"type": "function", "function": checked})
    return out


def response_format_schema(response_format: Any) -> dict[str, Any] | None:
    """The JSON schema an OpenAI ``response_format`` asks the reply to follow, or None for free text.

    Args:
        response_format: None, ``{"type": "text"}``, ``{"type": "json_object"}`` or ``{"type":
            "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": bool}}`` (without
            ``schema``, any JSON object).

    Returns:
        None, ``{"type": "object"}``, or the schema (with ``strict``, closed by :func:`strict_schema`).

    Raises:
        InvalidRequestError: ``param="response_format"``: an unknown type, a malformed
            ``json_schema``, or a schema invalid under the JSON Schema meta-schema.
    """
    if response_format is None:
        return None
    if not isinstance(response_format, Mapping):
        raise InvalidRequestError(
            "response_format must be an object such as {'type': 'json_object'}, "
            f"got {_short(response_format)}",
            param="response_format",
        )
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind != "json_schema":
        raise InvalidRequestError(
            f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
            param="response_format",
        )
    spec = response_format.get("json_schema")
    if not isinstance(spec, Mapping):
        raise InvalidRequestError(
            "response_format.json_schema must be an object: {'name': ..., 'schema': {...}, 'strict': true}",
            param="response_format",
        )
    for key in ("name", "description"):
        if spec.get(key) is not None and not isinstance(spec[key], str):
            raise InvalidRequestError(
                f"response_format.json_schema.{key} must be a string", param="response_format"
            )
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise InvalidRequestError(
            f"response_format.json_schema.strict must be a bool, got {strict!r}", param="response_format"
        )
    raw = spec.get("schema")
    if raw is None:
        return {"type": "object"}
    schema = copy.deepcopy(_check_schema(raw, "response_format.json_schema.schema", "response_format"))
    return strict_schema(schema) if strict else schema


def resolve_tool_choice(tool_choice: Any, tools: list[dict[str, Any]] | None) -> tuple[str, str | None]:
    """How the reply may use the tools: ``("none" | "auto" | "required", None)`` or ``("named", name)``.

    Args:
        tool_choice: OpenAI's ``tool_choice``: None (``"auto"`` with tools, ``"none"`` without),
            ``"none"``, ``"auto"``, ``"required"`` or ``{"type": "function", "function": {"name": ...}}``.
        tools: The checked tools, or None.

    Raises:
        InvalidRequestError: ``param="tool_choice"``: an unknown value, a choice other than ``"none"``
            without tools, or a function that is not among the tools.
    """
    if tool_choice is None:
        return ("auto" if tools else "none"), None
    names = [tool["function"]["name"] for tool in tools or ()]
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise InvalidRequestError(
                f"tool_choice must be 'none', 'auto', 'required' or {{'type': 'function', 'function': "
                f"{{'name': ...}}}}, got {tool_choice!r}",
                param="tool_choice",
            )
        mode, name = tool_choice, None
    else:
        named = isinstance(tool_choice, Mapping) and tool_choice.get("type", "function") == "function"
        function = tool_choice.get("function") if named else None
        name = function.get("name") if isinstance(function, Mapping) else None
        if not isinstance(name, str):
            raise InvalidRequestError(
                "tool_choice must name a function as {'type': 'function', 'function': {'name': ...}}, "
                f"got {_short(tool_choice)}",
                param="tool_choice",
            )
        mode = "named"
    if mode != "none" and not tools:
        raise InvalidRequestError(
            f"tool_choice {tool_choice!r} needs tools; give tools or leave tool_choice out",
            param="tool_choice",
        )
    if name is not None and name not in names:
        raise InvalidRequestError(
            f"tool_choice names function {name!r}, which is not among the tools ({', '.join(names)})",
            param="tool_choice",
        )
    return mode, name


def _parameters(tool: dict[str, Any]) -> dict[str, Any]:
    function = tool["function"]
    parameters: dict[str, Any] = function["parameters"]
    return strict_schema(parameters) if function.get("strict") else copy.deepcopy(parameters)


def named_schema(tool: dict[str, Any]) -> dict[str, Any]:
    """The constraint for a reply that is exactly the arguments of ``tool`` (a checked tool)."""
    return _parameters(tool)


def _has_ref(schema: dict[str, Any]) -> bool:
    found: list[bool] = []
    _walk(schema, lambda node: found.append(True) if "$ref" in node else None)
    return bool(found)


def _embedded(schema: dict[str, Any], key: str, defs: dict[str, Any]) -> dict[str, Any]:
    """``schema`` as a subschema of a larger document.

    Its local ``$ref`` pointers would point into the wrong root there, so a schema with refs moves
    to ``$defs[key]`` and its pointers follow it.
    """
    schema.pop("$schema", None)
    schema.pop("$id", None)
    if not _has_ref(schema):
        return schema

    def move(node: dict[str, Any]) -> None:
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#"):
            node["$ref"] = f"#/$defs/{key}{ref[1:]}"

    _walk(schema, move)
    defs[key] = schema
    return {"$ref": f"#/$defs/{key}"}


def required_schema(tools: list[dict[str, Any]], parallel_tool_calls: bool) -> dict[str, Any]:
    """The constraint for ``tool_choice="required"``: a JSON array of one or more calls.

    Each item is ``{"name": <a tool's name>, "arguments": <that tool's parameters>}``, both
    required and nothing else, so every call the grammar lets through is valid for its tool.

    Args:
        tools: The checked tools.
        parallel_tool_calls: Allow several calls (else exactly one).
    """
    defs: dict[str, Any] = {}
    items = [
        {
            "type": "object",
            "properties": {
                "name": {"const": tool["function"]["name"]},
                "arguments": _embedded(_parameters(tool), f"{tool['function']['name']}_arguments", defs),
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for tool in tools
    ]
    schema: dict[str, Any] = {"type": "array", "items": items[0] if len(items) == 1 else {"anyOf": items}}
    schema["minItems"] = 1
    if not parallel_tool_calls:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema
