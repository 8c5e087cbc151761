"""The DLQ round trip with real processes: poison events dead-lettered, listed, shown, fixed and redriven.

`tests.handlers_fixture` fails permanently for ids in the `poison` table; deleting a row fixes the handler.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import orjson
import psycopg
import pytest
from confluent_kafka import Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from sentpipe.broker import Record as BrokerRecord
from sentpipe.kafka import BatchConsumer as KafkaBatchConsumer
from sentpipe.processors import dlq as dlq_ops
from sentpipe.processors.dlq import DlqEntry, plan
from sentpipe.processors.group_lock import SESSION_TIMEOUT_S, GroupLock, LockBusy
from sentpipe.processors.offsets import Log, OpsError
from sentpipe.processors.replay import RunResult
from sentpipe.processors.topics import ensure_topics
from sentpipe.schemas import routing as r
from sentpipe.schemas.events import frame
from sentpipe.schemas.samples import SampleFactory
from sentpipe.schemas.topics import Topics
from sentpipe.settings import Settings
from tests.handlers_fixture import create_fixture_tables
from tests.kafka_mock import produce_with_header_name
from tests.kafka_tools import Record, read_topic, record_count, wait_topics_ready
from tests.pipeline import (
    deliver,
    route_as_the_router,
    start_ingress,
    start_worker,
    wait_caught_up,
    wait_until,
)
from tests.processes import run_on_a_terminal, settings_env
from tests.services import Services
from tests.test_ingress_limits import padded_envelope
from tests.test_ops_cli import sentpipe, sentpipe_interrupted

MALFORMED = b'{"field":"messages","sub_type":"message.read","payload":{"note":"no message id"}}'


def dlq_records(s: Settings, at_least: int = 0) -> list[Record]:
    """The whole DLQ, by its watermarks (after waiting for `at_least` records)."""
    return read_topic(s.kafka_bootstrap, Topics(s.topic_prefix).dlq, at_least=at_least, timeout=60)


def canonical_id(rec: Record) -> str:
    return str(orjson.loads(rec.value)["id"])


def handler_calls(db: str) -> list[str]:
    with psycopg.connect(db) as c:
        return [row[0] for row in c.execute("SELECT event_id FROM handler_calls").fetchall()]


def test_dlq_round_trip_fix_and_redrive_and_still_poisoned_comes_back_with_attempts_2(
    settings: Settings, topics: Topics, tmp_path: Path
) -> None:
    db = settings.database_url.get_secret_value()
    create_fixture_tables(db)
    f = SampleFactory(41)
    inbound = [f.inbound().body for _ in range(12)]
    status = [f.message_status(f"msg-{i}", "delivered").body for i in range(4)]
    ids = {b: frame(b, webhook_id=None).event_id for b in inbound + status + [MALFORMED]}
    poisoned = [ids[inbound[1]], ids[inbound[5]], ids[inbound[9]], ids[status[2]]]
    still_bad = poisoned[1]
    with psycopg.connect(db, autocommit=True) as c:
        for event_id in poisoned:
            c.execute("INSERT INTO poison (event_id) VALUES (%s)", (event_id,))

    ingress, url, _ = start_ingress(settings, tmp_path)
    worker = start_worker(settings, tmp_path, handler_modules=["tests.handlers_fixture"])
    try:
        bodies = [*inbound, *status, MALFORMED]
        deliver(settings, url, bodies, worker, 16, timeout=60)
        # Everything consumed and committed: every DLQ record the worker will write is written.
        wait_caught_up(settings, 60, "the worker caught up", worker.proc.tail)
        first = dlq_records(settings, at_least=5)
        assert len(first) == 5
        by_stage = {rec.headers[r.H_DLQ_STAGE] for rec in first}
        assert by_stage == {b"handler", b"route"}
        handler_ids = {canonical_id(rec): rec for rec in first if rec.headers[r.H_DLQ_STAGE] == b"handler"}
        assert sorted(handler_ids) == sorted(poisoned)
        assert not set(poisoned) & set(handler_calls(db))  # the handler's writes rolled back

        # list / show
        res = sentpipe(settings, "dlq", "list")
        assert res.returncode == 0, res.stderr
        assert "5 shown, 5 matching, 5 in the DLQ" in res.stdout
        for event_id in poisoned:
            assert event_id in res.stdout
        res = sentpipe(settings, "dlq", "list", "--reason", "PermanentError", "--limit", "2")
        assert res.returncode == 0 and "2 shown, 4 matching" in res.stdout, res.stdout
        res = sentpipe(settings, "dlq", "list", "--stage", "route")
        assert res.returncode == 0 and "1 shown, 1 matching" in res.stdout, res.stdout
        assert ids[MALFORMED] in res.stdout and "missing_message_id" in res.stdout
        shown = handler_ids[still_bad]
        res = sentpipe(settings, "dlq", "show", f"0:{shown.offset}")
        assert res.returncode == 0, res.stderr
        for header in (r.H_DLQ_STAGE, r.H_DLQ_ERROR_CLASS, r.H_DLQ_ATTEMPTS, r.H_DLQ_TOPIC, r.H_TENANT):
            assert header in res.stdout
        assert f'"id": "{still_bad}"' in res.stdout and "poisoned event" in res.stdout

        # A dry run counts and produces nothing.
        res = sentpipe(settings, "dlq", "redrive", "--dry-run")
        assert res.returncode == 0, res.stderr
        assert len(dlq_records(settings)) == 5

        # Fix three of the four, then redrive the handler failures.
        with psycopg.connect(db, autocommit=True) as c:
            c.execute("DELETE FROM poison WHERE event_id <> %s", (still_bad,))
        res = sentpipe(settings, "dlq", "redrive", "--stage", "handler")
        assert res.returncode == 0, res.stderr
        fixed = set(poisoned) - {still_bad}
        wait_until(lambda: fixed <= set(handler_calls(db)), 60, "fixed events handled", worker.proc.tail)
        wait_caught_up(settings, 60, "the redrive applied", worker.proc.tail)
        again = dlq_records(settings, at_least=6)
        assert len(again) == 6
        back = again[5]
        assert canonical_id(back) == still_bad
        assert back.headers[r.H_DLQ_STAGE] == b"handler"
        assert back.headers[r.H_DLQ_ATTEMPTS] == b"2"
        assert r.H_REDRIVE_ID in back.headers
        assert back.headers[r.H_DLQ_TOPIC] == topics.message_inbound.encode()
        calls = handler_calls(db)
        assert still_bad not in calls and all(calls.count(i) == 1 for i in fixed)

        # The malformed body still cannot be routed: back in the DLQ, attempts 2, same original record.
        res = sentpipe(settings, "dlq", "redrive", "--stage", "route")
        assert_one_line_error_at_end(res, "failed again")
        route_first = next(rec for rec in first if rec.headers[r.H_DLQ_STAGE] == b"route")
        wait_caught_up(settings, 60, "the route redrive applied", worker.proc.tail)
        third = dlq_records(settings, at_least=7)
        assert len(third) == 7
        h = third[6].headers
        assert (h[r.H_DLQ_STAGE], h[r.H_DLQ_ERROR_CLASS], h[r.H_DLQ_ATTEMPTS]) == (
            b"route",
            b"missing_message_id",
            b"2",
        )
        assert r.H_REDRIVE_ID in h and third[6].value == MALFORMED
        for k in (r.H_DLQ_TOPIC, r.H_DLQ_PARTITION, r.H_DLQ_OFFSET):
            assert h[k] == route_first.headers[k]

        # By ID: the still-poisoned event's newest entry once more -> attempts 3; nothing loops.
        res = sentpipe(settings, "dlq", "redrive", "--id", f"0:{back.offset}")
        assert res.returncode == 0, res.stderr
        dlq_records(settings, at_least=8)
        wait_caught_up(settings, 60, "the redrive by id applied", worker.proc.tail)
        fourth = dlq_records(settings)  # all the worker wrote: nothing loops
        assert len(fourth) == 8 and fourth[7].headers[r.H_DLQ_ATTEMPTS] == b"3"
        assert canonical_id(fourth[7]) == still_bad

        # Fixed at last.
        with psycopg.connect(db, autocommit=True) as c:
            c.execute("DELETE FROM poison")
        res = sentpipe(settings, "dlq", "redrive", "--id", f"0:{fourth[7].offset}")
        assert res.returncode == 0, res.stderr
        wait_until(lambda: still_bad in handler_calls(db), 60, "the last one handled", worker.proc.tail)
        wait_caught_up(settings, 60, "the last redrive applied", worker.proc.tail)

        # Redrive everything, twice: only what no redrive took yet goes. That is the malformed body's newest
        # copy, which fails again (one new copy per pass); the recovered events are not sent again, so no
        # handler runs twice. Without the ledger each pass took all 8 and the DLQ doubled.
        res = sentpipe(settings, "dlq", "list")
        assert res.returncode == 0 and "1 shown, 1 matching, 8 in the DLQ" in res.stdout, res.stdout
        for passes in (1, 2):
            res = sentpipe(settings, "dlq", "redrive")
            assert_one_line_error_at_end(res, "failed again")
            wait_caught_up(settings, 60, "the full redrive applied", worker.proc.tail)
            assert len(dlq_records(settings, at_least=8 + passes)) == 8 + passes
        res = sentpipe(settings, "dlq", "redrive", "--id", f"0:{fourth[7].offset}")
        assert res.returncode == 0, res.stderr
        assert re.search(r"already taken by an earlier redrive\W+1\b", res.stdout), res.stdout
        res = sentpipe(settings, "dlq", "list", "--all")
        assert res.returncode == 0 and "10 shown, 10 matching, 10 in the DLQ" in res.stdout, res.stdout
        res = sentpipe(settings, "dlq", "show", f"0:{fourth[7].offset}")
        assert res.returncode == 0 and "taken by redrive " in res.stdout, res.stdout
    finally:
        worker.stop()
        ingress.stop()
    assert len(dlq_records(settings)) == 10
    assert sorted(set(handler_calls(db))) == sorted(set(ids[b] for b in inbound + status))


def assert_one_line_error_at_end(res: subprocess.CompletedProcess[str], needle: str) -> None:
    """A summary on stdout, then exactly one error line last on stderr."""
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and needle in last, res.stderr


def test_plan_sends_each_stage_where_it_can_succeed() -> None:
    s, topics = Settings(), Topics("x.")
    body = SampleFactory(2).inbound().body
    event_id = frame(body, webhook_id=None).event_id
    raw_headers = [(r.H_TENANT, b"acme"), (r.H_RECEIVED_AT, b"1000")]

    def entry(stage: str, key: bytes, value: bytes, attempts: int, topic: str | None = None) -> DlqEntry:
        dlq = r.dlq_headers(
            stage=stage,
            error_class="x",
            message="m",
            attempts=attempts,
            topic=topic,
            partition=0 if topic else None,
            offset=7 if topic else None,
        )
        return DlqEntry(0, 3, 2000, key, value, [*raw_headers, (r.H_REPLAY_ID, b"old"), *dlq])

    # An ingress record's random key is not its id: the body decides, as on first arrival.
    step = plan(entry("ingress", b"random-uuid", body, 1), s, topics, "rd1")
    assert (step.action, step.topic, step.key) == (
        "send",
        topics.message_inbound,
        f"acme/{event_id}".encode(),
    )
    h = dict(step.headers)
    assert (h[r.H_DLQ_ATTEMPTS], h[r.H_REDRIVE_ID], h[r.H_TENANT]) == (b"1", b"rd1", b"acme")
    assert r.H_REPLAY_ID not in h and r.H_DLQ_STAGE not in h  # one trip's marks are not carried on

    routed_value = b'{"id": "e1"}'
    step = plan(entry("handler", b"acme/e1", routed_value, 2, topics.message_status), s, topics, "rd2")
    assert (step.action, step.topic, step.key, step.value) == (
        "send",
        topics.message_status,
        b"acme/e1",
        routed_value,
    )
    assert dict(step.headers)[r.H_DLQ_ATTEMPTS] == b"2"
    assert plan(entry("handler", b"k", routed_value, 1, "someone.else"), s, topics, "rd3").action == "keep"

    step = plan(
        entry("route", b"evt", b'{"field":"messages","payload":{}}', 2, "x.events.raw"), s, topics, "rd4"
    )
    h = dict(step.headers)
    assert (step.action, step.topic, h[r.H_DLQ_STAGE], h[r.H_DLQ_ATTEMPTS]) == (
        "dlq",
        topics.dlq,
        b"route",
        b"3",
    )
    assert (h[r.H_DLQ_TOPIC], h[r.H_DLQ_OFFSET], h[r.H_REDRIVE_ID]) == (b"x.events.raw", b"7", b"rd4")


@pytest.mark.parametrize("reason", ["", "  ", "a\x1b]0;x\x07", "\u202ePermanentError", "x" * 201])
def test_a_reason_no_dead_letter_can_carry_is_refused_in_one_line(reason: str) -> None:
    """Matched nothing, and the command ended with exit 0 as if there were nothing to redrive."""
    with pytest.raises(OpsError, match=r"^--reason ") as caught:
        dlq_ops.make_selection(reasons=[reason])
    assert "\n" not in str(caught.value) and (not reason.strip() or reason not in str(caught.value))


def test_a_since_in_the_future_is_refused_in_one_line() -> None:
    """It selected nothing, and `dlq list` and `redrive` ended as if the DLQ were empty."""
    with pytest.raises(OpsError, match=r"^--since 9999-01-01 is in the future"):
        dlq_ops.make_selection(since="9999-01-01")
    assert dlq_ops.make_selection(since="2026-01-01").since_ms == 1_767_225_600_000


def test_a_reason_as_dead_letters_carry_it_is_selected() -> None:
    sel = dlq_ops.make_selection(reasons=["PermanentError", "sqlstate_22P05", "x" * 200])
    assert sel.reasons == {"PermanentError", "sqlstate_22P05", "x" * 200}


def test_headers_out_of_range_read_as_absent() -> None:
    """Anyone can write to the DLQ: a header no datetime or Kafka offset can hold must not break a listing
    (`dlq list` died on an OSError, the console on a TypeError)."""

    def entry(**headers: bytes) -> DlqEntry:
        named = {
            "at": r.H_DLQ_AT,
            "attempts": r.H_DLQ_ATTEMPTS,
            "part": r.H_DLQ_PARTITION,
            "off": r.H_DLQ_OFFSET,
        }
        hs = [(r.H_DLQ_TOPIC, b"sent.message.status")] + [(named[k], v) for k, v in headers.items()]
        return DlqEntry(0, 7, 1_700_000_000_000, b"k", b"{}", hs)

    for at in (b"99999999999999999999", b"-5", b"\xd9\xa1", b"1_000", b" 12", b"nan", b""):
        assert entry(at=at).dead_at_ms == 1_700_000_000_000, at
    assert entry(at=b"1700000000123").dead_at_ms == 1_700_000_000_123
    assert entry(attempts=b"10" * 20).attempts == 1 and entry(attempts=b"3").attempts == 3
    assert entry(part=b"0", off=b"99999999999999999999").original is None
    assert entry(part=b"\xc2\xb2", off=b"1").original is None
    assert entry(part=b"2", off=b"41").original == ("sent.message.status", 2, 41)


def test_a_listing_row_shows_what_its_record_says_and_keeps_no_body() -> None:
    """A listing's row: the fields its table shows, from one parse of the body (each column parsed it
    again), without the body or the headers."""
    topics = Topics("x.")
    routed = route_as_the_router(SampleFactory(44).inbound().body, topics)
    assert routed.event is not None
    where = {"topic": routed.topic, "partition": 1, "offset": 9}
    hs = r.dlq_headers(stage="handler", error_class="E", message="m", **where)
    handler = DlqEntry(0, 5, 1_700_000_000_000, routed.key, routed.value, [(r.H_TENANT, b"other"), *hs])
    hs = r.dlq_headers(stage="ingress", error_class="E", message="m")
    ingress = DlqEntry(0, 6, 1_700_000_000_000, b"random", b"x" * 100_000, [(r.H_TENANT, b"acme"), *hs])
    for e, want in (
        (handler, (routed.event.id, routed.event.type.value, routed.event.tenant)),
        (ingress, (None, None, "acme")),
    ):
        row = e.row()
        assert (row.event_id, row.type, row.tenant) == want == (e.event_id, e.type, e.tenant)
        assert (row.id, row.stage, row.original, row.key) == (e.id, e.stage, e.original, e.key)
        assert not hasattr(row, "value") and not hasattr(row, "headers")


def test_a_dlq_record_id_is_ascii_digits_in_kafka_range() -> None:
    from sentpipe.processors.dlq import parse_entry_id
    from sentpipe.processors.offsets import OpsError, PartitionOffset

    assert parse_entry_id("0:12") == PartitionOffset(0, 12) and parse_entry_id(" 12 ") == PartitionOffset(
        0, 12
    )
    for bad in (
        "²",
        "\u0661:0",
        "0:\u0661",
        "0:-1",
        "0:1_0",
        "0:" + "9" * 30,
        "99999999999:0",
        "",
        ":",
        "a:b",
    ):
        try:
            parse_entry_id(bad)
        except OpsError as exc:
            assert "is not a DLQ record ID" in str(exc), bad
        else:
            raise AssertionError(f"{bad!r} was taken for an ID")


def _handler_dead_letters(s: Settings, topics: Topics, n: int) -> list[str]:
    """n canonical events in the DLQ as the projector dead-letters a handler's failures; their ids."""
    producer = Producer({"bootstrap.servers": s.kafka_bootstrap})
    ids = []
    f = SampleFactory(43)  # one factory: a new one per record made every event the same one
    for i, sample in enumerate(f.inbound() for _ in range(n)):
        routed = route_as_the_router(sample.body, topics)
        assert routed.event is not None
        dlq = r.dlq_headers(
            stage="handler",
            error_class="PermanentError",
            message="h: no",
            topic=routed.topic,
            partition=0,
            offset=i,
        )
        producer.produce(topics.dlq, routed.value, routed.key, headers=[(r.H_TENANT, b"acme"), *dlq])
        ids.append(routed.event.id)
    assert producer.flush(30) == 0
    return ids


