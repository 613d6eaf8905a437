"""Planner actions (JSON and the Python subset), the DAG's checks, and the citation helpers."""

from __future__ import annotations

import json

import jsonschema
import llguidance
import pytest

from lmstack.agent._errors import PlanError
from lmstack.agent.graph import Action, actions_schema, parse_actions
from lmstack.agent.graph._actions import parse_json_actions, parse_python_actions
from lmstack.agent.graph._dag import SearchGraph
from lmstack.agent.graph._searcher import (
    CitationStream,
    normalize_url,
    parse_queries,
    parse_selection,
    queries_schema,
    rewrite_citations,
    selection_schema,
)

VALID = {
    "actions": [
        {"op": "add_node", "name": "a", "question": "When was Alpha founded?", "parents": []},
        {"op": "add_node", "name": "b", "question": "How many moons has Beta?"},
        {"op": "add_node", "name": "c", "question": "Compare them", "parents": ["a", "b", "a"]},
        {"op": "finish"},
    ]
}


# -- JSON ------------------------------------------------------------------------------------------
def test_json_actions_parse_and_match_the_schema() -> None:
    jsonschema.validate(VALID, actions_schema())  # the reference: the same document is schema-valid
    actions = parse_json_actions(json.dumps(VALID))
    assert actions == [
        Action("add_node", "a", "When was Alpha founded?", ()),
        Action("add_node", "b", "How many moons has Beta?", ()),
        Action("add_node", "c", "Compare them", ("a", "b")),  # a repeated parent is one edge
        Action("finish"),
    ]
    assert [a.to_json() for a in actions][2] == {
        "op": "add_node", "name": "c", "question": "Compare them", "parents": ["a", "b"],
    }  # fmt: skip


@pytest.mark.parametrize(
    "text",
    [
        "Sure, here is the plan:\n```json\n" + json.dumps(VALID) + "\n```\nThat's it.",
        "Plan: " + json.dumps(VALID) + " -- done",
        json.dumps(VALID["actions"]),  # a bare list
    ],
)
def test_json_actions_tolerate_fences_prose_and_bare_lists(text: str) -> None:
    assert [a.name for a in parse_json_actions(text)] == ["a", "b", "c", ""]


def test_one_bare_action_is_a_plan() -> None:
    assert parse_json_actions('{"op": "finish"}') == [Action("finish")]


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ("I would search for Alpha first.", "not JSON"),
        ('{"actions": [{"op": "add_node", "name": "a", "question": "q"', "not JSON"),
        ('{"steps": []}', '"actions" list'),
        ('{"actions": [], "note": 1}', "unknown fields ['note']"),
        ('{"actions": []}', "empty"),
        ('{"actions": [{"op": "delete_node", "name": "a"}]}', 'actions[0] must be an object with "op"'),
        (
            '{"actions": [{"op": "finish"}, {"op": "add_node", "name": "a"}]}',
            "actions[1]: 'question' is a required",
        ),
        (
            '{"actions": [{"op": "add_node", "name": "a", "question": 3}]}',
            "actions[0].question: 3 is not of type",
        ),
        (
            '{"actions": [{"op": "add_node", "name": "", "question": "q"}]}',
            "actions[0].name: '' should be non-empty",
        ),
        (
            '{"actions": [{"op": "add_node", "name": "a", "question": "q", "parents": "b"}]}',
            "actions[0].parents",
        ),
        ('{"actions": [{"op": "finish", "why": "done"}]}', "actions[0]: Additional properties"),
    ],
)
def test_invalid_json_plans_are_plan_errors_saying_what_is_wrong(doc: str, message: str) -> None:
    with pytest.raises(PlanError) as caught:
        parse_json_actions(doc)
    assert message in str(caught.value)
    try:  # the schema (the reference) rejects them too, or they are not JSON at all
        value = json.loads(doc)
    except json.JSONDecodeError:
        return
    if isinstance(value, dict) and "actions" in value:
        assert not jsonschema.Draft202012Validator(actions_schema()).is_valid(value)


def test_schemas_compile_for_guided_decoding() -> None:
    for schema in (actions_schema(9), actions_schema(9, []), actions_schema(9, ['a', 'b']), queries_schema(3),
                   selection_schema(7, 3)):  # fmt: skip
        jsonschema.Draft202012Validator.check_schema(schema)
        is_error, warnings = llguidance.LLMatcher.validate_grammar_with_warnings(
            llguidance.LLMatcher.grammar_from_json_schema(schema)
        )
        assert not is_error, warnings


