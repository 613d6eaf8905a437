"""One node's search: rewrite the sub-question into queries, search, select, read, answer with citations.

Every failure short of the model's own is absorbed and reported as an event: a query whose search
fails is recorded and the others go on; a page that cannot be fetched (too large, binary, down) is
skipped and the best result not selected is read in its place; a node whose every search failed, or
that could read no page, answers that it found nothing instead of letting the model answer from
memory. Citations are ``[[n]]`` over the pages the node read, and a citation of anything else is
dropped, so an answer can only cite what was read.

Where the backend takes a ``guided_regex`` (lmstack's engine, ``lmstack serve``, vLLM), an answer is
also generated under :func:`citation_regex`: its first claim must end in a citation of a page that was
read, within a length that fits the token budget, and every later citation must be of a page that was
read too. A backend that rejects the constraint is asked again without it, and not asked with it again.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from lmstack.agent.graph._dag import Node
from lmstack.agent.graph._prompts import ANSWER_SYSTEM, QUERIES_SYSTEM, SELECT_SYSTEM
from lmstack.agent.tools import search_hits

__all__ = [
    "CitationStream",
    "NodeSearcher",
    "SearchSettings",
    "citation_regex",
    "normalize_url",
    "parse_queries",
    "parse_selection",
    "queries_schema",
    "rewrite_citations",
    "selection_schema",
    "strip_citations",
]

logger = logging.getLogger(__name__)

# (messages, response_format=..., cite=...) -> reply text; ``cite`` lists the numbers the reply may cite.
Chat = Callable[..., Awaitable[str]]
Emit = Callable[..., None]  # (event type, **fields)

_NUMS = r"\d+(?:\s*,\s*\d+)*"
# A citation with the blanks before it (dropped with it, so no "fact ." is left behind).
CITATION = re.compile(rf"(?P<ws>[ \t]*)(?:\[\[\s*(?P<a>{_NUMS})\s*\]\]|\[\s*(?P<b>{_NUMS})\s*\])")
# The end of a text that may still grow into a citation: held back while streaming.
_PARTIAL = re.compile(r"[ \t]*(?:\[\[?[\d,\s]*\]?)?\Z")
_JSON_START = re.compile(r"[\[{]")
_LIST_MARK = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)]|query\s*\d*\s*:)\s*", re.IGNORECASE)
MAX_QUERY_CHARS = 300


@dataclass
class SearchSettings:
    """How much one node searches and reads.

    Args:
        queries_per_node: Most search queries per node.
        hits_per_query: Results asked of the backend per query.
        pages_per_node: Most pages read per node.
        page_chars: Most characters of each page shown to the model.
        search_timeout_s: Seconds each search may take (None: the backend's own limits).
        guided: Ask for JSON replies with ``response_format`` (the backend supports it).
        guided_citations: Generate answers under :func:`citation_regex` (only where ``guided``; turned
            off for the rest of a run when the backend rejects the constraint).
    """

    queries_per_node: int = 3
    hits_per_query: int = 5
    pages_per_node: int = 3
    page_chars: int = 4000
    search_timeout_s: float | None = 30.0
    guided: bool = False
    guided_citations: bool = True


@dataclass
class _Candidate:
    url: str
    title: str
    snippet: str


@dataclass
class _Read:
    url: str
    title: str
    text: str


def normalize_url(url: str) -> str:
    """The URL two hits share when they are the same page (no fragment, no trailing slash, lowercase host)."""
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        return url.strip()
    path = parts.path.rstrip("/") or ""
    return urlunsplit((parts.scheme.lower(), parts.netloc.lower(), path, parts.query, ""))


def _one_list(key: str, item: dict[str, Any], most: int) -> dict[str, Any]:
    array = {"type": "array", "items": item, "minItems": 1, "maxItems": most}
    return {"type": "object", "properties": {key: array}, "required": [key], "additionalProperties": False}


def queries_schema(k: int) -> dict[str, Any]:
    """The JSON schema of a query-writing reply: ``{"queries": [1 to k strings]}``."""
    return _one_list("queries", {"type": "string", "minLength": 1, "maxLength": MAX_QUERY_CHARS}, k)


def selection_schema(n: int, k: int) -> dict[str, Any]:
    """The JSON schema of a page-selection reply: ``{"pages": [1 to k numbers in 1..n]}``."""
    return _one_list("pages", {"type": "integer", "minimum": 1, "maximum": n}, k)


def _decode_first_json(text: str) -> Any:
    body = text.strip()
    try:
        return json.loads(body)
    except json.JSONDecodeError:
        pass
    decoder = json.JSONDecoder()
    for match in _JSON_START.finditer(body):
        try:
            return decoder.raw_decode(body, match.start())[0]
        except json.JSONDecodeError:
            continue
    return None


def parse_queries(text: str, k: int) -> list[str]:
    """Search queries from a model's reply: ``{"queries": [...]}``, a JSON list, or one query a line.

    Returns:
        Up to ``k`` distinct non-empty queries (possibly none: the caller falls back to the question).
    """
    value = _decode_first_json(text)
    if isinstance(value, dict):
        value = value.get("queries")
    if isinstance(value, list):
        raw = [v for v in value if isinstance(v, str)]
    else:
        raw = []
        for line in text.splitlines():
            line = _LIST_MARK.sub("", line).strip().strip("\"'`").strip()
            if line and not line.endswith(":") and not line.startswith(("{", "}", "[", "]", "```")):
                raw.append(line)
    queries: dict[str, str] = {}
    for query in raw:
        query = " ".join(query.split())[:MAX_QUERY_CHARS]
        if query:
            queries.setdefault(query.casefold(), query)
    return list(queries.values())[:k]


def parse_selection(text: str, n: int, k: int) -> list[int]:
    """Result numbers (1-based, at most ``n``) from a reply: ``{"pages": [...]}``, a list, or numbers in text.

    Returns:
        Up to ``k`` distinct 0-based indices (possibly none: the caller falls back to the top results).
    """
    value = _decode_first_json(text)
    if isinstance(value, dict):
        value = next((v for v in value.values() if isinstance(v, list)), None)
    if isinstance(value, list):
        numbers = [int(v) for v in value if isinstance(v, (int, str)) and str(v).strip().isdigit()]
    else:
        numbers = [int(v) for v in re.findall(r"\d+", text)]
    picked = dict.fromkeys(i - 1 for i in numbers if 1 <= i <= n)
    return list(picked)[:k]


# Worst-case UTF-8 bytes of one character, and the bytes a citation like "[[12]]" costs beyond its digits.
_MAX_CHAR_BYTES = 4
_CITATION_OVERHEAD = 4  # "[[" and "]]"
_FIRST_CLAIM_MAX_CHARS = 400


def citation_regex(numbers: Iterable[int], max_tokens: int | None) -> str:
    """The regular expression an answer citing only ``numbers`` is generated under.

    The answer opens with a claim of 1 to ``m`` characters ending in a citation ``[[n]]``, then goes
    on freely; square brackets appear only in citations, and every
    citation is of one of ``numbers``. ``m`` is chosen so that the first claim and its citation fit
    in ``max_tokens`` tokens even at 4 bytes a character and one byte a token, so a reply cut at the
    token limit still holds a citation. Everything after the first citation is optional: the answer
    may end at any point there.

    Args:
        numbers: The citable numbers (at least one).
        max_tokens: The reply's token budget (None: unbounded).

    Raises:
        ValueError: ``numbers`` is empty, or the budget is too small for a claim and a citation.
    """
    allowed = sorted({int(n) for n in numbers})
    if not allowed:
        raise ValueError("citation_regex needs at least one citable number")
    cite = r"\[\[(?:" + "|".join(str(n) for n in allowed) + r")\]\]"
    digits = max(len(str(n)) for n in allowed)
    most = _FIRST_CLAIM_MAX_CHARS
    if max_tokens is not None:
        most = min(most, (max_tokens - _CITATION_OVERHEAD - digits) // _MAX_CHAR_BYTES)
    if most < 1:
        raise ValueError(f"max_tokens={max_tokens} leaves no room for a claim and a citation")
    text = r"[^\[\]]"
    return f"{text}{{1,{most}}}{cite}(?:{text}|{cite})*"


def _numbers(match: re.Match[str]) -> list[int]:
    return [int(x) for x in (match.group("a") or match.group("b")).split(",")]


def _replace(match: re.Match[str], mapping: Callable[[int], int | None], brackets: int) -> str:
    kept = dict.fromkeys(m for m in (mapping(n) for n in _numbers(match)) if m is not None)
    if not kept:
        return ""
    return match.group("ws") + "".join(f"{'[' * brackets}{m}{']' * brackets}" for m in kept)


def rewrite_citations(text: str, mapping: Callable[[int], int | None], *, brackets: int = 2) -> str:
    """Renumber the citations in ``text`` (``[[n]]``, ``[[n, m]]`` or ``[n]``), dropping those mapped to None.

    Args:
        text: Text with citations.
        mapping: New number of each cited number, or None to drop it.
        brackets: Write citations as ``[[n]]`` (2) or ``[n]`` (1).
    """
    return CITATION.sub(lambda match: _replace(match, mapping, brackets), text).strip()


def strip_citations(text: str) -> str:
    """``text`` without its citations (for context handed to another prompt)."""
    return CITATION.sub("", text).strip()


class CitationStream:
    """Renumbers citations in text that arrives in pieces: ``[[g]]`` -> ``[m]``, numbered by first use.

    A piece that ends in what may become a citation (``"[["``, ``"[[1"``) is held back until the next
    piece decides it. Citations of numbers not in ``allowed`` are dropped.

    Args:
        allowed: The numbers that may be cited.
    """

    def __init__(self, allowed: Iterable[int]) -> None:
        self.allowed = set(allowed)
        self.order: dict[int, int] = {}  # cited number -> its number in the output
        self._pending = ""

    def _map(self, number: int) -> int | None:
        if number not in self.allowed:
            return None
        return self.order.setdefault(number, len(self.order) + 1)

    def _convert(self, text: str) -> str:
        return CITATION.sub(lambda match: _replace(match, self._map, 1), text)

    def feed(self, piece: str) -> str:
        """Take the next piece; return the text that is now final."""
        text = self._pending + piece
        match = _PARTIAL.search(text)
        cut = match.start() if match else len(text)
        self._pending = text[cut:]
        return self._convert(text[:cut])

    def close(self) -> str:
        """Return whatever is still held back."""
        text, self._pending = self._pending, ""
        return self._convert(text)


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


class NodeSearcher:
    """Answers one node's sub-question by searching.

    Args:
        chat: ``await chat(messages, response_format=...)`` -> the model's reply text.
        search: The search backend (anything :func:`lmstack.agent.tools.search_hits` adapts).
        fetch: ``await fetch(url)`` -> a page with ``url``, ``title`` and ``text`` (a plain function
            returning one is fine too).
        settings: Limits.
        emit: ``emit(type, **fields)`` records an event.
    """

    def __init__(
        self,
        chat: Chat,
        search: Any,
        fetch: Callable[[str], Any],
        settings: SearchSettings,
        emit: Emit,
    ) -> None:
        self.chat = chat
        self.search = search
        self.fetch = fetch
        self.settings = settings
        self.emit = emit

    async def run(self, node: Node, parents: Sequence[Node]) -> None:
        """Search for ``node`` and fill in its queries, pages, answer and citations.

        Raises:
            Exception: Only the model's own failures (the caller marks the node failed).
        """
        context = _context(parents)
        node.queries = await self._queries(node, context)
        self.emit("queries", node=node.name, queries=list(node.queries))
        results = await asyncio.gather(*(self._search(node, q) for q in node.queries))
        errors = [error for _, error in results if error]
        candidates = _merge([hits for hits, _ in results])
        if not candidates:
            if len(errors) == len(node.queries):
                why = f"every search failed ({'; '.join(errors)})"
            else:
                why = "the searches found nothing" + (
                    f" (some failed: {'; '.join(errors)})" if errors else ""
                )
            self._answer_nothing(node, why)
            return
        chosen = await self._select(node, candidates)
        reads = await asyncio.gather(*(self._read(node, c) for c in chosen))
        pages = [r for r in reads if r is not None]
        missing = len(chosen) - len(pages)
        if missing:  # one more round: the best unread candidates stand in for the pages that failed
            spare = [c for c in candidates if c not in chosen][:missing]
            pages += [r for r in await asyncio.gather(*(self._read(node, c) for c in spare)) if r is not None]
        if not pages:
            self._answer_nothing(node, "no page it found could be read")
            return
        node.pages = [{"url": p.url, "title": p.title} for p in pages]
        await self._answer(node, context, pages)

    async def _ask(self, system: str, user: str, schema_name: str, schema: Mapping[str, Any]) -> str:
        options: dict[str, Any] = {}
        if self.settings.guided:
            options["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": schema_name, "schema": dict(schema), "strict": True},
            }
        return await self.chat(
            [{"role": "system", "content": system}, {"role": "user", "content": user}], **options
        )

    async def _queries(self, node: Node, context: str) -> list[str]:
        k = self.settings.queries_per_node
        schema = queries_schema(k)
        reply = await self._ask(
            QUERIES_SYSTEM.format(k=k), f"{context}Question: {node.question}", "queries", schema
        )
        queries = parse_queries(reply, k)
        if not queries:
            logger.debug("node %s: no queries in %r; searching its question", node.name, reply[:200])
        return queries or [node.question]

    async def _search(self, node: Node, query: str) -> tuple[list[Any], str | None]:
        try:
            hits = list(
                await search_hits(
                    self.search, query, self.settings.hits_per_query, timeout_s=self.settings.search_timeout_s
                )
            )
        except Exception as exc:  # SearchError, or a backend bug: recorded, the other queries go on
            error = f"{query!r}: {exc}"
            self.emit("search_results", node=node.name, query=query, hits=[], error=str(exc))
            return [], error
        shown = [
            {"title": str(getattr(h, "title", "") or ""), "url": str(getattr(h, "url", "") or "")}
            for h in hits
        ]
        self.emit("search_results", node=node.name, query=query, hits=shown)
        return hits, None

    async def _select(self, node: Node, candidates: list[_Candidate]) -> list[_Candidate]:
        k = self.settings.pages_per_node
        if len(candidates) <= k:
            return candidates
        listing = "\n".join(
            f"{i}. {c.title or '(no title)'} ({c.url})\n   {c.snippet[:300]}"
            for i, c in enumerate(candidates, 1)
        )
        schema = selection_schema(len(candidates), k)
        reply = await self._ask(
            SELECT_SYSTEM.format(k=k),
            f"Question: {node.question}\n\nSearch results:\n{listing}",
            "selection",
            schema,
        )
        picked = parse_selection(reply, len(candidates), k)
        return [candidates[i] for i in picked] if picked else candidates[:k]

    async def _read(self, node: Node, candidate: _Candidate) -> _Read | None:
        if urlsplit(candidate.url).scheme not in ("http", "https"):
            # A private index's hit (a path, an id) is its own text: nothing to fetch.
            read = _Read(candidate.url, candidate.title, candidate.snippet)
        else:
            try:
                page = await _maybe_await(self.fetch(candidate.url))
            except Exception as exc:  # FetchError (too large, binary, down...), or the fetcher's bug
                self.emit("page_failed", node=node.name, url=candidate.url, error=str(exc))
                return None
            url = str(getattr(page, "url", "") or candidate.url)
            title = str(getattr(page, "title", "") or candidate.title)
            read = _Read(url, title, str(getattr(page, "text", "") or ""))
        self.emit("page_read", node=node.name, url=read.url, title=read.title, chars=len(read.text))
        return read

    def _answer_nothing(self, node: Node, why: str) -> None:
        node.answer = f"No answer found: {why}."
        node.citations = []
        self.emit("node_answer", node=node.name, answer=node.answer, citations=[])

    async def _answer(self, node: Node, context: str, pages: list[_Read]) -> None:
        limit = self.settings.page_chars
        sources = "\n\n".join(
            f"[[{i}]] {p.title} ({p.url})\n{p.text[:limit]}{' ...' if len(p.text) > limit else ''}"
            for i, p in enumerate(pages, 1)
        )
        user = f"{context}Question: {node.question}\n\nSources:\n\n{sources}"
        messages = [{"role": "system", "content": ANSWER_SYSTEM}, {"role": "user", "content": user}]
        reply = await self.chat(messages, cite=range(1, len(pages) + 1))
        cited: list[int] = []

        def keep(n: int) -> int | None:
            if not 1 <= n <= len(pages):
                return None  # not a page this node read
            cited.append(n)
            return n

        node.answer = rewrite_citations(reply, keep)
        node.citations = [
            {"n": n, "url": pages[n - 1].url, "title": pages[n - 1].title} for n in sorted(set(cited))
        ]
        self.emit(
            "node_answer", node=node.name, answer=node.answer, citations=[dict(c) for c in node.citations]
        )


def _context(parents: Sequence[Node]) -> str:
    if not parents:
        return ""
    lines = [
        f"- {p.question}\n  {strip_citations(p.answer) or '(no answer: ' + str(p.error) + ')'}"
        for p in parents
    ]
    return "It builds on these answers:\n" + "\n".join(lines) + "\n\n"


def _merge(results: Sequence[Sequence[Any]]) -> list[_Candidate]:
    """Hits of every query, best first (by rank, then score), one per URL."""
    ranked: list[tuple[int, float, int, Any]] = []
    for hits in results:
        for rank, hit in enumerate(hits):
            score = getattr(hit, "score", None)
            ranked.append((rank, -(score if isinstance(score, (int, float)) else 0.0), len(ranked), hit))
    ranked.sort(key=lambda item: item[:3])
    seen: set[str] = set()
    merged = []
    for *_, hit in ranked:
        url = str(getattr(hit, "url", "") or "").strip()
        key = normalize_url(url)
        if not url or key in seen:
            continue
        seen.add(key)
        merged.append(
            _Candidate(url, str(getattr(hit, "title", "") or ""), str(getattr(hit, "snippet", "") or ""))
        )
    return merged
