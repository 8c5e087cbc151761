"""The worker's HTTP face on its metrics port: /metrics, /livez, /readyz, served on the worker's own loop.

Because it runs on the event loop that does the work, a blocked loop answers nothing and the probe times
out; a stalled stage (processors/watchdog.py) answers 503 with the stall named. In role `all` the projector
is a child process with probes of its own: this process polls them and answers for both, and its scrape
carries the child's metrics too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

import aiohttp
import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, Metric, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from sentpipe import metrics as m
from sentpipe.guarded_http import guard, json_errors
from sentpipe.processors.watchdog import Stall, Watchdog

log = logging.getLogger("sentpipe.health")

CHECK_EVERY_S = 5.0


# A process that has not answered its probe for this long is blocked (as a loop serving its own probe is
# when the probe times out).
BLOCKED_AFTER_S = 10.0
PROBE_EVERY_S = 1.0
# As the ingress's gatherer waits for its workers: under Prometheus's default scrape timeout (10 s).
METRICS_TIMEOUT_S = 5.0
SERVED = m.SERVED["worker"]


class ProcessProbe:
    """Another process's /livez and /readyz, polled from this one (role `all` projects in a child process):
    an answer is its heartbeat; its failures are this worker's failures, its readiness part of ours."""

    def __init__(self, name: str, after_s: float = BLOCKED_AFTER_S) -> None:
        self.name, self.after_s = name, after_s
        self.base: str | None = None  # known once the process listens
        self.answered_at: float | None = None
        self.problems: list[str] = []
        self.ready = False
        # The current process's last exposition, and what the processes it replaced had counted (their last
        # expositions' counters and histograms, summed): see `restarted`.
        self.last_metrics: str | None = None
        self.earlier: str | None = None
        self._generation = 0  # one per process polled: an answer of the one replaced is not this one's

    async def run(self, base: str, every_s: float = PROBE_EVERY_S) -> None:
        self.base = base
        timeout = aiohttp.ClientTimeout(total=max(every_s, 1.0))
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while True:
                try:
                    async with http.get(f"{base}/livez") as resp:
                        body = orjson.loads(await resp.read())
                    self.answered_at = time.monotonic()
                    self.problems = [] if resp.status == 200 else [str(s) for s in body.get("stalls", [])]
                    async with http.get(f"{base}/readyz") as resp:
                        self.ready = resp.status == 200
                except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError, AttributeError):
                    pass  # not answering (or not as expected): its heartbeat ages, see is_ready
                await asyncio.sleep(every_s)

    def restarted(self) -> None:
        """A new process replaces the one polled: starting, it is not ready and not blocked. What the old one
        counted stays in the scrape: its counters restart at 0 in the new process, and a series this process
        also holds (retries of dead letters, producers recreated) fell to this process's share, which
        Prometheus reads as a reset and counts that whole share again as an increase."""
        if self.last_metrics is not None:
            families: dict[str, Metric] = {}
            try:
                for text in (self.earlier, self.last_metrics):
                    if text is not None:
                        _add_samples(families, text, counted_only=True)
                summed = _Families(list(families.values()))
                self.earlier = generate_latest(summed).decode()  # type: ignore[arg-type]
            except ValueError as exc:  # its text did not parse: it was left out of its scrapes too
                log.warning("could not keep the %s process's counts: %s", self.name, exc)
        self.last_metrics = None
        self._generation += 1
        self.base, self.answered_at, self.problems, self.ready = None, None, [], False

    def is_ready(self) -> bool:
        """Its last answer said ready, and it has answered lately: one slow answer under load does not take
        the worker out of readiness, a process that stopped answering does."""
        return self.ready and self.blocked_for() is None

    def blocked_for(self) -> float | None:
        """Seconds without an answer once it has answered; during its start it is not ready, not blocked."""
        if self.answered_at is None:
            return None
        late = time.monotonic() - self.answered_at
        return late if late >= self.after_s else None

    async def metrics(self, timeout_s: float = METRICS_TIMEOUT_S) -> str | None:
        if self.base is None:
            return None
        generation = self._generation
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as http,
                http.get(f"{self.base}/metrics") as resp,
            ):
                text = await resp.text() if resp.status == 200 else None
        except (aiohttp.ClientError, TimeoutError):
            return None
        if generation != self._generation:
            return None  # the answer of a process replaced meanwhile: its counts are in `earlier`
        if text is not None:
            self.last_metrics = text
        return text


class _Families:
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


# What a process that has exited still adds to a scrape: its counts. Its gauges (lag, stalls) went with it.
_COUNTED = ("counter", "histogram", "summary")


