"""Every Prometheus metric sentpipe exports, in one place.

The Grafana dashboard and the alert rules are checked against the names here
(tests/test_deploy_static.py, tests/test_prometheus_scrape.py).
Label values are bounded sets (tenant names come from configuration, never from the request path).
"""

from typing import Literal

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.registry import Collector

from sentpipe.loop_metrics import LoopCounter, LoopHistogram

# `_created` series double the exposition size and no dashboard uses them.
disable_created_metrics()  # type: ignore[no-untyped-call]

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Fine between 50 ms and 1 s, where a healthy pipeline's p99 lies: with 0.25 and 0.5 the only bounds there,
# any p99 in between was read as a straight line through that bucket. Above, no bound more than 2.5 times
# the one before: with 60 then 300, a backlog's 100 s p99 read as about 290 s.
_LAG_BUCKETS = (
    *(0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75),
    *(1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 3600.0),
)

# --- ingress -------------------------------------------------------------------------------------------
# The request counter and the request, produce and body histograms are updated on every request, from the
# event loop alone: they take no lock (sentpipe/loop_metrics.py; prometheus_client's take one per update).
INGRESS_REQUESTS = LoopCounter(
    "sentpipe_ingress_requests",
    "Webhook requests answered, by tenant, outcome and HTTP status.",
    ["tenant", "outcome", "status"],
)
INGRESS_REQUEST_SECONDS = LoopHistogram(
    "sentpipe_ingress_request_seconds", "Time from request start to response.", buckets=_LATENCY_BUCKETS
)
INGRESS_PRODUCE_SECONDS = LoopHistogram(
    "sentpipe_ingress_produce_seconds",
    "Time from produce() to the broker's delivery report, or to its failure (a timeout: its whole wait).",
    buckets=_LATENCY_BUCKETS,
)
INGRESS_IN_FLIGHT = Gauge("sentpipe_ingress_in_flight", "Webhook requests being handled right now.")
INGRESS_BODY_BYTES = LoopHistogram(
    "sentpipe_ingress_body_bytes",
    "Size of accepted request bodies.",
    buckets=(256, 512, 1024, 2048, 4096, 8192, 16384, 65536, 262144, 1048576),
)
INGRESS_SIGNATURE_FAILURES = Counter(
    "sentpipe_ingress_signature_failures",
    "Requests rejected by signature verification, by reason.",
    ["tenant", "reason"],
)

INGRESS_ACCEPTING = Gauge(
    "sentpipe_ingress_accepting",
    "1 while this ingress process can take a delivery (its producer reaches a broker, or its spool has "
    "room): /readyz's answer, its broker check refreshed every 5 s. Scraped also while the pod is unready.",
)

INGRESS_REFUSED = Counter(
    "sentpipe_ingress_refused",
    "Requests turned away before any work, by reason (overloaded: SENTPIPE_INGRESS_MAX_IN_FLIGHT reached; "
    "body_timeout, header_timeout: SENTPIPE_BODY_TIMEOUT_S; write_timeout: a client that does not read its "
    "answers for SENTPIPE_BODY_TIMEOUT_S, dropped; broker_down: the producer knows no broker is up; "
    "spool_full, spool_write_failed: the spool disk refused the write).",
    ["reason"],
)

# --- the Kafka producer (ingress and worker) -------------------------------------------------------------
PRODUCER_BROKERS_DOWN = Gauge(
    "sentpipe_producer_brokers_down",
    "1 while this process's producer knows every Kafka broker is down (new records are refused at once).",
)
PRODUCER_RECREATED = Counter(
    "sentpipe_producer_recreated",
    "Producers replaced after a fatal librdkafka error, or a client that lost its brokers while the cluster"
    " answered.",
)
PRODUCER_UNCONFIRMED = Counter(
    "sentpipe_producer_unconfirmed",
    "Delivery reports of success that named no offset: failed, so their records are sent again.",
)

# --- ingress spool (SENTPIPE_SPOOL=on): records fsynced locally while the broker could not take them -------
SPOOL_RECORDS = Gauge("sentpipe_spool_records", "Records in the spool not yet acknowledged by the broker.")
SPOOL_BYTES = Gauge("sentpipe_spool_bytes", "Bytes of spool segments on disk.")
SPOOL_MAX_BYTES = Gauge("sentpipe_spool_max_bytes", "SENTPIPE_SPOOL_MAX_BYTES: beyond it requests get 503.")
SPOOL_OLDEST_AGE = Gauge(
    "sentpipe_spool_oldest_age_seconds", "Age of the oldest spooled record not yet on the broker (0: empty)."
)
SPOOL_SPOOLED = Counter("sentpipe_spool_spooled", "Records written (fsynced) to the spool and answered 200.")
SPOOL_DRAINED = Counter("sentpipe_spool_drained", "Spooled records acknowledged by the broker.")
SPOOL_CORRUPT = Counter(
    "sentpipe_spool_corrupt_frames", "Torn or corrupt spool frames skipped by the drain (logged each)."
)
SPOOL_WRITE_ERRORS = Counter(
    "sentpipe_spool_write_errors", "Spool writes the disk refused; their requests got 503."
)
SPOOL_REFUSED = Counter(
    "sentpipe_spool_refused",
    "Spooled records the broker refused for what they are (too large): kept in refused.rec, tried again at"
    " the next start.",
)
SPOOL_REFUSED_RECORDS = Gauge(
    "sentpipe_spool_refused_records",
    "Spooled records set aside in refused.rec: answered 200, not on Kafka until a start sends them again.",
)
SPOOL_FSYNC_SECONDS = Histogram(
    "sentpipe_spool_write_seconds",
    "Time of one group commit (write and fdatasync) to the spool.",
    buckets=_LATENCY_BUCKETS,
)

