"""The router's settling of a batch against the real broker: a record refused before it is queued, a batch
that fails to settle, a lag check that meets a rebalance, and a record the broker refuses for what it is.
The router is the worker's own (`create_app`), driven batch by batch as its agent drives it."""

from __future__ import annotations

import asyncio
import base64
import os
import time
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from aiokafka.errors import IllegalStateError
from confluent_kafka import Producer
from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewTopic,
    ResourceType,  # type: ignore[attr-defined]
)
from faust.types import TP

from sentpipe.processors import worker
from sentpipe.processors.dedup import partition_of, table_key
from sentpipe.processors.worker import PIPELINE_DEPTH, create_app
from sentpipe.schemas import routing as r
from sentpipe.schemas.events import frame
from sentpipe.schemas.samples import SampleFactory
from sentpipe.schemas.topics import Topics
from sentpipe.settings import Settings
from tests.kafka_tools import read_topic, wait_topics_ready
from tests.test_gap_repair import _commit

PARTITION = 1


class _Event:
    """A raw record as Faust's stream hands it to the agent."""

    def __init__(self, topic: str, offset: int, key: bytes, value: bytes, headers: list[tuple[str, bytes]]):
        self.message = self
        self.topic, self.partition, self.offset = topic, PARTITION, offset
        self.key, self.value, self.headers = key, value, headers
        self.timestamp = None
        self.acked = False


def _raw(body: bytes, webhook_id: str, tenant: str = "acme") -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    headers = r.raw_headers(
        tenant=tenant,
        received_at_ms=1_761_905_442_000,
        webhook_id=webhook_id,
        request_id="q",
        event_type=None,
    )
    return frame(body, webhook_id=webhook_id).event_id.encode(), body, headers


def _write_raw(s: Settings, records: list[tuple[bytes, bytes, list[tuple[str, bytes]]]]) -> list[_Event]:
    """The records on raw[PARTITION] (a router reads back what it lost from there), as stream events."""
    topic = Topics(s.topic_prefix).raw
    p = Producer({"bootstrap.servers": s.kafka_bootstrap, "enable.idempotence": True})
    offsets: list[int] = []
    for key, value, headers in records:
        p.produce(
            topic,
            value,
            key,
            PARTITION,
            headers=headers,
            on_delivery=lambda err, msg: offsets.append(msg.offset()),
        )
        assert p.flush(30) == 0  # one at a time: offsets in order
    return [_Event(topic, o, k, v, h) for o, (k, v, h) in zip(offsets, records, strict=True)]


def _router(s: Settings) -> Any:
    router: Any = create_app(s, role="route").sentpipe  # type: ignore[attr-defined]
    admin = AdminClient({"bootstrap.servers": s.kafka_bootstrap})
    if router._changelog not in admin.list_topics(timeout=30).topics:
        for done in admin.create_topics([NewTopic(router._changelog, s.raw_partitions, 1)]).values():
            done.result(30)  # Faust creates it when the worker starts; here the router runs alone
    wait_topics_ready(s.kafka_bootstrap, [router._changelog])
    # Faust's bookkeeping of the partition, as `settled` (the agent's ack) keeps it.
    consumer = router.app.consumer
    consumer.assignment = lambda: {TP(Topics(s.topic_prefix).raw, PARTITION)}
    return router


def _ack(router: Any, acked: list[int]) -> Any:
    tp = TP(router.topics.raw, PARTITION)

    async def settled(events: Any) -> None:
        offsets = [e.message.offset for e in events]
        acked.extend(offsets)
        router.app.consumer._acked[tp].extend(offsets)
        router.app.consumer._acked_index[tp].update(offsets)

    return settled


def _settle_one(router: Any, events: list[_Event], acked: list[int]) -> None:
    """Route one batch and wait for it to settle, acks into `acked`."""

    async def go() -> None:
        await router.producer.start()
        try:
            await (await router.dispatch(events, _ack(router, acked)))
        finally:
            await router.producer.close()

    asyncio.run(go())


def _bodies(n: int, seed: int) -> list[tuple[bytes, bytes, list[tuple[str, bytes]]]]:
    samples = SampleFactory(seed).mix(n, "mixed")
    return [_raw(sample.body, f"w-{seed}-{i}") for i, sample in enumerate(samples)]


