"""The Faust app: dedup + routing on the raw topic, one projecting agent per routed topic.

Delivery is at-least-once at every hop and every sink is idempotent, so the whole is effectively-once.
Batches are taken without acknowledgement (`noack_take`) and acknowledged only after their effects are
durable: routed records acked by the broker, rows committed, dead letters acked.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import faust
from faust.types import EventT
from psycopg_pool import AsyncConnectionPool

from sentpipe import metrics as m
from sentpipe.processors.handlers import HandlerRegistry, registry
from sentpipe.processors.retry import retrying
from sentpipe.processors.sink import PostgresSink
from sentpipe.processors.topics import DEDUP_TABLE
from sentpipe.schemas import routing as r
from sentpipe.schemas.events import ROUTED_TYPES, CanonicalEvent, EventType, MalformedEvent
from sentpipe.schemas.topics import Topics
from sentpipe.settings import Settings, WorkerRole

log = logging.getLogger("sentpipe.worker")

Event = EventT[Any]
Record = tuple[str, bytes, bytes, list[tuple[str, bytes]]]


def _mkdirs(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def faust_broker(bootstrap: str) -> str:
    return ";".join(f"kafka://{h.strip()}" for h in bootstrap.split(",") if h.strip())


def _headers(event: Event) -> dict[str, bytes]:
    raw: Any = event.message.headers or ()
    items = raw.items() if isinstance(raw, dict) else raw
    return {str(k): bytes(v) for k, v in items if v is not None}


class Pipeline:
    """The worker's I/O around the pure routing and projection code."""

    def __init__(self, app: faust.App, settings: Settings, handlers: HandlerRegistry) -> None:
        self.app = app
        self.s = settings
        self.topics = Topics(settings.topic_prefix)
        self.handlers = handlers
        self._pool: AsyncConnectionPool | None = None
        self._pool_lock = asyncio.Lock()
        self._seen: Any = None

    @property
    def seen(self) -> Any:
        """The dedup table (route role only)."""
        assert self._seen is not None, "the dedup table exists in the route role only"
        return self._seen

    def create_table(self) -> None:
        app, settings = self.app, self.s
        self._seen = app.Table(
            DEDUP_TABLE,
            default=None,
            partitions=settings.raw_partitions,
            key_type=bytes,
            value_type=int,
            # The changelog partition is the key's murmur2 partition, the same the ingress producer
            # chose for the raw record: table and raw topic stay co-partitioned even for batched writes.
            use_partitioner=True,
            help="event id -> first-routed time (ms); bounded by the dedup window sweep",
        )

    async def pool(self) -> AsyncConnectionPool:
        async with self._pool_lock:
            if self._pool is None:
                self._pool = AsyncConnectionPool(
                    self.s.database_url.get_secret_value(),
                    min_size=1,
                    max_size=self.s.db_pool_size,
                    timeout=5.0,
                    open=False,
                )
                await self._pool.open(wait=False)
            return self._pool

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()

    def _stopping(self) -> bool:
        return bool(self.app.should_stop)

    async def _send_all(self, records: Sequence[Record], stage: str) -> None:
        """Produce records and wait for every broker acknowledgement; retried as a whole."""
        if not records:
            return

        async def attempt(_: int) -> None:
            futs = [
                await self.app.producer.send(topic, key, value, None, None, headers)
                for topic, key, value, headers in records
            ]
            await asyncio.gather(*futs)

        await retrying(
            attempt,
            stage=stage,
            initial=self.s.retry_initial_s,
            cap=self.s.retry_max_s,
            should_stop=self._stopping,
        )

    def _dlq_record(
        self, event: Event, *, stage: str, error_class: str, message: str, headers: dict[str, bytes]
    ) -> Record:
        attempts = int(headers.get(r.H_DLQ_ATTEMPTS, b"0") or 0) + 1
        kept = [(k, v) for k, v in headers.items() if k not in r.H_DLQ_KEYS]
        msg = event.message
        dlq = r.dlq_headers(
            stage=stage,
            error_class=error_class,
            message=message,
            attempts=attempts,
            topic=msg.topic,
            partition=msg.partition,
            offset=msg.offset,
        )
        m.DLQ_EVENTS.labels(stage, error_class).inc()
        return (self.topics.dlq, msg.key or b"", msg.value or b"", kept + dlq)

    # --- raw topic: dedup and route -------------------------------------------------------------------
    async def route_batch(self, events: Sequence[Event]) -> None:
        out: list[Record] = []
        first_seen: list[bytes] = []
        in_batch: set[bytes] = set()
        for event in events:
            msg = event.message
            key = msg.key or b""
            headers = _headers(event)
            type_label = headers.get(r.H_TYPE, b"").decode(errors="replace")
            type_label = type_label if type_label in _TYPE_LABELS else "unknown"  # bounded label values
            if key and (key in in_batch or self.seen.get(key) is not None):
                m.DUPLICATES_DROPPED.labels(type_label).inc()
                continue
            in_batch.add(key)
            try:
                routed = r.route(
                    key or None,
                    msg.value or b"",
                    headers,
                    topics=self.topics,
                    id_source=self.s.event_id_source,
                    default_tenant=self.s.default_tenant,
                    record_timestamp_ms=int((msg.timestamp or time.time()) * 1000),
                )
            except MalformedEvent as exc:
                out.append(
                    self._dlq_record(
                        event, stage="route", error_class=exc.reason, message=exc.detail, headers=headers
                    )
                )
            else:
                out.append((routed.topic, routed.key, routed.value, list(headers.items())))
                m.EVENTS_ROUTED.labels(
                    routed.event.type.value if routed.event else EventType.UNROUTED.value
                ).inc()
            if key:
                first_seen.append(key)
        await self._send_all(out, stage="route")
        # Only now, with every routed record acknowledged, is the event marked seen: a crash before this
        # line re-routes it (absorbed by the idempotent sinks) instead of losing it.
        now_ms = int(time.time() * 1000)
        for key in first_seen:
            self.seen[key] = now_ms

    async def sweep(self) -> int:
        """Delete ids older than the dedup window; each delete tombstones the compacted changelog."""
        cutoff = int(time.time() * 1000) - self.s.dedup_window_s * 1000
        old = [k for k, v in list(self.seen.items()) if v is None or v < cutoff]
        for k in old:
            del self.seen[k]
        m.DEDUP_TABLE_KEYS.set(len(self.seen))
        return len(old)

    # --- routed topics: project and run handlers ------------------------------------------------------
    async def project_batch(self, type_: EventType, events: Sequence[Event]) -> None:
        pairs: list[tuple[Event, CanonicalEvent]] = []
        dead: list[Record] = []
        for event in events:
            try:
                pairs.append((event, CanonicalEvent.from_json(event.message.value or b"")))
            except (ValueError, KeyError, TypeError) as exc:
                dead.append(
                    self._dlq_record(
                        event,
                        stage="project",
                        error_class="bad_canonical_event",
                        message=str(exc),
                        headers=_headers(event),
                    )
                )
        canon = [c for _, c in pairs]
        pool = await self.pool()
        sink = PostgresSink(pool, self.handlers)
        failures = (
            await retrying(
                lambda attempt: sink.apply(type_, canon, attempt),
                stage="project",
                initial=self.s.retry_initial_s,
                cap=self.s.retry_max_s,
                should_stop=self._stopping,
            )
            if canon
            else []
        )
        committed = time.time()
        for c in canon:
            m.END_TO_END_LAG_SECONDS.labels(type_.value).observe(
                max(0.0, committed - c.received_at_ms / 1000)
            )
        by_id = {id(c): e for e, c in pairs}
        for f in failures:
            event = by_id[id(f.event)]
            log.warning(
                "handler failed permanently; event sent to the DLQ",
                extra={"event_id": f.event.id, "handler": f.handler, "error": type(f.error).__name__},
            )
            dead.append(
                self._dlq_record(
                    event,
                    stage="handler",
                    error_class=type(f.error).__name__,
                    message=f"{f.handler}: {f.error}",
                    headers=_headers(event),
                )
            )
        await self._send_all(dead, stage="dlq")


