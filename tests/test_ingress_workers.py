"""`sentpipe ingress` with SENTPIPE_INGRESS_WORKERS=2: two processes on one port (SO_REUSEPORT), each with
its own producer and metrics port; SIGTERM under load stops both gracefully and loses no acknowledged event;
a worker that dies takes the set down with a non-zero status (so the orchestrator restarts it)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import time
from pathlib import Path

import aiohttp

from sentpipe.schemas.samples import SampleFactory
from sentpipe.schemas.signature import signature_headers
from sentpipe.schemas.topics import Topics
from sentpipe.settings import Settings
from tests.http_tools import metric_sum, scrape
from tests.kafka_tools import read_topic
from tests.processes import Proc, free_port, settings_env


def free_run(n: int, avoid: int) -> int:
    """A port p such that p .. p+n-1 are all free now (and none is `avoid`)."""
    while True:
        start = free_port()
        ports = range(start, start + n)
        if avoid in ports:
            continue
        try:
            with contextlib.ExitStack() as stack:
                for p in ports:
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", p))
            return start
        except OSError:
            continue


def start_workers(s: Settings, log_dir: Path, workers: int = 2) -> tuple[Proc, int, int]:
    port = free_port()
    mport = free_run(workers, avoid=port)  # worker i serves metrics on mport + i: all must be free
    env = settings_env(
        s, ingress_host="127.0.0.1", ingress_port=port, ingress_metrics_port=mport, ingress_workers=workers
    )
    proc = Proc(["ingress"], env, log_dir / f"ingress-{port}.log").start()
    for i in range(workers):  # every worker is up once its own metrics port answers
        proc.wait_http(f"http://127.0.0.1:{mport + i}/metrics")
    proc.wait_http(f"http://127.0.0.1:{port}/healthz")
    return proc, port, mport


def test_two_workers_share_the_port_and_sigterm_loses_no_acknowledged_event(
    settings: Settings, topics: Topics, tmp_path: Path
) -> None:
    proc, port, mport = start_workers(settings, tmp_path)
    secret = settings.webhook_secret.get_secret_value()
    bodies = [s.body for s in SampleFactory(41).mix(600)]
    results: dict[int, int] = {}
    url = f"http://127.0.0.1:{port}/webhooks/sent"
    served: dict[int, float] = {}

    async def run() -> None:
        sem = asyncio.Semaphore(32)
        halfway = asyncio.Event()

        async def one(session: aiohttp.ClientSession, i: int) -> None:
            async with sem:
                headers = {
                    **signature_headers(secret, f"w{i}", int(time.time()), bodies[i]),
                    "content-type": "application/json",
                }
                try:
                    async with session.post(url, data=bodies[i], headers=headers) as resp:
                        await resp.read()
                        results[i] = resp.status
                except aiohttp.ClientError:
                    results[i] = 0  # refused or cut off after shutdown began: not acknowledged
                if len(results) >= 300:
                    halfway.set()

        async def terminate() -> None:
            await asyncio.wait_for(halfway.wait(), 60)
            for i in range(2):  # both took a share of the connections
                served[i] = metric_sum(scrape(mport + i), "sentpipe_ingress_requests_total")
            assert proc.p is not None
            proc.p.send_signal(signal.SIGTERM)

        # Many connections (no keep-alive reuse across all of them), so the kernel spreads them.
        connector = aiohttp.TCPConnector(limit=32, force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            await asyncio.gather(terminate(), *(one(session, i) for i in range(len(bodies))))

    asyncio.run(run())
    assert proc.p is not None and proc.p.wait(60) == 0, proc.tail()
    assert all(n > 0 for n in served.values()) and len(served) == 2, served
    statuses = set(results.values())
    assert statuses <= {200, 408, 503, 0}, statuses  # 408: body cut off by the shutdown, not acknowledged
    acknowledged = {bodies[i] for i, status in results.items() if status == 200}
    assert len(acknowledged) >= 300
    # Both producers flushed before their processes exited: the watermarks say what is stored.
    stored = {rec.value for rec in read_topic(settings.kafka_bootstrap, topics.raw)}
    assert acknowledged <= stored, len(acknowledged - stored)
    log = proc.log.read_text()
    assert log.count("shutting down: finishing in-flight requests") == 2, log


def test_a_worker_that_dies_stops_the_set_with_a_non_zero_status(settings: Settings, tmp_path: Path) -> None:
    proc, _, _ = start_workers(settings, tmp_path)
    found = re.search(r"pids=\[(\d+), (\d+)\]", proc.log.read_text())
    assert found, proc.tail()
    os.kill(int(found.group(1)), signal.SIGKILL)
    assert proc.p is not None and proc.p.wait(60) == 1, proc.tail()
    assert "exited with status -9: stopping the others" in proc.log.read_text()


def test_workers_need_a_fixed_port(settings: Settings, tmp_path: Path) -> None:
    env = settings_env(settings, ingress_host="127.0.0.1", ingress_port=0, ingress_workers=2)
    proc = Proc(["ingress"], env, tmp_path / "ingress.log").start()
    assert proc.p is not None and proc.p.wait(60) == 1
    assert proc.log.read_text().strip().splitlines() == [
        "error: SENTPIPE_INGRESS_WORKERS > 1 needs a fixed port, not 0"
    ]
