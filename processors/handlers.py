"""The handler API: your own async functions, run for each canonical event in the projection's transaction.

    from sentpipe import handler, PermanentError, RetryableError

    @handler("message.status.updated")
    async def mark_order_delivered(event, ctx):
        if event.status == "delivered":
            await ctx.conn.execute("UPDATE orders SET delivered = true WHERE msg_id = %s", (event.subject,))

A handler runs at least once per event (replays and crashes run it again): make it idempotent.
Raise RetryableError for temporary trouble (retried with backoff, the stream waits); PermanentError (or any
other exception) sends the event to the dead-letter topic and processing moves on.

Each registered function runs behind a guard (`_guarded`) that holds the stage to that rule whatever the
function does: it gets its own copy of the event, at most `HandlerRegistry.timeout_s` per call, and
anything it raises, BaseExceptions included, comes out as an Exception the stage can classify and
dead-letter.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import functools
import importlib
import inspect
import logging
import os
import socket
import traceback
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
from confluent_kafka import KafkaException
from psycopg import AsyncConnection
from psycopg.pq import TransactionStatus

from sentpipe.processors import blocked_handlers as blocked
from sentpipe.schemas.events import ROUTED_TYPES, CanonicalEvent, EventType
from sentpipe.schemas.routing import exception_class, exception_message


class RetryableError(Exception):
    """A temporary failure: the batch is retried with exponential backoff, nothing is skipped."""


class PermanentError(Exception):
    """This event can never succeed: it goes to the dead-letter topic."""


class HandlerError(PermanentError):
    """A handler failed in a way the stage cannot carry as raised (SystemExit, a CancelledError of its own,
    an exception that cannot be printed, a network error of its own, no awaitable): the event's failure."""


class HandlerTimeout(HandlerError):
    """A handler call ran past `HandlerRegistry.timeout_s`: cancelled, the event dead-lettered."""


class HandlerAbandoned(HandlerTimeout):
    """A call past its limit went on after it was cancelled: it is left running, the batch's connection it
    holds closed under it."""


class TransactionEnded(HandlerError):
    """A call ended the batch's transaction (COMMIT or ROLLBACK run on ctx.conn)."""


class TransactionAborted(HandlerError):
    """A call caught a database error on ctx.conn and went on: its savepoint is aborted. Tried again with
    the batch a few times (a deadlock it caught goes away), then its event's failure."""


class EndedTheLoop(HandlerError):
    """A call ended the projector's event loop (cancelled the stage's tasks, stopped the loop): restarted,
    the projector dead-letters its event for that handler without calling it again."""


class HandlerModuleError(Exception):
    """A module of SENTPIPE_HANDLER_MODULES cannot be imported; the message is one line naming it."""


@dataclass(frozen=True, slots=True)
class HandlerContext:
    conn: AsyncConnection  # inside the projection's transaction (a savepoint per handler call)
    log: logging.Logger
    attempt: int  # 1 on the first try of this batch; its parts, halved after an unknown error, count on


Handler = Callable[[CanonicalEvent, HandlerContext], Awaitable[None]]

# Below the watchdog's default stall (SENTPIPE_STALL_AFTER_S, 60 s): a handler waiting forever for one
# event is that event's failure, not a stall the orchestrator answers with a restart that hangs again.
HANDLER_TIMEOUT_S = 30.0
# Metric label and DLQ message prefix; far above any sensible name.
MAX_NAME_LENGTH = 200
# How long a call past its limit has, once cancelled, to end; then it is abandoned (HandlerAbandoned).
CANCEL_GRACE_S = 1.0
ENDED = "ended the batch's transaction (COMMIT or ROLLBACK on ctx.conn: the stage commits the batch)"
ABORTED = (
    "returned with its statements failed (it caught a database error and went on): what it wrote is rolled "
    "back; let the error out, or catch it inside `async with ctx.conn.transaction():`"
)
# A network error raised by the handler's own client (its HTTP call, its own Kafka producer) is the
# event's failure, as the README promises for "any other exception"; only RetryableError, the stage's
# database and the stage's broker retry. BufferError: librdkafka's full queue, and a bytearray resized
# under a memoryview (a plain bug), alike. aiokafka's errors are told by their module (not imported here).
_OWN_CLIENT_ERRORS = (ConnectionError, TimeoutError, socket.gaierror, KafkaException, BufferError)


def _own_client_error(exc: BaseException) -> bool:
    return isinstance(exc, _OWN_CLIENT_ERRORS) or any(
        c.__module__ == "aiokafka.errors" for c in type(exc).__mro__
    )


