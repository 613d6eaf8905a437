"""Web search: SearxNG's JSON API, any JSON search API, and any object with the search-backend shape."""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import os
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from lmstack.agent._errors import SearchError
from lmstack.agent.tools._tool import Tool

__all__ = ["JSONSearch", "SearchHit", "SearxNGSearch", "search_hits", "web_search_tool"]

logger = logging.getLogger(__name__)

_USER_AGENT = "lmstack-agent (+https://github.com/lmstack)"
# Where hits of various shapes keep each field, in order of preference. ``source`` and ``text`` are the
# search-backend shape's names (lmstack-rag's hits); the others are common web search APIs'.
_TITLE_KEYS = ("title", "name")
_URL_KEYS = ("url", "link", "href", "source")
_SNIPPET_KEYS = ("snippet", "content", "text", "body", "description", "summary")
_SCORE_KEYS = ("score", "relevance")
_RETRY_DELAY_S = 0.1
_SNIPPET_CHARS = 400


@dataclass
class SearchHit:
    """One search result.

    Attributes:
        title: The page's (or document's) title.
        url: Where it is: a URL, or a path for a local index.
        snippet: The matching text shown for it.
        score: The backend's relevance score (higher is better), when it gives one.
        metadata: Anything else the backend said about it (``engine``, ``chunk_id``...).
    """

    title: str
    url: str
    snippet: str
    score: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


class _RetryableError(SearchError):
    """A failure worth one more try: the connection failed or the server answered 5xx."""


def _final(error: SearchError) -> SearchError:
    """The error to raise once retries are spent: a plain SearchError (the retry marker is internal)."""
    final = SearchError(str(error))
    final.__cause__ = error.__cause__
    return final


def _dig(value: Any, path: str) -> Any:
    """``value`` at a dotted path of keys, attributes or list indices (``""`` is ``value`` itself)."""
    for part in path.split(".") if path else ():
        if isinstance(value, Mapping):
            value = value.get(part)
        elif isinstance(value, Sequence) and not isinstance(value, str) and part.isdigit():
            value = value[int(part)] if int(part) < len(value) else None
        else:
            value = getattr(value, part, None)
        if value is None:
            return None
    return value


def _first(item: Any, keys: Sequence[str]) -> Any:
    for key in keys:
        value = _dig(item, key)
        if value not in (None, "") and not callable(value):
            return value
    return None


def _to_hit(
    item: Any,
    *,
    title_keys: Sequence[str] = _TITLE_KEYS,
    url_keys: Sequence[str] = _URL_KEYS,
    snippet_keys: Sequence[str] = _SNIPPET_KEYS,
    score_keys: Sequence[str] = _SCORE_KEYS,
) -> SearchHit | None:
    """A hit of any shape (dict or object) as a :class:`SearchHit`; None when it has neither URL nor text."""
    if isinstance(item, SearchHit):
        return item
    url = _first(item, url_keys)
    snippet = _first(item, snippet_keys)
    if url is None and snippet is None:
        return None
    meta = _dig(item, "metadata")
    metadata: dict[str, Any] = dict(meta) if isinstance(meta, Mapping) else {}
    if isinstance(item, Mapping):
        used = {*title_keys, *url_keys, *snippet_keys, *score_keys, "metadata"}
        metadata.update({key: value for key, value in item.items() if key not in used})
    title = _first(item, title_keys) or metadata.get("title")
    if not title and url is not None:
        # A local document: its file name is the best title there is.
        title = os.path.basename(str(url).rstrip("/")) or str(url)
    score = _first(item, score_keys)
    try:
        score = float(score) if score is not None else None
    except (TypeError, ValueError):
        score = None
    return SearchHit(
        title=str(title or ""),
        url=str(url or ""),
        snippet=str(snippet or ""),
        score=score,
        metadata=metadata,
    )


