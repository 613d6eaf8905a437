"""Response parsing: OpenAI's completions, chat completions and stream chunks as lmstack's outputs.

Token ids come from the server when it sends them (vLLM's ``return_token_ids``, or tokens spelled
``token_id:N``), else from the log-probs' token texts or the text itself, through the local
tokenizer. A chat message's ``tool_calls`` (or, streamed, its ``tool_calls`` deltas, joined by
index) become the output's :class:`~lmstack.infer.ToolCall` list.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lmstack.infer._errors import RemoteError
from lmstack.infer._outputs import CompletionOutput, RequestOutput, ToolCall
from lmstack.infer._sampling_params import SamplingParams
from lmstack.infer.remote._sse import ServerSentEvent
from lmstack.infer.remote._tokens import TOKEN_ID_PREFIX, TokenResolver

__all__ = [
    "RemoteRequestOutput",
    "StreamAssembler",
    "Usage",
    "context_length",
    "model_cards",
    "parse_chat",
    "parse_completion",
    "stream_error",
]

logger = logging.getLogger(__name__)


@dataclass
class Usage:
    """Token counts the server reported for a request (or summed over many).

    Attributes:
        prompt_tokens: Tokens in the prompt(s).
        completion_tokens: Tokens generated.
        total_tokens: Both together.
        cached_tokens: Prompt tokens served from the server's prefix cache, when it says.
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cached_tokens: int | None = None

    @classmethod
    def from_json(cls, value: Any) -> Usage | None:
        """Reads an OpenAI ``usage`` object (None when absent or malformed)."""
        if not isinstance(value, Mapping):
            return None
        details = value.get("prompt_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, Mapping) else None
        try:
            prompt = int(value.get("prompt_tokens") or 0)
            completion = int(value.get("completion_tokens") or 0)
            total = int(value.get("total_tokens") or prompt + completion)
            return cls(prompt, completion, total, None if cached is None else int(cached))
        except (TypeError, ValueError):
            return None

    def add(self, other: Usage) -> None:
        """Adds ``other``'s counts to these."""
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.total_tokens += other.total_tokens
        if other.cached_tokens is not None:
            self.cached_tokens = (self.cached_tokens or 0) + other.cached_tokens


def model_cards(body: Any, server: str) -> list[Mapping[str, Any]]:
    """The model objects of a ``GET /v1/models`` response (each has an ``id``).

    Raises:
        RemoteError: the response holds no model list.
    """
    data = body.get("data") if isinstance(body, Mapping) else None
    if not isinstance(data, list):
        raise RemoteError(
            f"GET {server}/models did not return a model list; is it an OpenAI-compatible server?",
            server=server,
        )
    return [card for card in data if isinstance(card, Mapping) and "id" in card]


def context_length(cards: Sequence[Mapping[str, Any]], model: str) -> int | None:
    """The context length the server reports for ``model``, or None when it does not say.

    lmstack serve and vLLM put it in each model object as ``max_model_len``.
    """
    for card in cards:
        value = card.get("max_model_len")
        if str(card["id"]) == model and isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


@dataclass
class RemoteRequestOutput(RequestOutput):
    """A :class:`~lmstack.infer.RequestOutput` from a server, with what the server reported about it.

    Attributes:
        usage: Token counts of the request (on a stream, only on the last output, and only when the
            server sends them).
        model: The model that served the request, as the server names it.
    """

    usage: Usage | None = None
    model: str | None = None


# -- log-probs ---------------------------------------------------------------------------------------
_Step = tuple[str, float | None, list[tuple[str, float]]]  # token text, its log-prob, alternatives


def _completion_steps(logprobs: Any) -> list[_Step] | None:
    """Steps of a /v1/completions ``logprobs`` object (``tokens``, ``token_logprobs``, ``top_logprobs``)."""
    if not isinstance(logprobs, Mapping) or not isinstance(logprobs.get("tokens"), list):
        return None
    tokens = logprobs["tokens"]
    values = logprobs.get("token_logprobs") or [None] * len(tokens)
    tops = logprobs.get("top_logprobs") or [None] * len(tokens)
    steps: list[_Step] = []
    for token, value, top in zip(tokens, values, tops, strict=False):
        alternatives = [(str(k), float(v)) for k, v in top.items()] if isinstance(top, Mapping) else []
        steps.append((str(token), None if value is None else float(value), alternatives))
    return steps


def _chat_steps(logprobs: Any) -> list[_Step] | None:
    """Steps of a /v1/chat/completions ``logprobs`` object (``content`` entries)."""
    if not isinstance(logprobs, Mapping) or not isinstance(logprobs.get("content"), list):
        return None
    steps: list[_Step] = []
    for item in logprobs["content"]:
        if not isinstance(item, Mapping):
            continue
        alternatives = [
            (str(alt.get("token", "")), float(alt["logprob"]))
            for alt in item.get("top_logprobs") or ()
            if isinstance(alt, Mapping) and alt.get("logprob") is not None
        ]
        value = item.get("logprob")
        steps.append((str(item.get("token", "")), None if value is None else float(value), alternatives))
    return steps


def _logprob_dicts(
    steps: list[_Step], token_ids: Sequence[int] | None, resolver: TokenResolver
) -> list[dict[int, float]]:
    """``{token_id: logprob}`` per step: the chosen token first, then the alternatives whose id is known."""
    out: list[dict[int, float]] = []
    for i, (token, value, alternatives) in enumerate(steps):
        entry: dict[int, float] = {}
        chosen = token_ids[i] if token_ids is not None and i < len(token_ids) else resolver.token_id(token)
        if chosen is not None and value is not None:
            entry[chosen] = value
        for alt, alt_value in alternatives:
            alt_id = resolver.token_id(alt)
            if alt_id is not None:
                entry.setdefault(alt_id, alt_value)
        out.append(entry)
    return out


def _ids_from_steps(steps: list[_Step] | None) -> list[int] | None:
    """Token ids when the server spelled every token as ``token_id:N``."""
    if not steps or not all(token.startswith(TOKEN_ID_PREFIX) for token, _, _ in steps):
        return None
    ids = [TokenResolver(None).token_id(token) for token, _, _ in steps]
    return None if any(i is None for i in ids) else [int(i) for i in ids if i is not None]


def _int_list(value: Any) -> list[int] | None:
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return [int(v) for v in value]
    return None


@dataclass
class _Sample:
    text: str
    token_ids: list[int] | None
    steps: list[_Step] | None
    finish_reason: str | None
    stop_reason: str | int | None
    tool_calls: list[Mapping[str, Any]] = field(default_factory=list)  # as sent: whole, or deltas


def _arguments(value: Any) -> str:
    """A call's arguments as JSON text (OpenAI sends text; a server sending an object is forgiven)."""
    return value if isinstance(value, str) else json.dumps({} if value is None else value)


def _tool_call(entry: Mapping[str, Any]) -> ToolCall:
    function = entry.get("function")
    function = function if isinstance(function, Mapping) else {}
    return ToolCall(
        id=str(entry.get("id") or ""), name=str(function.get("name") or ""),
        arguments=_arguments(function.get("arguments")),
    )  # fmt: skip


def _delta_arguments(entry: Mapping[str, Any]) -> str:
    """The arguments text a streamed ``tool_calls`` delta adds ("" when it adds none)."""
    function = entry.get("function")
    value = function.get("arguments") if isinstance(function, Mapping) else None
    return "" if value is None else _arguments(value)


def _sample(choice: Mapping[str, Any], *, chat: bool, delta: bool) -> _Sample:
    calls: list[Mapping[str, Any]] = []
    if chat:
        message = choice.get("delta" if delta else "message") or {}
        text = message.get("content") if isinstance(message, Mapping) else None
        steps = _chat_steps(choice.get("logprobs"))
        raw = message.get("tool_calls") if isinstance(message, Mapping) else None
        calls = [entry for entry in raw if isinstance(entry, Mapping)] if isinstance(raw, list) else []
    else:
        text = choice.get("text")
        steps = _completion_steps(choice.get("logprobs"))
    ids = _int_list(choice.get("token_ids"))
    if ids is None:
        ids = _ids_from_steps(steps)
    stop_reason = choice.get("stop_reason")
    if not isinstance(stop_reason, (str, int)) or isinstance(stop_reason, bool):
        stop_reason = None
    finish = choice.get("finish_reason")
    return _Sample(text if isinstance(text, str) else "", ids, steps, finish or None, stop_reason, calls)


def _completion_output(
    index: int, sample: _Sample, resolver: TokenResolver, want_logprobs: bool, *, tokenize: bool
) -> CompletionOutput:
    token_ids = sample.token_ids
    if token_ids is None and sample.steps:
        # The log-probs name each generated token: their ids are the tokens themselves, unlike the
        # text's re-tokenization (which can differ).
        resolved = [resolver.token_id(token) for token, _, _ in sample.steps]
        if all(i is not None for i in resolved):
            token_ids = [int(i) for i in resolved if i is not None]
    if token_ids is None and tokenize and sample.text:
        token_ids = resolver.encode(sample.text)
    logprobs = cumulative = None
    if want_logprobs:
        steps = sample.steps or []
        logprobs = _logprob_dicts(steps, token_ids, resolver)
        cumulative = sum(value for _, value, _ in steps if value is not None)
    return CompletionOutput(
        index=index,
        text=sample.text,
        token_ids=list(token_ids or []),
        cumulative_logprob=cumulative,
        logprobs=logprobs,
        finish_reason=sample.finish_reason,
        stop_reason=sample.stop_reason,
    )


def _choices(body: Any, server: str) -> list[Mapping[str, Any]]:
    choices = body.get("choices") if isinstance(body, Mapping) else None
    if not isinstance(choices, list) or not all(isinstance(c, Mapping) for c in choices):
        raise RemoteError(
            f"{server} answered without a 'choices' list; is it an OpenAI-compatible server? "
            f"Got: {json.dumps(body)[:300]}",
            server=server,
        )
    return sorted(choices, key=lambda c: int(c.get("index", 0)))


def _prompt_ids(body: Mapping[str, Any], choices: Sequence[Mapping[str, Any]]) -> list[int] | None:
    for source in (*choices[:1], body):
        ids = _int_list(source.get("prompt_token_ids"))
        if ids is not None:
            return ids
    return None


def parse_completion(
    body: Any,
    *,
    prompt: str | None,
    prompt_token_ids: list[int] | None,
    params: SamplingParams,
    resolver: TokenResolver,
    server: str,
    chat: bool = False,
    tools: bool = False,
) -> RemoteRequestOutput:
    """A finished :class:`RemoteRequestOutput` from a /v1/completions (or, with ``chat``, chat) response.

    Token ids come from the server when it sends them (vLLM's ``return_token_ids``, or tokens spelled
    ``token_id:N``), else from the local tokenizer, else stay empty. A chat message's ``tool_calls``
    become each output's ``tool_calls``; with ``tools`` (the request offered some) a reply without
    calls has an empty list rather than None.
    """
    choices = _choices(body, server)
    outputs = []
    for i, c in enumerate(choices):
        sample = _sample(c, chat=chat, delta=False)
        out = _completion_output(int(c.get("index", i)), sample, resolver, params.logprobs is not None,
                                 tokenize=True)  # fmt: skip
        if sample.tool_calls or tools:
            out.tool_calls = [_tool_call(entry) for entry in sample.tool_calls]
        outputs.append(out)
    usage = Usage.from_json(body.get("usage"))
    ids = _prompt_ids(body, choices) or prompt_token_ids
    return RemoteRequestOutput(
        request_id=str(body.get("id") or ""),
        prompt=prompt,
        prompt_token_ids=list(ids or []),
        outputs=outputs,
        finished=True,
        num_cached_tokens=(usage.cached_tokens or 0) if usage else 0,
        usage=usage,
        model=body.get("model"),
    )


def parse_chat(
    body: Any, *, params: SamplingParams, resolver: TokenResolver, server: str, tools: bool = False
) -> RemoteRequestOutput:
    """A finished :class:`RemoteRequestOutput` from a /v1/chat/completions response."""
    return parse_completion(
        body, prompt=None, prompt_token_ids=None, params=params, resolver=resolver, server=server, chat=True,
        tools=tools,
    )  # fmt: skip


def stream_error(obj: Any, event: ServerSentEvent, server: str) -> RemoteError | None:
    """The error a stream event reports, if it is one (``{"error": {...}}`` or an ``error`` event)."""
    err = obj.get("error") if isinstance(obj, Mapping) else None
    if not err and event.event != "error":
        return None
    if isinstance(err, Mapping):
        message = str(err.get("message") or json.dumps(err))
        code = err.get("code")
    else:
        message, code = str(err or event.data), None
    status = code if isinstance(code, int) and not isinstance(code, bool) and 400 <= code < 600 else None
    return RemoteError(f"{server} reported an error in the middle of the stream: {message}",
                       status_code=status, server=server)  # fmt: skip


@dataclass
class StreamAssembler:
    """Turns one request's stream chunks into delta :class:`RemoteRequestOutput` s.

    Each chunk with new text, tokens or a finish reason becomes one output holding only what is new.
    The one that finishes the last sample is held back until the stream ends, so the usage chunk that
    follows it (``stream_options.include_usage``) can be attached: the last output has ``finished``.
    Chat ``tool_calls`` deltas are joined by index (the first names the call, the others add to its
    arguments); each sample's output that finishes it carries the whole calls.

    Args:
        chat: Whether the chunks are chat completion chunks.
        params: The request's sampling parameters (``n`` and ``logprobs`` matter).
        prompt: The prompt text, when the request gave text.
        prompt_token_ids: The prompt's ids, when known before the server says.
        resolver: Maps token strings to ids.
        server: The server's URL, for messages.
        tools: Whether the request offered tools (a reply without calls then has ``tool_calls == []``).
    """

    chat: bool
    params: SamplingParams
    prompt: str | None
    prompt_token_ids: list[int] | None
    resolver: TokenResolver
    server: str
    tools: bool = False
    done: bool = False
    request_id: str = ""
    model: str | None = None
    usage: Usage | None = None
    _finished: set[int] = field(default_factory=set)
    _cumulative: dict[int, float] = field(default_factory=dict)
    _held: RemoteRequestOutput | None = None
    _calls: dict[int, dict[int, ToolCall]] = field(default_factory=dict)  # by sample, then call index

    def _add_calls(self, sample: int, deltas: list[Mapping[str, Any]]) -> None:
        calls = self._calls.setdefault(sample, {})
        for position, entry in enumerate(deltas):
            index = entry.get("index", position)
            index = index if isinstance(index, int) else position
            part = _tool_call(entry)
            call = calls.get(index)
            if call is None:
                calls[index] = ToolCall(part.id, part.name, _delta_arguments(entry))
                continue
            call.id = call.id or part.id
            call.name = call.name or part.name
            call.arguments += _delta_arguments(entry)

    def _finished_calls(self, sample: int) -> list[ToolCall] | None:
        calls = self._calls.get(sample, {})
        if not calls and not self.tools:
            return None
        return [calls[index] for index in sorted(calls)]

    def feed(self, event: ServerSentEvent) -> list[RemoteRequestOutput]:
        """Consumes one event; returns the outputs to deliver now.

        Raises:
            RemoteError: the event reports an error or is not JSON.
        """
        if self.done:
            return []
        if event.data.strip() == "[DONE]":
            self.done = True
            return []
        try:
            obj = json.loads(event.data)
        except ValueError as exc:
            raise RemoteError(
                f"{self.server} sent a stream event that is not JSON: {event.data[:200]!r}",
                server=self.server,
            ) from exc
        error = stream_error(obj, event, self.server)
        if error is not None:
            raise error
        if not isinstance(obj, Mapping):
            return []
        self.request_id = str(obj.get("id") or self.request_id)
        self.model = obj.get("model") or self.model
        usage = Usage.from_json(obj.get("usage"))
        if usage is not None:
            self.usage = usage
        choices = obj.get("choices") or []
        ids = _prompt_ids(obj, [c for c in choices if isinstance(c, Mapping)])
        if ids is not None:
            self.prompt_token_ids = ids
        outputs: list[CompletionOutput] = []
        for choice in choices:
            if not isinstance(choice, Mapping):
                continue
            index = int(choice.get("index", 0))
            sample = _sample(choice, chat=self.chat, delta=True)
            if sample.tool_calls:
                self._add_calls(index, sample.tool_calls)
            if not (sample.text or sample.token_ids or sample.steps or sample.finish_reason):
                continue  # a chat role announcement, or an empty keep-alive chunk
            out = _completion_output(
                index, sample, self.resolver, self.params.logprobs is not None, tokenize=False
            )
            if out.cumulative_logprob is not None:
                self._cumulative[index] = self._cumulative.get(index, 0.0) + out.cumulative_logprob
                out.cumulative_logprob = self._cumulative[index]
            if out.finish_reason is not None:
                self._finished.add(index)
                out.tool_calls = self._finished_calls(index)
            outputs.append(out)
        if not outputs:
            return []
        delta = self._output(sorted(outputs, key=lambda o: o.index))
        if delta.finished:
            self._held = delta
            return []
        return [delta]

    def finish(self) -> list[RemoteRequestOutput]:
        """The stream ended: returns the held last output.

        Raises:
            RemoteError: the stream ended before every sample finished and without ``[DONE]``.
        """
        if self._held is not None:
            held, self._held = self._held, None
            held.usage = self.usage
            if self.usage is not None and self.usage.cached_tokens is not None:
                held.num_cached_tokens = self.usage.cached_tokens
            return [held]
        if not self.done:
            raise RemoteError(
                f"the stream from {self.server} ended before the request finished (no finish_reason and no "
                "[DONE]); the server may have crashed or a proxy cut the response.",
                server=self.server,
            )
        missing = sorted(set(range(self.params.n)) - self._finished)
        logger.warning("%s ended a stream without a finish_reason for samples %s", self.server, missing)
        final = self._output(
            [
                CompletionOutput(index=i, finish_reason="stop", tool_calls=self._finished_calls(i))
                for i in missing
            ]
        )
        final.finished = True
        final.usage = self.usage
        return [final]

    def _output(self, outputs: list[CompletionOutput]) -> RemoteRequestOutput:
        return RemoteRequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=list(self.prompt_token_ids or []),
            outputs=outputs,
            finished=len(self._finished) >= self.params.n,
            model=self.model,
        )
