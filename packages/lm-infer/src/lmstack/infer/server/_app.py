"""The FastAPI application: OpenAI's completions, chat completions and models endpoints over an LLM.

Request handlers run on the server's event loop and drive the model through :meth:`LLM.stream`, whose
background thread runs the engine; every request, streaming or not, is one or more engine streams, so
they all share one continuous batch. Bodies are parsed and validated here (not by FastAPI) so every
error, malformed JSON included, comes back in OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Mapping,
    MutableMapping,
    Sequence,
)
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from lmstack.core import LMStackError
from lmstack.infer._errors import InferError, InvalidRequestError
from lmstack.infer._llm import LLM
from lmstack.infer._outputs import RequestOutput
from lmstack.infer._sampling_params import SamplingParams
from lmstack.infer.server._config import ServerConfig
from lmstack.infer.server._errors import APIError, error_body
from lmstack.infer.server._logprobs import TextOffsets, TokenTexts, chat_logprobs, completion_logprobs
from lmstack.infer.server._metrics import CONTENT_TYPE, Metrics
from lmstack.infer.server._protocol import (
    ChatCompletionRequest,
    CompletionChoice,
    CompletionRequest,
    Usage,
    unsupported_fields,
)

__all__ = ["create_app"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
_M = TypeVar("_M", bound=BaseModel)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_ROUTES = ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions")
_PARAM = re.compile(r"[a-z_]+(\[\d+\])?")
# HTTP status for a request whose client went away before the answer (nginx's convention).
_CLIENT_CLOSED = 499


# -- shared state -------------------------------------------------------------------------------------


@dataclass
class _Ticket:
    """One admitted request: holds its place in the in-flight count until released."""

    state: _State
    endpoint: str
    start: float = field(default_factory=time.perf_counter)
    first_token: bool = False
    released: bool = False

    def tokens(self, count: int) -> None:
        """Account ``count`` generated tokens (and the time to the first one)."""
        if count and not self.first_token:
            self.first_token = True
            self.state.metrics.observe_ttft(self.endpoint, time.perf_counter() - self.start)
        self.state.metrics.generation_tokens += count

    def release(self) -> None:
        """Free the request's place (idempotent)."""
        if not self.released:
            self.released = True
            self.state.in_flight -= 1


class _State:
    """What the handlers share: the model, the settings, the metrics and the admission count."""

    def __init__(self, llm: LLM, config: ServerConfig, close_llm: bool) -> None:
        self.llm = llm
        self.config = config
        self.close_llm = close_llm
        self.metrics = Metrics()
        self.texts = TokenTexts(llm.tokenizer)
        self.created = int(time.time())
        self.in_flight = 0
        self.draining = False  # no new requests: the server is shutting down
        self.closed = False  # the LLM is closed: what is still running ends with an error
        self._keys = [key.encode() for key in config.api_keys]

    def admit(self, endpoint: str) -> _Ticket:
        """Take a place for a new generation request, or refuse it (503 draining, 429 full)."""
        if self.draining:
            raise APIError(
                503,
                "the server is shutting down and takes no new requests; retry against another instance.",
                type_="server_error",
                code="shutting_down",
            )
        limit = self.config.max_queue
        if self.in_flight >= limit:
            raise APIError(
                429,
                f"the server already has {limit} requests in flight (its --max-queue limit); "
                "retry after a short wait.",
                type_="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": "1"},
            )
        self.in_flight += 1
        return _Ticket(self, endpoint)

    def check_key(self, headers: Sequence[tuple[bytes, bytes]]) -> APIError | None:
        """None if the request carries an accepted API key (or none is needed), else the 401 to send."""
        if not self._keys:
            return None
        value = next((v for k, v in headers if k.lower() == b"authorization"), None)
        if value is None:
            return APIError(
                401,
                "missing API key: send it as the header 'Authorization: Bearer YOUR_KEY'.",
                code="invalid_api_key",
            )
        scheme, _, key = value.partition(b" ")
        # Compare with every key, without stopping early, so the timing says nothing about them.
        matches = [hmac.compare_digest(key.strip(), accepted) for accepted in self._keys]
        if scheme.lower() != b"bearer" or not any(matches):
            return APIError(401, "invalid API key: check the key this server was started with.",
                            code="invalid_api_key")  # fmt: skip
        return None

    async def shutdown(self, timeout: float) -> None:
        """Stop admitting, let in-flight requests finish for up to ``timeout`` s, then close the LLM."""
        self.draining = True
        deadline = time.monotonic() + timeout
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.closed or not self.close_llm:
            return
        if self.in_flight:
            logger.warning("%d request(s) still running after %.0f s; ending them", self.in_flight, timeout)
        self.closed = True
        # Closing aborts every engine request with an error; their handlers then answer and release.
        await asyncio.to_thread(self.llm.close)
        deadline = time.monotonic() + 5.0
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    def gauges(self) -> list[tuple[str, str, float]]:
        """The live gauges of ``/metrics`` (read without the LLM's lock: a snapshot, never blocking)."""
        engine = self.llm.engine
        total = engine.num_blocks
        scheduler = engine.scheduler
        return [
            ("lmstack_requests_in_flight", "Generation requests admitted, not yet answered.", self.in_flight),
            ("lmstack_max_queue", "Most generation requests in flight (--max-queue).", self.config.max_queue),
            ("lmstack_seqs_waiting", "Sequences waiting in the engine's queue.", scheduler.num_waiting),
            ("lmstack_seqs_running", "Sequences running (holding KV blocks).", scheduler.num_running),
            ("lmstack_kv_blocks_total", "KV-cache blocks.", total),
            ("lmstack_kv_blocks_used", "KV-cache blocks held by sequences.", total - engine.num_free_blocks),
        ]  # fmt: skip


