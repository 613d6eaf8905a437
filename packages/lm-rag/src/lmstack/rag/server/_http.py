"""HTTP plumbing: errors in OpenAI's JSON shape, JSON bodies in and out, server-sent events.

Bodies are read and validated here rather than by FastAPI's signature parsing, so malformed JSON and schema
violations come back as the same ``{"error": {...}}`` shape as every other error.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError

from lmstack.rag._errors import (
    AnswerError,
    EmbeddingError,
    GateError,
    IndexLockedError,
    RAGConfigError,
    RAGError,
)

__all__ = ["APIError", "error_response", "from_exception", "json_response", "parse", "read_json", "sse"]

logger = logging.getLogger(__name__)

_M = TypeVar("_M", bound=BaseModel)

_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 409: "conflict_error"}


class APIError(RAGError):
    """A request the server answers with an HTTP error.

    Args:
        status: The HTTP status.
        message: What was wrong and what to do about it.
        param: The request field at fault, if one is.
        code: A short machine-readable code.
        type_: OpenAI's error type; by default derived from ``status``.
        headers: Extra response headers.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type_: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_ or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        """The JSON body: ``{"error": {"message", "type", "code", "param"}}``."""
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}


def _dumps(value: Any) -> str:
    # default=str: hit metadata may hold values JSON has no type for (a date read from a spreadsheet)
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)


def json_response(value: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    """A compact UTF-8 JSON response."""
    return Response(_dumps(value), status_code=status, headers=headers, media_type="application/json")


def error_response(error: APIError) -> Response:
    """The JSON response of an error."""
    return json_response(error.body(), error.status, error.headers)


def sse(data: Any, event: str | None = None) -> str:
    """One server-sent event carrying ``data`` as JSON, with an ``event:`` line when given."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {_dumps(data)}\n\n"


def from_exception(exc: BaseException) -> APIError:
    """The error to answer for an exception raised while serving a request (never with a traceback)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, RAGConfigError):
        return APIError(400, str(exc), param=exc.field)
    if isinstance(exc, IndexLockedError):
        return APIError(409, f"{exc}; try again when the other writer has finished", code="index_locked")
    if isinstance(exc, GateError):
        return APIError(400, str(exc), code="not_calibrated")
    if isinstance(exc, AnswerError | EmbeddingError):
        logger.error("model failure: %s", exc)
        return APIError(500, str(exc), code="model_failed")
    logger.error("request failed", exc_info=exc)
    return APIError(
        500, f"internal error ({type(exc).__name__}); the server log has the details", code="internal_error"
    )


async def read_json(request: Request) -> Any:
    """The request's body parsed as JSON.

    Raises:
        APIError: 400 when the body is not JSON.
    """
    body = await request.body()
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from exc


def _location(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def parse(schema: type[_M], data: Any) -> _M:
    """Validate ``data`` against ``schema``.

    Raises:
        APIError: 422 naming every field at fault and what was wrong with it.
    """
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        problems = [f"{_location(err['loc']) or 'body'}: {err['msg']}" for err in exc.errors()]
        first = _location(exc.errors()[0]["loc"]) or None if exc.errors() else None
        raise APIError(
            422, "invalid request: " + "; ".join(problems), param=first, code="invalid_body"
        ) from None
