"""Sent's webhook signatures (the Standard Webhooks scheme with `x-` prefixed header names).

signed content = f"{webhook_id}.{timestamp}.".encode() + raw body
signature      = "v1," + base64(HMAC-SHA256(base64decode(secret without "whsec_"), signed content))
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import NamedTuple, Protocol

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
    """The HMAC key behind a `whsec_<base64>` secret; a secret without the prefix is used as is.

    ValueError (naming the problem, never the secret) for a secret that would make a useless key: empty,
    a bare `whsec_`, or base64 that does not decode.
    """
    if not secret.strip():
        raise ValueError("webhook secret is empty")
    if secret.strip().startswith(SECRET_PREFIX):
        # Whitespace around it is no part of it (base64 has none): a secret put in a Kubernetes secret with
        # `echo` ends in a newline, and stopped the ingress with "not valid base64".
        encoded = secret.strip()[len(SECRET_PREFIX) :]
        if not encoded:
            raise ValueError("webhook secret has nothing after 'whsec_'")
        try:
            key = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError) as exc:  # ValueError: a character that is not ASCII
            raise ValueError("webhook secret is not valid base64 after 'whsec_'") from exc
        if not key:
            raise ValueError("webhook secret decodes to an empty key")
        return key
    try:
        return secret.encode()
    except UnicodeEncodeError as exc:
        raise ValueError("webhook secret is not valid text") from exc


def sign(key: bytes, webhook_id: str, timestamp: int | str, body: bytes) -> str:
    mac = hmac.new(key, f"{webhook_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def signature_headers(
    secret: str | Sequence[str], webhook_id: str, timestamp: int, body: bytes
) -> dict[str, str]:
    """The headers Sent puts on a delivery; several secrets (a secret being rotated) sign one space-separated
    `v1,` entry each."""
    secrets = [secret] if isinstance(secret, str) else secret
    return {
        "x-webhook-id": webhook_id,
        "x-webhook-timestamp": str(timestamp),
        "x-webhook-signature": " ".join(sign(secret_key(s), webhook_id, timestamp, body) for s in secrets),
    }


def _first(headers: Mapping[str, str], names: tuple[str, str]) -> str | None:
    for name in names:
        value = headers.get(name)
        if value:
            return value
    return None


_X_ID, _X_TIMESTAMP, _X_SIGNATURE = HEADER_ID[0], HEADER_TIMESTAMP[0], HEADER_SIGNATURE[0]


class _Mac(Protocol):
    def copy(self) -> _Mac: ...
    def update(self, data: bytes, /) -> None: ...
    def digest(self) -> bytes: ...


class Verified(NamedTuple):  # a tuple: one per request; a frozen dataclass costs three times as much to build
    webhook_id: str
    timestamp: int


def _random_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(os.urandom(32)).decode()


class Verifier:
    """Checks deliveries against a tenant's keys; keys are decoded once, not per request."""

    def __init__(self, secrets: Sequence[str], tolerance_s: int, *, work: int = 0) -> None:
        """`work`: a signature that matches no secret costs this many HMACs, whatever the key count (random
        keys make up the difference), so a tenant's key count, or its existence, does not show in the time
        a bad signature takes."""
        if not secrets:
            raise ValueError("at least one secret is required")
        self._key_count = len(secrets)
        secrets = [*secrets, *(_random_secret() for _ in range(work - len(secrets)))]
        # Keyed once: each request copies a keyed HMAC instead of setting the key (and looking up SHA-256)
        # again, and the body is fed to it as is, never copied behind the signed prefix.
        # OpenSSL's HMAC object itself where the hmac module wraps one (CPython's `_hmac`): the wrapper's
        # copy/update/digest are Python calls, four more per request for the same work.
        keyed = [hmac.new(secret_key(s), digestmod=hashlib.sha256) for s in secrets]
        self._macs: list[_Mac] = [getattr(k, "_hmac", None) or k for k in keyed]
        self._tolerance = tolerance_s

    @property
    def key_count(self) -> int:
        """The secrets it was given (not the random keys that pad its work)."""
        return self._key_count

    @property
    def work(self) -> int:
        """HMACs computed for a signature that matches no secret."""
        return len(self._macs)

    @classmethod
    def decoy(cls, key_count: int, tolerance_s: int) -> Verifier:
        """A verifier with random keys that no sender knows. Requests for an unknown tenant go through it, so
        they get the same checks, the same HMAC work and the same answers as a known tenant's bad signature,
        and tenant names cannot be probed: `key_count` is the largest of any tenant, the work every tenant's
        verifier does for a bad signature (`work`)."""
        keys = [_random_secret() for _ in range(max(1, key_count))]
        return cls(keys, tolerance_s)

    def verify(self, headers: Mapping[str, str], body: bytes, now: float) -> Verified:
        # Every request's path: Sent's x- names are looked up first and inline, the bare ones only if absent.
        get = headers.get
        webhook_id = get(_X_ID) or _first(headers, HEADER_ID)
        ts_text = get(_X_TIMESTAMP) or _first(headers, HEADER_TIMESTAMP)
        sig_header = get(_X_SIGNATURE) or _first(headers, HEADER_SIGNATURE)
        if webhook_id is None or ts_text is None or sig_header is None:
            raise SignatureError(
                Reason.MISSING_HEADERS, "webhook id, timestamp and signature headers are required"
            )
        # Seconds as ASCII digits: int() also takes signs, '_', spaces and other scripts' digits, and a
        # 400-digit number overflowed the float comparison below (a 500). Twelve digits reach year 33658.
        if not (0 < len(ts_text) <= 12 and ts_text.isascii() and ts_text.isdigit()):
            raise SignatureError(Reason.INVALID_TIMESTAMP, "timestamp header is not a number of seconds")
        timestamp = int(ts_text)
        if abs(now - timestamp) > self._tolerance:
            raise SignatureError(
                Reason.STALE_TIMESTAMP, f"timestamp is more than {self._tolerance}s from now"
            )
        try:
            prefix = f"{webhook_id}.{ts_text}.".encode()
            signatures = sig_header.encode()
        except UnicodeEncodeError:
            # aiohttp decodes header bytes as UTF-8 with surrogateescape: bytes that are not UTF-8 arrive as
            # lone surrogates. A malformed signature (401), not an exception (500).
            raise SignatureError(Reason.MALFORMED_SIGNATURE, "a webhook header is not valid UTF-8") from None
        offered = _entries(signatures) or _repeated_entries(headers)
        if not offered:
            raise SignatureError(Reason.MALFORMED_SIGNATURE, "no 'v1,<base64>' entry in the signature header")
        computed: list[bytes] = []
        for keyed in self._macs:
            mac = keyed.copy()
            mac.update(prefix)
            mac.update(body)
            expected = binascii.b2a_base64(mac.digest(), newline=False)
            # Compare against every offered entry so timing does not reveal which one matched.
            matched = False
            for candidate in offered:
                matched |= hmac.compare_digest(expected, candidate)
            if matched:
                return Verified(webhook_id, timestamp)
            computed.append(expected)
        # Only on this path, so the usual request pays nothing for it: the entries of the signature header's
        # further lines. HTTP makes a header sent twice the same as one line of both values, so during a
        # rotation the secret this receiver knows may be on the second line; the HMACs are not computed again.
        matched = False
        for candidate in _repeated_entries(headers):
            for expected in computed:
                matched |= hmac.compare_digest(expected, candidate)
        if matched:
            return Verified(webhook_id, timestamp)
        raise SignatureError(Reason.INVALID_SIGNATURE, "no signature matches a configured secret")


def _entries(header: bytes) -> list[bytes]:
    """The signatures of a header's `v1,<base64>` entries. Entries are space-separated; one followed by a
    comma is taken too, as a proxy joins a repeated header's lines with ", " (base64 has no comma)."""
    offered: list[bytes] = []
    for entry in header.split():
        version, _, sig = entry.partition(b",")
        if sig[-1:] == b",":
            sig = sig[:-1]
        if version == b"v1" and sig:
            offered.append(sig)
    return offered


def _repeated_entries(headers: Mapping[str, str]) -> list[bytes]:
    """The entries of every line of the signature headers when there is more than one line (aiohttp's
    headers keep a repeated header's lines apart; `get` reads the first)."""
    getall = getattr(headers, "getall", None)
    if getall is None:
        return []
    lines: list[str] = [line for name in HEADER_SIGNATURE for line in getall(name, ())]
    if len(lines) < 2:
        return []
    offered: list[bytes] = []
    for line in lines:
        try:
            offered += _entries(line.encode())
        except UnicodeEncodeError:  # not UTF-8 (see above): no entry of ours
            continue
    return offered
