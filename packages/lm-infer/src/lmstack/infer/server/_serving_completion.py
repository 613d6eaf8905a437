"""``POST /v1/completions``: OpenAI's legacy completions (text, batches, token ids, echo, log-probs).

Each prompt of a batch is its own engine request, ``n`` samples each; choice ``i * n + j`` is sample
``j`` of prompt ``i``. ``max_tokens: 0`` with ``echo`` and ``logprobs`` scores the prompt without
generating (what ``RemoteLLM.loglikelihood`` and lm-evaluation-harness send). A ``guided_*`` field or
a JSON ``response_format`` constrains every sample; the constraint is compiled off the event loop
before anything is queued (a 400 naming the field when it cannot be).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from fastapi.responses import Response

from lmstack.infer._errors import InvalidRequestError
from lmstack.infer._sampling_params import GUIDED_FIELDS
from lmstack.infer.server import _serving as serving
from lmstack.infer.server._errors import APIError, from_exception
from lmstack.infer.server._http import json_response, sse
from lmstack.infer.server._logprobs import TextOffsets, completion_logprobs
from lmstack.infer.server._protocol import CompletionChoice, CompletionRequest
from lmstack.infer.server._state import ServerState, Ticket
from lmstack.infer.tools._choice import response_format_schema

__all__ = ["CompletionJob", "complete", "complete_stream", "prepare_completion"]

# Most log-prob entries of a response built on the event loop; more are built in a worker thread.
_INLINE_LOGPROBS = 256


@dataclass
class CompletionJob(serving.Job):
    """A validated completions request: its prompts' ids and texts, and the prompts' log-probs if echoed."""

    request: CompletionRequest
    prompts: list[list[int]]
    texts: list[str]
    prompt_logprobs: list[list[dict[int, float] | None]] | None

    @property
    def n(self) -> int:
        """Samples per prompt."""
        return self.request.n

    @property
    def prompt_tokens(self) -> int:
        """Tokens in all the prompts."""
        return sum(len(ids) for ids in self.prompts)


def _batch(request: CompletionRequest) -> list[str | list[int]]:
    raw = request.prompt
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw[0], int):  # a flat list of ints is one token-id prompt
        return [list(raw)]
    return list(raw)


async def _score_prompts(state: ServerState, prompts: list[list[int]], top_k: int) -> list[Any]:
    """Each prompt's log-probs (a forward pass each, off the event loop)."""
    return [await asyncio.to_thread(state.llm.prompt_logprobs, ids, top_k) for ids in prompts]


def _response_format(request: CompletionRequest) -> dict[str, Any] | None:
    """``{"guided_json": schema}`` for a JSON ``response_format`` (as vLLM takes it here), else None."""
    if request.response_format is None:
        return None
    try:
        schema = response_format_schema(request.response_format.as_dict())
    except InvalidRequestError as exc:
        raise APIError.invalid(str(exc), param="response_format") from None
    if schema is None:
        return None
    given = [name for name in GUIDED_FIELDS if getattr(request, name) is not None]
    if given:
        raise APIError.invalid(
            f"response_format {request.response_format.type!r} and {given[0]} both constrain the output; "
            "send one of them.",
            param="response_format",
        )
    return {"guided_json": schema}


async def prepare_completion(state: ServerState, request: CompletionRequest) -> CompletionJob:
    """Tokenize and check the request, compile its constraint, score echoed prompts, queue the engine work.

    Raises:
        APIError: the request cannot be served as asked (a 400 naming the field at fault).
    """
    batch = _batch(request)
    tokenizer = state.llm.tokenizer
    max_tokens = 16 if request.max_tokens is None else request.max_tokens

    def what(index: int) -> str:
        return f"the prompt {index}" if len(batch) > 1 else "the prompt"

    # A text whose size alone proves it too long is refused before it is tokenized.
    for index, item in enumerate(batch):
        if isinstance(item, str):
            least = state.tokens.at_least(item)
            if least:
                serving.check_context(state, least, max_tokens, "prompt", what(index), at_least=True)
    # Off the event loop (and without the GIL): a long text takes the tokenizer a while.
    prompts = [await state.tokens.encode_async(item) if isinstance(item, str) else item for item in batch]
    for index, ids in enumerate(prompts):
        serving.check_context(state, len(ids), max_tokens, "prompt", what(index))
    # max_tokens 0 (scoring with echo) generates nothing, but the other fields are still checked.
    guided = _response_format(request)
    params = serving.sampling(state, request, max_tokens or None, request.logprobs, guided=guided)
    if max_tokens:  # nothing is generated (nor constrained) with max_tokens 0
        await serving.check_guided(state, params, "response_format" if guided else None)
    echo_logprobs = request.echo and request.logprobs is not None
    try:
        # With max_tokens 0 nothing is queued in the engine: scoring the prompts is what passes them
        # through the model's checks then.
        scores = (
            await _score_prompts(state, prompts, request.logprobs or 0)
            if echo_logprobs or not max_tokens
            else None
        )
        streams = await serving.EngineStreams.open(state.llm, prompts, params) if max_tokens else None
    except InvalidRequestError as exc:
        raise from_exception(exc, closed=state.closed) from None
    # Decoded only now: the ids are known to be in the vocabulary.
    texts = [
        item
        if isinstance(item, str)
        else tokenizer.decode(item, skip_special_tokens=request.skip_special_tokens)
        for item in batch
    ]
    job = CompletionJob(streams, request, prompts, texts, scores if echo_logprobs else None)
    state.metrics.prompt_tokens.inc(job.prompt_tokens)
    return job


