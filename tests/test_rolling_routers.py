"""A rolling restart of the routers under load, as Kubernetes does one: every id they routed stays known.

Three routers (role `route`) share the raw topic while events arrive at a steady pace; each is stopped with
SIGTERM and replaced in turn, then the group is scaled back to one. Every event is then delivered again:
the dedup table must drop every copy. A router that joins keeps standby copies of its peers' table
partitions, and one of them becomes its own at the next rebalance, so a standby copy missing marks lets
their duplicates through (processors/faust_recovery.py). Nor may the roll drop raw records out of the
stream's delivery: the router reads such holes back, but logs an error and raises an alert for each.
"""

from __future__ import annotations

import collections
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from sentpipe.schemas.events import frame
from sentpipe.schemas.topics import Topics
from sentpipe.settings import Settings
from tests.kafka_tools import delete_topics, end_offsets, group_offsets, read_topic
from tests.pipeline import own_topics, ready_topics, wait_caught_up, wait_for, worker_env
from tests.processes import Proc
from tests.test_chaos_worker import RawFeed
from tests.test_pipeline_e2e import deliveries

UNIQUE = 10000
PER_S = 200.0
ROUTERS = (1, 2, 3)
# The router's two ways of reading back raw records the stream dropped, each counted by the
# SentpipeRawRecordsReread alert: a hole before the next record delivered, and a partition whose position
# went past records never delivered (processors/faust_transport.py).
REREAD = ("raw records skipped by the stream", "raw records fetched but never routed")
GAP = "never reached this copy"  # the dedup store's warning of changelog records a copy never got


class Routers:
    def __init__(self, s: Settings, log_dir: Path) -> None:
        self.s, self.log_dir = s, log_dir
        self.procs: dict[int, Proc] = {}
        self.stopped: list[Proc] = []
        self._starts = 0
        self.table_store = "memory://"

    def start(self, instance: int) -> None:
        """Starts a router and waits until its /readyz says so (the table restored, the group joined): a
        rolling update moves on only then."""
        self._starts += 1
        env = worker_env(self.s, self.log_dir, instance, worker_role="route", table_store=self.table_store)
        proc = Proc(["worker"], env, self.log_dir / f"router-{instance}-{self._starts}.log").start()
        self.procs[instance] = proc
        url = f"http://127.0.0.1:{env['SENTPIPE_WORKER_METRICS_PORT']}/readyz"
        proc.wait_http(url, timeout=120)

    def stop(self, instance: int) -> None:
        proc = self.procs.pop(instance)
        assert proc.stop(signal.SIGTERM, 60) == 0, proc.tail()
        self.stopped.append(proc)

    def tails(self) -> str:
        return "\n".join(f"--- {p.log.name}\n{p.tail(30)}" for p in [*self.stopped, *self.procs.values()])

    def reread(self) -> list[str]:
        """The routers' lines for records Faust's stream dropped at a rebalance, read back by the router."""
        logs = [p.log for p in [*self.stopped, *self.procs.values()]]
        return [line for log in logs for line in log.read_text().splitlines() if _reread(line)]

    def changelog_gaps(self) -> list[str]:
        """The store's warnings of changelog records a standby copy never got (processors/changelog_gaps.py).
        The test's changelog is never compacted (its segments never roll), so each one is a record dropped."""
        logs = [p.log for p in [*self.stopped, *self.procs.values()]]
        return [line for log in logs for line in log.read_text().splitlines() if GAP in line]

    def stop_all(self) -> None:
        for proc in self.procs.values():
            proc.stop()


def _reread(line: str) -> bool:
    return any(what in line for what in REREAD)


@pytest.fixture
def routers(settings: Settings, tmp_path: Path) -> Iterator[tuple[Settings, Routers]]:
    s = own_topics(settings, "roll")
    group = Routers(s, tmp_path)
    try:
        yield s, group
    finally:
        group.stop_all()
        delete_topics(s.kafka_bootstrap, [], [s.app_id], timeout=5)


def _routed_everything(s: Settings) -> bool:
    raw = Topics(s.topic_prefix).raw
    committed = group_offsets(s.kafka_bootstrap, s.app_id, [raw])
    return all(committed.get((raw, p), 0) >= end for p, end in end_offsets(s.kafka_bootstrap, raw).items())


def _committed_everywhere(s: Settings) -> bool:
    raw = Topics(s.topic_prefix).raw
    committed = group_offsets(s.kafka_bootstrap, s.app_id, [raw])
    return sum(1 for p in range(s.raw_partitions) if committed.get((raw, p), 0) > 0) == s.raw_partitions


