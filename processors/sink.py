"""Apply a batch of canonical events to PostgreSQL: projections and user handlers in one transaction."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import psycopg
from psycopg_pool import AsyncConnectionPool

from sentpipe import metrics as m
from sentpipe.processors.handlers import HandlerContext, HandlerRegistry, RetryableError
from sentpipe.processors.projections import PROJECTIONS
from sentpipe.processors.retry import classify
from sentpipe.schemas.events import CanonicalEvent, EventType

log = logging.getLogger("sentpipe.handlers")


@dataclass(frozen=True, slots=True)
class HandlerFailure:
    event: CanonicalEvent
    handler: str
    error: Exception


class ProjectionUnusable(RetryableError):
    """The projection's own SQL was refused with SQLSTATE class 42 (a table dropped or renamed, a column
    renamed, a privilege revoked, the ON CONFLICT index gone). That SQL is fixed and every value is a bound
    parameter, so no record can cause it: a failure of the whole, held (retried forever) until the schema is
    repaired, where class 42 as a record's error would dead-letter every event."""


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
            try:
                async with conn.cursor() as cur:
                    for sql, rows in projection.rows(events):
                        if rows:
                            await cur.executemany(sql, rows)
            except psycopg.Error as exc:
                if (exc.sqlstate or "")[:2] != "42":
                    raise
                log.error(
                    "the %s projection's tables refuse its SQL (SQLSTATE %s: %s); holding the events "
                    "until the tables are repaired",
                    type_.value,
                    exc.sqlstate,
                    exc,
                    extra={"type": type_.value, "sqlstate": exc.sqlstate},
                )
                raise ProjectionUnusable(f"{exc.sqlstate}: {exc}") from exc
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
