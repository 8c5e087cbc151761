"""Replay against the real broker and database: restoring truncated projections, and exact selection.

Events go through the real ingress (and worker, where projections matter); `sentpipe replay` runs as a
subprocess, dry-run counts are taken from `processors.replay.replay` itself.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
from confluent_kafka import Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from sentpipe.kafka import BrokerUnavailable
from sentpipe.processors.history import Cursor, HistoryQuery, search
from sentpipe.processors.offsets import Log, OpsError, Window, make_window, timestamp_ms
from sentpipe.processors.replay import Filter, RunResult, decide, failure_line, parse_types, replay
from sentpipe.schemas import routing as r
from sentpipe.schemas.events import EventType, frame
from sentpipe.schemas.samples import SampleFactory
from sentpipe.schemas.topics import Topics
from sentpipe.settings import Settings
from tests.http_tools import metric_sum, post_all, scrape
from tests.kafka_mock import produce_as_bytes
from tests.kafka_tools import read_topic, record_count, wait_topics_ready
from tests.oracle import row_count
from tests.pipeline import deliver, start_ingress, start_worker, wait_caught_up, wait_for
from tests.services import Services
from tests.test_ops_cli import sentpipe, sentpipe_interrupted
from tests.test_pipeline_e2e import assert_matches_oracle, deliveries

TABLES = {
    "message_events": "event_id",
    "message_status": "tenant, message_id",
    "inbound_messages": "event_id",
    "template_events": "event_id",
    "template_status": "tenant, template_id",
}


def snapshot(db: str, *, updated_at: bool = False) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every projection table, in key order (`updated_at` only on request: it is now())."""
    out = {}
    with psycopg.connect(db) as c:
        for table, key in TABLES.items():
            cols = [
                row[0]
                for row in c.execute(
                    "SELECT column_name FROM information_schema.columns"
                    " WHERE table_schema = current_schema() AND table_name = %s ORDER BY ordinal_position",
                    (table,),
                )
                if updated_at or row[0] != "updated_at"
            ]
            out[table] = c.execute(f"SELECT {', '.join(cols)} FROM {table} ORDER BY {key}").fetchall()
    return out


def iso(ms: float) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat()


def projected(port: int) -> float:
    """Routed events the worker has committed to PostgreSQL (projection batches, all types)."""
    return sum(
        v
        for k, v in scrape(port).items()
        if k.startswith("sentpipe_events_processed_total{") and 'handler="projection"' in k
    )


def test_replay_restores_truncated_projections_exactly_and_a_second_replay_changes_nothing(
    settings: Settings, topics: Topics, tmp_path: Path
) -> None:
    db = settings.database_url.get_secret_value()
    unique, to_send = deliveries(400, 0.2, seed=31)
    since = iso(time.time() * 1000 - 60_000)
    ingress, url, _ = start_ingress(settings, tmp_path)
    worker = start_worker(settings, tmp_path)
    try:
        deliver(settings, url, to_send, worker, len(unique))
        wait_caught_up(settings, 60, "the worker caught up", worker.proc.tail)
        assert_matches_oracle(db, unique)
        before = snapshot(db)
        n_raw = len(read_topic(settings.kafka_bootstrap, topics.raw))
        assert n_raw >= len(to_send)  # every delivery, duplicates included

        # A restore from an old backup, or an operator's mistake: the projections are gone.
        with psycopg.connect(db, autocommit=True) as c:
            c.execute(f"TRUNCATE {', '.join(TABLES)}")
        assert row_count(db) == 0

        res = sentpipe(settings, "replay", "--since", since)
        assert res.returncode == 0, res.stderr
        wait_for(
            lambda: snapshot(db),
            lambda rows: rows == before,
            120,
            "the replay restored every row",
            worker.proc.tail,
        )
        wait_caught_up(settings, 60, "replay fully applied", worker.proc.tail)
        # Replay bypasses the dedup table: every raw record, duplicates too, is applied again.
        assert projected(worker.metrics_port) >= len(unique) + n_raw
        assert_matches_oracle(db, unique)
        restored = snapshot(db, updated_at=True)

        res = sentpipe(settings, "replay", "--since", since)
        assert res.returncode == 0, res.stderr
        wait_caught_up(settings, 60, "second replay applied", worker.proc.tail)
        assert projected(worker.metrics_port) >= len(unique) + 2 * n_raw
        assert snapshot(db, updated_at=True) == restored  # not even updated_at moved
        samples = scrape(worker.metrics_port)
        assert metric_sum(samples, "sentpipe_dlq_events_total") == 0
    finally:
        worker.stop()
        ingress.stop()
    replayed = [
        rec
        for t in topics.routed
        for rec in read_topic(settings.kafka_bootstrap, t)
        if r.H_REPLAY_ID in rec.headers
    ]
    assert len(replayed) == 2 * n_raw
    assert len({rec.headers[r.H_REPLAY_ID] for rec in replayed}) == 2  # one fresh id per run


MALFORMED = b'{"field":"messages","sub_type":"message.sent","payload":{"note":"no message id"}}'
UNROUTED = b'{"field":"account","sub_type":"account.updated","timestamp":"2026-01-01T00:00:00Z","payload":{}}'


