"""`sentpipe ingress` with several worker processes: they share one port (SO_REUSEPORT), each with its own
producer, and the supervisor serves their metrics as one (every sample labelled `worker`); SIGTERM under
load stops all gracefully and loses no acknowledged event; a worker that dies takes the set down with a
non-zero status (so the orchestrator restarts it); the default is one process per available CPU."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import time
import urllib.request
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sentpipe.ingress import server
from sentpipe.schemas.samples import SampleFactory
from sentpipe.schemas.signature import signature_headers
from sentpipe.schemas.topics import Topics
from sentpipe.settings import Settings
from tests.http_tools import post_signed
from tests.kafka_tools import read_topic
from tests.processes import Proc, free_port, settings_env


def start_workers(s: Settings, log_dir: Path, workers: int = 2) -> tuple[Proc, int, int]:
    port, mport = free_port(), free_port()
    env = settings_env(
        s, ingress_host="127.0.0.1", ingress_port=port, ingress_metrics_port=mport, ingress_workers=workers
    )
    proc = Proc(["ingress"], env, log_dir / f"ingress-{port}.log").start()
    # The supervisor answers its metrics port with 503 until every worker has told it where its metrics are.
    proc.wait_http(f"http://127.0.0.1:{mport}/metrics")
    proc.wait_http(f"http://127.0.0.1:{port}/healthz")
    return proc, port, mport


def requests_by_worker(mport: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):  # the merged page is a valid exposition
        for sample in family.samples:
            if sample.name == "sentpipe_ingress_requests_total":
                worker = sample.labels["worker"]
                out[worker] = out.get(worker, 0.0) + sample.value
    return out


def test_two_workers_share_the_port_and_sigterm_loses_no_acknowledged_event(
    settings: Settings, topics: Topics, tmp_path: Path
) -> None:
    proc, port, mport = start_workers(settings, tmp_path)
    secret = settings.webhook_secret.get_secret_value()
    bodies = [s.body for s in SampleFactory(41).mix(600)]
    results: dict[int, int] = {}
    url = f"http://127.0.0.1:{port}/webhooks/sent"
    served: dict[str, float] = {}

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
            served.update(requests_by_worker(mport))  # both took a share of the connections
            assert proc.p is not None
            proc.p.send_signal(signal.SIGTERM)

        # Many connections (no keep-alive reuse across all of them), so the kernel spreads them.
        connector = aiohttp.TCPConnector(limit=32, force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            await asyncio.gather(terminate(), *(one(session, i) for i in range(len(bodies))))

    asyncio.run(run())
    assert proc.p is not None and proc.p.wait(60) == 0, proc.tail()
    assert set(served) == {"0", "1"} and all(n > 0 for n in served.values()), served
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


def test_workers_stop_with_a_killed_supervisor_and_a_new_set_does_not_share_their_port(
    settings: Settings, tmp_path: Path
) -> None:
    """Killed with SIGKILL (the OOM killer, say), the supervisor left its workers serving, and a new set
    bound the same port beside them (SO_REUSEPORT never refuses): the kernel split deliveries between
    two configurations."""
    proc, port, _ = start_workers(settings, tmp_path)
    found = re.search(r"pids=\[(\d+), (\d+)\]", proc.log.read_text())
    assert found and proc.p is not None, proc.tail()
    pids = [int(found.group(1)), int(found.group(2))]
    # While they serve, a second set is refused the port in one line.
    env = settings_env(settings, ingress_host="127.0.0.1", ingress_port=port, ingress_workers=2)
    second = Proc(["ingress"], env, tmp_path / "second.log").start()
    try:
        assert second.p is not None and second.p.wait(60) == 1, second.tail()
    finally:
        second.kill()
    assert f"error: port {port} on 127.0.0.1: Address already in use" in second.log.read_text()
    proc.p.kill()
    proc.p.wait(10)
    deadline = time.monotonic() + 60
    while any(_running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_running(pid) for pid in pids), proc.tail()
    assert proc.log.read_text().count("shutting down: finishing in-flight requests") == 2, proc.tail()


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()


def test_a_hung_worker_stops_itself_and_the_set_exits_non_zero(settings: Settings, tmp_path: Path) -> None:
    """Each worker's producer loses its report thread at start (fault injection through sitecustomize, in
    every process of the set): no record could ever be acknowledged. The liveness probe might never reach
    that worker, so it stops itself with status 1, and the supervisor stops the set and exits 1."""
    (tmp_path / "sitecustomize.py").write_text(
        "import sentpipe.kafka\nsentpipe.kafka.AsyncProducer._serve_reports = lambda self: None\n"
    )
    port = free_port()
    env = settings_env(settings, ingress_host="127.0.0.1", ingress_port=port, ingress_workers=2)
    env["PYTHONPATH"] = str(tmp_path)
    proc = Proc(["ingress"], env, tmp_path / "ingress.log").start()
    try:
        assert proc.p is not None and proc.p.wait(60) == 1, proc.tail()
    finally:
        proc.kill()
    log = proc.log.read_text()
    assert "ingress worker hung (producer_stalled)" in log, log
    assert "exited with status 1: stopping the others" in log, log


BLOCKING_SITECUSTOMIZE = """
import time
import sentpipe.ingress.app as app
import sentpipe.ingress.server as server

