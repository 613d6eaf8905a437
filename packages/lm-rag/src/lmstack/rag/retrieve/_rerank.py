"""Cross-encoder reranking with a local sentence-transformers model."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import RAGConfigError

__all__ = ["CrossEncoderReranker"]

logger = logging.getLogger(__name__)

# Files that decide a cross-encoder's scores; hashed into its fingerprint.
_FINGERPRINT_SUFFIXES = (".json", ".txt", ".safetensors", ".bin", ".model")


class CrossEncoderReranker:
    """Scores (query, text) pairs with a cross-encoder loaded from a local directory.

    Args:
        model_path: A directory holding a sentence-transformers or transformers sequence-classification
            model (config, weights, tokenizer files). Never downloaded.
        batch_size: Pairs scored per forward pass.
        device: A torch device (``"cpu"``, ``"cuda"``); default: the best available.
        max_length: Longest pair in tokens (longer pairs are truncated); default: the model's own.

    Raises:
        RAGConfigError: The directory does not exist or does not hold a loadable cross-encoder.
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        batch_size: int = 32,
        device: str | None = None,
        max_length: int | None = None,
    ) -> None:
        path = Path(model_path)
        if not path.is_dir():
            raise RAGConfigError(
                f"cross-encoder model directory {path} does not exist; pass a local model directory "
                "(models are never downloaded)",
                field="model_path",
            )
        if batch_size < 1:
            raise RAGConfigError(f"batch_size must be at least 1, got {batch_size}", field="batch_size")
        from sentence_transformers import CrossEncoder

        try:
            self._model: Any = CrossEncoder(
                str(path), device=device, max_length=max_length, local_files_only=True
            )
        except (OSError, ValueError) as exc:
            raise RAGConfigError(
                f"{path} does not hold a loadable cross-encoder: {exc}", field="model_path"
            ) from exc
        self.path = path
        self.batch_size = batch_size
        self.max_length = max_length
        self._fingerprint: str | None = None
        logger.debug("cross-encoder loaded from %s", path)

    def score(self, query: str, texts: Sequence[str]) -> np.ndarray:
        """Relevance of each text to the query.

        Args:
            query: The query.
            texts: The candidate texts.

        Returns:
            One float32 score a text, higher = more relevant (the model's activation applied, e.g. a
            sigmoid for one-label models; the first label's score for multi-label models).
        """
        if not texts:
            return np.zeros(0, dtype=np.float32)
        scores = self._model.predict(
            [(query, t) for t in texts],
            batch_size=self.batch_size,
            show_progress_bar=False,
            convert_to_numpy=True,
        )
        return np.asarray(scores, dtype=np.float32).reshape(len(texts), -1)[:, 0]

    @property
    def fingerprint(self) -> str:
        """Identifies the model and settings: changes when any weight, config or tokenizer file changes."""
        if self._fingerprint is None:
            digest = hashlib.sha256(f"max_length={self.max_length}".encode())
            for file in sorted(self.path.rglob("*")):
                if file.is_file() and file.suffix in _FINGERPRINT_SUFFIXES:
                    digest.update(file.relative_to(self.path).as_posix().encode())
                    with file.open("rb") as handle:
                        while block := handle.read(1 << 20):
                            digest.update(block)
            self._fingerprint = f"cross-encoder:{self.path.name}:{digest.hexdigest()[:16]}"
        return self._fingerprint