def _hits_from(raw: Any, backend: str, k: int) -> list[SearchHit]:
    if isinstance(raw, Mapping) and "results" in raw:
        raw = raw["results"]  # a raw SearxNG-style answer
    if isinstance(raw, (str, bytes, Mapping)) or not isinstance(raw, (Sequence, list, tuple)):
        raise SearchError(
            f"search backend {backend} returned {type(raw).__name__}, not a list of hits; a backend's "
            "search(query, k) must return a list of hits (objects or dicts with url/source and text/snippet)"
        )
    hits = [hit for hit in map(_to_hit, raw) if hit is not None]
    if raw and not hits:
        raise SearchError(
            f"search backend {backend} returned {len(raw)} hits with neither a URL (url, link, source) nor "
            f"text (snippet, content, text); first: {str(raw[0])[:200]}"
        )
    return hits[: max(k, 0)]


class JSONSearch:
    """Any JSON search API over HTTP, configured by where the query goes and where the results are.

    Example: ``JSONSearch("https://api.example.com/search", query_param="q", k_param="limit",
    results_path="data.items", url_field="link")``, or a URL template such as
    ``"https://example.com/api?query={query}&n={k}"``.

    Args:
        url: The endpoint, or a template with ``{query}`` (and optionally ``{k}``), URL-quoted in place.
        query_param: The query's parameter name (unless the URL is a template).
        k_param: The parameter that sets how many results come back, if the API has one.
        params: Fixed parameters sent with every request (an API key, ``format=json``...).
        headers: Extra HTTP headers.
        method: ``GET`` (parameters in the URL) or ``POST`` (parameters as a JSON body).
        results_path: Dotted path to the list of results in the answer (``""``: the answer is the list).
        title_field: The result's title field (dotted path); common names are tried after it.
        url_field: The result's URL field.
        snippet_field: The result's text field.
        score_field: The result's score field.
        timeout_s: Seconds to wait for an answer.
        retries: Extra tries after a connection error or a 5xx answer (not after a timeout).
    """

    def __init__(
        self,
        url: str,
        *,
        query_param: str = "q",
        k_param: str | None = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        method: str = "GET",
        results_path: str = "results",
        title_field: str = "title",
        url_field: str = "url",
        snippet_field: str = "snippet",
        score_field: str = "score",
        timeout_s: float = 10.0,
        retries: int = 1,
    ) -> None:
        if method.upper() not in ("GET", "POST"):
            raise ValueError(f"method must be GET or POST, got {method!r}")
        self.url = url
        self.query_param = query_param
        self.k_param = k_param
        self.params = dict(params or {})
        self.headers = {"User-Agent": _USER_AGENT, "Accept": "application/json", **dict(headers or {})}
        self.method = method.upper()
        self.results_path = results_path
        self._keys = {
            "title_keys": (title_field, *_TITLE_KEYS),
            "url_keys": (url_field, *_URL_KEYS),
            "snippet_keys": (snippet_field, *_SNIPPET_KEYS),
            "score_keys": (score_field, *_SCORE_KEYS),
        }
        self.timeout_s = timeout_s
        self.retries = retries

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    def _request(self, query: str, k: int) -> tuple[str, dict[str, Any]]:
        params = dict(self.params)
        if "{query}" in self.url:
            url = self.url.replace("{query}", urllib.parse.quote_plus(query)).replace("{k}", str(k))
        else:
            url = self.url
            params[self.query_param] = query
        if self.k_param:
            params[self.k_param] = k
        return url, params

    async def _send(self, client: httpx.AsyncClient, url: str, params: dict[str, Any]) -> httpx.Response:
        if self.method == "POST":
            return await client.post(url, json=params)
        # Merged, not passed as params=: httpx would drop a template URL's own query string.
        return await client.get(httpx.URL(url).copy_merge_params(params))

    def _hint(self, status: int) -> str:
        return ""

    def _parse(self, url: str, response: httpx.Response, k: int) -> list[SearchHit]:
        """The hits of an answer; a SearchError saying what is wrong with it otherwise."""
        if response.status_code >= 400:
            error = _RetryableError if response.status_code >= 500 else SearchError
            status = response.status_code
            raise error(
                f"search backend at {url} answered HTTP {status}{self._hint(status)}: {response.text[:200]!r}"
            )
        try:
            payload = response.json()
        except ValueError as exc:
            raise SearchError(
                f"search backend at {url} did not answer JSON (content-type "
                f"{response.headers.get('content-type', 'none')!r}, body starts {response.text[:80]!r}); "
                "is this the search API's URL, with its JSON output enabled?"
            ) from exc
        results = _dig(payload, self.results_path)
        if not isinstance(results, list):
            keys = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
            raise SearchError(
                f"search backend at {url} answered JSON without a list at {self.results_path!r} "
                f"(top level: {keys}); set results_path to where the results are"
            )
        if not results:
            logger.info("search backend at %s found nothing (answer: %s)", url, str(payload)[:200])
        hits = [hit for hit in (_to_hit(item, **self._keys) for item in results) if hit is not None]
        if results and not hits:
            raise SearchError(
                f"search backend at {url}: no result has a URL or text field; first result: "
                f"{str(results[0])[:200]}; set url_field / snippet_field"
            )
        return hits[: max(k, 0)]

    def _failure(self, url: str, exc: Exception) -> SearchError:
        if isinstance(exc, SearchError):
            return exc
        if isinstance(exc, httpx.TimeoutException):
            return SearchError(
                f"search backend at {url} did not answer within {self.timeout_s:g} s; it is slow or stuck "
                "(try again later or raise timeout_s)"
            )
        if isinstance(exc, (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError)):
            return _RetryableError(
                f"search backend at {url} is unreachable ({type(exc).__name__}: {exc}); check that it is "
                "running and that the URL is right"
            )
        return SearchError(f"search backend at {url} failed: {type(exc).__name__}: {exc}")

    def search(self, query: str, k: int = 10) -> list[SearchHit]:
        """Search, blocking: :meth:`asearch` (same arguments, hits and errors) on a private event loop."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.asearch(query, k))
        # Called from inside a running loop (a notebook, a sync callback): a loop of its own in a thread.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, self.asearch(query, k)).result()

    async def asearch(self, query: str, k: int = 10) -> list[SearchHit]:
        """Search without blocking the event loop, retrying after a connection error or a 5xx answer.

        Args:
            query: What to search for.
            k: The most hits to return.

        Returns:
            The hits, best first.

        Raises:
            SearchError: The backend is down, too slow, or answered something that is not search results.
        """
        url, params = self._request(query, k)
        async with httpx.AsyncClient(
            timeout=self.timeout_s, headers=self.headers, follow_redirects=True
        ) as client:
            for attempt in range(self.retries + 1):
                try:
                    return self._parse(url, await self._send(client, url, params), k)
                except (httpx.HTTPError, SearchError) as exc:
                    error = self._failure(url, exc)
                if not isinstance(error, _RetryableError):
                    raise error
                if attempt == self.retries:
                    raise _final(error)
                await asyncio.sleep(_RETRY_DELAY_S)
        raise AssertionError("unreachable")


class SearxNGSearch(JSONSearch):
    """A SearxNG instance's JSON API: ``GET {base_url}/search?q=...&format=json``.

    The instance must allow the JSON format (``search: formats: [html, json]`` in its settings.yml);
    otherwise it answers 403.

    Args:
        base_url: The instance's URL, e.g. ``http://localhost:8888``.
        timeout_s: Seconds to wait for an answer.
        engines: Engines to ask (default: the instance's).
        categories: Categories to search (``general``, ``news``...).
        language: A language code such as ``en``.
        safesearch: 0, 1 or 2.
        time_range: ``day``, ``month`` or ``year``.
        headers: Extra HTTP headers.
        retries: Extra tries after a connection error or a 5xx answer.
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float = 10.0,
        engines: Sequence[str] | None = None,
        categories: Sequence[str] | None = None,
        language: str | None = None,
        safesearch: int | None = None,
        time_range: str | None = None,
        headers: Mapping[str, str] | None = None,
        retries: int = 1,
    ) -> None:
        params: dict[str, Any] = {"format": "json"}
        if engines:
            params["engines"] = ",".join(engines)
        if categories:
            params["categories"] = ",".join(categories)
        if language:
            params["language"] = language
        if safesearch is not None:
            params["safesearch"] = safesearch
        if time_range:
            params["time_range"] = time_range
        super().__init__(
            base_url.rstrip("/") + "/search",
            params=params,
            headers=headers,
            results_path="results",
            snippet_field="content",
            timeout_s=timeout_s,
            retries=retries,
        )
        self.base_url = base_url.rstrip("/")

    def _hint(self, status: int) -> str:
        if status == 403:
            return " (SearxNG refuses format=json unless settings.yml lists json under search: formats)"
        return ""


