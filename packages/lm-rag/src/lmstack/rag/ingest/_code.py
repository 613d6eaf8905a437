"""Python source cut at its functions and classes (with their decorators, docstrings and comments)."""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass

__all__ = ["CodeSegment", "code_segments", "code_symbols", "member_segments"]

_LINE_END_RE = re.compile(r"\r\n?|\n")  # the line ends ast counts (not \f or \u2028)
_SYMBOLS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


@dataclass(frozen=True)
class CodeSegment:
    """A stretch of source: a symbol (function, class, method) or the code between symbols.

    Attributes:
        symbol: The symbol's name (``Class.method`` for a method), or the enclosing name (None at module
            level) for code between symbols.
        start: Offset of the first character.
        end: Offset one past the last character (after the line end).
        node: The class definition, when the segment is a class (so it can be split by its methods).
    """

    symbol: str | None
    start: int
    end: int
    node: ast.ClassDef | None = None


class _Lines:
    def __init__(self, source: str) -> None:
        self.source = source
        self.starts = [0, *(m.end() for m in _LINE_END_RE.finditer(source))]

    def offset(self, line: int) -> int:
        """Offset of the start of a 1-based line; the source's length past the last line."""
        return self.starts[line - 1] if line - 1 < len(self.starts) else len(self.source)

    def text(self, line: int) -> str:
        return self.source[self.offset(line) : self.offset(line + 1)]


def _segments(
    lines: _Lines, body: list[ast.stmt], start: int, end: int, owner: str | None, first_line: int
) -> list[CodeSegment]:
    """Symbols among ``body`` and the code between them, within source[start:end]."""
    out: list[CodeSegment] = []
    pos = start
    floor = first_line  # no symbol reaches above the previous statement's end
    for node in body:
        if isinstance(node, _SYMBOLS):
            top = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            # Comment lines right above a symbol (no blank line between) describe it.
            while top - 1 > floor and lines.text(top - 1).lstrip().startswith("#"):
                top -= 1
            sym_start = max(lines.offset(top), pos)
            sym_end = min(lines.offset((node.end_lineno or node.lineno) + 1), end)
            if lines.source[pos:sym_start].strip():
                out.append(CodeSegment(owner, pos, sym_start))
            name = node.name if owner is None else f"{owner}.{node.name}"
            out.append(
                CodeSegment(name, sym_start, sym_end, node if isinstance(node, ast.ClassDef) else None)
            )
            pos = sym_end
        floor = node.end_lineno or node.lineno
    if lines.source[pos:end].strip():
        out.append(CodeSegment(owner, pos, end))
    return out


def code_segments(source: str) -> list[CodeSegment]:
    """The top-level segments of a Python module.

    Args:
        source: Python source.

    Returns:
        Segments in order; whitespace between them is left out.

    Raises:
        SyntaxError: The source does not parse.
    """
    tree = ast.parse(source)
    return _segments(_Lines(source), tree.body, 0, len(source), None, 0)


def member_segments(source: str, segment: CodeSegment) -> list[CodeSegment]:
    """A class segment cut by its methods (and nested classes); the code between is the class's own.

    Args:
        source: The module's source.
        segment: A segment with a class node (from :func:`code_segments`).

    Returns:
        The class's segments in order: its header (``class`` line, docstring, attributes) and the code
        between methods named after the class, each method as ``Class.method``.
    """
    if segment.node is None:
        return [segment]
    return _segments(
        _Lines(source), segment.node.body, segment.start, segment.end, segment.symbol, segment.node.lineno
    )


def code_symbols(source: str) -> list[tuple[str | None, int, int]]:
    """Where a Python module's top-level functions and classes are.

    Decorators, docstrings and the comment lines right above a symbol belong to it; the module-level code
    between symbols is grouped into segments of its own.

    Args:
        source: Python source.

    Returns:
        ``(symbol name or None, start, end)`` character offsets in order, None for module-level code;
        whitespace between them is left out.

    Raises:
        SyntaxError: The source does not parse.
    """
    return [(s.symbol, s.start, s.end) for s in code_segments(source)]
