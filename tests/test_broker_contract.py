"""One contract, two backends: the in-memory LocalBroker must behave like the real broker where it matters.

Each test runs against `LocalBroker` and against the real broker through `sentpipe.kafka` (per-test topics).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import confluent_kafka
import pytest
from confluent_kafka import KafkaError, murmur2
from confluent_kafka.admin import NewTopic  # type: ignore[attr-defined]

from sentpipe import metrics as m
from sentpipe.broker import BatchConsumer, LocalBroker, ProduceRejected, Record, RecordProducer, next_offsets
from sentpipe.kafka import (
    ALL_BROKERS_DOWN,
    DELIVERY_UNCONFIRMED,
    LOST_BROKERS_AFTER_S,
    LOST_BROKERS_PROBE_EVERY_S,
    AsyncProducer,
    BrokerUnavailable,
    Fenced,
    Producer,
    TransactionalProducer,
    admin_client,
    fatal_error,
    producer_config,
)
from sentpipe.kafka import BatchConsumer as KafkaBatchConsumer
from sentpipe.settings import Settings
from tests.kafka_tools import stop_report_thread, wait_topics_ready
from tests.processes import free_port
from tests.services import Services

PARTITIONS = 3


@dataclass
class Backend:
    name: str
    topic: str
    new_producer: object
    new_consumer: object

    def producer(self) -> RecordProducer:
        return self.new_producer()  # type: ignore[operator,no-any-return]

    def consumer(self, group: str) -> BatchConsumer:
        return self.new_consumer(group, [self.topic])  # type: ignore[operator,no-any-return]


@pytest.fixture(params=["local", "kafka"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    topic = f"contract-{uuid.uuid4().hex[:10]}"
    if request.param == "local":
        broker = LocalBroker()
        broker.create_topic(topic, PARTITIONS)
        yield Backend("local", topic, broker.producer, broker.consumer)
        return
    services: Services = request.getfixturevalue("services")
    s = Settings(kafka_bootstrap=services.kafka_bootstrap)
    admin = admin_client(s)
    admin.create_topics([NewTopic(topic, PARTITIONS, 1)])[topic].result(timeout=30)
    wait_topics_ready(services.kafka_bootstrap, [topic])
    consumers: list[KafkaBatchConsumer] = []

    def new_consumer(group: str, topics: list[str]) -> KafkaBatchConsumer:
        c = KafkaBatchConsumer(s, group, topics)
        consumers.append(c)
        return c

    def new_producer() -> AsyncProducer:
        # A broker under load (or just restarted by another test) may take seconds for a first write.
        return AsyncProducer.from_settings(s, delivery_timeout_s=30.0)

    yield Backend("kafka", topic, new_producer, new_consumer)
    for c in consumers:
        with contextlib.suppress(RuntimeError):  # closed by the test already
            c.close()
    admin.delete_topics([topic])


def poll_until(consumer: BatchConsumer, n: int, deadline_s: float = 30.0) -> list[Record]:
    """Records until `n` have arrived; a group join takes a few seconds on the real broker."""
    out: list[Record] = []
    deadline = time.monotonic() + deadline_s
    while len(out) < n and time.monotonic() < deadline:
        out += consumer.poll_batch(100, 0.5)
    assert len(out) == n, f"expected {n} records, got {len(out)}"
    return out


async def produce_all(producer: RecordProducer, topic: str, items: list[tuple[bytes, bytes]]) -> list[object]:
    return list(
        await asyncio.gather(*(producer.produce(topic, k, v, [("h", b"x"), ("k", k)]) for k, v in items))
    )


async def test_keyed_records_land_on_the_murmur2_partition_in_order(backend: Backend) -> None:
    producer = backend.producer()
    items = [(b"key-a", b"1"), (b"key-a", b"2"), (b"key-b", b"3"), (b"key-a", b"4")]
    delivered = await produce_all(producer, backend.topic, items)
    for (key, _), d in zip(items, delivered, strict=True):
        assert d.partition == murmur2(key, PARTITIONS)  # type: ignore[attr-defined]
    a_offsets = [d.offset for (k, _), d in zip(items, delivered, strict=True) if k == b"key-a"]  # type: ignore[attr-defined]
    assert a_offsets == sorted(a_offsets) and len(set(a_offsets)) == 3

    records = poll_until(backend.consumer(f"g-{uuid.uuid4().hex}"), len(items))
    a_values = [r.value for r in records if r.key == b"key-a"]
    assert a_values == [b"1", b"2", b"4"]  # order per key is kept
    for rec in records:
        assert dict(rec.headers) == {"h": b"x", "k": rec.key}
        assert rec.topic == backend.topic and rec.timestamp_ms > 0


async def test_a_group_resumes_after_its_commit_and_other_groups_start_over(backend: Backend) -> None:
    producer = backend.producer()
    await produce_all(producer, backend.topic, [(f"k{i}".encode(), f"v{i}".encode()) for i in range(10)])
    group = f"g-{uuid.uuid4().hex}"
    first = backend.consumer(group)
    records = poll_until(first, 10)
    done = [r for r in records if r.offset == 0]  # acknowledge only the first record of each partition
    first.commit(next_offsets(done))
    first.close()

    again = poll_until(backend.consumer(group), 10 - len(done))
    assert {(r.partition, r.offset) for r in again} == {(r.partition, r.offset) for r in records} - {
        (r.partition, r.offset) for r in done
    }
    assert len(poll_until(backend.consumer(f"other-{uuid.uuid4().hex}"), 10)) == 10


async def test_lag_covers_every_assigned_partition_read_from_or_not(backend: Backend) -> None:
    """librdkafka knows no position (and no watermarks) for a partition not read from since the
    assignment: the projector left it out, so its records were on no dashboard and in no stall."""
    producer = backend.producer()
    await produce_all(producer, backend.topic, [(f"k{i}".encode(), f"v{i}".encode()) for i in range(30)])
    group = f"g-{uuid.uuid4().hex}"
    first = backend.consumer(group)
    done = [r for r in poll_until(first, 30) if r.offset < 2]
    first.commit(next_offsets(done))
    first.close()
    consumer = backend.consumer(group)
    deadline = time.monotonic() + 30
    got: list[Record] = []
    while not got and time.monotonic() < deadline:
        got = consumer.poll_batch(1, 0.5)  # one record: one partition read from, the others not
    lag = consumer.lag()
    assert set(lag) == {(backend.topic, p) for p in range(PARTITIONS)}, lag
    assert sum(w.records for w in lag.values()) == 30 - len(done) - len(got), lag
    read = (got[0].topic, got[0].partition)
    assert lag[read].at == got[-1].offset + 1, lag
    committed = next_offsets(done)
    for where, waiting in lag.items():
        if where != read:
            assert waiting.at == committed.get(where, 0), lag  # where the group resumes it


async def test_lag_counts_a_rewound_partition_from_where_it_was_rewound_to(backend: Backend) -> None:
    """librdkafka has no position after a seek until a record is read again: the projector's watchdog lost
    the partition's offset, and a stall after a rewound batch said "stuck at start"."""
    producer = backend.producer()
    await produce_all(producer, backend.topic, [(f"k{i}".encode(), f"v{i}".encode()) for i in range(30)])
    consumer = backend.consumer(f"g-{uuid.uuid4().hex}")
    records = poll_until(consumer, 30)
    again = [r for r in records if r.offset >= 1]
    consumer.rewind(again)
    ends = next_offsets(records)
    for _ in range(2):  # the second read is answered from what the first learned
        lag = consumer.lag()
        assert set(lag) == {(backend.topic, p) for p in range(PARTITIONS)}, lag
        for where, waiting in lag.items():
            assert waiting.at == 1 and waiting.records == ends[where] - 1, lag


