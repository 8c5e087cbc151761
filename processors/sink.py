"""Apply a batch of canonical events to PostgreSQL: projections and user handlers in one transaction."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import psycopg
from psycopg.pq import TransactionStatus
from psycopg_pool import AsyncConnectionPool

from sentpipe import metrics as m
from sentpipe.processors.blocked_handlers import UNINTERRUPTIBLE, CallKey, UninterruptibleCalls
from sentpipe.processors.handlers import (
    ENDED,
    EndedTheLoop,
    HandlerAbandoned,
    HandlerContext,
    HandlerError,
    HandlerRegistry,
    HandlerTimeout,
    RetryableError,
    TransactionEnded,
)
from sentpipe.processors.migrate import migrations
from sentpipe.processors.projections import PROJECTIONS, Statement
from sentpipe.processors.retry import UNKNOWN_ATTEMPTS, classify
from sentpipe.schemas.events import CanonicalEvent, EventType

log = logging.getLogger("sentpipe.handlers")


@dataclass(frozen=True, slots=True)
class HandlerFailure:
    event: CanonicalEvent
    handler: str
    error: Exception


class TypeHeld(Exception):
    """One event type's batch cannot be applied now, through no fault of its events nor of the database as a
    whole: that type's records are rolled back and read again (after a backoff, for as long as it lasts),
    while the other types of the batch are committed and go on."""


class ProjectionUnusable(TypeHeld):
    """The projection's own SQL was refused with SQLSTATE class 42 (a table dropped or renamed, a column
    renamed, a privilege revoked, the ON CONFLICT index gone), or with 23502 for a NOT NULL column it does
    not write that nothing fills (a column added without a default). That SQL is fixed and every value is a
    bound parameter, so no record can cause it: the type is held until the schema is repaired, where the
    same error as a record's would dead-letter every event. Retried in place, it held every other type of
    the batch too. A statement a trigger builds per row with EXECUTE is not that SQL (`_built_per_row`)."""


class HandlersHeld(TypeHeld):
    """Two calls of a handler timed out before any succeeded: a lock or a database too slow for anyone
    looks the same as events of its own, so the batch is rolled back and read again, not dead-lettered."""


class BatchLostToHandler(RetryableError):
    """A handler call closed the batch's connection, ended its transaction or went on past its limit: the
    batch is lost with it and applied again, that call left out as its event's failure."""


class DatabaseLost(RetryableError):
    """The batch's connection broke under a handler call (a database restart): the whole batch is applied
    again once the database answers."""


# Past this many suspects (or calls left out) remembered, the memory starts again: it orders calls,
# saves repeats.
MAX_SUSPECTS = 10_000
# A database restart breaks the connection once, under whichever call runs; a call that breaks it this many
# times (its own backend terminated) is taken to break it itself, and left out like one that closes it.
BROKEN_CALLS = 3
CLOSED = "closed the stage's database connection (ctx.conn belongs to the batch: never close it)"


