"""Apply a batch of canonical events to PostgreSQL: projections and user handlers in one transaction."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from psycopg_pool import AsyncConnectionPool

from sentpipe import metrics as m
from sentpipe.processors.handlers import HandlerContext, HandlerRegistry
from sentpipe.processors.projections import PROJECTIONS
from sentpipe.processors.retry import classify
from sentpipe.schemas.events import CanonicalEvent, EventType

log = logging.getLogger("sentpipe.handlers")


@dataclass(frozen=True, slots=True)
class HandlerFailure:
    event: CanonicalEvent
    handler: str
    error: Exception


class PostgresSink:
    def __init__(self, pool: AsyncConnectionPool, handlers: HandlerRegistry) -> None:
        self.pool = pool
        self.handlers = handlers

    async def apply(
        self, type_: EventType, events: Sequence[CanonicalEvent], attempt: int
    ) -> list[HandlerFailure]:
        """One transaction, one pipelined round-trip for the projection rows, a savepoint per handler call.

        Temporary errors (database away, RetryableError) raise and roll the whole batch back; any other
        handler error is returned as a failure for the dead-letter topic while the batch commits.
        """
        projection = PROJECTIONS[type_]
        handlers = self.handlers.for_type(type_)
        failures: list[HandlerFailure] = []
        succeeded: dict[str, int] = {}
        t0 = time.perf_counter()
        async with self.pool.connection() as conn, conn.transaction():
            async with conn.cursor() as cur:
                for sql, rows in projection.rows(events):
                    if rows:
                        await cur.executemany(sql, rows)
            m.HANDLER_SECONDS.labels(type_.value, "projection").observe(time.perf_counter() - t0)
            for name, fn in handlers:
                ok = 0
                h0 = time.perf_counter()
                for ev in events:
                    try:
                        async with conn.transaction():
                            await fn(ev, HandlerContext(conn, log, attempt))
                        ok += 1
                    except Exception as exc:
                        if classify(exc) != "permanent":  # retried (bounded when unknown)
                            raise
                        failures.append(HandlerFailure(ev, name, exc))
                succeeded[name] = ok
                m.HANDLER_SECONDS.labels(type_.value, name).observe(time.perf_counter() - h0)
        # Counted once committed: a rolled-back batch is retried and counted then.
        m.EVENTS_PROCESSED.labels(type_.value, "projection", "ok").inc(len(events))
        for name, ok in succeeded.items():
            m.EVENTS_PROCESSED.labels(type_.value, name, "ok").inc(ok)
        for f in failures:
            m.EVENTS_PROCESSED.labels(type_.value, f.handler, "failed").inc()
        return failures
