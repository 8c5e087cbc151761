"""An asyncio face for confluent-kafka's producer: delivery reports resolve futures on the loop.

librdkafka does the batching, network and retries in its own threads. Delivery reports are served by
non-blocking poll(0) calls on the event loop itself, ticking every millisecond while records are in
flight: callbacks then settle futures directly, with no extra Python thread contending for the GIL
and no cross-thread wake-up per acknowledgement.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from functools import partial
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

log = logging.getLogger("sentpipe.producer")

TICK_S = 0.001  # how often delivery reports are served while records are in flight


class ProduceRejected(Exception):
    """The record was not (or not known to be) written; the caller answers 503."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def producer_config(
    bootstrap: str,
    *,
    linger_ms: int = 2,
    compression: str = "lz4",
    max_in_flight: int = 20000,
    delivery_timeout_s: float = 5.0,
) -> dict[str, Any]:
    return {
        "bootstrap.servers": bootstrap,
        # Durable before 2xx: every in-sync replica has it, and retries never duplicate or reorder.
        "acks": "all",
        "enable.idempotence": True,
        # Java's and aiokafka's partitioner: the worker's dedup table relies on landing on the same partition.
        "partitioner": "murmur2_random",
        "linger.ms": linger_ms,
        "batch.size": 256 * 1024,
        "compression.type": compression,
        # Bounded local queue: when full, produce() raises BufferError and the request gets 503 at once.
        "queue.buffering.max.messages": max_in_flight,
        "queue.buffering.max.kbytes": 256 * 1024,
        # A record not delivered in this time fails its future instead of waiting forever.
        "message.timeout.ms": max(1000, int(delivery_timeout_s * 1000)),
        "socket.keepalive.enable": True,
        "log_level": 4,
    }


class AsyncProducer:
    def __init__(self, config: dict[str, Any]) -> None:
        self._config = dict(config)
        self._producer = Producer({**self._config, "error_cb": self._on_error, "logger": log})
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_error: KafkaError | None = None
        self._ready_checked_at = 0.0
        self._ready = False
        self._in_flight = 0
        self._ticking = False

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()

    def _tick(self) -> None:
        self._producer.poll(0)  # serves delivery reports (and error_cb) right here, on the loop
        if self._in_flight > 0 and self._loop is not None:
            self._loop.call_later(TICK_S, self._tick)
        else:
            self._ticking = False

    def _on_delivery(self, fut: asyncio.Future[Message], err: KafkaError | None, msg: Message) -> None:
        self._in_flight -= 1
        if fut.done():  # the guard in send() gave up on it already
            return
        if err is not None:
            fut.set_exception(ProduceRejected(err.name().lower()))
        else:
            fut.set_result(msg)

    def _on_error(self, err: KafkaError) -> None:
        self._last_error = err
        if err.fatal():
            log.error("fatal Kafka producer error: %s", err.str())

    def produce(
        self, topic: str, key: bytes, value: bytes, headers: Sequence[tuple[str, bytes]]
    ) -> asyncio.Future[Message]:
        """Enqueue a record; the future resolves when the broker acknowledges it (or fails)."""
        loop = self._loop
        assert loop is not None, "start() first"
        fut: asyncio.Future[Message] = loop.create_future()
        try:
            self._producer.produce(
                topic, value, key, headers=list(headers), on_delivery=partial(self._on_delivery, fut)
            )
        except BufferError:
            raise ProduceRejected("local_queue_full") from None
        except KafkaException as exc:
            raise ProduceRejected(exc.args[0].name().lower() if exc.args else "produce_error") from None
        self._in_flight += 1
        if not self._ticking:
            self._ticking = True
            loop.call_later(TICK_S, self._tick)
        return fut

    async def send(
        self, topic: str, key: bytes, value: bytes, headers: Sequence[tuple[str, bytes]], timeout: float
    ) -> Message:
        fut = self.produce(topic, key, value, headers)
        # librdkafka fails the record after message.timeout.ms; this guard only bounds the wait if a
        # report never comes. Cheaper than wait_for, which wraps every request in another task.
        guard = fut.get_loop().call_later(timeout + 1.0, _expire, fut)
        try:
            return await fut
        finally:
            guard.cancel()

    async def ready(self, timeout: float = 2.0, cache_s: float = 1.0) -> bool:
        """True when a broker answers a metadata request; cached briefly so probes stay cheap."""
        now = time.monotonic()
        if now - self._ready_checked_at < cache_s:
            return self._ready
        self._ready_checked_at = now
        try:
            md = await asyncio.to_thread(self._producer.list_topics, timeout=timeout)
            self._ready = bool(md.brokers) and not (self._last_error and self._last_error.fatal())
        except KafkaException:
            self._ready = False
        return self._ready

    def queued(self) -> int:
        return len(self._producer)

    async def close(self, timeout: float = 10.0) -> None:
        """Deliver what is queued (graceful shutdown), serving reports on the loop as it goes."""
        deadline = time.monotonic() + timeout
        while len(self._producer) > 0 and time.monotonic() < deadline:
            self._producer.poll(0)
            await asyncio.sleep(TICK_S)
        self._producer.poll(0)
        if len(self._producer):
            log.warning("producer closed with %d undelivered records", len(self._producer))


def _expire(fut: asyncio.Future[Message]) -> None:
    if not fut.done():
        fut.set_exception(ProduceRejected("delivery_timeout"))
