"""User handlers that misbehave: each misdeed costs only its own event, never the stage.

The first tests run the projection stage in this process (the in-memory broker seam, the real PostgreSQL
and `PostgresSink`, the code that runs handlers in production); the last runs a real worker, broker and
ingress with tests/handlers_hostile.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import importlib.util
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
from aiokafka.errors import KafkaConnectionError
from confluent_kafka import KafkaError, KafkaException
from prometheus_client import REGISTRY
from psycopg import sql
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from sentpipe.broker import LocalBroker
from sentpipe.processors.blocked_handlers import CallKey, UninterruptibleCalls
from sentpipe.processors.handlers import (
    HandlerContext,
    HandlerModuleError,
    HandlerRegistry,
    RetryableError,
    load_modules,
    registry,
)
from sentpipe.processors.projector import Projector, Tuning
from sentpipe.processors.projector_process import open_pool
from sentpipe.processors.retry import UNKNOWN_ATTEMPTS, classify
from sentpipe.processors.sink import (
    BROKEN_CALLS,
    BatchLostToHandler,
    HandlersHeld,
    PostgresSink,
    ProjectionUnusable,
)
from sentpipe.processors.watchdog import Watchdog
from sentpipe.schemas import routing as r
from sentpipe.schemas.events import CanonicalEvent, EventType, frame
from sentpipe.schemas.samples import SampleFactory
from sentpipe.schemas.topics import Topics
from sentpipe.settings import Settings
from tests import handlers_hostile as hh
from tests import handlers_uninterruptible as hu
from tests.http_tools import post_all
from tests.kafka_tools import read_topic, record_count
from tests.pipeline import route_as_the_router, start_ingress, start_worker, wait_caught_up
from tests.processes import settings_env

TOPICS = Topics("h.")
FAST = Tuning(batch_size=100, within_s=0.01, retry_initial_s=0.001, retry_max_s=0.002)
INBOUND = EventType.MESSAGE_INBOUND.value
# A stage that never finishes its batch fails the test here instead of hanging it.
STEP_BOUND_S = 60.0


def inbound_body(f: SampleFactory, text: str | None = None) -> bytes:
    doc = orjson.loads(f.inbound().body)
    if text is not None:
        doc["payload"]["text"] = text
    return orjson.dumps(doc)


@dataclass
class Stage:
    """The projection stage over the in-memory broker, writing to this test's schema."""

    db: str
    handlers: HandlerRegistry
    broker: LocalBroker = field(default_factory=LocalBroker)
    ids: dict[bytes, str] = field(default_factory=dict)  # body -> event id
    holds: int = 0
    uninterruptible: UninterruptibleCalls | None = None

    def add(self, bodies: list[bytes]) -> None:
        for body in bodies:
            routed = route_as_the_router(body, TOPICS)
            assert routed.event is not None
            self.broker.append(routed.topic, routed.key, routed.value, [])
            self.ids[body] = routed.event.id

    async def run(self, max_holds: int = 0, watchdog: Watchdog | None = None) -> None:
        """Project everything added, as the worker would: until every record is committed. A batch held
        for its handlers' timeouts is read again, as `Projector.run` does, at most `max_holds` times."""
        pool = AsyncConnectionPool(self.db, min_size=1, max_size=2, open=False)
        await pool.open()
        projector = self.projector(pool, watchdog)
        try:
            while any(self.broker.committed.get(("g", tp), 0) < end for tp, end in self._ends().items()):
                try:
                    await asyncio.wait_for(projector.step(), STEP_BOUND_S)
                except HandlersHeld:
                    self.holds += 1
                    assert self.holds <= max_holds, f"held {self.holds} times"
                    await asyncio.sleep(0.05)
        finally:
            await pool.close()

    def projector(self, pool: AsyncConnectionPool, watchdog: Watchdog | None = None) -> Projector:
        """The stage's projector, as the worker builds it, over this broker and pool."""
        return Projector(
            self.broker.consumer("g", TOPICS.routed),
            self.broker.producer(),
            PostgresSink(pool, self.handlers, self.uninterruptible),
            TOPICS,
            FAST,
            watchdog,
        )

    def _ends(self) -> dict[tuple[str, int], int]:
        return {
            (t, p): len(part)
            for t in TOPICS.routed
            for p, part in enumerate(self.broker.topics[t].partitions)
            if part
        }

    def dead(self) -> dict[str, dict[str, bytes]]:
        """Dead letters by event id: their headers."""
        out = {}
        for part in self.broker.topics[TOPICS.dlq].partitions:
            for rec in part:
                out[orjson.loads(rec.value)["id"]] = dict(rec.headers)
        return out

    def projected(self) -> set[str]:
        with psycopg.connect(self.db) as c:
            return {row[0] for row in c.execute("SELECT event_id FROM inbound_messages")}


def _stage(db_url: str, partitions: int) -> Stage:
    broker = LocalBroker()
    for t in (*TOPICS.routed, TOPICS.dlq):
        broker.create_topic(t, partitions)
    return Stage(db_url, HandlerRegistry(), broker)


@pytest.fixture
async def stage(db_url: str) -> AsyncIterator[Stage]:
    yield _stage(db_url, 2)


@pytest.fixture
async def ordered(db_url: str) -> AsyncIterator[Stage]:
    """One partition: the batch holds the events in the order they were added."""
    yield _stage(db_url, 1)


class BadStr(Exception):
    def __str__(self) -> str:
        raise RuntimeError("this exception cannot be printed")


class StrOnce(Exception):
    """Printed once by the guard, then by the projector again: that second failure held the line."""

    def __init__(self) -> None:
        super().__init__()
        self.printed = 0

    def __str__(self) -> str:
        self.printed += 1
        if self.printed > 1:
            raise RuntimeError("printed once already")
        return "first"


# kind -> (what the handler raises, the class name its dead letter carries)
RAISED: dict[str, tuple[BaseException, str]] = {
    "system-exit": (SystemExit(0), "SystemExit"),
    "keyboard-interrupt": (KeyboardInterrupt(), "KeyboardInterrupt"),
    "generator-exit": (GeneratorExit(), "GeneratorExit"),
    "cancelled": (asyncio.CancelledError(), "CancelledError"),
    "str-raises": (BadStr(), "BadStr"),
    "lone-surrogate": (ValueError("bytes \udcff undecodable"), "ValueError"),
    "own-timeout": (TimeoutError("the handler's API timed out"), "TimeoutError"),
    "own-connection-refused": (ConnectionRefusedError(111, "refused"), "ConnectionRefusedError"),
    # The handler's own Kafka clients: retried as the stage's broker, they held the line forever.
    "own-kafka-timeout": (KafkaException(KafkaError(KafkaError._MSG_TIMED_OUT)), "KafkaException"),
    "own-aiokafka-connection": (KafkaConnectionError("no broker"), "KafkaConnectionError"),
    "buffer-error": (BufferError("Existing exports of data: object cannot be re-sized"), "BufferError"),
    "ten-megabytes-with-nul": (ValueError("\x00" + "x" * 10_000_000), "ValueError"),
    # A class made at run time, its name 5 MB: the dead letter was over the topic's limit, held forever.
    "huge-class-name": (type("F" * 5_000_000, (Exception,), {})("x"), "F" * 200),
    "str-fails-the-second-time": (StrOnce(), "StrOnce"),
}


@pytest.mark.parametrize("kind", list(RAISED))
async def test_whatever_a_handler_raises_costs_only_its_event(stage: Stage, kind: str) -> None:
    """SystemExit and friends ended the projector (the worker restarted into the same event, forever); an
    exception that cannot be printed, or a handler's own network error, failed or retried the batch
    forever. Now each is its event's dead letter and the neighbours are projected."""
    raised, class_name = RAISED[kind]
    f = SampleFactory(3)
    bodies = (
        [inbound_body(f) for _ in range(5)]
        + [inbound_body(f, "poison")]
        + [inbound_body(f) for _ in range(5)]
    )

    async def handle(event: CanonicalEvent, ctx: HandlerContext) -> None:
        await ctx.conn.execute("SELECT 1")
        if event.data.get("text") == "poison":
            raise raised

    stage.handlers.register(INBOUND, handle, "hostile")
    stage.add(bodies)
    await stage.run()

    poison = stage.ids[bodies[5]]
    dead = stage.dead()
    assert list(dead) == [poison]
    assert dead[poison][r.H_DLQ_STAGE] == b"handler"
    assert dead[poison][r.H_DLQ_ERROR_CLASS].decode() == class_name
    assert dead[poison][r.H_DLQ_MESSAGE].startswith(b"hostile: ")
    # The projection rows are the batch's, handler or not; every neighbour's handler call committed too.
    assert stage.projected() == set(stage.ids.values())


