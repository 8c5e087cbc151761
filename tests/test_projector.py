"""The projection stage on the in-memory broker: batches, isolation of poison, dead letters, commits.

The sink here is a stand-in for PostgreSQL (pure logic under test); tests/test_pipeline_e2e.py and
tests/test_poison_worker.py run the same stage against the real broker and database.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import types
from collections.abc import Callable, Mapping, Sequence

import orjson
import psycopg
import pytest
from prometheus_client import REGISTRY

from sentpipe import metrics as m
from sentpipe.broker import CommitRejected, LocalBroker, Partition
from sentpipe.processors import deadletter, retry
from sentpipe.processors.blocked_handlers import CallKey
from sentpipe.processors.deadletter import DeadLetter, send_dead_letters
from sentpipe.processors.projector import CommitStuck, Projector, Tuning
from sentpipe.processors.sink import HandlerFailure
from sentpipe.processors.watchdog import Watchdog
from sentpipe.schemas import routing as r
from sentpipe.schemas.events import CanonicalEvent, EventType
from sentpipe.schemas.samples import SampleFactory
from sentpipe.schemas.topics import Topics

TOPICS = Topics("u.")
FAST = Tuning(batch_size=50, within_s=0.01, retry_initial_s=0.001, retry_max_s=0.002)


class FakeSink:
    """Applies events to a dict; raises what it is told for chosen event ids or whole batches."""

    def __init__(self) -> None:
        self.applied: dict[str, CanonicalEvent] = {}
        self.poison: dict[str, Exception] = {}
        self.down_for = 0  # the next N calls fail as if the database were away
        self.calls = 0
        self.handler_fails: set[str] = set()
        self.on_call: Callable[[CallKey], None] | None = None
        self.settled = self.unsettled = 0  # batches committed / rewound (or their commit dropped)

    async def apply(
        self, type_: EventType, events: Sequence[CanonicalEvent], attempt: int, unknown_retries: int
    ) -> list[HandlerFailure]:
        self.calls += 1
        if self.down_for > 0:
            self.down_for -= 1
            raise psycopg.OperationalError("connection refused")
        for e in events:  # a real transaction applies all or nothing
            if e.id in self.poison:
                raise self.poison[e.id]
        self.applied.update({e.id: e for e in events})
        return [HandlerFailure(e, "h", ValueError("boom")) for e in events if e.id in self.handler_fails]

    def settle(self) -> None:
        self.settled += 1

    def unsettle(self) -> None:
        self.unsettled += 1


def routed_records(
    broker: LocalBroker,
    n: int,
    *,
    headers: list[tuple[str, bytes]] | None = None,
    topics: Topics = TOPICS,
    seed: int = 7,
) -> list[str]:
    """Route n sample events the way the router does and append them to the routed topics."""
    ids = []
    for i, sample in enumerate(SampleFactory(seed).mix(n, "mixed")):
        routed = r.route(
            None,
            sample.body,
            {r.H_TENANT: b"acme"},
            topics=topics,
            id_source="auto",
            default_tenant="default",
            record_timestamp_ms=1_700_000_000_000 + i,
        )
        if routed.event is None:
            continue
        broker.append(routed.topic, routed.key, routed.value, headers or [])
        ids.append(routed.event.id)
    return ids


def setup() -> tuple[LocalBroker, FakeSink, Projector]:
    broker = LocalBroker()
    for t in (*TOPICS.routed, TOPICS.dlq):
        broker.create_topic(t, 3)
    sink = FakeSink()
    projector = Projector(broker.consumer("proj", TOPICS.routed), broker.producer(), sink, TOPICS, FAST)
    return broker, sink, projector


async def drain(projector: Projector) -> None:
    while await projector.step():
        pass


def committed(broker: LocalBroker) -> dict[tuple[str, int], int]:
    return {w: o for (g, w), o in broker.committed.items() if g == "proj"}


def ends(broker: LocalBroker) -> dict[tuple[str, int], int]:
    return {
        (t, p): len(part) for t in TOPICS.routed for p, part in enumerate(broker.topics[t].partitions) if part
    }


async def test_every_record_is_applied_and_the_batch_committed_to_the_end() -> None:
    broker, sink, projector = setup()
    ids = routed_records(broker, 120)
    await drain(projector)
    assert set(sink.applied) == set(ids)
    assert committed(broker) == ends(broker)
    assert broker.records(TOPICS.dlq) == []


async def test_one_poison_record_is_isolated_and_its_neighbours_applied() -> None:
    broker, sink, projector = setup()
    ids = routed_records(broker, 60)
    bad = ids[17]
    sink.poison[bad] = psycopg.errors.ProgramLimitExceeded("index row size exceeds maximum")
    await drain(projector)
    assert set(sink.applied) == set(ids) - {bad}
    (dead,) = broker.records(TOPICS.dlq)
    h = dict(dead.headers)
    assert h[r.H_DLQ_STAGE] == b"project"
    assert h[r.H_DLQ_ERROR_CLASS] == b"sqlstate_54000"
    assert CanonicalEvent.from_json(dead.value).id == bad
    assert h[r.H_DLQ_TOPIC].decode() in TOPICS.routed and h[r.H_DLQ_ATTEMPTS] == b"1"
    assert committed(broker) == ends(broker)


async def test_any_exception_is_a_record_failure_not_a_stall() -> None:
    broker, sink, projector = setup()
    ids = routed_records(broker, 30)
    sink.poison[ids[0]] = KeyError("a bug in a projection")
    sink.poison[ids[-1]] = psycopg.errors.UntranslatableCharacter("NUL")
    await drain(projector)
    assert set(sink.applied) == set(ids) - {ids[0], ids[-1]}
    classes = sorted(dict(d.headers)[r.H_DLQ_ERROR_CLASS] for d in broker.records(TOPICS.dlq))
    assert classes == [b"KeyError", b"sqlstate_22P05"]


async def test_records_an_unknown_error_fails_are_found_after_one_round_of_retries_and_the_stage_moves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Twenty records a trigger refuses (P0001, an error of unknown kind) in a batch of 500: each level of
    the halving retried the error five times with backoff (197 s of backoff), with no progress told to the
    watchdog: /livez failed, and the restarted process met the same batch. Time is virtual here: the
    backoff's sleeps, and 2 s per database round trip (a slow database)."""
    now = [0.0]
    slept = [0.0]
    stalls: list[float] = []
    broker = LocalBroker()
    for t in (*TOPICS.routed, TOPICS.dlq):
        broker.create_topic(t, 3)
    ids = routed_records(broker, 500)
    bad = {ids[(i * 97 + 13) % len(ids)] for i in range(20)}
    sink = FakeSink()
    sink.poison = {i: psycopg.errors.RaiseException("refused by a trigger") for i in bad}
    watchdog = Watchdog("project", 60.0, clock=lambda: now[0])
    tuning = Tuning(batch_size=500, within_s=0.01, retry_initial_s=0.2, retry_max_s=30.0)
    projector = Projector(
        broker.consumer("proj", TOPICS.routed), broker.producer(), sink, TOPICS, tuning, watchdog
    )

    def later(seconds: float) -> None:
        now[0] += seconds
        stalls.extend(s.for_s for s in watchdog.stalls())

    async def sleep(seconds: float) -> None:
        slept[0] += seconds
        later(seconds)

    apply = sink.apply

    async def slow_apply(
        type_: EventType, events: Sequence[CanonicalEvent], attempt: int, unknown_retries: int
    ) -> list[HandlerFailure]:
        later(2.0)
        return await apply(type_, events, attempt, unknown_retries)

    monkeypatch.setattr(retry, "asyncio", types.SimpleNamespace(sleep=sleep))
    monkeypatch.setattr(sink, "apply", slow_apply)
    await drain(projector)
    assert set(sink.applied) == set(ids) - bad
    assert {CanonicalEvent.from_json(d.value).id for d in broker.records(TOPICS.dlq)} == bad
    assert committed(broker) == ends(broker)
    # Backoff only for each type's first round: 4 retries, full jitter under 0.2, 0.4, 0.8 and 1.6 s.
    assert slept[0] <= 3 * 3.0
    assert stalls == []  # while 20 records were isolated in ~170 round trips of 2 s