# -- plumbing -----------------------------------------------------------------------------------------


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _json(value: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(_dumps(value), status_code=status, headers=headers, media_type="application/json")


def _error_response(error: APIError) -> Response:
    return _json(error.body(), error.status, error.headers)


def _endpoint(path: str) -> str:
    """The metrics label of a path: a known route, or "other" (keeps label values bounded)."""
    if path in _ROUTES:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return "other"


class _Middleware:
    """Checks API keys on ``/v1/*`` and counts every request by endpoint, status and latency."""

    def __init__(self, app: ASGIApp, state: _State) -> None:
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
                await _error_response(error)(scope, receive, counting_send)
            else:
                await self.app(scope, receive, counting_send)
        finally:
            self.state.metrics.count_request(_endpoint(path), status, time.perf_counter() - start)


class _EventStream(StreamingResponse):
    """A server-sent-events response that stops (closing its generator) as soon as the client leaves.

    The generator is always closed before the response returns, also when the client disconnects
    or the server cancels the response, so the engine requests behind it are aborted at once.
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
            self._on_close()  # also when the generator never started (its own finally never ran)


async def _read_json(request: Request, limit: int) -> dict[str, Any]:
    """The request body as a JSON object, or a 400/413 saying what is wrong with it."""
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
        raise APIError(_CLIENT_CLOSED, "the client closed the request while sending it.") from None
    raw = b"".join(chunks)
    if not raw.strip():
        raise APIError.invalid("the request body is empty; send a JSON object.", code="invalid_json")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise APIError.invalid(
            f"the request body is not valid UTF-8 (bad byte at offset {exc.start}); encode JSON as UTF-8.",
            code="invalid_json",
        ) from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise APIError.invalid(
            f"the request body is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}.",
            code="invalid_json",
        ) from None
    if not isinstance(value, dict):
        raise APIError.invalid(f"the request body must be a JSON object, got a JSON {type(value).__name__}.",
                               code="invalid_json")  # fmt: skip
    try:  # "\ud800" is valid JSON but no text: it would fail deep in the tokenizer
        if "\\u" in text:
            _dumps(value).encode("utf-8")
    except UnicodeEncodeError:
        raise APIError.invalid("the request holds an unpaired UTF-16 surrogate escape (\\ud800 to \\udfff); "
                               "send valid Unicode text.", code="invalid_json") from None  # fmt: skip
    return value


def _parse(model: type[_M], body: dict[str, Any]) -> _M:
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
            shown = repr(error.get("input"))
            message += f", got {shown if len(shown) <= 60 else shown[:57] + '...'}"
        raise APIError.invalid(f"invalid '{where}': {message}.", param=where) from None


def _sampling(
    state: _State,
    request: CompletionRequest | ChatCompletionRequest,
    max_tokens: int | None,
    logprobs: int | None,
    renames: Mapping[str, str] | None = None,
) -> SamplingParams:
    """The request's ``SamplingParams`` (which validate every range: a failure is a 400)."""
    options: dict[str, Any] = {
        "n": request.n,
        "max_tokens": max_tokens,
        "min_tokens": request.min_tokens,
        "seed": request.seed,
        "stop": request.stop,
        "stop_token_ids": request.stop_token_ids,
        "ignore_eos": request.ignore_eos,
        "logprobs": logprobs,
        "skip_special_tokens": request.skip_special_tokens,
        "include_stop_str_in_output": request.include_stop_str_in_output,
    }
    for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty"):  # fmt: skip
        value = getattr(request, name)
        if value is not None:  # null means the default, as in OpenAI's API
            options[name] = value
    try:
        params = SamplingParams(**options)
        params.validate_for_vocab(state.llm.engine.vocab_size)
    except InvalidRequestError as exc:
        # SamplingParams' messages start with the field name: report it as the param.
        head = str(exc).split(" ", 1)[0]
        param = head if _PARAM.fullmatch(head) else None
        if param is not None and renames:
            param = renames.get(param.split("[")[0], param)
        raise APIError.invalid(str(exc), param=param) from None
    return params


def _check_length(state: _State, num_prompt: int, max_tokens: int, param: str, which: str = "") -> None:
    """A 400 when the prompt plus ``max_tokens`` exceeds the context or could never fit the KV cache."""
    limit = state.llm.max_model_len
    if num_prompt + max_tokens > limit or (max_tokens > 0 and num_prompt >= limit):
        raise APIError.invalid(
            f"this model's maximum context length is {limit} tokens, but the prompt{which} has {num_prompt} "
            f"tokens and max_tokens asks for {max_tokens} more ({num_prompt + max_tokens} in all); "
            "shorten the prompt or lower max_tokens.",
            param=param,
            code="context_length_exceeded",
        )
    engine = state.llm.engine
    if max_tokens and not engine.block_manager.can_ever_fit(num_prompt + max_tokens):
        capacity = engine.num_blocks * engine.config.block_size
        raise APIError.invalid(
            f"the prompt{which} ({num_prompt} tokens) plus max_tokens ({max_tokens}) needs more KV cache "
            f"than the server has ({capacity} tokens); lower max_tokens or shorten the prompt.",
            param=param,
            code="context_length_exceeded",
        )


def _first_unsupported(request: CompletionRequest | ChatCompletionRequest) -> None:
    for name, why in unsupported_fields(request)[:1]:
        raise APIError.invalid(f"'{name}': {why} by this server.", param=name, code="unsupported_parameter")
    if request.stream_options is not None and not request.stream:
        raise APIError.invalid("stream_options is only allowed with stream: true.", param="stream_options")


def _usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _request_error(state: _State, out: RequestOutput) -> APIError:
    """The error to report for an engine request that failed."""
    if state.closed:
        return APIError(503, "the server shut down before this request finished; retry it.",
                        type_="server_error", code="shutting_down")  # fmt: skip
    return APIError(500, f"generation failed: {out.error}", type_="server_error", code="generation_failed")


def _exception_error(state: _State, exc: BaseException) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, InvalidRequestError):
        return APIError.invalid(str(exc))
    if isinstance(exc, InferError) and state.closed:
        return APIError(503, "the server is shutting down; retry against another instance.",
                        type_="server_error", code="shutting_down")  # fmt: skip
    logger.error("request failed", exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", type_="server_error",
                    code="internal_error")  # fmt: skip