async def test_a_paused_partition_is_read_again_from_its_rewind_once_resumed(backend: Backend) -> None:
    """A held type's partitions are paused (the projector) while the other partitions are read on."""
    producer = backend.producer()
    await produce_all(producer, backend.topic, [(f"k{i}".encode(), f"v{i}".encode()) for i in range(30)])
    consumer = backend.consumer(f"g-{uuid.uuid4().hex}")
    records = poll_until(consumer, 30)
    held = (backend.topic, records[0].partition)
    consumer.pause([held])  # then rewound, as the projector does
    consumer.rewind([r for r in records if (r.topic, r.partition) == held])
    more = await produce_all(producer, backend.topic, [(f"n{i}".encode(), b"more") for i in range(30)])
    others = sum(1 for d in more if d.partition != held[1])  # type: ignore[attr-defined]
    polled = poll_until(consumer, others)
    assert all((r.topic, r.partition) != held for r in polled)
    assert consumer.poll_batch(100, 1.0) == []  # nothing more while paused
    consumer.resume([held])
    in_held = sum(1 for r in records if (r.topic, r.partition) == held) + len(more) - others
    again = poll_until(consumer, in_held)
    assert {(r.topic, r.partition) for r in again} == {held}
    assert sorted(r.offset for r in again) == list(range(in_held))


