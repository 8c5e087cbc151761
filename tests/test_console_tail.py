"""The console's tail against the real broker: what it counts for the overview and sends to live pages."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestServer
from confluent_kafka import KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewPartitions, NewTopic

from sentpipe.console import create_app
from sentpipe.console.app import TAIL
from sentpipe.console.tail import RECENT_ROWS, Row, Subscriber, Tail
from sentpipe.schemas.samples import SampleFactory
from sentpipe.schemas.topics import Topics
from sentpipe.settings import Settings
from tests.processes import free_port
from tests.services import Services


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


def test_a_backfill_after_a_broker_error_sends_the_pages_every_record_they_missed(
    settings: Settings, topics: Topics
) -> None:
    """Reading the hour back after an error, the tail sent the pages only the newest 200 rows of the hour: the
    records that came during the outage beyond those never reached an open Live page, and nothing said so."""
    loop = asyncio.new_event_loop()
    try:
        tail = Tail(settings)
        tail._loop = loop
        sub = Subscriber(loop)
        tail.subscribers.add(sub)
        produce(settings, topics.raw, 5)
        tail._backfill()
        produce(settings, topics.raw, 300)  # while following failed
        tail._backfill()
        loop.run_until_complete(asyncio.sleep(0))  # the rows handed to the pages' loop
        rows = [sub.queue.get_nowait() for _ in range(sub.queue.qsize())]
        assert len({(row["topic"], row["partition"], row["offset"]) for row in rows}) == len(rows) == 305
        later = rows[5:]
        assert [row["time"] for row in later] == sorted(row["time"] for row in later)
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


async def rows_until(sub: Subscriber, wanted: Callable[[Row], bool], limit_s: float = 90.0) -> Row | None:
    """The first row sent to the page that `wanted` accepts; None if none came within `limit_s`."""
    try:
        async with asyncio.timeout(limit_s):
            while True:
                row = await sub.queue.get()
                if row is not None and wanted(row):
                    return row
    except TimeoutError:
        return None


async def test_the_tail_shows_the_records_of_a_partition_added_while_it_follows(
    settings: Settings, topics: Topics
) -> None:
    """The tail was assigned the partitions of its start: records on a partition added later (the raw topic
    grown to spread load) never reached the live page or the overview's counts, and nothing said so."""
    tail = Tail(settings)
    tail.start(asyncio.get_running_loop())
    try:
        sub = tail.subscribe()
        produce(settings, topics.raw, 1)
        assert await rows_until(sub, lambda row: True) is not None  # following now
        admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
        for future in admin.create_partitions(
            [NewPartitions(topics.raw, settings.raw_partitions + 1)]
        ).values():
            future.result(30)
        producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
        body = SampleFactory().message_status("msg-tail-new-partition", "delivered").body
        producer.produce(topics.raw, body, key="on-the-new-partition", partition=settings.raw_partitions)
        assert producer.flush(30) == 0
        row = await rows_until(sub, lambda row: row["partition"] == settings.raw_partitions)
        assert row is not None, f"no row from the added partition; tail state {tail.state!r}"
        assert row["event_id"] and row["type"] == "message.status.updated"
    finally:
        await asyncio.get_running_loop().run_in_executor(None, tail.stop)


async def test_the_tail_says_its_topic_is_gone_and_follows_it_again_once_made_anew(
    settings: Settings, topics: Topics
) -> None:
    """A raw topic deleted under the tail left it "tailing" with nothing to read, and once the topic was made
    anew the records on it never reached the page (the offsets followed were past its end)."""
    tail = Tail(settings)
    tail.start(asyncio.get_running_loop())
    try:
        sub = tail.subscribe()
        produce(settings, topics.raw, 3)  # the old topic's offsets: 0..2 on some partitions
        assert await rows_until(sub, lambda row: True) is not None
        admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
        for future in admin.delete_topics([topics.raw]).values():
            future.result(30)
        for _ in range(450):  # 90 s at most
            if "Kafka" in tail.state:
                break
            await asyncio.sleep(0.2)
        assert "Kafka" in tail.state, tail.state  # what the overview shows: not a plain "tailing"
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(90):
            while True:  # the broker refuses a new topic of the name until the deletion is done
                new = admin.create_topics([NewTopic(topics.raw, settings.raw_partitions, 1)])
                try:
                    await loop.run_in_executor(None, new[topics.raw].result, 30)
                    break
                except KafkaException:
                    await asyncio.sleep(1)
        producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
        body = SampleFactory().message_status("msg-tail-remade", "delivered").body
        producer.produce(topics.raw, body, key="on-the-new-topic")
        assert producer.flush(30) == 0
        row = await rows_until(sub, lambda row: row["subject"] == "msg-tail-remade", 120)
        assert row is not None, f"no row from the topic made anew; tail state {tail.state!r}"
    finally:
        await asyncio.get_running_loop().run_in_executor(None, tail.stop)


async def sse_rows(stream: Any, until: str = "ready") -> tuple[list[Row], list[str], str | None]:
    """The rows (and other events) of a live stream up to its event `until`, and the last row's id."""
    rows: list[Row] = []
    events: list[str] = []
    ids: list[str] = []
    async with asyncio.timeout(60):  # a stream that never sends `until` fails the test, not hangs it
        await _read_until(stream, until, rows, events, ids)
    return rows, events, ids[-1] if ids else None