_TYPE_LABELS = frozenset(t.value for t in EventType)


def _init_metrics() -> None:
    """Create the bounded label sets at zero, so rates and alerts work before the first event."""
    for type_ in (*ROUTED_TYPES, EventType.UNROUTED):
        m.EVENTS_ROUTED.labels(type_.value)
    for type_ in ROUTED_TYPES:
        m.DUPLICATES_DROPPED.labels(type_.value)
        m.EVENTS_PROCESSED.labels(type_.value, "projection", "ok")
    for stage in ("route", "project", "dlq"):
        m.RETRIES.labels(stage)
    for mode in ("replay", "redrive"):
        for outcome in ("applied", "failed"):
            m.REPLAY_EVENTS.labels(mode, outcome)


def app_id_for(settings: Settings, role: WorkerRole) -> str:
    """The Faust app id (= consumer group). Projections get a group of their own when run apart."""
    return f"{settings.app_id}-projections" if role == "project" else settings.app_id


def create_app(
    settings: Settings, handlers: HandlerRegistry = registry, role: WorkerRole | None = None
) -> faust.App:
    """The worker. Role `all` runs everything in one consumer; `route` and `project` split it in two
    consumer groups, so projections keep up while the router works through a backlog."""
    role = role or settings.worker_role
    topics = Topics(settings.topic_prefix)
    _init_metrics()
    app_id = app_id_for(settings, role)
    app = faust.App(
        app_id,
        broker=faust_broker(settings.kafka_bootstrap),
        store=settings.table_store,
        datadir=str(_mkdirs(settings.data_dir) / app_id),
        processing_guarantee="at_least_once",
        topic_partitions=settings.raw_partitions,
        topic_replication_factor=settings.replication_factor,
        producer_acks=-1,
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=1.0,
        web_port=settings.worker_web_port,
        web_bind="0.0.0.0",
        key_serializer="raw",
        value_serializer="raw",
    )
    # Each routed batch marks up to batch_size ids at once; Faust's default changelog buffer (100) would
    # stall the stream and log "producer buffer full" for every batch.
    app.producer.buffer.max_messages = max(100, 2 * settings.batch_size)
    pipeline = Pipeline(app, settings, handlers)
    app.sentpipe = pipeline  # type: ignore[attr-defined]
    batch, within = settings.batch_size, settings.batch_within_s

    if role in ("all", "route"):
        _route_agents(app, settings, pipeline, topics)
    if role in ("all", "project"):
        _project_agents(app, pipeline, topics, batch, within)

    @app.timer(interval=10.0)  # type: ignore[untyped-decorator]
    async def consumer_lag() -> None:
        consumer = app.consumer
        for tp in consumer.assignment():
            try:
                position = await consumer.position(tp)
                highwater = consumer.highwater(tp)
            except Exception:  # lag is best effort; an unassigned or resetting partition has none
                continue
            if position is not None and highwater is not None:
                m.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(max(0, highwater - position))

    return app


