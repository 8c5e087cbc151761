"""The console's blocking work (an API call's Kafka scan or query, a replay or redrive job), each in a daemon
thread whose outcome settles a future on the loop.

Not the default executor: asyncio.run waits for its threads at exit, so a long trace scan or a job that did
not stop in time held the console past its stop bound, until the orchestrator's SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from sentpipe.processors.consumer_thread import settle

T = TypeVar("T")

# API calls running at once (a Kafka scan or a database query each); the others wait their turn, for
# SLOT_WAIT_S at most: six calls that never return (a hung query) would otherwise hold every later request.
MAX_CALLS = 6
SLOT_WAIT_S = 30.0
_call_slots: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
    weakref.WeakKeyDictionary()
)


class NoFreeSlot(Exception):
    """Every call slot stayed taken for SLOT_WAIT_S."""


def in_daemon_thread(
    fn: Callable[[], T], name: str, then: Callable[[], None] | None = None
) -> asyncio.Future[T]:
    """`fn()` in a daemon thread; the future returned gets its outcome on the running loop, after `then()`."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def ended(result: Any, exc: BaseException | None) -> None:
        if then is not None:
            then()
        settle(done, result, exc)

    def call() -> None:
        try:
            result, exc = fn(), None
        except BaseException as error:
            result, exc = None, error
        with contextlib.suppress(RuntimeError):  # the loop has closed
            loop.call_soon_threadsafe(ended, result, exc)

    threading.Thread(target=call, name=name, daemon=True).start()
    return done


async def off_loop(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)` in a daemon thread, at most MAX_CALLS at once; NoFreeSlot after SLOT_WAIT_S."""
    slots = _call_slots.setdefault(asyncio.get_running_loop(), asyncio.Semaphore(MAX_CALLS))
    try:
        await asyncio.wait_for(slots.acquire(), SLOT_WAIT_S)
    except TimeoutError:
        raise NoFreeSlot(f"{MAX_CALLS} earlier calls are still running after {SLOT_WAIT_S:g} s") from None
    try:
        # The slot is freed when the call ends, not when its request does: a page gone leaves it running.
        done = in_daemon_thread(functools.partial(fn, *args, **kwargs), "console-call", then=slots.release)
    except BaseException:
        slots.release()
        raise
    return await done
