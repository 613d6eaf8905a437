"""The ReWOO agent: plan every tool call up front, run the plan's steps as their evidence is ready, solve."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import networkx as nx

from lmstack.agent._errors import PlanError
from lmstack.agent._llm import achat
from lmstack.agent.agents._base import ToolAgent
from lmstack.agent.agents._text_protocol import arguments_from_input, loads_lenient, tools_listing
from lmstack.agent.agents._types import AgentResult, Step

__all__ = ["LLM_TOOL", "PlanStep", "ReWOOAgent", "parse_plan"]

logger = logging.getLogger(__name__)

# The worker every plan may use besides the tools: the model itself, asked the step's input.
LLM_TOOL = "LLM"

_STEP = re.compile(r"^[ \t>*_-]*(#E\d+)[ \t*_]*[:=][ \t*_`]*([A-Za-z_][\w.-]*)[ \t`]*([\[(])", re.MULTILINE)
_PLAN_LINE = re.compile(r"^[ \t>*_-]*plan[ \t]*\d*[ \t*_]*:[ \t*_]*(.*)$", re.IGNORECASE | re.MULTILINE)
_VARIABLE = re.compile(r"#E\d+")
_CLOSE = {"[": "]", "(": ")"}

PLANNER_PROMPT = """For the task, make a plan that solves it with the tools below.
Write each step as two lines:
Plan: what the step finds out, and why
#E1 = tool_name[input]