def _routed_type(type_: EventType | str) -> EventType:
    allowed = ", ".join(x.value for x in ROUTED_TYPES)
    try:
        t = EventType(type_)
    except ValueError:
        raise ValueError(f"no handler can be registered for {type_!r}: the types are {allowed}") from None
    if t not in ROUTED_TYPES:
        raise ValueError(f"no handler can be registered for {t.value!r}: the types are {allowed}")
    return t


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME_LENGTH:
        raise ValueError(f"a handler name is text of 1 to {MAX_NAME_LENGTH} characters, not {name!r}")
    try:
        name.encode()
    except UnicodeEncodeError:  # a lone surrogate: it could not go into a DLQ header or a metric label
        raise ValueError(f"a handler name must be valid UTF-8: {name!r}") from None
    return name


def _text(exc: BaseException) -> str | None:
    """str(exc) when it can go into a DLQ header as it is; None when __str__ raises or the message is not
    UTF-8 (a lone surrogate): writing that dead letter would fail, batch after batch."""
    try:
        text = str(exc)
        text.encode()
    except Exception:
        return None
    return text


_STAND_INS: dict[str, type[HandlerError]] = {}
MAX_STAND_INS = 1000


def _stand_in(exc: BaseException, message: str) -> HandlerError:
    """A permanent failure under the class name of `exc`: the DLQ's error-class header (and
    `dlq redrive --reason`) shows what the handler raised."""
    name = exception_class(exc)
    cls = _STAND_INS.get(name)
    if cls is None:  # one class per name raised: as few as the handlers' code has
        if len(_STAND_INS) >= MAX_STAND_INS:
            _STAND_INS.clear()
        cls = _STAND_INS[name] = type(name, (HandlerError,), {"__module__": __name__})
    return cls(message)


def _as_failure(exc: Exception, conn: AsyncConnection) -> Exception:
    """What the stage gets for an exception a handler raised: the exception itself when the stage can
    classify it and write it to the DLQ as it is, else a stand-in of the kind it should be."""
    if isinstance(exc, ExceptionGroup):
        # A TaskGroup's: temporary when a task of it met something temporary, which then stands for it.
        for leaf in _leaves(exc):
            failure = _as_failure(leaf, conn) if isinstance(leaf, Exception) else None
            if isinstance(failure, RetryableError | psycopg.Error):
                return failure
    text = _text(exc)
    if isinstance(exc, RetryableError):
        return exc if text is not None else RetryableError(exception_message(exc))
    if isinstance(exc, psycopg.Error) and (exc.sqlstate is not None or conn.closed or conn.broken):
        return exc  # the stage retries these (psycopg's by SQLSTATE); their text comes from the server
    if isinstance(exc, psycopg.Error) or _own_client_error(exc):
        # Retried like a database or broker outage, one event's unreachable API would hold the line forever.
        # A psycopg error without SQLSTATE while the batch's connection is sound is the handler's own: its
        # own connection lost or refused, or a misuse such as `ctx.conn.commit()`.
        why = text if text is not None else exception_message(exc)
        return _stand_in(exc, f"{why} (the handler's own error; raise RetryableError to retry)")
    return exc if text is not None else _stand_in(exc, exception_message(exc))


