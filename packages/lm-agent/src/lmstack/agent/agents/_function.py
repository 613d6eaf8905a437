"""The function-calling agent: OpenAI tool calls through the LLM protocol, or a text protocol without them."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lmstack.agent._llm import achat, supports
from lmstack.agent.agents._base import STEP_LIMIT_PROMPT, ToolAgent
from lmstack.agent.agents._text_protocol import parse_tool_calls, text_protocol_prompt
from lmstack.agent.agents._types import AgentResult, Step
from lmstack.agent.tools import Tool
from lmstack.infer import InvalidRequestError, LLMProtocol, SamplingParams

__all__ = ["FunctionCallingAgent"]

logger = logging.getLogger(__name__)

_CALL_SHAPE = '<tool_call>{"name": ..., "arguments": {...}}</tool_call>'


@dataclass
class _Reply:
    """A model reply: its text outside the calls, the calls (id, name, arguments), the malformed ones."""

    text: str
    raw: str
    calls: Sequence[tuple[str | None, str, Any]]
    errors: list[str]


class FunctionCallingAgent(ToolAgent):
    """An agent that calls tools until the model answers without calling any.

    With a backend that takes ``tools`` (:func:`~lmstack.agent._llm.supports`), the tools go to the
    model as OpenAI function tools and its ``tool_calls`` are run; the history keeps the assistant's
    ``tool_calls`` and one ``tool`` message per call. Without, the system prompt lists the tools and
    asks for ``<tool_call>`` blocks, read by a tolerant parser, and the results come back in a user
    message. The calls of one reply run concurrently. A malformed call (not JSON, an unknown tool,
    arguments that fail validation) is answered with the error, and after ``max_retries`` malformed
    replies in a row the run stops (``finished=False``). A tool that fails (``ToolOutput.ok`` False)
    is an ordinary result: the model sees the error and carries on. When ``max_steps`` turns have
    called tools, one last call without tools asks for the best answer from what was gathered.

    The conversation is kept across runs (memory) until :meth:`reset`; one agent runs one task at a
    time.

    Args:
        llm: Any LLM protocol implementation.
        tools: The tools (plain functions are wrapped with :func:`~lmstack.agent.tools.tool`).
        system: The system prompt (default: a helpful assistant that uses its tools).
        max_steps: Most model turns that may call tools in one run.
        max_retries: Most malformed replies in a row that are fed back before the run stops.
        params: Sampling parameters (default: greedy, 1024 tokens).
        use_native_tools: Use the backend's tool calling (True), the text protocol (False), or
            decide by whether ``llm.chat`` takes ``tools`` (None).

    Example:
        >>> agent = FunctionCallingAgent(llm, [calculator])  # doctest: +SKIP
        >>> agent.run("What is 17 * 23?").answer  # doctest: +SKIP
    """

    def __init__(
        self,
        llm: LLMProtocol,
        tools: Sequence[Tool | Callable[..., Any]],
        *,
        system: str | None = None,
        max_steps: int = 8,
        max_retries: int = 2,
        params: SamplingParams | None = None,
        use_native_tools: bool | None = None,
    ) -> None:
        super().__init__(
            llm, tools, system=system, max_steps=max_steps, max_retries=max_retries, params=params
        )
        native = supports(llm, "tools")
        if use_native_tools and not native:
            raise InvalidRequestError(
                "use_native_tools=True, but this LLM's chat() takes no `tools`; pass use_native_tools=False "
                "(or None) to use the text protocol",
                param="use_native_tools",
            )
        self.native = native if use_native_tools is None else use_native_tools

    def _system_message(self) -> dict[str, Any]:
        if self.native or not self.tools:
            return {"role": "system", "content": self.system}
        return {
            "role": "system",
            "content": f"{self.system}\n\n{text_protocol_prompt(list(self.tools.values()))}",
        }

    async def _ask(self, messages: list[dict[str, Any]]) -> _Reply:
        if self.native and self.tools:
            specs = [t.spec() for t in self.tools.values()]
            out = (await achat(self.llm, messages, self.params, tools=specs, tool_choice="auto")).outputs[0]
            calls = [(c.id, c.name, c.arguments) for c in out.tool_calls or []]
            return _Reply(out.text, out.text, calls, [])
        out = (await achat(self.llm, messages, self.params)).outputs[0]
        if not self.tools:
            return _Reply(out.text, out.text, [], [])
        parsed = parse_tool_calls(out.text)
        return _Reply(
            parsed.content, out.text, [(None, c.name, c.arguments) for c in parsed.calls], parsed.errors
        )

    async def _arun(self, task: str) -> AgentResult:
        messages = self._begin(task)
        steps: list[Step] = []
        failures = 0
        for _ in range(self.max_steps):
            t0 = time.perf_counter()
            reply = await self._ask(messages)
            seconds = time.perf_counter() - t0
            if not reply.calls and not reply.errors:
                messages.append({"role": "assistant", "content": reply.text})
                steps.append(Step("answer", reply.text, seconds=seconds))
                return self._result(reply.text, steps, finished=True)

            prepared = [self.prepare(name, arguments) for _, name, arguments in reply.calls]
            ids = [call_id or f"call_{len(steps)}_{i}" for i, (call_id, _, _) in enumerate(reply.calls)]
            if self.native:
                tool_calls = [
                    {"id": i, "type": "function", "function": {"name": p.name, "arguments": p.arguments}}
                    for i, p in zip(ids, prepared, strict=True)
                ]
                messages.append({"role": "assistant", "content": reply.text, "tool_calls": tool_calls})
            else:
                messages.append({"role": "assistant", "content": reply.raw})
            if reply.text.strip():
                steps.append(Step("thought", reply.text.strip(), seconds=seconds))
                seconds = 0.0
            for p in prepared:
                kind, content = ("tool_call", p.arguments) if p.error is None else ("error", p.error)
                steps.append(Step(kind, content, tool=p.name, arguments=p.arguments, ok=p.error is None,
                                  seconds=seconds))  # fmt: skip
                seconds = 0.0
            for error in reply.errors:
                steps.append(Step("error", error, ok=False, seconds=seconds))
                seconds = 0.0

            runnable = [p for p in prepared if p.error is None]
            outputs = iter(await asyncio.gather(*(self.execute(p) for p in runnable)))
            fed: list[tuple[str, bool]] = []
            for p in prepared:
                if p.error is not None:
                    fed.append((f"Error: {p.error}. The call was not run; correct it and call again.", False))
                    continue
                out, tool_seconds = next(outputs)
                steps.append(Step("tool_result", out.content, tool=p.name, arguments=p.arguments, ok=out.ok,
                                  seconds=tool_seconds))  # fmt: skip
                fed.append((out.content, out.ok))
            self._feed_back(messages, ids, [p.name for p in prepared], fed, reply.errors)

            malformed = [p.error for p in prepared if p.error] + reply.errors
            failures = failures + 1 if malformed else 0
            if failures > self.max_retries:
                return self._gave_up(failures, malformed[-1], steps)
        return await self._at_step_limit(messages, steps)

    def _feed_back(
        self,
        messages: list[dict[str, Any]],
        ids: list[str],
        names: list[str],
        results: list[tuple[str, bool]],
        errors: list[str],
    ) -> None:
        """Append the calls' results (and the unreadable calls' errors) for the model's next turn."""
        if self.native:
            for call_id, name, (content, _) in zip(ids, names, results, strict=True):
                messages.append({"role": "tool", "tool_call_id": call_id, "name": name, "content": content})
            return
        flags = {True: "", False: ' error="true"'}
        blocks = [
            f'<tool_result name="{name}"{flags[ok]}>\n{content}\n</tool_result>'
            for name, (content, ok) in zip(names, results, strict=True)
        ]
        blocks.extend(f"Error: {error}. Write each call as {_CALL_SHAPE}." for error in errors)
        messages.append({"role": "user", "content": "\n".join(blocks)})

    async def _at_step_limit(self, messages: list[dict[str, Any]], steps: list[Step]) -> AgentResult:
        """The graceful end at the step limit: one call without tools for the best answer so far."""
        messages.append({"role": "user", "content": STEP_LIMIT_PROMPT.format(steps=self.max_steps)})
        t0 = time.perf_counter()
        out = (await achat(self.llm, messages, self.params)).outputs[0]
        answer = out.text if self.native else (parse_tool_calls(out.text).content or out.text)
        messages.append({"role": "assistant", "content": answer})
        steps.append(Step("answer", answer, seconds=time.perf_counter() - t0))
        logger.info("step limit (%d) reached; answered from what was gathered", self.max_steps)
        return self._result(answer, steps, finished=False)
