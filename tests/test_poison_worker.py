"""Poison never stalls the pipeline: hostile records between ordinary ones, through the real processes.

Hostile bodies are sent signed through the ingress (validation dead-letters them there); records that an
older or buggy producer could still have written are put straight onto the raw and routed topics, so the
worker's own safety net (per-record isolation, SQLSTATE classification) is exercised against PostgreSQL.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
from pathlib import Path

import orjson
import psycopg
from confluent_kafka import Producer
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    ResourceType,
)

from sentpipe.processors.topics import ensure_topics, projections_group
from sentpipe.schemas import routing as r
from sentpipe.schemas.events import CanonicalEvent, EventType, frame
from sentpipe.schemas.samples import SampleFactory
from sentpipe.schemas.topics import Topics
from sentpipe.settings import Settings
from tests.http_tools import metric_sum, post_all, scrape
from tests.kafka_mock import produce_as_bytes
from tests.kafka_tools import group_offsets, read_topic
from tests.oracle import row_count
from tests.pipeline import (
    SEEDED_RECEIPT_MS,
    start_ingress,
    start_worker,
    wait_caught_up,
    wait_for,
    wait_until,
)
from tests.test_pipeline_e2e import assert_matches_oracle


def sent(
    payload: object, *, timestamp: object = "2025-10-31T10:10:42Z", sub_type: str = "message.delivered"
) -> bytes:
    return orjson.dumps(
        {"field": "message", "sub_type": sub_type, "timestamp": timestamp, "payload": payload}
    )


def nested(depth: int) -> object:
    doc: object = "x"
    for _ in range(depth):
        doc = {"a": doc}
    return doc


# 6 kB that PostgreSQL cannot compress below its index-row limit (a run of one letter compresses away).
INCOMPRESSIBLE_ID = "".join(hashlib.sha256(str(i).encode()).hexdigest() for i in range(94))[:6000]

HOSTILE_AT_INGRESS: dict[str, bytes] = {
    "timestamp 1e20": sent({"message_id": "m-1e20"}, timestamp=1e20),
    "timestamp -1e15": sent({"message_id": "m-neg"}, timestamp=-1e15),
    "timestamp 2**64-1": sent({"message_id": "m-u64"}, timestamp=2**64 - 1),
    "timestamp year 99999": sent({"message_id": "m-y"}, timestamp="99999-01-01T00:00:00Z"),
    # orjson refuses to write 300 levels; the standard library does.
    "nested 300 deep": json.dumps(
        {
            "field": "message",
            "sub_type": "message.delivered",
            "timestamp": "2025-10-31T10:10:42Z",
            "payload": {"message_id": "m-deep", "extra": nested(300)},
        }
    ).encode(),
    "NUL in inbound text": sent(
        {"from": "+1", "to": "+2", "text": "hi\u0000there"}, sub_type="message.received"
    ),
    "NUL in a payload key": sent({"message_id": "m-nulkey", "a\u0000b": 1}),
    "message id 6 kB": sent({"message_id": INCOMPRESSIBLE_ID}),
    "message id true": sent({"message_id": True}),
    "message id a list": sent({"message_id": ["m"]}),
    "envelope id an object": orjson.dumps(
        {
            "id": {"x": 1},
            "event": {"type": "message.status.updated"},
            "data": {"message_id": "m", "status": "sent"},
        }
    ),
    "status a number": orjson.dumps(
        {
            "id": "evt-st",
            "event": {"type": "message.status.updated"},
            "data": {"message_id": "m", "status": 5},
        }
    ),
}


def raw_record(body: bytes) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    key = hashlib.sha256(body).hexdigest().encode()
    return (
        key,
        body,
        r.raw_headers(
            tenant="default",
            received_at_ms=SEEDED_RECEIPT_MS,
            webhook_id="w",
            request_id="q",
            event_type=None,
        ),
    )


def canonical(event_id: str, message_id: str, data: dict[str, object]) -> tuple[bytes, bytes]:
    """A routed record as a buggy router could have written it: valid JSON, poison for PostgreSQL."""
    ev = {
        "id": event_id,
        "type": EventType.MESSAGE_STATUS.value,
        "tenant": "default",
        "occurred_at": "2025-10-31T10:10:42Z",
        "received_at": 1_761_905_442_000,
        "sub_type": "message.delivered",
        "shape": "sent",
        "subject": message_id,
        "status": "delivered",
        "data": data,
    }
    return f"default/{message_id[:50]}".encode(), orjson.dumps(ev)


def committed_at_end(settings: Settings, group: str, topics: list[str]) -> bool:
    from confluent_kafka import TopicPartition

    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    md = admin.list_topics(timeout=10)
    tps = [TopicPartition(t, p) for t in topics for p in md.topics[t].partitions]
    committed = group_offsets(settings.kafka_bootstrap, group, topics)
    from confluent_kafka import Consumer

    c = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": "probe-" + group})
    try:
        for tp in tps:
            low, high = c.get_watermark_offsets(tp, timeout=10)
            have = committed.get((tp.topic, tp.partition), -1001)
            if high > low and have < high:
                return False
        return True
    finally:
        c.close()


def test_poison_corpus_is_dead_lettered_and_every_ordinary_event_lands(
    settings: Settings, tmp_path: Path
) -> None:
    topics = Topics(settings.topic_prefix)
    db = settings.database_url.get_secret_value()
    secret = settings.webhook_secret.get_secret_value()
    ordinary = [s.body for s in SampleFactory(11).mix(120, "mixed")]
    keyless = SampleFactory(12).message_status("m-keyless", "delivered").body
    hostile = list(HOSTILE_AT_INGRESS.items())
    mixed: list[bytes] = list(ordinary)
    for i, (_, body) in enumerate(hostile):  # poison spread between ordinary events
        mixed.insert(1 + i * (len(ordinary) // len(hostile)), body)

    ingress, url, _ = start_ingress(settings, tmp_path)
    worker = start_worker(settings, tmp_path)
    try:
        # Records the ingress would refuse today, written as an older ingress or a buggy router could have.
        producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "message.max.bytes": 2_000_000})
        for body in (HOSTILE_AT_INGRESS["timestamp 1e20"], HOSTILE_AT_INGRESS["message id 6 kB"]):
            key, value, headers = raw_record(body)
            producer.produce(topics.raw, value, key, headers=headers)
        # Keys and tenants the dedup table cannot hold: a 1 MB key that does not compress stalled every
        # partition (its changelog write retried forever), a 70 kB tenant crash-looped the route agent.
        for key, tenant in (
            (base64.b64encode(os.urandom(800_000)), b"default"),
            (b"evt-\xff", b"default"),
            (b"evt-big-tenant", b"T" * 70_000),
        ):
            _, value, headers = raw_record(ordinary[0])
            headers = [(k, tenant if k == r.H_TENANT else v) for k, v in headers]
            producer.produce(topics.raw, value, key, headers=headers)
        for _ in range(3):  # no key: deduplicated on the id its body gives (it went through three times)
            _, value, headers = raw_record(keyless)
            producer.produce(topics.raw, value, None, headers=headers)
        for eid, mid, data in (
            ("db-54000", INCOMPRESSIBLE_ID, {}),  # index row too large: 54000, permanent
            ("db-22P05", "m-nul", {"text": "a\u0000b"}),  # NUL in jsonb: 22P05, permanent
        ):
            key, value = canonical(eid, mid, data)
            producer.produce(topics.message_status, value, key)
        # What the topic does not hold: a template's event on the status topic (it was stored as a message
        # with status "approved"), and inbound text that is an object (stored as the text "{'a': 1}").
        key, value = canonical("wrong-topic", "m-wrong-topic", {})
        value = orjson.dumps({**orjson.loads(value), "type": EventType.TEMPLATE_APPROVAL.value})
        producer.produce(topics.message_status, value, key)
        key, value = canonical("inbound-object", "m-inbound-object", {"from": {"a": 1}, "text": ["x"]})
        value = orjson.dumps({**orjson.loads(value), "type": EventType.MESSAGE_INBOUND.value})
        producer.produce(topics.message_inbound, value, key)
        assert producer.flush(10) == 0

        statuses = asyncio.run(post_all(f"{url}/webhooks/sent", mixed, secret))
        assert statuses.count(200) == len(mixed), statuses

        wait_until(
            lambda: row_count(db) >= len(set(ordinary)) + 1,
            120,
            "ordinary events projected",
            worker.proc.tail,
        )
        dlq_expected = len(hostile) + 9

        def dlq() -> list[tuple[bytes, bytes]]:
            recs = read_topic(settings.kafka_bootstrap, topics.dlq, idle=0.5)
            return [(rec.headers[r.H_DLQ_STAGE], rec.headers[r.H_DLQ_ERROR_CLASS]) for rec in recs]

        letters = wait_for(dlq, lambda got: len(got) >= dlq_expected, 60, "every poison record dead-lettered")
        assert len(letters) == dlq_expected, letters
        records = read_topic(settings.kafka_bootstrap, topics.dlq, idle=0.5)
        stages = sorted(stage.decode() for stage, _ in letters)
        assert stages.count("ingress") == len(hostile)
        assert stages.count("route") == 5
        route_classes = sorted(c.decode() for stage, c in letters if stage == b"route")
        assert route_classes.count("bad_tenant") == 1 and route_classes.count("bad_event_id") >= 2, letters
        assert stages.count("project") == 4
        by_id = {
            CanonicalEvent.from_json(rec.value).id: rec.headers[r.H_DLQ_ERROR_CLASS]
            for rec in records
            if rec.headers[r.H_DLQ_STAGE] == b"project"
        }
        assert by_id == {
            "db-54000": b"sqlstate_54000",
            "db-22P05": b"sqlstate_22P05",
            "wrong-topic": b"bad_canonical_event",
            "inbound-object": b"bad_canonical_event",
        }
        assert all(error_class for _, error_class in letters)

        assert_matches_oracle(db, [*ordinary, keyless])
        keyless_id = hashlib.sha256(keyless).hexdigest()
        routed = read_topic(settings.kafka_bootstrap, topics.message_status, idle=0.5)
        assert len([rec for rec in routed if orjson.loads(rec.value)["id"] == keyless_id]) == 1
        wait_until(
            lambda: committed_at_end(settings, settings.app_id, [topics.raw]),
            60,
            "router committed to the end",
        )
        wait_until(
            lambda: committed_at_end(settings, projections_group(settings), list(topics.routed)),
            60,
            "projector committed to the end",
        )
        log = worker.proc.tail(100_000)
        for sign in ("Traceback", "crashed", "Restarting", "stalled"):
            assert sign not in log, f"{sign!r} in the worker log"
    finally:
        worker.stop()
        ingress.stop()


def test_two_tenants_may_use_the_same_event_id(settings: Settings, tmp_path: Path) -> None:
    secrets = tmp_path / "secrets.json"
    secrets.write_text('{"beta": "whsec_YmV0YS10ZW5hbnQtc2VjcmV0LWZvci10ZXN0cw=="}')
    s = settings.model_copy(update={"secrets_file": secrets})
    body_a = orjson.dumps(
        {
            "id": "evt_1",
            "event": {"type": "message.status.updated"},
            "created_at": "2025-10-31T10:10:42Z",
            "data": {"message_id": "m-a", "message_status": "sent"},
        }
    )
    body_b = orjson.dumps(
        {
            "id": "evt_1",
            "event": {"type": "message.status.updated"},
            "created_at": "2025-10-31T10:10:43Z",
            "data": {"message_id": "m-b", "message_status": "delivered"},
        }
    )
    ingress, url, _ = start_ingress(s, tmp_path)
    worker = start_worker(s, tmp_path)
    try:
        a = asyncio.run(
            post_all(f"{url}/webhooks/sent", [body_a, body_a], s.webhook_secret.get_secret_value())
        )
        b = asyncio.run(
            post_all(f"{url}/webhooks/sent/beta", [body_b], "whsec_YmV0YS10ZW5hbnQtc2VjcmV0LWZvci10ZXN0cw==")
        )
        assert a == [200, 200] and b == [200]
        db = s.database_url.get_secret_value()

        def rows() -> list[tuple[str, str, str]]:
            with psycopg.connect(db) as c:
                return c.execute(
                    "SELECT tenant, event_id, message_id FROM message_events ORDER BY tenant"
                ).fetchall()

        wait_until(lambda: len(rows()) >= 2, 60, "both tenants' events projected", worker.proc.tail)
        assert rows() == [("beta", "evt_1", "m-b"), ("default", "evt_1", "m-a")]
        with psycopg.connect(db) as c:
            status = c.execute(
                "SELECT tenant, message_id, status FROM message_status ORDER BY tenant"
            ).fetchall()
        assert status == [("beta", "m-b", "delivered"), ("default", "m-a", "sent")]
    finally:
        worker.stop()
        ingress.stop()


def test_an_id_the_router_dead_letters_does_not_swallow_its_corrected_delivery(
    settings: Settings, tmp_path: Path
) -> None:
    """The router marked an event's id seen before routing it, and kept the mark when the event was dead-
    lettered (no status, say): the corrected delivery that followed under the same id, answered 200, was
    dropped as a duplicate, and the only copy kept was the broken one. Sent in one batch and in two."""
    topics = Topics(settings.topic_prefix)

    def status_event(event_id: str, data: dict[str, str]) -> bytes:
        doc = {"id": event_id, "event": {"type": "message.status.updated"}, "data": data}
        return orjson.dumps({**doc, "created_at": "2026-01-01T00:00:00Z"})

    broken = [status_event(f"fix-{i}", {"message_id": f"m-fix-{i}"}) for i in range(2)]
    fixed = [status_event(f"fix-{i}", {"message_id": f"m-fix-{i}", "status": "delivered"}) for i in range(2)]
    ingress, url, _ = start_ingress(settings, tmp_path)
    worker = start_worker(settings, tmp_path)
    secret = settings.webhook_secret.get_secret_value()
    db = settings.database_url.get_secret_value()
    try:
        # fix-0: the broken one and the fixed one together; fix-1: the fixed one once the broken one is in
        # the DLQ (its mark settled).
        for body in (broken[0], fixed[0], broken[1]):  # one after the other: in this order on the topic
            assert asyncio.run(post_all(f"{url}/webhooks/sent", [body], secret)) == [200]
        read_topic(settings.kafka_bootstrap, topics.dlq, at_least=2, timeout=60)
        wait_caught_up(settings, 60, "the broken events routed", worker.proc.tail)
        assert asyncio.run(post_all(f"{url}/webhooks/sent", [fixed[1]], secret)) == [200]

        def rows() -> list[tuple[str, str]]:
            with psycopg.connect(db) as c:
                return c.execute("SELECT event_id, status FROM message_events ORDER BY event_id").fetchall()

        wait_until(lambda: len(rows()) >= 2, 60, "both corrected events projected", worker.proc.tail)
        assert rows() == [("fix-0", "delivered"), ("fix-1", "delivered")]
    finally:
        worker.stop()
        ingress.stop()


def test_routed_and_duplicates_are_counted_for_what_the_broker_took(
    settings: Settings, tmp_path: Path
) -> None:
    """The router counted an event as routed when it decided to, before the broker had it: a record the
    broker refused (too large for its topic) was counted routed and dead-lettered both, and a batch the
    broker never took was counted again, duplicates too, after every restart."""
    topics = Topics(settings.topic_prefix)
    worker = start_worker(settings, tmp_path)
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    try:
        # Lowered once the worker has checked the limits at its start: the broker now refuses big records.
        small = ConfigEntry("max.message.bytes", "1500", incremental_operation=AlterConfigOpType.SET)
        resource = ConfigResource(ResourceType.TOPIC, topics.message_inbound, incremental_configs=[small])
        for fut in admin.incremental_alter_configs([resource]).values():
            fut.result(30)
        big = raw_record(
            sent({"from": "+1", "to": "+2", "text": INCOMPRESSIBLE_ID}, sub_type="message.received")
        )
        status = raw_record(sent({"message_id": "m-counted", "status": "delivered"}))
        producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
        for key, value, headers in (big, status, status):  # the status event twice: one duplicate
            producer.produce(topics.raw, value, key, headers=headers)
        assert producer.flush(30) == 0
        read_topic(settings.kafka_bootstrap, topics.dlq, at_least=1, timeout=90)
        wait_caught_up(settings, 90, "the three records settled", worker.proc.tail)

        def counted() -> tuple[float, float, float]:
            samples = scrape(worker.metrics_port)
            routed = 'sentpipe_events_routed_total{type="%s"}'
            return (
                samples[routed % EventType.MESSAGE_INBOUND.value],
                samples[routed % EventType.MESSAGE_STATUS.value],
                metric_sum(samples, "sentpipe_duplicates_dropped_total"),
            )

        wait_until(lambda: counted()[1] >= 1, 30, "the status event counted", worker.proc.tail)
        assert counted() == (0.0, 1.0, 1.0)
    finally:
        worker.stop()


def test_a_batch_held_by_a_missing_routed_topic_is_a_stall_not_records_never_fetched(
    settings: Settings, tmp_path: Path
) -> None:
    """Every record waiting was with the router, settling against a routed topic the broker lacked, yet each
    lag check called them fetched by nobody ("raw records waiting but never fetched", resuming the
    partition) next to the real stall: it pointed the operator at Faust's fetcher, not at the topic."""
    topics = Topics(settings.topic_prefix)
    worker = start_worker(settings, tmp_path, worker_role="route", stall_after_s=20)
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    try:
        ready = f"http://127.0.0.1:{worker.metrics_port}/readyz"
        worker.proc.wait_http(ready)
        admin.delete_topics([topics.message_status])[topics.message_status].result(30)
        producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
        for i in range(5):
            key, value, headers = raw_record(sent({"message_id": f"m-held-{i}", "status": "delivered"}))
            producer.produce(topics.raw, value, key, headers=headers)
        assert producer.flush(30) == 0
        wait_until(lambda: "worker stalled" in worker.proc.tail(400), 120, "the stall said", worker.proc.tail)
        assert "never fetched" not in worker.proc.tail(400)
        assert "fetched but never routed" not in worker.proc.tail(400)
        ensure_topics(settings)  # the topic back: the held batch lands, nothing lost
        read_topic(settings.kafka_bootstrap, topics.message_status, at_least=5, timeout=120)
    finally:
        worker.stop()


