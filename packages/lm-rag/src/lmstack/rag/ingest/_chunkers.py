"""chunk_document: the right chunker for each kind of document, and chunk metadata."""

from __future__ import annotations

import bisect
import dataclasses
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from lmstack.rag._types import Chunk, Document
from lmstack.rag.ingest._code import CodeSegment, code_segments, member_segments
from lmstack.rag.ingest._markdown import Heading, Section, parse_sections
from lmstack.rag.ingest._split import ChunkingConfig, split_recursive
from lmstack.rag.ingest._tokens import TokenCounter, default_token_counter

__all__ = ["chunk_document"]

logger = logging.getLogger(__name__)

# Kinds whose text reads as Markdown (the HTML and DOCX readers write headings as # lines).
_MARKDOWN_KINDS = frozenset({"markdown", "html", "docx"})


class _Builder:
    """Turns (start, end) regions of a document into numbered, stripped chunks with their metadata."""

    def __init__(self, doc: Document, config: ChunkingConfig, count: TokenCounter) -> None:
        self.doc, self.config, self.count = doc, config, count
        self.chunks: list[Chunk] = []
        self.base: dict[str, Any] = {"kind": doc.kind}
        if doc.metadata.get("title"):
            self.base["title"] = doc.metadata["title"]
        self.span_starts = [span.start for span in doc.spans]

    def _span_metadata(self, pos: int) -> Mapping[str, Any]:
        # The span holding pos, else the next one (pos in the gap between two pages).
        i = bisect.bisect_right(self.span_starts, pos) - 1
        if i >= 0 and pos < self.doc.spans[i].end:
            return self.doc.spans[i].metadata
        return self.doc.spans[i + 1].metadata if i + 1 < len(self.doc.spans) else {}

    def add(self, start: int, end: int, extra: Mapping[str, Any], prefix: Sequence[Heading] = ()) -> None:
        raw = self.doc.text[start:end]
        body = raw.strip()
        if not body:
            return
        start += len(raw) - len(raw.lstrip())
        end = start + len(body)
        missing = [h.line for h in prefix if not start <= h.start < end]
        text = "\n".join(missing) + "\n\n" + body if missing else body
        metadata = {**self.base, **self._span_metadata(start), **extra}
        self.chunks.append(Chunk(text, self.doc.source, len(self.chunks), start, end, metadata))

    def recursive(
        self, start: int, end: int, extra: Mapping[str, Any], prefix: Sequence[Heading] = (), reserve: int = 0
    ) -> None:
        config = self.config
        if reserve:
            budget = config.chunk_tokens - reserve
            config = dataclasses.replace(
                config,
                chunk_tokens=budget,
                overlap_tokens=min(config.overlap_tokens, budget - 1),
            )
        for a, b in split_recursive(self.doc.text[start:end], config, self.count):
            self.add(start + a, start + b, extra, prefix)


def _markdown_regions(text: str) -> Iterator[tuple[Section, int]]:
    """Sections with the offset their chunks begin at; a heading with no text of its own joins its child."""
    sections = parse_sections(text)
    pending: int | None = None
    for i, section in enumerate(sections):
        start = section.start if pending is None else pending
        child = sections[i + 1] if i + 1 < len(sections) else None
        if (
            section.path
            and not text[section.heading_end : section.end].strip()
            and child is not None
            and child.path[: len(section.path)] == section.path
            and len(child.path) > len(section.path)
        ):
            pending = start
            continue
        pending = None
        yield section, start


def _chunk_markdown(builder: _Builder) -> None:
    config, count, text = builder.config, builder.count, builder.doc.text
    for section, start in _markdown_regions(text):
        path = list(section.path)
        extra = {"headings": [h.title for h in path]}
        reserve = 0
        if config.prepend_headings:
            # The heading lines are part of the chunk's budget; outer ones give way past half of it.
            while path and (reserve := count("\n".join(h.line for h in path))) > config.chunk_tokens // 2:
                path.pop(0)
            reserve = reserve if path else 0
        builder.recursive(start, section.end, extra, path if config.prepend_headings else (), reserve)


def _chunk_python(builder: _Builder) -> bool:
    text, count, limit = builder.doc.text, builder.count, builder.config.chunk_tokens
    try:
        segments = code_segments(text)
    except (SyntaxError, ValueError) as exc:  # ValueError: NUL bytes in the source
        logger.debug("%s does not parse (%s); chunking it as text", builder.doc.source, exc)
        return False

    def emit(segment: CodeSegment) -> None:
        extra = {"symbol": segment.symbol} if segment.symbol else {}
        if count(text[segment.start : segment.end]) <= limit:
            builder.add(segment.start, segment.end, extra)
        elif segment.node is not None:
            for member in member_segments(text, segment):
                emit(member)
        else:
            builder.recursive(segment.start, segment.end, extra)

    for segment in segments:
        emit(segment)
    return True


_DEFAULT_CONFIG = ChunkingConfig()


def chunk_document(
    doc: Document, config: ChunkingConfig = _DEFAULT_CONFIG, count_tokens: TokenCounter | None = None
) -> list[Chunk]:
    """Cuts a document into chunks, with the chunker its kind calls for.

    Markdown (and HTML and DOCX, whose readers write Markdown headings) is cut at its headings, then each
    section with :func:`split_recursive`; a chunk starts with the heading lines it is under and does not
    contain (``prepend_headings``), and its ``start``/``end`` point at its body in the document. Python is
    cut by top-level function and class (a class too large by its methods), falling back to the
    recursive splitter when it does not parse. A spreadsheet is split sheet by sheet. Everything else goes
    to the recursive splitter.

    Args:
        doc: The document.
        config: Sizes and switches.
        count_tokens: The token counter; the default embedder's (:func:`default_token_counter`) when None.

    Returns:
        The chunks, numbered from 0. Each ``text`` is the document's text between ``start`` and ``end``
        (stripped), headings prepended for Markdown; ``metadata`` has ``kind``, ``title`` (when known),
        ``headings`` (Markdown), ``page`` (PDF: the page the chunk starts on), ``sheet`` (XLSX) and
        ``symbol`` (Python). No chunk has more than ``config.chunk_tokens`` tokens.
    """
    count = count_tokens if count_tokens is not None else default_token_counter()
    builder = _Builder(doc, config, count)
    if doc.kind in _MARKDOWN_KINDS and config.markdown_headers:
        _chunk_markdown(builder)
    elif doc.kind == "xlsx" and doc.spans:
        for span in doc.spans:  # a chunk never mixes the rows of two sheets
            builder.recursive(span.start, span.end, {})
    elif not (doc.kind == "python" and config.code_by_symbol and _chunk_python(builder)):
        builder.recursive(0, len(doc.text), {})
    return builder.chunks
