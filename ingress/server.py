"""Run the ingress: the webhook app and the metrics app, with graceful shutdown on SIGTERM/SIGINT.

With N worker processes (SENTPIPE_INGRESS_WORKERS; 0, the default, is one per CPU this process may use) the
command becomes a small supervisor: it checks the configuration once, then starts N processes that all
listen on the one webhook port (SO_REUSEPORT: the kernel spreads connections over them), each with its own
producer. The supervisor serves their metrics as one on the metrics port (`ingress/gather.py`: every sample
labelled `worker`). SIGTERM/SIGINT is passed on to every worker, each finishes its requests and flushes its
producer, and the supervisor exits 0 once all have exited 0. A worker that exits on its own stops the others
and the supervisor exits 1, so an orchestrator restarts the whole set. A process that is hung (records
waiting for delivery reports that no longer come, a spool drain that does not move) stops itself, status 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import http.client
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import time
import urllib.error
from collections.abc import Callable, Coroutine
from pathlib import Path
from types import FrameType
from typing import Any

from aiohttp import web

from sentpipe.guarded_http import guard
from sentpipe.ingress.app import (
    StartupError,
    check_topic_limits,
    create_app,
    create_metrics_app,
    finish_in_flight,
    liveness_problem,
    open_spool,
    producer_for,
    verifiers_for,
)
from sentpipe.ingress.gather import Gatherer, fetch
from sentpipe.ingress.protocol import answer_webhooks_directly, stop_reading
from sentpipe.open_files import raise_open_files_limit
from sentpipe.parent_death import die_with_parent
from sentpipe.settings import Settings

log = logging.getLogger("sentpipe.ingress")

HUNG_CHECK_S = 1.0  # how often a process checks itself with the liveness probe's test
# A worker whose metrics port has not answered this long has a blocked event loop: it cannot see that itself,
# and the pod's liveness probe reaches whichever worker the kernel picks, so the supervisor stops the set.
WORKER_SILENT_S = 30.0
WORKER_PROBE_EVERY_S = 5.0
# Short: the probes run in the supervisor's loop, one worker after another, and a SIGTERM or another
# worker's exit waits for them. A loaded worker slower than this for WORKER_SILENT_S on end is not serving.
WORKER_PROBE_TIMEOUT_S = 1.0
# For a process's own start-up and teardown around the timed stages of its stop (see `stop_deadline_s`).
STOP_SLACK_S = 5.0


def in_flight_grace_s(settings: Settings) -> float:
    """How long requests in hand get to finish once a stop begins: a produce, and the answer after it."""
    return settings.produce_timeout_s + 5


def stop_deadline_s(settings: Settings) -> float:
    """The longest an ingress takes from SIGTERM to its exit, stage by stage (`serve`): the requests in
    flight (`in_flight_grace_s`), aiohttp's own wait for any still running (as long again), the spool's
    write in hand (the produce timeout), the producer's flush (twice it), and STOP_SLACK_S. The supervisor
    kills a worker still running past it; a Kubernetes pod's terminationGracePeriodSeconds (after its preStop
    sleep) and compose's stop_grace_period must be at least this, or the process is killed mid-flush."""
    p = settings.produce_timeout_s
    return 2 * in_flight_grace_s(settings) + p + 2 * p + STOP_SLACK_S


async def _listen(site: web.TCPSite, host: str, port: int, settings_named: str) -> None:
    """Bind, or StartupError naming the settings: a port in use or a host that does not resolve."""
    try:
        await site.start()
    except OSError as exc:
        try:
            where = site.name
        except ValueError:  # a host no URL can hold ('my host'): naming it was a ValueError of yarl's
            where = f"{host}:{port}"
        raise StartupError(f"cannot listen on {where} ({settings_named}): {exc.strerror or exc}") from None


