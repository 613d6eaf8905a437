"""The planner's actions: what it may do to the graph, in JSON or in a restricted Python subset.

Two spellings of the same two operations, ``add_node`` and ``finish``:

* JSON, ``{"actions": [{"op": "add_node", "name": ..., "question": ..., "parents": [...]}, {"op":
  "finish"}]}``, checked against :func:`actions_schema` (which a backend with guided decoding can
  also generate under);
* Python, one call a line: ``add_node("name", "question", parents=["a"])`` and ``finish()``, parsed
  with :mod:`ast` and never run: only those two calls with literal arguments are accepted, anything
  else (imports, names, attribute access, comprehensions, other calls) is a :class:`PlanError` naming
  the line.
"""

from __future__ import annotations

import ast
import copy
import json
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import jsonschema

from lmstack.agent._errors import PlanError

__all__ = ["Action", "actions_schema", "parse_actions", "parse_json_actions", "parse_python_actions"]

MAX_NAME_CHARS = 64
MAX_QUESTION_CHARS = 500

_ADD_NODE: dict[str, Any] = {
    "type": "object",
    "properties": {
        "op": {"const": "add_node"},
        "name": {"type": "string", "minLength": 1, "maxLength": MAX_NAME_CHARS},
        "question": {"type": "string", "minLength": 1, "maxLength": MAX_QUESTION_CHARS},
        "parents": {
            "type": "array",
            "items": {"type": "string", "minLength": 1, "maxLength": MAX_NAME_CHARS},
        },
    },
    "required": ["op", "name", "question"],
    "additionalProperties": False,
}
_FINISH: dict[str, Any] = {
    "type": "object",
    "properties": {"op": {"const": "finish"}},
    "required": ["op"],
    "additionalProperties": False,
}
_ADD_NODE_VALIDATOR = jsonschema.Draft202012Validator(_ADD_NODE)
_FINISH_VALIDATOR = jsonschema.Draft202012Validator(_FINISH)
_FENCE = re.compile(r"```[A-Za-z0-9_+-]*[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


@dataclass(frozen=True)
class Action:
    """One planner action.

    Args:
        op: ``"add_node"`` or ``"finish"``.
        name: The new node's name (``add_node``).
        question: The node's sub-question (``add_node``).
        parents: Names of the nodes whose answers this one needs (``add_node``).
    """

    op: str
    name: str = ""
    question: str = ""
    parents: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        """The action in its JSON spelling."""
        if self.op == "finish":
            return {"op": "finish"}
        return {"op": self.op, "name": self.name, "question": self.question, "parents": list(self.parents)}


def actions_schema(max_actions: int | None = None, parents: Sequence[str] | None = None) -> dict[str, Any]:
    """The JSON schema of one planner reply (``{"actions": [...]}``).

    Args:
        max_actions: Most actions in one reply (None: no limit).
        parents: The names a new node may give as parents (an ``enum``, so a reply generated under the
            schema never names a node that does not exist; empty: no parents). None: any name, as
            the prompt-only protocol allows (parents added in the same reply included).
    """
    add_node = _ADD_NODE
    if parents is not None:
        add_node = copy.deepcopy(_ADD_NODE)
        names = sorted(set(parents))
        spec: dict[str, Any] = {"type": "array", "maxItems": 0}
        if names:
            spec = {"type": "array", "items": {"enum": names}, "maxItems": len(names)}
        add_node["properties"]["parents"] = spec
    actions: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": [add_node, _FINISH]}}
    if max_actions is not None:
        actions["maxItems"] = max_actions
    return {
        "type": "object",
        "properties": {"actions": actions},
        "required": ["actions"],
        "additionalProperties": False,
    }


def parse_actions(text: str, planner_format: str) -> list[Action]:
    """Parse a planner reply in ``planner_format`` (``"json"`` or ``"python"``).

    Raises:
        PlanError: The reply is not a valid list of actions; the message says what to fix.
    """
    if planner_format == "python":
        return parse_python_actions(text)
    return parse_json_actions(text)


def _strip_fences(text: str) -> str:
    match = _FENCE.search(text)
    return match.group(1) if match else text


def _decode_json(text: str) -> Any:
    body = _strip_fences(text).strip()
    try:
        return json.loads(body)
    except json.JSONDecodeError as exc:
        error = exc
    # Tolerate prose around the JSON: decode from the first bracket, ignore what follows it.
    starts = [i for i in (body.find("{"), body.find("[")) if i >= 0]
    if starts:
        try:
            return json.JSONDecoder().raw_decode(body, min(starts))[0]
        except json.JSONDecodeError as exc:
            error = exc
    raise PlanError(
        f"the reply is not JSON ({error.msg} at line {error.lineno} column {error.colno}); reply with one "
        'JSON object only: {"actions": [{"op": "add_node", "name": ..., "question": ..., "parents": [...]}, '
        '..., {"op": "finish"}]}'
    )


def parse_json_actions(text: str) -> list[Action]:
    """Parse a JSON planner reply: ``{"actions": [...]}``, or a bare list of actions, or one action.

    Code fences and prose around the JSON are tolerated.

    Raises:
        PlanError: Not JSON, or an action that does not match the schema (the message names it).
    """
    value = _decode_json(text)
    if isinstance(value, list):
        value = {"actions": value}
    elif isinstance(value, dict) and "op" in value and "actions" not in value:
        value = {"actions": [value]}
    if not isinstance(value, dict) or not isinstance(value.get("actions"), list):
        raise PlanError('the reply must be a JSON object with an "actions" list: {"actions": [...]}')
    extra = sorted(set(value) - {"actions"})
    if extra:
        raise PlanError(f'the reply has unknown fields {extra}; it may only have "actions"')
    return _check_actions(value["actions"])


def _check_actions(items: list[Any]) -> list[Action]:
    if not items:
        raise PlanError('"actions" is empty: add nodes, or finish')
    actions = []
    for index, item in enumerate(items):
        where = f"actions[{index}]"
        op = item.get("op") if isinstance(item, dict) else None
        if op == "add_node":
            validator = _ADD_NODE_VALIDATOR
        elif op == "finish":
            validator = _FINISH_VALIDATOR
        else:
            raise PlanError(
                f'{where} must be an object with "op": "add_node" or "finish"; got {_short(item)}'
            )
        error = next(iter(sorted(validator.iter_errors(item), key=lambda e: list(e.path))), None)
        if error is not None:
            path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.path)
            raise PlanError(f"{where}{path}: {error.message}")
        if op == "finish":
            actions.append(Action("finish"))
        else:
            parents = tuple(dict.fromkeys(item.get("parents", [])))  # repeated parents mean one edge
            actions.append(Action("add_node", item["name"].strip(), item["question"].strip(), parents))
    return actions


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_STATEMENT_NAMES = {
    ast.Import: "an import",
    ast.ImportFrom: "an import",
    ast.Assign: "an assignment",
    ast.AugAssign: "an assignment",
    ast.AnnAssign: "an assignment",
    ast.FunctionDef: "a function definition",
    ast.AsyncFunctionDef: "a function definition",
    ast.ClassDef: "a class definition",
    ast.For: "a loop",
    ast.While: "a loop",
    ast.If: "an if statement",
    ast.With: "a with statement",
    ast.Try: "a try statement",
}
_ALLOWED = (
    "only add_node(name, question, parents=[...]) and finish() calls with literal arguments are allowed"
)