# --- pure parts (no broker) -----------------------------------------------------------------------------
def test_window_parsing_and_its_one_line_errors() -> None:
    w = make_window(since="2026-01-01", until="2026-01-01T02:00:00+01:00", from_offsets=["1:5"])
    assert w.since_ms == int(datetime(2026, 1, 1, tzinfo=UTC).timestamp() * 1000)  # no zone: UTC
    assert make_window(until="1970-01-01T00:00:00.001Z").until_ms == 1  # selects a record stamped 0
    w = make_window(from_offsets=["1:5"], to_offsets=["1:9", "2:3"])
    assert (w.named_partitions, dict(w.from_offsets), dict(w.to_offsets)) == ({1, 2}, {1: 5}, {1: 9, 2: 3})
    for kwargs, message in [
        ({"since": "2026-01-01T01:00:00+01:00", "until": "2026-01-01T00:00:00Z"}, "time range is empty"),
        ({"from_offsets": ["1:5", "1:6"]}, "names partition 1 twice"),
        ({"to_offsets": ["1"]}, "PARTITION:OFFSET"),
        ({"until": ""}, "ISO-8601"),
        ({"since": "9999-12-31T23:59:59Z"}, r"^--since 9999-12-31T23:59:59Z is in the future"),
        ({"until": "1970-01-01T00:00:00Z"}, r"^--until 1970-01-01T00:00:00Z is the epoch's first instant"),
        ({"until": "1970-01-01"}, r"^--until 1970-01-01 is the epoch's first instant"),
    ]:
        with pytest.raises(OpsError, match=message):
            make_window(**kwargs)
    with pytest.raises(OpsError, match=r"unknown event type 'message\.sent'"):
        parse_types(["message.sent"])


def test_headers_read_alike_from_every_client_shape() -> None:
    """confluent-kafka hands over a list of pairs (or None), aiokafka and Faust a list or a dict."""
    pairs = [(r.H_TENANT, b"acme"), ("gone", None), ("text", "caf\u00e9"), (r.H_TENANT, b"last")]
    assert r.header_list(pairs) == [
        (r.H_TENANT, b"acme"),
        ("text", "caf\u00e9".encode()),
        (r.H_TENANT, b"last"),
    ]
    assert r.header_map(pairs) == {r.H_TENANT: b"last", "text": "caf\u00e9".encode()}
    assert r.header_map({r.H_TENANT: b"acme", "gone": None}) == {r.H_TENANT: b"acme"}
    assert r.header_list(None) == [] and r.header_map(None) == {}


def test_decide_routes_like_the_worker_and_filters_on_what_routing_found() -> None:
    s, topics = Settings(), Topics("x.")
    body = SampleFactory(1).inbound().body
    event_id = frame(body, webhook_id=None).event_id
    headers = [(r.H_TENANT, b"acme"), (r.H_TYPE, b"message.inbound.received"), (r.H_RECEIVED_AT, b"1000")]

    def run(key: bytes | None, value: bytes, flt: Filter, **window: Any) -> Any:
        return decide(
            key, value, headers, 5_000, window=make_window(**window), flt=flt, settings=s, topics=topics
        )

    d = run(event_id.encode(), body, Filter(tenants=frozenset({"acme"})))
    assert (d.action, d.type, d.tenant, d.event_id) == ("replay", EventType.MESSAGE_INBOUND, "acme", event_id)
    assert d.routed.topic == topics.message_inbound and d.routed.key == f"acme/{event_id}".encode()
    assert run(event_id.encode(), body, Filter(tenants=frozenset({"other"}))).action == "skip"
    assert run(event_id.encode(), body, Filter(event_ids=frozenset({"nope"}))).action == "skip"
    assert run(None, body, Filter(event_ids=frozenset({event_id}))).action == "replay"  # id from the body
    assert run(event_id.encode(), body, Filter(), since="1970-01-01T00:00:06Z").action == "skip"  # too old
    bad = run(b"k", MALFORMED, Filter(types=parse_types(["message.inbound.received"])))
    assert (bad.action, bad.error.reason if bad.error else None) == ("fail", "missing_message_id")
    assert run(b"k", MALFORMED, Filter(types=parse_types(["template.approval.updated"]))).action == "skip"
    unrouted = run(None, UNROUTED, Filter(types=parse_types(["unrouted"])))
    assert (unrouted.action, unrouted.routed.topic if unrouted.routed else None) == (
        "replay",
        topics.unrouted,
    )


def test_decide_turns_any_error_of_one_record_into_its_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-record rule in replay: an unexpected error is that record's dead letter, not a crash."""
    import sentpipe.processors.replay as replay_module

    def broken_route(*args: Any, **kwargs: Any) -> Any:
        raise OSError(75, "Value too large for defined data type")

    monkeypatch.setattr(replay_module.r, "route", broken_route)
    body = SampleFactory(1).inbound().body
    d = decide(
        b"k", body, [], 5_000, window=make_window(), flt=Filter(), settings=Settings(), topics=Topics("x.")
    )
    assert d.action == "fail" and d.error is not None and d.error.reason == "OSError"


