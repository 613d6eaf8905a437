"""A scripted LLM: a test double of the LLM protocol for testing agents' control flow.

It answers each chat with whatever its ``respond`` function returns for the conversation, optionally
after a fixed latency, and records every call with its start and end times so tests can check what
ran concurrently. It is a fake only at the boundary the tests are not about (the model).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lmstack.core import Tokenizer
from lmstack.infer import CompletionOutput, RequestOutput, SamplingParams, ToolCall


@dataclass
class Call:
    """One recorded chat call."""

    messages: list[dict[str, Any]]
    params: SamplingParams | None
    options: dict[str, Any]
    start: float
    end: float = 0.0
    reply: str = ""


Reply = str | list[ToolCall] | tuple[str, list[ToolCall]]


@dataclass
class ScriptedLLM:
    """Answers chats from a script.

    Args:
        respond: Called with ``(messages, options)`` (options: tools, tool_choice, response_format);
            returns the reply text, a list of tool calls, or ``(text, calls)``.
        latency_s: Seconds each call takes (slept in the calling thread).
        tools: Whether ``chat`` accepts ``tools`` (False: an old backend without tool calling).
    """

    respond: Callable[[list[dict[str, Any]], dict[str, Any]], Reply]
    latency_s: float = 0.0
    calls: list[Call] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def tokenizer(self) -> Tokenizer:
        raise NotImplementedError("the scripted LLM has no tokenizer")

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]] | Sequence[Sequence[Mapping[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        tools: Any = None,
        tool_choice: Any = None,
        response_format: Any = None,
    ) -> list[RequestOutput]:
        conversation = [dict(m) for m in messages]  # type: ignore[arg-type]
        options = {"tools": tools, "tool_choice": tool_choice, "response_format": response_format}
        call = Call(conversation, sampling_params if isinstance(sampling_params, SamplingParams) else None,
                    options, time.perf_counter())  # fmt: skip
        with self._lock:
            self.calls.append(call)
        if self.latency_s:
            time.sleep(self.latency_s)
        reply = self.respond(conversation, options)
        if isinstance(reply, list):
            text, calls = "", reply
        elif isinstance(reply, tuple):
            text, calls = reply
        else:
            text, calls = reply, None
        call.end, call.reply = time.perf_counter(), text
        out = CompletionOutput(0, text=text, finish_reason="stop", tool_calls=calls if tools else None)
        return [RequestOutput("scripted", None, [], [out], finished=True)]

    def generate(self, prompts: Any, sampling_params: Any = None) -> list[RequestOutput]:
        raise NotImplementedError("agents chat; they do not complete raw prompts")

    def stream(self, prompt: Any, sampling_params: Any = None) -> Any:
        raise NotImplementedError

    def loglikelihood(self, requests: Any) -> list[tuple[float, bool]]:
        raise NotImplementedError

    def loglikelihood_rolling(
        self, texts: Any, *, max_length: Any = None, use_tqdm: Any = None
    ) -> list[float]:
        raise NotImplementedError


def text_only(llm: ScriptedLLM) -> Any:
    """The same script behind an old-style ``chat(messages, params)`` without tool calling."""

    class _Old:
        tokenizer = None

        def chat(self, messages: Any, sampling_params: Any = None) -> list[RequestOutput]:
            return llm.chat(messages, sampling_params)

    return _Old()