async def serve(
    settings: Settings,
    host: str,
    port: int,
    metrics_port: int,
    *,
    reuse_port: bool = False,
    check_topics: bool = True,
    index: int = 0,
    metrics_host: str | None = None,
    on_metrics_port: Callable[[int], None] | None = None,
) -> None:
    """One ingress process. A worker of a set (`reuse_port`) binds its metrics to `metrics_host` (port 0: one
    the kernel picks) and tells the supervisor the port through `on_metrics_port`."""
    verifiers_for(settings)  # unusable secrets: refused before a producer (and its threads) exists
    spool = open_spool(settings, index)
    if check_topics:  # Kafka security settings the broker refuses, too
        await asyncio.to_thread(check_topic_limits, settings)
    producer = producer_for(settings)
    if spool is not None:
        # Logged by the producer when every broker is down: an operator reading "refused" took it for 503s.
        producer.while_down = (
            "new deliveries go to the spool (answered 200 while it has room) until one answers"
        )
    app = create_app(settings, producer, spool)
    # shutdown_timeout: in-flight requests get this long to finish before the producer flushes.
    runner = web.AppRunner(
        app,
        shutdown_timeout=in_flight_grace_s(settings),
        access_log=None,
        keepalive_timeout=settings.ingress_keepalive_s,
    )
    await runner.setup()
    answer_webhooks_directly(runner)
    site = web.TCPSite(runner, host, port, backlog=2048, reuse_port=reuse_port or None)
    metrics_runner = web.AppRunner(create_metrics_app(), access_log=None)
    await metrics_runner.setup()
    guard(metrics_runner, settings.body_timeout_s)  # bound like the webhook port: the same descriptors
    metrics_site = web.TCPSite(metrics_runner, metrics_host or host, metrics_port)
    try:
        await _listen(site, host, port, "SENTPIPE_INGRESS_HOST, SENTPIPE_INGRESS_PORT")
        await _listen(metrics_site, metrics_host or host, metrics_port, "SENTPIPE_INGRESS_METRICS_PORT")
    except StartupError:
        # The producer is running by now: closed in order, its probes do not die with the loop (tracebacks).
        await metrics_runner.cleanup()
        await runner.cleanup()
        raise
    # The ports bound: with 0 the kernel picked them, and the log says which.
    port, metrics_port = runner.addresses[0][1], metrics_runner.addresses[0][1]
    if on_metrics_port is not None:
        on_metrics_port(metrics_port)
    if settings.uses_development_secret and not reuse_port:  # with workers, the supervisor says it once
        log.warning(
            "using the built-in development webhook secret: set SENTPIPE_WEBHOOK_SECRET for real traffic"
        )
    # What is loaded and built by now lives as long as the process: frozen out of the collector's sight, so
    # a full collection no longer walks it (a pause of ~20 ms under load, a p99 outlier).
    gc.collect()
    gc.freeze()
    log.info(
        "ingress listening",
        extra={"url": f"http://{host}:{port}/webhooks/sent", "metrics_port": metrics_port},
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    hung: list[str] = []
    watcher = loop.create_task(_stop_when_hung(app, stop, hung))
    await stop.wait()
    watcher.cancel()
    log.info("shutting down: finishing in-flight requests and flushing the producer")
    # No new connections; the requests being handled finish first, bodies included. aiohttp's own shutdown
    # drops what arrives after it starts, so a request whose body was still on its way would meet the body
    # timeout (408) instead of its 200.
    await site.stop()
    # Keep-alive connections would bring new requests for as long as clients send them; and a request the
    # shortcut took is unknown to aiohttp's shutdown. Each connection answers what it has read, then closes.
    stop_reading(runner)
    left = await finish_in_flight(in_flight_grace_s(settings))
    if left:
        log.warning("shutting down with %d requests still in flight after the grace period", left)
    await runner.cleanup()
    await metrics_runner.cleanup()
    if spool is not None and spool.write_running_s() > 0:
        # The write's thread sits in a disk that does not answer: the loop's close and the interpreter's exit
        # would each join it without a bound, and Docker or systemd restart a process that exits, not one
        # that hangs. No request waits for that write any more (each got its 503 or was cut at the grace).
        log.error("a spool write (fdatasync) has not finished: exiting with status 1 without waiting for it")
        logging.shutdown()
        os._exit(1)
    if hung:
        raise SystemExit(1)


async def _stop_when_hung(app: web.Application, stop: asyncio.Event, hung: list[str]) -> None:
    """Stop this process, status 1, once it is hung (`liveness_problem`, what /healthz answers 503 for): the
    probe of a set of workers reaches whichever one the kernel hands its connection to, maybe never the hung
    one, and Docker or systemd restart a process that exits, not one that is unhealthy."""
    while not stop.is_set():
        await asyncio.sleep(HUNG_CHECK_S)
        problem = liveness_problem(app)
        if problem is not None:
            log.error("ingress worker hung (%s): %s; stopping with status 1", *problem)
            hung.append(problem[0])
            stop.set()


def _run_loop(main: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported platform
        asyncio.run(main)
    else:
        uvloop.run(main)


def available_cpus() -> int:
    """The CPUs this process may use: its CPU affinity, capped by a cgroup CPU quota (a container's CPU
    limit), at least 1. os.cpu_count() is the host's count, which a container does not get."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        cpus = min(cpus, quota)
    return max(1, cpus)


def _cgroup_quota(
    root: Path = Path("/sys/fs/cgroup"), membership: Path = Path("/proc/self/cgroup")
) -> int | None:
    """The tightest cgroup CPU quota over this process's cgroup and its ancestors, in whole CPUs rounded up
    (cgroup v2 cpu.max, else v1 cfs quota); None: no limit. A container sees its own cgroup as the root, a
    systemd service with CPUQuota= sits below it."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        lines = []
    own = next((line[3:] for line in lines if line.startswith("0::")), "/")
    quotas: list[int] = []
    where = root / own.strip("/")
    while True:
        try:
            text = (where / "cpu.max").read_text().split()
            if len(text) == 2 and text[0] != "max":
                quotas.append(math.ceil(int(text[0]) / int(text[1])))
        except (OSError, ValueError, ZeroDivisionError):
            pass
        if where == root or root not in where.parents:
            break
        where = where.parent
    if quotas:
        return min(quotas)
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return math.ceil(quota / period) if quota > 0 and period > 0 else None


def worker_count(settings: Settings, port: int) -> int:
    """SENTPIPE_INGRESS_WORKERS, or with 0 (the default) one process per available CPU; one when the port is
    0 (a port the kernel picks cannot be shared)."""
    if settings.ingress_workers > 0:
        return settings.ingress_workers
    return 1 if port == 0 else available_cpus()


def run(settings: Settings, host: str, port: int, metrics_port: int) -> None:
    """Serve until SIGTERM/SIGINT (N processes, see `worker_count`); configuration it cannot run with: one
    line on stderr, exit status 1."""
    raise_open_files_limit()
    try:
        settings = settings.model_copy(update={"ingress_workers": worker_count(settings, port)})
        if settings.ingress_workers > 1:
            code = supervise(settings, host, port, metrics_port)
            if code:
                raise SystemExit(code)
        else:
            _run_loop(serve(settings, host, port, metrics_port))
    except StartupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


def _worker(
    settings: Settings,
    host: str,
    port: int,
    index: int,
    to_supervisor: multiprocessing.connection.Connection,
    supervisor_pid: int,
) -> None:
    """One of N worker processes (spawned: a fresh interpreter with nothing inherited but the arguments)."""
    from sentpipe.logs import configure

    configure(settings.log_level, settings.log_json)
    die_with_parent(supervisor_pid, "ingress supervisor", f"ingress worker {index}")
    try:
        _run_loop(
            serve(
                settings,
                host,
                port,
                0,
                reuse_port=True,
                check_topics=False,
                index=index,
                metrics_host="127.0.0.1",
                on_metrics_port=to_supervisor.send,
            )
        )
    except StartupError as exc:  # pragma: no cover - the supervisor checked the same configuration
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


def _silent_worker(ports: list[int | None], answered: list[float]) -> int | None:
    """Asks each worker's metrics port (`answered` notes when it answers); the first one silent for
    WORKER_SILENT_S, if any. A worker still starting (no port yet) is not asked."""
    for i, port in enumerate(ports):
        if port is None:
            answered[i] = time.monotonic()
            continue
        try:
            fetch(port, WORKER_PROBE_TIMEOUT_S)
        except urllib.error.HTTPError:  # an error status is still an answer: its loop turns
            answered[i] = time.monotonic()
        except (OSError, http.client.HTTPException):  # refused, timed out, cut off: not an answer
            if time.monotonic() - answered[i] >= WORKER_SILENT_S:
                return i
        else:
            answered[i] = time.monotonic()
    return None


def port_free(host: str, port: int) -> None:
    """Refuses a port something listens on. The workers bind with SO_REUSEPORT, which never fails: a set
    started beside another (orphans of a supervisor killed with SIGKILL, say) shared the port with it, the
    kernel splitting Sent's deliveries between two configurations."""
    found = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    for family, kind, proto, _, address in found:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # not refused for TIME_WAIT alone
            try:
                probe.bind(address)
            except OSError as exc:
                raise StartupError(
                    f"port {port} on {host or 'every address'}: {exc.strerror or exc}"
                ) from None


def supervise(settings: Settings, host: str, port: int, metrics_port: int) -> int:
    """Start SENTPIPE_INGRESS_WORKERS worker processes on one port and serve their metrics as one; the exit
    status for the command."""
    n = settings.ingress_workers
    if port == 0:
        raise StartupError("SENTPIPE_INGRESS_WORKERS > 1 needs a fixed port, not 0")
    verifiers_for(settings)  # unusable secrets: one line here, not one per worker
    port_free(host, port)
    check_topic_limits(settings)
    try:
        gatherer = Gatherer(host, metrics_port)
    except OSError as exc:
        raise StartupError(f"SENTPIPE_INGRESS_METRICS_PORT {metrics_port}: {exc.strerror or exc}") from None
    if settings.uses_development_secret:
        log.warning(
            "using the built-in development webhook secret: set SENTPIPE_WEBHOOK_SECRET for real traffic"
        )
    stopping: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stopping.append(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    ctx = multiprocessing.get_context("spawn")  # no librdkafka threads or loop state carried into a child
    pipes = [ctx.Pipe(duplex=False) for _ in range(n)]
    workers = [
        ctx.Process(
            target=_worker,
            args=(settings, host, port, i, pipes[i][1], os.getpid()),
            name=f"sentpipe-ingress-{i}",
        )
        for i in range(n)
    ]
    try:
        for w in workers:
            w.start()
        log.info(
            "ingress supervising %d worker processes on one port",
            n,
            extra={
                "url": f"http://{host}:{port}/webhooks/sent",
                "pids": [w.pid for w in workers],
                "metrics_port": metrics_port,
            },
        )
        code = 0
        ports: list[int | None] = [None] * n
        answered = [time.monotonic()] * n  # when each worker's metrics port last answered
        probe_at = time.monotonic() + WORKER_PROBE_EVERY_S
        while not stopping:
            waiting = [pipes[i][0] for i in range(n) if ports[i] is None]
            ready = multiprocessing.connection.wait([*waiting, *(w.sentinel for w in workers)], timeout=0.5)
            for i in range(n):
                if ports[i] is None and pipes[i][0] in ready:
                    with contextlib.suppress(EOFError, OSError):
                        ports[i] = pipes[i][0].recv()
                    if ports[i] is not None and all(p is not None for p in ports):
                        gatherer.serve_workers([p for p in ports if p is not None])
            if time.monotonic() >= probe_at:
                probe_at = time.monotonic() + WORKER_PROBE_EVERY_S
                silent = _silent_worker(ports, answered)
                if silent is not None and not stopping:
                    log.error(
                        "ingress worker %s (pid %s) has not answered for %.0f s (its event loop is blocked):"
                        " stopping the set with status 1",
                        workers[silent].name,
                        workers[silent].pid,
                        time.monotonic() - answered[silent],
                    )
                    code = 1
                    break
            gone = [w for w in workers if w.exitcode is not None]
            if gone and not stopping:
                w = gone[0]
                log.error(
                    "ingress worker %s (pid %s) exited with status %s: stopping the others",
                    w.name,
                    w.pid,
                    w.exitcode,
                )
                code = 1
                break
        # Every worker finishes its requests and flushes its producer (serve's shutdown path).
        for w in workers:
            if w.exitcode is None and w.pid is not None:
                w.terminate()  # SIGTERM
        deadline = time.monotonic() + stop_deadline_s(settings)
        for w in workers:
            w.join(max(0.0, deadline - time.monotonic()))
            if w.exitcode is None:
                log.error("ingress worker %s did not stop in time: killed", w.name)
                w.kill()
                w.join(5)
            if w.exitcode != 0:
                code = 1
        return code
    finally:
        gatherer.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
