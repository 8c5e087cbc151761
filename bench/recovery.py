"""Dedup table bench: how long a router takes to restore N ids, its memory, and what the sweep costs the loop.

A changelog topic holding N ids exactly as the router writes them (key = a Sent-shape event id in compact
form, value = the tenant map, on the murmur2 partition of the hex id). For each start (an idle router with
an empty table, for the base RSS; memory cold; RocksDB cold through Faust's own recovery, for reference;
RocksDB cold and warm through sentpipe's restore) a `sentpipe worker --role route` is started on it and
timed from process start to `/readyz` (recovery complete), its RSS then. Then the dedup sweep deletes the
whole table (memory store) while `/livez` (served on the worker's own event loop) is polled every 5 ms: the
slowest answer bounds how long the sweep blocks the loop (on a busy machine it also holds the time the
probe itself waited for a core).
"""

from __future__ import annotations

import hashlib
import os
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import Producer
from confluent_kafka.admin import NewTopic  # type: ignore[attr-defined]
from rich.table import Table

from bench.common import Proc, console
from bench.ui import Ui
from sentpipe.kafka import admin_client
from sentpipe.processors.dedup import encode_seen, partition_of, table_key
from sentpipe.processors.topics import changelog_topic, ensure_topics
from sentpipe.settings import Settings
from tests.kafka_tools import delete_topics
from tests.processes import free_port, settings_env
from tests.services import Services

PARTITIONS = Settings.model_fields["raw_partitions"].default


@dataclass
class RecoveryConfig:
    ids: int = 1_000_000


@dataclass
class Sweep:
    seconds: float  # from the first sweep's start to an empty table
    max_livez_ms: float


@dataclass
class Start:
    store: str
    kind: str  # cold or warm
    seconds: float
    rss_mb: float
    sweep_max_block_ms: float | None = None

    def ids_per_s(self, ids: int) -> float:
        return ids / self.seconds if self.seconds else 0.0


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def fill_changelog(ui: Ui, s: Settings, ids: int) -> None:
    topic = changelog_topic(s)
    admin = admin_client(s)
    spec = NewTopic(topic, PARTITIONS, 1, config={"cleanup.policy": "compact"})
    admin.create_topics([spec])[topic].result(timeout=30)
    producer = Producer(
        {
            "bootstrap.servers": s.kafka_bootstrap,
            "partitioner": "murmur2_random",
            "linger.ms": 20,
            "batch.size": 1_000_000,
            "compression.type": "lz4",
            "queue.buffering.max.messages": 500_000,
        }
    )
    value = encode_seen({"default": int(time.time() * 1000)})
    with ui.phase(f"recovery: write {ids:,} ids into {topic}", total=ids) as ph:
        for i in range(ids):
            # The compact key the router writes, on the partition of its hex id (the raw record's).
            key = table_key(hashlib.sha256(i.to_bytes(8, "big")).hexdigest().encode())
            while True:
                try:
                    producer.produce(topic, value, key, partition=partition_of(key, PARTITIONS))
                    break
                except BufferError:
                    producer.poll(0.05)
            if i % 50_000 == 0:
                producer.poll(0)
                ph.update(i)
        if producer.flush(120):
            raise RuntimeError("changelog records not acknowledged")


def _get_ms(url: str) -> tuple[int, float]:
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            status = r.status
    except OSError as exc:
        status = getattr(exc, "code", 0) or 0
    return status, (time.perf_counter() - t0) * 1000


def start_router(s: Settings, data_dir: Path, store: str, work: Path, **extra: Any) -> tuple[Proc, int]:
    port = free_port()
    env = settings_env(
        s,
        worker_role="route",
        table_store=store,
        data_dir=data_dir,
        worker_metrics_port=port,
        worker_web_port=free_port(),
        log_level="WARNING",
        **extra,
    )
    proc = Proc.sentpipe("worker", env, work / f"router-{port}.log")
    return proc.start(), port


def timed_start(
    ui: Ui, s: Settings, store: str, kind: str, data_dir: Path, work: Path, *, fast: bool = True
) -> Start:
    with ui.phase(f"recovery: {store} {kind} start"):
        t0 = time.monotonic()
        proc, port = start_router(s, data_dir, store, work, table_fast_restore=fast)
        try:
            while _get_ms(f"http://127.0.0.1:{port}/readyz")[0] != 200:
                proc.check()
                if time.monotonic() - t0 > 900:
                    raise RuntimeError(f"router not ready after 900 s:\n{proc.tail()}")
                time.sleep(0.1)
            seconds = time.monotonic() - t0
            start = Start(store, kind, seconds, rss_mb(proc.pid))
            ui.log(f"{store} {kind}: ready after {seconds:.1f} s, RSS {start.rss_mb:.0f} MB")
            return start
        finally:
            proc.stop()


