"""The FastAPI application: search, answers, ingestion, OpenAI embeddings and the chat-platform webhooks.

Index and model calls block, so handlers run them in worker threads; the event loop only moves bytes. The
index serialises its own writers and is safe to search from many threads.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmstack.rag import __version__
from lmstack.rag._errors import RAGConfigError, RAGError
from lmstack.rag._index import Index, Retrieval
from lmstack.rag.answer import Answer, AnswerEvent, Assistant
from lmstack.rag.server._auth import check_api_key, check_webhook_signature
from lmstack.rag.server._chat import ChatReply, ReplyCache, answer_message, reply_text
from lmstack.rag.server._config import RagServerConfig
from lmstack.rag.server._embeddings import EmbeddingService
from lmstack.rag.server._feishu import FeishuClient, FeishuMessage, read_event
from lmstack.rag.server._http import (
    APIError,
    error_response,
    from_exception,
    json_response,
    parse,
    read_json,
    sse,
)
from lmstack.rag.server._ingest import UPLOADS, allowed_paths, safe_name, save_upload
from lmstack.rag.server._schemas import (
    EmbeddingsRequest,
    IngestPathsRequest,
    QueryRequest,
    SearchRequest,
    WebhookMessage,
)

__all__ = ["create_app"]

logger = logging.getLogger(__name__)

_ROUTES = (
    "/health",
    "/search",
    "/query",
    "/ingest",
    "/v1/embeddings",
    "/v1/models",
    "/webhook",
    "/feishu/events",
)
_MAX_EVENT_BYTES = 1_000_000  # a chat message's body; uploads have their own limit
_DONE = "data: [DONE]\n\n"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class _EventStream(StreamingResponse):
    """Server-sent events that stop as soon as the client goes away, whatever ASGI version the server speaks.

    The producer is cancelled on disconnect, and the cancellation runs through the answer's generators down
    to the model's stream, which cancels the request.
    """

    def __init__(self, content: AsyncIterator[str]) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as group:

            async def produce() -> None:
                await self.stream_response(send)
                group.cancel_scope.cancel()

            group.start_soon(produce)
            await self.listen_for_disconnect(receive)
            group.cancel_scope.cancel()


async def _read_limited(request: Request, limit: int, what: str) -> bytes:
    """The body, refused with 413 once it passes ``limit`` bytes (declared or actually sent)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the {what} has {declared} bytes; the limit is {limit}", code="too_large")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the {what} is larger than {limit} bytes", code="too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _capped(receive: Receive, limit: int) -> Receive:
    """``receive`` failing with 413 once the body passes ``limit`` bytes (for streamed multipart parsing)."""
    seen = 0

    async def capped() -> Message:
        nonlocal seen
        message = await receive()
        seen += len(message.get("body", b""))
        if seen > limit:
            raise APIError(
                413, f"the upload is larger than {limit} bytes (--max-upload-bytes)", code="too_large"
            )
        return message

    return capped


async def _close(events: AsyncIterator[AnswerEvent]) -> None:
    """Close an answer's event generator (and with it the model's stream, which cancels the request)."""
    aclose = getattr(events, "aclose", None)
    if aclose is not None:
        await aclose()


def _event_data(event: AnswerEvent) -> dict[str, Any]:
    answer = event.answer
    if event.type == "passages":
        passages = answer.passages if answer is not None else []
        listed = [
            {"number": n, "source": h.source, "score": h.score, "text": h.text}
            for n, h in enumerate(passages, 1)
        ]
        return {"passages": listed, "relevance": answer.relevance if answer is not None else None}
    if event.type == "done":
        assert answer is not None
        return answer.to_dict()
    return {"text": event.text}


