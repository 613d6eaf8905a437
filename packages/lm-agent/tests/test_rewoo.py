"""ReWOOAgent: plan parsing and checking, dependency order, concurrency of independent steps, solving."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from scripted import ScriptedLLM

from lmstack.agent._errors import PlanError
from lmstack.agent.agents import ReWOOAgent, parse_plan
from lmstack.agent.tools import calculator, tool

TOOLS = ["LLM", "search", "calculator"]


def planner_and_solver(
    plans: list[str], answer: str = "ANSWER", llm_steps: dict[str, str] | None = None
) -> Any:
    """Replies: the plans in turn to planner calls, ``answer`` to the solver, a lookup to LLM steps."""
    queue = list(plans)

    def respond(messages: list[dict[str, Any]], options: dict[str, Any]) -> str:
        if "make a plan" in messages[0]["content"]:
            return queue.pop(0)
        if messages[0]["role"] == "system":
            return answer
        return (llm_steps or {})[messages[-1]["content"]]

    return respond


def test_parse_plan_reads_steps_descriptions_and_dependencies() -> None:
    text = """Plan: find the population.
#E1 = search[population of Paris]
Plan: and the area
**#E2** = search({"query": "area of Paris"})
- #E3: Calculator[{"expression": "#E1 / #E2"}]
#E4 = LLM[Given #E3
and #E1, what is the density [people per km2]?]
"""
    steps = parse_plan(text, TOOLS)
    assert [(s.var, s.tool, s.deps) for s in steps] == [
        ("#E1", "search", ()),
        ("#E2", "search", ()),
        ("#E3", "calculator", ("#E1", "#E2")),
        ("#E4", "LLM", ("#E3", "#E1")),
    ]
    assert steps[0].description == "find the population." and steps[1].description == "and the area"
    assert steps[2].description == ""
    assert steps[1].input == '{"query": "area of Paris"}'
    assert steps[3].input == "Given #E3\nand #E1, what is the density [people per km2]?"


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        ("I will just answer.", "the plan has no steps"),
        (
            "#E1 = browse[x]",
            "step #E1 uses the unknown tool 'browse'; the tools are: LLM, search, calculator",
        ),
        ("#E1 = search[x]\n#E2 = search[#E7]", "step #E2 uses #E7, which no step defines"),
        ("#E1 = search[#E2]\n#E2 = search[#E1]", "the plan has a cycle: #E1 -> #E2 -> #E1"),
        ("#E1 = search[#E1]", "the plan has a cycle: #E1 -> #E1"),
        ("#E1 = search[#E2]\n#E2 = search[x]", "step #E1 uses #E2, which comes after it"),
        ("#E1 = search[x]\n#E1 = search[y]", "#E1 is defined twice"),
        ("\n".join(f"#E{i} = search[{i}]" for i in range(1, 5)), "the plan has 4 steps; use at most 3"),
    ],
)
def test_parse_plan_rejects_invalid_plans(plan: str, message: str) -> None:
    with pytest.raises(PlanError) as info:
        parse_plan(plan, TOOLS, max_steps=3)
    assert message in str(info.value)


def test_dependencies_are_respected_and_independent_steps_overlap() -> None:
    spans: dict[str, tuple[float, float]] = {}
    state: dict[str, Any] = {}

    @tool
    async def search(query: str) -> str:
        """Search.

        Args:
            query: What to look for.
        """
        start = time.perf_counter()
        if "both" not in state:
            state["both"], state["n"] = asyncio.Event(), 0
        state["n"] += 1
        if state["n"] == 2:
            state["both"].set()
        # Both searches must be running at once, or this times out and the test fails.
        await asyncio.wait_for(state["both"].wait(), timeout=10)
        spans[query] = (start, time.perf_counter())
        return {"population of Paris": "2100000", "area of Paris": "105"}[query]

    @tool
    async def divide(a: float, b: float) -> float:
        """Divide.

        Args:
            a: Dividend.
            b: Divisor.
        """
        spans["divide"] = (time.perf_counter(), time.perf_counter())
        return a / b

    plan = """Plan: population