server.WORKER_SILENT_S, server.WORKER_PROBE_EVERY_S = 3.0, 0.5
_readyz = app.readyz


async def readyz(request):
    if request.headers.get("x-block-the-loop"):
        time.sleep(600)  # synchronous: the worker's event loop turns no more
    return await _readyz(request)


app.readyz = readyz
"""


def test_a_worker_whose_event_loop_is_blocked_stops_the_set_with_status_1(
    settings: Settings, tmp_path: Path
) -> None:
    """A worker stuck in a synchronous call cannot see it itself, and the liveness probe reaches whichever
    worker the kernel picks: it went on taking its share of connections, each hanging until Sent gave up."""
    (tmp_path / "sitecustomize.py").write_text(BLOCKING_SITECUSTOMIZE)
    port, mport = free_port(), free_port()
    env = settings_env(
        settings, ingress_host="127.0.0.1", ingress_port=port, ingress_metrics_port=mport, ingress_workers=2
    )
    env["PYTHONPATH"] = str(tmp_path)
    proc = Proc(["ingress"], env, tmp_path / "ingress.log").start()
    try:
        proc.wait_http(f"http://127.0.0.1:{mport}/metrics")
        with socket.create_connection(("127.0.0.1", port)) as blocker:
            blocker.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\nx-block-the-loop: 1\r\n\r\n")
            assert proc.p is not None and proc.p.wait(120) == 1, proc.tail()
    finally:
        proc.kill()
    assert (
        "has not answered for" in proc.log.read_text() and "its event loop is blocked" in proc.log.read_text()
    )


def test_a_process_whose_spool_write_never_finishes_exits_instead_of_hanging(
    settings: Settings, tmp_path: Path
) -> None:
    """A disk that stops answering (fdatasync never returns) while the broker is away: the process found
    itself hung and stopped serving, then never exited (the loop's close and the interpreter joined the
    write's thread), so Docker or systemd never restarted it. Fault injection through sitecustomize: the
    producer reports the broker down, and fdatasync blocks once the file `stall` exists."""
    stall = tmp_path / "stall"
    (tmp_path / "sitecustomize.py").write_text(
        "import os, threading\n"
        "import sentpipe.kafka\n"
        "sentpipe.kafka.AsyncProducer.unavailable = property(lambda self: 'all_brokers_down')\n"
        "_real = os.fdatasync\n"
        "def _fdatasync(fd):\n"
        f"    if os.path.exists({str(stall)!r}):\n"
        "        threading.Event().wait()\n"
        "    _real(fd)\n"
        "os.fdatasync = _fdatasync\n"
    )
    port = free_port()
    env = settings_env(
        settings,
        ingress_host="127.0.0.1",
        ingress_port=port,
        ingress_metrics_port=free_port(),
        ingress_workers=1,
        spool=True,
        spool_dir=tmp_path / "spool",
        produce_timeout_s=1,
        stall_after_s=1,
    )
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    proc = Proc(["ingress"], env, tmp_path / "ingress.log").start()
    try:
        proc.wait_http(f"http://127.0.0.1:{port}/healthz")
        stall.touch()
        body = SampleFactory(43).inbound().body
        status, _, answer = post_signed(
            f"http://127.0.0.1:{port}/webhooks/sent", body, settings.webhook_secret.get_secret_value()
        )
        assert (status, answer.get("error")) == (503, "spool_write_failed"), answer
        assert proc.p is not None and proc.p.wait(60) == 1, proc.tail()
    finally:
        proc.kill()
    log = proc.log.read_text()
    assert "ingress worker hung (spool_write_stalled)" in log, log
    assert "a spool write (fdatasync) has not finished: exiting with status 1" in log, log


def test_workers_need_a_fixed_port(settings: Settings, tmp_path: Path) -> None:
    env = settings_env(settings, ingress_host="127.0.0.1", ingress_port=0, ingress_workers=2)
    proc = Proc(["ingress"], env, tmp_path / "ingress.log").start()
    assert proc.p is not None and proc.p.wait(60) == 1
    assert proc.log.read_text().strip().splitlines() == [
        "error: SENTPIPE_INGRESS_WORKERS > 1 needs a fixed port, not 0"
    ]


def test_the_default_is_one_worker_per_available_cpu(settings: Settings, tmp_path: Path) -> None:
    auto = settings.model_copy(update={"ingress_workers": 0})
    cpus = server.available_cpus()
    assert 1 <= cpus <= len(os.sched_getaffinity(0))
    assert server.worker_count(auto, 8080) == cpus
    assert server.worker_count(auto, 0) == 1  # a port the kernel picks cannot be shared
    assert server.worker_count(auto.model_copy(update={"ingress_workers": 3}), 8080) == 3

    port, mport = free_port(), free_port()
    env = settings_env(auto, ingress_host="127.0.0.1", ingress_port=port, ingress_metrics_port=mport)
    assert env["SENTPIPE_INGRESS_WORKERS"] == "0"
    proc = Proc(["ingress"], env, tmp_path / "ingress.log").start()
    try:
        proc.wait_http(f"http://127.0.0.1:{mport}/metrics")
        proc.wait_http(f"http://127.0.0.1:{port}/readyz")
        log = proc.log.read_text()
        if cpus > 1:
            assert f"ingress supervising {cpus} worker processes" in log, log
            # Every worker creates its label sets at start: each one shows up on the one page.
            assert set(requests_by_worker(mport)) == {str(i) for i in range(cpus)}
        else:
            assert "supervising" not in log, log
    finally:
        assert proc.stop() == 0, proc.tail()


@pytest.mark.parametrize(
    ("files", "own", "quota"),
    [
        ({"cpu.max": "max 100000\n"}, "/", None),
        ({"cpu.max": "150000 100000\n"}, "/", 2),
        ({"cpu.max": "50000 100000\n"}, "/", 1),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, "/", None),
        ({"cpu/cpu.cfs_quota_us": "400000\n", "cpu/cpu.cfs_period_us": "100000\n"}, "/", 4),
        ({"cpu.max": "garbage\n"}, "/", None),
        ({}, "/", None),
        # A systemd service with CPUQuota=300% below an unlimited root; the tightest ancestor wins.
        (
            {"cpu.max": "max 100000\n", "system.slice/x.service/cpu.max": "300000 100000\n"},
            "/system.slice/x.service",
            3,
        ),
        (
            {"system.slice/cpu.max": "200000 100000\n", "system.slice/x.service/cpu.max": "max 100000\n"},
            "/system.slice/x.service",
            2,
        ),
    ],
)
def test_a_cgroup_cpu_quota_caps_the_workers(
    tmp_path: Path, files: dict[str, str], own: str, quota: int | None
) -> None:
    root = tmp_path / "cgroup"
    root.mkdir()
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    membership = tmp_path / "self-cgroup"
    membership.write_text(f"0::{own}\n")
    assert server._cgroup_quota(root, membership) == quota


@pytest.mark.parametrize(
    ("value", "why"),
    [("100000", "less than or equal to 256"), ("-1", "greater than or equal to 0"), ("two", "valid integer")],
)
def test_an_absurd_worker_count_is_one_line_and_starts_nothing(
    settings: Settings, tmp_path: Path, value: str, why: str
) -> None:
    env = {
        **settings_env(settings, ingress_host="127.0.0.1", ingress_port=free_port()),
        "SENTPIPE_INGRESS_WORKERS": value,
    }
    proc = Proc(["ingress"], env, tmp_path / "ingress.log").start()
    assert proc.p is not None and proc.p.wait(60) == 1
    lines = proc.log.read_text().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: invalid setting SENTPIPE_INGRESS_WORKERS: "), lines
    assert why in lines[0], lines


@pytest.mark.parametrize(("value", "why"), [("99999", "less than or equal to 65535"), ("-1", "greater than")])
def test_a_port_out_of_range_is_one_line_and_starts_nothing(
    settings: Settings, tmp_path: Path, value: str, why: str
) -> None:
    """uvloop would bind 99999 as 34463 and log 99999; -1 was a traceback."""
    env = {**settings_env(settings, ingress_host="127.0.0.1"), "SENTPIPE_INGRESS_PORT": value}
    proc = Proc(["ingress"], env, tmp_path / "ingress.log").start()
    assert proc.p is not None and proc.p.wait(60) == 1
    lines = proc.log.read_text().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: invalid setting SENTPIPE_INGRESS_PORT: "), lines
    assert why in lines[0], lines


def test_port_0_on_the_command_line_is_a_port_the_system_picks(settings: Settings, tmp_path: Path) -> None:
    """`--port 0` overrides SENTPIPE_INGRESS_PORT (it was read as "not given"): here that port is taken."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = settings_env(settings, ingress_host="127.0.0.1", ingress_port=port, ingress_metrics_port=port)
        proc = Proc(["ingress", "--port", "0", "--metrics-port", "0"], env, tmp_path / "ingress.log").start()
        try:
            deadline = time.monotonic() + 60
            while not (found := re.search(r"listening url=http://127\.0\.0\.1:(\d+)/", proc.log.read_text())):
                assert proc.p is not None and proc.p.poll() is None, proc.tail()
                assert time.monotonic() < deadline, proc.tail()
                time.sleep(0.1)
            picked = int(found.group(1))
            assert picked not in (0, port)
            proc.wait_http(f"http://127.0.0.1:{picked}/healthz")
        finally:
            proc.stop()