def test_a_full_local_queue_is_waited_out_not_an_agent_crash(settings: Settings) -> None:
    """librdkafka refuses a record at once when its local queue is full (a backlog drain with large batches
    or bodies): raised out of `dispatch`, it crashed the agent, left a pipeline slot taken for good (four of
    them and the router waited forever) and the batch unrouted. Now it is retried with its batch."""
    s = settings.model_copy(update={"producer_max_in_flight": 5, "retry_initial_s": 0.05})
    records = _bodies(40, 1)
    events = _write_raw(s, records)
    router = _router(s)
    acked: list[int] = []
    _settle_one(router, events, acked)
    assert acked == [e.offset for e in events]
    assert router._room._value == PIPELINE_DEPTH
    assert router.processed[(router.topics.raw, PARTITION)] == events[-1].offset + 1
    routed = sum(len(read_topic(s.kafka_bootstrap, t, idle=1.0)) for t in router.topics.routed)
    assert routed == len(events)


def test_a_batch_that_failed_to_settle_is_routed_again(settings: Settings) -> None:
    """A batch whose settling failed while the worker ran (its ack raised) was never routed again: the
    stream does not deliver it twice, so its offsets were never acked and Faust's commit stood there for
    good, while lag and the watchdog (which follow settled batches) said all was well. The next batch of
    the partition now reads it back."""
    # The group committed at 1 (Faust takes a commit of 0 for none, and would commit past anything).
    filler = _write_raw(settings, [(b"filler", b"{}", [])])
    _commit(settings, settings.app_id, filler[0].topic, PARTITION, filler[0].offset + 1)
    records = _bodies(20, 2)
    events = _write_raw(settings, records)
    first, second = events[:10], events[10:]
    router = _router(settings)
    acked: list[int] = []
    ack = _ack(router, acked)
    failed: list[int] = []

    async def ack_fails_once(evs: Any) -> None:
        if not failed:
            failed.append(1)
            raise RuntimeError("the ack failed")
        await ack(evs)

    async def go() -> None:
        await router.producer.start()
        try:
            settling = await router.dispatch(first, ack_fails_once)
            with pytest.raises(RuntimeError):
                await settling
            await (await router.dispatch(second, ack_fails_once))
        finally:
            await router.producer.close()

    tp = TP(router.topics.raw, PARTITION)
    router.app.consumer._committed_offset[tp] = first[0].offset
    assert first[0].offset > 0
    asyncio.run(go())
    assert router.processed[(router.topics.raw, PARTITION)] == second[-1].offset + 1
    # What Faust commits next: past both batches (the first one's offsets given as a settled gap).
    assert router.app.consumer._new_offset(tp) == second[-1].offset + 1
    assert acked == [e.offset for e in second]
    routed = [
        rec.key for t in router.topics.routed for rec in read_topic(settings.kafka_bootstrap, t, idle=1.0)
    ]
    assert len(routed) == len(records)  # each once: the first batch's marks held when it was read back
    assert all("acme" in router._lookup(table_key(key), {}) for key, _, _ in records)
    assert router._rewinds == 0  # the backoff starts over once a batch settles


def test_a_failed_batch_with_none_after_it_is_sought_back_by_the_lag_check(settings: Settings) -> None:
    """Traffic stopped after a batch that failed to settle: only the next batch rewound, so the lag check
    took every record for one with the router, settling, and nothing routed them until traffic came."""
    events = _write_raw(settings, _bodies(5, 5))
    router = _router(settings)
    where = (router.topics.raw, PARTITION)

    async def ack_fails(_: Any) -> None:
        raise RuntimeError("the ack failed")

    async def go() -> None:
        await router.producer.start()
        try:
            with pytest.raises(RuntimeError):
                await (await router.dispatch(events, ack_fails))
        finally:
            await router.producer.close()

    asyncio.run(go())
    end = events[-1].offset + 1
    assert (router.processed[where], router.dispatched[where]) == (events[0].offset, end)
    consumer = router.app.consumer
    consumer.highwater = lambda _tp: end
    router._held_back = lambda: None
    sought: list[tuple[Any, int]] = []

    async def position(_tp: Any) -> int:
        return end  # the stream fetched them all

    async def seek(tp: Any, offset: int) -> None:
        sought.append((tp, offset))

    consumer.position, consumer.seek = position, seek
    for _ in range(3):  # three unmoved checks, then the seek
        asyncio.run(router.report_lag())
    assert sought == [(TP(*where), events[0].offset)]


