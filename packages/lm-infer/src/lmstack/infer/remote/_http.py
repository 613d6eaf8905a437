"""HTTP plumbing of the remote client: one event loop in a thread, retries, errors, SSE streams.

Every request of a :class:`~lmstack.infer.RemoteLLM` runs on one private asyncio loop in a daemon
thread, with one ``httpx.AsyncClient`` and one semaphore, so synchronous calls, ``async`` calls from any
event loop and streams all share the same connection pool and concurrency bound.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import email.utils
import json
import logging
import random
import threading
import time
from collections.abc import AsyncGenerator, Coroutine, Mapping
from typing import Any, TypeVar

import httpx

from lmstack.infer._errors import (
    InferError,
    RemoteConnectionError,
    RemoteError,
    RemoteInvalidRequestError,
    RemoteTimeoutError,
)
from lmstack.infer.remote._sse import ServerSentEvent, SSEDecoder

__all__ = ["HTTPTransport", "RetryPolicy", "normalize_base_url"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Statuses worth retrying: rate limiting and transient server failures (not 501 Not Implemented or
# 505 HTTP Version Not Supported, which will not change).
_RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504}) | frozenset(range(506, 600))
_INVALID_STATUSES = frozenset({400, 413, 422})


def normalize_base_url(base_url: str) -> str:
    """The API root of a server: ``http://host:8000`` and ``http://host:8000/v1/`` both give ``.../v1``.

    A URL with another path (``https://example.com/openai/v1``) is kept as given, without its
    trailing slash.

    Raises:
        InferError: if the URL is not ``http://`` or ``https://``.
    """
    url = httpx.URL(base_url.strip())
    if url.scheme not in ("http", "https") or not url.host:
        raise InferError(
            f"base_url must be an http(s):// URL such as 'http://127.0.0.1:8000/v1', got {base_url!r}"
        )
    path = url.path.rstrip("/")
    if not path:
        path = "/v1"
    return str(url.copy_with(path=path, query=None, fragment=None))


def parse_retry_after(headers: httpx.Headers, now: float | None = None) -> float | None:
    """Seconds the server asked us to wait (``retry-after-ms``, or ``Retry-After`` seconds or date)."""
    value = headers.get("retry-after-ms")
    if value is not None:
        with contextlib.suppress(ValueError):
            return max(0.0, float(value) / 1000)
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _json_body(response: httpx.Response) -> Any:
    try:
        return response.json()
    except (ValueError, UnicodeDecodeError):
        return None


def error_param(response: httpx.Response) -> str | None:
    """The request field an OpenAI-shaped error response names as at fault (its ``error.param``)."""
    body = _json_body(response)
    err = body.get("error") if isinstance(body, Mapping) else None
    param = err.get("param") if isinstance(err, Mapping) else None
    return param if isinstance(param, str) else None


def error_message(response: httpx.Response) -> str:
    """The server's own explanation of an error response, as OpenAI, vLLM and FastAPI shape it."""
    body = _json_body(response)
    if isinstance(body, Mapping):
        err = body.get("error")
        if isinstance(err, Mapping) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str) and err:
            return err
        for key in ("message", "detail"):
            if body.get(key):
                detail = body[key]
                return detail if isinstance(detail, str) else json.dumps(detail)
    text = response.text.strip()
    return text[:500] if text else response.reason_phrase or "no details"


