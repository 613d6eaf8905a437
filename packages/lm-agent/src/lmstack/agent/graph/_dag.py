"""The graph of sub-questions: a networkx DAG that the planner grows and execution follows.

Each planner step adds nodes atomically: the step is checked as a whole (duplicate names, unknown
parents, cycles, the node limit) and either every node is added or none is, with one
:class:`PlanError` listing every problem so the planner can fix them all in its next reply. Parents
may be named before they are defined within one step; edges run from parent to child.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from lmstack.agent._errors import PlanError
from lmstack.agent.graph._actions import Action

__all__ = ["Node", "SearchGraph"]


@dataclass
class Node:
    """One sub-question and what became of it.

    Args:
        name: The planner's name for it.
        question: The sub-question.
        parents: The nodes whose answers it needs.
        status: ``"pending"``, ``"running"``, ``"answered"`` or ``"failed"``.
        answer: Its answer, with ``[[n]]`` citations numbered within the node.
        citations: ``{"n", "url", "title"}`` for each page the answer cites.
        queries: The search queries it ran.
        pages: ``{"url", "title"}`` of each page it read.
        error: Why it failed (``status == "failed"``), or None.
    """

    name: str
    question: str
    parents: tuple[str, ...] = ()
    status: str = "pending"
    answer: str = ""
    citations: list[dict[str, Any]] = field(default_factory=list)
    queries: list[str] = field(default_factory=list)
    pages: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None

    @property
    def done(self) -> bool:
        """Whether it has an answer or has failed (its children may run)."""
        return self.status in ("answered", "failed")

    def to_json(self) -> dict[str, Any]:
        """The node as a JSON object."""
        return {
            "question": self.question,
            "parents": list(self.parents),
            "status": self.status,
            "answer": self.answer,
            "citations": [dict(c) for c in self.citations],
            "queries": list(self.queries),
            "pages": [dict(p) for p in self.pages],
            "error": self.error,
        }


class SearchGraph:
    """The DAG of sub-questions.

    Args:
        max_nodes: Most nodes the graph may hold.
    """

    def __init__(self, max_nodes: int) -> None:
        self.max_nodes = max_nodes
        self.graph: nx.DiGraph = nx.DiGraph()
        self.nodes: dict[str, Node] = {}

    def __len__(self) -> int:
        return len(self.nodes)

    @property
    def edges(self) -> list[tuple[str, str]]:
        """``(parent, child)`` pairs, in the order they were added."""
        return list(self.graph.edges)

    def add(self, actions: Sequence[Action]) -> list[Node]:
        """Add a step's ``add_node`` actions, all or none.

        Returns:
            The new nodes, parents before children (otherwise in the step's order).

        Raises:
            PlanError: Duplicate names, unknown parents, a cycle, or too many nodes; the message lists
                every problem.
        """
        new = [a for a in actions if a.op == "add_node"]
        problems: list[str] = []
        seen: set[str] = set()
        for action in new:
            if action.name in self.nodes:
                problems.append(
                    f"add_node {action.name!r}: a node named {action.name!r} already exists (question: "
                    f"{self.nodes[action.name].question!r}); pick a new name, or use it as a parent"
                )
            elif action.name in seen:
                problems.append(f"add_node {action.name!r}: the name is used twice in this reply")
            seen.add(action.name)
        for action in new:
            unknown = [p for p in action.parents if p not in self.nodes and p not in seen]
            if unknown:
                known = ", ".join(sorted({*self.nodes, *seen})) or "none yet"
                problems.append(
                    f"add_node {action.name!r}: unknown parent{'s' if len(unknown) > 1 else ''} "
                    f"{', '.join(map(repr, unknown))} (the nodes are: {known})"
                )
        total = len(self.nodes) + len(seen)
        if total > self.max_nodes:
            room = self.max_nodes - len(self.nodes)
            problems.append(
                f"this reply adds {len(seen)} nodes, making {total}: "
                f"more than the limit of {self.max_nodes}; "
                + (
                    f"add at most {room} more, or finish"
                    if room > 0
                    else "no more nodes may be added: finish"
                )
            )
        if problems:
            raise PlanError("; ".join(problems))
        trial = self.graph.copy()
        order = {a.name: i for i, a in enumerate(new)}
        trial.add_nodes_from(order)
        trial.add_edges_from((p, a.name) for a in new for p in a.parents)
        try:
            cycle = nx.find_cycle(trial)
        except nx.NetworkXNoCycle:
            cycle = None
        if cycle:
            path = " -> ".join([cycle[0][0], *(v for _, v in cycle)])
            raise PlanError(
                f"the parents form a cycle: {path}; a node cannot depend on itself, even through others"
            )
        by_name = {a.name: a for a in new}
        added = []
        for name in nx.lexicographical_topological_sort(trial.subgraph(order), key=order.__getitem__):
            action = by_name[name]
            node = Node(action.name, action.question, action.parents)
            self.nodes[name] = node
            added.append(node)
        self.graph = trial
        return added
