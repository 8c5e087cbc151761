"""The router's consumer hand-off (processors/faust_transport.py): same outcomes as Faust's `wait_first`,
without tasks when the callback does not wait. Pure logic on mode services; the pipeline, oracle and
rebalance tests run it against the broker."""

from __future__ import annotations

import asyncio
import gc
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import mode
import pytest

from sentpipe.processors.faust_transport import EagerConsumer, EagerWaitFirst, resume


class Eager(EagerWaitFirst, mode.Service):
    pass


@contextmanager
def counting_tasks() -> Iterator[list[int]]:
    loop = asyncio.get_running_loop()
    made = [0]

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        made[0] += 1
        return asyncio.Task(coro, loop=loop, **kwargs)

    loop.set_task_factory(factory)
    try:
        yield made
    finally:
        loop.set_task_factory(None)


async def test_a_callback_that_does_not_wait_runs_at_once_without_tasks() -> None:
    svc, flow = Eager(), asyncio.Event()
    ran: list[str] = []

    async def callback() -> str:
        ran.append("callback")
        return "done"

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an unawaited flow wait would warn when collected
        with counting_tasks() as made:
            cb = callback()
            results = await svc.wait_first(cb, flow.wait())
        gc.collect()
    assert made == [0]
    assert ran == ["callback"]
    assert results.done == [cb] and results.results == ["done"] and results.stopped is False


async def test_a_callback_that_waits_finishes_through_faust_wait_first() -> None:
    svc, flow = Eager(), asyncio.Event()
    gate: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    steps: list[str] = []

    async def callback() -> int:
        steps.append("before")
        value = await gate
        steps.append("after")
        await asyncio.sleep(0)  # a second suspension: resume() keeps stepping it
        return value + 1

    with counting_tasks() as made:
        waiting = asyncio.ensure_future(svc.wait_first(callback(), flow.wait()))
        await asyncio.sleep(0)
        assert steps == ["before"]  # its first step ran before any task of wait_first's own
        gate.set_result(41)
        results = await waiting
    assert steps == ["before", "after"]
    assert results.results == [42] and results.stopped is False
    assert made[0] >= 2  # Faust's tasks: the rest of the callback and the flow wait (and stop, crash)


async def test_a_waiting_callback_is_cancelled_where_it_waits_when_the_flow_stops_first() -> None:
    svc, flow = Eager(), asyncio.Event()
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    seen: list[str] = []

    async def callback() -> None:
        try:
            await gate
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise
        seen.append("finished")

    waiting = asyncio.ensure_future(svc.wait_first(callback(), flow.wait()))
    await asyncio.sleep(0)
    flow.set()  # a rebalance: Faust abandons the callback blocked on a full buffer
    results = await waiting
    await asyncio.sleep(0)
    assert seen == ["cancelled"]
    assert gate.cancelled()
    assert results.results == [True]  # the flow's wait won, as in Faust


@pytest.mark.parametrize("when", ["first step", "after waiting"])
async def test_an_error_in_the_callback_reaches_the_caller(when: str) -> None:
    svc, flow = Eager(), asyncio.Event()

    async def callback() -> None:
        if when == "after waiting":
            await asyncio.sleep(0)
        raise ValueError("bad record")

    with pytest.raises(ValueError, match="bad record"):
        await svc.wait_first(callback(), flow.wait())


async def test_a_stopped_service_answers_stopped_as_faust_does() -> None:
    svc, flow = Eager(), asyncio.Event()

    async def callback() -> int:
        return 1

    await svc.stop()
    results = await svc.wait_first(callback(), flow.wait())
    assert results.stopped is True and results.done == []
    faust_like = await mode.Service().wait_first(callback(), flow.wait())
    assert faust_like.stopped is False  # a service that never stopped: the callback's result
    assert faust_like.results[0] == 1


async def test_resume_throws_a_cancellation_into_the_coroutine() -> None:
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    closed: list[str] = []

    async def inner() -> None:
        try:
            await gate
        finally:
            closed.append("finally")

    coro = inner()
    pending = coro.send(None)

    async def rest() -> Any:
        return await resume(coro, pending)

    task = asyncio.ensure_future(rest())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert closed == ["finally"]


def test_the_worker_app_consumes_through_the_eager_consumer() -> None:
    from sentpipe.processors.worker import create_app
    from sentpipe.settings import Settings

    app = create_app(Settings())
    assert isinstance(app.consumer, EagerConsumer)