def _choice(job: CompletionJob, prompt: int, index: int, *, echo: bool) -> CompletionChoice:
    """A choice before generation: the echoed prompt, or nothing; "length" when nothing is generated."""
    finish = "length" if job.streams is None else None
    return {
        "index": index,
        "text": job.texts[prompt] if echo else "",
        "logprobs": None,
        "finish_reason": finish,
    }


async def complete(
    state: ServerState, job: CompletionJob, ticket: Ticket, created: int, rid: str
) -> Response:
    """The whole completion, once every sample has finished."""
    request = job.request
    choices: dict[int, CompletionChoice] = {}
    tokens: dict[int, list[int]] = {}
    entries: dict[int, list[dict[int, float] | None]] = {}
    for prompt in range(len(job.prompts)):
        for sample in range(job.n):
            index = prompt * job.n + sample
            choices[index] = _choice(job, prompt, index, echo=request.echo)
            choices[index]["finish_reason"] = "length"
            tokens[index] = list(job.prompts[prompt]) if request.echo else []
            entries[index] = list(job.prompt_logprobs[prompt]) if job.prompt_logprobs is not None else []
    completion_tokens = 0
    try:
        if job.streams is not None:
            async for prompt, c in serving.outputs(state, job, ticket):
                index = prompt * job.n + c.index
                choices[index]["text"] += c.text
                tokens[index].extend(c.token_ids)
                entries[index].extend(c.logprobs or [])
                completion_tokens += len(c.token_ids)
                if c.finish_reason is not None:
                    choices[index]["finish_reason"] = c.finish_reason
    finally:
        await job.aclose()
    if request.logprobs is not None:

        def fill() -> None:
            for index, choice in choices.items():
                choice["logprobs"] = completion_logprobs(
                    state.texts, tokens[index], entries[index], TextOffsets()
                )

        # Echoed prompts make this thousands of entries: built off the event loop.
        if sum(len(t) for t in tokens.values()) > _INLINE_LOGPROBS:
            await asyncio.to_thread(fill)
        else:
            fill()
    choice_list = [choices[i] for i in sorted(choices)]
    return json_response(
        {**serving.head(state, rid, created, "text_completion"), "choices": choice_list,
         "usage": serving.usage(job.prompt_tokens, completion_tokens)}
    )  # fmt: skip


async def complete_stream(
    state: ServerState, job: CompletionJob, ticket: Ticket, created: int, rid: str
) -> AsyncGenerator[str, None]:
    """The completion's events: the echoed prompts first, then each sample's deltas (no ``[DONE]``)."""
    request = job.request
    include_usage, extra = serving.stream_usage(request)
    chunk = serving.head(state, rid, created, "text_completion")
    offsets: dict[int, TextOffsets] = {}
    completion_tokens = 0
    if request.echo or job.streams is None:
        for prompt in range(len(job.prompts)):
            for sample in range(job.n):
                index = prompt * job.n + sample
                choice = _choice(job, prompt, index, echo=request.echo)
                offsets[index] = TextOffsets()
                if job.prompt_logprobs is not None:  # a whole prompt's: built off the event loop
                    choice["logprobs"] = await asyncio.to_thread(
                        completion_logprobs,
                        state.texts, job.prompts[prompt], job.prompt_logprobs[prompt], offsets[index],
                    )  # fmt: skip
                yield sse({**chunk, "choices": [choice], **extra})
    if job.streams is not None:
        async for prompt, c in serving.outputs(state, job, ticket):
            index = prompt * job.n + c.index
            logprobs = None
            if request.logprobs is not None:
                offset = offsets.setdefault(index, TextOffsets())
                logprobs = completion_logprobs(state.texts, c.token_ids, c.logprobs or [], offset)
            completion_tokens += len(c.token_ids)
            delta: CompletionChoice = {
                "index": index,
                "text": c.text,
                "logprobs": logprobs,
                "finish_reason": c.finish_reason,
            }
            yield sse({**chunk, "choices": [delta], **extra})
    if include_usage:
        yield sse({**chunk, "choices": [], "usage": serving.usage(job.prompt_tokens, completion_tokens)})