async def test_a_handler_that_never_returns_is_cancelled_and_its_event_dead_lettered(stage: Stage) -> None:
    """Without a limit the batch waited forever: the watchdog failed /livez, the restarted worker met the
    same event and hung again. The query it was waiting on is cancelled on the server too."""
    stage.handlers.timeout_s = 1.0
    f = SampleFactory(4)
    bodies = [inbound_body(f), inbound_body(f, "hang"), inbound_body(f), inbound_body(f, "pg-sleep")]

    async def handle(event: CanonicalEvent, ctx: HandlerContext) -> None:
        if event.data.get("text") == "hang":
            await asyncio.Event().wait()
        if event.data.get("text") == "pg-sleep":
            await ctx.conn.execute("SELECT pg_sleep(120) /* hostile-test-sleep */")
        await ctx.conn.execute("SELECT 1")

    stage.handlers.register(INBOUND, handle, "hostile")
    stage.add(bodies)
    await stage.run()

    dead = stage.dead()
    assert set(dead) == {stage.ids[bodies[1]], stage.ids[bodies[3]]}
    assert {h[r.H_DLQ_ERROR_CLASS] for h in dead.values()} == {b"HandlerTimeout"}
    assert stage.projected() == set(stage.ids.values())
    with psycopg.connect(stage.db) as c:
        sleeping = c.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE %s AND pid <> pg_backend_pid()",
            ("%hostile-test-sleep%",),
        ).fetchone()
    assert sleeping == (0,)


async def test_a_batch_slow_only_for_its_timeouts_is_not_a_stall(ordered: Stage) -> None:
    """Progress counted per committed batch: ten calls timing out one after another (0.5 s each) made a
    5 s batch, past a 3 s stall, so liveness failed and the restarted worker met the same batch, as slow,
    forever. Each call that ends is progress now (the watchdog is asked all along, as /livez would)."""
    ordered.handlers.timeout_s = 0.5
    f = SampleFactory(6)
    # A call that succeeds first: ten timeouts after it are the events' own, not a hold.
    bodies = [inbound_body(f)] + [inbound_body(f, "hang") for _ in range(10)]

    async def handle(event: CanonicalEvent, ctx: HandlerContext) -> None:
        if event.data.get("text") == "hang":
            await asyncio.Event().wait()

    ordered.handlers.register(INBOUND, handle, "hangs")
    ordered.add(bodies)
    watchdog = Watchdog("project", stall_after_s=3.0)
    stalls: list[str] = []

    async def probe() -> None:
        while True:
            stalls.extend(str(s) for s in watchdog.stalls())
            await asyncio.sleep(0.1)

    prober = asyncio.ensure_future(probe())
    t0 = time.monotonic()
    try:
        await ordered.run(watchdog=watchdog)
    finally:
        prober.cancel()
    assert time.monotonic() - t0 > watchdog.stall_after_s  # the batch did outlast the stall time
    assert stalls == []
    assert set(ordered.dead()) == {ordered.ids[b] for b in bodies[1:]}


async def test_a_batch_held_round_after_round_is_a_stall_though_new_records_arrive(ordered: Stage) -> None:
    """Every call of a handler times out (its API is down), so its batch is held and read again, round
    after round, each time with the records that arrived meanwhile. Their calls were first ends, and the
    watchdog took them for progress: the position never moved, the lag grew, /livez stayed green."""
    ordered.handlers.timeout_s = 0.2
    f = SampleFactory(11)

    async def handle(event: CanonicalEvent, ctx: HandlerContext) -> None:
        await asyncio.Event().wait()

    ordered.handlers.register(INBOUND, handle, "api-down")
    ordered.add([inbound_body(f) for _ in range(3)])
    watchdog = Watchdog("project", stall_after_s=2.0)
    pool = AsyncConnectionPool(ordered.db, min_size=1, max_size=2, open=False)
    await pool.open()
    projector = ordered.projector(pool, watchdog)
    holds = 0
    try:
        while not watchdog.stalls():
            try:
                await asyncio.wait_for(projector.step(), STEP_BOUND_S)
            except HandlersHeld:
                holds += 1
            else:
                if not projector.held:  # paused, the held partition is not read: nothing to blame yet
                    # A batch of nothing but suspects (past the batch size) is blamed at last.
                    raise AssertionError(f"held {holds} times and read again, never reported as a stall")
            ordered.add([inbound_body(f) for _ in range(2)])  # traffic goes on
    finally:
        await pool.close()
    assert ordered.broker.committed.get(("g", (TOPICS.message_inbound, 0)), 0) == 0


def test_handler_calls_made_again_are_not_progress() -> None:
    """A held or halved batch applied again repeats its calls: that batch is not moving, and the watchdog
    must still see the stall."""
    now = [0.0]
    watchdog = Watchdog("project", stall_after_s=10.0, clock=lambda: now[0])
    broker = LocalBroker()
    broker.create_topic(TOPICS.message_inbound, 1)
    sink = PostgresSink(None, HandlerRegistry())  # type: ignore[arg-type]
    consumer = broker.consumer("g", TOPICS.routed)
    projector = Projector(consumer, broker.producer(), sink, TOPICS, FAST, watchdog)
    assert sink.on_call is not None
    where = (TOPICS.message_inbound, 0)
    watchdog.lag({where: 5})
    projector._batch_partitions = {where}  # the batch in hand, as `_project` sets it
    now[0] = 8.0
    sink.on_call(CallKey("h", "t", "e1"))  # a first end: progress
    now[0] = 16.0
    assert watchdog.stalls() == []
    sink.on_call(CallKey("h", "t", "e1"))  # the same call again
    now[0] = 18.5
    assert [s.partition for s in watchdog.stalls()] == [0]


async def test_a_query_past_the_servers_statement_timeout_costs_only_its_event(stage: Stage) -> None:
    """SQLSTATE 57014 is temporary for the database as a whole, so one event whose query always ran past
    the server's statement_timeout held the stage forever. Its neighbours' calls succeed: it is its own."""
    f = SampleFactory(5)
    bodies = (
        [inbound_body(f) for _ in range(3)] + [inbound_body(f, "slow")] + [inbound_body(f) for _ in range(3)]
    )

    async def handle(event: CanonicalEvent, ctx: HandlerContext) -> None:
        await ctx.conn.execute("SET LOCAL statement_timeout = '200ms'")
        await ctx.conn.execute("SELECT pg_sleep(%s)", (30 if event.data.get("text") == "slow" else 0,))

    stage.handlers.register(INBOUND, handle, "slow-query")
    stage.add(bodies)
    await stage.run()

    dead = stage.dead()
    assert list(dead) == [stage.ids[bodies[3]]]
    assert dead[stage.ids[bodies[3]]][r.H_DLQ_ERROR_CLASS] == b"QueryCanceled"
    assert stage.projected() == set(stage.ids.values())


async def test_handler_calls_that_all_time_out_hold_the_batch_until_the_lock_is_gone(stage: Stage) -> None:
    """A table the handler writes, locked by a migration: every call times out alike. They were each
    dead-lettered (HandlerTimeout); no call succeeding, the batch is now held and applied once the lock
    goes, nothing dead-lettered."""
    stage.handlers.timeout_s = 0.3
    with psycopg.connect(stage.db, autocommit=True) as c:
        c.execute("CREATE TABLE handled (event_id text PRIMARY KEY)")

    async def handle(event: CanonicalEvent, ctx: HandlerContext) -> None:
        await ctx.conn.execute("INSERT INTO handled VALUES (%s) ON CONFLICT DO NOTHING", (event.id,))

    stage.handlers.register(INBOUND, handle, "locked-out")
    f = SampleFactory(6)
    stage.add([inbound_body(f) for _ in range(20)])
    with psycopg.connect(stage.db) as locker:
        locker.execute("LOCK TABLE handled IN ACCESS EXCLUSIVE MODE")
        running = asyncio.create_task(stage.run(max_holds=1000))
        while stage.holds < 3:
            assert not running.done()
            await asyncio.sleep(0.05)
        locker.rollback()
    await running

    assert stage.dead() == {}
    assert stage.projected() == set(stage.ids.values())
    with psycopg.connect(stage.db) as c:
        assert {row[0] for row in c.execute("SELECT event_id FROM handled")} == set(stage.ids.values())


