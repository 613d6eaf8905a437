"""ReActAgent: the tolerant Thought/Action/Observation parser and the agent loop."""

from __future__ import annotations

from typing import Any

import pytest
from scripted import ScriptedLLM, text_only

from lmstack.agent.agents import ReActAgent, parse_react
from lmstack.agent.tools import calculator, tool
from lmstack.infer import SamplingParams


def scripted(*replies: str) -> ScriptedLLM:
    queue = list(replies)
    return ScriptedLLM(lambda messages, options: queue.pop(0))


@tool
def lookup(key: str, exact: bool = True) -> str:
    """Look a key up.

    Args:
        key: The key.
        exact: Match exactly.
    """
    return {"ada": "Ada Lovelace, born 1815"}.get(key.lower(), "not found")


@pytest.mark.parametrize(
    ("text", "thought", "action", "action_input"),
    [
        ('Thought: add them\nAction: calculator\nAction Input: {"expression": "2+2"}', "add them",
         "calculator",
         '{"expression": "2+2"}'),
        ("thought : add them\naction : calculator\naction input : 2+2", "add them", "calculator", "2+2"),
        ("I should add.\nAction: calculator\nAction Input: 2+2", "I should add.", "calculator", "2+2"),
        ("**Thought:** add\n**Action:** `calculator`\n**Action Input:** 2+2", "add", "calculator", "2+2"),
        ("Thought: add\nAction: calculator[2 + 2]", "add", "calculator", "2 + 2"),
        ("Thought: add\nAction: calculator(2 + 2)", "add", "calculator", "2 + 2"),
        ('Thought: add\nAction:\n```json\n{"action": "calculator", "action_input": "2+2"}\n```', "add",
         "calculator", "2+2"),
        ('Thought: add\nAction: calculator\n{"expression": "2+2"}', "add", "calculator",
         '{"expression": "2+2"}'),
        ("Thought: add\nAction: Calculator.\nAction_Input: 2+2\nObservation: 5\nFinal Answer: 5", "add",
         "Calculator", "2+2"),
    ],
)  # fmt: skip
def test_parser_reads_actions(text: str, thought: str, action: str, action_input: str) -> None:
    reply = parse_react(text)
    assert (reply.thought, reply.action, reply.action_input) == (thought, action, action_input)
    assert reply.final_answer is None and reply.error is None
    assert "Observation" not in reply.text  # a made-up observation is dropped


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("Thought: I know it.\nFinal Answer: 4", "4"),
        ("final answer: four\nand more lines", "four\nand more lines"),
        ("Thought: done\n**Final Answer:** 4", "4"),
        ('Thought: done\nAction: Final Answer\nAction Input: "4"', "4"),
        ("Thought: sure\nFinal Answer: 4\nAction: calculator\nAction Input: 2+2",
         "4\nAction: calculator\nAction Input: 2+2"),
    ],
)  # fmt: skip
def test_parser_reads_final_answers(text: str, answer: str) -> None:
    reply = parse_react(text)
    assert reply.final_answer == answer and reply.action is None and reply.error is None


def test_parser_reports_a_reply_with_neither() -> None:
    reply = parse_react("I think the answer might be four.")
    assert reply.action is None and reply.final_answer is None
    assert "neither an 'Action:' line nor a 'Final Answer:' line" in (reply.error or "")