def _route_agents(app: faust.App, settings: Settings, pipeline: Pipeline, topics: Topics) -> None:
    pipeline.create_table()
    batch, within = settings.batch_size, settings.batch_within_s
    raw = app.topic(topics.raw, key_type=bytes, value_type=bytes, partitions=settings.raw_partitions)

    @app.agent(raw, name="route")
    async def route_agent(stream: Any) -> None:
        async for events in stream.noack_take(batch, within=within):
            await pipeline.route_batch(events)
            for event in events:
                await stream.ack(event)

    @app.timer(interval=settings.dedup_sweep_interval_s)  # type: ignore[untyped-decorator]
    async def sweep() -> None:
        # Timers start before the table is restored from its changelog: a sweep of a half-recovered table
        # would miss the keys still on their way (and report a size that is not true).
        if not app.tables.recovery.completed.is_set():  # type: ignore[attr-defined]
            return
        removed = await pipeline.sweep()
        if removed:
            log.info("dedup sweep", extra={"removed": removed, "kept": len(pipeline.seen)})


def _project_agents(app: faust.App, pipeline: Pipeline, topics: Topics, batch: int, within: float) -> None:
    routed = {
        EventType.MESSAGE_STATUS: topics.message_status,
        EventType.MESSAGE_INBOUND: topics.message_inbound,
        EventType.TEMPLATE_APPROVAL: topics.template_approval,
    }
    for type_, topic_name in routed.items():
        topic = app.topic(topic_name, key_type=bytes, value_type=bytes)

        def make(type_: EventType) -> Any:
            async def project(stream: Any) -> None:
                async for events in stream.noack_take(batch, within=within):
                    await pipeline.project_batch(type_, events)
                    for event in events:
                        await stream.ack(event)

            return project

        app.agent(topic, name=f"project-{type_.value}")(make(type_))