def test_a_pause_is_forgotten_when_a_rebalance_takes_the_partition_away(services: Services) -> None:
    """librdkafka kept the pause of a partition taken away and given back by a rebalance: whoever paused
    it need not know of the rebalance, and paused still, its records waited for good."""
    s = Settings(kafka_bootstrap=services.kafka_bootstrap)
    topic = f"contract-{uuid.uuid4().hex[:10]}"
    admin = admin_client(s)
    admin.create_topics([NewTopic(topic, PARTITIONS, 1)])[topic].result(timeout=30)
    wait_topics_ready(services.kafka_bootstrap, [topic])
    everything = {(topic, p) for p in range(PARTITIONS)}
    group = f"g-{uuid.uuid4().hex}"
    first = KafkaBatchConsumer(s, group, [topic])
    try:
        _poll_while(first, lambda: not first.joined)
        first.pause(everything)
        second = KafkaBatchConsumer(s, group, [topic])
        try:
            _poll_while(first, lambda: not second.joined or len(first._assigned) == PARTITIONS, second)
        finally:
            second.close()
        _poll_while(first, lambda: first._assigned != everything)
        producer = confluent_kafka.Producer(producer_config(s))
        for p in range(PARTITIONS):
            producer.produce(topic, b"v", key=f"k{p}".encode(), partition=p)
        assert producer.flush(30) == 0
        got = poll_until(first, PARTITIONS)
        assert {(r.topic, r.partition) for r in got} == everything
    finally:
        first.close()
        admin.delete_topics([topic])


def _poll_while(
    consumer: KafkaBatchConsumer, waiting: object, other: KafkaBatchConsumer | None = None
) -> None:
    """Poll (both members) while `waiting()`: rebalances happen inside polls."""
    deadline = time.monotonic() + 60
    while waiting() and time.monotonic() < deadline:  # type: ignore[operator]
        consumer.poll_batch(10, 0.2)
        if other is not None:
            other.poll_batch(10, 0.2)
    assert not waiting(), "the group did not settle in 60 s"  # type: ignore[operator]


async def test_an_empty_poll_returns_nothing_after_the_timeout(backend: Backend) -> None:
    consumer = backend.consumer(f"g-{uuid.uuid4().hex}")
    assert consumer.poll_batch(10, 0.3) == []


async def test_produce_to_a_missing_topic_fails_its_future(backend: Backend) -> None:
    producer = backend.producer()
    fut = producer.produce(f"missing-{uuid.uuid4().hex}", b"k", b"v", [])
    with pytest.raises(ProduceRejected):
        await asyncio.wait_for(fut, 60)


def test_next_offsets_acknowledges_the_highest_offset_per_partition() -> None:
    recs = [Record("t", p, o, None, b"", (), 0) for p, o in ((0, 3), (0, 5), (1, 0), (0, 4))]
    assert next_offsets(recs) == {("t", 0): 6, ("t", 1): 1}


# --- the producer's callback face (replay and redrive) ----------------------------------------------------
def test_the_callback_producer_reports_each_delivery_and_flush_waits_for_all(services: Services) -> None:
    s = Settings(kafka_bootstrap=services.kafka_bootstrap)
    topic = f"contract-sync-{uuid.uuid4().hex[:10]}"
    admin = admin_client(s)
    admin.create_topics([NewTopic(topic, PARTITIONS, 1)])[topic].result(timeout=30)
    outcomes: list[object] = []
    producer = Producer.from_settings(s)
    for i in range(50):
        producer.send(topic, f"k{i}".encode(), b"v", [("h", b"x")], outcomes.append)
    producer.flush()
    assert outcomes == [None] * 50
    assert len(poll_until(KafkaBatchConsumer(s, f"g-{uuid.uuid4().hex}", [topic]), 50)) == 50


