"""The bundled local search server: BM25 ranking, SearxNG's JSON, pages as HTML, real HTTP on loopback."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import httpx
import jsonschema
import pytest

from lmstack.agent._errors import SearchError
from lmstack.agent.tools._local_search import LocalSearchServer, main

# What SearxNG's /search?format=json answers, as far as search clients read it.
SEARXNG_SCHEMA = {
    "type": "object",
    "required": ["query", "number_of_results", "results"],
    "properties": {
        "query": {"type": "string"},
        "number_of_results": {"type": "integer", "minimum": 0},
        "results": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["title", "url", "content", "score", "engine"],
                "properties": {
                    "title": {"type": "string"},
                    "url": {"type": "string", "pattern": "^http://127\\.0\\.0\\.1:[0-9]+/pages/"},
                    "content": {"type": "string"},
                    "score": {"type": "number"},
                    "engine": {"const": "lmstack-local"},
                },
            },
        },
    },
}


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    folder = tmp_path / "docs"
    (folder / "cities").mkdir(parents=True)
    (folder / "cities" / "kadadell.md").write_text(
        "# Kadadell\n\nKadadell is a city on the river Velm.\n\n- founded in 1203\n- famous for wine\n"
    )
    (folder / "tourdial.html").write_text(
        "<html><head><title>The Tourdial</title><style>.x{color:red}</style></head>"
        "<body><h1>Tourdial</h1><p>The tourdial is a machine made of brass for <b>measuring</b> tides.</p>"
        "<script>var river = 1;</script></body></html>"
    )
    (folder / "notes.txt").write_text("Plain notes about brass and copper.")
    (folder / "world.jsonl").write_text(
        json.dumps(
            {"id": "vernomling", "title": "Vernomling", "text": "The vernomling lives near the river."}
        )
        + "\n\nnot json\n"
        + json.dumps({"id": "x", "no_text": 1})
        + "\n"
    )
    (folder / ".hidden.md").write_text("# Secret\n\nriver")
    (folder / "image.png").write_bytes(b"\x89PNG river")
    return folder


def test_documents_titles_and_names(corpus: Path) -> None:
    server = LocalSearchServer(corpus)
    titles = {doc.name: doc.title for doc in server.documents}
    assert titles == {
        "cities/kadadell": "Kadadell",
        "tourdial": "The Tourdial",
        "notes": "notes",
        "world/vernomling": "Vernomling",
    }
    # one file alone is a corpus too (the bundled world's articles.jsonl)
    single = LocalSearchServer(corpus / "world.jsonl")
    assert [(d.name, d.title) for d in single.documents] == [("world/vernomling", "Vernomling")]
    tourdial = server.document("tourdial")
    assert tourdial is not None
    assert "color:red" not in tourdial.text and "var river" not in tourdial.text
    assert "made of brass for measuring tides" in tourdial.text


def test_bm25_scores_match_hand_computed_values(tmp_path: Path) -> None:
    # .txt files: the title is the file name, so each document's tokens are [name, *words].
    (tmp_path / "d1.txt").write_text("river river stone")  # 4 tokens
    (tmp_path / "d2.txt").write_text("river sky")  # 3 tokens
    (tmp_path / "d3.txt").write_text("sky sky sky stone")  # 5 tokens; avgdl = 4
    server = LocalSearchServer(tmp_path)
    rows = server.search("River", k=10)
    assert [r["title"] for r in rows] == ["d1", "d2"]
    idf = math.log(1 + (3 - 2 + 0.5) / (2 + 0.5))  # N = 3, df = 2
    k1, b = 1.5, 0.75
    d1 = idf * 2 * (k1 + 1) / (2 + k1 * (1 - b + b * 4 / 4))
    d2 = idf * 1 * (k1 + 1) / (1 + k1 * (1 - b + b * 3 / 4))
    assert rows[0]["score"] == pytest.approx(d1, abs=1e-6)
    assert rows[1]["score"] == pytest.approx(d2, abs=1e-6)
    # Two terms add up; the repeated query word counts once.
    sky_idf = math.log(1 + (3 - 2 + 0.5) / (2 + 0.5))
    d3 = sky_idf * 3 * (k1 + 1) / (3 + k1 * (1 - b + b * 5 / 4)) + idf * 1 * (k1 + 1) / (
        1 + k1 * (1 - b + b * 5 / 4)
    )
    rows = server.search("sky stone sky", k=1)
    assert len(rows) == 1 and rows[0]["title"] == "d3" and rows[0]["score"] == pytest.approx(d3, abs=1e-6)
    assert server.count("sky stone") == 3 and server.count("nothing here") == 0


def test_search_over_http_speaks_searxng_json(corpus: Path) -> None:
    with LocalSearchServer(corpus) as server, httpx.Client(base_url=server.url) as client:
        reply = client.get("/search", params={"q": "river", "format": "json"})
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("application/json")
        body = reply.json()
        jsonschema.validate(body, SEARXNG_SCHEMA)
        assert body["query"] == "river"
        found = [r["url"].rsplit("/pages/", 1)[1] for r in body["results"]]
        # script text, hidden files and non-documents are not indexed
        assert sorted(found) == ["cities/kadadell", "world/vernomling"]
        assert body["number_of_results"] == 2
        assert all("river" in r["content"].lower() for r in body["results"])
        scores = [r["score"] for r in body["results"]]
        assert scores == sorted(scores, reverse=True)

        # every result's URL serves the page
        for result in body["results"]:
            page = client.get(result["url"])
            assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
            assert f"<title>{result['title']}</title>" in page.text

        one = client.get("/search", params={"q": "brass", "format": "json", "limit": 1}).json()
        two = client.get("/search", params={"q": "brass", "format": "json", "limit": 1, "pageno": 2}).json()
        assert one["number_of_results"] == two["number_of_results"] == 2
        assert len(one["results"]) == len(two["results"]) == 1
        assert {one["results"][0]["title"], two["results"][0]["title"]} == {"The Tourdial", "notes"}

        html_list = client.get("/search", params={"q": "brass"})
        assert html_list.headers["content-type"].startswith("text/html") and "The Tourdial" in html_list.text


def test_pages_render_markdown_escape_and_404(tmp_path: Path) -> None:
    (tmp_path / "doc.md").write_text(
        "# A <b>title</b>\n\nText with <script>alert(1)</script> inside.\n\n- one\n- two"
    )
    (tmp_path / "other.md").write_text("nothing")
    with LocalSearchServer(tmp_path) as server, httpx.Client(base_url=server.url) as client:
        page = client.get("/pages/doc")
        assert page.status_code == 200
        assert "<title>A &lt;b&gt;title&lt;/b&gt;</title>" in page.text
        assert "<h1>A &lt;b&gt;title&lt;/b&gt;</h1>" in page.text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text and "<script>" not in page.text
        assert "<ul><li>one</li><li>two</li></ul>" in page.text
        for missing in ("/pages/nope", "/pages/..%2Fdoc.md", "/pages/../../etc/passwd", "/pages/"):
            assert client.get(missing).status_code == 404, missing
        assert client.get("/elsewhere").status_code == 404
        index = client.get("/")
        assert index.status_code == 200 and 'href="/pages/doc"' in index.text
        assert client.get("/search", params={"format": "json"}).status_code == 400
        assert client.get("/search", params={"q": "  ", "format": "json"}).status_code == 400
        assert client.get("/search", params={"q": "x", "pageno": "two"}).status_code == 400


def test_snippet_is_taken_around_the_best_match(tmp_path: Path) -> None:
    filler = " ".join(f"word{i}" for i in range(200))
    (tmp_path / "long.txt").write_text(f"{filler} the golden lighthouse of Morvale stands here. {filler}")
    [row] = LocalSearchServer(tmp_path).search("lighthouse Morvale")
    snippet = row["content"]
    assert "golden lighthouse of Morvale" in snippet
    assert snippet.startswith("… ") and snippet.endswith(" …")
    assert len(snippet) <= 290


def test_lifecycle_and_errors(tmp_path: Path) -> None:
    with pytest.raises(SearchError, match="is not a folder"):
        LocalSearchServer(tmp_path / "missing")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    with pytest.raises(SearchError, match="is not a folder"):
        LocalSearchServer(tmp_path / "image.png")
    (tmp_path / "a.txt").write_text("alpha")
    server = LocalSearchServer(tmp_path)
    with pytest.raises(SearchError, match="not running"):
        _ = server.url
    assert server.search("alpha")[0]["url"] == "/pages/a"  # in-process, before it serves
    server.start()
    url = server.url
    assert server.start() is server and server.url == url  # starting twice is a no-op
    assert httpx.get(f"{url}/search?q=alpha&format=json").json()["results"][0]["url"] == f"{url}/pages/a"
    server.stop()
    server.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/search?q=alpha&format=json")
    port = int(url.rsplit(":", 1)[1])
    with LocalSearchServer(tmp_path) as busy, pytest.raises(SearchError, match="cannot listen"):
        LocalSearchServer(tmp_path, port=int(busy.url.rsplit(":", 1)[1])).start()
    assert port > 0


def test_module_runs_as_a_command(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text("# Alpha\n\nThe alpha document.")
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmstack.agent.tools._local_search", str(tmp_path), "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("lmstack local search: 1 documents at http://127.0.0.1:"), line
        url = line.split(" at ", 1)[1].split()[0]
        results = httpx.get(f"{url}/search", params={"q": "alpha", "format": "json"}).json()["results"]
        assert [r["title"] for r in results] == ["Alpha"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_command_reports_a_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "nope")]) == 2
    assert "is not a folder" in capsys.readouterr().err
