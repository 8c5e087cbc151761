"""The soak's user handler: counts its calls per (handler, tenant, event) in the projection's transaction.

A row is the handler's side effect; `calls` above 1 is a run again (documented: crashes, pauses past the
session timeout), a missing row or one for an event the database lacks is a defect.
"""

from __future__ import annotations

from sentpipe import CanonicalEvent, HandlerContext, handler

TABLE = "soak_handler_calls"
CREATE = (
    f"CREATE TABLE IF NOT EXISTS {TABLE} (handler text NOT NULL, tenant text NOT NULL,"
    " event_id text NOT NULL, calls int NOT NULL, PRIMARY KEY (handler, tenant, event_id))"
)


async def _count(name: str, event: CanonicalEvent, ctx: HandlerContext) -> None:
    await ctx.conn.execute(
        f"INSERT INTO {TABLE} (handler, tenant, event_id, calls) VALUES (%s, %s, %s, 1)"
        f" ON CONFLICT (handler, tenant, event_id) DO UPDATE SET calls = {TABLE}.calls + 1",
        (name, event.tenant, event.id),
    )


@handler("message.status.updated", name="soak-status")
async def status(event: CanonicalEvent, ctx: HandlerContext) -> None:
    await _count("soak-status", event, ctx)


@handler("message.inbound.received", name="soak-inbound")
async def inbound(event: CanonicalEvent, ctx: HandlerContext) -> None:
    await _count("soak-inbound", event, ctx)


@handler("template.approval.updated", name="soak-template")
async def template(event: CanonicalEvent, ctx: HandlerContext) -> None:
    await _count("soak-template", event, ctx)


@handler("message.status.updated", name="soak-all")
@handler("message.inbound.received", name="soak-all")
@handler("template.approval.updated", name="soak-all")
async def every(event: CanonicalEvent, ctx: HandlerContext) -> None:
    await _count("soak-all", event, ctx)
