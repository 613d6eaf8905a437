r"""JSON schemas tightened so that every JSON text their grammar allows fits in a token budget.

A grammar alone does not make a weak model's JSON complete: inside an unbounded string, array or
free-form object a random model can go on until ``max_tokens`` and the cut text does not parse.
:func:`bound_schema` rewrites a schema into a stricter one whose every instance is an instance of the
original (so outputs still validate against what the user gave) and whose longest JSON text, as
llguidance's grammar for it writes it under :data:`JSON_COMPILE_OPTIONS`, is at most the budget.

The bound is in bytes, and bytes bound tokens: every token the grammar can accept decodes to at
least one byte (special tokens other than EOS are never allowed inside JSON). With ``\\uXXXX``
escapes disabled, one code point of a string costs at most 4 bytes (raw UTF-8; the short escapes
``\\n``, ``\\"`` and the like cost 2), so a string of ``maxLength`` n costs at most ``2 + 4n`` bytes.
Strings under a ``format`` cost one byte per code point: llguidance's format regexes are ASCII
without quotes or backslashes. With ``\\u`` escapes a control character costs 6 bytes, and with
general Unicode escapes a supplementary character costs 12 (a surrogate pair), hence the options.

Unbounded places share three caps, grown together until one no longer fits, the slack left then
going to strings, arrays and digits in that order: one cap on the code points of every unbounded
string (and, up to :data:`KEY_CHARS`, of free-form keys), one on the items of every unbounded array
and the properties of every free-form object, and one on the decimal digits ``d`` of numbers:
integers in ``±(10**d - 1)``, numbers with ``min(d, 9)`` integer digits and ``min(d - 1, 6)``
fraction digits, the latter through ``multipleOf`` (llguidance's float ranges alone let the
fraction run on). Limits the schema already sets are kept where tighter. A value the schema leaves
free (``{}``, or an object without properties) becomes scalars, or arrays and objects of scalars.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

import llguidance

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

logger = logging.getLogger(__name__)

__all__ = [
    "JSON_COMPILE_OPTIONS",
    "KEY_CHARS",
    "STRING_BYTES_PER_CHAR",
    "BoundedSchema",
    "SchemaNotBoundable",
    "bound_schema",
    "fit_schema",
]

# llguidance JSON options a bounded schema must be compiled with: fixed separators and no free
# whitespace (else the text has no length bound), no ``\uXXXX`` escapes (else a code point may cost
# 6 or 12 bytes), ``oneOf`` never loosened to ``anyOf``, no unknown keyword ignored. They override any
# ``x-guidance`` in a schema.
JSON_COMPILE_OPTIONS: JsonCompileOptions = {
    "item_separator": ",",
    "key_separator": ":",
    "whitespace_flexible": False,
    "whitespace_pattern": None,
    "coerce_one_of": False,
    "lenient": False,
    "json_allowed_escapes": 'nrbtf\\"',
    "json_allow_general_unicode_escapes": False,
}

# Most bytes one code point of a JSON string can take under JSON_COMPILE_OPTIONS (4-byte UTF-8).
STRING_BYTES_PER_CHAR = 4
# Longest key of a free-form object, in code points.
KEY_CHARS = 32

# Nesting of a value the schema leaves free (``{}``): scalars, or arrays and objects of such values
# nested this deep.
_FREE_DEPTH = 2
# The caps: code points of strings, items of arrays (properties of free-form objects), number digits.
_S, _A, _D = 0, 1, 2
_CAP_MIN = (0, 0, 1)
# Integers stay within 2**53, where JSON numbers are exact as doubles; six fraction digits at most.
_CAP_MAX = (1 << 16, 4096, 15)
_MAX_FRACTION_DIGITS = 6
# Integer digits of a (non-integer) number: with the fraction, 15 significant digits, exact as doubles.
_MAX_NUMBER_DIGITS = 9
# The worst case of a node that cannot be emitted at these caps: it never fits.
_TOO_LONG = 1 << 60
# Distinct schema nodes built at most (guards against $ref and anyOf expansion blowing up).
_MAX_NODES = 5000

# ASCII formats llguidance implements: fixed-size ones (most code points) and open-ended ones
# (fewest code points; they get a maxLength).
_FIXED_FORMATS = {"date": 10, "uuid": 36, "ipv4": 15, "ipv6": 45}
_OPEN_FORMATS = {"date-time": 20, "time": 9, "duration": 3, "email": 3, "hostname": 1, "uri": 2}

_KEYWORDS_BY_TYPE = {
    "object": ("properties", "required", "additionalProperties", "minProperties", "maxProperties"),
    "array": ("items", "prefixItems", "minItems", "maxItems", "uniqueItems"),
    "string": ("minLength", "maxLength", "pattern", "format"),
    "number": ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"),
}
_HANDLED = frozenset(
    {"type", "enum", "const", "anyOf", "oneOf", "allOf", "$ref"}.union(*_KEYWORDS_BY_TYPE.values())
)
# JSON Schema keywords that constrain instances but are not handled here (llguidance implements
# none of them either): a schema using one is left as it is.
_UNHANDLED = frozenset(
    {
        "not", "if", "then", "else", "dependentSchemas", "dependentRequired", "dependencies",
        "propertyNames", "patternProperties", "contains", "minContains", "maxContains",
        "unevaluatedItems", "unevaluatedProperties", "additionalItems", "$dynamicRef", "$recursiveRef",
        "$recursiveAnchor",
    }
)  # fmt: skip
_LOWER_BOUNDS = frozenset({"minimum", "exclusiveMinimum", "minLength", "minItems", "minProperties"})
_UPPER_BOUNDS = frozenset({"maximum", "exclusiveMaximum", "maxLength", "maxItems", "maxProperties"})
_TYPES = ("null", "boolean", "object", "array", "number", "integer", "string")
# Merged combinators not yet expanded: a list of ("anyOf" | "oneOf", branches).
_COMBOS = "\x00combinators"


class SchemaNotBoundable(Exception):
    """The schema cannot be tightened to fit the budget; the message says why."""


@dataclass(frozen=True)
class BoundedSchema:
    """A schema tightened to a budget, with the caps chosen for it.

    Attributes:
        schema: The tightened schema (a new dict; the input is never changed).
        string_chars: Most code points of a string the original left unbounded.
        array_items: Most items of an array, and properties of a free-form object, the original
            left unbounded.
        digits: Integer digits of integers the original left unbounded (of numbers:
            ``min(digits, 9)``, and ``min(digits - 1, 6)`` fraction digits).
        worst_case_bytes: Longest JSON text the grammar of ``schema`` allows, in bytes (so in tokens).
        budget: The token budget it was fitted to.
    """

    schema: dict[str, Any]
    string_chars: int
    array_items: int
    digits: int
    worst_case_bytes: int
    budget: int


_Caps = tuple[int, int, int]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _count(value: Any, name: str) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not _is_int(value) or value < 0:
        raise SchemaNotBoundable(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def _decimal(value: float | int) -> Decimal:
    # repr gives the shortest decimal that round-trips: the digits a JSON writer would use.
    return Decimal(repr(value)) if isinstance(value, float) else Decimal(value)


def _fraction_digits(value: float | int) -> int:
    exponent = _decimal(value).normalize().as_tuple().exponent
    return max(0, -exponent) if isinstance(exponent, int) else 0


def _int_digits(value: Decimal) -> int:
    return len(str(int(abs(value))))


def _value_bytes(value: Any) -> int:
    """Longest text llguidance may write for a const value, in bytes (compact separators)."""
    if value is None or isinstance(value, bool):
        return 4 if value in (None, True) else 5
    if isinstance(value, int):
        return max(len(str(value)), len(format(Decimal(float(value)), "f")))
    if isinstance(value, float):
        return max(len(json.dumps(value)), len(format(_decimal(value), "f")))
    if isinstance(value, str):
        return len(json.dumps(value, ensure_ascii=False).encode())
    if isinstance(value, list):
        return 2 + sum(_value_bytes(item) for item in value) + max(0, len(value) - 1)
    if isinstance(value, dict):
        keys = sum(len(json.dumps(key, ensure_ascii=False).encode()) + 1 for key in value)
        return 2 + keys + sum(_value_bytes(item) for item in value.values()) + max(0, len(value) - 1)
    raise SchemaNotBoundable(f"enum/const value {value!r} is not JSON")


def _of_type(value: Any, type_name: str) -> bool:
    if type_name == "null":
        return value is None
    if type_name == "boolean":
        return isinstance(value, bool)
    if type_name == "integer":
        return _is_int(value) or (isinstance(value, float) and value.is_integer())
    if type_name == "number":
        return _is_number(value)
    if type_name == "string":
        return isinstance(value, str)
    if type_name == "array":
        return isinstance(value, list)
    return isinstance(value, dict)


# --- schema nodes: worst-case size and emission as functions of the caps -----------------------


class _Node:
    """A schema whose worst-case JSON size and tightened form depend on the caps."""

    caps_used: frozenset[int] = frozenset()
    # The last caps costed and their cost: nodes are shared (free values, $defs), costed once per caps.
    _memo: tuple[_Caps, int] | None = None

    def cost(self, caps: _Caps) -> int:
        """Most bytes of a JSON text for this schema under the caps."""
        if self._memo is None or self._memo[0] != caps:
            self._memo = (caps, self.size(caps))
        return self._memo[1]

    def size(self, caps: _Caps) -> int:
        raise NotImplementedError

    def emit(self, caps: _Caps) -> Any:
        raise NotImplementedError


class _Fixed(_Node):
    def __init__(self, schema: dict[str, Any], size: int) -> None:
        self.schema = schema
        self.fixed_size = size

    def size(self, caps: _Caps) -> int:
        return self.fixed_size

    def emit(self, caps: _Caps) -> Any:
        return copy.deepcopy(self.schema)


class _String(_Node):
    def __init__(self, min_len: int, max_len: int | None, pattern: str | None, fmt: str | None) -> None:
        self.min_len = min_len
        self.max_len = max_len
        self.pattern = pattern
        self.format = fmt
        self.fixed = _FIXED_FORMATS.get(fmt or "")
        self.floor = max(min_len, _OPEN_FORMATS.get(fmt or "", 0))
        self.per_char = 1 if fmt else STRING_BYTES_PER_CHAR
        if self.fixed is None:
            self.caps_used = frozenset({_S})

    def length(self, caps: _Caps) -> int:
        if self.fixed is not None:
            return self.fixed if self.max_len is None else min(self.fixed, self.max_len)
        cap = caps[_S] if self.max_len is None else min(caps[_S], self.max_len)
        return max(self.floor, cap)

    def size(self, caps: _Caps) -> int:
        return 2 + self.per_char * self.length(caps)

    def emit(self, caps: _Caps) -> Any:
        out: dict[str, Any] = {"type": "string"}
        if self.min_len:
            out["minLength"] = self.min_len
        if self.fixed is None or self.max_len is not None:
            out["maxLength"] = self.length(caps)
        if self.pattern is not None:
            out["pattern"] = self.pattern
        if self.format is not None:
            out["format"] = self.format
        return out


_Bound = tuple[Decimal, bool]  # (value, exclusive)


def _align(bound: _Bound, step: Decimal, up: bool) -> Decimal:
    """The nearest multiple of ``step`` inside a lower (``up``) or upper bound."""
    value, exclusive = bound
    count = (value / step).to_integral_value(rounding=ROUND_CEILING if up else ROUND_FLOOR)
    if exclusive and count * step == value:
        count += 1 if up else -1
    return count * step


def _json_number(value: Decimal) -> int | float:
    return int(value) if value == value.to_integral_value() else float(value)


class _Number(_Node):
    """An integer or a number: at most ``d`` integer digits, and ``min(d - 1, 6)`` fraction digits.

    Bounds are emitted inclusive and on the grid of the number's step (``multipleOf``, the schema's
    or 10**-fraction): llguidance's float ranges admit the bound itself for some exclusive bounds
    (``exclusiveMinimum: 0, maximum: 0.5`` accepts ``0``), but are exact for grid-aligned inclusive
    ones (checked by enumeration).
    """

    caps_used = frozenset({_D})

    def __init__(self, low: _Bound | None, high: _Bound | None, multiple_of: Any, integer: bool) -> None:
        self.low = low
        self.high = high
        self.multiple_of = multiple_of
        self.integer = integer
        # Fewest fraction digits that leave a number in a narrow range, e.g. (0, 1) exclusive.
        self.min_fraction = 0
        if low is not None and high is not None and multiple_of is None and not integer:
            self.min_fraction = _fewest_fraction_digits(low, high)

    def step(self, caps: _Caps) -> tuple[Decimal, int]:
        """The grid the values lie on, and its fraction digits."""
        if self.integer:  # integer bounds are inclusive integers already; multipleOf filters them
            return Decimal(1), 0
        if self.multiple_of is not None:
            return _decimal(self.multiple_of), _fraction_digits(self.multiple_of)
        fraction = max(self.min_fraction, min(caps[_D] - 1, _MAX_FRACTION_DIGITS))
        return Decimal(1).scaleb(-fraction), fraction

    def bounds(self, caps: _Caps) -> tuple[Decimal, Decimal] | None:
        step, _ = self.step(caps)
        # At most 15 significant digits for a number, so that its bounds are exact as doubles.
        digits = caps[_D] if self.integer else min(caps[_D], _MAX_NUMBER_DIGITS)
        limit: _Bound = (Decimal(10**digits - 1), False)
        low = None if self.low is None else _align(self.low, step, up=True)
        high = None if self.high is None else _align(self.high, step, up=False)
        least, most = _align((-limit[0], False), step, up=True), _align(limit, step, up=False)
        lo = least if low is None else max(low, least)
        hi = most if high is None else min(high, most)
        if lo > hi and low is not None and low > most:  # the range lies above ±limit: keep its near end
            lo, hi = low, _align((low + limit[0], False), step, up=False)
            hi = hi if high is None else min(hi, high)
        elif lo > hi and high is not None and high < least:
            lo, hi = _align((high - limit[0], False), step, up=True), high
            lo = lo if low is None else max(lo, low)
        return (lo, hi) if lo <= hi else None

    def size(self, caps: _Caps) -> int:
        bounds = self.bounds(caps)
        exact = self.integer or all(Decimal(repr(float(bound))) == bound for bound in bounds or ())
        if bounds is None or not exact:
            return _TOO_LONG  # no value, or bounds a double cannot hold: never fits
        _, fraction = self.step(caps)
        digits = max(_int_digits(bounds[0]), _int_digits(bounds[1]))
        return (bounds[0] < 0) + digits + (1 + fraction if fraction else 0)

    def emit(self, caps: _Caps) -> Any:
        bounds = self.bounds(caps)
        assert bounds is not None
        if bounds[0] == bounds[1]:  # llguidance can miss a lone grid point (1.5 under multipleOf 0.25)
            return {"enum": [_json_number(bounds[0])]}
        out: dict[str, Any] = {"type": "integer" if self.integer else "number"}
        out["minimum"], out["maximum"] = (_json_number(bound) for bound in bounds)
        if self.multiple_of is not None:
            out["multipleOf"] = self.multiple_of
        elif not self.integer:
            step, fraction = self.step(caps)
            out["multipleOf"] = float(step) if fraction else 1
        return out


def _fewest_fraction_digits(low: _Bound, high: _Bound) -> int:
    for digits in range(_MAX_NUMBER_DIGITS + 1):
        step = Decimal(1).scaleb(-digits)
        if _align(low, step, up=True) <= _align(high, step, up=False):
            return digits
    raise SchemaNotBoundable(f"no number with at most 15 fraction digits lies between {low[0]} and {high[0]}")


class _Array(_Node):
    def __init__(
        self, prefix: list[_Node], items: _Node | None, min_items: int, max_items: int | None
    ) -> None:
        self.prefix = prefix
        self.items = items
        self.min_items = min_items
        self.max_items = max_items
        if items is not None:
            self.caps_used = frozenset({_A})

    def count(self, caps: _Caps) -> int:
        room = len(self.prefix) + (caps[_A] if self.items is not None else 0)
        if self.max_items is not None:
            room = min(room, self.max_items)
        return max(room, self.min_items)

    def size(self, caps: _Caps) -> int:
        count = self.count(caps)
        size = 2 + max(0, count - 1) + sum(item.cost(caps) for item in self.prefix[:count])
        if count > len(self.prefix):
            assert self.items is not None
            size += (count - len(self.prefix)) * self.items.cost(caps)
        return size

    def emit(self, caps: _Caps) -> Any:
        count = self.count(caps)
        out: dict[str, Any] = {"type": "array"}
        if self.prefix:
            out["prefixItems"] = [item.emit(caps) for item in self.prefix]
        out["items"] = self.items.emit(caps) if self.items is not None and count > len(self.prefix) else False
        if self.min_items:
            out["minItems"] = self.min_items
        out["maxItems"] = count
        return out


class _Object(_Node):
    """An object with its properties listed: any others are forbidden."""

    def __init__(self, entries: list[tuple[str, _Node, bool]], min_props: int, max_props: int | None) -> None:
        self.entries = entries
        self.min_props = min_props
        self.max_props = max_props
        self.key_bytes = sum(len(json.dumps(name, ensure_ascii=False).encode()) + 1 for name, _, _ in entries)

    def size(self, caps: _Caps) -> int:
        values = sum(node.cost(caps) for _, node, _ in self.entries)
        return 2 + self.key_bytes + values + max(0, len(self.entries) - 1)

    def emit(self, caps: _Caps) -> Any:
        out: dict[str, Any] = {
            "type": "object",
            "properties": {name: node.emit(caps) for name, node, _ in self.entries},
            "required": [name for name, _, required in self.entries if required],
            "additionalProperties": False,
        }
        if self.min_props > len(out["required"]):
            out["minProperties"] = self.min_props
        if self.max_props is not None and self.max_props < len(self.entries):
            out["maxProperties"] = self.max_props
        return out


class _Map(_Node):
    """A free-form object: keys of bounded length (through patternProperties), values of one schema."""

    caps_used = frozenset({_S, _A})

    def __init__(self, value: _Node, min_props: int, max_props: int | None) -> None:
        self.value = value
        self.min_props = min_props
        self.max_props = max_props

    def count(self, caps: _Caps) -> int:
        room = caps[_A] if self.max_props is None else min(caps[_A], self.max_props)
        return max(room, self.min_props)

    @staticmethod
    def key_chars(caps: _Caps) -> int:
        return max(1, min(caps[_S], KEY_CHARS))

    def size(self, caps: _Caps) -> int:
        count = self.count(caps)
        if count == 0:
            return 2
        entry = 2 + STRING_BYTES_PER_CHAR * self.key_chars(caps) + 1 + self.value.cost(caps)
        return 2 + count * entry + count - 1

    def emit(self, caps: _Caps) -> Any:
        count = self.count(caps)
        if count == 0:
            return {"type": "object", "additionalProperties": False}
        out: dict[str, Any] = {
            "type": "object",
            "patternProperties": {f"^.{{1,{self.key_chars(caps)}}}$": self.value.emit(caps)},
            "additionalProperties": False,
            "maxProperties": count,
        }
        if self.min_props:
            out["minProperties"] = self.min_props
        return out


class _AnyOf(_Node):
    def __init__(self, branches: list[_Node]) -> None:
        self.branches = branches

    def size(self, caps: _Caps) -> int:
        return max(branch.cost(caps) for branch in self.branches)

    def emit(self, caps: _Caps) -> Any:
        return {"anyOf": [branch.emit(caps) for branch in self.branches]}


def _children(node: _Node) -> list[_Node]:
    if isinstance(node, _Array):
        return [*node.prefix, *([node.items] if node.items is not None else [])]
    if isinstance(node, _Object):
        return [child for _, child, _ in node.entries]
    if isinstance(node, _Map):
        return [node.value]
    if isinstance(node, _AnyOf):
        return list(node.branches)
    return []


def _caps_used(root: _Node) -> frozenset[int]:
    used: set[int] = set()
    seen: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        used |= node.caps_used
        stack.extend(_children(node))
    return frozenset(used)


# --- merging allOf / $ref siblings ----------------------------------------------------------------


class _Never(Exception):
    """The merged schema admits no instance."""


def _type_set(value: Any) -> set[str]:
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(name, str) and name in _TYPES for name in names):
        raise SchemaNotBoundable(f"type must be a JSON type name or a list of them, got {value!r}")
    return set(names)


def _intersect_types(first: Any, second: Any) -> list[str]:
    a, b = _type_set(first), _type_set(second)
    both = a & b
    if ("integer" in a and "number" in b) or ("integer" in b and "number" in a):
        both.add("integer")
    if not both:
        raise _Never
    return [name for name in _TYPES if name in both]


def _json_key(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _combine(key: str, first: Any, second: Any) -> Any:
    if key == "type":
        return _intersect_types(first, second)
    if key == "properties":
        if not isinstance(first, dict) or not isinstance(second, dict):
            raise SchemaNotBoundable("properties must be an object")
        merged = dict(first)
        for name, schema in second.items():
            merged[name] = {"allOf": [merged[name], schema]} if name in merged else schema
        return merged
    if key == "required":
        return list(dict.fromkeys([*first, *second]))
    if key == "enum":
        keys = {_json_key(value) for value in second}
        values = [value for value in first if _json_key(value) in keys]
        if not values:
            raise _Never
        return values
    if key in _LOWER_BOUNDS or key in _UPPER_BOUNDS:
        if not _is_number(first) or not _is_number(second):
            raise SchemaNotBoundable(f"{key} must be a number, got {first!r} and {second!r}")
        return max(first, second) if key in _LOWER_BOUNDS else min(first, second)
    if _json_key(first) == _json_key(second):
        return first
    raise SchemaNotBoundable(f"allOf sets {key} twice, differently ({first!r} and {second!r})")


def _merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Intersects schemas that have no ``$ref`` or ``allOf`` left into one (raises _Never if empty)."""
    out: dict[str, Any] = {}
    combos: list[tuple[str, list[Any]]] = []
    owner: dict[str, int] = {}
    for index, part in enumerate(parts):
        for key, value in part.items():
            if key == _COMBOS:
                combos.extend(value)
                continue
            if key in ("anyOf", "oneOf"):
                if not isinstance(value, list) or not value:
                    raise SchemaNotBoundable(f"{key} must be a non-empty list of schemas")
                combos.append((key, value))
                continue
            if key in _UNHANDLED:
                raise SchemaNotBoundable(f"keyword {key!r} is not handled")
            if key not in _HANDLED:
                continue  # annotations ($defs, description...) and non-JSON-Schema words constrain nothing
            if key in ("additionalProperties", "items") and value in (True, {}):
                continue
            if key == "uniqueItems":
                if value is True:
                    raise SchemaNotBoundable("keyword 'uniqueItems' is not handled")
                continue
            if key == "const":
                key, value = "enum", [value]
            elif key == "enum" and (not isinstance(value, list) or not value):
                raise SchemaNotBoundable("enum must be a non-empty list")
            owner.setdefault(key, index)
            out[key] = _combine(key, out[key], value) if key in out else value
    # additionalProperties applies beyond its own part's properties (items beyond its prefixItems).
    for keyword, partner in (("additionalProperties", "properties"), ("items", "prefixItems")):
        if keyword in owner and any(partner in part for i, part in enumerate(parts) if i != owner[keyword]):
            raise SchemaNotBoundable(f"allOf mixes {keyword} with another part's {partner}")
    if combos:
        out[_COMBOS] = combos
    return out


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """A merged schema as a plain JSON schema again (its pending combinators under their keywords)."""
    out = {key: value for key, value in flat.items() if key != _COMBOS}
    combos = flat.get(_COMBOS, [])
    if len(combos) == 1:
        out[combos[0][0]] = combos[0][1]
    elif combos:
        out["allOf"] = [{kind: branches} for kind, branches in combos]
    return out


