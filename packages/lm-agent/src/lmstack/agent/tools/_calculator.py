"""The calculator tool: arithmetic evaluated by walking the expression's AST (never ``eval``)."""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from typing import Any

from lmstack.agent.tools._tool import Tool

__all__ = ["CalculatorError", "calculator", "evaluate"]

_MAX_CHARS = 1000
# Integers are exact; past 10,000 bits (about 3,000 digits) a result is refused rather than computed, so
# 10**10**10 fails at once instead of hanging.
_MAX_INT_BITS = 10_000

_Number = int | float

_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "sqrt": math.sqrt,
    "log": math.log,
    "log2": math.log2,
    "log10": math.log10,
    "exp": math.exp,
    "sin": math.sin,
    "cos": math.cos,
    "tan": math.tan,
    "asin": math.asin,
    "acos": math.acos,
    "atan": math.atan,
    "floor": math.floor,
    "ceil": math.ceil,
    "abs": abs,
    "round": round,
    "min": min,
    "max": max,
}
# How operators outside the whitelist are named in errors.
_SYMBOLS = {
    "BitXor": "^",
    "BitAnd": "&",
    "BitOr": "|",
    "LShift": "<<",
    "RShift": ">>",
    "MatMult": "@",
    "Invert": "~",
}
_CONSTANTS: dict[str, float] = {"pi": math.pi, "e": math.e, "tau": math.tau}
# Symbols models write that Python spells differently.
_SPELLINGS = {
    "\u00d7": "*",
    "\u00f7": "/",
    "\u2212": "-",
    "\u2013": "-",
}  # multiplication, division, minus, dash


class CalculatorError(ValueError):
    """An expression the calculator cannot or will not evaluate (the message says why)."""


def _check_size(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CalculatorError(f"the result {value!r} is not a number")
    if isinstance(value, int) and value.bit_length() > _MAX_INT_BITS:
        raise CalculatorError("the result is too large (more than about 3000 digits)")
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculatorError("the result overflowed (it is not a finite number)")
    return value


def _op_name(op: ast.AST) -> str:
    return _SYMBOLS.get(type(op).__name__, type(op).__name__)


def _power(base: _Number, exponent: _Number) -> _Number:
    # Estimate the size before computing: an exact integer power can take unbounded time and memory.
    exact = isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1
    if exact and exponent * math.log2(abs(base)) > _MAX_INT_BITS:
        raise CalculatorError("the result is too large (more than about 3000 digits)")
    result = base**exponent
    if isinstance(result, complex):
        raise CalculatorError("a negative number to a fractional power has no real result")
    return result


class _Evaluator:
    def __init__(self) -> None:
        self.nodes = 0

    def visit(self, node: ast.AST) -> _Number:
        self.nodes += 1
        if self.nodes > 500:
            raise CalculatorError("the expression is too long (at most 500 operations and numbers)")
        if isinstance(node, ast.Expression):
            return self.visit(node.body)
        if isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
                raise CalculatorError(f"{node.value!r} is not a number")
            return _check_size(node.value)
        if isinstance(node, ast.BinOp):
            op = _BINARY.get(type(node.op))
            if op is None:
                hint = " (use ** for powers)" if isinstance(node.op, ast.BitXor) else ""
                raise CalculatorError(f"the operator {_op_name(node.op)} is not supported{hint}")
            left, right = self.visit(node.left), self.visit(node.right)
            return _check_size(_power(left, right) if isinstance(node.op, ast.Pow) else op(left, right))
        if isinstance(node, ast.UnaryOp):
            unary = _UNARY.get(type(node.op))
            if unary is None:
                raise CalculatorError(f"the operator {_op_name(node.op)} is not supported")
            return _check_size(unary(self.visit(node.operand)))
        if isinstance(node, ast.Name):
            if node.id in _CONSTANTS:
                return _CONSTANTS[node.id]
            raise CalculatorError(f"unknown name {node.id!r}; the constants are {', '.join(_CONSTANTS)}")
        if isinstance(node, ast.Call):
            return self._call(node)
        raise CalculatorError(
            f"{type(node).__name__} is not allowed: only numbers, + - * / // % **, parentheses and the "
            f"functions {', '.join(_FUNCTIONS)}"
        )

    def _call(self, node: ast.Call) -> _Number:
        if not isinstance(node.func, ast.Name) or node.func.id not in _FUNCTIONS:
            name = ast.unparse(node.func)
            name = name if len(name) <= 40 else name[:37] + "..."
            raise CalculatorError(f"unknown function {name!r}; the functions are {', '.join(_FUNCTIONS)}")
        if node.keywords:
            raise CalculatorError(f"{node.func.id}() takes positional arguments only")
        args = [self.visit(arg) for arg in node.args]
        if node.func.id == "round" and len(args) == 2 and not isinstance(args[1], int):
            raise CalculatorError("round(x, n) needs a whole number of digits n")
        try:
            return _check_size(_FUNCTIONS[node.func.id](*args))
        except (TypeError, ValueError) as exc:
            if isinstance(exc, CalculatorError):
                raise
            shown = ", ".join(repr(arg) for arg in args)
            raise CalculatorError(f"{node.func.id}({shown}): {exc}") from exc


def evaluate(expression: str) -> int | float:
    """Evaluate an arithmetic expression safely, without ``eval``.

    Args:
        expression: Numbers, ``+ - * / // % **``, unary minus, parentheses, the constants ``pi``, ``e``,
            ``tau`` and the functions ``sqrt log log2 log10 exp sin cos tan asin acos atan floor ceil abs
            round min max``.

    Returns:
        The value: an exact integer where every step was one, else a float rounded to 15 significant digits
        (so ``0.1 + 0.2`` is ``0.3``).

    Raises:
        CalculatorError: A syntax error, a name or construct outside the whitelist, division by zero, a
            domain error, or a result too large.
    """
    for symbol, spelling in _SPELLINGS.items():
        expression = expression.replace(symbol, spelling)
    if len(expression) > _MAX_CHARS:
        raise CalculatorError(
            f"the expression is too long ({len(expression)} characters, at most {_MAX_CHARS})"
        )
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as exc:
        raise CalculatorError(f"not a valid expression: {exc.msg}") from exc
    except (RecursionError, MemoryError) as exc:
        raise CalculatorError("the expression is nested too deeply") from exc
    try:
        value = _Evaluator().visit(tree)
    except ZeroDivisionError as exc:
        raise CalculatorError("division by zero") from exc
    except OverflowError as exc:
        raise CalculatorError("the result overflowed (too large for a float)") from exc
    except RecursionError as exc:
        raise CalculatorError("the expression is nested too deeply") from exc
    if isinstance(value, float):
        value = float(f"{value:.15g}")
    return value


def _calculator(expression: str) -> int | float:
    """Evaluate an arithmetic expression exactly (integers) or to 15 significant digits.

    Supports numbers, + - * / // % ** (power), parentheses, pi, e, tau and sqrt, log (natural; log(x, base)),
    log2, log10, exp, sin, cos, tan (radians), asin, acos, atan, floor, ceil, abs, round, min, max.

    Args:
        expression: The expression, e.g. "sqrt(2) * (3 + 4) ** 2".
    """
    return evaluate(expression)


calculator: Tool = Tool(_calculator, name="calculator")
