"""The worker's HTTP face on its metrics port: /metrics, /livez, /readyz, served on the worker's own loop.

Because it runs on the event loop that does the work, a blocked loop answers nothing and the probe times
out; a stalled stage (processors/watchdog.py) answers 503 with the stall named.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sentpipe import metrics as m
from sentpipe.processors.watchdog import Stall, Watchdog

log = logging.getLogger("sentpipe.health")

CHECK_EVERY_S = 5.0


LOOP_BLOCKED_AFTER_S = 10.0


class LoopBeat:
    """The heartbeat of an event loop other than the one serving the probes (role `all` projects on a
    thread of its own): a loop that has not ticked for `after_s` fails liveness, as a blocked probe loop
    does by not answering."""

    def __init__(self, name: str, after_s: float = LOOP_BLOCKED_AFTER_S) -> None:
        self.name, self.after_s = name, after_s
        self.at = time.monotonic()

    async def run(self, every_s: float = 1.0) -> None:
        while True:
            self.at = time.monotonic()
            await asyncio.sleep(every_s)

    def blocked_for(self) -> float | None:
        late = time.monotonic() - self.at
        return late if late >= self.after_s else None


class Health:
    def __init__(self) -> None:
        self.watchdogs: list[Watchdog] = []
        self.beats: list[LoopBeat] = []
        self.ready_checks: dict[str, Callable[[], bool]] = {}

    def blocked_loops(self) -> list[str]:
        return [
            f"{b.name} event loop blocked for {late:.0f}s"
            for b in self.beats
            if (late := b.blocked_for()) is not None
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
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def livez(_: web.Request) -> web.Response:
        blocked = health.blocked_loops()
        if blocked:
            return _json(503, {"status": "blocked", "loops": blocked})
        stalls = health.stalls()
        if stalls:
            return _json(503, {"status": "stalled", "stalls": [str(s) for s in stalls]})
        return _json(200, {"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        waiting = health.not_ready()
        if waiting:
            return _json(503, {"status": "not_ready", "waiting_for": waiting})
        return _json(200, {"status": "ready"})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/livez", livez)
    app.router.add_get("/readyz", readyz)
    return app


async def serve_health(health: Health, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(health_app(health), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
