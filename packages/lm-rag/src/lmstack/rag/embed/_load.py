"""Pick an embedder from a command-line style spec."""

from __future__ import annotations

from pathlib import Path

from lmstack.rag._errors import RAGConfigError
from lmstack.rag.embed._openai import OpenAIEmbedder
from lmstack.rag.embed._protocol import Embedder
from lmstack.rag.embed._sentence import SentenceTransformerEmbedder

__all__ = ["load_embedder"]


def load_embedder(
    spec: str | Path | None = None, *, model: str | None = None, api_key: str | None = None
) -> Embedder:
    """The embedder a spec names.

    Args:
        spec: None or ``"default"`` for the bundled all-MiniLM-L6-v2; an ``http(s)://`` URL for an
            OpenAI-compatible server (then ``model`` is required); else a local sentence-transformers
            model directory.
        model: The model name on an embedding server.
        api_key: The server's API key.

    Returns:
        The embedder.

    Raises:
        RAGConfigError: A server URL without ``model``.
        EmbeddingError: The model directory is missing or not a model.
    """
    if spec is None or str(spec) == "default":
        return SentenceTransformerEmbedder()
    text = str(spec)
    if text.startswith(("http://", "https://")):
        if not model:
            raise RAGConfigError(
                f"an embedding server needs --embed-model: name the model {text} should embed with",
                field="model",
            )
        return OpenAIEmbedder(text, model, api_key=api_key)
    return SentenceTransformerEmbedder(Path(text).expanduser())
