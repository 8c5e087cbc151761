"""Ingress bench: requests/s and latency of `sentpipe ingress` against a no-op aiohttp server, same load.

(a) reference: bench/noop_server.py, the ingress's aiohttp setup with a handler that only reads the body;
(b) sentpipe: `sentpipe ingress` (one process) verifying signatures and producing with acks=all before
    answering. Both get the same pre-signed deliveries from the same load generator at the same fixed
    concurrency; rounds alternate the order so drift on a shared machine hits both alike.

Each placement (`bench/placement.py`) is a table of its own: "shared", every process on every CPU (the
broker and the load generator compete with the server), and "isolated", the server's event loop alone on
one CPU with the rest on the others.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from bench.common import (
    CpuMeter,
    Proc,
    Scrape,
    bucket_quantile,
    histogram_delta,
    metric_sum,
    run_id,
    scrape,
    scrape_all,
    service_pids,
    settings_env,
    stopping,
)
from bench.loadgen import LoadGenerator, LoadResult, PyClient, Wrk, ensure_wrk, signed_pool
from bench.placement import placed
from bench.ui import BenchResult, Row, Ui
from sentpipe.processors.topics import ensure_topics
from sentpipe.schemas.topics import Topics
from sentpipe.settings import Settings
from tests.kafka_tools import delete_topics
from tests.processes import free_port
from tests.services import Services

BENCH_SECRET = "whsec_YmVuY2gtb25seS1zZWNyZXQtbm90LWZvci1yZWFsLXRyYWZmaWM="


@dataclass(frozen=True)
class IngressConfig:
    seconds: float = 20.0
    warmup: float = 5.0
    rounds: int = 2
    connections: int = 64
    threads: int = 2
    pool_size: int = 4096
    loadgen: str = "auto"  # auto (wrk, installed if missing, else aiohttp client) | wrk | python
    placements: tuple[str, ...] = ("shared",)  # bench/placement.py


@dataclass
class Measurement:
    load: LoadResult
    cpu: dict[str, float]
    server_metrics: dict[str, Any]


def _cpu_children() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def ingress_metrics(before: Scrape, after: Scrape) -> dict[str, Any]:
    """What the ingress saw itself during the window: produce and request latency, statuses."""
    produce = histogram_delta(before, after, "sentpipe_ingress_produce_seconds")
    request = histogram_delta(before, after, "sentpipe_ingress_request_seconds")

    def ms(v: float | None) -> float | None:
        return None if v is None else round(v * 1000, 3)

    statuses: dict[str, int] = {}
    for (name, labels), value in after.items():
        if name == "sentpipe_ingress_requests_total":
            status = dict(labels)["status"]
            delta = int(value - before.get((name, labels), 0.0))
            if delta:
                statuses[status] = statuses.get(status, 0) + delta
    return {
        "produce_p50_ms": ms(bucket_quantile(0.5, produce)),
        "produce_p99_ms": ms(bucket_quantile(0.99, produce)),
        "request_p50_ms": ms(bucket_quantile(0.5, request)),
        "request_p99_ms": ms(bucket_quantile(0.99, request)),
        "statuses": statuses,
    }


def raw_records(bootstrap: str, topic: str) -> int:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-count-{run_id()}", "log_level": 0})
    try:
        md = c.list_topics(topic, timeout=10)
        total = 0
        for p in md.topics[topic].partitions:
            low, high = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            total += high - low
        return total
    finally:
        c.close()


def pick_loadgen(cfg: IngressConfig, ui: Ui, work: Path) -> LoadGenerator:
    if cfg.loadgen in ("auto", "wrk"):
        binary = ensure_wrk(ui.log)
        if binary:
            return Wrk(binary, work, cfg.threads, cfg.connections)
        if cfg.loadgen == "wrk":
            raise RuntimeError("wrk is not installed and could not be installed")
        ui.log("wrk unavailable: falling back to the multi-process aiohttp client")
    return PyClient(work, processes=2, connections=cfg.connections)


def run(svc: Services, cfg: IngressConfig, ui: Ui, work: Path) -> list[BenchResult]:
    """One table per placement."""
    rid = run_id()
    prefix = f"bench{rid}."
    work.mkdir(parents=True, exist_ok=True)
    load = pick_loadgen(cfg, ui, work)
    # The pool is signed right before each run; the tolerance only has to cover warm-up plus measurement.
    tolerance = max(300, int(cfg.warmup + cfg.seconds) + 120)
    settings = Settings(
        kafka_bootstrap=svc.kafka_bootstrap,
        topic_prefix=prefix,
        webhook_secret=BENCH_SECRET,
        signature_tolerance_s=tolerance,
    )
    with ui.phase(f"ingress: create topics {prefix}*"):
        ensure_topics(settings)

    noop_port, ing_port, ing_metrics = free_port(), free_port(), free_port()
    noop = Proc("noop", [sys.executable, "-m", "bench.noop_server", str(noop_port)], work / "noop.log")
    env = settings_env(
        {
            "kafka_bootstrap": svc.kafka_bootstrap,
            "webhook_secret": BENCH_SECRET,
            "topic_prefix": prefix,
            "signature_tolerance_s": tolerance,
            "ingress_host": "127.0.0.1",
            "ingress_port": ing_port,
            "ingress_metrics_port": ing_metrics,
            "ingress_workers": 1,  # this bench is about one process (the default is one per CPU)
        }
    )
    ingress = Proc.sentpipe("ingress", env, work / "ingress.log")
    targets = {
        "reference": (noop, f"http://127.0.0.1:{noop_port}/webhooks/sent"),
        "sentpipe": (ingress, f"http://127.0.0.1:{ing_port}/webhooks/sent"),
    }
    results: dict[str, dict[str, list[Measurement]]] = {
        p: {"reference": [], "sentpipe": []} for p in cfg.placements
    }
    raw_count = answered_200 = -1
    try:
        with stopping(noop, ingress):
            with ui.phase("ingress: start no-op server and `sentpipe ingress`"):
                noop.start().wait_http(f"http://127.0.0.1:{noop_port}/healthz")
                ingress.start().wait_http(f"http://127.0.0.1:{ing_port}/healthz")
                # /readyz answers 200 only once the producer reaches the broker.
                ingress.wait_http(f"http://127.0.0.1:{ing_port}/readyz")
            for rnd in range(cfg.rounds):
                order = ["reference", "sentpipe"] if rnd % 2 == 0 else ["sentpipe", "reference"]
                for placement in cfg.placements:
                    for name in order:
                        proc, url = targets[name]
                        ports = [ing_metrics] if proc is ingress else []
                        with placed(placement, proc.pid, service_pids().get("kafka", []), ui.log):
                            m = measure(name, rnd, proc, url, cfg, load, ui, ports, label=placement)
                        results[placement][name].append(m)
            answered_200 = int(
                metric_sum(scrape(ing_metrics), "sentpipe_ingress_requests_total", status="200")
            )
        raw_count = raw_records(svc.kafka_bootstrap, Topics(prefix).raw)
    finally:
        delete_topics(svc.kafka_bootstrap, [prefix])
    return [
        _summarize(cfg, load, placement, by_name, raw_count, answered_200, tolerance)
        for placement, by_name in results.items()
    ]


def measure(
    name: str,
    rnd: int,
    proc: Proc,
    url: str,
    cfg: IngressConfig,
    load: LoadGenerator,
    ui: Ui,
    metrics_ports: list[int],
    bench: str = "ingress",
    main_thread: bool = True,
    label: str = "",
) -> Measurement:
    """One warmed-up measurement of one server; its own /metrics (summed over `metrics_ports`) when given.
    `main_thread`: also report the CPU of the server process's main thread (one process: its event loop)."""
    label = f"{bench}{' ' + label if label else ''} round {rnd + 1}/{cfg.rounds}: {name}"
    pool = signed_pool(BENCH_SECRET, cfg.pool_size, seed=rnd * 2 + (name == "sentpipe"))
    with ui.phase(f"{label} warm-up", total=round(cfg.warmup)) as ph:
        load.run(url, pool, cfg.warmup, f"{name}-{rnd}-warm", lambda t: ph.update(t))
    proc.check()
    before = scrape_all(metrics_ports) if metrics_ports else {}
    main_of = proc.pid if main_thread else None
    meter = CpuMeter({"server": [proc.pid], **service_pids()}, main_thread_of=main_of)
    children0 = _cpu_children()
    meter.start()
    t0 = time.monotonic()
    with ui.phase(f"{label} measure", total=round(cfg.seconds)) as ph:
        result = load.run(url, pool, cfg.seconds, f"{name}-{rnd}", lambda t: ph.update(t, f"{name}"))
    wall = time.monotonic() - t0
    cpu = meter.stop()
    cpu["loadgen"] = round((_cpu_children() - children0) / wall, 2)  # wrk / clients were reaped by now
    proc.check()
    server = ingress_metrics(before, scrape_all(metrics_ports)) if metrics_ports else {}
    ui.log(
        f"{label}: {result.rps:,.0f} req/s, p50 {result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms, "
        f"non-2xx {result.non_2xx}, cpu {cpu}"
    )
    return Measurement(result, cpu, server)