class _App:
    """The state the routes share: the index, the assistant, the caches and the HTTP client for replies."""

    def __init__(self, index: Index, assistant: Assistant | None, config: RagServerConfig) -> None:
        self.index = index
        self.assistant = assistant
        self.config = config
        self.embeddings = EmbeddingService(index.embedder, config.max_embedding_inputs)
        self.webhook_replies: ReplyCache[ChatReply] = ReplyCache()
        self.feishu_replies: ReplyCache[ChatReply] = ReplyCache()
        self.http: httpx.AsyncClient | None = None  # opened by the application's startup
        self.feishu: FeishuClient | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(15.0, connect=5.0))
        config = self.config
        if config.feishu_app_id and config.feishu_app_secret:
            self.feishu = FeishuClient(
                config.feishu_api_base, config.feishu_app_id, config.feishu_app_secret, self.http
            )

    def authorize(self, request: Request) -> None:
        check_api_key(request.headers.get("authorization"), self.config.api_keys)

    def need_assistant(self) -> Assistant:
        if self.assistant is None:
            raise APIError(
                400,
                "this server has no model to answer with: start it with --model PATH_OR_URL "
                "(a local model directory or an OpenAI-compatible server); /search works without one",
                code="no_model",
            )
        return self.assistant

    # -- /query -------------------------------------------------------------------------------------
    def assistant_for(self, request: QueryRequest) -> Assistant:
        assistant = self.need_assistant()
        if request.k is not None and request.k != assistant.k:
            assistant = copy.copy(assistant)  # shallow: shares the index and the model
            assistant.k = request.k
        return assistant

    async def answer(self, request: QueryRequest) -> Response:
        assistant = self.assistant_for(request)
        if not request.question.strip():
            raise APIError(422, "invalid request: question: must not be blank", param="question")
        history = [turn.model_dump() for turn in request.history]
        if not request.stream:
            result: Answer = await asyncio.to_thread(assistant.ask, request.question, history=history)
            return json_response(result.to_dict())
        events = assistant.stream(request.question, history=history)
        try:
            first = await anext(events)  # retrieval errors become an HTTP error, not a broken stream
        except BaseException:
            await _close(events)
            raise
        return _EventStream(self.event_stream(first, events))

    async def event_stream(
        self, first: AnswerEvent, events: AsyncIterator[AnswerEvent]
    ) -> AsyncIterator[str]:
        try:
            if first.type != "passages":  # a refusal: no passages were shown, say so first all the same
                yield sse(_event_data(AnswerEvent("passages", answer=first.answer)), "passages")
            yield sse(_event_data(first), first.type)
            async for event in events:
                yield sse(_event_data(event), event.type)
        except Exception as exc:  # the status line is sent: report the error as an event
            yield sse(from_exception(exc).body(), "error")
        finally:
            await _close(events)
        yield _DONE

    # -- /ingest ------------------------------------------------------------------------------------
    async def ingest(self, request: Request) -> Response:
        if not self.config.ingest_enabled:
            raise APIError(403, "ingestion is turned off on this server", code="ingest_disabled")
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "multipart/form-data":
            folder = await self.save_uploads(request)
            paths = [folder]
        elif kind in ("application/json", ""):
            body = parse(IngestPathsRequest, await read_json(request))
            paths = await asyncio.to_thread(allowed_paths, body.paths, self.config.ingest_roots)
        else:
            raise APIError(
                400,
                f"cannot ingest a {kind} body: upload files as multipart/form-data, or send JSON "
                '{"paths": [...]}',
                code="unsupported_media_type",
            )
        report = await asyncio.to_thread(
            self.index.ingest, paths, lock_timeout_s=self.config.ingest_lock_timeout_s, use_tqdm=False
        )
        return json_response(report.to_dict())

    async def save_uploads(self, request: Request) -> Path:
        limit = self.config.max_upload_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise APIError(
                413,
                f"the upload has {declared} bytes; the limit is {limit} (--max-upload-bytes)",
                code="too_large",
            )
        capped = Request(request.scope, _capped(request.receive, limit))
        folder = self.index.path / UPLOADS
        async with capped.form(max_files=1000, max_fields=100) as form:
            uploads = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
            if not uploads:
                raise APIError(
                    400,
                    "no files in the upload: send them as multipart/form-data file parts",
                    param="files",
                    code="no_files",
                )
            names = [safe_name(upload.filename) for upload in uploads]
            twice = {name for name in names if names.count(name) > 1}
            if twice:
                raise APIError(
                    400,
                    f"two uploads are named {sorted(twice)[0]}: give each file its own name",
                    param="files",
                    code="duplicate_filename",
                )
            for upload, name in zip(uploads, names, strict=True):
                await asyncio.to_thread(save_upload, upload.file, folder, name, limit)
        logger.info("saved %d upload(s) to %s", len(uploads), folder)
        return folder

    # -- chat platforms -----------------------------------------------------------------------------
    async def webhook(self, request: Request) -> Response:
        secret = self.config.webhook_secret
        if secret is None:
            raise APIError(
                404, "the generic webhook is off: start the server with --webhook-secret", code="off"
            )
        body = await _read_limited(request, _MAX_EVENT_BYTES, "webhook body")
        headers = request.headers
        check_webhook_signature(
            secret, headers.get("x-lmstack-timestamp"), headers.get("x-lmstack-signature"), body
        )
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise APIError(400, f"the webhook body is not valid JSON: {exc}", code="invalid_json") from None
        message = parse(WebhookMessage, data)
        assistant = self.need_assistant()
        key = None if message.message_id is None else f"{message.chat_id or ''}\x00{message.message_id}"
        reply, _ = await self.webhook_replies.run(
            key,
            lambda: answer_message(
                assistant,
                message.text,
                group=message.chat_type == "group",
                silent=self.config.group_chat_silent,
            ),
        )
        return json_response(reply.to_dict())

    async def feishu_event(self, request: Request) -> Response:
        if not self.config.feishu_enabled:
            raise APIError(
                404,
                "the Feishu route is off: start the server with --feishu-verification-token "
                "(and --feishu-encrypt-key when the app encrypts events)",
                code="off",
            )
        body = await _read_limited(request, _MAX_EVENT_BYTES, "Feishu event")
        event = read_event(self.config, request.headers, body)
        if isinstance(event, dict):
            return json_response(event)
        if event is not None and not self.feishu_replies.seen(event.event_id):
            task = asyncio.create_task(self.answer_feishu(event))  # Feishu wants the 200 within 3 s
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        return json_response({})

    async def answer_feishu(self, message: FeishuMessage) -> None:
        try:
            assistant = self.need_assistant()
            reply, repeated = await self.feishu_replies.run(
                message.event_id,
                lambda: answer_message(
                    assistant,
                    message.text,
                    group=message.chat_type != "p2p",
                    silent=self.config.group_chat_silent,
                ),
            )
            if repeated or reply.reply is None:
                return
            if self.feishu is None:
                logger.warning(
                    "cannot post the Feishu reply: start the server with --feishu-app-id and "
                    "--feishu-app-secret"
                )
                return
            await self.feishu.reply(message.message_id, reply_text(reply))
        except Exception:  # a background task: nobody else would see it
            logger.exception("answering Feishu message %s failed", message.message_id)

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.http is not None:
            await self.http.aclose()
        self.http = self.feishu = None


