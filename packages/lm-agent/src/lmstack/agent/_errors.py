"""The errors lmstack-agent raises: one base class, subclassed by what went wrong."""

from __future__ import annotations

from lmstack.core import LMStackError

__all__ = ["AgentError", "FetchError", "PlanError", "SearchError", "ToolArgumentError", "ToolError"]


class AgentError(LMStackError):
    """Base class of lmstack-agent's errors."""


class ToolError(AgentError):
    """A tool is defined wrongly, or could not be run."""


class ToolArgumentError(ToolError):
    """A tool call's arguments do not match the tool's parameters (the message names the field)."""


class SearchError(AgentError):
    """A search backend failed: unreachable, slow, or an answer that is not search results."""


class FetchError(AgentError):
    """A page could not be fetched or read: unreachable, too slow, too large, not text."""


class PlanError(AgentError):
    """A planner's output is not a valid plan (the message says why; it is fed back to the planner)."""
