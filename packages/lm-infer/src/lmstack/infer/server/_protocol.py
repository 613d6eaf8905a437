"""The request bodies the server accepts (pydantic, strict) and the shapes of its responses.

Requests are validated strictly, as OpenAI's API does: a field of the wrong type is an error (no
``"5"`` for ``5``, no ``1`` for ``true``), and so is a field the server does not know. Besides
OpenAI's fields (``response_format``, ``tools``, ``tool_choice``, ``parallel_tool_calls`` and
assistant ``tool_calls`` / ``tool`` messages included), the vLLM-style sampling extensions that
:class:`~lmstack.infer.SamplingParams` supports are accepted (``top_k``, ``min_p``,
``repetition_penalty``, ``min_tokens``, ``ignore_eos``, ``stop_token_ids``, ``skip_special_tokens``,
``include_stop_str_in_output``) and vLLM's guided-decoding fields (``guided_json``, ``guided_regex``,
``guided_choice``, ``guided_grammar``; ``guided_decoding_backend`` only as ``"llguidance"``), plus
lmstack's ``guided_json_fit`` (JSON that always completes within the token budget). OpenAI
fields the server cannot honour (logit biases, ``suffix``, the legacy ``functions`` ...) are accepted
only at their neutral value and refused with a clear message otherwise (see :func:`unsupported_fields`).

Ranges of sampling fields (``n``, ``temperature``, ``logprobs`` ...) are checked by
``SamplingParams`` itself, so each rule lives in one place.

Responses are plain dicts typed as ``TypedDict``s: streaming writes one per token, and building
pydantic objects for each would cost more than the JSON encoding itself.
"""

from __future__ import annotations

import reprlib
from typing import Any, Literal, TypedDict

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lmstack.infer.server._json_worker import IntList

__all__ = [
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "ResponseFormat",
    "StreamOptions",
    "Usage",
    "short_repr",
    "unsupported_fields",
]

# Most prompts in one /v1/completions request (each becomes its own engine request).
MAX_PROMPTS = 256


class _ShortRepr(reprlib.Repr):
    def repr_IntList(self, x: IntList, level: int) -> str:  # reprlib dispatches on the type's name
        return self.repr_list(x, level)


_REPR = _ShortRepr()
_REPR.maxstring = _REPR.maxother = 60


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        # OpenAI's API takes null for "the default" on every optional field (clients send it so).
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None}
        return data


class StreamOptions(_Strict):
    """``stream_options``: ``include_usage`` adds a last chunk with the token counts."""

    include_usage: bool = False


class ResponseFormat(_Strict):
    """``response_format``: ``text``, ``json_object`` (any JSON object) or ``json_schema``.

    ``json_schema`` is ``{"name", "schema", "strict", "description"}``; its shape and the schema are
    checked where the constraint is built (:func:`lmstack.infer.tools.plan_chat`).
    """

    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        """The format as the JSON object the client sent."""
        out: dict[str, Any] = {"type": self.type}
        if self.json_schema is not None:
            out["json_schema"] = self.json_schema
        return out


class _Sampling(_Strict):
    """Fields shared by completions and chat completions."""

    model: str
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: Any = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)  # OpenAI's range: a signed int64
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None  # accepted and ignored, as an end-user id for abuse tracking is
    # Known OpenAI fields the server cannot honour: accepted only at their neutral value.
    logit_bias: dict[str, float] | None = None
    # vLLM-style extensions (SamplingParams fields).
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # vLLM's guided decoding (SamplingParams' guided_* fields check them).
    guided_json: Any = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    guided_json_fit: bool | None = None  # lmstack's: JSON that always completes within the token budget
    guided_whitespace_pattern: str | None = None
    response_format: ResponseFormat | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _check_stop(cls, value: Any) -> Any:
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return value
        raise ValueError("stop must be a string, a list of strings or null")


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: OpenAI's legacy completions (text, batches, token ids, echo)."""

    prompt: Any
    max_tokens: int | None = Field(default=16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0)
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _check_prompt(cls, value: Any) -> Any:
        expected = (
            "prompt must be a string, a list of strings, a list of token ids or a list of token-id lists"
        )

        def ids(item: Any) -> bool:
            # An IntList was checked item by item by the JSON child (a long body's token ids).
            return isinstance(item, IntList) or (
                isinstance(item, list) and bool(item) and all(_is_int(t) for t in item)
            )

        if isinstance(value, str) or ids(value):  # a flat list of ints is one prompt, however long
            return value
        if not isinstance(value, list) or not value:
            raise ValueError(f"{expected}; got {_describe(value)}")
        if len(value) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request, got {len(value)}; split the batch")
        if all(isinstance(item, str) for item in value) or all(ids(item) for item in value):
            return value
        raise ValueError(f"{expected} (token-id lists non-empty); got {_describe(value)}")


