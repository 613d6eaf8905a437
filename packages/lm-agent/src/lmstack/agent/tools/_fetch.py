"""Page fetching: httpx with size, time and content-type limits, and HTML to plain text (stdlib parser)."""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import re
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass
from html.parser import HTMLParser
from typing import Any

import httpx

from lmstack.agent._errors import FetchError
from lmstack.agent.tools._tool import Tool

__all__ = ["Page", "fetch_page", "fetch_tool", "html_to_text"]

_USER_AGENT = "Mozilla/5.0 (compatible; lmstack-agent/0.1; +https://github.com/lmstack)"
_ACCEPT = (
    "text/html,application/xhtml+xml,text/plain,text/markdown,"
    "application/json,application/xml;q=0.9,*/*;q=0.5"
)
# Non-text/* types that are still text.
_TEXT_TYPES = {
    "application/json",
    "application/ld+json",
    "application/x-ndjson",
    "application/xml",
    "application/xhtml+xml",
    "application/rss+xml",
    "application/atom+xml",
    "application/javascript",
    "application/x-javascript",
    "application/ecmascript",
    "application/yaml",
    "application/x-yaml",
    "application/toml",
}
_HTML_TYPES = {"text/html", "application/xhtml+xml"}
_SNIFF_BYTES = 8192
_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]+)""", re.IGNORECASE)

# Elements whose content is not the page's text.
_SKIP = {
    "script",
    "style",
    "nav",
    "noscript",
    "template",
    "svg",
    "iframe",
    "object",
    "canvas",
    "select",
    "button",
}
# Elements that break the text into paragraphs (a blank line) or lines.
_PARAGRAPH = {
    "p", "ul", "ol", "dl", "table", "blockquote", "pre", "section", "article", "main", "header", "footer",
    "aside", "figure", "form", "hr", "details", "fieldset", "address",
}  # fmt: skip
_LINE = {"br", "div", "li", "tr", "dt", "dd", "caption", "summary", "figcaption", "thead", "tbody", "tfoot"}
_LINE_BREAK, _PARAGRAPH_BREAK = 1, 2
_HEADINGS = {"h1": 1, "h2": 2, "h3": 3, "h4": 4, "h5": 5, "h6": 6}


@dataclass
class Page:
    """A fetched page as text.

    Attributes:
        url: The final URL (after redirects).
        title: The page's title (``<title>``, else its first heading, else the URL's last part).
        text: Its readable text: headings kept as ``#`` lines, scripts, styles and navigation dropped,
            whitespace collapsed; at most ``max_chars`` characters.
        content_type: The media type the server declared (``text/html``...), without parameters.
        truncated: The page was longer than ``max_bytes`` or its text longer than ``max_chars``.
    """

    url: str
    title: str
    text: str
    content_type: str
    truncated: bool


class _TextExtractor(HTMLParser):
    """Collects text pieces and break markers (1: new line, 2: new paragraph) while parsing."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str | int] = []
        self.title_parts: list[str] = []
        self.first_heading: list[str] = []
        self.skip = 0
        self.pre = 0
        self.in_title = False
        self.heading: str | None = None
        self.seen_heading = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIP:
            self.skip += 1
        elif tag == "title":
            self.in_title = True
        elif tag in _HEADINGS:
            self.heading = tag
            self.parts += [_PARAGRAPH_BREAK, "#" * _HEADINGS[tag] + " "]
        elif tag == "li":
            self.parts += [_LINE_BREAK, "- "]
        elif tag in ("td", "th"):
            self.parts.append(" ")
        elif tag in _PARAGRAPH or tag in _LINE:
            self.pre += tag == "pre"
            self.parts.append(_PARAGRAPH_BREAK if tag in _PARAGRAPH else _LINE_BREAK)

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP:
            self.skip = max(self.skip - 1, 0)
        elif tag == "title":
            self.in_title = False
        elif tag in _HEADINGS:
            self.seen_heading = self.seen_heading or self.heading is not None
            self.heading = None
            self.parts.append(_PARAGRAPH_BREAK)
        elif tag in _PARAGRAPH or tag in _LINE:
            self.pre = max(self.pre - (tag == "pre"), 0)
            self.parts.append(_PARAGRAPH_BREAK if tag in _PARAGRAPH else _LINE_BREAK)

    def handle_data(self, data: str) -> None:
        if self.in_title:
            self.title_parts.append(data)
        elif not self.skip:
            if self.pre:
                # Preformatted text keeps its line breaks.
                for n, line in enumerate(data.split("\n")):
                    self.parts += [_LINE_BREAK, line] if n else [line]
            else:
                self.parts.append(data)
            if self.heading is not None and not self.seen_heading:
                self.first_heading.append(data)

    def text(self) -> str:
        """The pieces joined: whitespace collapsed, each run of breaks as its strongest break."""
        out: list[str] = []
        line: list[str] = []
        pending = 0
        for part in self.parts:
            if isinstance(part, int):
                pending = max(pending, part)
                continue
            if pending and part.strip():
                text = " ".join("".join(line).split())
                if text:
                    out.append(text + "\n" * pending)
                line, pending = [], 0
            line.append(part)
        out.append(" ".join("".join(line).split()))
        return "".join(out).strip()