def _backend_name(backend: Any) -> str:
    text = repr(backend)
    return text if len(text) <= 80 else type(backend).__name__


async def _call_backend(backend: Any, query: str, k: int) -> Any:
    asearch = getattr(backend, "asearch", None)
    if asearch is not None and inspect.iscoroutinefunction(asearch):
        return await asearch(query, k)
    search = getattr(backend, "search", None)
    if search is None and callable(backend):
        search = backend  # a plain function is a backend too
    if search is None or not callable(search):
        raise SearchError(
            f"{_backend_name(backend)} is not a search backend: it needs a method search(query, k) "
            "(or asearch) returning hits"
        )
    if inspect.iscoroutinefunction(search):
        result = await search(query, k)
    else:
        result = await asyncio.to_thread(search, query, k)
    if inspect.isawaitable(result):
        result = await result
    return result


async def search_hits(backend: Any, query: str, k: int, *, timeout_s: float | None = None) -> list[SearchHit]:
    """Search any backend and get :class:`SearchHit` objects back.

    A backend is anything with ``search(query, k)`` (sync or async) or ``asearch(query, k)``, or a plain
    function ``(query, k) -> hits``. Hits may be objects or dicts in the search-backend shape (``text``,
    ``source``, ``score``, ``metadata``: lmstack-rag's ``Index`` returns these) or a web shape (``title``,
    ``url``, ``snippet`` or ``content``); a SearxNG-style ``{"results": [...]}`` answer works too. A
    blocking ``search`` runs in a worker thread.

    Args:
        backend: The search backend.
        query: What to search for.
        k: The most hits to return.
        timeout_s: Seconds to wait for the backend (None: its own limits only).

    Returns:
        At most ``k`` hits, in the backend's order.

    Raises:
        SearchError: The backend failed, was too slow, is not a backend, or returned something that is not
            hits; the message names the backend and says what to check.
    """
    name = _backend_name(backend)
    try:
        call = _call_backend(backend, query, k)
        raw = await (asyncio.wait_for(call, timeout_s) if timeout_s is not None else call)
    except SearchError:
        raise
    except asyncio.TimeoutError as exc:
        raise SearchError(f"search backend {name} did not answer within {timeout_s:g} s") from exc
    except Exception as exc:
        raise SearchError(f"search backend {name} failed for {query!r}: {type(exc).__name__}: {exc}") from exc
    return _hits_from(raw, name, k)


