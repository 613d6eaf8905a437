"""HTTP plumbing: JSON bodies in and out, the API-key and metrics middleware, event streams, disconnects.

Bodies are read and validated here (not by FastAPI), so every error, malformed JSON included, comes
back in OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping
from typing import Any, TypeVar

import anyio
from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from lmstack.infer.server._errors import APIError, error_body
from lmstack.infer.server._json_worker import JSONWorker
from lmstack.infer.server._protocol import short_repr
from lmstack.infer.server._state import ServerState

__all__ = [
    "CLIENT_CLOSED",
    "DONE",
    "ROUTES",
    "EventStream",
    "Middleware",
    "error_response",
    "json_response",
    "parse",
    "read_json",
    "read_model",
    "sse",
    "unless_disconnected",
]

_T = TypeVar("_T")
_M = TypeVar("_M", bound=BaseModel)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

ROUTES = ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions")
# HTTP status for a request whose client went away before the answer (nginx's convention).
CLIENT_CLOSED = 499
DONE = "data: [DONE]\n\n"


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def json_response(value: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    """A JSON response (compact, UTF-8)."""
    return Response(_dumps(value), status_code=status, headers=headers, media_type="application/json")


def error_response(error: APIError) -> Response:
    """The JSON response of an error."""
    return json_response(error.body(), error.status, error.headers)


def sse(value: Any) -> str:
    """One server-sent event carrying ``value`` as JSON."""
    return f"data: {_dumps(value)}\n\n"


# -- request bodies -----------------------------------------------------------------------------------


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body has {declared} bytes; the limit is {limit}.",
                       code="request_too_large")  # fmt: skip
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(
                    413, f"the request body is over the limit of {limit} bytes.", code="request_too_large"
                )
            chunks.append(chunk)
    except ClientDisconnect:
        raise APIError(CLIENT_CLOSED, "the client closed the request while sending it.") from None
    return b"".join(chunks)


def _invalid_json(message: str) -> APIError:
    return APIError.invalid(message, code="invalid_json")


# A body larger than this is decoded in a child process (_json_worker: json.loads holds the GIL for its
# whole C call, 30-45 ms on 2 MiB of token ids, stalling the loop and the engine thread alike) and
# validated in a worker thread (pydantic lets the GIL go between items).
_OFF_LOOP_BYTES = 256 * 1024
_JSON_WORKER = JSONWorker()
atexit.register(_JSON_WORKER.close)


async def _load_large(raw: bytes) -> dict[str, Any]:
    value = await asyncio.to_thread(_JSON_WORKER.loads, raw)
    if value is None:  # not valid JSON, or not simple enough for the child: decode (and word the error) here
        value = await asyncio.to_thread(_load_json, raw)
    return value


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The request body as a JSON object, or a 400/413 saying what is wrong with it."""
    raw = await _read_body(request, limit)
    if len(raw) > _OFF_LOOP_BYTES:
        return await _load_large(raw)
    return _load_json(raw)


async def read_model(request: Request, model: type[_M], limit: int) -> _M:
    """The request body validated against ``model`` (see :func:`read_json` and :func:`parse`)."""
    raw = await _read_body(request, limit)
    if len(raw) > _OFF_LOOP_BYTES:
        body = await _load_large(raw)
        return await asyncio.to_thread(parse, model, body)
    return parse(model, _load_json(raw))


def _load_json(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        raise _invalid_json("the request body is empty; send a JSON object.")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _invalid_json(
            f"the request body is not valid UTF-8 (bad byte at offset {exc.start}); encode JSON as UTF-8."
        ) from None
    try:
        value = json.loads(text)
        # "\ud800" is valid JSON but no text: it would fail deep in the tokenizer.
        if "\\u" in text:
            _dumps(value).encode("utf-8")
    except json.JSONDecodeError as exc:
        raise _invalid_json(
            f"the request body is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}."
        ) from None
    except RecursionError:  # the decoder recurses once per level of nesting
        raise _invalid_json("the request body is nested too deeply; no API field nests that far.") from None
    except UnicodeEncodeError:
        raise _invalid_json("the request holds an unpaired UTF-16 surrogate escape (\\ud800 to \\udfff); "
                            "send valid Unicode text.") from None  # fmt: skip
    if not isinstance(value, dict):
        raise _invalid_json(f"the request body must be a JSON object, got a JSON {type(value).__name__}.")
    return value


def parse(model: type[_M], body: dict[str, Any]) -> _M:
    """Validate a body against a request model; the first problem becomes a 400 naming the field."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in error["loc"]) or None
        if error["type"] == "extra_forbidden":
            message = (
                f"unknown field '{where}': the server accepts OpenAI's fields and vLLM's sampling "
                "extensions (see the lmstack-infer README); remove it."
            )
            raise APIError.invalid(message, param=where, code="unknown_field") from None
        if error["type"] == "missing":
            raise APIError.invalid(f"missing required field '{where}'.", param=where) from None
        message = str(error["msg"]).removeprefix("Value error, ")
        if error["type"] != "value_error":
            message += f", got {short_repr(error.get('input'))}"
        raise APIError.invalid(f"invalid '{where}': {message}.", param=where) from None


# -- middleware ---------------------------------------------------------------------------------------


def _endpoint(path: str) -> str:
    """The metrics label of a path: a known route, or "other" (keeps label values bounded)."""
    if path in ROUTES:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return "other"


class Middleware:
    """Checks API keys on ``/v1/*`` and counts every request by endpoint, status and latency.

    Args:
        app: The application it wraps.
        state: The application's shared state.
    """

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        start = time.perf_counter()
        status = 500  # if the app fails before answering, the error handler outside us sends a 500

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            error = self.state.check_key(scope["headers"]) if path.startswith("/v1/") else None
            if error is not None:
                await error_response(error)(scope, receive, counting_send)
            else:
                await self.app(scope, receive, counting_send)
        finally:
            self.state.metrics.count_request(_endpoint(path), status, time.perf_counter() - start)


# -- responses that end early -------------------------------------------------------------------------


class EventStream(StreamingResponse):
    """A server-sent-events response that stops (closing its generator) as soon as the client leaves.

    The generator is always closed before the response returns, also when the client disconnects
    or the server cancels the response, so the engine requests behind it are aborted at once.

    Args:
        content: The events.
        on_close: Called once the response is over, however it ends (also when the generator never
            started, so its own cleanup never ran).
    """

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:  # type: ignore[override]
        body = self.body_iterator
        try:
            async with anyio.create_task_group() as group:

                async def stream() -> None:
                    with contextlib.suppress(OSError):  # the client went away while we wrote
                        await self.stream_response(send)
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                while (await receive())["type"] != "http.disconnect":
                    pass
                group.cancel_scope.cancel()
        finally:
            aclose = getattr(body, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()
            self._on_close()


async def unless_disconnected(request: Request, work: Awaitable[_T]) -> _T | Response:
    """Run ``work``; if the client disconnects first, cancel it (aborting its engine requests)."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return await task
    except asyncio.CancelledError:
        if not watcher.done() or watcher.cancelled():
            raise  # cancelled from outside, not by a disconnect
        return json_response(error_body("the client closed the request", "invalid_request_error"),
                             CLIENT_CLOSED)  # fmt: skip
    finally:
        watcher.cancel()