# --- selection -------------------------------------------------------------------------------------------


def _dry(s: Settings, flt: Filter | None = None, **window: Any) -> RunResult:
    return replay(s, make_window(**window), flt or Filter(), dry_run=True)


def test_replay_selects_exactly_by_type_tenant_event_id_offsets_and_time(
    settings: Settings, topics: Topics, tmp_path: Path
) -> None:
    acme_secret = "whsec_" + "YWNtZS1zZWNyZXQtZm9yLXRlc3Rz"
    secrets = tmp_path / "secrets.json"
    secrets.write_bytes(orjson.dumps({"acme": [acme_secret]}))
    f = SampleFactory(32)
    default = (
        [f.inbound().body for _ in range(4)]
        + [f.message_status(f"m{i}", "sent").body for i in range(6)]
        + [f.template().body for _ in range(3)]
        + [MALFORMED, UNROUTED]
    )
    acme_early = [f.inbound().body for _ in range(2)] + [
        f.message_status(f"a{i}", "read").body for i in range(3)
    ]
    acme_late = [f.template().body for _ in range(5)]
    ids = {b: frame(b, webhook_id=None).event_id for b in default + acme_early + acme_late}

    ingress, url, _ = start_ingress(settings, tmp_path, secrets_file=secrets)
    try:
        base = f"{url}/webhooks/sent"
        secret = settings.webhook_secret.get_secret_value()
        assert asyncio.run(post_all(base, default, secret)).count(200) == len(default)
        assert asyncio.run(post_all(f"{base}/acme", acme_early, acme_secret)).count(200) == len(acme_early)
        # A time after every record so far and before every later one: one millisecond past the newest
        # timestamp, and the clock past it before the late records are sent.
        newest = max(rec.timestamp_ms for rec in read_topic(settings.kafka_bootstrap, topics.raw))
        middle_ms = newest + 1
        wait_for(time.time, lambda now: now * 1000 > middle_ms, 10, "the clock to pass the middle")
        assert asyncio.run(post_all(f"{base}/acme", acme_late, acme_secret)).count(200) == len(acme_late)
    finally:
        ingress.stop()
    raw = read_topic(settings.kafka_bootstrap, topics.raw, at_least=25)
    assert len(raw) == 25

    ST, IN, TP = (
        t.value for t in (EventType.MESSAGE_STATUS, EventType.MESSAGE_INBOUND, EventType.TEMPLATE_APPROVAL)
    )
    everything = _dry(settings)
    assert (everything.read, everything.skipped, everything.failed) == (25, 0, 1)
    assert everything.failures == Counter({"missing_message_id": 1})
    assert everything.selected == Counter(
        {(IN, "default"): 4, (ST, "default"): 6, (TP, "default"): 3, ("unrouted", "default"): 1}
        | {(IN, "acme"): 2, (ST, "acme"): 3, (TP, "acme"): 5}
    )

    inbound = _dry(settings, Filter(types=parse_types([IN])))
    assert inbound.selected == Counter({(IN, "default"): 4, (IN, "acme"): 2})
    assert (inbound.skipped, inbound.failed) == (19, 0)

    # The malformed record is a message status (its type header says so), so this filter keeps it.
    status = _dry(settings, Filter(types=parse_types([ST, "unrouted"])))
    assert status.selected == Counter({(ST, "default"): 6, (ST, "acme"): 3, ("unrouted", "default"): 1})
    assert status.failed == 1

    acme = _dry(settings, Filter(tenants=frozenset({"acme"})))
    assert acme.selected == Counter({(IN, "acme"): 2, (ST, "acme"): 3, (TP, "acme"): 5})
    assert (acme.skipped, acme.failed) == (15, 0)

    both = _dry(settings, Filter(types=parse_types([TP]), tenants=frozenset({"acme"})))
    assert both.selected == Counter({(TP, "acme"): 5})

    picked = {ids[default[0]], ids[acme_late[2]]}
    by_id = _dry(settings, Filter(event_ids=frozenset(picked)))
    assert sum(by_id.selected.values()) == 2 and by_id.missing_ids == []
    assert by_id.selected == Counter({(IN, "default"): 1, (TP, "acme"): 1})
    assert by_id.read < 25  # only the partitions the ids hash to
    missing = _dry(settings, Filter(event_ids=frozenset({*picked, "evt_never_sent"})))
    assert missing.missing_ids == ["evt_never_sent"] and sum(missing.selected.values()) == 2
    assert missing.read == 25  # an id not in its partition is looked for everywhere

    late = _dry(settings, since=iso(middle_ms))
    assert late.selected == Counter({(TP, "acme"): 5}) and late.read == 5
    early = _dry(settings, until=iso(middle_ms))
    # The late records are read too, within a minute of the end (`UNTIL_SLACK_MS`), and skipped.
    assert sum(early.selected.values()) == 19 and early.failed == 1 and early.skipped == 5

    # Offsets: one record exactly, and a range of one partition.
    busiest = Counter(rec.partition for rec in raw).most_common(1)[0][0]
    in_part = sorted((rec for rec in raw if rec.partition == busiest), key=lambda rec: rec.offset)
    assert len(in_part) >= 3
    one = _dry(settings, from_offsets=[f"{busiest}:1"], to_offsets=[f"{busiest}:1"])
    assert one.read == 1 and sum(one.selected.values()) + one.failed == 1
    rng = _dry(settings, from_offsets=[f"{busiest}:1"])
    assert rng.read == len(in_part) - 1
    upto = _dry(settings, to_offsets=[f"{busiest}:1"])
    assert upto.read == 2

    # A real run: only what was asked is produced, with a replay id, straight to the routed topic.
    res = sentpipe(settings, "replay", "--type", IN, "--tenant", "acme")
    assert res.returncode == 0, res.stderr
    routed = read_topic(settings.kafka_bootstrap, topics.message_inbound, at_least=2)
    assert sorted(orjson.loads(rec.value)["id"] for rec in routed) == sorted(ids[b] for b in acme_early[:2])
    assert all(rec.headers[r.H_TENANT] == b"acme" and r.H_REPLAY_ID in rec.headers for rec in routed)
    for t in (topics.message_status, topics.template_approval, topics.unrouted, topics.dlq):
        assert read_topic(settings.kafka_bootstrap, t) == []  # the run has ended: its writes are in

    # Malformed records fail the run, and are not dead-lettered again: the router did that when they
    # arrived, and each run over the window added another copy (each one redriven later).
    for _ in range(2):
        res = sentpipe(settings, "replay", "--type", ST, "--tenant", "default")
        assert res.returncode == 1 and "Traceback" not in res.stderr
        last = res.stderr.strip().splitlines()[-1]
        assert last.startswith(
            "error: 1 record(s) failed (1 missing_message_id); the router dead-lettered malformed ones"
        ), last
        assert "--from-offset" not in last  # nothing Kafka refused: nothing to send again
        assert "missing_message_id" in res.stdout
    assert read_topic(settings.kafka_bootstrap, topics.dlq) == []
    assert len(read_topic(settings.kafka_bootstrap, topics.message_status, at_least=12)) == 12  # 6 a run


