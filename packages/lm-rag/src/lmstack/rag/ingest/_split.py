"""The recursive splitter: text cut at its coarsest working separator, packed into token-bounded chunks."""

from __future__ import annotations

import bisect
import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from lmstack.rag._errors import RAGConfigError
from lmstack.rag.ingest._tokens import CJK_CHARS, TokenCounter

__all__ = ["ChunkingConfig", "split_recursive"]


@dataclass(frozen=True)
class ChunkingConfig:
    """How documents are cut into chunks.

    Attributes:
        chunk_tokens: The most tokens a chunk may have, heading lines included (the default embedder
            reads 256).
        overlap_tokens: About how many tokens consecutive chunks of the recursive splitter share; less
            than ``chunk_tokens``.
        min_chunk_tokens: A last chunk smaller than this is merged into the one before when they fit
            together.
        markdown_headers: Cut Markdown (and HTML and DOCX, which read as Markdown) at its headings first.
        code_by_symbol: Cut Python at its top-level functions and classes (classes too large by method).
        prepend_headings: Start a Markdown chunk's text with the header lines it is under that it does not
            contain, so a chunk under "## Install" of "# lmstack" still says what it is about.

    Raises:
        RAGConfigError: A size is out of range.
    """

    chunk_tokens: int = 200
    overlap_tokens: int = 32
    min_chunk_tokens: int = 8
    markdown_headers: bool = True
    code_by_symbol: bool = True
    prepend_headings: bool = True

    def __post_init__(self) -> None:
        checks = (
            ("chunk_tokens", self.chunk_tokens >= 1, "at least 1"),
            (
                "overlap_tokens",
                0 <= self.overlap_tokens < self.chunk_tokens,
                "at least 0 and less than chunk_tokens",
            ),
            ("min_chunk_tokens", self.min_chunk_tokens >= 0, "at least 0"),
        )
        for name, ok, rule in checks:
            if not ok:
                raise RAGConfigError(
                    f"{name} is {getattr(self, name)} (chunk_tokens={self.chunk_tokens}); it must be {rule}",
                    field=name,
                )


# Coarsest first. Each match's end is a cut, so separators stay with the piece before them.
_SEPARATORS = (
    re.compile(r"\n[ \t]*\n\s*"),  # blank lines: paragraphs
    re.compile(r"\n\s*"),  # line breaks
    re.compile(r"[.!?]+[\"')\]]*\s+|[。！？；]+[”’」』）]*\s*"),  # sentence ends  # noqa: RUF001
    re.compile(r"[,;:]\s+|[，、：]\s*"),  # clauses  # noqa: RUF001
    re.compile(r"\s+"),  # words
)
_WORD_START_RE = re.compile(r"\s+")
# A character that does not continue a Latin word or number (CJK characters are tokens of their own).
_CHAR_START_RE = re.compile(rf"(?<![^\W_{CJK_CHARS}])|(?![^\W_{CJK_CHARS}])")


class _Piece(NamedTuple):
    start: int
    end: int
    tokens: int


# Tokens in text[a:b] for the text being split: exact, or (with a counter that has token_spans) read off
# one tokenization of the whole text, which is exact at whitespace and punctuation boundaries.
_Measure = Callable[[int, int], int]


def _measure(text: str, count: TokenCounter) -> _Measure:
    token_spans = getattr(count, "token_spans", None)
    if token_spans is None:
        return lambda a, b: count(text[a:b])
    starts = [start for start, _ in token_spans(text)]
    return lambda a, b: bisect.bisect_left(starts, b) - bisect.bisect_left(starts, a)


def _pieces(
    text: str, start: int, end: int, budget: int, window: int, measure: _Measure, level: int
) -> list[_Piece]:
    """Cuts text[start:end] into pieces of at most ``budget`` tokens, at the coarsest separators that do it.

    Where only single characters are left to cut at, pieces are ``window`` tokens (when not 0).
    """
    tokens = measure(start, end)
    if tokens <= budget:
        return [_Piece(start, end, tokens)]
    for depth in range(level, len(_SEPARATORS)):
        cuts = [m.end() for m in _SEPARATORS[depth].finditer(text, start, end) if start < m.end() < end]
        if cuts:
            pieces: list[_Piece] = []
            for a, b in itertools.pairwise([start, *cuts, end]):
                pieces.extend(_pieces(text, a, b, budget, window, measure, depth + 1))
            return pieces
    return _char_pieces(start, end, min(budget, window) if window else budget, measure)


def _char_pieces(start: int, end: int, budget: int, measure: _Measure) -> list[_Piece]:
    """The last resort (CJK without punctuation, a long identifier): the longest prefixes that fit.

    The caller makes ``budget`` the overlap's size, so chunks fill up to within one piece and the
    overlap is a whole piece.
    """
    pieces: list[_Piece] = []
    pos = start
    while pos < end:
        # Grow the window geometrically, then bisect: O(log window) measurements.
        good, probe = pos + 1, min(end, pos + budget)
        while measure(pos, probe) <= budget:
            good = probe
            if probe == end:
                break
            probe = min(end, pos + 2 * (probe - pos))
        lo, hi = good, probe - 1 if probe > good else good
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if measure(pos, mid) <= budget:
                lo = mid
            else:
                hi = mid - 1
        pieces.append(_Piece(pos, lo, measure(pos, lo)))
        pos = lo
    return pieces


