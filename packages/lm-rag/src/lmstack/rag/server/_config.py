"""The server's settings: API keys, chat-platform secrets and what ``/ingest`` may read."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lmstack.rag._errors import RAGConfigError

__all__ = ["RagServerConfig"]


@dataclass
class RagServerConfig:
    """How ``lmstack rag serve`` authenticates, which chat platforms it answers and what it may ingest.

    Attributes:
        api_keys: Keys accepted as ``Authorization: Bearer KEY`` on ``/search``, ``/query``, ``/ingest`` and
            ``/v1/*``; empty: no authentication (as ``lmstack serve``).
        webhook_secret: The shared secret of the generic ``/webhook`` (HMAC-SHA256 of timestamp and raw body);
            None turns the route off (404).
        feishu_verification_token: The Feishu/Lark app's verification token (checked on every event); with
            neither it nor ``feishu_encrypt_key`` the ``/feishu/events`` route is off (404).
        feishu_encrypt_key: The Feishu/Lark app's encrypt key: requests must carry a valid
            ``X-Lark-Signature``, and encrypted events are decrypted (needs the ``cryptography`` package).
        feishu_api_base: Where replies are posted (the Lark suite: ``https://open.larksuite.com/open-apis``).
        feishu_app_id: The app id, for the tenant access token that replies are posted with.
        feishu_app_secret: The app secret, for the same token.
        ingest_roots: Server-side folders that ``POST /ingest {"paths": [...]}`` may read (symlinks are
            resolved before the check); empty: ingestion by path is refused.
        ingest_enabled: Whether ``/ingest`` is on at all (uploads and paths).
        max_upload_bytes: Largest upload request body, in bytes (larger ones get 413).
        ingest_lock_timeout_s: How long an ingest waits for another process writing the index before it
            answers 409.
        group_chat_silent: Give no reply at all to messages the relevance gate finds unrelated in group chats
            (direct chats get the polite refusal).
        max_embedding_inputs: Most texts one ``/v1/embeddings`` request may embed.
    """

    api_keys: Sequence[str] = ()
    webhook_secret: str | None = None
    feishu_verification_token: str | None = None
    feishu_encrypt_key: str | None = None
    feishu_api_base: str = "https://open.feishu.cn/open-apis"
    feishu_app_id: str | None = None
    feishu_app_secret: str | None = None
    ingest_roots: Sequence[str | Path] = ()
    ingest_enabled: bool = True
    max_upload_bytes: int = 50_000_000
    ingest_lock_timeout_s: float = 10.0
    group_chat_silent: bool = True
    max_embedding_inputs: int = 2048

    def __post_init__(self) -> None:
        self.validate()

    @property
    def feishu_enabled(self) -> bool:
        """Whether the ``/feishu/events`` route is on."""
        return bool(self.feishu_verification_token or self.feishu_encrypt_key)

    @property
    def feishu_can_reply(self) -> bool:
        """Whether the app credentials that posting replies needs are set."""
        return bool(self.feishu_app_id and self.feishu_app_secret)

    def validate(self) -> None:
        """Check every setting.

        Raises:
            RAGConfigError: A setting is invalid; ``field`` names it.
        """
        if isinstance(self.api_keys, str):
            raise RAGConfigError("api_keys is a list of keys, not one string: use [key]", field="api_keys")
        if any(not isinstance(key, str) or not key.strip() for key in self.api_keys):
            raise RAGConfigError("api_keys holds an empty key: remove it", field="api_keys")
        for name in ("webhook_secret", "feishu_verification_token", "feishu_encrypt_key"):
            value = getattr(self, name)
            if value is not None and not value.strip():
                raise RAGConfigError(f"{name} is empty: give the secret, or None to turn it off", field=name)
        if not self.feishu_api_base.startswith(("http://", "https://")):
            raise RAGConfigError(
                f"feishu_api_base must be an http(s) URL, not {self.feishu_api_base!r}",
                field="feishu_api_base",
            )
        if bool(self.feishu_app_id) != bool(self.feishu_app_secret):
            raise RAGConfigError(
                "feishu_app_id and feishu_app_secret go together: give both (replies need the tenant token)",
                field="feishu_app_id" if not self.feishu_app_id else "feishu_app_secret",
            )
        if isinstance(self.ingest_roots, str | Path):
            raise RAGConfigError("ingest_roots is a list of folders: use [folder]", field="ingest_roots")
        for root in self.ingest_roots:
            if not Path(root).is_dir():
                raise RAGConfigError(f"ingest root {root} is not a folder", field="ingest_roots")
        if self.max_upload_bytes < 1:
            raise RAGConfigError(
                f"max_upload_bytes must be positive, not {self.max_upload_bytes}", field="max_upload_bytes"
            )
        if self.ingest_lock_timeout_s < 0:
            raise RAGConfigError(
                f"ingest_lock_timeout_s must be >= 0, not {self.ingest_lock_timeout_s}",
                field="ingest_lock_timeout_s",
            )
        if self.max_embedding_inputs < 1:
            raise RAGConfigError(
                f"max_embedding_inputs must be positive, not {self.max_embedding_inputs}",
                field="max_embedding_inputs",
            )