def _stream(llm: LLM, prompt: Sequence[int], params: SamplingParams) -> AsyncGenerator[RequestOutput, None]:
    # LLM.stream is an async generator (typed as the protocol's AsyncIterator): it has aclose().
    return cast(AsyncGenerator[RequestOutput, None], llm.stream(prompt, params))


async def _merged(
    llm: LLM, prompts: Sequence[Sequence[int]], params: SamplingParams
) -> AsyncGenerator[tuple[int, RequestOutput], None]:
    """The engine streams of several prompts as one, tagged by prompt index; closing it aborts them all."""
    if len(prompts) == 1:
        async with contextlib.aclosing(_stream(llm, prompts[0], params)) as only:
            async for out in only:
                yield 0, out
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, prompt: Sequence[int]) -> None:
        try:
            async with contextlib.aclosing(_stream(llm, prompt, params)) as stream:
                async for out in stream:
                    queue.put_nowait((index, out))
        except Exception as exc:
            queue.put_nowait((index, exc))
        else:
            queue.put_nowait((index, None))

    tasks = [asyncio.create_task(pump(i, p)) for i, p in enumerate(prompts)]
    try:
        running = len(tasks)
        while running:
            index, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()  # each pump closes its stream, which aborts the engine request
        await asyncio.gather(*tasks, return_exceptions=True)


