"""The consumer's call thread: calls in order, errors to their caller, a call nobody waits for skipped."""

from __future__ import annotations

import asyncio
import threading

import pytest

from sentpipe.processors.consumer_thread import ConsumerThread


async def test_calls_run_in_order_in_one_daemon_thread_and_errors_reach_the_caller() -> None:
    thread = ConsumerThread("test-consumer")
    seen: list[tuple[int, str]] = []

    def record(i: int) -> int:
        seen.append((i, threading.current_thread().name))
        return i * 2

    try:
        assert await asyncio.gather(*(thread.call(record, i) for i in range(5))) == [0, 2, 4, 6, 8]
        assert [i for i, _ in seen] == [0, 1, 2, 3, 4]
        assert {name for _, name in seen} == {"test-consumer"}
        assert thread._thread.daemon  # a call that never returns must not hold the process at exit
        with pytest.raises(ValueError, match="refused"):
            await thread.call(_raise, ValueError("refused"))
    finally:
        thread.close()


async def test_a_call_whose_wait_was_cancelled_before_it_started_is_not_made() -> None:
    """A poll nobody waits for would move the consumer's position past records nobody applies."""
    thread = ConsumerThread("test-consumer")
    release = threading.Event()
    made: list[str] = []
    try:
        busy = asyncio.ensure_future(thread.call(release.wait, 10))
        queued = asyncio.ensure_future(thread.call(made.append, "poll"))
        await asyncio.sleep(0.05)
        queued.cancel()
        release.set()
        assert await busy is True
        assert await thread.call(made.append, "after") is None
        assert made == ["after"]
    finally:
        thread.close()


def _raise(exc: Exception) -> None:
    raise exc
