"""Pipeline bench: sustained events/s from the raw topic into PostgreSQL, sentpipe worker vs a plain loop.

For each contestant (own topic prefix, app id / group, database schema): push N events of every type into
the raw topic exactly as the ingress would (key = event id, the ingress's headers and producer config),
start ONE consumer process, and time first row -> last row by polling row counts. Then a paced phase
(default 200 events/s) gives end-to-end latency at light load: received-at -> projection committed.

- sentpipe: `sentpipe worker` (role `all`: the Faust router with its dedup table in the worker's process,
  the librdkafka projector in its child process); latency from its `sentpipe_end_to_end_lag_seconds`.
- reference: bench/reference.py, consume -> route() -> the same SQL -> commit offsets; latency from
  its samples, put through the same buckets so both are summarized alike.
"""

from __future__ import annotations

import shutil
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import psycopg
from confluent_kafka import Producer

from bench.common import (
    CpuMeter,
    Proc,
    Scrape,
    bucket_quantile,
    create_schema,
    drop_schema,
    histogram_delta,
    metric_sum,
    run_id,
    scrape,
    service_pids,
    settings_env,
    stopping,
    to_buckets,
)
from bench.ui import BenchResult, Row, Ui
from sentpipe.kafka import producer_config
from sentpipe.processors.topics import ensure_topics
from sentpipe.schemas import routing as r
from sentpipe.schemas.events import frame
from sentpipe.schemas.samples import Sample, SampleFactory
from sentpipe.schemas.topics import Topics
from sentpipe.sender.delivery import nearest_rank_quantile
from sentpipe.settings import Settings
from tests.kafka_tools import delete_topics, wait_topics_ready
from tests.processes import free_port
from tests.services import Services

LAG = "sentpipe_end_to_end_lag_seconds"
ROUTED = "sentpipe_events_routed_total"
RAW_PARTITIONS = Settings.model_fields["raw_partitions"].default
WARM_UP_EVENTS = 10_000
TABLES = ("message_events", "inbound_messages", "template_events")  # one history row per unique event


@dataclass(frozen=True)
class PipelineConfig:
    events: int = 50_000
    latency_rate: float = 200.0
    latency_seconds: float = 15.0
    seed: int = 7
    drain_timeout_s: float = 900.0
    scale_workers: int = 2  # a drain with this many worker processes too (1: skip)


@dataclass
class Contestant:
    name: str
    rid: str = field(default_factory=run_id)

    @property
    def prefix(self) -> str:
        return f"bench{self.rid}."

    @property
    def app_id(self) -> str:
        return f"sentpipe-bench{self.rid}"

    @property
    def schema(self) -> str:
        return f"bench_{self.rid}"


@dataclass
class Outcome:
    rate: float
    rows: int
    drain_s: float
    startup_s: float
    p50_ms: float | None
    p99_ms: float | None
    detail: dict[str, Any]


def topic_names(s: Settings) -> list[str]:
    t = Topics(s.topic_prefix)
    return [t.raw, *t.routed, t.unrouted, t.dlq]


def unique_ids(samples: Sequence[Sample]) -> int:
    return len({frame(s.body, webhook_id=None).event_id for s in samples})