async def _unless_disconnected(request: Request, work: Awaitable[_T]) -> _T | Response:
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
        return _json(error_body("the client closed the request", "invalid_request_error"), _CLIENT_CLOSED)
    finally:
        watcher.cancel()


def _sse(value: Any) -> str:
    return f"data: {_dumps(value)}\n\n"


_DONE = "data: [DONE]\n\n"


# -- completions --------------------------------------------------------------------------------------


@dataclass
class _CompletionJob:
    """A validated completions request: token ids, echo texts and log-probs, sampling parameters."""

    request: CompletionRequest
    prompts: list[list[int]]
    texts: list[str]
    params: SamplingParams | None  # None when max_tokens is 0 (nothing to generate)
    prompt_logprobs: list[list[dict[int, float] | None]] | None = None

    @property
    def n(self) -> int:
        return self.request.n


def _prepare_completion(state: _State, request: CompletionRequest) -> _CompletionJob:
    tokenizer = state.llm.tokenizer
    raw = request.prompt
    batch: list[str | list[int]]
    if isinstance(raw, str):
        batch = [raw]
    elif raw and isinstance(raw[0], int):
        batch = [list(raw)]
    else:
        batch = list(raw)
    prompts: list[list[int]] = []
    texts: list[str] = []
    vocab = state.llm.engine.vocab_size
    for index, item in enumerate(batch):
        which = f" {index}" if len(batch) > 1 else ""
        if isinstance(item, str):
            ids = tokenizer.encode(item)
            if not ids:
                raise APIError.invalid(
                    f"the prompt{which} is empty; give at least one token.", param="prompt"
                )
            texts.append(item)
        else:
            bad = [t for t in item if not 0 <= t < vocab]
            if bad:
                raise APIError.invalid(
                    f"prompt{which} holds token ids {bad[:5]} outside the vocabulary [0, {vocab}).",
                    param="prompt",
                )
            ids = list(item)
            texts.append(tokenizer.decode(ids, skip_special_tokens=request.skip_special_tokens))
        prompts.append(ids)
    max_tokens = 16 if request.max_tokens is None else request.max_tokens
    for index, ids in enumerate(prompts):
        _check_length(state, len(ids), max_tokens, "prompt", f" {index}" if len(prompts) > 1 else "")
    # max_tokens 0 (scoring with echo) generates nothing, but the other fields are still checked.
    params = _sampling(state, request, max_tokens or None, request.logprobs)
    state.metrics.prompt_tokens += sum(len(ids) for ids in prompts)
    return _CompletionJob(request, prompts, texts, params if max_tokens else None)


async def _add_prompt_logprobs(state: _State, job: _CompletionJob) -> None:
    """Echo with log-probs: score the prompts (a forward pass each, off the event loop)."""
    if job.request.echo and job.request.logprobs is not None:
        top_k = job.request.logprobs
        job.prompt_logprobs = [
            await asyncio.to_thread(state.llm.prompt_logprobs, ids, top_k) for ids in job.prompts
        ]


def _echo_choice(
    state: _State, job: _CompletionJob, prompt: int, index: int, offsets: TextOffsets
) -> CompletionChoice:
    """The echo part of a choice: the prompt text and, if asked, its log-probs."""
    logprobs = None
    if job.prompt_logprobs is not None:
        logprobs = completion_logprobs(state.texts, job.prompts[prompt], job.prompt_logprobs[prompt], offsets)
    return {"index": index, "text": job.texts[prompt], "logprobs": logprobs, "finish_reason": None}