def median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 3) if present else None


def measured_row(title: str, ms: list[Measurement]) -> Row:
    """One contestant's rounds as a table row: medians, and every round kept in the detail."""
    detail: dict[str, Any] = {
        "rounds": [
            {"load": vars(m.load), "cpu_cores": m.cpu, "server_metrics": m.server_metrics} for m in ms
        ],
        "non_2xx": sum(m.load.non_2xx for m in ms),
        "socket_errors": sum(m.load.socket_errors for m in ms),
    }
    return Row(
        title,
        median([m.load.rps for m in ms]),
        median([m.load.p50_ms for m in ms]),
        median([m.load.p99_ms for m in ms]),
        detail,
    )


PLACEMENT_TITLES = {
    "shared": "every process on every CPU",
    "isolated": "its event loop alone on one CPU, broker, load generator and helper threads on the rest",
}


def _summarize(
    cfg: IngressConfig,
    load: LoadGenerator,
    placement: str,
    results: dict[str, list[Measurement]],
    raw_count: int,
    answered_200: int,
    tolerance: int,
) -> BenchResult:
    ref = measured_row("reference: no-op aiohttp handler", results["reference"])
    sp = measured_row("sentpipe ingress (verify + produce acks=all)", results["sentpipe"])
    ms = results["sentpipe"]
    sp.detail["produce_p50_ms"] = median([m.server_metrics.get("produce_p50_ms") for m in ms])
    sp.detail["produce_p99_ms"] = median([m.server_metrics.get("produce_p99_ms") for m in ms])
    sp.detail["server_request_p99_ms"] = median([m.server_metrics.get("request_p99_ms") for m in ms])
    per_round = [
        round(s.load.rps / r.load.rps, 3)
        for r, s in zip(results["reference"], results["sentpipe"], strict=True)
        if r.load.rps
    ]
    tool = f"wrk -t{cfg.threads} -c{cfg.connections}" if isinstance(load, Wrk) else load.name
    notes = [
        f"load: {tool}, {cfg.seconds:.0f}s per measurement after {cfg.warmup:.0f}s warm-up, "
        f"median of {cfg.rounds} alternating round(s); per-round req/s ratios {per_round}",
        f"ingress produce latency (own /metrics histogram, bucket-interpolated): "
        f"p50 {sp.detail.get('produce_p50_ms')} ms, p99 {sp.detail.get('produce_p99_ms')} ms",
        f"non-2xx: reference {ref.detail['non_2xx']}, sentpipe {sp.detail['non_2xx']}; "
        f"socket errors: reference {ref.detail['socket_errors']}, sentpipe {sp.detail['socket_errors']}",
        f"durability check (every placement, warm-ups included): {answered_200} answered 200 by the "
        f"ingress, {raw_count} records in the raw topic",
    ]
    cpu = {
        name: {k: median([m.cpu.get(k) for m in ms]) for k in ms[0].cpu} if ms else {}
        for name, ms in results.items()
    }
    notes.append(f"CPU cores used while measuring (median): {cpu}")
    return BenchResult(
        # "ingress" stays the key of the shared placement: results files before placements used it.
        bench="ingress" if placement == "shared" else f"ingress_{placement}",
        title=f"ingress: signed webhooks over HTTP, one server process; {PLACEMENT_TITLES[placement]}",
        unit="requests/s",
        latency_label="ms",
        reference=ref,
        sentpipe=sp,
        notes=notes,
        config={**vars(cfg), "placement": placement, "tool": tool, "signature_tolerance_s": tolerance},
        details={
            "per_round_rate_ratio": per_round,
            "raw_records": raw_count,
            "answered_200": answered_200,
            "cpu_cores": cpu,
        },
    )