class RawWriter:
    """Produces raw records the way the ingress does: same producer config, key and headers."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.topic = topic
        settings = Settings(kafka_bootstrap=bootstrap)
        # The ingress's config, with room for a broker still electing the new topics' leaders.
        self.producer = Producer({**producer_config(settings, delivery_timeout_s=60.0), "log_level": 3})
        self.failed = 0

    def _done(self, err: object, msg: object) -> None:
        if err is not None:
            self.failed += 1

    def send(self, sample: Sample) -> None:
        webhook_id = f"msg_{uuid.uuid4().hex}"
        framed = frame(sample.body, webhook_id=webhook_id)
        headers: list[tuple[str, str | bytes | None]] = list(
            r.raw_headers(
                tenant="default",
                received_at_ms=int(time.time() * 1000),
                webhook_id=webhook_id,
                request_id=uuid.uuid4().hex,
                event_type=framed.type.value,
            )
        )
        while True:
            try:
                self.producer.produce(
                    self.topic, sample.body, framed.event_id.encode(), headers=headers, on_delivery=self._done
                )
                break
            except BufferError:  # local queue full: let deliveries drain, then retry
                self.producer.poll(0.05)
        self.producer.poll(0)

    def flush(self) -> None:
        if self.producer.flush(60):
            raise RuntimeError("raw records not acknowledged within 60s")
        if self.failed:
            raise RuntimeError(f"{self.failed} raw records failed to produce")


class RowCounter:
    def __init__(self, base_url: str, schema: str) -> None:
        self.conn = psycopg.connect(base_url, autocommit=True)
        parts = " + ".join(f'(SELECT count(*) FROM "{schema}".{t})' for t in TABLES)
        self.sql = f"SELECT {parts}".encode()

    def __call__(self) -> int:
        row = self.conn.execute(self.sql).fetchone()
        return int(row[0]) if row else 0

    def close(self) -> None:
        self.conn.close()


def preload(ui: Ui, writer: RawWriter, samples: Sequence[Sample], label: str) -> None:
    with ui.phase(f"{label}: push events into {writer.topic}", total=len(samples)) as ph:
        for i, s in enumerate(samples, 1):
            writer.send(s)
            if i % 1000 == 0:
                ph.update(i)
        writer.flush()


def paced(ui: Ui, writer: RawWriter, samples: Sequence[Sample], rate: float, label: str) -> None:
    """Produce at a steady rate (small ticks) so latency is measured under light, even load.

    `writer` must be the one that preloaded the topic: a new producer holds its first records for its
    connections and the topic's metadata, about half a second here, and those records, timed from their
    received-at header, came out as the contestant's p99 (whichever contestant it happened to)."""
    t0 = time.monotonic()
    with ui.phase(f"{label}: paced {rate:.0f} events/s", total=len(samples)) as ph:
        sent = 0
        while sent < len(samples):
            due = min(len(samples), int((time.monotonic() - t0) * rate) + 1)
            while sent < due:
                writer.send(samples[sent])
                sent += 1
            writer.producer.poll(0)
            ph.update(sent)
            time.sleep(0.005)
        writer.flush()


@dataclass
class Drain:
    startup_s: float  # process start -> processing started
    drain_s: float  # processing started -> last row committed
    rows: int  # rows committed inside the timed window
    first_row_s: float  # processing started -> first row visible


def drain(
    ui: Ui,
    proc: Proc,
    count: RowCounter,
    target: int,
    timeout: float,
    label: str,
    meter: CpuMeter,
    processing: Callable[[], bool] | None = None,
) -> Drain:
    """Time from the start of processing to the last row.

    Processing starts at the first row, or earlier when `processing` says so: the sentpipe worker routes
    for a long while before its projecting agents write anything (see the report), and that routing is
    part of the work being timed.
    """
    t_launch = time.monotonic()
    t_start = t_first_row = 0.0
    rows_at_start = 0
    with ui.phase(f"{label}: drain", total=target) as ph:
        while True:
            proc.check()
            now = time.monotonic()
            rows = count()
            if not t_start and (rows or (processing is not None and processing())):
                t_start, rows_at_start = now, rows
                meter.start()
            if rows and not t_first_row:
                t_first_row = now
            ph.update(rows, "starting" if not t_start else "")
            if rows >= target:
                return Drain(t_start - t_launch, now - t_start, rows - rows_at_start, t_first_row - t_start)
            if now - t_launch > timeout:
                raise TimeoutError(f"{label}: {rows}/{target} rows after {timeout:.0f}s:\n{proc.tail()}")
            # 0.05-0.1 s polls bound the timing error at both ends; a count over three tables is a few ms.
            time.sleep(0.05 if not t_start else 0.1)


