"""The worker: the Faust router (dedup + routing of the raw topic) and the projector (routed topics).

Delivery is at-least-once at every hop and every sink is idempotent, so the whole is effectively-once.
The router takes raw batches without acknowledgement (`noack_take`) and acknowledges them only after the
routed records are acknowledged by the broker; only then are their ids marked in the dedup table. The
projector (processors/projector.py) reads the routed topics with librdkafka in batches of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import gc
import logging
import os
import signal
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import faust
import mode
from aiokafka.errors import KafkaError as AIOKafkaError
from confluent_kafka import KafkaException
from faust.streams import _current_event
from faust.types import TP, EventT

from sentpipe import metrics as m
from sentpipe.broker import ProduceRejected
from sentpipe.broker import Record as BrokerRecord
from sentpipe.kafka import AsyncProducer, BrokerUnavailable, RangeReader, tls_context
from sentpipe.logs import restore_handler
from sentpipe.processors import faust_recovery, rocks_store, store
from sentpipe.processors.deadletter import DeadLetter, error_class, send_dead_letters
from sentpipe.processors.dedup import (
    decode_seen,
    encode_seen,
    expire,
    legacy_key,
    mark_ms,
    partition_of,
    table_key,
)
from sentpipe.processors.faust_transport import use_eager_consumer
from sentpipe.processors.health import Health, serve_health
from sentpipe.processors.held_offsets import HeldOffsets
from sentpipe.processors.partitioner import murmur2_partitioner
from sentpipe.processors.projector import init_projector_metrics
from sentpipe.processors.projector_process import CHILD_STOP_TIMEOUT_S, ProjectorProcess
from sentpipe.processors.retry import backoff, is_temporary
from sentpipe.processors.topics import DEDUP_TABLE, CopartitioningError, raw_partitions_refusal
from sentpipe.processors.watchdog import RecoveryHold, Watchdog
from sentpipe.schemas import routing as r
from sentpipe.schemas.events import ROUTED_TYPES, EventType, MalformedEvent
from sentpipe.schemas.topics import Topics
from sentpipe.settings import Settings, WorkerRole

log = logging.getLogger("sentpipe.worker")
T = TypeVar("T")

Event = EventT[Any]
# Offsets [start, end) of a partition that the router read back itself (`_with_skipped`): Faust never
# delivered them, so it learns they are done as a gap.
ReadBack = tuple[tuple[str, int], int, int]

# Batches routed and waiting for the broker at once. Routing a batch takes CPU; settling it (routed records
# acknowledged, then its table marks, then its raw records acked) mostly waits for the broker: with one
# batch at a time the router's loop sat idle for half the drain.
PIPELINE_DEPTH = 4
PIPELINE_FULL = "pipeline full"  # every batch slot taken: the agent waits with a batch in hand
# How often the lag check asks the broker for the end offsets of the raw partitions (Faust's own are only
# what its fetches saw).
BROKER_ENDS_EVERY_S = 10.0
# The sweep's longest stretch on the event loop before it lets routing run again, and the most table
# changes (each a changelog record) it queues in one stretch.
SWEEP_SLICE_S = 0.005
SWEEP_SLICE_KEYS = 250
Record = tuple[str, bytes, bytes, list[tuple[str, bytes]]]


def _mkdirs(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def faust_broker(bootstrap: str) -> str:
    return ";".join(f"kafka://{h.strip()}" for h in bootstrap.split(",") if h.strip())


def broker_credentials(settings: Settings) -> faust.types.auth.CredentialsT | None:
    """The router's aiokafka clients get the same security settings as the librdkafka ones (kafka.py)."""
    proto = settings.kafka_security_protocol
    ctx = tls_context(settings)
    if proto.startswith("SASL_"):
        assert settings.kafka_sasl_password is not None  # the settings refuse SASL without one
        return faust.SASLCredentials(
            username=settings.kafka_sasl_username,
            password=settings.kafka_sasl_password.get_secret_value(),
            ssl_context=ctx,  # SASL_SSL with a context, SASL_PLAINTEXT without
            mechanism=settings.kafka_sasl_mechanism,
        )
    if ctx is not None:
        return faust.SSLCredentials(ctx)
    return None


def _headers(event: Event) -> dict[str, bytes]:
    raw: Any = event.message.headers or ()
    items = raw.items() if isinstance(raw, dict) else raw
    return r.header_map((str(k), bytes(v)) for k, v in items if v is not None)


class _Where:
    """Stands in for Faust's current event where only its partition is read."""

    __slots__ = ("__weakref__", "message", "partition")

    def __init__(self, partition: int) -> None:
        self.partition = partition
        self.message = self


@contextmanager
def in_partition(partition: int) -> Iterator[None]:
    """Faust's RocksDB store files a table write under the *current event's* partition (the memory store
    ignores it). The router writes a batch's marks at once, so it names each key's raw partition, which
    is also the key's changelog partition (the table is co-partitioned with the raw topic)."""
    where = _Where(partition)
    token = _current_event.set(weakref.ref(where))  # type: ignore[arg-type]
    try:
        yield
    finally:
        _current_event.reset(token)


def _offset(event: Event) -> int:
    return int(event.message.offset)


class _Reread:
    """A raw record the router read back itself, in the shape it reads of a Faust event."""

    __slots__ = ("headers", "key", "message", "offset", "partition", "timestamp", "topic", "value")

    def __init__(self, rec: BrokerRecord) -> None:
        self.message = self
        self.topic, self.partition, self.offset = rec.topic, rec.partition, rec.offset
        self.key, self.value, self.headers = rec.key, rec.value, rec.headers
        self.timestamp = rec.timestamp_ms / 1000


class _Batch:
    """One raw batch as routed: what to send, what to dead-letter, and the table marks it makes."""

    __slots__ = (
        "behind",
        "dead",
        "derived",
        "duplicates",
        "events",
        "held",
        "holes",
        "home",
        "known",
        "legacy",
        "marks",
        "out",
        "recheck",
        "routed",
        "taken",
        "types",
    )

    def __init__(
        self,
        events: Sequence[Event],
        taken: Sequence[Event],
        holes: Sequence[ReadBack] = (),
    ) -> None:
        self.events = events  # with any records the router read back itself (_with_skipped)
        self.taken = taken  # as the stream delivered them: the ones to ack
        self.holes = holes  # (partition, start, end): the offsets those records were read back from
        self.out: list[Record] = []
        self.routed: list[Event] = []  # the event each record of `out` came from
        self.types: list[str] = []  # and its type's label
        self.duplicates: dict[str, int] = {}  # by type label: counted once the batch settles
        self.dead: list[DeadLetter] = []
        # The (id, tenant) pairs this batch routes, by table key (compact where the id is a SHA-256 hex).
        self.marks: dict[bytes, set[str]] = {}
        # Copies dropped behind a copy still in flight (in this batch or one before): (event, key, tenant,
        # type label). Settled only once that copy is: if the broker refused it, the first copy behind is
        # routed in its place (`_route_behind`).
        self.behind: list[tuple[Event, bytes, str, str]] = []
        self.held: list[tuple[bytes, str]] = []  # what this batch added to the router's `_pending`
        self.known: dict[bytes, dict[str, int]] = {}  # table key -> tenants seen (0: by a copy in flight)
        self.recheck: set[bytes] = set()  # keys a batch in flight held when looked up: read again to write
        self.home: dict[bytes, int] = {}  # table key -> its raw partition
        self.legacy: dict[bytes, bytes] = {}  # table key -> the hex key an older version wrote it under
        self.derived: dict[tuple[str, int, int], bytes] = {}  # a keyless record -> the id it is marked under