def test_two_redrives_at_once_send_each_dead_letter_once(settings: Settings, topics: Topics) -> None:
    """The ledger keeps a redrive from taking what an earlier one took, but two at once (the console and a
    terminal) both read it before either wrote it, and both sent every dead letter: handlers ran twice. A
    redrive now holds the ledger's consumer group from before it reads the ledger until its writes are
    flushed; a second one is refused in one line, and a dry run (it writes nothing) still runs."""
    ids = _handler_dead_letters(settings, topics, 5)
    inside, leave = threading.Event(), threading.Event()
    outcome: list[object] = []

    def hold(done: int, total: int) -> None:
        if done == 0:
            inside.set()
            assert leave.wait(60)

    def first() -> None:
        try:
            outcome.append(dlq_ops.redrive(settings, dlq_ops.make_selection(), progress=hold))
        except BaseException as exc:  # reported below, on the test's thread
            outcome.append(exc)

    runner = threading.Thread(target=first)
    runner.start()
    try:
        assert inside.wait(60), outcome
        with pytest.raises(OpsError, match=r"^another redrive is running: consumer group "):
            dlq_ops.redrive(settings, dlq_ops.make_selection(), timeout=5)
        res = sentpipe(settings, "dlq", "redrive", "--timeout", "5")
        assert_one_line_error_at_end(res, "another redrive is running")
        assert dlq_ops.redrive(settings, dlq_ops.make_selection(), dry_run=True).read == 5
    finally:
        leave.set()
        runner.join(60)
    (result,) = outcome
    assert isinstance(result, RunResult) and result.produced == 5, result
    again = dlq_ops.redrive(settings, dlq_ops.make_selection())
    assert (again.produced, again.already_redriven) == (0, 5)
    sent = read_topic(settings.kafka_bootstrap, topics.message_inbound, at_least=5)
    assert sorted(orjson.loads(rec.value)["id"] for rec in sent) == sorted(ids)


