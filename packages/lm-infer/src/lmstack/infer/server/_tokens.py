"""Prompts tokenized off the event loop, and a prompt far too long refused without tokenizing it.

The Rust tokenizer holds the GIL through one ``encode`` call: megabytes of text would stall every
thread, the event loop included, for seconds even when encoded in a worker thread. Its
``encode_batch`` releases the GIL and gives the same ids, so the server encodes through it, in a
worker thread.

Before that, a text whose size alone proves it too long for the context is refused: no token stands
for more bytes than the longest vocabulary entry's UTF-8 spelling (a byte-level or byte-fallback
token spells one byte with one or more), so a text has at least ``characters // longest`` tokens. That
holds when the tokenizer's normalizer and pre-tokenizer never drop text; for any other tokenizer no
bound is claimed and every prompt is tokenized.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from lmstack.core import Tokenizer
from lmstack.infer._errors import InvalidRequestError

__all__ = ["PromptTokens"]

# Longest text encoded on the event loop itself (a worker thread's hand-off costs more than that).
_INLINE_CHARS = 512

logger = logging.getLogger(__name__)

# Normalizers that never shorten a text (Replace only with a non-empty replacement, checked below).
_KEEPING_NORMALIZERS = {"Prepend", "Replace"}
# Pre-tokenizers that split a text without dropping any of it (Split unless it removes matches).
_KEEPING_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Digits", "Split", "Punctuation", "UnicodeScripts"}


def _keeps_text(component: dict[str, Any] | None, allowed: set[str]) -> bool:
    """Whether a normalizer or pre-tokenizer (as tokenizer.json spells it) keeps every byte of a text."""
    if component is None:
        return True
    kind = component.get("type")
    if kind == "Sequence":
        parts = component.get("normalizers") or component.get("pretokenizers") or []
        return all(_keeps_text(part, allowed) for part in parts)
    if kind not in allowed:
        return False
    if kind == "Replace":
        return bool(component.get("content"))
    if kind == "Split":
        return component.get("behavior") != "Removed"
    return True


def _longest_token_bytes(tokenizer: Tokenizer) -> int | None:
    """The most text bytes one token can stand for, or None when the tokenizer may drop text."""
    try:
        spec = json.loads(tokenizer.backend_tokenizer.to_str())
    except Exception:  # not a tokenizers.Tokenizer we can read: claim nothing
        return None
    if not _keeps_text(spec.get("normalizer"), _KEEPING_NORMALIZERS) or not _keeps_text(
        spec.get("pre_tokenizer"), _KEEPING_PRE_TOKENIZERS
    ):
        return None
    vocab = tokenizer.get_vocab()
    return max((len(token.encode("utf-8")) for token in vocab), default=0) or None


class PromptTokens:
    """Tokenizing prompts for the server: off the event loop, refusing hopeless ones early.

    Args:
        tokenizer: The model's tokenizer.
        max_model_len: The model's context, in tokens.
    """

    def __init__(self, tokenizer: Tokenizer, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.longest = _longest_token_bytes(tokenizer)
        logger.debug("longest token: %s bytes", self.longest)

    def at_least(self, text: str) -> int:
        """A lower bound on the number of tokens ``text`` encodes to (0 when none is known)."""
        if self.longest is None or len(text) < self.max_model_len:  # a short text cannot be over
            return 0
        # Characters, not bytes: a character is at least one byte, and counting them costs nothing.
        return len(text) // self.longest

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """``tokenizer.encode(text)``, releasing the GIL while the tokenizer works (call it in a thread)."""
        if not text:
            return []
        return self.tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0]

    async def encode_async(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """:meth:`encode`, in a worker thread unless the text is short (microseconds of work)."""
        if len(text) <= _INLINE_CHARS:
            return self.encode(text, add_special_tokens)
        return await asyncio.to_thread(self.encode, text, add_special_tokens)

    def for_chat(self) -> Tokenizer:
        """The tokenizer as chat rendering sees it, with :meth:`encode` as its ``encode``.

        Its ``encode`` also refuses a rendered conversation whose size alone proves it too long for
        the context (``InvalidRequestError`` with ``param`` ``prompt``), before encoding it.
        """
        return _ChatTokenizer(self)  # type: ignore[return-value]


class _ChatTokenizer:
    """A tokenizer whose ``encode`` goes through :class:`PromptTokens`; everything else is the model's."""

    def __init__(self, tokens: PromptTokens) -> None:
        self._tokens = tokens

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokens.tokenizer, name)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        tokens = self._tokens
        least = tokens.at_least(text)
        if least >= tokens.max_model_len:
            raise InvalidRequestError(
                f"this model's maximum context length is {tokens.max_model_len} tokens, but the conversation "
                f"has at least {least} tokens ({len(text)} characters rendered); shorten it.",
                param="prompt",
            )
        return tokens.encode(text, add_special_tokens)