# --- processors ----------------------------------------------------------------------------------------
EVENTS_ROUTED = Counter(
    "sentpipe_events_routed", "First-seen raw events routed, by canonical type.", ["type"]
)
DUPLICATES_DROPPED = Counter(
    "sentpipe_duplicates_dropped", "Redelivered raw events dropped by the dedup table.", ["type"]
)
RAW_RECORDS_REREAD = Counter(
    "sentpipe_raw_records_reread",
    "Raw records the router's stream skipped and the router read again itself (should stay 0).",
)
DEDUP_CHANGELOG_GAPS = Counter(
    "sentpipe_dedup_changelog_gaps",
    "Gaps found in the dedup table's changelog as this worker's copy applied it; the copy stops vouching "
    "for that partition until its next assignment (should stay 0).",
)
DEDUP_TABLE_KEYS = Gauge("sentpipe_dedup_table_keys", "Event ids held by this worker's dedup table.")
EVENTS_PROCESSED = Counter(
    "sentpipe_events_processed",
    "Routed events processed, by type, handler (projection or a user handler) and outcome.",
    ["type", "handler", "outcome"],
)
HANDLER_SECONDS = Histogram(
    "sentpipe_handler_seconds",
    "Time spent in a projection batch or a user handler.",
    ["type", "handler"],
    buckets=_LATENCY_BUCKETS,
)
RETRIES = Counter("sentpipe_retries", "Temporary failures retried with backoff, by stage.", ["stage"])
DLQ_EVENTS = Counter(
    "sentpipe_dlq_events",
    "Records written to the dead-letter topic, by stage and reason.",
    ["stage", "reason"],
)
END_TO_END_LAG_SECONDS = Histogram(
    "sentpipe_end_to_end_lag_seconds",
    "Time from the ingress receiving an event to its projection being committed (not replays or redrives).",
    ["type"],
    buckets=_LAG_BUCKETS,
)
CONSUMER_LAG = Gauge(
    "sentpipe_consumer_lag",
    "Records behind the end of the partition, per consumed partition.",
    ["topic", "partition"],
)

WORKER_STALLED = Gauge(
    "sentpipe_worker_stalled",
    "1 while a stage has records waiting and has not moved for SENTPIPE_STALL_AFTER_S (liveness fails).",
    ["stage"],
)

# --- operations ----------------------------------------------------------------------------------------
REPLAY_EVENTS = Counter(
    "sentpipe_replay_events", "Replayed or redriven records applied by the worker.", ["mode", "outcome"]
)


# --- what each process serves --------------------------------------------------------------------------
# Every process imports this whole module, so the default registry holds both roles' collectors: a worker
# exported the ingress's unlabelled series at 0 (sentpipe_ingress_accepting 0 reads "not accepting" to any
# query that does not pin the job) and an ingress the worker's. Each role's scrape serves this registry of
# its own families, the shared ones and the process's own (process_*, python_*).
Role = Literal["ingress", "worker"]


def _registry(*collectors: Collector) -> CollectorRegistry:
    registry = CollectorRegistry()
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR, *collectors):
        registry.register(collector)
    return registry


# The ingress dead-letters malformed events too.
_BOTH = (PRODUCER_BROKERS_DOWN, PRODUCER_RECREATED, PRODUCER_UNCONFIRMED, DLQ_EVENTS)
SERVED: dict[Role, CollectorRegistry] = {
    "ingress": _registry(
        *_BOTH,
        *(INGRESS_REQUESTS, INGRESS_REQUEST_SECONDS, INGRESS_PRODUCE_SECONDS, INGRESS_IN_FLIGHT),
        *(INGRESS_BODY_BYTES, INGRESS_SIGNATURE_FAILURES, INGRESS_ACCEPTING, INGRESS_REFUSED),
        *(SPOOL_RECORDS, SPOOL_BYTES, SPOOL_MAX_BYTES, SPOOL_OLDEST_AGE, SPOOL_SPOOLED, SPOOL_DRAINED),
        *(SPOOL_CORRUPT, SPOOL_WRITE_ERRORS, SPOOL_REFUSED, SPOOL_REFUSED_RECORDS, SPOOL_FSYNC_SECONDS),
    ),
    "worker": _registry(
        *_BOTH,
        *(EVENTS_ROUTED, DUPLICATES_DROPPED, RAW_RECORDS_REREAD, DEDUP_CHANGELOG_GAPS, DEDUP_TABLE_KEYS),
        EVENTS_PROCESSED,
        *(HANDLER_SECONDS, RETRIES, END_TO_END_LAG_SECONDS, CONSUMER_LAG, WORKER_STALLED, REPLAY_EVENTS),
    ),
}