async def test_timed_out_events_at_the_head_of_a_batch_cannot_hold_it(ordered: Stage) -> None:
    """Two calls timing out before any succeeds hold the batch; read again, those events are called last,
    after neighbours that succeed, and so are the ones dead-lettered. Before that ordering, a batch
    starting with two such events was held forever."""
    ordered.handlers.timeout_s = 0.3
    f = SampleFactory(7)
    bodies = [inbound_body(f, "hang"), inbound_body(f, "hang"), inbound_body(f), inbound_body(f)]

    async def handle(event: CanonicalEvent, ctx: HandlerContext) -> None:
        if event.data.get("text") == "hang":
            await asyncio.Event().wait()
        await ctx.conn.execute("SELECT 1")

    ordered.handlers.register(INBOUND, handle, "hangs")
    ordered.add(bodies)
    await ordered.run(max_holds=3)

    assert ordered.holds == 1
    dead = ordered.dead()
    assert set(dead) == {ordered.ids[bodies[0]], ordered.ids[bodies[1]]}
    assert {h[r.H_DLQ_ERROR_CLASS] for h in dead.values()} == {b"HandlerTimeout"}
    assert ordered.projected() == set(ordered.ids.values())


async def test_a_held_batch_read_again_with_nothing_new_blames_its_timed_out_events(ordered: Stage) -> None:
    """Two events whose calls hang and nothing else: nothing can show the handler works, and no traffic
    may come. Held once, then dead-lettered on their first timeouts, without calling them again."""
    ordered.handlers.timeout_s = 0.3
    f = SampleFactory(8)
    bodies = [inbound_body(f, "hang"), inbound_body(f, "hang")]
    calls: list[str] = []

    async def handle(event: CanonicalEvent, ctx: HandlerContext) -> None:
        calls.append(event.id)
        await asyncio.Event().wait()

    ordered.handlers.register(INBOUND, handle, "hangs")
    ordered.add(bodies)
    await ordered.run(max_holds=3)

    assert ordered.holds == 1 and len(calls) == 2
    dead = ordered.dead()
    assert set(dead) == set(ordered.ids.values())
    assert {h[r.H_DLQ_ERROR_CLASS] for h in dead.values()} == {b"HandlerTimeout"}


async def test_a_handler_closing_the_connection_costs_only_its_event(stage: Stage) -> None:
    """`ctx.conn.close()` for one event lost the batch's transaction with a connection error, which is
    temporary: the batch was retried forever, and closed again every time. That call is now left out when
    the batch is applied again, its event dead-lettered, every neighbour handled."""
    f = SampleFactory(10)
    bodies = (
        [inbound_body(f) for _ in range(3)]
        + [inbound_body(f, "closer")]
        + [inbound_body(f) for _ in range(3)]
    )
    calls: list[str] = []

    async def handle(event: CanonicalEvent, ctx: HandlerContext) -> None:
        calls.append(event.id)
        await ctx.conn.execute("SELECT 1")
        if event.data.get("text") == "closer":
            await ctx.conn.close()

    stage.handlers.register(INBOUND, handle, "closes")
    stage.add(bodies)
    await stage.run()

    closer = stage.ids[bodies[3]]
    dead = stage.dead()
    assert list(dead) == [closer]
    assert dead[closer][r.H_DLQ_ERROR_CLASS] == b"HandlerError"
    assert b"closed the stage's database connection" in dead[closer][r.H_DLQ_MESSAGE]
    assert stage.projected() == set(stage.ids.values())
    assert calls.count(closer) == 1


@pytest.mark.parametrize("breaks", [1, BROKEN_CALLS])
async def test_the_database_lost_under_a_call_retries_the_batch(stage: Stage, breaks: int) -> None:
    """The server ending the stage's backend while a handler runs (a restart, a failover) left that call out
    as if the handler had closed `ctx.conn`: its event dead-lettered "never close it", its handler never
    run. Now the batch is applied again and the call made again; only a call the connection breaks under
    every time (`breaks` = BROKEN_CALLS: its own backend terminated) is left out."""
    f = SampleFactory(12)
    bodies = [inbound_body(f) for _ in range(3)] + [inbound_body(f, "victim")] + [inbound_body(f)]
    calls: list[str] = []

    async def handle(event: CanonicalEvent, ctx: HandlerContext) -> None:
        calls.append(event.id)
        if event.data.get("text") == "victim" and calls.count(event.id) <= breaks:
            async with await psycopg.AsyncConnection.connect(stage.db, autocommit=True) as admin:
                await admin.execute("SELECT pg_terminate_backend(%s)", (ctx.conn.info.backend_pid,))
        await ctx.conn.execute("INSERT INTO handled VALUES (%s) ON CONFLICT DO NOTHING", (event.id,))

    with psycopg.connect(stage.db) as c:
        c.execute("CREATE TABLE handled (event_id text PRIMARY KEY)")
    stage.handlers.register(INBOUND, handle, "interrupted")
    stage.add(bodies)
    await stage.run()

    victim = stage.ids[bodies[3]]
    assert calls.count(victim) == breaks + (breaks < BROKEN_CALLS)
    assert stage.projected() == set(stage.ids.values())
    with psycopg.connect(stage.db) as c:
        handled = {row[0] for row in c.execute("SELECT event_id FROM handled")}
    if breaks < BROKEN_CALLS:
        assert stage.dead() == {} and handled == set(stage.ids.values())
    else:
        dead = stage.dead()
        assert list(dead) == [victim] and b"closed the stage's database" in dead[victim][r.H_DLQ_MESSAGE]
        assert handled == set(stage.ids.values()) - {victim}


async def test_the_projector_is_ready_once_its_group_has_assigned_it_not_when_a_poll_returns(
    stage: Stage,
) -> None:
    """A poll returns after `within_s` (20 ms) whether the group is joined or not, and the first one made
    /readyz say ready before the projector had been given its partitions."""
    pool = AsyncConnectionPool(stage.db, min_size=1, max_size=1, open=False)
    await pool.open()
    try:
        projector = stage.projector(pool)
        projector.consumer.joined = False  # still joining
        assert await projector.step() == 0 and not projector.started
        projector.consumer.joined = True  # the group's assignment came (an empty one counts)
        assert await projector.step() == 0 and projector.started
    finally:
        await pool.close()


async def test_a_handler_changing_its_event_changes_nothing_else(stage: Stage) -> None:
    """The event object was shared: a handler's change reached the next handler and, when the batch was
    retried (any RetryableError), the projection rows written from the same objects."""
    f = SampleFactory(5)
    bodies = [inbound_body(f, f"text {i}") for i in range(4)]
    seen_by_second: list[Any] = []
    failed_once: list[bool] = []

    async def vandal(event: CanonicalEvent, ctx: HandlerContext) -> None:
        event.data["text"] = "CHANGED BY A HANDLER"
        event.data.pop("from", None)

    async def observer(event: CanonicalEvent, ctx: HandlerContext) -> None:
        seen_by_second.append(event.data.get("text"))
        if not failed_once:  # the whole batch is rolled back and applied again
            failed_once.append(True)
            raise RetryableError("once")

    stage.handlers.register(INBOUND, vandal, "vandal")
    stage.handlers.register(INBOUND, observer, "observer")
    stage.add(bodies)
    await stage.run()

    assert stage.dead() == {}
    assert "CHANGED BY A HANDLER" not in seen_by_second
    with psycopg.connect(stage.db) as c:
        rows = c.execute("SELECT text, payload->>'text', from_number FROM inbound_messages").fetchall()
    assert sorted(text for text, _, _ in rows) == [f"text {i}" for i in range(4)]
    assert all(text == payload_text and sender is not None for text, payload_text, sender in rows)


async def test_a_handler_that_forgets_to_await_is_a_failure_not_a_silent_success(stage: Stage) -> None:
    """`return ctx.conn.execute(...)` without await: the statement never ran, the event counted as handled,
    and only a RuntimeWarning said anything."""
    f = SampleFactory(6)
    bodies = [inbound_body(f) for _ in range(3)]

    async def forgetful(event: CanonicalEvent, ctx: HandlerContext) -> Awaitable[Any]:
        return ctx.conn.execute("CREATE TABLE never_created (x int)")

    stage.handlers.register(INBOUND, forgetful, "forgetful")  # type: ignore[arg-type]
    stage.add(bodies)
    await stage.run()

    dead = stage.dead()
    assert set(dead) == set(stage.ids.values())
    assert all(b"did not await" in h[r.H_DLQ_MESSAGE] for h in dead.values())
    with psycopg.connect(stage.db) as c:
        assert c.execute("SELECT to_regclass('never_created')").fetchone() == (None,)


