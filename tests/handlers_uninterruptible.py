"""A user handler stuck in C code that no signal interrupts, for the event whose inbound text is "stuck".

A relocked mutex: pthread_mutex_lock waits on, whatever signals arrive, so the blocked-handler guard can only
end the process. Every other event gets a row in `stuck_calls` (created by the test).
"""

from __future__ import annotations

import ctypes

from sentpipe.processors.handlers import HandlerContext, handler
from sentpipe.schemas.events import CanonicalEvent

STUCK = "stuck"


def stuck_in_c() -> None:
    libc = ctypes.CDLL(None)
    mutex = ctypes.create_string_buffer(64)  # zeroed: PTHREAD_MUTEX_INITIALIZER, a normal mutex
    libc.pthread_mutex_lock(mutex)
    libc.pthread_mutex_lock(mutex)  # relocked by its owner: waits forever


@handler("message.inbound.received", name="test-stuck")
async def stuck(event: CanonicalEvent, ctx: HandlerContext) -> None:
    if event.data.get("text") == STUCK:
        stuck_in_c()
    await ctx.conn.execute("INSERT INTO stuck_calls (event_id) VALUES (%s)", (event.id,))