class Router:
    """The route stage's I/O around the pure `route()`: dedup table, routed records, dead letters."""

    def __init__(
        self, app: faust.App, settings: Settings, watchdog: Watchdog, producer: AsyncProducer
    ) -> None:
        self.app = app
        self.s = settings
        self.topics = Topics(settings.topic_prefix)
        # Routed records and dead letters go through librdkafka (C batching and partitioning); only the
        # dedup table's changelog marks go through Faust's own producer.
        self.producer = producer
        self.watchdog = watchdog
        self._recovery = RecoveryHold(settings.recovery_stall_after_s)
        # Per raw partition: the next offset to acknowledge (its batch settled), and the next to route (its
        # batch may still be in flight, PIPELINE_DEPTH batches at most).
        self.processed: dict[tuple[str, int], int] = {}
        self.dispatched: dict[tuple[str, int], int] = {}
        # Ids of batches in flight, not in the store yet: key -> tenant -> how many batches hold it (routed
        # it, or dropped a copy behind one in flight). Lookups see them, so an id routed in one batch is a
        # duplicate in the next even before the first has settled.
        self._pending: dict[bytes, dict[str, int]] = {}
        self._room = asyncio.Semaphore(PIPELINE_DEPTH)
        self._tail: asyncio.Future[None] | None = None  # the last batch's settling: batches settle in order
        self._failure: BaseException | None = None
        self._rewinds = 0  # failed settlings since a batch last settled: the backoff's attempt
        self._seen: Any = None
        self._range_reader: RangeReader | None = None
        self._range_lock = asyncio.Lock()  # one RangeReader call at a time (a librdkafka consumer's assign)
        # Per raw partition not routed from yet since its assignment: where the group resumes it.
        self.group_start: dict[tuple[str, int], int] = {}
        # How far the store holds each changelog partition, moved by the acknowledged writes below.
        self.held = HeldOffsets()
        self._unmoved: dict[tuple[str, int], tuple[int, int]] = {}  # lag checks without progress
        # End offsets of the raw partitions asked of the broker (report_lag).
        self._broker_ends: dict[tuple[str, int], int] = {}
        self._broker_ends_at = -BROKER_ENDS_EVERY_S
        self._raw_count_at = -BROKER_ENDS_EVERY_S  # when the raw topic's partition count was last asked

    @property
    def seen(self) -> Any:
        assert self._seen is not None, "create_table() first"
        return self._seen

    def create_table(self) -> None:
        # memory:// is sentpipe's memory store for this table (restored by librdkafka, compact; store.py).
        memory = self.s.table_store.split(":", 1)[0] == "memory"
        if memory:
            store.register()
        else:
            rocks_store.register()
        self._seen = self.app.Table(
            DEDUP_TABLE,
            default=None,
            partitions=self.s.raw_partitions,
            key_type=bytes,
            value_type=bytes,
            # The changelog partition is the key's murmur2 partition, the same the ingress producer
            # chose for the raw record: table and raw topic stay co-partitioned even for batched writes.
            use_partitioner=True,
            # Recovery applies the changelog to the store in batches of this many marks.
            recovery_buffer_size=10_000,
            store=store.URL if memory else rocks_store.url(self.s.table_store, DEDUP_TABLE),
            help="event id -> {tenant: first-routed time (ms)}; bounded by the dedup window sweep",
        )

    async def _write(self, values: dict[bytes, bytes | None], partition_of: dict[bytes, int]) -> None:
        """Write to the table's store and its changelog (None: delete, a tombstone), and wait until the
        changelog has them. Every table change goes this way: the router's marks, the sweep's expiries.

        The changelog records go through librdkafka, not through the table (`table[key] = v`): Faust sends
        each one through aiokafka's pure-Python producer, a third of the router's time in a profile of a
        drain. Same records, same partitions (the key's raw partition: the table is co-partitioned with the
        raw topic), and the store's persisted offset is advanced as Faust's own callback would. The store is
        written before the first await, so whoever reads the table next sees the change.
        """
        if not values:
            return
        store = self.seen.data
        partition = -1
        try:
            for key, value in values.items():
                partition = partition_of[key]
                with in_partition(partition):
                    if value is None:
                        with contextlib.suppress(KeyError):
                            del store[key]
                    else:
                        store[key] = value
        except Exception as exc:  # one handler for the batch: a context manager per mark cost every mark
            _reopen_after_failure(store, partition, exc)
            raise
        pending = list(values)
        attempt = 1
        while True:
            futs = [
                self.producer.produce_or_fail(self._changelog, k, values[k], (), partition=partition_of[k])
                for k in pending
            ]
            results = await asyncio.gather(*futs, return_exceptions=True)
            written: dict[int, list[int]] = {}
            failed: list[bytes] = []
            for key, res in zip(pending, results, strict=True):
                if isinstance(res, BaseException):
                    failed.append(key)
                else:
                    written.setdefault(res.partition, []).append(res.offset)
            for partition, offsets in written.items():
                tp = TP(self._changelog, partition)
                held = self.held.acknowledged(
                    partition, offsets, functools.partial(_stored_offset, store, tp)
                )
                if held is not None:
                    try:
                        store.set_persisted_offset(tp, held)
                    except Exception as exc:
                        _reopen_after_failure(store, partition, exc)
                        raise
            if not failed:
                return
            if self._stopping():
                # Unacknowledged, the batch is read again after the restart and marked then.
                raise ProduceRejected("stopping with dedup table changes unwritten")
            m.RETRIES.labels("route").inc()
            await retrying_sleep(attempt, self.s)
            attempt += 1
            pending = failed

    @property
    def _changelog(self) -> str:
        return str(self.seen.changelog_topic.get_topic_name())

    def _stopping(self) -> bool:
        return bool(self.app.should_stop)

    def _produce(self, records: Sequence[Record]) -> list[asyncio.Future[Any]]:
        # Refused before it was queued (librdkafka's local queue full: a backlog drain with large batches or
        # bodies fills it) raised out of `dispatch`, crashed the agent and leaked a pipeline slot: now a
        # failed future, temporary, retried with the rest of its batch.
        return [self.producer.produce_or_fail(t, k, v, h) for t, k, v, h in records]

    async def _send_each(
        self, records: Sequence[Record], events: Sequence[Event], futs: list[asyncio.Future[Any]]
    ) -> list[DeadLetter]:
        """Wait for the routed records produced as `futs`; retry what fails, dead-letter what the broker
        refuses.

        A temporary failure (broker away) is retried forever; a record the broker refuses for itself
        (too large, say) is that record's failure only.
        """
        pending = list(zip(records, events, strict=True))
        dead: list[DeadLetter] = []
        attempt = 1
        while pending:
            results = await asyncio.gather(*futs, return_exceptions=True)
            retry: list[tuple[Record, Event]] = []
            for item, res in zip(pending, results, strict=True):
                if not isinstance(res, BaseException):
                    continue
                if is_temporary(res) and not self._stopping():
                    retry.append(item)
                elif is_temporary(res):
                    raise res  # stopping: the batch stays unacknowledged and is read again
                else:
                    dead.append(_dead(item[1], "route", error_class(res), str(res)))
            if retry:
                m.RETRIES.labels("route").inc()
                await retrying_sleep(attempt, self.s)
                attempt += 1
            pending = retry
            futs = self._produce([rec for rec, _ in retry])
        return dead

    async def _with_skipped(self, events: Sequence[Event]) -> tuple[Sequence[Event], list[ReadBack]]:
        """The batch in offset order per partition, with any raw records the stream skipped put back, and
        the offset ranges they were read from.

        After a rebalance Faust 0.15.3 can start a partition past the group's committed offset (a two-worker
        bench start: one partition's first 3,620 records never reached the agent), and its commit, which
        takes offset gaps for compacted records, then commits past them: acknowledged events lost. The raw
        topic is neither compacted nor transactional, so its offsets are contiguous and every hole is records
        the stream skipped. They are read back here and routed with the batch, before anything is acked.
        """
        by_where: dict[tuple[str, int], list[Event]] = {}
        for event in events:
            by_where.setdefault((event.message.topic, event.message.partition), []).append(event)
        unknown = [where for where in by_where if where not in self.dispatched]
        if unknown:  # first batch since the assignment: routing must start where the group left off
            starts = await self._ask_broker("where the group left off", self._ranges.start_offsets, unknown)
            self.dispatched.update(starts)
            self.processed.update({where: o for where, o in starts.items() if where not in self.processed})
        out: list[Event] = []
        read_back: list[ReadBack] = []
        for where, evs in by_where.items():
            evs.sort(key=_offset)  # stable: a record delivered twice keeps its order
            holes: list[tuple[int, int]] = []
            expected = self.dispatched.get(where, _offset(evs[0]))
            for event in evs:
                if _offset(event) > expected:
                    holes.append((expected, _offset(event)))
                expected = max(expected, _offset(event) + 1)
            for start, end in holes:
                log.error(
                    "raw records skipped by the stream: %s[%d] offsets %d..%d; reading them back",
                    where[0],
                    where[1],
                    start,
                    end - 1,
                )
                records = await self._ask_broker("the skipped records", self._ranges.read, where, start, end)
                m.RAW_RECORDS_REREAD.inc(len(records))
                evs += [_Reread(rec) for rec in records]  # type: ignore[misc]
                read_back.append((where, start, end))
            if holes:
                evs.sort(key=_offset)
            out += evs
        return out, read_back

    async def _ask_broker(self, what: str, ask: Callable[..., T], *args: Any) -> T:
        """A question the batch in hand cannot be routed without, asked again with backoff while the broker
        does not answer, as the batch's own sends are. Raised, it crashed the routing agent: Faust restarted
        it, but the records the crashed one had taken were never acked, and the next rebalance waited for
        them for good (a worker stalled after a 38 s broker outage). Only a stop ends the wait."""
        attempt = 0
        while True:
            try:
                async with self._range_lock:
                    return await asyncio.to_thread(ask, *args)
            except (KafkaException, BrokerUnavailable) as exc:
                if self._stopping():
                    raise
                log.warning("asking the broker %s failed (%s); asking again", what, exc)
                m.RETRIES.labels("route").inc()
                await retrying_sleep(attempt, self.s)
                attempt += 1

    @property
    def _ranges(self) -> RangeReader:
        if self._range_reader is None:
            self._range_reader = RangeReader(self.s, self.s.app_id)
        return self._range_reader

    async def dispatch(
        self, events: Sequence[Event], settled: Callable[[Sequence[Event]], Awaitable[None]] | None = None
    ) -> asyncio.Future[None]:
        """Route a batch and send its records; returns its settling, which runs on while the next batches
        are routed (PIPELINE_DEPTH at most, then this waits for room).

        Settling a batch, in batch order: its routed records and dead letters are acknowledged by the broker,
        then its ids are marked in the dedup table (store and changelog), then `settled(events)` acks its raw
        records. A crash anywhere before that re-routes the batch (absorbed by the idempotent sinks) instead
        of losing it; one batch failing to settle (only when the worker stops) fails the ones after it.
        """
        if self._failure is not None:
            # A batch failed to settle, and the ones after it with it (they wait for it): none is acked.
            await self.drain()
            failure, self._failure, self._tail = self._failure, None, None
            if self._stopping():
                raise failure
            self._rewind(failure)
            # A failure that comes back (the DLQ refusing every letter) holds the line: retried with backoff,
            # not re-read at the stream's pace, and the watchdog sees a partition that does not move.
            m.RETRIES.labels("route").inc()
            await retrying_sleep(self._rewinds, self.s)
        await self._room.acquire()
        try:
            batch = self._route(*await self._with_skipped(events), taken=events)
            futs = self._produce(batch.out)
        except BaseException:
            self._room.release()
            raise
        for event in batch.events:
            where = (event.message.topic, event.message.partition)
            self.dispatched[where] = max(self.dispatched.get(where, 0), event.message.offset + 1)
        batch.held = [(key, tenant) for key, tenants in batch.marks.items() for tenant in tenants]
        batch.held += [(key, tenant) for _, key, tenant, _ in batch.behind]
        for key, tenant in batch.held:
            held = self._pending.setdefault(key, {})
            held[tenant] = held.get(tenant, 0) + 1
        task = self._tail = asyncio.ensure_future(self._settle(batch, futs, self._tail, settled))
        task.add_done_callback(self._settled)
        return task

    def _rewind(self, failure: BaseException) -> None:
        """Route again what failed to settle. The stream does not deliver it again (raising here only
        restarted the agent on the same stream): the records from each partition's last settled batch on
        were never routed, their offsets never acked, and Faust's commit stayed there for good while lag
        and the watchdog, which follow settled batches, said all was well. Counted from there again, the
        next batch of a partition reads them back as a hole (`_with_skipped`), and a partition with no
        next batch is sought back by `_unstick`."""
        self._rewinds += 1
        log.error(
            "a batch of raw records failed to settle (%s: %s); routing its records again (attempt %d)",
            type(failure).__name__,
            failure,
            self._rewinds,
        )
        for where, done in self.processed.items():
            if self.dispatched.get(where, done) > done:
                self.dispatched[where] = done

    def rewind_if_idle(self) -> None:
        """The lag timer's part of `_rewind`: a failure with no batch after it (traffic stopped) was left
        until one came, and `_unstick` saw every record as with the router."""
        tail = self._tail
        if self._failure is not None and (tail is None or tail.done()) and not self._stopping():
            failure, self._failure, self._tail = self._failure, None, None
            self._rewind(failure)

    def _settled(self, task: asyncio.Future[None]) -> None:
        self._room.release()
        if not task.cancelled() and task.exception() is not None and self._failure is None:
            self._failure = task.exception()

    def _route(
        self,
        events: Sequence[Event],
        holes: Sequence[ReadBack] = (),
        *,
        taken: Sequence[Event],
    ) -> _Batch:
        """The CPU half of a batch: duplicates dropped, each event routed or dead-lettered, marks decided."""
        batch = _Batch(events, taken, holes)
        marks, home, legacy, lookups = batch.marks, batch.home, batch.legacy, batch.known

        def seen(event: Event, event_id: bytes, tenant: str, partition: int, type_label: str) -> bool:
            """True for a duplicate (counted); else the id is marked (until the batch settles)."""
            tkey = table_key(event_id)
            known = lookups.get(tkey)
            if known is None:
                known = lookups[tkey] = self._lookup(tkey, legacy)
                home[tkey] = partition
                if 0 in known.values():
                    batch.recheck.add(tkey)
            if tenant in known:
                batch.duplicates[type_label] = batch.duplicates.get(type_label, 0) + 1
                if not known[tenant]:  # the copy it repeats is not acknowledged yet
                    batch.behind.append((event, tkey, tenant, type_label))
                return True
            known[tenant] = 0
            marks.setdefault(tkey, set()).add(tenant)
            return False

        def unmark(event_id: bytes, tenant: str) -> None:
            """A record that was not routed is not seen: the next delivery of its id may be the good one."""
            tkey = table_key(event_id)
            lookups[tkey].pop(tenant, None)
            marks[tkey].discard(tenant)

        for event in events:
            msg = event.message
            key = msg.key or b""
            headers = _headers(event)
            type_label = headers.get(r.H_TYPE, b"").decode(errors="replace")
            type_label = type_label if type_label in _TYPE_LABELS else "unknown"  # bounded label values
            try:
                # Checked before anything is marked: a key or tenant the table cannot hold (a 1 MB key, a
                # 70 KB tenant) stalled every batch behind it, retrying a changelog write forever.
                key_id, tenant = r.record_identity(key, headers, self.s.default_tenant)
            except MalformedEvent as exc:
                batch.dead.append(_dead(event, "route", exc.reason, exc.detail))
                continue
            if key_id is not None and seen(event, key, tenant, msg.partition, type_label):
                continue
            try:
                routed = self._route_one(event, headers)
            except Exception as exc:  # anything raised for one record is that record's failure
                if key_id is not None:
                    unmark(key, tenant)
                batch.dead.append(_route_failure(event, exc))
            else:
                if key_id is None:
                    # No key (not the ingress's record): drop repeats of the id the body gives.
                    derived = routed.event.id.encode() if routed.event else routed.key
                    # Its mark lives where the id's own record would (murmur2 of the id), as the store and
                    # the sweep place it: under this record's partition, the sweep's tombstone went to the
                    # other one, and the mark came back at every restore, kept for good.
                    home_partition = partition_of(table_key(derived), self.s.raw_partitions)
                    if home_partition not in self._active_partitions():
                        # Another worker's: written there, a gap its store offset stops at (its recoveries
                        # read from there). Kept under this record's partition instead, as before: the
                        # sweep does not expire it (a mark kept for good), the price of a foreign producer's
                        # keyless records with several workers.
                        home_partition = msg.partition
                    if seen(event, derived, tenant, home_partition, type_label):
                        continue
                    batch.derived[(msg.topic, msg.partition, msg.offset)] = derived
                _add_routed(batch, event, _record(routed, headers), routed)
        return batch

    def _route_one(self, event: Event, headers: dict[str, bytes]) -> r.Routed:
        msg = event.message
        return r.route(
            msg.key or None,
            msg.value or b"",
            headers,
            topics=self.topics,
            id_source=self.s.event_id_source,
            default_tenant=self.s.default_tenant,
            record_timestamp_ms=int((msg.timestamp or time.time()) * 1000),
        )

    async def _settle(
        self,
        batch: _Batch,
        futs: list[asyncio.Future[Any]],
        previous: asyncio.Future[None] | None,
        settled: Callable[[Sequence[Event]], Awaitable[None]] | None,
    ) -> None:
        try:
            refused = await self._send_each(batch.out, batch.routed, futs)
            await self._dead_letter(batch.dead + refused)
            if previous is not None:
                await previous  # marks and acks in batch order; its failure is this batch's too
            if refused:
                self._unmark(batch, refused)
            if batch.behind:
                await self._dead_letter(await self._route_behind(batch, refused))
            # Only now, with every routed record and dead letter acknowledged, is the event marked seen.
            await self._write(*self._changes(batch))
            _count_settled(batch, refused)
        finally:
            self._forget_pending(batch.held)
        await self._release_holes(batch.holes)
        if settled is not None:
            await settled(batch.taken)
        # Last: a batch is settled once Faust has its acks; one whose ack failed is read back (`_rewind`).
        self._advance(batch.events)

    async def _dead_letter(self, letters: Sequence[DeadLetter]) -> None:
        await send_dead_letters(
            self.producer,
            self.topics.dlq,
            letters,
            initial=self.s.retry_initial_s,
            cap=self.s.retry_max_s,
            should_stop=self._stopping,
        )

    async def _release_holes(self, holes: Sequence[ReadBack]) -> None:
        """Tell Faust the offsets the router read back itself are done. Faust never delivered them, so they
        are never acked, and its commit of a partition waits for acks that follow on from the group's
        commit: a hole at the head held the commit there for good (chaos test: lag never drained, and a
        restart would route everything since again). Its offset gaps are how it learns of offsets that
        will not be acked (compacted ones); a settled hole is one."""
        if not holes:
            return
        consumer: Any = self.app.consumer
        assigned = consumer.assignment()
        for (topic, partition), start, end in holes:
            tp = TP(topic, partition)
            if tp in assigned:  # revoked: Faust forgot the partition's acks, and its next owner reads it
                await consumer._add_gap(tp, start, end - 1)

    def _unmark(self, batch: _Batch, refused: Sequence[DeadLetter]) -> None:
        """Records the broker refused for what they are were dead-lettered, not routed: their ids are not
        marked seen, as with every record the router dead-letters, so a corrected delivery goes through (a
        copy dropped behind one of them is routed in its place, `_route_behind`). A batch routes each (id,
        tenant) once, so nothing else of it marked them."""
        lost = {d.origin for d in refused}
        for (_, _, _, headers), event in zip(batch.out, batch.routed, strict=True):
            msg = event.message
            origin = (msg.topic, msg.partition, msg.offset)
            if origin not in lost:
                continue
            tkey = table_key(msg.key or batch.derived[origin])  # the id it was marked under
            tenant = dict(headers).get(r.H_TENANT, b"").decode(errors="replace") or self.s.default_tenant
            batch.marks.get(tkey, set()).discard(tenant)

    async def _route_behind(self, batch: _Batch, refused: Sequence[DeadLetter]) -> list[DeadLetter]:
        """Route the copies dropped behind a copy of their id that was then not routed (the broker refused
        it, in this batch or one before); returns what fails of them, to dead-letter.

        A copy was dropped as soon as the one before it was routed, before the broker answered for that one.
        Every batch before this one has settled now, so the store says which of those copies stand. For an
        id that is not marked, the first copy behind is routed; if it fails too, the next one. A copy that
        routes to a record the broker already refused as it is gets that refusal without a second try: a
        burst of identical copies costs one round trip, not one each."""
        why = {d.origin: d for d in refused}
        rejected: dict[tuple[str, bytes, bytes], DeadLetter] = {}  # a routed record refused -> its letter
        for (topic, key, value, _), event in zip(batch.out, batch.routed, strict=True):
            letter = why.get(_origin(event))
            if letter is not None:
                rejected[(topic, key, value)] = letter
        waiting: dict[tuple[bytes, str], list[tuple[Event, str]]] = {}
        stored: dict[bytes, dict[str, int]] = {}
        origins = set(why)
        for event, tkey, tenant, type_label in batch.behind:
            if _origin(event) in origins:
                continue  # the same record delivered twice: it stays dropped, the letter is its outcome
            origins.add(_origin(event))
            if tkey not in stored:
                stored[tkey] = decode_seen(self.seen.data.get(tkey))
            if tenant not in batch.marks.get(tkey, ()) and tenant not in stored[tkey]:
                waiting.setdefault((tkey, tenant), []).append((event, type_label))
        if waiting:
            log.warning(
                "%d event id(s) not routed (the broker refused the copy routed first): routing a copy that "
                "was dropped behind it",
                len(waiting),
            )
        dead: list[DeadLetter] = []
        while waiting:
            tried: list[tuple[tuple[bytes, str], Event, Record, r.Routed]] = []
            for mark, copies in list(waiting.items()):
                while copies:
                    event, type_label = copies.pop(0)
                    batch.duplicates[type_label] -= 1  # not a duplicate after all: routed or dead-lettered
                    headers = _headers(event)
                    try:
                        routed = self._route_one(event, headers)
                    except Exception as exc:  # that record's failure; the next copy, if any, is tried
                        dead.append(_route_failure(event, exc))
                        continue
                    record = _record(routed, headers)
                    earlier = rejected.get(record[:3])
                    if earlier is not None:
                        dead.append(_dead(event, "route", earlier.error_class, earlier.message))
                        continue
                    tried.append((mark, event, record, routed))
                    break
                if not copies:
                    del waiting[mark]
            records = [record for _, _, record, _ in tried]
            late = await self._send_each(records, [event for _, event, _, _ in tried], self._produce(records))
            why = {d.origin: d for d in late}
            dead += late
            for (tkey, tenant), event, record, routed in tried:
                letter = why.get(_origin(event))
                if letter is not None:
                    rejected[record[:3]] = letter
                    continue
                waiting.pop((tkey, tenant), None)
                batch.marks.setdefault(tkey, set()).add(tenant)
                _add_routed(batch, event, record, routed)
        return dead

    def _changes(self, batch: _Batch) -> tuple[dict[bytes, bytes | None], dict[bytes, int]]:
        """The table changes a settled batch writes: for each id it routed, the tenants the store holds and
        its own. Where a batch in flight held the id when it was looked up, the store is read again: every
        batch before has settled, what they routed is there and what the broker refused them is not (the
        value as looked up kept a refused copy marked for good)."""
        now_ms = mark_ms(time.time())
        changes: dict[bytes, bytes | None] = {}
        home = batch.home
        for key in batch.marks.keys() | batch.legacy.keys():  # legacy: moved even when only a duplicate
            tenants, old = batch.marks.get(key, set()), batch.legacy.get(key)
            if not tenants and old is None:
                continue  # every record of that id was dead-lettered, and nothing is to be kept
            if key in batch.recheck:
                value = self.seen.data.get(key)
                stored = decode_seen(value if value is not None or old is None else self.seen.data.get(old))
            else:
                stored = {tenant: ms for tenant, ms in batch.known[key].items() if ms}
            stored.update((tenant, now_ms) for tenant in tenants if tenant not in stored)
            if stored:
                changes[key] = encode_seen(stored)
            if old is not None:
                # Its tenants now live under the compact key: one entry per id, and the hex one's tombstone
                # keeps it from coming back at the next restore (an unreadable one is none, and goes too).
                changes[old] = None
                home[old] = home[key]
        return changes, home

    def _forget_pending(self, held: Sequence[tuple[bytes, str]]) -> None:
        """A settled batch's marks are in the store now (or, if it failed, will be routed again)."""
        for key, tenant in held:
            pending = self._pending.get(key)
            if pending is None or tenant not in pending:
                continue
            pending[tenant] -= 1
            if not pending[tenant]:
                del pending[tenant]
                if not pending:
                    del self._pending[key]

    def _advance(self, events: Sequence[Event]) -> None:
        self._rewinds = 0
        done: dict[tuple[str, int], int] = {}
        for event in events:
            where = (event.message.topic, event.message.partition)
            expected = done.get(where, self.processed.get(where))
            if expected is not None and event.message.offset > expected:
                # The raw topic is neither compacted nor transactional: a gap means records were skipped
                # (seen with Faust's recovery racing its seek). Say so; a replay of the range restores them.
                log.error(
                    "raw records skipped: %s[%d] offsets %d..%d were never delivered to the router",
                    where[0],
                    where[1],
                    expected,
                    event.message.offset - 1,
                )
            done[where] = max(done.get(where, 0), event.message.offset + 1)
        # A batch read again (a seek back, the stream's own re-reads) settles behind what is settled: it
        # must not move the position, and so the lag and the watchdog's progress, backwards.
        for where, nxt in done.items():
            self.processed[where] = max(nxt, self.processed.get(where, nxt))
        self.watchdog.progress({where: self.processed[where] for where in done})

    async def drain(self) -> None:
        """Wait until every batch dispatched so far has settled (or failed)."""
        if self._tail is not None:
            await asyncio.wait([self._tail])

    def _lookup(self, key: bytes, legacy: dict[bytes, bytes]) -> dict[str, int]:
        """The tenants that have sent this id; on a miss of a compact key, also the hex key written by the
        previous version (until the window sweeps those), noted in `legacy`."""
        store = self.seen.data  # the store itself: the table's get goes through Mapping.get and its sensors
        found = store.get(key)
        if found is None:
            old = legacy_key(key)
            if old is not None:
                found = store.get(old)
                if found is not None:
                    legacy[key] = old
        tenants = decode_seen(found)
        pending = self._pending.get(key)
        if pending:
            for tenant in pending:
                tenants.setdefault(tenant, 0)  # routed by a batch still in flight
        return tenants

    async def report_lag(self) -> dict[tuple[str, int], int]:
        """Raw records waiting per partition, measured from what was routed (not merely fetched): told to
        the watchdog and returned for the lag gauge."""
        self.rewind_if_idle()
        consumer: Any = self.app.consumer
        waiting: dict[tuple[str, int], int] = {}
        at: dict[tuple[str, int], int] = {}
        found: list[tuple[Any, int | None, int | None]] = []  # (partition, highwater, done)
        for tp in consumer.assignment():
            if tp.topic != self.topics.raw:
                continue
            try:
                highwater = consumer.highwater(tp)
                where = (tp.topic, tp.partition)
                done = self.processed.get(where, self.group_start.get(where))
            except Exception:  # lag is best effort; an unassigned or resetting partition has none
                continue
            found.append((tp, highwater, done))
        found = await self._with_broker_ends(found)
        # Nothing routed here since the assignment: where the group resumes (its commit, or the log's start
        # when it has none), asked once per assignment. Not the fetch position, which can stand past records
        # never delivered (see _unstick) and hide them; not the log's start for a group that has commits,
        # which counted the whole retention as waiting through a table recovery (Faust learns the commit
        # only once that is over); not Faust's copy of the commit, empty until then.
        need = [(tp.topic, tp.partition) for tp, highwater, done in found if done is None and highwater]
        if need:
            with contextlib.suppress(Exception):  # best effort, as above: unknown is left out, not guessed
                async with self._range_lock:
                    self.group_start.update(await asyncio.to_thread(self._ranges.start_offsets, need))
        # Records the stream holds back for a reason are not lost: during a rebalance (every partition
        # revoked and paused, their commits forgotten until the assignment) and the table's recovery after
        # it (every partition paused), while the broker is away (no batch settles) and while the pipeline is
        # full (the agent waits for room with a batch in hand). Seeking back then was a false alarm on every
        # broker outage and every slow rebalance, some to offset 0. All but the last end an episode: the
        # checks count again from its end. A full pipeline only skips its check, or a steady backlog
        # elsewhere would keep a partition that is really stuck from counting.
        held = self._held_back()
        if held is not None and held != PIPELINE_FULL:
            self._unmoved.clear()
        for tp, highwater, done in found:
            if done is None:
                # An empty partition waits for nothing.
                done = self.group_start.get((tp.topic, tp.partition)) if highwater else highwater
            if highwater is not None and done is not None:
                waiting[(tp.topic, tp.partition)] = max(0, highwater - done)
                at[(tp.topic, tp.partition)] = done
                if highwater > done and held is None:
                    try:
                        await self._unstick(tp, done, highwater)
                    except Exception as exc:
                        # Revoked since the assignment was read (a rebalance: aiokafka's position() raises
                        # IllegalStateError), or the broker away: the next check looks again. Raised out of
                        # the timer, it ended the whole worker in the middle of a rolling deploy.
                        log.warning(
                            "lag check of %s[%d] skipped: %s: %s",
                            tp.topic,
                            tp.partition,
                            type(exc).__name__,
                            exc,
                        )
        for tp, _, _ in found:
            where = (tp.topic, tp.partition)
            last = self.watchdog.waiting(where)
            if where not in waiting and last:
                # Still assigned, its lag unknown now (its start unreadable after a revoke: the broker
                # away during a rebalance): left out, the watchdog forgot its clock, and a rebalance that
                # could not complete was no stall, /livez 200 for as long as it lasted.
                waiting[where] = last
        for where in set(self.processed) - set(waiting):
            del self.processed[where]  # moved to another worker
            self.dispatched.pop(where, None)
        for where in set(self.group_start) - {(tp.topic, tp.partition) for tp, _, _ in found}:
            del self.group_start[where]
        for where in set(self._unmoved) - set(waiting):
            del self._unmoved[where]
        self.watchdog.lag(waiting)
        self.watchdog.waiting_at(at)
        # Faust pauses every partition while the table recovers after a rebalance, which can take minutes for
        # a big table: waiting then is not a stall (liveness would restart the pod mid-recovery). Only the
        # recovery: a rebalance that cannot complete (the broker away) is still a stall after stall_after_s.
        recovery: Any = self.app.tables.recovery  # type: ignore[attr-defined]
        if self._recovery.holds(bool(recovery.in_recovery)):
            self.watchdog.hold()
        return waiting

    async def check_raw_partitions(self) -> None:
        """CopartitioningError when the raw topic's partition count is no longer SENTPIPE_RAW_PARTITIONS
        (asked of the broker at most every BROKER_ENDS_EVERY_S; unanswered, asked again next time).

        Partitions added while the worker ran (`kafka-topics --alter`, a Strimzi KafkaTopic edited) are
        written to by the ingress at once, and records there cannot be routed: the dedup table has no
        partition for them. The router never learned of them for minutes (its consumer's metadata age),
        then its agent crashed on every batch that held one and was restarted, over and over, with their
        records in no lag, no stall and /livez 200: acknowledged events routed by nobody. The worker now
        stops, and a restart refuses to start with the same line until the counts agree again."""
        now = time.monotonic()
        if now - self._raw_count_at < BROKER_ENDS_EVERY_S:
            return
        self._raw_count_at = now
        count = None
        with contextlib.suppress(Exception):  # the broker away: asked again next time
            async with self._range_lock:
                count = await asyncio.to_thread(self._ranges.partition_count, self.topics.raw)
        refused = None if count is None else raw_partitions_refusal(self.s, count)
        if refused is not None:
            raise refused

    async def _with_broker_ends(
        self, found: list[tuple[Any, int | None, int | None]]
    ) -> list[tuple[Any, int | None, int | None]]:
        """Faust knows a partition's end offset only from its own fetches: a partition it never fetched
        from after an assignment had none, so it was in no lag and no stall, and `_unstick` never looked at
        it (the suspect of a chaos-test run where a worker routed nothing for three minutes and said
        nothing); one it stopped fetching from (left out of its active set, paused and never resumed) kept
        the end of its last fetch, so records arriving since were not waiting either. Every partition's end
        is asked of the broker too, at most every BROKER_ENDS_EVERY_S, and the later of the two counts."""
        if not found:
            return found
        now = time.monotonic()
        if now - self._broker_ends_at >= BROKER_ENDS_EVERY_S:
            self._broker_ends_at = now
            asked = [(tp.topic, tp.partition) for tp, _, _ in found]
            with contextlib.suppress(Exception):  # best effort: the broker away, asked again next time
                async with self._range_lock:
                    # Each partition that answers: one whose leader is away must not cost the others theirs.
                    self._broker_ends = await asyncio.to_thread(self._ranges.end_offsets, asked, 2.0, True)
        out = []
        for tp, highwater, done in found:
            end = self._broker_ends.get((tp.topic, tp.partition))
            out.append((tp, highwater if end is None else max(end, highwater or 0), done))
        return out

    def _held_back(self) -> str | None:
        """Why the stream may rightly hold fetched raw records back now (None: it should deliver them)."""
        if getattr(self.app, "rebalancing", False):
            return "rebalancing"
        if self.app.tables.recovery.in_recovery:  # type: ignore[attr-defined]
            return "recovering"  # every partition paused on purpose until the table is whole
        if self._room.locked():
            return PIPELINE_FULL
        return self.producer.unavailable

    async def _unstick(self, tp: Any, done: int, highwater: int) -> None:
        """A partition with records waiting that has not moved for three lag checks (10 s), while its
        consumer has fetched past them, lost them in Faust's stream: seek it back to the first unrouted one.

        Seen after a rebalance with Faust 0.15.3: a partition kept by the same worker whose records, fetched
        before the rebalance, were dropped with the stream's buffers and never fetched again (its whole
        backlog waited with the position at the end). A false alarm costs a re-read; the table drops it.

        Records handed to the router (`dispatched`) and still settling are in flight, not lost: only what
        was fetched past them counts, and the seek goes back to the first record the router never got."""
        where = (tp.topic, tp.partition)
        start = max(done, self.dispatched.get(where, done))
        if start >= highwater:
            # Every record waiting is with the router, settling (a routed topic the broker lacks holds its
            # batch): nothing to fetch or to read back. Counted as lost, each check logged "never fetched".
            self._unmoved.pop(where, None)
            return
        last, checks = self._unmoved.get(where, (-1, 0))
        checks = checks + 1 if last == start else 1
        self._unmoved[where] = (start, checks)
        if checks < 3:
            return
        consumer: Any = self.app.consumer
        position = await consumer.position(tp)
        if position is None or position <= start:
            # Records waiting and none fetched for three checks: Faust no longer fetches the partition. Seen
            # once after a rebalance with a replacement worker (its monitor: "Stream has not started
            # processing" five minutes on): left out of Faust's active set, or paused, with nothing to bring
            # it back. Fetched again, the router's checks above see to the rest.
            log.error(
                "raw records waiting but never fetched: %s[%d] from offset %d; resuming the partition",
                tp.topic,
                tp.partition,
                start,
            )
            consumer._buffered_partitions.discard(tp)
            consumer.resume_partitions([tp])
            self._unmoved[where] = (start, 0)
            return
        log.error(
            "raw records fetched but never routed: %s[%d] offsets %d..%d; seeking back to %d",
            tp.topic,
            tp.partition,
            start,
            position - 1,
            start,
        )
        m.RAW_RECORDS_REREAD.inc(position - start)
        await consumer.seek(tp, start)
        self._unmoved[where] = (start, 0)

    def _active_partitions(self) -> set[int]:
        """The table partitions this router owns now (not its standbys)."""
        assignor: Any = self.app.assignor
        return {tp.partition for tp in assignor.assigned_actives() if tp.topic == self._changelog}

    def _table_steady(self) -> bool:
        """No rebalance and no changelog recovery under way. Faust sets its recovery's `completed` once, at
        the first; a sweep during a later rebalance's recovery judged a key by an older changelog value than
        the one still on its way, and its tombstone, written after that newer value, deleted a mark inside
        the window. A rebalance during the sweep's awaits also moves the partitions it decided for."""
        recovery: Any = self.app.tables.recovery  # type: ignore[attr-defined]
        return bool(recovery.completed.is_set() and not recovery.in_recovery and not self.app.rebalancing)

    def _still_steady(self, active: set[int]) -> bool:
        """Whether a sweep's decisions, taken for the partitions `active`, may still be written."""
        return self._table_steady() and self._active_partitions() == active

    async def sweep(self) -> int:
        """Forget ids older than the dedup window; each delete tombstones the compacted changelog.

        Walks the table in slices of at most SWEEP_SLICE_S on the event loop (and at most SWEEP_SLICE_KEYS
        changes); each slice's changes are written like the router's marks (`_write`), and routing goes on
        while the changelog acknowledges them. The memory store (store.py) is a set of dicts, which cannot
        change under an open iterator: the walk takes one shard's keys at a time (a C-speed copy of a few
        thousand), never the whole table's, whose copy alone would hold the loop for tens of ms. RocksDB
        iterators read a snapshot and tolerate the deletes.
        """
        if not self._table_steady():
            return 0  # the next sweep starts over
        cutoff = int(time.time() * 1000) - self.s.dedup_window_s * 1000
        raw: Any = getattr(self.seen.data, "data", None)
        shards: store.Shards | None = raw if isinstance(raw, store.Shards) else None
        if shards is not None:
            m.DEDUP_TABLE_KEYS.set(len(shards))  # cheap in memory: the size before the sweep, from the start
        # Values are shared between ids marked in the same second (store.py): judge each value once.
        verdicts: dict[bytes, dict[str, int] | None] = {}
        removed = visited = 0
        changes: dict[bytes, bytes | None] = {}
        home: dict[bytes, int] = {}
        deadline = time.perf_counter() + SWEEP_SLICE_S
        active = self._active_partitions()
        for key in _sweep_keys(shards, self.seen):
            visited += 1
            value = shards.get(key) if shards is not None else self.seen.get(key)
            if value is None:
                continue  # deleted since the shard's snapshot (the router's legacy-key clean-up)
            if value in verdicts:
                kept = verdicts[value]
            else:
                tenants = decode_seen(value)
                left = expire(tenants, cutoff)
                kept = verdicts[value] = left if len(left) < len(tenants) else None
            # A standby's key (the memory store holds them too) is its owner's to expire. Written from here,
            # it landed amid the owner's marks, a gap the owner's store offset stops at.
            partition = partition_of(key, self.s.raw_partitions) if kept is not None else -1
            if kept is not None and partition in active:
                changes[key] = encode_seen(kept) if kept else None
                home[key] = partition  # co-partitioned with raw
                removed += not kept
            if time.perf_counter() > deadline or len(changes) >= SWEEP_SLICE_KEYS:
                if not self._still_steady(active):
                    return removed - sum(v is None for v in changes.values())  # decided for another owner
                # Decided and written with no await in between: a mark the router makes meanwhile is not
                # undone by a decision taken before it.
                await self._write(changes, home)
                await asyncio.sleep(0)  # a slice with nothing to write still lets routing run
                changes, home = {}, {}
                deadline = time.perf_counter() + SWEEP_SLICE_S
        if not self._still_steady(active):
            return removed - sum(v is None for v in changes.values())
        await self._write(changes, home)
        m.DEDUP_TABLE_KEYS.set(visited - removed)
        return removed


