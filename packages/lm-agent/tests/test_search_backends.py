"""Search backends over real HTTP on loopback (a fake SearxNG, a slow one, a down one) and the adapter."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from loopback_http import Request, Server, closed_port_url

from lmstack.agent._errors import SearchError
from lmstack.agent.tools import JSONSearch, SearchHit, SearxNGSearch, search_hits, web_search_tool

# What a SearxNG instance answers (fields as in its JSON API), for the query "rust".
SEARXNG_RESULTS = [
    {
        "title": "Rust (programming language)",
        "url": "https://en.wikipedia.org/wiki/Rust_(programming_language)",
        "content": "Rust is a general-purpose programming language.",
        "engine": "wikipedia",
        "engines": ["wikipedia", "duckduckgo"],
        "score": 4.5,
        "category": "general",
    },
    {
        "title": "Rust",
        "url": "https://www.rust-lang.org/",
        "content": "A language empowering everyone.",
        "score": 2.0,
    },
    {
        "title": "Rust - Wiktionary",
        "url": "https://en.wiktionary.org/wiki/rust",
        "content": "iron oxide",
        "score": 1,
    },
]


def searxng(request: Request) -> None:
    query = request.query
    payload = {"query": query.get("q"), "number_of_results": 3, "results": SEARXNG_RESULTS}
    request.reply(200, json.dumps(payload), "application/json")


def flaky(request: Request) -> None:
    # The first request of each test fails with 503, the next ones succeed.
    if request.server.hits[request.route] == 1:
        request.reply(503, "overloaded")
    else:
        searxng(request)


def slow(request: Request) -> None:
    request.server.release.wait(30)


def routes() -> dict[str, Any]:
    return {
        "/search": searxng,
        "/flaky/search": flaky,
        "/slow/search": slow,
        "/broken/search": lambda r: r.reply(500, "internal error"),
        "/html/search": lambda r: r.reply(200, "<html><body>Search</body></html>", "text/html"),
        "/nojson/search": lambda r: r.reply(403, "Forbidden", "text/html"),
        "/noresults/search": lambda r: r.reply(200, '{"error": "no engines"}', "application/json"),
        "/badhits/search": lambda r: r.reply(200, '{"results": [{"foo": 1}]}', "application/json"),
        "/api": api,
    }


def api(request: Request) -> None:
    # A generic JSON API: its own parameter names, nesting and field names.
    params = json.loads(request.body()) if request.command == "POST" else request.query
    items = [
        {
            "name": f"Doc {i}",
            "link": f"https://docs.example/{i}",
            "body": f"about {params['query']}",
            "rel": i,
        }
        for i in range(int(params.get("limit", 10)))
    ]
    request.reply(200, json.dumps({"data": {"items": items}}), "application/json")


@pytest.fixture
def server() -> Iterator[Server]:
    with Server(routes()) as running:
        yield running


def expected_searxng_hits() -> list[SearchHit]:
    # Built by hand from the fake answer: SearxNG's "content" is the snippet, other fields are metadata.
    return [
        SearchHit(
            title="Rust (programming language)",
            url="https://en.wikipedia.org/wiki/Rust_(programming_language)",
            snippet="Rust is a general-purpose programming language.",
            score=4.5,
            metadata={"engine": "wikipedia", "engines": ["wikipedia", "duckduckgo"], "category": "general"},
        ),
        SearchHit(
            title="Rust",
            url="https://www.rust-lang.org/",
            snippet="A language empowering everyone.",
            score=2.0,
        ),
    ]


def test_searxng_sync_and_async_answers(server: Server) -> None:
    backend = SearxNGSearch(server.url, engines=["wikipedia", "duckduckgo"], language="en")
    assert backend.search("rust", k=2) == expected_searxng_hits()
    assert asyncio.run(backend.asearch("rust", k=2)) == expected_searxng_hits()
    sent = server.requests[-1].query
    assert sent == {"q": "rust", "format": "json", "engines": "wikipedia,duckduckgo", "language": "en"}
    assert len(backend.search("rust", k=10)) == 3


def test_down_backend_is_a_clear_error() -> None:
    url = closed_port_url()
    backend = SearxNGSearch(url)
    with pytest.raises(SearchError, match=r"unreachable.*check that it is running") as info:
        backend.search("x")
    assert f"{url}/search" in str(info.value)
    with pytest.raises(SearchError, match="unreachable"):
        asyncio.run(backend.asearch("x"))


def test_slow_backend_times_out_without_retrying(server: Server) -> None:
    backend = SearxNGSearch(f"{server.url}/slow", timeout_s=0.2)
    with pytest.raises(SearchError, match=r"did not answer within 0.2 s"):
        asyncio.run(backend.asearch("x"))
    with pytest.raises(SearchError, match=r"did not answer within 0.2 s"):
        backend.search("x")
    assert server.hits["/slow/search"] == 2  # one request per search: a timeout is not retried


def test_5xx_is_retried_once(server: Server) -> None:
    assert asyncio.run(SearxNGSearch(f"{server.url}/flaky").asearch("rust", 2)) == expected_searxng_hits()
    assert server.hits["/flaky/search"] == 2
    with pytest.raises(SearchError, match=r"HTTP 500.*internal error"):
        SearxNGSearch(f"{server.url}/broken").search("rust")
    assert server.hits["/broken/search"] == 2
    with pytest.raises(SearchError, match="HTTP 500"):
        SearxNGSearch(f"{server.url}/broken", retries=0).search("rust")
    assert server.hits["/broken/search"] == 3


@pytest.mark.parametrize(
    ("prefix", "message"),
    [
        ("/html", r"did not answer JSON \(content-type 'text/html'.*search API's URL"),
        ("/nojson", r"HTTP 403 \(SearxNG refuses format=json unless settings.yml lists json"),
        ("/noresults", r"without a list at 'results' \(top level: \['error'\]\)"),
        ("/badhits", r"no result has a URL or text field"),
    ],
)
def test_malformed_answers_are_clear_errors(server: Server, prefix: str, message: str) -> None:
    with pytest.raises(SearchError, match=message):
        asyncio.run(SearxNGSearch(server.url + prefix).asearch("rust"))
    assert server.hits[f"{prefix}/search"] == 1  # 4xx and bad bodies are not retried


def test_json_search_is_configurable(server: Server) -> None:
    expected = [
        SearchHit(
            title=f"Doc {i}",
            url=f"https://docs.example/{i}",
            snippet="about cats",
            score=None,
            metadata={"rel": i},
        )
        for i in range(3)
    ]
    options: dict[str, Any] = {"results_path": "data.items", "url_field": "link", "snippet_field": "body"}
    by_param = JSONSearch(f"{server.url}/api", query_param="query", k_param="limit", **options)
    assert by_param.search("cats", k=3) == expected
    assert server.requests[-1].query == {"query": "cats", "limit": "3"}
    template = JSONSearch(server.url + "/api?query={query}&limit={k}", **options)
    assert asyncio.run(template.asearch("cats", k=3)) == expected
    posted = JSONSearch(f"{server.url}/api", method="POST", query_param="query", k_param="limit", **options)
    assert posted.search("cats", 3) == expected
    assert server.requests[-1].command == "POST"
    # Scores from a field of another name, when configured.
    scored = JSONSearch(
        f"{server.url}/api", query_param="query", k_param="limit", score_field="rel", **options
    )
    assert [hit.score for hit in scored.search("cats", 3)] == [0.0, 1.0, 2.0]


# --- search_hits: any object with the search-backend shape ----------------------------------------


@dataclass(frozen=True)
class IndexHit:
    """The search-backend shape as lmstack-rag's Index returns it."""

    text: str
    source: str
    score: float
    metadata: dict[str, Any] = field(default_factory=dict)