# --- registration and loading: refused at start, in one line -----------------------------------------------
async def _ok(event: CanonicalEvent, ctx: HandlerContext) -> None:
    return None


def test_registration_refuses_handlers_that_cannot_work() -> None:
    reg = HandlerRegistry()

    def not_async(event: CanonicalEvent, ctx: HandlerContext) -> None:
        return None

    async def generator(event: CanonicalEvent, ctx: HandlerContext) -> Any:
        yield None

    with pytest.raises(TypeError, match="must be a coroutine function"):
        reg.register(INBOUND, not_async)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must be a coroutine function"):
        reg.register(INBOUND, generator)

    class SyncCall:
        def __call__(self, event: CanonicalEvent, ctx: HandlerContext) -> None:
            return None

    class AsyncCall:
        async def __call__(self, event: CanonicalEvent, ctx: HandlerContext) -> None:
            return None

    # Through a partial or a callable object, the function that runs is checked (every event was
    # dead-lettered for a sync one).
    for sync in (functools.partial(not_async), functools.partial(functools.partial(not_async)), SyncCall()):
        with pytest.raises(TypeError, match="must be a coroutine function"):
            reg.register(INBOUND, sync, "sync")  # type: ignore[arg-type]
    accepted = HandlerRegistry()
    accepted.register(INBOUND, functools.partial(_ok), "partial")
    accepted.register(INBOUND, AsyncCall(), "callable")
    assert len(accepted.for_type(EventType.MESSAGE_INBOUND)) == 2
    with pytest.raises(ValueError, match=r"no handler can be registered for 'message\.sent'"):
        reg.register("message.sent", _ok)
    with pytest.raises(ValueError, match="no handler can be registered for 'unrouted'"):
        reg.register("unrouted", _ok)
    for bad in ("", "x" * 201, "bad \udcff name"):
        with pytest.raises(ValueError, match="handler name"):
            reg.register(INBOUND, _ok, bad)
    assert reg.by_type.get(EventType.MESSAGE_INBOUND, []) == []


def test_a_handler_registered_twice_runs_once() -> None:
    reg = HandlerRegistry()
    reg.register(INBOUND, _ok)
    reg.register(INBOUND, _ok)  # decorated twice, or the same module imported again
    assert len(reg.for_type(EventType.MESSAGE_INBOUND)) == 1

    async def other(event: CanonicalEvent, ctx: HandlerContext) -> None:
        return None

    async def another(event: CanonicalEvent, ctx: HandlerContext) -> None:
        return None

    reg.register(INBOUND, other, "same")
    with pytest.raises(ValueError, match="two handlers named 'same'"):
        reg.register(INBOUND, another, "same")
    reg.register(EventType.MESSAGE_STATUS, another, "same")  # one name on two types: fine
    assert [name for name, _ in reg.for_type(EventType.MESSAGE_INBOUND)] == [
        "tests.test_handlers_hostile._ok",
        "same",
    ]


def test_one_file_imported_under_two_module_names_is_refused(tmp_path: Path) -> None:
    """SENTPIPE_HANDLER_MODULES naming `app.handlers` and `handlers` (two sys.path entries reaching one
    file): every event was handled twice."""
    src = tmp_path / "twice.py"
    src.write_text(
        "from sentpipe.processors.handlers import handler\n"
        "@handler('message.inbound.received')\n"
        "async def on_inbound(event, ctx):\n"
        "    return None\n"
    )
    before = list(registry.for_type(EventType.MESSAGE_INBOUND))
    try:
        for name in ("first_name", "second_name"):
            spec = importlib.util.spec_from_file_location(name, src)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            if name == "first_name":
                spec.loader.exec_module(module)
            else:
                with pytest.raises(ValueError, match="imported under two names"):
                    spec.loader.exec_module(module)
    finally:
        registry.by_type[EventType.MESSAGE_INBOUND] = before


BROKEN_MODULES = {
    "exits_quietly": ("import sys\nsys.exit(0)\n", "SystemExit: 0"),
    "bad_syntax": ("def broken(:\n", "SyntaxError"),
    "raises_on_import": ("x = 1\nraise RuntimeError('no config file')\n", "RuntimeError: no config file"),
    "interrupted": ("raise KeyboardInterrupt\n", None),
    # Refused at registration: the line to fix is the module's, not the registry's.
    "not_async": (
        "from sentpipe.processors.handlers import handler\n"
        "@handler('message.status.updated')\n"
        "def h(e, c): ...\n",
        "must be a coroutine function",
    ),
    "imports_a_missing_one": ("x = 1\nimport nope_missing_dependency\n", "nope_missing_dependency"),
}


def test_a_handler_module_that_fails_to_import_is_one_error_naming_it(tmp_path: Path) -> None:
    for name, (code, _) in BROKEN_MODULES.items():
        (tmp_path / f"{name}.py").write_text(code)
    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(HandlerModuleError) as missing:
            load_modules(["nope_not_a_module"])
        # Not where importlib looked for it (importlib/__init__.py:126): that it is not there.
        assert str(missing.value) == (
            "SENTPIPE_HANDLER_MODULES: importing 'nope_not_a_module' failed: no module named "
            "'nope_not_a_module' (is it installed, or on PYTHONPATH?)"
        )
        for name, (_, needle) in BROKEN_MODULES.items():
            if needle is None:
                with pytest.raises(KeyboardInterrupt):  # a real Ctrl-C at start is still one
                    load_modules([name])
                continue
            with pytest.raises(HandlerModuleError) as info:
                load_modules([name])
            message = str(info.value)
            assert f"importing {name!r} failed" in message and needle in message, message
            if name != "bad_syntax":
                assert f"{name}.py:2:" in message, message  # where its own code failed
    finally:
        sys.path.remove(str(tmp_path))
        for name in BROKEN_MODULES:
            sys.modules.pop(name, None)


def test_the_worker_refuses_to_start_with_a_module_that_exits_on_import(
    settings: Settings, tmp_path: Path
) -> None:
    """A handler module calling sys.exit(0) at import ended `sentpipe worker` with status 0 and no word."""
    (tmp_path / "exits_quietly.py").write_text("import sys\nsys.exit(0)\n")
    env = settings_env(settings, handler_modules='["exits_quietly"]', worker_role="project")
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    res = subprocess.run(
        [sys.executable, "-m", "sentpipe", "worker"], env=env, capture_output=True, text=True, timeout=120
    )
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1, res
    assert "Traceback" not in res.stderr and len(lines) == 1, res.stderr
    # A refusal the user can act on, said as such: no exception class of ours in front of it.
    assert lines[0].startswith("error: SENTPIPE_HANDLER_MODULES: importing 'exits_quietly'")
    assert "SystemExit: 0" in lines[0]


# --- the real worker ----------------------------------------------------------------------------------------
def test_hostile_handlers_never_stop_the_worker(settings: Settings, topics: Topics, tmp_path: Path) -> None:
    """Every kind of tests/handlers_hostile.py in one stream: each lands in the DLQ under its own class,
    every other event is projected and handled, and the worker is alive and live at the end."""
    db = settings.database_url.get_secret_value()
    with psycopg.connect(db, autocommit=True) as c:
        c.execute("CREATE TABLE hostile_calls (event_id text NOT NULL)")
    f = SampleFactory(9)
    hostile = {kind: inbound_body(f, hh.PREFIX + kind) for kind in hh.EXPECTED_CLASS}
    normal = [inbound_body(f) for _ in range(30)]
    bodies = normal[:10] + list(hostile.values()) + normal[10:]
    ids = {b: frame(b, webhook_id=None).event_id for b in bodies}

    ingress, url, _ = start_ingress(settings, tmp_path)
    worker = start_worker(
        settings, tmp_path, handler_modules=["tests.handlers_hostile"], handler_timeout_s=2.0
    )
    try:
        secret = settings.webhook_secret.get_secret_value()
        assert asyncio.run(post_all(f"{url}/webhooks/sent", bodies, secret)).count(200) == len(bodies)
        wait_caught_up(settings, 180, "the worker got past every hostile event", worker.proc.tail)
        dlq = read_topic(settings.kafka_bootstrap, topics.dlq, at_least=len(hostile))
        assert worker.proc.p is not None and worker.proc.p.poll() is None, worker.proc.tail()
        worker.proc.wait_http(f"http://127.0.0.1:{worker.metrics_port}/livez", timeout=30)
    finally:
        worker.stop()
        ingress.stop()

    got = {orjson.loads(rec.value)["id"]: rec.headers for rec in dlq}
    assert {eid: h[r.H_DLQ_ERROR_CLASS].decode() for eid, h in got.items()} == {
        ids[body]: hh.EXPECTED_CLASS[kind] for kind, body in hostile.items()
    }
    assert all(h[r.H_DLQ_STAGE] == b"handler" for h in got.values())
    with psycopg.connect(db) as c:
        projected = {row[0] for row in c.execute("SELECT event_id FROM inbound_messages")}
        handled = {row[0] for row in c.execute("SELECT event_id FROM hostile_calls")}
    assert projected == set(ids.values())
    assert handled == {ids[b] for b in normal}


