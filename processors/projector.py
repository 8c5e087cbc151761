"""The projection stage: routed records in batches, into PostgreSQL and the user's handlers, then commit.

It runs on the broker seam (librdkafka in production, `LocalBroker` in unit tests). A batch is committed
only when each of its records is applied or dead-lettered. A failure of the whole (database away) is
retried with backoff forever; any other error is isolated by halving the batch until the record that
raises it is alone, and that record alone goes to the dead-letter topic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from sentpipe import metrics as m
from sentpipe.broker import (
    MAX_POLL_INTERVAL_S,
    BatchConsumer,
    CommitRejected,
    Partition,
    Record,
    RecordProducer,
    Waiting,
    first_offsets,
    next_offsets,
)
from sentpipe.processors.blocked_handlers import CallKey
from sentpipe.processors.consumer_thread import ConsumerThread
from sentpipe.processors.deadletter import DeadLetter, error_class, send_dead_letters
from sentpipe.processors.retry import UNKNOWN_ATTEMPTS, backoff, classify, is_temporary, retrying
from sentpipe.processors.sink import HandlerFailure, TypeHeld
from sentpipe.processors.watchdog import Watchdog
from sentpipe.schemas import routing as r
from sentpipe.schemas.events import ROUTED_TYPES, CanonicalEvent, EventType, check_payload
from sentpipe.schemas.topics import Topics

log = logging.getLogger("sentpipe.projector")

# How often the handler calls of a batch in hand are reported to the watchdog as work going on.
WORKING_EVERY_S = 1.0
# Handler calls of one uncommitted batch remembered (batch size x handlers); past it the memory starts again.
MAX_CALLS_ENDED = 100_000
# A commit still waiting for the broker is logged this often (it waits as long as the broker does not answer).
COMMIT_WAITING_EVERY_S = 30.0


class Sink(Protocol):
    # Set by the projector: called with the call's key whenever a handler call ends.
    on_call: Callable[[CallKey], None] | None

    async def apply(
        self, type_: EventType, events: Sequence[CanonicalEvent], attempt: int, unknown_retries: int
    ) -> list[HandlerFailure]:
        """`unknown_retries`: how many more times the batch is retried for an error of unknown kind."""

    def settle(self) -> None:
        """The batch applied since the last settle or unsettle is committed."""

    def unsettle(self) -> None:
        """The batch applied since the last settle or unsettle is rewound, to be applied again."""


@dataclass(frozen=True, slots=True)
class Tuning:
    batch_size: int = 500
    within_s: float = 0.1
    retry_initial_s: float = 0.2
    retry_max_s: float = 30.0
    # How often sentpipe_consumer_lag is exported: also while a batch is stuck (the database away), when
    # the lag growing is the alert's whole point.
    lag_every_s: float = 10.0
    # On stop, how long a commit, then the consumer's close, may wait for the broker before they are left
    # behind: the batch is read again by the next owner (the projections are idempotent).
    stop_wait_s: float = 10.0
    # How long a commit may go unanswered while the broker answers everything else (its producer's probe)
    # before the client is given up on: see CommitStuck.
    commit_stuck_s: float = 60.0
    # The consumer's: a batch that takes longer is dropped with its member (see `_fit_batches`).
    max_poll_interval_s: float = MAX_POLL_INTERVAL_S


class CommitStuck(Exception):
    """A commit librdkafka never answers although the broker is back and answering. Seen after a broker
    restart in the chaos tests (the commit waited for good, the whole stage with it), as librdkafka issues
    #5456 and #5511 describe: its coordinator request waits on a coordinator connection that is gone. No
    call on that client gets past it; only a new client does, which is a new process (EXIT_RESTART)."""


# The projector's exit status when it wants a new process (CommitStuck): role `all` starts a new child,
# role `project` leaves it to the orchestrator's restart policy. EX_TEMPFAIL.
EXIT_RESTART = 75


def init_projector_metrics() -> None:
    """The projector's label sets at zero, so the alerts' `increase()` sees its first batch and retry in
    whichever process projects (role `project` has no router to create them)."""
    for type_ in ROUTED_TYPES:
        m.EVENTS_PROCESSED.labels(type_.value, "projection", "ok")
    for stage in ("project", "dlq"):
        m.RETRIES.labels(stage)


class Projector:
    def __init__(
        self,
        consumer: BatchConsumer,
        producer: RecordProducer,
        sink: Sink,
        topics: Topics,
        tuning: Tuning = Tuning(),
        watchdog: Watchdog | None = None,
        broker_down: Callable[[], bool] = lambda: False,
    ) -> None:
        self.consumer, self.producer, self.sink, self.topics, self.t = (
            consumer,
            producer,
            sink,
            topics,
            tuning,
        )
        self.types = {
            topics.message_status: EventType.MESSAGE_STATUS,
            topics.message_inbound: EventType.MESSAGE_INBOUND,
            topics.template_approval: EventType.TEMPLATE_APPROVAL,
        }
        self.watchdog = watchdog
        self._broker_down = broker_down  # a commit waiting then is the broker's wait, not a stuck client
        sink.on_call = self._handler_called
        # The partitions of the batch in hand, and the handler calls of it that have ended: the first end
        # of each (handler, event id) shows the watchdog the batch is moving.
        self._batch_partitions: set[Partition] = set()
        self._calls_ended: set[CallKey] = set()
        self._working_at = 0.0
        # A batch rewound (held, or failed as a whole) earns no such credit until a batch commits: read
        # again with a few new records each round, it would otherwise look like progress forever.
        self._rewound = False
        self.started = False  # the group has given the consumer its assignment (a poll returning is not it)
        self.stopping = False
        self._lag_series: set[Partition] = set()
        # Fetched is not done: the records of the batch in hand count as waiting until it commits.
        self._in_hand: Sequence[Record] = ()
        # Polls and commits wait in a thread of their own: in the default executor, the threads of a few
        # handlers' `asyncio.to_thread` calls that hang would leave no thread to poll or commit with.
        self._consumer_thread = ConsumerThread("sentpipe-projector-consumer")
        self._lag_read: asyncio.Future[dict[Partition, Waiting]] | None = None
        self._left_behind = False  # a commit given up on while stopping: the consumer's thread still waits
        self._lags: list[tuple[str, float]] = []  # (type, end-to-end lag) of the batch in hand
        # The partitions of a held type, paused until their records are read again (monotonic time), so
        # that the other types are polled on at full speed meanwhile; and the holds in a row, whose backoff
        # sets that time.
        self._paused: dict[Partition, float] = {}
        self._holds = 0
        # Records a poll may return: `batch_size`, or fewer while batches take too long (`_fit_batches`).
        self.batch_limit = self.t.batch_size
        self._polled_at = 0.0

    @property
    def held(self) -> frozenset[Partition]:
        """Partitions of a held type, paused until their records are read again."""
        return frozenset(self._paused)

    def stop(self) -> None:
        self.stopping = True

    def _should_stop(self) -> bool:
        return self.stopping

    async def run(self) -> None:
        """Until stop(): poll, apply, commit. The consumer is closed on the way out.

        A batch that fails as a whole (the broker gone mid-batch, anything unforeseen) is rewound and read
        again after a backoff, forever: the stage holds the line, it never dies with records waiting."""
        failures = 0
        exporter = asyncio.create_task(self._export_lag_forever())
        try:
            while not self.stopping:
                try:
                    await self.step()
                    failures = 0
                except CommitStuck:
                    raise  # no retry on this client helps
                except TypeHeld:
                    # Its partitions are paused for the backoff (`_hold`); the other types go on at once.
                    failures = 0
                except Exception as exc:
                    if self.stopping:  # read again by whoever owns its partitions next
                        log.warning("stopped with a batch uncommitted (%s: %s)", type(exc).__name__, exc)
                        break
                    failures += 1
                    m.RETRIES.labels("project").inc()
                    delay = backoff(failures, self.t.retry_initial_s, self.t.retry_max_s)
                    log.warning(
                        "projection batch failed as a whole (%s: %s); reading it again in %.1f s",
                        type(exc).__name__,
                        exc,
                        delay,
                    )
                    await asyncio.sleep(delay)
        finally:
            exporter.cancel()
            await self._close_consumer()

    async def _close_consumer(self) -> None:
        """Closed, the consumer leaves its group at once, so the next owner need not wait out a session
        timeout. The close waits in line behind the consumer's last call, though, and that call can be a
        commit waiting for a broker that does not answer: then it is not waited for."""
        close = self._consumer_thread.call(self.consumer.close)
        try:
            await asyncio.wait_for(close, 0 if self._left_behind else self.t.stop_wait_s)
        except TimeoutError:
            log.error(
                "the consumer was not closed (the broker does not answer): its partitions go to another "
                "member after the session timeout"
            )
        finally:
            self._consumer_thread.close()

    async def step(self) -> int:
        """One batch: returns how many records it consumed (0 when the poll timed out). Raises TypeHeld
        when a type of the batch was held (its partitions paused, the other types committed)."""
        await self._resume_due()
        records = await self._consumer_thread.call(
            self.consumer.poll_batch, self.batch_limit, self.t.within_s
        )
        self._polled_at = time.monotonic()
        # A poll returns after `within_s` (20 ms) whether the group is joined or not: /readyz said ready
        # before the projector had its partitions.
        self.started = self.consumer.joined
        self._in_hand = records
        if self.watchdog is not None:
            self.watchdog.waiting_at(first_offsets(records))
            lag = await self._lag()
            if lag is not None:
                self.watchdog.lag({where: w.records for where, w in lag.items()})
                self.watchdog.waiting_at({where: w.at for where, w in lag.items()})
        if not records:
            return 0
        try:
            return await self._project(records)
        except BaseException:
            # Not committed: the next poll must return these records again, not the ones after them (those
            # still in hand: a batch held for one type's handlers has committed the other types' records).
            # Stopping, there is no next poll, and the consumer may be waiting for a broker; a commit left
            # behind (CommitStuck) holds the consumer's thread, and there is no next poll on it either.
            self.sink.unsettle()
            self._lags = []
            if not self.stopping and not self._left_behind and self._in_hand:
                await self._consumer_thread.call(self.consumer.rewind, self._in_hand)
            self._rewound = True
            raise
        finally:
            self._in_hand = ()

    async def _project(self, records: list[Record]) -> int:
        self._batch_partitions = {(rec.topic, rec.partition) for rec in records}
        dead: list[DeadLetter] = []
        by_type: dict[EventType, list[tuple[Record, CanonicalEvent]]] = {}
        for rec in records:
            type_ = self.types.get(rec.topic)
            where = {"topic": rec.topic, "partition": rec.partition, "offset": rec.offset}
            if type_ is None:
                log.warning("record on a topic no projection reads; sent to the DLQ", extra=where)
                dead.append(_dead(rec, "project", "unexpected_topic", f"no projection reads {rec.topic}"))
                continue
            try:
                event = CanonicalEvent.from_json(rec.value)
                if event.type is not type_:
                    # Written by someone else: the topic says where it is, not what it is.
                    raise ValueError(f"a {event.type.value} event on {rec.topic}")
                # Held to the checks `frame` applies: {"a": 1} as inbound text was stored as "{'a': 1}".
                check_payload(event.type, event.data)
            except Exception as exc:  # any decoding failure is this record's, never its batch's
                log.warning(
                    "record is not a canonical event; sent to the DLQ",
                    extra={**where, "error": type(exc).__name__},
                )
                dead.append(_dead(rec, "project", "bad_canonical_event", f"{type(exc).__name__}: {exc}"))
                continue
            by_type.setdefault(type_, []).append((rec, event))
        held: TypeHeld | None = None
        held_topics: set[str] = set()
        for type_, items in by_type.items():
            try:
                await self._apply(type_, items, dead)
            except TypeHeld as exc:
                # Only this type's records wait (each type has its own topic). Rewound whole, the batch
                # was read again round after round while the lock lasted, and the other types' handlers,
                # their transactions committed, were called again each round.
                held = held or exc
                held_topics.update(rec.topic for rec, _ in items)
        if held is not None:
            records = [rec for rec in records if rec.topic not in held_topics]
            dead = [d for d in dead if d.origin[0] not in held_topics]
            if not records:
                await self._hold(held, held_topics)
                raise held
        await send_dead_letters(
            self.producer,
            self.topics.dlq,
            dead,
            initial=self.t.retry_initial_s,
            cap=self.t.retry_max_s,
            should_stop=self._should_stop,
            # Its transactions are committed: raised, the batch was rewound and applied again (its handlers
            # called again) every backoff for as long as the DLQ refused.
            hold_refused=True,
        )
        done = next_offsets(records)
        committed = await self._commit(done)
        self._fit_batches(len(self._in_hand), time.monotonic() - self._polled_at)
        if held is not None:
            self._in_hand = [rec for rec in self._in_hand if rec.topic in held_topics]
            await self._hold(held, held_topics)
        elif not self._paused:
            self._holds = 0
        self._after_commit(committed)
        self._calls_ended.clear()
        self._rewound = False
        if self.watchdog is not None:
            self.watchdog.progress(done)
        if committed:
            self._count(records, dead)
        if held is not None:
            raise held  # the held type's records are rewound and read again, with what has arrived since
        return len(records)

    def _fit_batches(self, polled: int, took_s: float) -> None:
        """Keep a batch well within the consumer's poll interval. Past it, the group drops this member, the
        batch's commit is refused, and the same batch is read again, as slow again, forever: 500 records of
        a handler that calls an API taking 0.7 s each. Cut to a quarter of the interval's worth, a batch
        grows back (doubling) once batches take less than a sixteenth of it."""
        budget = self.t.max_poll_interval_s
        if took_s > budget / 2 and polled > 1:
            limit = max(1, min(polled // 2, int(polled * budget / 4 / took_s)))
            log.warning(
                "a batch of %d records took %.0f s, near or past the %.0f s the group waits for a poll "
                "(past it, its commit is refused and it is read again): batches now take at most %d",
                polled,
                took_s,
                budget,
                limit,
            )
            self.batch_limit = limit
        elif took_s < budget / 16 and polled >= self.batch_limit and self.batch_limit < self.t.batch_size:
            self.batch_limit = min(self.t.batch_size, self.batch_limit * 2)

    async def _hold(self, held: TypeHeld, topics: set[str]) -> None:
        """The held type's partitions of the batch in hand are paused for a backoff (rewound by `step`): the
        run loop slept that backoff before the next poll, and every other type of the stage waited with the
        held one, a batch per backoff (up to `retry_max_s`) for as long as the hold lasted."""
        self._holds += 1
        # Never less than the first retry's wait: full jitter's zero read the held records again at once.
        delay = max(self.t.retry_initial_s, backoff(self._holds, self.t.retry_initial_s, self.t.retry_max_s))
        partitions = {(rec.topic, rec.partition) for rec in self._in_hand}
        await self._consumer_thread.call(self.consumer.pause, partitions)
        until = time.monotonic() + delay
        for where in partitions:
            self._paused[where] = until
        m.RETRIES.labels("project").inc()
        log.warning(
            "%s held (%s: %s); read again in %.1f s, the other topics go on",
            ", ".join(sorted(topics)),
            type(held).__name__,
            held,
            delay,
        )

    async def _resume_due(self) -> None:
        if not self._paused:
            return
        now = time.monotonic()
        due = [where for where, until in self._paused.items() if until <= now]
        if due:
            await self._consumer_thread.call(self.consumer.resume, due)
            for where in due:
                del self._paused[where]

    def _after_commit(self, committed: bool) -> None:
        """Settle what the batch applied, once its offsets are stored; a commit dropped (the partitions
        moved) leaves it unsettled: whoever owns them next, this consumer too, applies the batch again.
        Nothing here may rewind the batch: raised from here, a committed batch was read and applied again."""
        lags, self._lags = self._lags, []
        if not committed:
            self.sink.unsettle()
            return
        try:
            self.sink.settle()
            for type_name, lag in lags:  # observed once committed: a batch rewound is applied again
                m.END_TO_END_LAG_SECONDS.labels(type_name).observe(lag)
        except Exception as exc:  # the record of calls on a full disk, say
            log.error("settling a committed batch failed (%s: %s)", type(exc).__name__, exc)

    def _handler_called(self, key: CallKey) -> None:
        """Progress counts per committed batch, so a batch slow only because its handler calls time out one
        after another (SENTPIPE_HANDLER_TIMEOUT_S each) would be a stall, its restart slow the same way,
        forever. A call that ends for the first time is progress; calls made again (a held or halved
        batch applied again) are not, nor is anything once the batch has been rewound: a batch that only
        repeats itself is still a stall."""
        if self.watchdog is None or self._rewound or key in self._calls_ended:
            return
        if len(self._calls_ended) >= MAX_CALLS_ENDED:
            self._calls_ended.clear()
        self._calls_ended.add(key)
        self._working()

    def _working(self) -> None:
        """The batch in hand moves (see `_handler_called`): told to the watchdog at most once a second (a fast
        batch ends thousands of calls a second). Nothing counts once the batch has been rewound."""
        if self.watchdog is None or self._rewound:
            return
        now = self.watchdog.clock()
        if now - self._working_at >= WORKING_EVERY_S:
            self._working_at = now
            self.watchdog.working(self._batch_partitions)

    async def _commit(self, done: dict[Partition, int]) -> bool:
        """Commit in the consumer's thread, retrying with backoff while the coordinator is away; whether the
        offsets are stored. Partitions that moved to another member are theirs: the commit is dropped
        (False), the new owner applies the batch again (the projections are idempotent)."""
        attempt = 0
        while True:
            try:
                await self._wait_for_commit(done)
                return True
            except CommitRejected as exc:
                if exc.assignment_lost:
                    log.warning("commit dropped: the partitions moved to another consumer (%s)", exc.reason)
                    return False
                if self.stopping:
                    raise
                attempt += 1
                m.RETRIES.labels("project").inc()
                delay = backoff(attempt, self.t.retry_initial_s, self.t.retry_max_s)
                log.warning("commit failed (%s); retrying in %.1f s", exc.reason, delay)
                await asyncio.sleep(delay)

    async def _wait_for_commit(self, done: dict[Partition, int]) -> None:
        """A synchronous commit waits as long as the broker does not answer (a frozen broker: minutes),
        and librdkafka bounds it with nothing: the wait is logged, shows as a stall, and on stop it is
        left behind after `stop_wait_s`, uncommitted, rather than holding the process. Unanswered for
        `commit_stuck_s` while the broker answers, it is left behind too: CommitStuck."""
        commit = asyncio.ensure_future(self._consumer_thread.call(self.consumer.commit, done))
        commit.add_done_callback(_ignore_result)  # awaited below, unless it is left behind
        started = warned = answering_since = time.monotonic()
        stop_seen: float | None = None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(commit), 1.0)
                return
            now = time.monotonic()
            if self.stopping:
                stop_seen = now if stop_seen is None else stop_seen
                if now - stop_seen >= self.t.stop_wait_s:
                    self._left_behind = True
                    raise CommitRejected(f"no answer from the broker in {now - started:.0f} s while stopping")
            if self._broker_down():
                answering_since = now
            elif now - answering_since >= self.t.commit_stuck_s:
                self._left_behind = True
                raise CommitStuck(
                    f"a commit has waited {now - started:.0f} s, {now - answering_since:.0f} s of them with "
                    "the broker answering"
                )
            if now - warned >= COMMIT_WAITING_EVERY_S:
                warned = now
                log.warning("a commit has waited %.0f s for the broker; still waiting", now - started)

    async def _apply(
        self,
        type_: EventType,
        items: list[tuple[Record, CanonicalEvent]],
        dead: list[DeadLetter],
        tried: int = 0,
        part: bool = False,
    ) -> None:
        """Apply `items`, a batch or (`part`) a part of one being halved to find the records that fail it;
        `tried`: the attempts its records have had already in a larger batch an unknown error failed."""
        events = [e for _, e in items]
        unknown_attempts = max(1, UNKNOWN_ATTEMPTS - tried)
        unknown_seen = 0  # as `retrying` counts them: its budget is what the sink may still raise into

        async def apply(attempt: int) -> list[HandlerFailure]:
            nonlocal unknown_seen
            try:
                return await self.sink.apply(
                    type_, events, tried + attempt, unknown_retries=unknown_attempts - unknown_seen - 1
                )
            except Exception as exc:
                unknown_seen += classify(exc) == "unknown"
                raise

        try:
            failures = await retrying(
                apply,
                stage="project",
                initial=self.t.retry_initial_s,
                cap=self.t.retry_max_s,
                should_stop=self._should_stop,
                unknown_attempts=unknown_attempts,
            )
        except TypeHeld:
            raise  # this type's records are rewound and read again, with whatever has arrived since
        except Exception as exc:
            # Temporary: only when stopping. Stopping, a record is not judged on an attempt the stop cut
            # short: the batch stays uncommitted and is read again by the next owner.
            if is_temporary(exc) or self.stopping:
                raise
            if len(items) == 1:
                rec, event = items[0]
                log.warning(
                    "record failed permanently; sent to the DLQ",
                    extra={"event_id": event.id, "type": type_.value, "error": error_class(exc)},
                )
                dead.append(_dead(rec, "project", error_class(exc), r.exception_message(exc)))
                self._working()
                return
            # Which record is it? Halve until it is alone: log2(batch) extra rounds, neighbours applied. An
            # unknown error has had its attempts, with backoff: each part gets one more, not a fresh set at
            # every level (a few such records in a batch of 500 took minutes, a stall, then a restart loop).
            if classify(exc) == "unknown":
                tried = max(tried, UNKNOWN_ATTEMPTS)
            mid = len(items) // 2
            await self._apply(type_, items[:mid], dead, tried, part=True)
            await self._apply(type_, items[mid:], dead, tried, part=True)
            return
        if part:
            self._working()
        committed = time.time()
        for rec, e in items:
            # A replayed or redriven event keeps its first receipt time: counted, every replay of last week
            # put its events past the SLO's p99 and paged for a backlog that was not there.
            if not _reprocessed(rec):
                self._lags.append((type_.value, max(0.0, committed - e.received_at_ms / 1000)))
        by_event = {id(e): rec for rec, e in items}
        for f in failures:
            log.warning(
                "handler failed permanently; event sent to the DLQ",
                extra={"event_id": f.event.id, "handler": f.handler, "error": r.exception_class(f.error)},
            )
            message = f"{f.handler}: {r.exception_message(f.error)}"
            dead.append(_dead(by_event[id(f.event)], "handler", r.exception_class(f.error), message))

    def _count(self, records: Sequence[Record], dead: Sequence[DeadLetter]) -> None:
        """Replayed and redriven records are counted as the worker applies them (or dead-letters them)."""
        failed = {d.origin for d in dead}
        for rec in records:
            for header, mode in ((r.H_REPLAY_ID, "replay"), (r.H_REDRIVE_ID, "redrive")):
                if any(k == header for k, _ in rec.headers):
                    outcome = "failed" if (rec.topic, rec.partition, rec.offset) in failed else "applied"
                    m.REPLAY_EVENTS.labels(mode, outcome).inc()

    async def _lag(self) -> dict[Partition, Waiting] | None:
        """Read in the consumer's thread: on the loop, librdkafka's position() waited behind a commit that
        waited for a frozen broker, and the process stopped answering its probes. One read at a time, and
        none waited for past `lag_every_s`: the stall shows in the watchdog, not as a hung loop."""
        if self._lag_read is not None and not self._lag_read.done():
            return None
        read = self._lag_read = asyncio.ensure_future(self._consumer_thread.call(self.consumer.lag))
        read.add_done_callback(_ignore_result)
        try:
            lag = await asyncio.wait_for(asyncio.shield(read), self.t.lag_every_s)
        except Exception:  # lag is best effort: a partition being reassigned has none, a busy thread later
            return None
        in_hand = Counter((rec.topic, rec.partition) for rec in self._in_hand)
        for where, first in first_offsets(self._in_hand).items():
            # The consumer's position is past the batch in hand (unless rewound to it), which waits until
            # it commits.
            known = lag.get(where)
            if known is None or known.at > first:
                lag[where] = Waiting(first, in_hand[where] + (known.records if known else 0))
        return lag

    async def _export_lag_forever(self) -> None:
        """On its own clock, not per batch: a batch held for an hour by a database outage must not freeze
        the gauge at the value it had before (usually 0) while the topic fills up behind it."""
        while True:
            await asyncio.sleep(self.t.lag_every_s)
            if not self.started:
                continue  # no assignment yet: nothing to say, not "0"
            lag = await self._lag()
            if lag is None:
                continue
            for topic, partition in self._lag_series - lag.keys():  # moved to another worker
                m.CONSUMER_LAG.remove(topic, str(partition))
            for (topic, partition), waiting in lag.items():
                m.CONSUMER_LAG.labels(topic, str(partition)).set(waiting.records)
            self._lag_series = set(lag)


def _ignore_result(future: asyncio.Future[Any]) -> None:
    """A call left behind still ends some day; its error is nobody's, and not worth a warning at exit."""
    if not future.cancelled():
        future.exception()


def _dead(rec: Record, stage: str, error_class: str, message: str) -> DeadLetter:
    return DeadLetter(
        rec.key or b"",
        rec.value,
        rec.headers,
        (rec.topic, rec.partition, rec.offset),
        stage,
        error_class,
        message,
    )


def _reprocessed(rec: Record) -> bool:
    """Sent again by a replay or a redrive, not received now."""
    return any(k == r.H_REPLAY_ID or k == r.H_REDRIVE_ID for k, _ in rec.headers)