async def _complete(state: _State, job: _CompletionJob, ticket: _Ticket, created: int, rid: str) -> Response:
    request = job.request
    await _add_prompt_logprobs(state, job)
    choices: dict[int, CompletionChoice] = {}
    tokens: dict[int, list[int]] = {}
    entries: dict[int, list[dict[int, float] | None]] = {}
    for prompt in range(len(job.prompts)):
        for sample in range(job.n):
            index = prompt * job.n + sample
            text = job.texts[prompt] if request.echo else ""
            choices[index] = {"index": index, "text": text, "logprobs": None, "finish_reason": "length"}
            tokens[index] = list(job.prompts[prompt]) if request.echo else []
            entries[index] = list(job.prompt_logprobs[prompt]) if job.prompt_logprobs is not None else []
    completion_tokens = 0
    if job.params is not None:
        async with contextlib.aclosing(_merged(state.llm, job.prompts, job.params)) as stream:
            async for prompt, out in stream:
                if out.error is not None:
                    raise _request_error(state, out)
                for c in out.outputs:
                    index = prompt * job.n + c.index
                    choices[index]["text"] += c.text
                    tokens[index].extend(c.token_ids)
                    entries[index].extend(c.logprobs or [])
                    completion_tokens += len(c.token_ids)
                    ticket.tokens(len(c.token_ids))
                    if c.finish_reason is not None:
                        choices[index]["finish_reason"] = c.finish_reason
    if request.logprobs is not None:
        for index, choice in choices.items():
            choice["logprobs"] = completion_logprobs(
                state.texts, tokens[index], entries[index], TextOffsets()
            )
    body = {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": state.config.model_name,
        "choices": [choices[i] for i in sorted(choices)],
        "usage": _usage(sum(len(p) for p in job.prompts), completion_tokens),
    }
    return _json(body)


async def _complete_stream(
    state: _State, job: _CompletionJob, ticket: _Ticket, created: int, rid: str
) -> AsyncIterator[str]:
    request = job.request
    include_usage = request.stream_options is not None and request.stream_options.include_usage
    head = {"id": rid, "object": "text_completion", "created": created, "model": state.config.model_name}
    extra: dict[str, Any] = {"usage": None} if include_usage else {}
    offsets: dict[int, TextOffsets] = {}
    completion_tokens = 0
    stream = _merged(state.llm, job.prompts, job.params) if job.params is not None else None
    try:
        await _add_prompt_logprobs(state, job)
        if request.echo:
            for prompt in range(len(job.prompts)):
                for sample in range(job.n):
                    index = prompt * job.n + sample
                    offsets[index] = TextOffsets()
                    choice = _echo_choice(state, job, prompt, index, offsets[index])
                    if job.params is None:
                        choice["finish_reason"] = "length"
                    yield _sse({**head, "choices": [choice], **extra})
        elif job.params is None:
            for index in range(len(job.prompts) * job.n):
                empty: CompletionChoice = {
                    "index": index,
                    "text": "",
                    "logprobs": None,
                    "finish_reason": "length",
                }
                yield _sse({**head, "choices": [empty], **extra})
        if stream is not None:
            async for prompt, out in stream:
                if out.error is not None:
                    yield _sse(_request_error(state, out).body())
                    break
                for c in out.outputs:
                    if not (c.text or c.token_ids or c.finish_reason):
                        continue
                    index = prompt * job.n + c.index
                    logprobs = None
                    if request.logprobs is not None:
                        logprobs = completion_logprobs(
                            state.texts,
                            c.token_ids,
                            c.logprobs or [],
                            offsets.setdefault(index, TextOffsets()),
                        )
                    completion_tokens += len(c.token_ids)
                    ticket.tokens(len(c.token_ids))
                    delta: CompletionChoice = {
                        "index": index,
                        "text": c.text,
                        "logprobs": logprobs,
                        "finish_reason": c.finish_reason,
                    }
                    yield _sse({**head, "choices": [delta], **extra})
            else:
                if include_usage:
                    usage = _usage(sum(len(p) for p in job.prompts), completion_tokens)
                    yield _sse({**head, "choices": [], "usage": usage})
        elif include_usage:
            yield _sse({**head, "choices": [], "usage": _usage(sum(len(p) for p in job.prompts), 0)})
        yield _DONE
    except Exception as exc:  # after the 200 is sent, an error can only travel as an event
        yield _sse(_exception_error(state, exc).body())
        yield _DONE
    finally:
        if stream is not None:
            await stream.aclose()
        ticket.release()


