"""Sent's webhook signatures (the Standard Webhooks scheme with `x-` prefixed header names).

signed content = f"{webhook_id}.{timestamp}.".encode() + raw body
signature      = "v1," + base64(HMAC-SHA256(base64decode(secret without "whsec_"), signed content))
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

SECRET_PREFIX = "whsec_"
HEADER_ID = ("x-webhook-id", "webhook-id")
HEADER_TIMESTAMP = ("x-webhook-timestamp", "webhook-timestamp")
HEADER_SIGNATURE = ("x-webhook-signature", "webhook-signature")


class Reason(StrEnum):
    MISSING_HEADERS = "missing_headers"
    INVALID_TIMESTAMP = "invalid_timestamp"
    STALE_TIMESTAMP = "stale_timestamp"
    MALFORMED_SIGNATURE = "malformed_signature"
    INVALID_SIGNATURE = "invalid_signature"


class SignatureError(Exception):
    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def secret_key(secret: str) -> bytes:
    """The HMAC key behind a `whsec_<base64>` secret; a secret without the prefix is used as is."""
    if secret.startswith(SECRET_PREFIX):
        try:
            return base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
        except binascii.Error as exc:
            raise ValueError("webhook secret is not valid base64 after 'whsec_'") from exc
    return secret.encode()


def sign(key: bytes, webhook_id: str, timestamp: int | str, body: bytes) -> str:
    mac = hmac.new(key, f"{webhook_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def signature_headers(secret: str, webhook_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The headers Sent puts on a delivery."""
    return {
        "x-webhook-id": webhook_id,
        "x-webhook-timestamp": str(timestamp),
        "x-webhook-signature": sign(secret_key(secret), webhook_id, timestamp, body),
    }


def _first(headers: Mapping[str, str], names: tuple[str, str]) -> str | None:
    for name in names:
        value = headers.get(name)
        if value:
            return value
    return None


@dataclass(frozen=True, slots=True)
class Verified:
    webhook_id: str
    timestamp: int


class Verifier:
    """Checks deliveries against a tenant's keys; keys are decoded once, not per request."""

    def __init__(self, secrets: Sequence[str], tolerance_s: int) -> None:
        if not secrets:
            raise ValueError("at least one secret is required")
        self._keys = [secret_key(s) for s in secrets]
        self._tolerance = tolerance_s

    def verify(self, headers: Mapping[str, str], body: bytes, now: float) -> Verified:
        webhook_id = _first(headers, HEADER_ID)
        ts_text = _first(headers, HEADER_TIMESTAMP)
        sig_header = _first(headers, HEADER_SIGNATURE)
        if webhook_id is None or ts_text is None or sig_header is None:
            raise SignatureError(
                Reason.MISSING_HEADERS, "webhook id, timestamp and signature headers are required"
            )
        try:
            timestamp = int(ts_text)
        except ValueError:
            raise SignatureError(Reason.INVALID_TIMESTAMP, "timestamp header is not an integer") from None
        if abs(now - timestamp) > self._tolerance:
            raise SignatureError(
                Reason.STALE_TIMESTAMP, f"timestamp is more than {self._tolerance}s from now"
            )
        offered: list[bytes] = []
        for entry in sig_header.split():
            version, _, sig = entry.partition(",")
            if version == "v1" and sig:
                offered.append(sig.encode())
        if not offered:
            raise SignatureError(Reason.MALFORMED_SIGNATURE, "no 'v1,<base64>' entry in the signature header")
        content = f"{webhook_id}.{ts_text}.".encode() + body
        for key in self._keys:
            expected = base64.b64encode(hmac.new(key, content, hashlib.sha256).digest())
            # Compare against every offered entry so timing does not reveal which one matched.
            matched = False
            for candidate in offered:
                matched |= hmac.compare_digest(expected, candidate)
            if matched:
                return Verified(webhook_id, timestamp)
        raise SignatureError(Reason.INVALID_SIGNATURE, "no signature matches a configured secret")