def test_a_lag_check_that_meets_a_rebalance_does_not_end_the_worker(settings: Settings) -> None:
    """aiokafka's position() raises IllegalStateError for a partition revoked since the assignment was read:
    raised out of the lag timer, it ended the whole worker in the middle of a rolling deploy."""
    router = _router(settings)
    tp = TP(router.topics.raw, PARTITION)
    consumer = router.app.consumer
    consumer.highwater = lambda _tp: 100
    router.processed[(tp.topic, tp.partition)] = 10
    router.dispatched[(tp.topic, tp.partition)] = 10
    router._held_back = lambda: None
    asked: list[Any] = []

    async def position(where: Any) -> int:
        asked.append(where)
        raise IllegalStateError(f"Partition {where} is not assigned")

    consumer.position = position
    for _ in range(4):  # the third unmoved check asks where the consumer stands
        waiting = asyncio.run(router.report_lag())
        assert waiting == {(tp.topic, tp.partition): 90}
    assert asked, "the check never asked the consumer's position: the test tests nothing"


def test_a_rebalance_reaching_a_stopping_worker_waits_for_its_batches_in_flight(settings: Settings) -> None:
    """Faust answers a rebalance that reaches a worker asked to stop by closing its consumer at once, batches
    in flight or not: the stop's own wait for them then committed through a closed client until the stop's
    deadline (exit 1), and a partition the new assignment moves is recovered by its next owner without
    their marks. Now, as at any revocation, the records taken are acked and committed first."""
    events = _write_raw(settings, _bodies(5, 7))
    router = _router(settings)
    app, consumer = router.app, router.app.consumer
    order: list[str] = []
    ack = _ack(router, [])

    async def settled(evs: Any) -> None:
        await ack(evs)
        for event in evs:  # as Faust's own ack of a message leaves it
            event.acked = True
            consumer._unacked_messages.discard(event)
        order.append("acked")

    async def commit(*_: Any, **__: Any) -> bool:
        order.append("committed")
        return True

    consumer.commit = commit
    consumer.close = lambda: order.append("left the group")  # what Faust does with a rebalance then

    async def go() -> None:
        await router.producer.start()
        try:
            consumer.loop = asyncio.get_running_loop()  # the worker's one loop, as in the worker
            consumer._unacked_messages.update(events)  # taken by the stream: Faust tracks them
            settling = await router.dispatch(events, settled)
            app._stopped.set()  # SIGTERM: the worker stops
            await app._on_partitions_revoked(set(consumer.assignment()))
            await settling
        finally:
            await router.producer.close()

    asyncio.run(go())
    assert "acked" in order and order[order.index("acked") :] == ["acked", "committed", "left the group"]


def _refused_and_fixed(s: Settings) -> tuple[Any, Any]:
    """An inbound message too large for its routed topic (lowered to 2,000 bytes) and the corrected
    delivery under the same id, as raw records (key, value, headers)."""
    topics = Topics(s.topic_prefix)
    admin = AdminClient({"bootstrap.servers": s.kafka_bootstrap})
    small = ConfigResource(
        ResourceType.TOPIC,
        topics.message_inbound,
        incremental_configs=[
            ConfigEntry("max.message.bytes", "2000", incremental_operation=AlterConfigOpType.SET)
        ],
    )
    for done in admin.incremental_alter_configs([small]).values():
        done.result(30)
    doc = orjson.loads(SampleFactory(3).inbound("sent").body)
    doc["id"] = "evt-big"
    fixed = orjson.dumps(doc)  # the corrected delivery: same id, a body the topic takes
    doc["payload"]["text"] = base64.b64encode(os.urandom(8000)).decode()  # compressed, still too large
    key, value, headers = _raw(orjson.dumps(doc), "w-big")
    return (key, value, headers), (key, fixed, headers)


