# ruff: noqa: ASYNC251 - blocking the loop on purpose is what these tests are about
"""A handler call that blocks the event loop past its limit is interrupted, and nothing else ever is.

Pure logic of the guard (processors/blocked_handlers.py) on this test's own loop: no broker, no database.
The real worker meets blocking handlers in tests/test_handlers_hostile.py (kinds "block-sleep" and
"block-cpu"). Each test is bounded by pytest-timeout: without the guard the blocked ones never end.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import orjson
import pytest
from psycopg.pq import TransactionStatus

from sentpipe.processors import blocked_handlers as blocked
from sentpipe.processors.handlers import HandlerContext, HandlerError, HandlerRegistry, HandlerTimeout
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
        assert blocked.guard._calls == set(), "a call left behind in the guard's table"
        del before


def registered(limit: float, fn: object) -> tuple[HandlerRegistry, object]:
    handlers = HandlerRegistry(timeout_s=limit)
    handlers.register(INBOUND, fn, "blocker")  # type: ignore[arg-type]
    return handlers, handlers.for_type(INBOUND)[0][1]


class InTransaction:
    """What the guard asks of the batch's connection after a call: open, its transaction going on."""

    closed = broken = False
    info = SimpleNamespace(transaction_status=TransactionStatus.INTRANS)


async def call(fn: object, event: CanonicalEvent) -> None:
    await fn(event, HandlerContext(InTransaction(), None, 1))  # type: ignore[arg-type,operator]


async def test_a_call_asleep_in_time_sleep_is_interrupted(guard: blocked.BlockedHandlerGuard) -> None:
    async def sleeps(event: CanonicalEvent, ctx: HandlerContext) -> None:
        time.sleep(3600)

    _, fn = registered(0.3, sleeps)
    before = guard.interrupted
    with pytest.raises(HandlerTimeout, match=r"blocked the event loop past its 0\.3 s limit"):
        await call(fn, an_event())
    assert guard.interrupted == before + 1


