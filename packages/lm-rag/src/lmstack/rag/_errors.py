"""Errors raised by lmstack-rag; all derive from :class:`lmstack.core.LMStackError`.

Each message says what was wrong (the file, the index directory, the setting) and what to do.
"""

from __future__ import annotations

from pathlib import Path

from lmstack.core import LMStackError

__all__ = [
    "AnswerError",
    "EmbeddingError",
    "GateError",
    "IndexLockedError",
    "RAGConfigError",
    "RAGError",
    "StoreError",
    "UnreadableDocumentError",
]


class RAGError(LMStackError):
    """Base class of lmstack-rag's errors."""


class RAGConfigError(RAGError, ValueError):
    """A setting is invalid (a chunk size below the overlap, an unknown index kind, a bad filter).

    Attributes:
        field: The setting at fault, when one is to blame.
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class UnreadableDocumentError(RAGError):
    """One document could not be read; ingestion skips it and names the reason in its report.

    Attributes:
        path: The file at fault.
        reason: A short reason for the ingest report (``"empty file"``, ``"corrupt PDF: ..."``).
    """

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


class EmbeddingError(RAGError):
    """An embedder could not be loaded or failed to embed (a missing model, a server error, a bad reply)."""


class StoreError(RAGError):
    """An index directory is missing, unreadable, of another format version, or made with another embedder."""


class IndexLockedError(StoreError):
    """Another process is writing to the index; one writer at a time."""


class GateError(RAGError):
    """The relevance gate cannot decide or be calibrated (no calibration, too few labelled questions)."""


class AnswerError(RAGError):
    """The model failed to answer (the engine or the server reported an error for the request)."""
