"""Faust's aiokafka transport, with a cheaper hand-off of each fetched record to the streams, and a consumer
thread that stops when the broker is away.

Faust's consumer hands every fetched record over with `wait_first(callback(message), suspend_flow.wait())`:
four asyncio tasks per record (the callback, and waits on the flow, stop and crash events), so that a
rebalance can abandon a callback blocked on a full stream buffer. Nearly every callback finishes without
waiting for anything (it decodes the record and puts it on a buffer with room), and those four tasks were
about a fifth of the router's CPU in a py-spy profile of a drain.

Here the consumer first runs the callback's first step itself. If it finishes there, nothing else is
needed: the same code ran, in the same order. If it has to wait, the rest of it goes through Faust's
`wait_first` as before, so a rebalance can still abandon it.
"""

from __future__ import annotations

import asyncio
import logging
import types
from collections.abc import Coroutine, Generator
from typing import Any, ClassVar

from faust.transport.drivers import aiokafka as faust_aiokafka
from mode import Service
from mode.services import WaitArgT, WaitResults

from sentpipe.processors import record_reader

log = logging.getLogger("sentpipe.worker")


@types.coroutine
def resume(coro: Coroutine[Any, Any, Any], pending: Any) -> Generator[Any, None, Any]:
    """Go on with a coroutine someone already stepped, which yielded `pending` (the future it waits on).

    The task that runs this sees `pending` as if the coroutine had yielded it to that task: it waits for
    it, then steps the coroutine, and a cancellation is thrown into the coroutine where it waits."""
    while True:
        try:
            yield pending
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:  # cancellation included: the coroutine decides what it means
            step: Any = coro.throw
            arg: Any = exc
        else:
            step, arg = coro.send, None
        try:
            pending = step(arg)
        except StopIteration as stop:
            return stop.value


async def _finish(coro: Coroutine[Any, Any, Any], pending: Any) -> Any:
    return await resume(coro, pending)  # a native coroutine: Faust's wait_first tells Awaitables apart


class EagerWaitFirst(Service):
    """A service whose `wait_first` runs a first coroutine's first step before it makes any task."""

    async def wait_first(self, *coros: WaitArgT, timeout: Any = None) -> WaitResults:
        first = coros[0] if coros else None
        if isinstance(first, Coroutine):
            try:
                pending = first.send(None)
            except StopIteration as stop:
                _close(coros[1:])
                if self._stopped.is_set() or self._crashed.is_set():
                    return WaitResults([], [], True)  # as Faust answers once the service stops
                return WaitResults([first], [stop.value], False)
            except BaseException:
                _close(coros[1:])
                raise
            # It waits for something (a full buffer, the flow held for a rebalance): as Faust does it.
            coros = (_finish(first, pending), *coros[1:])
        return await super().wait_first(*coros, timeout=timeout)


def _close(coros: tuple[WaitArgT, ...]) -> None:
    for coro in coros:
        if isinstance(coro, Coroutine):
            coro.close()  # never started: no "never awaited" warning


class StoppableConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    """Faust's consumer thread, whose stop survives a fetch waiting for a broker that is away.

    aiokafka 0.14's `Fetcher.close` cancels its pending fetch requests and awaits them without catching
    the CancelledError they end with, when one of them sleeps out a retry backoff. The error left the
    thread's stop half done: a traceback in the log, and the thread never said it had shut down, so the
    worker's stop waited out its whole bound (55 s) before the projector was told to stop."""

    async def on_thread_stop(self) -> None:
        try:
            await super().on_thread_stop()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():  # this stop itself is cancelled: not ours to keep
                raise
            log.warning("the Kafka consumer stopped with a fetch still waiting for the broker")


class EagerConsumer(EagerWaitFirst, faust_aiokafka.Consumer):
    """Faust's aiokafka consumer with the eager `wait_first` and the stoppable thread."""

    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return StoppableConsumerThread(self, loop=self.loop, beacon=self.beacon)


class EagerTransport(faust_aiokafka.Transport):
    Consumer: ClassVar[Any] = EagerConsumer


def use_eager_consumer(app: Any) -> None:
    """Give the app the transport above, whose fetches read on past a header name that is not UTF-8;
    before anything has asked for its consumer."""
    record_reader.install()
    app.transport = EagerTransport(app.conf.broker_consumer, app)
