"""A local search engine over a folder of documents, answering in SearxNG's JSON.

:class:`LocalSearchServer` serves a folder of ``.md``, ``.txt`` and ``.html`` files (and ``.jsonl``
files whose rows carry ``text`` and optionally ``title`` and ``id``, such as the bundled world's
``articles.jsonl``) over HTTP on loopback, so that a search agent can be run end to end without the
internet: ``GET /search?q=...&format=json`` ranks the documents with BM25 and answers as SearxNG does,
and ``GET /pages/<name>`` serves each document as a small HTML page for the agent to read.

Run it alone with ``python -m lmstack.agent.tools._local_search FOLDER --port 8888``.
"""

from __future__ import annotations

import argparse
import contextlib
import html
import json
import logging
import math
import re
import sys
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from html.parser import HTMLParser
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from lmstack.agent._errors import SearchError

__all__ = ["LocalSearchServer"]

logger = logging.getLogger(__name__)

_SUFFIXES = (".md", ".markdown", ".txt", ".html", ".htm", ".jsonl")
_WORD = re.compile(r"\w+")
_MAX_QUERY_CHARS = 2000
_PAGE_SIZE = 10


def _tokens(text: str) -> list[str]:
    """Lowercase words: the unit BM25 counts."""
    return _WORD.findall(text.lower())


@dataclass(frozen=True)
class _Doc:
    name: str  # the path under /pages/
    title: str
    text: str  # plain text: what is indexed and quoted in snippets
    page: str  # the HTML served at /pages/<name>


