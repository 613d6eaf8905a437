"""lmstack.rag.ingest: documents found, read and cut into chunks.

:func:`discover` expands files and folders into ``(path, source)`` pairs, :func:`read_document` reads one
file of any format in :data:`SUPPORTED_SUFFIXES` into a :class:`~lmstack.rag.Document` (or says why it
cannot, with :class:`~lmstack.rag.UnreadableDocumentError`), and :func:`chunk_document` cuts it into
:class:`~lmstack.rag.Chunk` objects of at most ``chunk_tokens`` tokens of the embedder's tokenizer:
Markdown by heading, Python by symbol, everything else with the recursive splitter.
"""

from __future__ import annotations

from lmstack.rag.ingest._chunkers import chunk_document
from lmstack.rag.ingest._code import code_symbols
from lmstack.rag.ingest._discover import SUPPORTED_SUFFIXES, discover
from lmstack.rag.ingest._markdown import markdown_sections
from lmstack.rag.ingest._readers import MAX_ROWS, read_document
from lmstack.rag.ingest._split import ChunkingConfig, split_recursive
from lmstack.rag.ingest._tokens import TokenCounter, default_token_counter, regex_token_counter

__all__ = [
    "MAX_ROWS",
    "SUPPORTED_SUFFIXES",
    "ChunkingConfig",
    "TokenCounter",
    "chunk_document",
    "code_symbols",
    "default_token_counter",
    "discover",
    "markdown_sections",
    "read_document",
    "regex_token_counter",
    "split_recursive",
]