# --- interrupted, refused, dead letters not taken ----------------------------------------------------------
def produce_raw(s: Settings, bodies: list[bytes], partition: int | None = None) -> None:
    """Raw records as the ingress writes them (key = event id, its headers), straight to the raw topic."""
    p = Producer({"bootstrap.servers": s.kafka_bootstrap, "linger.ms": 20, "log_level": 0})
    raw = Topics(s.topic_prefix).raw
    for body in bodies:
        eid = frame(body, webhook_id=None).event_id if body != MALFORMED_BIG else "malformed"
        headers = r.raw_headers(
            tenant="default",
            received_at_ms=int(time.time() * 1000),
            webhook_id=eid,
            request_id="t",
            event_type=None,
        )
        while True:
            try:
                p.produce(
                    raw, body, eid.encode(), headers=headers, partition=-1 if partition is None else partition
                )
                break
            except BufferError:
                p.poll(0.1)
        p.poll(0)
    assert p.flush(60) == 0


def routed_count(s: Settings, topics: Topics) -> int:
    return sum(record_count(s.kafka_bootstrap, t) for t in topics.routed)


def test_adjacent_windows_share_no_record_and_miss_none_stamped_out_of_order(
    settings: Settings, topics: Topics
) -> None:
    """A record stamped 5 ms before a window's end that follows, in its partition, one stamped 5 ms after
    it (two ingress processes' batches): the window's end was cut at the later one, so a replay hour by hour
    missed it in both hours."""
    t = int(time.time() * 1000) - 3_600_000
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
    for key, ts in ((b"before-later", t - 20), (b"later", t + 5), (b"earlier", t - 5), (b"after", t + 20)):
        producer.produce(topics.raw, b"x", key, partition=1, timestamp=ts)
    assert producer.flush(30) == 0

    with Log(settings) as kafka:

        def keys(window: Window) -> list[bytes | None]:
            got = kafka.read(kafka.ranges(topics.raw, window, [1]))
            return sorted(msg.key() for msg in got if window.admits_time(timestamp_ms(msg)))

        assert keys(Window(since_ms=t - 60_000, until_ms=t)) == [b"before-later", b"earlier"]
        assert keys(Window(since_ms=t, until_ms=t + 60_000)) == [b"after", b"later"]