class PostgresSink:
    def __init__(
        self,
        pool: AsyncConnectionPool,
        handlers: HandlerRegistry,
        uninterruptible: UninterruptibleCalls | None = None,
    ) -> None:
        self.pool = pool
        self.handlers = handlers
        # Calls that ended the process last time (blocked_handlers.py): their events' failures, not called.
        self.uninterruptible = uninterruptible
        # Handler call -> the timeout of its call in a held batch. Read again, these are called after
        # the others, so fresh events show whether the handler works at all before these are blamed.
        self._suspects: dict[CallKey, Exception] = {}
        # Handler call -> its failure, for calls that lost the batch (`BatchLostToHandler`): not
        # called again.
        self._left_out: dict[CallKey, Exception] = {}
        # Handler call -> how often it raised an error of unknown kind (a trigger's RAISE, an
        # SQLSTATE of no known class): retried with the batch that often, then that event's failure alone.
        # Left to the batch's retries, it dead-lettered the event without its projection after halving.
        self._unknown: dict[CallKey, int] = {}
        # Handler call -> how often the connection broke under it (`_closed_by`).
        self._broke: dict[CallKey, int] = {}
        # Calls applied in a committed transaction but not yet in a committed batch: what is remembered of
        # them is let go by `settle`, once the projector has committed the batch's offsets. Let go earlier,
        # a batch read again (held by another type) called them again: an uninterruptible one ended the
        # process again, and the restart, having forgotten the other type's suspects, held it again.
        self._applied: list[CallKey] = []
        self._counts: list[tuple[str, str, str, int]] = []  # (type, handler, outcome, events) to count
        # Told each time a handler call ends, whatever its outcome (the projector's progress within a batch).
        self.on_call: Callable[[CallKey], None] | None = None

    async def apply(
        self,
        type_: EventType,
        events: Sequence[CanonicalEvent],
        attempt: int,
        unknown_retries: int = UNKNOWN_ATTEMPTS - 1,
    ) -> list[HandlerFailure]:
        """One transaction, one pipelined round-trip for the projection rows, a savepoint per handler call.

        Temporary errors (database away, RetryableError) raise and roll the whole batch back; any other
        handler error is returned as a failure for the dead-letter topic while the batch commits, but one of
        unknown kind raises while the stage will retry the batch for it (`unknown_retries` more times).

        A call that times out (`HandlerTimeout`, or the server's statement_timeout or a cancel: SQLSTATE
        57014) is its event's failure, unless two time out before any call of that handler succeeds:
        then `HandlersHeld` is raised. A batch read again with nothing but such events blames them.
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
                                refused = (st, exc)
                                raise
                    m.HANDLER_SECONDS.labels(type_.value, "projection").observe(time.perf_counter() - t0)
                    for name, fn in handlers:
                        ok = 0
                        timed_out: list[HandlerFailure] = []
                        h0 = time.perf_counter()
                        calls, blamed = self._order(name, events)
                        for ev in calls:
                            key = CallKey(name, ev.tenant, ev.id)
                            left_out = self._left_out.get(key)
                            if left_out is not None:
                                failures.append(HandlerFailure(ev, name, left_out))
                                continue
                            why = self.uninterruptible.why(key) if self.uninterruptible else None
                            if why is not None:  # it ended the process last time
                                ended = HandlerTimeout(why) if why == UNINTERRUPTIBLE else EndedTheLoop(why)
                                failures.append(HandlerFailure(ev, name, ended))
                                continue
                            try:
                                try:
                                    async with conn.transaction():
                                        await fn(ev, HandlerContext(conn, log, attempt))
                                finally:
                                    if self.on_call is not None:
                                        self.on_call(key)
                            except Exception as exc:
                                # Retried as a lost connection (or a rolled-back batch), this call forever.
                                if isinstance(exc, TransactionEnded) or (
                                    conn.closed and self._closed_by(key, conn)
                                ):
                                    self._leave_out(key, exc)
                                if _savepoint_gone(exc, conn):
                                    self._leave_out(key, TransactionEnded(ENDED))
                                if conn.closed:
                                    raise DatabaseLost(f"{name}: {type(exc).__name__}") from exc
                                if _timed_out(exc):
                                    timed_out.append(HandlerFailure(ev, name, exc))
                                    if ok == 0 and len(timed_out) > 1:
                                        self._hold_timeouts(type_, timed_out)
                                    continue
                                kind = classify(exc)
                                # Bounded per call and by the stage's retries for unknown errors left to
                                # the batch: two calls' would use those up first. Not by the attempt, which
                                # counts a database outage's retries too: after one, the first such error
                                # was its event's failure at once.
                                if kind == "temporary" or (
                                    kind == "unknown" and unknown_retries > 0 and self._again(key)
                                ):
                                    raise
                                failures.append(HandlerFailure(ev, name, exc))
                            else:
                                # The savepoint's end does not notice: the next call would.
                                if conn.closed and self._closed_by(key, conn):
                                    self._leave_out(key, None)
                                if conn.closed:
                                    raise DatabaseLost(f"{name}: the connection broke")
                                ok += 1
                        failures += timed_out + blamed
                        succeeded[name] = ok
                        m.HANDLER_SECONDS.labels(type_.value, name).observe(time.perf_counter() - h0)
            except psycopg.Error as exc:
                # Asked once the transaction is rolled back: an aborted one answers no query.
                if refused is not None and refused[1] is exc:
                    if (exc.sqlstate or "")[:2] == "42" and not _built_per_row(exc):
                        _hold(type_, exc, await _missing_migrations(conn))
                    if await _unfillable_column(conn, *refused):
                        _hold(type_, exc)
                raise
        self._applied += [CallKey(name, ev.tenant, ev.id) for name, _ in handlers for ev in events]
        # Counted once the batch is committed: a batch rewound is applied again and counted then.
        self._counts.append((type_.value, "projection", "ok", len(events)))
        self._counts += [(type_.value, name, "ok", ok) for name, ok in succeeded.items()]
        self._counts += [(type_.value, f.handler, "failed", 1) for f in failures]
        return failures

    def settle(self) -> None:
        """The batch's offsets are committed: its calls are settled, one way or the other."""
        if self._suspects or self._left_out or self._unknown or self._broke:
            for key in self._applied:
                self._suspects.pop(key, None)
                self._left_out.pop(key, None)
                self._unknown.pop(key, None)
                self._broke.pop(key, None)
        if self.uninterruptible:
            self.uninterruptible.settle(self._applied)
        for type_, name, outcome, n in self._counts:
            m.EVENTS_PROCESSED.labels(type_, name, outcome).inc(n)
        self._applied, self._counts = [], []

    def unsettle(self) -> None:
        """The batch is rewound: what it applied is applied again when it is read again."""
        self._applied, self._counts = [], []

    def _again(self, key: CallKey) -> bool:
        """Whether a call failing with an error of unknown kind is retried (with its batch) once more."""
        if len(self._unknown) > MAX_SUSPECTS:
            self._unknown.clear()
        seen = self._unknown[key] = self._unknown.get(key, 0) + 1
        return seen < UNKNOWN_ATTEMPTS

    def _order(
        self, name: str, events: Sequence[CanonicalEvent]
    ) -> tuple[list[CanonicalEvent], list[HandlerFailure]]:
        """The events to call, suspects last; and, when every event is a suspect, none: they are blamed
        on their earlier timeouts. Nothing new could show more than the held read did, and waiting for
        traffic that may never come would hold the stage for them."""
        if not self._suspects:
            return list(events), []
        earlier = [(ev, self._suspects.get(CallKey(name, ev.tenant, ev.id))) for ev in events]
        fresh = [ev for ev, exc in earlier if exc is None]
        if not fresh:
            return [], [HandlerFailure(ev, name, exc) for ev, exc in earlier if exc is not None]
        return fresh + [ev for ev, exc in earlier if exc is not None], []

    def _closed_by(self, key: CallKey, conn: psycopg.AsyncConnection[Any]) -> bool:
        """Whether the call the connection closed under closed it itself: cleanly (`close()`), or broken
        under it `BROKEN_CALLS` times. Taken for the handler's doing on the first break, a database restart
        dead-lettered the event whose call it happened to interrupt, its handler never run."""
        if not conn.broken:
            return True
        if len(self._broke) > MAX_SUSPECTS:
            self._broke.clear()
        seen = self._broke[key] = self._broke.get(key, 0) + 1
        return seen >= BROKEN_CALLS

    def _leave_out(self, key: CallKey, exc: Exception | None) -> NoReturn:
        """The call lost the batch: the batch is applied again without it, `exc` (or, the connection closed
        by the handler itself, CLOSED) its event's failure."""
        if not isinstance(exc, HandlerAbandoned | TransactionEnded):
            exc = HandlerError(CLOSED)
        if len(self._left_out) > MAX_SUSPECTS:
            self._left_out.clear()
        self._left_out[key] = exc.with_traceback(None)
        log.error(
            "handler %s %s with event %s; the batch is applied again without that call",
            key.handler,
            exc,
            key.event_id,
            extra={"handler": key.handler, "event_id": key.event_id, "error": type(exc).__name__},
        )
        raise BatchLostToHandler(f"{key.handler}: {exc}")

    def _hold_timeouts(self, type_: EventType, timed_out: list[HandlerFailure]) -> NoReturn:
        if len(self._suspects) > MAX_SUSPECTS:
            self._suspects.clear()
        # Without their tracebacks: those keep every frame of the failed call alive.
        self._suspects.update(
            {CallKey(f.handler, f.event.tenant, f.event.id): f.error.with_traceback(None) for f in timed_out}
        )
        first = timed_out[0]
        log.error(
            "handler %s timed out for the first %d events of a %s batch it was given; holding the batch "
            "(a lock or a slow database fails every call alike)",
            first.handler,
            len(timed_out),
            type_.value,
            extra={"type": type_.value, "handler": first.handler, "error": type(first.error).__name__},
        )
        raise HandlersHeld(f"{first.handler}: {type(first.error).__name__}, twice, before any call succeeded")


