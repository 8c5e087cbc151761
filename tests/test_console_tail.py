"""The console's tail against the real broker: what it counts for the overview and sends to live pages."""

from __future__ import annotations

import asyncio
import time

from confluent_kafka import Producer

from sentpipe.console.tail import Subscriber, Tail
from sentpipe.schemas.samples import SampleFactory
from sentpipe.schemas.topics import Topics
from sentpipe.settings import Settings


def produce(settings: Settings, topic: str, n: int) -> None:
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
    samples = SampleFactory()
    for i in range(n):
        producer.produce(topic, samples.message_status(f"msg-tail-{i}", "delivered").body, key=f"k{i}")
    assert producer.flush(30) == 0


def counted(tail: Tail) -> int:
    events_in, _ = tail.stats.snapshot()
    return sum(sum(c.values()) for c in events_in.values())


def test_a_backfill_after_a_broker_error_neither_counts_nor_shows_a_record_twice(
    settings: Settings, topics: Topics
) -> None:
    """After an error the tail reads the last hour back again: it added that hour to the counts it had
    (the overview doubled) and sent its rows to the live pages once more."""
    loop = asyncio.new_event_loop()
    try:
        tail = Tail(settings)
        tail._loop = loop
        sub = Subscriber(loop)
        tail.subscribers.add(sub)
        produce(settings, topics.raw, 5)
        tail._backfill()
        produce(settings, topics.raw, 2)
        tail._backfill()  # what `_run` does when following failed
        loop.run_until_complete(asyncio.sleep(0))  # the rows handed to the pages' loop
        assert counted(tail) == 7
        rows = [sub.queue.get_nowait() for _ in range(sub.queue.qsize())]
        assert len(rows) == len(tail.recent) == 7
        assert len({(row["topic"], row["partition"], row["offset"]) for row in rows}) == 7
    finally:
        loop.close()


def test_the_live_page_opens_with_the_newest_rows_of_the_hour(settings: Settings, topics: Topics) -> None:
    """The backfill sent its rows as it read them, partition after partition (only its last batch in time
    order): a new Live page opened with the last rows read, not the newest. Here the offsets run against
    time (each record older than the one before), so the order of reading is the reverse of the newest."""
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
    samples = SampleFactory()
    now_ms = int(time.time() * 1000)
    for i in range(700):
        body = samples.message_status(f"msg-newest-{i}", "delivered").body
        producer.produce(topics.raw, body, key=f"n{i}", partition=0, timestamp=now_ms - 1000 * i)
    assert producer.flush(30) == 0
    loop = asyncio.new_event_loop()
    try:
        tail = Tail(settings)
        tail._loop = loop
        tail._backfill()
        loop.run_until_complete(asyncio.sleep(0))  # the rows handed to the pages' loop
    finally:
        loop.close()
    assert counted(tail) == 700
    shown = [row["time"] for row in tail.recent]
    assert shown == sorted(shown) and shown[-50:] == [now_ms - 1000 * i for i in reversed(range(50))]


def test_a_full_queue_still_ends_its_page_s_stream() -> None:
    """The end marker was dropped into a full queue: a page that had fallen behind kept its stream, and
    the console's shutdown, open until its timeout ran out."""

    async def main() -> None:
        sub = Subscriber(asyncio.get_running_loop())
        while not sub.queue.full():
            sub.offer({"kind": "raw"})
        sub.end()
        rows = [sub.queue.get_nowait() for _ in range(sub.queue.qsize())]
        assert rows[-1] is None and all(rows[:-1]) and sub.dropped == 1

    asyncio.run(main())
