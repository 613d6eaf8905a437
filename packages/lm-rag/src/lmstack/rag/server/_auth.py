"""Who may call: API keys, the generic webhook's HMAC signature, Feishu's signature and event decryption.

Every check compares in constant time and runs before anything else is done with the request.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

from lmstack.rag.server._http import APIError

__all__ = [
    "MAX_SKEW_S",
    "check_api_key",
    "check_feishu_signature",
    "check_webhook_signature",
    "decrypt_feishu",
    "feishu_signature",
    "webhook_signature",
]

MAX_SKEW_S = 300
"""Most seconds a signed webhook request's timestamp may differ from the server's clock."""


def check_api_key(authorization: str | None, keys: Sequence[str]) -> None:
    """Accept the request when no keys are configured or it carries one as ``Authorization: Bearer KEY``.

    Raises:
        APIError: 401 when the key is missing or wrong.
    """
    if not keys:
        return
    challenge = {"WWW-Authenticate": "Bearer"}
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise APIError(
            401,
            "missing API key: send 'Authorization: Bearer KEY'",
            code="missing_api_key",
            headers=challenge,
        )
    given = token.strip().encode()
    # check every key, so the time taken does not tell which one nearly matched
    matched = [hmac.compare_digest(given, key.encode()) for key in keys]
    if not any(matched):
        raise APIError(401, "invalid API key", code="invalid_api_key", headers=challenge)


def webhook_signature(secret: str, timestamp: str, body: bytes) -> str:
    """The generic webhook's signature header value: ``sha256=`` + hex HMAC-SHA256 of ``timestamp.body``."""
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def check_webhook_signature(
    secret: str, timestamp: str | None, signature: str | None, body: bytes, *, now: float | None = None
) -> None:
    """Check ``X-Lmstack-Timestamp`` and ``X-Lmstack-Signature`` of a generic webhook request.

    Raises:
        APIError: 401 when a header is missing, the timestamp is more than :data:`MAX_SKEW_S` seconds off, or
            the signature does not match.
    """
    if not timestamp or not signature:
        raise APIError(
            401,
            "unsigned request: send X-Lmstack-Timestamp and X-Lmstack-Signature headers",
            code="missing_signature",
        )
    try:
        sent = int(timestamp)
    except ValueError:
        raise APIError(401, "X-Lmstack-Timestamp must be unix seconds", code="bad_timestamp") from None
    skew = abs((time.time() if now is None else now) - sent)
    if skew > MAX_SKEW_S:
        raise APIError(
            401,
            f"stale request: the timestamp is {skew:.0f} s off (at most {MAX_SKEW_S} s)",
            code="stale_timestamp",
        )
    if not hmac.compare_digest(
        signature.strip().encode(), webhook_signature(secret, timestamp, body).encode()
    ):
        raise APIError(
            401,
            "bad signature: X-Lmstack-Signature is not the HMAC of timestamp.body with the secret",
            code="bad_signature",
        )


def feishu_signature(timestamp: str, nonce: str, encrypt_key: str, body: bytes) -> str:
    """Feishu's ``X-Lark-Signature``: hex SHA-256 of timestamp + nonce + encrypt key + raw body."""
    return hashlib.sha256((timestamp + nonce + encrypt_key).encode() + body).hexdigest()


def check_feishu_signature(encrypt_key: str, headers: Mapping[str, str], body: bytes) -> None:
    """Check a Feishu event request's signature headers.

    Raises:
        APIError: 401 when ``X-Lark-Signature``, ``X-Lark-Request-Timestamp`` or ``X-Lark-Request-Nonce`` is
            missing, or the signature does not match.
    """
    timestamp = headers.get("x-lark-request-timestamp")
    nonce = headers.get("x-lark-request-nonce")
    signature = headers.get("x-lark-signature")
    if not timestamp or nonce is None or not signature:
        raise APIError(
            401,
            "unsigned Feishu request: X-Lark-Signature, X-Lark-Request-Timestamp and "
            "X-Lark-Request-Nonce are required when an encrypt key is set",
            code="missing_signature",
        )
    expected = feishu_signature(timestamp, nonce, encrypt_key, body)
    if not hmac.compare_digest(signature.strip().lower().encode(), expected.encode()):
        raise APIError(401, "bad Feishu signature: check the encrypt key", code="bad_signature")


def decrypt_feishu(encrypted: str, encrypt_key: str) -> Any:
    """Decrypt a Feishu ``{"encrypt": ...}`` body: AES-256-CBC, key SHA-256(encrypt key), IV in front.

    Raises:
        APIError: 400 when ``cryptography`` is missing, or the payload does not decrypt to JSON.
    """
    try:
        from cryptography.hazmat.primitives import padding
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    except ImportError:
        raise APIError(
            400,
            "this Feishu event is encrypted, and decrypting it needs the cryptography package: "
            "pip install cryptography, or turn encryption off in the Feishu app's event settings",
            code="encryption_unsupported",
        ) from None
    failed = APIError(
        400,
        "the encrypted Feishu event does not decrypt with the encrypt key: check the key",
        code="bad_encryption",
    )
    try:
        raw = base64.b64decode(encrypted, validate=True)
    except (binascii.Error, ValueError):
        raise failed from None
    if len(raw) < 32 or len(raw) % 16:
        raise failed
    key = hashlib.sha256(encrypt_key.encode()).digest()
    decryptor = Cipher(algorithms.AES(key), modes.CBC(raw[:16])).decryptor()
    unpadder = padding.PKCS7(128).unpadder()
    try:
        plain = decryptor.update(raw[16:]) + decryptor.finalize()
        data = unpadder.update(plain) + unpadder.finalize()
        return json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise failed from None
