"""The dedup table stays bounded across restarts, and the worker refuses a table it cannot co-partition."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from sentpipe.processors.dedup import event_id_of, is_compact
from sentpipe.processors.worker import _sweep_keys
from sentpipe.schemas.samples import SampleFactory
from sentpipe.settings import Settings
from tests.http_tools import metric_sum, post_all, scrape
from tests.kafka_tools import end_offsets, read_topic, record_count
from tests.oracle import row_count
from tests.pipeline import start_ingress, start_worker, wait_caught_up, wait_for
from tests.processes import settings_env
from tests.test_restore import table_files

N = 50


def _keys(port: int) -> float:
    return metric_sum(scrape(port), "sentpipe_dedup_table_keys")


@pytest.mark.parametrize("store", ["memory://", "rocksdb://"])
def test_sweep_bounds_the_table_and_tombstones_survive_a_restart(
    settings: Settings, topics, tmp_path: Path, store: str
) -> None:  # type: ignore[no-untyped-def]
    """In memory the table is rebuilt from the changelog at each start; RocksDB keeps it on disk (a warm
    restart reads only the changelog's tail). Both must hold, sweep and forget the same ids."""
    settings = settings.model_copy(update={"table_store": store})
    db = settings.database_url.get_secret_value()
    secret = settings.webhook_secret.get_secret_value()
    bodies = [s.body for s in SampleFactory(31).mix(N)]
    ingress, url, _ = start_ingress(settings, tmp_path)
    # A long window first: every routed id is held, and a restart recovers all of them.
    worker = start_worker(settings, tmp_path, dedup_window_s=3600, dedup_sweep_interval_s=0.5)
    try:
        assert asyncio.run(post_all(f"{url}/webhooks/sent", bodies, secret)).count(200) == N
        wait_for(lambda: row_count(db), lambda n: n >= N, 60, "events projected", worker.proc.tail)
        wait_for(lambda: _keys(worker.metrics_port), lambda n: n == N, 30, "every id held", worker.proc.tail)
        worker.stop()
        # Batched table writes must land where the raw records are: each id's changelog partition is its
        # raw partition (else a rebalance would hand a worker ids it never saw and miss its own).
        raw_at = {
            rec.key: rec.partition for rec in read_topic(settings.kafka_bootstrap, topics.raw, at_least=N)
        }
        changelog = f"{settings.app_id}-dedup-changelog"
        marks = read_topic(settings.kafka_bootstrap, changelog, at_least=N)
        assert len(set(raw_at.values())) > 1  # the check means something only across partitions
        # Sent-shape ids (SHA-256 hex) are marked in compact form, on the partition of their hex form.
        assert {event_id_of(rec.key): rec.partition for rec in marks} == raw_at
        assert any(is_compact(rec.key) for rec in marks)
        if store == "rocksdb://":
            # The router writes its marks with librdkafka, not through the table: it must advance each
            # partition's persisted offset as Faust's callback would, or every warm restart re-reads the log.
            _, persisted = table_files(settings.model_copy(update={"data_dir": tmp_path / "faust"}))
            last = {p: end - 1 for p, end in end_offsets(settings.kafka_bootstrap, changelog).items() if end}
            assert persisted == last

        # A short window: the sweep deletes every id, writing a tombstone per key to the changelog.
        worker = start_worker(settings, tmp_path, dedup_window_s=1, dedup_sweep_interval_s=0.5)
        changelog_topic = f"{settings.app_id}-dedup-changelog"

        def tombstones() -> int:
            marks = read_topic(settings.kafka_bootstrap, changelog_topic)
            return sum(1 for rec in marks if rec.value is None)

        wait_for(tombstones, lambda n: n == N, 90, "a tombstone per swept id", worker.proc.tail)
        assert _keys(worker.metrics_port) == 0
        worker.stop()
        # Each tombstone on its mark's partition, or compaction keeps the mark and a restart brings it back.
        swept = read_topic(settings.kafka_bootstrap, changelog_topic)
        assert {event_id_of(rec.key): rec.partition for rec in swept if rec.value is None} == raw_at
        if store == "rocksdb://":
            _, persisted = table_files(settings.model_copy(update={"data_dir": tmp_path / "faust"}))
            last = {p: end - 1 for p, end in end_offsets(settings.kafka_bootstrap, changelog).items() if end}
            assert persisted == last  # the sweep's writes advance it too

        # Back to a long window: recovery from the compacted changelog must not resurrect swept ids, so
        # an id redelivered after the window is routed again (the idempotent projections absorb it).
        worker = start_worker(settings, tmp_path, dedup_window_s=3600, dedup_sweep_interval_s=0.5)

        def routed() -> int:
            return sum(record_count(settings.kafka_bootstrap, t) for t in topics.routed)

        routed_before = routed()  # the first worker has stopped: nothing more comes from it
        assert asyncio.run(post_all(f"{url}/webhooks/sent", bodies[:5], secret)).count(200) == 5
        wait_caught_up(settings, 60, "late redeliveries processed", worker.proc.tail)
        assert routed() == routed_before + 5  # each routed once more, not less, not twice
        wait_for(lambda: _keys(worker.metrics_port), lambda n: n == 5, 30, "late ids held", worker.proc.tail)
        assert row_count(db) == N
    finally:
        worker.stop()
        ingress.stop()


def test_worker_refuses_when_table_partitions_differ_from_the_raw_topic(
    settings: Settings, tmp_path: Path
) -> None:
    env = settings_env(settings, raw_partitions=settings.raw_partitions + 1, data_dir=tmp_path)
    res = subprocess.run(
        [sys.executable, "-m", "sentpipe", "worker"], env=env, capture_output=True, text=True, timeout=60
    )
    assert res.returncode != 0
    assert "partitions" in res.stderr and "SENTPIPE_RAW_PARTITIONS" in res.stderr
    assert res.stderr.strip().count("\n") == 0 and "Traceback" not in res.stderr


class _RocksLike:
    """Faust's RocksDB store, as far as the sweep walks it: a dict of databases per active partition."""

    def __init__(self) -> None:
        self._dbs: dict[int, list[bytes]] = {0: [b"a", b"b"], 1: [b"c", b"d"]}

    def _dbs_for_actives(self) -> Iterator[list[bytes]]:
        yield from self._dbs.values()  # Faust walks `self._dbs.items()` the same way

    def _visible_keys(self, db: list[bytes]) -> Iterator[bytes]:
        yield from db


def test_a_sweep_of_rocksdb_survives_a_rebalance_that_opens_a_database_mid_walk() -> None:
    """Faust's own key iterator walked the dict of databases across the sweep's awaits: a rebalance that
    opened one meanwhile ended the worker ("dictionary changed size during iteration", scale audit)."""
    rocks = _RocksLike()
    table = SimpleNamespace(data=rocks, keys=lambda: (k for db in rocks._dbs_for_actives() for k in db))
    seen = []
    for key in _sweep_keys(None, table):
        seen.append(key)
        if len(seen) == 1:
            rocks._dbs[2] = [b"e"]  # assigned while the sweep waits for its changelog writes
    assert seen == [
        b"a",
        b"b",
        b"c",
        b"d",
    ]  # the walk's list was taken first; the newcomer waits for the next