def _leaves(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


def _guarded(fn: Handler, registry: HandlerRegistry, name: str) -> Handler:
    """`fn` held to the per-record rule: any outcome of one call is that event's, never the stage's."""

    async def call(event: CanonicalEvent, ctx: HandlerContext) -> None:
        # Its own copy: a handler changing `data` must not change the rows of a retried batch (projected
        # again from the same objects) nor what the next handler sees.
        own = dataclasses.replace(event, data=copy.deepcopy(event.data))
        # A task of its own: a cancellation it catches cannot keep it past its limit, and one it raises or
        # asks for (`current_task().cancel()`) is told apart from a stop of the stage.
        task = asyncio.get_running_loop().create_task(_attempt(fn, own, ctx, registry, name))
        try:
            done = await _wait(task, registry.timeout_s)
        except asyncio.CancelledError:  # the stage is stopping, or the call cancelled the stage's tasks
            blocked.guard.cut_off(blocked.CallKey(name, own.tenant, own.id))
            await _cancel(task)
            raise
        failure: BaseException | None
        if not done:
            failure = await _past_limit(task, registry.timeout_s, ctx)
        elif task.cancelled():
            failure = _stand_in(asyncio.CancelledError(), "raised by the handler, not by a stop of the stage")
        else:
            failure = task.exception()
        conn = ctx.conn
        status = None if conn.closed else conn.info.transaction_status
        if status is TransactionStatus.IDLE:
            raise TransactionEnded(ENDED) from failure
        if status is TransactionStatus.INERROR and (failure is None or _sqlstate(failure) == "25P02"):
            # It caught a database error and went on: returning, its savepoint could not be released; going
            # on with SQL, that SQL failed (25P02). Either failed the whole batch (of unknown kind), and
            # halving dead-lettered the event without its projection.
            raise TransactionAborted(ABORTED) from failure
        if failure is not None:
            raise failure

    call.__wrapped__ = fn  # type: ignore[attr-defined]
    return call


def _sqlstate(exc: BaseException) -> str | None:
    return exc.sqlstate if isinstance(exc, psycopg.Error) else None


async def _wait(task: asyncio.Task[None], timeout: float | None) -> bool:
    """Whether `task` ended within `timeout`: `asyncio.wait` for one task, without its sets and its
    second future (every handler call's path)."""
    if task.done():
        return True
    waiter = asyncio.get_running_loop().create_future()

    def wake(_: object = None) -> None:
        if not waiter.done():
            waiter.set_result(None)

    task.add_done_callback(wake)
    timer = None if timeout is None else asyncio.get_running_loop().call_later(timeout, wake)
    try:
        await waiter
    finally:
        if timer is not None:
            timer.cancel()
        task.remove_done_callback(wake)
    return task.done()


async def _cancel(task: asyncio.Task[None]) -> bool:
    """Cancel a call and give it CANCEL_GRACE_S to end; whether it did."""
    task.cancel()
    done = await _wait(task, CANCEL_GRACE_S)
    if not done:  # its outcome, whenever it comes, is nobody's
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
    return done


async def _past_limit(task: asyncio.Task[None], limit: float | None, ctx: HandlerContext) -> Exception:
    if not await _cancel(task):
        # Going on, it would run its statements in the next batches' transactions.
        await ctx.conn.close()
        return HandlerAbandoned(
            f"did not finish within {limit:g} s and went on after it was cancelled: left running, the "
            "batch's connection closed under it"
        )
    if not task.cancelled() and isinstance(exc := task.exception(), HandlerTimeout):
        return exc  # the blocked-handler guard's, which ended it first
    return HandlerTimeout(f"did not finish within {limit:g} s and was cancelled")


async def _attempt(
    fn: Handler, own: CanonicalEvent, ctx: HandlerContext, registry: HandlerRegistry, name: str
) -> None:
    """The call, in its task: whatever it does comes out as an Exception (a BaseException would end the
    event loop from a task), or as the task's cancellation."""
    # A call that blocks the loop cannot be cancelled at an await: the blocked-handler guard raises
    # HandlerBlocked in its code instead (blocked_handlers.py). Entered here: this frame is the call's.
    entered = blocked.guard.enter(blocked.CallKey(name, own.tenant, own.id), registry.timeout_s)
    try:
        try:
            await _invoke(fn, own, ctx)
        finally:
            entered.active = False  # before any call: from here on no signal raises in this one
            blocked.guard.leave(entered)
    except blocked.HandlerBlocked:
        pass
    except (Exception, asyncio.CancelledError):
        if entered.interrupted is None:
            raise
    if entered.escaped is not None:
        raise HandlerError(f"{entered.escaped} (caught: it would have ended the projector)")
    if entered.interrupted is not None:  # raised in it (or in a task or callback of its own), even if
        # the handler caught it and went on, or was cancelled at its limit since
        raise HandlerTimeout(
            f"{entered.interrupted} and was interrupted (handlers must not block: use await, or run "
            "blocking code with asyncio.to_thread)"
        ) from None


async def _invoke(fn: Handler, own: CanonicalEvent, ctx: HandlerContext) -> None:
    try:
        result: Any = fn(own, ctx)
        if not inspect.isawaitable(result):
            raise HandlerError(f"returned {type(result).__name__}, not an awaitable: handlers are async def")
        returned = await result
        if inspect.isawaitable(returned):
            if inspect.iscoroutine(returned):
                returned.close()  # never run: no "was never awaited" warning on top of this error
            raise HandlerError(
                f"returned an awaitable it did not await ({type(returned).__name__}): its work was never done"
            )
    except HandlerError as exc:
        if _text(exc) is None:
            raise _stand_in(exc, exception_message(exc)) from None
        raise
    except asyncio.CancelledError:
        raise  # the task's: `call` tells the stage's stop, the limit and the handler's own apart
    except Exception as exc:
        failure = _as_failure(exc, ctx.conn)
        if failure is exc:
            raise
        raise failure from exc
    except BaseException as exc:
        if isinstance(exc, blocked.HandlerBlocked):
            raise  # the guard's own: this call blocked the loop past its limit
        # SystemExit, KeyboardInterrupt, GeneratorExit raised by the handler's own code: let through,
        # they would end the projector, and its restart would meet the same event again.
        text = exception_message(exc)
        raise _stand_in(exc, f"raised by the handler{': ' + text if text else ''}") from exc


def _code_of(fn: object) -> object:
    """The function a call of `fn` runs: through partials, and a callable object's `__call__`."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    if not (inspect.isfunction(fn) or inspect.ismethod(fn) or isinstance(fn, type)):
        call = getattr(fn, "__call__", None)  # noqa: B004 - the method itself is what is checked
        if inspect.ismethod(call):
            return call
    return fn


def _source(fn: object) -> tuple[str, int, str] | None:
    """Where a function's code was written; None for callables without code of their own."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return None
    return (code.co_filename, code.co_firstlineno, getattr(fn, "__qualname__", ""))


@dataclass
class HandlerRegistry:
    by_type: dict[EventType, list[tuple[str, Handler]]] = field(default_factory=dict)
    timeout_s: float | None = HANDLER_TIMEOUT_S  # per call; None: no limit

    def register(self, type_: EventType | str, fn: Handler, name: str | None = None) -> Handler:
        t = _routed_type(type_)
        if not callable(fn):
            raise TypeError(f"a handler must be an async function, not {type(fn).__name__}")
        default = f"{getattr(fn, '__module__', None)}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"
        code = _code_of(fn)
        if (inspect.isfunction(code) or inspect.ismethod(code)) and not inspect.iscoroutinefunction(code):
            # Caught here, at import: awaited, its None would dead-letter every event with a TypeError.
            raise TypeError(f"handler {default} must be a coroutine function (async def, without yield)")
        label = _check_name(name if name is not None else default)
        registered = self.by_type.setdefault(t, [])
        for other_label, other in registered:
            original = getattr(other, "__wrapped__", other)
            if original is fn:
                return fn  # the same function decorated twice for one type: it still runs once per event
            if _source(original) is not None and _source(original) == _source(fn):
                # One file imported under two module names (two entries of SENTPIPE_HANDLER_MODULES
                # reaching it through different sys.path entries): each event would be handled twice.
                raise ValueError(
                    f"handler {label!r} for {t.value} is the handler {other_label!r} again: its module "
                    "is imported under two names"
                )
            if other_label == label:
                raise ValueError(f"two handlers named {label!r} for {t.value}: give one another name")
        registered.append((label, _guarded(fn, self, label)))
        return fn

    def for_type(self, type_: EventType) -> list[tuple[str, Handler]]:
        return self.by_type.get(type_, [])

    def clear(self) -> None:
        self.by_type.clear()


registry = HandlerRegistry()


def handler(type_: EventType | str, name: str | None = None) -> Callable[[Handler], Handler]:
    """Register an async handler for a canonical type (module import time)."""

    def deco(fn: Handler) -> Handler:
        return registry.register(type_, fn, name)

    return deco


def load_modules(modules: Iterable[str]) -> None:
    """Import the modules listed in SENTPIPE_HANDLER_MODULES so their @handler decorators run.

    Any failure, SystemExit included (which would otherwise end the worker with status 0, silently), is
    one HandlerModuleError naming the module and where its code failed."""
    for module in modules:
        try:
            importlib.import_module(module)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:
            if isinstance(exc, ModuleNotFoundError) and exc.name and f"{module}.".startswith(f"{exc.name}."):
                raise HandlerModuleError(
                    f"SENTPIPE_HANDLER_MODULES: importing {module!r} failed: no module named {exc.name!r}"
                    " (is it installed, or on PYTHONPATH?)"
                ) from None
            # The innermost line of the module's own code: not importlib's (its frames are "<frozen ...>" or
            # in its package), nor this module's refusing a handler at registration.
            frames = [
                f
                for f in traceback.extract_tb(exc.__traceback__)
                if not f.filename.startswith(("<", *_NOT_THE_MODULES_CODE))
            ]
            where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
            raise HandlerModuleError(
                f"SENTPIPE_HANDLER_MODULES: importing {module!r} failed{where}: "
                f"{type(exc).__name__}: {exception_message(exc)}"
            ) from None


_NOT_THE_MODULES_CODE = (os.path.dirname(importlib.__file__) + os.sep, __file__)
