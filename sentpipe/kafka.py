"""The one Kafka client module: client configuration, the admin client and the producer wrapper.

Every Kafka client of sentpipe is configured here, so the connection settings (bootstrap, and later
security) are mapped once. The producer has one implementation with two faces: `Producer` reports
deliveries to callbacks (replay and redrive, which run in a plain thread), and `AsyncProducer` settles
asyncio futures (the ingress and the worker's dead letters).

librdkafka does the batching, network and retries in its own threads. The async face serves delivery
reports with non-blocking poll(0) calls on the event loop itself, ticking every millisecond while records
are in flight: callbacks then settle futures directly, with no extra Python thread contending for the GIL.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import confluent_kafka
from confluent_kafka import KafkaError, KafkaException, Message
from confluent_kafka.admin import AdminClient  # type: ignore[attr-defined]

from sentpipe.broker import Delivered, Partition, ProduceRejected, Record
from sentpipe.settings import Settings

log = logging.getLogger("sentpipe.kafka")

TICK_S = 0.001  # how often delivery reports are served while records are in flight

Headers = Sequence[tuple[str, bytes]]


class BrokerUnavailable(Exception):
    """The broker did not answer in time; one line for the operator."""


def client_config(settings: Settings) -> dict[str, Any]:
    """What every librdkafka client shares: where the cluster is, and librdkafka's log via `logging`."""
    return {"bootstrap.servers": settings.kafka_bootstrap, "logger": log}


def producer_config(settings: Settings, *, delivery_timeout_s: float | None = None) -> dict[str, Any]:
    timeout_s = settings.produce_timeout_s if delivery_timeout_s is None else delivery_timeout_s
    return {
        **client_config(settings),
        # Durable before 2xx: every in-sync replica has it, and retries never duplicate or reorder.
        "acks": "all",
        "enable.idempotence": True,
        # Java's and aiokafka's partitioner: the worker's dedup table relies on landing on the same partition.
        "partitioner": "murmur2_random",
        "linger.ms": settings.producer_linger_ms,
        "batch.size": 256 * 1024,
        "compression.type": settings.producer_compression,
        # Bounded local queue: when full, produce() raises BufferError and the request gets 503 at once.
        "queue.buffering.max.messages": settings.producer_max_in_flight,
        "queue.buffering.max.kbytes": 256 * 1024,
        # A record not delivered in this time fails its future instead of waiting forever.
        "message.timeout.ms": max(1000, int(timeout_s * 1000)),
        "socket.keepalive.enable": True,
        "log_level": 4,
    }


def admin_client(settings: Settings) -> AdminClient:
    # librdkafka logs every failed connect; the caller reports one line instead.
    return AdminClient({**client_config(settings), "socket.timeout.ms": 5000, "log_level": 0})


def existing_partitions(admin: AdminClient, bootstrap: str, timeout: float = 10.0) -> dict[str, int]:
    """Topic -> partition count; BrokerUnavailable naming the address when nothing answers in time."""
    try:
        md = admin.list_topics(timeout=timeout)
    except KafkaException as exc:
        raise BrokerUnavailable(f"Kafka broker at {bootstrap} did not answer within {timeout:.0f}s") from exc
    return {name: len(t.partitions) for name, t in md.topics.items() if t.error is None}


OnDelivery = Callable[[KafkaError | None, Message], None]