def test_a_killed_redrive_frees_the_lock_within_the_session_timeout(
    settings: Settings, topics: Topics
) -> None:
    """The lock is group membership: a holder killed with SIGKILL cannot release it, and the broker drops
    it once its session times out, so no redrive is locked out for good."""
    group = dlq_ops.redrive_group(settings)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from sentpipe.settings import Settings\n"
            "from sentpipe.processors.group_lock import GroupLock\n"
            "GroupLock(Settings(), sys.argv[1], sys.argv[2]).acquire()\n"
            "print('held', flush=True)\n"
            "time.sleep(600)\n",
            topics.dlq_redriven,
            group,
        ],
        env=settings_env(settings),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(LockBusy, match="held by another process; a holder that was killed"):
            GroupLock(settings, topics.dlq_redriven, group, timeout=5).acquire()
    finally:
        holder.kill()
        holder.wait()
    killed = time.monotonic()
    while True:
        try:
            with GroupLock(settings, topics.dlq_redriven, group, timeout=5) as lock:
                assert lock.held()
            break
        except LockBusy:
            assert time.monotonic() - killed < SESSION_TIMEOUT_S + 20, "the lock was never freed"


def test_a_short_timeout_still_gives_the_group_time_to_answer(settings: Settings, topics: Topics) -> None:
    """A broker holds an empty group's first join for group.initial.rebalance.delay.ms (3 s by default):
    `dlq redrive --timeout 2` was refused as "another redrive is running" with none running. The lock
    gives the group's answer its own minimum (here even 10 ms is more than a join takes)."""
    with GroupLock(settings, topics.dlq_redriven, dlq_ops.redrive_group(settings), timeout=0.01) as lock:
        assert lock.held()


