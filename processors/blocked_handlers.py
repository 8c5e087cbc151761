"""Handler calls that block the event loop past their time limit: noticed from a thread, interrupted.

`asyncio.timeout` cancels a handler only at an `await`: a call stuck in synchronous code (`time.sleep`, a
blocking HTTP client, a loop that never ends) holds the whole loop, so its timeout never fires, the stage
stalls, the orchestrator restarts the process, and the restarted one meets the same event again. A thread
watches instead: when a guarded call holds the loop (its frame is on the loop thread's stack and the loop
has not turned for `grace_s`) past its deadline, or for `max_block_s` whatever its limit (a loop held that
long answers no probe, and liveness would restart the process first), it sends the loop's thread a signal.
The signal's handler runs in that thread at the next bytecode, or as soon as a blocking system call
returns EINTR (PEP 475: the call is abandoned when the handler raises), and raises `HandlerBlocked` there,
but only when the frame of that overdue call is on the stack it interrupts: the loop's own code, or
another task blocking it, is never interrupted. The guard turns it into the call's `HandlerTimeout`, so
the event is dead-lettered as for any timeout.

What a signal cannot reach: C code that neither returns nor lets a signal end its wait (a mutex, a
library that retries EINTR, libpq's synchronous calls among them). Past `give_up_after_s` more, the call
is written to a file (`UninterruptibleCalls`) and the process ends with status 70, so the orchestrator
restarts it; the restarted projector dead-letters that event for that handler without calling it again.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Coroutine, Iterable
from pathlib import Path
from types import FrameType
from typing import Any, NamedTuple

import orjson

log = logging.getLogger("sentpipe.handlers")

# A real-time signal: nothing else here or in the libraries the worker loads uses it (mode takes SIGUSR1),
# and librdkafka's threads block every signal, so only the thread it is sent to sees it.
INTERRUPT_SIGNAL = signal.SIGRTMIN + 3
# The loop counts as blocked once it has not turned for this long: a busy loop turns far more often.
GRACE_S = 1.0
CHECK_EVERY_S = 0.25
# A call the signal could not reach yet (C code that has not returned) is signalled again this often:
# real-time signals queue, one each, until it returns.
RESIGNAL_EVERY_S = 2.0
# However long its time limit, a call that holds the loop this long is interrupted: the loop answers no
# probe meanwhile, and liveness restarts the process within about 45 s (README "Worker roles").
MAX_BLOCK_S = 20.0
# Past its cutoff by this much and still not reached by a signal, a call ends the process.
GIVE_UP_AFTER_S = 10.0
EXIT_UNINTERRUPTIBLE = 70  # EX_SOFTWARE
# Calls kept in the file at most; the oldest go first (each is one event's, settled when its batch commits).
MAX_UNINTERRUPTIBLE = 1000
UNINTERRUPTIBLE = (
    "blocked the event loop in code no signal could interrupt; the projector was restarted and does not "
    "call it again for this event"
)
# Why a call is kept for the restart: its ending of the process is what the restarted projector says.
ENDED_THE_LOOP = (
    "ended the projector's event loop (it cancelled the stage's tasks or stopped the loop); the projector "
    "was restarted and does not call it again for this event"
)


class HandlerBlocked(BaseException):
    """Raised inside a handler call that blocked the event loop past its deadline. A BaseException, so the
    handler's own `except Exception` cannot swallow it and block on."""


class CallKey(NamedTuple):
    """One handler's call with one event. An event id is unique within its tenant only: keyed by the id
    alone, one tenant's failed call got another tenant's event of the same id left out, its handler never
    called."""

    handler: str
    tenant: str
    event_id: str