def _stored_offset(table_store: Any, tp: TP) -> int | None:
    """How far the store holds a changelog partition. The memory store's `persisted_offset` is Faust's
    question at an assignment (it marks the partition asked for); `restored_offset` only reads."""
    restored = getattr(table_store, "restored_offset", None)
    offset = restored(tp.partition) if restored is not None else table_store.persisted_offset(tp)
    return None if offset is None else int(offset)


def _reopen_after_failure(table_store: Any, partition: int, exc: Exception) -> None:
    """A RocksDB database whose write failed (a full disk: its log could not be appended to) keeps that
    error and refuses every later write, long after the disk has room again: the router held the same batch
    for ever, until a restart. So the failed partition's database is closed and opened again (its log
    recovered up to the last whole write); the caller's error then fails the batch, which is routed again
    with backoff. The memory store has no databases: nothing to do."""
    dbs: dict[int, Any] | None = getattr(table_store, "_dbs", None)
    old = None if dbs is None else dbs.pop(partition, None)
    if dbs is None or old is None:
        return
    # Closed outright: freeing the handle is not enough, as the failure's traceback still holds it (and so
    # RocksDB's lock): the reopen failed with "lock hold by current process", and so did every later one
    # while a failure's traceback was alive. A closed handle answers DbClosedError.
    with contextlib.suppress(Exception):
        old.close()
    log.error(
        "the dedup table's RocksDB database of partition %d refused a write (%s): opening it again",
        partition,
        exc,
    )
    try:
        dbs[partition] = table_store._open_for_partition(partition)
    except Exception as again:  # the disk still refuses: Faust opens it at the next write
        log.error("the dedup table's RocksDB database of partition %d: %s", partition, again)


