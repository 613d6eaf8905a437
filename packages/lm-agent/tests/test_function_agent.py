"""FunctionCallingAgent: native and text-protocol tool calls, retries, limits, concurrency, memory."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from scripted import ScriptedLLM, text_only

from lmstack.agent.agents import FunctionCallingAgent, parse_tool_calls
from lmstack.agent.tools import calculator, python_tool, tool
from lmstack.infer import InvalidRequestError, ToolCall


def scripted(*replies: Any, latency_s: float = 0.0) -> ScriptedLLM:
    """A ScriptedLLM answering each chat with the next reply of the script."""
    queue = list(replies)
    return ScriptedLLM(lambda messages, options: queue.pop(0), latency_s=latency_s)


def call(name: str, arguments: Any, id: str = "call_1") -> ToolCall:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return ToolCall(id=id, name=name, arguments=text)


def kinds(result: Any) -> list[str]:
    return [step.kind for step in result.steps]


def test_native_tool_call_then_answer() -> None:
    llm = scripted([call("calculator", {"expression": "6 * 7"})], "It is 42.")
    result = FunctionCallingAgent(llm, [calculator]).run("What is 6 times 7?")

    assert result.finished and result.answer == "It is 42."
    assert kinds(result) == ["tool_call", "tool_result", "answer"]
    assert result.steps[1].content == str(6 * 7) and result.steps[1].ok
    first, second = llm.calls
    assert first.options["tools"] == [calculator.spec()] and first.options["tool_choice"] == "auto"
    assistant, answered = second.messages[-2], second.messages[-1]
    assert assistant["role"] == "assistant"
    assert assistant["tool_calls"] == [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "calculator", "arguments": '{"expression": "6 * 7"}'},
        }
    ]
    assert answered == {"role": "tool", "tool_call_id": "call_1", "name": "calculator", "content": "42"}
    assert result.messages[-1] == {"role": "assistant", "content": "It is 42."}


def test_text_protocol_when_backend_has_no_tool_calling() -> None:
    llm = scripted(
        'Let me compute.\n<tool_call>\n{"name": "calculator", "arguments": {"expression": "2 ** 10"}}\n'
        "</tool_call>",
        "1024",
    )
    agent = FunctionCallingAgent(text_only(llm), [calculator])
    assert not agent.native
    result = agent.run("2 to the 10th?")

    assert result.finished and result.answer == "1024"
    assert kinds(result) == ["thought", "tool_call", "tool_result", "answer"]
    assert result.steps[0].content == "Let me compute."
    system = llm.calls[0].messages[0]["content"]
    assert "<tool_call>" in system and "calculator" in system
    assert json.dumps(calculator.parameters) in system  # the schema is shown to the model
    assert all(c.options["tools"] is None for c in llm.calls)
    feedback = llm.calls[1].messages[-1]
    assert feedback["role"] == "user"
    assert feedback["content"] == f'<tool_result name="calculator">\n{2**10}\n</tool_result>'


def test_use_native_tools_false_forces_the_text_protocol() -> None:
    llm = scripted('{"name": "calculator", "arguments": {"expression": "1 + 1"}}', "2")
    result = FunctionCallingAgent(llm, [calculator], use_native_tools=False).run("1 + 1?")
    assert result.answer == "2" and result.steps[1].content == "2"
    assert llm.calls[0].options["tools"] is None


def test_use_native_tools_true_without_tool_calling_is_refused() -> None:
    with pytest.raises(InvalidRequestError) as info:
        FunctionCallingAgent(text_only(scripted()), [calculator], use_native_tools=True)
    assert info.value.param == "use_native_tools"


@pytest.mark.parametrize(
    ("reply", "arguments"),
    [
        ('<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>', {"a": 1}),
        ('<TOOL_CALL>\n{"name": "f", "arguments": {"a": 1}}', {"a": 1}),  # unclosed, any case
        ('<tool_call>\n```json\n{"name": "f", "arguments": {"a": 1}}\n```\n</tool_call>', {"a": 1}),
        ('I will call it.\n```json\n{"name": "f", "arguments": {"a": [1, 2]}}\n```', {"a": [1, 2]}),
        ('Calling {"name": "f", "arguments": {"s": "{not a brace}"}} now', {"s": "{not a brace}"}),
        (
            "<tool_call>{'name': 'f', 'arguments': {'s': 'say \"hi\"', 'b': True,},}</tool_call>",
            {"s": 'say "hi"', "b": True},
        ),
        ('{"name": "f", "parameters": {"a": null}}', {"a": None}),
        (
            '<tool_call>{"type": "function", "function": {"name": "f", "arguments": "{\\"a\\": 1}"}}'
            "</tool_call>",
            '{"a": 1}',
        ),
        (
            '<tool_call>{"name": "f", "arguments": {"code": "print(1)\nprint(2)"}}</tool_call>',
            {"code": "print(1)\nprint(2)"},
        ),
    ],
)
def test_tolerant_text_parser(reply: str, arguments: Any) -> None:
    parsed = parse_tool_calls(reply)
    assert parsed.errors == []
    assert [(c.name, c.arguments) for c in parsed.calls] == [("f", arguments)]


def test_text_parser_leaves_plain_answers_and_json_answers_alone() -> None:
    for text in ["The answer is 4.", '{"name": "Ada", "born": 1815}', "```python\nprint({'a': 1})\n```"]:
        parsed = parse_tool_calls(text)
        assert parsed.calls == [] and parsed.errors == [] and parsed.content == text


def test_text_parser_reads_several_calls_and_reports_a_broken_one() -> None:
    parsed = parse_tool_calls(
        'A <tool_call>{"name": "f", "arguments": {}}</tool_call> '
        'B <tool_call>{"name": "g", "arguments": {"x": 1</tool_call>'
        ' C <tool_call>{"arguments": {}}</tool_call>'
    )
    assert [c.name for c in parsed.calls] == ["f"]
    assert len(parsed.errors) == 2
    assert "not valid JSON" in parsed.errors[0] and '"name"' in parsed.errors[1]
    assert parsed.content == "A  B  C"


def test_malformed_native_call_is_fed_back_and_retried() -> None:
    llm = scripted(
        [call("calculater", {"expression": "1+1"}, id="c1")],
        [call("calculator", {"expression": 5}, id="c2")],
        [call("calculator", {"expression": "1+1"}, id="c3")],
        "2",
    )
    result = FunctionCallingAgent(llm, [calculator], max_retries=2).run("1+1")

    assert result.finished and result.answer == "2"
    assert kinds(result) == ["error", "error", "tool_call", "tool_result", "answer"]
    unknown = llm.calls[1].messages[-1]
    assert unknown["role"] == "tool" and unknown["tool_call_id"] == "c1"
    assert "no tool named 'calculater'" in unknown["content"] and "calculator" in unknown["content"]
    wrong_type = llm.calls[2].messages[-1]["content"]
    assert "'expression'" in wrong_type and "string" in wrong_type
    assert wrong_type.startswith("Error:") and result.steps[1].content in wrong_type


def test_malformed_text_call_is_fed_back_as_a_user_message() -> None:
    llm = scripted(
        '<tool_call>{"name": "calculator", "arguments": {"expression": "3*3"</tool_call>',
        '<tool_call>{"name": "calculator", "arguments": {"expression": "3*3"}}</tool_call>',
        "9",
    )
    result = FunctionCallingAgent(text_only(llm), [calculator]).run("3*3")
    assert result.finished and result.answer == "9"
    feedback = llm.calls[1].messages[-1]
    assert feedback["role"] == "user" and "not valid JSON" in feedback["content"]
    assert result.steps[0].kind == "error" and not result.steps[0].ok


def test_retries_are_bounded() -> None:
    llm = ScriptedLLM(lambda messages, options: [call("nope", {})])
    result = FunctionCallingAgent(llm, [calculator], max_retries=2, max_steps=10).run("x")
    assert not result.finished
    assert len(llm.calls) == 3  # the first try and two retries
    assert "3 times in a row" in result.answer and "no tool named 'nope'" in result.answer
    assert kinds(result) == ["error"] * 3


def test_a_good_call_resets_the_retry_count() -> None:
    bad, good = [call("nope", {})], [call("calculator", {"expression": "1"})]
    llm = scripted(bad, bad, good, bad, bad, "done")
    result = FunctionCallingAgent(llm, [calculator], max_retries=2).run("x")
    assert result.finished and result.answer == "done"


def test_step_limit_ends_with_a_best_answer_without_tools() -> None:
    def respond(messages: list[dict[str, Any]], options: dict[str, Any]) -> Any:
        if options["tools"] is None:
            return "Best guess: 3."
        return [call("calculator", {"expression": "1 + 2"}, id=f"c{len(messages)}")]

    llm = ScriptedLLM(respond)
    result = FunctionCallingAgent(llm, [calculator], max_steps=3).run("loop forever")

    assert not result.finished and result.answer == "Best guess: 3."
    assert len(llm.calls) == 4 and [c.options["tools"] is None for c in llm.calls] == [False] * 3 + [True]
    assert kinds(result) == ["tool_call", "tool_result"] * 3 + ["answer"]
    last_prompt = llm.calls[-1].messages[-1]
    assert last_prompt["role"] == "user" and "3 steps" in last_prompt["content"]


def test_calls_of_one_reply_run_concurrently() -> None:
    spans: dict[str, list[float]] = {}
    state: dict[str, Any] = {}

    @tool
    async def wait_for_others(label: str) -> str:
        """Wait until all three calls have started.

        Args:
            label: Which call this is.
        """
        if "all" not in state:
            state["all"], state["n"] = asyncio.Event(), 0
        spans[label] = [time.perf_counter()]
        state["n"] += 1
        if state["n"] == 3:
            state["all"].set()
        await asyncio.wait_for(state["all"].wait(), timeout=10)  # run one at a time, this would time out
        spans[label].append(time.perf_counter())
        return label.upper()

    calls = [call("wait_for_others", {"label": x}, id=f"c_{x}") for x in "abc"]
    llm = scripted(calls, "done", latency_s=0.05)
    result = FunctionCallingAgent(llm, [wait_for_others]).run("go")

    assert result.finished
    assert [s.content for s in result.steps if s.kind == "tool_result"] == ["A", "B", "C"]
    assert max(start for start, _ in spans.values()) < min(end for _, end in spans.values())
    assert [m["tool_call_id"] for m in llm.calls[1].messages if m["role"] == "tool"] == ["c_a", "c_b", "c_c"]


def test_sandbox_timeout_is_fed_back_and_the_agent_continues() -> None:
    llm = scripted(
        [call("python", {"code": "while True:\n    pass"})],
        [call("python", {"code": "print(sum(range(10)))"})],
        "45",
    )
    result = FunctionCallingAgent(llm, [python_tool(timeout_s=1)]).run("sum 0..9")

    assert result.finished and result.answer == "45"
    looped, summed = [s for s in result.steps if s.kind == "tool_result"]
    assert not looped.ok and "timed out" in looped.content
    assert summed.ok and summed.content.strip() == str(sum(range(10)))
    assert llm.calls[1].messages[-1]["content"] == looped.content


def test_memory_is_kept_across_runs_until_reset() -> None:
    llm = scripted("Hello Ada.", "Your name is Ada.", "I do not know.")
    agent = FunctionCallingAgent(llm, [calculator], system="Be brief.")
    agent.run("I am Ada.")
    second = agent.run("What is my name?")

    assert [m["content"] for m in llm.calls[1].messages] == [
        "Be brief.",
        "I am Ada.",
        "Hello Ada.",
        "What is my name?",
    ]
    assert second.messages[-1]["content"] == "Your name is Ada." and len(second.messages) == 5
    agent.reset()
    agent.run("What is my name?")
    assert [m["role"] for m in llm.calls[2].messages] == ["system", "user"]


def test_a_failed_model_call_leaves_the_memory_as_it_was() -> None:
    def respond(messages: list[dict[str, Any]], options: dict[str, Any]) -> Any:
        raise ConnectionError("backend down")

    agent = FunctionCallingAgent(ScriptedLLM(respond), [calculator])
    with pytest.raises(ConnectionError):
        agent.run("hi")
    assert agent.messages == []


def test_plain_functions_become_tools_and_names_must_be_unique() -> None:
    def add(a: int, b: int) -> int:
        """Add two integers.

        Args:
            a: First.
            b: Second.
        """
        return a + b

    llm = scripted([call("add", {"a": 2, "b": "3"})], "5")
    result = FunctionCallingAgent(llm, [add]).run("2+3")
    assert result.steps[1].content == "5"
    with pytest.raises(InvalidRequestError):
        FunctionCallingAgent(llm, [calculator, calculator])
    with pytest.raises(InvalidRequestError):
        FunctionCallingAgent(llm, [calculator], max_steps=0)


def test_run_works_inside_a_running_event_loop() -> None:
    llm = scripted("hi")

    async def main() -> str:
        return FunctionCallingAgent(llm, []).run("hello").answer

    assert asyncio.run(main()) == "hi"
