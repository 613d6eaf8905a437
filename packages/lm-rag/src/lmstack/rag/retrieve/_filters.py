"""Metadata filters: which chunks a search may return."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping
from typing import Any

from .._errors import RAGConfigError

__all__ = ["matches_filters", "validate_filters"]

_RANGE_OPS = ("gte", "gt", "lte", "lt")
_GLOB_CHARS = frozenset("*?[")
_Scalar = (str, int, float, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_scalar(key: str, value: Any) -> None:
    if not isinstance(value, _Scalar):
        raise RAGConfigError(
            f"filter {key!r}: {value!r} is a {type(value).__name__}; use a string, number or boolean, "
            'a list of them, or a range like {"gte": 1, "lte": 5}',
            field=key,
        )
    if isinstance(value, float) and not math.isfinite(value):
        raise RAGConfigError(f"filter {key!r}: {value!r} is not a finite number", field=key)


def validate_filters(filters: Mapping[str, Any] | None) -> dict[str, Any]:
    """Check a metadata filter and return it in the shape :func:`matches_filters` reads.

    Keys: ``source`` (a glob matched with :func:`fnmatch.fnmatchcase`, where ``*`` also crosses ``/``,
    or a list of globs) and any metadata key. A metadata value may be a scalar (equality; a string
    containing ``*``, ``?`` or ``[`` is a glob), a non-empty list (any of them), or a range
    ``{"gte": x, "lte": y}`` (also ``gt``, ``lt``) over numbers such as ``page``.

    Args:
        filters: The filter, or None for none.

    Returns:
        A new dict (lists as tuples); empty for None.

    Raises:
        RAGConfigError: A non-string key, an empty list, a nested structure, an unknown range operator,
            or a non-numeric range bound.
    """
    if filters is None:
        return {}
    if not isinstance(filters, Mapping):
        raise RAGConfigError(
            f"filters must be a mapping of metadata key to condition, got {type(filters).__name__}"
        )
    out: dict[str, Any] = {}
    for key, condition in filters.items():
        if not isinstance(key, str) or not key:
            raise RAGConfigError(f"filter keys must be non-empty strings, got {key!r}")
        if key == "source":
            globs = tuple(condition) if isinstance(condition, (list, tuple)) else (condition,)
            if not globs or not all(isinstance(g, str) for g in globs):
                raise RAGConfigError('filter "source" takes a glob or a non-empty list of globs', field=key)
            out[key] = globs
        elif isinstance(condition, Mapping):
            unknown = sorted(str(op) for op in condition if op not in _RANGE_OPS)
            if unknown or not condition:
                raise RAGConfigError(
                    f"filter {key!r}: range operators are {', '.join(_RANGE_OPS)}; got {unknown or 'none'}",
                    field=key,
                )
            for op, bound in condition.items():
                if not _is_number(bound) or not math.isfinite(bound):
                    raise RAGConfigError(
                        f"filter {key!r}: range bound {op}={bound!r} is not a finite number", field=key
                    )
            out[key] = dict(condition)
        elif isinstance(condition, (list, tuple)):
            if not condition:
                raise RAGConfigError(
                    f"filter {key!r}: an empty list matches nothing; drop the key or add values", field=key
                )
            for value in condition:
                _check_scalar(key, value)
            out[key] = tuple(condition)
        else:
            _check_scalar(key, condition)
            out[key] = condition
    return out


def _scalar_matches(expected: Any, actual: Any) -> bool:
    if isinstance(expected, str):
        if not isinstance(actual, str):
            return False
        return fnmatch.fnmatchcase(actual, expected) if _GLOB_CHARS & set(expected) else actual == expected
    # True must not equal 1: booleans match booleans only.
    if isinstance(expected, bool) or isinstance(actual, bool):
        return isinstance(expected, bool) and isinstance(actual, bool) and expected == actual
    return _is_number(actual) and actual == expected


def _range_matches(bounds: Mapping[str, float], actual: Any) -> bool:
    if not _is_number(actual):
        return False
    return (
        ("gte" not in bounds or actual >= bounds["gte"])
        and ("gt" not in bounds or actual > bounds["gt"])
        and ("lte" not in bounds or actual <= bounds["lte"])
        and ("lt" not in bounds or actual < bounds["lt"])
    )


def _condition_matches(condition: Any, actual: Any) -> bool:
    if isinstance(condition, Mapping):
        return _range_matches(condition, actual)
    if isinstance(condition, tuple):
        return any(_scalar_matches(c, actual) for c in condition)
    return _scalar_matches(condition, actual)


def matches_filters(filters: Mapping[str, Any] | None, source: str, metadata: Mapping[str, Any]) -> bool:
    """Whether a chunk passes a metadata filter (every key must match; see :func:`validate_filters`).

    A list-valued metadata entry (``headings``) matches when any of its elements does. A chunk without a
    filtered metadata key does not match.

    Args:
        filters: The filter, or None (everything matches).
        source: The chunk's document source.
        metadata: The chunk's metadata.

    Returns:
        True when the chunk passes.

    Raises:
        RAGConfigError: The filter is malformed.
    """
    for key, condition in validate_filters(filters).items():
        if key == "source":
            actual: Any = source
        elif key in metadata:
            actual = metadata[key]
        else:
            return False
        values = actual if isinstance(actual, (list, tuple)) else (actual,)
        if not any(_condition_matches(condition, v) for v in values):
            return False
    return True
