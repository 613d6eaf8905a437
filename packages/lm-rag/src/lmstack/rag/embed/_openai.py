"""Any OpenAI-compatible ``/v1/embeddings`` server as an :class:`~lmstack.rag.embed.Embedder`."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from typing import Any

import httpx
import numpy as np

from lmstack.rag._errors import EmbeddingError
from lmstack.rag.embed._protocol import Closing, normalize_rows

__all__ = ["OpenAIEmbedder"]

logger = logging.getLogger(__name__)

_RETRY_STATUSES = frozenset({408, 409, 429}) | frozenset(range(500, 600)) - {501, 505}
_BACKOFF_BASE_S = 0.25
_BACKOFF_MAX_S = 8.0


def _server_message(response: httpx.Response) -> str:
    """The server's explanation of an error, as OpenAI, vLLM and FastAPI shape it."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str) and err:
            return err
        for key in ("message", "detail"):
            if body.get(key):
                return str(body[key])
    return response.text.strip()[:500] or response.reason_phrase or "no details"


class OpenAIEmbedder(Closing):
    """Embeds through an OpenAI-compatible server (OpenAI, vLLM, TEI, LMDeploy, lmstack serve).

    Sends ``POST {base_url}/embeddings`` with ``input``, ``model``, ``encoding_format="float"`` (and
    ``dimensions`` when set), in batches; retries connection errors, 429 and 5xx with exponential backoff;
    checks the reply and returns unit rows.

    Args:
        base_url: The API root, ending in ``/v1`` (a trailing slash is fine).
        model: The model name the server knows.
        api_key: Sent as ``Authorization: Bearer``; None sends none.
        batch_size: Texts per request.
        dimensions: Ask the server for vectors of this length (models that support it); None takes the
            model's own.
        timeout_s: Seconds per request.
        max_retries: Retries of a failed request before giving up.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        batch_size: int = 64,
        dimensions: int | None = None,
        timeout_s: float = 60.0,
        max_retries: int = 3,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise EmbeddingError(f"base_url must be an http(s) URL ending in /v1, got {base_url!r}")
        if batch_size < 1:
            raise EmbeddingError(f"batch_size must be at least 1, got {batch_size}")
        if dimensions is not None and dimensions < 1:
            raise EmbeddingError(f"dimensions must be positive, got {dimensions}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.batch_size = batch_size
        self.dimensions = dimensions
        self.max_retries = max(0, max_retries)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(timeout=timeout_s, headers=headers)
        self._dim = dimensions

    @property
    def fingerprint(self) -> str:
        """``openai:{base_url}:{model}:{dimensions}``."""
        return f"openai:{self.base_url}:{self.model}:{self.dimensions}"

    @property
    def dim(self) -> int:
        """``dimensions`` if given, else the length the server returns for a probe text (asked once)."""
        if self._dim is None:
            self._dim = int(self._request(["dim"]).shape[1])
        return self._dim

    def embed(self, texts: Sequence[str], *, is_query: bool = False) -> np.ndarray:
        """Embed ``texts`` in batches of ``batch_size``.

        Args:
            texts: The texts, in order.
            is_query: Ignored (OpenAI-style servers embed queries and documents alike).

        Returns:
            A ``(len(texts), dim)`` float32 array of unit rows.

        Raises:
            EmbeddingError: The server failed after the retries, or replied with something unusable.
        """
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        parts = [self._request(texts[i : i + self.batch_size]) for i in range(0, len(texts), self.batch_size)]
        out = np.concatenate(parts, axis=0)
        if self._dim is None:
            self._dim = int(out.shape[1])
        elif out.shape[1] != self._dim:
            raise EmbeddingError(
                f"{self.base_url} returned vectors of length {out.shape[1]}, expected {self._dim}"
            )
        return out

    def _request(self, texts: Sequence[str]) -> np.ndarray:
        payload: dict[str, Any] = {"input": list(texts), "model": self.model, "encoding_format": "float"}
        if self.dimensions is not None:
            payload["dimensions"] = self.dimensions
        response = self._post(payload)
        return self._parse(response, len(texts))

    def _post(self, payload: dict[str, Any]) -> httpx.Response:
        url = f"{self.base_url}/embeddings"
        attempt = 0
        while True:
            failure: str
            try:
                response = self._client.post(url, json=payload)
            except httpx.TransportError as exc:
                failure = f"could not reach {url}: {exc}"
            else:
                if response.is_success:
                    return response
                failure = f"{url} answered {response.status_code}: {_server_message(response)}"
                if response.status_code not in _RETRY_STATUSES:
                    raise EmbeddingError(failure)
            if attempt >= self.max_retries:
                raise EmbeddingError(f"{failure} (after {attempt + 1} attempts)")
            delay = min(_BACKOFF_MAX_S, _BACKOFF_BASE_S * 2**attempt)
            delay = random.uniform(delay / 2, delay)  # jitter keeps many clients from retrying in step
            logger.warning("%s; retrying in %.2fs", failure, delay)
            time.sleep(delay)
            attempt += 1

    def _parse(self, response: httpx.Response, expected: int) -> np.ndarray:
        try:
            body = response.json()
            data = body["data"]
            items = sorted(data, key=lambda item: int(item.get("index", 0)))
            rows = [item["embedding"] for item in items]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise EmbeddingError(
                f"{self.base_url}/embeddings returned an unexpected reply ({exc!r}): {response.text[:200]}"
            ) from exc
        if len(rows) != expected:
            raise EmbeddingError(
                f"{self.base_url}/embeddings returned {len(rows)} embeddings for {expected} inputs"
            )
        lengths = {len(row) if isinstance(row, list) else -1 for row in rows}
        if len(lengths) != 1 or -1 in lengths or 0 in lengths:
            raise EmbeddingError(
                f"{self.base_url}/embeddings returned embeddings that are not float lists of one length "
                f"(lengths {sorted(lengths)}); is encoding_format 'float' supported?"
            )
        try:
            vectors = np.asarray(rows, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise EmbeddingError(f"{self.base_url}/embeddings returned non-numeric embeddings") from exc
        if not np.isfinite(vectors).all():
            raise EmbeddingError(f"{self.base_url}/embeddings returned non-finite values")
        return normalize_rows(vectors)

    def close(self) -> None:
        """Close the HTTP connections."""
        self._client.close()

    def __repr__(self) -> str:
        return f"OpenAIEmbedder({self.base_url!r}, {self.model!r}, dimensions={self.dimensions})"
