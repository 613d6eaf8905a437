"""The graph search agent's events: every step of a search, in a versioned schema.

A consumer (the web page, a log, a test) reads a run as a sequence of events. Each has a ``type``, the
seconds since the run started (``t``) and type-specific fields; :meth:`AgentEvent.to_json` flattens
them into one JSON object tagged with :data:`EVENT_SCHEMA_VERSION`, which changes only when a field is
renamed or removed (new types and new fields keep the version).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["EVENT_SCHEMA_VERSION", "EVENT_TYPES", "AgentEvent"]

EVENT_SCHEMA_VERSION = 1

#: Every event type and the fields it carries (besides ``v``, ``type`` and ``t``).
EVENT_TYPES: dict[str, tuple[str, ...]] = {
    "start": ("question",),
    "plan": ("raw", "actions"),
    "planner_error": ("error",),
    "node_added": ("name", "question", "parents"),
    "node_started": ("name",),
    "queries": ("node", "queries"),
    "search_results": ("node", "query", "hits"),  # plus "error" when the search failed
    "page_read": ("node", "url", "title", "chars"),
    "page_failed": ("node", "url", "error"),
    "node_answer": ("node", "answer", "citations"),
    "node_failed": ("node", "error"),
    "answer_delta": ("text",),
    "final_answer": ("answer", "references"),
    "error": ("message",),
    "done": ("seconds",),
}


@dataclass
class AgentEvent:
    """One step of a graph search.

    Args:
        type: What happened: one of :data:`EVENT_TYPES`' keys.
        data: The event's fields (see :data:`EVENT_TYPES`), JSON-serialisable.
        t: Seconds since the run started.
    """

    type: str
    data: dict[str, Any] = field(default_factory=dict)
    t: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """The event as one flat JSON object: ``{"v": EVENT_SCHEMA_VERSION, "type", "t", **data}``."""
        return {"v": EVENT_SCHEMA_VERSION, "type": self.type, "t": round(self.t, 6), **self.data}