def wait_rows(proc: Proc, count: RowCounter, target: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while count() < target:
        proc.check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{proc.name}: paced events not all projected:\n{proc.tail()}")
        time.sleep(0.1)


def run_contestant(
    svc: Services,
    cfg: PipelineConfig,
    ui: Ui,
    work: Path,
    c: Contestant,
    bulk: Sequence[Sample],
    slow: Sequence[Sample],
    bounds: list[float],
    label: str = "",
) -> Outcome:
    label = label or f"pipeline {c.name}"
    url = create_schema(svc.database_url, c.schema)
    settings = Settings(
        kafka_bootstrap=svc.kafka_bootstrap,
        database_url=url,
        topic_prefix=c.prefix,
        app_id=c.app_id,
    )
    ensure_topics(settings)
    wait_topics_ready(svc.kafka_bootstrap, topic_names(settings))
    writer = RawWriter(svc.kafka_bootstrap, Topics(c.prefix).raw)
    preload(ui, writer, bulk, label)
    bulk_rows, slow_rows = unique_ids(bulk), unique_ids(slow)

    metrics_port = free_port()
    lags_file = work / f"reference-lags-{c.rid}.json"
    if c.name == "sentpipe":
        env = settings_env(
            {
                "kafka_bootstrap": svc.kafka_bootstrap,
                "database_url": url,
                "topic_prefix": c.prefix,
                "app_id": c.app_id,
                "worker_web_port": free_port(),
                "worker_metrics_port": metrics_port,
                "data_dir": work / f"faust-{c.rid}",
            }
        )
        proc = Proc.sentpipe("worker", env, work / f"worker-{c.rid}.log")
    else:
        argv = [sys.executable, "-m", "bench.reference", "--bootstrap", svc.kafka_bootstrap]
        argv += ["--topic-prefix", c.prefix, "--group", c.app_id, "--database-url", url]
        argv += ["--lags-out", str(lags_file)]
        proc = Proc("reference", argv, work / f"reference-{c.rid}.log")

    count = RowCounter(svc.database_url, c.schema)
    detail: dict[str, Any] = {"prefix": c.prefix, "schema": c.schema, "app_id": c.app_id}
    try:
        with stopping(proc):
            proc.start()
            if c.name == "sentpipe":
                proc.wait_http(f"http://127.0.0.1:{metrics_port}/metrics")
            meter = CpuMeter({"consumer": [proc.pid], **service_pids()}, main_thread_of=proc.pid)
            routing_started: Callable[[], bool] | None = None
            if c.name == "sentpipe":
                routing_started = lambda: metric_sum(scrape(metrics_port), ROUTED) > 0  # noqa: E731
            d = drain(ui, proc, count, bulk_rows, cfg.drain_timeout_s, label, meter, routing_started)
            detail["cpu_cores_while_draining"] = meter.stop()
            rate = d.rows / d.drain_s if d.drain_s > 0 else float("nan")
            ui.log(
                f"{label}: {d.rows:,} rows in {d.drain_s:.1f}s = {rate:,.0f} events/s "
                f"(startup {d.startup_s:.1f}s, first row {d.first_row_s:.1f}s after processing started)"
            )

            before: Scrape = {}
            if c.name == "sentpipe":
                # Start from a histogram that holds every drained event, so the paced ones stand alone.
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline:
                    before = scrape(metrics_port)
                    if metric_sum(before, f"{LAG}_count") >= bulk_rows:
                        break
                    time.sleep(0.2)
            paced_from_ms = int(time.time() * 1000)
            paced(ui, writer, slow, cfg.latency_rate, label)
            wait_rows(proc, count, bulk_rows + slow_rows)
            if c.name == "sentpipe":
                # The histogram is observed right after the commit that made the rows visible.
                deadline = time.monotonic() + 30
                while True:
                    after = scrape(metrics_port)
                    buckets = histogram_delta(before, after, LAG)
                    if (buckets and buckets[-1][1] >= slow_rows) or time.monotonic() > deadline:
                        break
                    time.sleep(0.2)
                bounds[:] = [le for le, _ in buckets[:-1]]  # the reference is bucketed the same way
                detail["worker_metrics"] = {
                    "events_routed": metric_sum(after, "sentpipe_events_routed_total"),
                    "duplicates_dropped": metric_sum(after, "sentpipe_duplicates_dropped_total"),
                    "retries": metric_sum(after, "sentpipe_retries_total"),
                    "dlq_events": metric_sum(after, "sentpipe_dlq_events_total"),
                    "lag_samples_in_paced_phase": buckets[-1][1] if buckets else 0,
                }
        if c.name == "reference":
            data = orjson.loads(lags_file.read_bytes())
            lags = [
                lag for ms, lag in zip(data["received_ms"], data["lag_s"], strict=True) if ms >= paced_from_ms
            ]
            buckets = to_buckets(lags, bounds) if bounds else []
            detail["exact_p50_ms"] = _ms(nearest_rank_quantile(lags, 0.5))
            detail["exact_p99_ms"] = _ms(nearest_rank_quantile(lags, 0.99))
            detail["lag_samples_in_paced_phase"] = len(lags)
        p50 = _ms(bucket_quantile(0.5, buckets)) if buckets else detail.get("exact_p50_ms")
        p99 = _ms(bucket_quantile(0.99, buckets)) if buckets else detail.get("exact_p99_ms")
        detail["final_rows"] = count()
        detail["expected_rows"] = bulk_rows + slow_rows
        detail["first_row_after_start_s"] = round(d.first_row_s, 2)
        if c.name == "sentpipe":
            # Faust logs one per table-write flush stall (its producer buffer holds 100 records).
            detail["buffer_full_warnings"] = proc.log.read_text(errors="replace").count(
                "producer buffer full"
            )
        return Outcome(rate, d.rows, d.drain_s, d.startup_s, p50, p99, detail)
    finally:
        count.close()
        shutil.rmtree(work / f"faust-{c.rid}", ignore_errors=True)


def run_scaled(
    svc: Services,
    cfg: PipelineConfig,
    ui: Ui,
    work: Path,
    c: Contestant,
    bulk: Sequence[Sample],
    workers: int,
) -> Outcome:
    """The same drain with several `sentpipe worker` processes in one group (no latency phase)."""
    label = f"pipeline sentpipe x{workers}"
    url = create_schema(svc.database_url, c.schema)
    settings = Settings(
        kafka_bootstrap=svc.kafka_bootstrap, database_url=url, topic_prefix=c.prefix, app_id=c.app_id
    )
    ensure_topics(settings)
    wait_topics_ready(svc.kafka_bootstrap, topic_names(settings))
    preload(ui, RawWriter(svc.kafka_bootstrap, Topics(c.prefix).raw), bulk, label)
    ports = [free_port() for _ in range(workers)]
    procs = [
        Proc.sentpipe(
            "worker",
            settings_env(
                {
                    "kafka_bootstrap": svc.kafka_bootstrap,
                    "database_url": url,
                    "topic_prefix": c.prefix,
                    "app_id": c.app_id,
                    "worker_web_port": free_port(),
                    "worker_metrics_port": port,
                    "data_dir": work / f"faust-{c.rid}-{i}",
                }
            ),
            work / f"worker-{c.rid}-{i}.log",
        )
        for i, port in enumerate(ports)
    ]
    count = RowCounter(svc.database_url, c.schema)
    try:
        with stopping(*procs):
            for p in procs:
                p.start()
            for p, port in zip(procs, ports, strict=True):
                p.wait_http(f"http://127.0.0.1:{port}/metrics")
            meter = CpuMeter({"consumers": [p.pid for p in procs], **service_pids()})

            def routing_started() -> bool:
                return any(metric_sum(scrape(port), ROUTED) > 0 for port in ports)

            d = drain(
                ui, procs[0], count, unique_ids(bulk), cfg.drain_timeout_s, label, meter, routing_started
            )
            cpu = meter.stop()
            rate = d.rows / d.drain_s if d.drain_s > 0 else float("nan")
            ui.log(f"{label}: {d.rows:,} rows in {d.drain_s:.1f}s = {rate:,.0f} events/s")
        return Outcome(rate, d.rows, d.drain_s, d.startup_s, None, None, {"cpu_cores_while_draining": cpu})
    finally:
        count.close()
        drop_schema(svc.database_url, c.schema)
        delete_topics(
            svc.kafka_bootstrap, [c.prefix, f"{c.app_id}-"], groups=[c.app_id, f"{c.app_id}-projections"]
        )
        for i in range(workers):
            shutil.rmtree(work / f"faust-{c.rid}-{i}", ignore_errors=True)


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000, 2)


