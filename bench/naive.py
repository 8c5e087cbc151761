"""Workers bench: `sentpipe ingress --workers N` against the naive receiver run with N workers, same load.

(a) reference: bench/naive_receiver.py under gunicorn with N sync workers: Flask, the signature checked,
    every event INSERTed and committed in PostgreSQL before the answer (what the integration guide's
    receiver looks like when written the obvious way);
(b) sentpipe: `sentpipe ingress` with SENTPIPE_INGRESS_WORKERS=N (N processes on one port, SO_REUSEPORT),
    verifying signatures and producing with acks=all before answering.
Same pre-signed deliveries from the same load generator at the same concurrency, alternating rounds.
A third server is measured beside them, the ceiling: bench/noop_server.py with N processes on one port,
which does nothing but read the body and answer. No receiver of N processes that does any work can beat
it on the same cores, so it says how far "N times the naive receiver" is reachable on the machine at all.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import psycopg

from bench.common import (
    Proc,
    create_schema,
    drop_schema,
    metric_sum,
    run_id,
    scrape_all,
    settings_env,
    stopping,
)
from bench.ingress import (
    BENCH_SECRET,
    IngressConfig,
    Measurement,
    measure,
    measured_row,
    median,
    pick_loadgen,
    raw_records,
)
from bench.loadgen import Wrk
from bench.ui import BenchResult, Ui
from sentpipe.processors.topics import ensure_topics
from sentpipe.schemas.topics import Topics
from sentpipe.settings import Settings
from tests.kafka_tools import delete_topics
from tests.processes import free_port
from tests.services import Services

NAIVE_TABLE = "naive_webhook_events"


def run(svc: Services, cfg: IngressConfig, workers: int, ui: Ui, work: Path) -> BenchResult:
    rid = run_id()
    prefix = f"bench{rid}."
    schema = f"bench_naive_{rid}"
    work.mkdir(parents=True, exist_ok=True)
    load = pick_loadgen(cfg, ui, work)
    tolerance = max(300, int(cfg.warmup + cfg.seconds) + 120)
    settings = Settings(
        kafka_bootstrap=svc.kafka_bootstrap,
        topic_prefix=prefix,
        webhook_secret=BENCH_SECRET,
        signature_tolerance_s=tolerance,
    )
    with ui.phase(f"naive: create topics {prefix}* and schema {schema}"):
        ensure_topics(settings)
        db_url = create_schema(svc.database_url, schema)

    naive_port, ing_port = free_port(), free_port()
    ing_metrics = free_port()
    naive_env = settings_env({"database_url": db_url})
    naive_env.update(
        NAIVE_WEBHOOK_SECRET=BENCH_SECRET, NAIVE_TOLERANCE_S=str(tolerance), NAIVE_TABLE=NAIVE_TABLE
    )
    naive = Proc(
        "naive",
        [
            sys.executable,
            "-m",
            "gunicorn",
            "--workers",
            str(workers),
            "--bind",
            f"127.0.0.1:{naive_port}",
            "--backlog",
            "2048",
            "bench.naive_receiver:app",
        ],
        work / "naive.log",
        naive_env,
    )
    env = settings_env(
        {
            "kafka_bootstrap": svc.kafka_bootstrap,
            "webhook_secret": BENCH_SECRET,
            "topic_prefix": prefix,
            "signature_tolerance_s": tolerance,
            "ingress_host": "127.0.0.1",
            "ingress_port": ing_port,
            "ingress_metrics_port": ing_metrics,
            "ingress_workers": workers,
        }
    )
    ingress = Proc.sentpipe("ingress", env, work / "ingress.log")
    noop_port = free_port()
    noop = Proc(
        "noop", [sys.executable, "-m", "bench.noop_server", str(noop_port), str(workers)], work / "noop.log"
    )
    metrics_ports = [ing_metrics]  # the workers' metrics, served as one by the supervisor
    targets = {
        "naive": (naive, f"http://127.0.0.1:{naive_port}/webhooks/sent", []),
        "sentpipe": (ingress, f"http://127.0.0.1:{ing_port}/webhooks/sent", metrics_ports),
        "ceiling": (noop, f"http://127.0.0.1:{noop_port}/webhooks/sent", []),
    }
    results: dict[str, list[Measurement]] = {name: [] for name in targets}
    raw_count = answered_200 = stored = -1
    try:
        with stopping(naive, ingress, noop):
            with ui.phase(
                f"naive: start the naive receiver, `sentpipe ingress` and the no-op, {workers} each"
            ):
                naive.start().wait_http(f"http://127.0.0.1:{naive_port}/healthz")
                noop.start().wait_http(f"http://127.0.0.1:{noop_port}/healthz")
                ingress.start()
                # 200 once every worker is up (the supervisor answers 503 until then).
                ingress.wait_http(f"http://127.0.0.1:{ing_metrics}/metrics")
                ingress.wait_http(f"http://127.0.0.1:{ing_port}/readyz")
            for rnd in range(cfg.rounds):
                order = ["naive", "sentpipe", "ceiling"] if rnd % 2 == 0 else ["ceiling", "sentpipe", "naive"]
                for name in order:
                    proc, url, ports = targets[name]
                    results[name].append(
                        measure(name, rnd, proc, url, cfg, load, ui, ports, bench="naive", main_thread=False)
                    )
            answered_200 = int(
                metric_sum(scrape_all(metrics_ports), "sentpipe_ingress_requests_total", status="200")
            )
        raw_count = raw_records(svc.kafka_bootstrap, Topics(prefix).raw)
        with psycopg.connect(db_url) as conn:
            row = conn.execute(f"SELECT count(*) FROM {NAIVE_TABLE}").fetchone()
            stored = int(row[0]) if row else -1
    finally:
        delete_topics(svc.kafka_bootstrap, [prefix])
        drop_schema(svc.database_url, schema)
    return _summarize(cfg, workers, load, results, raw_count, answered_200, stored)


def _summarize(
    cfg: IngressConfig,
    workers: int,
    load: Any,
    results: dict[str, list[Measurement]],
    raw_count: int,
    answered_200: int,
    stored: int,
) -> BenchResult:
    ref = measured_row(f"naive receiver: Flask + INSERT per event, gunicorn -w {workers}", results["naive"])
    sp = measured_row(
        f"sentpipe ingress --workers {workers} (verify + produce acks=all)", results["sentpipe"]
    )
    per_round = [
        round(s.load.rps / r.load.rps, 2)
        for r, s in zip(results["naive"], results["sentpipe"], strict=True)
        if r.load.rps
    ]
    ceiling = measured_row(f"no-op aiohttp handler, {workers} processes", results["ceiling"])
    reachable = None if not ref.rate or ceiling.rate is None else round(ceiling.rate / ref.rate, 2)
    tool = f"wrk -t{cfg.threads} -c{cfg.connections}" if isinstance(load, Wrk) else load.name
    cpu = {
        name: {k: median([m.cpu.get(k) for m in ms]) for k in ms[0].cpu} if ms else {}
        for name, ms in results.items()
    }
    notes = [
        f"load: {tool}, {cfg.seconds:.0f}s per measurement after {cfg.warmup:.0f}s warm-up, "
        f"median of {cfg.rounds} alternating round(s); per-round req/s ratios {per_round}",
        f"non-2xx: naive {ref.detail['non_2xx']}, sentpipe {sp.detail['non_2xx']}; socket errors: "
        f"naive {ref.detail['socket_errors']}, sentpipe {sp.detail['socket_errors']} (gunicorn's sync "
        "workers close the connection after every answer; wrk reconnects)",
        f"stored: naive {stored} distinct events in PostgreSQL; sentpipe {answered_200} answered 200, "
        f"{raw_count} records in the raw topic (warm-ups included)",
        f"ceiling: the no-op handler in {workers} processes on one port made {_rate(ceiling.rate)} req/s "
        f"(p99 {ceiling.p99_ms} ms): {reachable}x the naive receiver, the most any {workers}-process "
        "receiver could reach on these cores",
        f"CPU cores used while measuring (median): {cpu}",
    ]
    return BenchResult(
        bench="naive",
        title=f"ingress: {workers} worker processes against the naive receiver's {workers} workers",
        unit="requests/s",
        latency_label="ms",
        reference=ref,
        sentpipe=sp,
        notes=notes,
        config={**vars(cfg), "tool": tool, "workers": workers},
        details={
            "per_round_rate_ratio": per_round,
            "raw_records": raw_count,
            "answered_200": answered_200,
            "naive_stored": stored,
            "ceiling": {"row": vars(ceiling), "rate_ratio_to_naive": reachable},
            "cpu_cores": cpu,
        },
    )


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"