#E1 = search[population of Paris]
Plan: area
#E2 = search[{"query": "area of Paris"}]
Plan: density
#E3 = divide[{"a": "#E1", "b": "#E2"}]"""
    llm = ScriptedLLM(planner_and_solver([plan], answer="About 20000 per km2."))
    result = ReWOOAgent(llm, [search, divide]).run("Population density of Paris?")

    assert result.finished and result.answer == "About 20000 per km2."
    population, area = spans["population of Paris"], spans["area of Paris"]
    assert max(population[0], area[0]) < min(population[1], area[1])  # the two searches overlapped
    assert spans["divide"][0] >= max(population[1], area[1])  # the division waited for both
    divided = [s for s in result.steps if s.kind == "tool_result" and s.tool == "divide"]
    assert divided[0].content == str(2100000 / 105)
    assert [s.kind for s in result.steps][:1] == ["plan"] and result.steps[-1].kind == "answer"
    solver = llm.calls[-1].messages[-1]["content"]
    assert "#E3 = divide[" in solver and f"Evidence: {2100000 / 105}" in solver and "Evidence: 105" in solver
    assert len(llm.calls) == 2  # one planner call and one solver call, whatever the tools do


def test_llm_steps_run_concurrently_and_feed_later_steps() -> None:
    plan = "#E1 = LLM[first?]\n#E2 = LLM[second?]\n#E3 = LLM[combine #E1 and #E2]"
    respond = planner_and_solver([plan], llm_steps={"first?": "1", "second?": "2", "combine 1 and 2": "3"})
    llm = ScriptedLLM(respond, latency_s=0.3)
    result = ReWOOAgent(llm, []).run("x")

    assert result.finished
    first, second, combine = (next(c for c in llm.calls if c.messages[-1]["content"] == q)
                              for q in ("first?", "second?", "combine 1 and 2"))  # fmt: skip
    assert max(first.start, second.start) < min(first.end, second.end)
    assert combine.start >= max(first.end, second.end)
    assert [s.content for s in result.steps if s.kind == "tool_result"][-1] == "3"


def test_invalid_plan_is_fed_back_to_the_planner() -> None:
    plans = [
        "#E1 = calculator[#E2]\n#E2 = calculator[1+1]",
        "#E1 = calculator[1+1]\n#E2 = calculator[#E1 * 10]",
    ]
    llm = ScriptedLLM(planner_and_solver(plans))
    result = ReWOOAgent(llm, [calculator]).run("x")

    assert result.finished and result.answer == "ANSWER"
    retry = llm.calls[1].messages
    assert retry[-2] == {"role": "assistant", "content": plans[0]}
    assert "step #E1 uses #E2, which comes after it" in retry[-1]["content"]
    expected = ["plan", "error", "plan", "tool_call", "tool_result", "tool_call", "tool_result", "answer"]
    assert [s.kind for s in result.steps] == expected
    assert [s.content for s in result.steps if s.kind == "tool_result"] == ["2", "20"]


def test_plan_retries_are_bounded() -> None:
    llm = ScriptedLLM(lambda messages, options: "#E1 = nothing[x]")
    result = ReWOOAgent(llm, [calculator], max_retries=2).run("x")
    assert not result.finished and len(llm.calls) == 3
    assert "unknown tool 'nothing'" in result.answer


def test_a_failed_step_is_reported_and_its_dependents_do_not_run() -> None:
    ran: list[str] = []

    @tool
    def echo(text: str) -> str:
        """Echo.

        Args:
            text: The text.
        """
        ran.append(text)
        return text

    plan = "#E1 = calculator[1/0]\n#E2 = echo[#E1]\n#E3 = echo[fine]"
    llm = ScriptedLLM(planner_and_solver([plan]))
    result = ReWOOAgent(llm, [calculator, echo]).run("x")

    assert result.finished and ran == ["fine"]
    solver = llm.calls[-1].messages[-1]["content"]
    assert "#E2 = echo[#E1]\nEvidence: not run: #E1 failed" in solver
    failed = next(s for s in result.steps if s.kind == "tool_result" and s.tool == "calculator")
    assert not failed.ok and failed.content in solver


def test_memory_reaches_planner_and_solver_on_the_next_run() -> None:
    llm = ScriptedLLM(planner_and_solver(["#E1 = calculator[2+2]", "#E1 = calculator[4*2]"], answer="ok"))
    agent = ReWOOAgent(llm, [calculator], system="S")
    agent.run("first task")
    result = agent.run("second task")
    planner, solver = llm.calls[2].messages, llm.calls[3].messages
    assert [m["content"] for m in planner[1:]] == ["first task", "ok", "second task"]
    assert [m["content"] for m in solver[1:3]] == ["first task", "ok"]
    assert result.messages == [
        {"role": "user", "content": "first task"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "second task"},
        {"role": "assistant", "content": "ok"},
    ]