def test_an_interrupted_replay_says_so_and_goes_on_exactly_where_it_stopped(
    settings: Settings, topics: Topics
) -> None:
    """Ctrl-C ended `sentpipe replay` with status 0 and not a word (typer turns KeyboardInterrupt into a
    returned 130, which the CLI dropped; inside librdkafka's poll it surfaced as a SystemError). Now the
    run stops after the record in hand, waits for what it sent, and says how far it got and how to go on;
    going on from there replays every remaining record once and none twice."""
    bodies = [s.body for s in SampleFactory(41).mix(60_000, "sent")]
    produce_raw(settings, bodies)
    n_raw = record_count(settings.kafka_bootstrap, topics.raw)
    assert n_raw == len(bodies)

    # Ctrl-C once the replay reads (its SIGINT handler is in place by then).
    res = sentpipe_interrupted(settings, "replay", when="replay reading")
    err = res.stderr
    assert res.returncode == 1, (res.stdout, err)
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    m = re.fullmatch(
        r"error: replay \S+ interrupted after (\d+) of (\d+) records \((\d+) replayed, 0 failed\);"
        r" .*; to go on where it stopped, run it with ((?:--from-offset \d+:\d+ ?)+)"
        r" \(and its other options\)",
        last,
    )
    assert m is not None, last
    done, total, replayed = int(m[1]), int(m[2]), int(m[3])
    assert (total, replayed) == (n_raw, done) and done < n_raw
    assert routed_count(settings, topics) == done  # what it sent had reached Kafka before it ended

    res = sentpipe(settings, "replay", *m[4].split())
    assert res.returncode == 0, res.stderr
    read = re.search(r"│ read\s+│ (\d+) │", res.stdout)
    assert read is not None and int(read[1]) == n_raw - done, res.stdout
    # Every raw record routed exactly once over the two runs.
    assert routed_count(settings, topics) == n_raw
    ids = Counter(
        orjson.loads(rec.value)["id"]
        for t in topics.routed
        for rec in read_topic(settings.kafka_bootstrap, t)
    )
    assert len(ids) == n_raw and set(ids.values()) == {1}


def test_an_interrupted_replay_resumes_from_its_first_record_kafka_did_not_take() -> None:
    """The hint went on from the last record handed to the producer: with the broker gone mid-replay,
    20,001 sends failed after the records were read, and following the hint skipped every one of them
    (the resumed run ended with status 0). A failed send now pulls its partition's resume offset back."""
    from confluent_kafka import KafkaError

    from sentpipe.processors.offsets import Range, Window
    from sentpipe.processors.replay import _Replay

    run = _Replay(Settings(), Topics("x."), Window(), Filter(), None, None)
    run.ranges = {p: Range("x.events.raw", p, 0, 100) for p in range(3)}
    run.next = {0: 80, 1: 100, 2: 40}
    timed_out = KafkaError(KafkaError._MSG_TIMED_OUT)
    kind = ("message.status.updated", "default")
    run._delivered((0, 30), kind, timed_out)
    run._delivered((0, 50), kind, timed_out)
    run._delivered((1, 70), kind, None)
    run._delivered((1, 90), kind, timed_out)
    run._delivered((2, 10), kind, None)
    assert run.result.selected == Counter({kind: 2}) and run.result.produced == 2  # what Kafka took
    text = run.interrupted(resumable=True)
    assert "run it with --from-offset 0:30 --from-offset 1:90 --from-offset 2:40 (and" in text, text


def test_records_sent_with_no_word_from_kafka_are_sent_again_by_the_resume() -> None:
    """The broker gone with records in the producer's queue: the flush gives up with some never reported
    on. The resume must start at the first of them, not past it (they were dropped unreported)."""
    from sentpipe.processors.offsets import Range, Window
    from sentpipe.processors.replay import _Replay

    class Silent:  # a producer whose flush timed out with records unreported
        pending, delivery_timeout_s = 2, 30.0

        def flush(self) -> None:
            raise BrokerUnavailable("2 record(s) not acknowledged by Kafka at k:9092 within 35s")

    run = _Replay(Settings(), Topics("x."), Window(), Filter(), Silent(), None)  # type: ignore[arg-type]
    run.ranges = {p: Range("x.events.raw", p, 0, 100) for p in range(2)}
    run.next = {0: 60, 1: 100}
    run.unreported = {(0, 40), (0, 55), (1, 99)}
    with pytest.raises(BrokerUnavailable):
        run.finish(stopping=True)
    text = run.interrupted(resumable=True)
    assert "run it with --from-offset 0:40 --from-offset 1:99 (and" in text, text
    assert "(0 replayed, 0 failed, 3 not confirmed by Kafka)" in text, (
        text
    )  # the counts add up to what it sent


MALFORMED_BIG = MALFORMED.replace(b'"no message id"', b'"' + secrets.token_hex(4000).encode() + b'"')


def test_a_record_the_producer_refuses_fails_alone_and_the_replay_goes_on(
    settings: Settings, topics: Topics
) -> None:
    """A routed record larger than the producer takes (SENTPIPE_MAX_BODY_BYTES lowered since it was
    received) raised ProduceRejected out of the replay: the run ended there, the records after it were never
    replayed and no summary was shown."""
    f = SampleFactory(42)
    small = [f.message_status(f"m{i}", "sent").body for i in range(6)]
    doc = orjson.loads(f.message_status("big", "sent").body)
    doc["payload"]["note"] = secrets.token_hex(100_000)  # 200 KB, incompressible
    big = orjson.dumps(doc)
    produce_raw(settings, [*small[:3], big, *small[3:], MALFORMED_BIG], partition=0)
    res = sentpipe(settings, "replay", max_body_bytes=1024)  # the producer takes about 70 KB now
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("error: 2 record(s) failed"), res.stderr
    rows = dict(re.findall(r"│ +(\S[^│]*?) +│ (\d+) │", res.stdout))
    assert rows["read"] == "8" and rows["replayed"] == "6" and rows["failed"] == "2", res.stdout
    assert rows["produce:msg_size_too_large"] == "1" and rows["missing_message_id"] == "1", res.stdout
    routed = read_topic(settings.kafka_bootstrap, topics.message_status, at_least=6)
    assert sorted(orjson.loads(rec.value)["subject"] for rec in routed) == [f"m{i}" for i in range(6)]
    assert read_topic(settings.kafka_bootstrap, topics.dlq) == []


