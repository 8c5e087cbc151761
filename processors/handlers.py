"""The handler API: your own async functions, run for each canonical event in the projection's transaction.

    from sentpipe import handler, PermanentError, RetryableError

    @handler("message.status.updated")
    async def mark_order_delivered(event, ctx):
        if event.status == "delivered":
            await ctx.conn.execute("UPDATE orders SET delivered = true WHERE msg_id = %s", (event.subject,))

A handler runs at least once per event (replays and crashes run it again): make it idempotent.
Raise RetryableError for temporary trouble (retried with backoff, the stream waits); PermanentError (or any
other exception) sends the event to the dead-letter topic and processing moves on.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from psycopg import AsyncConnection

from sentpipe.schemas.events import ROUTED_TYPES, CanonicalEvent, EventType


class RetryableError(Exception):
    """A temporary failure: the batch is retried with exponential backoff, nothing is skipped."""


class PermanentError(Exception):
    """This event can never succeed: it goes to the dead-letter topic."""


@dataclass(frozen=True, slots=True)
class HandlerContext:
    conn: AsyncConnection  # inside the projection's transaction (a savepoint per handler call)
    log: logging.Logger
    attempt: int  # 1 on the first try of this batch


Handler = Callable[[CanonicalEvent, HandlerContext], Awaitable[None]]


@dataclass
class HandlerRegistry:
    by_type: dict[EventType, list[tuple[str, Handler]]] = field(default_factory=dict)

    def register(self, type_: EventType | str, fn: Handler, name: str | None = None) -> Handler:
        t = EventType(type_)
        if t not in ROUTED_TYPES:
            raise ValueError(f"handlers can be registered for {', '.join(x.value for x in ROUTED_TYPES)}")
        self.by_type.setdefault(t, []).append((name or f"{fn.__module__}.{fn.__qualname__}", fn))
        return fn

    def for_type(self, type_: EventType) -> list[tuple[str, Handler]]:
        return self.by_type.get(type_, [])

    def clear(self) -> None:
        self.by_type.clear()


registry = HandlerRegistry()


def handler(type_: EventType | str, name: str | None = None) -> Callable[[Handler], Handler]:
    """Register an async handler for a canonical type (module import time)."""

    def deco(fn: Handler) -> Handler:
        return registry.register(type_, fn, name)

    return deco


def load_modules(modules: Iterable[str]) -> None:
    """Import the modules listed in SENTPIPE_HANDLER_MODULES so their @handler decorators run."""
    for module in modules:
        importlib.import_module(module)
