"""Tool agents: function calling, ReAct and ReWOO over any LLM protocol implementation.

* :class:`FunctionCallingAgent`: OpenAI tool calls through the protocol (``chat(..., tools=...)``),
  or, for a backend without tool calling, a text protocol of ``<tool_call>`` blocks read by a
  tolerant parser. Several calls of one reply run concurrently.
* :class:`ReActAgent`: Thought / Action / Action Input / Observation / Final Answer, on any backend.
* :class:`ReWOOAgent`: a plan of ``#E1 = tool[input]`` steps made up front, run as a dependency
  graph (independent steps concurrently), then solved in one call.

All three share the same shape::

    agent = FunctionCallingAgent(llm, [calculator, python_tool()], max_steps=8, max_retries=2)
    result = agent.run("What is 2**20 - 1?")
    result.answer, result.finished, result.steps  # the transcript: thoughts, calls, results, answer

Malformed calls (not JSON, an unknown tool, arguments that fail validation) are answered with the
error, up to ``max_retries`` in a row; a failing tool (the sandbox stopping an endless loop) is an
ordinary result the model sees; at ``max_steps`` the model is asked once more, without tools, for
its best answer (``finished=False``). The conversation is kept across ``run`` calls until
``reset()``. Model output is only ever parsed as data, never executed.
"""

from __future__ import annotations

from lmstack.agent.agents._function import FunctionCallingAgent
from lmstack.agent.agents._react import ReActAgent, ReActReply, parse_react
from lmstack.agent.agents._rewoo import LLM_TOOL, PlanStep, ReWOOAgent, parse_plan
from lmstack.agent.agents._text_protocol import TextCall, TextReply, loads_lenient, parse_tool_calls
from lmstack.agent.agents._types import AgentResult, Step

__all__ = [
    "LLM_TOOL",
    "AgentResult",
    "FunctionCallingAgent",
    "PlanStep",
    "ReActAgent",
    "ReActReply",
    "ReWOOAgent",
    "Step",
    "TextCall",
    "TextReply",
    "loads_lenient",
    "parse_plan",
    "parse_react",
    "parse_tool_calls",
]