# --- finding an event: the history tables -------------------------------------------------------------------
def test_history_pages_neither_repeat_nor_skip_events_that_tie(db_url: str) -> None:
    """Two tenants may send one event id at one time (and the id may be in two tables): ordered by time and
    id only, pages overlapped, showing one row twice and another never."""
    at = datetime(2026, 1, 1, tzinfo=UTC)
    with psycopg.connect(db_url) as c:
        for i in range(40):
            c.execute(
                "INSERT INTO inbound_messages (event_id, tenant, received_at, occurred_at, payload)"
                " VALUES ('evt_1', %s, %s, %s, '{}')",
                (f"t{i:02d}", at, at),
            )
            c.execute(
                "INSERT INTO message_events (event_id, tenant, message_id, status, occurred_at, received_at,"
                " payload) VALUES ('evt_1', %s, 'm', 'sent', %s, %s, '{}')",
                (f"t{i:02d}", at, at),
            )
    for size in (1, 7):
        shown: list[tuple[str, str]] = []
        after = None
        while True:
            got = search(db_url, HistoryQuery(after=after, page_size=size))
            shown += [(row["type"], row["tenant"]) for row in got.rows]
            if got.next is None:
                break
            after = Cursor.parse(got.next.token())  # as the console passes it on
        assert len(shown) == 80 and len(set(shown)) == 80, size


def test_a_replay_that_kafka_did_not_take_everything_from_says_where_to_go_on() -> None:
    """Records the broker did not take (gone mid-run, or refusing one's size) ended the run with "malformed
    ones were dead-lettered by the router", which they were not, and no way to send them again short of the
    whole window."""
    res = RunResult("r1", dry_run=False, failed=4)
    res.failures.update({"delivery:_MSG_TIMED_OUT": 2, "produce:msg_size_too_large": 1, "not_json": 1})
    res.undelivered.update({2: 90, 0: 17})
    line = failure_line(res)
    assert line.startswith(
        "4 record(s) failed (2 delivery:_MSG_TIMED_OUT, 1 not_json, 1 produce:msg_size_too_large); the router"
        " dead-lettered malformed ones"
    ), line
    assert line.endswith(
        "to send again what Kafka did not take, run it with --from-offset 0:17 --from-offset 2:90 (and its "
        "other options)"
    ), line
    res.failures = Counter({"delivery:_MSG_TIMED_OUT": 4})
    assert "malformed" not in failure_line(res)


def test_a_partition_the_broker_could_not_look_up_by_time_is_an_error_not_an_empty_range(
    settings: Settings, topics: Topics
) -> None:
    """offsets_for_times answers per partition, with an error for one it could not look up; read as "every
    record is older", that partition was left out of a --since window without a word."""
    from confluent_kafka import KafkaError

    class Answer:
        def __init__(self, partition: int, error: KafkaError | None) -> None:
            self.partition, self.offset, self.error = partition, -1, error

    class Consumer:
        def offsets_for_times(self, query: list[Any], timeout: float) -> list[Answer]:
            return [Answer(tp.partition, KafkaError(KafkaError.LEADER_NOT_AVAILABLE)) for tp in query]

    with Log(settings) as kafka:
        kafka.consumer, real = Consumer(), kafka.consumer  # type: ignore[assignment]
        try:
            with pytest.raises(BrokerUnavailable, match="did not answer"):
                kafka.offsets_at(topics.raw, [0], 1)
        finally:
            kafka.consumer = real


def test_a_replay_the_broker_leaves_says_how_far_it_got_and_where_to_go_on(
    services: Services, settings: Settings, topics: Topics
) -> None:
    """The broker gone while a replay reads: it ended with the read's error alone ("no records from Kafka
    broker ..."), no count, no `--from-offset` to go on from, and whatever its producer still held dropped
    unreported. Now it ends like a Ctrl-C, the broker's error first; going on from there after the broker
    is back replays every record once."""
    if not services.kafka_local:
        pytest.fail(
            "this test stops the broker: run it with the local launcher (unset SENTPIPE_KAFKA_BOOTSTRAP)"
        )
    bodies = [s.body for s in SampleFactory(44).mix(200, "sent")]
    produce_raw(settings, bodies)
    stopped: list[int] = []

    def broker_leaves(done: int, total: int) -> None:
        if not stopped:  # as the read begins
            stopped.append(done)
            services.stop_kafka()

    try:
        with pytest.raises(OpsError) as info:
            replay(settings, make_window(), Filter(), progress=broker_leaves, timeout=5)
    finally:
        services.start_kafka()
    line = str(info.value)
    m = re.fullmatch(
        r"no records from Kafka broker at \S+ for \d+s.*; replay \S+ interrupted after 0 of 200 records"
        r" \(0 replayed, 0 failed\); .*; to go on where it stopped, run it with"
        r" ((?:--from-offset \d+:\d+ ?)+) \(and its other options\)",
        line,
    )
    assert m is not None, line
    wait_topics_ready(settings.kafka_bootstrap, [topics.raw, *topics.routed])
    res = sentpipe(settings, "replay", *m[1].split())
    assert res.returncode == 0, res.stderr
    assert routed_count(settings, topics) == len(bodies)


