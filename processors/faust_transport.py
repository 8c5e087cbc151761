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

The consumer also hands the fetch a copy of the partitions it may return, and puts back what it fetched
for a partition paused since. Faust 0.15.3 gives the consumer thread its live set of active partitions,
which the main loop pauses and resumes partitions in while the thread's fetch waits (up to a second) for
records; aiokafka's `fetched_records` reads an empty set as "every partition". When recovery had paused
them all, a fetch asked for while some were active returned the records of paused ones, and Faust's
`getmany` dropped every record of a partition not active when it reached it, aiokafka's position
already past them. Both kinds were traced in a rolling restart of three routers. Standby changelog
partitions, just sought to their copy's offsets before being resumed: one returned 780..833, all
dropped, the copy 54 marks short (when the next records are applied, that is the store's `never reached
this copy` gap). Stream partitions, sought to the committed offsets while the last router recovered
alone: raw[8] returned 874..1747, all dropped, until the router's watchdog sought it back 15 s later
(`raw records fetched but never routed`). The same drop with records still arriving puts the next ones
after a hole (`raw records skipped by the stream`; not yet caught in a trace).
"""

from __future__ import annotations

import asyncio
import logging
import types
from collections.abc import AsyncIterator, Coroutine, Generator, Mapping
from typing import Any, ClassVar

from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP, Message
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

    async def _fetch_records(
        self,
        consumer: Any,
        active_partitions: Any,
        timeout: float | None = None,
        max_records: int | None = None,
    ) -> Fetched:
        records = await super()._fetch_records(consumer, active_partitions, timeout, max_records)
        return Fetched(records, _positions(consumer, records))

    async def rewind(self, tp: TP, offset: int, fetched_to: int | None) -> bool:
        return rewind(self._ensure_consumer(), tp, offset, fetched_to)


class Fetched(dict[TP, list[Any]]):
    """One fetch's records, with each partition's position right after it (in the consumer thread)."""

    def __init__(self, records: Mapping[TP, list[Any]], positions: Mapping[TP, int]) -> None:
        super().__init__(records)
        self.positions = dict(positions)


def _positions(consumer: Any, tps: Any) -> dict[TP, int]:
    subscription = consumer._subscription
    out: dict[TP, int] = {}
    for tp in tps:
        if subscription.is_assigned(tp):
            state = subscription.subscription.assignment.state_value(tp)
            if state.has_valid_position:
                out[tp] = state.position
    return out


def rewind(consumer: Any, tp: TP, offset: int, fetched_to: int | None) -> bool:
    """Seek `tp` back to `offset`, the first record a fetch returned and the streams never got, unless its
    position moved since that fetch (`fetched_to`): a seek since (recovery's, to the committed offset)
    decides where it reads. In the consumer thread, which owns the aiokafka consumer."""
    if fetched_to is None or _positions(consumer, [tp]).get(tp) != fetched_to:
        return False
    consumer.seek(tp, offset)
    return True


class Undelivered:
    """Which records of one fetch go to the streams, and where each partition that lost some resumes.

    A partition paused after the fetch loses the rest of the fetch's records for it, even when it is
    resumed before the iteration reaches them (delivered, they would follow a hole); the fetch is read
    again from its first undelivered record."""

    def __init__(self) -> None:
        self.rewind_to: dict[TP, int] = {}

    def deliver(self, tp: TP, offset: int, active: bool) -> bool:
        if tp in self.rewind_to:
            return False
        if not active:
            self.rewind_to[tp] = offset
        return active


class EagerConsumer(EagerWaitFirst, faust_aiokafka.Consumer):
    """Faust's aiokafka consumer with the eager `wait_first` and the stoppable thread."""

    _thread: StoppableConsumerThread

    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return StoppableConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def _getmany(self, active_partitions: set[TP] | None, timeout: float) -> Any:
        # A copy: the thread filters by it while this loop pauses and resumes partitions, and an emptied
        # set means every partition to aiokafka.
        fetching = None if active_partitions is None else frozenset(active_partitions)
        return await self._thread.getmany(fetching, timeout)  # type: ignore[arg-type]

    async def getmany(self, timeout: float) -> AsyncIterator[tuple[TP, Message]]:  # type: ignore[override]
        """Faust 0.15.3's `Consumer.getmany`, which puts back what it fetched for a partition paused since
        instead of dropping it (module docstring)."""
        records, active_partitions = await self._wait_next_records(timeout)
        generation_id = self.app.consumer_generation_id
        if records is None or self.should_stop:
            return
        positions = getattr(records, "positions", {})
        undelivered = Undelivered()
        if self.flow_active:
            for tp, record in self.scheduler.iterate(records):
                # A rebalance: what is left is sought again by the recovery it starts.
                if not self.flow_active or generation_id != self.app.consumer_generation_id:
                    break
                active = (
                    active_partitions is None or tp in active_partitions or tp in self._buffered_partitions
                )
                if undelivered.deliver(tp, record.offset, active):
                    self.app.monitor.track_tp_end_offset(tp, self.highwater(tp))
                    yield tp, self._to_message(tp, record)
                elif undelivered.rewind_to.get(tp) == record.offset:
                    await self._rewind(tp, record.offset, positions.get(tp))
        else:
            try:
                await self.perform_seek()  # as Faust does: its recovery seeks the rest
            except Exception as ex:
                self.log.warning(f"exception performing seek when flow not active {ex}")

    async def _rewind(self, tp: TP, offset: int, fetched_to: int | None) -> None:
        if await self._thread.call_thread(self._thread.rewind, tp, offset, fetched_to):
            log.debug(
                "%s[%d] paused after its fetch: read again from offset %d", tp.topic, tp.partition, offset
            )


class EagerTransport(faust_aiokafka.Transport):
    Consumer: ClassVar[Any] = EagerConsumer


def use_eager_consumer(app: Any) -> None:
    """Give the app the transport above, whose fetches read on past a header name that is not UTF-8;
    before anything has asked for its consumer."""
    record_reader.install()
    app.transport = EagerTransport(app.conf.broker_consumer, app)
