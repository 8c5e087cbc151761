"""The progress watchdog: pure bookkeeping with a fake clock, then a real worker that stalls and says so."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import orjson
import pytest
from confluent_kafka import Producer

from sentpipe.broker import Partition
from sentpipe.processors.watchdog import RecoveryHold, Watchdog
from sentpipe.schemas import routing as r
from sentpipe.schemas.samples import SampleFactory
from sentpipe.schemas.topics import Topics
from sentpipe.settings import Settings
from tests.pipeline import start_worker, wait_until
from tests.processes import free_port

P0: Partition = ("t", 0)
P1: Partition = ("t", 1)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_work_waiting_without_progress_is_a_stall_after_the_limit() -> None:
    clock = Clock()
    w = Watchdog("project", 60, clock)
    w.lag({P0: 5, P1: 0})
    clock.now += 59
    assert w.stalls() == []
    clock.now += 2
    (stall,) = w.stalls()
    assert (stall.topic, stall.partition, stall.lag) == ("t", 0, 5)
    assert "t[0] stuck at start with 5 records waiting" in str(stall)


def test_a_stall_names_where_records_wait_before_the_first_progress_without_moving_the_clock() -> None:
    clock = Clock()
    w = Watchdog("project", 60, clock)
    w.lag({P0: 5, P1: 3})
    clock.now += 30
    w.waiting_at({P0: 4927})  # a batch in hand, or the committed offset
    clock.now += 31
    stalls = {str(s).split(" with ")[0] for s in w.stalls()}
    assert stalls == {"project: t[0] stuck at offset 4927", "project: t[1] stuck at start"}
    w.progress({P0: 4930})
    w.waiting_at({P0: 4927})  # known progress is not taken back
    clock.now += 61
    assert "t[0] stuck at offset 4930" in str(w.stalls()[0])


def test_progress_resets_the_clock_and_no_lag_is_never_a_stall() -> None:
    clock = Clock()
    w = Watchdog("route", 10, clock)
    w.lag({P0: 100})
    for _ in range(5):
        clock.now += 8
        w.progress({P0: int(clock.now)})
        assert w.stalls() == []
    w.lag({P0: 0})
    clock.now += 1000
    assert w.stalls() == []
    w.lag({P0: 3})  # new work: the clock starts when it appears, not at the last progress
    clock.now += 9
    assert w.stalls() == []
    clock.now += 2
    assert [s.offset for s in w.stalls()] == [int(clock.now - 1000 - 11)]


def test_partitions_that_moved_away_are_forgotten() -> None:
    clock = Clock()
    w = Watchdog("project", 1, clock)
    w.lag({P0: 1, P1: 1})
    clock.now += 5
    assert len(w.stalls()) == 2
    w.lag({P1: 1})
    assert [s.partition for s in w.stalls()] == [1]


def test_a_recovery_holds_the_clocks_for_at_most_its_limit() -> None:
    """Faust pauses the router while the table recovers after a rebalance: not a stall, for a while."""
    clock = Clock()
    w, hold = Watchdog("route", 60, clock), RecoveryHold(600, clock)
    w.lag({P0: 5})
    for _ in range(100):  # 500 s of recovery, checked every 5 s as the router does
        clock.now += 5
        if hold.holds(recovering=True):
            w.hold()
        assert w.stalls() == []
    for _ in range(40):  # past the limit (600 s): the clocks run again, and 60 s later it is a stall
        clock.now += 5
        if hold.holds(recovering=True):
            w.hold()
    assert [s.partition for s in w.stalls()] == [0]
    assert not hold.holds(recovering=False)
    assert hold.holds(recovering=True)  # the next recovery gets its own limit
    w.hold()
    assert w.stalls() == []
    clock.now += 61
    assert [s.for_s for s in w.stalls()] == [61]


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.mark.parametrize("role", ["project", "all"])
def test_a_projector_that_cannot_move_fails_liveness_and_logs_the_partition(
    settings: Settings, tmp_path: Path, role: str
) -> None:
    """The database is unreachable: the stage retries forever, so the watchdog must say it is stuck. In role
    `all` the projector is a child process: the worker's own probe and scrape must say it."""
    dead_db = f"postgresql://postgres@127.0.0.1:{free_port()}/sentpipe?connect_timeout=1"
    worker = start_worker(
        settings, tmp_path, worker_role=role, database_url=dead_db, stall_after_s=3, retry_max_s=1
    )
    try:
        assert _get(f"http://127.0.0.1:{worker.metrics_port}/livez")[0] == 200
        topics = settings.topic_prefix
        producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
        for sample in (SampleFactory(5).message_status(f"m{i}", "delivered") for i in range(5)):
            routed = r.route(
                None,
                sample.body,
                {},
                topics=Topics(topics),
                id_source="auto",
                default_tenant="default",
                record_timestamp_ms=0,
            )
            producer.produce(routed.topic, routed.value, routed.key)
        assert producer.flush(10) == 0

        def live_fails() -> bool:
            return _get(f"http://127.0.0.1:{worker.metrics_port}/livez")[0] == 503

        wait_until(live_fails, 60, "liveness to fail", worker.proc.tail)
        status, body = _get(f"http://127.0.0.1:{worker.metrics_port}/livez")
        assert status == 503
        stalls = orjson.loads(body)["stalls"]
        assert any("project:" in s and f"{topics}message.status[" in s for s in stalls), stalls
        metrics = _get(f"http://127.0.0.1:{worker.metrics_port}/metrics")[1].decode()
        assert 'sentpipe_worker_stalled{stage="project"} 1.0' in metrics
        wait_until(lambda: "worker stalled: project:" in worker.proc.tail(200), 30, "the stall logged")
    finally:
        worker.stop()
