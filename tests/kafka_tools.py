"""Reading topics back in tests: exactly the records a topic holds, as its watermarks say, not "until quiet".

A topic's high watermark is the offset its next record will get, its low watermark the first one kept, so
`high - low` per partition is how many records exist (for a topic that is neither compacted nor written
in transactions, which is every topic sentpipe consumes; the dedup changelog is compacted, but not while
a test runs). A reader takes the watermarks first and then reads every partition up to them: no waiting
for silence, no missing a record that is late, no counting one that came after.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

from sentpipe.kafka import AsyncProducer, committed_offsets, message_headers
from sentpipe.processors.offsets import LEADER_MOVE_RETRY_S, LEADER_MOVING
from sentpipe.settings import Settings


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: dict[str, bytes]
    timestamp_ms: int = 0


def _consumer(bootstrap: str, purpose: str) -> Consumer:
    return Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"test-{purpose}-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": True,
            "log_level": 0,
        }
    )


def _watermarks(c: Consumer, topic: str) -> dict[int, tuple[int, int]]:
    md = c.list_topics(topic, timeout=10)
    meta = md.topics.get(topic)
    if meta is None or meta.error is not None:
        return {}  # not created (yet): no records
    return {p: _watermark(c, TopicPartition(topic, p)) for p in meta.partitions}


def _watermark(c: Consumer, tp: TopicPartition, timeout: float = 30.0) -> tuple[int, int]:
    """Asked again while the partition has no leader (a topic created a moment before, a broker that just
    restarted): librdkafka answers NOT_LEADER_FOR_PARTITION at once, and a test asking for lag failed."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return cast(tuple[int, int], c.get_watermark_offsets(tp, timeout=10, cached=False))
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            if (
                not (isinstance(err, KafkaError) and err.code() in LEADER_MOVING)
                or time.monotonic() > deadline
            ):
                raise
        time.sleep(LEADER_MOVE_RETRY_S)


def watermarks(bootstrap: str, topic: str) -> dict[int, tuple[int, int]]:
    """Partition -> (low, high) watermark; {} for a topic that does not exist."""
    c = _consumer(bootstrap, "marks")
    try:
        return _watermarks(c, topic)
    finally:
        c.close()


def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    """Partition -> high watermark (the offset the next record will get)."""
    return {p: high for p, (_, high) in watermarks(bootstrap, topic).items()}


def holds_records(bootstrap: str, topic: str, partition: int, start: int, end: int) -> bool:
    """Whether offsets [start, end) of a partition hold a record a read-committed reader gets: a redrive's
    transactions leave commit markers (and aborted records), offsets no consumer is given or commits past."""
    c = _consumer(bootstrap, "holds")
    try:
        c.assign([TopicPartition(topic, partition, start)])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            msg = c.poll(0.5)
            if msg is None:
                continue
            if msg.error() is not None:
                if msg.error().code() == KafkaError._PARTITION_EOF:
                    return False
                continue
            return (msg.offset() or 0) < end
        raise AssertionError(f"{topic}[{partition}]: offsets {start}..{end - 1} not read within 30 s")
    finally:
        c.close()


def record_count(bootstrap: str, topic: str) -> int:
    """How many records `topic` holds right now, from its watermarks."""
    return sum(high - low for low, high in watermarks(bootstrap, topic).values())


def read_topic(
    bootstrap: str,
    topic: str,
    *,
    at_least: int = 0,
    timeout: float = 30.0,
    idle: float | None = None,
) -> list[Record]:
    """Every record of `topic` up to its end offsets as they are when reading starts (later ones are not
    read). With `at_least`, first waits until the watermarks count that many records, failing with the
    count if they do not within `timeout`. `idle` is ignored: kept for callers written for the old reader,
    which read until nothing had come for `idle` seconds."""
    del idle
    c = _consumer(bootstrap, "reader")
    try:
        deadline = time.monotonic() + timeout
        marks: dict[int, tuple[int, int]] = {}
        last_error: Exception | None = None
        while True:
            try:
                marks = _watermarks(c, topic)
                last_error = None
            except KafkaException as exc:  # the broker may be on its way back in a chaos test
                last_error = exc
            have = sum(high - low for low, high in marks.values())
            if last_error is None and have >= at_least:
                break
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"{topic}: {have} record(s) by its watermarks {marks} after {timeout}s,"
                    f" expected at least {at_least}" + (f"; last error: {last_error!r}" if last_error else "")
                ) from last_error
            time.sleep(0.2)
        return _read_up_to(c, topic, marks, max(timeout, 30.0))
    finally:
        c.close()


