"""The ReAct agent: Thought, Action, Action Input, Observation, Final Answer, read by a tolerant parser."""

from __future__ import annotations

import dataclasses
import json
import re
import time
from dataclasses import dataclass
from typing import Any

from lmstack.agent._llm import achat
from lmstack.agent.agents._base import STEP_LIMIT_PROMPT, ToolAgent
from lmstack.agent.agents._text_protocol import arguments_from_input, loads_lenient, tools_listing
from lmstack.agent.agents._types import AgentResult, Step
from lmstack.infer import SamplingParams

__all__ = ["ReActAgent", "ReActReply", "parse_react"]

# A label at the start of a line, tolerating case, spacing, Markdown emphasis and list/quote marks.
_LABEL = re.compile(
    r"^[ \t>*_#`-]*(thought|action[ \t_-]*input|action|final[ \t_-]*answer|observation)[ \t*_`]*:[ \t*_`]*",
    re.IGNORECASE | re.MULTILINE,
)
# An action written with its input inline: ``calculator[2 + 2]`` or ``calculator(2 + 2)``.
_INLINE = re.compile(r"^([A-Za-z_][\w.-]*)\s*(?:\[(.*)\]|\((.*)\))\s*$", re.DOTALL)
_ACTION_KEYS = ("action", "name", "tool")
_INPUT_KEYS = ("action_input", "input", "arguments", "args", "parameters", "tool_input")
_FINAL_ACTIONS = {"finalanswer", "final", "answer", "finish", "none"}

REACT_PROMPT = """Solve the task step by step. You have these tools:
{tools}

Use exactly this format:

Thought: what you think about what to do next
Action: the tool to use, one of [{names}]
Action Input: the tool's arguments as a JSON object (or plain text for a tool with one argument)
Observation: the tool's result (it is written for you: never write it yourself)
... (Thought, Action, Action Input and Observation repeat as often as needed)
Thought: I now know the final answer
Final Answer: the final answer to the task

After each Action Input, stop and wait for the Observation."""


@dataclass
class ReActReply:
    """One ReAct reply, parsed.

    Attributes:
        text: The reply, cut before any Observation the model made up.
        thought: The reasoning (the Thought lines, or the text before the Action).
        action: The tool named by ``Action:``, or None.
        action_input: The action's input as written (``""`` when none was given).
        final_answer: The text after ``Final Answer:``, or None.
        error: What is wrong with the reply, or None.
    """

    text: str
    thought: str = ""
    action: str | None = None
    action_input: str = ""
    final_answer: str | None = None
    error: str | None = None


def _kind(label: str) -> str:
    return re.sub(r"[\s_-]", "", label.lower())


def _clean_name(name: str) -> str:
    return name.strip().strip("`'\"*").rstrip(".:;,").strip()


def _from_json_action(text: str) -> tuple[str, str] | None:
    """``{"action": ..., "action_input": ...}`` (a JSON action, some agents' style), or None."""
    try:
        value = loads_lenient(text)
    except ValueError:
        return None
    if not isinstance(value, dict):
        return None
    name = next((value[k] for k in _ACTION_KEYS if isinstance(value.get(k), str)), None)
    key = next((k for k in _INPUT_KEYS if k in value), None)
    if name is None:
        return None
    raw = value[key] if key else ""
    return name, raw if isinstance(raw, str) else json.dumps(raw, ensure_ascii=False)


def parse_react(text: str) -> ReActReply:
    """Read one ReAct reply.

    Tolerates any case and spacing of the labels, Markdown emphasis around them, a missing
    ``Thought:`` (the text before the action is the thought), the input inline
    (``Action: calculator[2+2]``) or on the lines after ``Action:``, a JSON action
    (``{"action": ..., "action_input": ...}``), and ``Action: Final Answer``. An Observation the model
    wrote itself, and everything after it, is dropped. Whichever of Action and Final Answer comes
    first wins.

    Args:
        text: The model's reply.

    Returns:
        The parsed reply (``error`` set when it has neither an action nor a final answer).
    """
    labels = list(_LABEL.finditer(text))
    made_up = next((m for m in labels if _kind(m.group(1)) == "observation"), None)
    if made_up is not None:
        text = text[: made_up.start()]
        labels = [m for m in labels if m.start() < made_up.start()]
    reply = ReActReply(text=text.rstrip())
    # Each label's content runs to the next label.
    spans = [(_kind(m.group(1)), m.end(), labels[i + 1].start() if i + 1 < len(labels) else len(text))
             for i, m in enumerate(labels)]  # fmt: skip
    lead = text[: labels[0].start()] if labels else text
    thoughts = [lead.strip()] + [text[a:b].strip() for kind, a, b in spans if kind == "thought"]
    reply.thought = "\n".join(t for t in thoughts if t)

    first = next((i for i, (kind, _, _) in enumerate(spans) if kind in ("action", "finalanswer")), None)
    if first is None:
        json_action = _from_json_action(text)
        if json_action is None:
            reply.error = (
                "the reply has neither an 'Action:' line nor a 'Final Answer:' line; continue with "
                "'Thought:', then either 'Action:' and 'Action Input:', or 'Final Answer:'"
            )
            return reply
        reply.thought = ""
        name, raw_input = json_action
    else:
        kind, a, b = spans[first]
        if kind == "finalanswer":
            reply.final_answer = text[a:].strip()
            return reply
        name, _, rest = text[a:b].strip().partition("\n")
        raw_input = rest.strip()
        following = spans[first + 1] if first + 1 < len(spans) else None
        if following is not None and following[0] == "actioninput":
            raw_input = text[following[1] : following[2]].strip()
        json_action = _from_json_action(text[a:b])
        inline = _INLINE.match(name.strip())
        if json_action is not None:
            name, raw_input = json_action
        elif inline is not None and not raw_input:
            name, raw_input = (
                inline.group(1),
                inline.group(2) if inline.group(2) is not None else inline.group(3),
            )
    name = _clean_name(name)
    if _kind(name) in _FINAL_ACTIONS:
        reply.final_answer = _final_from_input(raw_input)
        return reply
    if not name:
        reply.error = "'Action:' names no tool; write the tool's name after 'Action:'"
        return reply
    reply.action, reply.action_input = name, raw_input
    return reply


