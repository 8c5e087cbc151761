"""A user handler for tests: records each call and fails permanently for ids in the `poison` table.

Tests create both tables (`create_fixture_tables`) and toggle poison rows to break and fix the handler.
"""

from __future__ import annotations

import psycopg

from sentpipe.processors.handlers import HandlerContext, PermanentError, RetryableError, handler
from sentpipe.schemas.events import CanonicalEvent


def create_fixture_tables(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as c:
        c.execute("CREATE TABLE IF NOT EXISTS handler_calls (event_id text NOT NULL)")
        c.execute("CREATE TABLE IF NOT EXISTS poison (event_id text PRIMARY KEY)")
        c.execute("CREATE TABLE IF NOT EXISTS flaky (event_id text PRIMARY KEY)")


@handler("message.inbound.received", name="test-poison")
@handler("message.status.updated", name="test-poison")
async def poison_check(event: CanonicalEvent, ctx: HandlerContext) -> None:
    await ctx.conn.execute("INSERT INTO handler_calls (event_id) VALUES (%s)", (event.id,))
    cur = await ctx.conn.execute("SELECT 1 FROM poison WHERE event_id = %s", (event.id,))
    if await cur.fetchone():
        raise PermanentError(f"poisoned event {event.id}")


_failed_once: set[str] = set()


@handler("template.approval.updated", name="test-flaky")
async def flaky(event: CanonicalEvent, ctx: HandlerContext) -> None:
    """Fails with a temporary error the first time this process sees an id listed in `flaky`."""
    cur = await ctx.conn.execute("SELECT 1 FROM flaky WHERE event_id = %s", (event.id,))
    if await cur.fetchone() and event.id not in _failed_once:
        _failed_once.add(event.id)
        raise RetryableError("flaky dependency")
