"""One daemon thread that makes a consumer's blocking calls, in order, for an event loop.

librdkafka's consumer calls wait on one another: `position()` waits behind a synchronous commit, and that
commit waits as long as the broker does not answer (measured: the whole 150 s a broker was frozen with
SIGSTOP). Made on the loop, a lag read froze the process, probes and all. Made in a pool thread, a commit
that never returned also held a stopped process at exit, where the interpreter joins pool threads. Here
each call waits in one daemon thread: the loop awaits it with deadlines of its own, and exit never waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

_T = TypeVar("_T")

_Call = tuple[Callable[[], Any], "asyncio.Future[Any]", asyncio.AbstractEventLoop]


class ConsumerThread:
    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        # Started by the first call: a stage that never runs (one built by a test) leaves no thread behind.
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)

    async def call(self, fn: Callable[..., _T], *args: object) -> _T:
        """fn(*args) in the thread, after the calls before it. Cancelling the wait before the call starts
        skips it (a poll nobody waits for would move the position past records nobody applies); once
        started, it runs to its end and its result is dropped."""
        if self._thread.ident is None:
            self._thread.start()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_T] = loop.create_future()
        self._calls.put((functools.partial(fn, *args), future, loop))
        return await future

    def close(self) -> None:
        """The thread ends after the calls already asked for. One that never returns keeps it waiting there,
        which holds nothing else: a daemon thread, it never delays the process's exit."""
        self._calls.put(None)

    def _serve(self) -> None:
        while (call := self._calls.get()) is not None:
            fn, future, loop = call
            if future.cancelled():
                continue
            try:
                result: Any = fn()
            except BaseException as exc:
                _settle_from_thread(loop, future, None, exc)
            else:
                _settle_from_thread(loop, future, result, None)


def _settle_from_thread(
    loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], result: Any, exc: BaseException | None
) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
        loop.call_soon_threadsafe(settle, future, result, exc)


def settle(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    """On the loop: `future`'s outcome from a thread, unless its waiter has gone."""
    if future.done():  # its waiter was cancelled
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
