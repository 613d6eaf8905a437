"""What completions and chat completions share: sampling parameters, the context rule, engine streams.

The engine validates every request at its door (prompt ids, prompt length, sampling parameters
against the vocabulary, what the KV cache can hold) and raises
:class:`~lmstack.infer.InvalidRequestError`, which the server answers as a 400 naming its ``param``.
The server checks only what belongs to OpenAI's API: the shape of the body, and that the prompt
plus an explicit ``max_tokens`` fits the context (the engine would cut such a completion short;
OpenAI's API refuses it).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lmstack.infer._errors import InvalidRequestError
from lmstack.infer._llm import LLM, RequestStream
from lmstack.infer._outputs import CompletionOutput, RequestOutput
from lmstack.infer._sampling_params import GUIDED_FIELDS, SamplingParams
from lmstack.infer.server._errors import APIError, from_exception, request_failed
from lmstack.infer.server._http import DONE, sse
from lmstack.infer.server._protocol import ChatCompletionRequest, CompletionRequest, Usage, unsupported_fields
from lmstack.infer.server._state import ServerState, Ticket

__all__ = [
    "CONTEXT_LENGTH_EXCEEDED",
    "EngineStreams",
    "Job",
    "check_context",
    "check_guided",
    "event_stream",
    "first_unsupported",
    "head",
    "outputs",
    "sampling",
    "stream_usage",
    "usage",
]

CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"


def first_unsupported(request: CompletionRequest | ChatCompletionRequest) -> None:
    """A 400 for the first field set to something the server cannot do."""
    for name, why in unsupported_fields(request)[:1]:
        raise APIError.invalid(f"'{name}': {why} by this server.", param=name, code="unsupported_parameter")
    if request.stream_options is not None and not request.stream:
        raise APIError.invalid("stream_options is only allowed with stream: true.", param="stream_options")


def sampling(
    state: ServerState,
    request: CompletionRequest | ChatCompletionRequest,
    max_tokens: int | None,
    logprobs: int | None,
    renames: Mapping[str, str] | None = None,
    guided: Mapping[str, Any] | None = None,
) -> SamplingParams:
    """The request's ``SamplingParams``, whose own checks of every range answer a 400.

    Args:
        state: The server.
        request: The request.
        max_tokens: The budget to generate (None: up to the end of the context).
        logprobs: Top log-probs per token (None: none).
        renames: The request's names of fields the engine calls otherwise.
        guided: A constraint to set instead of the request's own ``guided_*`` fields (``{"guided_json":
            schema}`` for a completions ``response_format``).
    """
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
    for name in GUIDED_FIELDS:
        options[name] = getattr(request, name)
    options["guided_json_fit"] = request.guided_json_fit
    options.update(guided or {})
    try:
        return SamplingParams(**options)
    except InvalidRequestError as exc:
        raise from_exception(exc, closed=state.closed, renames=renames) from None


async def check_guided(
    state: ServerState, params: SamplingParams, param: str | None, num_prompt_tokens: int | None = None
) -> None:
    """Compile the constraint of ``params`` off the event loop: a 400 naming ``param`` if it cannot compile.

    It runs before any engine request is queued, so a constraint that does not compile costs the
    engine nothing and the requests already running never wait on it.

    Args:
        state: The server.
        params: The request's sampling parameters (nothing to do without a ``guided_*`` field).
        param: The request field the constraint came from (default: the ``guided_*`` field's name).
        num_prompt_tokens: The prompt's length (the engine bounds JSON to what the context leaves).
    """
    if params.guided_kind is None:
        return
    try:
        await asyncio.to_thread(state.llm.check_guided, params, num_prompt_tokens)
    except InvalidRequestError as exc:
        message = str(exc)
        if param is not None and exc.param is not None and message.startswith(exc.param):
            message = param + message[len(exc.param) :]  # the engine names guided_json; the client sent param
        raise APIError.invalid(message, param=param or exc.param) from None


def check_context(
    state: ServerState, num_prompt: int, max_tokens: int, param: str, what: str, *, at_least: bool = False
) -> None:
    """A 400 ``context_length_exceeded`` when the prompt plus ``max_tokens`` exceeds the context.

    The engine would generate up to the end of the context and stop there; OpenAI's API refuses such
    a request instead, saying by how much it is over.

    Args:
        state: The server.
        num_prompt: The prompt's length in tokens.
        max_tokens: What the client asked for.
        param: The request field to blame.
        what: How the message names the prompt ("the prompt", "the prompt 2", "the conversation").
        at_least: ``num_prompt`` is a lower bound (the prompt was not tokenized: it is far too long).
    """
    limit = state.llm.max_model_len
    if num_prompt + max_tokens > limit:
        raise APIError.invalid(
            f"this model's maximum context length is {limit} tokens, but {what} has "
            f"{'at least ' if at_least else ''}{num_prompt} tokens "
            f"and max_tokens asks for {max_tokens} more ({num_prompt + max_tokens} in all); "
            "shorten the prompt or lower max_tokens.",
            param=param,
            code=CONTEXT_LENGTH_EXCEEDED,
        )


def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    """The ``usage`` object of a response."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def head(state: ServerState, rid: str, created: int, kind: str) -> dict[str, Any]:
    """The fields a response object or stream chunk starts with (``kind`` is its ``object``)."""
    return {"id": rid, "object": kind, "created": created, "model": state.config.model_name}


def stream_usage(request: CompletionRequest | ChatCompletionRequest) -> tuple[bool, dict[str, Any]]:
    """Whether the stream ends with a usage chunk, and the field every other chunk then carries."""
    include = request.stream_options is not None and request.stream_options.include_usage
    return include, {"usage": None} if include else {}


async def event_stream(
    state: ServerState, job: Job, ticket: Ticket, events: AsyncGenerator[str, None]
) -> AsyncIterator[str]:
    """``events``, then ``[DONE]``; the job is closed and the ticket released however the stream ends.

    After the 200 is sent, an error can only travel as an event: it is sent, then ``[DONE]``.
    """
    try:
        async with contextlib.aclosing(events):
            async for event in events:
                yield event
        yield DONE
    except Exception as exc:
        yield sse(from_exception(exc, closed=state.closed).body())
        yield DONE
    finally:
        await job.aclose()
        ticket.release()


class EngineStreams:
    """The engine requests of one HTTP request, one per prompt, read as one stream tagged by prompt index.

    :meth:`open` queues them all and waits (without blocking the event loop) until the engine has
    taken or refused each, before any answer starts, so a prompt the engine refuses is a 400 also
    for a streamed response. Closing queues the abort of whatever still runs (freeing its KV blocks
    before the engine's next step); it never waits for the engine.
    """

    def __init__(self, requests: list[RequestStream]) -> None:
        self._requests = requests
        self._queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()
        self._tasks = [asyncio.create_task(self._pump(i, r)) for i, r in enumerate(requests)]

    @classmethod
    async def open(cls, llm: LLM, prompts: Sequence[Sequence[int]], params: SamplingParams) -> EngineStreams:
        """Queue one engine request per prompt and wait until the engine has answered each.

        Raises:
            InvalidRequestError: the engine refused a prompt (none of them is left running then); for
                a batch the message says which prompt.
        """
        requests: list[RequestStream] = []
        try:
            for index, prompt in enumerate(prompts):
                try:
                    requests.append(llm.submit(prompt, params))
                except InvalidRequestError as exc:  # too long for the context: refused before queueing
                    if len(prompts) > 1 and type(exc) is InvalidRequestError:
                        raise InvalidRequestError(f"prompt {index}: {exc}", param=exc.param) from None
                    raise
            answers = await asyncio.gather(*(r.started() for r in requests), return_exceptions=True)
        except BaseException:  # refused at the door, or cancelled while waiting: queue the aborts
            for request in requests:
                request.abort()
            raise
        refusals = [(i, a) for i, a in enumerate(answers) if isinstance(a, BaseException)]
        if refusals:
            for request in requests:
                request.abort()
            index, refusal = refusals[0]
            if len(prompts) > 1 and type(refusal) is InvalidRequestError:
                raise InvalidRequestError(f"prompt {index}: {refusal}", param=refusal.param) from None
            raise refusal
        return cls(requests)

    async def _pump(self, index: int, request: RequestStream) -> None:
        try:
            async for out in request:
                self._queue.put_nowait((index, out))
        except Exception as exc:
            self._queue.put_nowait((index, exc))
        else:
            self._queue.put_nowait((index, None))
        finally:
            request.abort()  # a no-op once it finished

    async def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Every prompt's outputs as they come, as ``(prompt index, output)``, until all have finished.

        Raises:
            Exception: what a stream raised mid-way.
        """
        running = len(self._tasks)
        while running:
            index, item = await self._queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item

    def cancel(self) -> None:
        """Queue the abort of every request still running (never waits for the engine)."""
        for request in self._requests:
            request.abort()
        for task in self._tasks:
            task.cancel()

    async def aclose(self) -> None:
        """Abort every request still running and wait until the readers are gone."""
        self.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def outputs(
    state: ServerState, job: Job, ticket: Ticket
) -> AsyncIterator[tuple[int, CompletionOutput]]:
    """Each sample's news as ``(prompt index, output)``, its tokens counted in the metrics.

    Raises:
        APIError: an engine request failed (the server shut down, or generation broke).
    """
    assert job.streams is not None
    async for prompt, out in job.streams:
        if out.error is not None:
            raise request_failed(out.error, closed=state.closed)
        for c in out.outputs:
            if c.text or c.token_ids or c.finish_reason:
                ticket.tokens(len(c.token_ids))
                yield prompt, c


@dataclass
class Job:
    """A validated generation request, its engine requests queued (none when nothing is generated)."""

    streams: EngineStreams | None

    def cancel(self) -> None:
        """Abort the job's engine requests."""
        if self.streams is not None:
            self.streams.cancel()

    async def aclose(self) -> None:
        """Abort the job's engine requests and wait until they are gone."""
        if self.streams is not None:
            await self.streams.aclose()
