"""OpenAI's ``/v1/embeddings`` and ``/v1/models`` over the index's embedder."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from lmstack.rag.embed import Embedder, OpenAIEmbedder, SentenceTransformerEmbedder
from lmstack.rag.ingest import regex_token_counter
from lmstack.rag.server._http import APIError
from lmstack.rag.server._schemas import EmbeddingsRequest

__all__ = ["EmbeddingService"]


def embedder_name(embedder: Embedder) -> str:
    """The name clients see: the model directory's name, a remote server's model, else the fingerprint."""
    if isinstance(embedder, SentenceTransformerEmbedder):
        return embedder.model_path.name
    if isinstance(embedder, OpenAIEmbedder) and embedder.model:
        return embedder.model
    return embedder.fingerprint


class EmbeddingService:
    """Embeds OpenAI-style requests with one embedder.

    Args:
        embedder: The index's embedder.
        max_inputs: Most texts in one request.
    """

    def __init__(self, embedder: Embedder, max_inputs: int) -> None:
        self.embedder = embedder
        self.max_inputs = max_inputs
        self.name = embedder_name(embedder)
        self.created = int(time.time())
        self._count: Callable[[str], int] = (
            embedder.tokenizer_counter()
            if isinstance(embedder, SentenceTransformerEmbedder)
            else regex_token_counter
        )

    def models(self) -> dict[str, Any]:
        """The ``/v1/models`` listing: the embedder."""
        card = {"id": self.name, "object": "model", "created": self.created, "owned_by": "lmstack"}
        return {"object": "list", "data": [card]}

    def texts(self, request: EmbeddingsRequest) -> list[str]:
        """The request's texts, after checking everything but the embedding itself.

        Raises:
            APIError: 400 for token-id inputs, empty inputs, too many inputs, an unknown encoding format, or
                ``dimensions`` other than the embedder's.
        """
        given: list[Any] = [request.input] if isinstance(request.input, str) else list(request.input)
        texts = [text for text in given if isinstance(text, str)]
        if len(texts) != len(given):
            raise APIError(
                400,
                "token-id inputs are not supported: this server embeds text; send strings",
                param="input",
                code="unsupported_input",
            )
        if not texts:
            raise APIError(400, "input is empty: send a string or a list of strings", param="input")
        if len(texts) > self.max_inputs:
            raise APIError(
                400,
                f"{len(texts)} inputs in one request; the limit is {self.max_inputs}: split it",
                param="input",
                code="too_many_inputs",
            )
        empty = [i for i, text in enumerate(texts) if not text.strip()]
        if empty:
            raise APIError(400, f"input[{empty[0]}] is empty: every input must have text", param="input")
        if request.encoding_format not in ("float", "base64"):
            raise APIError(
                400,
                f"encoding_format {request.encoding_format!r} is not supported: use float or base64",
                param="encoding_format",
            )
        if request.dimensions is not None and request.dimensions != self.embedder.dim:
            raise APIError(
                400,
                f"dimensions={request.dimensions} is not supported: {self.name} gives "
                f"{self.embedder.dim}-dimensional vectors (omit dimensions, or send {self.embedder.dim})",
                param="dimensions",
                code="unsupported_dimensions",
            )
        return texts

    def embed(self, request: EmbeddingsRequest, texts: list[str]) -> dict[str, Any]:
        """Embed ``texts`` (blocking: call from a worker thread) and build the response."""
        vectors = self.embedder.embed(texts, is_query=request.input_type == "query")
        data = []
        for i, vector in enumerate(vectors):
            embedding: list[float] | str
            if request.encoding_format == "base64":
                embedding = base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
            else:
                embedding = [float(x) for x in vector]
            data.append({"object": "embedding", "index": i, "embedding": embedding})
        tokens = sum(self._count(text) for text in texts)
        return {
            "object": "list",
            "data": data,
            "model": self.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