class PrivateIndex:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def search(self, query: str, k: int = 5) -> list[IndexHit]:
        self.calls.append((query, k))
        hits = [
            IndexHit(
                "Zorblat is a moon of Quux.", "articles/zorblat.md", 0.9, {"chunk_id": 3, "title": "Zorblat"}
            ),
            IndexHit("Quux has three moons.", "/data/articles/quux.md", 0.5, {"chunk_id": 7}),
        ]
        return hits[:k]


def test_rag_shaped_index_is_a_backend() -> None:
    index = PrivateIndex()
    hits = asyncio.run(search_hits(index, "zorblat", 5))
    assert hits == [
        SearchHit(
            "Zorblat",
            "articles/zorblat.md",
            "Zorblat is a moon of Quux.",
            0.9,
            {"chunk_id": 3, "title": "Zorblat"},
        ),
        SearchHit("quux.md", "/data/articles/quux.md", "Quux has three moons.", 0.5, {"chunk_id": 7}),
    ]
    assert index.calls == [("zorblat", 5)]


def test_async_dict_callable_and_raw_answers_are_adapted(server: Server) -> None:
    web = [{"title": "T", "link": "https://t.example", "description": "d", "score": "0.25"}]

    class AsyncBackend:
        async def search(self, query: str, k: int) -> list[dict[str, Any]]:
            return web * k

    class AsearchBackend:
        def search(self, query: str, k: int) -> list[dict[str, Any]]:
            raise AssertionError("asearch is preferred when there is one")

        async def asearch(self, query: str, k: int) -> list[dict[str, Any]]:
            return web

    expected = SearchHit(title="T", url="https://t.example", snippet="d", score=0.25)
    assert asyncio.run(search_hits(AsyncBackend(), "q", 2)) == [expected, expected]
    assert asyncio.run(search_hits(AsearchBackend(), "q", 2)) == [expected]
    assert asyncio.run(search_hits(lambda query, k: web, "q", 1)) == [expected]
    raw = {"query": "q", "results": SEARXNG_RESULTS}
    assert asyncio.run(search_hits(lambda query, k: raw, "q", 2)) == expected_searxng_hits()
    assert asyncio.run(search_hits(SearxNGSearch(server.url), "rust", 2)) == expected_searxng_hits()