async def test_a_stop_during_an_error_of_unknown_kind_leaves_the_batch_uncommitted() -> None:
    """A SIGTERM while a record met an error of unknown kind (a deadlock a trigger caught, a brief RAISE)
    dead-lettered the record at once: halving gave each part a single attempt and no backoff."""
    broker, sink, projector = setup()
    ids = routed_records(broker, 20)
    apply = sink.apply

    async def apply_then_stop(
        type_: EventType, events: Sequence[CanonicalEvent], attempt: int, unknown_retries: int
    ) -> list[HandlerFailure]:
        if any(e.id == ids[5] for e in events):
            projector.stop()  # the SIGTERM lands now
            raise psycopg.errors.RaiseException("brief")
        return await apply(type_, events, attempt, unknown_retries)

    sink.apply = apply_then_stop  # type: ignore[method-assign]
    with pytest.raises(psycopg.errors.RaiseException):
        await drain(projector)
    assert broker.records(TOPICS.dlq) == []
    assert ids[5] not in sink.applied and committed(broker) != ends(broker)


async def test_a_database_outage_is_retried_and_nothing_is_dead_lettered() -> None:
    broker, sink, projector = setup()
    ids = routed_records(broker, 20)
    sink.down_for = 5
    await drain(projector)
    assert set(sink.applied) == set(ids)
    assert broker.records(TOPICS.dlq) == []


