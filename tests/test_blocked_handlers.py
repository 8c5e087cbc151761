# ruff: noqa: ASYNC251 - blocking the loop on purpose is what these tests are about
"""A handler call that blocks the event loop past its limit is interrupted, and nothing else ever is.

Pure logic of the guard (processors/blocked_handlers.py) on this test's own loop: no broker, no database.
The real worker meets blocking handlers in tests/test_handlers_hostile.py (kinds "block-sleep" and
"block-cpu"). Each test is bounded by pytest-timeout: without the guard the blocked ones never end.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from sentpipe.processors import blocked_handlers as blocked
from sentpipe.processors.handlers import HandlerContext, HandlerRegistry, HandlerTimeout
from sentpipe.schemas.events import CanonicalEvent, EventType, frame, normalize
from sentpipe.schemas.samples import SampleFactory

pytestmark = pytest.mark.timeout(60)
INBOUND = EventType.MESSAGE_INBOUND


def an_event() -> CanonicalEvent:
    body = SampleFactory(1).inbound().body
    return normalize(frame(body, webhook_id=None), tenant="t", received_at_ms=1_700_000_000_000)


@pytest.fixture
async def guard() -> AsyncIterator[blocked.BlockedHandlerGuard]:
    blocked.guard.start(asyncio.get_running_loop())
    before = blocked.guard.interrupted
    try:
        yield blocked.guard
    finally:
        blocked.guard.stop()
        assert blocked.guard._calls == {}, "a call left behind in the guard's table"
        del before


def registered(limit: float, fn: object) -> tuple[HandlerRegistry, object]:
    handlers = HandlerRegistry(timeout_s=limit)
    handlers.register(INBOUND, fn, "blocker")  # type: ignore[arg-type]
    return handlers, handlers.for_type(INBOUND)[0][1]


async def call(fn: object, event: CanonicalEvent) -> None:
    await fn(event, HandlerContext(None, None, 1))  # type: ignore[arg-type,operator]


async def test_a_call_asleep_in_time_sleep_is_interrupted(guard: blocked.BlockedHandlerGuard) -> None:
    async def sleeps(event: CanonicalEvent, ctx: HandlerContext) -> None:
        time.sleep(3600)

    _, fn = registered(0.3, sleeps)
    before = guard.interrupted
    with pytest.raises(HandlerTimeout, match=r"blocked the event loop past 0\.3 s"):
        await call(fn, an_event())
    assert guard.interrupted == before + 1


async def test_a_call_spinning_in_python_is_interrupted(guard: blocked.BlockedHandlerGuard) -> None:
    async def spins(event: CanonicalEvent, ctx: HandlerContext) -> None:
        n = 0
        while True:
            n += 1

    _, fn = registered(0.3, spins)
    with pytest.raises(HandlerTimeout, match="blocked the event loop"):
        await call(fn, an_event())


async def test_a_call_that_swallows_exceptions_is_still_interrupted(
    guard: blocked.BlockedHandlerGuard,
) -> None:
    """`except Exception` is what handler code writes around a flaky call: it must not catch the guard."""

    async def swallows(event: CanonicalEvent, ctx: HandlerContext) -> None:
        while True:
            try:  # noqa: SIM105 - the handler code this test imitates
                time.sleep(3600)
            except Exception:
                pass

    _, fn = registered(0.3, swallows)
    with pytest.raises(HandlerTimeout):
        await call(fn, an_event())


async def test_a_call_blocking_within_its_limit_is_left_alone(guard: blocked.BlockedHandlerGuard) -> None:
    done = []

    async def slow(event: CanonicalEvent, ctx: HandlerContext) -> None:
        time.sleep(1.6)  # past the guard's 1 s grace, within the call's limit
        done.append(event.id)

    _, fn = registered(30.0, slow)
    before = guard.interrupted
    event = an_event()
    await call(fn, event)
    assert done == [event.id]
    assert guard.interrupted == before


async def test_only_the_late_call_on_the_stack_is_interrupted(guard: blocked.BlockedHandlerGuard) -> None:
    """A call past its limit while suspended in an await is not what blocks the loop: the code that blocks
    (here the test's own) runs to its end, and the late call gets asyncio's own timeout afterwards."""

    async def waits(event: CanonicalEvent, ctx: HandlerContext) -> None:
        await asyncio.sleep(3600)

    _, fn = registered(0.3, waits)
    late = asyncio.ensure_future(call(fn, an_event()))
    await asyncio.sleep(0.05)  # the call is in progress, suspended
    time.sleep(2.5)  # blocks the loop past the call's deadline and the grace: the guard signals
    with pytest.raises(HandlerTimeout, match=r"did not finish within 0\.3 s"):
        await late


async def test_no_limit_means_no_interruption(guard: blocked.BlockedHandlerGuard) -> None:
    async def slow(event: CanonicalEvent, ctx: HandlerContext) -> None:
        time.sleep(1.6)

    handlers = HandlerRegistry(timeout_s=None)
    handlers.register(INBOUND, slow, "unbounded")
    await call(handlers.for_type(INBOUND)[0][1], an_event())