def test_adapter_errors_name_the_backend() -> None:
    class Failing:
        def search(self, query: str, k: int) -> list[Any]:
            raise ConnectionError("index is locked")

        def __repr__(self) -> str:
            return "Failing()"

    class Hangs:
        async def search(self, query: str, k: int) -> list[Any]:
            await asyncio.Event().wait()
            return []

    with pytest.raises(SearchError, match=r"Failing\(\) failed for 'q': ConnectionError: index is locked"):
        asyncio.run(search_hits(Failing(), "q", 3))
    with pytest.raises(SearchError, match="returned str, not a list of hits"):
        asyncio.run(search_hits(lambda query, k: "oops", "q", 3))
    with pytest.raises(SearchError, match="neither a URL"):
        asyncio.run(search_hits(lambda query, k: [{"x": 1}], "q", 3))
    with pytest.raises(SearchError, match="is not a search backend"):
        asyncio.run(search_hits(42, "q", 3))
    with pytest.raises(SearchError, match=r"did not answer within 0\.05 s"):
        asyncio.run(search_hits(Hangs(), "q", 3, timeout_s=0.05))


def test_web_search_tool_lists_hits_and_reports_failures(server: Server) -> None:
    web_search = web_search_tool(SearxNGSearch(server.url), k=2)
    spec = web_search.spec()["function"]
    assert spec["name"] == "web_search"
    assert spec["parameters"]["required"] == ["query"]
    out = asyncio.run(web_search.acall({"query": "rust"}))
    assert out.ok and out.data == expected_searxng_hits()
    assert (
        out.content.split("\n\n")[1]
        == "[2] Rust\nURL: https://www.rust-lang.org/\nA language empowering everyone."
    )
    empty = asyncio.run(web_search_tool(lambda query, k: []).acall('{"query": "nothing"}'))
    assert empty.ok and empty.content.startswith("No results.")
    down = asyncio.run(web_search_tool(SearxNGSearch(closed_port_url())).acall({"query": "rust"}))
    assert not down.ok
    assert down.content.startswith("web_search failed: SearchError: search backend at http://127.0.0.1:")
    wrong = asyncio.run(web_search.acall({"q": "rust"}))
    assert (
        not wrong.ok
        and "missing required field 'query'" in wrong.content
        and "unknown field 'q'" in wrong.content
    )