def test_a_recreated_dlq_s_new_dead_letters_are_not_taken_by_earlier_redrives(
    settings: Settings, topics: Topics
) -> None:
    """The ledger knew a dead letter by partition and offset alone: after the DLQ topic was deleted and
    created again (to purge it, or on a new cluster), its new records at the same offsets read as taken by a
    redrive that ran before they existed: hidden from `dlq list` and never redriven."""
    _handler_dead_letters(settings, topics, 3)
    assert dlq_ops.redrive(settings, dlq_ops.make_selection()).produced == 3
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    admin.delete_topics([topics.dlq])[topics.dlq].result(timeout=30)

    def recreated() -> bool:
        try:
            ensure_topics(settings)
        except Exception:  # the broker may still be deleting it
            return False
        return topics.dlq in admin.list_topics(timeout=10).topics

    wait_until(recreated, 60, "the DLQ topic created again")
    wait_topics_ready(settings.kafka_bootstrap, [topics.dlq])
    _handler_dead_letters(settings, topics, 3)  # the same keys: the same partitions and offsets as before

    listing = dlq_ops.list_entries(settings, dlq_ops.make_selection(), limit=100)
    assert (len(listing.entries), listing.redriven) == (3, 0), listing
    again = dlq_ops.redrive(settings, dlq_ops.make_selection())
    assert (again.produced, again.already_redriven) == (3, 0), again
    assert len(read_topic(settings.kafka_bootstrap, topics.message_inbound, at_least=6)) == 6


def test_a_redrive_still_failing_says_so_once_not_once_per_record(settings: Settings, topics: Topics) -> None:
    """A pass over a DLQ whose records still fail (here: bodies no router can take) logged a warning per
    record: thousands of lines on the operator's terminal, burying the progress and the summary."""
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
    n = 40
    for i in range(n):
        dlq = r.dlq_headers(
            stage="route", error_class="missing_message_id", message="no id", partition=0, offset=i
        )
        producer.produce(topics.dlq, MALFORMED, f"k{i}".encode(), headers=[(r.H_TENANT, b"acme"), *dlq])
    assert producer.flush(30) == 0
    res = sentpipe(settings, "dlq", "redrive")
    assert_one_line_error_at_end(res, "failed again")
    logged = [line for line in res.stderr.splitlines() if "redrive:" in line]
    assert len(logged) == 1 and f"{n} records not redriven" in logged[0], res.stderr
    assert "missing_message_id" in logged[0]
    assert len(dlq_records(settings, at_least=2 * n)) == 2 * n  # each one dead-lettered again


