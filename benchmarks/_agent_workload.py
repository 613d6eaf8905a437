"""The graph search agent's benchmark workload: a plan of width w over a scripted LLM of fixed latency.

The planner's one reply adds ``w`` independent nodes and finishes. Each node makes two model calls
(write queries, answer; selection is skipped because each query finds one page), one search of an
in-memory backend and one fetch of an in-memory page; then one call writes the final answer. Every
model call sleeps ``latency_s`` in its worker thread (ScriptedLLM), so the agent's concurrency is
what makes the difference, and with zero latency what is left is the framework's own cost.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parents[1] / "packages" / "lm-agent" / "tests"))
from scripted import ScriptedLLM

from lmstack.agent.graph import GraphSearchAgent, SearchResult
from lmstack.agent.tools import Page

CALLS_PER_NODE = 2  # queries, answer
CALLS_OUTSIDE_NODES = 2  # the planner, the final answer


def _url(i: int) -> str:
    return f"https://bench.test/topic-{i}"


class MemorySearch:
    """An async in-memory backend: query "topic 3 ..." finds page 3."""

    async def search(self, query: str, k: int) -> list[dict[str, Any]]:
        found = re.search(r"topic (\d+)", query)
        if not found:
            return []
        i = int(found.group(1))
        return [{"title": f"Topic {i}", "url": _url(i), "snippet": f"about topic {i}", "score": 1.0}]


async def fetch(url: str) -> Page:
    i = int(url.rsplit("-", 1)[1])
    text = f"Topic {i} has the value {i * i}."
    return Page(url=url, title=f"Topic {i}", text=text, content_type="text/html", truncated=False)


def scripted(width: int, latency_s: float) -> ScriptedLLM:
    plan = json.dumps(
        {
            "actions": [
                *(
                    {"op": "add_node", "name": f"n{i}", "question": f"What is topic {i}?"}
                    for i in range(width)
                ),
                {"op": "finish"},
            ]
        }
    )

    def respond(messages: list[dict[str, Any]], options: dict[str, Any]) -> str:
        system, user = messages[0]["content"], messages[-1]["content"]
        if system.startswith("You are the planner"):
            return plan
        if system.startswith("You write web search queries"):
            return json.dumps({"queries": [user.split("Question: ")[-1]]})
        if system.startswith("You answer a sub-question"):
            return re.findall(r"^(Topic \d+ has the value \d+\.)$", user, re.MULTILINE)[0] + " [[1]]"
        return " ".join(re.findall(r"^(Topic \d+ has the value \d+\. \[\[\d+\]\])$", user, re.MULTILINE))

    return ScriptedLLM(respond, latency_s=latency_s)


@dataclass
class Measurement:
    """One run of the workload."""

    width: int
    concurrency: int
    latency_s: float
    wall_s: float  # the whole run: planner, nodes, final answer
    nodes_s: float  # first node started to last node answered
    critical_latency_s: float  # the injected latency on the critical path
    calls: int

    @property
    def overhead_per_node_s(self) -> float:
        """The run's own time beyond the injected latency on its critical path, per node."""
        return (self.wall_s - self.critical_latency_s) / self.width


def critical_path_calls(width: int, concurrency: int) -> int:
    """Model calls on the critical path: planner and final, plus two per node in each wave of nodes."""
    waves = -(-width // concurrency)
    return CALLS_OUTSIDE_NODES + CALLS_PER_NODE * waves


def run(width: int, latency_s: float, concurrency: int) -> Measurement:
    """One search over the workload; checks that every node was answered and cited."""
    llm = scripted(width, latency_s)
    agent = GraphSearchAgent(
        llm, MemorySearch(), fetch=fetch, max_nodes=width, concurrency=concurrency, queries_per_node=1,
        hits_per_query=1, pages_per_node=1,
    )  # fmt: skip
    start = time.perf_counter()
    result = asyncio.run(agent.arun(f"What are topics 0 to {width - 1}?"))
    wall = time.perf_counter() - start
    _check(result, width)
    started = min(e.t for e in result.events if e.type == "node_started")
    answered = max(e.t for e in result.events if e.type == "node_answer")
    calls = len(llm.calls)
    assert calls == CALLS_OUTSIDE_NODES + CALLS_PER_NODE * width, calls
    return Measurement(width, concurrency, latency_s, wall, answered - started,
                       critical_path_calls(width, concurrency) * latency_s, calls)  # fmt: skip


def _check(result: SearchResult, width: int) -> None:
    assert result.finished and len(result.nodes) == width
    assert all(node["status"] == "answered" and node["citations"] for node in result.nodes.values())
    assert [r.url for r in result.references] == [_url(i) for i in range(width)]
    for i in range(width):
        assert f"Topic {i} has the value {i * i}. [{i + 1}]" in result.answer