# --- building the node tree ------------------------------------------------------------------------


class _Builder:
    def __init__(self, root: Any) -> None:
        self.root = root
        self.nodes = 0
        self.free: dict[int, _Node] = {}

    def resolve(self, ref: Any) -> Any:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise SchemaNotBoundable(f"$ref {ref!r} is not a local reference ('#/...')")
        if ref != "#" and not ref.startswith("#/"):
            raise SchemaNotBoundable(f"$ref {ref!r} names an anchor, which is not handled")
        target = self.root
        for token in ref[2:].split("/") if ref != "#" else []:
            token = token.replace("~1", "/").replace("~0", "~")
            if isinstance(target, dict) and token in target:
                target = target[token]
            elif isinstance(target, list) and token.isdigit() and int(token) < len(target):
                target = target[int(token)]
            else:
                raise SchemaNotBoundable(f"$ref {ref!r} does not resolve")
        return target

    def flatten(self, schema: Any, active: tuple[str, ...]) -> tuple[dict[str, Any], tuple[str, ...]]:
        """The schema with its $ref and allOf merged in, and the refs expanded (raises _Never)."""
        self.nodes += 1
        if self.nodes > _MAX_NODES:
            raise SchemaNotBoundable(f"the schema expands to more than {_MAX_NODES} subschemas")
        if schema is True:
            return {}, ()
        if schema is False:
            raise _Never
        if not isinstance(schema, dict):
            raise SchemaNotBoundable(f"a schema must be an object or a boolean, got {schema!r}")
        parts = [{key: value for key, value in schema.items() if key not in ("$ref", "allOf")}]
        refs: tuple[str, ...] = ()
        if "$ref" in schema:
            ref = schema["$ref"]
            if ref in active:
                raise SchemaNotBoundable(f"$ref {ref!r} is recursive")
            part, inner = self.flatten(self.resolve(ref), (*active, ref))
            parts.append(part)
            refs = (ref, *inner)
        if "allOf" in schema:
            if not isinstance(schema["allOf"], list):
                raise SchemaNotBoundable("allOf must be a list of schemas")
            for sub in schema["allOf"]:
                part, inner = self.flatten(sub, (*active, *refs))
                parts.append(part)
                refs = (*refs, *inner)
        return _merge(parts), refs

    def check_disjoint(self, branches: list[dict[str, Any]]) -> None:
        """Raises unless llguidance proves the (untightened) branches of a oneOf pairwise disjoint."""
        schema: dict[str, Any] = {"oneOf": [_unflatten(branch) for branch in branches]}
        if isinstance(self.root, dict):  # for the $refs left inside the branches
            schema.update({key: self.root[key] for key in ("$defs", "definitions") if key in self.root})
        _check_compiles(schema, "oneOf")

    def build(self, schema: Any, active: tuple[str, ...]) -> _Node | None:
        """The node for a schema, or None if it admits no instance."""
        try:
            flat, refs = self.flatten(schema, active)
            return self.build_flat(flat, (*active, *refs))
        except _Never:
            return None

    def build_flat(self, flat: dict[str, Any], active: tuple[str, ...]) -> _Node | None:
        combos = flat.get(_COMBOS)
        if combos:
            (kind, branches), rest = combos[0], combos[1:]
            siblings = {key: value for key, value in flat.items() if key != _COMBOS}
            if rest:
                siblings[_COMBOS] = rest
            merged: list[tuple[dict[str, Any], tuple[str, ...]]] = []
            for branch in branches:
                try:
                    part, refs = self.flatten(branch, active)
                    merged.append((_merge([siblings, part]), refs))
                except _Never:
                    pass
            if kind == "oneOf" and len(merged) > 1:
                self.check_disjoint([branch for branch, _ in merged])
            # Disjoint oneOf branches stay disjoint when tightened: anyOf of them says the same.
            nodes = [node for branch, refs in merged if (node := self.build_flat(branch, (*active, *refs)))]
            return None if not nodes else nodes[0] if len(nodes) == 1 else _AnyOf(nodes)
        if "enum" in flat:
            return self.build_enum(flat)
        if "type" in flat:
            types = _type_set(flat["type"])
        else:  # keywords of one type only constrain values of that type: keep those types
            types = {name for name, keys in _KEYWORDS_BY_TYPE.items() if any(key in flat for key in keys)}
            if not types:
                return self.free_value(_FREE_DEPTH)
        if "number" in types:
            types.discard("integer")
        nodes = [node for name in _TYPES if name in types if (node := self.build_typed(name, flat, active))]
        return None if not nodes else nodes[0] if len(nodes) == 1 else _AnyOf(nodes)

    def build_enum(self, flat: dict[str, Any]) -> _Node | None:
        values = flat["enum"]
        if "type" in flat:
            types = _type_set(flat["type"])
            values = [value for value in values if any(_of_type(value, name) for name in types)]
        extra = {key: flat[key] for key in flat if key not in ("enum", "type")}
        scalar = set(_KEYWORDS_BY_TYPE["string"]) | set(_KEYWORDS_BY_TYPE["number"])
        if any(key not in scalar for key in extra):
            raise SchemaNotBoundable(f"enum together with {sorted(set(extra) - scalar)} is not handled")
        if not values:
            return None
        schema = {"enum": copy.deepcopy(values), **copy.deepcopy(extra)}
        return _Fixed(schema, max(_value_bytes(value) for value in values))

    def build_typed(self, name: str, flat: dict[str, Any], active: tuple[str, ...]) -> _Node | None:
        if name == "null":
            return _Fixed({"type": "null"}, 4)
        if name == "boolean":
            return _Fixed({"type": "boolean"}, 5)
        if name == "string":
            return self.build_string(flat)
        if name in ("integer", "number"):
            return self.build_number(flat, integer=name == "integer")
        if name == "array":
            return self.build_array(flat, active)
        return self.build_object(flat, active)

    @staticmethod
    def build_string(flat: dict[str, Any]) -> _Node | None:
        min_len = _count(flat.get("minLength", 0), "minLength")
        max_len = _count(flat["maxLength"], "maxLength") if "maxLength" in flat else None
        pattern, fmt = flat.get("pattern"), flat.get("format")
        if pattern is not None and not isinstance(pattern, str):
            raise SchemaNotBoundable(f"pattern must be a string, got {pattern!r}")
        if fmt is not None and fmt not in _FIXED_FORMATS and fmt not in _OPEN_FORMATS:
            raise SchemaNotBoundable(f"format {fmt!r} is not handled")
        if max_len is not None and min_len > max_len:
            return None
        return _String(min_len, max_len, pattern, fmt)

    @staticmethod
    def build_number(flat: dict[str, Any], integer: bool) -> _Node | None:
        for key in _KEYWORDS_BY_TYPE["number"]:
            if key in flat and not _is_number(flat[key]):
                raise SchemaNotBoundable(f"{key} must be a finite number, got {flat[key]!r}")
        multiple_of = flat.get("multipleOf")
        if multiple_of is not None and multiple_of <= 0:
            raise SchemaNotBoundable(f"multipleOf must be positive, got {multiple_of!r}")
        low: _Bound | None = None
        high: _Bound | None = None
        for key, exclusive in (("minimum", False), ("exclusiveMinimum", True)):
            if key in flat:
                value = _decimal(flat[key])
                if low is None or value > low[0] or (value == low[0] and exclusive):
                    low = (value, exclusive)
        for key, exclusive in (("maximum", False), ("exclusiveMaximum", True)):
            if key in flat:
                value = _decimal(flat[key])
                if high is None or value < high[0] or (value == high[0] and exclusive):
                    high = (value, exclusive)
        if integer:  # integer bounds as inclusive integers
            low = None if low is None else (_align(low, Decimal(1), up=True), False)
            high = None if high is None else (_align(high, Decimal(1), up=False), False)
        if low is not None and high is not None:
            if low[0] > high[0] or (low[0] == high[0] and (low[1] or high[1])):
                return None
            if multiple_of is not None and _align(low, _decimal(multiple_of), up=True) > _align(
                high, _decimal(multiple_of), up=False
            ):
                return None
        return _Number(low, high, multiple_of, integer)

    def build_array(self, flat: dict[str, Any], active: tuple[str, ...]) -> _Node | None:
        min_items = _count(flat.get("minItems", 0), "minItems")
        max_items = _count(flat["maxItems"], "maxItems") if "maxItems" in flat else None
        prefix_schemas = flat.get("prefixItems", [])
        if not isinstance(prefix_schemas, list):
            raise SchemaNotBoundable(
                "prefixItems must be a list of schemas (a list under items is not handled)"
            )
        items_schema = flat.get("items", True)
        if isinstance(items_schema, list):
            raise SchemaNotBoundable("items as a list (draft 2019 tuples) is not handled; use prefixItems")
        items = self.free_value(_FREE_DEPTH - 1) if items_schema is True else self.build(items_schema, active)
        prefix: list[_Node] = []
        for schema in prefix_schemas:
            node = self.build(schema, active)
            if node is None:  # no array reaches this position
                items = None
                break
            prefix.append(node)
        if items is None:
            max_items = len(prefix) if max_items is None else min(max_items, len(prefix))
        if max_items is not None and min_items > max_items:
            return None
        return _Array(prefix, items, min_items, max_items)

    def build_object(self, flat: dict[str, Any], active: tuple[str, ...]) -> _Node | None:
        properties = flat.get("properties", {})
        required = flat.get("required", [])
        if not isinstance(properties, dict) or not isinstance(required, list):
            raise SchemaNotBoundable("properties must be an object and required a list")
        min_props = _count(flat.get("minProperties", 0), "minProperties")
        max_props = _count(flat["maxProperties"], "maxProperties") if "maxProperties" in flat else None
        extra = flat.get("additionalProperties", True)
        if not properties and not required:
            value = self.free_value(_FREE_DEPTH - 1) if extra is True else self.build(extra, active)
            if value is None:
                return _Object([], 0, None) if min_props == 0 else None
            if max_props is not None and min_props > max_props:
                return None
            return _Map(value, min_props, max_props)
        entries: list[tuple[str, _Node, bool]] = []
        names = [*properties, *(name for name in required if name not in properties)]
        for name in names:
            if name in properties:
                node = self.build(properties[name], active)
            else:
                node = self.free_value(_FREE_DEPTH - 1) if extra is True else self.build(extra, active)
            if node is not None:
                entries.append((name, node, name in required))
            elif name in required:
                return None
        if min_props > len(entries) or (max_props is not None and max_props < len(set(required))):
            return None
        return _Object(entries, min_props, max_props)

    def free_value(self, depth: int) -> _Node:
        """Any JSON value, bounded: scalars, and arrays and objects nested ``depth`` deep."""
        if depth not in self.free:
            options: list[_Node] = [
                _String(0, None, None, None),
                _Number(None, None, None, integer=False),
                _Fixed({"type": "boolean"}, 5),
                _Fixed({"type": "null"}, 4),
            ]
            if depth > 0:
                inner = self.free_value(depth - 1)
                options += [_Array([], inner, 0, None), _Map(inner, 0, None)]
            self.free[depth] = _AnyOf(options)
        return self.free[depth]


