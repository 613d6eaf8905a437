"""Filling typed config dataclasses from plain data and command-line overrides.

A config is a plain dataclass whose fields may themselves be dataclasses (``cfg.data.max_length``).
:func:`build_config` fills one from a nested mapping (a parsed YAML file) and then applies overrides
written as on a command line. Values are checked and converted against the field annotations:
``int``, ``float``, ``bool``, ``str``, ``pathlib.Path``, ``Optional[...]``/``X | None``,
``list[...]``/``tuple[..., ...]``, ``dict[str, ...]``, ``Literal[...]`` choices and nested dataclasses
(``Optional`` ones too). An unknown key is an error that names the nearest valid key; nothing is
silently ignored.

Command-line rules:

* ``--key value`` and ``--key=value``; dashes in keys count as underscores (``--data.max-length``).
* A ``bool`` key alone means true (``--data.pack``); ``true/false/yes/no/on/off/1/0`` are accepted.
* A list key takes every following argument up to the next ``--key`` (``--data.paths a b``), or one
  comma-separated value (``--data.paths=a,b``), or a YAML flow list (``--data.paths='[a, b]'``).
* ``none``/``null`` set an ``Optional`` key to None.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from lmstack.train.data._errors import TrainConfigError

__all__ = ["build_config", "to_plain"]

T = TypeVar("T")

_TRUE = {"true", "yes", "on", "1", "y"}
_FALSE = {"false", "no", "off", "0", "n"}
_NONE = {"none", "null", "~"}


class _Invalid(Exception):
    """A value does not fit a type; the message says what was expected (turned into TrainConfigError)."""


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if tp is Path:
        return "a path"
    if origin is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(tp))
    if _is_union(tp):
        args = typing.get_args(tp)
        names = [_type_name(a) for a in args if a is not type(None)]
        text = " or ".join(names)
        return f"{text} or none" if type(None) in args else text
    if origin in (list, tuple, Sequence):
        args = typing.get_args(tp)
        return f"a list of {_type_name(args[0]) if args else 'values'}"
    if origin in (dict, Mapping):
        return "a mapping"
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return f"a mapping of {tp.__name__} fields"
    return getattr(tp, "__name__", str(tp))


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception as exc:  # an annotation that does not resolve is a bug in the config class
        raise TrainConfigError(f"cannot read the field types of {cls.__name__}: {exc}") from exc


def _dataclass_of(tp: Any) -> type | None:
    """The dataclass a field holds (``Sub`` or ``Sub | None``), else None."""
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return tp
    if _is_union(tp):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(inner) == 1:
            return _dataclass_of(inner[0])
    return None


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Converts ``value`` (from YAML, or a command-line string) to the annotated type ``tp``."""
    origin = typing.get_origin(tp)
    if tp is Any or tp is object:
        return value
    if _is_union(tp):
        args = typing.get_args(tp)
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in _NONE)):
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except _Invalid:
                continue
        raise _Invalid(f"expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        for choice in choices:
            if value == choice and type(value) is type(choice):
                return choice
        if isinstance(value, str):
            for choice in choices:
                if str(choice) == value or (isinstance(choice, str) and choice.lower() == value.lower()):
                    return choice
        hint = ""
        if isinstance(value, str):
            close = difflib.get_close_matches(value, [str(c) for c in choices], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise _Invalid(f"expected {_type_name(tp)}, got {value!r}{hint}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise _Invalid(f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise _Invalid(f"expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                try:
                    number = float(value)
                except ValueError:
                    number = float("nan")
                if number.is_integer():
                    return int(number)
        raise _Invalid(f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise _Invalid(f"expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise _Invalid(f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _Invalid(f"expected a string, got {value!r}")
    if tp is Path:
        if isinstance(value, (str, os.PathLike)):
            return Path(value)
        raise _Invalid(f"expected a path, got {value!r}")
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        args = typing.get_args(tp)
        item_tp: Any = args[0] if args else Any
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            raise _Invalid(f"fixed-length tuples are not supported in configs ({tp})")
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    value = yaml.safe_load(text)
                except yaml.YAMLError as exc:
                    raise _Invalid(f"cannot parse {value!r} as a list: {exc}") from exc
            else:
                value = [part.strip() for part in text.split(",") if part.strip()]
        if not isinstance(value, (list, tuple)):
            raise _Invalid(f"expected {_type_name(tp)}, got {value!r}")
        items = []
        for index, item in enumerate(value):
            try:
                items.append(_coerce(item, item_tp, key))
            except _Invalid as exc:
                raise _Invalid(f"item {index}: {exc}") from exc
        return tuple(items) if origin is tuple or tp is tuple else items
    if origin in (dict, Mapping) or tp is dict:
        args = typing.get_args(tp)
        value_tp: Any = args[1] if len(args) == 2 else Any
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError as exc:
                raise _Invalid(f"cannot parse {value!r} as a mapping: {exc}") from exc
        if not isinstance(value, Mapping):
            raise _Invalid(f"expected a mapping, got {value!r}")
        return {str(k): _coerce(v, value_tp, f"{key}.{k}") for k, v in value.items()}
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _Invalid(f"expected {_type_name(tp)}, got {value!r}")
    raise _Invalid(f"unsupported field type {tp!r}")


# ------------------------------------------------------------------------------------------------
# keys
# ------------------------------------------------------------------------------------------------


def _leaf_keys(cls: type, prefix: str = "") -> dict[str, Any]:
    """Every settable dotted key of ``cls`` and its type (nested dataclasses are walked into)."""
    keys: dict[str, Any] = {}
    hints = _hints(cls)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if not f.init:
            continue
        tp = hints.get(f.name, Any)
        name = f"{prefix}{f.name}"
        sub = _dataclass_of(tp)
        if sub is not None:
            keys.update(_leaf_keys(sub, f"{name}."))
        else:
            keys[name] = tp
    return keys


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    """Leaf keys and section keys (``data`` and ``data.max_length``), for suggestions."""
    out: list[str] = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if not f.init:
            continue
        name = f"{prefix}{f.name}"
        out.append(name)
        sub = _dataclass_of(hints.get(f.name, Any))
        if sub is not None:
            out.extend(_all_keys(sub, f"{name}."))
    return out


def _unknown_key(key: str, cls: type, where: str = "") -> TrainConfigError:
    candidates = _all_keys(cls)
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if not close:
        # A right leaf name under the wrong section: optim.max_length -> data.max_length.
        leaf = key.rsplit(".", 1)[-1]
        close = [c for c in candidates if c.rsplit(".", 1)[-1] == leaf][:1]
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return TrainConfigError(f"unknown key {key!r}{where}{hint}", field=key)


# ------------------------------------------------------------------------------------------------
# building
# ------------------------------------------------------------------------------------------------


def _build(
    cls: type[T], data: Mapping[str, Any], prefix: str, where: str, root: type, cli: frozenset[str]
) -> T:
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    for name in data:
        if name not in fields:
            raise _unknown_key(f"{prefix}{name}", root, where)
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key = f"{prefix}{name}"
        tp = hints.get(name, Any)
        sub = _dataclass_of(tp)
        at = " on the command line" if key in cli else where
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if name not in data:
            if required and sub is not None:
                kwargs[name] = _build(sub, {}, f"{key}.", where, root, cli)
            elif required:
                raise TrainConfigError(f"missing required key {key!r}{where}", field=key)
            continue
        value = data[name]
        if sub is not None:
            if isinstance(value, Mapping):
                kwargs[name] = _build(sub, value, f"{key}.", where, root, cli)
                continue
            if value is None or isinstance(value, sub):
                if value is None and sub is tp:
                    raise TrainConfigError(f"key {key!r}{at}: {_type_name(tp)} cannot be none", field=key)
                kwargs[name] = value
                continue
            if isinstance(value, str) and value.lower() in _NONE and sub is not tp:
                kwargs[name] = None
                continue
            raise TrainConfigError(
                f"key {key!r}{at}: expected a section of {sub.__name__} fields, got {value!r}", field=key
            )
        try:
            kwargs[name] = _coerce(value, tp, key)
        except _Invalid as exc:
            raise TrainConfigError(f"key {key!r}{at}: {exc}", field=key) from None
    try:
        return cls(**kwargs)
    except TrainConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise TrainConfigError(
            f"invalid {cls.__name__}{where}: {exc}", field=prefix.rstrip(".") or None
        ) from exc


def _parse_overrides(overrides: Sequence[str], cls: type) -> list[tuple[str, Any]]:
    """Turns ``["--a.b", "1", "--c=2"]`` into ``[("a.b", "1"), ("c", "2")]`` (lists gather values)."""
    leaves = _leaf_keys(cls)
    parsed: list[tuple[str, Any]] = []
    args = list(overrides)
    i = 0
    while i < len(args):
        arg = args[i]
        if not isinstance(arg, str) or not arg.startswith("--") or len(arg) <= 2:
            raise TrainConfigError(
                f"expected an override such as '--data.max_length 4096' or '--optim.lr=3e-4', got {arg!r}"
            )
        body = arg[2:]
        inline: str | None = None
        if "=" in body:
            body, inline = body.split("=", 1)
        key = body.replace("-", "_")
        if key not in leaves:
            raise _unknown_key(key, cls, " in the command-line overrides")
        tp = leaves[key]
        i += 1
        values: list[str] = []
        if inline is None:
            while i < len(args) and not (isinstance(args[i], str) and args[i].startswith("--")):
                values.append(args[i])
                i += 1
        else:
            values = [inline]
        inner = [a for a in typing.get_args(tp) if a is not type(None)] if _is_union(tp) else [tp]
        is_list = len(inner) == 1 and (
            typing.get_origin(inner[0]) in (list, tuple) or inner[0] in (list, tuple)
        )
        if not values:
            if tp is bool:
                parsed.append((key, True))
                continue
            raise TrainConfigError(f"--{key} needs a value ({_type_name(tp)})", field=key)
        if is_list and inline is None:
            if len(values) == 1:
                parsed.append((key, values[0]))  # one argument: comma-separated or a flow list
            else:
                parsed.append((key, values))
            continue
        if len(values) > 1:
            raise TrainConfigError(
                f"--{key} takes one value ({_type_name(tp)}), got {len(values)}: {values!r}", field=key
            )
        parsed.append((key, values[0]))
    return parsed


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {} if not isinstance(child, Mapping) else dict(child)
            node[part] = child
        node = child
    node[parts[-1]] = value


def build_config(
    cls: type[T], data: Mapping[str, Any], overrides: Sequence[str] = (), *, where: str = ""
) -> T:
    """Builds a config dataclass from nested data and command-line style overrides.

    Args:
        cls: The config dataclass (its fields may be nested dataclasses).
        data: Nested keys, as read from a YAML file.
        overrides: Arguments such as ``["--data.paths", "x.jsonl", "--optim.lr=3e-4"]``; they win
            over ``data``.
        where: Where ``data`` came from (`` in config.yaml``), for messages.

    Returns:
        The config.

    Raises:
        TrainConfigError: An unknown key (the nearest valid key is named), a value that does not fit
            its field's type or choices, or a missing required key.
    """
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise TrainConfigError(f"a config needs a dataclass type, got {cls!r}")
    if isinstance(overrides, str):
        raise TrainConfigError("overrides must be a list of arguments, not one string; use shlex.split()")
    tree = _deep_copy_mapping(data)
    parsed = _parse_overrides(overrides, cls)
    # Check the file alone first, so that an unknown key in it is reported against the file.
    _validate_keys(cls, tree, "", where, cls)
    for key, value in parsed:
        _set_dotted(tree, key, value)
    return _build(cls, tree, "", where, cls, frozenset(key for key, _ in parsed))


def _deep_copy_mapping(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _deep_copy_mapping(v) for k, v in value.items()}
    return value


def _validate_keys(cls: type, data: Mapping[str, Any], prefix: str, where: str, root: type) -> None:
    hints = _hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    for name, value in data.items():
        if name not in fields:
            raise _unknown_key(f"{prefix}{name}", root, where)
        sub = _dataclass_of(hints.get(name, Any))
        if sub is not None and isinstance(value, Mapping):
            _validate_keys(sub, value, f"{prefix}{name}.", where, root)


def to_plain(value: Any) -> Any:
    """A config (or any value in one) as plain YAML/JSON-ready data: dicts, lists, strings, numbers."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value
