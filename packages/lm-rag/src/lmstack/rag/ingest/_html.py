"""HTML to readable, Markdown-ish text with the standard library's parser."""

from __future__ import annotations

import re
from html.parser import HTMLParser

__all__ = ["html_to_text"]

# Their contents are not text a reader sees (or, for nav, menus repeated on every page).
_SKIPPED = frozenset({"script", "style", "nav", "head", "noscript", "template", "svg", "iframe"})
_BLOCKS = frozenset(
    {
        "address", "article", "aside", "blockquote", "details", "dd", "div", "dl", "dt", "fieldset",
        "figcaption", "figure", "footer", "form", "header", "hr", "main", "ol", "p", "section", "summary",
        "table", "ul", "caption",
    }
)  # fmt: skip
_LINES = frozenset({"br", "li", "tr"})
_HEADINGS = {f"h{n}": n for n in range(1, 7)}
_FENCE = "```"
_SPACES_RE = re.compile(r"\s+")
_BLANK_LINES_RE = re.compile(r"\n{3,}")


class _Extractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.title_parts: list[str] = []
        self.first_h1: list[str] = []
        self._skip: list[str] = []
        self._in_title = False
        self._pre = 0
        self._heading: int | None = None
        self._cells_in_row = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "body" and "head" in self._skip:
            self._skip.clear()  # an unclosed <head> ends where <body> starts
        if tag == "title":
            self._in_title = True
            return
        if self._skip:
            if tag in _SKIPPED:
                self._skip.append(tag)
            return
        if tag in _SKIPPED:
            self._skip.append(tag)
        elif tag in _HEADINGS:
            self._heading = _HEADINGS[tag]
            self.parts.append(f"\n\n{'#' * self._heading} ")
        elif tag == "pre":
            self._pre += 1
            if self._pre == 1:
                self.parts.append(f"\n\n{_FENCE}\n")
        elif tag in ("td", "th"):
            if self._cells_in_row:
                self.parts.append(" | ")
            self._cells_in_row += 1
        elif tag in _LINES:
            self.parts.append("\n- " if tag == "li" else "\n")
            if tag == "tr":
                self._cells_in_row = 0
        elif tag in _BLOCKS:
            self.parts.append("\n\n")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if not self._skip and tag in _LINES | _BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False
            return
        if self._skip:
            if tag == self._skip[-1]:
                self._skip.pop()
            return
        if tag in _HEADINGS:
            self._heading = None
            self.parts.append("\n\n")
        elif tag == "pre" and self._pre:
            self._pre -= 1
            if not self._pre:
                self.parts.append(f"\n{_FENCE}\n\n")
        elif tag in _BLOCKS:
            self.parts.append("\n\n")

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title_parts.append(data)
            return
        if self._skip:
            return
        if self._pre:
            self.parts.append(data)
            return
        text = _SPACES_RE.sub(" ", data)
        if self._heading == 1:
            self.first_h1.append(text)
        self.parts.append(text)


def _tidy(raw: str) -> str:
    """Strips lines outside code fences and keeps at most one blank line between blocks."""
    lines: list[str] = []
    in_fence = False
    for line in raw.split("\n"):
        if line == _FENCE:
            in_fence = not in_fence
            lines.append(line)
        elif in_fence:
            lines.append(line.rstrip())
        else:
            stripped = line.strip()
            # A heading or list item left with nothing in it is noise.
            lines.append("" if stripped in ("-", *("#" * n for n in range(1, 7))) else stripped)
    return _BLANK_LINES_RE.sub("\n\n", "\n".join(lines)).strip()


def html_to_text(html: str) -> tuple[str, str | None]:
    """Extracts the readable text of an HTML page.

    Script, style, navigation and head contents are dropped; block elements become line breaks;
    headings become Markdown ``#`` lines (so the Markdown chunker keeps their path); ``<pre>`` becomes a
    fenced block with its whitespace kept; table cells are joined with `` | ``; list items start with
    ``- ``; entities are unescaped and other whitespace collapsed.

    Args:
        html: The page's markup.

    Returns:
        The text and the page's title (``<title>``, else the first ``<h1>``; None when neither).
    """
    parser = _Extractor()
    parser.feed(html)
    parser.close()
    title = _SPACES_RE.sub(" ", "".join(parser.title_parts)).strip()
    if not title:
        title = _SPACES_RE.sub(" ", "".join(parser.first_h1)).strip()
    return _tidy("".join(parser.parts)), title or None
