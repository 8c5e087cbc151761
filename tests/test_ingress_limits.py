"""The ingress's limits against the real broker: body sizes that agree with Kafka's record limits, hostile
requests that get 4xx (never 500), the in-flight cap, unknown tenants, unusable secrets, and answering 503 at
once while the producer knows the broker is down (then healing without a restart)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import gzip
import logging
import os
import re
import statistics
import threading
import time
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import confluent_kafka
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from confluent_kafka import KafkaError
from confluent_kafka.admin import NewTopic  # type: ignore[attr-defined]
from multidict import CIMultiDict
from prometheus_client import REGISTRY
from pydantic import SecretStr, ValidationError

from sentpipe.ingress.app import (
    MAX_FIELD_SIZE,
    REQUEST_ID_MAX,
    STALL_MARGIN_S,
    StartupError,
    WebhookHandler,
    check_topic_limits,
    create_app,
    liveness_problem,
    new_request_id,
    open_spool,
    producer_for,
    verifiers_for,
)
from sentpipe.ingress.spool import Spool, SpoolRecord, process_dir, status_of
from sentpipe.kafka import AsyncProducer, admin_client, topic_max_message_bytes
from sentpipe.processors.topics import CopartitioningError, check_record_limits, ensure_topics
from sentpipe.schemas import routing as r
from sentpipe.schemas import signature
from sentpipe.schemas.samples import SampleFactory
from sentpipe.schemas.signature import SignatureError, signature_headers
from sentpipe.schemas.topics import Topics, record_limits
from sentpipe.settings import Settings
from tests.http_tools import ingress_server, read_response
from tests.kafka_tools import read_topic, stop_report_thread
from tests.processes import Proc, settings_env

LIBRDKAFKA_DEFAULT_MESSAGE_MAX_BYTES = 1_000_000


@asynccontextmanager
async def serve(s: Settings) -> AsyncIterator[tuple[int, AsyncProducer]]:
    """The ingress app in this process for `s`; yields its port and producer."""
    producer = producer_for(s)
    server = await ingress_server(create_app(s, producer))
    try:
        assert server.port is not None
        yield server.port, producer
    finally:
        await server.close()


async def exchange(
    port: int, head: bytes, body: bytes = b"", timeout: float = 30.0
) -> tuple[int, dict[str, str], bytes]:
    """One raw HTTP/1.1 request (exact bytes, nothing added); the status, headers and body of the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + body)
        await writer.drain()
        return await asyncio.wait_for(read_response(reader), timeout)
    finally:
        writer.close()


def head(path: str, headers: dict[str, bytes | str], length: int) -> bytes:
    lines = [f"POST {path} HTTP/1.1".encode(), b"Host: 127.0.0.1", f"Content-Length: {length}".encode()]
    for name, value in headers.items():
        lines.append(name.encode() + b": " + (value if isinstance(value, bytes) else value.encode()))
    return b"\r\n".join(lines) + b"\r\n\r\n"


def signed(secret: str, body: bytes, webhook_id: str = "msg_1") -> dict[str, bytes | str]:
    return {
        **signature_headers(secret, webhook_id, int(time.time()), body),
        "content-type": "application/json",
    }


def padded_envelope(size: int, seed: int = 0) -> bytes:
    """A Sent-shaped status event of exactly `size` bytes, padded with incompressible text."""
    doc = {
        "field": "message",
        "sub_type": "message.delivered",
        "timestamp": "2026-01-01T00:00:00Z",
        "payload": {"message_id": f"m-{seed}", "pad": ""},
    }
    empty = len(orjson.dumps(doc))
    rng = os.urandom(size)  # base64 of random bytes: lz4 cannot shrink it
    doc["payload"]["pad"] = base64.b64encode(rng).decode()[: size - empty]  # type: ignore[index]
    body = orjson.dumps(doc)
    assert len(body) == size
    return body


# --- 1. limits that agree ---------------------------------------------------------------------------------
async def test_a_body_of_exactly_the_limit_is_stored_and_one_byte_more_is_413(
    settings: Settings, topics: Topics
) -> None:
    limit = settings.max_body_bytes
    assert limit > LIBRDKAFKA_DEFAULT_MESSAGE_MAX_BYTES  # the default 1 MiB: the range that used to get 503
    secret = settings.webhook_secret.get_secret_value()
    at_limit = padded_envelope(limit, 1)
    between = padded_envelope(LIBRDKAFKA_DEFAULT_MESSAGE_MAX_BYTES + 1, 2)
    malformed = b"{" + b"x" * (limit - 1)  # not JSON: dead-lettered, with the DLQ headers on top
    over = padded_envelope(limit + 1, 3)
    async with serve(settings) as (port, _):
        url = "/webhooks/sent"
        for i, body in enumerate((at_limit, between)):
            status, _, answer = await exchange(
                port, head(url, signed(secret, body, f"m{i}"), len(body)), body
            )
            assert status == 200, answer
            assert orjson.loads(answer)["status"] == "accepted"
        status, _, answer = await exchange(
            port, head(url, signed(secret, malformed), len(malformed)), malformed
        )
        assert (status, orjson.loads(answer).get("outcome")) == (200, "dead_lettered"), answer
        status, _, answer = await exchange(port, head(url, signed(secret, over), len(over)), over)
        assert (status, orjson.loads(answer)["error"]) == (413, "body_too_large")
        # Chunked (no Content-Length): the same boundary, found while reading.
        for body, want in ((at_limit, 200), (over, 413)):
            chunked = head(url, {**signed(secret, body, "chunked"), "Transfer-Encoding": "chunked"}, 0)
            chunked = chunked.replace(b"Content-Length: 0\r\n", b"")
            payload = b"".join(
                f"{len(body[i : i + 65536]):x}\r\n".encode() + body[i : i + 65536] + b"\r\n"
                for i in range(0, len(body), 65536)
            )
            status, _, answer = await exchange(port, chunked, payload + b"0\r\n\r\n")
            assert status == want, answer
    raw = read_topic(settings.kafka_bootstrap, topics.raw, at_least=3)
    assert sorted(rec.value for rec in raw) == sorted([at_limit, between, at_limit])
    dlq = read_topic(settings.kafka_bootstrap, topics.dlq, at_least=1)
    assert [rec.value for rec in dlq] == [malformed]


