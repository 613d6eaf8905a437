"""The search page in headless Chromium (Debian's chromium driven by Playwright) over a real search.

The app runs a real GraphSearchAgent (scripted model, the local search server, pages fetched over HTTP);
the page must draw the graph as SVG, colour nodes by state, show a node's work when clicked, and render
the final answer with clickable citations. A screenshot is kept in the test's tmp dir.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from graph_script import QUESTION, scripted_llm, write_corpus

from lmstack.agent.graph import AgentEvent, GraphSearchAgent
from lmstack.agent.tools import LocalSearchServer, SearxNGSearch
from lmstack.agent.web import create_app, running

CHROMIUM = os.environ.get("LMSTACK_CHROMIUM", "/usr/bin/chromium")
INSTALL = (
    "the browser test needs Debian's chromium and Playwright: `apt-get install -y chromium` (as root) and "
    "`pip install playwright` (or set LMSTACK_CHROMIUM to a Chromium binary)"
)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: {INSTALL}")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(f"playwright is not installed: {INSTALL}")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM)
        yield chromium
        chromium.close()


def test_page_renders_the_graph_and_the_cited_answer(
    browser: Any, tmp_path: Path, record_property: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    with LocalSearchServer(write_corpus(tmp_path / "docs")) as local:
        pages = f"{local.url}/pages"
        llm = scripted_llm()
        app = create_app(lambda: GraphSearchAgent(llm, SearxNGSearch(local.url)))
        with running(app) as url:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(url + "/")
            assert page.locator("body").get_attribute("data-state") == "idle"
            page.fill("#q", QUESTION)
            page.click("#go")
            page.wait_for_selector("body[data-state=done]", timeout=30_000)

            # the graph: the question, then the two sub-questions in layers, edges parent -> child
            nodes = page.locator("svg#graph g.node")
            assert nodes.count() == 3
            names = [nodes.nth(i).get_attribute("data-name") for i in range(3)]
            assert names == ["", "kadadell_river", "velm_sea"]
            assert [nodes.nth(i).get_attribute("data-state") for i in range(3)] == ["answered"] * 3
            tops = [nodes.nth(i).bounding_box()["y"] for i in range(3)]
            assert tops[0] < tops[1] < tops[2]
            edges = page.locator("svg#graph path.edge")
            pairs = {
                (edges.nth(i).get_attribute("data-from"), edges.nth(i).get_attribute("data-to"))
                for i in range(2)
            }
            assert edges.count() == 2 and pairs == {("", "kadadell_river"), ("kadadell_river", "velm_sea")}

            # the final answer, its citations linking to the reference list, the references linking to pages
            assert (
                page.inner_text("#answer")
                == "Kadadell lies on the Velm [1], which flows into the Amber Sea [2]."
            )
            cites = page.locator("#answer a.cite")
            assert [cites.nth(i).get_attribute("href") for i in range(cites.count())] == ["#ref-1", "#ref-2"]
            refs = page.locator("#references li a")
            assert [refs.nth(i).get_attribute("href") for i in range(refs.count())] == [
                f"{pages}/kadadell",
                f"{pages}/velm",
            ]
            cites.nth(1).click()
            assert page.evaluate("location.hash") == "#ref-2"
            assert "Velm" in page.inner_text("#ref-2")

            # a node's details: its query, the page it read (a link) and its answer with a citation link
            page.click('svg#graph g.node[data-name="velm_sea"]')
            detail = page.locator("#detail")
            assert "Into which sea does the Velm flow?" in detail.inner_text()
            assert [q.strip() for q in detail.locator("li.query").all_inner_texts()] == ["Velm sea"]
            read = detail.locator("li.page a")
            hrefs = [read.nth(i).get_attribute("href") for i in range(read.count())]
            # pages are read concurrently: listed in the order their reads finished
            assert f"{pages}/velm" in hrefs and all(h.startswith(f"{pages}/") for h in hrefs)
            answer_cite = detail.locator(".node-answer a.cite")
            assert (
                answer_cite.inner_text() == "[[1]]" and answer_cite.get_attribute("href") == f"{pages}/velm"
            )
            assert "selected" in (page.get_attribute('g.node[data-name="velm_sea"]', "class") or "")
            assert re.match(r"Done in \d+\.\d s", page.inner_text("#status"))

            shot = tmp_path / "agent-web.png"
            page.screenshot(path=str(shot), full_page=True)
            page.close()
    assert shot.stat().st_size > 10_000
    record_property("screenshot", str(shot))
    with capsys.disabled():
        print(f"\nscreenshot: {shot}")
    assert errors == []


class _FutureSchema:
    """An agent from a newer server whose events the page does not understand."""

    async def astream(self, question: str) -> Any:
        class Event(AgentEvent):
            def to_json(self) -> dict[str, Any]:
                return {**super().to_json(), "v": 99}

        yield Event("start", {"question": question}, 0.0)


def test_page_refuses_an_unknown_schema_version(browser: Any) -> None:
    with running(create_app(_FutureSchema)) as url:
        page = browser.new_page()
        page.goto(url + "/?q=hello")  # ?q= starts the search on load
        page.wait_for_selector("body[data-state=error]", timeout=30_000)
        assert "understands event schema v1, but the server sent v99" in page.inner_text("#status")
        assert page.locator("svg#graph g.node").count() == 1 and page.input_value("#q") == "hello"
        page.close()


class _Scripted:
    """Replays events: a failed node, a planner error, the answer in pieces, a non-http(s) reference."""

    EVENTS: ClassVar[list[AgentEvent]] = [
        AgentEvent("start", {"question": "q"}, 0.0),
        AgentEvent("planner_error", {"error": "not JSON"}, 0.1),
        AgentEvent("node_added", {"name": "a", "question": "first?", "parents": []}, 0.2),
        AgentEvent("node_added", {"name": "b", "question": "second?", "parents": []}, 0.2),
        AgentEvent("node_started", {"name": "a"}, 0.3),
        AgentEvent("node_failed", {"node": "a", "error": "SearchError: the backend is down"}, 0.4),
        AgentEvent("node_started", {"name": "b"}, 0.4),
        AgentEvent("answer_delta", {"text": "Half "}, 0.5),
        AgentEvent("answer_delta", {"text": "an answer [1] <b>not bold</b>."}, 0.5),
        AgentEvent(
            "final_answer",
            {
                "answer": "Half an answer [1] <b>not bold</b>.",
                "references": [{"n": 1, "url": "javascript:alert(1)", "title": "evil"}],
            },
            0.6,
        ),
        AgentEvent("done", {"seconds": 0.6}, 0.6),
    ]

    async def astream(self, question: str) -> Any:
        for event in self.EVENTS:
            yield event


def test_page_shows_failures_and_never_links_script_urls(browser: Any) -> None:
    with running(create_app(_Scripted)) as url:
        page = browser.new_page()
        page.goto(url + "/?q=q")
        page.wait_for_selector("body[data-state=done]", timeout=30_000)
        assert page.get_attribute('g.node[data-name="a"]', "data-state") == "failed"
        assert page.get_attribute('g.node[data-name="b"]', "data-state") == "running"  # never answered
        # both parentless nodes hang off the question, side by side
        edges = page.locator("path.edge")
        assert {edges.nth(i).get_attribute("data-from") for i in range(edges.count())} == {""}
        a, b = (page.locator(f'g.node[data-name="{n}"]').bounding_box() for n in "ab")
        assert a["y"] == b["y"] and a["x"] < b["x"]
        assert page.inner_text("#answer") == "Half an answer [1] <b>not bold</b>."  # text, never markup
        assert page.locator("#answer b").count() == 0
        assert page.locator("#references li a").count() == 0  # javascript: is shown, not linked
        assert "javascript:alert(1)" in page.inner_text("#references")
        bad = page.locator("#log li.bad").all_inner_texts()
        assert any("a failed: SearchError: the backend is down" in line for line in bad)
        assert any(
            "planner reply rejected: not JSON" in line
            for line in page.locator("#log li.warn").all_inner_texts()
        )
        page.click('g.node[data-name="a"]')
        assert "the backend is down" in page.inner_text("#detail")
        page.close()
