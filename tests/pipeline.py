"""Start the whole pipeline (ingress + worker as processes) for end-to-end tests, and wait on its state."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from confluent_kafka.admin import AdminClient

from sentpipe.processors.topics import ensure_topics
from sentpipe.schemas import routing as r
from sentpipe.schemas.topics import Topics
from sentpipe.settings import Settings
from tests.http_tools import post_all
from tests.kafka_tools import end_offsets, group_offsets, holds_records, wait_topics_ready
from tests.oracle import row_count
from tests.processes import Proc, free_port, settings_env, start_ingress

T = TypeVar("T")

# The receipt time of raw records a test writes itself: after every seeded sample's time (SampleFactory's
# clock starts at 2026-01-01), as no event is received before it happens. A template's status orders its
# events by a time capped at receipt plus 5 minutes: received earlier, they all tied at that cap.
SEEDED_RECEIPT_MS = 1_769_904_000_000


@dataclass
class Worker:
    proc: Proc
    metrics_port: int

    def kill(self) -> None:
        self.proc.kill()

    def stop(self) -> None:
        self.proc.stop()


def worker_env(
    s: Settings, log_dir: Path, instance: int = 0, handler_modules: list[str] | None = None, **extra: object
) -> dict[str, str]:
    """A worker's environment: its own ports and data directory (`instance` tells several apart)."""
    return settings_env(
        s,
        worker_web_port=free_port(),
        worker_metrics_port=free_port(),
        data_dir=log_dir / (f"faust-{instance}" if instance else "faust"),
        handler_modules='["' + '","'.join(handler_modules) + '"]' if handler_modules else "[]",
        dedup_sweep_interval_s=extra.pop("dedup_sweep_interval_s", 60),
        **extra,
    )


def start_worker(
    s: Settings, log_dir: Path, handler_modules: list[str] | None = None, **extra: object
) -> Worker:
    env = worker_env(s, log_dir, 0, handler_modules, **extra)
    mport = int(env["SENTPIPE_WORKER_METRICS_PORT"])
    proc = Proc(["worker"], env, log_dir / f"worker-{mport}.log").start()
    proc.wait_http(f"http://127.0.0.1:{mport}/metrics")
    return Worker(proc, mport)


def wait_for(
    probe: Callable[[], T],
    until: Callable[[T], object],
    timeout: float,
    what: str,
    on_fail: Callable[[], str] = lambda: "",
) -> T:
    """Poll `probe()` until `until(value)` holds; returns that value. On timeout an AssertionError names
    the last value (or, when the last probe raised, that error, chained) and adds `on_fail()`."""
    deadline = time.monotonic() + timeout
    last: object = "<never probed>"
    error: Exception | None = None
    while True:
        try:
            value = probe()
            if until(value):
                return value
            last, error = value, None
        except Exception as exc:  # the database or broker may be down on purpose
            error = exc
        if time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    shown = repr(last)
    shown = shown if len(shown) <= 2000 else shown[:2000] + f"... ({len(shown)} characters)"
    got = f"last error: {error!r}" if error is not None else f"last value: {shown}"
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; {got}\n{on_fail()}") from error


def wait_until(
    cond: Callable[[], object], timeout: float, what: str, on_fail: Callable[[], str] = lambda: ""
) -> None:
    """Poll `cond()` until it is true; on timeout an AssertionError with its last result or error."""
    wait_for(cond, bool, timeout, what, on_fail)


def worker_groups(s: Settings) -> list[str]:
    """The consumer groups of this test's worker(s): the app id and any group named after it."""
    admin = AdminClient({"bootstrap.servers": s.kafka_bootstrap, "log_level": 0})
    listed = admin.list_consumer_groups(request_timeout=10).result()
    return sorted(
        g.group_id for g in listed.valid if g.group_id == s.app_id or g.group_id.startswith(s.app_id + "-")
    )


def lag(s: Settings) -> dict[tuple[str, int], int]:
    """What the worker has not committed yet: (topic, partition) -> records behind the end, only where
    behind. The commits are read before the end offsets, so {} means every raw and routed record that
    existed when the ends were read had been committed before. The worker commits a record only once what
    it wrote for it is acknowledged (routed records, rows, DLQ records), so {} also means all of that is
    in place: what the worker wrote can be read exactly, by the watermarks."""
    committed: dict[tuple[str, int], int] = {}
    topics = Topics(s.topic_prefix)
    for group in worker_groups(s):
        for tp, offset in group_offsets(s.kafka_bootstrap, group, [topics.raw, *topics.routed]).items():
            committed[tp] = max(offset, committed.get(tp, 0))
    behind = {}
    for topic in (topics.raw, *topics.routed):
        for p, end in end_offsets(s.kafka_bootstrap, topic).items():
            at = committed.get((topic, p), 0)
            # Past the last record a redrive's commit marker may be all there is: nothing to commit.
            if at < end and holds_records(s.kafka_bootstrap, topic, p, at, end):
                behind[(topic, p)] = end - at
    return behind


def wait_caught_up(s: Settings, timeout: float, what: str, on_fail: Callable[[], str] = lambda: "") -> None:
    """Wait until the worker has committed every raw and routed record there is."""
    wait_for(lambda: lag(s), lambda behind: not behind, timeout, f"{what} (lag by partition)", on_fail)


__all__ = ["Worker", "lag", "start_ingress", "start_worker", "wait_caught_up", "wait_for", "wait_until"]


def deliver(
    s: Settings, url: str, bodies: list[bytes], worker: Worker, rows: int, timeout: float = 120.0
) -> None:
    """POST every body signed with the settings' secret (each must be answered 200), then wait until the
    worker has projected `rows` rows."""
    import asyncio

    secret = s.webhook_secret.get_secret_value()
    assert asyncio.run(post_all(f"{url}/webhooks/sent", bodies, secret)).count(200) == len(bodies)
    db = s.database_url.get_secret_value()
    wait_for(lambda: row_count(db), lambda n: n >= rows, timeout, "events projected", worker.proc.tail)


def route_as_the_router(body: bytes, topics: Topics, at_ms: int = 1_700_000_000_000) -> r.Routed:
    """`body` routed as the router routes an ingress record of tenant `acme`; the event must be routable."""
    routed = r.route(
        None,
        body,
        {r.H_TENANT: b"acme"},
        topics=topics,
        id_source="auto",
        default_tenant="default",
        record_timestamp_ms=at_ms,
    )
    assert routed.event is not None
    return routed


def ready_topics(s: Settings) -> Topics:
    """The topics of `s` made as `topics ensure` makes them, each partition led (a topic created moments ago
    is listed before its leaders are elected)."""
    ensure_topics(s)
    topics = Topics(s.topic_prefix)
    wait_topics_ready(s.kafka_bootstrap, [topics.raw, *topics.routed, topics.unrouted, topics.dlq])
    return topics


def own_topics(settings: Settings, tag: str, raw_partitions: int = 12) -> Settings:
    """Settings with a prefix and app id of their own (`tag` added to both) and `raw_partitions` raw
    partitions, as `topics ensure` makes them: a rebalance moves several; their topics ready."""
    s = settings.model_copy(
        update={
            "topic_prefix": f"{settings.topic_prefix}{tag}.",
            "app_id": f"{settings.app_id}-{tag}",
            "raw_partitions": raw_partitions,
        }
    )
    ready_topics(s)
    return s