def _read_up_to(c: Consumer, topic: str, marks: dict[int, tuple[int, int]], timeout: float) -> list[Record]:
    ends = {p: high for p, (low, high) in marks.items() if high > low}
    if not ends:
        return []
    c.assign([TopicPartition(topic, p, marks[p][0]) for p in ends])
    out: list[Record] = []
    deadline = time.monotonic() + timeout
    last_error: KafkaError | None = None
    while ends:
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"{topic}: could not read up to the end offsets {marks} in {timeout}s; partitions not"
                f" finished: {ends}; read {len(out)} record(s); last error: {last_error}"
            )
        msg = c.poll(0.5)
        if msg is None:
            continue
        err = msg.error()
        if err is not None:
            # Reaching the end of a partition is an event too; it also covers offsets a compaction removed.
            if err.code() == KafkaError._PARTITION_EOF and msg.offset() >= ends.get(msg.partition(), 0):
                ends.pop(msg.partition(), None)
            elif err.code() != KafkaError._PARTITION_EOF:
                last_error = err
            continue
        p, offset = msg.partition(), msg.offset()
        if p not in ends or offset >= ends[p]:
            continue  # written after the watermarks were taken
        _, ts = msg.timestamp()
        out.append(
            Record(
                msg.topic(),
                p,
                offset,
                msg.key(),
                msg.value(),
                dict(message_headers(msg)),
                ts,
            )
        )
        if offset + 1 >= ends[p]:
            del ends[p]
    out.sort(key=lambda r: (r.partition, r.offset))
    return out


def wait_topics_ready(bootstrap: str, topics: list[str], timeout: float = 120.0) -> None:
    """Until every partition of `topics` has a leader and a full in-sync replica set.

    A topic created moments ago (or on a broker the previous test restarted) is listed before its
    partitions can take writes; a test that produces at once would see its first records time out.
    """
    c = _consumer(bootstrap, "ready")
    try:
        deadline = time.monotonic() + timeout
        while True:
            md = c.list_topics(timeout=10)
            waiting = [
                name
                for name in topics
                if (t := md.topics.get(name)) is None
                or t.error is not None
                or not t.partitions
                or any(p.leader < 0 or not p.isrs for p in t.partitions.values())
            ]
            if not waiting:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"topics without a leader after {timeout:.0f}s: {waiting}")
            time.sleep(0.2)
    finally:
        c.close()


def delete_topics(
    bootstrap: str, prefixes: Sequence[str], groups: Sequence[str] = (), timeout: float = 10
) -> None:
    """Best effort: each partition holds open files on the broker, and one broker serves a whole test run
    (a local one many runs): topics left behind add up to its open-file limit."""
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
    with contextlib.suppress(Exception):
        names = [t for t in admin.list_topics(timeout=timeout).topics if t.startswith(tuple(prefixes))]
        if names:
            for fut in admin.delete_topics(names, operation_timeout=timeout).values():
                with contextlib.suppress(Exception):
                    fut.result(timeout=timeout)
    if groups:
        with contextlib.suppress(Exception):
            for fut in admin.delete_consumer_groups(list(groups), request_timeout=timeout).values():
                with contextlib.suppress(Exception):
                    fut.result(timeout=timeout)


def stop_report_thread(producer: AsyncProducer) -> None:
    """Fault injection: the report thread ends (as if it had died) while the producer keeps running."""
    producer._running = False
    assert producer._reporter is not None
    producer._reporter.join(5)
    assert not producer._reporter.is_alive()
    producer._running = True


def group_offsets(
    bootstrap: str, group: str, topics: Sequence[str] | None = None
) -> dict[tuple[str, int], int]:
    """`group`'s committed offsets on `topics` (every topic there is: None), through sentpipe's reader.
    Never the admin API's: librdkafka crashes on it while a restarted broker's coordinator loads."""
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
    listed = admin.list_topics(timeout=10).topics
    tps = [
        TopicPartition(t, p)
        for t in (listed if topics is None else topics)
        if t in listed
        for p in listed[t].partitions
    ]
    found = committed_offsets(Settings(kafka_bootstrap=bootstrap), group, tps, 10.0)
    return {(tp.topic, tp.partition): tp.offset for tp in found if tp.error is None and tp.offset >= 0}
