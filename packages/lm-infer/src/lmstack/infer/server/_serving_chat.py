"""``POST /v1/chat/completions``: a conversation rendered with the model's chat template, ``n`` replies."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from fastapi.responses import Response

from lmstack.core import LMStackError
from lmstack.infer._errors import InvalidRequestError
from lmstack.infer.server import _serving as serving
from lmstack.infer.server._errors import APIError, from_exception
from lmstack.infer.server._http import json_response, sse
from lmstack.infer.server._logprobs import chat_logprobs
from lmstack.infer.server._protocol import ChatCompletionRequest
from lmstack.infer.server._state import ServerState, Ticket

__all__ = ["ChatJob", "chat", "chat_stream", "prepare_chat"]


@dataclass
class ChatJob(serving.Job):
    """A validated chat request: the rendered prompt and the number of replies."""

    request: ChatCompletionRequest
    prompt: list[int]
    n: int


def _conversation(request: ChatCompletionRequest) -> list[dict[str, Any]]:
    """The messages as the chat template reads them."""
    conversation: list[dict[str, Any]] = []
    for message in request.messages:
        # OpenAI's "developer" role is the newer name of "system"; chat templates know only the latter.
        role = "system" if message.role == "developer" else message.role
        turn: dict[str, Any] = {"role": role, "content": message.text()}
        if message.name is not None:  # templates may address a participant by name
            turn["name"] = message.name
        conversation.append(turn)
    return conversation


async def prepare_chat(state: ServerState, request: ChatCompletionRequest) -> ChatJob:
    """Render and check the conversation and queue its engine request.

    Raises:
        APIError: the request cannot be served as asked (a 400 naming the field at fault).
    """
    if request.response_format is not None and request.response_format.type != "text":
        raise APIError.invalid(
            f"response_format {request.response_format.type!r} is not supported: this server cannot "
            "constrain decoding to JSON. Use {'type': 'text'}, ask for JSON in the prompt, check the reply.",
            param="response_format",
            code="unsupported_parameter",
        )
    if request.top_logprobs is not None and not request.logprobs:
        raise APIError.invalid("top_logprobs needs logprobs: true.", param="top_logprobs")
    try:
        prompt = state.llm.render_chat(_conversation(request))
    except LMStackError as exc:
        raise APIError.invalid(f"cannot render the conversation with the model's chat template: {exc}",
                               param="messages") from None  # fmt: skip
    explicit = request.max_completion_tokens is not None
    param = "max_completion_tokens" if explicit else "max_tokens"
    asked = request.max_completion_tokens if explicit else request.max_tokens
    if asked == 0:
        raise APIError.invalid(f"{param} must be at least 1 for a chat completion.", param=param)
    if asked is not None:
        serving.check_context(state, len(prompt), asked, "messages", "the conversation")
    logprobs = (request.top_logprobs or 0) if request.logprobs else None
    # The engine knows the conversation as the prompt; OpenAI's chat names some fields differently.
    renames = {"prompt": "messages", "logprobs": "top_logprobs", "max_tokens": param}
    # Unset max_tokens: the engine generates up to the end of the context (or of the KV cache).
    params = serving.sampling(state, request, asked, logprobs, renames)
    try:
        streams = await serving.EngineStreams.open(state.llm, [prompt], params)
    except InvalidRequestError as exc:
        # A rendered conversation is never empty nor outside the vocabulary: the engine refuses it
        # only for its length.
        codes = {"prompt": serving.CONTEXT_LENGTH_EXCEEDED}
        raise from_exception(exc, closed=state.closed, renames=renames, codes=codes) from None
    state.metrics.prompt_tokens.inc(len(prompt))
    return ChatJob(streams, request, prompt, params.n)


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
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": texts[i]},
            "logprobs": _logprobs(state, job, tokens[i], entries[i]),
            "finish_reason": finish[i],
        }
        for i in range(n)
    ]
    prompt_tokens, completion_tokens = len(job.prompt), sum(len(t) for t in tokens)
    return json_response(
        {**serving.head(state, rid, created, "chat.completion"), "choices": choices,
         "usage": serving.usage(prompt_tokens, completion_tokens)}
    )  # fmt: skip


async def chat_stream(
    state: ServerState, job: ChatJob, ticket: Ticket, created: int, rid: str
) -> AsyncGenerator[str, None]:
    """The chat completion's events: a role announcement per reply, then the deltas (no ``[DONE]``)."""
    include_usage, extra = serving.stream_usage(job.request)
    chunk = serving.head(state, rid, created, "chat.completion.chunk")
    completion_tokens = 0
    for i in range(job.n):
        first = {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None}  # fmt: skip
        yield sse({**chunk, "choices": [first], **extra})
    async for _, c in serving.outputs(state, job, ticket):
        completion_tokens += len(c.token_ids)
        choice = {
            "index": c.index,
            "delta": {"content": c.text} if c.text or not c.finish_reason else {},
            "logprobs": _logprobs(state, job, c.token_ids, c.logprobs or []),
            "finish_reason": c.finish_reason,
        }
        yield sse({**chunk, "choices": [choice], **extra})
    if include_usage:
        yield sse({**chunk, "choices": [], "usage": serving.usage(len(job.prompt), completion_tokens)})
