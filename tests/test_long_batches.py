"""Batches that take longer than the consumer group waits for a poll, against the real broker and PostgreSQL.

Past the poll interval the group drops the member, the batch's commit is refused and the batch is read
again: as slow again, forever, its handlers called round after round. The projector cuts its batches.
"""

from __future__ import annotations

import asyncio
import logging
import time

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from sentpipe.kafka import AsyncProducer, BatchConsumer
from sentpipe.processors.handlers import HandlerContext, HandlerRegistry
from sentpipe.processors.projector import Projector, Tuning
from sentpipe.processors.sink import PostgresSink
from sentpipe.processors.topics import projections_group
from sentpipe.schemas.events import CanonicalEvent
from sentpipe.schemas.samples import SampleFactory
from sentpipe.schemas.topics import Topics
from sentpipe.settings import Settings
from tests.pipeline import lag
from tests.test_worker_stalls import _produce_routed

POLL_INTERVAL_S = 8.0  # librdkafka takes no less than the session timeout, 6 s at least
CALL_S = 0.25  # per handler call: 60 of them make a batch of 15 s


async def test_batches_slower_than_the_poll_interval_shrink_until_they_commit(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "sentpipe.projector")
    s = settings.model_copy(update={"kafka_session_timeout_s": 6.0})
    f = SampleFactory(51)
    bodies = [f.message_status(f"m{i}", "delivered").body for i in range(60)]
    _produce_routed(s, bodies)
    calls: list[str] = []

    async def slow(event: CanonicalEvent, ctx: HandlerContext) -> None:
        calls.append(event.id)
        await asyncio.sleep(CALL_S)

    handlers = HandlerRegistry()
    handlers.register("message.status.updated", slow, "slow-api")
    topics = Topics(s.topic_prefix)
    db = s.database_url.get_secret_value()
    pool = AsyncConnectionPool(db, min_size=1, max_size=2, open=False)
    await pool.open()
    producer = AsyncProducer.from_settings(s, delivery_timeout_s=30.0)
    await producer.start()
    projector = Projector(
        BatchConsumer(s, projections_group(s), topics.routed, max_poll_interval_s=POLL_INTERVAL_S),
        producer,
        PostgresSink(pool, handlers),
        topics,
        Tuning(
            batch_size=len(bodies),
            within_s=0.1,
            retry_initial_s=0.2,
            retry_max_s=1.0,
            max_poll_interval_s=POLL_INTERVAL_S,
        ),
    )
    running = asyncio.create_task(projector.run())
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and (lag(s) or _rows(db) < len(bodies)):
            assert not running.done(), running
            await asyncio.sleep(0.5)
        assert not lag(s) and _rows(db) == len(bodies), f"{len(calls)} calls, limit {projector.batch_limit}"
    finally:
        projector.stop()
        await asyncio.wait_for(running, 60)
        await producer.close()
        await pool.close()
    assert projector.batch_limit < len(bodies)
    assert "batches now take at most" in caplog.text
    # The first batch, dropped with its member, is applied once more; no call a third time.
    assert max(calls.count(x) for x in set(calls)) <= 2, calls


def _rows(db: str) -> int:
    with psycopg.connect(db) as c:
        row = c.execute("SELECT count(*) FROM message_events").fetchone()
        return int(row[0]) if row else 0
