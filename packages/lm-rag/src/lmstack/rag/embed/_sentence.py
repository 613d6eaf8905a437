"""A local sentence-transformers model as an :class:`~lmstack.rag.embed.Embedder`."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lmstack.rag._errors import EmbeddingError
from lmstack.rag.embed._protocol import default_embedding_model_path, normalize_rows

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

__all__ = ["SentenceTransformerEmbedder", "model_fingerprint"]

logger = logging.getLogger(__name__)

# The files that define what a sentence-transformers model computes; the weights enter by size only
# (hashing hundreds of MB at every start would be slow, and a different model has a different config).
_CONFIG_FILES = (
    "config.json",
    "modules.json",
    "tokenizer.json",
    "sentence_bert_config.json",
    "1_Pooling/config.json",
)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".onnx")
_PROGRESS_ABOVE = 1000


def model_fingerprint(path: Path) -> str:
    """``st:`` + a hash of a model directory's config files and weight file sizes.

    Two copies of the same model give the same fingerprint; a different model (or a changed tokenizer or
    pooling) gives another.
    """
    digest = hashlib.sha256()
    for name in _CONFIG_FILES:
        file = path / name
        digest.update(name.encode())
        digest.update(file.read_bytes() if file.is_file() else b"<absent>")
    for file in sorted(path.rglob("*")):
        if file.is_file() and file.suffix in _WEIGHT_SUFFIXES:
            digest.update(f"{file.relative_to(path).as_posix()}={file.stat().st_size}".encode())
    return "st:" + digest.hexdigest()[:32]


class SentenceTransformerEmbedder:
    """Embeds with a local sentence-transformers model; never reaches the network.

    The model directory is checked and fingerprinted at construction; the model itself loads on first
    use (importing torch and reading the weights takes seconds).

    Args:
        model_path: A sentence-transformers model directory; None for the default model
            (:func:`default_embedding_model_path`).
        batch_size: Texts per forward pass.
        device: Torch device; None picks ``cuda`` when available, else ``cpu``.
        query_prefix: Prepended to queries (``embed(..., is_query=True)``), e.g. ``"query: "`` for E5.
        document_prefix: Prepended to documents, e.g. ``"passage: "``.
        use_tqdm: Show a progress bar; None shows one for more than 1000 texts.

    Raises:
        EmbeddingError: ``model_path`` is not a model directory.
    """

    def __init__(
        self,
        model_path: str | Path | None = None,
        *,
        batch_size: int = 32,
        device: str | None = None,
        query_prefix: str = "",
        document_prefix: str = "",
        use_tqdm: bool | None = None,
    ) -> None:
        path = default_embedding_model_path() if model_path is None else Path(model_path)
        if not path.is_dir() or not ((path / "modules.json").is_file() or (path / "config.json").is_file()):
            raise EmbeddingError(
                f"no sentence-transformers model at {path}: give a model directory (with modules.json "
                "or config.json), or omit the path for the default model"
            )
        if batch_size < 1:
            raise EmbeddingError(f"batch_size must be at least 1, got {batch_size}")
        self.model_path = path
        self.batch_size = batch_size
        self.device = device
        self.query_prefix = query_prefix
        self.document_prefix = document_prefix
        self.use_tqdm = use_tqdm
        base = model_fingerprint(path)
        # Prefixes change the vectors, so they are part of the identity.
        if query_prefix or document_prefix:
            extra = hashlib.sha256(f"{query_prefix}\0{document_prefix}".encode()).hexdigest()[:8]
            base = f"{base}:{extra}"
        self._fingerprint = base
        self._model: SentenceTransformer | None = None
        self._load_lock = threading.Lock()

    @property
    def model(self) -> SentenceTransformer:
        """The loaded sentence-transformers model (loaded on first access).

        Raises:
            EmbeddingError: The model could not be loaded.
        """
        if self._model is None:
            with self._load_lock:
                if self._model is None:
                    self._model = self._load()
        return self._model

    def _load(self) -> SentenceTransformer:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            import torch
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:  # pragma: no cover - a dependency of lmstack-rag
            raise EmbeddingError(
                "sentence-transformers is not installed: pip install sentence-transformers"
            ) from exc
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        logger.debug("loading embedding model %s on %s", self.model_path, device)
        try:
            return SentenceTransformer(str(self.model_path), device=device, local_files_only=True)
        except Exception as exc:
            raise EmbeddingError(f"could not load the embedding model at {self.model_path}: {exc}") from exc

    @property
    def fingerprint(self) -> str:
        """``st:`` + a hash of the model's config files and weight sizes (+ the prefixes, when set)."""
        return self._fingerprint

    @property
    def dim(self) -> int:
        """The model's embedding dimension."""
        model: Any = self.model
        getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        dim = getter()
        if dim is None:
            raise EmbeddingError(f"the model at {self.model_path} does not report its embedding dimension")
        return int(dim)

    @property
    def max_tokens(self) -> int:
        """The longest input in tokens the model reads (``max_seq_length``); longer texts are cut."""
        return int(self.model.max_seq_length or 0)

    def tokenizer_counter(self) -> Callable[[str], int]:
        """A function that counts a text's tokens with the model's tokenizer, without special tokens."""
        tokenizer = self.model.tokenizer

        def count(text: str) -> int:
            return len(tokenizer(text, add_special_tokens=False, truncation=False)["input_ids"])

        return count

    def embed(self, texts: Sequence[str], *, is_query: bool = False) -> np.ndarray:
        """Embed ``texts`` in batches.

        Args:
            texts: The texts, in order.
            is_query: Use the query prefix instead of the document prefix.

        Returns:
            A ``(len(texts), dim)`` float32 array of unit rows.

        Raises:
            EmbeddingError: The model failed.
        """
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        prefix = self.query_prefix if is_query else self.document_prefix
        inputs = [prefix + t for t in texts] if prefix else list(texts)
        progress = self.use_tqdm if self.use_tqdm is not None else len(inputs) > _PROGRESS_ABOVE
        try:
            vectors = self.model.encode(
                inputs,
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=progress,
            )
        except Exception as exc:
            raise EmbeddingError(f"the embedding model at {self.model_path} failed: {exc}") from exc
        return normalize_rows(np.asarray(vectors, dtype=np.float32))

    def __repr__(self) -> str:
        return f"SentenceTransformerEmbedder({str(self.model_path)!r}, fingerprint={self._fingerprint!r})"