def html_to_text(html: str) -> tuple[str, str]:
    """An HTML document's title and readable text, with the standard library's parser.

    Args:
        html: The document.

    Returns:
        ``(title, text)``: the ``<title>`` (or the first heading; ``""`` if neither) and the text, with
        headings as Markdown ``#`` lines, list items as ``- `` lines, ``script``/``style``/``nav`` and similar
        dropped, and whitespace collapsed.
    """
    parser = _TextExtractor()
    with contextlib.suppress(AssertionError):  # html.parser gives up on some malformed markup
        parser.feed(html)
        parser.close()
    title = " ".join("".join(parser.title_parts).split()) or " ".join("".join(parser.first_heading).split())
    return title, parser.text()


def _is_text(media_type: str) -> bool | None:
    """Whether a media type is text (None: no type given, so the body decides)."""
    if not media_type:
        return None
    return (
        media_type.startswith("text/")
        or media_type in _TEXT_TYPES
        or media_type.endswith("+json")
        or media_type.endswith("+xml")
    )


def _charset(header_charset: str | None, body: bytes, is_html: bool) -> str | None:
    """The body's encoding: a BOM's, else the header's, else an HTML ``<meta>``'s; None if none is given."""
    for candidate in (_bom(body), header_charset, _meta_charset(body) if is_html else None):
        if candidate:
            try:
                return codecs.lookup(candidate).name
            except LookupError:
                continue
    return None


def _bom(body: bytes) -> str | None:
    if body.startswith(codecs.BOM_UTF8):
        return "utf-8-sig"
    if body.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    return None


def _meta_charset(body: bytes) -> str | None:
    match = _META_CHARSET.search(body[:4096])
    return match.group(1).decode("ascii", "replace") if match else None


def _decode(body: bytes, charset: str | None, truncated: bool) -> str:
    if charset is not None:
        # A cut at max_bytes may split the last character: the incremental decoder drops it quietly.
        return codecs.getincrementaldecoder(charset)("replace").decode(body, final=not truncated)
    try:
        return codecs.getincrementaldecoder("utf-8")("strict").decode(body, final=not truncated)
    except UnicodeDecodeError:
        # Undeclared and not UTF-8: the web's usual legacy encoding.
        return body.decode("windows-1252", "replace")


def _fallback_title(url: str, text: str, media_type: str) -> str:
    if media_type in ("text/markdown", "text/x-markdown") or url.endswith(".md"):
        for line in text.splitlines():
            if line.startswith("# "):
                return line[2:].strip()
    parsed = urllib.parse.urlsplit(url)
    return urllib.parse.unquote(parsed.path.rstrip("/").rsplit("/", 1)[-1]) or parsed.netloc


async def _read(stream: AsyncIterator[bytes], max_bytes: int) -> tuple[bytes, bool]:
    """At most ``max_bytes`` of a body, and whether there was more (the rest is never read)."""
    body = bytearray()
    async for chunk in stream:
        room = max_bytes - len(body)
        if len(chunk) > room:
            body += chunk[:room]
            return bytes(body), True
        body += chunk
    return bytes(body), False


