"""Errors raised by lmstack-infer; all derive from :class:`lmstack.core.LMStackError`."""

from __future__ import annotations

from lmstack.core import LMStackError

__all__ = [
    "InferError",
    "InvalidRequestError",
    "RemoteConnectionError",
    "RemoteError",
    "RemoteInvalidRequestError",
    "RemoteTimeoutError",
    "RemoteUnsupportedError",
    "TokenizerUnavailableError",
]


class InferError(LMStackError):
    """Base class of lmstack-infer's errors."""


class InvalidRequestError(InferError, ValueError):
    """One request is invalid (bad sampling parameters, empty or too long prompt, unknown stop ids).

    Only that request fails; the engine keeps serving the others.
    """


class RemoteError(InferError):
    """A server behind :class:`~lmstack.infer.RemoteLLM` failed a request, or could not be used.

    Attributes:
        status_code: The HTTP status the server answered with (None when no response came back).
        server: The base URL of the server.
    """

    def __init__(self, message: str, *, status_code: int | None = None, server: str | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.server = server


class RemoteInvalidRequestError(RemoteError, InvalidRequestError):
    """The server refused a request as invalid (HTTP 400, 413 or 422); retrying it cannot help."""


class RemoteConnectionError(RemoteError):
    """The server could not be reached, or the connection broke, even after the retries."""


class RemoteTimeoutError(RemoteConnectionError):
    """The server did not answer within the timeout, even after the retries."""


class RemoteUnsupportedError(RemoteError):
    """The server does not support what the call needs (such as prompt log-probs for scoring)."""


class TokenizerUnavailableError(InferError, AttributeError):
    """The LLM has no tokenizer to give (a :class:`~lmstack.infer.RemoteLLM` created without ``tokenizer=``).

    It is also an ``AttributeError``, so ``getattr(llm, "tokenizer", None)`` returns None.
    """
