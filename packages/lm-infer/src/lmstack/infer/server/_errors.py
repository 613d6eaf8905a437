"""Errors the server sends, in OpenAI's JSON shape: ``{"error": {"message", "type", "param", "code"}}``.

Besides :class:`APIError` itself, this module maps what the model raises to the answer a client
gets: the engine's :class:`~lmstack.infer.InvalidRequestError` is a 400 naming its ``param``, a
failure while the server shuts down a 503 to retry elsewhere, anything else a 500 (and a traceback
in the log, since it is a bug).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from lmstack.infer._errors import InferError, InvalidRequestError

__all__ = ["APIError", "error_body", "from_exception", "request_failed"]

logger = logging.getLogger(__name__)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """The JSON body of an error response, as OpenAI's API writes it."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class APIError(InferError):
    """A request the server answers with an HTTP error (status, OpenAI error type, param and code).

    Args:
        status: The HTTP status.
        message: What was wrong and what to do about it.
        type_: OpenAI's error type (``invalid_request_error``, ``rate_limit_error``, ``server_error``).
        param: The request field at fault, if one is.
        code: A short machine-readable code (``model_not_found``, ``context_length_exceeded`` ...).
        headers: Extra response headers (``Retry-After``).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON body of this error."""
        return error_body(self.message, self.type, self.param, self.code)

    @classmethod
    def invalid(cls, message: str, param: str | None = None, code: str | None = None) -> APIError:
        """A 400 invalid request."""
        return cls(400, message, param=param, code=code)


def _shutting_down(message: str) -> APIError:
    return APIError(503, message, type_="server_error", code="shutting_down")


def from_exception(
    exc: BaseException,
    *,
    closed: bool,
    renames: Mapping[str, str] | None = None,
    codes: Mapping[str, str] | None = None,
) -> APIError:
    """The error to answer for an exception raised while serving a request.

    Args:
        exc: What was raised.
        closed: Whether the server has closed its LLM (shutting down).
        renames: Request fields under another name on this endpoint (chat's ``messages`` is what
            the engine calls the ``prompt``), by the engine's name.
        codes: The error ``code`` of an invalid request, by the engine's name of the field at fault.
    """
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, InvalidRequestError):
        param = getattr(exc, "param", None)
        base = None if param is None else param.split("[")[0]
        code = None if base is None or codes is None else codes.get(base)
        if param is not None and renames:
            param = renames.get(base or param, param)
        return APIError.invalid(str(exc), param=param, code=code)
    if isinstance(exc, InferError) and closed:
        return _shutting_down("the server is shutting down; retry against another instance.")
    logger.error("request failed", exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", type_="server_error",
                    code="internal_error")  # fmt: skip


def request_failed(error: str, *, closed: bool) -> APIError:
    """The error to report for an engine request that ended with ``error`` (``RequestOutput.error``)."""
    if closed:
        return _shutting_down("the server shut down before this request finished; retry it.")
    return APIError(500, f"generation failed: {error}", type_="server_error", code="generation_failed")