def test_a_dead_letter_kafka_refuses_to_take_back_fails_alone_and_the_pass_goes_on(
    settings: Settings, topics: Topics
) -> None:
    """A dead letter larger than the producer now takes (dead-lettered before SENTPIPE_MAX_BODY_BYTES was
    lowered) ended every redrive at that record with `error: ProduceRejected: msg_size_too_large`: nothing
    reached the ledger, so the records before it were sent again by every pass, and those after it never."""
    lowered = settings.model_copy(update={"max_body_bytes": 65_536})
    f = SampleFactory(45)
    before, after = f.inbound().body, f.inbound().body
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "message.max.bytes": 2_000_000})
    # Still failing, and too large for its new copy: counted once, under the refusal (it was under both).
    big_junk = b"not json " * 70_000
    for i, (key, body) in enumerate(
        ((b"before", before), (b"big", padded_envelope(600_000)), (b"after", after), (b"junk", big_junk))
    ):
        dlq = r.dlq_headers(stage="route", error_class="not_json", message="x", partition=0, offset=i)
        producer.produce(topics.dlq, body, key, headers=[(r.H_TENANT, b"acme"), *dlq])
    assert producer.flush(30) == 0

    first = dlq_ops.redrive(lowered, dlq_ops.make_selection())
    assert (first.produced, first.failed) == (2, 2), first
    assert dict(first.failures) == {
        "produce:msg_size_too_large": 1,
        "dlq produce:msg_size_too_large": 1,
    }, first.failures
    # Neither is back in the DLQ: the closing line named "failed again" for the one whose copy was refused.
    assert dlq_ops.redrive_failed(first, dlq_ops.make_selection()) == (
        "2 record(s) larger than this process's producer takes (SENTPIPE_MAX_BODY_BYTES sets its limit): left"
        " in the DLQ; run the redrive with the SENTPIPE_MAX_BODY_BYTES they arrived under"
    )
    again = dlq_ops.redrive(lowered, dlq_ops.make_selection())
    assert (again.produced, again.already_redriven, again.failed) == (0, 2, 2), again
    sent = read_topic(settings.kafka_bootstrap, topics.message_inbound, at_least=2)
    assert sorted(canonical_id(rec) for rec in sent) == ["after", "before"]  # the dead letters' keys
    assert len(read_topic(settings.kafka_bootstrap, topics.dlq_redriven, at_least=2)) == 2


def still_failing_dead_letters(s: Settings, topics: Topics, n: int) -> None:
    """`n` route-stage dead letters a redrive cannot route (no message id), keyed k0, k1, ..."""
    producer = Producer({"bootstrap.servers": s.kafka_bootstrap, "linger.ms": 20})
    for i in range(n):
        dlq = r.dlq_headers(stage="route", error_class="missing_message_id", message="no id")
        while True:
            try:
                producer.produce(topics.dlq, MALFORMED, f"k{i}".encode(), headers=[(r.H_TENANT, b"a"), *dlq])
                break
            except BufferError:
                producer.poll(0.1)
    assert producer.flush(60) == 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupted_redrive_says_so_and_leaves_no_dead_letter_twice(
    settings: Settings, topics: Topics, sig: int
) -> None:
    """Ctrl-C left a redrive by a KeyboardInterrupt (a SIGTERM ended it anywhere): sends the broker had
    acknowledged never reached the ledger, and each still-failing record among them then stayed in the DLQ
    twice for good (its old copy untaken, its new one written). Now either signal ends the pass after the
    record in hand, the ledger has every record it took, and the next pass leaves each dead letter in the
    DLQ once."""
    n = 30_000
    still_failing_dead_letters(settings, topics, n)

    # Well inside the pass: its sends are in flight.
    res = sentpipe_interrupted(settings, "dlq", "redrive", when="redrive started", after_s=0.5, sig=sig)
    err = res.stderr
    assert res.returncode == 1 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    m = re.fullmatch(
        r"error: redrive \S+ interrupted after (\d+) of (\d+) records \(0 redriven, (\d+) failed\); what it"
        r" sent is in the ledger, so running it again goes on with the rest",
        last,
    )
    assert m is not None, last
    done, total, failed = int(m[1]), int(m[2]), int(m[3])
    assert total == n and 0 < done < n and failed == done, last

    # Every record the pass took (dead-lettered again: a copy after the first n) is in the ledger.
    copies = dlq_records(settings, at_least=n + done)
    assert len(copies) == n + done
    ledger = read_topic(settings.kafka_bootstrap, topics.dlq_redriven, at_least=done, timeout=60)
    assert len(ledger) == done

    finished = dlq_ops.redrive(settings, dlq_ops.make_selection())
    assert (finished.read, finished.already_redriven) == (n + done, done)
    left = dlq_ops.list_entries(settings, dlq_ops.make_selection(), limit=1_000_000)
    keys = Counter(e.key for e in left.entries)
    assert len(keys) == n and set(keys.values()) == {1}


def test_a_redrive_stopped_before_its_first_record_sends_nothing(settings: Settings, topics: Topics) -> None:
    """A Ctrl-C while the redrive was still setting up (its lock, the ledger) was acted on only after one
    record had been sent."""
    _handler_dead_letters(settings, topics, 3)

    def ctrl_c_before_the_first(done: int, total: int) -> None:
        if done == 0:
            signal.raise_signal(signal.SIGINT)  # handled by the redrive's own handler: a request to stop

    with pytest.raises(OpsError, match=r"interrupted after 0 of 3 records \(0 redriven, 0 failed\)"):
        dlq_ops.redrive(settings, dlq_ops.make_selection(), progress=ctrl_c_before_the_first)
    assert record_count(settings.kafka_bootstrap, topics.message_inbound) == 0
    assert record_count(settings.kafka_bootstrap, topics.dlq_redriven) == 0


def test_dead_letters_retention_deletes_while_a_redrive_reads_are_counted_and_named(
    settings: Settings, topics: Topics, caplog: pytest.LogCaptureFixture
) -> None:
    """Retention deleting dead letters after the redrive planned its pass: librdkafka skipped them without
    a word, "read" ended short of the pass, and a dead letter asked for by ID was not redriven, exit 0."""
    _handler_dead_letters(settings, topics, 12)
    rows = dlq_ops.list_entries(settings, dlq_ops.make_selection(), limit=100).entries
    by_partition: dict[int, list[int]] = {}
    for row in rows:
        p, o = (int(x) for x in row.id.split(":"))
        by_partition.setdefault(p, []).append(o)
    p, offsets = max(by_partition.items(), key=lambda kv: len(kv[1]))
    assert len(offsets) >= 3, by_partition
    first, last = min(offsets), max(offsets)
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})

    def retention_deletes(done: int, total: int) -> None:
        if done == 0:  # planned, not yet read
            for future in admin.delete_records([TopicPartition(topics.dlq, p, last)]).values():
                future.result(30)

    sel = dlq_ops.make_selection(ids=[f"{p}:{first}", f"{p}:{last}"])
    with caplog.at_level("WARNING", logger="sentpipe.dlq"):
        result = dlq_ops.redrive(settings, sel, progress=retention_deletes)
    assert (result.read, result.produced, result.past_retention) == (1, 1, last - first), result
    assert result.missing_ids == [f"{p}:{first}"], result
    assert [
        rec.__dict__["partition"] for rec in caplog.records if "retention deleted" in rec.getMessage()
    ] == [p]
    why = dlq_ops.redrive_failed(result, sel)
    assert why is not None and f"deleted by retention before the redrive read them: {p}:{first}" in why, why
    # The one left is in the ledger now; asked again, the deleted one is refused before anything is read.
    with pytest.raises(OpsError, match=rf"no DLQ record {p}:{first} "):
        dlq_ops.redrive(settings, sel)