async def _read_until(stream: Any, until: str, rows: list[Row], events: list[str], ids: list[str]) -> None:
    event, data, row_id = "message", "", None
    async for raw in stream.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            data = line[6:]
        elif line.startswith("id: "):
            row_id = line[4:]
        elif line == "":
            if event == "message" and data:
                rows.append(orjson.loads(data))
                ids.extend([row_id] if row_id else [])
            elif event != "message":
                events.append(f"{event}:{data}")
            if event == until:
                return
            event, data, row_id = "message", "", None


async def test_a_live_page_reconnecting_gets_every_row_it_missed(settings: Settings, topics: Topics) -> None:
    """A reconnection (a network blip, a proxy's idle timeout) started again with the latest 50 rows: rows
    that came in between beyond those were missing from the page, which said "live" as if nothing were. Each
    row has an id; the browser sends the last one back (Last-Event-ID) and gets what came after it."""
    app = create_app(settings.model_copy(update={"console_metrics_urls": []}))
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    base = f"http://127.0.0.1:{server.port}"
    tail = app[TAIL]
    try:
        produce(settings, topics.raw, 3)
        async with ClientSession() as client:
            for _ in range(600):  # the tail's backfill read them (60 s at most)
                if len(tail.recent) >= 3:
                    break
                await asyncio.sleep(0.1)
            async with client.get(f"{base}/api/live") as stream:
                first, _, last_id = await sse_rows(stream)
            assert len(first) == 3
            produce(settings, topics.raw, 120)  # while the page is away
            for _ in range(600):
                if len(tail.recent) >= 123:
                    break
                await asyncio.sleep(0.1)
            assert len(tail.recent) >= 123
            resume = {"Last-Event-ID": last_id} if last_id else {}  # what a browser sends reconnecting
            async with client.get(f"{base}/api/live", headers=resume) as stream:
                again, events, last_id = await sse_rows(stream)
            seen = {(row["partition"], row["offset"]) for row in first}
            assert not seen & {(row["partition"], row["offset"]) for row in again}
            assert len(again) == 120, (len(again), events)
            # Away for longer than the console holds rows (RECENT_ROWS): the rows it has, and the number
            # it no longer has, said (the page shows "N rows skipped").
            resume = {"Last-Event-ID": last_id} if last_id else {}
            produce(settings, topics.raw, RECENT_ROWS + 50)
            for _ in range(600):
                if tail.seq >= 123 + RECENT_ROWS + 50:
                    break
                await asyncio.sleep(0.1)
            async with client.get(f"{base}/api/live", headers=resume) as stream:
                rows, events, _ = await sse_rows(stream, until="dropped")
            assert len(rows) == RECENT_ROWS and events == ["ready:{}", "dropped:50"], (len(rows), events)
    finally:
        await server.close()


async def test_the_tail_says_the_broker_stopped_answering_and_follows_again_after(
    settings: Settings, topics: Topics, services: Services
) -> None:
    """A broker that answers nothing (a network partition, a long pause) left the tail saying "tailing": the
    overview looked healthy while no record could arrive. It now says Kafka's error, and once the broker
    answers again the records written meanwhile reach the page."""
    if not services.kafka_local:
        pytest.fail(
            "this test freezes the broker: run it with the local launcher (unset SENTPIPE_KAFKA_BOOTSTRAP)"
        )
    tail = Tail(settings)
    tail.start(asyncio.get_running_loop())
    try:
        sub = tail.subscribe()
        produce(settings, topics.raw, 1)
        assert await rows_until(sub, lambda row: True) is not None
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, services.freeze_kafka)
        try:
            for _ in range(600):  # 120 s at most
                if "Kafka" in tail.state:
                    break
                await asyncio.sleep(0.2)
            assert "Kafka" in tail.state, tail.state  # what the overview shows
            assert "KafkaError{" not in tail.state, tail.state  # a line for a person, not a repr
        finally:
            await loop.run_in_executor(None, services.thaw_kafka)
        await loop.run_in_executor(None, produce, settings, topics.raw, 2)
        row = await rows_until(sub, lambda row: row["subject"] == "msg-tail-1", 120)
        assert row is not None, f"no row after the broker came back; tail state {tail.state!r}"
    finally:
        await asyncio.get_running_loop().run_in_executor(None, tail.stop)


async def test_a_live_page_hears_that_the_console_cannot_read_kafka(settings: Settings) -> None:
    """With the broker unreachable the Live page said "live" and showed no rows, which read as no events
    coming in; only the overview's notes had the tail's error. The stream now says it (`kafka`)."""
    unreachable = settings.model_copy(
        update={"kafka_bootstrap": f"127.0.0.1:{free_port()}", "console_metrics_urls": []}
    )
    app = create_app(unreachable)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        base = f"http://127.0.0.1:{server.port}"
        async with ClientSession() as client, client.get(f"{base}/api/live") as stream:
            _, events, _ = await sse_rows(stream, until="kafka")
        said = orjson.loads(events[-1].removeprefix("kafka:"))["problem"]
        assert said and unreachable.kafka_bootstrap in said, events
        assert said == app[TAIL].problem
    finally:
        await server.close()


def test_a_last_event_id_of_any_form_is_an_answer_not_an_error(settings: Settings) -> None:
    """The header is the client's: one of this run with thousands of digits raised from int() (a 500)."""
    tail = Tail(settings)
    tail.seq = 5
    for seq in ("9" * 5000, "0" * 30 + "3", "-1", "3.0", "\u0663", "", "99999999999999999999"):
        assert tail.resumed(f"{tail.run_id}-{seq}") == ([], 0), seq