# --- fitting the caps ------------------------------------------------------------------------------


def _with(caps: _Caps, index: int, value: int) -> _Caps:
    grown = list(caps)
    grown[index] = value
    return grown[0], grown[1], grown[2]


def _grow(cost: Callable[[_Caps], int], used: frozenset[int], target: int) -> _Caps:
    """The caps: grown together while all of them can, then each in turn as far as the rest allows.

    Together: in rounds, each used cap by about a quarter (at least one), until one cannot; that is
    the fair split. Then the slack left goes to strings first, then arrays, then digits, each grown
    to the largest value that still fits (binary search: the cost is monotone in every cap).
    """
    caps = _CAP_MIN
    active = [index for index in (_S, _A, _D) if index in used]
    blocked = False
    while active and not blocked:
        for index in list(active):
            current = caps[index]
            if current >= _CAP_MAX[index]:
                active.remove(index)
                continue
            trial = _with(caps, index, min(current + max(1, current // 4), _CAP_MAX[index]))
            if cost(trial) <= target:
                caps = trial
            else:
                blocked = True
    for index in (_S, _A, _D):
        if index not in used:
            continue
        low, high = caps[index], _CAP_MAX[index]  # low fits; find the largest value that does
        while low < high:
            middle = (low + high + 1) // 2
            if cost(_with(caps, index, middle)) <= target:
                low = middle
            else:
                high = middle - 1
        caps = _with(caps, index, low)
    return caps


def _margin(budget: int) -> int:
    # One token for EOS (a top-level number or a word can end only with it), and 2% against surprises.
    return 1 + budget // 50


def _check_compiles(schema: Any, what: str) -> None:
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_COMPILE_OPTIONS)
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise SchemaNotBoundable(f"{what} does not compile: {messages[0] if messages else 'no message'}")


def fit_schema(schema: dict[str, Any], budget: int) -> BoundedSchema:
    """Tightens ``schema`` so that every JSON text its grammar allows is at most ``budget`` tokens.

    Every instance of the result is an instance of ``schema``. The result must be compiled with
    :data:`JSON_COMPILE_OPTIONS`; it counts one token for the EOS that may end a top-level scalar.

    Args:
        schema: A JSON schema (not changed).
        budget: Most tokens of the output, EOS included (a request's ``max_tokens``).

    Returns:
        The tightened schema and the caps chosen.

    Raises:
        SchemaNotBoundable: The schema is recursive, uses a keyword not handled here, has no
            instance, or its smallest bounded form does not fit; the message says which.
    """
    if not _is_int(budget) or budget < 1:
        raise SchemaNotBoundable(f"budget must be a positive integer, got {budget!r}")
    builder = _Builder(schema)
    try:
        root = builder.build(schema, ())
    except (InvalidOperation, OverflowError, TypeError, ValueError) as error:
        raise SchemaNotBoundable(f"the schema is malformed: {error}") from error
    if root is None:
        raise SchemaNotBoundable("the schema admits no instance")
    target = budget - _margin(budget)
    smallest = root.cost(_CAP_MIN)
    if smallest > target:
        raise SchemaNotBoundable(
            f"its shortest bounded form takes up to {smallest} tokens, over the budget of {budget} "
            f"less {_margin(budget)} spare"
        )
    caps = _grow(root.cost, _caps_used(root), target)
    bounded = root.emit(caps)
    _check_compiles(bounded, "the bounded schema")
    return BoundedSchema(bounded, caps[_S], caps[_A], caps[_D], root.cost(caps), budget)


def bound_schema(schema: dict[str, Any], budget: int) -> dict[str, Any] | None:
    """Tightens ``schema`` so that every JSON text its grammar allows is at most ``budget`` tokens.

    See :func:`fit_schema`; compile the result with :data:`JSON_COMPILE_OPTIONS`.

    Args:
        schema: A JSON schema (not changed).
        budget: Most tokens of the output, EOS included (a request's ``max_tokens``).

    Returns:
        A new, stricter schema whose instances all validate against ``schema``, or None when no
        such bound can be given (the reason is logged at debug level): compile the original then.
    """
    try:
        return fit_schema(schema, budget).schema
    except SchemaNotBoundable as error:
        logger.debug("JSON schema not bounded to %d tokens: %s", budget, error)
        return None