def _outcome(s: Settings, router: Any, key: bytes, dead: int, routed: int) -> tuple[list[bytes], int, bool]:
    """What came of the copies: the dead letters' stages, the routed records, whether the id is marked."""
    assert router._pending == {}  # every batch settled: none holds an id any more
    topics = Topics(s.topic_prefix)
    letters = read_topic(s.kafka_bootstrap, topics.dlq, at_least=dead, timeout=30)
    out = read_topic(s.kafka_bootstrap, topics.message_inbound, at_least=routed, timeout=30)
    return (
        [rec.headers[r.H_DLQ_STAGE] for rec in letters],
        len(out),
        "acme" in router._lookup(table_key(key), {}),
    )


def test_a_record_the_broker_refuses_is_not_marked_seen(settings: Settings) -> None:
    """A routed record the broker refuses for what it is (larger than its topic takes) is dead-lettered;
    its id was marked seen all the same, so the corrected delivery under that id was dropped as a
    duplicate (README: an event the router dead-letters is not marked)."""
    big, fixed = _refused_and_fixed(settings)
    events = _write_raw(settings, [big, fixed])
    router = _router(settings)
    acked: list[int] = []

    async def go() -> None:
        await router.producer.start()
        try:
            await (await router.dispatch(events[:1], _ack(router, acked)))
            assert router._lookup(table_key(big[0]), {}) == {}
            await (await router.dispatch(events[1:], _ack(router, acked)))
        finally:
            await router.producer.close()

    asyncio.run(go())
    assert _outcome(settings, router, big[0], dead=1, routed=1) == ([b"route"], 1, True)


@pytest.mark.parametrize("pipelined", [False, True], ids=["same batch", "a batch behind"])
@pytest.mark.parametrize("first_refused", [True, False], ids=["first refused", "first taken (control)"])
def test_a_copy_dropped_behind_a_copy_the_broker_refuses_is_routed_in_its_place(
    settings: Settings, pipelined: bool, first_refused: bool
) -> None:
    """The second copy of an id was dropped as a duplicate as soon as the first was routed, before the
    broker had answered for it. When the broker then refused the first, the second (here the corrected
    delivery) was acked and gone: in the same batch, dropped; in a batch behind (pipelined), dropped and its
    batch wrote the id's mark, so a redrive of the dead letter was dropped as well. The control: behind a
    first copy the broker takes, the second (too large, as it happens) stays a dropped duplicate."""
    big, fixed = _refused_and_fixed(settings)
    events = _write_raw(settings, [big, fixed] if first_refused else [fixed, big])
    router = _router(settings)
    acked: list[int] = []

    async def go() -> None:
        await router.producer.start()
        try:
            if pipelined:
                first = await router.dispatch(events[:1], _ack(router, acked))
                await asyncio.gather(first, await router.dispatch(events[1:], _ack(router, acked)))
            else:
                await (await router.dispatch(events, _ack(router, acked)))
        finally:
            await router.producer.close()

    asyncio.run(go())
    assert sorted(acked) == [e.offset for e in events]
    letters = [b"route"] if first_refused else []
    assert _outcome(settings, router, big[0], dead=len(letters), routed=1) == (letters, 1, True)


def test_copies_behind_a_refused_copy_are_tried_in_turn_and_a_refused_record_is_not_produced_again(
    settings: Settings,
) -> None:
    """In one batch: the first copy refused by the broker; behind it a copy that does not parse, an
    identical copy of the refused one, the corrected delivery and a copy of that. Each is decided in turn:
    the broken one and the identical one dead-lettered (the identical one with the broker's refusal, not
    produced again), the corrected one routed, the last one a duplicate of it."""
    big, fixed = _refused_and_fixed(settings)
    broken = (big[0], b'{"id": "evt-big", "type":', big[2])
    events = _write_raw(settings, [big, broken, big, fixed, fixed])
    router = _router(settings)
    produced: list[str] = []
    produce = router.producer.produce_or_fail

    def counting(topic: str, *args: Any, **kwargs: Any) -> Any:
        produced.append(topic)
        return produce(topic, *args, **kwargs)

    router.producer.produce_or_fail = counting
    acked: list[int] = []
    _settle_one(router, events, acked)
    topics = Topics(settings.topic_prefix)
    assert sorted(acked) == [e.offset for e in events]
    assert _outcome(settings, router, big[0], dead=3, routed=1) == ([b"route"] * 3, 1, True)
    letters = read_topic(settings.kafka_bootstrap, topics.dlq, at_least=3, timeout=30)
    origin = {int(rec.headers[r.H_DLQ_OFFSET]): rec.headers[r.H_DLQ_ERROR_CLASS] for rec in letters}
    assert origin[events[1].offset] != origin[events[0].offset]  # its own failure: it does not parse
    assert origin[events[2].offset] == origin[events[0].offset]  # the broker's refusal of its twin
    assert produced.count(topics.message_inbound) == 2  # the refused copy and the corrected one


