"""A long randomized fault soak judged by an oracle: `python -m bench.soak --minutes N --seed S`.

The real ingress (spool on), worker (router and its projector child) and the soak's handlers run against
the local broker and database, while signed deliveries arrive at a moderate rate with redeliveries, out of
order, retried as Sent retries (5xx or no answer). Meanwhile, on a schedule drawn from the seed, one fault
after another: kill -9 or SIGTERM of the worker, kill -9 of its projector child or of the ingress, the
broker or PostgreSQL stopped and started, a process (or the broker) paused with SIGSTOP and resumed.

At the end the faults stop, the pipeline drains, and the run is judged: every delivery the ingress
acknowledged (2xx) is in PostgreSQL once, the projections equal the oracle's (tests/oracle.py), every
handler's side effect is there once per (handler, tenant, event), the DLQ and the unrouted topic are empty,
and the consumer lag is zero. Exit status 1 when any check fails. Needs the local launchers (it stops and
starts the services): run it with SENTPIPE_KAFKA_PORT / SENTPIPE_PG_PORT / SENTPIPE_LOCAL_DIR as the tests,
never with SENTPIPE_KAFKA_BOOTSTRAP or SENTPIPE_DATABASE_URL set.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import functools
import hashlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson
import psycopg
from rich.console import Console
from rich.table import Table

from bench.common import REPO, create_schema, drop_schema
from bench.soak_handlers import CREATE, TABLE
from sentpipe.processors.migrate import migrate
from sentpipe.processors.topics import ensure_topics, projections_group
from sentpipe.schemas.samples import SampleFactory
from sentpipe.schemas.signature import signature_headers
from sentpipe.schemas.topics import Topics
from sentpipe.settings import Settings
from tests.kafka_tools import delete_topics, read_topic, wait_topics_ready
from tests.oracle import actual_state, expected_state
from tests.pipeline import lag
from tests.processes import Proc, settings_env
from tests.services import Services, ServiceUnavailable, acquire

console = Console(highlight=False)
HANDLERS = {
    "message.status.updated": ("soak-status", "soak-all"),
    "message.inbound.received": ("soak-inbound", "soak-all"),
    "template.approval.updated": ("soak-template", "soak-all"),
}
FAULTS = (
    "worker_kill9",
    "worker_term",
    "projector_kill9",
    "ingress_kill9",
    "broker_restart",
    "postgres_restart",
    "pause_worker",
    "pause_ingress",
    "pause_broker",
)


def log(message: str) -> None:
    console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {message}")
    console.file.flush()  # progress shows in a log file as it happens, not at exit


def event_id(body: bytes) -> str:
    """The dedup key the ingress takes by default (`auto`): the envelope's id, else the body's SHA-256."""
    doc = orjson.loads(body)
    return str(doc["id"]) if "id" in doc else hashlib.sha256(body).hexdigest()


def canonical_type(body: bytes) -> str:
    doc = orjson.loads(body)
    if "field" in doc:
        if doc["field"] == "templates":
            return "template.approval.updated"
        return (
            "message.inbound.received"
            if doc.get("sub_type") == "message.received"
            else "message.status.updated"
        )
    return str(doc["event"]["type"])


@dataclass
class Traffic:
    """Signed deliveries at `rate` per second, a fraction of them redeliveries, `concurrency` at a time (so
    they overtake each other); each retried on 5xx or no answer, with Sent's backoff, until acknowledged."""

    url: str
    secret: str
    seed: int
    rate: float
    dup_fraction: float
    concurrency: int = 8
    acked: dict[bytes, int] = field(default_factory=dict)  # body -> 2xx answers it got
    sent: set[bytes] = field(default_factory=set)
    answers: collections.Counter[str] = field(default_factory=collections.Counter)
    in_flight: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), name="traffic", daemon=True)
        self._thread.start()

    def stop(self, timeout: float) -> None:
        """No new deliveries; waits (up to `timeout`) for those in flight to be acknowledged."""
        self._stop.set()
        assert self._thread is not None
        self._thread.join(timeout)

    async def _run(self) -> None:
        factory = SampleFactory(self.seed)
        rng = random.Random(self.seed + 1)
        sem = asyncio.Semaphore(self.concurrency)
        tasks: set[asyncio.Task[None]] = set()
        history: list[bytes] = []
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            next_at = time.monotonic()
            while not self._stop.is_set():
                batch = [s.body for s in factory.mix(20, shape="mixed")]
                history.extend(batch)
                batch += [rng.choice(history) for _ in range(int(len(batch) * self.dup_fraction))]
                rng.shuffle(batch)
                for body in batch:
                    if self._stop.is_set():
                        break
                    await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                    next_at = max(next_at, time.monotonic() - 1.0) + 1 / self.rate
                    await sem.acquire()
                    task = asyncio.create_task(self._deliver(session, body, sem))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.wait(tasks)

    async def _deliver(self, session: aiohttp.ClientSession, body: bytes, sem: asyncio.Semaphore) -> None:
        self.sent.add(body)
        self.in_flight += 1
        webhook_id = f"msg_{uuid.uuid4().hex}"
        backoff = 1.0
        try:
            while True:
                headers = {
                    **signature_headers(self.secret, webhook_id, int(time.time()), body),
                    "content-type": "application/json",
                }
                try:
                    async with session.post(self.url, data=body, headers=headers) as resp:
                        doc = await resp.read()
                        kind = str(resp.status)
                        if resp.status == 200 and b'"spooled"' in doc:
                            kind = "200 spooled"
                        self.answers[kind] += 1
                        if 200 <= resp.status < 300:
                            self.acked[body] = self.acked.get(body, 0) + 1
                            return
                        if resp.status < 500:  # a refusal Sent would not retry: a defect of its own
                            return
                except (TimeoutError, aiohttp.ClientError):
                    self.answers["no answer"] += 1
                # Sent's retries double from 1 s; the cap keeps the soak's own tail short.
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 8.0)
        finally:
            self.in_flight -= 1
            sem.release()


