"""``RemoteLLM``: the LLM protocol over an OpenAI-compatible server (lmstack serve, vLLM, SGLang)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import Any, TypeVar, cast

import httpx
from tqdm.auto import tqdm

from lmstack.core import Tokenizer
from lmstack.infer._errors import InferError, InvalidRequestError, RemoteError, TokenizerUnavailableError
from lmstack.infer._inputs import (
    Message,
    Prompt,
    as_batch,
    as_conversations,
    as_params,
    check_max_length,
    is_conversation,
    plan_rolling,
    rolling_token_lists,
    split_whitespace,
    sum_rolling,
)
from lmstack.infer._outputs import RequestOutput
from lmstack.infer._protocol import LLMProtocol
from lmstack.infer._sampling_params import SamplingParams
from lmstack.infer.remote._http import HTTPTransport, RetryPolicy, normalize_base_url
from lmstack.infer.remote._request import sampling_fields
from lmstack.infer.remote._response import (
    RemoteRequestOutput,
    StreamAssembler,
    Usage,
    context_length,
    model_cards,
    parse_chat,
    parse_completion,
)
from lmstack.infer.remote._scoring import parse_echo, score_text_pair, score_token_pair, unsupported_from
from lmstack.infer.remote._tokens import TokenResolver

__all__ = ["RemoteLLM"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_END = object()  # end of a stream, on the consumer's queue
ScoringPair = tuple[str, str] | tuple[Sequence[int], Sequence[int]]


class RemoteLLM:
    """The LLM protocol over HTTP, for any OpenAI-compatible server.

    ``generate`` uses ``POST /v1/completions``, ``chat`` ``POST /v1/chat/completions``, ``stream`` either
    of them with server-sent events, and ``loglikelihood`` ``/v1/completions`` with ``echo`` and
    ``logprobs`` (``loglikelihood_rolling`` too, one request per window). Each prompt is its own
    request; a batch runs concurrently, at most ``max_concurrency`` requests in flight. Failed
    attempts are retried with exponential backoff and jitter on 408/409/429/5xx, connection errors
    and timeouts, honouring ``Retry-After``; other errors raise at once with the server's message.

    Synchronous methods may be called from any thread (and from inside a running event loop, which
    they block); ``agenerate``, ``achat``, ``aloglikelihood``, ``aloglikelihood_rolling`` and
    ``amodels`` are their ``async`` counterparts. All requests run on one private event loop thread
    that shares one connection pool.

    Args:
        base_url: The server, such as ``"http://127.0.0.1:8000"`` or ``"http://127.0.0.1:8000/v1"``
            (``/v1`` is added when the URL has no path).
        model: The model name to send; None picks the only model the server lists (at the first
            request).
        api_key: Sent as ``Authorization: Bearer <api_key>``.
        tokenizer: The model's tokenizer: a directory holding its tokenizer files, or a
            :class:`~lmstack.core.Tokenizer`. Needed for the ``tokenizer`` property, for token ids
            when the server does not return them, and for scoring token-id pairs with an empty context.
        timeout: Seconds per attempt (a float, connect time capped at 10 s), an ``httpx.Timeout``,
            or None for no timeout. For a stream it bounds the wait for each chunk.
        max_retries: Retries after the first attempt of each request (0: no retries).
        backoff_base: Seconds before the first retry (doubling for each further one, with jitter).
        backoff_max: Longest wait between attempts, in seconds; also caps ``Retry-After``.
        max_concurrency: Most requests in flight at once, streams included.
        headers: Extra headers for every request.
        extra_body: Extra JSON fields for every generation request (``chat_template_kwargs``,
            vLLM's ``return_token_ids``, ...); a call's own ``extra_body`` wins over these.
        transport: An ``httpx.AsyncBaseTransport`` to send requests through instead of the network
            (``httpx.MockTransport`` in tests).

    Example:
        >>> with RemoteLLM("http://127.0.0.1:8000") as llm:  # doctest: +SKIP
        ...     out = llm.generate(["Hello"], SamplingParams(max_tokens=8, temperature=0))
        ...     print(out[0].outputs[0].text)
    """

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        *,
        api_key: str | None = None,
        tokenizer: str | os.PathLike[str] | Tokenizer | None = None,
        timeout: float | httpx.Timeout | None = 600.0,
        max_retries: int = 3,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        max_concurrency: int = 32,
        headers: Mapping[str, str] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = normalize_base_url(base_url)
        self._model = model
        if tokenizer is None or isinstance(tokenizer, Tokenizer):
            self._tokenizer = tokenizer
        else:
            self._tokenizer = Tokenizer.from_pretrained(tokenizer)
        self._resolver = TokenResolver(self._tokenizer)
        all_headers = {"Accept": "application/json", **(headers or {})}
        if api_key:
            all_headers["Authorization"] = f"Bearer {api_key}"
        if timeout is None or isinstance(timeout, httpx.Timeout):
            http_timeout = httpx.Timeout(timeout)
        else:
            http_timeout = httpx.Timeout(float(timeout), connect=min(float(timeout), 10.0))
        self._transport = HTTPTransport(
            self.base_url,
            headers=all_headers,
            timeout=http_timeout,
            retry=RetryPolicy(max_retries, backoff_base, backoff_max),
            max_concurrency=max_concurrency,
            transport=transport,
        )
        self._extra_body = dict(extra_body or {})
        self._model_lock: asyncio.Lock | None = None
        self._echo_max_tokens = 0  # 1 once a server refused max_tokens=0 for echo scoring
        self._usage = Usage()
        self._usage_lock = threading.Lock()
        self._finalizer = weakref.finalize(self, self._transport.close)

    def __repr__(self) -> str:
        return f"RemoteLLM({self.base_url!r}, model={self._model!r})"

    # -- protocol: tokenizer -----------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Tokenizer:
        """The model's tokenizer, as given by ``tokenizer=``.

        Raises:
            TokenizerUnavailableError: if no tokenizer was given (an OpenAI-compatible server does not
                hand its tokenizer out). It is an ``AttributeError`` too, so ``getattr(llm, "tokenizer",
                None)`` gives None.
        """
        if self._tokenizer is None:
            raise TokenizerUnavailableError(
                f"{self!r} has no tokenizer: OpenAI-compatible servers do not serve theirs. Pass the "
                "model's tokenizer as RemoteLLM(..., tokenizer='path/to/model-dir') or a "
                "lmstack.core.Tokenizer."
            )
        return self._tokenizer

    @property
    def model(self) -> str | None:
        """The model name sent to the server (None until picked, when none was given)."""
        return self._model

    @property
    def usage(self) -> Usage:
        """Token counts the server reported, summed over every request so far (a copy)."""
        with self._usage_lock:
            return Usage(**vars(self._usage))

    # -- lifecycle ---------------------------------------------------------------------------------------
    def close(self) -> None:
        """Cancels requests in flight (open streams end with an error), closes connections; idempotent."""
        self._finalizer()

    async def aclose(self) -> None:
        """:meth:`close` without blocking the caller's event loop."""
        await asyncio.to_thread(self.close)

    def __enter__(self) -> RemoteLLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> RemoteLLM:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- plumbing ----------------------------------------------------------------------------------------
    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._transport.run(coro)

    async def _arun(self, coro: Coroutine[Any, Any, T]) -> T:
        return await self._transport.arun(coro)

    def _record(self, usage: Usage | None) -> None:
        if usage is not None:
            with self._usage_lock:
                self._usage.add(usage)

    async def _model_name(self) -> str:
        if self._model is not None:
            return self._model
        if self._model_lock is None:
            self._model_lock = asyncio.Lock()
        async with self._model_lock:
            if self._model is None:
                names = await self._models()
                if len(names) != 1:
                    listed = ", ".join(repr(n) for n in names[:20]) or "none"
                    raise InferError(
                        f"{self.base_url} serves {len(names)} models ({listed}); name the one to use with "
                        "RemoteLLM(base_url, model=...)."
                    )
                self._model = names[0]
                logger.info("%s serves one model, %r: using it", self.base_url, self._model)
        return self._model

    async def _models(self) -> list[str]:
        body = await self._transport.request_json("GET", "models")
        return [str(card["id"]) for card in model_cards(body, self.base_url)]

    async def _context_length(self) -> int | None:
        """The served model's context length, as ``GET /v1/models`` reports it (None if it does not)."""
        model = await self._model_name()
        body = await self._transport.request_json("GET", "models")
        return context_length(model_cards(body, self.base_url), model)

    async def _gather(self, coros: Sequence[Awaitable[T]], desc: str, use_tqdm: bool | None) -> list[T]:
        """Runs ``coros`` concurrently, in order; the first failure cancels the rest and is raised."""
        if not coros:
            return []
        tasks = [asyncio.ensure_future(c) for c in coros]
        bar = tqdm(
            total=len(tasks), desc=desc, unit="req", disable=None if use_tqdm is None else not use_tqdm
        )
        for task in tasks:
            task.add_done_callback(lambda t: None if t.cancelled() else bar.update(1))
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in tasks:
                if task.done() and not task.cancelled() and task.exception() is not None:
                    raise cast(BaseException, task.exception())
            return [task.result() for task in tasks]
        finally:
            pending = [t for t in tasks if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
            bar.close()

    def _payload(self, fields: Mapping[str, Any], extra_body: Mapping[str, Any] | None) -> dict[str, Any]:
        return {**fields, **self._extra_body, **(extra_body or {})}

    # -- models ------------------------------------------------------------------------------------------
    def models(self) -> list[str]:
        """The names of the models the server serves (``GET /v1/models``)."""
        return self._run(self._models())

    async def amodels(self) -> list[str]:
        """Async :meth:`models`."""
        return await self._arun(self._models())

    # -- protocol: generate ------------------------------------------------------------------------------
    def _completion_jobs(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None,
        extra_body: Mapping[str, Any] | None,
    ) -> list[tuple[Prompt, SamplingParams, dict[str, Any]]]:
        batch = as_batch(prompts)
        params = as_params(sampling_params, len(batch))
        jobs: list[tuple[Prompt, SamplingParams, dict[str, Any]]] = []
        for given, p in zip(batch, params, strict=True):
            prompt: str | list[int] = given if isinstance(given, str) else [int(t) for t in given]
            if not prompt:
                raise InvalidRequestError("a prompt is empty; give text or at least one token id.")
            fields = {"prompt": prompt, **sampling_fields(p, chat=False)}
            jobs.append((prompt, p, self._payload(fields, extra_body)))
        return jobs

    def _known_prompt_ids(self, prompt: Prompt) -> list[int] | None:
        if not isinstance(prompt, str):
            return list(prompt)
        return self._resolver.encode(prompt, add_special_tokens=True)

    async def _complete(
        self, prompt: Prompt, params: SamplingParams, payload: dict[str, Any]
    ) -> RemoteRequestOutput:
        payload = {"model": await self._model_name(), **payload}
        body = await self._transport.request_json("POST", "completions", payload)
        out = parse_completion(
            body, prompt=prompt if isinstance(prompt, str) else None,
            prompt_token_ids=self._known_prompt_ids(prompt), params=params, resolver=self._resolver,
            server=self.base_url,
        )  # fmt: skip
        self._record(out.usage)
        return out

    async def _generate(
        self, jobs: list[tuple[Prompt, SamplingParams, dict[str, Any]]], use_tqdm: bool | None
    ) -> list[RequestOutput]:
        return [*await self._gather([self._complete(*job) for job in jobs], "Generating", use_tqdm)]

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool | None = None,
        extra_body: Mapping[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Completes each prompt with ``POST /v1/completions``; outputs come back in the prompts' order.

        Each output is a :class:`~lmstack.infer.remote.RemoteRequestOutput`, which adds the server's
        ``usage`` and ``model``.

        Args:
            prompts: One prompt or a list; each is text or a list of token ids.
            sampling_params: One set for all prompts, or one per prompt (default ``SamplingParams()``,
                which samples at temperature 1; ``temperature=0`` is greedy).
            use_tqdm: Show a progress bar (default: only on an interactive terminal).
            extra_body: Extra JSON fields for these requests.

        Raises:
            InvalidRequestError: a prompt or the parameter list is invalid (nothing is sent).
            RemoteError: a request failed (the others are cancelled); see :class:`RemoteError`'s
                subclasses.
        """
        jobs = self._completion_jobs(prompts, sampling_params, extra_body)
        return self._run(self._generate(jobs, use_tqdm))

    async def agenerate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool | None = None,
        extra_body: Mapping[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Async :meth:`generate`; cancelling it cancels the requests in flight."""
        jobs = self._completion_jobs(prompts, sampling_params, extra_body)
        return await self._arun(self._generate(jobs, use_tqdm))

    # -- protocol: chat ----------------------------------------------------------------------------------
    def _chat_jobs(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None,
        extra_body: Mapping[str, Any] | None,
        **tool_fields: Any,
    ) -> list[tuple[SamplingParams, dict[str, Any]]]:
        conversations = as_conversations(messages)
        if not conversations or any(not is_conversation(c) for c in conversations):
            raise InvalidRequestError(
                "chat() takes a conversation (a non-empty list of {'role': ..., 'content': ...} dicts) or a "
                "list of them."
            )
        params = as_params(sampling_params, len(conversations))
        # OpenAI's tool fields, as plain JSON values; unset ones are left out for servers that lack them.
        fields = {
            name: dict(value) if isinstance(value, Mapping) else value
            for name, value in tool_fields.items()
            if value is not None
        }
        if "tools" in fields:
            fields["tools"] = [dict(tool) for tool in fields["tools"]]
        return [
            (
                p,
                self._payload(
                    {"messages": [dict(m) for m in conv], **sampling_fields(p, chat=True), **fields},
                    extra_body,
                ),
            )
            for conv, p in zip(conversations, params, strict=True)
        ]

    async def _chat_one(self, params: SamplingParams, payload: dict[str, Any]) -> RemoteRequestOutput:
        payload = {"model": await self._model_name(), **payload}
        body = await self._transport.request_json("POST", "chat/completions", payload)
        out = parse_chat(
            body,
            params=params,
            resolver=self._resolver,
            server=self.base_url,
            tools=bool(payload.get("tools")),
        )
        self._record(out.usage)
        return out

    async def _chat(
        self, jobs: list[tuple[SamplingParams, dict[str, Any]]], use_tqdm: bool | None
    ) -> list[RequestOutput]:
        return [*await self._gather([self._chat_one(*job) for job in jobs], "Chatting", use_tqdm)]

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
        response_format: Mapping[str, Any] | None = None,
        parallel_tool_calls: bool | None = None,
        use_tqdm: bool | None = None,
        extra_body: Mapping[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Replies to one conversation or each of a list with ``POST /v1/chat/completions``.

        The server applies the model's chat template. ``tools``, ``tool_choice``, ``response_format``
        and ``parallel_tool_calls`` are sent as OpenAI's fields of those names when given (the
        server checks them); the calls a reply made come back as its outputs' ``tool_calls`` (a
        list when tools were sent, empty for a reply without calls) and ``text`` holds the reply's
        content (``""`` when it is only calls). Other arguments and errors are as in :meth:`generate`.
        """
        jobs = self._chat_jobs(
            messages, sampling_params, extra_body, tools=tools, tool_choice=tool_choice,
            response_format=response_format, parallel_tool_calls=parallel_tool_calls,
        )  # fmt: skip
        return self._run(self._chat(jobs, use_tqdm))

    async def achat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
        response_format: Mapping[str, Any] | None = None,
        parallel_tool_calls: bool | None = None,
        use_tqdm: bool | None = None,
        extra_body: Mapping[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Async :meth:`chat`; cancelling it cancels the requests in flight."""
        jobs = self._chat_jobs(
            messages, sampling_params, extra_body, tools=tools, tool_choice=tool_choice,
            response_format=response_format, parallel_tool_calls=parallel_tool_calls,
        )  # fmt: skip
        return await self._arun(self._chat(jobs, use_tqdm))

    # -- protocol: stream --------------------------------------------------------------------------------
    async def stream(
        self,
        prompt: Prompt | Sequence[Message],
        sampling_params: SamplingParams | None = None,
        *,
        extra_body: Mapping[str, Any] | None = None,
    ) -> AsyncGenerator[RemoteRequestOutput, None]:
        """Yields one request's progress as deltas, over server-sent events.

        Each output carries only the new text (and token ids and log-probs, when the server sends
        them); the last has ``finished=True``, the finish reasons and the request's ``usage``. A
        conversation (a list of messages) goes to ``/v1/chat/completions``, text or token ids to
        ``/v1/completions``. Closing the generator (``aclose()``, leaving ``contextlib.aclosing``) or
        cancelling the task that awaits it closes the HTTP response, so the server cancels the
        request.

        Raises:
            RemoteError: the request failed, or the server reported an error mid-stream.
        """
        params = sampling_params or SamplingParams()
        chat = is_conversation(prompt)
        if chat:
            fields: dict[str, Any] = {"messages": [dict(m) for m in cast(Sequence[Message], prompt)]}
            path, text, known_ids = "chat/completions", None, None
        else:
            batch = as_batch(cast(Prompt, prompt))
            if len(batch) != 1 or not batch[0]:
                raise InvalidRequestError("stream() takes one prompt: text, token ids or a conversation.")
            one = batch[0] if isinstance(batch[0], str) else [int(t) for t in batch[0]]
            fields = {"prompt": one}
            path, text, known_ids = (
                "completions",
                one if isinstance(one, str) else None,
                self._known_prompt_ids(one),
            )
        payload = self._payload(
            {**fields, **sampling_fields(params, chat=chat), "stream": True,
             "stream_options": {"include_usage": True}},
            extra_body,
        )  # fmt: skip
        assembler = StreamAssembler(
            chat=chat, params=params, prompt=text, prompt_token_ids=known_ids, resolver=self._resolver,
            server=self.base_url, tools=bool(payload.get("tools")),
        )  # fmt: skip
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()

        def emit(item: object) -> None:
            with contextlib.suppress(RuntimeError):  # the consumer's loop is gone: nobody is listening
                loop.call_soon_threadsafe(queue.put_nowait, item)

        future = self._transport.submit(self._pump(path, payload, assembler, emit))
        try:
            while True:
                item = await queue.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield cast(RemoteRequestOutput, item)
        finally:
            if not future.done():
                future.cancel()  # closes the HTTP response: the server sees the client leave
                with contextlib.suppress(Exception):
                    await asyncio.wait([asyncio.wrap_future(future)], timeout=5)

    async def _pump(
        self, path: str, payload: dict[str, Any], assembler: StreamAssembler, emit: Callable[[object], None]
    ) -> None:
        """On the loop thread: reads the stream and hands outputs (then ``_END`` or an error) to ``emit``."""
        try:
            payload = {"model": await self._model_name(), **payload}
            events = self._transport.stream_events(path, payload)
            async with contextlib.aclosing(events):
                async for event in events:
                    for out in assembler.feed(event):
                        emit(out)
                    if assembler.done:
                        break
            for out in assembler.finish():
                self._record(out.usage)
                emit(out)
            emit(_END)
        except asyncio.CancelledError:
            emit(InferError("the stream was cancelled (the RemoteLLM was closed, or the stream was)."))
            raise
        except Exception as exc:
            emit(exc)

    # -- protocol: loglikelihood -------------------------------------------------------------------------
    def _scoring_jobs(self, requests: Sequence[ScoringPair]) -> list[tuple[str | list[int], str | int]]:
        """Per pair: the prompt to echo, and the continuation (its text, or its length in tokens)."""
        jobs: list[tuple[str | list[int], str | int]] = []
        for pair in requests:
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise InvalidRequestError(
                    f"a loglikelihood request must be a (context, continuation) pair, got {pair!r}."
                )
            context, continuation = pair
            if isinstance(context, str) and isinstance(continuation, str):
                context, continuation = split_whitespace(context, continuation)
                if not continuation:
                    raise InvalidRequestError("the continuation to score is empty.")
                jobs.append((context + continuation, continuation))
            elif not isinstance(context, str) and not isinstance(continuation, str):
                ctx, cont = [int(t) for t in context], [int(t) for t in continuation]
                if not cont:
                    raise InvalidRequestError("the continuation to score is empty.")
                if not ctx:
                    ctx = [self._start_token()]
                jobs.append((ctx + cont, len(cont)))
            else:
                raise InvalidRequestError("a loglikelihood pair must be two strings or two token-id lists.")
        return jobs

    def _start_token(self) -> int:
        tok = self._tokenizer
        start = (
            None if tok is None else (tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id)
        )
        if start is None:
            raise InvalidRequestError(
                "the context is empty: the first continuation token needs a token before it. Give a "
                "non-empty context, or pass tokenizer= so its bos (or eos) token can start the context."
            )
        return start

    async def _score_one(self, prompt: str | list[int], continuation: str | int) -> tuple[float, bool]:
        model = await self._model_name()
        while True:
            generated = self._echo_max_tokens
            payload = {"model": model, "prompt": prompt, "max_tokens": generated, "echo": True,
                       "logprobs": 1, "temperature": 0.0}  # fmt: skip
            try:
                body = await self._transport.request_json("POST", "completions", payload)
                break
            except RemoteError as exc:
                if generated == 0 and exc.status_code in (400, 422) and "max_tokens" in str(exc).lower():
                    logger.info("%s refused max_tokens=0 for scoring; using max_tokens=1", self.base_url)
                    self._echo_max_tokens = 1
                    continue
                raise unsupported_from(exc, self.base_url) from exc
        self._record(Usage.from_json(body.get("usage")) if isinstance(body, Mapping) else None)
        echo = parse_echo(
            body,
            prompt=prompt if isinstance(prompt, str) else None,
            generated=generated,
            server=self.base_url,
        )
        if isinstance(continuation, str):
            return score_text_pair(echo, cast(str, prompt), continuation, self.base_url)
        return score_token_pair(echo, continuation, self.base_url)

    async def _loglikelihood(
        self, jobs: list[tuple[str | list[int], str | int]], use_tqdm: bool | None
    ) -> list[tuple[float, bool]]:
        return await self._gather([self._score_one(*job) for job in jobs], "Scoring", use_tqdm)

    def loglikelihood(
        self, requests: Sequence[ScoringPair], *, use_tqdm: bool | None = None
    ) -> list[tuple[float, bool]]:
        """For each ``(context, continuation)``: summed log-prob of the continuation, and is-greedy.

        Each pair is one ``/v1/completions`` request with ``echo: true, logprobs: 1, max_tokens: 0``
        (``max_tokens: 1`` for a server that refuses 0), and the server tokenizes text pairs. As
        lm-evaluation-harness does, the context's trailing whitespace is moved to the continuation;
        the continuation then starts at the token holding its first character (found by the tokens'
        ``text_offset``), so a token spanning the boundary belongs to the continuation. Token-id
        pairs are sent as ids and their last ``len(continuation)`` tokens scored; an empty context
        starts from the tokenizer's bos (else eos) token. Is-greedy holds when every continuation
        token is as likely as the server's top-1 alternative at its position.

        Args:
            requests: ``(context, continuation)`` pairs, both text or both token ids.
            use_tqdm: Show a progress bar (default: only on an interactive terminal).

        Raises:
            InvalidRequestError: a pair is malformed or its continuation is empty.
            RemoteUnsupportedError: the server does not return prompt log-probs (OpenAI's chat-only
                models, servers without ``echo``).
            RemoteError: a request failed otherwise.
        """
        jobs = self._scoring_jobs(requests)
        return self._run(self._loglikelihood(jobs, use_tqdm))

    async def aloglikelihood(
        self, requests: Sequence[ScoringPair], *, use_tqdm: bool | None = None
    ) -> list[tuple[float, bool]]:
        """Async :meth:`loglikelihood`."""
        jobs = self._scoring_jobs(requests)
        return await self._arun(self._loglikelihood(jobs, use_tqdm))

    # -- protocol: loglikelihood_rolling ---------------------------------------------------------------------
    async def _loglikelihood_rolling(
        self, token_lists: list[list[int]], max_length: int | None, use_tqdm: bool | None
    ) -> list[float]:
        if not any(token_lists):
            return [0.0] * len(token_lists)
        served = await self._context_length()
        # The echoed prompt is the window plus the token it predicts last: one more than the model sees.
        limit = None if served is None else served - 1
        if max_length is None:
            if limit is None:
                raise InvalidRequestError(
                    f"{self.base_url} does not report its context length (max_model_len in GET /models): "
                    "pass max_length= to loglikelihood_rolling.",
                    param="max_length",
                )
            max_length = limit
        length = check_max_length(max_length, limit) or max_length
        pairs, owners = plan_rolling(token_lists, self.tokenizer, length)
        scores = await self._gather(
            [self._score_one(ctx + cont, len(cont)) for ctx, cont in pairs], "Scoring windows", use_tqdm
        )
        return sum_rolling(len(token_lists), owners, [logprob for logprob, _ in scores])

    def _rolling_inputs(
        self, texts: Sequence[str] | Sequence[Sequence[int]], max_length: int | None
    ) -> list[list[int]]:
        check_max_length(max_length, None)
        return rolling_token_lists(texts, self.tokenizer, None)

    def loglikelihood_rolling(
        self,
        texts: Sequence[str] | Sequence[Sequence[int]],
        *,
        max_length: int | None = None,
        use_tqdm: bool | None = None,
    ) -> list[float]:
        """Log-likelihood of each whole text, scored in rolling windows: perplexity and bits per byte.

        The same windows and numbers as :meth:`LLM.loglikelihood_rolling
        <lmstack.infer.LLM.loglikelihood_rolling>` (lm-evaluation-harness's semantics): the text is
        tokenized here with the given tokenizer, cut into windows of at most ``max_length`` tokens, the
        first conditioned on the bos (else eos) token and each later one on the tokens before it, and
        each window is one ``/v1/completions`` request with its token ids, ``echo: true, logprobs: 1,
        max_tokens: 0``, at most ``max_concurrency`` in flight; its last tokens' log-probs are summed.

        The echoed prompt holds one token more than the model sees (the last one, predicted but not
        fed), and servers check the whole prompt against their context, so ``max_length`` defaults
        to the context length the server reports in ``GET /v1/models`` minus one. For the same numbers
        as a local :class:`~lmstack.infer.LLM`, pass the same ``max_length`` to both.

        Args:
            texts: Texts, or token-id lists (a list of them, even for one).
            max_length: Most tokens the model sees in one window (default: the server's context
                length minus one; required when the server does not report it).
            use_tqdm: Show a progress bar over the windows (default: only on an interactive terminal).

        Returns:
            One summed log-probability per text, in the texts' order (0.0 for a text with no tokens).

        Raises:
            TokenizerUnavailableError: no ``tokenizer=`` was given (it tokenizes text and names the
                bos token that starts every text).
            InvalidRequestError: ``max_length`` below 2 or above what the server can score, or an
                item that is neither text nor token ids.
            RemoteUnsupportedError: the server does not return prompt log-probs.
            RemoteError: a request failed otherwise.
        """
        token_lists = self._rolling_inputs(texts, max_length)
        return self._run(self._loglikelihood_rolling(token_lists, max_length, use_tqdm))

    async def aloglikelihood_rolling(
        self,
        texts: Sequence[str] | Sequence[Sequence[int]],
        *,
        max_length: int | None = None,
        use_tqdm: bool | None = None,
    ) -> list[float]:
        """Async :meth:`loglikelihood_rolling`."""
        token_lists = self._rolling_inputs(texts, max_length)
        return await self._arun(self._loglikelihood_rolling(token_lists, max_length, use_tqdm))


# A RemoteLLM without a tokenizer still implements the protocol: on Python < 3.12, isinstance() probes the
# tokenizer property with hasattr(), which its TokenizerUnavailableError (an AttributeError) makes False.
LLMProtocol.register(RemoteLLM)
