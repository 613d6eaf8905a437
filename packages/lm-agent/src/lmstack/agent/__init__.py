"""lmstack.agent: tool agents (Lagent's job) and a graph search agent (MindSearch's job).

Every agent talks to its model through the LLM protocol, so it runs the same on the local engine
(:class:`lmstack.infer.LLM`) and on any OpenAI-compatible server (:class:`lmstack.infer.RemoteLLM`).

* :mod:`lmstack.agent.tools`: the ``@tool`` decorator (a JSON schema from type hints and the
  docstring, arguments validated with pydantic), the calculator, the sandboxed Python tool, web
  search backends (SearxNG, any JSON search API, any object with the search-backend shape such as an
  lmstack-rag index) and page fetching; :class:`~lmstack.agent.tools.LocalSearchServer`, a folder of
  documents served as a SearxNG-compatible search engine.
* :mod:`lmstack.agent.sandbox`: ``run_python`` in a separate, limited process (core's sandbox).
* Tool agents: :class:`FunctionCallingAgent` (OpenAI tools through the protocol, or a text protocol
  with a tolerant parser), :class:`ReActAgent`, :class:`ReWOOAgent` (plan, run independent steps
  concurrently, solve).
* :class:`GraphSearchAgent`: a planner builds a DAG of sub-questions as validated actions (JSON
  under a schema, or a Python subset parsed with ``ast``, never executed); each node searches, reads
  pages and answers with citations as soon as its parents are answered, independent nodes
  concurrently; every step is an :class:`AgentEvent`. :mod:`lmstack.agent.web` streams them to a page.
"""

from lmstack.agent._errors import (
    AgentError,
    FetchError,
    PlanError,
    SearchError,
    ToolArgumentError,
    ToolError,
)
from lmstack.agent.agents import AgentResult, FunctionCallingAgent, ReActAgent, ReWOOAgent, Step
from lmstack.agent.graph import EVENT_SCHEMA_VERSION, AgentEvent, GraphSearchAgent, Reference, SearchResult
from lmstack.agent.tools import Tool, ToolOutput, tool

__version__ = "0.1.0"

__all__ = [
    "EVENT_SCHEMA_VERSION",
    "AgentError",
    "AgentEvent",
    "AgentResult",
    "FetchError",
    "FunctionCallingAgent",
    "GraphSearchAgent",
    "PlanError",
    "ReActAgent",
    "ReWOOAgent",
    "Reference",
    "SearchError",
    "SearchResult",
    "Step",
    "Tool",
    "ToolArgumentError",
    "ToolError",
    "ToolOutput",
    "__version__",
    "tool",
]
