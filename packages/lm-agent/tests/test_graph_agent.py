"""The graph search agent's control flow, with a scripted LLM, an in-memory search backend and pages.

The scripted model plays each role by its system prompt: the planner replies from a script, the
searcher's steps answer from what they are shown (the sources' text, cited by number), so the tests
can follow every fact and citation from page to final answer.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import threading
from collections.abc import Callable, Sequence
from typing import Any

import jsonschema
import pytest
from scripted import Call, ScriptedLLM, text_only

from lmstack.agent._errors import FetchError
from lmstack.agent.graph import EVENT_SCHEMA_VERSION, EVENT_TYPES, AgentEvent, GraphSearchAgent, SearchResult
from lmstack.agent.graph._searcher import citation_regex
from lmstack.agent.tools import Page
from lmstack.infer import CompletionOutput, InvalidRequestError, RequestOutput, SamplingParams

DOCS = {
    "https://wiki.test/alpha": ("Alpha", "Alpha was founded in 1901 by the river."),
    "https://wiki.test/alpha-history": ("Alpha history", "Alpha history: the town grew after 1950."),
    "https://wiki.test/beta": ("Beta", "Beta is a planet with 7 moons."),
    "https://wiki.test/gamma": ("Gamma", "Gamma is a river 300 km long."),
    "https://wiki.test/delta": ("Delta", "Delta is a lake 12 m deep."),
    "https://files.test/alpha.png": ("Alpha photo", "binary"),
}
QUESTIONS = {
    "a": "When was Alpha founded?",
    "b": "How many moons has Beta?",
    "g": "How long is Gamma?",
    "d": "How deep is Delta?",
}


class MemorySearch:
    """A search backend in the search-backend shape (text, source, score, metadata): titles match words."""

    def __init__(self, down: Sequence[str] = ()) -> None:
        self.down = down
        self.queries: list[str] = []

    def search(self, query: str, k: int) -> list[dict[str, Any]]:
        self.queries.append(query)
        if any(word in query for word in self.down):
            raise ConnectionError("connection refused by search.test:8888")
        words = set(re.findall(r"\w+", query.lower()))
        hits = [
            {"text": text[:30], "source": url, "score": 1.0 / (1 + i), "metadata": {"title": title}}
            for i, (url, (title, text)) in enumerate(DOCS.items())
            if title.split()[0].lower() in words
        ]
        return hits[:k]


def make_fetch(read: list[str]) -> Callable[[str], Any]:
    async def fetch(url: str) -> Page:
        read.append(url)
        if url.endswith(".png"):
            raise FetchError(f"cannot read {url}: binary content (image/png), not text")
        title, text = DOCS[url]
        return Page(url=url, title=title, text=text, content_type="text/html", truncated=False)

    return fetch


def role(messages: list[dict[str, Any]]) -> str:
    system = messages[0]["content"]
    for key, opening in (
        ("planner", "You are the planner"),
        ("queries", "You write web search queries"),
        ("select", "You select search results"),
        ("answer", "You answer a sub-question"),
        ("final", "You write the final answer"),
    ):
        if system.startswith(opening):
            return key
    raise AssertionError(f"unknown role: {system[:60]!r}")


def question_of(messages: list[dict[str, Any]]) -> str:
    return messages[-1]["content"].split("Question: ")[-1].split("\n")[0]


def answer_from_sources(user: str) -> str:
    """A faithful searcher: one sentence per source, citing it."""
    sources = re.findall(r"^\[\[(\d+)\]\] .*?\n(.*)$", user, re.MULTILINE)
    return " ".join(f"{text} [[{n}]]" for n, text in sources) or "Nothing found."


def final_from_answers(user: str) -> str:
    """A faithful writer: the node answers, citations kept."""
    body = user.split("Sub-questions and their answers:\n\n")[1].split("\n\nSources you may cite:")[0]
    return " ".join(line for line in body.splitlines() if line and not line.startswith("["))


def scripted(
    planner: Sequence[str] | Callable[[int, list[dict[str, Any]]], str],
    *,
    latency_s: float = 0.0,
    select: str = '{"pages": [1, 2]}',
    answer: Callable[[str], str] = answer_from_sources,
    final: Callable[[str], str] = final_from_answers,
) -> ScriptedLLM:
    turns: list[int] = [0]

    def respond(messages: list[dict[str, Any]], options: dict[str, Any]) -> str:
        kind = role(messages)
        user = messages[-1]["content"]
        if kind == "planner":
            turns[0] += 1
            if callable(planner):
                return planner(turns[0], messages)
            return planner[min(turns[0], len(planner)) - 1]
        if kind == "queries":
            return json.dumps({"queries": [question_of(messages)]})
        if kind == "select":
            return select
        if kind == "answer":
            return answer(user)
        return final(user)

    return ScriptedLLM(respond, latency_s=latency_s)


def plan(*nodes: tuple[str, Sequence[str]], finish: bool = True) -> str:
    actions: list[dict[str, Any]] = [
        {
            "op": "add_node",
            "name": name,
            "question": QUESTIONS.get(name, f"What about {name}?"),
            "parents": list(p),
        }
        for name, p in nodes
    ]
    return json.dumps({"actions": actions + ([{"op": "finish"}] if finish else [])})


def agent_for(
    llm: Any, *, search: Any = None, read: list[str] | None = None, **options: Any
) -> GraphSearchAgent:
    return GraphSearchAgent(
        llm, search or MemorySearch(), fetch=make_fetch([] if read is None else read), **options
    )


def calls_of(llm: ScriptedLLM, kind: str) -> list[Call]:
    return [c for c in llm.calls if role(c.messages) == kind]


def node_span(llm: ScriptedLLM, question: str) -> tuple[float, float]:
    calls = [
        c
        for c in llm.calls
        if role(c.messages) in ("queries", "select", "answer") and question_of(c.messages) == question
    ]
    assert calls, question
    return min(c.start for c in calls), max(c.end for c in calls)


def events_of(result: SearchResult, kind: str) -> list[dict[str, Any]]:
    return [e.data for e in result.events if e.type == kind]


def check_citations(result: SearchResult) -> None:
    """Every citation in the answer is a reference, and every reference a page some node read."""
    read = {e["url"] for e in events_of(result, "page_read")}
    numbers = {int(n) for n in re.findall(r"\[(\d+)\]", result.answer)}
    assert numbers == {r.n for r in result.references}
    assert sorted(r.n for r in result.references) == list(range(1, len(result.references) + 1))
    for reference in result.references:
        assert reference.url in read
        assert reference.title == DOCS[reference.url][0]
    for event in events_of(result, "node_answer"):
        for citation in event["citations"]:
            assert citation["url"] in read


# -- execution order -------------------------------------------------------------------------------
def test_parents_run_first_and_independent_nodes_overlap() -> None:
    llm = scripted([plan(("a", []), ("b", []), ("c", ["a", "b"]))], latency_s=0.05)
    read: list[str] = []
    result = agent_for(llm, read=read, concurrency=4).run("Alpha and Beta: how do they compare?")
    assert result.finished
    a, b = node_span(llm, QUESTIONS["a"]), node_span(llm, QUESTIONS["b"])
    c = node_span(llm, "What about c?")
    assert a[0] < b[1] and b[0] < a[1], (a, b)  # a and b ran at the same time
    assert c[0] >= max(a[1], b[1]), (a, b, c)  # c started after both parents ended
    # The child saw its parents' answers (citations stripped).
    first_c_call = min(
        (x for x in llm.calls if question_of(x.messages) == "What about c?"), key=lambda x: x.start
    )
    assert "Alpha was founded in 1901 by the river." in first_c_call.messages[-1]["content"]
    assert "Beta is a planet with 7 moons." in first_c_call.messages[-1]["content"]
    assert result.edges == [("a", "c"), ("b", "c")]
    assert {n: d["status"] for n, d in result.nodes.items()} == {
        "a": "answered",
        "b": "answered",
        "c": "answered",
    }
    # Events agree with the recorded calls: c started after both answers.
    t = {(e.type, e.data.get("name") or e.data.get("node")): e.t for e in result.events}
    assert t[("node_started", "c")] >= max(t[("node_answer", "a")], t[("node_answer", "b")])
    assert "Alpha was founded in 1901" in result.answer and "7 moons" in result.answer
    check_citations(result)


def test_concurrency_one_runs_nodes_one_at_a_time() -> None:
    llm = scripted([plan(("a", []), ("b", []), ("g", []))], latency_s=0.02)
    agent_for(llm, concurrency=1).run("Alpha, Beta, Gamma?")
    spans = sorted(node_span(llm, QUESTIONS[n]) for n in "abg")
    assert all(first[1] <= second[0] for first, second in itertools.pairwise(spans)), spans


def test_later_steps_see_answers_and_build_on_earlier_nodes() -> None:
    def planner(turn: int, messages: list[dict[str, Any]]) -> str:
        if turn == 1:
            return plan(("a", []), finish=False)
        assert (
            "[a] When was Alpha founded?\nAlpha was founded in 1901 by the river." in messages[-1]["content"]
        )
        return plan(("h", ["a"]))

    llm = scripted(planner)
    result = agent_for(llm).run("What happened to Alpha after it was founded?")
    assert result.finished and len(calls_of(llm, "planner")) == 2
    assert result.edges == [("a", "h")]
    assert [e["name"] for e in events_of(result, "node_started")] == ["a", "h"]


# -- planner errors fed back -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("bad", "error"),
    [
        (plan(("a", ["b"]), ("b", ["a"])), "the parents form a cycle: a -> b -> a"),
        (plan(("a", ["nowhere"])), "add_node 'a': unknown parent 'nowhere' (the nodes are: a)"),
        (plan(("a", []), ("a", [])), "add_node 'a': the name is used twice in this reply"),
        ("Let me think about Alpha first.", "the reply is not JSON"),
        ('{"actions": [{"op": "add_node", "name": "a"}]}', "actions[0]: 'question' is a required property"),
    ],
)
def test_invalid_plans_are_rejected_and_fed_back(bad: str, error: str) -> None:
    llm = scripted([bad, plan(("a", []))])
    result = agent_for(llm).run("When was Alpha founded?")
    (event,) = events_of(result, "planner_error")
    assert error in event["error"]
    planner_calls = calls_of(llm, "planner")
    assert len(planner_calls) == 2
    feedback = planner_calls[1].messages
    assert feedback[-2] == {"role": "assistant", "content": bad}
    assert error in feedback[-1]["content"]  # the reason reached the planner
    assert result.finished and list(result.nodes) == ["a"]
    check_citations(result)


def test_a_duplicate_name_across_steps_is_rejected_and_fed_back() -> None:
    llm = scripted([plan(("a", []), finish=False), plan(("a", [])), plan(("b", ["a"]))])
    result = agent_for(llm).run("Alpha and Beta?")
    errors = [e["error"] for e in events_of(result, "planner_error")]
    assert len(errors) == 1 and "a node named 'a' already exists" in errors[0]
    assert "a node named 'a' already exists" in calls_of(llm, "planner")[2].messages[-1]["content"]
    assert result.finished and result.edges == [("a", "b")]


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        ("import os\nos.system('touch /tmp/x')", "line 1: an import is not allowed"),
        (
            "__import__('os').system('id')",
            "line 1: attribute access (__import__('os').system) is not allowed",
        ),
        (
            'add_node("a", "q")\ngraph.add_node("b", "q")',
            "line 2: attribute access (graph.add_node) is not allowed",
        ),
        ('add_node("a", "When was Alpha founded?"', "not valid Python"),
    ],
)
def test_python_planner_rejects_code_outside_the_subset_and_feeds_it_back(bad: str, error: str) -> None:
    good = 'add_node("a", "When was Alpha founded?")\nfinish()'
    llm = scripted([bad, good])
    result = agent_for(llm, planner_format="python").run("When was Alpha founded?")
    (event,) = events_of(result, "planner_error")
    assert error in event["error"]
    second = calls_of(llm, "planner")[1]
    assert error in second.messages[-1]["content"]
    assert "Python calls only" in second.messages[0]["content"]
    assert second.options["response_format"] is None  # Python is not generated under a JSON schema
    assert result.finished and "Alpha was founded in 1901" in result.answer


def test_retries_are_bounded_and_the_answer_is_still_written() -> None:
    llm = scripted(["not a plan"], latency_s=0.0)
    result = agent_for(llm, max_retries=2).run("When was Alpha founded?")
    assert len(calls_of(llm, "planner")) == 3  # the first try and two retries
    assert len(events_of(result, "planner_error")) == 3
    assert not result.finished
    assert any("failed 3 times in a row" in e["message"] for e in events_of(result, "error"))
    assert len(calls_of(llm, "final")) == 1 and result.events[-1].type == "done"
    assert events_of(result, "final_answer")[0]["answer"] == result.answer


def test_step_limit_gives_a_graceful_answer_from_the_nodes_found() -> None:
    def planner(turn: int, messages: list[dict[str, Any]]) -> str:
        return plan(("abgd"[turn - 1], []), finish=False)  # never finishes

    llm = scripted(planner)
    result = agent_for(llm, max_plan_steps=2).run("Tell me about Alpha and Beta")
    assert not result.finished
    assert len(calls_of(llm, "planner")) == 2 and list(result.nodes) == ["a", "b"]
    assert any("did not finish within 2 steps" in e["message"] for e in events_of(result, "error"))
    assert "Alpha was founded in 1901" in result.answer and "7 moons" in result.answer
    assert {r.url for r in result.references} == {"https://wiki.test/alpha", "https://wiki.test/alpha-history",
                                                   "https://wiki.test/beta"}  # fmt: skip
    check_citations(result)


def test_the_node_limit_is_fed_back() -> None:
    llm = scripted([plan(("a", []), ("b", []), ("g", [])), plan(("a", []), ("b", []))])
    result = agent_for(llm, max_nodes=2).run("Alpha, Beta, Gamma?")
    (event,) = events_of(result, "planner_error")
    assert "making 3: more than the limit of 2" in event["error"]
    assert result.finished and list(result.nodes) == ["a", "b"]


# -- search and fetch failures ---------------------------------------------------------------------
def test_search_down_and_binary_page_are_reported_and_survived() -> None:
    read: list[str] = []
    # Alpha's results: its page, its history page, a photo (binary); the scripted selection picks the
    # page and the photo, the photo fails and the history page is read in its place.
    llm = scripted([plan(("a", []), ("b", []))], select='{"pages": [1, 3]}')
    search = MemorySearch(down=["Beta"])
    result = agent_for(llm, search=search, read=read, pages_per_node=2).run("Alpha and Beta?")
    assert result.finished
    (failed_search,) = [e for e in events_of(result, "search_results") if "error" in e]
    assert failed_search["node"] == "b" and "connection refused" in failed_search["error"]
    assert result.nodes["b"]["answer"].startswith("No answer found: every search failed")
    assert "connection refused" in result.nodes["b"]["answer"]
    assert not [c for c in calls_of(llm, "answer") if QUESTIONS["b"] in c.messages[-1]["content"]]
    (failed_page,) = events_of(result, "page_failed")
    binary = "cannot read https://files.test/alpha.png: binary content (image/png), not text"
    assert failed_page == {"node": "a", "url": "https://files.test/alpha.png", "error": binary}
    assert read == [
        "https://wiki.test/alpha",
        "https://files.test/alpha.png",
        "https://wiki.test/alpha-history",
    ]
    assert [p["url"] for p in result.nodes["a"]["pages"]] == [
        "https://wiki.test/alpha",
        "https://wiki.test/alpha-history",
    ]
    assert "Alpha was founded in 1901 by the river." in result.answer
    assert "Alpha history: the town grew after 1950." in result.answer
    check_citations(result)
    assert all(r.url != "https://files.test/alpha.png" for r in result.references)


def test_a_slow_search_backend_times_out_and_the_node_answers_from_nothing() -> None:
    class Slow:
        async def search(self, query: str, k: int) -> list[dict[str, Any]]:
            await asyncio.Event().wait()  # never answers
            return []

    llm = scripted([plan(("a", []))])
    result = agent_for(llm, search=Slow(), search_timeout_s=0.05).run("When was Alpha founded?")
    (event,) = events_of(result, "search_results")
    assert "did not answer within 0.05 s" in event["error"]
    assert result.nodes["a"]["status"] == "answered" and result.nodes["a"]["answer"].startswith(
        "No answer found"
    )
    assert result.references == [] and not calls_of(llm, "answer")


def test_a_private_index_hit_is_read_from_the_hit_without_fetching() -> None:
    class Index:  # lmstack-rag's Index shape: text, source (a path), score, metadata
        def search(self, query: str, k: int) -> list[dict[str, Any]]:
            return [
                {
                    "text": "Alpha was founded in 1901.",
                    "source": "notes/alpha.md",
                    "score": 3.2,
                    "metadata": {},
                }
            ]

    read: list[str] = []
    llm = scripted([plan(("a", []))])
    result = agent_for(llm, search=Index(), read=read).run("When was Alpha founded?")
    assert read == []  # nothing fetched
    assert events_of(result, "page_read") == [
        {
            "node": "a",
            "url": "notes/alpha.md",
            "title": "alpha.md",
            "chars": len("Alpha was founded in 1901."),
        }
    ]
    assert result.answer == "Alpha was founded in 1901. [1]"
    assert [(r.n, r.url) for r in result.references] == [(1, "notes/alpha.md")]


def test_a_model_failure_in_one_node_fails_only_that_node() -> None:
    def answer(user: str) -> str:
        if "Beta" in user:
            raise RuntimeError("model server went away")
        return answer_from_sources(user)

    llm = scripted([plan(("a", []), ("b", []), ("c", ["b"]))], answer=answer)
    result = agent_for(llm).run("Alpha and Beta?")
    assert result.nodes["b"]["status"] == "failed" and "model server went away" in result.nodes["b"]["error"]
    (failed,) = events_of(result, "node_failed")
    assert failed["node"] == "b"
    assert result.nodes["c"]["status"] == "answered"  # its parent failed; it still ran, knowing that
    assert "Alpha was founded in 1901" in result.answer
    check_citations(result)


# -- citations ---------------------------------------------------------------------------------------
def test_citations_of_pages_not_read_are_dropped_and_renumbered_globally() -> None:
    def answer(user: str) -> str:
        return answer_from_sources(user) + " Also a guess [[7]]."

    def final(user: str) -> str:
        return final_from_answers(user) + " Invented [[42]]."

    llm = scripted([plan(("b", []), ("a", []))], answer=answer, final=final)
    result = agent_for(llm).run("Beta and Alpha?")
    for name in ("a", "b"):
        assert "[[7]]" not in result.nodes[name]["answer"]
    assert "42" not in result.answer
    # Global numbers follow first citation in the answer: Beta's page, then Alpha's two.
    assert [r.url for r in result.references] == [
        "https://wiki.test/beta", "https://wiki.test/alpha", "https://wiki.test/alpha-history",
    ]  # fmt: skip
    assert "Beta is a planet with 7 moons. [1]" in result.answer
    assert "Alpha was founded in 1901 by the river. [2]" in result.answer
    check_citations(result)
    final_event = events_of(result, "final_answer")[0]
    assert final_event["references"] == [
        {"n": r.n, "url": r.url, "title": r.title} for r in result.references
    ]


def test_the_final_answer_streams_when_the_backend_streams() -> None:
    class StreamingLLM(ScriptedLLM):
        async def stream(self, prompt: Any, sampling_params: Any = None) -> Any:
            text = self.chat(prompt, sampling_params)[0].outputs[0].text
            for i in range(0, len(text), 3):  # pieces that cut citations apart
                yield RequestOutput(
                    "s", None, [], [CompletionOutput(0, text=text[i : i + 3])], finished=False
                )

    base = scripted([plan(("a", []))])
    llm = StreamingLLM(base.respond)
    result = agent_for(llm).run("When was Alpha founded?")
    deltas = [e["text"] for e in events_of(result, "answer_delta")]
    assert len(deltas) > 5 and "".join(deltas).strip() == result.answer
    assert "[[" not in result.answer and "[1]" in result.answer
    check_citations(result)


def test_without_streaming_the_answer_is_one_delta() -> None:
    result = agent_for(scripted([plan(("a", []))])).run("When was Alpha founded?")
    assert [e["text"] for e in events_of(result, "answer_delta")] == [result.answer]


# -- guided decoding and old backends ----------------------------------------------------------------
def test_planner_asks_for_its_schema_where_the_backend_takes_response_format() -> None:
    llm = scripted([plan(("a", []))])
    agent_for(llm).run("When was Alpha founded?")
    planner = calls_of(llm, "planner")[0]
    fmt = planner.options["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["name"] == "plan"
    jsonschema.validate(json.loads(planner.reply), fmt["json_schema"]["schema"])
    queries = calls_of(llm, "queries")[0]
    jsonschema.validate(
        json.loads(queries.reply), queries.options["response_format"]["json_schema"]["schema"]
    )


def test_guided_plans_name_as_parents_only_nodes_of_earlier_steps() -> None:
    llm = scripted([plan(("a", []), finish=False), plan(("b", ["a"]))])
    result = agent_for(llm).run("Alpha then Beta?")
    assert result.finished and result.edges == [("a", "b")]
    first, second = calls_of(llm, "planner")
    assert "added in your earlier replies" in first.messages[0]["content"]

    def parents_of(call: Call) -> dict[str, Any]:
        schema = call.options["response_format"]["json_schema"]["schema"]
        return schema["properties"]["actions"]["items"]["anyOf"][0]["properties"]["parents"]

    assert parents_of(first)["maxItems"] == 0  # nothing to build on yet
    assert parents_of(second)["items"] == {"enum": ["a"]}


def test_a_backend_without_response_format_still_plans_in_json() -> None:
    llm = scripted([plan(("a", []))])
    result = agent_for(text_only(llm)).run("When was Alpha founded?")
    assert all(c.options["response_format"] is None for c in llm.calls)
    assert result.finished and "Alpha was founded in 1901" in result.answer


def test_answers_are_generated_under_the_citation_grammar_of_the_pages_read() -> None:
    llm = scripted([plan(("b", []), ("a", []))])
    result = agent_for(llm).run("Beta and Alpha?")
    assert result.references
    for call in calls_of(llm, "answer"):
        assert call.params is not None and call.params.guided_regex is not None
        read = re.findall(r"^\[\[(\d+)\]\] ", call.messages[-1]["content"], re.MULTILINE)
        assert read  # the grammar allows exactly the numbers of the sources shown
        assert re.fullmatch(call.params.guided_regex, call.reply)
        for n in range(1, 6):
            assert bool(re.fullmatch(call.params.guided_regex, f"A claim [[{n}]]")) == (str(n) in read)
    (final,) = calls_of(llm, "final")
    assert final.params is not None and final.params.guided_regex is not None
    assert re.fullmatch(final.params.guided_regex, final.reply)
    assert not re.fullmatch(final.params.guided_regex, "A claim [[4]]")  # 3 pages were cited
    for call in calls_of(llm, "planner") + calls_of(llm, "queries"):
        assert call.params is not None and call.params.guided_regex is None


def test_a_backend_that_refuses_the_citation_grammar_is_asked_again_without_it() -> None:
    class NoRegex(ScriptedLLM):
        def chat(self, messages: Any, sampling_params: Any = None, **options: Any) -> list[RequestOutput]:
            if sampling_params is not None and sampling_params.guided_regex is not None:
                refused.append(sampling_params.guided_regex)
                raise InvalidRequestError("guided_regex is not supported", param="guided_regex")
            return super().chat(messages, sampling_params, **options)

    refused: list[str] = []
    base = scripted([plan(("b", []), ("a", []))])
    llm = NoRegex(base.respond)
    result = agent_for(llm, concurrency=1).run("Beta and Alpha?")
    assert len(refused) == 1  # refused once, then never asked again in this search
    assert "Beta is a planet with 7 moons. [1]" in result.answer
    check_citations(result)


def test_the_citation_grammar_is_off_without_guided_decoding_or_with_another_constraint() -> None:
    llm = scripted([plan(("a", []))])
    agent_for(text_only(llm)).run("When was Alpha founded?")
    assert all(c.params is None or c.params.guided_regex is None for c in llm.calls)
    llm = scripted([plan(("a", []))])
    agent_for(llm, params=SamplingParams(max_tokens=64, guided_choice=["x", "y"])).run("Alpha?")
    assert all(c.params is not None and c.params.guided_regex is None for c in llm.calls)


@pytest.mark.parametrize("max_tokens", [40, 64, 1024, None])
def test_the_citation_grammar_fits_its_first_citation_in_the_token_budget(max_tokens: int | None) -> None:
    regex = citation_regex([3, 1, 12], max_tokens)
    most = int(re.search(r"\{1,(\d+)\}", regex).group(1))  # type: ignore[union-attr]
    # The longest first claim at 4 bytes a character, then "[[12]]": at most max_tokens bytes.
    assert max_tokens is None or 4 * most + len("[[12]]") <= max_tokens
    assert re.fullmatch(regex, "x" * most + "[[12]]")
    assert not re.fullmatch(regex, "x" * (most + 1) + "[[12]]")
    assert re.fullmatch(regex, "Claim [[1]] more [[3]][[12]] and text")
    assert not re.fullmatch(regex, "Claim [[1]] a [[2]]")  # 2 is not citable
    assert not re.fullmatch(regex, "Claim [1]")  # the first claim must cite, as [[n]]
    assert not re.fullmatch(regex, "Claim [[1]] [note]")  # brackets only in citations


def test_the_citation_grammar_needs_a_number_and_room() -> None:
    with pytest.raises(ValueError, match="at least one"):
        citation_regex([], 100)
    with pytest.raises(ValueError, match="no room"):
        citation_regex([1], 7)


# -- events and the API ------------------------------------------------------------------------------
def test_events_follow_the_versioned_schema() -> None:
    llm = scripted([plan(("a", []), ("b", ["a"]))])
    result = agent_for(llm).run("Alpha then Beta?")
    assert result.events[0].type == "start" and result.events[-1].type == "done"
    assert result.events[-2].type == "final_answer"
    times = [e.t for e in result.events]
    assert times == sorted(times)
    for event in result.events:
        doc = json.loads(json.dumps(event.to_json()))
        assert doc["v"] == EVENT_SCHEMA_VERSION == 1 and doc["type"] in EVENT_TYPES
        assert (
            set(EVENT_TYPES[event.type]) <= set(doc) <= {"v", "type", "t", "error", *EVENT_TYPES[event.type]}
        )
    kinds = [e.type for e in result.events]
    for kind in (
        "plan",
        "node_added",
        "node_started",
        "queries",
        "search_results",
        "page_read",
        "node_answer",
    ):
        assert kind in kinds
    assert kinds.index("node_added") < kinds.index("node_started")


def test_stream_yields_events_live_and_astream_matches_run() -> None:
    # The model waits until the consumer has seen an earlier event: only a live stream gets past it.
    got: dict[str, threading.Event] = {"start": threading.Event(), "node_added": threading.Event()}

    def planner(turn: int, messages: list[dict[str, Any]]) -> str:
        assert got["start"].wait(timeout=30), "the start event was not delivered while the planner ran"
        return plan(("a", []))

    llm = scripted(planner)
    original = llm.respond

    def respond(messages: list[dict[str, Any]], options: dict[str, Any]) -> Any:
        if role(messages) == "queries":
            assert got["node_added"].wait(timeout=30), "node_added was not delivered while the node ran"
        return original(messages, options)

    llm.respond = respond
    kinds = []
    for event in agent_for(llm).stream("When was Alpha founded?"):
        kinds.append(event.type)
        if event.type in got:
            got[event.type].set()
    assert kinds[0] == "start" and kinds[-1] == "done"
    assert "planner_error" not in kinds and "node_failed" not in kinds

    async def collect() -> list[AgentEvent]:
        return [e async for e in agent_for(scripted([plan(("a", []))])).astream("When was Alpha founded?")]

    streamed = asyncio.run(collect())
    assert [e.type for e in streamed] == kinds


def test_closing_the_stream_early_stops_the_search() -> None:
    llm = scripted([plan(("a", []), ("b", []), ("c", ["a"]))], latency_s=0.02)
    stream = agent_for(llm).stream("Alpha?")
    for event in stream:
        if event.type == "node_added":
            break
    stream.close()  # joins the search's thread after cancelling it
    assert not any(role(c.messages) == "final" for c in llm.calls)


def test_run_works_inside_a_running_event_loop() -> None:
    async def main() -> SearchResult:
        return agent_for(scripted([plan(("a", []))])).run("When was Alpha founded?")

    assert asyncio.run(main()).finished


@pytest.mark.parametrize(
    ("options", "param"),
    [
        ({"max_nodes": 0}, "max_nodes"),
        ({"concurrency": 0}, "concurrency"),
        ({"planner_format": "yaml"}, "planner_format"),
        ({"search_timeout_s": 0}, "search_timeout_s"),
        ({"max_retries": -1}, "max_retries"),
    ],
)
def test_bad_options_are_invalid_requests(options: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        agent_for(scripted([]), **options)
    assert caught.value.param == param


def test_an_empty_question_is_an_invalid_request() -> None:
    with pytest.raises(InvalidRequestError, match="non-empty"):
        agent_for(scripted([])).run("  ")
