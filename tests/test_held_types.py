"""A batch held for one type's handlers, against the real PostgreSQL: the other types of the batch are not
applied again (their handlers were called once per held round) and do not wait for the held one."""

from __future__ import annotations

import asyncio
import time

import psycopg
from psycopg_pool import AsyncConnectionPool

from sentpipe.processors.handlers import HandlerContext
from sentpipe.processors.projector import Projector, Tuning
from sentpipe.processors.sink import HandlersHeld, PostgresSink
from sentpipe.schemas.events import CanonicalEvent
from sentpipe.schemas.samples import SampleFactory
from tests.test_handlers_hostile import INBOUND, STEP_BOUND_S, TOPICS, Stage, inbound_body, ordered

__all__ = ["ordered"]  # the fixture, used by name


async def test_a_batch_held_for_one_types_handlers_calls_the_others_once(ordered: Stage) -> None:
    """Inbound calls all time out (a lock on their table), so the batch is held: it was rewound whole and
    read again round after round, and the status events of that batch, already committed, had their
    handlers called again each round. They are committed with their offsets now, called once; only the
    inbound partition waits, and is applied once the lock is gone."""
    ordered.handlers.timeout_s = 0.3
    f = SampleFactory(41)
    statuses = [f.message_status(f"m{i}", "delivered").body for i in range(3)]
    inbounds = [inbound_body(f) for _ in range(3)]
    lock_gone = asyncio.Event()
    status_calls: list[str] = []

    async def on_status(event: CanonicalEvent, ctx: HandlerContext) -> None:
        status_calls.append(event.id)

    async def on_inbound(event: CanonicalEvent, ctx: HandlerContext) -> None:
        await lock_gone.wait()

    ordered.handlers.register("message.status.updated", on_status, "status")
    ordered.handlers.register(INBOUND, on_inbound, "inbound")
    ordered.add(statuses + inbounds)
    pool = AsyncConnectionPool(ordered.db, min_size=1, max_size=2, open=False)
    await pool.open()
    projector = ordered.projector(pool)
    holds = 0
    try:
        for _ in range(10):
            try:
                await asyncio.wait_for(projector.step(), STEP_BOUND_S)
            except HandlersHeld:
                holds += 1
                # Held: the status partition is committed all the same, the inbound one is not.
                committed = ordered.broker.committed
                assert committed.get(("g", (TOPICS.message_status, 0))) == len(statuses)
                assert committed.get(("g", (TOPICS.message_inbound, 0)), 0) == 0
                lock_gone.set()
                # Something new to show the handler works again: read again with nothing but the events
                # it held, the stage would blame them.
                inbounds.append(inbound_body(f))
                ordered.add(inbounds[-1:])
            if ordered.broker.committed.get(("g", (TOPICS.message_inbound, 0)), 0) == len(inbounds):
                break
    finally:
        await pool.close()

    assert holds == 1
    assert sorted(status_calls) == sorted(ordered.ids[b] for b in statuses)
    assert ordered.dead() == {}
    assert ordered.projected() == {ordered.ids[b] for b in inbounds}
    with psycopg.connect(ordered.db) as c:
        assert c.execute("SELECT count(*) FROM message_status").fetchone() == (3,)


async def test_a_held_type_waits_alone_while_the_other_types_are_read_on(ordered: Stage) -> None:
    """A held type's partitions are paused for the backoff. The run loop slept that backoff instead, and
    every other type waited with the held one: a batch per backoff, for as long as the hold lasted."""
    f = SampleFactory(43)
    with psycopg.connect(ordered.db, autocommit=True) as c:
        c.execute("ALTER TABLE template_status RENAME TO template_status_away")  # held till it is back
    ordered.add([f.template(f"t{i}", "APPROVED").body for i in range(2)])
    statuses = [f.message_status(f"m{i}", "delivered").body for i in range(3)]
    ordered.add(statuses)
    pool = AsyncConnectionPool(ordered.db, min_size=1, max_size=2, open=False)
    await pool.open()
    slow = Tuning(batch_size=100, within_s=0.01, retry_initial_s=3600, retry_max_s=3600)
    projector = Projector(
        ordered.broker.consumer("g", TOPICS.routed),
        ordered.broker.producer(),
        PostgresSink(pool, ordered.handlers),
        TOPICS,
        slow,
    )
    running = asyncio.create_task(projector.run())

    async def committed(topic: str, n: int) -> None:
        deadline = time.monotonic() + STEP_BOUND_S
        while ordered.broker.committed.get(("g", (topic, 0)), 0) < n and time.monotonic() < deadline:
            assert not running.done(), running
            await asyncio.sleep(0.05)
        assert ordered.broker.committed.get(("g", (topic, 0)), 0) == n

    try:
        await committed(TOPICS.message_status, 3)
        assert projector.held == {(TOPICS.template_approval, 0)}
        statuses += [f.message_status(f"m{i}", "delivered").body for i in range(3, 6)]
        ordered.add(statuses[3:])
        await committed(TOPICS.message_status, 6)  # an hour before the held type is read again
        assert projector.held == {(TOPICS.template_approval, 0)}
        assert ordered.broker.committed.get(("g", (TOPICS.template_approval, 0)), 0) == 0
    finally:
        projector.stop()
        await asyncio.wait_for(running, STEP_BOUND_S)
        await pool.close()
    with psycopg.connect(ordered.db) as c:
        assert c.execute("SELECT count(*) FROM message_events").fetchone() == (6,)
        assert c.execute("SELECT count(*) FROM template_events").fetchone() == (0,)