async def test_a_call_holding_the_loop_too_long_is_interrupted_whatever_its_limit(
    guard: blocked.BlockedHandlerGuard, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A limit of minutes is for a call that awaits: one that holds the loop that long would have the
    process restarted by its liveness probe first, and the restart would meet the same event."""
    monkeypatch.setattr(guard, "max_block_s", 1.0)

    async def sleeps(event: CanonicalEvent, ctx: HandlerContext) -> None:
        time.sleep(3600)

    _, fn = registered(600.0, sleeps)
    with pytest.raises(HandlerTimeout, match=r"blocked the event loop for 1 s and was interrupted"):
        await call(fn, an_event())


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


async def test_a_call_that_swallows_the_interruption_still_fails(guard: blocked.BlockedHandlerGuard) -> None:
    """A bare `except:` around a blocking client call is common handler code: it caught the guard's
    exception and returned, and its event counted as handled."""

    async def swallows_everything(event: CanonicalEvent, ctx: HandlerContext) -> None:
        try:
            time.sleep(3600)
        except:  # noqa: E722 - the handler code this test imitates
            return

    _, fn = registered(0.3, swallows_everything)
    before = guard.interrupted
    with pytest.raises(HandlerTimeout, match=r"past its 0\.3 s limit and was interrupted"):
        await call(fn, an_event())
    assert guard.interrupted == before + 1


async def test_a_task_the_handler_started_that_blocks_is_interrupted(
    guard: blocked.BlockedHandlerGuard,
) -> None:
    """`asyncio.gather` over a blocking client: the code holding the loop is in a task of the handler's,
    whose own frame is suspended; the task carries the call in its context."""

    async def notify() -> None:
        time.sleep(3600)

    async def fans_out(event: CanonicalEvent, ctx: HandlerContext) -> None:
        await asyncio.gather(notify(), notify())

    _, fn = registered(0.3, fans_out)
    before = guard.interrupted
    with pytest.raises(HandlerTimeout, match="blocked the event loop"):
        await call(fn, an_event())
    assert guard.interrupted == before + 2  # each task, as it blocks in turn


async def test_a_callback_the_handler_scheduled_that_blocks_is_interrupted(
    guard: blocked.BlockedHandlerGuard,
) -> None:
    async def schedules(event: CanonicalEvent, ctx: HandlerContext) -> None:
        asyncio.get_running_loop().call_soon(time.sleep, 3600)
        await asyncio.sleep(0.5)

    _, fn = registered(0.3, schedules)
    before = guard.interrupted
    with pytest.raises(HandlerTimeout, match="blocked the event loop"):
        await call(fn, an_event())
    assert guard.interrupted == before + 1


async def test_a_call_without_a_limit_still_may_not_hold_the_loop(
    guard: blocked.BlockedHandlerGuard, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(guard, "max_block_s", 1.0)

    async def sleeps(event: CanonicalEvent, ctx: HandlerContext) -> None:
        time.sleep(3600)

    handlers = HandlerRegistry(timeout_s=None)
    handlers.register(INBOUND, sleeps, "unbounded")
    with pytest.raises(HandlerTimeout, match=r"blocked the event loop for 1 s"):
        await call(handlers.for_type(INBOUND)[0][1], an_event())


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


# --- calls no signal reaches --------------------------------------------------------------------------------
def k(handler: str, event_id: str, tenant: str = "t") -> blocked.CallKey:
    return blocked.CallKey(handler, tenant, event_id)


def test_uninterruptible_calls_outlive_the_process_until_settled(tmp_path: Path) -> None:
    path = tmp_path / "data" / "app.uninterruptible-handlers.json"
    calls = blocked.UninterruptibleCalls(path)
    assert len(calls) == 0 and not path.exists()
    calls.add(k("h", "e1"))
    calls.add(k("h", "e2"))
    again = blocked.UninterruptibleCalls(path)  # the restarted process
    assert k("h", "e1") in again and k("h", "e2") in again and k("other", "e1") not in again
    again.settle([k("h", "e1"), k("h", "never-there")])
    assert k("h", "e1") not in blocked.UninterruptibleCalls(path)
    assert k("h", "e2") in blocked.UninterruptibleCalls(path)


def test_a_call_kept_is_one_tenant_s_not_every_event_of_its_id(tmp_path: Path) -> None:
    """Event ids are unique per tenant only: keyed by (handler, event id), the call one tenant's event
    ended the process with got another tenant's event of the same id dead-lettered, its handler never run."""
    path = tmp_path / "calls.json"
    blocked.UninterruptibleCalls(path).add(k("h", "e1", tenant="acme"))
    again = blocked.UninterruptibleCalls(path)
    assert k("h", "e1", tenant="acme") in again and k("h", "e1", tenant="globex") not in again


def test_the_file_stays_readable_by_the_version_before_the_tenant(tmp_path: Path) -> None:
    """Entries as objects made the previous version ignore the whole file after a rollback: every call it
    held was made again, each ending the process once more."""
    path = tmp_path / "calls.json"
    blocked.UninterruptibleCalls(path).add(k("h", "e1", tenant="acme"), blocked.ENDED_THE_LOOP)
    entries = orjson.loads(path.read_bytes())
    # What that version read: [handler, event id, why] from the first three.
    assert [(str(e[0]), str(e[1]), str(e[2])) for e in entries] == [("h", "e1", blocked.ENDED_THE_LOOP)]


def test_a_file_of_an_earlier_version_holds_for_the_id_in_every_tenant_until_settled(tmp_path: Path) -> None:
    path = tmp_path / "calls.json"
    path.write_bytes(b'[["h", "e-old"], ["h", "e-why", "' + blocked.ENDED_THE_LOOP.encode() + b'"]]')
    calls = blocked.UninterruptibleCalls(path)
    assert calls.why(k("h", "e-old", tenant="a")) == calls.why(k("h", "e-old", tenant="b"))
    assert calls.why(k("h", "e-old")) == blocked.UNINTERRUPTIBLE
    calls.add(k("h", "e-new"))  # rewritten: the earlier entries are kept, still for every tenant
    again = blocked.UninterruptibleCalls(path)
    assert again.why(k("h", "e-why", tenant="any")) == blocked.ENDED_THE_LOOP and k("h", "e-new") in again
    again.settle([k("h", "e-old", tenant="a")])
    assert k("h", "e-old", tenant="b") not in blocked.UninterruptibleCalls(path) and len(again) == 2


def test_each_call_kept_says_why_it_ended_the_process(tmp_path: Path) -> None:
    path = tmp_path / "calls.json"
    path.write_bytes(b'[["h", "e-old"]]')  # written by a version that kept no reason: blocked calls only
    calls = blocked.UninterruptibleCalls(path)
    calls.add(k("h", "e-loop"), blocked.ENDED_THE_LOOP)
    again = blocked.UninterruptibleCalls(path)
    assert again.why(k("h", "e-old")) == blocked.UNINTERRUPTIBLE
    assert again.why(k("h", "e-loop")) == blocked.ENDED_THE_LOOP
    assert again.why(k("h", "never-there")) is None


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{not json",
        b'{"a": 1}',
        b"[[1]]",
        b"[null]",
        b"\xff\xfe",
        b'[{"handler": "h"}]',
        b"[{}]",
        b"[7]",
    ],
)
def test_an_unreadable_file_is_ignored_not_fatal(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "calls.json"
    path.write_bytes(content)
    calls = blocked.UninterruptibleCalls(path)
    assert len(calls) == 0
    calls.add(k("h", "e"))  # and is replaced by a good one
    assert k("h", "e") in blocked.UninterruptibleCalls(path)


def test_the_file_keeps_the_newest_calls_only(tmp_path: Path) -> None:
    calls = blocked.UninterruptibleCalls(tmp_path / "calls.json")
    for i in range(blocked.MAX_UNINTERRUPTIBLE + 5):
        calls.add(k("h", f"e{i}"))
    kept = blocked.UninterruptibleCalls(tmp_path / "calls.json")
    assert len(kept) == blocked.MAX_UNINTERRUPTIBLE
    assert k("h", "e0") not in kept and k("h", f"e{blocked.MAX_UNINTERRUPTIBLE + 4}") in kept


STUCK_SCRIPT = """
import asyncio, sys
from pathlib import Path
from sentpipe.processors import blocked_handlers as blocked
from sentpipe.processors.handlers import HandlerContext, HandlerRegistry
from sentpipe.schemas.events import EventType
from tests.handlers_uninterruptible import stuck_in_c
from tests.test_blocked_handlers import an_event

async def stuck(event, ctx):
    stuck_in_c()

async def main():
    guard = blocked.BlockedHandlerGuard(give_up_after_s=1.0)
    blocked.guard = guard  # the module's guard is what handlers.py calls
    guard.start(asyncio.get_running_loop(), blocked.UninterruptibleCalls(Path(sys.argv[1])))
    handlers = HandlerRegistry(timeout_s=0.3)
    handlers.register(EventType.MESSAGE_INBOUND, stuck, "stuck")
    event = an_event()
    print(event.tenant, event.id, flush=True)
    await handlers.for_type(EventType.MESSAGE_INBOUND)[0][1](event, HandlerContext(None, None, 1))

asyncio.run(main())
"""


def test_a_call_no_signal_reaches_ends_the_process_and_is_recorded(tmp_path: Path) -> None:
    """A relocked mutex ignores every signal: the guard records the call and ends the process (status 70)
    for the orchestrator to restart; `PostgresSink` then dead-letters that event without calling it
    (tests/test_handlers_hostile.py runs that with a real worker)."""
    path = tmp_path / "calls.json"
    out = subprocess.run(
        [sys.executable, "-c", STUCK_SCRIPT, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert out.returncode == blocked.EXIT_UNINTERRUPTIBLE, out.stderr
    tenant, event_id = out.stdout.split()[:2]
    assert blocked.CallKey("stuck", tenant, event_id) in blocked.UninterruptibleCalls(path)
    assert "could not be interrupted" in out.stderr and "handlers_uninterruptible.py" in out.stderr


@pytest.mark.parametrize("raised", [SystemExit(2), KeyboardInterrupt()])
async def test_a_task_the_handler_started_cannot_end_the_loop(
    guard: blocked.BlockedHandlerGuard, raised: BaseException
) -> None:
    """SystemExit out of a task ends an event loop (asyncio raises it from there): a handler's background
    task ended the projector, and its restart met the same event again. It is that call's failure now."""

    async def spawns(event: CanonicalEvent, ctx: HandlerContext) -> None:
        async def background() -> None:
            raise raised

        asyncio.get_running_loop().create_task(background())
        await asyncio.sleep(0.1)

    _, fn = registered(5, spawns)
    with pytest.raises(HandlerError, match=f"a task it started raised {type(raised).__name__}"):
        await call(fn, an_event())
    await asyncio.sleep(0.1)  # the loop is still running
