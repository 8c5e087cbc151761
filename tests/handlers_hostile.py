"""User handlers for tests that misbehave on purpose, chosen by the inbound message's text ("hostile:KIND").

Every other event is handled normally (one row in `hostile_calls`, created by the test). Run by a worker
(SENTPIPE_HANDLER_MODULES) in tests/test_handlers_hostile.py; each kind must cost only its own event.
"""

from __future__ import annotations

import asyncio
import sys
import time

from sentpipe.processors.handlers import HandlerContext, handler
from sentpipe.schemas.events import CanonicalEvent

# The worker running these gets SENTPIPE_HANDLER_TIMEOUT_S=2 (tests/test_handlers_hostile.py).
PREFIX = "hostile:"


class BadStr(Exception):
    def __str__(self) -> str:
        raise RuntimeError("this exception cannot be printed")


async def _hang(ctx: HandlerContext) -> None:
    await asyncio.Event().wait()


async def _pg_sleep(ctx: HandlerContext) -> None:
    await ctx.conn.execute("SELECT pg_sleep(120) /* hostile-pg-sleep */")


RAISES: dict[str, BaseException] = {
    "exit": SystemExit(3),
    "keyboard": KeyboardInterrupt(),
    "generator": GeneratorExit(),
    "cancel": asyncio.CancelledError(),
    "badstr": BadStr(),
    "surrogate": ValueError("undecodable \udcff byte"),
    "own-timeout": TimeoutError("the handler's own API did not answer"),
}
# The class name each kind is dead-lettered under.
EXPECTED_CLASS = {
    "exit": "SystemExit",
    "keyboard": "KeyboardInterrupt",
    "generator": "GeneratorExit",
    "cancel": "CancelledError",
    "badstr": "BadStr",
    "surrogate": "ValueError",
    "own-timeout": "TimeoutError",
    "hang": "HandlerTimeout",
    "pg-sleep": "HandlerTimeout",
    "block-sleep": "HandlerTimeout",
    "block-cpu": "HandlerTimeout",
}


# Kinds that end the projector's event loop: they cost a restart (tests/test_handlers_hostile.py).
ENDS_THE_LOOP = ("cancel-others", "loop-stop", "callback-exit")


@handler("message.inbound.received", name="test-hostile")
async def hostile(event: CanonicalEvent, ctx: HandlerContext) -> None:
    text = str(event.data.get("text", ""))
    kind = text.removeprefix(PREFIX) if text.startswith(PREFIX) else None
    if kind is None:
        await ctx.conn.execute("INSERT INTO hostile_calls (event_id) VALUES (%s)", (event.id,))
    elif kind == "hang":
        await _hang(ctx)
    elif kind == "pg-sleep":
        await _pg_sleep(ctx)
    elif kind == "block-sleep":
        time.sleep(3600)  # noqa: ASYNC251 - blocks the event loop itself: asyncio's timeout cannot fire
    elif kind == "cancel-others":  # a "clean shutdown" helper run by mistake
        me = asyncio.current_task()
        for t in asyncio.all_tasks():
            if t is not me:
                t.cancel()
        await asyncio.sleep(0.1)
    elif kind == "loop-stop":
        asyncio.get_running_loop().stop()
        await asyncio.sleep(0.1)
    elif kind == "callback-exit":  # the loop lets a callback's SystemExit through, unlike a task's
        asyncio.get_running_loop().call_soon(sys.exit, 3)
        await asyncio.sleep(0.1)
    elif kind == "block-cpu":
        while True:
            pass
    else:
        raise RAISES[kind]
