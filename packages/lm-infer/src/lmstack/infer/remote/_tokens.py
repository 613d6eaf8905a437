r"""Tokens as servers spell them, back to bytes and ids.

A server names each token of its log-probs by its text; a token holding part of a UTF-8 character
is spelled ``bytes:\xe2\x80`` (OpenAI, lmstack serve), and vLLM's ``return_tokens_as_token_ids``
spells every token ``token_id:42``. :class:`TokenResolver` maps those spellings to ids with the
model's tokenizer.
"""

from __future__ import annotations

import re

from lmstack.core import Tokenizer
from lmstack.infer._byte_level import BYTE_TO_CHAR

__all__ = ["TOKEN_ID_PREFIX", "TokenResolver", "token_bytes"]

TOKEN_ID_PREFIX = "token_id:"  # vLLM's `return_tokens_as_token_ids` spelling of a token
_BYTES_TOKEN = re.compile(r"bytes:((?:\\x[0-9A-Fa-f]{2})+)")


def token_bytes(token: str) -> bytes:
    r"""A token's bytes: its UTF-8 text, or what a ``bytes:\xe2\x80`` token (part of a character) spells."""
    match = _BYTES_TOKEN.fullmatch(token)
    if match:
        return bytes.fromhex(match.group(1).replace("\\x", ""))
    return token.encode()


def _spelled_id(token: str) -> int | None:
    try:
        return int(token[len(TOKEN_ID_PREFIX) :])
    except ValueError:
        return None


class TokenResolver:
    """Token ids for text and token strings, from the server's answer or else the local tokenizer.

    Args:
        tokenizer: The model's tokenizer, or None (then only ``token_id:N`` spellings resolve).
    """

    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[str, int | None] = {}

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int] | None:
        """The local tokenizer's ids for ``text`` (None without a tokenizer)."""
        if self.tokenizer is None:
            return None
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def token_id(self, token: str) -> int | None:
        r"""The id of one token as a server spells it, if it can tell.

        ``token_id:42`` (vLLM's ``return_tokens_as_token_ids``) is read as is. Otherwise, with a
        tokenizer, the token's bytes (its text, or what ``bytes:\x..`` spells) are looked up as a
        vocabulary entry (byte-level, sentencepiece or plain spelling), else encoded: a text that
        encodes to exactly one token gives that token.
        """
        if token.startswith(TOKEN_ID_PREFIX):
            return _spelled_id(token)
        if self.tokenizer is None or not token:
            return None
        if token not in self._cache:
            self._cache[token] = self._lookup(self.tokenizer, token)
        return self._cache[token]

    @staticmethod
    def _lookup(tokenizer: Tokenizer, token: str) -> int | None:
        raw = token_bytes(token)
        candidates = ["".join(BYTE_TO_CHAR[b] for b in raw)]
        if len(raw) == 1:
            candidates.append(f"<0x{raw[0]:02X}>")  # sentencepiece byte fallback
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        if text is not None:
            candidates += ["\u2581" + text[1:] if text.startswith(" ") else text, text]
        for piece in candidates:
            found = tokenizer.token_to_id(piece)
            if found is not None:
                return found
        if text is not None:
            ids = tokenizer.encode(text, add_special_tokens=False)
            if len(ids) == 1:
                return ids[0]
        return None
