"""Errors the server sends, in OpenAI's JSON shape: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

from typing import Any

from lmstack.infer._errors import InferError

__all__ = ["APIError", "error_body"]


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