def test_a_raw_record_whose_header_name_is_not_utf8_fails_the_replay_instead_of_changing_tenant(
    settings: Settings, topics: Topics
) -> None:
    """Another producer's header name that is not UTF-8: confluent-kafka reads such a record without its
    headers, and replay routed it under the default tenant (rows and handler calls of another tenant), where
    the router, reading the record format itself, had routed it under its own."""
    good, odd = (s.body for s in SampleFactory(45).mix(2, "sent"))
    produce_raw(settings, [good], partition=0)
    eid = frame(odd, webhook_id=None).event_id
    headers = [
        (k.encode(), v)
        for k, v in r.raw_headers(
            tenant="acme",
            received_at_ms=int(time.time() * 1000),
            webhook_id=eid,
            request_id="t",
            event_type=None,
        )
    ]
    produce_as_bytes(
        settings.kafka_bootstrap, topics.raw, 0, [(eid.encode(), odd, [*headers, (b"x-\xff", b"v")])]
    )
    result = replay(settings, make_window(), Filter())
    assert (result.read, result.produced, result.failed) == (2, 1, 1), result
    assert result.failures == Counter({"unreadable_headers": 1})
    assert "replay cannot tell their tenant" in failure_line(result)
    assert "the router dead-lettered" not in failure_line(result)
    assert routed_count(settings, topics) == 1
    # Asked for other ids: skipped by its key, as `decide` skips any record, not a failure of the run.
    good_id = frame(good, webhook_id=None).event_id
    picked = replay(settings, make_window(), Filter(event_ids=frozenset({good_id})), dry_run=True)
    assert (picked.failed, picked.skipped, picked.missing_ids) == (0, 1, []), picked


def test_a_window_asked_from_an_offset_retention_deleted_says_how_much_of_it_is_gone(
    settings: Settings, topics: Topics
) -> None:
    """`--from-offset 0:2` when the log starts at 5 read from 5, and nothing said three of the records asked
    for were gone."""
    produce_raw(settings, [s.body for s in SampleFactory(46).mix(10, "sent")], partition=0)
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    for done in admin.delete_records([TopicPartition(topics.raw, 0, 5)]).values():
        done.result(30)
    result = replay(settings, make_window(from_offsets=["0:2"]), Filter(), dry_run=True)
    assert (result.read, result.past_retention) == (5, 3), result
    res = sentpipe(settings, "replay", "--from-offset", "0:2", "--dry-run")
    assert res.returncode == 0, res.stderr
    assert re.search(r"│ past retention \(deleted before it was read\)\s+│ 3 │", res.stdout), res.stdout
    assert replay(settings, make_window(from_offsets=["0:5"]), Filter(), dry_run=True).past_retention == 0


def test_a_time_window_that_starts_before_what_retention_kept_says_so(
    settings: Settings, topics: Topics
) -> None:
    """`--since` older than the first record retention kept (a restore from an older backup) read from the
    log's start and ended exit 0, nothing said that the first part of the window was gone. Partition 0 lost
    its first five records; partition 1 lost none, so its window is whole."""
    before = iso(time.time() * 1000 - 1000)
    f = SampleFactory(48)
    for partition in (0, 1):
        produce_raw(settings, [s.body for s in f.mix(10, "sent")], partition=partition)
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    for done in admin.delete_records([TopicPartition(topics.raw, 0, 5)]).values():
        done.result(30)
    result = replay(settings, make_window(since=before), Filter(), dry_run=True)
    assert (result.read, result.start_past_retention, result.past_retention) == (15, [0], 0), result
    # Entirely before what was kept: nothing read, and still said.
    with Log(settings) as kafka:
        first_kept = next(kafka.read([kafka.ranges(topics.raw, make_window(from_offsets=["0:5"]))[0]]))
    kept_ms = timestamp_ms(first_kept)
    # The end is looked up a minute past `--until`: this window ends before the first record kept.
    window = make_window(since=iso(kept_ms - 120_000), until=iso(kept_ms - 60_001))
    early = replay(settings, window, Filter(), dry_run=True)
    assert (sum(early.selected.values()), early.start_past_retention) == (0, [0]), early
    res = sentpipe(settings, "replay", "--since", before, "--dry-run")
    assert res.returncode == 0, res.stderr
    row = r"│ window starts past retention \(partitions; older records deleted\)\s+│ 0 +│"
    assert re.search(row, res.stdout), res.stdout
    assert "records of the window may be gone" in res.stderr, res.stderr
    # Asked by offset, the deleted records are counted exactly instead; a window after them is whole.
    by_offset = replay(settings, make_window(since=before, from_offsets=["0:0"]), Filter(), dry_run=True)
    assert (by_offset.past_retention, by_offset.start_past_retention) == (5, []), by_offset
    later = iso(kept_ms + 1)
    assert replay(settings, make_window(since=later), Filter(), dry_run=True).start_past_retention == []


