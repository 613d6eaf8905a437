"""A scripted two-node graph search over a small local corpus, shared by the web app, browser and CLI tests.

The planner asks two sub-questions, the second built on the first's answer; every other model call
(queries, page selection, node answers, the final answer) is answered from the conversation it gets.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from scripted import ScriptedLLM

QUESTION = "Into which sea does the river of Kadadell flow?"
RIVER_Q = "On which river is the city of Kadadell?"
SEA_Q = "Into which sea does the Velm flow?"
NODE_ANSWERS = {
    "kadadell_river": "Kadadell lies on the river Velm [[1]].",
    "velm_sea": "The Velm flows into the Amber Sea [[1]].",
}
FINAL = "Kadadell lies on the Velm [[1]], which flows into the Amber Sea [[2]]."

CORPUS = {
    "kadadell.md": "# Kadadell\n\nKadadell is a city on the river Velm, famous for its wine.\n",
    "velm.md": "# Velm\n\nThe Velm is a river. The Velm flows into the Amber Sea.\n",
    "amber.md": "# Amber Sea\n\nThe Amber Sea is cold and salty.\n",
}


def write_corpus(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in CORPUS.items():
        (folder / name).write_text(text)
    return folder


def respond(messages: list[dict[str, Any]], options: dict[str, Any]) -> str:
    system, user = messages[0]["content"], messages[-1]["content"]
    if system.startswith("You are the planner"):
        if any(m["role"] == "assistant" for m in messages):
            return json.dumps({"actions": [{"op": "finish"}]})
        return json.dumps(
            {
                "actions": [
                    {"op": "add_node", "name": "kadadell_river", "question": RIVER_Q, "parents": []},
                    {"op": "add_node", "name": "velm_sea", "question": SEA_Q, "parents": ["kadadell_river"]},
                    {"op": "finish"},
                ]
            }
        )
    if system.startswith("You write web search queries"):
        return json.dumps({"queries": ["Velm sea"] if SEA_Q in user else ["Kadadell river"]})
    if system.startswith("You select search results"):
        return json.dumps({"pages": [1]})
    if system.startswith("You answer a sub-question"):
        return NODE_ANSWERS["velm_sea" if SEA_Q in user else "kadadell_river"]
    if system.startswith("You write the final answer"):
        return FINAL
    raise AssertionError(f"unexpected prompt: {system[:80]!r}")


def scripted_llm(latency_s: float = 0.0) -> ScriptedLLM:
    return ScriptedLLM(respond, latency_s=latency_s)