def _savepoint_gone(exc: Exception, conn: psycopg.AsyncConnection[Any]) -> bool:
    """Whether the call's savepoint was gone when the stage ended it: released by a COMMIT or ROLLBACK the
    call ran, which the guard sees only while no transaction follows (more SQL after it begins one, as
    does `COMMIT AND CHAIN`). Releasing it then fails (3B001); rolling back to it, after an error of the
    call's, fails too, and leaves the transaction aborted, where a rollback to a savepoint never does."""
    if conn.closed:
        return False
    if isinstance(exc, psycopg.Error) and exc.sqlstate == "3B001":
        return True
    return conn.info.transaction_status is TransactionStatus.INERROR


def _timed_out(exc: Exception) -> bool:
    return isinstance(exc, HandlerTimeout) or (isinstance(exc, psycopg.Error) and exc.sqlstate == "57014")


def _built_per_row(exc: psycopg.Error) -> bool:
    """Whether the statement that failed is one a trigger or function built with PL/pgSQL's EXECUTE (the
    innermost line of the error's CONTEXT): its text can differ per row, so it is not the projection's fixed
    SQL, and a class-42 error there (a per-message table missing, say) is the record's own."""
    innermost = (exc.diag.context or "").split("\n", 1)[0]
    return innermost.startswith("PL/pgSQL function ") and innermost.endswith("EXECUTE")