def _sweep_keys(shards: store.Shards | None, table: Any) -> Iterator[bytes]:
    """Every key of the table: one shard's snapshot at a time in memory; in RocksDB each active partition's
    database in turn, from a list taken first. Faust's own key iterator walks its dict of databases across
    the sweep's awaits, and a rebalance that opened one meanwhile ended the worker ("dictionary changed size
    during iteration"). A database revoked meanwhile is walked to its end: Faust no longer closes them."""
    if shards is not None:
        yield from shards.walk()
        return
    rocksdb: Any = table.data
    for db in list(rocksdb._dbs_for_actives()):
        yield from rocksdb._visible_keys(db)


async def retrying_sleep(attempt: int, s: Settings) -> None:
    await asyncio.sleep(backoff(attempt, s.retry_initial_s, s.retry_max_s))


def _count_settled(batch: _Batch, refused: Sequence[DeadLetter]) -> None:
    """What a settled batch did, counted only now: counted as it was decided, a batch the broker never
    took was counted again after every restart (its duplicates too, which passed for progress and kept
    SentpipeNothingProjected quiet), and a record it refused as routed and dead-lettered both."""
    lost = {d.origin for d in refused}
    routed: dict[str, int] = {}
    for event, type_label in zip(batch.routed, batch.types, strict=True):
        msg = event.message
        if not lost or (msg.topic, msg.partition, msg.offset) not in lost:
            routed[type_label] = routed.get(type_label, 0) + 1
    for type_label, n in routed.items():
        m.EVENTS_ROUTED.labels(type_label).inc(n)
    for type_label, n in batch.duplicates.items():
        if n:
            m.DUPLICATES_DROPPED.labels(type_label).inc(n)