def crash_then_restart(
    settings: Settings, tmp_path: Path, module: str, bodies: list[bytes], crash_line: str
) -> list[Any]:
    """Send `bodies` to a worker running `module`'s handlers, which must end with `crash_line` in its log;
    restart it as an orchestrator would (same data directory) and wait until it has caught up. The DLQ."""
    ingress, url, _ = start_ingress(settings, tmp_path)
    first = start_worker(settings, tmp_path, handler_modules=[module], handler_timeout_s=2.0)
    second = None
    try:
        secret = settings.webhook_secret.get_secret_value()
        assert asyncio.run(post_all(f"{url}/webhooks/sent", bodies, secret)).count(200) == len(bodies)
        assert first.proc.p is not None
        assert first.proc.p.wait(timeout=180) != 0, first.proc.tail()  # the guard gives up 10 s past 2 s
        assert crash_line in first.proc.tail(300), first.proc.tail()
        second = start_worker(settings, tmp_path, handler_modules=[module], handler_timeout_s=2.0)
        wait_caught_up(settings, 180, "the restarted worker got past the event", second.proc.tail)
        dlq = read_topic(settings.kafka_bootstrap, Topics(settings.topic_prefix).dlq, at_least=1)
        assert second.proc.p is not None and second.proc.p.poll() is None, second.proc.tail()
        return dlq
    finally:
        if second is not None:
            second.stop()
        first.stop()
        ingress.stop()


def test_a_handler_stuck_where_no_signal_reaches_costs_a_restart_and_only_its_event(
    settings: Settings, topics: Topics, tmp_path: Path
) -> None:
    """A handler waiting on a relocked mutex held the stage for good, across every restart. The guard ends
    the process instead, and the restarted worker dead-letters that event (HandlerTimeout) without calling
    the handler again; every other event is projected and handled."""
    db = settings.database_url.get_secret_value()
    with psycopg.connect(db, autocommit=True) as c:
        c.execute("CREATE TABLE stuck_calls (event_id text NOT NULL)")
    f = SampleFactory(10)
    normal = [inbound_body(f) for _ in range(20)]
    stuck = inbound_body(f, hu.STUCK)
    bodies = [*normal[:10], stuck, *normal[10:]]
    ids = {b: frame(b, webhook_id=None).event_id for b in bodies}
    dlq = crash_then_restart(
        settings, tmp_path, "tests.handlers_uninterruptible", bodies, "could not be interrupted"
    )

    assert {orjson.loads(rec.value)["id"]: rec.headers[r.H_DLQ_ERROR_CLASS] for rec in dlq} == {
        ids[stuck]: b"HandlerTimeout"
    }
    assert b"no signal could interrupt" in dlq[0].headers[r.H_DLQ_MESSAGE]
    with psycopg.connect(db) as c:
        projected = {row[0] for row in c.execute("SELECT event_id FROM inbound_messages")}
        handled = {row[0] for row in c.execute("SELECT event_id FROM stuck_calls")}
    assert projected == set(ids.values())
    assert handled == {ids[b] for b in normal}


@pytest.mark.parametrize("kind", hh.ENDS_THE_LOOP)
def test_a_handler_ending_the_event_loop_costs_a_restart_and_only_its_event(
    settings: Settings, topics: Topics, tmp_path: Path, kind: str
) -> None:
    """A handler cancelling every task of the loop (or stopping the loop) ended the projector process with
    its batch uncommitted: the worker crashed, and after each restart met the same event and crashed again,
    with nothing projected. Now the call is kept for the restart, which dead-letters its event for that
    handler uncalled; every other event is projected and handled."""
    db = settings.database_url.get_secret_value()
    with psycopg.connect(db, autocommit=True) as c:
        c.execute("CREATE TABLE hostile_calls (event_id text NOT NULL)")
    f = SampleFactory(12)
    normal = [inbound_body(f) for _ in range(20)]
    bad = inbound_body(f, hh.PREFIX + kind)
    bodies = [*normal[:10], bad, *normal[10:]]
    ids = {b: frame(b, webhook_id=None).event_id for b in bodies}
    ended = f"ended the projector's event loop with event {ids[bad]}"
    dlq = crash_then_restart(settings, tmp_path, "tests.handlers_hostile", bodies, ended)

    assert {orjson.loads(rec.value)["id"]: rec.headers[r.H_DLQ_ERROR_CLASS] for rec in dlq} == {
        ids[bad]: b"EndedTheLoop"
    }
    with psycopg.connect(db) as c:
        projected = {row[0] for row in c.execute("SELECT event_id FROM inbound_messages")}
        handled = {row[0] for row in c.execute("SELECT event_id FROM hostile_calls")}
    assert projected == set(ids.values())
    assert handled == {ids[b] for b in normal}


def test_a_handler_setting_its_session_does_not_change_the_next_batch(
    settings: Settings, topics: Topics, tmp_path: Path
) -> None:
    """A handler's `SET search_path` stayed on the pooled connection: every later batch's projection SQL
    met pg_catalog instead of the projection tables (SQLSTATE 42P01), and the stage held forever."""
    db = settings.database_url.get_secret_value()
    f = SampleFactory(11)
    batches = [[inbound_body(f) for _ in range(5)] for _ in range(3)]
    ingress, url, _ = start_ingress(settings, tmp_path)
    worker = start_worker(settings, tmp_path, handler_modules=["tests.handlers_set_path"])
    try:
        secret = settings.webhook_secret.get_secret_value()
        for n, batch in enumerate(batches, start=1):  # one after another: each a batch of its own
            assert asyncio.run(post_all(f"{url}/webhooks/sent", batch, secret)).count(200) == len(batch)
            wait_caught_up(settings, 120, f"batch {n} projected", worker.proc.tail)
    finally:
        worker.stop()
        ingress.stop()
    with psycopg.connect(db) as c:
        projected = {row[0] for row in c.execute("SELECT event_id FROM inbound_messages")}
    assert projected == {frame(b, webhook_id=None).event_id for batch in batches for b in batch}
    assert record_count(settings.kafka_bootstrap, topics.dlq) == 0


async def test_a_handlers_session_locks_and_temp_tables_do_not_outlive_its_batch(db_url: str) -> None:
    """RESET ALL undid a handler's SET, but a session advisory lock it never released (an exception between
    lock and unlock) stayed with the pooled connection: every other worker's handler waiting for that key
    timed out, for as long as the connection lived. Its temp tables and LISTENs stayed too."""
    from sentpipe.processors.projector_process import open_pool

    handlers = HandlerRegistry()

    async def leave_state(event: CanonicalEvent, ctx: HandlerContext) -> None:
        await ctx.conn.execute("SELECT pg_advisory_lock(4242)")
        await ctx.conn.execute("CREATE TEMP TABLE IF NOT EXISTS scratch (x int)")
        await ctx.conn.execute("LISTEN sentpipe_test")

    handlers.register(INBOUND, leave_state, "leaves-state")
    pool = open_pool(Settings(database_url=db_url, db_pool_size=1))  # one connection, reused
    await pool.open()
    try:
        routed = route_as_the_router(inbound_body(SampleFactory(12)), TOPICS)
        assert routed.event is not None
        assert await PostgresSink(pool, handlers).apply(EventType.MESSAGE_INBOUND, [routed.event], 1) == []
        # The pool's one connection, once it is back (the pool resets it in a task of its own).
        async with pool.connection() as conn:
            cur = await conn.execute(
                "SELECT to_regclass('pg_temp.scratch') IS NULL, NOT EXISTS (SELECT pg_listening_channels())"
            )
            assert await cur.fetchone() == (True, True)
            with psycopg.connect(db_url) as other:
                held = other.execute(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 4242"
                ).fetchone()
            assert held == (0,)
    finally:
        await pool.close()