def test_copies_the_broker_all_refuse_are_each_dead_lettered_and_leave_the_id_unmarked(
    settings: Settings,
) -> None:
    """Three copies in three batches in flight, each too large: each is dead-lettered in turn, none is
    dropped as a duplicate of a copy that was not routed, and the id stays unmarked (a redrive goes
    through)."""
    big, _ = _refused_and_fixed(settings)
    events = _write_raw(settings, [big, big, big])
    router = _router(settings)
    acked: list[int] = []

    async def go() -> None:
        await router.producer.start()
        try:
            tasks = [await router.dispatch([e], _ack(router, acked)) for e in events]
            await asyncio.gather(*tasks)
        finally:
            await router.producer.close()

    asyncio.run(go())
    assert sorted(acked) == [e.offset for e in events]
    assert _outcome(settings, router, big[0], dead=3, routed=0) == ([b"route"] * 3, 0, False)


def test_a_copy_routed_in_place_of_a_refused_one_holds_off_the_copies_after_it(settings: Settings) -> None:
    """A batch dispatched after the refused copy's batch settled, but before the batch holding the copy
    dropped behind it has, must still see the id as taken: that copy is about to be routed, and a third
    copy routed as well would be the event twice."""
    big, fixed = _refused_and_fixed(settings)
    events = _write_raw(settings, [big, fixed, fixed])
    router = _router(settings)
    acked: list[int] = []
    third: list[Any] = []

    async def go() -> None:
        await router.producer.start()
        try:
            ack = _ack(router, acked)

            async def settled_first(batch: Any) -> None:
                await ack(batch)
                third.append(await router.dispatch(events[2:], ack))  # the second batch has not settled

            first = await router.dispatch(events[:1], settled_first)
            second = await router.dispatch(events[1:2], ack)
            await asyncio.gather(first, second)
            await third[0]
        finally:
            await router.producer.close()

    asyncio.run(go())
    assert sorted(acked) == [e.offset for e in events]
    assert _outcome(settings, router, big[0], dead=1, routed=1) == ([b"route"], 1, True)


def test_a_keyless_record_is_marked_where_the_store_and_the_sweep_look_for_it(settings: Settings) -> None:
    """A record without a key (another producer's) is deduplicated on the id its body gives. Its mark went
    to the changelog partition of the record's raw partition, while the store and the sweep place a key by
    murmur2 of its id: the sweep's tombstone went elsewhere and the mark came back at every restore."""
    for i in range(100):
        body = SampleFactory(40 + i).message_status(f"m-keyless-{i}", "delivered").body
        event_id = frame(body, webhook_id=f"w-keyless-{i}").event_id.encode()
        home = partition_of(table_key(event_id), settings.raw_partitions)
        if home != PARTITION:
            break
    _, value, headers = _raw(body, f"w-keyless-{i}")
    events = _write_raw(settings, [(b"", value, headers)])
    events[0].key = None  # as Faust hands over a record without a key
    router = _router(settings)
    router._active_partitions = lambda: {home}  # this worker's table partitions include the id's
    acked: list[int] = []
    _settle_one(router, events, acked)
    assert acked == [events[0].offset]
    marks = read_topic(settings.kafka_bootstrap, router._changelog, at_least=1, timeout=30)
    assert [(rec.key, rec.partition) for rec in marks] == [(table_key(event_id), home)]
    # Another worker's: its store offset would stop at a write of ours; kept under the record's partition.
    again = _write_raw(settings, [(b"", value, headers)])
    again[0].key = None
    other = _router(settings)
    other._active_partitions = lambda: {PARTITION}
    other._lookup = lambda key, legacy: {}  # a fresh table: not a duplicate of the first one
    _settle_one(other, again, acked)
    marks = read_topic(settings.kafka_bootstrap, router._changelog, at_least=2, timeout=30)
    assert sorted(rec.partition for rec in marks) == sorted([home, PARTITION])