class Stack:
    """The soak's processes (ingress, workers) and services (broker, database), each restartable."""

    def __init__(self, services: Services, s: Settings, run_dir: Path, base_port: int, workers: int) -> None:
        self.services, self.s, self.run_dir = services, s, run_dir
        self.ingress_port, self.ingress_metrics = base_port, base_port + 1
        self.base_port = base_port
        self.ingress: Proc | None = None
        self.workers: list[Proc | None] = [None] * workers
        self.starts: collections.Counter[str] = collections.Counter()

    def start_ingress(self) -> None:
        self.starts["ingress"] += 1
        env = settings_env(
            self.s,
            ingress_host="127.0.0.1",
            ingress_port=self.ingress_port,
            ingress_metrics_port=self.ingress_metrics,
        )
        self.ingress = Proc(["ingress"], env, self.run_dir / "ingress.log").start()
        self.ingress.wait_http(f"http://127.0.0.1:{self.ingress_port}/healthz", timeout=120)

    def start_worker(self, i: int) -> None:
        """Worker `i`: ports and data directory of its own, the same ones at every restart."""
        self.starts[f"worker {i}"] += 1
        web, metrics = self.base_port + 2 + 2 * i, self.base_port + 3 + 2 * i
        env = settings_env(
            self.s, worker_web_port=web, worker_metrics_port=metrics, data_dir=self.s.data_dir / str(i)
        )
        proc = self.workers[i] = Proc(["worker"], env, self.run_dir / f"worker-{i}.log").start()
        proc.wait_http(f"http://127.0.0.1:{metrics}/metrics", timeout=120)

    def worker(self, i: int) -> Proc:
        proc = self.workers[i]
        assert proc is not None and proc.p is not None
        return proc

    def projector_pid(self, i: int) -> int | None:
        """Worker `i`'s projector child (spawned by multiprocessing), if it has one now."""
        parent = self.worker(i).p
        assert parent is not None
        out = subprocess.run(["pgrep", "-P", str(parent.pid)], capture_output=True, text=True).stdout
        for pid in out.split():
            with contextlib.suppress(OSError):
                # Not multiprocessing's resource tracker, the worker's other child.
                if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return int(pid)
        return None

    def check_alive(self) -> list[str]:
        """Processes that exited on their own (no fault of the soak's), restarted; named for the report."""
        died = []
        procs: list[tuple[str, Proc | None, Callable[[], None]]] = [
            ("ingress", self.ingress, self.start_ingress)
        ]
        procs += [
            (f"worker {i}", w, functools.partial(self.start_worker, i)) for i, w in enumerate(self.workers)
        ]
        for name, proc, start in procs:
            if proc is not None and proc.p is not None and proc.p.poll() is not None:
                died.append(f"{name} exited with {proc.p.returncode}")
                start()
        return died

    def stop(self) -> None:
        for proc in (self.ingress, *self.workers):
            if proc is not None and proc.p is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.p.pid, signal.SIGCONT)
                proc.stop(timeout=60)


