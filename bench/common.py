"""Shared bench plumbing: subprocesses, fresh topics/schemas, CPU accounting, Prometheus parsing.

The broker and database come from the tests' harness (`tests.services.acquire`), as do free ports
(`tests.processes.free_port`): one implementation for both.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

REPO = Path(__file__).resolve().parent.parent
LOCAL = REPO / ".local" / "bench"

console = Console()


def run_id() -> str:
    return uuid.uuid4().hex[:8]


def ensure_debian_tool(binary: str, log: Callable[[str], None]) -> str | None:
    """`binary`'s path, installing Debian's package of that name when missing and we may (root with apt)."""
    if shutil.which(binary) or os.geteuid() != 0 or shutil.which("apt-get") is None:
        return shutil.which(binary)
    log(f"{binary} not found: installing Debian's {binary} package")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}

    def apt(*args: str) -> None:
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run(["apt-get", *args], env=env, capture_output=True, timeout=600)

    apt("install", "-y", "-qq", binary)
    if shutil.which(binary) is None:  # the cached package list may predate it: refresh and retry once
        apt("update", "-qq")
        apt("install", "-y", "-qq", binary)
    return shutil.which(binary)


# --- services ------------------------------------------------------------------------------------------
def service_pids() -> dict[str, list[int]]:
    """Local broker and database server pids (found by command line), for CPU accounting."""
    out: dict[str, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry.name}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"kafka.Kafka" in argv:
            out.setdefault("kafka", []).append(int(entry.name))
        elif argv[0].endswith(b"/postgres") and b"-D" in argv:  # the postmaster; backends are its children
            out.setdefault("postgres", []).append(int(entry.name))
    return out


# --- database schemas and topics -----------------------------------------------------------------------
def schema_url(base_url: str, schema: str) -> str:
    sep = "&" if "?" in base_url else "?"
    return f"{base_url}{sep}options={quote(f'-csearch_path={schema}')}"


def create_schema(base_url: str, schema: str) -> str:
    """A fresh schema with the migrations applied; returns a URL whose search_path is that schema."""
    from sentpipe.processors.migrate import migrate

    with psycopg.connect(base_url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"'.encode())
    url = schema_url(base_url, schema)
    migrate(url)
    return url


def drop_schema(base_url: str, schema: str) -> None:
    with (
        contextlib.suppress(psycopg.Error),
        psycopg.connect(base_url, autocommit=True, connect_timeout=5) as conn,
    ):
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'.encode())


# --- subprocesses --------------------------------------------------------------------------------------
def settings_env(values: dict[str, object]) -> dict[str, str]:
    """The parent's environment without SENTPIPE_*, plus exactly these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SENTPIPE_")}
    for name, value in values.items():
        env[f"SENTPIPE_{name.upper()}"] = json.dumps(value) if isinstance(value, list) else str(value)
    return env


