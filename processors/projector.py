"""The projection stage: routed records in batches, into PostgreSQL and the user's handlers, then commit.

It runs on the broker seam (librdkafka in production, `LocalBroker` in unit tests). A batch is committed
only when each of its records is applied or dead-lettered. A failure of the whole (database away) is
retried with backoff forever; any other error is isolated by halving the batch until the record that
raises it is alone, and that record alone goes to the dead-letter topic.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol, TypeVar

from sentpipe import metrics as m
from sentpipe.broker import BatchConsumer, CommitRejected, Partition, Record, RecordProducer, next_offsets
from sentpipe.processors.deadletter import DeadLetter, error_class, send_dead_letters
from sentpipe.processors.retry import backoff, is_temporary, retrying
from sentpipe.processors.sink import HandlerFailure, HandlersHeld
from sentpipe.processors.watchdog import Watchdog
from sentpipe.schemas import routing as r
from sentpipe.schemas.events import CanonicalEvent, EventType, check_payload
from sentpipe.schemas.topics import Topics

_T = TypeVar("_T")

log = logging.getLogger("sentpipe.projector")

# How often the handler calls of a batch in hand are reported to the watchdog as work going on.
WORKING_EVERY_S = 1.0
# Handler calls of one uncommitted batch remembered (batch size x handlers); past it the memory starts again.
MAX_CALLS_ENDED = 100_000


class Sink(Protocol):
    # Set by the projector: called with (handler, event id) whenever a handler call ends.
    on_call: Callable[[str, str], None] | None

    async def apply(
        self, type_: EventType, events: Sequence[CanonicalEvent], attempt: int
    ) -> list[HandlerFailure]: ...


@dataclass(frozen=True, slots=True)
class Tuning:
    batch_size: int = 500
    within_s: float = 0.1
    retry_initial_s: float = 0.2
    retry_max_s: float = 30.0
    # How often sentpipe_consumer_lag is exported: also while a batch is stuck (the database away), when
    # the lag growing is the alert's whole point.
    lag_every_s: float = 10.0


class Projector:
    def __init__(
        self,
        consumer: BatchConsumer,
        producer: RecordProducer,
        sink: Sink,
        topics: Topics,
        tuning: Tuning = Tuning(),
        watchdog: Watchdog | None = None,
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
        sink.on_call = self._handler_called
        # The partitions of the batch in hand, and the handler calls of it that have ended: the first end
        # of each (handler, event id) shows the watchdog the batch is moving.
        self._batch_partitions: set[Partition] = set()
        self._calls_ended: set[tuple[str, str]] = set()
        self._working_at = 0.0
        # A batch rewound (held, or failed as a whole) earns no such credit until a batch commits: read
        # again with a few new records each round, it would otherwise look like progress forever.
        self._rewound = False
        self.started = False  # the first poll has returned: the group is joined
        self.stopping = False
        self._lag_series: set[Partition] = set()
        # Fetched is not done: the records of the batch in hand count as waiting until it commits.
        self._in_hand: Sequence[Record] = ()
        # Polls and commits wait in a thread of their own: in the default executor, the threads of a few
        # handlers' `asyncio.to_thread` calls that hang would leave no thread to poll or commit with.
        self._consumer_thread = ThreadPoolExecutor(1, thread_name_prefix="sentpipe-projector-consumer")

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
                except Exception as exc:
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
            self.consumer.close()
            self._consumer_thread.shutdown(wait=False)

    async def _in_consumer_thread(self, fn: Callable[..., _T], *args: object) -> _T:
        call = functools.partial(fn, *args)
        return await asyncio.get_running_loop().run_in_executor(self._consumer_thread, call)

    async def step(self) -> int:
        """One batch: returns how many records it consumed (0 when the poll timed out)."""
        records = await self._in_consumer_thread(self.consumer.poll_batch, self.t.batch_size, self.t.within_s)
        self.started = True
        self._in_hand = records
        if self.watchdog is not None:
            lag = self._lag()
            if lag is not None:
                self.watchdog.lag(lag)
        if not records:
            return 0
        try:
            return await self._project(records)
        except BaseException:
            # Not committed: the next poll must return these records again, not the ones after them.
            self.consumer.rewind(records)  # seek() only records the new position: no wait
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
        for type_, items in by_type.items():
            await self._apply(type_, items, dead)
        await send_dead_letters(
            self.producer,
            self.topics.dlq,
            dead,
            initial=self.t.retry_initial_s,
            cap=self.t.retry_max_s,
            should_stop=self._should_stop,
        )
        done = next_offsets(records)
        await self._commit(done)
        self._calls_ended.clear()
        self._rewound = False
        if self.watchdog is not None:
            self.watchdog.progress(done)
        self._count(records, dead)
        return len(records)

    def _handler_called(self, handler: str, event_id: str) -> None:
        """Progress counts per committed batch, so a batch slow only because its handler calls time out one
        after another (SENTPIPE_HANDLER_TIMEOUT_S each) would be a stall, its restart slow the same way,
        forever. A call that ends for the first time is progress; calls made again (a held or halved
        batch applied again) are not, nor is anything once the batch has been rewound: a batch that only
        repeats itself is still a stall."""
        key = (handler, event_id)
        if self.watchdog is None or self._rewound or key in self._calls_ended:
            return
        if len(self._calls_ended) >= MAX_CALLS_ENDED:
            self._calls_ended.clear()
        self._calls_ended.add(key)
        now = time.monotonic()
        if now - self._working_at >= WORKING_EVERY_S:  # a fast batch ends thousands of calls a second
            self._working_at = now
            self.watchdog.working(self._batch_partitions)

    async def _commit(self, done: dict[Partition, int]) -> None:
        """Commit in a thread (a synchronous commit waits for the coordinator: never on the loop), retrying
        with backoff while the coordinator is away. Partitions that moved to another member are theirs:
        the commit is dropped, the new owner applies the batch again (the projections are idempotent)."""
        attempt = 0
        while True:
            try:
                await self._in_consumer_thread(self.consumer.commit, done)
                return
            except CommitRejected as exc:
                if exc.assignment_lost:
                    log.warning("commit dropped: the partitions moved to another consumer (%s)", exc.reason)
                    return
                if self.stopping:
                    raise
                attempt += 1
                m.RETRIES.labels("project").inc()
                delay = backoff(attempt, self.t.retry_initial_s, self.t.retry_max_s)
                log.warning("commit failed (%s); retrying in %.1f s", exc.reason, delay)
                await asyncio.sleep(delay)

    async def _apply(
        self, type_: EventType, items: list[tuple[Record, CanonicalEvent]], dead: list[DeadLetter]
    ) -> None:
        events = [e for _, e in items]
        try:
            failures = await retrying(
                lambda attempt: self.sink.apply(type_, events, attempt),
                stage="project",
                initial=self.t.retry_initial_s,
                cap=self.t.retry_max_s,
                should_stop=self._should_stop,
            )
        except HandlersHeld:
            raise  # the whole batch is rewound and read again, with whatever has arrived since
        except Exception as exc:
            if is_temporary(exc):  # only when stopping: the batch stays uncommitted and is read again
                raise
            if len(items) == 1:
                rec, event = items[0]
                log.warning(
                    "record failed permanently; sent to the DLQ",
                    extra={"event_id": event.id, "type": type_.value, "error": error_class(exc)},
                )
                dead.append(_dead(rec, "project", error_class(exc), r.exception_message(exc)))
                return
            # Which record is it? Halve until it is alone: log2(batch) extra rounds, neighbours applied.
            mid = len(items) // 2
            await self._apply(type_, items[:mid], dead)
            await self._apply(type_, items[mid:], dead)
            return
        committed = time.time()
        for rec, e in items:
            # A replayed or redriven event keeps its first receipt time: counted, every replay of last week
            # put its events past the SLO's p99 and paged for a backlog that was not there.
            if not _reprocessed(rec):
                m.END_TO_END_LAG_SECONDS.labels(type_.value).observe(
                    max(0.0, committed - e.received_at_ms / 1000)
                )
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

    def _lag(self) -> dict[Partition, int] | None:
        try:
            lag = self.consumer.lag()
        except Exception:  # lag is best effort; a partition being reassigned has none
            return None
        for rec in self._in_hand:
            where = (rec.topic, rec.partition)
            lag[where] = lag.get(where, 0) + 1
        return lag

    async def _export_lag_forever(self) -> None:
        """On its own clock, not per batch: a batch held for an hour by a database outage must not freeze
        the gauge at the value it had before (usually 0) while the topic fills up behind it."""
        while True:
            await asyncio.sleep(self.t.lag_every_s)
            if not self.started:
                continue  # no assignment yet: nothing to say, not "0"
            lag = self._lag()
            if lag is None:
                continue
            for topic, partition in self._lag_series - lag.keys():  # moved to another worker
                m.CONSUMER_LAG.remove(topic, str(partition))
            for (topic, partition), n in lag.items():
                m.CONSUMER_LAG.labels(topic, str(partition)).set(n)
            self._lag_series = set(lag)


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