async def _fetch(
    url: str, client: httpx.AsyncClient, max_bytes: int, max_chars: int, timeout_s: float
) -> Page:
    headers = {"User-Agent": _USER_AGENT, "Accept": _ACCEPT}
    async with client.stream(
        "GET", url, headers=headers, follow_redirects=True, timeout=timeout_s
    ) as response:
        final_url = str(response.url)
        if response.status_code >= 400:
            raise FetchError(f"HTTP {response.status_code} {response.reason_phrase} fetching {final_url}")
        media_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
        if _is_text(media_type) is False:
            raise FetchError(
                f"binary content ({media_type}) at {final_url}: only text pages (HTML, plain text, Markdown, "
                "JSON, XML) can be read"
            )
        body, truncated = await _read(response.aiter_bytes(), max_bytes)
        header_charset = response.charset_encoding
    is_html = media_type in _HTML_TYPES or (
        not media_type and body[:1024].lstrip().lower().startswith((b"<!doctype html", b"<html"))
    )
    charset = _charset(header_charset, body, is_html)
    if b"\x00" in body[:_SNIFF_BYTES] and not (charset or "").startswith(("utf-16", "utf-32")):
        raise FetchError(
            f"binary content ({media_type or 'no content-type'}, but the body has NUL bytes) at {final_url}: "
            "only text pages can be read"
        )
    decoded = _decode(body, charset, truncated)
    if is_html:
        title, text = html_to_text(decoded)
    else:
        title, text = "", decoded.strip()
    title = title or _fallback_title(final_url, text, media_type)
    if len(text) > max_chars:
        text, truncated = text[:max_chars], True
    return Page(url=final_url, title=title, text=text, content_type=media_type, truncated=truncated)


async def fetch_page(
    url: str,
    *,
    max_bytes: int = 2_000_000,
    timeout_s: float = 15.0,
    max_chars: int = 20_000,
    client: httpx.AsyncClient | None = None,
) -> Page:
    """Fetch a web page and turn it into text.

    Redirects are followed; only text types are read (HTML, plain text, Markdown, JSON, XML; images, PDF and
    other binary types are refused, and so is a body with NUL bytes whatever its declared type). The body
    is streamed and reading stops at ``max_bytes``, so a huge page costs at most that much. The charset
    comes from the ``Content-Type`` header, a BOM or an HTML ``<meta>``, else UTF-8 (windows-1252 if that
    fails).

    Args:
        url: An ``http://`` or ``https://`` URL.
        max_bytes: Most bytes of the body to read (after decompression).
        timeout_s: Limit for the whole fetch, redirects and body included.
        max_chars: Most characters of text to keep.
        client: An ``httpx.AsyncClient`` to use (default: a new one for this call).

    Returns:
        The :class:`Page`.

    Raises:
        FetchError: Not an http(s) URL, unreachable, an HTTP error status, too slow, too many redirects, or
            binary content; the message says which and names the URL.
    """
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise FetchError(f"cannot fetch {url!r}: only http:// and https:// URLs can be fetched")
    own = client is None
    http = client if client is not None else httpx.AsyncClient(max_redirects=10)
    try:
        return await asyncio.wait_for(_fetch(url, http, max_bytes, max_chars, timeout_s), timeout_s)
    except FetchError:
        raise
    except (asyncio.TimeoutError, httpx.TimeoutException) as exc:
        raise FetchError(f"timed out after {timeout_s:g} s fetching {url}") from exc
    except httpx.TooManyRedirects as exc:
        raise FetchError(f"too many redirects fetching {url}") from exc
    except httpx.ConnectError as exc:
        raise FetchError(f"could not connect to fetch {url}: {exc}") from exc
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise FetchError(f"failed to fetch {url}: {type(exc).__name__}: {exc}") from exc
    finally:
        if own:
            await http.aclose()


def _render_page(page: Page) -> str:
    note = "\n\n[truncated: the page is longer than shown]" if page.truncated else ""
    return f"Title: {page.title}\nURL: {page.url}\n\n{page.text}{note}"


def fetch_tool(**fetch_options: Any) -> Tool:
    """A tool that fetches a page and gives the model its text (see :func:`fetch_page`).

    Args:
        **fetch_options: Passed to :func:`fetch_page` (max_bytes, timeout_s, max_chars, client).

    Returns:
        The tool, named ``fetch_page``, taking ``url: str``; its ``data`` is the :class:`Page`.
    """
    unknown = set(fetch_options) - {"max_bytes", "timeout_s", "max_chars", "client"}
    if unknown:
        raise TypeError(f"fetch_tool got unknown options {sorted(unknown)}")

    async def fetch(url: str) -> Page:
        """Fetch a web page and return its title and readable text.

        Args:
            url: The page's http(s) URL.
        """
        return await fetch_page(url, **fetch_options)

    return Tool(fetch, name="fetch_page", render=_render_page)