class _TextOfHTML(HTMLParser):
    """The visible text of an HTML document and its title (``<title>``, else the first ``<h1>``)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.title = ""
        self._h1 = ""
        self._skip = 0
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "style"):
            self._skip += 1
        elif tag in ("title", "h1"):
            self._in = tag
        if tag in ("p", "div", "br", "li", "h1", "h2", "h3", "h4", "h5", "h6", "tr"):
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style"):
            self._skip = max(0, self._skip - 1)
        elif tag == self._in:
            self._in = None

    def handle_data(self, data: str) -> None:
        if self._skip:
            return
        if self._in == "title":
            self.title += data
            return
        if self._in == "h1" and not self.title:
            self._h1 += data
        self.parts.append(data)

    def result(self) -> tuple[str, str]:
        text = re.sub(r"[ \t]+", " ", "".join(self.parts))
        text = re.sub(r"\s*\n\s*", "\n", text).strip()
        return (self.title.strip() or self._h1.strip()), text


def _markdown_page(title: str, source: str) -> str:
    """Markdown or plain text as small HTML: headings, bullet lists and paragraphs, all escaped."""
    body: list[str] = []
    for block in re.split(r"\n\s*\n", source.strip()):
        lines = [line.strip() for line in block.splitlines() if line.strip()]
        if not lines:
            continue
        heading = re.match(r"(#{1,6})\s+(.*)", lines[0])
        if heading and len(lines) == 1:
            level = len(heading.group(1))
            body.append(f"<h{level}>{html.escape(heading.group(2))}</h{level}>")
        elif all(re.match(r"[-*+]\s", line) for line in lines):
            items = "".join(f"<li>{html.escape(line[2:].strip())}</li>" for line in lines)
            body.append(f"<ul>{items}</ul>")
        else:
            body.append(f"<p>{html.escape(' '.join(lines))}</p>")
    return _page(title, "\n".join(body))


def _page(title: str, body: str) -> str:
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title></head>\n<body>\n{body}\n</body></html>\n"
    )


def _markdown_title(source: str) -> str | None:
    for line in source.splitlines():
        match = re.match(r"\s{0,3}#{1,6}\s+(.+?)\s*#*\s*$", line)
        if match:
            return match.group(1)
    return None


def _read_folder(folder: Path) -> list[_Doc]:
    """The documents under ``folder`` (recursively) or in the one file, named by path without suffix."""
    docs: list[_Doc] = []
    paths = [folder] if folder.is_file() else folder.rglob("*")
    root = folder.parent if folder.is_file() else folder
    for path in sorted(p for p in paths if p.is_file() and p.suffix.lower() in _SUFFIXES):
        relative = path.relative_to(root)
        if any(part.startswith(".") for part in relative.parts):
            continue  # hidden files and folders (.git, editor swap files) are not documents
        try:
            source = path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            logger.warning("skipping %s: %s", path, exc)
            continue
        stem = relative.with_suffix("").as_posix()
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            docs.extend(_jsonl_docs(path, stem, source))
        elif suffix in (".html", ".htm"):
            parser = _TextOfHTML()
            parser.feed(source)
            title, text = parser.result()
            docs.append(_Doc(stem, title or path.stem, text, source))
        else:
            title = (_markdown_title(source) if suffix != ".txt" else None) or path.stem
            text = re.sub(r"(?m)^\s{0,3}#{1,6}\s+", "", source).strip()
            docs.append(_Doc(stem, title, text, _markdown_page(title, source)))
    # Two files that differ only in suffix would share a name: keep the suffix for all but the first.
    seen: set[str] = set()
    unique: list[_Doc] = []
    for doc in docs:
        name = doc.name
        n = 2
        while name in seen:
            name, n = f"{doc.name}-{n}", n + 1
        seen.add(name)
        unique.append(doc if name == doc.name else _Doc(name, doc.title, doc.text, doc.page))
    return unique


def _jsonl_docs(path: Path, stem: str, source: str) -> Iterator[_Doc]:
    for number, line in enumerate(source.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            logger.warning("skipping %s line %d: not JSON", path, number)
            continue
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            logger.warning("skipping %s line %d: no 'text' field", path, number)
            continue
        key = str(row.get("id") or number)
        title = str(row.get("title") or key)
        yield _Doc(f"{stem}/{key}", title, row["text"], _markdown_page(title, f"# {title}\n\n{row['text']}"))


class _BM25:
    """Okapi BM25 over tokenised documents (Lucene's non-negative idf)."""

    def __init__(self, documents: Sequence[list[str]], k1: float = 1.5, b: float = 0.75) -> None:
        self.k1, self.b = k1, b
        self.lengths = [len(tokens) for tokens in documents]
        self.avgdl = sum(self.lengths) / len(self.lengths) if self.lengths else 0.0
        self.postings: dict[str, list[tuple[int, int]]] = {}
        for index, tokens in enumerate(documents):
            for term, count in Counter(tokens).items():
                self.postings.setdefault(term, []).append((index, count))

    def idf(self, term: str) -> float:
        df = len(self.postings.get(term, ()))
        n = len(self.lengths)
        return math.log(1 + (n - df + 0.5) / (df + 0.5))

    def scores(self, query: Sequence[str]) -> dict[int, float]:
        """Score of every document that shares a term with ``query`` (a repeated query term counts once)."""
        scores: dict[int, float] = {}
        for term in dict.fromkeys(query):
            idf = self.idf(term)
            for index, tf in self.postings.get(term, ()):
                norm = self.k1 * (1 - self.b + self.b * self.lengths[index] / self.avgdl)
                scores[index] = scores.get(index, 0.0) + idf * tf * (self.k1 + 1) / (tf + norm)
        return scores


def _snippet(text: str, query: set[str], width: int = 32, max_chars: int = 280) -> str:
    """The stretch of ``width`` words holding the most distinct query terms (ties: the earliest)."""
    words = list(_WORD.finditer(text))
    if not words:
        return text[:max_chars]
    lowered = [w.group().lower() for w in words]
    best, best_hits = 0, -1
    for start in range(max(1, len(words) - width + 1)):
        if lowered[start] not in query and start:
            continue  # a best window can always start on a query term (or at the very beginning)
        hits = len(query.intersection(lowered[start : start + width]))
        if hits > best_hits:
            best, best_hits = start, hits
    first = max(0, best - 4)  # a few words of lead-in
    last = min(len(words), first + width) - 1
    piece = " ".join(text[words[first].start() : words[last].end()].split())
    if len(piece) > max_chars:
        piece = piece[:max_chars].rsplit(" ", 1)[0]
    return ("… " if first else "") + piece + (" …" if last < len(words) - 1 else "")


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    server_version = "lmstack-local-search"

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s " + format, self.address_string(), *args)

    def _send(self, status: int, body: str, content_type: str) -> None:
        data = body.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", f"{content_type}; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _json(self, status: int, payload: dict[str, Any]) -> None:
        self._send(status, json.dumps(payload, ensure_ascii=False), "application/json")

    def do_GET(self) -> None:
        """Route ``/``, ``/search`` and ``/pages/<name>``."""
        engine = self.server.engine
        url = urlsplit(self.path)
        if url.path == "/search":
            self._search(engine, parse_qs(url.query))
        elif url.path.startswith("/pages/"):
            doc = engine.document(unquote(url.path[len("/pages/") :]))
            if doc is None:
                body = _page("Not found", f"<h1>Not found</h1><p>No page {html.escape(url.path)}.</p>")
                self._send(HTTPStatus.NOT_FOUND, body, "text/html")
            else:
                self._send(HTTPStatus.OK, doc.page, "text/html")
        elif url.path in ("/", ""):
            items = "".join(
                f'<li><a href="/pages/{quote(d.name)}">{html.escape(d.title)}</a></li>'
                for d in engine.documents
            )
            self._send(HTTPStatus.OK, _page("lmstack local search", f"<ul>{items}</ul>"), "text/html")
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no route {url.path}; try /search?q=...&format=json"})

    def _search(self, engine: LocalSearchServer, params: dict[str, list[str]]) -> None:
        query = (params.get("q") or [""])[0].strip()
        if not query:
            self._json(HTTPStatus.BAD_REQUEST, {"error": "missing query: pass ?q=words&format=json"})
            return
        if len(query) > _MAX_QUERY_CHARS:
            self._json(HTTPStatus.BAD_REQUEST, {"error": f"query longer than {_MAX_QUERY_CHARS} characters"})
            return
        try:
            page = int((params.get("pageno") or ["1"])[0])
            size = int((params.get("limit") or [str(_PAGE_SIZE)])[0])
        except ValueError:
            self._json(HTTPStatus.BAD_REQUEST, {"error": "pageno and limit must be integers"})
            return
        page, size = max(1, page), min(max(1, size), 100)
        ranked = engine.search(query, k=page * size)
        results = ranked[(page - 1) * size :]
        fmt = (params.get("format") or ["html"])[0]
        if fmt == "json":
            total = engine.count(query)
            self._json(HTTPStatus.OK, {"query": query, "number_of_results": total, "results": results})
            return
        items = "".join(
            f'<li><a href="{html.escape(r["url"])}">{html.escape(r["title"])}</a>'
            f"<p>{html.escape(r['content'])}</p></li>"
            for r in results
        )
        self._send(HTTPStatus.OK, _page(f"{query} - lmstack local search", f"<ol>{items}</ol>"), "text/html")


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    engine: LocalSearchServer


class LocalSearchServer:
    """A BM25 search engine over a folder of documents, served over HTTP in SearxNG's JSON.

    Documents are the folder's ``.md``, ``.markdown``, ``.txt``, ``.html`` and ``.htm`` files (searched
    recursively, hidden paths skipped) and the rows of its ``.jsonl`` files that have a ``text`` field.
    A document's name is its path without the suffix (``cities/kadadell``; a JSON Lines row adds
    ``/<id>``); its title is its first heading (``<title>`` or ``<h1>`` for HTML), else the file name.

    Routes: ``GET /search?q=...&format=json`` (also ``pageno`` and ``limit``, 10 results a page) answers
    ``{"query", "number_of_results", "results": [{"title", "url", "content", "score", "engine"}]}`` with
    ``content`` a snippet around the best match; without ``format=json`` the same as an HTML list.
    ``GET /pages/<name>`` serves the document as HTML; unknown pages are 404. ``GET /`` lists them.

    Use it as a context manager, or call :meth:`start` and :meth:`stop`::

        with LocalSearchServer("out/world/articles") as server:
            agent = GraphSearchAgent(llm, SearxNGSearch(server.url))

    Args:
        folder: The folder of documents, or a single document file such as the bundled world's
            ``articles.jsonl`` (read once, when the server is created).
        host: The address to listen on.
        port: The port; 0 picks a free one.

    Raises:
        SearchError: ``folder`` is neither a folder nor a document file.
    """

    def __init__(self, folder: str | Path, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.folder = Path(folder)
        if not (self.folder.is_dir() or (self.folder.is_file() and self.folder.suffix.lower() in _SUFFIXES)):
            raise SearchError(
                f"the local search folder {str(self.folder)!r} is not a folder; "
                "give a folder of .md/.txt/.html/.jsonl documents, or one such file"
            )
        self.host, self.port = host, port
        self.documents = _read_folder(self.folder)
        if not self.documents:
            logger.warning(
                "%s holds no .md, .txt, .html or .jsonl documents: searches find nothing", self.folder
            )
        self._by_name = {doc.name: doc for doc in self.documents}
        self._index = _BM25([_tokens(f"{doc.title}\n{doc.text}") for doc in self.documents])
        self._server: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The server's base URL, e.g. ``http://127.0.0.1:51234`` (once started)."""
        if self._server is None:
            raise SearchError("the local search server is not running: call start() or use it in a 'with'")
        host, port = self._server.server_address[:2]
        host = host.decode() if isinstance(host, bytes) else host
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}"

    def document(self, name: str) -> _Doc | None:
        """The document served at ``/pages/<name>``, or None."""
        return self._by_name.get(name)

    def count(self, query: str) -> int:
        """How many documents share at least one word with ``query``."""
        return len(self._index.scores(_tokens(query)))

    def search(self, query: str, k: int = 10) -> list[dict[str, Any]]:
        """The ``k`` best documents for ``query``, as SearxNG result rows.

        Runs in-process (no HTTP), so the server object itself also has the search-backend shape.

        Args:
            query: Words to look for (case-insensitive).
            k: How many results at most.

        Returns:
            Rows ``{"title", "url", "content", "score", "engine"}``, best first (ties: by name); ``url``
            points at this server's ``/pages/`` once it is started, else is ``/pages/<name>``.
        """
        terms = _tokens(query)
        scores = self._index.scores(terms)
        ranked = sorted(scores.items(), key=lambda item: (-item[1], self.documents[item[0]].name))
        ranked = ranked[: max(0, k)]
        base = self.url if self._server is not None else ""
        rows = []
        for index, score in ranked:
            doc = self.documents[index]
            rows.append(
                {
                    "title": doc.title,
                    "url": f"{base}/pages/{quote(doc.name)}",
                    "content": _snippet(doc.text, set(terms)),
                    "score": round(score, 6),
                    "engine": "lmstack-local",
                }
            )
        return rows

    def start(self) -> LocalSearchServer:
        """Listen and serve in a daemon thread (a no-op when already running).

        Returns:
            The server itself.

        Raises:
            SearchError: The address cannot be bound.
        """
        if self._server is not None:
            return self
        try:
            server = _HTTPServer((self.host, self.port), _Handler)
        except OSError as exc:
            raise SearchError(f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}") from exc
        server.engine = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, args=(0.05,), name="lmstack-local-search", daemon=True
        )
        self._thread.start()
        logger.info("local search over %d documents at %s", len(self.documents), self.url)
        return self

    def stop(self) -> None:
        """Stop serving and close the socket (a no-op when not running)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def serve_forever(self) -> None:
        """Serve in the calling thread until interrupted (for the command line)."""
        self.start()
        assert self._thread is not None
        try:
            self._thread.join()
        finally:
            self.stop()

    def __enter__(self) -> LocalSearchServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lmstack.agent.tools._local_search FOLDER [--host H] [--port N]``."""
    parser = argparse.ArgumentParser(
        prog="python -m lmstack.agent.tools._local_search",
        description="Serve a folder of .md/.txt/.html/.jsonl documents as a search engine answering in "
        "SearxNG's JSON (GET /search?q=...&format=json) with the documents at /pages/<name>.",
    )
    parser.add_argument("folder", help="the folder of documents")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8888, help="port (default: 8888; 0 picks a free one)")
    args = parser.parse_args(argv)
    try:
        server = LocalSearchServer(args.folder, host=args.host, port=args.port).start()
    except SearchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"lmstack local search: {len(server.documents)} documents at {server.url} "
        f"(try {server.url}/search?q=hello&format=json)",
        flush=True,
    )
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