class UninterruptibleCalls:
    """The calls that ended the process, and why: a file that outlives the restart, so the next projector
    dead-letters those events for those handlers instead of calling them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._calls: dict[CallKey, str] = {}
        # (handler, event id) -> why: a file of an earlier version names no tenant, so these hold for the
        # event id in every tenant, as they did, until settled.
        self._untenanted: dict[tuple[str, str], str] = {}
        self._load()

    def _load(self) -> None:
        try:
            # [handler, event id, why, tenant]: the tenant last, so a version without it reads the rest (a
            # rollback does not end the process again for every call recorded). Earlier versions wrote
            # [handler, event id, why], first [handler, event id]: those hold for the id in every tenant.
            for e in orjson.loads(self.path.read_bytes()):
                handler, event_id = str(e[0]), str(e[1])
                why = str(e[2]) if len(e) > 2 else UNINTERRUPTIBLE
                if len(e) > 3 and e[3] is not None:
                    self._calls[CallKey(handler, str(e[3]), event_id)] = why
                else:
                    self._untenanted[handler, event_id] = why
        except FileNotFoundError:
            return
        except (OSError, ValueError, TypeError, IndexError, KeyError) as exc:
            log.warning("ignoring %s, which cannot be read (%s)", self.path, exc)
            self._calls.clear()
            self._untenanted.clear()

    def __contains__(self, key: object) -> bool:
        return isinstance(key, CallKey) and self.why(key) is not None

    def __len__(self) -> int:
        return len(self._calls) + len(self._untenanted)

    def why(self, key: CallKey) -> str | None:
        """Why this call ended the process; None when it did not."""
        why = self._calls.get(key)
        if why is None and self._untenanted:
            why = self._untenanted.get((key.handler, key.event_id))
        return why

    def add(self, key: CallKey, why: str = UNINTERRUPTIBLE) -> None:
        self._calls[key] = why
        while len(self._calls) > MAX_UNINTERRUPTIBLE:
            del self._calls[next(iter(self._calls))]
        self._write()

    def settle(self, keys: Iterable[CallKey]) -> None:
        """These calls' events are dead-lettered and committed: forget them."""
        gone = 0
        for k in keys:
            gone += self._calls.pop(k, None) is not None
            if self._untenanted:
                gone += self._untenanted.pop((k.handler, k.event_id), None) is not None
        if gone:
            self._write()

    def _write(self) -> None:
        # Written right before the process ends: durable, and whole or not at all.
        entries = [[h, e, w] for (h, e), w in self._untenanted.items()]
        entries += [[key.handler, key.event_id, why, key.tenant] for key, why in self._calls.items()]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("wb") as fh:
            fh.write(orjson.dumps(entries))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)


class Call:
    """One guarded handler call in progress (compared by identity)."""

    __slots__ = (
        "active",
        "deadline",
        "escaped",
        "frame",
        "interrupted",
        "key",
        "limit",
        "token",
    )

    def __init__(self, key: CallKey, limit: float | None, frame: FrameType) -> None:
        self.key, self.limit, self.frame = key, limit, frame
        self.deadline = math.inf if limit is None else time.monotonic() + limit
        self.token: contextvars.Token[Call | None] | None = None
        self.active = True
        self.interrupted: str | None = None  # why, once the guard has raised HandlerBlocked in it
        self.escaped: str | None = None  # what a task it started raised that would have ended the loop


# Where the frames of the task or callback that runs end: the event loop's own (asyncio's or uvloop's).
_LOOP_MODULES = frozenset({"asyncio.base_events", "asyncio.runners", "uvloop"})
# The call whose code runs now: set in the call's context, so the tasks and callbacks the handler starts
# carry it too, and a handler blocking the loop from a task of its own is found.
_CURRENT: contextvars.ContextVar[Call | None] = contextvars.ContextVar("sentpipe_handler_call", default=None)


