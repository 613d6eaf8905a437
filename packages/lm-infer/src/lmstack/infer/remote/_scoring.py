"""Log-likelihood scoring over /v1/completions: ``echo: true, logprobs: 1, max_tokens: 0``.

The server returns, for every prompt token, its text, its character offset and its log-prob given
the tokens before it, with the most likely alternative. The continuation's tokens are found by those
offsets, their log-probs summed, and the continuation is greedy when every one of its tokens is as
likely as the best alternative at its position.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lmstack.infer._errors import InvalidRequestError, RemoteError, RemoteUnsupportedError
from lmstack.infer.remote._response import Usage
from lmstack.infer.remote._tokens import token_bytes

__all__ = [
    "EchoLogprobs",
    "continuation_start",
    "parse_echo",
    "score_text_pair",
    "score_token_pair",
]

# Slack when comparing a token's log-prob with the best alternative's (both come from one softmax, so
# they are equal for the argmax; this only absorbs float formatting).
_GREEDY_TOLERANCE = 1e-6

_REQUIREMENT = (
    "loglikelihood needs a /v1/completions endpoint that returns the prompt's log-probs when asked "
    "with echo=true and logprobs=1 (lmstack serve and vLLM do; OpenAI's chat models do not)"
)
_ABOUT_ECHO = re.compile(r"echo|logprob|max_tokens|max tokens|not supported|unsupported", re.IGNORECASE)


def unsupported_from(error: RemoteError, server: str) -> RemoteError:
    """The error to raise when the server refused a scoring request.

    A 404/405/501, or a 4xx whose message is about echo, log-probs or max_tokens, means the server
    cannot score: :class:`RemoteUnsupportedError`. Other refusals (a prompt too long) stay as they are.
    """
    status = error.status_code
    if status in (404, 405, 501) or (
        status is not None and 400 <= status < 500 and _ABOUT_ECHO.search(str(error))
    ):
        return RemoteUnsupportedError(
            f"{server} cannot score log-likelihoods: it refused the echo+logprobs request ({error}). "
            f"{_REQUIREMENT}.",
            status_code=status,
            server=server,
        )
    return error


@dataclass
class EchoLogprobs:
    """The prompt part of an echoed completion's log-probs.

    Attributes:
        tokens: Each prompt token's text as the server spells it.
        logprobs: Each prompt token's log-prob given the tokens before it (None for the first).
        top: The most likely alternatives at each position, ``{token text: logprob}`` (None for the first).
        offsets: Each token's character offset in the server's echoed text.
    """

    tokens: list[str]
    logprobs: list[float | None]
    top: list[dict[str, float] | None]
    offsets: list[int]


def parse_echo(body: Any, *, prompt: str | None, generated: int, server: str) -> EchoLogprobs:
    """Reads the prompt tokens' log-probs out of an ``echo`` completion.

    Args:
        body: The JSON response.
        prompt: The prompt text (None for a token-id prompt): the echoed text must start with it.
        generated: Tokens the request asked to generate (``max_tokens``); they are dropped.
        server: The server's URL, for messages.

    Raises:
        RemoteUnsupportedError: the response carries no prompt log-probs (the server ignored ``echo``
            or ``logprobs``).
    """

    def unsupported(what: str) -> RemoteUnsupportedError:
        return RemoteUnsupportedError(f"{server} {what}. {_REQUIREMENT}.", server=server)

    choices = body.get("choices") if isinstance(body, Mapping) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], Mapping):
        raise unsupported("answered the scoring request without choices")
    choice = choices[0]
    text = choice.get("text")
    if prompt is not None and isinstance(text, str) and not text.startswith(prompt):
        raise unsupported("did not echo the prompt (echo=true was ignored)")
    logprobs = choice.get("logprobs")
    if not isinstance(logprobs, Mapping):
        raise unsupported("returned no log-probs for the prompt tokens")
    tokens, values = logprobs.get("tokens"), logprobs.get("token_logprobs")
    if not isinstance(tokens, list) or not isinstance(values, list) or not tokens:
        raise unsupported("returned no log-probs for the prompt tokens")
    top = logprobs.get("top_logprobs")
    if not isinstance(top, list) or len(top) != len(tokens) or len(values) != len(tokens):
        raise unsupported("returned prompt log-probs without the top alternative of every token")
    offsets = logprobs.get("text_offset")
    if not isinstance(offsets, list) or len(offsets) != len(tokens):
        offsets, position = [], 0  # rebuild them as OpenAI defines them: running lengths of the tokens
        for token in tokens:
            offsets.append(position)
            position += len(str(token))
    usage = Usage.from_json(body.get("usage"))
    count = len(tokens) - generated
    if usage is not None and 0 < usage.prompt_tokens <= len(tokens):
        count = usage.prompt_tokens
    if count < 1:
        raise unsupported("returned log-probs only for generated tokens, not for the prompt")
    return EchoLogprobs(
        tokens=[str(t) for t in tokens[:count]],
        logprobs=[None if v is None else float(v) for v in values[:count]],
        top=[
            {str(k): float(v) for k, v in t.items()} if isinstance(t, Mapping) else None for t in top[:count]
        ],
        offsets=[int(o) for o in offsets[:count]],
    )


def _sum(echo: EchoLogprobs, start: int, server: str) -> tuple[float, bool]:
    if start < 1 or echo.logprobs[start] is None:
        raise InvalidRequestError(
            "the continuation starts at the prompt's first token, which has no log-prob (nothing precedes "
            "it): give a non-empty context, or token ids that start with the bos token."
        )
    total = 0.0
    greedy = True
    for i in range(start, len(echo.tokens)):
        value, top = echo.logprobs[i], echo.top[i]
        if value is None or not top:
            raise RemoteUnsupportedError(
                f"{server} returned no log-prob or no top alternative for prompt token {i} "
                f"({echo.tokens[i]!r}). {_REQUIREMENT}.",
                server=server,
            )
        total += value
        greedy = greedy and value >= max(top.values()) - _GREEDY_TOLERANCE
    return total, greedy


def continuation_start(echo: EchoLogprobs, prompt: str, continuation: str) -> int:
    r"""Index of the first continuation token: the token holding the continuation's first character.

    Positions are counted back from the end of the prompt, so a bos token the server spells out
    (``<s>``) does not shift them. When the tokens' texts put together end with the prompt (OpenAI and
    lmstack serve spell a token holding part of a character as ``bytes:\x..``), the token texts
    locate the boundary exactly, in bytes. Otherwise (vLLM writes such tokens as U+FFFD) the tokens'
    ``text_offset`` locate it, which is exact unless the continuation itself holds such tokens.
    """
    pieces = [token_bytes(t) for t in echo.tokens]
    joined = b"".join(pieces)
    ends: list[int] = []
    if joined.endswith(prompt.encode()):
        for piece in pieces:
            ends.append((ends[-1] if ends else 0) + len(piece))
        boundary = len(joined) - len(continuation.encode())
    else:
        ends = [*echo.offsets[1:], echo.offsets[-1] + len(echo.tokens[-1])]
        boundary = ends[-1] - len(continuation)
    return next(i for i, end in enumerate(ends) if end > boundary)


def score_text_pair(echo: EchoLogprobs, prompt: str, continuation: str, server: str) -> tuple[float, bool]:
    """Scores the continuation at the end of an echoed text prompt (see :func:`continuation_start`).

    A token spanning the boundary belongs to the continuation.
    """
    return _sum(echo, continuation_start(echo, prompt, continuation), server)


def score_token_pair(echo: EchoLogprobs, continuation_len: int, server: str) -> tuple[float, bool]:
    """Scores the last ``continuation_len`` tokens of an echoed token-id prompt."""
    if len(echo.tokens) < continuation_len + 1:
        raise RemoteUnsupportedError(
            f"{server} echoed {len(echo.tokens)} prompt tokens for a prompt of at least "
            f"{continuation_len + 1}. "
            f"{_REQUIREMENT}.",
            server=server,
        )
    return _sum(echo, len(echo.tokens) - continuation_len, server)