def _origin(event: Event) -> tuple[str, int, int]:
    msg = event.message
    return (msg.topic, msg.partition, msg.offset)


def _record(routed: r.Routed, headers: dict[str, bytes]) -> Record:
    return (routed.topic, routed.key, routed.value, list(headers.items()))


def _add_routed(batch: _Batch, event: Event, record: Record, routed: r.Routed) -> None:
    batch.out.append(record)
    batch.routed.append(event)
    batch.types.append(routed.event.type.value if routed.event else EventType.UNROUTED.value)


def _route_failure(event: Event, exc: Exception) -> DeadLetter:
    if isinstance(exc, MalformedEvent):
        return _dead(event, "route", exc.reason, exc.detail)
    log.warning("route failed for one record", extra={"error": type(exc).__name__})
    return _dead(event, "route", type(exc).__name__, str(exc))


def _dead(event: Event, stage: str, error_class: str, message: str) -> DeadLetter:
    msg = event.message
    return DeadLetter(
        msg.key or b"",
        msg.value or b"",
        list(_headers(event).items()),
        (msg.topic, msg.partition, msg.offset),
        stage,
        error_class,
        message,
    )


_TYPE_LABELS = frozenset(t.value for t in EventType)


def _init_metrics() -> None:
    """Create the bounded label sets at zero, so rates and alerts work before the first event."""
    for type_ in (*ROUTED_TYPES, EventType.UNROUTED):
        m.EVENTS_ROUTED.labels(type_.value)
    for type_ in ROUTED_TYPES:
        m.DUPLICATES_DROPPED.labels(type_.value)
    m.RETRIES.labels("route")
    init_projector_metrics()
    for mode_ in ("replay", "redrive"):
        for outcome in ("applied", "failed"):
            m.REPLAY_EVENTS.labels(mode_, outcome)