def _keys(port: int) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("sentpipe_dedup_table_keys "):
            return float(line.split()[1])
    return None


def sweep_block(ui: Ui, s: Settings, data_dir: Path, work: Path, ids: int, limit_s: float = 300.0) -> Sweep:
    """Start a router whose window has passed for every id; poll /livez while the sweep deletes them all."""
    proc, port = start_router(s, data_dir, "memory://", work, dedup_window_s=1, dedup_sweep_interval_s=2)
    worst = 0.0
    try:
        with ui.phase("recovery: sweep the whole table while probing the loop", total=ids) as ph:
            while _get_ms(f"http://127.0.0.1:{port}/readyz")[0] != 200:
                proc.check()
                time.sleep(0.1)
            t0 = time.monotonic()
            started: float | None = None
            next_look = 0.0
            while time.monotonic() - t0 < limit_s:
                _, ms = _get_ms(f"http://127.0.0.1:{port}/livez")
                worst = max(worst, ms)
                now = time.monotonic()
                if now >= next_look:  # the gauge: the table's size at the sweep's start, 0 once it is done
                    next_look = now + 0.5
                    keys = _keys(port)
                    if started is None and keys:
                        started = now
                    elif started is not None and keys == 0:
                        return Sweep(now - started, worst)
                    ph.update(ids - int(keys or 0) if started is not None else 0)
                time.sleep(0.005)
            raise RuntimeError(f"the sweep did not empty the table within {limit_s:.0f} s:\n{proc.tail()}")
    finally:
        proc.stop()


def run(svc: Services, cfg: RecoveryConfig, ui: Ui, work: Path) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:8]
    s = Settings(
        kafka_bootstrap=svc.kafka_bootstrap,
        database_url=svc.database_url,
        topic_prefix=f"brec{tag}.",
        app_id=f"brec-{tag}",
    )
    ensure_topics(s)
    try:
        return _measure(ui, s, cfg, work)
    finally:
        # Awaited, and also after a failure: a million-id changelog and the pipeline's topics otherwise stay.
        delete_topics(s.kafka_bootstrap, [s.topic_prefix, f"{s.app_id}-"], [s.app_id, f"{s.app_id}-empty"])


def _measure(ui: Ui, s: Settings, cfg: RecoveryConfig, work: Path) -> dict[str, Any]:
    # The base: the same router with an empty table (another app id: no changelog to restore).
    empty = s.model_copy(update={"app_id": f"{s.app_id}-empty"})
    starts = [timed_start(ui, empty, "memory://", "empty table (base)", work / "empty", work)]
    fill_changelog(ui, s, cfg.ids)
    starts.append(timed_start(ui, s, "memory://", "cold", work / "mem", work))
    # Reference: Faust's own recovery of a RocksDB table (per record, through aiokafka), then sentpipe's
    # librdkafka restore (the default) from an empty data directory, then a warm restart on its files.
    starts.append(
        timed_start(ui, s, "rocksdb://", "cold, Faust's recovery", work / "rocks-faust", work, fast=False)
    )
    rocks = work / "rocks"
    starts.append(timed_start(ui, s, "rocksdb://", "cold", rocks, work))
    starts.append(timed_start(ui, s, "rocksdb://", "warm", rocks, work))
    sweep = sweep_block(ui, s, work / "sweep", work, cfg.ids)
    ui.log(
        f"sweep: {cfg.ids:,} ids deleted in {sweep.seconds:.1f} s, slowest /livez {sweep.max_livez_ms:.1f} ms"
    )

    table = Table(title=f"dedup table: restore {cfg.ids:,} ids, one router", title_justify="left")
    for col in ("store", "start", "seconds to ready", "ids/s", "RSS MB"):
        table.add_column(col, justify="right" if col != "store" else "left")
    for st in starts:
        rate = "" if st.kind.startswith("empty") else f"{st.ids_per_s(cfg.ids):,.0f}"
        table.add_row(st.store, st.kind, f"{st.seconds:.1f}", rate, f"{st.rss_mb:.0f}")
    console.print(table)
    console.print(
        f"  [dim]sweep of {cfg.ids:,} expired ids (memory): {sweep.seconds:.1f} s to an empty table, "
        f"slowest /livez answer {sweep.max_livez_ms:.1f} ms[/dim]"
    )
    return {
        "ids": cfg.ids,
        "starts": [st.__dict__ | {"ids_per_s": round(st.ids_per_s(cfg.ids))} for st in starts],
        "sweep_seconds": round(sweep.seconds, 1),
        "sweep_max_livez_ms": round(sweep.max_livez_ms, 1),
        "cpus": os.cpu_count(),
    }