def test_the_callback_producer_reports_undelivered_records_and_flush_never_hangs() -> None:
    s = Settings(kafka_bootstrap=f"127.0.0.1:{free_port()}")
    outcomes: list[KafkaError | None] = []
    producer = Producer.from_settings(s, delivery_timeout_s=1.0)
    producer.send("anything", b"k", b"v", [], outcomes.append)
    producer.flush(timeout_s=10.0)  # the record timed out: its callback says so, nothing is left
    assert len(outcomes) == 1 and outcomes[0] is not None and outcomes[0].code() == KafkaError._MSG_TIMED_OUT

    slow = Producer.from_settings(s, delivery_timeout_s=60.0)
    slow.send("anything", b"k", b"v", [], outcomes.append)
    # librdkafka queues its reports of the failed connects meanwhile, and its queue length counts them: a
    # full run of the suite once said "2 record(s) not acknowledged" of this one record.
    time.sleep(1.0)
    assert slow.pending == 1
    with pytest.raises(BrokerUnavailable, match=r"1 record\(s\) not acknowledged by Kafka at 127\.0\.0\.1:"):
        slow.flush(timeout_s=1.0)


def test_the_async_producer_sleeps_while_its_records_wait() -> None:
    """Records in flight must not keep the event loop busy: under uvloop (what the ingress runs on) a tick
    shorter than 1 ms ran as call_soon and spun the loop at 100% of a core whatever the load. The loop
    thread's own CPU time over a second with a record that is never acknowledged (a broker that accepts the
    connection and says nothing) is what would show it; the bound is loose, a spinning loop uses the whole
    second."""
    import uvloop

    async def scenario() -> float:
        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read(-1)

        mute = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = mute.sockets[0].getsockname()[1]
        producer = AsyncProducer.from_settings(
            Settings(kafka_bootstrap=f"127.0.0.1:{port}"), delivery_timeout_s=30
        )
        await producer.start()
        try:
            pending = producer.produce("anything", b"k", b"v", [])
            cpu0 = time.thread_time()
            await asyncio.sleep(1.0)
            used = time.thread_time() - cpu0
            assert not pending.done()
            return used
        finally:
            await producer.close(timeout=0.1)
            mute.close()

    assert uvloop.run(scenario()) < 0.25


@contextlib.asynccontextmanager
async def producer_and_topic(
    services: Services, name: str, delivery_timeout_s: float
) -> AsyncIterator[tuple[AsyncProducer, str]]:
    """A started AsyncProducer on the real broker and a new one-partition topic; closed afterwards."""
    s = Settings(kafka_bootstrap=services.kafka_bootstrap)
    topic = f"contract-{name}-{uuid.uuid4().hex[:10]}"
    admin = admin_client(s)  # held: a collected admin client fails its pending futures
    admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(timeout=30)
    producer = AsyncProducer.from_settings(s, delivery_timeout_s=delivery_timeout_s)
    await producer.start()
    try:
        yield producer, topic
    finally:
        await producer.close()


async def test_the_async_producer_settles_futures_on_the_loop_thread(services: Services) -> None:
    """Reports are served by the producer's own thread; the futures must still be settled on the loop's.
    In debug mode the loop refuses call_soon from another thread, so a future settled there would never
    run its done callbacks."""
    asyncio.get_running_loop().set_debug(True)
    async with producer_and_topic(services, "async", delivery_timeout_s=30) as (producer, topic):
        fut = producer.produce(topic, b"k", b"v", [])
        called_back: list[object] = []
        fut.add_done_callback(called_back.append)
        delivered = await asyncio.wait_for(fut, 10)
        assert delivered.topic == topic and delivered.offset == 0
        assert called_back == [fut]


async def test_the_async_producer_says_how_long_records_wait_without_a_report(services: Services) -> None:
    """`stalled_s` (what the ingress's liveness reads): zero with nothing waiting; the time since the last
    report while records wait; back to zero once the report comes (a failure is a report too); infinite
    once the report thread is gone."""
    async with producer_and_topic(services, "stall", delivery_timeout_s=2) as (producer, topic):
        assert producer.stalled_s() == 0.0
        await asyncio.wait_for(producer.produce(topic, b"k", b"v", []), 10)
        assert producer.stalled_s() == 0.0
        # A topic that does not exist: librdkafka holds the record until its delivery timeout, then fails it.
        waiting = producer.produce(f"{topic}-missing", b"k", b"v", [])
        await asyncio.sleep(0.5)
        assert 0.4 <= producer.stalled_s() < 10
        with pytest.raises(ProduceRejected):
            await asyncio.wait_for(waiting, 10)
        assert producer.stalled_s() == 0.0
        stop_report_thread(producer)
        assert producer.stalled_s() == float("inf")
        # Reports are still served, on the loop's sweep, until the process that lost its thread stops.
        await asyncio.wait_for(producer.produce(topic, b"k", b"v", []), 10)
        assert producer.stalled_s() == float("inf")
    assert producer.stalled_s() == 0.0  # closed: not running, nothing waiting