class Chaos:
    """One fault after another at seeded random moments, each one undone before the next is drawn."""

    def __init__(self, stack: Stack, rng: random.Random, gap: tuple[float, float]) -> None:
        self.stack, self.rng, self.gap = stack, rng, gap
        self.done: collections.Counter[str] = collections.Counter()
        self.unexpected: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(300)

    def _sleep(self, a: float, b: float) -> None:
        self._stop.wait(self.rng.uniform(a, b))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sleep(*self.gap)
            if self._stop.is_set():
                return
            fault = self.rng.choice(FAULTS)
            log(f"[yellow]fault[/] {fault}")
            try:
                self._inject(fault)
                self.done[fault] += 1
            except Exception as exc:  # a restart that failed is the soak's finding, not its end
                self.unexpected.append(f"{fault}: {exc!r}"[:500])
                log(f"[red]{fault} failed:[/] {exc!r}"[:500])
            for died in self.stack.check_alive():
                self.unexpected.append(f"after {fault}: {died}")
                log(f"[red]{died}[/]")

    def _inject(self, fault: str) -> None:
        st, svc = self.stack, self.stack.services
        i = self.rng.randrange(len(st.workers))
        if fault == "worker_kill9":
            st.worker(i).kill()
            self._sleep(0, 3)
            st.start_worker(i)
        elif fault == "worker_term":
            code = st.worker(i).stop(signal.SIGTERM, timeout=90)
            if code not in (0, -signal.SIGTERM, 143):
                self.unexpected.append(f"worker {i} SIGTERM: exit status {code}")
            self._sleep(0, 3)
            st.start_worker(i)
        elif fault == "projector_kill9":
            pid = st.projector_pid(i)
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                # Documented: a projector that dies other than by asking for a restart takes its worker
                # along, and the orchestrator (here, the soak) starts both again.
                parent = st.worker(i).p
                assert parent is not None
                try:
                    parent.wait(120)
                except subprocess.TimeoutExpired:
                    self.unexpected.append(f"worker {i} still running 120 s after its projector was killed")
                    st.worker(i).kill()
                st.start_worker(i)
        elif fault == "ingress_kill9":
            assert st.ingress is not None
            st.ingress.kill()
            self._sleep(0, 3)
            st.start_ingress()
        elif fault == "broker_restart":
            svc.stop_kafka()
            self._sleep(2, 20)
            svc.start_kafka()
        elif fault == "postgres_restart":
            svc.stop_postgres()
            self._sleep(2, 20)
            svc.start_postgres()
        elif fault == "pause_broker":
            svc.freeze_kafka()
            try:
                self._sleep(2, 20)
            finally:
                svc.thaw_kafka()
        else:
            proc = st.worker(i) if fault == "pause_worker" else st.ingress
            assert proc is not None and proc.p is not None
            os.killpg(proc.p.pid, signal.SIGSTOP)
            try:
                self._sleep(2, 25)
            finally:
                os.killpg(proc.p.pid, signal.SIGCONT)


def count_rows(db: str) -> dict[str, int]:
    with psycopg.connect(db, connect_timeout=3) as c:
        return {
            t: int(c.execute(f"SELECT count(*) FROM {t}").fetchone()[0])  # type: ignore[index]
            for t in ("message_events", "inbound_messages", "template_events", TABLE)
        }