def test_a_second_signal_ends_a_redrive_at_once_with_one_line(settings: Settings, topics: Topics) -> None:
    """A second Ctrl-C raised KeyboardInterrupt wherever the redrive was: inside librdkafka's poll it came
    out as `error: SystemError: ... returned NULL without setting an exception`, status 1."""
    still_failing_dead_letters(settings, topics, 20_000)
    res = sentpipe_interrupted(
        settings, "dlq", "redrive", when="redrive started", after_s=0.3, then=signal.SIGTERM
    )
    assert res.returncode == 128 + signal.SIGTERM and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.strip().splitlines()[-1] == f"error: {dlq_ops.REDRIVE_AT_ONCE}", res.stderr


def test_a_redrive_the_broker_refused_for_size_is_not_told_to_check_the_broker() -> None:
    """A topic's max.message.bytes below a letter: "Kafka did not take (is it reachable?): run the redrive
    again", which can never succeed as it is."""
    result = RunResult("r", False, failed=3)
    result.failures.update({dlq_ops.TOO_LARGE: 2, "delivery:_MSG_TIMED_OUT": 1})
    assert dlq_ops.redrive_failures(result) == (
        "1 record(s) Kafka did not take (is it reachable?): run the redrive again; 2 record(s) larger than"
        " their topic's max.message.bytes: left in the DLQ; raise the limit (`sentpipe topics ensure` sets"
        " it from the settings) and run the redrive again"
    )


def test_a_letter_the_producer_refused_is_not_said_to_have_failed_again() -> None:
    """Larger than the producer's own limit (SENTPIPE_MAX_BODY_BYTES lowered since): "failed again; they
    are back in the DLQ", though no stage saw it and no new copy was written."""
    result = RunResult("r", False, failed=4)
    result.failures.update(
        {dlq_ops.PRODUCER_TOO_LARGE: 2, "produce:unknown_topic_or_part": 1, "no_envelope": 1}
    )
    assert dlq_ops.redrive_failures(result) == (
        "1 record(s) failed again; they are back in the DLQ (or left there); 2 record(s) larger than this"
        " process's producer takes (SENTPIPE_MAX_BODY_BYTES sets its limit): left in the DLQ; run the redrive"
        " with the SENTPIPE_MAX_BODY_BYTES they arrived under; 1 record(s) the producer refused before"
        " sending (1 unknown_topic_or_part): left in the DLQ"
    )


def test_a_failed_redrive_s_closing_line_says_what_to_do_for_each_kind_of_failure() -> None:
    """With the broker gone mid-way every failure read "failed again; they are back in the DLQ": records
    Kafka never took and records sent but missing from the ledger were counted as still failing."""
    result = RunResult("r", False)
    result.failed = 8
    result.failures.update({"no_envelope": 3, "delivery:_MSG_TIMED_OUT": 5})
    result.unrecorded["ledger:_MSG_TIMED_OUT"] = 2  # counted redriven or failed already
    assert dlq_ops.redrive_failures(result) == (
        "3 record(s) failed again; they are back in the DLQ (or left there); 5 record(s) Kafka did not"
        " take (is it reachable?): run the redrive again; 2 record(s) sent but not recorded in the ledger:"
        " the next redrive sends them again"
    )
    # Failing again, their new copy not taken: not back in the DLQ, so told apart like the plain forms.
    result.unrecorded.clear()
    result.failed, result.failures = 3, Counter({"no_envelope": 3, "dlq delivery:_MSG_TIMED_OUT": 3})
    assert dlq_ops.redrive_failures(result) == (
        "3 record(s) Kafka did not take (is it reachable?): run the redrive again"
    )
    result.failed = 6
    result.failures.update({"dlq delivery:MSG_SIZE_TOO_LARGE": 1, dlq_ops.TOO_LARGE: 1, "route_error": 1})
    assert dlq_ops.redrive_failures(result) == (
        "1 record(s) failed again; they are back in the DLQ (or left there); 3 record(s) Kafka did not take"
        " (is it reachable?): run the redrive again; 2 record(s) larger than their topic's max.message.bytes:"
        " left in the DLQ; raise the limit (`sentpipe topics ensure` sets it from the settings) and run the"
        " redrive again"
    )
    result.failed, result.failures = 3, Counter({"no_envelope": 3})
    again = "3 record(s) failed again; they are back in the DLQ (or left there)"
    assert dlq_ops.redrive_failures(result) == again
    result.kept["no sentpipe stage"] = 2
    assert dlq_ops.redrive_failures(result) == (
        "2 record(s) cannot be redriven (no sentpipe stage or routed topic takes them); left in the DLQ"
        " (`sentpipe dlq list --stage unknown` lists those without a stage); " + again
    )
    # Alone they fail only a redrive that named records.
    kept_only = RunResult("r", False, kept=Counter({"no sentpipe stage": 1}))
    assert dlq_ops.redrive_failed(kept_only, dlq_ops.make_selection()) is None
    assert dlq_ops.redrive_failed(kept_only, dlq_ops.make_selection(ids=["0:2"])) is not None
    del result.kept["no sentpipe stage"]
    # The line a stopped or lost pass ends with says so too: it claimed all was in the ledger.
    assert dlq_ops._in_the_ledger(result) == "what it sent is in the ledger"
    result.unrecorded["ledger:_MSG_TIMED_OUT"] = 2
    assert dlq_ops._in_the_ledger(result) == (
        "2 record(s) it sent are not in the ledger (the next redrive sends them again)"
    )
    # Ledger misses alone still fail the redrive: the next one sends those records again.
    missed = RunResult("r", False, produced=2, unrecorded=Counter({"ledger:_MSG_TIMED_OUT": 2}))
    assert dlq_ops.redrive_failed(missed, dlq_ops.make_selection()) == (
        "2 record(s) sent but not recorded in the ledger: the next redrive sends them again"
    )