class _LostBrokers(AsyncProducer):
    """librdkafka's lost broker list (seen after 2 of 11 broker restarts in an audit) cannot be made on
    demand. Its first client is pointed at a closed port instead, which is the same state as far as the
    producer can tell: every broker down, for good, while the bootstrap servers answer a new client."""

    def __init__(self, config: dict[str, object]) -> None:
        self._first = True
        super().__init__(config)

    def _new_client(self) -> confluent_kafka.Producer:
        if not self._first:
            return super()._new_client()
        self._first = False
        nowhere = {**self._config, "bootstrap.servers": f"127.0.0.1:{free_port()}"}
        return confluent_kafka.Producer({**nowhere, "error_cb": self._on_error, "log_level": 0})


async def test_a_producer_whose_client_lost_its_brokers_is_replaced_while_the_cluster_answers(
    services: Services,
) -> None:
    """The ingress stayed "all brokers down" for 5 min with the broker back (every delivery spooled, the
    spool never drained): its producer's client had no broker left to connect to."""
    s = Settings(kafka_bootstrap=services.kafka_bootstrap)
    topic = f"contract-lost-{uuid.uuid4().hex[:10]}"
    admin = admin_client(s)
    admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(timeout=30)
    producer = _LostBrokers(producer_config(s, delivery_timeout_s=60.0))
    await producer.start()
    try:
        waiting = producer.produce(topic, b"k", b"before", [])
        deadline = time.monotonic() + 30
        while producer.unavailable != ALL_BROKERS_DOWN:
            assert time.monotonic() < deadline, "the closed port was never reported down"
            await asyncio.sleep(0.1)
        deadline = time.monotonic() + LOST_BROKERS_AFTER_S + 3 * LOST_BROKERS_PROBE_EVERY_S + 10
        while producer.unavailable is not None:
            assert time.monotonic() < deadline, "the producer still reaches no broker"
            await asyncio.sleep(0.2)
        assert producer.recreated == 1
        with pytest.raises(ProduceRejected):  # the replaced client's record failed: never acknowledged
            await asyncio.wait_for(waiting, 10)
        delivered = await asyncio.wait_for(producer.produce(topic, b"k", b"after", []), 30)
        assert delivered.topic == topic
    finally:
        await producer.close()
        admin.delete_topics([topic])


def test_a_replaced_producer_let_go_with_records_unreported_stops_counting_them() -> None:
    """Accounting only (a stand-in for the replaced librdkafka producer): when its grace runs out with
    records it never reported, they stop counting as waiting, or an idle ingress would look hung forever."""

    class Unreported:
        def poll(self, timeout: float) -> int:
            return 0

        def __len__(self) -> int:
            return 2

    producer = AsyncProducer({"bootstrap.servers": "127.0.0.1:1"})
    producer._retired = [(Unreported(), time.monotonic() - 1)]  # type: ignore[list-item]
    producer._in_flight = 2
    producer._progress_at = time.monotonic() - 100
    assert producer.stalled_s() > 99
    producer._poll()
    assert producer._retired == [] and producer.stalled_s() == 0.0


class _Report:
    """A stand-in for the librdkafka message of a delivery report (accounting only)."""

    def __init__(self, offset: int | None) -> None:
        self._offset = offset

    def topic(self) -> str:
        return "t"

    def partition(self) -> int:
        return 1

    def offset(self) -> int | None:
        return self._offset