def _hold(type_: EventType, exc: psycopg.Error, missing: Sequence[str] = ()) -> NoReturn:
    # The server's primary message only: str(exc) carries its DETAIL, and a NOT NULL violation's DETAIL is
    # "Failing row contains (...)": a message's text and payload, in the log on every retry.
    why = f"SQLSTATE {exc.sqlstate}: {exc.diag.message_primary or type(exc).__name__}"
    if missing:
        lacks = f"migration{'s' * (len(missing) > 1)} {', '.join(missing)}"
        why += f"; the database lacks {lacks}: run `sentpipe db migrate`"
    log.error(
        "the %s projection's tables refuse its SQL (%s); holding the events until the tables are repaired",
        type_.value,
        why,
        extra={"type": type_.value, "sqlstate": exc.sqlstate},
    )
    raise ProjectionUnusable(why) from exc


async def _missing_migrations(conn: psycopg.AsyncConnection[Any]) -> list[str]:
    """The migrations this sentpipe has that the database lacks. A worker upgraded before `db migrate` ran
    (or started before it) was held with the server's words alone ("there is no unique or exclusion
    constraint matching the ON CONFLICT specification"), which do not say what to do."""
    try:
        async with conn.transaction():  # its own, as in `_unfillable_column`
            found = await (
                await conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")
            ).fetchone()
            done: set[str] = set()
            if found is not None and found[0]:
                done = {
                    v
                    for (v,) in await (await conn.execute("SELECT version FROM schema_migrations")).fetchall()
                }
    except psycopg.Error:  # a role that may not read the ledger: the server's words alone, as before
        return []
    return [m.version for m in migrations() if m.version not in done]


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
