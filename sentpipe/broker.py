"""The seam between the pipeline and Kafka: produce with a delivery report, consume a batch, commit.

Stages are written against these two small interfaces. `sentpipe.kafka` holds the librdkafka
implementations; `LocalBroker` here is an in-memory one with the same contract (tests/test_broker_contract.py
runs one suite against both), so routing, projection and dead-lettering are unit-tested without a broker.
Modelled on Sentry arroyo's LocalBroker.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from confluent_kafka import murmur2

Headers = Sequence[tuple[str, bytes]]
Partition = tuple[str, int]  # (topic, partition)


# librdkafka's reasons (lower-case names) that refuse the record itself: retrying it can never succeed.
RECORD_REFUSED = frozenset(
    {"msg_size_too_large", "invalid_msg_size", "invalid_msg", "invalid_record", "record_list_too_large"}
)


QUEUE_FULL = "local_queue_full"  # a record refused while the producer's local queue is full: send it later


class ProduceRejected(Exception):
    """The record was not (or not known to be) written; the caller answers 503 or retries."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    @property
    def temporary(self) -> bool:
        """True unless the broker refused this record for what it is (then it belongs in the DLQ)."""
        return self.reason not in RECORD_REFUSED


# A group member that does not poll for this long is dropped by its group: the commit of the batch in hand
# is refused and the batch is read again (librdkafka's default, set explicitly by `sentpipe.kafka`).
MAX_POLL_INTERVAL_S = 300.0


class Waiting(NamedTuple):
    """Records waiting in a partition, and the offset the next read of it starts from."""

    at: int
    records: int


class Delivered(NamedTuple):
    """Where the broker put an acknowledged record. (A tuple: one per record the ingress stores; a frozen
    dataclass costs three times as much to build.)"""

    topic: str
    partition: int
    offset: int


@dataclass(frozen=True, slots=True)
class Record:
    """One consumed record, detached from any client library."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...]
    timestamp_ms: int


def failed_future(exc: BaseException) -> asyncio.Future[Any]:
    """A future already failed with `exc`: a record refused before it was queued, waited for (and retried)
    with the rest of its batch instead of raising out of the loop that queues them."""
    fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    fut.set_exception(exc)
    return fut


class RecordProducer(Protocol):
    def produce(self, topic: str, key: bytes, value: bytes, headers: Headers) -> asyncio.Future[Delivered]:
        """Enqueue a record; the future settles with the broker's acknowledgement or ProduceRejected."""
        ...