async def test_a_delivery_reported_without_an_offset_fails_so_its_record_is_sent_again() -> None:
    """librdkafka reported four records of one batch delivered during a broker restart, three of them with
    no offset, and only one reached the topic: the spool deleted the other three, answered 200. A success
    naming no offset is not proof the record is stored, so it fails (a temporary failure: sent again)."""
    producer = AsyncProducer({"bootstrap.servers": "127.0.0.1:1"})
    loop = asyncio.get_running_loop()
    stored, unconfirmed = loop.create_future(), loop.create_future()
    before = m.PRODUCER_UNCONFIRMED._value.get()
    producer._in_flight = 2
    producer._reports.extend([(stored, None, _Report(7)), (unconfirmed, None, _Report(None))])  # type: ignore[list-item]
    producer._settle()
    assert stored.result() == ("t", 1, 7)
    with pytest.raises(ProduceRejected) as exc:
        unconfirmed.result()
    assert exc.value.reason == DELIVERY_UNCONFIRMED and exc.value.temporary
    assert m.PRODUCER_UNCONFIRMED._value.get() == before + 1
    assert producer._in_flight == 0


def test_the_callback_producer_reports_a_delivery_without_an_offset_as_failed() -> None:
    """The same rule for `Producer.send`'s callers (replay, redrive): they count it failed, not produced."""
    producer = Producer({"bootstrap.servers": "127.0.0.1:1"})
    reports: list[Any] = []  # what librdkafka would call with each record's delivery report

    def enqueue(topic: str, key: bytes, value: bytes, headers: object, on_delivery: Any) -> None:
        reports.append(on_delivery)

    producer._enqueue = enqueue  # type: ignore[assignment,method-assign]
    outcomes: list[KafkaError | None] = []
    producer.send("t", b"k", b"v", [], outcomes.append)
    producer.send("t", b"k", b"v", [], outcomes.append)
    reports[0](None, _Report(None))
    reports[1](None, _Report(3))
    assert [None if e is None else e.code() for e in outcomes] == [KafkaError._NO_OFFSET, None]


def test_a_fenced_transactional_producer_says_fenced_wherever_it_learns_it(services: Services) -> None:
    """confluent-kafka raises a fatal error from poll or flush instead of giving it to error_cb, and its
    flush serves further delivery reports with that error pending: a report callback that catches an
    exception of its own (logging does) loses it, and flush raised "returned NULL without setting an
    exception". A fenced redrive then ended with that line instead of saying another had taken over, and a
    send refused with `_fatal` did the same. Each is Fenced now, whichever call learns it first."""
    s = Settings(kafka_bootstrap=services.kafka_bootstrap)
    topic = f"contract-fenced-{uuid.uuid4().hex[:10]}"
    admin = admin_client(s)
    admin.create_topics([NewTopic(topic, PARTITIONS, 1)])[topic].result(timeout=30)
    wait_topics_ready(s.kafka_bootstrap, [topic])
    tid = f"contract-{uuid.uuid4().hex}"
    outcomes: list[KafkaError | None] = []

    def report(err: KafkaError | None) -> None:
        with contextlib.suppress(KeyError):  # an exception raised and caught, as in logging's own code
            {}[err]
        outcomes.append(err)

    old = TransactionalProducer.transactional(s, tid, delivery_timeout_s=30, transaction_timeout_s=60)
    old.begin(30)
    for i in range(200):
        old.send(topic, f"k{i}".encode(), b"v", [], report)
    old.flush()
    new = TransactionalProducer.transactional(s, tid, delivery_timeout_s=30, transaction_timeout_s=60)
    new.begin(30)  # fences `old`: what it had open is aborted, its later writes refused
    with pytest.raises(Fenced):
        for i in range(200):
            old.send(topic, f"later{i}".encode(), b"v", [], report)
        old.flush()
    with pytest.raises(Fenced):
        old.send(topic, b"after", b"v", [], report)  # refused before it is sent: `_fatal`
    new.commit(30)


def test_the_fatal_error_is_found_through_a_system_error_and_a_looping_chain_ends() -> None:
    """confluent-kafka's fatal error comes out as the cause of a SystemError when a report was served after
    it; a chain that loops (set by hand: `raise a from b` with b caused by a) ends the search instead of
    spinning the report thread."""
    fatal = KafkaError(KafkaError._FATAL, "fenced", fatal=True)
    wrapped = SystemError("a result with an exception set")
    wrapped.__cause__ = confluent_kafka.KafkaException(fatal)
    assert fatal_error(wrapped) is fatal
    a, b = ValueError("a"), ValueError("b")
    a.__cause__, b.__cause__ = b, a
    assert fatal_error(a) is None
    assert fatal_error(confluent_kafka.KafkaException(KafkaError(KafkaError._TRANSPORT, "down"))) is None