class LagSeries:
    """The router's sentpipe_consumer_lag series: only partitions this worker holds now. A partition that
    moved to another worker after a rebalance is dropped, or `sum by (topic)` would count it twice."""

    def __init__(self) -> None:
        self.held: set[tuple[str, int]] = set()

    def report(self, where: tuple[str, int], lag: int) -> None:
        m.CONSUMER_LAG.labels(where[0], str(where[1])).set(lag)
        self.held.add(where)

    def forget(self, gone: set[tuple[str, int]]) -> None:
        for topic, partition in gone & self.held:
            m.CONSUMER_LAG.remove(topic, str(partition))
        self.held -= gone

    def keep_only(self, assigned: set[tuple[str, int]]) -> None:
        self.forget(self.held - assigned)


class _RouterApp(faust.App):
    """Faust's app, whose rebalance while the worker stops waits for the records taken to be acked."""

    async def _on_partitions_revoked(self, revoked: set[TP]) -> None:
        # Faust answers a rebalance that reaches a stopping worker by rejoining the group and closing its
        # consumer's client at once, where any other revocation first waits for the records taken to be
        # acked and commits them. Reached in the middle of the stop's own wait for those records (a rolling
        # restart's scale-down: the router stopped just after another learns of that one's leave at its
        # next heartbeat), the wait's commits then waited on the closed client until the stop's deadline:
        # exit 1 after 55 s, the worker's new partitions nobody's until its session ran out. A new
        # assignment that moves a partition of a batch in flight away from it lets the next owner recover
        # the dedup table before that batch's marks reach the changelog, and route its records again. The
        # same wait as at any other revocation comes first (a stopping router does not retry: a batch the
        # broker refuses fails at once, unacked, and the next owner reads it again).
        if self.should_stop:
            await self._consumer_wait_empty(self.consumer, self.log)
        await super()._on_partitions_revoked(revoked)