def test_agent_runs_a_tool_and_answers() -> None:
    llm = scripted(
        "Thought: multiply\nAction: calculator\nAction Input: 6*7\nObservation: 41",
        "Thought: I know it.\nFinal Answer: 42",
    )
    agent = ReActAgent(text_only(llm), [calculator], params=SamplingParams(max_tokens=64, stop=["###"]))
    result = agent.run("What is 6*7?")

    assert result.finished and result.answer == "42"
    assert [s.kind for s in result.steps] == ["thought", "tool_call", "tool_result", "thought", "answer"]
    assert result.steps[1].arguments == '{"expression": "6*7"}'  # plain input -> the single parameter
    assert result.steps[2].content == str(6 * 7)
    second = llm.calls[1].messages
    assert second[-2] == {
        "role": "assistant",
        "content": "Thought: multiply\nAction: calculator\nAction Input: 6*7",
    }
    assert second[-1] == {"role": "user", "content": "Observation: 42"}
    assert llm.calls[0].params is not None and llm.calls[0].params.stop == ["###", "\nObservation:"]
    system = llm.calls[0].messages[0]["content"]
    assert "Action Input:" in system and "calculator" in system and "lookup" not in system


def test_json_action_input_and_case_insensitive_tool_name() -> None:
    llm = scripted('Action: Lookup\nAction Input: {"key": "Ada", "exact": false}', "Final Answer: 1815")
    result = ReActAgent(llm, [lookup]).run("When was Ada born?")
    assert result.steps[0].tool == "lookup" and result.steps[1].content == "Ada Lovelace, born 1815"
    assert result.answer == "1815"


def test_malformed_reply_is_fed_back_and_retried() -> None:
    llm = scripted(
        "The answer is probably 4.",
        "Thought: check\nAction: calculatr\nAction Input: 2+2",
        'Thought: check\nAction: calculator\nAction Input: {"expr": "2+2"}',
        "Thought: check\nAction: calculator\nAction Input: 2+2",
        "Final Answer: 4",
    )
    result = ReActAgent(llm, [calculator], max_retries=3).run("2+2?")

    assert result.finished and result.answer == "4"
    feedback = [c.messages[-1]["content"] for c in llm.calls[1:4]]
    assert "neither an 'Action:' line nor a 'Final Answer:' line" in feedback[0]
    assert "no tool named 'calculatr'" in feedback[1]
    assert "unknown field 'expr'" in feedback[2] and "'expression'" in feedback[2]
    assert all(f.startswith("Observation: Error:") for f in feedback)
    assert [s.kind for s in result.steps].count("error") == 3


def test_retries_are_bounded() -> None:
    llm = ScriptedLLM(lambda messages, options: "no idea")
    result = ReActAgent(llm, [calculator], max_retries=1).run("x")
    assert not result.finished and len(llm.calls) == 2
    assert "2 times in a row" in result.answer


def test_tool_failure_is_an_observation_not_a_retry() -> None:
    llm = scripted(*["Action: calculator\nAction Input: 1/0"] * 3, "Final Answer: undefined")
    result = ReActAgent(llm, [calculator], max_retries=0).run("1/0?")
    assert result.finished and result.answer == "undefined"
    failed = [s for s in result.steps if s.kind == "tool_result"]
    assert len(failed) == 3 and not any(s.ok for s in failed)
    assert llm.calls[1].messages[-1]["content"] == f"Observation: {failed[0].content}"


def test_step_limit_asks_for_the_final_answer() -> None:
    def respond(messages: list[dict[str, Any]], options: dict[str, Any]) -> str:
        if "steps this task allows" in messages[-1]["content"]:
            return "Thought: out of steps\nFinal Answer: about 2"
        return "Action: calculator\nAction Input: 1+1"

    llm = ScriptedLLM(respond)
    result = ReActAgent(llm, [calculator], max_steps=2).run("x")
    assert not result.finished and result.answer == "about 2"
    assert len(llm.calls) == 3
    assert "Final Answer:" in llm.calls[-1].messages[-1]["content"]


def test_memory_is_kept_across_runs() -> None:
    llm = scripted("Final Answer: hi Ada", "Final Answer: Ada")
    agent = ReActAgent(llm, [calculator])
    agent.run("I am Ada")
    result = agent.run("Who am I?")
    assert [m["content"] for m in llm.calls[1].messages[1:]] == [
        "I am Ada",
        "Final Answer: hi Ada",
        "Who am I?",
    ]
    assert len(result.messages) == 5