def test_records_retention_deletes_while_a_replay_reads_are_counted_past_retention(
    settings: Settings, topics: Topics, caplog: pytest.LogCaptureFixture
) -> None:
    """Retention deleting a range's start after the replay planned it: librdkafka reset to the log's new
    start without a word, and the run ended exit 0 with "read" short of the window and no "past retention".
    Here each way it shows: records after the gap (0), nothing left before the partition's end (1), the
    first record left beyond the range's end (2)."""
    f = SampleFactory(47)
    for partition in (0, 1, 2):
        produce_raw(
            settings, [s.body for s in f.mix(10 if partition != 1 else 5, "sent")], partition=partition
        )
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})

    def retention_deletes(done: int, total: int) -> None:
        if done == 0:  # planned, not yet read
            deleted = [TopicPartition(topics.raw, 0, 4), TopicPartition(topics.raw, 1, 5)]
            for future in admin.delete_records([*deleted, TopicPartition(topics.raw, 2, 6)]).values():
                future.result(30)

    window = make_window(from_offsets=["0:0", "1:0", "2:0"], to_offsets=["2:2"])
    with caplog.at_level("WARNING", logger="sentpipe.replay"):
        result = replay(settings, window, Filter(), progress=retention_deletes)
    assert (result.read, result.produced, result.past_retention) == (6, 6, 4 + 5 + 3), result
    warned = [rec for rec in caplog.records if "retention deleted part of the window" in rec.getMessage()]
    assert sorted(rec.__dict__["partition"] for rec in warned) == [0, 1, 2]  # once per partition
    assert routed_count(settings, topics) == 6


def test_a_replay_refused_read_access_mid_run_sends_what_it_queued_and_says_where_to_go_on(
    settings: Settings, topics: Topics, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ACL refusing READ while a replay reads raised the read's OpsError past the replay: records in
    the producer's queue were never flushed or counted, and no `--from-offset` said where to go on."""
    from confluent_kafka import Consumer, KafkaError, Message

    from sentpipe.processors import offsets

    produce_raw(settings, [s.body for s in SampleFactory(48).mix(600, "sent")], partition=0)
    refused_after = 100

    class Refusing:
        """The real consumer, until the broker refuses the read after `refused_after` records."""

        def __init__(self, config: dict[str, Any]) -> None:
            self.real, self.records = Consumer(config), 0

        def __getattr__(self, name: str) -> Any:
            return getattr(self.real, name)

        def consume(self, n: int, timeout: float) -> list[Message]:
            out = []
            for msg in self.real.consume(n, timeout):
                if msg.error() is None and msg.topic() == topics.raw:
                    if self.records == refused_after:
                        error = KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED)
                        return [*out, Message(topic=topics.raw, partition=0, error=error)]
                    self.records += 1
                out.append(msg)
            return out

    monkeypatch.setattr(offsets, "Consumer", Refusing)
    with pytest.raises(OpsError) as info:
        replay(settings, make_window(), Filter())
    monkeypatch.undo()
    m = re.fullmatch(
        r"Kafka at \S+ refused to let this client read \S+: .*; replay \S+ interrupted after 100 of 600"
        r" records \(100 replayed, 0 failed\); .*; to go on where it stopped, run it with"
        r" (--from-offset 0:100) \(and its other options\)",
        str(info.value),
    )
    assert m is not None, str(info.value)
    assert routed_count(settings, topics) == refused_after  # flushed before it ended
    rest = replay(settings, make_window(from_offsets=m[1].split()[1:]), Filter())
    assert (rest.read, rest.produced) == (500, 500), rest
    assert routed_count(settings, topics) == 600


def test_a_console_replay_stopped_midway_says_where_to_go_on_in_the_api_s_field_names(
    settings: Settings, topics: Topics
) -> None:
    """A window made from the console's fields: an interrupted job said "run it with --from-offset 0:500
    (and its other options)", an option the page has no field for."""
    produce_raw(settings, [s.body for s in SampleFactory(49).mix(1200, "sent")], partition=0)
    stop = threading.Event()

    def stop_midway(done: int, total: int) -> None:
        if done >= 500:
            stop.set()

    window = make_window(from_offsets=["0:0"], fields=True)
    with pytest.raises(OpsError) as info:
        replay(settings, window, Filter(), progress=stop_midway, stop=stop)
    m = re.fullmatch(
        r"replay \S+ interrupted after 500 of 1200 records \(500 replayed, 0 failed\); .*; to go on where it"
        r" stopped, run it with from_offsets (0:500) \(and its other fields\)",
        str(info.value),
    )
    assert m is not None, str(info.value)
    rest = replay(settings, make_window(from_offsets=m[1].split(", "), fields=True), Filter())
    assert (rest.read, rest.produced) == (700, 700), rest
    assert routed_count(settings, topics) == 1200
