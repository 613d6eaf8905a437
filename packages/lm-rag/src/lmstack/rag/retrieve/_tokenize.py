"""The BM25 tokenizer: Unicode words and numbers, CJK characters and bigrams, English stopwords out."""

from __future__ import annotations

import functools
import re
import sys
import unicodedata

__all__ = ["STOPWORDS", "TOKENIZER_VERSION", "bm25_tokenize"]

# Bumped whenever tokenization changes, so a saved index built with other tokens is rebuilt, not misread.
TOKENIZER_VERSION = 1

# Function words that carry no topic. Negations ("not", "no", "nor") and quantity/direction words
# ("up", "down", "more", "only") stay: they change what a passage or a question says.
_STOPWORD_TEXT = """
    a an the and or but if then else so as of at by for with about into onto from to in on
    is are was were be been being am do does did doing done have has had having
    i me my mine myself we us our ours ourselves you your yours yourself yourselves
    he him his himself she her hers herself it its itself they them their theirs themselves
    this that these those there here what which who whom whose when where why how
    can could will would shall should may might must
    s t d ll m re ve
    all any both each few some such own same other than too very just also
    again further once while during before after above below between through until
    because against over under out off
"""
STOPWORDS: frozenset[str] = frozenset(_STOPWORD_TEXT.split())
"""English words :func:`bm25_tokenize` drops."""

# Hiragana, Katakana (+ phonetic extensions, half-width forms), Hangul (syllables, jamo, compatibility
# jamo), and Han (unified ideographs, extension A, compatibility ideographs, the supplementary planes).
_CJK_RANGES = (
    (0x1100, 0x11FF),
    (0x3040, 0x30FF),
    (0x3130, 0x318F),
    (0x31F0, 0x31FF),
    (0x3400, 0x4DBF),
    (0x4E00, 0x9FFF),
    (0xA960, 0xA97F),
    (0xAC00, 0xD7AF),
    (0xD7B0, 0xD7FF),
    (0xF900, 0xFAFF),
    (0xFF66, 0xFF9F),
    (0xFFA0, 0xFFDC),
    (0x20000, 0x3FFFF),
)


def _char_class(ranges: list[tuple[int, int]]) -> str:
    return "".join(
        re.escape(chr(lo)) if lo == hi else f"{re.escape(chr(lo))}-{re.escape(chr(hi))}" for lo, hi in ranges
    )


@functools.lru_cache(maxsize=1)
def _patterns() -> tuple[re.Pattern[str], re.Pattern[str]]:
    # Python's \w leaves out combining marks, which would cut Devanagari, Thai or Arabic words apart
    # (NFKC does not compose them): add every mark code point to the word class.
    marks: list[tuple[int, int]] = []
    for cp in range(sys.maxunicode + 1):
        if unicodedata.category(chr(cp)).startswith("M"):
            if marks and marks[-1][1] == cp - 1:
                marks[-1] = (marks[-1][0], cp)
            else:
                marks.append((cp, cp))
    word = re.compile(rf"(?:[^\W_]|[{_char_class(marks)}])+")
    cjk = re.compile(f"[{_char_class(list(_CJK_RANGES))}]+")
    return word, cjk


def _emit(piece: str, out: list[str]) -> None:
    if piece and piece not in STOPWORDS:
        out.append(piece)


def bm25_tokenize(text: str) -> list[str]:
    """Split a text into the terms BM25 indexes and queries with.

    The text is NFKC-normalised (full-width letters become ASCII) and casefolded. Words and numbers of
    any script are runs of letters, digits and combining marks; everything else separates them, hyphens
    and apostrophes included (``state-of-the-art`` gives ``state``, ``art``; ``don't`` gives ``don``).
    A run of CJK characters (Han, Hiragana, Katakana, Hangul) gives every character and every bigram of
    neighbouring characters, so ``向量检索`` matches queries for ``检索`` and for ``向量``. English
    stopwords (:data:`STOPWORDS`) are dropped; negations such as ``not`` are kept. Deterministic.

    Args:
        text: Any text.

    Returns:
        The terms in text order (a CJK run's characters first, then its bigrams).
    """
    word, cjk = _patterns()
    out: list[str] = []
    for match in word.finditer(unicodedata.normalize("NFKC", text).casefold()):
        run = match.group()
        last = 0
        for cjk_match in cjk.finditer(run):
            _emit(run[last : cjk_match.start()], out)
            chars = cjk_match.group()
            out.extend(chars)
            out.extend(chars[i : i + 2] for i in range(len(chars) - 1))
            last = cjk_match.end()
        _emit(run[last:], out)
    return out