def same_state(base_url: str, a: str, b: str) -> bool:
    """Do both contestants end with the same current state? (A cheap cross-check of the reference.)"""
    queries = (
        'SELECT tenant, message_id, status, event_id FROM "{}".message_status ORDER BY 1, 2',
        'SELECT tenant, template_id, status, event_id FROM "{}".template_status ORDER BY 1, 2',
        'SELECT event_id FROM "{}".inbound_messages ORDER BY 1',
    )
    with psycopg.connect(base_url, autocommit=True) as conn:
        return all(
            conn.execute(q.format(a).encode()).fetchall() == conn.execute(q.format(b).encode()).fetchall()
            for q in queries
        )


def run(svc: Services, cfg: PipelineConfig, ui: Ui, work: Path) -> BenchResult:
    work.mkdir(parents=True, exist_ok=True)
    with ui.phase(f"pipeline: generate {cfg.events:,} + paced sample events"):
        # Distinct seeds: the paced events must be new, or the dedup table would drop them.
        bulk = SampleFactory(cfg.seed).mix(cfg.events, shape="mixed")
        slow = SampleFactory(cfg.seed + 1).mix(int(cfg.latency_rate * cfg.latency_seconds), shape="mixed")
    contestants = [Contestant("sentpipe"), Contestant("reference")]
    outcomes: dict[str, Outcome] = {}
    bounds: list[float] = []
    identical: bool | None = None
    # An untimed round of both first: a broker started just before the bench warms its JVM up on whatever
    # runs first (on a fresh broker it used 0.66 cores in sentpipe's drain, 0.27 in the next run), and a
    # scratch topic's round trip alone did not cover it.
    warm = [Contestant("sentpipe"), Contestant("reference")]
    try:
        for c in warm:
            few, fewer = bulk[:WARM_UP_EVENTS], slow[: WARM_UP_EVENTS // 50]
            run_contestant(svc, cfg, ui, work, c, few, fewer, [], f"pipeline warm-up (untimed) {c.name}")
    finally:
        _drop(ui, svc, warm, "pipeline: drop the warm-up round's schemas and topics")
    try:
        for c in contestants:
            outcomes[c.name] = run_contestant(svc, cfg, ui, work, c, bulk, slow, bounds)
        identical = same_state(svc.database_url, contestants[0].schema, contestants[1].schema)
        if cfg.scale_workers > 1:
            outcomes["sentpipe-scaled"] = run_scaled(
                svc, cfg, ui, work, Contestant("sentpipe"), bulk, cfg.scale_workers
            )
    finally:
        _drop(ui, svc, contestants, "pipeline: drop bench schemas and topics")
    return _summarize(cfg, outcomes, identical, len(slow))


def _drop(ui: Ui, svc: Services, contestants: Sequence[Contestant], title: str) -> None:
    with ui.phase(title):
        for c in contestants:
            drop_schema(svc.database_url, c.schema)
            delete_topics(
                svc.kafka_bootstrap, [c.prefix, f"{c.app_id}-"], groups=[c.app_id, f"{c.app_id}-projections"]
            )


def _summarize(
    cfg: PipelineConfig, outcomes: dict[str, Outcome], identical: bool | None, n_slow: int
) -> BenchResult:
    def row(name: str, title: str) -> Row:
        o = outcomes[name]
        detail = {
            **o.detail,
            "rows_timed": o.rows,
            "drain_s": round(o.drain_s, 2),
            "startup_to_first_row_s": round(o.startup_s, 2),
        }
        return Row(title, round(o.rate, 1), o.p50_ms, o.p99_ms, detail)

    ref = row("reference", "reference: confluent-kafka loop -> route() -> same SQL")
    sp = row("sentpipe", "sentpipe worker (router + projector processes)")
    cpu = {k: outcomes[k].detail.get("cpu_cores_while_draining") for k in outcomes}
    per_cpu = {
        k: round(outcomes[k].rate / c["consumer"])
        for k in ("sentpipe", "reference")
        if isinstance(c := cpu.get(k), dict) and c.get("consumer")
    }
    notes = [
        f"{cfg.events:,} events preloaded into a fresh raw topic ({RAW_PARTITIONS} partitions) per "
        "contestant; one consumer (the reference: one process; sentpipe: one `sentpipe worker`, its "
        "router and its projector process); timed from the start of processing (sentpipe: first routed "
        "event in its metrics; reference: first committed batch) to the last row in PostgreSQL",
        f"first row visible after processing started: sentpipe {sp.detail['first_row_after_start_s']}s, "
        f"reference {ref.detail['first_row_after_start_s']}s; Faust 'producer buffer full' warnings logged "
        f"by the worker: {sp.detail.get('buffer_full_warnings')}",
        f"latency: end-to-end (received-at header -> projection committed) for {n_slow:,} events paced at "
        f"{cfg.latency_rate:.0f}/s after the drain; both summarized from the worker's histogram buckets "
        f"(reference exact: p50 {ref.detail.get('exact_p50_ms')} ms, "
        f"p99 {ref.detail.get('exact_p99_ms')} ms)",
        f"final current state identical in both schemas: {identical}",
        f"CPU cores used while draining: {cpu}",
        f"events per CPU-second of the consumer's processes: {per_cpu}",
    ]
    scaled = outcomes.get("sentpipe-scaled")
    if scaled is not None:
        notes.append(
            f"{cfg.scale_workers} sentpipe worker processes in one group: {scaled.rate:,.0f} events/s "
            f"({scaled.rate / outcomes['sentpipe'].rate:.2f}x one worker, "
            f"{scaled.rate / outcomes['reference'].rate:.3f}x the reference)"
        )
    return BenchResult(
        bench="pipeline",
        title="pipeline: raw topic -> dedup/route -> PostgreSQL, one consumer",
        unit="events/s",
        latency_label="e2e ms",
        reference=ref,
        sentpipe=sp,
        notes=notes,
        config=vars(cfg),
        details={"identical_state": identical, "cpu_cores_while_draining": cpu},
    )
