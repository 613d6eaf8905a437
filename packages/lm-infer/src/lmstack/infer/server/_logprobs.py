r"""Log-probs in OpenAI's two shapes, and the text and bytes of single tokens.

A token's text is what it decodes to on its own. A byte-level token that holds only part of a UTF-8
character has no text of its own: as OpenAI does, it is written ``bytes:\\xe2\\x80`` and its bytes are
its raw bytes (recovered from the byte-level alphabet, or from sentencepiece's ``<0xNN>`` pieces).
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Sequence

from lmstack.core import Tokenizer
from lmstack.infer._byte_level import CHAR_TO_BYTE
from lmstack.infer.server._protocol import ChatTokenLogprob, CompletionLogprobs, TopLogprob

__all__ = ["TextOffsets", "TokenTexts", "chat_logprobs", "completion_logprobs"]

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SPACE_MARK = "\u2581"  # sentencepiece's word-start mark, which decoding a lone token drops
# JSON has no -Infinity: a masked token's log-prob is written as this floor, as vLLM does.
_LOGPROB_FLOOR = -9999.0


def _finite(logprob: float) -> float:
    return logprob if logprob >= _LOGPROB_FLOOR else _LOGPROB_FLOOR  # also maps NaN to the floor


class TokenTexts:
    """Per-token text and bytes, computed once per token id.

    Args:
        tokenizer: The model's tokenizer.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, tuple[str, bytes]] = {}

    def _lookup(self, token_id: int) -> tuple[str, bytes]:
        hit = self._cache.get(token_id)
        if hit is not None:
            return hit
        text = self._tokenizer.decode([token_id])
        piece = self._tokenizer.id_to_token(token_id) or ""
        if "\ufffd" in text and "\ufffd" not in piece:
            match = _BYTE_PIECE.fullmatch(piece)
            if match:
                raw = bytes([int(match.group(1), 16)])
            elif piece and all(ch in CHAR_TO_BYTE for ch in piece):
                raw = bytes(CHAR_TO_BYTE[ch] for ch in piece)
            else:
                raw = text.encode()
        else:
            if piece.startswith(_SPACE_MARK) and not text.startswith(" "):
                text = " " + text
            raw = text.encode()
        try:
            shown = raw.decode("utf-8")
        except UnicodeDecodeError:
            shown = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        self._cache[token_id] = (shown, raw)
        return shown, raw

    def text(self, token_id: int) -> str:
        r"""The token's text, or ``bytes:\\x..`` when it is part of a character."""
        return self._lookup(token_id)[0]

    def raw(self, token_id: int) -> bytes:
        """The token's UTF-8 bytes."""
        return self._lookup(token_id)[1]

    def bytes(self, token_id: int) -> list[int]:
        """The token's UTF-8 bytes, as OpenAI's chat log-probs list them."""
        return list(self._lookup(token_id)[1])


class TextOffsets:
    """Character offsets of successive tokens in their decoded text.

    A token that starts inside a character (byte-level tokens split characters) gets that
    character's offset, so offsets index the text the client receives, not the tokens' renderings.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._chars = 0

    def advance(self, raw: bytes) -> int:
        """The offset of a token with bytes ``raw``, then move past it."""
        offset = self._chars
        self._chars += len(self._decoder.decode(raw))
        return offset


def completion_logprobs(
    texts: TokenTexts,
    token_ids: Sequence[int],
    entries: Sequence[dict[int, float] | None],
    offsets: TextOffsets,
) -> CompletionLogprobs:
    """Legacy completions log-probs of some tokens.

    Args:
        texts: Token texts.
        token_ids: The tokens.
        entries: Per token ``{token_id: logprob}`` with its own log-prob and alternatives, or None
            (the first prompt token, which nothing predicts).
        offsets: The text offsets of the choice so far (advanced past these tokens).
    """
    out: CompletionLogprobs = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token_id, entry in zip(token_ids, entries, strict=True):
        out["tokens"].append(texts.text(token_id))
        out["text_offset"].append(offsets.advance(texts.raw(token_id)))
        if entry is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
        else:
            out["token_logprobs"].append(_finite(entry[token_id]))
            top: dict[str, float] = {}
            for alt, lp in sorted(entry.items(), key=lambda kv: -kv[1]):
                top.setdefault(texts.text(alt), _finite(lp))
            out["top_logprobs"].append(top)
    return out


def chat_logprobs(
    texts: TokenTexts, token_ids: Sequence[int], entries: Sequence[dict[int, float]], top_k: int
) -> list[ChatTokenLogprob]:
    """Chat log-probs (``choices[i].logprobs.content``) of generated tokens.

    Args:
        texts: Token texts.
        token_ids: The generated tokens.
        entries: Per token ``{token_id: logprob}`` with its own log-prob and the top alternatives.
        top_k: How many alternatives to list per token (the request's ``top_logprobs``).
    """
    out: list[ChatTokenLogprob] = []
    for token_id, entry in zip(token_ids, entries, strict=True):
        ranked = sorted(entry.items(), key=lambda kv: -kv[1])[:top_k]
        top: list[TopLogprob] = [
            {"token": texts.text(alt), "logprob": _finite(lp), "bytes": texts.bytes(alt)}
            for alt, lp in ranked
        ]
        out.append(
            {
                "token": texts.text(token_id),
                "logprob": _finite(entry[token_id]),
                "bytes": texts.bytes(token_id),
                "top_logprobs": top,
            }
        )
    return out
