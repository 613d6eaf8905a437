"""``POST /v1/chat/completions``: a conversation rendered with the model's chat template, ``n`` replies.

:func:`lmstack.infer.tools.plan_chat` renders the conversation (with its ``tools``) and turns
``response_format`` and ``tool_choice`` into a constraint; the constraint is compiled off the event
loop before anything is queued, so a bad schema, regex or grammar is a 400 naming the field the
client sent. With tools, each reply is parsed (or streamed) into content and ``tool_calls``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from fastapi.responses import Response

from lmstack.core import LMStackError
from lmstack.infer._errors import InvalidRequestError
from lmstack.infer._sampling_params import SamplingParams
from lmstack.infer.server import _serving as serving
from lmstack.infer.server._errors import APIError, from_exception
from lmstack.infer.server._http import json_response, sse
from lmstack.infer.server._logprobs import chat_logprobs
from lmstack.infer.server._protocol import ChatCompletionRequest
from lmstack.infer.server._state import ServerState, Ticket
from lmstack.infer.tools import ChatPlan, ReplyDelta, plan_chat

__all__ = ["ChatJob", "chat", "chat_stream", "prepare_chat"]


@dataclass
class ChatJob(serving.Job):
    """A validated chat request: its plan (prompt, sampling parameters, tools) and the number of replies."""

    request: ChatCompletionRequest
    plan: ChatPlan
    n: int

    @property
    def prompt(self) -> list[int]:
        """The rendered conversation's token ids."""
        return self.plan.prompt_ids


def _constraint_source(request: ChatCompletionRequest, params: SamplingParams, plan: ChatPlan) -> str:
    """The request field a plan's constraint came from, for the error when it cannot compile."""
    if params.guided_kind is not None:  # the client's own guided_* field
        return params.guided_kind
    if plan.mode in ("required", "named"):
        return "tools"
    return "response_format"


async def prepare_chat(state: ServerState, request: ChatCompletionRequest) -> ChatJob:
    """Render and check the conversation, compile its constraint and queue its engine request.

    Raises:
        APIError: the request cannot be served as asked (a 400 naming the field at fault).
    """
    if request.top_logprobs is not None and not request.logprobs:
        raise APIError.invalid("top_logprobs needs logprobs: true.", param="top_logprobs")
    explicit = request.max_completion_tokens is not None
    param = "max_completion_tokens" if explicit else "max_tokens"
    asked = request.max_completion_tokens if explicit else request.max_tokens
    if asked == 0:
        raise APIError.invalid(f"{param} must be at least 1 for a chat completion.", param=param)
    logprobs = (request.top_logprobs or 0) if request.logprobs else None
    # The engine knows the conversation as the prompt; OpenAI's chat names some fields differently.
    renames = {"prompt": "messages", "logprobs": "top_logprobs", "max_tokens": param}
    # Unset max_tokens: the engine generates up to the end of the context (or of the KV cache).
    params = serving.sampling(state, request, asked, logprobs, renames)
    response_format = None if request.response_format is None else request.response_format.as_dict()
    try:
        # Off the event loop: a long conversation or a large tool list takes a while to render.
        # The server's tokenizer refuses a rendered conversation far too long before encoding it.
        plan = await asyncio.to_thread(
            plan_chat, state.tokens.for_chat(), [message.as_dict() for message in request.messages], params,
            tools=request.tools, tool_choice=request.tool_choice, response_format=response_format,
            parallel_tool_calls=request.parallel_tool_calls is not False,
            tool_call_parser=state.tool_call_parser,
        )  # fmt: skip
    except InvalidRequestError as exc:
        codes = {"prompt": serving.CONTEXT_LENGTH_EXCEEDED}  # plan_chat blames no other field "prompt"
        raise from_exception(exc, closed=state.closed, renames=renames, codes=codes) from None
    except LMStackError as exc:
        raise APIError.invalid(f"cannot render the conversation with the model's chat template: {exc}",
                               param="messages") from None  # fmt: skip
    if asked is not None:
        serving.check_context(state, len(plan.prompt_ids), asked, "messages", "the conversation")
    source = _constraint_source(request, params, plan)
    await serving.check_guided(state, plan.params, source, len(plan.prompt_ids))
    try:
        streams = await serving.EngineStreams.open(state.llm, [plan.prompt_ids], plan.params)
    except InvalidRequestError as exc:
        # A rendered conversation is never empty nor outside the vocabulary: the engine refuses it
        # only for its length.
        codes = {"prompt": serving.CONTEXT_LENGTH_EXCEEDED}
        raise from_exception(exc, closed=state.closed, renames=renames, codes=codes) from None
    state.metrics.prompt_tokens.inc(len(plan.prompt_ids))
    return ChatJob(streams, request, plan, plan.params.n)


