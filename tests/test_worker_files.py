"""The worker and its files: the router's RocksDB dedup table on a disk that refuses writes for a while
(the line is held, then routing goes on by itself once the disk takes writes again), and the limit on
open files its databases need."""

from __future__ import annotations

import asyncio
import os
import resource
import subprocess
import sys
import threading
from pathlib import Path

from sentpipe.schemas.samples import SampleFactory
from sentpipe.settings import Settings
from tests.http_tools import post_all
from tests.kafka_tools import record_count
from tests.oracle import row_count
from tests.pipeline import Worker, start_ingress, wait_caught_up, wait_for, worker_env
from tests.processes import Proc, settings_env

N = 20


def _worker_logging_to_a_pipe(settings: Settings, log_dir: Path, **extra: object) -> Worker:
    """A worker whose output goes through a pipe (copied to its log file here): the file size limit set
    on it below applies to files it writes, and its log lines while the limit holds are kept."""
    env = worker_env(settings, log_dir, **extra)
    mport = int(env["SENTPIPE_WORKER_METRICS_PORT"])
    log, pipe = log_dir / f"worker-{mport}.log", log_dir / f"worker-{mport}.pipe"
    os.mkfifo(pipe)

    def copy() -> None:
        with pipe.open("rb") as src, log.open("ab") as dst:
            for chunk in iter(lambda: src.read1(65536), b""):
                dst.write(chunk)
                dst.flush()

    threading.Thread(target=copy, daemon=True).start()
    proc = Proc(["worker"], env, pipe).start()
    proc.log = log  # what tail() reads
    proc.wait_http(f"http://127.0.0.1:{mport}/metrics")
    return Worker(proc, mport)


def test_a_rocksdb_table_that_failed_a_write_takes_writes_again_once_the_disk_does(
    settings: Settings, topics, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """RocksDB keeps the first write error of a database (its log could not be appended to) and refuses
    every write after it, long after the disk has room again: the router retried the same batch for ever
    and routed nothing more until someone restarted it. A full disk is simulated with the worker's file size
    limit (RLIMIT_FSIZE, set from outside: prlimit), under which RocksDB's log appends fail as they would with
    ENOSPC; no root needed."""
    settings = settings.model_copy(update={"table_store": "rocksdb://"})
    secret = settings.webhook_secret.get_secret_value()
    bodies = [s.body for s in SampleFactory(46).mix(2 * N)]
    ingress, url, _ = start_ingress(settings, tmp_path)
    worker = _worker_logging_to_a_pipe(settings, tmp_path)
    pid = worker.proc.p.pid  # type: ignore[union-attr]

    def routed() -> int:
        return sum(record_count(settings.kafka_bootstrap, t) for t in (*topics.routed, topics.unrouted))

    def failures() -> int:
        return worker.proc.log.read_text(errors="replace").count("failed to settle")

    try:
        assert asyncio.run(post_all(f"{url}/webhooks/sent", bodies[:N], secret)).count(200) == N
        wait_for(routed, lambda n: n >= N, 60, "the first events routed", worker.proc.tail)
        limits = resource.prlimit(pid, resource.RLIMIT_FSIZE)
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (1, limits[1]))  # every append to a file now fails
        try:
            assert asyncio.run(post_all(f"{url}/webhooks/sent", bodies[N:], secret)).count(200) == N
            wait_for(failures, lambda n: n >= 1, 60, "the table's writes refused", worker.proc.tail)
        finally:
            resource.prlimit(pid, resource.RLIMIT_FSIZE, limits)  # room on the disk again
        # Each routed once at least (a batch that failed to settle is routed again: duplicates the
        # idempotent sinks absorb), and none dead-lettered: the disk's trouble is no record's fault.
        wait_for(routed, lambda n: n >= 2 * N, 120, "routing after the disk recovered", worker.proc.tail)
        wait_caught_up(settings, 120, "every record committed", worker.proc.tail)
        assert row_count(settings.database_url.get_secret_value()) == 2 * N
        assert record_count(settings.kafka_bootstrap, topics.dlq) == 0
        logged = worker.proc.log.read_text(errors="replace")
        assert "File too large" in logged  # the disk's error named, not only a failed batch
    finally:
        worker.stop()
        ingress.stop()


def _open_files_soft_limit(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no open files limit")


def test_the_worker_raises_its_open_files_limit_to_the_hard_one(settings: Settings, tmp_path: Path) -> None:
    """Each RocksDB partition of the dedup table holds six descriptors before its first data file: under
    systemd's soft limit of 1,024 (hard: 524,288) a worker given 170 partitions stopped with "Too many open
    files", at its start or at the rebalance that handed it a dead worker's share. The ingress raised its
    soft limit to the hard one already; the worker now does too (its projector process inherits it)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    child_hard = 8192 if hard == resource.RLIM_INFINITY else hard  # Linux has no infinite soft limit
    assert child_hard > 256, f"this test needs a hard limit above 256, not {hard}"
    env = worker_env(settings, tmp_path, 0, None, table_store="rocksdb://")
    mport = int(env["SENTPIPE_WORKER_METRICS_PORT"])
    # Lowered in the child only: late in a full test session this process holds more than 256 descriptors
    # itself, and lowered here its own next pipe failed "Too many open files".
    proc = Proc(["worker"], env, tmp_path / "worker.log")
    proc.preexec = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, child_hard))
    worker = Worker(proc.start(), mport)
    try:
        proc.wait_http(f"http://127.0.0.1:{mport}/metrics")
        assert worker.proc.p is not None
        assert _open_files_soft_limit(worker.proc.p.pid) == child_hard
    finally:
        worker.stop()


def _worker_start_fails(env: dict[str, str], preexec_fn: object = None) -> str:
    """The worker's start, expected to end with one line on stderr and status 1; that line."""
    res = subprocess.run(
        [sys.executable, "-m", "sentpipe", "worker"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=preexec_fn,  # type: ignore[arg-type]
    )
    assert res.returncode == 1, (res.returncode, res.stderr[-2000:])
    assert res.stderr.strip().count("\n") == 0 and "Traceback" not in res.stderr, res.stderr[-2000:]
    return res.stderr.strip()


def test_a_data_dir_that_is_a_file_is_named_in_one_line(settings: Settings, tmp_path: Path) -> None:
    """It was "error: FileExistsError: [Errno 17] File exists: '...'", naming neither the setting nor what
    was wrong with the path."""
    path = tmp_path / "data"
    path.write_bytes(b"")
    line = _worker_start_fails(settings_env(settings, data_dir=path))
    assert line == f"error: SENTPIPE_DATA_DIR {path} is not a directory"


def test_a_full_disk_under_the_dedup_table_is_named_in_one_line(settings: Settings, tmp_path: Path) -> None:
    """RocksDB's error on a full disk ("error: Exception: No space left on device (os error 28)") named no
    file: which of the machine's disks was full was the user's guess. A file size limit of one byte stands in
    for the full disk (RocksDB cannot write its first file)."""

    def no_room() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    data = tmp_path / "faust"
    env = settings_env(settings, data_dir=data, table_store="rocksdb://", worker_role="route")
    line = _worker_start_fails(env, no_room)
    assert line.startswith(f"error: the dedup table's RocksDB file {data}/"), line
    assert "(under SENTPIPE_DATA_DIR)" in line and "File too large" in line, line
