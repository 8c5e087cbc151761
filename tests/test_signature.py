"""Signature verification against the public Standard Webhooks implementation as the signing peer."""

from __future__ import annotations

import base64
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st
from standardwebhooks.webhooks import Webhook

from sentpipe.schemas.signature import Reason, SignatureError, Verifier, secret_key, signature_headers

SECRET = "whsec_" + base64.b64encode(b"a-test-secret-of-32-bytes-long!!").decode()
OTHER = "whsec_" + base64.b64encode(b"another-secret-for-rotation-test").decode()


def _peer_headers(secret: str, msg_id: str, ts: int, body: bytes, prefixed: bool = True) -> dict[str, str]:
    sig = Webhook(secret).sign(msg_id, _dt(ts), body.decode())
    names = (
        ("x-webhook-id", "x-webhook-timestamp", "x-webhook-signature")
        if prefixed
        else ("webhook-id", "webhook-timestamp", "webhook-signature")
    )
    return dict(zip(names, (msg_id, str(ts), sig), strict=True))


def _dt(ts: int):  # type: ignore[no-untyped-def]
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC)


@given(
    body=st.text(max_size=300),
    msg_id=st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=40),
)
def test_peer_signatures_verify(body: str, msg_id: str) -> None:
    now = int(time.time())
    raw = body.encode()
    v = Verifier([SECRET], 300)
    assert v.verify(_peer_headers(SECRET, msg_id, now, raw), raw, now).webhook_id == msg_id
    assert v.verify(_peer_headers(SECRET, msg_id, now, raw, prefixed=False), raw, now).timestamp == now


def test_our_signatures_verify_with_the_peer() -> None:
    now = int(time.time())
    body = b'{"field":"templates","payload":{}}'
    h = signature_headers(SECRET, "msg_1", now, body)
    peer = Webhook(SECRET)
    mapped = {
        "webhook-id": h["x-webhook-id"],
        "webhook-timestamp": h["x-webhook-timestamp"],
        "webhook-signature": h["x-webhook-signature"],
    }
    assert peer.verify(body, mapped) is not None


def test_rotation_accepts_any_configured_secret_and_any_offered_entry() -> None:
    now = int(time.time())
    body = b"{}"
    old = signature_headers(OTHER, "m", now, body)["x-webhook-signature"]
    new = signature_headers(SECRET, "m", now, body)["x-webhook-signature"]
    headers = {"x-webhook-id": "m", "x-webhook-timestamp": str(now), "x-webhook-signature": f"v1,AAAA {new}"}
    Verifier([OTHER, SECRET], 300).verify(headers, body, now)
    headers["x-webhook-signature"] = old
    Verifier([SECRET, OTHER], 300).verify(headers, body, now)
    with pytest.raises(SignatureError) as e:
        Verifier([SECRET], 300).verify(headers, body, now)
    assert e.value.reason is Reason.INVALID_SIGNATURE


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda h, b: (h | {"x-webhook-signature": "v1,"}, b), Reason.MALFORMED_SIGNATURE),
        (lambda h, b: (h | {"x-webhook-signature": "v2,abc"}, b), Reason.MALFORMED_SIGNATURE),
        (lambda h, b: ({k: v for k, v in h.items() if k != "x-webhook-id"}, b), Reason.MISSING_HEADERS),
        (lambda h, b: (h | {"x-webhook-timestamp": "soon"}, b), Reason.INVALID_TIMESTAMP),
        # int() took these; a 400-digit one overflowed the float comparison (a 500 at the ingress).
        (lambda h, b: (h | {"x-webhook-timestamp": "1" + "0" * 400}, b), Reason.INVALID_TIMESTAMP),
        (
            lambda h, b: (h | {"x-webhook-timestamp": "+" + h["x-webhook-timestamp"]}, b),
            Reason.INVALID_TIMESTAMP,
        ),
        (
            lambda h, b: (h | {"x-webhook-timestamp": "1_" + h["x-webhook-timestamp"]}, b),
            Reason.INVALID_TIMESTAMP,
        ),
        (lambda h, b: (h | {"x-webhook-timestamp": "\u0661" * 10}, b), Reason.INVALID_TIMESTAMP),
        (lambda h, b: (h | {"x-webhook-timestamp": "-5"}, b), Reason.INVALID_TIMESTAMP),
        (lambda h, b: (h | {"x-webhook-timestamp": str(int(time.time()) - 301)}, b), Reason.STALE_TIMESTAMP),
        (lambda h, b: (h | {"x-webhook-timestamp": str(int(time.time()) + 301)}, b), Reason.STALE_TIMESTAMP),
        (lambda h, b: (h, b + b" "), Reason.INVALID_SIGNATURE),
        (lambda h, b: (h | {"x-webhook-id": "other"}, b), Reason.INVALID_SIGNATURE),
    ],
)
def test_rejections_have_distinct_reasons(mutate, reason) -> None:  # type: ignore[no-untyped-def]
    now = int(time.time())
    body = b'{"a":1}'
    headers, body2 = mutate(_peer_headers(SECRET, "msg", now, body), body)
    with pytest.raises(SignatureError) as e:
        Verifier([SECRET], 300).verify(headers, body2, now)
    assert e.value.reason is reason