class CommitRejected(Exception):
    """The group did not store a commit. `assignment_lost`: the partitions belong to another member now
    (a rebalance, a session that timed out), which reads from the last stored commit; retrying is useless.
    Otherwise the coordinator is unreachable or busy: retry."""

    def __init__(self, reason: str, *, assignment_lost: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.assignment_lost = assignment_lost


class BatchConsumer(Protocol):
    """A group member reading its assigned partitions. Blocking calls: run them in a thread."""

    # The group has given this member an assignment (perhaps empty) at least once.
    joined: bool

    def poll_batch(self, max_records: int, timeout_s: float) -> list[Record]:
        """Up to `max_records` records, waiting at most `timeout_s` for the first one."""
        ...

    def commit(self, offsets: Mapping[Partition, int]) -> None:
        """Durably store, for each partition, the offset of the next record to read. CommitRejected."""
        ...

    def rewind(self, records: Sequence[Record]) -> None:
        """Read these records again: each partition's position goes back to its first record here (a batch
        that failed as a whole must not be skipped by the next poll). Partitions no longer assigned are
        left alone: their new owner reads from the last commit."""
        ...

    def pause(self, partitions: Iterable[Partition]) -> None:
        """Read nothing more from these partitions (those assigned) until resume(); other partitions go on.
        A partition taken away by a rebalance forgets its pause."""
        ...

    def resume(self, partitions: Iterable[Partition]) -> None:
        """Read these partitions again, from their position (a rewind's offset, when rewound)."""
        ...

    def lag(self) -> dict[Partition, Waiting]:
        """Per assigned partition, where the next read starts and the records from there to the end (best
        effort). A partition rewound counts from where it was rewound to."""
        ...

    def close(self) -> None: ...


def next_offsets(records: Sequence[Record]) -> dict[Partition, int]:
    """The commit that acknowledges every record of a batch."""
    out: dict[Partition, int] = {}
    for rec in records:
        where = (rec.topic, rec.partition)
        out[where] = max(out.get(where, 0), rec.offset + 1)
    return out


def first_offsets(records: Sequence[Record]) -> dict[Partition, int]:
    """Where a batch begins in each partition: the offsets to read it again from."""
    out: dict[Partition, int] = {}
    for rec in records:
        where = (rec.topic, rec.partition)
        out[where] = min(out.get(where, rec.offset), rec.offset)
    return out


@dataclass
class _Topic:
    partitions: list[list[Record]]


@dataclass
class LocalBroker:
    """Topics, partitions and committed group offsets in memory; thread-safe like a real client."""

    topics: dict[str, _Topic] = field(default_factory=dict)
    committed: dict[tuple[str, Partition], int] = field(default_factory=dict)
    _lock: threading.Condition = field(default_factory=threading.Condition)
    # Test hook: the next N produce calls to a topic fail with this reason (a broker refusing a record).
    _reject: dict[str, list[str]] = field(default_factory=dict)

    def create_topic(self, name: str, partitions: int) -> None:
        with self._lock:
            self.topics.setdefault(name, _Topic([[] for _ in range(partitions)]))

    def reject_next(self, topic: str, reason: str, times: int = 1) -> None:
        with self._lock:
            self._reject.setdefault(topic, []).extend([reason] * times)

    def append(self, topic: str, key: bytes | None, value: bytes, headers: Headers) -> Delivered:
        with self._lock:
            if topic not in self.topics:
                raise ProduceRejected("unknown_topic_or_part")
            if self._reject.get(topic):
                raise ProduceRejected(self._reject[topic].pop(0))
            parts = self.topics[topic].partitions
            # Keyed records land where librdkafka's murmur2 partitioner (and Java's) puts them.
            p = murmur2(key, len(parts)) if key else sum(len(x) for x in parts) % len(parts)
            rec = Record(topic, p, len(parts[p]), key, value, tuple(headers), int(time.time() * 1000))
            parts[p].append(rec)
            self._lock.notify_all()
            return Delivered(topic, p, rec.offset)

    def records(self, topic: str) -> list[Record]:
        with self._lock:
            return [r for part in self.topics[topic].partitions for r in part]

    def producer(self) -> LocalProducer:
        return LocalProducer(self)

    def consumer(self, group: str, topics: Sequence[str]) -> LocalConsumer:
        return LocalConsumer(self, group, tuple(topics))


class LocalProducer:
    def __init__(self, broker: LocalBroker) -> None:
        self.broker = broker

    def produce(self, topic: str, key: bytes, value: bytes, headers: Headers) -> asyncio.Future[Delivered]:
        fut: asyncio.Future[Delivered] = asyncio.get_running_loop().create_future()
        try:
            fut.set_result(self.broker.append(topic, key, value, headers))
        except ProduceRejected as exc:
            fut.set_exception(exc)
        return fut


class LocalConsumer:
    """The only member of its group: every partition of its topics is assigned to it."""

    def __init__(self, broker: LocalBroker, group: str, topics: tuple[str, ...]) -> None:
        self.broker, self.group, self.topics = broker, group, topics
        self.position: dict[Partition, int] = {}
        self.paused: set[Partition] = set()
        self.joined = True  # the only member: nothing to wait for

    def _assigned(self) -> list[Partition]:
        return [
            (t, p)
            for t in self.topics
            if t in self.broker.topics
            for p in range(len(self.broker.topics[t].partitions))
        ]

    def _take(self, max_records: int) -> list[Record]:
        out: list[Record] = []
        for where in self._assigned():
            if where in self.paused:
                continue
            pos = self.position.setdefault(where, self.broker.committed.get((self.group, where), 0))
            part = self.broker.topics[where[0]].partitions[where[1]]
            chunk = part[pos : pos + max_records - len(out)]
            out += chunk
            self.position[where] = pos + len(chunk)
            if len(out) >= max_records:
                break
        return out

    def poll_batch(self, max_records: int, timeout_s: float) -> list[Record]:
        deadline = time.monotonic() + timeout_s
        with self.broker._lock:
            while True:
                batch = self._take(max_records)
                remaining = deadline - time.monotonic()
                if batch or remaining <= 0:
                    return batch
                self.broker._lock.wait(remaining)

    def commit(self, offsets: Mapping[Partition, int]) -> None:
        with self.broker._lock:
            for where, offset in offsets.items():
                self.broker.committed[(self.group, where)] = offset

    def rewind(self, records: Sequence[Record]) -> None:
        with self.broker._lock:
            for rec in records:
                where = (rec.topic, rec.partition)
                self.position[where] = min(self.position.get(where, rec.offset), rec.offset)

    def pause(self, partitions: Iterable[Partition]) -> None:
        with self.broker._lock:
            self.paused |= set(partitions) & set(self._assigned())

    def resume(self, partitions: Iterable[Partition]) -> None:
        with self.broker._lock:
            self.paused -= set(partitions)
            self.broker._lock.notify_all()

    def lag(self) -> dict[Partition, Waiting]:
        with self.broker._lock:
            out = {}
            for w in self._assigned():
                at = self.position.get(w, self.broker.committed.get((self.group, w), 0))
                out[w] = Waiting(at, len(self.broker.topics[w[0]].partitions[w[1]]) - at)
            return out

    def close(self) -> None:
        self.position.clear()
