"""The request bodies the server accepts, as pydantic models (unknown fields are refused, not ignored)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "EmbeddingsRequest",
    "IngestPathsRequest",
    "QueryRequest",
    "SearchRequest",
    "WebhookMessage",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SearchRequest(_Strict):
    """``POST /search``."""

    query: str = Field(min_length=1)
    k: int = Field(default=5, ge=1, le=200)
    mode: Literal["hybrid", "dense", "bm25"] = "hybrid"
    filters: dict[str, Any] | None = None
    rerank: bool | None = None
    diversity: float | None = Field(default=None, gt=0, le=1)


class _Turn(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str


class QueryRequest(_Strict):
    """``POST /query``."""

    question: str = Field(min_length=1)
    k: int | None = Field(default=None, ge=1, le=50)
    stream: bool = False
    history: list[_Turn] = Field(default_factory=list, max_length=100)


class IngestPathsRequest(_Strict):
    """``POST /ingest`` with JSON: server-side paths under the configured ingest roots."""

    paths: list[str] = Field(min_length=1, max_length=1000)


class EmbeddingsRequest(BaseModel):
    """``POST /v1/embeddings`` (OpenAI's shape; ``input_type`` is an extension: ``query`` or ``document``)."""

    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields such as "user"

    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    encoding_format: str = "float"
    dimensions: int | None = None
    input_type: Literal["query", "document"] = "document"


class WebhookMessage(_Strict):
    """``POST /webhook``: one chat message."""

    text: str = Field(min_length=1, max_length=20_000)
    chat_type: Literal["group", "direct"] = "group"
    user: str | None = None
    chat_id: str | None = None
    message_id: str | None = Field(default=None, min_length=1, max_length=256)