def _final_from_input(raw: str) -> str:
    """The answer given as an action's input (``Action: Final Answer`` / ``Action Input: "42"``)."""
    try:
        value = loads_lenient(raw)
    except ValueError:
        return raw.strip()
    return value if isinstance(value, str) else raw.strip()


class ReActAgent(ToolAgent):
    r"""An agent that reasons and acts in the ReAct text format, one tool call per turn.

    Each turn the model writes a Thought and an Action with its Action Input (the agent runs the tool
    and answers with ``Observation: ...``), or a Final Answer. Generation stops at
    ``\nObservation:`` so the model does not invent results. Replies are read by
    :func:`parse_react`; a reply with neither an action nor an answer, an unknown tool or arguments
    that fail validation are fed back as an error, up to ``max_retries`` times in a row. A failing tool
    is an ordinary observation. At ``max_steps`` one last turn asks for the final answer. Works with
    any backend (no tool calling needed). The conversation is kept across runs until :meth:`reset`.

    Args:
        llm: Any LLM protocol implementation.
        tools: The tools (plain functions are wrapped with :func:`~lmstack.agent.tools.tool`).
        system: The system prompt (the ReAct instructions are added to it).
        max_steps: Most tool-calling turns in one run.
        max_retries: Most malformed replies in a row that are fed back before the run stops.
        params: Sampling parameters (default: greedy, 1024 tokens); ``\nObservation:`` is added to
            their stop strings.
    """

    @property
    def _params(self) -> SamplingParams:
        """The sampling parameters, with a new line before ``Observation:`` among the stop strings."""
        stop = list(self.params.stop or [])
        return dataclasses.replace(self.params, stop=[*stop, "\nObservation:"])

    def _system_message(self) -> dict[str, Any]:
        tools = list(self.tools.values())
        prompt = REACT_PROMPT.format(tools=tools_listing(tools), names=", ".join(self.tools))
        return {"role": "system", "content": f"{self.system}\n\n{prompt}"}

    async def _arun(self, task: str) -> AgentResult:
        messages = self._begin(task)
        steps: list[Step] = []
        failures = 0
        for _ in range(self.max_steps):
            t0 = time.perf_counter()
            out = (await achat(self.llm, messages, self._params)).outputs[0]
            seconds = time.perf_counter() - t0
            reply = parse_react(out.text)
            messages.append({"role": "assistant", "content": reply.text})
            if reply.thought:
                steps.append(Step("thought", reply.thought, seconds=seconds))
                seconds = 0.0
            if reply.final_answer is not None:
                steps.append(Step("answer", reply.final_answer, seconds=seconds))
                return self._result(reply.final_answer, steps, finished=True)
            error = reply.error
            if error is None:
                assert reply.action is not None
                found = self.find_tool(reply.action)
                args = arguments_from_input(found, reply.action_input) if found else reply.action_input
                call = self.prepare(reply.action, args)
                error = call.error
                if error is None:
                    steps.append(Step("tool_call", call.arguments, tool=call.name, arguments=call.arguments,
                                      seconds=seconds))  # fmt: skip
                    result, tool_seconds = await self.execute(call)
                    steps.append(Step("tool_result", result.content, tool=call.name, arguments=call.arguments,
                                      ok=result.ok, seconds=tool_seconds))  # fmt: skip
                    messages.append({"role": "user", "content": f"Observation: {result.content}"})
                    failures = 0
                    continue
            steps.append(Step("error", error, tool=reply.action, ok=False, seconds=seconds))
            messages.append({"role": "user", "content": f"Observation: Error: {error}."})
            failures += 1
            if failures > self.max_retries:
                return self._gave_up(failures, error, steps)
        return await self._at_step_limit(messages, steps)

    async def _at_step_limit(self, messages: list[dict[str, Any]], steps: list[Step]) -> AgentResult:
        """The graceful end at the step limit: one more turn that must give the final answer."""
        prompt = STEP_LIMIT_PROMPT.format(steps=self.max_steps) + " Reply with 'Final Answer: ...'."
        messages.append({"role": "user", "content": prompt})
        t0 = time.perf_counter()
        out = (await achat(self.llm, messages, self._params)).outputs[0]
        reply = parse_react(out.text)
        answer = reply.final_answer if reply.final_answer is not None else reply.text.strip()
        messages.append({"role": "assistant", "content": reply.text})
        steps.append(Step("answer", answer, seconds=time.perf_counter() - t0))
        return self._result(answer, steps, finished=False)
