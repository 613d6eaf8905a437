"""Citation markers in generated text: ``[n]`` kept when passage n was shown, removed when it was not.

The filter works on a stream of text deltas, so a server can forward an answer as it is generated: text
that might still become a citation (an open ``[`` followed by digits) is held back until it closes or
turns out not to be one.
"""

from __future__ import annotations

import re

__all__ = ["CitationFilter", "cited_numbers", "clean_citations"]

# "[3]", "[1, 2]", "[1][2]" are citations; "[note]" or "[x]" are left alone.
_CITATION = re.compile(r"\[\s*(\d+(?:\s*,\s*\d+)*)\s*\]")
_OPEN_PREFIX = re.compile(r"\[\s*(\d+(\s*,\s*\d*)*\s*)?")
_MAX_PENDING = 40  # an open bracket longer than this is not a citation


_GONE = "\x00"  # stands where a marker was removed, until the text around it is known
_GONE_RUN = re.compile(r"\x00(?:[ \t]*\x00)+")
_GONE_BEFORE_PUNCT = re.compile(r"[ \t]*\x00(?=[.,;:!?)\n]|$)")
_GONE_AFTER_SPACE = re.compile(r"([ \t])\x00[ \t]*")
_HELD_TAIL = re.compile(r"[ \t]*(?:\x00[ \t]*)*$")


def _rewrite(match: re.Match[str], valid: range) -> str:
    numbers = [int(n) for n in re.findall(r"\d+", match.group(1))]
    kept = [n for n in dict.fromkeys(numbers) if n in valid]
    return f"[{', '.join(map(str, kept))}]" if kept else _GONE


def _close_gaps(text: str) -> str:
    """Drop the removed markers with the space that would be left: "Rome [7]." -> "Rome."."""
    text = _GONE_BEFORE_PUNCT.sub("", _GONE_RUN.sub(_GONE, text))
    return _GONE_AFTER_SPACE.sub(r"\1", text).replace(_GONE, "")


def clean_citations(text: str, num_passages: int) -> str:
    """Remove citation numbers that point at no passage (a marker left empty goes entirely).

    Args:
        text: The generated answer.
        num_passages: How many passages the prompt showed (numbered from 1).

    Returns:
        The text with only citations of passages 1..num_passages, and no space left where a marker went.
    """
    valid = range(1, num_passages + 1)
    return _close_gaps(_CITATION.sub(lambda m: _rewrite(m, valid), text))


def cited_numbers(text: str) -> list[int]:
    """The passage numbers a (cleaned) text cites, in order of first citation."""
    found: list[int] = []
    for match in _CITATION.finditer(text):
        for number in re.findall(r"\d+", match.group(1)):
            if int(number) not in found:
                found.append(int(number))
    return found


class CitationFilter:
    """Clean citations from a stream of text deltas, as :func:`clean_citations` does on the whole text.

    Example:
        >>> f = CitationFilter(num_passages=2)
        >>> f.feed("Paris [1") + f.feed("] and Rome [7].") + f.finish()
        'Paris [1] and Rome.'
    """

    def __init__(self, num_passages: int) -> None:
        self._valid = range(1, num_passages + 1)
        self._pending = ""  # raw text that may still become a citation
        self._held = ""  # cleaned text whose trailing spaces and removed markers wait for what follows
        self._text = ""

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return self._text

    def feed(self, delta: str) -> str:
        """Take new generated text; return the part that is safe to show now."""
        self._pending += delta
        out = [self._held]
        while self._pending:
            start = self._pending.find("[")
            if start < 0:
                out.append(self._pending)
                self._pending = ""
                break
            out.append(self._pending[:start])
            rest = self._pending[start:]
            match = _CITATION.match(rest)
            if match:
                out.append(_rewrite(match, self._valid))
                self._pending = rest[match.end() :]
                continue
            prefix = _OPEN_PREFIX.match(rest)
            if prefix and prefix.end() == len(rest) and len(rest) < _MAX_PENDING:
                self._pending = rest  # may still close as a citation: wait for more text
                break
            out.append("[")  # not a citation: let it through
            self._pending = rest[1:]
        joined = "".join(out)
        tail = _HELD_TAIL.search(joined)  # always matches (possibly empty) at the end
        cut = tail.start() if tail else len(joined)
        self._held = joined[cut:]
        emitted = _close_gaps(joined[:cut])
        self._text += emitted
        return emitted

    def finish(self) -> str:
        """Flush what was held back when the stream ends (an unclosed bracket is shown as generated)."""
        rest = _close_gaps(self._held + self._pending)
        self._held = self._pending = ""
        self._text += rest
        return rest
