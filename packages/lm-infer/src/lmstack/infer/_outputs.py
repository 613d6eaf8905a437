"""What generation returns: a :class:`RequestOutput` per request, a :class:`CompletionOutput` per sample."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["CompletionOutput", "RequestOutput", "ToolCall"]


@dataclass
class ToolCall:
    """One function call a model asked for, in OpenAI's terms.

    Attributes:
        id: The call's id (``call_...``), which the ``tool`` message answering it quotes.
        name: The function's name.
        arguments: The arguments as JSON text (OpenAI's API sends them as a string, not an object).
        type: Always ``"function"``.
    """

    id: str
    name: str
    arguments: str
    type: str = "function"

    def to_openai(self) -> dict[str, object]:
        """The call as an entry of an OpenAI assistant message's ``tool_calls``."""
        return {
            "id": self.id,
            "type": self.type,
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass
class CompletionOutput:
    """One generated sample of a request.

    Attributes:
        index: Which of the request's ``n`` samples this is.
        text: The generated text so far (stop strings excluded unless asked for).
        token_ids: The generated token ids so far.
        cumulative_logprob: Sum of the chosen tokens' log-probabilities (when ``logprobs`` was asked).
        logprobs: Per generated token, ``{token_id: logprob}`` holding the chosen token and the top
            ``logprobs`` alternatives (when ``logprobs`` was asked).
        finish_reason: ``"stop"`` (eos, stop token or stop string), ``"length"`` (max_tokens or the
            context), ``"abort"``, ``"error"``, or None while still running.
        stop_reason: The stop string or stop token id that ended the sample, if any.
        tool_calls: The function calls a chat reply made (``chat(..., tools=...)``), or None when no
            tools were offered. When it is set, ``text`` holds only the reply's content outside the
            calls (``""`` when there is none); ``token_ids`` are still every generated token.
    """

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    tool_calls: list[ToolCall] | None = None

    @property
    def finished(self) -> bool:
        """Whether this sample has finished."""
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """The state of one request after an engine step (or at the end).

    Attributes:
        request_id: The request's id.
        prompt: The prompt text, when the request gave text.
        prompt_token_ids: The prompt's token ids.
        outputs: One entry per sample (``n`` of them).
        finished: Whether every sample has finished.
        error: Why the request failed (then every sample's ``finish_reason`` is ``"error"``).
        num_cached_tokens: Prompt tokens served from the prefix cache.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    error: str | None = None
    num_cached_tokens: int = 0