def _format_hits(hits: list[SearchHit]) -> str:
    if not hits:
        return "No results. Try other words or a broader query."
    blocks = []
    for n, hit in enumerate(hits, 1):
        snippet = " ".join(hit.snippet.split())
        if len(snippet) > _SNIPPET_CHARS:
            snippet = snippet[: _SNIPPET_CHARS - 3] + "..."
        blocks.append(f"[{n}] {hit.title}\nURL: {hit.url}\n{snippet}")
    return "\n\n".join(blocks)


def web_search_tool(backend: Any, *, k: int = 5, timeout_s: float | None = None) -> Tool:
    """A tool that searches ``backend`` (see :func:`search_hits`) and lists the hits for the model.

    Args:
        backend: Any search backend: :class:`SearxNGSearch`, :class:`JSONSearch`, an lmstack-rag ``Index``,
            any object with ``search(query, k)``.
        k: Hits per search.
        timeout_s: Seconds a search may take (None: the backend's own limits).

    Returns:
        The tool, named ``web_search``, taking ``query: str``; its result lists ``[n] title``, the URL and
        the snippet of each hit, and its ``data`` is the list of :class:`SearchHit`.
    """

    async def web_search(query: str) -> list[SearchHit]:
        """Search the web and return the top results (title, URL, snippet).

        Args:
            query: What to search for: keywords or a short question.
        """
        return await search_hits(backend, query, k, timeout_s=timeout_s)

    return Tool(web_search, name="web_search", render=_format_hits)