async def test_a_failed_handler_call_leaves_later_batches_on_its_connection_alone(db_url: str) -> None:
    """A savepoint rollback empties psycopg's prepared-statement cache, after which it no longer noticed
    the pool's DISCARD ALL dropping the statements it prepared again: from one failed handler call on,
    every other batch on that connection failed with SQLSTATE 26000 and was applied twice. A statement the
    handler PREPAREd itself must still not outlive its batch."""
    from sentpipe.processors.projector_process import open_pool

    handlers = HandlerRegistry()
    left_over: list[int] = []  # statements of its own a call finds, first call of each batch

    async def fail_some(event: CanonicalEvent, ctx: HandlerContext) -> None:
        cur = await ctx.conn.execute("SELECT count(*) FROM pg_prepared_statements WHERE from_sql")
        left_over.append((await cur.fetchone() or (0,))[0])
        await ctx.conn.execute(sql.SQL("PREPARE {} AS SELECT 1").format(sql.Identifier(event.id)))
        if event.data.get("text") == "fail":
            raise ValueError("this event's own failure")

    handlers.register(INBOUND, fail_some, "fail-some")
    pool = open_pool(Settings(database_url=db_url, db_pool_size=1))  # one connection, reused
    await pool.open()
    f = SampleFactory(13)
    try:
        sink = PostgresSink(pool, handlers)
        for n, texts in enumerate([["ok"] * 4, ["fail"] * 3, *[["ok"] * 4] * 8]):
            events = [route_as_the_router(inbound_body(f, t), TOPICS).event for t in texts]
            failures = await sink.apply(EventType.MESSAGE_INBOUND, [e for e in events if e], 1)
            assert [type(x.error).__name__ for x in failures] == ["ValueError"] * texts.count("fail"), n
            assert left_over[-len(texts)] == 0, n
    finally:
        await pool.close()


def inbound_events(texts: list[str], seed: int) -> list[CanonicalEvent]:
    f = SampleFactory(seed)
    routed = [route_as_the_router(inbound_body(f, t), TOPICS).event for t in texts]
    return [e for e in routed if e is not None]


async def seen_table(pool: AsyncConnectionPool) -> None:
    async with pool.connection() as conn:
        await conn.execute("CREATE TABLE seen (event_id text, note text)")


async def seen(pool: AsyncConnectionPool) -> list[tuple[str, str]]:
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT event_id, note FROM seen ORDER BY event_id, note")
        return [(row[0], row[1]) for row in await cur.fetchall()]


async def note(ctx: HandlerContext, event: CanonicalEvent, text: str) -> None:
    await ctx.conn.execute("INSERT INTO seen VALUES (%s, %s)", (event.id, text))


async def test_a_handler_cancelling_its_own_task_fails_only_its_event(pool: AsyncConnectionPool) -> None:
    """`current_task().cancel()` in a handler (a library's "cancel this request") raised the counter the
    stage reads as its own stop: the projector's process ended, and again after every restart."""
    await seen_table(pool)
    handlers = HandlerRegistry()

    async def cancels(event: CanonicalEvent, ctx: HandlerContext) -> None:
        if event.data.get("text") == "cancel":
            task = asyncio.current_task()
            assert task is not None
            task.cancel()
            await asyncio.sleep(0)
        await note(ctx, event, "ok")

    handlers.register(INBOUND, cancels, "cancels")
    events = inbound_events(["a", "cancel", "b"], 21)
    failures = await PostgresSink(pool, handlers).apply(EventType.MESSAGE_INBOUND, events, 1)
    assert [(f.event.id, type(f.error).__name__) for f in failures] == [(events[1].id, "CancelledError")]
    assert "not by a stop of the stage" in str(failures[0].error)
    assert {e for e, _ in await seen(pool)} == {events[0].id, events[2].id}


async def test_a_handler_swallowing_its_cancellation_is_still_held_to_its_limit(
    pool: AsyncConnectionPool,
) -> None:
    """A retry loop with a bare `except` ate the timeout's cancellation: a call that ended late counted as a
    success, and one that never ended held every partition of the projector forever."""
    await seen_table(pool)
    handlers = HandlerRegistry(timeout_s=0.3)
    release = asyncio.Event()

    async def swallows(event: CanonicalEvent, ctx: HandlerContext) -> None:
        text = event.data.get("text")
        end = time.monotonic() + (0.5 if text == "late" else 3600)
        while text in ("late", "forever") and time.monotonic() < end and not release.is_set():
            with contextlib.suppress(BaseException):  # the hostile handler under test
                await asyncio.sleep(0.05)
        await note(ctx, event, "ok")  # after its limit: on a closed connection for "forever"

    handlers.register(INBOUND, swallows, "swallows")
    events = inbound_events(["a", "late", "forever", "b"], 22)
    sink = PostgresSink(pool, handlers)
    with pytest.raises(BatchLostToHandler, match="went on after it was cancelled"):
        await sink.apply(EventType.MESSAGE_INBOUND, events, 1)
    failures = await sink.apply(EventType.MESSAGE_INBOUND, events, 2)  # applied again without "forever"
    release.set()
    await asyncio.sleep(0.2)  # the abandoned call ends: its statement must find no connection
    assert {f.event.id: type(f.error).__name__ for f in failures} == {
        events[1].id: "HandlerTimeout",
        events[2].id: "HandlerAbandoned",
    }
    assert {e for e, _ in await seen(pool)} == {events[0].id, events[3].id}


async def test_a_handler_s_own_database_errors_fail_only_its_event(pool: AsyncConnectionPool) -> None:
    """A psycopg error was always the stage's: the handler's own connection to another database that
    failed held every partition forever, logged as if the projection database were down; `ctx.conn.commit()`
    rolled the batch back five times per halving level and blamed the projection."""
    await seen_table(pool)
    handlers = HandlerRegistry()

    async def own_errors(event: CanonicalEvent, ctx: HandlerContext) -> None:
        text = event.data.get("text")
        if text == "other-db":
            await psycopg.AsyncConnection.connect("postgresql://postgres@127.0.0.1:1/x", connect_timeout=2)
        if text == "commit":
            await ctx.conn.commit()
        await note(ctx, event, "ok")

    handlers.register(INBOUND, own_errors, "own-errors")
    events = inbound_events(["a", "other-db", "commit", "b"], 23)
    failures = await PostgresSink(pool, handlers).apply(EventType.MESSAGE_INBOUND, events, 1)
    assert [(f.event.id, type(f.error).__name__, classify(f.error)) for f in failures] == [
        (events[1].id, "OperationalError", "permanent"),
        (events[2].id, "ProgrammingError", "permanent"),
    ]
    assert all("the handler's own error" in str(f.error) for f in failures)
    assert {e for e, _ in await seen(pool)} == {events[0].id, events[3].id}


@pytest.mark.parametrize("statement", ["COMMIT", "ROLLBACK"])
async def test_a_handler_ending_the_batch_s_transaction_is_left_out(
    pool: AsyncConnectionPool, statement: str
) -> None:
    """`COMMIT` in a handler's SQL committed the batch half-way, and the failures that followed applied the
    batch again five times per halving level, each attempt committing its handlers' work once more."""
    await seen_table(pool)
    handlers = HandlerRegistry()

    async def ends(event: CanonicalEvent, ctx: HandlerContext) -> None:
        await note(ctx, event, "called")
        if event.data.get("text") == "end":
            await ctx.conn.execute(statement)

    handlers.register(INBOUND, ends, "ends")
    events = inbound_events(["a", "end", "b"], 24)
    sink = PostgresSink(pool, handlers)
    with pytest.raises(BatchLostToHandler, match="ended the batch's transaction"):
        await sink.apply(EventType.MESSAGE_INBOUND, events, 1)
    failures = await sink.apply(EventType.MESSAGE_INBOUND, events, 2)
    assert [(f.event.id, type(f.error).__name__) for f in failures] == [(events[1].id, "TransactionEnded")]
    calls = [e for e, _ in await seen(pool)]
    # The one early commit a handler can force: its own work and its predecessor's, once; nothing after.
    early = 1 if statement == "COMMIT" else 0
    assert sorted(calls) == sorted([events[0].id] * (1 + early) + [events[1].id] * early + [events[2].id])


