"""Reading topics back in tests."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from confluent_kafka import Consumer, TopicPartition


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: dict[str, bytes]


def read_topic(
    bootstrap: str, topic: str, *, at_least: int = 0, timeout: float = 30.0, idle: float = 1.0
) -> list[Record]:
    """All of `topic` from the start: waits for `at_least` records, then until `idle` s pass quietly."""
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"test-reader-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "log_level": 0,
        }
    )
    md = c.list_topics(topic, timeout=10)
    c.assign([TopicPartition(topic, p, 0) for p in md.topics[topic].partitions])
    out: list[Record] = []
    deadline = time.monotonic() + timeout
    last = time.monotonic()
    try:
        while time.monotonic() < deadline:
            msg = c.poll(0.2)
            now = time.monotonic()
            if msg is None:
                if len(out) >= at_least and now - last >= idle:
                    break
                continue
            if msg.error():
                continue
            last = now
            out.append(
                Record(
                    msg.topic(),
                    msg.partition(),
                    msg.offset(),
                    msg.key(),
                    msg.value(),
                    {k: v for k, v in (msg.headers() or []) if v is not None},
                )
            )
    finally:
        c.close()
    return out


def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    """Partition -> high watermark (the offset the next record will get)."""
    c = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": f"test-ends-{uuid.uuid4().hex}", "log_level": 0}
    )
    try:
        md = c.list_topics(topic, timeout=10)
        return {
            p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in md.topics[topic].partitions
        }
    finally:
        c.close()