# -- chat completions ---------------------------------------------------------------------------------


@dataclass
class _ChatJob:
    request: ChatCompletionRequest
    prompt: list[int]
    params: SamplingParams


def _prepare_chat(state: _State, request: ChatCompletionRequest) -> _ChatJob:
    if request.response_format is not None and request.response_format.type != "text":
        raise APIError.invalid(
            f"response_format {request.response_format.type!r} is not supported: this server cannot "
            "constrain decoding to JSON. Use {'type': 'text'}, ask for JSON in the prompt, check the reply.",
            param="response_format",
            code="unsupported_parameter",
        )
    if request.top_logprobs is not None and not request.logprobs:
        raise APIError.invalid("top_logprobs needs logprobs: true.", param="top_logprobs")
    conversation: list[dict[str, Any]] = []
    for message in request.messages:
        # OpenAI's "developer" role is the newer name of "system"; chat templates know only the latter.
        role = "system" if message.role == "developer" else message.role
        turn: dict[str, Any] = {"role": role, "content": message.text()}
        if message.name is not None:
            turn["name"] = message.name
        conversation.append(turn)
    try:
        prompt = state.llm.render_chat(conversation)
    except LMStackError as exc:
        raise APIError.invalid(f"cannot render the conversation with the model's chat template: {exc}",
                               param="messages") from None  # fmt: skip
    if not prompt:
        raise APIError.invalid("the conversation renders to an empty prompt.", param="messages")
    limit = state.llm.max_model_len
    max_tokens = (
        request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    )
    param = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
    if max_tokens is None:
        # Unset: as much as the context (and the whole KV cache) leaves after the prompt.
        engine = state.llm.engine
        capacity = engine.num_blocks * engine.config.block_size
        max_tokens = max(min(limit, capacity) - len(prompt), 0)
        if max_tokens == 0:
            _check_length(state, len(prompt), 1, "messages")
    elif max_tokens == 0:
        raise APIError.invalid(f"{param} must be at least 1 for a chat completion.", param=param)
    _check_length(state, len(prompt), max_tokens, "messages")
    logprobs = (request.top_logprobs or 0) if request.logprobs else None
    renames = {"logprobs": "top_logprobs", "max_tokens": param}
    params = _sampling(state, request, max_tokens, logprobs, renames)
    state.metrics.prompt_tokens += len(prompt)
    return _ChatJob(request, prompt, params)


def _chat_choice_logprobs(
    state: _State, job: _ChatJob, token_ids: list[int], entries: list[dict[int, float]]
) -> Any:
    if not job.request.logprobs:
        return None
    return {"content": chat_logprobs(state.texts, token_ids, entries, job.request.top_logprobs or 0)}


async def _chat(state: _State, job: _ChatJob, ticket: _Ticket, created: int, rid: str) -> Response:
    n = job.params.n
    texts = [""] * n
    tokens: list[list[int]] = [[] for _ in range(n)]
    entries: list[list[dict[int, float]]] = [[] for _ in range(n)]
    finish: list[str | None] = [None] * n
    async with contextlib.aclosing(_merged(state.llm, [job.prompt], job.params)) as stream:
        async for _, out in stream:
            if out.error is not None:
                raise _request_error(state, out)
            for c in out.outputs:
                texts[c.index] += c.text
                tokens[c.index].extend(c.token_ids)
                entries[c.index].extend(c.logprobs or [])
                ticket.tokens(len(c.token_ids))
                finish[c.index] = c.finish_reason or finish[c.index]
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": texts[i]},
            "logprobs": _chat_choice_logprobs(state, job, tokens[i], entries[i]),
            "finish_reason": finish[i],
        }
        for i in range(n)
    ]
    body = {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": state.config.model_name,
        "choices": choices,
        "usage": _usage(len(job.prompt), sum(len(t) for t in tokens)),
    }
    return _json(body)