@pytest.mark.parametrize(
    ("statements", "raises"),
    [
        (["COMMIT", "SELECT 1"], False),
        (["COMMIT AND CHAIN"], False),
        (["ROLLBACK", "SELECT 1"], False),
        (["ROLLBACK AND CHAIN"], False),
        (["COMMIT", "SELECT 1"], True),
    ],
)
async def test_a_handler_ending_the_batch_s_transaction_and_going_on_is_left_out(
    pool: AsyncConnectionPool, statements: list[str], raises: bool
) -> None:
    """A handler that ended the batch's transaction and then went on in a new one (more SQL after its
    `COMMIT`, psycopg beginning it; `COMMIT AND CHAIN`) left the connection in a transaction, so the end
    went unseen: the stage's savepoint was gone (SQLSTATE 3B001, an error of unknown kind), and each of the
    batch's five attempts, then each halving level, committed its earlier handlers' work once more."""
    await seen_table(pool)
    handlers = HandlerRegistry()

    async def ends(event: CanonicalEvent, ctx: HandlerContext) -> None:
        await note(ctx, event, "called")
        if event.data.get("text") == "end":
            for statement in statements:
                await ctx.conn.execute(statement)
            await note(ctx, event, "after")
            if raises:
                raise ValueError("and then it failed")

    handlers.register(INBOUND, ends, "ends")
    events = inbound_events(["a", "end", "b"], 25)
    sink = PostgresSink(pool, handlers)
    with pytest.raises(BatchLostToHandler, match="ended the batch's transaction"):
        await sink.apply(EventType.MESSAGE_INBOUND, events, 1)
    failures = await sink.apply(EventType.MESSAGE_INBOUND, events, 2)
    assert [(f.event.id, type(f.error).__name__) for f in failures] == [(events[1].id, "TransactionEnded")]
    # The one early commit a handler can force: its own work before it and its predecessor's, once.
    early = 1 if statements[0].startswith("COMMIT") else 0
    calls = [e for e, note_ in await seen(pool) if note_ == "called"]
    assert sorted(calls) == sorted([events[0].id] * (1 + early) + [events[1].id] * early + [events[2].id])
    assert [e for e, note_ in await seen(pool) if note_ == "after"] == []


async def test_a_call_left_out_is_one_tenant_s_not_every_event_of_its_id(pool: AsyncConnectionPool) -> None:
    """Event ids are unique per tenant only. Keyed by (handler, event id), the call left out for one tenant's
    event was left out for another tenant's event of the same id in the batch: its handler never ran."""
    handlers = HandlerRegistry()
    called: list[str] = []

    async def ends(event: CanonicalEvent, ctx: HandlerContext) -> None:
        called.append(event.tenant)
        if event.tenant == "acme":
            await ctx.conn.execute("ROLLBACK")

    handlers.register(INBOUND, ends, "ends")
    (event,) = inbound_events(["same id"], 25)
    acme, globex = (dataclasses.replace(event, tenant=t) for t in ("acme", "globex"))
    sink = PostgresSink(pool, handlers)
    with pytest.raises(BatchLostToHandler):
        await sink.apply(EventType.MESSAGE_INBOUND, [acme, globex], 1)
    called.clear()
    failures = await sink.apply(EventType.MESSAGE_INBOUND, [acme, globex], 2)
    assert [(f.event.tenant, type(f.error).__name__) for f in failures] == [("acme", "TransactionEnded")]
    assert called == ["globex"]


async def test_handlers_hung_in_threads_leave_the_projector_its_own(ordered: Stage) -> None:
    """`asyncio.to_thread` is where the README sends blocking code; calls hung there keep the default
    executor's threads, and the projector, which polled and committed through that executor, stalled on
    every partition once they were all taken."""
    gate = threading.Event()

    async def hangs(event: CanonicalEvent, ctx: HandlerContext) -> None:
        if event.data.get("text") == "hang":
            await asyncio.to_thread(gate.wait)

    ordered.handlers.timeout_s = 0.2
    ordered.handlers.register(INBOUND, hangs, "hangs")
    threads = ThreadPoolExecutor()._max_workers  # the size of the loop's default executor
    f = SampleFactory(31)
    hung = [inbound_body(f, "hang") for _ in range(threads + 1)]
    ordered.add([inbound_body(f) for _ in range(2)] + hung)
    try:
        await ordered.run()
        ordered.add([inbound_body(f) for _ in range(3)])
        await ordered.run()  # every default thread is hung now
    finally:
        gate.set()
    assert {i: h[r.H_DLQ_ERROR_CLASS] for i, h in ordered.dead().items()} == {
        ordered.ids[b]: b"HandlerTimeout" for b in hung
    }
    assert ordered.projected() == set(ordered.ids.values())


async def test_a_temporary_failure_inside_a_task_group_is_retried(pool: AsyncConnectionPool) -> None:
    """A TaskGroup wraps what its tasks raise in an ExceptionGroup: a RetryableError there dead-lettered
    the event at once instead of retrying the batch."""
    await seen_table(pool)
    handlers = HandlerRegistry()

    async def fans_out(event: CanonicalEvent, ctx: HandlerContext) -> None:
        async def call_api() -> None:
            if ctx.attempt == 1:
                raise RetryableError("the API is busy")

        async with asyncio.TaskGroup() as tg:
            tg.create_task(call_api())
            tg.create_task(asyncio.sleep(0))
        await note(ctx, event, f"attempt {ctx.attempt}")

    handlers.register(INBOUND, fans_out, "fans-out")
    events = inbound_events(["a", "b"], 25)
    sink = PostgresSink(pool, handlers)
    with pytest.raises(RetryableError, match="the API is busy"):
        await sink.apply(EventType.MESSAGE_INBOUND, events, 1)
    assert await sink.apply(EventType.MESSAGE_INBOUND, events, 2) == []
    assert await seen(pool) == sorted((e.id, "attempt 2") for e in events)


async def test_a_handler_going_on_after_a_database_error_fails_only_its_event(stage: Stage) -> None:
    """A handler catching its own SQL error and returning left its savepoint aborted: releasing it failed
    the whole batch (25P02, of unknown kind), five times per halving level, and the event was dead-lettered
    by the projection stage, its rows and its other handlers' work never written."""
    f = SampleFactory(41)
    bodies = [inbound_body(f), inbound_body(f, "swallow"), inbound_body(f, "swallow, then more SQL")]

    async def swallows(event: CanonicalEvent, ctx: HandlerContext) -> None:
        text = str(event.data.get("text"))
        if text.startswith("swallow"):
            with contextlib.suppress(psycopg.errors.DivisionByZero):
                await ctx.conn.execute("SELECT 1 / 0")
        if text != "swallow":
            await ctx.conn.execute("SELECT 1")  # after a swallowed error: SQLSTATE 25P02

    stage.handlers.register(INBOUND, swallows, "swallows")
    stage.add(bodies)
    await stage.run()

    dead = stage.dead()
    assert set(dead) == {stage.ids[b] for b in bodies[1:]}
    for headers in dead.values():
        assert (headers[r.H_DLQ_STAGE], headers[r.H_DLQ_ERROR_CLASS]) == (b"handler", b"TransactionAborted")
        assert b"caught a database error" in headers[r.H_DLQ_MESSAGE]
    assert stage.projected() == set(stage.ids.values())


async def test_a_handler_s_sql_error_of_unknown_kind_is_tried_a_few_times_then_fails_only_its_event(
    ordered: Stage,
) -> None:
    """A trigger's RAISE (SQLSTATE P0001) in a handler's statement was retried with the whole batch, then
    halved down to the event, which the projection stage dead-lettered: its rows never written."""
    calls: list[str] = []

    async def raises(event: CanonicalEvent, ctx: HandlerContext) -> None:
        calls.append(event.id)
        if event.data.get("text") == "raise":
            await ctx.conn.execute("DO $$ BEGIN RAISE EXCEPTION 'refused by a trigger'; END $$")

    # Two handlers failing alike on one event: the stage's retries, counted per batch, ran out on the
    # second one's first error, and the event was dead-lettered by the projection stage after all.
    ordered.handlers.register(INBOUND, raises, "raises")
    ordered.handlers.register(INBOUND, functools.partial(raises), "raises-too")
    f = SampleFactory(42)
    bodies = [inbound_body(f), inbound_body(f, "raise"), inbound_body(f)]
    ordered.add(bodies)
    await ordered.run()

    poison = ordered.ids[bodies[1]]
    letters = [dict(rec.headers) for rec in ordered.broker.records(TOPICS.dlq)]
    assert sorted((h[r.H_DLQ_STAGE], h[r.H_DLQ_ERROR_CLASS], h[r.H_DLQ_MESSAGE][:11]) for h in letters) == [
        (b"handler", b"RaiseException", b"raises-too:"),
        (b"handler", b"RaiseException", b"raises: ref"),
    ]
    assert set(ordered.dead()) == {poison}
    assert calls.count(poison) == UNKNOWN_ATTEMPTS + 1  # the first's tries, the second's at the last
    assert ordered.projected() == set(ordered.ids.values())