class ChatMessage(_Strict):
    """One message of a conversation; ``content`` is text or a list of ``{"type": "text"}`` parts.

    An assistant message may carry the ``tool_calls`` it made, and a ``tool`` message answers one
    (``tool_call_id``); their shapes are checked where the conversation is rendered.
    """

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Any = None
    name: str | None = None
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None
    function_call: Any = None  # the legacy function calling: refused (unsupported_fields)
    refusal: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _check_content(cls, value: Any) -> Any:
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, list):
            for index, part in enumerate(value):
                if not isinstance(part, dict) or part.get("type") != "text":
                    kind = part.get("type") if isinstance(part, dict) else _describe(part)
                    raise ValueError(
                        f"content part {index} is {kind!r}; this server takes only text parts "
                        '({"type": "text", "text": ...})'
                    )
                if not isinstance(part.get("text"), str) or set(part) - {"type", "text"}:
                    raise ValueError(f'content part {index} must be {{"type": "text", "text": "..."}}')
            return value
        raise ValueError(f"content must be a string or a list of text parts; got {_describe(value)}")

    def text(self) -> str:
        """The message's content as one string (text parts joined by newlines)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part["text"] for part in self.content)

    def as_dict(self) -> dict[str, Any]:
        """The message as the chat template reads it (OpenAI's shape; normalised by ``plan_chat``)."""
        turn: dict[str, Any] = {"role": self.role, "content": self.text()}
        for name in ("name", "tool_calls", "tool_call_id"):
            value = getattr(self, name)
            if value is not None:  # a participant's name, the calls made, the call answered
                turn[name] = value
        return turn


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``: a conversation rendered with the model's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=0)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0)
    # Function tools; their shapes are checked by lmstack.infer.tools (errors name "tools", "tool_choice").
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    # Accepted and ignored: they do not change what is generated.
    metadata: dict[str, str] | None = None
    store: bool | None = None
    # Known OpenAI fields the server cannot honour: accepted only at their neutral value.
    functions: list[Any] | None = None
    function_call: Any = None
    modalities: list[str] | None = None
    audio: Any = None
    prediction: Any = None


def unsupported_fields(request: CompletionRequest | ChatCompletionRequest) -> list[tuple[str, str]]:
    """The fields of ``request`` set to something the server cannot do: ``(field, why)`` pairs."""
    out: list[tuple[str, str]] = []
    if request.logit_bias:
        out.append(("logit_bias", "logit biases are not supported"))
    if request.guided_decoding_backend not in (None, "llguidance"):
        out.append(("guided_decoding_backend", "only the 'llguidance' backend is available (leave it unset)"))
    if request.guided_whitespace_pattern is not None:
        out.append(("guided_whitespace_pattern", "guided_whitespace_pattern is not supported"))
    if isinstance(request, CompletionRequest):
        if request.suffix:
            out.append(("suffix", "suffix (insertion) is not supported"))
        if request.best_of is not None and request.best_of != request.n:
            out.append(("best_of", "best_of is not supported (only best_of == n); use n"))
        return out
    legacy = "the legacy function calling is not supported (use tools and tool_choice)"
    if request.functions:
        out.append(("functions", legacy))
    if request.function_call not in (None, "none", "auto"):
        out.append(("function_call", legacy))
    if request.modalities not in (None, ["text"]) or request.audio is not None:
        out.append(("modalities", "only text output is supported"))
    if request.prediction is not None:
        out.append(("prediction", "predicted outputs are not supported"))
    for index, message in enumerate(request.messages):
        if message.role == "function" or message.function_call:
            out.append((f"messages.{index}", f"{legacy}: send tool_calls and tool messages"))
        elif message.content is None and message.role != "assistant":
            out.append((f"messages.{index}.content", f"a {message.role} message needs content"))
    return out


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def short_repr(value: Any) -> str:
    """A short ``repr`` of a request value for error messages, bounded in length and in nesting."""
    return _REPR.repr(value)


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {short_repr(value)}"


# -- responses ----------------------------------------------------------------------------------------


class Usage(TypedDict):
    """Token counts of a request."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(TypedDict):
    """Legacy completions log-probs: per token its text, log-prob, alternatives and text offset."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(TypedDict):
    """One choice of a completion (or a chunk of one, when streaming)."""

    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class TopLogprob(TypedDict):
    """A chat log-prob alternative."""

    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TypedDict):
    """A chat token's log-prob and its most likely alternatives."""

    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]