async def _chat_stream(
    state: _State, job: _ChatJob, ticket: _Ticket, created: int, rid: str
) -> AsyncIterator[str]:
    request = job.request
    include_usage = request.stream_options is not None and request.stream_options.include_usage
    head = {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": state.config.model_name,
    }
    extra: dict[str, Any] = {"usage": None} if include_usage else {}
    completion_tokens = 0
    stream = _merged(state.llm, [job.prompt], job.params)
    try:
        for i in range(job.params.n):
            first = {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None}  # fmt: skip
            yield _sse({**head, "choices": [first], **extra})
        async for _, out in stream:
            if out.error is not None:
                yield _sse(_request_error(state, out).body())
                break
            for c in out.outputs:
                if not (c.text or c.token_ids or c.finish_reason):
                    continue
                completion_tokens += len(c.token_ids)
                ticket.tokens(len(c.token_ids))
                choice = {
                    "index": c.index,
                    "delta": {"content": c.text} if c.text or not c.finish_reason else {},
                    "logprobs": _chat_choice_logprobs(state, job, c.token_ids, c.logprobs or []),
                    "finish_reason": c.finish_reason,
                }
                yield _sse({**head, "choices": [choice], **extra})
        else:
            if include_usage:
                yield _sse({**head, "choices": [], "usage": _usage(len(job.prompt), completion_tokens)})
        yield _DONE
    except Exception as exc:  # after the 200 is sent, an error can only travel as an event
        yield _sse(_exception_error(state, exc).body())
        yield _DONE
    finally:
        await stream.aclose()
        ticket.release()


# -- the application ----------------------------------------------------------------------------------

_J = TypeVar("_J")


async def _serve_job(
    state: _State,
    request: Request,
    endpoint: str,
    id_prefix: str,
    stream: bool,
    prepare: Callable[[], _J],
    respond: Callable[[_State, _J, _Ticket, int, str], Awaitable[Response]],
    events: Callable[[_State, _J, _Ticket, int, str], AsyncIterator[str]],
) -> Response:
    """Admit a generation request, prepare it, and answer it whole or as a stream of events."""
    ticket = state.admit(endpoint)
    handed_off = False
    try:
        job = prepare()
        created, rid = int(time.time()), f"{id_prefix}-{uuid.uuid4().hex}"
        if stream:
            handed_off = True  # the response releases the ticket when it ends, however it ends
            return _EventStream(events(state, job, ticket, created, rid), on_close=ticket.release)
        return await _unless_disconnected(request, respond(state, job, ticket, created, rid))
    except APIError:
        raise
    except Exception as exc:  # answered here: FastAPI's catch-all handler would log a traceback for a 400
        return _error_response(_exception_error(state, exc))
    finally:
        if not handed_off:
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
    state = _State(llm, config, close_llm)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await state.shutdown(config.shutdown_timeout)

    from lmstack.infer import __version__

    app = FastAPI(title="lmstack-infer", version=__version__, lifespan=lifespan, openapi_url=None,
                  docs_url=None, redoc_url=None)  # fmt: skip
    app.state.lmstack = state
    app.add_middleware(_Middleware, state=state)

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError) -> Response:
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            message = (f"no such endpoint: {request.method} {request.url.path}; this server has "
                       f"{', '.join(_ROUTES)}.")  # fmt: skip
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}."
        else:
            message = str(exc.detail)
        return _json(error_body(message, "invalid_request_error", code=str(exc.status_code)), exc.status_code,
                     exc.headers)  # fmt: skip

    @app.exception_handler(Exception)
    async def on_error(request: Request, exc: Exception) -> Response:
        return _error_response(_exception_error(state, exc))

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
            return _json({"status": "shutting down"}, 503)
        return _json({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(state.gauges()), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> Response:
        return _json({"object": "list", "data": [model_card()]})

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> Response:
        check_model(name)
        return _json(model_card())

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        parsed = _parse(CompletionRequest, await _read_json(request, config.max_body_bytes))
        check_model(parsed.model)
        _first_unsupported(parsed)
        return await _serve_job(
            state, request, "/v1/completions", "cmpl", parsed.stream,
            lambda: _prepare_completion(state, parsed), _complete, _complete_stream,
        )  # fmt: skip

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        parsed = _parse(ChatCompletionRequest, await _read_json(request, config.max_body_bytes))
        check_model(parsed.model)
        _first_unsupported(parsed)
        return await _serve_job(
            state, request, "/v1/chat/completions", "chatcmpl", parsed.stream,
            lambda: _prepare_chat(state, parsed), _chat, _chat_stream,
        )  # fmt: skip

    return app