class Producer:
    """An idempotent acks=all producer whose delivery reports go to per-record callbacks."""

    def __init__(self, config: dict[str, Any]) -> None:
        self._config = dict(config)
        self._last_error: KafkaError | None = None
        self._producer = confluent_kafka.Producer({**self._config, "error_cb": self._on_error})
        self._ready_checked_at = 0.0
        self._ready = False

    @classmethod
    def from_settings(cls, settings: Settings, *, delivery_timeout_s: float | None = None) -> Producer:
        return cls(producer_config(settings, delivery_timeout_s=delivery_timeout_s))

    @property
    def bootstrap(self) -> str:
        return str(self._config.get("bootstrap.servers", ""))

    @property
    def delivery_timeout_s(self) -> float:
        return int(self._config.get("message.timeout.ms", 300_000)) / 1000

    def _on_error(self, err: KafkaError) -> None:
        self._last_error = err
        if err.fatal():
            log.error("fatal Kafka producer error: %s", err.str())

    def _enqueue(
        self, topic: str, key: bytes, value: bytes, headers: Headers, on_delivery: OnDelivery
    ) -> None:
        try:
            self._producer.produce(topic, value, key, headers=list(headers), on_delivery=on_delivery)
        except BufferError:
            raise ProduceRejected("local_queue_full") from None
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            raise ProduceRejected(
                err.name().lower() if isinstance(err, KafkaError) else "produce_error"
            ) from None

    def send(
        self,
        topic: str,
        key: bytes,
        value: bytes,
        headers: Headers,
        on_done: Callable[[KafkaError | None], None],
    ) -> None:
        """Enqueue a record, waiting for room when the local queue is full; `on_done` gets the outcome."""

        def report(err: KafkaError | None, _msg: Message) -> None:
            on_done(err)

        while True:
            try:
                self._enqueue(topic, key, value, headers, report)
                break
            except ProduceRejected as exc:
                if exc.reason != "local_queue_full":
                    raise
                self._producer.poll(0.1)  # let deliveries drain the queue
        self._producer.poll(0)  # serve delivery reports as we go

    def flush(self, timeout_s: float | None = None) -> None:
        """Wait for every delivery report; raises BrokerUnavailable when some never came."""
        wait = self.delivery_timeout_s + 5 if timeout_s is None else timeout_s
        remaining = self._producer.flush(wait)
        if remaining:
            raise BrokerUnavailable(
                f"{remaining} record(s) not acknowledged by Kafka at {self.bootstrap} within {wait:.0f}s"
            )

    def fatal(self) -> bool:
        return bool(self._last_error and self._last_error.fatal())

    async def ready(self, timeout: float = 2.0, cache_s: float = 1.0) -> bool:
        """True when a broker answers a metadata request; cached briefly so probes stay cheap."""
        now = time.monotonic()
        if now - self._ready_checked_at < cache_s:
            return self._ready
        self._ready_checked_at = now
        try:
            md = await asyncio.to_thread(self._producer.list_topics, timeout=timeout)
            self._ready = bool(md.brokers) and not self.fatal()
        except KafkaException:
            self._ready = False
        return self._ready


class AsyncProducer(Producer):
    """The same producer, with a future per record settled on the event loop."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._in_flight = 0
        self._ticking = False

    @classmethod
    def from_settings(cls, settings: Settings, *, delivery_timeout_s: float | None = None) -> AsyncProducer:
        return cls(producer_config(settings, delivery_timeout_s=delivery_timeout_s))

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()

    def _tick(self) -> None:
        self._producer.poll(0)  # serves delivery reports (and error_cb) right here, on the loop
        if self._in_flight > 0 and self._loop is not None:
            self._loop.call_later(TICK_S, self._tick)
        else:
            self._ticking = False

    def _on_delivery(self, fut: asyncio.Future[Delivered], err: KafkaError | None, msg: Message) -> None:
        self._in_flight -= 1
        if fut.done():  # the guard in send() gave up on it already
            return
        if err is not None:
            fut.set_exception(ProduceRejected(err.name().lower()))
        else:
            fut.set_result(Delivered(msg.topic() or "", msg.partition() or 0, msg.offset() or 0))

    def produce(self, topic: str, key: bytes, value: bytes, headers: Headers) -> asyncio.Future[Delivered]:
        """Enqueue a record; the future resolves when the broker acknowledges it (or fails)."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        fut: asyncio.Future[Delivered] = loop.create_future()
        self._enqueue(topic, key, value, headers, partial(self._on_delivery, fut))
        self._in_flight += 1
        if not self._ticking:
            self._ticking = True
            loop.call_later(TICK_S, self._tick)
        return fut

    async def send_and_wait(
        self, topic: str, key: bytes, value: bytes, headers: Headers, timeout: float
    ) -> Delivered:
        fut = self.produce(topic, key, value, headers)
        # librdkafka fails the record after message.timeout.ms; this guard only bounds the wait if a
        # report never comes. Cheaper than wait_for, which wraps every request in another task.
        guard = fut.get_loop().call_later(timeout + 1.0, _expire, fut)
        try:
            return await fut
        finally:
            guard.cancel()

    async def close(self, timeout: float = 10.0) -> None:
        """Deliver what is queued (graceful shutdown), serving reports on the loop as it goes."""
        deadline = time.monotonic() + timeout
        while len(self._producer) > 0 and time.monotonic() < deadline:
            self._producer.poll(0)
            await asyncio.sleep(TICK_S)
        self._producer.poll(0)
        if len(self._producer):
            log.warning("producer closed with %d undelivered records", len(self._producer))