class _QuietWorker(faust.Worker):
    """Faust's worker without its terminal spinner. At WARNING and above the spinner's log handler sets the
    root logger to DEBUG (to spin on every record), so every debug call in aiokafka and Faust builds a log
    record that no handler prints: a tenth of the router's time in a profile."""

    def on_setup_root_logger(self, logger: logging.Logger, level: int) -> None:
        self.spinner = None
        super().on_setup_root_logger(logger, level)
        restore_handler(logger, level)  # SENTPIPE_LOG_JSON's format, not Faust's

    async def start(self) -> None:
        # Faust creates its own topics and joins the group while it starts: a broker that refuses one (a
        # replication factor above its broker count) or goes away just after the start-up checks ended
        # the worker with mode's 50-line traceback. One line instead, and status 1 for the restart policy;
        # SystemExit passes mode's handler, which logs any Exception with its traceback, and still lets
        # it stop what had started (the projector process among them).
        try:
            await super().start()
        except AIOKafkaError as exc:
            log.error(f"the worker could not start, Kafka answered: {exc}")
            raise SystemExit(1) from None

    def _schedule_shutdown(self, sig: signal.Signals) -> None:
        # Faust waits without a limit for the records the router took and could not settle (the broker
        # away): a worker asked to stop ran on until SIGKILL, deaf to SIGTERM and Ctrl-C. Bounded now, and
        # a second signal acts at once; what was not acknowledged is routed again after the restart.
        if self._signal_stop_time:
            _exit_now(f"a second {sig.name}: the worker exits at once")
        else:
            _arm_stop_deadline()
        super()._schedule_shutdown(sig)

    def stop_and_shutdown(self) -> None:
        # A crash (the projector process gone: the README promises the worker exits non-zero) ends the
        # start and stops the worker here, with no signal and so no deadline: that stop waited for ever
        # on records the router could not settle (seen in the soak, 80+ s and counting after a projector's
        # kill -9, the router stalled, never restarted by a restart policy that waits for an exit).
        if not self._signal_stop_time:
            _arm_stop_deadline()
        super().stop_and_shutdown()


# Past the projector process's own stop (CHILD_STOP_TIMEOUT_S) and below Helm's grace period (60 s).
STOP_DEADLINE_S = CHILD_STOP_TIMEOUT_S + 10.0


def _arm_stop_deadline() -> None:
    """The worker ends with status 1 if its stop has not ended it within STOP_DEADLINE_S."""
    why = f"the worker did not stop within {STOP_DEADLINE_S:.0f}s (Kafka away?)"
    deadline = threading.Timer(STOP_DEADLINE_S, _exit_now, [why])
    deadline.daemon = True
    deadline.start()


