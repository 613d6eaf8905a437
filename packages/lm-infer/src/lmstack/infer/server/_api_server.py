"""The FastAPI application: OpenAI's completions, chat completions and models endpoints over an LLM.

Request handlers run on the server's event loop and drive the model through :meth:`LLM.stream`, whose
background thread runs the engine; every request, streaming or not, is one or more engine streams, so
they all share one continuous batch.
"""

from __future__ import annotations

import functools
import gc
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmstack.infer._llm import LLM
from lmstack.infer.server._config import ServerConfig
from lmstack.infer.server._errors import APIError, error_body, from_exception
from lmstack.infer.server._http import (
    ROUTES,
    EventStream,
    Middleware,
    error_response,
    json_response,
    read_model,
    unless_disconnected,
)
from lmstack.infer.server._metrics import CONTENT_TYPE
from lmstack.infer.server._protocol import ChatCompletionRequest, CompletionRequest
from lmstack.infer.server._serving import Job, event_stream, first_unsupported
from lmstack.infer.server._serving_chat import chat, chat_stream, prepare_chat
from lmstack.infer.server._serving_completion import complete, complete_stream, prepare_completion
from lmstack.infer.server._state import ServerState, Ticket

__all__ = ["create_app"]

_J = TypeVar("_J", bound=Job)
_R = TypeVar("_R", CompletionRequest, ChatCompletionRequest)


async def _serve_job(
    state: ServerState,
    request: Request,
    endpoint: str,
    id_prefix: str,
    stream: bool,
    prepare: Callable[[], Awaitable[_J]],
    respond: Callable[[ServerState, _J, Ticket, int, str], Awaitable[Response]],
    events: Callable[[ServerState, _J, Ticket, int, str], AsyncGenerator[str, None]],
) -> Response:
    """Admit a generation request, prepare it, and answer it whole or as a stream of events."""
    ticket = state.admit(endpoint)
    job: _J | None = None
    handed_off = False
    try:
        job = await prepare()
        created, rid = int(time.time()), f"{id_prefix}-{uuid.uuid4().hex}"
        if stream:
            handed_off = True  # the response aborts the job and releases the ticket, however it ends
            opened = job

            def on_close() -> None:
                opened.cancel()
                ticket.release()

            content = event_stream(state, job, ticket, events(state, job, ticket, created, rid))
            return EventStream(content, on_close=on_close)
        return await unless_disconnected(request, respond(state, job, ticket, created, rid))
    except APIError:
        raise
    except Exception as exc:  # answered here: FastAPI's catch-all handler would log a traceback for a 400
        return error_response(from_exception(exc, closed=state.closed))
    finally:
        if not handed_off:
            if job is not None:
                await job.aclose()
            ticket.release()


def create_app(llm: LLM, config: ServerConfig | None = None, *, close_llm: bool = True) -> FastAPI:
    """Build the OpenAI-compatible ASGI application serving ``llm``.

    Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``,
    ``GET /health`` and ``GET /metrics``. Run it with any ASGI server (:func:`serve` uses uvicorn).
    On lifespan shutdown, new requests are refused with 503, in-flight ones get up to
    ``config.shutdown_timeout`` seconds to finish, and then the LLM is closed (which ends whatever
    is left with an error).

    Args:
        llm: The model to serve (its background thread runs the engine).
        config: Model name, API keys and limits (default: ``ServerConfig()``).
        close_llm: Close ``llm`` when the application shuts down.

    Returns:
        The FastAPI application; its shared state is ``app.state.lmstack``.
    """
    config = config or ServerConfig()
    state = ServerState(llm, config, close_llm)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # What exists at startup (the model, the libraries) lives as long as the server: kept out of
        # the collector's sight, so a full collection (which stops every thread, the engine's and
        # the event loop's) scans only what requests made. Full collections over the loaded heap
        # took 0.2-0.7 s here, stalling every stream as long.
        gc.collect()
        gc.freeze()
        yield
        await state.shutdown(config.shutdown_timeout)

    from lmstack.infer import __version__

    app = FastAPI(title="lmstack-infer", version=__version__, lifespan=lifespan, openapi_url=None,
                  docs_url=None, redoc_url=None)  # fmt: skip
    app.state.lmstack = state
    app.add_middleware(Middleware, state=state)

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError) -> Response:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            message = (f"no such endpoint: {request.method} {request.url.path}; this server has "
                       f"{', '.join(ROUTES)}.")  # fmt: skip
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}."
        else:
            message = str(exc.detail)
        body = error_body(message, "invalid_request_error", code=str(exc.status_code))
        return json_response(body, exc.status_code, exc.headers)

    @app.exception_handler(Exception)
    async def on_error(request: Request, exc: Exception) -> Response:
        return error_response(from_exception(exc, closed=state.closed))

    def model_card() -> dict[str, Any]:
        return {"id": config.model_name, "object": "model", "created": state.created, "owned_by": "lmstack",
                "max_model_len": llm.max_model_len}  # fmt: skip

    def check_model(name: str) -> None:
        if name != config.model_name:
            raise APIError(
                404,
                f"the model '{name}' does not exist: this server serves '{config.model_name}' "
                "(GET /v1/models lists it).",
                param="model",
                code="model_not_found",
            )

    @app.get("/health")
    async def health() -> Response:
        if state.draining:
            return json_response({"status": "shutting down"}, 503)
        group = state.llm.engine.tensor_parallel
        if group is not None and group.failure is not None:  # a tensor-parallel worker is gone: restart
            return json_response({"status": "unhealthy", "detail": group.failure}, 503)
        return json_response({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(state.gauges()), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> Response:
        return json_response({"object": "list", "data": [model_card()]})

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> Response:
        check_model(name)
        return json_response(model_card())

    async def generation(
        request: Request,
        schema: type[_R],
        endpoint: str,
        id_prefix: str,
        prepare: Callable[[ServerState, _R], Awaitable[_J]],
        respond: Callable[[ServerState, _J, Ticket, int, str], Awaitable[Response]],
        events: Callable[[ServerState, _J, Ticket, int, str], AsyncGenerator[str, None]],
    ) -> Response:
        """Read and check a generation request's body, then serve it (whole, or as events)."""
        parsed = await read_model(request, schema, state.config.max_body_bytes)
        check_model(parsed.model)
        first_unsupported(parsed)
        job = functools.partial(prepare, state, parsed)
        return await _serve_job(state, request, endpoint, id_prefix, parsed.stream, job, respond, events)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generation(request, CompletionRequest, "/v1/completions", "cmpl", prepare_completion,
                                complete, complete_stream)  # fmt: skip

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generation(request, ChatCompletionRequest, "/v1/chat/completions", "chatcmpl",
                                prepare_chat, chat, chat_stream)  # fmt: skip

    return app