def _search_response(retrieval: Retrieval) -> dict[str, Any]:
    hits = [
        {"text": h.text, "source": h.source, "score": h.score, "metadata": dict(h.metadata)}
        for h in retrieval.hits
    ]
    return {"hits": hits, "relevant": retrieval.relevant, "probability": retrieval.probability}


def _health(index: Index) -> dict[str, Any]:
    chunks = len(index)  # refreshes the store: the counts below are of the same generation
    return {
        "status": "ok",
        "documents": len(index.documents()),
        "chunks": chunks,
        "generation": index.store.generation,
        "calibrated": index.calibration is not None,
    }


def create_app(
    index: Index, assistant: Assistant | None = None, config: RagServerConfig | None = None
) -> FastAPI:
    """Build the ASGI application that serves ``index``.

    Endpoints: ``GET /health``; ``POST /search``; ``POST /query`` (JSON, or server-sent events with
    ``"stream": true``); ``POST /ingest`` (multipart uploads, or JSON ``{"paths": [...]}`` under the ingest
    roots); OpenAI's ``POST /v1/embeddings`` and ``GET /v1/models`` for the index's embedder;
    ``POST /webhook`` (a generic, HMAC-signed group-chat webhook) and ``POST /feishu/events`` (Feishu/Lark
    event callbacks).
    Errors come back as ``{"error": {"message", "type", "code", "param"}}``.

    Args:
        index: The index to search and ingest into.
        assistant: What answers ``/query`` and chat messages; None: search, ingestion and embeddings only.
        config: Keys, secrets and limits (default: no auth, chat routes off).

    Returns:
        The application; run it with any ASGI server (:func:`lmstack.rag.server.serve` uses uvicorn).

    Raises:
        RAGConfigError: A chat route is configured but there is no assistant to answer with.
    """
    config = config or RagServerConfig()
    if assistant is None and (config.webhook_secret or config.feishu_enabled):
        raise RAGConfigError(
            "the chat webhooks answer with a model: give an assistant (--model), or drop the webhook secrets",
            field="webhook_secret" if config.webhook_secret else "feishu_verification_token",
        )
    state = _App(index, assistant, config)
    if config.feishu_enabled and not config.feishu_can_reply:
        logger.warning(
            "Feishu events are on but replies cannot be posted without --feishu-app-id/--feishu-app-secret"
        )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.start()
        try:
            yield
        finally:
            await state.close()

    app = FastAPI(
        title="lmstack-rag",
        version=__version__,
        lifespan=lifespan,
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.lmstack_rag = state

    @app.exception_handler(RAGError)
    async def on_rag_error(request: Request, exc: RAGError) -> Response:
        return error_response(from_exception(exc))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            message = (
                f"no such endpoint: {request.method} {request.url.path}; this server has {', '.join(_ROUTES)}"
            )
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        return error_response(APIError(exc.status_code, message, headers=exc.headers))

    @app.exception_handler(Exception)
    async def on_error(request: Request, exc: Exception) -> Response:
        return error_response(from_exception(exc))

    @app.get("/health")
    async def health() -> Response:
        return json_response(await asyncio.to_thread(_health, index))

    @app.post("/search")
    async def search(request: Request) -> Response:
        state.authorize(request)
        body = parse(SearchRequest, await read_json(request))
        retrieval = await asyncio.to_thread(
            index.retrieve,
            body.query,
            body.k,
            mode=body.mode,
            filters=body.filters,
            rerank=body.rerank,
            diversity=body.diversity,
        )
        return json_response(_search_response(retrieval))

    @app.post("/query")
    async def query(request: Request) -> Response:
        state.authorize(request)
        return await state.answer(parse(QueryRequest, await read_json(request)))

    @app.post("/ingest")
    async def ingest(request: Request) -> Response:
        state.authorize(request)
        return await state.ingest(request)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        state.authorize(request)
        return json_response(state.embeddings.models())

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        state.authorize(request)
        body = parse(EmbeddingsRequest, await read_json(request))
        texts = state.embeddings.texts(body)
        return json_response(await asyncio.to_thread(state.embeddings.embed, body, texts))

    @app.post("/webhook")
    async def webhook(request: Request) -> Response:
        return await state.webhook(request)

    @app.post("/feishu/events")
    async def feishu_events(request: Request) -> Response:
        return await state.feishu_event(request)

    return app