async def test_an_error_of_unknown_kind_after_an_outage_still_gets_its_retries(ordered: Stage) -> None:
    """Its retries were bounded by the batch's attempt number, which counts an outage's retries too: after
    six of them (the database away, a busy API), a handler's first RAISE was its event's failure at once."""
    outage = [6]
    raised_for: list[str] = []

    async def outage_first(event: CanonicalEvent, ctx: HandlerContext) -> None:
        if outage[0] > 0:
            outage[0] -= 1
            raise RetryableError("the API is away")

    async def raises(event: CanonicalEvent, ctx: HandlerContext) -> None:
        if event.data.get("text") == "raise":
            raised_for.append(event.id)
            await ctx.conn.execute("DO $$ BEGIN RAISE EXCEPTION 'refused by a trigger'; END $$")

    ordered.handlers.register(INBOUND, outage_first, "outage")
    ordered.handlers.register(INBOUND, raises, "raises")
    f = SampleFactory(46)
    bodies = [inbound_body(f), inbound_body(f, "raise"), inbound_body(f)]
    ordered.add(bodies)
    await ordered.run()

    assert outage == [0] and set(ordered.dead()) == {ordered.ids[bodies[1]]}
    assert len(raised_for) == UNKNOWN_ATTEMPTS  # as many tries as without the outage
    assert ordered.projected() == set(ordered.ids.values())


async def test_a_handler_s_row_factory_does_not_outlive_its_batch(db_url: str) -> None:
    """`ctx.conn.row_factory = dict_row` stayed on the pooled connection: the stage's own query asking
    whether a NOT NULL column can be filled read `row[0]` from a dict (KeyError, permanent), and a column
    added without a default dead-lettered every event instead of holding the line."""
    handlers = HandlerRegistry()

    async def dicts(event: CanonicalEvent, ctx: HandlerContext) -> None:
        ctx.conn.row_factory = dict_row

    handlers.register(INBOUND, dicts, "dicts")
    pool = open_pool(Settings(database_url=db_url, db_pool_size=1))  # one connection, reused
    await pool.open()
    try:
        first, second = inbound_events(["a", "b"], 43)
        sink = PostgresSink(pool, handlers)
        assert await sink.apply(EventType.MESSAGE_INBOUND, [first], 1) == []
        async with pool.connection() as conn:
            await conn.execute("ALTER TABLE inbound_messages ADD COLUMN x int NOT NULL DEFAULT 0")
            await conn.execute("ALTER TABLE inbound_messages ALTER COLUMN x DROP DEFAULT")
            await conn.commit()
        with pytest.raises(ProjectionUnusable, match="23502"):
            await sink.apply(EventType.MESSAGE_INBOUND, [second], 1)
    finally:
        await pool.close()


async def test_a_handler_s_cursor_factory_does_not_outlive_its_batch(db_url: str) -> None:
    """`ctx.conn.cursor_factory = AsyncRawCursor` (a handler that prefers $1 placeholders) stayed on the
    pooled connection: the next batch's projection SQL, written with %s, was a syntax error (SQLSTATE 42601),
    held as a failure of the whole, and so was every batch after it on that connection."""
    handlers = HandlerRegistry()

    async def raw(event: CanonicalEvent, ctx: HandlerContext) -> None:
        ctx.conn.cursor_factory = psycopg.AsyncRawCursor
        ctx.conn.server_cursor_factory = psycopg.AsyncRawServerCursor
        await ctx.conn.execute("SELECT $1::text", (event.id,))

    handlers.register(INBOUND, raw, "raw")
    pool = open_pool(Settings(database_url=db_url, db_pool_size=1))  # one connection, reused
    await pool.open()
    try:
        first, second = inbound_events(["a", "b"], 44)
        sink = PostgresSink(pool, handlers)
        assert await sink.apply(EventType.MESSAGE_INBOUND, [first], 1) == []
        assert await sink.apply(EventType.MESSAGE_INBOUND, [second], 1) == []
        async with pool.connection() as conn:
            assert type(conn.cursor()) is psycopg.AsyncCursor
            assert type(conn.cursor("named")) is psycopg.AsyncServerCursor
    finally:
        await pool.close()
    with psycopg.connect(db_url) as c:
        assert {row[0] for row in c.execute("SELECT event_id FROM inbound_messages")} == {first.id, second.id}


async def test_a_handler_s_notice_callbacks_do_not_outlive_its_batch(db_url: str) -> None:
    """A handler adding a notice callback per call (to log its SQL's RAISE NOTICE) left each one on the
    pooled connection: every later notice called every callback ever added, with the context of events long
    gone, and the list grew by one per event for the connection's life."""
    handlers = HandlerRegistry()
    heard: list[tuple[str, str]] = []

    async def noticing(event: CanonicalEvent, ctx: HandlerContext) -> None:
        ctx.conn.add_notice_handler(lambda diag: heard.append((event.id, diag.message_primary or "")))
        ctx.conn.add_notify_handler(lambda notify: None)
        await ctx.conn.execute(sql.SQL("DO $$ BEGIN RAISE NOTICE {}; END $$").format(sql.Literal(event.id)))

    handlers.register(INBOUND, noticing, "noticing")
    pool = open_pool(Settings(database_url=db_url, db_pool_size=1))  # one connection, reused
    await pool.open()
    try:
        events = inbound_events(["a", "b", "c"], 45)
        sink = PostgresSink(pool, handlers)
        for event in events:
            assert await sink.apply(EventType.MESSAGE_INBOUND, [event], 1) == []
    finally:
        await pool.close()
    assert heard == [(e.id, e.id) for e in events]


async def test_a_call_that_ended_the_process_stays_recorded_until_its_batch_commits(
    ordered: Stage, tmp_path: Path
) -> None:
    """Such a call was forgotten once its type's transaction committed, before the batch did: another type
    of the batch held (two handler timeouts) read the batch again, and the call was made again (in
    production: the process ended again, and the restart held the batch again, forever)."""
    recorded = UninterruptibleCalls(tmp_path / "calls.json")
    ordered.uninterruptible = recorded
    ordered.handlers.timeout_s = 0.3
    called: list[str] = []

    async def ended_the_process(event: CanonicalEvent, ctx: HandlerContext) -> None:
        called.append(event.id)

    async def hangs(event: CanonicalEvent, ctx: HandlerContext) -> None:
        await asyncio.Event().wait()

    status = SampleFactory(44).message_status("m1", "delivered")
    routed = route_as_the_router(status.body, TOPICS)
    assert routed.event is not None
    ordered.broker.append(routed.topic, routed.key, routed.value, [])  # first: its type is applied first
    recorded.add(CallKey("ended-the-process", routed.event.tenant, routed.event.id))
    ordered.handlers.register(EventType.MESSAGE_STATUS.value, ended_the_process, "ended-the-process")
    ordered.handlers.register(INBOUND, hangs, "hangs")
    f = SampleFactory(45)
    ordered.add([inbound_body(f), inbound_body(f)])
    status_type = {"type": EventType.MESSAGE_STATUS.value}
    counted = {"handler": "projection", "outcome": "ok", **status_type}
    before = (
        REGISTRY.get_sample_value("sentpipe_events_processed_total", counted) or 0.0,
        REGISTRY.get_sample_value("sentpipe_end_to_end_lag_seconds_count", status_type) or 0.0,
    )
    await ordered.run(max_holds=3)

    assert ordered.holds == 1
    assert called == []
    # Applied twice (the batch was read again), counted once: when the batch committed.
    assert (
        REGISTRY.get_sample_value("sentpipe_events_processed_total", counted),
        REGISTRY.get_sample_value("sentpipe_end_to_end_lag_seconds_count", status_type),
    ) == (before[0] + 1, before[1] + 1)
    dead = ordered.dead()
    assert dead[routed.event.id][r.H_DLQ_ERROR_CLASS] == b"HandlerTimeout"
    assert len(dead) == 3
    assert len(recorded) == 0  # settled once the batch committed
