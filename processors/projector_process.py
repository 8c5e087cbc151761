"""The projector as a process of its own: alone in role `project`, a child of the router's worker in `all`.

Role `all` once ran the projector on a thread beside Faust's loop. Two busy event loops in one interpreter
take turns on the GIL, and every hand-over between the machine's cores cost them both: a 50,000-event drain
went from about 2,900 to 3,900-5,400 events/s (README "Performance") when the stages ran as processes. The
child listens for /livez, /readyz and /metrics on a loopback port it picks and tells the worker which; the
worker polls it (health.ProcessProbe), so its probes and its scrape answer for both processes. Either one
ending ends the other: the child stops when its parent is gone, the worker crashes when the child exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import mode
from psycopg import AsyncConnection, AsyncCursor, AsyncServerCursor, sql
from psycopg.rows import tuple_row
from psycopg_pool import AsyncConnectionPool

from sentpipe.kafka import AsyncProducer, BatchConsumer
from sentpipe.parent_death import die_with_parent
from sentpipe.processors import blocked_handlers as blocked
from sentpipe.processors.handlers import HandlerRegistry, registry
from sentpipe.processors.health import BLOCKED_AFTER_S, PROBE_EVERY_S, Health, ProcessProbe, serve_health
from sentpipe.processors.projector import (
    EXIT_RESTART,
    CommitStuck,
    Projector,
    Tuning,
    init_projector_metrics,
)
from sentpipe.processors.sink import PostgresSink
from sentpipe.processors.topics import projections_group
from sentpipe.processors.watchdog import Watchdog
from sentpipe.schemas.topics import Topics
from sentpipe.settings import DATABASE_CLIENT_ENCODING, Settings

log = logging.getLogger("sentpipe.worker")

# Time for the child to import, connect and listen before the worker gives up on it.
CHILD_START_TIMEOUT_S = 120.0
# Time for the child to finish its batch and commit once asked to stop (Helm's grace period is 60 s).
CHILD_STOP_TIMEOUT_S = 45.0
# psycopg_pool doubles the pause between its reconnection attempts up to half its reconnect_timeout (300 s
# by default): after an outage of a few minutes it next tried up to two minutes after the database was back,
# while the projector's retries only met PoolTimeout and the watchdog called it a stall. Giving up after
# this long ends the round; the projector's next retry starts another at once.
RECONNECT_WINDOW_S = 10.0
# A projector not answering is killed no sooner than this: a handler call blocking its loop is ended by the
# blocked-handler guard by then (interrupted within MAX_BLOCK_S, the process ended GIVE_UP_AFTER_S later,
# the call recorded so the restart does not make it again). Killed first, the call was never recorded, and
# every restart met the same event and blocked again.
GUARD_ENDS_A_CALL_WITHIN_S = blocked.MAX_BLOCK_S + blocked.GIVE_UP_AFTER_S + 5.0


# DISCARD ALL but its DEALLOCATE ALL, with the names of the statements a handler PREPAREd itself. psycopg
# keeps its own prepared statements by name and notices a DISCARD ALL only the first time it runs on a
# connection: after a savepoint rollback had emptied its cache once, the next reset dropped the statements
# it went on using, and every other batch failed on SQLSTATE 26000 and was applied twice.
_RESET = (
    "SELECT name FROM pg_prepared_statements WHERE from_sql; CLOSE ALL; SET SESSION AUTHORIZATION DEFAULT; "
    "RESET ALL; UNLISTEN *; SELECT pg_advisory_unlock_all(); DISCARD TEMP; DISCARD SEQUENCES"
)


async def _reset_session(conn: AsyncConnection) -> None:
    # What a handler leaves in its session must not outlive its batch on the pooled connection: a SET
    # (search_path: the projections' SQL would meet other tables, SQLSTATE 42, held as a failure of the
    # whole), a session advisory lock it never released (every other worker's handler waiting for that key
    # would time out for as long as the connection lived), temp tables, LISTENs, SET ROLE, its own
    # PREPAREd statements. RESET ALL goes back to the session's defaults, the URL's `options` included.
    # It runs outside a transaction: in autocommit, then back, so the pool does not find the connection in
    # a transaction (it would discard it: a new one per batch).
    # And on the client: a handler's `ctx.conn.row_factory = dict_row` made the stage's own queries read
    # dicts (`row[0]`: KeyError, which dead-lettered every record while a column lacked its default), and
    # its `ctx.conn.cursor_factory = AsyncRawCursor` ($1 placeholders) made the projections' `%s` SQL a
    # syntax error (SQLSTATE 42601, held as a failure of the whole: every later batch on that connection).
    conn.row_factory = tuple_row
    conn.cursor_factory = AsyncCursor
    conn.server_cursor_factory = AsyncServerCursor
    # A notice or notify callback a handler adds (one per call, to log its SQL's RAISE NOTICE) was called
    # for every later notice on the connection, with the context of events long gone, and the list grew
    # by one per event for the connection's life. The stage adds none; psycopg offers no public clear.
    conn._notice_handlers.clear()
    conn._notify_handlers.clear()
    autocommit = conn.autocommit
    if not autocommit:
        await conn.set_autocommit(True)
    cur = await conn.execute(_RESET)
    for (name,) in await cur.fetchall():
        await conn.execute(sql.SQL("DEALLOCATE {}").format(sql.Identifier(name)))
    if not autocommit:
        await conn.set_autocommit(False)


def uninterruptible_calls_file(settings: Settings) -> Path:
    """Where the handler calls that ended the process are kept for its restart (the data directory
    survives a container's restart in its pod: Helm mounts a volume there)."""
    return settings.data_dir / f"{settings.app_id}.uninterruptible-handlers.json"


def open_pool(settings: Settings) -> AsyncConnectionPool:
    return AsyncConnectionPool(
        settings.database_url.get_secret_value(),
        # A startup parameter: RESET ALL (`_reset_session`) keeps it.
        kwargs={"client_encoding": DATABASE_CLIENT_ENCODING},
        min_size=1,
        max_size=settings.db_pool_size,
        timeout=5.0,
        reconnect_timeout=RECONNECT_WINDOW_S,
        reset=_reset_session,
        open=False,
    )


class ProjectorService:
    """The projector with its resources: consumer, producer for dead letters, database pool."""

    def __init__(self, settings: Settings, handlers: HandlerRegistry, health: Health) -> None:
        self.s = settings
        handlers.timeout_s = settings.handler_timeout_s
        topics = Topics(settings.topic_prefix)
        self.pool = open_pool(settings)
        self.producer = AsyncProducer.from_settings(settings, delivery_timeout_s=30.0)
        self.uninterruptible = blocked.UninterruptibleCalls(uninterruptible_calls_file(settings))
        self.projector = Projector(
            BatchConsumer(settings, projections_group(settings), topics.routed),
            self.producer,
            PostgresSink(self.pool, handlers, self.uninterruptible),
            topics,
            Tuning(
                settings.batch_size, settings.batch_within_s, settings.retry_initial_s, settings.retry_max_s
            ),
            health.add(Watchdog("project", settings.stall_after_s)),
            broker_down=lambda: self.producer.unavailable is not None,
        )
        health.ready_checks["projector"] = lambda: self.projector.started
        self.stopping = False

    async def run(self) -> None:
        await self.producer.start()
        await self.pool.open(wait=False)
        try:
            await self.projector.run()
        finally:
            await self.producer.close()
            await self.pool.close()

    def stop(self) -> None:
        self.stopping = True
        self.projector.stop()


def run_projector(
    settings: Settings,
    handlers: HandlerRegistry = registry,
    *,
    port: int | None = None,
    listening: Callable[[int], None] | None = None,
    parent_pid: int | None = None,
) -> None:
    """Role `project`: the projector alone, no Faust; SIGTERM finishes the batch in hand and commits it.

    As role `all`'s child: its probes on loopback `port` (0: any free one, passed to `listening`), SIGINT
    left to the worker (which stops it with SIGTERM), and it stops by itself if `parent_pid` goes away."""

    services: list[ProjectorService] = []

    async def main() -> None:
        init_projector_metrics()
        health = Health()
        service = ProjectorService(settings, handlers, health)
        services.append(service)
        loop = asyncio.get_running_loop()

        def on_sigterm() -> None:
            if parent_pid is not None and os.getppid() != parent_pid:  # `die_with_parent`'s signal
                log.error("the worker process %d is gone: the projector stops", parent_pid)
            service.stop()

        loop.add_signal_handler(signal.SIGTERM, on_sigterm)
        if parent_pid is None:
            loop.add_signal_handler(signal.SIGINT, service.stop)
            host, where = settings.worker_metrics_host, settings.worker_metrics_port
        else:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C reaches both: the worker decides
            host, where = "127.0.0.1", port or 0
        runner = await serve_health(health, host, where)
        if listening is not None:
            listening(runner.addresses[0][1])
        tasks = [asyncio.ensure_future(health.watch())]
        if parent_pid is not None:
            tasks.append(asyncio.ensure_future(_orphaned(parent_pid, service.stop)))
        blocked.guard.start(loop, service.uninterruptible)
        log.info("projector started", extra={"group": projections_group(settings)})
        try:
            await service.run()
        finally:
            blocked.guard.stop()
            for task in tasks:
                task.cancel()
            await runner.cleanup()
        log.info("projector stopped")

    import uvloop

    try:
        uvloop.run(main())
    except CommitStuck as exc:
        log.critical("%s: the projector restarts with a new Kafka client", exc)
        logging.shutdown()
        # Not a normal exit: the consumer's thread still waits in librdkafka, and tearing that client down
        # at exit can wait with it. The batch in hand is uncommitted: its next owner applies it again.
        os._exit(EXIT_RESTART)
    except (asyncio.CancelledError, RuntimeError, SystemExit, KeyboardInterrupt) as exc:
        if services and _ended_by_a_handler(exc, services[0]):
            raise SystemExit(blocked.EXIT_UNINTERRUPTIBLE) from None
        raise


def _ended_by_a_handler(exc: BaseException, service: ProjectorService) -> bool:
    """Whether a handler call ended the loop (a cancellation, `loop.stop()`, or a SystemExit or
    KeyboardInterrupt out of a callback it scheduled, `loop.call_soon(sys.exit)`: the loop lets those
    through, and the stage never raises them in a call of its own; signals are the loop's handlers'); if
    so, its calls are kept for the restart, which dead-letters their events."""
    stopped = isinstance(exc, RuntimeError) and "Event loop stopped before Future completed" in str(exc)
    exited = isinstance(exc, SystemExit | KeyboardInterrupt)
    blamed = blocked.guard.ended_the_loop()
    if not (stopped or exited or isinstance(exc, asyncio.CancelledError)) or not blamed or service.stopping:
        return False
    for key in blamed:
        service.uninterruptible.add(key, blocked.ENDED_THE_LOOP)
        log.critical(
            "handler %s ended the projector's event loop with event %s (%s): restarted, the projector "
            "dead-letters that event for this handler uncalled",
            key.handler,
            key.event_id,
            "it stopped the loop"
            if stopped
            else f"a callback of its raised {type(exc).__name__}"
            if exited
            else "it cancelled the stage's tasks",
            extra={"handler": key.handler, "event_id": key.event_id},
        )
    return True


async def _orphaned(parent_pid: int, stop: Callable[[], None]) -> None:
    """A worker killed with SIGKILL cannot stop its child: the child sees its parent change and stops
    (where `die_with_parent` has no kernel signal to ask for)."""
    while os.getppid() == parent_pid:  # noqa: ASYNC110 - no event says "my parent died"
        await asyncio.sleep(1.0)
    log.error("the worker process %d is gone: the projector stops", parent_pid)
    stop()


def _child(settings: Settings, conn: multiprocessing.connection.Connection, parent_pid: int) -> None:
    """The child's entry point (spawned: a fresh interpreter, nothing inherited but the arguments)."""
    from sentpipe.logs import configure
    from sentpipe.processors.handlers import load_modules

    configure(settings.log_level, settings.log_json)
    die_with_parent(parent_pid, "worker", "the projector")
    load_modules(settings.handler_modules)
    run_projector(settings, port=0, listening=conn.send, parent_pid=parent_pid)


class ProjectorProcess(mode.Service):
    """Role `all`: starts the projector's process with the worker, watches it, stops it with the worker."""

    def __init__(self, settings: Settings, health: Health, **kwargs: Any) -> None:
        self.s = settings
        self.probe = ProcessProbe("projector")
        health.probes.append(self.probe)
        health.ready_checks["projector"] = self.probe.is_ready
        self._proc: BaseProcess | None = None
        self._stopping = False
        self._exited = asyncio.Event()
        super().__init__(**kwargs)

    async def on_start(self) -> None:
        if self.should_stop:
            return  # stopped (a crash elsewhere) before it started: no child to leave behind
        self._spawn()

    def _spawn(self) -> None:
        ctx = multiprocessing.get_context("spawn")  # no librdkafka threads or loop state carried over
        ours, theirs = ctx.Pipe(duplex=False)
        proc = self._proc = ctx.Process(
            target=_child,
            args=(self.s, theirs, os.getpid()),
            name="sentpipe-projector",
            # Should the worker's own stop never get to it: terminated at exit, not waited for forever.
            daemon=True,
        )
        proc.start()
        theirs.close()
        # The only thread that waits for the child: two waiting at once race to reap it, and the loser sees
        # no exit status for a process that has exited. A daemon thread, not the loop's executor, whose
        # threads the interpreter waits for at exit: a child that never exits must not hold the worker.
        loop = asyncio.get_running_loop()
        threading.Thread(target=self._reap, args=(proc, loop), name="projector-reaper", daemon=True).start()
        self.add_future(self._supervise(proc, ours))
        log.info("projector process started", extra={"pid": proc.pid})

    def _reap(self, proc: BaseProcess, loop: asyncio.AbstractEventLoop) -> None:
        proc.join()
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(self._exited.set)

    async def _supervise(self, proc: BaseProcess, conn: multiprocessing.connection.Connection) -> None:
        port = await asyncio.to_thread(_port_of, proc, conn)
        if port is None and proc.is_alive():
            proc.kill()  # it cannot be watched: ended here, it crashes the worker below
        polling = None if port is None else asyncio.ensure_future(self.probe.run(f"http://127.0.0.1:{port}"))
        killing = asyncio.ensure_future(self._kill_when_blocked(proc))
        try:
            await self._exited.wait()
        finally:
            killing.cancel()
            if polling is not None:
                polling.cancel()
        if self._stopping:
            return
        if proc.exitcode == EXIT_RESTART:  # it asked for a new process (a Kafka client stuck for good)
            log.warning("the projector process asked for a restart: starting a new one")
            self._exited.clear()
            self.probe.restarted()
            self._spawn()
            return
        log.critical("the projector process exited with status %s", proc.exitcode)
        await self.crash(RuntimeError(f"the projector process exited with status {proc.exitcode}"))

    async def _kill_when_blocked(self, proc: BaseProcess) -> None:
        """A projector whose loop stays blocked (seen: librdkafka calls that never returned after a broker
        restart) failed liveness, but only an orchestrator acting on the probe restarted it; under docker
        compose, which does not, it projected nothing for good. Killed, it crashes the worker (above), and
        any restart policy starts both again; the uncommitted batch is applied again (idempotent)."""
        after = max(self.s.stall_after_s, 2 * BLOCKED_AFTER_S, GUARD_ENDS_A_CALL_WITHIN_S)
        while True:
            await asyncio.sleep(PROBE_EVERY_S)
            late = self.probe.blocked_for()
            if late is not None and late >= after and not self._stopping:
                log.critical(
                    f"the projector process has not answered for {late:.0f} s (its loop is blocked): killed"
                )
                proc.kill()
                return

    async def on_stop(self) -> None:
        self._stopping = True
        proc = self._proc
        if proc is None or self._exited.is_set():
            return
        proc.terminate()  # SIGTERM: the batch in hand is finished and committed
        try:
            await asyncio.wait_for(self._exited.wait(), CHILD_STOP_TIMEOUT_S)
        except TimeoutError:
            log.error("the projector process did not stop in time: killed")
        finally:
            # However this ends (in time, late, or cancelled by a crash elsewhere), no child outlives it.
            if not self._exited.is_set():
                proc.kill()


def _port_of(proc: BaseProcess, conn: multiprocessing.connection.Connection) -> int | None:
    """The child's probe port, once it listens; None if it exits (or never says) first."""
    for _ in range(int(CHILD_START_TIMEOUT_S / 0.5)):
        if conn.poll(0.5):
            try:
                return int(conn.recv())
            except (EOFError, OSError):
                return None
        if not proc.is_alive():
            return None
    log.error("the projector process did not listen within %.0f s", CHILD_START_TIMEOUT_S)
    return None