@pytest.mark.parametrize("around", ["\n", " ", "\r\n", "\t"])
def test_whitespace_around_a_whsec_secret_is_no_part_of_its_key(around: str) -> None:
    assert secret_key(around + SECRET + around) == secret_key(SECRET)


@pytest.mark.parametrize(
    ("secret", "problem"),
    [
        ("", "is empty"),
        ("  ", "is empty"),
        ("whsec_", "nothing after 'whsec_'"),
        ("whsec_!!not-base64!!", "not valid base64"),
        ("whsec_====", "not valid base64"),
    ],
)
def test_unusable_secrets_are_refused_without_showing_them(secret: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem) as e:
        Verifier([SECRET, secret], 300)
    assert "not-base64" not in str(e.value)


@pytest.mark.parametrize(
    ("header", "value", "reason"),
    [
        # aiohttp hands over header bytes that are not UTF-8 as lone surrogates (surrogateescape).
        ("x-webhook-signature", "v1,\udcff\udcfe", Reason.MALFORMED_SIGNATURE),
        ("x-webhook-id", "msg_\udcff", Reason.MALFORMED_SIGNATURE),
        ("x-webhook-timestamp", "17\udcff", Reason.INVALID_TIMESTAMP),
    ],
)
def test_undecodable_header_values_are_rejected_not_raised(header: str, value: str, reason: Reason) -> None:
    now = int(time.time())
    headers = _peer_headers(SECRET, "msg", now, b"{}") | {header: value}
    with pytest.raises(SignatureError) as e:
        Verifier([SECRET], 300).verify(headers, b"{}", now)
    assert e.value.reason is reason


def test_a_decoy_runs_every_check_and_never_matches() -> None:
    now = int(time.time())
    decoy = Verifier.decoy(2, 300)
    assert decoy.key_count == 2
    good = _peer_headers(SECRET, "msg", now, b"{}")
    for headers, reason in (
        (good, Reason.INVALID_SIGNATURE),
        ({}, Reason.MISSING_HEADERS),
        (good | {"x-webhook-timestamp": str(now - 3600)}, Reason.STALE_TIMESTAMP),
        (good | {"x-webhook-signature": "v2,x"}, Reason.MALFORMED_SIGNATURE),
    ):
        with pytest.raises(SignatureError) as e:
            decoy.verify(headers, b"{}", now)
        assert e.value.reason is reason


def test_an_empty_prefixed_header_falls_back_to_the_bare_name() -> None:
    """Sent's x- names are looked up first; an absent or empty one is read from the Standard Webhooks name."""
    now = int(time.time())
    body = b'{"a":1}'
    bare = _peer_headers(SECRET, "msg", now, body, prefixed=False)
    empty = {"x-webhook-id": "", "x-webhook-timestamp": "", "x-webhook-signature": ""}
    assert Verifier([SECRET], 300).verify(empty | bare, body, now).webhook_id == "msg"
    # Both given: the x- names win (here they carry another, valid delivery).
    prefixed = _peer_headers(SECRET, "other", now, body)
    assert Verifier([SECRET], 300).verify(bare | prefixed, body, now).webhook_id == "other"


def test_entries_on_every_line_of_a_repeated_header_count_and_a_proxys_comma_is_no_part_of_one() -> None:
    """HTTP makes a header sent twice the same as one line of both values (a proxy joins them with ", ")."""
    from multidict import CIMultiDict, CIMultiDictProxy

    now = int(time.time())
    body = b'{"a":1}'
    ours = _peer_headers(SECRET, "msg", now, body)
    theirs = _peer_headers(OTHER, "msg", now, body)["x-webhook-signature"]
    v = Verifier([SECRET], 300)

    def lines(*signatures: str) -> CIMultiDictProxy[str]:
        pairs = [(k, val) for k, val in ours.items() if k != "x-webhook-signature"]
        return CIMultiDictProxy(CIMultiDict([*pairs, *(("x-webhook-signature", sig) for sig in signatures)]))

    sig = ours["x-webhook-signature"]
    for offered in (lines(theirs, sig), lines(f"{sig}, {theirs}"), lines("v1a,abc", sig), lines(f"{sig},")):
        assert v.verify(offered, body, now).webhook_id == "msg"
    with pytest.raises(SignatureError) as e:
        v.verify(lines(theirs, theirs), body, now)
    assert e.value.reason is Reason.INVALID_SIGNATURE
    # The decoy of an unknown tenant answers such a request as any bad signature.
    with pytest.raises(SignatureError) as e:
        Verifier.decoy(1, 300).verify(lines(theirs, sig), body, now)
    assert e.value.reason is Reason.INVALID_SIGNATURE
