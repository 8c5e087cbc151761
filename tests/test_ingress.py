"""The ingress against the real broker: what is stored, and every edge of README's "How it works" table."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from prometheus_client import REGISTRY

from sentpipe.ingress.app import create_app, producer_for
from sentpipe.schemas import routing as r
from sentpipe.schemas.samples import SampleFactory
from sentpipe.schemas.signature import signature_headers
from sentpipe.schemas.topics import Topics
from sentpipe.settings import Settings
from tests.http_tools import ingress_server
from tests.kafka_tools import read_topic

SECRET = Settings().webhook_secret.get_secret_value()


def signed(
    body: bytes, secret: str = SECRET, webhook_id: str = "msg_1", ts: int | None = None
) -> dict[str, str]:
    return {
        **signature_headers(secret, webhook_id, ts or int(time.time()), body),
        "content-type": "application/json",
    }


async def post(
    url: str, body: bytes, headers: dict[str, str]
) -> tuple[int, dict[str, object], dict[str, str]]:
    async with aiohttp.ClientSession() as s, s.post(url, data=body, headers=headers) as resp:
        return resp.status, orjson.loads(await resp.read()), dict(resp.headers)


async def test_each_type_in_both_shapes_lands_on_raw_byte_identical(
    ingress: str, settings: Settings, topics: Topics
) -> None:
    f = SampleFactory(11)
    samples = [f.message_status("m1", "sent", shape) for shape in ("sent", "guide")]
    samples += [f.inbound(shape) for shape in ("sent", "guide")]
    samples += [f.template("t1", "approved", shape) for shape in ("sent", "guide")]
    ids = []
    for i, s in enumerate(samples):
        status, body, _ = await post(
            f"{ingress}/webhooks/sent", s.body, signed(s.body, webhook_id=f"msg_{i}")
        )
        assert status == 200, body
        ids.append(body["event_id"])
    records = {
        rec.key: rec for rec in read_topic(settings.kafka_bootstrap, topics.raw, at_least=len(samples))
    }
    assert len(records) == len(samples)
    for s, event_id, i in zip(samples, ids, range(len(samples)), strict=True):
        rec = records[str(event_id).encode()]
        assert rec.value == s.body
        assert rec.headers[r.H_TENANT] == b"default"
        assert rec.headers[r.H_TYPE] == s.type.value.encode()
        assert rec.headers[r.H_WEBHOOK_ID] == f"msg_{i}".encode()
        assert rec.headers[r.H_SIGNATURE_VERIFIED] == b"true"
        assert abs(int(rec.headers[r.H_RECEIVED_AT]) - time.time() * 1000) < 120_000
        assert rec.headers[r.H_REQUEST_ID]
    guide = samples[1]
    assert str(guide.doc["id"]) in ids


async def test_edges_answer_as_the_table_says_and_store_nothing(
    ingress: str, settings: Settings, topics: Topics
) -> None:
    body = SampleFactory(3).inbound().body
    url = f"{ingress}/webhooks/sent"
    cases = [
        (url, body, {"content-type": "application/json"}, 401, "missing_headers"),
        (url, body, signed(body, secret="whsec_" + "QUJD" * 8), 401, "invalid_signature"),
        (url, body, signed(body, ts=int(time.time()) - 3600), 401, "stale_timestamp"),
        (url, body, {**signed(body), "x-webhook-signature": "garbage"}, 401, "malformed_signature"),
        (f"{url}/nobody", body, signed(body), 401, "invalid_signature"),  # tenants are not probeable
        (url, body, {**signed(body), "content-type": "text/plain"}, 415, "unsupported_media_type"),
        (url, b"x" * (settings.max_body_bytes + 1), signed(b"x"), 413, "body_too_large"),
    ]
    for target, data, headers, want, code in cases:
        status, answer, _ = await post(target, data, headers)
        assert (status, answer["error"]) == (want, code), (target, headers)
        assert SECRET not in orjson.dumps(answer).decode()
    async with aiohttp.ClientSession() as s, s.get(url) as resp:
        assert resp.status == 405 and (await resp.json())["error"] == "method_not_allowed"

    async def chunks():  # type: ignore[no-untyped-def]
        for _ in range(settings.max_body_bytes // 65536 + 2):
            yield b"y" * 65536

    async with aiohttp.ClientSession() as s, s.post(url, data=chunks(), headers=signed(b"")) as resp:
        assert resp.status == 413
    # Every answer came after any produce would have been acknowledged: the watermarks are final.
    assert read_topic(settings.kafka_bootstrap, topics.raw) == []
    assert read_topic(settings.kafka_bootstrap, topics.dlq) == []


async def test_signed_but_malformed_body_goes_to_dlq_with_200(
    ingress: str, settings: Settings, topics: Topics
) -> None:
    for body in (b"{not json", b'{"neither":"shape"}'):
        status, answer, _ = await post(f"{ingress}/webhooks/sent", body, signed(body))
        assert status == 200 and answer["outcome"] == "dead_lettered"
    dlq = read_topic(settings.kafka_bootstrap, topics.dlq, at_least=2)
    assert sorted(rec.value for rec in dlq) == sorted([b"{not json", b'{"neither":"shape"}'])
    assert {rec.headers[r.H_DLQ_ERROR_CLASS] for rec in dlq} == {b"not_json", b"no_envelope"}
    assert all(rec.headers[r.H_DLQ_STAGE] == b"ingress" for rec in dlq)
    assert read_topic(settings.kafka_bootstrap, topics.raw) == []


async def test_tenants_and_rotation_from_the_secrets_file(settings: Settings, tmp_path: Path) -> None:
    secrets = tmp_path / "secrets.json"
    old, new = "whsec_" + "b2xk" * 8, "whsec_" + "bmV3" * 8
    secrets.write_bytes(orjson.dumps({"acme": [old, new]}))
    s = settings.model_copy(update={"secrets_file": secrets})
    server = await ingress_server(create_app(s, producer_for(s)))
    try:
        body = SampleFactory(5).inbound().body
        base = f"http://127.0.0.1:{server.port}/webhooks/sent"
        assert (await post(f"{base}/acme", body, signed(body, secret=old)))[0] == 200
        assert (await post(f"{base}/acme", body, signed(body, secret=new)))[0] == 200
        assert (await post(f"{base}/acme", body, signed(body)))[0] == 401  # the default tenant's secret
        assert (await post(base, body, signed(body)))[0] == 200
        # A URL registered with a trailing slash: the same endpoints, not 404 for every delivery.
        assert (await post(f"{base}/acme/", body, signed(body, secret=new)))[0] == 200
        assert (await post(f"{base}/", body, signed(body)))[0] == 200
        assert (await post(f"{base}/acme/", body, signed(body)))[0] == 401
    finally:
        await server.close()
    recs = read_topic(s.kafka_bootstrap, Topics(s.topic_prefix).raw, at_least=5)
    tenants = sorted(rec.headers[r.H_TENANT] for rec in recs)
    assert tenants == [b"acme", b"acme", b"acme", b"default", b"default"]


async def test_full_local_queue_answers_503_at_once_instead_of_piling_up() -> None:
    # A broker that accepts connections and never answers (so the producer cannot know it is down) and room
    # for one record: the first request waits for its (failing) delivery, the second finds the queue full
    # and is turned away without waiting.
    import asyncio

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(-1)  # hold the connection, say nothing

    mute = await asyncio.start_server(silent, "127.0.0.1", 0)
    mute_port = mute.sockets[0].getsockname()[1]
    s = Settings(kafka_bootstrap=f"127.0.0.1:{mute_port}", producer_max_in_flight=1, produce_timeout_s=3)
    producer = producer_for(s)
    server = await ingress_server(create_app(s, producer))
    try:
        url = f"http://127.0.0.1:{server.port}/webhooks/sent"
        f = SampleFactory(8)
        first, second = f.inbound().body, f.inbound().body

        # Told when a record is in the local queue (its length would also count librdkafka's error events).
        enqueued = asyncio.Event()
        produce = producer.produce

        def produce_and_tell(*args: Any, **kwargs: Any) -> Any:
            fut = produce(*args, **kwargs)
            enqueued.set()
            return fut

        producer.produce = produce_and_tell  # type: ignore[method-assign]
        produce_s = _sample("sentpipe_ingress_produce_seconds_sum")
        waiting = asyncio.create_task(post(url, first, signed(first)))
        await asyncio.wait_for(enqueued.wait(), 10)  # the first record has taken the only slot
        assert not waiting.done()
        status, body, headers = await post(url, second, signed(second))
        assert (status, body["error"]) == (503, "broker_unavailable") and headers.get("Retry-After")
        assert "local_queue_full" in str(body["detail"])
        status, body, _ = await waiting
        assert status == 503 and "local_queue_full" not in str(body["detail"])
        # The produce that timed out is in the latency the alert reads: counted only when delivered, a
        # broker slower than the timeout left no sample and SentpipeIngressProduceSlow went quiet.
        assert _sample("sentpipe_ingress_produce_seconds_sum") - produce_s >= s.produce_timeout_s
    finally:
        await server.close()
        mute.close()


def _sample(name: str, **labels: str) -> float:
    value = REGISTRY.get_sample_value(name, labels)
    return value or 0.0


async def test_the_label_sets_alerts_read_exist_at_zero_before_any_request(ingress: str) -> None:
    """increase() needs a sample before the first failure, or the first 5xx, 401 or dead letter of a label
    set is never seen: every bounded label set an alert reads is exposed from the start."""
    for outcome, status in (("unavailable", "503"), ("overloaded", "503"), ("error", "500")):
        for tenant in ("default", "unknown"):
            labels = {"tenant": tenant, "outcome": outcome, "status": status}
            assert REGISTRY.get_sample_value("sentpipe_ingress_requests_total", labels) is not None, labels
    unknown = {"tenant": "unknown", "outcome": "signature_unknown_tenant", "status": "401"}
    assert REGISTRY.get_sample_value("sentpipe_ingress_requests_total", unknown) is not None
    for reason in ("overloaded", "body_timeout", "broker_down", "spool_full"):
        assert REGISTRY.get_sample_value("sentpipe_ingress_refused_total", {"reason": reason}) is not None
    for reason in ("not_json", "too_deep", "nul_character"):
        labels = {"stage": "ingress", "reason": reason}
        assert REGISTRY.get_sample_value("sentpipe_dlq_events_total", labels) is not None, labels


async def test_every_request_reaches_the_loop_metrics(ingress: str) -> None:
    """The request counter and the three histograms are lock-free collectors (sentpipe/loop_metrics.py):
    every answered request shows in them."""
    names = (
        "sentpipe_ingress_request_seconds_count",
        "sentpipe_ingress_body_bytes_count",
        "sentpipe_ingress_body_bytes_sum",
        "sentpipe_ingress_produce_seconds_count",
    )
    accepted = {"tenant": "default", "outcome": "accepted", "status": "200"}
    before = {n: _sample(n) for n in names} | {"ok": _sample("sentpipe_ingress_requests_total", **accepted)}
    bodies = [s.body for s in SampleFactory(21).mix(5)]
    for i, body in enumerate(bodies):
        status, answer, _ = await post(f"{ingress}/webhooks/sent", body, signed(body, webhook_id=f"msg_t{i}"))
        assert status == 200, answer
    status, _, _ = await post(
        f"{ingress}/webhooks/sent", bodies[0], signed(bodies[0], secret="whsec_d3Jvbmc=")
    )
    assert status == 401
    after = {n: _sample(n) for n in names} | {"ok": _sample("sentpipe_ingress_requests_total", **accepted)}
    assert after["ok"] - before["ok"] == len(bodies)
    assert (
        after["sentpipe_ingress_request_seconds_count"] - before["sentpipe_ingress_request_seconds_count"]
        == 6
    )
    assert (
        after["sentpipe_ingress_produce_seconds_count"] - before["sentpipe_ingress_produce_seconds_count"]
        == 5
    )
    assert after["sentpipe_ingress_body_bytes_count"] - before["sentpipe_ingress_body_bytes_count"] == 5
    assert after["sentpipe_ingress_body_bytes_sum"] - before["sentpipe_ingress_body_bytes_sum"] == sum(
        len(b) for b in bodies
    )


async def test_a_rotation_signature_on_a_repeated_header_line_or_joined_by_a_proxy_is_accepted(
    ingress: str, settings: Settings, topics: Topics
) -> None:
    """While a secret rotates, the entry of the secret this receiver knows may come on a second
    `x-webhook-signature` line, or, joined by a proxy, after a ", ": HTTP makes both the same as one line.
    Only the first line was read, and a trailing comma spoiled its entry: 401s, which Sent counts towards
    disabling the webhook."""
    from multidict import CIMultiDict

    body = SampleFactory(8).inbound().body
    now = int(time.time())
    ours = signature_headers(SECRET, "msg_r", now, body)["x-webhook-signature"]
    theirs = signature_headers("whsec_" + "bmV3" * 8, "msg_r", now, body)["x-webhook-signature"]
    base = [
        ("content-type", "application/json"),
        ("x-webhook-id", "msg_r"),
        ("x-webhook-timestamp", str(now)),
    ]
    answers = []
    async with aiohttp.ClientSession() as session:
        for signatures in ([theirs, ours], [f"{ours}, {theirs}"], [f"{theirs}, {theirs}", theirs]):
            headers = CIMultiDict([*base, *(("x-webhook-signature", v) for v in signatures)])
            async with session.post(f"{ingress}/webhooks/sent", data=body, headers=headers) as resp:
                answers.append((resp.status, orjson.loads(await resp.read()).get("error")))
    assert answers == [(200, None), (200, None), (401, "invalid_signature")]
    assert len(read_topic(settings.kafka_bootstrap, topics.raw, at_least=2)) == 2
