"""Markdown structure: ATX headings outside code fences, and the sections they open."""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["Heading", "Section", "markdown_headings", "markdown_sections", "parse_sections"]

_HEADING_RE = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?[ \t]*$")
_CLOSING_HASHES_RE = re.compile(r"(?:^|[ \t]+)#+$")
_FENCE_RE = re.compile(r"^ {0,3}(`{3,}|~{3,})")


@dataclass(frozen=True)
class Heading:
    """One ATX heading line.

    Attributes:
        level: 1 for ``#`` up to 6 for ``######``.
        title: The heading's text, without the hashes.
        start: Offset of the heading line's first character.
    """

    level: int
    title: str
    start: int

    @property
    def line(self) -> str:
        """The heading as a Markdown line (``## Install``)."""
        return f"{'#' * self.level} {self.title}"


@dataclass(frozen=True)
class Section:
    """The text from one heading to the next (or the text before the first heading).

    Attributes:
        path: The headings this section is under, outermost first, its own heading last.
        start: Offset of the section's first character (its heading line).
        end: Offset one past its last character.
        heading_end: Offset one past the heading line's newline (``start`` when there is no heading).
    """

    path: tuple[Heading, ...]
    start: int
    end: int
    heading_end: int


def markdown_headings(text: str) -> list[tuple[Heading, int]]:
    """The ATX headings of a Markdown text, skipping lines inside ``` and ~~~ fences.

    Args:
        text: Markdown.

    Returns:
        Each heading with the offset one past its line (after the newline).
    """
    headings: list[tuple[Heading, int]] = []
    fence: str | None = None
    offset = 0
    for line in text.splitlines(keepends=True):
        start, offset = offset, offset + len(line)
        stripped = line.rstrip("\r\n")
        fence_match = _FENCE_RE.match(stripped)
        if fence is not None:
            # A fence closes with the same character, at least as long, and nothing else on the line.
            marker = fence_match.group(1) if fence_match else ""
            if marker[:1] == fence[0] and len(marker) >= len(fence) and not stripped.strip().lstrip(fence[0]):
                fence = None
            continue
        if fence_match:
            fence = fence_match.group(1)
            continue
        match = _HEADING_RE.match(stripped)
        if match:
            title = _CLOSING_HASHES_RE.sub("", match.group(2) or "").strip()
            headings.append((Heading(len(match.group(1)), title, start), offset))
    return headings


def parse_sections(text: str) -> list[Section]:
    """Cuts a Markdown text at its headings, each section knowing the heading path it is under.

    Args:
        text: Markdown.

    Returns:
        The sections in order; they cover the text. Text before the first heading is a section with an
        empty path (left out when it is empty).
    """
    sections: list[Section] = []
    headings = markdown_headings(text)
    first = headings[0][0].start if headings else len(text)
    if first > 0:
        sections.append(Section((), 0, first, 0))
    stack: list[Heading] = []
    for i, (heading, line_end) in enumerate(headings):
        while stack and stack[-1].level >= heading.level:
            stack.pop()
        stack.append(heading)
        end = headings[i + 1][0].start if i + 1 < len(headings) else len(text)
        sections.append(Section(tuple(stack), heading.start, end, line_end))
    return sections


def markdown_sections(text: str) -> list[tuple[tuple[str, ...], int, int]]:
    """The sections of a Markdown text with their header paths.

    ``#`` lines inside fenced code blocks are not headings.

    Args:
        text: Markdown.

    Returns:
        ``(header path, start, end)`` for each section in order: the titles of the headings the section
        is under, outermost first (its own heading last), and its character offsets in ``text``. The
        sections cover the text; text before the first heading has the empty path.
    """
    return [(tuple(h.title for h in s.path), s.start, s.end) for s in parse_sections(text)]