def _exit_now(why: str) -> None:
    log.error(f"{why}; records it had not acknowledged are routed again after the restart")
    logging.shutdown()  # the line above reaches the log before the process ends
    os._exit(1)


class _ProducerInFaust(mode.Service):
    """The router's librdkafka producer, flushed when the worker stops."""

    def __init__(self, producer: AsyncProducer, **kwargs: Any) -> None:
        self.producer = producer
        super().__init__(**kwargs)

    async def on_start(self) -> None:
        await self.producer.start()

    async def on_stop(self) -> None:
        await self.producer.close()


class _HealthInFaust(mode.Service):
    """The worker's /metrics, /livez and /readyz on Faust's own loop, and the stall log."""

    def __init__(self, health: Health, host: str, port: int, **kwargs: Any) -> None:
        self.health, self.host, self.port = health, host, port
        self._runner: Any = None
        self._watch: asyncio.Task[None] | None = None
        super().__init__(**kwargs)

    async def on_start(self) -> None:
        self._runner = await serve_health(self.health, self.host, self.port)
        self._watch = asyncio.ensure_future(self.health.watch())

    async def on_stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        if self._runner is not None:
            await self._runner.cleanup()


def create_app(settings: Settings, role: WorkerRole | None = None) -> faust.App:
    """The Faust worker for roles `route` and `all` (the router; in `all`, the projector's process too)."""
    role = role or settings.worker_role
    if role == "project":
        raise ValueError("role 'project' runs without Faust: use run_projector()")
    topics = Topics(settings.topic_prefix)
    _init_metrics()
    app = _RouterApp(
        settings.app_id,
        broker=faust_broker(settings.kafka_bootstrap),
        broker_credentials=broker_credentials(settings),
        store=settings.table_store,
        table_standby_replicas=settings.table_standby_replicas,
        datadir=str(_mkdirs(settings.data_dir) / settings.app_id),
        processing_guarantee="at_least_once",
        topic_partitions=settings.raw_partitions,
        topic_replication_factor=settings.replication_factor,
        producer_acks=-1,
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=1.0,
        broker_session_timeout=settings.kafka_session_timeout_s,
        broker_heartbeat_interval=settings.kafka_heartbeat_interval_s,
        # Faust wants requests to outlast the session (its default: 90 s against a 60 s session).
        broker_request_timeout=max(90.0, settings.kafka_session_timeout_s + 30.0),
        # Bigger fetches: recovery of the dedup changelog reads millions of small records.
        broker_max_poll_records=5000,
        consumer_max_fetch_size=4 * 1024 * 1024,
        # Faust's web server is off (see below); bound to loopback should anything turn it on again.
        web_enabled=False,
        web_port=settings.worker_web_port,
        web_bind="127.0.0.1",
        key_serializer="raw",
        value_serializer="raw",
        # Measured in bench/ (README "Performance"): Java's murmur2 in C for the changelog marks,
        # Faust's compiled stream loop, a little linger so marks go out in batches.
        producer_partitioner=murmur2_partitioner,
        cython_optimizations=True,
        producer_linger=0.005,
        Worker=_QuietWorker,
    )
    use_eager_consumer(app)
    faust_recovery.install()  # standby copies of the dedup table keep every mark (a rolling restart)
    # No Faust web server: its /table and /router views would let anything that reaches the port read
    # dedup keys, and nothing here needs it (/metrics, /livez and /readyz are our own, on the metrics
    # port). `faust worker` sets web_enabled from its --with-web option (default on), so the app's
    # setting alone is overridden; the boot strategy's flag is what decides which services start.
    app.boot_strategy.enable_web = False
    health = Health()
    producer = AsyncProducer.from_settings(settings, delivery_timeout_s=30.0)
    app.add_dependency(_ProducerInFaust(producer))
    router = Router(app, settings, health.add(Watchdog("route", settings.stall_after_s)), producer)
    app.sentpipe = router  # type: ignore[attr-defined]
    _route_agents(app, settings, router, topics)
    health.ready_checks["dedup table recovery"] = app.tables.recovery.completed.is_set  # type: ignore[attr-defined]
    if role == "all":
        app.add_dependency(ProjectorProcess(settings, health))
    app.add_dependency(_HealthInFaust(health, settings.worker_metrics_host, settings.worker_metrics_port))
    lag_series = LagSeries()

    @app.on_partitions_revoked.connect  # type: ignore[untyped-decorator,arg-type]
    async def forget_revoked(app: faust.App, revoked: set[Any], **kwargs: Any) -> None:
        # Another worker routes them now; when they come back, their position is the group's commit.
        for tp in revoked:
            router.processed.pop((tp.topic, tp.partition), None)
            router.dispatched.pop((tp.topic, tp.partition), None)
            router.group_start.pop((tp.topic, tp.partition), None)
            router.held.forget(tp.partition)  # the raw topic and the changelog are co-partitioned
        lag_series.forget({(tp.topic, tp.partition) for tp in revoked})

    @app.timer(interval=5.0)  # type: ignore[untyped-decorator]
    async def watch_progress() -> None:
        # The gauge shows what the watchdog judges by: raw records not yet routed. The fetch position
        # runs ahead of a stuck agent, and the consumer's other partitions (the table's changelog during
        # recovery, Faust's assignor topic) are not work waiting: their stale numbers were exported too.
        try:
            await router.check_raw_partitions()
        except CopartitioningError as exc:
            log.critical(f"{exc} (partitions were added while the worker ran): the worker stops")
            await app.crash(exc)
            return
        try:
            waiting = await router.report_lag()
        except Exception:
            # An exception out of a timer ends the whole worker; a lag check is best effort (the watchdog
            # keeps its last reading: records it knew waiting still become a stall if nothing moves).
            log.exception("lag check failed; the next one tries again")
            return
        lag_series.keep_only(set(waiting))
        for where, n in waiting.items():
            lag_series.report(where, n)

    return app


def restore_table(app: faust.App, settings: Settings) -> None:
    """Before Faust starts: bring the dedup table up to its changelog's end with librdkafka (seconds per
    million ids, where Faust's own recovery takes minutes), into RocksDB files or the memory store."""
    from sentpipe.processors.restore import restore_dedup_table

    if not settings.table_fast_restore:
        return
    router: Router = app.sentpipe  # type: ignore[attr-defined]
    # No collections while a million ids arrive: each batch of 10,000 fetched records would trigger full
    # passes over everything loaded so far (30-60 ms each, a second of a five-second restore).
    gc.disable()
    try:
        done = restore_dedup_table(settings, router.seen.data)
    finally:
        gc.enable()
    if done is not None:
        settle_heap()


def settle_heap() -> None:
    """After a bulk load: hand freed fetch buffers back to the OS, and freeze what survived out of the
    collector's sight, so full collections later do not walk a million-entry table on the event loop."""
    gc.collect()
    gc.freeze()
    with contextlib.suppress(OSError, AttributeError):  # another libc: nothing to trim
        ctypes.CDLL(None).malloc_trim(0)  # glibc; RSS shows what the process really holds


def _route_agents(app: faust.App, settings: Settings, router: Router, topics: Topics) -> None:
    router.create_table()
    batch, within = settings.batch_size, settings.batch_within_s
    raw = app.topic(topics.raw, key_type=bytes, value_type=bytes, partitions=settings.raw_partitions)

    @app.agent(raw, name="route")
    async def route_agent(stream: Any) -> None:
        async def ack(events: Sequence[Event]) -> None:
            for event in events:
                await stream.ack(event)

        try:
            async for events in stream.noack_take(batch, within=within):
                await router.dispatch(events, ack)
        finally:
            # Stopping: the batches in flight settle (or fail and are read again after the restart).
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(router.drain()), 10.0)

    @app.timer(interval=settings.dedup_sweep_interval_s)  # type: ignore[untyped-decorator]
    async def sweep() -> None:
        # Timers start before the table is restored from its changelog, and run through rebalances: the
        # router's sweep waits for a steady table (`Router._table_steady`).
        try:
            removed = await router.sweep()
        except Exception:
            # Maintenance: the next sweep starts over. An exception here ended the whole worker.
            log.exception("dedup sweep failed; the next one starts over")
            return
        if removed:
            log.info("dedup sweep", extra={"removed": removed, "kept": len(router.seen)})