class Proc:
    """A child in its own session: Ctrl-C reaches only the bench, which then stops children in order."""

    def __init__(
        self, name: str, argv: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path = REPO
    ) -> None:
        # `python -m` puts the working directory first on sys.path, ahead of PYTHONPATH: the code a child
        # runs is the tree it starts in.
        self.name, self.argv, self.log, self.env, self.cwd = name, argv, log, env, cwd
        self.p: subprocess.Popen[bytes] | None = None

    @classmethod
    def sentpipe(cls, command: str, env: dict[str, str], log: Path) -> Proc:
        return cls(command, [sys.executable, "-m", "sentpipe", command], log, env)

    def start(self) -> Proc:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as fh:
            self.p = subprocess.Popen(
                self.argv,
                env=self.env,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=self.cwd,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.p is not None
        return self.p.pid

    def check(self) -> None:
        if self.p is not None and self.p.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.p.returncode}:\n{self.tail()}")

    def wait_http(self, url: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check()
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"{url} not ready after {timeout:.0f}s:\n{self.tail()}")

    def tail(self, n: int = 25) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (graceful: the ingress flushes, Faust commits), SIGKILL after `timeout`."""
        if self.p is None:
            return None
        if self.p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait(10)
        return self.p.returncode


# --- CPU accounting ------------------------------------------------------------------------------------
_TICK = os.sysconf("SC_CLK_TCK")


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, utime+stime ticks) for every process."""
    out: dict[int, tuple[int, int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        # The command name may contain spaces and parentheses: split after the last ')'.
        fields = raw[raw.rfind(")") + 2 :].split()
        out[int(entry.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    return out


def _tree_ticks(table: dict[int, tuple[int, int]], roots: Iterable[int]) -> int:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    total, stack, seen = 0, list(roots), set()
    while stack:
        pid = stack.pop()
        if pid in seen or pid not in table:
            continue
        seen.add(pid)
        total += table[pid][1]
        stack.extend(children.get(pid, ()))
    return total


def _machine_busy_ticks() -> tuple[int, int]:
    """(busy, total) jiffies over all cores, from /proc/stat."""
    parts = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    return sum(parts) - idle, sum(parts)


class CpuMeter:
    """CPU used by named process trees (and the whole machine) between start() and stop(), in cores.

    Exited processes lose their ticks, so measured processes must outlive the window (they do).
    """

    def __init__(self, groups: dict[str, list[int]], main_thread_of: int | None = None) -> None:
        self.groups = groups
        self.main_thread_of = main_thread_of  # also report this process's main thread (its event loop)
        self._t0 = 0.0
        self._start: dict[str, int] = {}
        self._main0 = 0
        self._machine0 = (0, 0)

    def _main_ticks(self) -> int:
        if self.main_thread_of is None:
            return 0
        with contextlib.suppress(OSError):
            raw = Path(f"/proc/{self.main_thread_of}/task/{self.main_thread_of}/stat").read_text()
            fields = raw[raw.rfind(")") + 2 :].split()
            return int(fields[11]) + int(fields[12])
        return 0

    def start(self) -> None:
        table = _proc_table()
        self._start = {name: _tree_ticks(table, pids) for name, pids in self.groups.items()}
        self._main0 = self._main_ticks()
        self._machine0 = _machine_busy_ticks()
        self._t0 = time.monotonic()

    def stop(self) -> dict[str, float]:
        table = _proc_table()
        wall = max(1e-9, time.monotonic() - self._t0)
        out = {
            name: round((_tree_ticks(table, pids) - self._start[name]) / _TICK / wall, 2)
            for name, pids in self.groups.items()
        }
        if self.main_thread_of is not None:
            out["main_thread"] = round((self._main_ticks() - self._main0) / _TICK / wall, 2)
        busy, total = _machine_busy_ticks()
        cores = os.cpu_count() or 1
        out["machine"] = round((busy - self._machine0[0]) / max(1, total - self._machine0[1]) * cores, 2)
        return out


# --- Prometheus ----------------------------------------------------------------------------------------
Scrape = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Scrape:
    """Every sample of a /metrics page: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: Scrape = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


def scrape_all(ports: Sequence[int]) -> Scrape:
    """Several processes' /metrics pages as one (values of the same series summed), e.g. ingress workers."""
    out: Scrape = {}
    for port in ports:
        for key, value in scrape(port).items():
            out[key] = out.get(key, 0.0) + value
    return out


def metric_sum(samples: Scrape, name: str, **match: str) -> float:
    return sum(
        v
        for (n, labels), v in samples.items()
        if n == name and all(dict(labels).get(k) == want for k, want in match.items())
    )


def histogram_delta(before: Scrape, after: Scrape, name: str) -> list[tuple[float, float]]:
    """Cumulative (le, count) buckets observed between two scrapes, summed over all label sets."""
    buckets: dict[float, float] = {}
    for (n, labels), v in after.items():
        if n != f"{name}_bucket":
            continue
        le = float(dict(labels)["le"])
        buckets[le] = buckets.get(le, 0.0) + v - before.get((n, labels), 0.0)
    return sorted(buckets.items())


def bucket_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile: linear interpolation inside the bucket holding the rank."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    prev_le, prev_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return prev_le  # above the last finite bound: that bound is all we know
            if count == prev_count:
                return le
            return prev_le + (le - prev_le) * (rank - prev_count) / (count - prev_count)
        prev_le, prev_count = le, count
    return prev_le


def to_buckets(values: Sequence[float], bounds: Sequence[float]) -> list[tuple[float, float]]:
    """Exact samples as cumulative buckets, so they can be summarized exactly like a histogram."""
    ordered = sorted(values)
    out, i = [], 0
    for b in [*bounds, math.inf]:
        while i < len(ordered) and ordered[i] <= b:
            i += 1
        out.append((b, float(i)))
    return out


@contextlib.contextmanager
def stopping(*procs: Proc) -> Iterator[None]:
    """Stop the given processes (in reverse order) however the block ends, Ctrl-C included."""
    try:
        yield
    finally:
        for p in reversed(procs):
            with contextlib.suppress(Exception):
                p.stop()


def jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value