def test_a_raw_record_whose_header_name_is_not_utf8_is_routed_and_its_neighbours_go_on(
    settings: Settings, tmp_path: Path
) -> None:
    """aiokafka cannot read a record another producer wrote with a header name that is not UTF-8: every fetch
    of its partition raised UnicodeDecodeError, the records of its batch before it included, and the router
    stopped there for good (the watchdog restarting it into the same fetch). Now the name is read with
    replacement characters and the record is routed like any other, with the rest of its batch."""
    topics = Topics(settings.topic_prefix)
    db = settings.database_url.get_secret_value()
    bodies = [s.body for s in SampleFactory(34).mix(12, "mixed")]
    records = []
    for i, body in enumerate(bodies):
        webhook_id = f"w-{i}"
        headers = r.raw_headers(
            tenant="default",
            received_at_ms=SEEDED_RECEIPT_MS,
            webhook_id=webhook_id,
            request_id="q",
            event_type=None,
        )
        key = frame(body, webhook_id=webhook_id).event_id.encode()  # as the ingress keys it
        named = [(name.encode(), header) for name, header in headers]
        if i in (4, 9):  # inside the batch, with good records before and after it
            named.append((b"x-\xff\xfe", b"1"))
        records.append((key, body, named))
    worker = start_worker(settings, tmp_path)
    try:
        worker.proc.wait_http(f"http://127.0.0.1:{worker.metrics_port}/readyz")
        produce_as_bytes(settings.kafka_bootstrap, topics.raw, 0, records)
        wait_until(lambda: row_count(db) >= len(set(bodies)), 120, "every event projected", worker.proc.tail)
        assert_matches_oracle(db, bodies)
        wait_until(
            lambda: committed_at_end(settings, settings.app_id, [topics.raw]),
            60,
            "router committed to the end",
        )
        log = worker.proc.tail(100_000)
        assert "header names are not all UTF-8" in log, log
        assert "Traceback" not in log and "UnicodeDecodeError" not in log, log
    finally:
        worker.stop()