def _tail(starts: list[int], budget: int, tail_tokens: Callable[[int], int]) -> tuple[int, int] | None:
    """The longest tail (the first of ``starts``) with 1 to ``budget`` tokens, and its count."""
    lo, hi = 0, len(starts)  # the first start whose tail fits; tails shrink as starts grow
    while lo < hi:
        mid = (lo + hi) // 2
        if tail_tokens(starts[mid]) <= budget:
            hi = mid
        else:
            lo = mid + 1
    if lo == len(starts):
        return None
    tokens = tail_tokens(starts[lo])
    return (starts[lo], tokens) if 0 < tokens <= budget else None


def _overlap(
    text: str,
    pieces: list[_Piece],
    first: int,
    last: int,
    chunk_start: int,
    end: int,
    budget: int,
    measure: _Measure,
    count: TokenCounter,
) -> tuple[int, int] | None:
    """Where the next chunk starts so that it repeats about ``budget`` tokens of this one, and how many."""
    tokens, k = 0, last
    # Whole pieces from the end, never the chunk's first (the next chunk must move forward).
    while k > first and tokens + pieces[k].tokens <= budget:
        tokens += pieces[k].tokens
        k -= 1
    if k < last and tokens > 0:
        return pieces[k + 1].start, tokens
    # The last piece alone is too long: take a tail of it, starting at a word, else at a character that does
    # not split a Latin word, else at any character.
    piece_start = max(pieces[last].start, chunk_start)
    word_starts = [m.end() for m in _WORD_START_RE.finditer(text, piece_start, end)]
    char_starts = [m.start() for m in _CHAR_START_RE.finditer(text, piece_start + 1, end)]
    # Word boundaries measure exactly off the tokenization; a cut inside a word is counted again.

    def exact(start: int) -> int:
        return count(text[start:end])

    for starts, tail_tokens in (
        (word_starts, lambda start: measure(start, end)),
        (char_starts, exact),
        (range(piece_start + 1, end), exact),
    ):
        found = _tail([p for p in starts if piece_start < p < end], budget, tail_tokens)
        if found is not None:
            return found
    return None


def split_recursive(text: str, config: ChunkingConfig, count_tokens: TokenCounter) -> list[tuple[int, int]]:
    """Cuts a text into overlapping chunks of at most ``config.chunk_tokens`` tokens.

    The text is cut at the coarsest separator that yields pieces small enough — blank lines, line breaks,
    sentence ends (``. ! ?`` and their CJK full-width forms, and the full-width semicolon), clause marks,
    spaces, and at last single characters, so text without spaces (Chinese) still splits — and the
    pieces are packed greedily into chunks. Each chunk after the first starts with about
    ``config.overlap_tokens`` tokens of the one before, made of whole pieces where they fit, else of the
    last piece's tail. A last chunk under ``config.min_chunk_tokens`` is merged into the one before when
    the two fit together.

    A counter with a ``token_spans(text)`` method (the default one) tokenizes the text once and pieces
    are measured off its offsets; every chunk is still counted with ``count_tokens`` itself.

    Args:
        text: The text.
        config: Sizes.
        count_tokens: How tokens are counted (every chunk is checked with it).

    Returns:
        ``(start, end)`` character offsets of the chunks, in order. Together they cover the text (none
        when it is only whitespace); no chunk has more than ``config.chunk_tokens`` tokens.
    """
    if not text.strip():
        return []
    budget, overlap = config.chunk_tokens, config.overlap_tokens
    # Pieces leave room for the overlap, so overlap plus one new piece always fits.
    measure = _measure(text, count_tokens)
    pieces = _pieces(text, 0, len(text), max(1, budget - overlap), overlap, measure, 0)
    spans: list[tuple[int, int]] = []
    last_tokens = 0
    carried: tuple[int, int] | None = None  # (start, tokens) of the overlap the next chunk begins with
    i = 0
    while i < len(pieces):
        start, tokens = carried if carried is not None else (pieces[i].start, 0)
        j = i
        while j < len(pieces) and (j == i or tokens + pieces[j].tokens <= budget):
            tokens += pieces[j].tokens
            j += 1
        # Piece counts add up for whitespace-separated pieces; a chunk is still checked as a whole.
        tokens = count_tokens(text[start : pieces[j - 1].end])
        while tokens > budget and (j - 1 > i or start != pieces[i].start):
            if j - 1 > i:
                j -= 1
            else:
                start = pieces[i].start
            tokens = count_tokens(text[start : pieces[j - 1].end])
        if tokens > budget:
            # One piece that the shared tokenization under-counted (cut inside a word): cut it again, exactly.
            piece = pieces[i]
            pieces[i : i + 1] = _char_pieces(
                piece.start, piece.end, budget, lambda a, b: count_tokens(text[a:b])
            )
            carried = None
            continue
        end = pieces[j - 1].end
        spans.append((start, end))
        last_tokens = tokens
        first = i - 1 if start < pieces[i].start else i  # an overlapped chunk may hand on all its new pieces
        carried = (
            _overlap(text, pieces, first, j - 1, start, end, overlap, measure, count_tokens)
            if overlap
            else None
        )
        i = j
    if len(spans) > 1 and last_tokens < config.min_chunk_tokens:
        merged = (spans[-2][0], spans[-1][1])
        if count_tokens(text[merged[0] : merged[1]]) <= budget:
            spans[-2:] = [merged]
    return spans