def judge(s: Settings, traffic: Traffic) -> tuple[list[tuple[str, bool, str]], dict[str, int]]:
    """The checks, each (name, passed, detail), and the numbers they rest on."""
    db = s.database_url.get_secret_value()
    acked = {event_id(b): b for b in traffic.acked}
    sent = {event_id(b): b for b in traffic.sent}
    got = actual_state(db)
    in_db = set(got.message_events) | got.inbound | set(got.template_events)
    checks: list[tuple[str, bool, str]] = []
    missing = sorted(set(acked) - in_db)
    checks.append(("every acknowledged event stored", not missing, f"{len(missing)} missing {missing[:3]}"))
    foreign = sorted(in_db - set(sent))
    checks.append(("nothing stored that was not sent", not foreign, f"{len(foreign)} {foreign[:3]}"))
    # Events sent but never acknowledged (an answer lost to a kill) may be there or not; either is right.
    stored_bodies = [sent[e] for e in in_db if e in sent]
    exp = expected_state(stored_bodies)
    diffs = [
        name
        for name in ("message_events", "inbound", "template_events", "message_status", "template_status")
        if getattr(exp, name) != getattr(got, name)
    ]
    checks.append(("projections equal the oracle's", not diffs, ", ".join(diffs) or "all five tables"))
    with psycopg.connect(db) as c:
        rows = c.execute(f"SELECT handler, tenant, event_id, calls FROM {TABLE}").fetchall()
    effects = {(h, t, e): n for h, t, e, n in rows}
    want = {(h, "default", e) for e in in_db for h in HANDLERS[canonical_type(sent[e])] if e in sent}
    lacking = sorted(want - set(effects))
    extra = sorted(set(effects) - want)
    checks.append(
        (
            "handler effects once per (handler, tenant, event)",
            not lacking and not extra,
            f"{len(lacking)} missing {lacking[:2]}, {len(extra)} unexpected {extra[:2]}",
        )
    )
    topics = Topics(s.topic_prefix)
    dlq = read_topic(s.kafka_bootstrap, topics.dlq)
    checks.append(("DLQ empty", not dlq, f"{len(dlq)} record(s)"))
    unrouted = read_topic(s.kafka_bootstrap, topics.unrouted)
    checks.append(("unrouted empty", not unrouted, f"{len(unrouted)} record(s)"))
    behind = lag(s)
    checks.append(("consumer lag zero", not behind, str(behind) if behind else "0"))
    numbers = {
        "deliveries sent (distinct bodies)": len(traffic.sent),
        "acknowledged events (distinct)": len(acked),
        "acknowledged deliveries incl. redeliveries": sum(traffic.acked.values()),
        "events stored": len(in_db),
        "sent, unacknowledged, stored": len(in_db - set(acked)),
        "handler calls run again (calls > 1)": sum(1 for n in effects.values() if n > 1),
    }
    return checks, numbers


