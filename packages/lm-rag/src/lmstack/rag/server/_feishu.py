"""Feishu/Lark: the event subscription callback (v2.0 events) and posting replies with the tenant token.

Feishu wants its callback answered within 3 s, so a message is acknowledged at once and answered in a
background task, which posts the reply through Feishu's open API
(``POST {api_base}/im/v1/messages/{message_id}/reply``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from lmstack.rag._errors import RAGError
from lmstack.rag.server._auth import check_feishu_signature, decrypt_feishu
from lmstack.rag.server._config import RagServerConfig
from lmstack.rag.server._http import APIError

__all__ = ["FeishuClient", "FeishuMessage", "read_event", "strip_mentions"]

logger = logging.getLogger(__name__)

MESSAGE_EVENT = "im.message.receive_v1"
_MENTION = re.compile(r"@_(?:user_\d+|all)\b")
_MESSAGE_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_TOKEN_INVALID = frozenset({99991661, 99991663, 99991664, 99991668})  # Feishu's codes for a bad access token
_TOKEN_MARGIN_S = 300.0  # renew the token this long before Feishu says it expires


def strip_mentions(text: str) -> str:
    """The message text without Feishu's mention placeholders (``@_user_1``, ``@_all``)."""
    return re.sub(r"\s+", " ", _MENTION.sub(" ", text)).strip()


@dataclass(frozen=True)
class FeishuMessage:
    """A text message the bot received.

    Attributes:
        event_id: The event's id (the same on every redelivery).
        message_id: What the reply is posted to.
        chat_type: ``p2p`` or ``group``.
        text: The text, mentions removed.
    """

    event_id: str
    message_id: str
    chat_type: str
    text: str


def _field(data: Any, *keys: str) -> Any:
    for key in keys:
        data = data.get(key) if isinstance(data, Mapping) else None
    return data


def read_event(
    config: RagServerConfig, headers: Mapping[str, str], body: bytes
) -> dict[str, Any] | FeishuMessage | None:
    """Authenticate and read one callback request.

    Returns:
        The response body for a URL verification (``{"challenge": ...}``), the message to answer, or None for
        an event that needs no answer (another event type, a non-text message, a bot's own message).

    Raises:
        APIError: 401 for a bad signature or verification token, 400 for a body that is not a Feishu event.
    """
    key = config.feishu_encrypt_key
    signed = "x-lark-signature" in headers
    if key and signed:
        check_feishu_signature(key, headers, body)
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise APIError(400, "the Feishu event is not JSON", code="invalid_json") from None
    if isinstance(data, Mapping) and "encrypt" in data:
        if not key:
            raise APIError(
                400,
                "this Feishu event is encrypted, but the server has no encrypt key: start it with "
                "--feishu-encrypt-key",
                code="encryption_key_missing",
            )
        data = decrypt_feishu(str(data["encrypt"]), key)
    if not isinstance(data, Mapping):
        raise APIError(400, "the Feishu event is not a JSON object", code="invalid_event")
    expected = config.feishu_verification_token
    if data.get("type") == "url_verification":
        # Feishu does not sign the verification request; the token (or a body that decrypts) vouches for it
        if expected is not None and data.get("token") != expected:
            raise APIError(
                401, "the verification token does not match --feishu-verification-token", code="bad_token"
            )
        return {"challenge": data.get("challenge")}
    if key and not signed:
        check_feishu_signature(key, headers, body)  # raises: events must be signed when a key is set
    header = data.get("header")
    if data.get("schema") != "2.0" or not isinstance(header, Mapping):
        logger.info("ignoring a Feishu event that is not schema 2.0 (subscribe with the v2.0 event format)")
        return None
    if expected is not None and header.get("token") != expected:
        raise APIError(
            401, "the event's verification token does not match --feishu-verification-token", code="bad_token"
        )
    if header.get("event_type") != MESSAGE_EVENT:
        return None
    message = _field(data, "event", "message")
    if _field(data, "event", "sender", "sender_type") not in (None, "user") or not isinstance(
        message, Mapping
    ):
        return None  # never answer a bot, this one included
    if message.get("message_type") != "text":
        return None
    try:
        text = strip_mentions(str(json.loads(message.get("content") or "{}").get("text", "")))
    except (json.JSONDecodeError, AttributeError):
        return None
    message_id = str(message.get("message_id", ""))
    if not text or not _MESSAGE_ID.match(message_id):
        return None
    event_id = str(header.get("event_id") or message_id)
    return FeishuMessage(event_id, message_id, str(message.get("chat_type", "group")), text)


class FeishuClient:
    """Posts replies through Feishu's open API with a tenant access token (cached until it expires).

    Args:
        api_base: Where the open API is (``https://open.feishu.cn/open-apis``).
        app_id: The app id.
        app_secret: The app secret.
        http: The HTTP client to send with.
        clock: Monotonic seconds (tests pass their own).
    """

    def __init__(
        self,
        api_base: str,
        app_id: str,
        app_secret: str,
        http: httpx.AsyncClient,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.api_base = api_base.rstrip("/")
        self._app_id = app_id
        self._app_secret = app_secret
        self._http = http
        self._clock = clock
        self._token: tuple[str, float] | None = None
        self._lock = asyncio.Lock()

    async def _call(self, path: str, payload: Mapping[str, Any], token: str | None = None) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        response = await self._http.post(f"{self.api_base}{path}", json=payload, headers=headers)
        try:
            data = response.json()
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise RAGError(f"Feishu answered {path} with HTTP {response.status_code} and no JSON")
        return data

    async def token(self) -> str:
        """The tenant access token (from the cache while it is valid)."""
        async with self._lock:
            if self._token is not None and self._token[1] > self._clock():
                return self._token[0]
            data = await self._call(
                "/auth/v3/tenant_access_token/internal",
                {"app_id": self._app_id, "app_secret": self._app_secret},
            )
            if data.get("code") != 0 or not data.get("tenant_access_token"):
                raise RAGError(
                    f"Feishu refused the tenant token (code {data.get('code')}): {data.get('msg')}"
                )
            lifetime = float(data.get("expire", 7200))
            self._token = (
                str(data["tenant_access_token"]),
                self._clock() + max(lifetime - _TOKEN_MARGIN_S, lifetime / 2),
            )
            return self._token[0]

    async def reply(self, message_id: str, text: str) -> None:
        """Reply to a message with text (a token Feishu calls invalid is fetched again, once)."""
        payload = {"msg_type": "text", "content": json.dumps({"text": text}, ensure_ascii=False)}
        for attempt in range(2):
            data = await self._call(f"/im/v1/messages/{message_id}/reply", payload, await self.token())
            if data.get("code") == 0:
                return
            if data.get("code") in _TOKEN_INVALID and attempt == 0:
                self._token = None
                continue
            raise RAGError(f"Feishu refused the reply (code {data.get('code')}): {data.get('msg')}")
