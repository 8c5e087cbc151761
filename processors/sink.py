"""Apply a batch of canonical events to PostgreSQL: projections and user handlers in one transaction."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import psycopg
from psycopg_pool import AsyncConnectionPool

from sentpipe import metrics as m
from sentpipe.processors.handlers import HandlerContext, HandlerRegistry, RetryableError
from sentpipe.processors.projections import PROJECTIONS, Statement
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
    renamed, a privilege revoked, the ON CONFLICT index gone), or with 23502 for a NOT NULL column it does
    not write that nothing fills (a column added without a default). That SQL is fixed and every value is a
    bound parameter, so no record can cause it: a failure of the whole, held (retried forever) until the
    schema is repaired, where the same error as a record's would dead-letter every event."""


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
        refused: tuple[Statement, psycopg.Error] | None = None
        t0 = time.perf_counter()
        async with self.pool.connection() as conn:
            try:
                async with conn.transaction():
                    async with conn.cursor() as cur:
                        for st in projection.statements:
                            rows = [row for ev in events for row in st.rows(ev)]
                            if not rows:
                                continue
                            try:
                                await cur.executemany(st.sql, rows)
                            except psycopg.Error as exc:
                                if (exc.sqlstate or "")[:2] == "42":
                                    _hold(type_, exc)
                                refused = (st, exc)
                                raise
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
            except psycopg.Error as exc:
                # Asked once the transaction is rolled back: an aborted one answers no query.
                if refused is not None and refused[1] is exc and await _unfillable_column(conn, *refused):
                    _hold(type_, exc)
                raise
        # Counted once committed: a rolled-back batch is retried and counted then.
        m.EVENTS_PROCESSED.labels(type_.value, "projection", "ok").inc(len(events))
        for name, ok in succeeded.items():
            m.EVENTS_PROCESSED.labels(type_.value, name, "ok").inc(ok)
        for f in failures:
            m.EVENTS_PROCESSED.labels(type_.value, f.handler, "failed").inc()
        return failures


def _hold(type_: EventType, exc: psycopg.Error) -> NoReturn:
    log.error(
        "the %s projection's tables refuse its SQL (SQLSTATE %s: %s); holding the events "
        "until the tables are repaired",
        type_.value,
        exc.sqlstate,
        exc,
        extra={"type": type_.value, "sqlstate": exc.sqlstate},
    )
    raise ProjectionUnusable(f"{exc.sqlstate}: {exc}") from exc


# A BEFORE ROW trigger on INSERT (4) or UPDATE (16): pg_trigger.tgtype bits 1 (ROW) and 2 (BEFORE).
_FILLING_TRIGGER = """
    SELECT EXISTS (
        SELECT 1 FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = %s AND c.relname = %s AND NOT t.tgisinternal AND t.tgenabled <> 'D'
            AND t.tgtype & 3 = 3 AND t.tgtype & 20 <> 0)"""


async def _unfillable_column(conn: psycopg.AsyncConnection[Any], st: Statement, exc: psycopg.Error) -> bool:
    """Whether `exc` is a NOT NULL column of the statement's own table that the statement does not write
    and no trigger can fill per row: then its default (none, or NULL) fails every row alike, whatever the
    record holds. With such a trigger, the NULL is the trigger's answer to this record: the record's own."""
    diag = exc.diag
    if exc.sqlstate != "23502" or diag.table_name != st.table or diag.column_name in st.columns:
        return False
    # In a transaction of its own: one left open would be rolled back by the pool with a warning each retry.
    async with conn.transaction():
        row = await (await conn.execute(_FILLING_TRIGGER, (diag.schema_name, st.table))).fetchone()
    return row is not None and not row[0]
