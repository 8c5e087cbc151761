"""Records a fetch returned for a partition paused since (processors/faust_transport.py): none is dropped
with the consumer's position past it. The hand-off decisions are pure logic, the thread stubbed; the
rewind runs against the broker."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Mapping
from types import SimpleNamespace
from typing import Any

import aiokafka
from aiokafka import TopicPartition

from sentpipe.processors.faust_transport import EagerConsumer, Fetched, rewind
from sentpipe.schemas.topics import Topics
from sentpipe.settings import Settings

TP0, TP1 = TopicPartition("raw", 0), TopicPartition("raw", 1)


def _record(tp: TopicPartition, offset: int) -> Any:
    return SimpleNamespace(topic=tp.topic, partition=tp.partition, offset=offset)


class _Ordered:
    """The order the scheduler hands records over in, fixed: the test pauses between two of them."""

    def __init__(self, order: list[tuple[TopicPartition, int]]) -> None:
        self.order = order

    def iterate(self, records: Mapping[TopicPartition, list[Any]]) -> Iterator[tuple[TopicPartition, Any]]:
        by_offset = {(tp, r.offset): r for tp, recs in records.items() for r in recs}
        for where in self.order:
            yield where[0], by_offset[where]


class _Consumer(EagerConsumer):
    """The consumer's hand-off alone: one fetch already made, nothing else of a service."""

    def __init__(self, records: Fetched, active: set[TopicPartition], order: list[Any]) -> None:
        self.fetched, self.active = records, active
        self.app = SimpleNamespace(
            consumer_generation_id=1, monitor=SimpleNamespace(track_tp_end_offset=lambda tp, offset: None)
        )
        self.flow_active = True
        self._stopped, self._crashed = asyncio.Event(), asyncio.Event()
        self._buffered_partitions: set[TopicPartition] = set()
        self.scheduler = _Ordered(order)  # type: ignore[assignment]
        self.rewinds: list[tuple[TopicPartition, int, int | None]] = []

    async def _wait_next_records(self, timeout: float) -> Any:
        return self.fetched, self.active

    def highwater(self, tp: Any) -> int:
        return 0

    def _to_message(self, tp: Any, record: Any) -> Any:
        return record.offset

    async def _rewind(self, tp: Any, offset: int, fetched_to: int | None) -> None:
        self.rewinds.append((tp, offset, fetched_to))


async def test_a_partition_paused_during_the_hand_off_is_read_again_from_its_first_undelivered_record() -> (
    None
):
    """Paused (recovery pausing what it sought) and resumed within one fetch's hand-off: Faust dropped the
    record it met while paused and delivered the next, a hole behind the consumer's position."""
    order = [(tp, o) for o in range(4) for tp in (TP0, TP1)]
    records = Fetched({tp: [_record(tp, o) for o in range(4)] for tp in (TP0, TP1)}, {TP0: 4, TP1: 4})
    active = {TP0, TP1}
    consumer = _Consumer(records, active, order)
    delivered: list[tuple[TopicPartition, int]] = []
    async for tp, offset in consumer.getmany(timeout=1.0):
        delivered.append((tp, offset))
        if (tp, offset) == (TP0, 1):
            active.discard(TP0)
        elif (tp, offset) == (TP1, 2):
            active.add(TP0)  # resumed before the fetch's last record of it
    assert [o for tp, o in delivered if tp == TP0] == [0, 1]
    assert [o for tp, o in delivered if tp == TP1] == [0, 1, 2, 3]
    assert consumer.rewinds == [(TP0, 2, 4)]


async def test_the_fetch_filters_by_the_partitions_active_when_it_was_asked_for() -> None:
    """The consumer thread's fetch waits for records while this loop pauses partitions: given the live
    set, an emptied one (every partition paused for a recovery) let aiokafka return every partition's."""
    seen: list[Any] = []
    active = {TP0, TP1}

    class _Thread:
        async def getmany(self, active_partitions: Any, timeout: float) -> Fetched:
            await asyncio.sleep(0)  # the fetch waits for records; recovery pauses meanwhile
            seen.append(set(active_partitions))
            return Fetched({}, {})

    consumer = _Consumer(Fetched({}, {}), active, [])
    consumer._thread = _Thread()  # type: ignore[assignment]
    fetch = asyncio.ensure_future(consumer._getmany(active, 1.0))
    await asyncio.sleep(0)
    active.clear()
    await fetch
    assert seen == [{TP0, TP1}]


async def _read(consumer: aiokafka.AIOKafkaConsumer, tp: TopicPartition, n: int) -> list[int]:
    got: list[int] = []
    async with asyncio.timeout(30):
        while len(got) < n:
            got += [r.offset for r in (await consumer.getmany(tp, timeout_ms=1000)).get(tp, [])]
    return got


async def _consumer(s: Settings, tp: TopicPartition) -> AsyncIterator[aiokafka.AIOKafkaConsumer]:
    consumer = aiokafka.AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign([tp])
        consumer.seek(tp, 0)
        yield consumer
    finally:
        await consumer.stop()


async def test_a_rewind_reads_the_partition_again_unless_it_was_sought_since(settings: Settings) -> None:
    tp = TopicPartition(Topics(settings.topic_prefix).raw, 0)
    producer = aiokafka.AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    await producer.start()
    try:
        for i in range(10):
            await producer.send_and_wait(tp.topic, b"%d" % i, partition=0)
    finally:
        await producer.stop()
    async for consumer in _consumer(settings, tp):
        assert await _read(consumer, tp, 10) == list(range(10))
        assert rewind(consumer, tp, 4, 10)
        assert (await _read(consumer, tp, 6))[:1] == [4]
        consumer.seek(tp, 7)  # recovery's seek, after the fetch: it decides
        assert not rewind(consumer, tp, 2, 10)
        assert (await _read(consumer, tp, 3))[:1] == [7]
