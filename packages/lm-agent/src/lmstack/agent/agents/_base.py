"""What the tool agents share: their tools, limits, memory, the sync entry point and running calls."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from lmstack.agent._errors import ToolArgumentError
from lmstack.agent.agents._text_protocol import loads_lenient
from lmstack.agent.agents._types import AgentResult, Step
from lmstack.agent.tools import Tool, ToolOutput, tool
from lmstack.infer import InvalidRequestError, LLMProtocol, SamplingParams

__all__ = ["STEP_LIMIT_PROMPT", "PreparedCall", "ToolAgent", "default_params", "run_sync"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


def default_params() -> SamplingParams:
    """Greedy and long enough for a thought plus calls (SamplingParams' own default is 16 tokens)."""
    return SamplingParams(temperature=0.0, max_tokens=1024)


STEP_LIMIT_PROMPT = (
    "You have used all {steps} steps this task allows, so no more tools can be called. From what you have "
    "gathered so far, give your best final answer to the task now, and say what remains uncertain."
)

DEFAULT_SYSTEM = "You are a helpful assistant. Use the tools when they help, then answer the user's question."


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from synchronous code.

    Inside a running event loop (a notebook), the coroutine runs on a fresh loop in a worker thread,
    since the caller's loop cannot be re-entered.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


@dataclass
class PreparedCall:
    """A tool call checked before it runs.

    Attributes:
        name: The tool's name as the model wrote it.
        arguments: The arguments as JSON text (for the transcript and the history).
        tool: The tool, or None when the call is malformed.
        kwargs: The arguments (checked against the tool's schema), or None when the call is malformed.
        error: What is wrong with the call (None when it can run).
    """

    name: str
    arguments: str
    tool: Tool | None = None
    kwargs: dict[str, Any] | None = None
    error: str | None = None


def _as_text(arguments: Any) -> str:
    if isinstance(arguments, str):
        return arguments
    try:
        return json.dumps(arguments, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(arguments)


class ToolAgent:
    """The base of the tool agents: tools by name, limits, conversation memory, call checking.

    Args:
        llm: Any LLM protocol implementation.
        tools: The tools (plain functions are wrapped with :func:`~lmstack.agent.tools.tool`).
        system: The system prompt (the agent adds its protocol's instructions to it).
        max_steps: Most model turns that may call tools in one run.
        max_retries: Most malformed replies in a row that are fed back before the run stops.
        params: Sampling parameters (default: greedy, 1024 tokens).
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
    ) -> None:
        if not isinstance(max_steps, int) or max_steps < 1:
            raise InvalidRequestError(f"max_steps must be an int >= 1, got {max_steps!r}", param="max_steps")
        if not isinstance(max_retries, int) or max_retries < 0:
            raise InvalidRequestError(
                f"max_retries must be an int >= 0, got {max_retries!r}", param="max_retries"
            )
        wrapped = [t if isinstance(t, Tool) else tool(t) for t in tools]
        self.tools: dict[str, Tool] = {}
        for t in wrapped:
            if t.name in self.tools:
                raise InvalidRequestError(
                    f"two tools are named {t.name!r}; give each tool its own name", param="tools"
                )
            self.tools[t.name] = t
        self.llm = llm
        self.system = system if system is not None else DEFAULT_SYSTEM
        self.max_steps = max_steps
        self.max_retries = max_retries
        self.params = params if params is not None else default_params()
        self._messages: list[dict[str, Any]] = []

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The conversation kept across runs (a copy)."""
        return [dict(m) for m in self._messages]

    def reset(self) -> None:
        """Forget the conversation: the next run starts afresh."""
        self._messages.clear()

    async def arun(self, task: str) -> AgentResult:
        """Carry out one task (or answer one message), continuing the conversation kept so far.

        Args:
            task: The user's message.

        Returns:
            The answer, the transcript of this run and the whole conversation.
        """
        start = len(self._messages)
        try:
            return await self._arun(task)
        except BaseException:
            # A failed run (the model unreachable, a cancellation) leaves the memory as it was.
            del self._messages[start:]
            raise

    def run(self, task: str) -> AgentResult:
        """Synchronous :meth:`arun`."""
        return run_sync(self.arun(task))

    async def _arun(self, task: str) -> AgentResult:
        raise NotImplementedError

    def _system_message(self) -> dict[str, Any]:
        return {"role": "system", "content": self.system}

    def _begin(self, task: str) -> list[dict[str, Any]]:
        """The conversation with the task appended (and the system message first, on a fresh one)."""
        if not self._messages:
            self._messages.append(self._system_message())
        self._messages.append({"role": "user", "content": task})
        return self._messages

    def _result(self, answer: str, steps: list[Step], finished: bool) -> AgentResult:
        return AgentResult(answer=answer, steps=steps, messages=self.messages, finished=finished)

    def _gave_up(self, failures: int, error: str, steps: list[Step]) -> AgentResult:
        """The end of a run whose malformed replies used up the retries (``failures`` in a row)."""
        answer = (
            f"Stopped: the model's replies were malformed {failures} times in a row "
            f"(max_retries={self.max_retries}). Last error: {error}"
        )
        logger.info("%s", answer)
        return self._result(answer, steps, finished=False)

    def find_tool(self, name: str) -> Tool | None:
        """The tool of that name, else the only one whose name matches it ignoring case, else None."""
        if name in self.tools:
            return self.tools[name]
        folded = [t for key, t in self.tools.items() if key.casefold() == name.casefold()]
        return folded[0] if len(folded) == 1 else None

    def prepare(self, name: str, arguments: Any) -> PreparedCall:
        """Check a call: the tool exists and the arguments validate.

        Args:
            name: The tool's name as written.
            arguments: A dict, or JSON text (repaired leniently).

        Returns:
            The call, ready to run or with the error to feed back.
        """
        call = PreparedCall(name=name, arguments=_as_text(arguments))
        found = self.find_tool(name)
        if found is None:
            known = ", ".join(self.tools) or "(none)"
            call.error = f"there is no tool named {name!r}; the tools are: {known}"
            return call
        if isinstance(arguments, str):
            try:
                arguments = loads_lenient(arguments) if arguments.strip() else {}
            except ValueError as exc:
                call.error = (
                    f"the arguments of {name} are not valid JSON ({exc}); write them as a JSON object"
                )
                return call
        if not isinstance(arguments, Mapping):
            call.error = (
                f"the arguments of {name} must be a JSON object of its parameters, "
                f"got {type(arguments).__name__}: {_as_text(arguments)[:200]}"
            )
            return call
        try:
            found.validate(arguments)
        except ToolArgumentError as exc:
            call.error = str(exc)  # names the tool, the field and what was expected
            return call
        # The tool validates again when it runs; it gets the arguments as the model wrote them.
        call.name, call.tool, call.kwargs = found.name, found, dict(arguments)
        return call

    async def execute(self, call: PreparedCall) -> tuple[ToolOutput, float]:
        """Run a prepared call that can run; returns the tool's output and the seconds it took.

        A tool is not supposed to raise; one that does anyway is reported as its failure.
        """
        assert call.tool is not None and call.kwargs is not None
        t0 = time.perf_counter()
        try:
            out = await call.tool.acall(call.kwargs)
        except Exception as exc:  # a tool that breaks its contract must not end the run
            out = ToolOutput(ok=False, content=f"{call.name} failed: {type(exc).__name__}: {exc}")
        seconds = time.perf_counter() - t0
        logger.debug("tool %s ok=%s in %.3fs", call.name, out.ok, seconds)
        return out, seconds