_SUSPENDED_HOLDER = """
import sys, time
from sentpipe.settings import Settings
from sentpipe.processors.group_lock import GroupLock

lock = GroupLock(Settings(), sys.argv[1], sys.argv[2])
lock.acquire()
last = time.monotonic()  # before "held": the test stops this process as soon as it reads it
print("held", flush=True)
while True:
    time.sleep(0.2)
    held = lock.held()
    now = time.monotonic()
    if now - last > 5:  # the first check after the pause (SIGSTOP, SIGCONT)
        print(f"after the pause: {'held' if held else 'lost'}", flush=True)
        break
    last = now
"""


def test_a_holder_suspended_past_its_session_does_not_trust_its_lock_when_resumed(
    settings: Settings, topics: Topics
) -> None:
    """A redrive suspended (Ctrl-Z) past its session lost the lock to another, but once resumed its checks
    said "held" until a heartbeat was answered: it sent 19 records the other had already taken."""
    group = dlq_ops.redrive_group(settings)
    holder = subprocess.Popen(
        [sys.executable, "-c", _SUSPENDED_HOLDER, topics.dlq_redriven, group],
        env=settings_env(settings),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        holder.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        while True:  # the other holder, once the suspended one's session has run out
            try:
                other = GroupLock(settings, topics.dlq_redriven, group, timeout=5)
                other.acquire()
                break
            except LockBusy:
                assert time.monotonic() - stopped < SESSION_TIMEOUT_S + 30, "the lock was never freed"
        try:
            holder.send_signal(signal.SIGCONT)
            assert holder.stdout.readline() == "after the pause: lost\n"
            assert other.held()
        finally:
            other.release()
    finally:
        holder.kill()
        holder.wait()


_REDRIVE_STOPPED_MIDWAY = """
import os, signal, sys
from sentpipe.settings import Settings
from sentpipe.processors import dlq

real, seen = dlq.plan, 0


def plan(*args, **kwargs):  # stops this process between its lock check and a send, as Ctrl-Z can
    global seen
    seen += 1
    if seen == int(sys.argv[1]):
        print("stopping", flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)
    return real(*args, **kwargs)


dlq.plan = plan
try:
    print("redrove", dlq.redrive(Settings(), dlq.make_selection()).produced, flush=True)
except Exception as exc:
    print("ended:", exc, flush=True)
"""


def _process_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_a_redrive_suspended_mid_pass_sends_nothing_the_next_one_sent(
    settings: Settings, topics: Topics
) -> None:
    """The lock is unfenced: a redrive suspended (Ctrl-Z, a frozen VM) past its session lost it to another,
    which read the ledger and sent the rest; resumed, the first sent the record it was about to send and
    what its client still held, and the other had sent them too: handlers ran twice. The redrive's
    transactional producer is the fence: the next holder's one takes its place, what the first had not
    committed is aborted, and its later sends are refused."""
    n = 300
    ids = _handler_dead_letters(settings, topics, n)
    first = subprocess.Popen(
        [sys.executable, "-c", _REDRIVE_STOPPED_MIDWAY, str(n // 2)],
        env=settings_env(settings),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert first.stdout is not None and first.stdout.readline() == "stopping\n"
        wait_until(lambda: _process_state(first.pid) == "T", 30, "the first redrive stopped")
        stopped = time.monotonic()
        while True:  # the second redrive, once the suspended one's session has run out
            try:
                second = dlq_ops.redrive(settings, dlq_ops.make_selection(), timeout=5)
                break
            except OpsError as exc:
                assert "another redrive is running" in str(exc), exc
                assert time.monotonic() - stopped < SESSION_TIMEOUT_S + 60, "the lock was never freed"
        first.send_signal(signal.SIGCONT)
        out, _ = first.communicate(timeout=120)
    finally:
        first.kill()
        first.wait()
    assert out.startswith("ended: the redrive lost consumer group"), out
    sent = Counter(canonical_id(rec) for rec in read_topic(settings.kafka_bootstrap, topics.message_inbound))
    assert sorted(sent) == sorted(ids), (len(sent), n)
    assert [i for i, times in sent.items() if times > 1] == []
    assert second.read == n, second
    again = dlq_ops.redrive(settings, dlq_ops.make_selection())
    assert (again.produced, again.already_redriven) == (0, n), again


def test_a_long_ledger_read_keeps_the_redrive_lock_polled(settings: Settings, topics: Topics) -> None:
    """The redrive reads the whole ledger while it holds its lock; unpolled for that long, the lock's member
    was dropped from the group (past its poll interval) and the pass ended "lost" before sending anything."""
    records = 2 * dlq_ops.KEEP_ALIVE_EVERY + 1
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "linger.ms": 50})
    for i in range(records):
        producer.produce(topics.dlq_redriven, key=f"0:{i}".encode(), value=b'{"redrive_id": "r1"}')
        producer.poll(0)
    assert producer.flush(30) == 0
    polls = 0

    def keep_alive() -> None:
        nonlocal polls
        polls += 1

    with Log(settings) as kafka:
        taken = dlq_ops.redriven(kafka, topics, keep_alive)
    assert taken is not None and len(taken.entries) == records
    assert {run for run, _ in taken.entries.values()} == {"r1"}
    assert polls == 2


def _listed_ids(table: str) -> set[str]:
    """The ID column of a `dlq list` table."""
    return set(re.findall(r"^│ (\d+:\d+) +│", table, re.MULTILINE))


def test_a_record_whose_header_name_is_not_utf8_does_not_stop_the_dlq_tools(
    settings: Settings, topics: Topics
) -> None:
    """Anyone can write to the DLQ, and confluent-kafka cannot hand over a header name that is not UTF-8
    (SystemError): one such record ended `dlq list`, `dlq redrive` and the projector's reads of its topic
    for good. It is read without its headers (no stage: listed, never redriven) and the others go on. Such a
    record can be found by stage `unknown` (refused before) and fails only a redrive that names it: every
    unfiltered redrive failed (exit 1) for as long as it stayed in the DLQ."""
    ids = _handler_dead_letters(settings, topics, 2)
    produce_with_header_name(settings.kafka_bootstrap, topics.dlq, 0, b"k", b"{}", b"x-\xff\xfe")
    ids += _handler_dead_letters(settings, topics, 1)

    res = sentpipe(settings, "dlq", "list")
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr and "SystemError" not in res.stderr + res.stdout
    assert {"0:2", "0:3"} <= _listed_ids(res.stdout), res.stdout
    result = dlq_ops.redrive(settings, dlq_ops.make_selection())
    assert (result.read, result.produced, result.failed) == (4, 3, 0), result
    assert result.kept == Counter({"no sentpipe stage": 1}), result
    sent = read_topic(settings.kafka_bootstrap, topics.message_inbound, at_least=3)
    assert sorted(canonical_id(rec) for rec in sent) == sorted(ids)
    listed = sentpipe(settings, "dlq", "list", "--stage", "unknown")
    assert listed.returncode == 0, listed.stderr
    # By the ID column: a listing made at 21:00:31 has "0:3" in its time column.
    assert _listed_ids(listed.stdout) == {"0:2"}, listed.stdout
    again = sentpipe(settings, "dlq", "redrive")
    assert again.returncode == 0, again.stderr
    assert "cannot be redriven" in again.stdout and "no sentpipe stage" in again.stdout, again.stdout
    named = sentpipe(settings, "dlq", "redrive", "--id", "0:2")
    assert named.returncode == 1
    assert_one_line_error_at_end(named, "1 record(s) cannot be redriven")

    # The projector's read of such a record, after enough others that the interpreter has specialized the
    # call site (which then skipped the check that turns confluent-kafka's pending error into SystemError:
    # a segmentation fault, where a cold call site raised).
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
    for _ in range(300):
        producer.produce(topics.unrouted, b"v", b"k", partition=0, headers=[("ok", b"1")])
    assert producer.flush(30) == 0
    produce_with_header_name(settings.kafka_bootstrap, topics.unrouted, 0, b"k", b"v", b"x-\xff\xfe")
    consumer = KafkaBatchConsumer(settings, "header-names", [topics.unrouted])
    try:
        records: list[BrokerRecord] = []
        deadline = time.monotonic() + 60
        while len(records) < 301 and time.monotonic() < deadline:
            records += consumer.poll_batch(500, 1.0)
    finally:
        consumer.close()
    by_offset = sorted(records, key=lambda rec: (rec.partition, rec.offset))
    assert [rec.headers for rec in by_offset] == [(("ok", b"1"),)] * 300 + [()]


def test_a_redrive_the_broker_leaves_says_how_far_it_got(
    services: Services, settings: Settings, topics: Topics
) -> None:
    """The broker gone while a redrive reads the DLQ: it ended with the read's error alone. Now it says how
    far it got and what the ledger holds, and running it again after the broker is back takes the rest."""
    if not services.kafka_local:
        pytest.fail(
            "this test stops the broker: run it with the local launcher (unset SENTPIPE_KAFKA_BOOTSTRAP)"
        )
    ids = _handler_dead_letters(settings, topics, 5)
    stopped: list[int] = []

    def broker_leaves(done: int, total: int) -> None:
        if not stopped:  # the ledger read, the DLQ not yet
            stopped.append(done)
            services.stop_kafka()

    try:
        with pytest.raises(OpsError) as info:
            dlq_ops.redrive(settings, dlq_ops.make_selection(), progress=broker_leaves, timeout=5)
    finally:
        services.start_kafka()
    assert re.fullmatch(
        r"no records from Kafka broker at \S+ for \d+s.*; redrive \S+ stopped after 0 of 5 records"
        r" \(0 redriven, 0 failed\); what it sent is in the ledger, and running it again goes on with"
        r" the rest",
        str(info.value),
    ), str(info.value)
    wait_topics_ready(settings.kafka_bootstrap, [topics.dlq, topics.dlq_redriven, topics.message_inbound])
    again = dlq_ops.redrive(settings, dlq_ops.make_selection(), timeout=30)
    assert again.produced == 5, again
    sent = read_topic(settings.kafka_bootstrap, topics.message_inbound, at_least=5)
    assert sorted(orjson.loads(rec.value)["id"] for rec in sent) == sorted(ids)


def test_a_redrive_whose_ledger_writes_fail_sends_nothing_and_counts_each_record_once(
    settings: Settings, topics: Topics
) -> None:
    """A record sent whose ledger write failed counted as redriven and failed; one still failing, as failed
    twice: "read" no longer added up to the rows under it. Then each was sent with nothing to say so, and
    every later redrive sent it again. A record and its ledger entry are now one transaction: Kafka refusing
    the entry takes the send back, and the record, left in the DLQ, is counted once, as not redriven."""
    from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource

    _handler_dead_letters(settings, topics, 2)
    still_failing_dead_letters(settings, topics, 1)
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    # No ledger record fits: every write is refused (MSG_SIZE_TOO_LARGE).
    small = ConfigEntry("max.message.bytes", "100", incremental_operation=AlterConfigOpType.SET)
    resource = ConfigResource("topic", topics.dlq_redriven, incremental_configs=[small])
    for future in admin.incremental_alter_configs([resource]).values():
        future.result(30)

    result = dlq_ops.redrive(settings, dlq_ops.make_selection())
    assert (result.read, result.produced, result.failed) == (3, 0, 3), result
    assert result.read == (
        result.produced + result.skipped + result.already_redriven + result.failed + result.kept.total()
    )
    assert result.failures == Counter({"ledger:MSG_SIZE_TOO_LARGE": 3}), result.failures
    assert not result.unrecorded, result.unrecorded
    assert dlq_ops.redrive_failed(result, dlq_ops.make_selection()) == (
        "3 record(s) not redriven: Kafka refused their ledger entries (MSG_SIZE_TOO_LARGE), so what was sent"
        " for them was taken back; left in the DLQ"
    )
    assert read_topic(settings.kafka_bootstrap, topics.message_inbound) == []
    assert len(dlq_records(settings)) == 3  # no new copy of the one still failing either


def test_dlq_list_on_a_terminal_shows_its_progress(settings: Settings, topics: Topics) -> None:
    """A listing reads the whole DLQ to show its newest records: over a large one the terminal showed
    nothing at all for as long as that took, where replay and redrive show a progress bar."""
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
    n = 1200
    for i in range(n):
        dlq = r.dlq_headers(
            stage="route", error_class="missing_message_id", message="no id", partition=0, offset=i
        )
        producer.produce(topics.dlq, MALFORMED, f"k{i}".encode(), headers=[(r.H_TENANT, b"acme"), *dlq])
    assert producer.flush(30) == 0
    res, shown = run_on_a_terminal(["dlq", "list", "--limit", "1"], settings_env(settings))
    assert res.returncode == 0, res
    assert f"1 shown, {n} matching" in res.stdout, res.stdout
    assert b"reading the DLQ" in shown, shown