def _expire(fut: asyncio.Future[Delivered]) -> None:
    if not fut.done():
        fut.set_exception(ProduceRejected("delivery_timeout"))


class BatchConsumer:
    """A consumer-group member on librdkafka: batches of detached records, commits only when told.

    Offsets are committed synchronously after the caller's work is durable, never automatically, so a
    crash re-reads the uncommitted tail (at-least-once). Rebalances happen inside `poll_batch`, between
    batches, so a revoked partition never has work in flight.
    """

    def __init__(self, settings: Settings, group: str, topics: Sequence[str]) -> None:
        self._consumer = confluent_kafka.Consumer(
            {
                **client_config(settings),
                "group.id": group,
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": "earliest",
                # Routed topics are read by one consumer per process: fetch big, wait little.
                "fetch.wait.max.ms": 100,
                "queued.max.messages.kbytes": 64 * 1024,
                "partition.assignment.strategy": "cooperative-sticky",
                "log_level": 4,
            }
        )
        self._assigned: set[Partition] = set()
        self.on_revoke: list[Callable[[set[Partition]], None]] = []
        self._consumer.subscribe(list(topics), on_assign=self._on_assign, on_revoke=self._on_revoke)

    def _on_assign(self, _c: Any, tps: list[confluent_kafka.TopicPartition]) -> None:
        self._assigned |= {(tp.topic, tp.partition) for tp in tps}

    def _on_revoke(self, _c: Any, tps: list[confluent_kafka.TopicPartition]) -> None:
        gone = {(tp.topic, tp.partition) for tp in tps}
        self._assigned -= gone
        for cb in self.on_revoke:
            cb(gone)

    def poll_batch(self, max_records: int, timeout_s: float) -> list[Record]:
        out: list[Record] = []
        for msg in self._consumer.consume(max_records, timeout_s):
            err = msg.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("consumer error: %s", err.str())
                continue
            _, ts = msg.timestamp()
            headers: Any = msg.headers() or []  # the stubs do not know it is a list of pairs
            key: Any = msg.key()
            out.append(
                Record(
                    msg.topic() or "",
                    msg.partition() or 0,
                    msg.offset() or 0,
                    key,
                    msg.value() or b"",
                    tuple((str(k), bytes(v)) for k, v in headers if v is not None),
                    int(ts) if ts and ts > 0 else int(time.time() * 1000),
                )
            )
        return out

    def commit(self, offsets: Mapping[Partition, int]) -> None:
        if offsets:
            tps = [confluent_kafka.TopicPartition(t, p, o) for (t, p), o in offsets.items()]
            self._consumer.commit(offsets=tps, asynchronous=False)

    def lag(self) -> dict[Partition, int]:
        out: dict[Partition, int] = {}
        tps = [confluent_kafka.TopicPartition(t, p) for t, p in self._assigned]
        for tp in self._consumer.position(tps) if tps else []:
            _, high = self._consumer.get_watermark_offsets(tp, cached=True)
            if tp.offset >= 0 and high >= 0:
                out[(tp.topic, tp.partition)] = max(0, high - tp.offset)
        return out

    def close(self) -> None:
        self._consumer.close()
