r"""Math answer equivalence: "1,234" = "1234 dollars", "0.5" = "\frac{1}{2}", "2(x+1)" = "2x+2".

An answer is cleaned (LaTeX delimiters, ``\boxed``, ``\text``, units, ``$``, ``%``, degree signs,
a leading ``x =``, thousands separators), rewritten from LaTeX to Python syntax (``\frac``,
``\sqrt``, ``\cdot``, ``^``, implicit products such as ``2x``) and parsed with :mod:`ast`. The tree
is evaluated by a small walker that knows only numbers, ``+ - * / **``, ``sqrt``, ``pi``, ``e`` and
tuples: nothing is ever passed to ``eval``. Numbers are exact fractions wherever possible, so
``0.1 + 0.2`` equals ``0.3``; a float result (a square root, pi) is compared with a relative
tolerance. Answers with variables are compared symbolically when sympy is installed (the walker
builds the sympy expression itself). Answers that parse as neither compare as normalised text.
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Callable
from fractions import Fraction
from typing import Any

from lmstack.eval.metrics._text import GenerationResult

__all__ = ["math_equal", "math_equiv", "parse_math"]

_MAX_CHARS = 400  # longer "answers" are prose: compare them as text
_MAX_EXPONENT = 256  # keeps 10**10**10 from hanging the scorer
_MAX_BITS = 4096  # numerator or denominator


class _NotMath(Exception):
    """The text is not an expression this module evaluates."""


class _Symbolic(Exception):
    """The expression has a free variable: numbers alone cannot decide it."""


def _unwrap_command(text: str, command: str) -> str:
    r"""Replace each ``\command{body}`` by ``body`` (braces balanced)."""
    marker = "\\" + command + "{"
    while (start := text.find(marker)) != -1:
        depth, i = 1, start + len(marker)
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth:
            raise _NotMath(f"unbalanced braces after \\{command}")
        text = text[:start] + text[start + len(marker) : i - 1] + text[i:]
    return text


def _braced(text: str, start: int) -> tuple[str, int]:
    """The argument at ``start``: a ``{...}`` group or one character; returns it and the index after."""
    while start < len(text) and text[start] == " ":
        start += 1
    if start >= len(text):
        raise _NotMath("a LaTeX command is missing its argument")
    if text[start] != "{":
        return text[start], start + 1
    depth, i = 1, start + 1
    while i < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        i += 1
    if depth:
        raise _NotMath("unbalanced braces")
    return text[start + 1 : i - 1], i


def _latex_frac_sqrt(text: str) -> str:
    out = re.sub(r"\\[dt]frac", r"\\frac", text)
    while (start := out.find("\\frac")) != -1:
        num, after = _braced(out, start + len("\\frac"))
        den, after = _braced(out, after)
        out = f"{out[:start]}(({num})/({den})){out[after:]}"
    while (start := out.find("\\sqrt")) != -1:
        arg, after = _braced(out, start + len("\\sqrt"))
        out = f"{out[:start]}sqrt({arg}){out[after:]}"
    return out


def _clean(text: str) -> str:
    s = text.strip()
    if len(s) > _MAX_CHARS:
        raise _NotMath("too long")
    s = _unwrap_command(s, "boxed")
    for command in ("text", "textbf", "mathrm", "mbox"):
        s = _unwrap_command(s, command)
    for token in ("\\left", "\\right", "\\displaystyle", "\\!", "\\,", "\\;", "\\:", "\\ ", "\\$", "\\%"):
        s = s.replace(token, " " if token == "\\ " else "")
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?|°", "", s)
    s = s.replace("\\(", "").replace("\\)", "").replace("\\[", "").replace("\\]", "")
    s = s.replace("$", "").replace("%", "").strip().rstrip(".").strip()
    # "x = 5" -> "5" (a single assignment only: "x = y = 5" is left alone).
    s = re.sub(r"^[A-Za-z]\w*\s*=(?!=)\s*(?=[^=]*$)", "", s)
    # Thousands separators: "1,234,567" but not the pair "1,2".
    s = re.sub(r"\b\d{1,3}(?:,\d{3})+\b(?!\.\d*,)", lambda m: m.group(0).replace(",", ""), s)
    # A number followed by unit words: "18 dollars", "5cm", "3 km/h" (a lone letter after a number is
    # a variable: "2x").
    unit = re.fullmatch(r"([-+]?(?:\d+\.?\d*|\.\d+)(?:/\d+)?)\s*([A-Za-z][A-Za-z./\s\d^]*)", s)
    if unit and (len(re.sub(r"[^A-Za-z]", "", unit.group(2))) > 1 or " " in unit.group(0)):
        s = unit.group(1)
    return s.strip()


def _to_python(s: str) -> str:
    s = _latex_frac_sqrt(s)
    s = s.replace("\\cdot", "*").replace("\\times", "*").replace("\\div", "/").replace("\\pi", " pi ")
    if "\\" in s:
        raise _NotMath("unsupported LaTeX command")
    s = s.replace("{", "(").replace("}", ")").replace("^", "**").replace("\u00d7", "*").replace("\u00f7", "/")
    # Implicit products: "2x", "2(x+1)", "(a)(b)", ")x", "2 pi"; not the exponent of "1e3".
    s = re.sub(r"(\d|\))\s*(?=(?![eE][-+]?\d)[A-Za-z(])", r"\1*", s)
    return s.strip()


def _too_big(value: Any) -> bool:
    """Whether an exact number (a Fraction or a sympy Rational) has grown past ``_MAX_BITS``."""
    if isinstance(value, Fraction):
        num, den = value.numerator, value.denominator
    elif getattr(value, "is_Rational", False):
        num, den = int(value.p), int(value.q)
    else:
        return False
    return max(abs(num), den).bit_length() > _MAX_BITS


class _Walker:
    """Evaluates an :mod:`ast` expression with exact fractions, or builds a sympy expression."""

    def __init__(self, sympy: Any = None) -> None:
        self.sympy = sympy

    def run(self, node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return self.run(node.body)
        if isinstance(node, ast.Tuple):
            return tuple(self.run(e) for e in node.elts)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            # repr(0.1) == "0.1": the decimal the user wrote, exactly.
            value = Fraction(repr(node.value))
            return self.sympy.Rational(value.numerator, value.denominator) if self.sympy else value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
            operand = self.run(node.operand)
            return -operand if isinstance(node.op, ast.USub) else operand
        if isinstance(node, ast.BinOp):
            return self._binop(node)
        if isinstance(node, ast.Name):
            return self._name(node.id)
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "sqrt"
            and len(node.args) == 1
            and not node.keywords
        ):
            return self._sqrt(self.run(node.args[0]))
        raise _NotMath(f"unsupported syntax: {type(node).__name__}")

    def _name(self, name: str) -> Any:
        constants = {"pi": math.pi, "e": math.e}
        if self.sympy is not None:
            sp = self.sympy
            return {"pi": sp.pi, "e": sp.E}.get(name) or sp.Symbol(name)
        if name in constants:
            return constants[name]
        raise _Symbolic(name)

    def _sqrt(self, value: Any) -> Any:
        if self.sympy is not None:
            return self.sympy.sqrt(value)
        if isinstance(value, tuple) or value < 0:
            raise _NotMath("square root of a negative number or a tuple")
        if isinstance(value, Fraction):
            num, den = math.isqrt(value.numerator), math.isqrt(value.denominator)
            if num * num == value.numerator and den * den == value.denominator:
                return Fraction(num, den)
        return math.sqrt(value)

    def _binop(self, node: ast.BinOp) -> Any:
        left, right = self.run(node.left), self.run(node.right)
        if isinstance(left, tuple) or isinstance(right, tuple):
            raise _NotMath("arithmetic on a tuple")
        ops: dict[type, Callable[[Any, Any], Any]] = {
            ast.Add: lambda a, b: a + b,
            ast.Sub: lambda a, b: a - b,
            ast.Mult: lambda a, b: a * b,
            ast.Div: lambda a, b: a / b,
        }
        if type(node.op) in ops:
            try:
                result = ops[type(node.op)](left, right)
            except ZeroDivisionError as exc:
                raise _NotMath("division by zero") from exc
        elif isinstance(node.op, ast.Pow):
            result = self._pow(left, right)
        else:
            raise _NotMath(f"unsupported operator {type(node.op).__name__}")
        if _too_big(result):
            raise _NotMath("number too large")
        return result

    def _pow(self, base: Any, exponent: Any) -> Any:
        if self.sympy is not None:
            if exponent.is_number and abs(exponent) > _MAX_EXPONENT:
                raise _NotMath("exponent too large")
            return base**exponent
        if abs(exponent) > _MAX_EXPONENT:
            raise _NotMath("exponent too large")
        if isinstance(exponent, Fraction) and exponent.denominator == 1 and isinstance(base, Fraction):
            if base == 0 and exponent < 0:
                raise _NotMath("division by zero")
            return base ** int(exponent)
        try:
            result = float(base) ** float(exponent)
        except (OverflowError, ZeroDivisionError) as exc:
            raise _NotMath("power out of range") from exc
        if isinstance(result, complex):
            raise _NotMath("complex power")
        return result


def _sympy() -> Any:
    try:
        import sympy
    except ImportError:  # sympy is optional: numbers are compared without it
        return None
    return sympy


def parse_math(text: str) -> Any:
    """Parse a math answer into an exact number, a float, a tuple of them, or a sympy expression.

    Args:
        text: The answer as written (plain, LaTeX, with units or separators).

    Returns:
        A :class:`fractions.Fraction` (exact), a ``float`` (square roots, pi), a tuple of numbers, a
        sympy expression when the answer has variables and sympy is installed, or ``None`` when the
        text is not a math expression this module understands.
    """
    try:
        tree = ast.parse(_to_python(_clean(text)), mode="eval")
    except (_NotMath, SyntaxError, ValueError):
        return None
    try:
        return _Walker().run(tree)
    except _NotMath:
        return None
    except _Symbolic:
        sympy = _sympy()
        if sympy is None:
            return None
        try:
            return _Walker(sympy).run(tree)
        except (_NotMath, TypeError, ValueError):
            return None


def _numbers_equal(a: Any, b: Any, rel_tol: float) -> bool:
    if isinstance(a, tuple) or isinstance(b, tuple):
        return (
            isinstance(a, tuple)
            and isinstance(b, tuple)
            and len(a) == len(b)
            and all(_numbers_equal(x, y, rel_tol) for x, y in zip(a, b, strict=True))
        )
    if isinstance(a, Fraction) and isinstance(b, Fraction):
        return a == b
    if isinstance(a, (Fraction, float)) and isinstance(b, (Fraction, float)):
        return math.isclose(float(a), float(b), rel_tol=rel_tol, abs_tol=1e-12)
    return _symbolic_equal(a, b, rel_tol)


def _symbolic_equal(a: Any, b: Any, rel_tol: float) -> bool:
    sympy = _sympy()
    if sympy is None:
        return False
    try:
        difference = sympy.simplify(sympy.nsimplify(a) - sympy.nsimplify(b))
        if difference == 0:
            return True
        if difference.free_symbols:
            return False
        scale = max(abs(complex(sympy.N(a))), abs(complex(sympy.N(b))), 1e-12)
        return abs(complex(sympy.N(difference))) <= rel_tol * scale
    except (TypeError, ValueError, AttributeError):
        return False


def _as_text(text: str) -> str:
    return re.sub(r"\s+", "", text).rstrip(".").lower()


def math_equal(prediction: str, reference: str, *, rel_tol: float = 1e-6) -> bool:
    """Whether two math answers are the same value.

    Args:
        prediction: The model's answer.
        reference: The reference answer.
        rel_tol: Relative tolerance when a side is not exact (a square root, pi); exact fractions
            compare exactly.

    Returns:
        ``True`` when both read the same as text (case and spaces aside) or parse to equal values.
    """
    if _as_text(prediction) == _as_text(reference) != "":
        return True
    left, right = parse_math(prediction), parse_math(reference)
    if left is None or right is None:
        return False
    return _numbers_equal(left, right, rel_tol)


def math_equiv(result: GenerationResult, *, rel_tol: float = 1e-6) -> float:
    """1.0 when the prediction equals a reference as math (see :func:`math_equal`), else 0.0.

    Args:
        result: The prediction and its references.
        rel_tol: See :func:`math_equal`.

    Returns:
        The per-sample score.
    """
    return 1.0 if any(math_equal(result.prediction, r, rel_tol=rel_tol) for r in result.references) else 0.0