async def test_topics_are_created_to_fit_and_the_routed_form_of_a_largest_body_fits_too(
    settings: Settings, topics: Topics
) -> None:
    limits = record_limits(settings.max_body_bytes)
    names = [topics.raw, *topics.routed, topics.unrouted, topics.dlq]
    have = topic_max_message_bytes(admin_client(settings), settings.kafka_bootstrap, names)
    assert have == {n: limits.for_topic(topics, n) for n in names}
    assert limits.raw > settings.max_body_bytes and limits.dlq > limits.routed > limits.raw
    # The worst growth: numbers written again by the canonical JSON (1e15 -> 1000000000000000.0).
    numbers = b"1e15," * ((settings.max_body_bytes - 200) // 5)
    body = (
        b'{"field":"message","sub_type":"message.sent","payload":{"message_id":"m","n":['
        + numbers[:-1]
        + b"]}}"
    )
    assert len(body) <= settings.max_body_bytes
    routed = r.route(
        None,
        body,
        {r.H_TENANT: b"default"},
        topics=topics,
        id_source="auto",
        default_tenant="default",
        record_timestamp_ms=int(time.time() * 1000),
    )
    assert routed.topic == topics.message_status and len(routed.value) > 3.5 * len(body)
    producer = AsyncProducer.from_settings(settings)
    await producer.start()
    try:
        delivered = await producer.send_and_wait(routed.topic, routed.key, routed.value, [], timeout=30)
        assert delivered.topic == topics.message_status
        # ... and dead-lettered with every header a dead letter carries.
        dlq_headers = r.dlq_headers(
            stage="project", error_class="X" * 200, message="m" * 1000, topic="t", partition=1, offset=2
        )
        await producer.send_and_wait(topics.dlq, routed.key, routed.value, dlq_headers, timeout=30)
    finally:
        await producer.close()


def test_topics_ensure_raises_a_small_limit_and_an_ingress_refuses_to_start_until_then(
    settings: Settings, tmp_path: Path
) -> None:
    s = settings.model_copy(update={"topic_prefix": settings.topic_prefix + "old."})
    topics = Topics(s.topic_prefix)
    admin = admin_client(s)
    # As an older `topics ensure` made them: the broker's default max.message.bytes (1 MiB + 12).
    futures = admin.create_topics(
        [NewTopic(t, 1, 1) for t in (topics.raw, *topics.routed, topics.unrouted, topics.dlq)]
    )
    for fut in futures.values():
        fut.result(30)
    for _ in range(100):  # the broker answers for a new topic's configs once its metadata has caught up
        if None not in topic_max_message_bytes(admin, s.kafka_bootstrap, [topics.raw, topics.dlq]).values():
            break
        time.sleep(0.1)
    with pytest.raises(CopartitioningError, match=r"max\.message\.bytes.*sentpipe topics ensure"):
        check_record_limits(s)  # the worker's start check

    proc = Proc(
        ["ingress"], settings_env(s, ingress_host="127.0.0.1", ingress_port=0), tmp_path / "i.log"
    ).start()
    assert proc.p is not None and proc.p.wait(60) == 1
    lines = proc.log.read_text().strip().splitlines()
    assert len(lines) == 1, lines
    assert re.fullmatch(
        rf"error: topic {re.escape(topics.raw)} takes records up to \d+ bytes \(max\.message\.bytes\) but "
        r"SENTPIPE_MAX_BODY_BYTES=1048576 needs \d+: run `sentpipe topics ensure` .*",
        lines[0],
    ), lines[0]

    ensure_topics(s)
    limits = record_limits(s.max_body_bytes)
    have = topic_max_message_bytes(admin, s.kafka_bootstrap, [topics.raw, topics.message_status, topics.dlq])
    assert have == {topics.raw: limits.raw, topics.message_status: limits.routed, topics.dlq: limits.dlq}
    check_record_limits(s)
    ensure_topics(s)  # idempotent: nothing to raise any more


# --- 2. hostile requests ---------------------------------------------------------------------------------
BAD_BYTES = b"\xff\xfe\x80 caf\xe9"  # not UTF-8 (latin-1 at best)


@pytest.mark.parametrize("header", ["x-webhook-signature", "x-webhook-id", "webhook-id", "webhook-signature"])
async def test_undecodable_header_bytes_are_401_malformed_signature(
    settings: Settings, topics: Topics, header: str
) -> None:
    secret = settings.webhook_secret.get_secret_value()
    body = SampleFactory(31).inbound().body
    headers = signed(secret, body)
    if header.startswith("webhook-"):  # the un-prefixed names: the only ones present
        headers = {k.removeprefix("x-"): v for k, v in headers.items()}
    headers[header] = b"v1," + BAD_BYTES if header.endswith("signature") else b"msg_" + BAD_BYTES
    async with serve(settings) as (port, _):
        for path in ("/webhooks/sent", "/webhooks/sent/nobody"):
            status, _, answer = await exchange(port, head(path, headers, len(body)), body)
            assert (status, orjson.loads(answer)["error"]) == (401, "malformed_signature"), answer
    assert read_topic(settings.kafka_bootstrap, topics.raw) == []


async def test_the_unsigned_request_id_is_capped_and_sanitized_before_it_is_echoed_or_stored(
    settings: Settings, topics: Topics
) -> None:
    secret = settings.webhook_secret.get_secret_value()
    f = SampleFactory(32)
    cases: list[tuple[bytes, str | None]] = [
        (b"req-123_ABC.x", "req-123_ABC.x"),  # kept as it is
        (b"r" * 500, "r" * REQUEST_ID_MAX),  # cut to the cap
        (b"bad " + BAD_BYTES, None),  # not printable ASCII: replaced
        (b"tab\there", None),
        (b"two words", None),
    ]
    async with serve(settings) as (port, _):
        for given, want in cases:
            body = f.inbound().body
            status, headers, answer = await exchange(
                port, head("/webhooks/sent", {**signed(secret, body), "x-request-id": given}, len(body)), body
            )
            assert status == 200, answer
            echoed = headers["x-request-id"]
            if want is None:
                assert re.fullmatch(r"[0-9a-f]{32}", echoed), echoed
            else:
                assert echoed == want
        # Control characters other than tab never reach the handler: aiohttp's parser answers 400.
        body = f.inbound().body
        escape = {**signed(secret, body), "x-request-id": b"evil\x1b[2Jid"}
        assert (await exchange(port, head("/webhooks/sent", escape, len(body)), body))[0] == 400
    stored = read_topic(settings.kafka_bootstrap, topics.raw, at_least=len(cases))
    for rec in stored:
        value = rec.headers[r.H_REQUEST_ID]
        assert len(value) <= REQUEST_ID_MAX and value.isascii() and value.decode().isprintable()


async def test_headers_over_the_documented_size_limit_get_400_not_500(settings: Settings) -> None:
    secret = settings.webhook_secret.get_secret_value()
    body = SampleFactory(33).inbound().body
    async with serve(settings) as (port, _):
        fits = {**signed(secret, body), "x-padding": "p" * (MAX_FIELD_SIZE - 20)}
        assert (await exchange(port, head("/webhooks/sent", fits, len(body)), body))[0] == 200
        too_long = {**signed(secret, body), "x-padding": "p" * (MAX_FIELD_SIZE + 1)}
        assert (await exchange(port, head("/webhooks/sent", too_long, len(body)), body))[0] == 400


async def test_a_body_slower_than_the_read_timeout_gets_408(settings: Settings, topics: Topics) -> None:
    s = settings.model_copy(update={"body_timeout_s": 1.0})
    secret = s.webhook_secret.get_secret_value()
    body = SampleFactory(34).inbound().body
    async with serve(s) as (port, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        t0 = time.monotonic()
        writer.write(head("/webhooks/sent", signed(secret, body), len(body)))
        answered: asyncio.Task[tuple[int, dict[str, str], bytes]] = asyncio.create_task(read_response(reader))
        for byte in body:  # a byte every 100 ms: the body would take minutes
            if answered.done():
                break
            writer.write(bytes([byte]))
            await asyncio.sleep(0.1)
        status, headers, answer = await asyncio.wait_for(answered, 10)
        took = time.monotonic() - t0
        writer.close()
        assert (status, orjson.loads(answer)["error"]) == (408, "body_timeout")
        assert headers.get("connection", "").lower() == "close"
        assert 0.9 < took < 5.0, took
        # A normal request on a new connection is unaffected.
        assert (await exchange(port, head("/webhooks/sent", signed(secret, body), len(body)), body))[0] == 200
    assert len(read_topic(s.kafka_bootstrap, topics.raw, at_least=1)) == 1


async def test_bodies_still_arriving_have_a_cap_of_their_own_and_never_turn_a_webhook_away(
    settings: Settings, topics: Topics
) -> None:
    """Headers and then nothing (no signature is checked before the body) held every slot, and every
    delivery got 503: anyone could keep that up with a reconnect every SENTPIPE_BODY_TIMEOUT_S."""
    s = settings.model_copy(update={"ingress_max_in_flight": 2})
    secret = s.webhook_secret.get_secret_value()
    f = SampleFactory(35)
    async with serve(s) as (port, _):
        held = []
        for i in range(2):  # both slots for bodies still arriving
            body = f.inbound().body
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(head("/webhooks/sent", signed(secret, body, f"held{i}"), len(body)) + body[:10])
            held.append((reader, writer, body))
        await asyncio.sleep(0.3)  # both are in their handlers, reading the body
        # A third body still arriving is turned away at once...
        body = f.inbound().body
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head("/webhooks/sent", signed(secret, body, "third"), len(body)) + body[:10])
        status, headers, answer = await asyncio.wait_for(read_response(reader), 5)
        writer.close()
        assert (status, orjson.loads(answer)["error"]) == (503, "overloaded"), answer
        assert headers.get("retry-after")
        # ...and closed: left open, aiohttp read its unwanted body for 10 s more, holding the connection.
        assert headers.get("connection", "").lower() == "close"
        assert await asyncio.wait_for(reader.read(), 5) == b""
        # ...but a webhook that came whole is not.
        status, _, answer = await exchange(
            port, head("/webhooks/sent", signed(secret, body), len(body)), body
        )
        assert status == 200, answer
        for reader, writer, held_body in held:  # the held ones finish normally
            writer.write(held_body[10:])
            assert (await asyncio.wait_for(read_response(reader), 30))[0] == 200
            writer.close()
    assert len(read_topic(s.kafka_bootstrap, topics.raw, at_least=3)) == 3


def _requests(tenant: str, outcome: str, status: str) -> float:
    labels = {"tenant": tenant, "outcome": outcome, "status": status}
    return REGISTRY.get_sample_value("sentpipe_ingress_requests_total", labels) or 0.0


async def test_a_head_trickled_past_the_timeout_gets_408_and_the_connection_closes(
    settings: Settings,
) -> None:
    s = settings.model_copy(update={"body_timeout_s": 1.0})
    async with serve(s) as (port, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /webhooks/sent HTTP/1.1\r\nHost: x\r\n")  # and never the end of the head
        status, headers, answer = await asyncio.wait_for(read_response(reader), 30)
        assert (status, orjson.loads(answer)["error"]) == (408, "header_timeout"), answer
        assert headers.get("connection", "").lower() == "close"
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed
        writer.close()


async def test_a_client_leaving_mid_body_is_not_an_error(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """It was a traceback at ERROR and a 500 in the counter the 5xx alerts read, for anyone to repeat."""
    body = SampleFactory(37).inbound().body
    secret = settings.webhook_secret.get_secret_value()

    def gone() -> float:
        return _requests("default", "client_gone", "499") + _requests("default", "cancelled", "499")

    before, errors = gone(), _requests("default", "error", "500")
    async with serve(settings) as (port, _):
        for _ in range(3):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(head("/webhooks/sent", signed(secret, body), len(body)) + body[:5])
            await writer.drain()
            await asyncio.sleep(0.3)  # the handler is waiting for the rest
            writer.close()
        for _ in range(100):
            if gone() - before >= 3:
                break
            await asyncio.sleep(0.05)
    assert gone() - before == 3 and _requests("default", "error", "500") == errors
    assert not [rec for rec in caplog.records if rec.levelno >= 40 or rec.exc_info]


async def test_malformed_http_is_a_json_400_and_its_bytes_stay_out_of_the_log(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """aiohttp logged a traceback at ERROR holding the bytes it choked on (a body: phone numbers, message
    text) and answered them back in plain text."""
    marker = b"+15550001234"
    secret = settings.webhook_secret.get_secret_value()
    body = b'{"phone":"' + marker + b'"}'
    cases = [
        # a chunk size line ended by a bare LF
        head("/webhooks/sent", signed(secret, body), 0).replace(
            b"Content-Length: 0", b"Transfer-Encoding: chunked"
        )
        + b"%x\n" % len(body)
        + body
        + b"\n0\n\n",
        # Content-Length and Transfer-Encoding together
        head("/webhooks/sent", {**signed(secret, body), "transfer-encoding": "chunked"}, len(body)) + body,
        # a body whose Content-Encoding does not decode
        head("/webhooks/sent", {**signed(secret, body), "content-encoding": "deflate"}, len(body)) + body,
    ]
    async with serve(settings) as (port, _):
        for raw in cases:
            status, headers, answer = await exchange(port, raw)
            assert status == 400 and headers.get("content-type", "").startswith("application/json"), answer
            assert orjson.loads(answer)["error"] in ("malformed_request", "malformed_body"), answer
            assert marker not in answer
    logged = [rec for rec in caplog.records if rec.name.startswith(("aiohttp", "sentpipe"))]
    assert not [rec for rec in logged if rec.levelno >= 40 or rec.exc_info], [r.getMessage() for r in logged]
    assert not [rec for rec in logged if marker.decode() in rec.getMessage()]


async def test_gzip_and_deflate_are_decoded_before_the_signature_and_any_other_coding_is_415(
    settings: Settings, topics: Topics, caplog: pytest.LogCaptureFixture
) -> None:
    """Codings aiohttp cannot decode here (br, zstd) were a 400 `Bad Request`, and one it does not know (or
    two stacked) passed on as is: a 401 or a dead letter for bytes never meant as the body. Every 415 is
    counted, and logged as a 415 (br and zstd, refused by aiohttp's parser, were neither: logged as 400s)."""
    caplog.set_level(logging.INFO)
    counted_before = sum(_requests(t, "unsupported_encoding", "415") for t in ("unknown", "default"))
    secret = settings.webhook_secret.get_secret_value()
    f = SampleFactory(44)
    gzipped, deflated = f.inbound().body, f.inbound().body
    # Decoded, far over the body limit: refused while decoding, not held in memory whole.
    bomb = gzipped[:-1] + b',"pad":"' + b" " * (64 * settings.max_body_bytes) + b'"}'
    url = "/webhooks/sent"
    async with serve(settings) as (port, _):
        for body, coded, coding in (
            (gzipped, gzip.compress(gzipped), "gzip"),
            (deflated, zlib.compress(deflated), "Deflate"),
        ):
            status, _, answer = await exchange(
                port, head(url, {**signed(secret, body), "content-encoding": coding}, len(coded)), coded
            )
            assert status == 200 and orjson.loads(answer)["status"] == "accepted", answer
        refused = f.inbound().body
        for coding, coded in (
            ("br", b"\x0b\x02\x80{}\x03"),
            ("zstd", b"(\xb5/\xfd\x00X\x11\x00\x00{}"),
            ("x-gzip", gzip.compress(refused)),
            ("gzip, gzip", gzip.compress(gzip.compress(refused))),
            ("compress", refused),
        ):
            status, headers, answer = await exchange(
                port, head(url, {**signed(secret, refused), "content-encoding": coding}, len(coded)), coded
            )
            assert status == 415 and headers["content-type"].startswith("application/json"), (coding, answer)
            assert orjson.loads(answer)["error"] == "unsupported_encoding", (coding, answer)
        # Repeated headers are one list, as aiohttp reads them (the last decides): the first alone let
        # `identity` then `x-gzip` through.
        for codings, coded in (
            (("identity", "x-gzip"), gzip.compress(refused)),
            (("identity", "gzip"), gzip.compress(refused)),
            (("gzip", "identity"), gzip.compress(refused)),
        ):
            both = head(url, signed(secret, refused), len(coded)).replace(
                b"\r\n\r\n", b"".join(b"\r\nContent-Encoding: " + c.encode() for c in codings) + b"\r\n\r\n"
            )
            status, _, answer = await exchange(port, both, coded)
            assert (status, orjson.loads(answer)["error"]) == (415, "unsupported_encoding"), (codings, answer)
        counted = sum(_requests(t, "unsupported_encoding", "415") for t in ("unknown", "default"))
        assert counted - counted_before == 8
        statuses = [getattr(r, "status", None) for r in caplog.records if r.msg == "malformed HTTP request"]
        assert statuses == [415, 415], statuses  # br and zstd; the other three reach the handler
        coded = gzip.compress(bomb)
        status, _, answer = await exchange(
            port, head(url, {**signed(secret, bomb), "content-encoding": "gzip"}, len(coded)), coded
        )
        assert (status, orjson.loads(answer)["error"]) == (413, "body_too_large"), answer
    stored = [rec.value for rec in read_topic(settings.kafka_bootstrap, topics.raw, at_least=2)]
    assert sorted(stored) == sorted([gzipped, deflated])


async def test_an_unknown_tenant_answers_exactly_like_a_bad_signature(
    settings: Settings, topics: Topics
) -> None:
    secret = settings.webhook_secret.get_secret_value()
    wrong = "whsec_" + base64.b64encode(b"w" * 32).decode()
    body = SampleFactory(36).inbound().body

    def comparable(headers: dict[str, str]) -> dict[str, str]:
        return {k: v for k, v in headers.items() if k not in ("date", "x-request-id")}

    async with serve(settings) as (port, _):
        known = await exchange(port, head("/webhooks/sent", signed(wrong, body), len(body)), body)
        unknown = await exchange(port, head("/webhooks/sent/nobody", signed(secret, body), len(body)), body)
        assert known[0] == unknown[0] == 401
        assert known[2] == unknown[2] and orjson.loads(unknown[2])["error"] == "invalid_signature"
        assert comparable(known[1]) == comparable(unknown[1])
        # Every other check answers the same too: missing headers, stale timestamp, content type.
        for headers in (
            {"content-type": "application/json"},
            {**signed(secret, body), "x-webhook-timestamp": str(int(time.time()) - 3600)},
            {**signed(secret, body), "content-type": "text/plain"},
        ):
            a = await exchange(port, head("/webhooks/sent", headers, len(body)), body)
            b = await exchange(port, head("/webhooks/sent/nobody", headers, len(body)), body)
            assert (a[0], a[2]) == (b[0], b[2])
        # Comparable work: both run one HMAC over the body; report the medians (no timing assertion).
        big = padded_envelope(512 * 1024)
        times: dict[str, list[float]] = {"known": [], "unknown": []}
        for _ in range(15):
            for name, path, key in (
                ("known", "/webhooks/sent", wrong),
                ("unknown", "/webhooks/sent/x", secret),
            ):
                t0 = time.perf_counter()
                assert (await exchange(port, head(path, signed(key, big), len(big)), big))[0] == 401
                times[name].append(time.perf_counter() - t0)
        print({k: f"{statistics.median(v) * 1000:.2f} ms" for k, v in times.items()})
    assert read_topic(settings.kafka_bootstrap, topics.raw) == []


def test_a_bad_signature_costs_as_many_hmacs_for_every_tenant_known_or_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The decoy for unknown tenants had the default tenant's key count and each tenant one HMAC per key: a
    bad signature to a tenant with two keys took one HMAC more than one to a name that is no tenant, so
    tenant names could be probed by timing. Each HMAC computed is one base64 encoding of its digest."""
    secrets = tmp_path / "secrets.json"
    two = ["whsec_" + base64.b64encode(k * 32).decode() for k in (b"a", b"b")]
    secrets.write_bytes(orjson.dumps({"two": two, "one": two[0]}))
    s = Settings(_env_file=None, secrets_file=secrets)
    handler = WebhookHandler(s, cast(AsyncProducer, None), verifiers_for(s))
    body = SampleFactory(42).inbound().body
    headers = signed("whsec_" + base64.b64encode(b"w" * 32).decode(), body)
    computed = 0
    encode = binascii.b2a_base64

    def counted(data: bytes, *, newline: bool = True) -> bytes:
        nonlocal computed
        computed += 1
        return encode(data, newline=newline)

    monkeypatch.setattr(signature.binascii, "b2a_base64", counted)
    work = {}
    for tenant, verifier in [*handler.verifiers.items(), ("unknown", handler.decoy)]:
        computed = 0
        with pytest.raises(SignatureError):
            verifier.verify(CIMultiDict(headers), body, time.time())
        work[tenant] = computed
    assert work == {s.default_tenant: 2, "two": 2, "one": 2, "unknown": 2}, work


@pytest.mark.parametrize("secret", ["", "   ", "whsec_", "whsec_!!not-base64!!", "whsec_===="])
def test_an_unusable_secret_is_refused_at_start_in_one_line(
    settings: Settings, tmp_path: Path, secret: str
) -> None:
    with pytest.raises(StartupError, match=r"^SENTPIPE_WEBHOOK_SECRET: webhook secret "):
        create_app(settings.model_copy(update={"webhook_secret": SecretStr(secret)}), producer_for(settings))
    env = settings_env(settings, ingress_host="127.0.0.1", ingress_port=0, webhook_secret=secret)
    proc = Proc(["ingress"], env, tmp_path / "ingress.log").start()
    assert proc.p is not None and proc.p.wait(60) == 1
    lines = proc.log.read_text().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: SENTPIPE_WEBHOOK_SECRET: webhook secret "), lines


def test_an_unusable_secret_in_the_secrets_file_is_refused_naming_the_tenant(
    settings: Settings, tmp_path: Path
) -> None:
    good = "whsec_" + base64.b64encode(b"g" * 32).decode()
    secrets = tmp_path / "secrets.json"
    secrets.write_bytes(orjson.dumps({"acme": [good, "whsec_"]}))
    env = settings_env(settings, ingress_host="127.0.0.1", ingress_port=0, secrets_file=secrets)
    proc = Proc(["ingress"], env, tmp_path / "ingress.log").start()
    assert proc.p is not None and proc.p.wait(60) == 1
    lines = proc.log.read_text().strip().splitlines()
    assert lines == ["error: SENTPIPE_SECRETS_FILE, tenant 'acme': webhook secret has nothing after 'whsec_'"]
    assert good not in proc.log.read_text()


# --- 3. fail fast, heal -----------------------------------------------------------------------------------
def hold_probe(producer: AsyncProducer) -> asyncio.Event:
    """Hold the producer's "is a broker back?" probe until the returned event is set: an injected "all
    brokers down" then lasts, though the broker is in fact up."""
    release = asyncio.Event()
    probe = producer._probe

    async def held_probe() -> None:
        await release.wait()
        await probe()

    producer._probe = held_probe  # type: ignore[method-assign]
    return release


async def spool_with_an_undeliverable_record(s: Settings, topics: Topics) -> Spool:
    """The spool of `s` holding one record for a topic that does not exist: librdkafka holds it until its
    delivery timeout, so a drain window with it cannot end sooner."""
    spool = open_spool(s)
    assert spool is not None
    headers = tuple(
        r.raw_headers(
            tenant="default", received_at_ms=1, webhook_id="w", request_id="rid", event_type="message.inbound"
        )
    )
    await spool.append(SpoolRecord(f"{topics.prefix}missing", b"k", b"v", headers, 1))
    return spool


async def test_while_the_producer_knows_the_broker_is_down_it_answers_503_at_once_and_heals(
    settings: Settings, topics: Topics
) -> None:
    """librdkafka's "all brokers down" report (injected here; the chaos test stops the real broker): new
    requests get 503 at once, a record already queued keeps waiting, and the probe finds the broker (which
    is in fact up) and accepts again."""
    secret = settings.webhook_secret.get_secret_value()
    f = SampleFactory(37)
    async with serve(settings) as (port, producer):
        body = f.inbound().body
        assert (await exchange(port, head("/webhooks/sent", signed(secret, body), len(body)), body))[0] == 200
        # A record waiting for a topic that does not exist yet: queued, not failed.
        queued = producer.produce(f"{topics.prefix}later", b"k", b"v", [])
        # The broker is in fact up, so the probe would heal at once: hold it until the checks are done.
        release = hold_probe(producer)
        producer._on_error(KafkaError(KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down"))
        assert producer.unavailable == "all_brokers_down"
        body = f.inbound().body
        t0 = time.monotonic()
        status, headers, answer = await exchange(
            port, head("/webhooks/sent", signed(secret, body), len(body)), body
        )
        took = time.monotonic() - t0
        assert (status, orjson.loads(answer)["error"]) == (503, "broker_unavailable") and headers[
            "retry-after"
        ]
        assert "all_brokers_down" in orjson.loads(answer)["detail"] and took < 1.0, took
        status, _, _ = await exchange(port, b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 503
        # Unready pods get no requests: the outage alert reads this gauge, scraped all the same.
        assert REGISTRY.get_sample_value("sentpipe_ingress_accepting") == 0
        await asyncio.sleep(0.1)
        assert not queued.done()  # records already in flight keep waiting
        # The probe sees the broker answer: accepted again, without a restart.
        release.set()
        for _ in range(200):
            if producer.unavailable is None:
                break
            await asyncio.sleep(0.05)
        assert producer.unavailable is None
        assert REGISTRY.get_sample_value("sentpipe_ingress_accepting") == 1
        body = f.inbound().body
        assert (await exchange(port, head("/webhooks/sent", signed(secret, body), len(body)), body))[0] == 200
        queued.cancel()


async def test_a_fatal_producer_error_replaces_the_producer_and_the_ingress_heals(
    settings: Settings, topics: Topics
) -> None:
    """confluent-kafka never gives a fatal error to error_cb: it raises it from poll. The report thread
    logged it as a failed poll and went on, so the producer was never replaced and every request after it
    answered 503 until the pod was restarted by hand. The fatal error here is a real one: the ingress's
    client is made a transactional one and fenced by a second client with its transactional.id; the
    replacement is the ingress's usual client."""
    secret = settings.webhook_secret.get_secret_value()
    f = SampleFactory(38)
    producer = producer_for(settings)
    tid = f"{topics.prefix}fenced"
    doomed = confluent_kafka.Producer(
        {**producer._config, "transactional.id": tid, "error_cb": producer._on_error, "log_level": 0}
    )
    doomed.init_transactions(30)
    doomed.begin_transaction()
    producer._producer = doomed
    fencer = confluent_kafka.Producer({**producer._config, "transactional.id": tid, "log_level": 0})
    fencer.init_transactions(30)  # the broker now refuses the doomed client's writes: fatal for it
    server = await ingress_server(create_app(settings, producer))
    try:
        port = server.port
        assert port is not None
        acked = 0
        deadline = time.monotonic() + 60
        while producer.recreated == 0 and time.monotonic() < deadline:
            body = f.inbound().body
            request = head("/webhooks/sent", signed(secret, body), len(body))
            status, _, answer = await exchange(port, request, body)
            assert status in (200, 503), answer
            acked += status == 200
            await asyncio.sleep(0.2)
        assert producer.recreated == 1, "the fatal error did not replace the producer"
        assert acked == 0  # nothing the fenced client held was acknowledged
        body = f.inbound().body
        assert (await exchange(port, head("/webhooks/sent", signed(secret, body), len(body)), body))[0] == 200
        status, _, _ = await exchange(port, b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 200
    finally:
        await server.close()
    assert len(read_topic(settings.kafka_bootstrap, topics.raw, at_least=1)) == 1


async def test_a_producer_whose_reports_stop_coming_fails_liveness(
    settings: Settings, topics: Topics
) -> None:
    """The report thread gone (fault injection): records would wait for reports forever, so /healthz answers
    503 `producer_stalled` (and `sentpipe ingress` stops itself: see test_ingress_workers)."""
    s = settings.model_copy(update={"produce_timeout_s": 10.0})
    secret = s.webhook_secret.get_secret_value()
    f = SampleFactory(39)
    async with serve(s) as (port, producer):
        body = f.inbound().body
        assert (await exchange(port, head("/webhooks/sent", signed(secret, body), len(body)), body))[0] == 200
        assert (await exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"))[0] == 200
        stop_report_thread(producer)
        status, _, answer = await exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (status, orjson.loads(answer)["error"]) == (503, "producer_stalled")
        assert "report thread is gone" in orjson.loads(answer)["detail"]
        # Until the process stops, the loop serves the reports itself (slowly): the broker's answer still
        # decides the request's.
        body = f.inbound().body
        request = head("/webhooks/sent", signed(secret, body), len(body))
        status, _, answer = await exchange(port, request, body)
        assert status == 200, answer
        assert (await exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"))[0] == 503


async def test_a_spool_drain_that_does_not_move_fails_liveness(
    settings: Settings, topics: Topics, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Spooled records and a drain that ends no window (here: its read of the segment does not return, a
    disk that stopped answering) while the broker is reachable: /healthz answers 503 `spool_drain_stalled`
    past SENTPIPE_STALL_AFTER_S and past the longest a window may wait for the broker (the produce timeout
    plus STALL_MARGIN_S), not before: with the produce timeout at or above SENTPIPE_STALL_AFTER_S, a window
    waiting for a partition without a leader restarted the process."""
    s = settings.model_copy(
        update={
            "spool": True,
            "spool_dir": tmp_path / "spool",
            "stall_after_s": 1.0,
            "produce_timeout_s": 2.0,
        }
    )
    disk = threading.Event()
    read_window = Spool._read_window

    def stalled(self: Spool, seg: Any) -> Any:
        disk.wait(120)
        return read_window(self, seg)

    monkeypatch.setattr(Spool, "_read_window", stalled)
    spool = await spool_with_an_undeliverable_record(s, topics)
    producer = producer_for(s)
    server = TestServer(create_app(s, producer, spool), host="127.0.0.1")
    await server.start_server()
    try:
        assert server.port is not None
        await asyncio.sleep(1.5)  # past SENTPIPE_STALL_AFTER_S, within the produce timeout
        status, _, _ = await exchange(server.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 200
        await asyncio.sleep(3.0)  # past the produce timeout, within its margin (librdkafka's own slack)
        status, _, _ = await exchange(server.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 200
        await asyncio.sleep(STALL_MARGIN_S - 1.5)
        assert spool.records == 1 and producer.unavailable is None
        status, _, answer = await exchange(server.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (status, orjson.loads(answer)["error"]) == (503, "spool_drain_stalled")
    finally:
        disk.set()
        await server.close()


async def test_waiting_out_a_broker_outage_is_not_a_spool_drain_stall(
    settings: Settings, topics: Topics, tmp_path: Path
) -> None:
    """While the producer knows every broker is down the drain waits, and that wait is not a stall: the
    moment the broker is back, with the drain's first window still on its way, liveness holds. (It once
    counted the whole outage as a hung drain, and a process stopping itself when hung stopped right as the
    broker came back.) The window here waits on a topic that does not exist, so it cannot end first."""
    s = settings.model_copy(update={"spool": True, "spool_dir": tmp_path / "spool", "stall_after_s": 1.0})
    spool = await spool_with_an_undeliverable_record(s, topics)
    producer = producer_for(s)
    release = hold_probe(producer)  # the broker is in fact up: the outage lasts until released
    producer._on_error(KafkaError(KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down"))
    app = create_app(s, producer, spool)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        await asyncio.sleep(2.0)  # twice SENTPIPE_STALL_AFTER_S with every broker down
        assert spool.records == 1 and producer.unavailable == "all_brokers_down"
        release.set()
        for _ in range(100):
            if producer.unavailable is None:
                break
            await asyncio.sleep(0.02)
        assert producer.unavailable is None and spool.records == 1
        assert liveness_problem(app) is None
    finally:
        await server.close()


async def test_a_spool_disk_that_stops_answering_gets_503_at_once_and_fails_the_probes(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fdatasync that blocks (an EBS or NFS stall) while the broker is away: requests hung for ever and
    /readyz, /healthz stayed 200. Now a request waits at most the produce timeout for its write, then gets
    503 `spool_write_failed`; the next ones get it at once; the pod is unready, and unhealthy past
    SENTPIPE_STALL_AFTER_S."""
    s = settings.model_copy(
        update={
            "spool": True,
            "spool_dir": tmp_path / "spool",
            "stall_after_s": 1.0,
            "produce_timeout_s": 1.0,
        }
    )
    secret = s.webhook_secret.get_secret_value()
    f = SampleFactory(41)
    disk = threading.Event()
    fdatasync = os.fdatasync

    def stalled(fd: int) -> None:
        disk.wait(120)
        fdatasync(fd)

    spool = open_spool(s)
    assert spool is not None
    producer = producer_for(s)
    release = hold_probe(producer)
    producer._on_error(KafkaError(KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down"))
    server = await ingress_server(create_app(s, producer, spool))
    monkeypatch.setattr("sentpipe.ingress.spool.os.fdatasync", stalled)

    def count(name: str) -> float:
        return REGISTRY.get_sample_value(f"sentpipe_spool_{name}_total") or 0.0

    errors, spooled = count("write_errors"), count("spooled")
    try:
        assert server.port is not None
        for _ in range(2):  # the first waits for its write; the second is refused at once
            body = f.inbound().body
            status, headers, answer = await exchange(
                server.port, head("/webhooks/sent", signed(secret, body), len(body)), body, timeout=20
            )
            assert (status, orjson.loads(answer)["error"]) == (503, "spool_write_failed"), answer
            assert headers["retry-after"]
        assert REGISTRY.get_sample_value("sentpipe_ingress_accepting") == 0
        assert count("write_errors") == errors + 1  # one write stalled, however many requests it failed
        status, _, answer = await exchange(server.port, b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 503 and "not finished a write" in orjson.loads(answer)["detail"], answer
        await asyncio.sleep(1.5)  # past SENTPIPE_STALL_AFTER_S
        status, _, answer = await exchange(server.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (status, orjson.loads(answer)["error"]) == (503, "spool_write_stalled"), answer
        disk.set()  # the disk answers again: the late write lands (a duplicate at worst) and all is well
        for _ in range(200):
            if spool.write_running_s() == 0:
                break
            await asyncio.sleep(0.05)
        status, _, _ = await exchange(server.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 200 and spool.records == 1
        assert count("spooled") == spooled  # the late write's request was answered 503, not 200
        body = f.inbound().body
        status, _, answer = await exchange(
            server.port, head("/webhooks/sent", signed(secret, body), len(body)), body, timeout=20
        )
        assert status == 200 and orjson.loads(answer)["spooled"] is True, answer
        assert count("spooled") == spooled + 1
    finally:
        disk.set()
        release.set()
        await server.close()


async def test_shutdown_waits_for_the_spool_write_in_hand_before_closing_its_file(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The app's cleanup closed the spool (its segment's fd) while a thread still wrote and fdatasynced it:
    the write failed (EBADF) or, the number reused meanwhile, went to another file. It waits for it now."""
    s = settings.model_copy(update={"spool": True, "spool_dir": tmp_path / "spool"})
    disk = threading.Event()
    fdatasync = os.fdatasync

    def slow(fd: int) -> None:
        disk.wait(60)
        fdatasync(fd)

    spool = open_spool(s)
    assert spool is not None
    runner = web.AppRunner(create_app(s, producer_for(s), spool))
    await runner.setup()
    errors = REGISTRY.get_sample_value("sentpipe_spool_write_errors_total") or 0.0
    monkeypatch.setattr("sentpipe.ingress.spool.os.fdatasync", slow)
    record = SpoolRecord(f"{s.topic_prefix}events.raw", b"k", b"v", (), 1)
    appending = asyncio.ensure_future(spool.append(record))
    await asyncio.sleep(0.2)  # the write is in its thread, blocked in fdatasync
    threading.Timer(0.5, disk.set).start()  # the disk answers once the cleanup has begun
    try:
        await runner.cleanup()
        await appending  # written and durable: not a failed write
    finally:
        disk.set()
    assert (REGISTRY.get_sample_value("sentpipe_spool_write_errors_total") or 0.0) == errors
    st = status_of(process_dir(s.spool_dir, 0))
    assert (st.records, st.corrupt_frames) == (1, 0), st


def test_generated_request_ids_are_distinct_and_a_forked_child_draws_its_own() -> None:
    ids = [new_request_id() for _ in range(3000)]  # more than one batch
    assert len(set(ids)) == len(ids) and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: what would have been the parent's next ids must not come out here
        os.write(write, "".join(new_request_id() for _ in range(8)).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read, "rb") as fh:
        child = fh.read().decode()
    parent = "".join(new_request_id() for _ in range(8))
    assert len(child) == len(parent) == 256 and child != parent


@pytest.mark.parametrize(
    ("spool", "said"), [(False, "webhooks get 503"), (True, "webhooks are spooled (200)")]
)
def test_the_start_warning_says_what_webhooks_get_while_the_broker_is_away(
    settings: Settings, caplog: pytest.LogCaptureFixture, spool: bool, said: str
) -> None:
    """With the spool on, the warning said webhooks got 503 while they were answered 200 and spooled: an
    operator reading it mid-outage was told Sent was being refused."""
    away = settings.model_copy(update={"kafka_bootstrap": "127.0.0.1:9", "spool": spool})
    check_topic_limits(away, timeout=2)
    assert any(f"starting anyway; {said} until it answers" in rec.getMessage() for rec in caplog.records)


def test_a_body_limit_past_what_one_produce_request_carries_is_refused() -> None:
    """At 100 MiB a body's produce request passed the broker's socket.request.max.bytes (100 MiB by
    default): the broker dropped the connection, and the body got 503 until the produce timeout, not 413."""
    assert Settings(_env_file=None, max_body_bytes=64 * 1024 * 1024).max_body_bytes == 64 * 1024 * 1024
    with pytest.raises(ValidationError, match="max_body_bytes"):
        Settings(_env_file=None, max_body_bytes=64 * 1024 * 1024 + 1)
