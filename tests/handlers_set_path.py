"""A user handler that changes its session: `SET search_path` on the projection's pooled connection."""

from __future__ import annotations

from sentpipe.processors.handlers import HandlerContext, handler
from sentpipe.schemas.events import CanonicalEvent


@handler("message.inbound.received", name="test-set-path")
async def set_path(event: CanonicalEvent, ctx: HandlerContext) -> None:
    # Not SET LOCAL: it outlives the transaction, on the connection the pool hands to the next batch.
    await ctx.conn.execute("SET search_path TO pg_catalog")