def drain(s: Settings, stack: Stack, traffic: Traffic, timeout: float) -> bool:
    """Until the worker has committed everything and every acknowledged event is stored (or `timeout`)."""
    db = s.database_url.get_secret_value()
    want = {event_id(b) for b in traffic.acked}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for died in stack.check_alive():
            log(f"[red]while draining: {died}[/]")
        try:
            got = actual_state(db)
            stored = set(got.message_events) | got.inbound | set(got.template_events)
            behind = lag(s)
            if not behind and want <= stored:
                return True
            log(f"draining: {len(want - stored)} acknowledged not stored, lag {sum(behind.values())}")
        except Exception as exc:  # a service still on its way back
            log(f"draining: {exc!r}"[:200])
        time.sleep(5)
    return False


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="how long faults are injected (10)")
    ap.add_argument("--seed", type=int, default=1, help="traffic and fault schedule (1)")
    ap.add_argument("--rate", type=float, default=25.0, help="new deliveries per second (25)")
    ap.add_argument("--dup", type=float, default=0.25, help="redeliveries per new delivery (0.25)")
    ap.add_argument("--gap", type=float, nargs=2, default=(5.0, 25.0), help="seconds between faults (5 25)")
    ap.add_argument("--drain", type=float, default=600.0, help="seconds the drain may take at most (600)")
    ap.add_argument("--workers", type=int, default=1, help="worker processes of the one group (1)")
    ap.add_argument(
        "--table-store",
        default="memory://",
        choices=["memory://", "rocksdb://"],
        help="the dedup table's store (memory://; rocksdb:// is the Helm chart's)",
    )
    ap.add_argument(
        "--port",
        type=int,
        default=9802,
        help="ingress; its metrics, then each worker's web and metrics follow",
    )
    ap.add_argument("--keep", action="store_true", help="keep the topics and the schema (logs stay)")
    args = ap.parse_args(argv)
    # Stopped early (Ctrl-C, SIGTERM, even started in the background where SIGINT is ignored): the
    # processes, topics and schema are still cleaned up by the `finally` below.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    if os.environ.get("SENTPIPE_KAFKA_BOOTSTRAP") or os.environ.get("SENTPIPE_DATABASE_URL"):
        print(
            "bench.soak stops and starts the services: unset SENTPIPE_KAFKA_BOOTSTRAP/_DATABASE_URL",
            file=sys.stderr,
        )
        return 2
    try:
        services = acquire()
    except ServiceUnavailable as exc:
        print(f"services unavailable: {exc}", file=sys.stderr)
        return 2
    rid = f"{args.seed}x{uuid.uuid4().hex[:6]}"
    run_dir = REPO / ".local" / "soak" / rid
    run_dir.mkdir(parents=True, exist_ok=True)
    schema = f"soak_{rid}"
    db = create_schema(services.database_url, schema)
    migrate(db)
    with psycopg.connect(db, autocommit=True) as c:
        c.execute(CREATE)
    s = Settings(
        kafka_bootstrap=services.kafka_bootstrap,
        database_url=db,
        topic_prefix=f"soak{rid}.",
        app_id=f"sentpipe-soak{rid}",
        raw_partitions=4,
        routed_partitions=4,
        ingress_workers=1,
        spool=True,
        spool_dir=run_dir / "spool",
        data_dir=run_dir / "faust",
        handler_modules=["bench.soak_handlers"],
        kafka_session_timeout_s=10,
        retry_max_s=5,
        table_store=args.table_store,
    )
    ensure_topics(s)
    t = Topics(s.topic_prefix)
    wait_topics_ready(s.kafka_bootstrap, [t.raw, *t.routed, t.unrouted, t.dlq])
    stack = Stack(services, s, run_dir, args.port, args.workers)
    traffic = Traffic(
        f"http://127.0.0.1:{args.port}/webhooks/sent",
        s.webhook_secret.get_secret_value(),
        args.seed,
        args.rate,
        args.dup,
    )
    chaos = Chaos(stack, random.Random(args.seed), tuple(args.gap))  # type: ignore[arg-type]
    log(f"soak {rid}: {args.minutes} min, seed {args.seed}, logs in {run_dir}")
    checks: list[tuple[str, bool, str]] = []
    numbers: dict[str, int] = {}
    t0 = time.monotonic()
    try:
        stack.start_ingress()
        for i in range(args.workers):
            stack.start_worker(i)
        traffic.start()
        chaos.start()
        end = t0 + args.minutes * 60
        while time.monotonic() < end:
            time.sleep(min(15.0, max(0.0, end - time.monotonic())))
            with contextlib.suppress(Exception):
                rows = count_rows(db)
                log(
                    f"{(time.monotonic() - t0) / 60:5.1f} min: {len(traffic.acked)} acked,"
                    f" {traffic.in_flight} in flight, rows {rows}, faults {sum(chaos.done.values())}"
                )
        chaos.stop()
        stack.services.start_kafka()  # both up, whatever the last fault left (idempotent)
        stack.services.start_postgres()
        log("faults over; the last deliveries in flight are retried until acknowledged")
        traffic.stop(timeout=300)
        for died in stack.check_alive():
            chaos.unexpected.append(f"after the faults: {died}")
        drained = drain(s, stack, traffic, args.drain)
        checks, numbers = judge(s, traffic)
        checks.insert(0, ("drained in time", drained, f"within {args.drain:.0f}s"))
        checks.append(
            (
                "no unexpected exits or failed restarts",
                not chaos.unexpected,
                "; ".join(chaos.unexpected)[:300],
            )
        )
    finally:
        chaos.stop()
        stack.stop()
        with contextlib.suppress(Exception):
            services.start_kafka()
            services.start_postgres()
        if not args.keep:
            with contextlib.suppress(Exception):
                delete_topics(
                    s.kafka_bootstrap, [s.topic_prefix, f"{s.app_id}-"], [s.app_id, projections_group(s)]
                )
            with contextlib.suppress(Exception):
                drop_schema(services.database_url, schema)
        services.close()
    table = Table(
        title=f"soak seed {args.seed}, {args.minutes} min, {args.workers} worker(s), {args.table_store} table"
    )
    table.add_column("what")
    table.add_column("value", justify="right")
    for fault in FAULTS:
        table.add_row(f"fault {fault}", str(chaos.done[fault]))
    for name, value in numbers.items():
        table.add_row(name, str(value))
    for kind, n in sorted(traffic.answers.items()):
        table.add_row(f"answers {kind}", str(n))
    for name, ok, detail in checks:
        table.add_row(name, ("[green]pass[/] " if ok else "[red]FAIL[/] ") + detail)
    console.print(table)
    return 0 if checks and all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
