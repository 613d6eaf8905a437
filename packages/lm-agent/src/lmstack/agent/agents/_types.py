"""What an agent run gives back: the answer and a transcript of every step."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["STEP_KINDS", "AgentResult", "Step"]

# The kinds of step a transcript holds.
STEP_KINDS = ("thought", "tool_call", "tool_result", "answer", "error", "plan")


@dataclass
class Step:
    """One step of an agent run, as the transcript records it.

    Attributes:
        kind: ``"thought"`` (the model's reasoning or text beside its calls), ``"tool_call"`` (a call
            the model asked for), ``"tool_result"`` (what the tool gave back), ``"plan"`` (a
            planner's plan), ``"answer"`` (the final answer) or ``"error"`` (a malformed reply or
            call, with the message fed back to the model).
        content: The step's text: the thought, the call's arguments, the tool's output, the plan,
            the answer or the error message.
        tool: The tool's name (calls and results).
        arguments: The call's arguments as JSON text (calls and results).
        ok: False for an error step and for a tool result that failed.
        seconds: How long the step took: the model call that produced it (given to the first step
            taken from one reply; the reply's other steps have 0) or the tool's run.
    """

    kind: str
    content: str
    tool: str | None = None
    arguments: str | None = None
    ok: bool = True
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """The step as a JSON-ready dict."""
        return asdict(self)


@dataclass
class AgentResult:
    """The outcome of one agent run.

    Attributes:
        answer: The final answer; when the run did not finish normally, the best answer the model
            gave at the step limit, or the error that stopped it.
        steps: Every step of this run, in order.
        messages: The whole conversation the agent keeps (its memory across runs), a copy.
        finished: True when the model gave its answer within the limits; False when the step limit
            was hit or malformed calls used up the retries.
    """

    answer: str
    steps: list[Step]
    messages: list[dict[str, Any]]
    finished: bool