class RetryPolicy:
    """Exponential backoff with jitter, honouring the server's ``Retry-After``.

    The n-th retry (from 0) waits a random time in ``[d/2, d]`` with ``d = min(backoff_max, backoff_base
    * 2**n)``; when the server sends ``Retry-After`` (or ``retry-after-ms``), that wait is used instead,
    capped at ``backoff_max``.

    Args:
        max_retries: Retries after the first attempt (0 disables retrying).
        backoff_base: First backoff in seconds.
        backoff_max: Longest wait between two attempts, in seconds.
    """

    def __init__(self, max_retries: int = 3, backoff_base: float = 0.5, backoff_max: float = 30.0) -> None:
        if max_retries < 0 or backoff_base < 0 or backoff_max < 0:
            raise InferError(
                f"max_retries, backoff_base and backoff_max must be >= 0, got {max_retries}, "
                f"{backoff_base}, {backoff_max}"
            )
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max

    def delay(self, retry: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number ``retry`` (0-based)."""
        if retry_after is not None:
            return min(retry_after, self.backoff_max)
        ceiling = min(self.backoff_max, self.backoff_base * 2.0**retry)
        return ceiling / 2 + random.uniform(0, ceiling / 2)


class _Retry(Exception):
    """Internal: this attempt failed in a way worth retrying."""

    def __init__(self, error: RemoteError, retry_after: float | None = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.retry_after = retry_after


class HTTPTransport:
    """Requests to one OpenAI-compatible server, run on a private event loop thread.

    Args:
        base_url: The API root (see :func:`normalize_base_url`).
        headers: Headers sent with every request (the API key's ``Authorization`` among them).
        timeout: httpx timeout of each attempt.
        retry: The retry policy.
        max_concurrency: Most requests in flight at once (streams included).
        transport: An httpx transport to use instead of the network (tests, custom proxies).
    """

    def __init__(
        self,
        base_url: str,
        *,
        headers: Mapping[str, str],
        timeout: httpx.Timeout,
        retry: RetryPolicy,
        max_concurrency: int,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if max_concurrency < 1:
            raise InferError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.base_url = base_url
        self.retry = retry
        self.max_concurrency = max_concurrency
        self._headers = dict(headers)
        self._timeout = timeout
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._semaphore: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    # -- the loop thread -------------------------------------------------------------------------------
    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._closed:
                raise InferError("this RemoteLLM is closed; create a new one to send requests.")
            if self._loop is None:
                loop = asyncio.new_event_loop()
                ready = threading.Event()

                def run() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(ready.set)
                    loop.run_forever()

                thread = threading.Thread(target=run, name="lmstack-remote", daemon=True)
                thread.start()
                ready.wait()
                self._loop, self._thread = loop, thread
            return self._loop

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedules ``coro`` on the loop thread."""
        try:
            loop = self._ensure_loop()
        except BaseException:
            coro.close()
            raise
        return asyncio.run_coroutine_threadsafe(coro, loop)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Runs ``coro`` on the loop thread and waits for it; interrupting the wait cancels it."""
        if self._thread is threading.current_thread():
            coro.close()
            raise InferError("a RemoteLLM's synchronous methods cannot be called from its own callbacks.")
        future = self.submit(coro)
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            raise self._closed_error() from None
        except BaseException:
            future.cancel()
            raise

    async def arun(self, coro: Coroutine[Any, Any, T]) -> T:
        """Runs ``coro`` on the loop thread from another event loop; cancelling the caller cancels it."""
        future = self.submit(coro)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            if self._closed and future.cancelled():
                raise self._closed_error() from None
            raise

    def _closed_error(self) -> InferError:
        if self._closed:
            return InferError("the RemoteLLM was closed while the request was in flight.")
        return InferError("the request was cancelled.")

    def close(self) -> None:
        """Cancels what is in flight, closes the connections and stops the loop thread (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if thread is threading.current_thread():
            raise InferError("close() cannot be called from the RemoteLLM's own thread.")
        future = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
        with contextlib.suppress(Exception):
            future.result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        if not thread.is_alive():
            loop.close()

    async def _shutdown(self) -> None:
        current = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    # -- requests (on the loop thread) -------------------------------------------------------------------
    def _get_client(self) -> tuple[httpx.AsyncClient, asyncio.Semaphore]:
        if self._client is None or self._semaphore is None:
            limits = httpx.Limits(
                max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency
            )
            self._client = httpx.AsyncClient(
                base_url=self.base_url + "/",
                headers=self._headers,
                timeout=self._timeout,
                limits=limits,
                transport=self._transport,
            )
            self._semaphore = asyncio.Semaphore(self.max_concurrency)
        return self._client, self._semaphore

    def _describe(self, method: str, path: str) -> str:
        return f"{method} {self.base_url}/{path}"

    def _status_error(self, response: httpx.Response, method: str, path: str) -> RemoteError:
        status = response.status_code
        detail = error_message(response).rstrip(". ")
        where = self._describe(method, path)
        hint = ""
        if status in (401, 403):
            hint = " Check api_key= (sent as 'Authorization: Bearer ...')."
        elif status == 404:
            hint = " Check base_url and the model name (RemoteLLM.models() lists what the server serves)."
        elif status in _INVALID_STATUSES:
            hint = " The server refused the request itself; fix its parameters or prompt."
        message = f"{where} failed with HTTP {status}: {detail}.{hint}"
        if status in _INVALID_STATUSES:
            return RemoteInvalidRequestError(
                message, status_code=status, server=self.base_url, param=error_param(response)
            )
        return RemoteError(message, status_code=status, server=self.base_url)

    def _transport_error(self, exc: httpx.TransportError, method: str, path: str) -> RemoteError:
        where = self._describe(method, path)
        if isinstance(exc, httpx.TimeoutException):
            return RemoteTimeoutError(
                f"{where} timed out ({type(exc).__name__}: {exc or 'no detail'}). Raise timeout= for long "
                "generations, or check that the server is not overloaded.",
                server=self.base_url,
            )
        return RemoteConnectionError(
            f"{where} failed: {type(exc).__name__}: {exc or 'no detail'}. Is the server running and is "
            "base_url right?",
            server=self.base_url,
        )

    async def request_json(self, method: str, path: str, payload: Mapping[str, Any] | None = None) -> Any:
        """Sends one request (with retries) and returns the decoded JSON body.

        Raises:
            RemoteInvalidRequestError: the server answered 400, 413 or 422.
            RemoteError: any other non-retryable status, retries exhausted, or a body that is not JSON.
            RemoteConnectionError: the server could not be reached after the retries.
            RemoteTimeoutError: no answer within the timeout after the retries.
        """
        client, semaphore = self._get_client()
        retries = self.retry.max_retries
        for attempt in range(retries + 1):
            try:
                async with semaphore:
                    try:
                        response = await client.request(method, path, json=payload)
                    except httpx.UnsupportedProtocol as exc:
                        raise self._transport_error(exc, method, path) from exc
                    except httpx.TransportError as exc:
                        raise _Retry(self._transport_error(exc, method, path)) from exc
                    self._check(response, method, path)
                    try:
                        return response.json()
                    except ValueError as exc:
                        raise RemoteError(
                            f"{self._describe(method, path)} answered HTTP {response.status_code} with a "
                            f"body that is not JSON: {response.text[:200]!r}. Is base_url an OpenAI API?",
                            status_code=response.status_code,
                            server=self.base_url,
                        ) from exc
            except _Retry as retry:
                await self._backoff(attempt, retry, method, path)
        raise AssertionError("unreachable")  # pragma: no cover

    def _check(self, response: httpx.Response, method: str, path: str) -> None:
        """Raises :class:`_Retry` or the final error for an unsuccessful response (its body already read)."""
        if response.is_success:
            return
        error = self._status_error(response, method, path)
        if response.status_code in _RETRY_STATUSES:
            raise _Retry(error, parse_retry_after(response.headers))
        raise error

    async def _backoff(self, attempt: int, retry: _Retry, method: str, path: str) -> None:
        if attempt >= self.retry.max_retries:
            error = retry.error
            if self.retry.max_retries:
                error.args = (f"{error} (gave up after {attempt + 1} attempts)",)
            raise error from retry.__cause__
        delay = self.retry.delay(attempt, retry.retry_after)
        logger.warning(
            "%s: attempt %d of %d failed (%s); retrying in %.2fs",
            self._describe(method, path), attempt + 1, self.retry.max_retries + 1,
            retry.error.status_code or type(retry.__cause__).__name__, delay,
        )  # fmt: skip
        await asyncio.sleep(delay)

    async def stream_events(
        self, path: str, payload: Mapping[str, Any]
    ) -> AsyncGenerator[ServerSentEvent, None]:
        """POSTs ``payload`` and yields the server-sent events of the response.

        Failures before the first event are retried like :meth:`request_json`; a connection that
        breaks after events have arrived raises :class:`RemoteConnectionError` (the request is not
        replayed). Closing the generator closes the response, so the server sees the client leave.
        """
        client, semaphore = self._get_client()
        method = "POST"
        for attempt in range(self.retry.max_retries + 1):
            started = False
            try:
                async with semaphore:
                    try:
                        headers = {"Accept": "text/event-stream"}
                        async with client.stream(method, path, json=payload, headers=headers) as response:
                            if not response.is_success:
                                await response.aread()
                                self._check(response, method, path)
                            decoder = SSEDecoder()
                            async for chunk in response.aiter_bytes():
                                for event in decoder.feed(chunk):
                                    started = True
                                    yield event
                            for event in decoder.flush():
                                started = True
                                yield event
                            return
                    except httpx.UnsupportedProtocol as exc:
                        raise self._transport_error(exc, method, path) from exc
                    except httpx.TransportError as exc:
                        error = self._transport_error(exc, method, path)
                        if started:  # not replayed: the caller has seen part of the answer
                            raise type(error)(
                                f"the stream from {self._describe(method, path)} broke off: {error}",
                                server=self.base_url,
                            ) from exc
                        raise _Retry(error) from exc
            except _Retry as retry:
                await self._backoff(attempt, retry, method, path)