def test_actions_schema_limits_the_number_of_actions() -> None:
    plan = {"actions": [{"op": "finish"}] * 3}
    assert jsonschema.Draft202012Validator(actions_schema(3)).is_valid(plan)
    assert not jsonschema.Draft202012Validator(actions_schema(2)).is_valid(plan)


def test_actions_schema_with_known_parents_allows_only_those() -> None:
    def node(*parents: str) -> dict[str, object]:
        return {"actions": [{"op": "add_node", "name": "n", "question": "q?", "parents": list(parents)}]}

    first = jsonschema.Draft202012Validator(actions_schema(4, parents=[]))
    assert first.is_valid(node()) and not first.is_valid(node("a"))
    later = jsonschema.Draft202012Validator(actions_schema(4, parents=["b", "a"]))
    assert later.is_valid(node("a")) and later.is_valid(node("b", "a"))
    assert not later.is_valid(node("c")) and not later.is_valid(node("a", "b", "a"))
    assert jsonschema.Draft202012Validator(actions_schema(4)).is_valid(node("c"))  # None: any name


# -- the Python subset -----------------------------------------------------------------------------
def test_python_subset_parses_positional_and_keyword_arguments() -> None:
    code = """```python
# independent first
add_node("a", "When was Alpha founded?")
add_node(name="b", question='How many moons has Beta?', parents=[])
add_node("c", "Compare them", parents=("a", "b"))
finish()
```"""
    assert parse_python_actions(code) == parse_json_actions(json.dumps(VALID))


@pytest.mark.parametrize(
    ("code", "message"),
    [
        ("import os", "line 1: an import is not allowed"),
        ('add_node("a", "q")\nfrom os import system', "line 2: an import is not allowed"),
        ('__import__("os").system("touch x")', "line 1: attribute access (__import__('os').system)"),
        ('__import__("os")', "line 1: calling __import__() is not allowed"),
        ('graph.add_node("a", "q")', "line 1: attribute access (graph.add_node) is not allowed"),
        ('q = "x"\nadd_node("a", q)', "line 1: an assignment is not allowed"),
        ('add_node("a", question)', "line 1: add_node() argument 'question' must be a literal, not question"),
        ('add_node("a", "q", parents=[p for p in "ab"])', "argument 'parents' must be a literal"),
        ('add_node("a", "q" + "r")', "argument 'question' must be a literal"),
        ('add_node("a", open("x").read())', "argument 'question' must be a literal"),
        ('add_node("a", (lambda: "q")())', "argument 'question' must be a literal"),
        ('print("hi")', "line 1: calling print() is not allowed"),
        ('add_node(*["a", "q"])', "add_node() takes 3 arguments"),
        ('add_node("a", "q", **{"parents": []})', "add_node() has no argument '**'"),
        ('add_node("a", "q", deps=["b"])', "add_node() has no argument 'deps'"),
        ('add_node("a", "q", name="b")', "got argument 'name' twice"),
        ("finish(1)", "finish() takes no arguments"),
        ('add_node("a", 42)', "line 1: question: 42 is not of type 'string'"),
        ('\n\nadd_node("a", "q"\n', "line 3: not valid Python"),
        ("for x in []:\n    finish()", "line 1: a loop is not allowed"),
        ("x", "line 1: an expression that is not a call is not allowed"),
        ("# nothing", "no actions"),
    ],
)
def test_python_outside_the_subset_is_rejected_naming_the_line(code: str, message: str) -> None:
    with pytest.raises(PlanError) as caught:
        parse_python_actions(code)
    assert message in str(caught.value)


def test_python_subset_never_runs_anything(tmp_path: pytest.TempPathFactory) -> None:
    target = tmp_path / "pwned"  # type: ignore[operator]
    for code in (f"open({str(target)!r}, 'w')", f"add_node('a', open({str(target)!r}, 'w').name)"):
        with pytest.raises(PlanError):
            parse_actions(code, "python")
    assert not target.exists()


# -- the DAG ---------------------------------------------------------------------------------------
def _add(name: str, *parents: str) -> Action:
    return Action("add_node", name, f"question {name}", parents)


def test_graph_adds_a_step_parents_first_with_forward_references() -> None:
    graph = SearchGraph(max_nodes=5)
    added = graph.add([_add("c", "a", "b"), _add("a"), _add("b"), Action("finish")])
    assert [n.name for n in added] == ["a", "b", "c"]
    assert sorted(graph.edges) == [("a", "c"), ("b", "c")]
    more = graph.add([_add("d", "c")])
    assert [n.name for n in more] == ["d"] and ("c", "d") in graph.edges