def _add_samples(families: dict[str, Metric], text: str, *, counted_only: bool = False) -> None:
    """Another process's exposition into `families`: a sample both have is summed (each holds part of the
    worker's counts); its process_* and python_* families describe another interpreter and are left out (the
    names would collide with ours). ValueError: the text does not parse."""
    for fam in text_string_to_metric_families(text):
        if fam.name.startswith(("process_", "python_")) or (counted_only and fam.type not in _COUNTED):
            continue
        mine = families.get(fam.name)
        if mine is None:
            families[fam.name] = fam
            continue
        at = {(s.name, tuple(sorted(s.labels.items()))): i for i, s in enumerate(mine.samples)}
        for sample in fam.samples:
            i = at.get((sample.name, tuple(sorted(sample.labels.items()))))
            if i is None:
                mine.samples.append(sample)
                continue
            ours = mine.samples[i]
            both = min if sample.name.endswith("_created") else sum
            mine.samples[i] = ours._replace(value=both((ours.value, sample.value)))


def merged_exposition(others: Sequence[str], earlier: Sequence[str] = ()) -> bytes:
    """This process's metrics with other processes' added, as one scrape; `earlier`: the counts of processes
    that have exited (`ProcessProbe.earlier`), whose successors count on from 0."""
    families = {f.name: f for f in SERVED.collect()}
    for text in others:
        _add_samples(families, text)
    for text in earlier:
        _add_samples(families, text, counted_only=True)
    return generate_latest(_Families(list(families.values())))  # type: ignore[arg-type]


class Health:
    def __init__(self) -> None:
        self.watchdogs: list[Watchdog] = []
        self.probes: list[ProcessProbe] = []
        self.ready_checks: dict[str, Callable[[], bool]] = {}

    def blocked_loops(self) -> list[str]:
        return [
            f"{p.name} process not answering for {late:.0f}s"
            for p in self.probes
            if (late := p.blocked_for()) is not None
        ]

    def add(self, watchdog: Watchdog) -> Watchdog:
        self.watchdogs.append(watchdog)
        m.WORKER_STALLED.labels(watchdog.stage).set(0)
        return watchdog

    def stalls(self) -> list[Stall]:
        found = []
        for w in self.watchdogs:
            mine = w.stalls()
            m.WORKER_STALLED.labels(w.stage).set(1 if mine else 0)
            found += mine
        return found

    def remote_stalls(self) -> list[str]:
        return [problem for p in self.probes for problem in p.problems]

    def not_ready(self) -> list[str]:
        return [name for name, ok in self.ready_checks.items() if not ok()]

    async def watch(self) -> None:
        """Say it loudly: a stall is logged as an error on every check until it clears."""
        while True:
            for stall in self.stalls():
                log.error(
                    "worker stalled: %s",
                    stall,
                    extra={"stage": stall.stage, "topic": stall.topic, "partition": stall.partition},
                )
            await asyncio.sleep(CHECK_EVERY_S)


def _json(status: int, body: dict[str, object]) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


def health_app(health: Health) -> web.Application:
    async def metrics(_: web.Request) -> web.Response:
        others = []
        for p in health.probes:
            text = await p.metrics()
            if text is not None:
                others.append(text)
            elif p.answered_at is not None:
                # Its counts left out, the series both processes hold fell to this process's share: Prometheus
                # read a counter reset, and increase() over the window made up the whole total (which hid
                # "nothing projected" while a blocked projector was too slow to answer). Failed, the scrape
                # marks the target down instead, as the ingress's does.
                log.warning("the %s process did not answer its metrics scrape", p.name)
                detail = f"the {p.name} process did not answer within {METRICS_TIMEOUT_S:g} s"
                return _json(503, {"error": "process_unavailable", "detail": detail})
        # Read after the awaits above: a process replaced meanwhile has its counts there by now.
        earlier = [p.earlier for p in health.probes if p.earlier is not None]
        try:
            body = merged_exposition(others, earlier) if others or earlier else generate_latest(SERVED)
        except ValueError as exc:  # another process's text did not parse: our own metrics still answer
            log.warning("could not merge another process's metrics: %s", exc)
            body = generate_latest(SERVED)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def livez(_: web.Request) -> web.Response:
        blocked = health.blocked_loops()
        if blocked:
            return _json(503, {"status": "blocked", "loops": blocked})
        stalls = [str(s) for s in health.stalls()] + health.remote_stalls()
        if stalls:
            return _json(503, {"status": "stalled", "stalls": stalls})
        return _json(200, {"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        waiting = health.not_ready()
        if waiting:
            return _json(503, {"status": "not_ready", "waiting_for": waiting})
        return _json(200, {"status": "ready"})

    app = web.Application(middlewares=[json_errors])
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/livez", livez)
    app.router.add_get("/readyz", readyz)
    return app


async def serve_health(health: Health, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(health_app(health), access_log=None)
    await runner.setup()
    guard(runner)
    await web.TCPSite(runner, host, port).start()
    return runner