def _message(plan: ChatPlan, text: str, finish: str | None) -> tuple[dict[str, Any], str | None]:
    """A whole reply as an assistant message (its tool calls parsed out), and its finish reason."""
    if not plan.offers_tools:
        return {"role": "assistant", "content": text}, finish
    parsed = plan.parse(text)
    calls = parsed.tool_calls
    message: dict[str, Any] = {"role": "assistant", "content": parsed.content or (None if calls else "")}
    if calls:
        message["tool_calls"] = [call.to_openai() for call in calls]
    return message, _finish(finish, bool(calls))


def _finish(finish: str | None, called: bool) -> str | None:
    # OpenAI says "tool_calls" when a reply ended by making calls; a cut-off one stays "length".
    return "tool_calls" if called and finish == "stop" else finish


def _delta(piece: ReplyDelta) -> dict[str, Any]:
    """A reply streamer's delta in OpenAI's chunk shape."""
    delta: dict[str, Any] = {}
    if piece.content is not None:
        delta["content"] = piece.content
    call = piece.tool_call
    if call is not None:
        entry: dict[str, Any] = {"index": call.index}
        if call.id is not None:  # the call's first delta names it
            entry.update(
                id=call.id, type="function", function={"name": call.name, "arguments": call.arguments}
            )
        else:
            entry["function"] = {"arguments": call.arguments}
        delta["tool_calls"] = [entry]
    return delta


def _logprobs(state: ServerState, job: ChatJob, token_ids: list[int], entries: list[dict[int, float]]) -> Any:
    if not job.request.logprobs:
        return None
    return {"content": chat_logprobs(state.texts, token_ids, entries, job.request.top_logprobs or 0)}


async def chat(state: ServerState, job: ChatJob, ticket: Ticket, created: int, rid: str) -> Response:
    """The whole chat completion, once every reply has finished."""
    n = job.n
    texts = [""] * n
    tokens: list[list[int]] = [[] for _ in range(n)]
    entries: list[list[dict[int, float]]] = [[] for _ in range(n)]
    finish: list[str | None] = [None] * n
    try:
        async for _, c in serving.outputs(state, job, ticket):
            texts[c.index] += c.text
            tokens[c.index].extend(c.token_ids)
            entries[c.index].extend(c.logprobs or [])
            finish[c.index] = c.finish_reason or finish[c.index]
    finally:
        await job.aclose()
    choices = []
    for i in range(n):
        message, reason = _message(job.plan, texts[i], finish[i])
        logprobs = _logprobs(state, job, tokens[i], entries[i])
        choices.append({"index": i, "message": message, "logprobs": logprobs, "finish_reason": reason})
    prompt_tokens, completion_tokens = len(job.prompt), sum(len(t) for t in tokens)
    return json_response(
        {**serving.head(state, rid, created, "chat.completion"), "choices": choices,
         "usage": serving.usage(prompt_tokens, completion_tokens)}
    )  # fmt: skip


async def chat_stream(
    state: ServerState, job: ChatJob, ticket: Ticket, created: int, rid: str
) -> AsyncGenerator[str, None]:
    """The chat completion's events: a role announcement per reply, then the deltas (no ``[DONE]``).

    When tools are offered, each reply's text goes through its plan's streamer: content deltas as
    ``{"content": ...}``, tool calls as OpenAI's ``tool_calls`` deltas (the first names the call,
    later ones add to its arguments).
    """
    include_usage, extra = serving.stream_usage(job.request)
    chunk = serving.head(state, rid, created, "chat.completion.chunk")
    completion_tokens = 0
    streamers = [job.plan.streamer() if job.plan.offers_tools else None for _ in range(job.n)]
    for i in range(job.n):
        first = {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None}  # fmt: skip
        yield sse({**chunk, "choices": [first], **extra})
    async for _, c in serving.outputs(state, job, ticket):
        completion_tokens += len(c.token_ids)
        logprobs = _logprobs(state, job, c.token_ids, c.logprobs or [])
        streamer = streamers[c.index]
        finish = c.finish_reason
        if streamer is None:
            deltas = [{"content": c.text} if c.text or not finish else {}]
        else:
            pieces = streamer.feed(c.text) if c.text else []
            if finish is not None:
                pieces += streamer.finish()
                finish = _finish(finish, bool(streamer.calls))
            deltas = [_delta(piece) for piece in pieces]
            if not deltas and (finish is not None or logprobs is not None):
                deltas = [{}]  # the finish reason or the log-probs of held-back text still go out
        for k, delta in enumerate(deltas):
            choice = {
                "index": c.index,
                "delta": delta,
                "logprobs": logprobs if k == 0 else None,
                "finish_reason": finish if k == len(deltas) - 1 else None,
            }
            yield sse({**chunk, "choices": [choice], **extra})
    if include_usage:
        yield sse({**chunk, "choices": [], "usage": serving.usage(len(job.prompt), completion_tokens)})
