"""Embedders: texts to unit vectors, locally (sentence-transformers) or over HTTP, with a vector cache.

* :class:`Embedder`: the protocol (``fingerprint``, ``dim``, ``embed``).
* :class:`SentenceTransformerEmbedder`: a local model; the default is all-MiniLM-L6-v2
  (:func:`default_embedding_model_path`).
* :class:`OpenAIEmbedder`: any OpenAI-compatible ``/v1/embeddings`` server.
* :func:`load_embedder`: one of these from a spec (``None``, a URL, a directory).
* :class:`EmbeddingCache` and :func:`embed_with_cache`: embed only what has not been embedded before.
"""

from __future__ import annotations

from lmstack.rag.embed._cache import EmbeddingCache, embed_with_cache
from lmstack.rag.embed._load import load_embedder
from lmstack.rag.embed._openai import OpenAIEmbedder
from lmstack.rag.embed._protocol import Embedder, default_embedding_model_path
from lmstack.rag.embed._sentence import SentenceTransformerEmbedder

__all__ = [
    "Embedder",
    "EmbeddingCache",
    "OpenAIEmbedder",
    "SentenceTransformerEmbedder",
    "default_embedding_model_path",
    "embed_with_cache",
    "load_embedder",
]
