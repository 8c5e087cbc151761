"""Thousands of malformed requests: no 5xx but 503, no crash, nothing stored without a valid signature."""

from __future__ import annotations

import http.client
import time
from pathlib import Path

from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from sentpipe.schemas.signature import signature_headers
from sentpipe.settings import Settings
from tests.kafka_tools import read_topic
from tests.processes import start_ingress

HEADER_NAMES = st.sampled_from(
    [
        "x-webhook-id",
        "x-webhook-timestamp",
        "x-webhook-signature",
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
        "content-type",
        "content-encoding",
        "x-request-id",
        "transfer-encoding-x",
    ]
)
HEADER_VALUES = st.one_of(
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=80),
    st.sampled_from(["v1,", "v1,AAAA", "application/json", "0", "-1", "99999999999999999999", "v1,=="]),
)
BODIES = st.one_of(
    st.binary(max_size=2000),
    st.text(max_size=500).map(str.encode),
    st.sampled_from([b"{}", b"null", b'{"field":"message"}', b'{"event":{"type":1}}']),
)
PATHS = st.sampled_from(
    [
        "/webhooks/sent",
        "/webhooks/sent/default",
        "/webhooks/sent/x",
        "/webhooks/sent/%2e%2e",
        "/webhooks",
        "/readyz",
        "/openapi.json",
    ]
)
METHODS = st.sampled_from(["POST", "POST", "POST", "GET", "PUT", "DELETE"])


def test_fuzzed_requests_never_crash_or_store_unsigned(settings: Settings, topics, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    proc, base, _ = start_ingress(settings, tmp_path)
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    secret = settings.webhook_secret.get_secret_value()
    accepted_signed = 0
    statuses: dict[int, int] = {}

    @hsettings(max_examples=2500, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(
        method=METHODS,
        path=PATHS,
        headers=st.dictionaries(HEADER_NAMES, HEADER_VALUES, max_size=6),
        body=BODIES,
        sign=st.booleans(),
    )
    def one(method: str, path: str, headers: dict[str, str], body: bytes, sign: bool) -> None:
        nonlocal conn, accepted_signed
        if sign:
            headers = {
                **headers,
                **signature_headers(secret, "fz", int(time.time()), body),
                "content-type": "application/json",
            }
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            resp.read()
        except (http.client.HTTPException, ConnectionError):
            conn.close()
            conn = http.client.HTTPConnection(host, int(port), timeout=10)
            return
        statuses[resp.status] = statuses.get(resp.status, 0) + 1
        assert resp.status < 500 or resp.status == 503, (method, path, headers, body[:100])
        if resp.status == 200 and method == "POST" and path.startswith("/webhooks/sent"):
            assert sign, "accepted without a valid signature"
            accepted_signed += 1

    try:
        one()
    finally:
        conn.close()
        assert proc.p is not None and proc.p.poll() is None, proc.tail()
        exit_code = proc.stop()
    assert exit_code == 0, proc.tail()  # a clean exit: the producer flushed what it had
    assert sum(statuses.values()) >= 2000, statuses
    # Every record there is, by the watermarks: each 200 wrote one, nothing else wrote any.
    stored = [rec for t in (topics.raw, topics.dlq) for rec in read_topic(settings.kafka_bootstrap, t)]
    assert len(stored) == accepted_signed
    assert all(rec.headers.get("sentpipe-signature-verified") == b"true" for rec in stored)
