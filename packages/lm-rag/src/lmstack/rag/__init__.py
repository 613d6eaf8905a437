"""lmstack.rag: a knowledge assistant that answers from your documents and refuses the rest.

* :class:`Index`: ingest folders of Markdown, text, HTML, PDF, DOCX, XLSX/CSV and Python (only what changed
  is read and embedded again), FAISS + SQLite storage with atomic generations and one writer at a time,
  hybrid search (dense + BM25 fused by reciprocal rank; optional cross-encoder reranking, MMR, metadata
  filters), and a relevance gate calibrated on labelled questions that needs no LLM call.
* :class:`Assistant`: answers from numbered passages through the LLM protocol (a local
  :class:`lmstack.infer.LLM` or any OpenAI-compatible server), streamed, with citations mapped to sources.
* ``lmstack rag ingest|search|ask|calibrate|eval|serve``: the same from the command line, and a server with
  ``/query``, ``/ingest``, ``/v1/embeddings`` and group-chat webhooks (generic and Feishu/Lark).
"""

from lmstack.rag._errors import (
    AnswerError,
    EmbeddingError,
    GateError,
    IndexLockedError,
    RAGConfigError,
    RAGError,
    StoreError,
    UnreadableDocumentError,
)
from lmstack.rag._evaluate import GateScores, RagEvaluation, evaluate_index, read_questions
from lmstack.rag._index import Index, IngestReport, Retrieval
from lmstack.rag._types import Chunk, Document, Hit
from lmstack.rag.answer import Answer, AnswerEvent, Assistant, Citation
from lmstack.rag.ingest import ChunkingConfig
from lmstack.rag.store import VectorIndexConfig

__version__ = "0.1.0"

__all__ = [
    "Answer",
    "AnswerError",
    "AnswerEvent",
    "Assistant",
    "Chunk",
    "ChunkingConfig",
    "Citation",
    "Document",
    "EmbeddingError",
    "GateError",
    "GateScores",
    "Hit",
    "Index",
    "IndexLockedError",
    "IngestReport",
    "RAGConfigError",
    "RAGError",
    "RagEvaluation",
    "Retrieval",
    "StoreError",
    "UnreadableDocumentError",
    "VectorIndexConfig",
    "__version__",
    "evaluate_index",
    "read_questions",
]