async def test_undecodable_routed_values_and_handler_failures_are_dead_lettered(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker, sink, projector = setup()
    ids = routed_records(broker, 10)
    broker.append(TOPICS.message_status, b"acme/x", b"\xff not json +15550001234", [])
    broker.append(TOPICS.message_status, b"acme/y", b'{"id": true}', [])
    sink.handler_fails = {ids[3]}
    with caplog.at_level(logging.WARNING, logger="sentpipe"):
        await drain(projector)
    # Each dead letter logged once, where it was, without its bytes (the README's "dead letters log"):
    # the undecodable ones went to the DLQ without a line.
    logged = [rec for rec in caplog.records if "sent to the DLQ" in rec.getMessage()]
    assert len(logged) == 3, [rec.getMessage() for rec in caplog.records]
    assert all("+15550001234" not in rec.getMessage() + str(rec.__dict__) for rec in logged)
    dlq = broker.records(TOPICS.dlq)
    by_stage = sorted((dict(d.headers)[r.H_DLQ_STAGE], dict(d.headers)[r.H_DLQ_ERROR_CLASS]) for d in dlq)
    assert by_stage == [
        (b"handler", b"ValueError"),
        (b"project", b"bad_canonical_event"),
        (b"project", b"bad_canonical_event"),
    ]
    assert committed(broker) == ends(broker)


async def test_the_batch_is_not_committed_until_dead_letters_are_acknowledged() -> None:
    broker, sink, projector = setup()
    ids = routed_records(broker, 5)
    sink.poison[ids[2]] = psycopg.errors.DivisionByZero("x")
    broker.reject_next(TOPICS.dlq, "msg_timed_out", times=3)  # the broker is away for three tries
    await drain(projector)
    assert len(broker.records(TOPICS.dlq)) == 1
    assert committed(broker) == ends(broker)


async def test_a_dlq_that_refuses_a_letter_for_good_is_asked_again_without_applying_the_batch_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The batch's transactions are committed when its dead letters are sent: a refusal raised out of the
    batch rewound it, and it was applied again, its handlers called again, every backoff while it lasted."""
    broker, sink, projector = setup()
    ids = routed_records(broker, 6)
    for i in (1, 4):
        sink.poison[ids[i]] = psycopg.errors.DivisionByZero("x")
    broker.reject_next(TOPICS.dlq, "msg_size_too_large", times=3)  # a size limit lowered, then raised
    with caplog.at_level(logging.ERROR, logger="sentpipe.deadletter"):
        await drain(projector)
    assert sorted(orjson.loads(rec.value)["id"] for rec in broker.records(TOPICS.dlq)) == sorted(
        ids[i] for i in (1, 4)
    )
    assert committed(broker) == ends(broker)
    assert sink.unsettled == 0  # never rewound
    assert "the dead-letter topic refuses" in caplog.text


async def test_dead_letters_acknowledged_are_not_sent_again_when_others_are_retried() -> None:
    """A batch's dead letters were written again, all of them, whenever one was not acknowledged: a hiccup
    on the last of 500 put 499 of them in the DLQ twice."""
    broker, sink, projector = setup()
    ids = routed_records(broker, 9)
    for i in (1, 4, 7):
        sink.poison[ids[i]] = psycopg.errors.DivisionByZero("x")
    broker.reject_next(TOPICS.dlq, "msg_timed_out", times=1)  # the first letter of the first try
    await drain(projector)
    dead = [orjson.loads(rec.value)["id"] for rec in broker.records(TOPICS.dlq)]
    assert sorted(dead) == sorted(ids[i] for i in (1, 4, 7))
    assert committed(broker) == ends(broker)


def lag_observations() -> float:
    return sum(
        REGISTRY.get_sample_value("sentpipe_end_to_end_lag_seconds_count", {"type": t.value}) or 0.0
        for t in EventType
    )


@pytest.mark.parametrize("mode,header", [("replay", r.H_REPLAY_ID), ("redrive", r.H_REDRIVE_ID)])
async def test_replayed_and_redriven_records_are_counted_as_applied(mode: str, header: str) -> None:
    """...and kept out of the end-to-end lag: they keep their first receipt time, and a replay of last week
    put every one past the SLO's p99, paging for a backlog that was not there."""
    broker, _, projector = setup()
    before, lag_before = m.REPLAY_EVENTS.labels(mode, "applied")._value.get(), lag_observations()
    ids = routed_records(broker, 8, headers=[(header, b"run-1")])
    await drain(projector)
    assert m.REPLAY_EVENTS.labels(mode, "applied")._value.get() - before == len(ids)
    assert lag_observations() == lag_before
    live = routed_records(broker, 8, seed=8)  # received now: observed
    await drain(projector)
    assert lag_observations() - lag_before == len(live)


class FlakyCommits:
    """The in-memory consumer, with commits refused as a coordinator away (or a lost assignment) would."""

    def __init__(self, inner: object, refusals: list[CommitRejected]) -> None:
        self.inner, self.refusals, self.commits = inner, refusals, 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def commit(self, offsets: Mapping[Partition, int]) -> None:
        self.commits += 1
        if self.refusals:
            raise self.refusals.pop(0)
        self.inner.commit(offsets)  # type: ignore[attr-defined]


async def test_a_commit_refused_while_the_coordinator_is_away_is_retried_until_it_lands() -> None:
    broker, sink, _ = setup()
    ids = routed_records(broker, 30)
    consumer = FlakyCommits(broker.consumer("proj", TOPICS.routed), [CommitRejected("_TRANSPORT")] * 3)
    projector = Projector(consumer, broker.producer(), sink, TOPICS, FAST)  # type: ignore[arg-type]
    while len(sink.applied) < len(ids) or consumer.refusals:
        await projector.step()
    assert consumer.commits >= 4
    assert sum(broker.committed.values()) == len(ids)  # every record committed once the coordinator is back


async def test_a_commit_for_partitions_now_owned_elsewhere_is_dropped_not_retried() -> None:
    broker, sink, _ = setup()
    routed_records(broker, 30)
    lost = CommitRejected("ILLEGAL_GENERATION", assignment_lost=True)
    consumer = FlakyCommits(broker.consumer("proj", TOPICS.routed), [lost])
    projector = Projector(consumer, broker.producer(), sink, TOPICS, FAST)  # type: ignore[arg-type]
    await projector.step()
    assert consumer.commits == 1 and not broker.committed  # not stored; the new owner re-reads
    # Not settled either: what the sink remembers of its calls (one that ended the process, say) must
    # outlive the batch until it is committed, by whoever owns the partitions next, this consumer too.
    assert (sink.settled, sink.unsettled) == (0, 1)
    await projector.step()  # nothing new: a poll that times out settles nothing
    assert (sink.settled, sink.unsettled) == (0, 1)


class HangingCommits(FlakyCommits):
    """The in-memory consumer, whose commits never return (librdkafka's after a broker restart)."""

    def __init__(self, inner: object) -> None:
        super().__init__(inner, [])
        self.release = threading.Event()

    def commit(self, offsets: Mapping[Partition, int]) -> None:
        self.commits += 1
        self.release.wait(30)  # in the consumer's thread: released when the test ends


async def test_a_commit_unanswered_while_the_broker_answers_gives_the_client_up() -> None:
    """Seen in the chaos tests: after a broker restart a synchronous commit never returned, and the stage
    projected nothing for good although it said so. Unanswered past `commit_stuck_s` with the broker
    answering, the projector ends its run with CommitStuck (its process asks for a new one)."""
    broker, sink, _ = setup()
    routed_records(broker, 30)
    consumer = HangingCommits(broker.consumer("proj", TOPICS.routed))
    tuning = dataclasses.replace(FAST, commit_stuck_s=1.5)
    projector = Projector(consumer, broker.producer(), sink, TOPICS, tuning)  # type: ignore[arg-type]
    try:
        with pytest.raises(CommitStuck, match="with the broker answering"):
            await asyncio.wait_for(projector.run(), 30)
        assert consumer.commits == 1
    finally:
        consumer.release.set()


async def test_a_commit_waiting_for_a_broker_that_is_down_is_not_given_up() -> None:
    """While the broker is away a commit's wait is the broker's: a new client would wait the same."""
    broker, sink, _ = setup()
    routed_records(broker, 30)
    consumer = HangingCommits(broker.consumer("proj", TOPICS.routed))
    tuning = dataclasses.replace(FAST, commit_stuck_s=1.5)
    down = [True]
    projector = Projector(
        consumer,  # type: ignore[arg-type]
        broker.producer(),
        sink,
        TOPICS,
        tuning,
        broker_down=lambda: down[0],
    )
    run = asyncio.ensure_future(projector.run())
    try:
        await asyncio.sleep(4.0)  # past commit_stuck_s more than twice
        assert not run.done() and consumer.commits == 1
        down[0] = False  # back: from now on the wait counts
        with pytest.raises(CommitStuck):
            await asyncio.wait_for(run, 30)
    finally:
        consumer.release.set()
        run.cancel()


async def test_a_batch_failing_as_a_whole_is_read_again_never_skipped() -> None:
    """Anything unforeseen escaping a batch (here the commit itself breaking) must not kill the stage nor
    let the next poll go past the batch: it is rewound and applied again, then committed."""
    broker, sink, _ = setup()
    ids = routed_records(broker, 40)
    consumer = FlakyCommits(broker.consumer("proj", TOPICS.routed), [])
    consumer.refusals = [RuntimeError("the stage broke"), RuntimeError("again")]  # type: ignore[list-item]
    projector = Projector(consumer, broker.producer(), sink, TOPICS, FAST)  # type: ignore[arg-type]
    task = asyncio.ensure_future(projector.run())
    try:
        for _ in range(500):
            if sum(broker.committed.values()) == len(ids):
                break
            await asyncio.sleep(0.01)
    finally:
        projector.stop()
        await asyncio.wait_for(task, 5)
    assert consumer.commits >= 3 and not task.exception()
    assert set(sink.applied) == set(ids)
    assert sum(broker.committed.values()) == len(ids)
    assert not broker.records(TOPICS.dlq)


def _lag_total(prefix: str) -> float:
    return sum(
        s.value
        for family in REGISTRY.collect()
        for s in family.samples
        if s.name == "sentpipe_consumer_lag" and s.labels["topic"].startswith(prefix)
    )


async def test_lag_keeps_being_exported_while_the_database_holds_a_batch() -> None:
    """The lag alert is for exactly this: the database away, one batch held and retried, the topics filling
    up behind it. The gauge must follow them, not keep the value it had before the batch (usually 0)."""
    topics = Topics("held-lag.")
    broker = LocalBroker()
    for t in (*topics.routed, topics.dlq):
        broker.create_topic(t, 3)
    sink = FakeSink()
    sink.down_for = 10**9
    tuning = Tuning(batch_size=500, within_s=0.01, retry_initial_s=0.001, retry_max_s=0.01, lag_every_s=0.01)
    projector = Projector(broker.consumer("proj", topics.routed), broker.producer(), sink, topics, tuning)
    task = asyncio.ensure_future(projector.run())

    async def lag_reaches(n: int) -> float:
        for _ in range(500):
            if _lag_total(topics.prefix) == n:
                break
            await asyncio.sleep(0.01)
        return _lag_total(topics.prefix)

    try:
        held = len(routed_records(broker, 10, topics=topics))
        for _ in range(500):  # the batch is in hand, failing
            if sink.calls:
                break
            await asyncio.sleep(0.01)
        assert await lag_reaches(held) == held  # the batch in hand is fetched, not done
        behind = len(routed_records(broker, 30, topics=topics, seed=8))
        assert await lag_reaches(held + behind) == held + behind
        assert not sink.applied and not broker.committed
    finally:
        projector.stop()
        await asyncio.wait_for(task, 5)


async def test_dead_letter_reasons_made_at_run_time_do_not_grow_the_metric_without_end() -> None:
    """The DLQ counter's reason is the error class, and a handler that makes its exception classes at run
    time (`type(name, ...)`) made a new series per dead letter."""
    broker, _, _ = setup()
    letters = [
        DeadLetter(b"k", b"v", [], (TOPICS.message_status, 0, i), "handler", f"Made{i}", "x")
        for i in range(deadletter.MAX_REASONS + 50)
    ]
    await send_dead_letters(broker.producer(), TOPICS.dlq, letters, initial=0.001, cap=0.002)
    reasons = {
        s.labels["reason"]
        for metric in REGISTRY.collect()
        if metric.name == "sentpipe_dlq_events"
        for s in metric.samples
        if s.labels.get("stage") == "handler" and s.name.endswith("_total")
    }
    assert len(reasons) <= deadletter.MAX_REASONS + 1 and deadletter.OTHER_REASON in reasons
    assert len(broker.records(TOPICS.dlq)) == len(letters)  # every letter is written all the same
