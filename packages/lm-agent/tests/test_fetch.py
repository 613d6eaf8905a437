"""Page fetching over real HTTP on loopback: HTML to text, redirects, huge, binary and non-UTF-8 pages."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from loopback_http import Request, Server, closed_port_url

from lmstack.agent._errors import FetchError
from lmstack.agent.tools import Page, fetch_page, fetch_tool, html_to_text

ARTICLE = """<!DOCTYPE html>
<html><head>
  <meta charset="utf-8">
  <title>  Zorblat &amp; its   moons </title>
  <style>body { color: red; }</style>
  <script>var tracking = "do not read me";</script>
</head>
<body>
  <nav><a href="/">Home</a> | <a href="/about">About</a></nav>
  <h1>Zorblat</h1>
  <p>Zorblat is   the second
     moon of <b>Quux</b>.</p>
  <h2>Orbit</h2>
  <ul><li>Period: 3 days</li><li>Radius: 4&nbsp;000 km</li></ul>
  <noscript>Enable JavaScript</noscript>
  <p>Caf&eacute; &lt;open&gt;</p>
</body></html>
"""
ARTICLE_TEXT = (
    "# Zorblat\n\nZorblat is the second moon of Quux.\n\n## Orbit\n\n"
    "- Period: 3 days\n- Radius: 4 000 km\n\nCafé <open>"
)
HUGE_BYTES = 1 << 30  # what the huge page claims, and would send if read to the end
CHUNK = b"<p>" + b"lorem ipsum " * 5000 + b"</p>\n"


def huge(request: Request) -> None:
    request.send_response(200)
    request.send_header("Content-Type", "text/html; charset=utf-8")
    request.send_header("Content-Length", str(HUGE_BYTES))
    request.end_headers()
    sent = 0
    try:
        while sent < HUGE_BYTES:
            request.wfile.write(CHUNK)
            sent += len(CHUNK)
    except OSError:
        pass  # the client stopped reading and hung up
    finally:
        request.server.state["huge_sent"] = sent
        request.server.state["huge_done"].set()


def routes() -> dict[str, Any]:
    cafe = "Le café de la gare coûte 2 €"
    return {
        "/article.html": lambda r: r.reply(200, ARTICLE, "text/html; charset=utf-8"),
        "/old": lambda r: r.reply(302, "", headers={"Location": "/moved"}),
        "/moved": lambda r: r.reply(301, "", headers={"Location": "/article.html"}),
        "/loop": lambda r: r.reply(302, "", headers={"Location": "/loop"}),
        "/huge": huge,
        "/image.png": lambda r: r.reply(200, b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "image/png"),
        "/paper.pdf": lambda r: r.reply(200, b"%PDF-1.7\n", "application/pdf"),
        "/liar.html": lambda r: r.reply(200, b"\x7fELF\x02\x01\x01\x00\x00\x00\x00", "text/html"),
        "/latin1.txt": lambda r: r.reply(
            200, cafe.replace("€", "EUR").encode("latin-1"), "text/plain; charset=ISO-8859-1"
        ),
        "/cyrillic.html": lambda r: r.reply(
            200,
            '<html><head><meta http-equiv="Content-Type" content="text/html; charset=windows-1251">'
            "<title>Москва</title></head><body><p>Привет, мир</p></body></html>".encode("cp1251"),
            "text/html",
        ),
        "/undeclared.txt": lambda r: r.reply(200, cafe.encode("cp1252"), "text/plain"),
        "/notes.md": lambda r: r.reply(200, "# Moons of Quux\n\nZorblat and Blip.\n", "text/markdown"),
        "/data.json": lambda r: r.reply(200, json.dumps({"moons": ["Zorblat"]}), "application/json"),
        "/missing": lambda r: r.reply(404, "gone"),
        "/slow": lambda r: r.server.release.wait(30),
    }


@pytest.fixture
def server() -> Iterator[Server]:
    with Server(routes()) as running:
        running.state["huge_done"] = threading.Event()
        yield running


def fetch(url: str, **options: Any) -> Page:
    return asyncio.run(fetch_page(url, **options))


def test_html_page_becomes_readable_text(server: Server) -> None:
    page = fetch(f"{server.url}/article.html")
    assert page == Page(
        url=f"{server.url}/article.html",
        title="Zorblat & its moons",
        text=ARTICLE_TEXT,
        content_type="text/html",
        truncated=False,
    )
    assert html_to_text(ARTICLE) == ("Zorblat & its moons", ARTICLE_TEXT)


def test_html_without_title_uses_its_first_heading() -> None:
    assert html_to_text("<body><h2>First <i>one</i></h2><p>x</p><h1>Second</h1></body>") == (
        "First one",
        "## First one\n\nx\n\n# Second",
    )


def test_redirects_are_followed_to_the_final_url(server: Server) -> None:
    page = fetch(f"{server.url}/old")
    assert page.url == f"{server.url}/article.html"
    assert page.text == ARTICLE_TEXT
    assert server.hits["/old"] == server.hits["/moved"] == server.hits["/article.html"] == 1
    with pytest.raises(FetchError, match="too many redirects"):
        fetch(f"{server.url}/loop")


def test_huge_page_is_streamed_and_truncated(server: Server) -> None:
    page = fetch(f"{server.url}/huge", max_bytes=200_000, max_chars=1_000_000)
    assert page.truncated
    words = page.text.split()
    assert 180_000 / len("lorem ") < len(words) < 200_000 / len("lorem ")  # 200 kB of the page, no more
    assert set(words) == {"lorem", "ipsum"}
    assert server.state["huge_done"].wait(10)
    # The server could push only what the socket buffers took before the client hung up, not the gigabyte.
    assert server.state["huge_sent"] < 64 << 20
    capped = fetch(f"{server.url}/article.html", max_chars=20)
    assert capped.truncated and capped.text == ARTICLE_TEXT[:20]


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/image.png", r"binary content \(image/png\) at http://127.0.0.1:\d+/image.png"),
        ("/paper.pdf", r"binary content \(application/pdf\)"),
        ("/liar.html", r"binary content \(text/html, but the body has NUL bytes\)"),
    ],
)
def test_binary_content_is_refused(server: Server, path: str, message: str) -> None:
    with pytest.raises(FetchError, match=message):
        fetch(server.url + path)


def test_charsets_from_header_meta_or_fallback(server: Server) -> None:
    assert fetch(f"{server.url}/latin1.txt").text == "Le café de la gare coûte 2 EUR"
    cyrillic = fetch(f"{server.url}/cyrillic.html")
    assert (cyrillic.title, cyrillic.text) == ("Москва", "Привет, мир")
    assert fetch(f"{server.url}/undeclared.txt").text == "Le café de la gare coûte 2 €"


def test_text_markdown_and_json_pages(server: Server) -> None:
    notes = fetch(f"{server.url}/notes.md")
    assert (notes.title, notes.content_type) == ("Moons of Quux", "text/markdown")
    assert notes.text == "# Moons of Quux\n\nZorblat and Blip."
    data = fetch(f"{server.url}/data.json")
    assert json.loads(data.text) == {"moons": ["Zorblat"]}
    assert data.title == "data.json"


def test_failures_are_clear_errors(server: Server) -> None:
    with pytest.raises(FetchError, match=r"HTTP 404 Not Found fetching http://127.0.0.1:\d+/missing"):
        fetch(f"{server.url}/missing")
    with pytest.raises(FetchError, match=r"timed out after 0.2 s fetching http://127.0.0.1:\d+/slow"):
        fetch(f"{server.url}/slow", timeout_s=0.2)
    with pytest.raises(FetchError, match="could not connect"):
        fetch(f"{closed_port_url()}/page")
    with pytest.raises(FetchError, match="only http:// and https://"):
        fetch("file:///etc/passwd")


def test_fetch_tool_feeds_the_page_or_the_error_back(server: Server) -> None:
    fetch_page_tool = fetch_tool(max_chars=10_000)
    assert fetch_page_tool.spec()["function"]["name"] == "fetch_page"
    out = asyncio.run(fetch_page_tool.acall({"url": f"{server.url}/article.html"}))
    assert out.ok
    assert out.content == f"Title: Zorblat & its moons\nURL: {server.url}/article.html\n\n{ARTICLE_TEXT}"
    assert isinstance(out.data, Page)
    binary = asyncio.run(fetch_page_tool.acall({"url": f"{server.url}/image.png"}))
    assert not binary.ok
    assert binary.content.startswith("fetch_page failed: FetchError: binary content (image/png)")
    with pytest.raises(TypeError, match="unknown options"):
        fetch_tool(max_size=3)