def parse_python_actions(text: str) -> list[Action]:
    """Parse a planner reply written in the restricted Python subset, without running it.

    Each statement must be ``add_node("name", "question", parents=["a", "b"])`` (arguments positional
    or by keyword) or ``finish()``, with literal arguments only.

    Raises:
        PlanError: Not Python, or anything outside the subset; the message names the line.
    """
    code = textwrap.dedent(_strip_fences(text))  # not stripped: line numbers stay the reply's
    try:
        tree = ast.parse(code)
    except SyntaxError as exc:
        raise PlanError(f"line {exc.lineno}: not valid Python ({exc.msg}); {_ALLOWED}, one a line") from None
    except (ValueError, RecursionError, MemoryError) as exc:  # null bytes, absurd nesting
        raise PlanError(f"the reply is not Python the planner may write ({exc}); {_ALLOWED}") from None
    if not tree.body:
        raise PlanError(f"the reply has no actions; {_ALLOWED}")
    items: list[Any] = []
    for stmt in tree.body:
        line = f"line {stmt.lineno}"
        if not isinstance(stmt, ast.Expr) or not isinstance(stmt.value, ast.Call):
            what = _STATEMENT_NAMES.get(type(stmt), "an expression that is not a call")
            raise PlanError(f"{line}: {what} is not allowed; {_ALLOWED}")
        call = stmt.value
        if isinstance(call.func, ast.Attribute):
            raise PlanError(f"{line}: attribute access ({ast.unparse(call.func)}) is not allowed; {_ALLOWED}")
        if not isinstance(call.func, ast.Name) or call.func.id not in ("add_node", "finish"):
            raise PlanError(f"{line}: calling {ast.unparse(call.func)}() is not allowed; {_ALLOWED}")
        items.append(_call_to_item(call, line))
    return _check_actions(items)


def _literal(node: ast.expr, line: str, what: str) -> Any:
    try:
        return ast.literal_eval(node)  # literals only: names, calls and operators raise
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise PlanError(
            f"{line}: {what} must be a literal, not {ast.unparse(node)!s:.60}; {_ALLOWED}"
        ) from None


def _call_to_item(call: ast.Call, line: str) -> dict[str, Any]:
    name = call.func.id  # type: ignore[attr-defined]
    fields = ("name", "question", "parents") if name == "add_node" else ()
    if len(call.args) > len(fields) or any(isinstance(a, ast.Starred) for a in call.args):
        raise PlanError(
            f"{line}: {name}() takes {len(fields) or 'no'} arguments ({', '.join(fields) or '-'})"
        )
    item: dict[str, Any] = {"op": name}
    for key, arg in zip(fields, call.args, strict=False):
        item[key] = _literal(arg, line, f"{name}() argument {key!r}")
    for keyword in call.keywords:
        if keyword.arg is None or keyword.arg not in fields:
            shown = "**" if keyword.arg is None else keyword.arg
            raise PlanError(f"{line}: {name}() has no argument {shown!r}; {_ALLOWED}")
        if keyword.arg in item:
            raise PlanError(f"{line}: {name}() got argument {keyword.arg!r} twice")
        item[keyword.arg] = _literal(keyword.value, line, f"{name}() argument {keyword.arg!r}")
    if isinstance(item.get("parents"), tuple):
        item["parents"] = list(item["parents"])
    try:
        _check_actions([item])
    except PlanError as exc:  # the schema's message, with the line instead of actions[0]
        raise PlanError(f"{line}: {str(exc).removeprefix('actions[0]').lstrip('.: ')}") from None
    return item