class BlockedHandlerGuard:
    """Interrupts a guarded handler call that blocks its loop past its deadline (see the module doc).

    `enter`/`leave` are called by the guard (`handlers._guarded`) from the call's own frame; `start` in the
    loop's thread, which must be the main thread (only it can install a signal handler)."""

    def __init__(
        self,
        grace_s: float = GRACE_S,
        check_every_s: float = CHECK_EVERY_S,
        give_up_after_s: float = GIVE_UP_AFTER_S,
        max_block_s: float = MAX_BLOCK_S,
    ) -> None:
        self.grace_s, self.check_every_s, self.give_up_after_s = grace_s, check_every_s, give_up_after_s
        self.max_block_s = max_block_s
        self._uninterruptible: UninterruptibleCalls | None = None
        self._calls: set[Call] = set()  # in progress, suspended ones too
        # Calls that were in progress when the stage's own task was cancelled (`cut_off`), until the next
        # call starts: the stage never cancels itself in a call, so they are what a loop that ends with
        # that cancellation blames (`ended_the_loop`).
        self._cut_off: dict[CallKey, None] = {}
        self._turned_at = time.monotonic()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._loop_thread = 0
        self._beat: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.interrupted = 0

    def enter(self, key: CallKey, limit: float | None) -> Call:
        """A call with `limit` seconds (None: no limit but `max_block_s`) starts in the caller's frame."""
        call = Call(key, limit, sys._getframe(1))
        self._cut_off.clear()  # the stage went on after that cancellation: it was its own stop
        self._calls.add(call)
        call.token = _CURRENT.set(call)
        return call

    def leave(self, call: Call) -> None:
        """The call has ended; calling it again is harmless. The caller clears `call.active` first, in
        its own frame: a signal can be handled as this function is entered, and must not raise then."""
        call.active = False
        self._calls.discard(call)
        if call.token is not None:
            token, call.token = call.token, None
            _CURRENT.reset(token)

    def cut_off(self, key: CallKey) -> None:
        """The stage's task was cancelled while it waited for this call."""
        self._cut_off[key] = None

    def ended_the_loop(self) -> list[CallKey]:
        """The calls to blame when the loop ended by a cancellation or `loop.stop()`, which only a handler
        does (`asyncio.run` cancels what is left after a stop, which `cut_off` notes too)."""
        return list(self._cut_off)

    def start(
        self, loop: asyncio.AbstractEventLoop, uninterruptible: UninterruptibleCalls | None = None
    ) -> None:
        """Without `uninterruptible`, a call no signal reaches is signalled for as long as it lasts."""
        if self._thread is not None:
            return
        self._uninterruptible = uninterruptible
        signal.signal(INTERRUPT_SIGNAL, self._on_signal)
        self._loop_thread = threading.get_ident()
        loop.set_task_factory(_task_factory)
        self._loop = loop
        self._stop.clear()
        self._turned_at = time.monotonic()
        self._tick(loop)
        self._thread = threading.Thread(target=self._watch, name="sentpipe-blocked-handlers", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        if self._loop is not None:
            self._loop.set_task_factory(None)
            self._loop = None
        if self._beat is not None:
            self._beat.cancel()
        # Not SIG_DFL (which ends the process) nor SIG_IGN: a signal sent just before the thread stopped
        # may still be waiting for the loop's thread to run its handler.
        signal.signal(INTERRUPT_SIGNAL, _ignore)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        self._turned_at = time.monotonic()
        self._beat = loop.call_later(self.check_every_s, self._tick, loop)

    def _watch(self) -> None:
        reported: set[Call] = set()  # one line per call
        signalled_at = 0.0
        while not self._stop.wait(self.check_every_s):
            now = time.monotonic()
            if now - self._turned_at < self.grace_s or now - signalled_at < RESIGNAL_EVERY_S:
                continue
            late = [c for c in list(self._calls) if now >= self._cutoff(c)]
            if not late:
                continue
            # Signal first: logging takes the logging lock, which the blocked code may hold (a full stderr
            # pipe), and the signal is what ends that write.
            signalled_at = now
            signal.pthread_kill(self._loop_thread, INTERRUPT_SIGNAL)
            blocker = self._blocker()
            call = blocker or late[0]
            if call not in reported:
                if len(reported) > 1000:
                    reported.clear()
                reported.add(call)
                log.error(
                    "handler %s has blocked the event loop for %.0f s with event %s (%s): interrupting",
                    call.key.handler,
                    now - self._turned_at,
                    call.key.event_id,
                    self._where(),
                    extra={"handler": call.key.handler, "event_id": call.key.event_id},
                )
            if (
                blocker is not None
                and self._uninterruptible is not None
                and now - self._cutoff(blocker) >= self.give_up_after_s
            ):
                self._give_up(blocker, now)

    def _cutoff(self, call: Call) -> float:
        """When a call blocking the loop is interrupted: at its deadline, or once the loop has been held
        for `max_block_s`, whichever comes first (a loop held that long answers no probe)."""
        return min(call.deadline, self._turned_at + self.max_block_s)

    def _blocker(self) -> Call | None:
        """The call that holds the loop: the innermost one on the loop thread's stack; else the only one in
        progress, when what runs is no code of the stage's (a task the call started, its own suspended)."""
        frames = {c.frame: c for c in list(self._calls)}
        frame = sys._current_frames().get(self._loop_thread)
        stage_code = False
        while frame is not None:
            call = frames.get(frame)
            if call is not None:
                return call
            module = str(frame.f_globals.get("__name__", ""))
            if frame.f_code is _CONTAINED_CODE:  # the guard's own frame in a task the handler started
                frame = frame.f_back
                continue
            if module in _LOOP_MODULES:
                break  # the loop running the task or callback: below it is the process's own start
            stage_code = stage_code or module.startswith("sentpipe.")
            frame = frame.f_back
        return next(iter(frames.values())) if len(frames) == 1 and not stage_code else None

    def _give_up(self, call: Call, now: float) -> None:
        assert self._uninterruptible is not None
        try:  # recorded before anything that may wait on a lock the blocked code holds
            self._uninterruptible.add(call.key)
        except OSError as exc:  # still end: a restart beats a stage blocked for good
            log.critical("could not record the call in %s (%s)", self._uninterruptible.path, exc)
        log.critical(
            "handler %s could not be interrupted %.0f s after it was due to be with event %s (%s): ending "
            "the process; restarted, the projector dead-letters that event for this handler uncalled",
            call.key.handler,
            now - self._cutoff(call),
            call.key.event_id,
            self._where(),
            extra={"handler": call.key.handler, "event_id": call.key.event_id},
        )
        os._exit(EXIT_UNINTERRUPTIBLE)

    def _where(self) -> str:
        frame = sys._current_frames().get(self._loop_thread)
        if frame is None:
            return "where: unknown"
        return f"at {frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}"

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Runs in the loop's thread, in the context of the code it interrupts: the call it belongs to, if
        # any (a task the handler started included). Raised again at each signal: code that swallows it
        # and blocks on is interrupted again, and ended by the give-up.
        call = _CURRENT.get()
        now = time.monotonic()
        if call is None or not call.active or now < self._cutoff(call):
            return  # not a handler's code, or one still in time: whatever blocks is not its doing
        if call.interrupted is None:
            call.interrupted = (
                f"blocked the event loop past its {call.limit:g} s limit"
                if now >= call.deadline
                else f"blocked the event loop for {self.max_block_s:g} s"
            )
        self.interrupted += 1
        raise HandlerBlocked(call.interrupted)


def _ignore(signum: int, frame: FrameType | None) -> None:
    pass


def _task_factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
    """The loop's tasks; those a handler call starts (its context holds the call) are `_contained`."""
    call = _CURRENT.get()
    if call is not None and asyncio.iscoroutine(coro):
        coro = _contained(coro, call)
    return asyncio.Task(coro, loop=loop, **kwargs)


async def _contained(coro: Coroutine[Any, Any, Any], call: Call) -> Any:
    # SystemExit or KeyboardInterrupt out of a task ends the event loop (asyncio re-raises them from
    # it), and the restarted projector met the same event again: the call's failure instead.
    try:
        return await coro
    except (SystemExit, KeyboardInterrupt) as exc:
        what = f"a task it started raised {type(exc).__name__}"
        if call.active:
            call.escaped = what
        log.error(
            "handler %s: %s with event %s",
            call.key.handler,
            what,
            call.key.event_id,
            extra={"handler": call.key.handler, "event_id": call.key.event_id},
        )
        raise RuntimeError(f"{call.key.handler}: {what}") from None


guard = BlockedHandlerGuard()


_CONTAINED_CODE = _contained.__code__
