"""The values that travel between lmstack-rag's parts: documents, chunks and search hits."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Chunk", "Document", "Hit", "Span", "text_hash"]


def text_hash(text: str) -> str:
    """The SHA-256 of a text's UTF-8 bytes, in hex: the key of the embedding cache."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Span:
    """A stretch of a document's text with metadata of its own (a PDF page, a spreadsheet sheet).

    Attributes:
        start: Offset of the first character in :attr:`Document.text`.
        end: Offset one past the last character.
        metadata: What this stretch is, e.g. ``{"page": 3}`` (1-based) or ``{"sheet": "Q3"}``.
    """

    start: int
    end: int
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Document:
    """One file after reading: its text and where it came from.

    Attributes:
        source: The name the index knows it by: the path relative to the ingest root, POSIX separators
            (an absolute path when no root applies).
        text: The extracted text (Markdown for .md, plain text for HTML/PDF/DOCX, rows as
            ``header: value`` lines for XLSX/CSV, the source for Python).
        kind: ``markdown``, ``text``, ``html``, ``pdf``, ``docx``, ``xlsx``, ``csv`` or ``python``.
        content_hash: SHA-256 of the file's bytes, in hex: what incremental ingest compares.
        metadata: Document-level metadata (``title`` when the format has one, ``size`` in bytes).
        spans: Stretches with their own metadata (PDF pages, sheets); empty when the format has none.
    """

    source: str
    text: str
    kind: str
    content_hash: str
    metadata: Mapping[str, Any] = field(default_factory=dict)
    spans: tuple[Span, ...] = ()


@dataclass(frozen=True)
class Chunk:
    """A piece of a document, the unit that is embedded, indexed and retrieved.

    Attributes:
        text: The chunk's text, as embedded and shown to the LLM.
        source: The document's :attr:`Document.source`.
        ordinal: Position of the chunk within its document, from 0.
        start: Offset of the chunk's first character in the document's text.
        end: Offset one past its last character.
        metadata: ``headings`` (the Markdown header path, outermost first), ``page`` (PDF, 1-based),
            ``sheet``, ``symbol`` (the function or class of a code chunk), ``kind`` and ``title`` of the
            document; only the keys that apply.
    """

    text: str
    source: str
    ordinal: int
    start: int
    end: int
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @property
    def hash(self) -> str:
        """SHA-256 of the text: chunks with the same text share one cached embedding."""
        return text_hash(self.text)


@dataclass(frozen=True)
class Hit:
    """One search result (the search-backend shape agents accept: text, source, score, metadata).

    Attributes:
        text: The chunk's text.
        source: The document it came from.
        score: The retriever's score; higher is better. Fused scores are reciprocal-rank sums, so
            compare scores only within one result list.
        metadata: The chunk's metadata plus ``chunk_id``, ``start``, ``end``, and the ranks and scores
            of each retriever that found it (``dense_rank``, ``dense_score``, ``bm25_rank``, ``bm25_score``,
            ``rerank_score``), where they apply.
    """

    text: str
    source: str
    score: float
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @property
    def chunk_id(self) -> int:
        """The chunk's stable id in the index."""
        return int(self.metadata["chunk_id"])