def _routed_per_id(s: Settings) -> collections.Counter[str]:
    topics = Topics(s.topic_prefix)
    counts: collections.Counter[str] = collections.Counter()
    for topic in (*topics.routed, topics.unrouted):
        for rec in read_topic(s.kafka_bootstrap, topic, timeout=60):
            counts[orjson.loads(rec.value)["id"]] += 1
    return counts


@pytest.mark.timeout(600)
# RocksDB is the Helm chart's store: a restarted router finds its files (and offsets) where it left them.
@pytest.mark.parametrize("table_store", ["memory://", "rocksdb://"])
def test_a_rolling_restart_of_the_routers_under_load_keeps_every_mark(
    routers: tuple[Settings, Routers], table_store: str
) -> None:
    s, group = routers
    group.table_store = table_store
    unique, _ = deliveries(UNIQUE, 0.0, seed=45)
    feed = RawFeed(s, unique, preload=0, per_s=PER_S).start()
    try:
        group.start(1)
        # A group that has run a while: each partition committed. One without a commit is where aiokafka's
        # seek does nothing and Faust may still start it past its first records (the router reads those
        # back); the roll below is the routine case, which must leave no hole.
        wait_for(lambda: _committed_everywhere(s), bool, 120, "the first router committed", group.tails)
        for i in ROUTERS[1:]:  # scaled up
            group.start(i)
            time.sleep(3)
        for i in ROUTERS:  # rolled, one at a time
            group.stop(i)
            group.start(i)
            time.sleep(3)
        for i in ROUTERS[1:]:  # scaled down
            group.stop(i)
        feed.wait(180)
    finally:
        feed.stop()
    wait_for(lambda: _routed_everything(s), bool, 180, "the router caught up", group.tails)

    again = RawFeed(s, unique, preload=len(unique), per_s=PER_S).start()
    try:
        again.wait(120)
    finally:
        again.stop()
    wait_for(lambda: _routed_everything(s), bool, 180, "the copies read", group.tails)

    counts = _routed_per_id(s)
    ids = [frame(body, webhook_id=None).event_id for body in unique]
    missing = [i for i in ids if counts[i] == 0]
    twice = [i for i in ids if counts[i] > 1]
    assert not missing, f"{len(missing)} event(s) never routed, e.g. {missing[:3]}"
    assert not twice, f"{len(twice)} of {len(ids)} events routed twice, e.g. {twice[:3]}\n{group.tails()}"
    # A routine roll is no incident: no standby copy of the table missed changelog records (the store had
    # to distrust it), and the stream delivered every raw record, none had to be read back
    # (processors/faust_recovery.py, processors/faust_transport.py).
    gaps = group.changelog_gaps()
    assert not gaps, f"{len(gaps)} changelog gap(s) in a standby copy:\n" + "\n".join(gaps[:5])
    reread = group.reread()
    assert not reread, f"{len(reread)} hole(s) in the stream's delivery:\n" + "\n".join(reread[:5])


def test_a_worker_of_another_app_id_beside_running_workers_refuses_to_start(
    settings: Settings, tmp_path: Path
) -> None:
    """Its own groups would read every raw and routed record from the start, with a dedup table of their
    own: every event routed and handled a second time. It says so in one line instead."""
    s = settings.model_copy(update={"app_id": f"{settings.app_id}-run"})
    ready_topics(s)
    env = worker_env(s, tmp_path, 1)
    running = Proc(["worker"], env, tmp_path / "running.log").start()
    try:
        running.wait_http(f"http://127.0.0.1:{env['SENTPIPE_WORKER_METRICS_PORT']}/readyz", timeout=120)
        unique, _ = deliveries(50, 0.0, seed=46)
        RawFeed(s, unique, preload=len(unique), per_s=PER_S).start().wait(60)
        wait_caught_up(s, 120, "the running worker routed and projected", running.tail)
        other = s.model_copy(update={"app_id": f"{settings.app_id}-other"})
        for role, group in (("route", s.app_id), ("project", f"{s.app_id}-projections")):
            proc = Proc(["worker", "--role", role], worker_env(other, tmp_path, 2), tmp_path / f"{role}.log")
            try:
                assert proc.start().p is not None
                assert proc.p.wait(60) == 1, proc.tail()
            finally:
                proc.kill()  # one that started after all
            lines = proc.log.read_text().strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith(f"error: consumer group {group} (1 member(s))"), (
                lines
            )
            assert f"SENTPIPE_APP_ID ({s.app_id})" in lines[0], lines
    finally:
        running.stop()
        delete_topics(s.kafka_bootstrap, [], [s.app_id, f"{s.app_id}-projections"], timeout=5)
