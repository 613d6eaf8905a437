"""The graph search agent: a planned DAG of sub-questions, searched concurrently, answered with citations.

See :class:`GraphSearchAgent`; every step of a search is an :class:`AgentEvent`.
"""

from __future__ import annotations

from lmstack.agent.graph._actions import Action, actions_schema, parse_actions
from lmstack.agent.graph._agent import GraphSearchAgent, Reference, SearchResult
from lmstack.agent.graph._events import EVENT_SCHEMA_VERSION, EVENT_TYPES, AgentEvent

__all__ = [
    "EVENT_SCHEMA_VERSION",
    "EVENT_TYPES",
    "Action",
    "AgentEvent",
    "GraphSearchAgent",
    "Reference",
    "SearchResult",
    "actions_schema",
    "parse_actions",
]