@pytest.mark.parametrize(
    ("existing", "step", "messages"),
    [
        ([], [_add("a", "b"), _add("b", "a")], ["the parents form a cycle: a -> b -> a"]),
        ([], [_add("a", "a")], ["cycle: a -> a"]),
        ([_add("a")], [_add("b", "c", "a"), _add("c", "b")], ["cycle: b -> c -> b"]),
        ([_add("a")], [_add("b", "zz")], ["add_node 'b': unknown parent 'zz' (the nodes are: a, b)"]),
        ([_add("a")], [_add("a")], ["add_node 'a': a node named 'a' already exists"]),
        ([], [_add("x"), _add("x")], ["add_node 'x': the name is used twice in this reply"]),
        (
            [_add("a"), _add("b")],
            [_add("c"), _add("d")],
            ["adds 2 nodes, making 4: more than the limit of 3; add at most 1"],
        ),
        ([_add("a"), _add("b"), _add("c")], [_add("d")], ["no more nodes may be added: finish"]),
        ([], [_add("a", "q"), _add("a")], ["used twice", "unknown parent 'q'"]),
    ],
)
def test_graph_rejects_bad_steps_whole_and_says_why(
    existing: list[Action], step: list[Action], messages: list[str]
) -> None:
    graph = SearchGraph(max_nodes=3)
    graph.add(existing)
    before = (dict(graph.nodes), list(graph.edges))
    with pytest.raises(PlanError) as caught:
        graph.add(step)
    assert all(m in str(caught.value) for m in messages), str(caught.value)
    assert (dict(graph.nodes), list(graph.edges)) == before  # nothing of a rejected step was added


# -- searcher parsing and citations ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("reply", "queries"),
    [
        (
            '{"queries": ["alpha founding", "Alpha  history", "alpha founding"]}',
            ["alpha founding", "Alpha history"],
        ),
        ('["a", "b", "c", "d"]', ["a", "b", "c"]),
        (
            'Here are some queries:\n1. alpha founding\n- "alpha year"\n* alpha',
            ["alpha founding", "alpha year", "alpha"],
        ),
        ("", []),
        ('{"queries": [1, 2]}', []),
    ],
)
def test_queries_parse_tolerantly(reply: str, queries: list[str]) -> None:
    assert parse_queries(reply, 3) == queries


@pytest.mark.parametrize(
    ("reply", "picked"),
    [
        ('{"pages": [3, 1, 3, 9]}', [2, 0]),
        ("I'd read 2 and then 4.", [1, 3]),
        ("[5]", [4]),
        ("none of them", []),
    ],
)
def test_selection_parses_tolerantly(reply: str, picked: list[int]) -> None:
    assert parse_selection(reply, n=5, k=2) == picked


def test_rewrite_citations_maps_and_drops() -> None:
    text = "Alpha was founded in 1901 [[1]]. Beta has 7 moons [[2, 3]] [4]. Gamma [[9]]."
    mapping = {1: 5, 2: 6, 4: 7}.get
    assert (
        rewrite_citations(text, mapping)
        == "Alpha was founded in 1901 [[5]]. Beta has 7 moons [[6]] [[7]]. Gamma."
    )
    assert (
        rewrite_citations(text, mapping, brackets=1)
        == "Alpha was founded in 1901 [5]. Beta has 7 moons [6] [7]. Gamma."
    )


@pytest.mark.parametrize("cut", [1, 2, 3, 5, 7])
def test_citation_stream_renumbers_across_pieces(cut: int) -> None:
    text = "B is big [[4]], A is old [[2]][[4]] and [x] stays; [[9]] goes. See [[2, 4]]"
    pieces = [text[i : i + cut] for i in range(0, len(text), cut)]
    stream = CitationStream(allowed=[2, 4])
    out = "".join(stream.feed(p) for p in pieces) + stream.close()
    assert out == "B is big [1], A is old [2][1] and [x] stays; goes. See [2][1]"
    assert stream.order == {4: 1, 2: 2}


def test_normalize_url_merges_the_same_page() -> None:
    assert normalize_url("https://Wiki.test/alpha/#history") == normalize_url("https://wiki.test/alpha")
    assert normalize_url("https://wiki.test/alpha?x=1") != normalize_url("https://wiki.test/alpha?x=2")
