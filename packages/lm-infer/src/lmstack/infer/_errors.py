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

    Args:
        message: What is wrong, in terms of what the caller sent or what was computed from it.
        param: The request field at fault (``"prompt"``, ``"max_tokens"``, ``"stop[0]"``, ...), or
            None when no single field is; a server reports it as the error's ``param``.

    Attributes:
        param: The request field at fault, or None.
    """

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


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
    """The server refused a request as invalid (HTTP 400, 413 or 422); retrying it cannot help.

    Attributes:
        param: The request field the server named as at fault (its error's ``param``), or None.
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        server: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message, status_code=status_code, server=server)
        self.param = param


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