Number the evidence variables #E1, #E2, ... in order. A step's input is a JSON object of the tool's
arguments, or plain text for a tool with one argument; it may use the result of an earlier step by writing
its variable (for example #E1). Steps that do not use each other's results run at the same time. Use at
most {max_steps} steps. Write only the plan: do not carry it out and do not answer the task.

Tools:
- {llm}: ask a language model; input: a question or instruction in plain text (it may include evidence)
{tools}"""

SOLVER_PROMPT = """Solve the task with the plan below and the evidence its steps gathered. The evidence may be
incomplete or wrong: use what is relevant, and answer the task directly.

{evidence}

Task: {task}"""


@dataclass
class PlanStep:
    """One step of a ReWOO plan: ``#E1 = tool[input]``.

    Attributes:
        var: The evidence variable the step defines (``#E1``).
        tool: The tool's name.
        input: The input as written, variables not yet replaced.
        description: The ``Plan:`` line that came before the step.
        deps: The variables the input uses.
    """

    var: str
    tool: str
    input: str
    description: str = ""
    deps: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"{self.var} = {self.tool}[{self.input}]"


def _input_end(text: str, start: int, opening: str) -> int:
    """Where the input opened at ``start`` closes (nested brackets of its kind counted), else the line end."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == opening:
            depth += 1
        elif text[i] == _CLOSE[opening]:
            depth -= 1
            if depth == 0:
                return i
    line_end = text.find("\n", start)
    return len(text) if line_end < 0 else line_end


def _check(steps: list[PlanStep], tools: Collection[str], max_steps: int) -> None:
    """Raise PlanError for the first thing wrong with a parsed plan."""
    if not steps:
        raise PlanError("the plan has no steps; write each step as '#E1 = tool_name[input]'")
    if len(steps) > max_steps:
        raise PlanError(f"the plan has {len(steps)} steps; use at most {max_steps}")
    order: dict[str, int] = {}
    for i, step in enumerate(steps):
        if step.var in order:
            raise PlanError(f"{step.var} is defined twice; give each step its own variable (#E1, #E2, ...)")
        order[step.var] = i
        if step.tool not in tools:
            raise PlanError(
                f"step {step.var} uses the unknown tool {step.tool!r}; the tools are: {', '.join(tools)}"
            )
    graph = nx.DiGraph()
    graph.add_nodes_from(order)
    for step in steps:
        for dep in step.deps:
            if dep not in order:
                raise PlanError(f"step {step.var} uses {dep}, which no step defines")
            graph.add_edge(dep, step.var)
    try:
        cycle = nx.find_cycle(graph)
    except nx.NetworkXNoCycle:
        cycle = []
    if cycle:
        path = " -> ".join([cycle[0][0]] + [edge[1] for edge in cycle])
        raise PlanError(f"the plan has a cycle: {path} (each uses the next one's result); no step can start")
    for step in steps:
        late = [dep for dep in step.deps if order[dep] > order[step.var]]
        if late:
            raise PlanError(
                f"step {step.var} uses {late[0]}, which comes after it; a step may only use the results "
                "of the steps above it, so reorder the steps"
            )


def parse_plan(text: str, tools: Collection[str], *, max_steps: int = 8) -> list[PlanStep]:
    """Read and check a ReWOO plan.

    Each ``#En = tool[input]`` (or ``tool(input)``, ``#En: tool[...]``, with Markdown marks around)
    is a step; its input may span lines while its brackets stay open. The ``Plan:`` line before a
    step describes it. A tool name matching one of ``tools`` but for case is taken as that tool.

    Args:
        text: The planner's reply.
        tools: The names a step may use.
        max_steps: Most steps allowed.

    Returns:
        The steps, in order.

    Raises:
        PlanError: No steps, too many, a duplicate variable, an unknown tool, a variable no step
            defines, a cycle, or a step using a later step's result (the message says which).
    """
    steps: list[PlanStep] = []
    previous_end = 0
    folded: dict[str, list[str]] = {}
    for name in tools:
        folded.setdefault(name.casefold(), []).append(name)
    for match in _STEP.finditer(text):
        if match.start() < previous_end:  # inside the previous step's input
            continue
        opening = match.group(3)
        end = _input_end(text, match.end() - 1, opening)
        raw = text[match.end() : end].strip()
        plans = _PLAN_LINE.findall(text, previous_end, match.start())
        deps = tuple(dict.fromkeys(_VARIABLE.findall(raw)))
        name = match.group(2)
        if name not in tools and len(folded.get(name.casefold(), [])) == 1:  # "Search" for "search"
            name = folded[name.casefold()][0]
        steps.append(PlanStep(match.group(1), name, raw, plans[-1].strip() if plans else "", deps))
        previous_end = end + 1
    _check(steps, tools, max_steps)
    return steps


def _substitute(value: Any, evidence: dict[str, str]) -> Any:
    """Replace the evidence variables in a JSON value's strings with their evidence."""
    if isinstance(value, str):
        return _VARIABLE.sub(lambda m: evidence.get(m.group(0), m.group(0)), value)
    if isinstance(value, dict):
        return {key: _substitute(item, evidence) for key, item in value.items()}
    if isinstance(value, list):
        return [_substitute(item, evidence) for item in value]
    return value


@dataclass
class _Evidence:
    text: str
    ok: bool


class ReWOOAgent(ToolAgent):
    """Reasoning WithOut Observation: one planner call, the tool calls as a dependency graph, one solver call.

    The planner writes every step up front as ``#E1 = tool[input]``; inputs may use earlier results
    (``#E1``). The plan is checked (:func:`parse_plan`): an unknown tool, a variable that no step
    defines, a cycle or a step using a later one's result is fed back to the planner, up to
    ``max_retries`` times. Then each step runs as soon as the steps it uses are done, independent
    steps concurrently; a step whose input needs a failed step is not run. Besides the tools, a plan
    may use ``LLM[question]`` (the model itself). The solver gets the plan with its evidence and
    answers. Model calls: two plus one per ``LLM`` step, however many tools run.

    The conversation (tasks and answers) is kept across runs until :meth:`reset`, and both planner and
    solver see it.

    Args:
        llm: Any LLM protocol implementation.
        tools: The tools (plain functions are wrapped with :func:`~lmstack.agent.tools.tool`).
        system: The system prompt (the planner's instructions are added to it).
        max_steps: Most steps a plan may have.
        max_retries: Most invalid plans that are fed back before the run stops.
        params: Sampling parameters (default: greedy, 1024 tokens).
    """

    @property
    def _names(self) -> list[str]:
        return list(self.tools) if LLM_TOOL in self.tools else [LLM_TOOL, *self.tools]

    async def _arun(self, task: str) -> AgentResult:
        steps: list[Step] = []
        plan = await self._plan(task, steps)
        if isinstance(plan, AgentResult):
            return plan
        evidence = await self._work(plan, steps)
        solved = SOLVER_PROMPT.format(evidence=self._evidence_text(plan, evidence), task=task)
        t0 = time.perf_counter()
        messages = [
            {"role": "system", "content": self.system},
            *self._messages,
            {"role": "user", "content": solved},
        ]
        answer = (await achat(self.llm, messages, self.params)).outputs[0].text.strip()
        steps.append(Step("answer", answer, seconds=time.perf_counter() - t0))
        self._messages += [{"role": "user", "content": task}, {"role": "assistant", "content": answer}]
        return self._result(answer, steps, finished=True)

    async def _plan(self, task: str, steps: list[Step]) -> list[PlanStep] | AgentResult:
        """Ask for a plan until one is valid (or the retries are used up: the run's result)."""
        listing = tools_listing(list(self.tools.values()))
        prompt = PLANNER_PROMPT.format(max_steps=self.max_steps, llm=LLM_TOOL, tools=listing)
        messages = [
            {"role": "system", "content": f"{self.system}\n\n{prompt}"},
            *self._messages,
            {"role": "user", "content": task},
        ]
        for attempt in range(self.max_retries + 1):
            t0 = time.perf_counter()
            text = (await achat(self.llm, messages, self.params)).outputs[0].text
            seconds = time.perf_counter() - t0
            steps.append(Step("plan", text.strip(), seconds=seconds))
            try:
                return parse_plan(text, self._names, max_steps=self.max_steps)
            except PlanError as exc:
                error = str(exc)
            steps.append(Step("error", error, ok=False))
            logger.debug("invalid plan (attempt %d): %s", attempt + 1, error)
            messages += [
                {"role": "assistant", "content": text},
                {"role": "user", "content": f"The plan is not valid: {error}. Write the whole plan again."},
            ]
        return self._gave_up(self.max_retries + 1, error, steps)

    async def _work(self, plan: list[PlanStep], steps: list[Step]) -> dict[str, _Evidence]:
        """Run the plan: each step once the steps it uses are done, independent ones concurrently."""
        tasks: dict[str, asyncio.Task[_Evidence]] = {}

        async def run(step: PlanStep) -> _Evidence:
            done = [await tasks[dep] for dep in step.deps]
            failed = [dep for dep, evidence in zip(step.deps, done, strict=True) if not evidence.ok]
            if failed:
                skipped = _Evidence(f"not run: {', '.join(failed)} failed", ok=False)
                steps.append(Step("tool_result", skipped.text, tool=step.tool, ok=False))
                return skipped
            return await self._run_step(
                step, {dep: e.text for dep, e in zip(step.deps, done, strict=True)}, steps
            )

        # Steps only use earlier ones (checked), so each task's dependencies exist when it is made.
        for step in plan:
            tasks[step.var] = asyncio.ensure_future(run(step))
        try:
            await asyncio.gather(*tasks.values())
        except BaseException:
            for pending in tasks.values():
                pending.cancel()
            raise
        return {var: task.result() for var, task in tasks.items()}

    async def _run_step(self, step: PlanStep, evidence: dict[str, str], steps: list[Step]) -> _Evidence:
        """Run one step with its variables replaced by their evidence."""
        try:
            written: Any = loads_lenient(step.input)
        except ValueError:
            written = step.input
        if not isinstance(written, dict):
            written = _substitute(step.input, evidence)
        else:
            written = _substitute(written, evidence)
        label = f"{step.var} = {step.tool}"
        if step.tool == LLM_TOOL and LLM_TOOL not in self.tools:
            question = written if isinstance(written, str) else json.dumps(written, ensure_ascii=False)
            steps.append(Step("tool_call", f"{label}[{question}]", tool=LLM_TOOL, arguments=question))
            t0 = time.perf_counter()
            messages = [{"role": "user", "content": question}]
            reply = (await achat(self.llm, messages, self.params)).outputs[0].text.strip()
            steps.append(Step("tool_result", reply, tool=LLM_TOOL, arguments=question,
                              seconds=time.perf_counter() - t0))  # fmt: skip
            return _Evidence(reply, ok=True)
        found = self.tools[step.tool]
        call = self.prepare(
            step.tool, written if isinstance(written, dict) else arguments_from_input(found, written)
        )
        if call.error is not None:
            steps.append(Step("error", call.error, tool=step.tool, arguments=call.arguments, ok=False))
            return _Evidence(f"Error: {call.error}", ok=False)
        steps.append(
            Step("tool_call", f"{label}[{call.arguments}]", tool=step.tool, arguments=call.arguments)
        )
        out, seconds = await self.execute(call)
        steps.append(Step("tool_result", out.content, tool=step.tool, arguments=call.arguments, ok=out.ok,
                          seconds=seconds))  # fmt: skip
        return _Evidence(out.content, ok=out.ok)

    @staticmethod
    def _evidence_text(plan: list[PlanStep], evidence: dict[str, _Evidence]) -> str:
        blocks = []
        for step in plan:
            head = f"Plan: {step.description}\n" if step.description else ""
            blocks.append(f"{head}{step}\nEvidence: {evidence[step.var].text}")
        return "\n\n".join(blocks)