def test_the_sweep_waits_for_a_steady_table_and_drops_a_slice_decided_before_a_rebalance(
    settings: Settings,
) -> None:
    """Faust sets its recovery's `completed` once: the sweep ran during a later rebalance's recovery and
    judged keys by older changelog values than those still on their way (its tombstones, written after
    them, deleted marks inside the window). A rebalance during a sweep moved the partitions it decided
    for. Here every mark is past a one-second window; the sweep must leave them while the table is not
    steady, and remove them once it is (the control that shows it can)."""
    s = settings.model_copy(update={"dedup_window_s": 1})
    events = _write_raw(s, _bodies(6, 36))
    router = _router(s)
    everything = set(range(s.raw_partitions))
    router._active_partitions = lambda: everything
    recovery = router.app.tables.recovery
    acked: list[int] = []

    def marked() -> int:
        return sum(bool(router._lookup(table_key(e.key), {})) for e in events)

    async def go() -> None:
        await router.producer.start()
        try:
            await (await router.dispatch(events, _ack(router, acked)))
            assert marked() == len(events)
            await asyncio.sleep(2.1)  # past the window, which a mark counts from its second rounded up
            recovery.completed.set()
            for rebalancing, in_recovery in ((True, False), (False, True)):
                router.app.rebalancing, recovery.in_recovery = rebalancing, in_recovery
                assert await router.sweep() == 0
                assert marked() == len(events)
            router.app.rebalancing, recovery.in_recovery = False, False
            # The assignment changes while the sweep walks: what it decided is not written.
            owners = iter([everything, set()])
            router._active_partitions = lambda: next(owners)
            assert await router.sweep() == 0
            assert marked() == len(events)
            router._active_partitions = lambda: everything
            assert await router.sweep() == len(events)
            assert marked() == 0
        finally:
            await router.producer.close()

    asyncio.run(go())


def test_a_mark_outlives_the_window_from_its_routing_through_a_sweep(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Marks are whole seconds, and were rounded down: an id routed at .9 of a second read as routed 0.9 s
    earlier, and a sweep 0.6 s after its routing, inside a one-second window, deleted it; its redelivery was
    routed again. The router's clock is set here (the rule is the clock's rounding), the broker is real."""
    s = settings.model_copy(update={"dedup_window_s": 1})
    events = _write_raw(s, _bodies(6, 37))
    router = _router(s)
    everything = set(range(s.raw_partitions))
    router._active_partitions = lambda: everything
    router.app.tables.recovery.completed.set()
    routed_at = float(int(time.time())) + 0.9
    clock = [routed_at]
    monkeypatch.setattr(
        worker, "time", SimpleNamespace(time=lambda: clock[0], perf_counter=time.perf_counter)
    )
    acked: list[int] = []

    routed: list[int] = []

    def marked() -> int:
        return sum(bool(router._lookup(table_key(e.key), {})) for e in events)

    def count_routed() -> None:
        out = [*router.topics.routed, router.topics.unrouted]
        routed.append(sum(len(read_topic(s.kafka_bootstrap, topic)) for topic in out))

    async def go() -> None:
        await router.producer.start()
        try:
            await (await router.dispatch(events, _ack(router, acked)))
            count_routed()
            clock[0] = routed_at + 0.6  # inside the window
            assert await router.sweep() == 0
            assert marked() == len(events)
            again = _write_raw(s, [(e.key, e.value, e.headers) for e in events])
            await (await router.dispatch(again, _ack(router, acked)))  # every one a duplicate
            count_routed()
            clock[0] = routed_at + 1.2  # past the window and the mark's rounding: the sweep removes them
            assert await router.sweep() == len(events)
            assert marked() == 0
        finally:
            await router.producer.close()

    asyncio.run(go())
    assert routed[0] and routed[1] == routed[0]  # the redelivery routed nothing
