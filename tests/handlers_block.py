"""A user handler for tests that blocks the worker's event loop (a synchronous sleep inside a coroutine),
the way a handler calling a blocking client would."""

from __future__ import annotations

import time

from sentpipe.processors.handlers import HandlerContext, handler
from sentpipe.schemas.events import CanonicalEvent

BLOCK_S = 15.0  # past the 10 s a probe waits, under the 20 s after which the guard interrupts it
_blocked = False


@handler("message.status.updated", name="test-block")
async def block_the_loop(event: CanonicalEvent, ctx: HandlerContext) -> None:
    global _blocked
    if not _blocked:  # once per process, so the test's worker can be stopped afterwards
        _blocked = True
        time.sleep(BLOCK_S)  # noqa: ASYNC251 - blocking the loop is the point
