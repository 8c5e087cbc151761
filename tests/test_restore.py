"""The dedup table's RocksDB files restored from the changelog with librdkafka, then taken over by Faust."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

from confluent_kafka import Producer
from confluent_kafka.admin import NewTopic  # type: ignore[attr-defined]

from sentpipe.kafka import admin_client
from sentpipe.processors.dedup import encode_seen
from sentpipe.processors.restore import restore_dedup_table
from sentpipe.processors.topics import changelog_topic
from sentpipe.processors.worker import create_app
from sentpipe.settings import Settings
from tests.http_tools import metric_sum, scrape
from tests.kafka_tools import end_offsets
from tests.pipeline import start_worker, wait_for


def _key(i: int) -> bytes:
    return hashlib.sha256(i.to_bytes(8, "big")).digest()


def _write(s: Settings, records: list[tuple[bytes, bytes | None]]) -> None:
    # Idempotent, so the log's order is the order written: without it a retried batch can land after a later
    # one on a loaded broker, and the expected final values below would not be the log's.
    p = Producer(
        {
            "bootstrap.servers": s.kafka_bootstrap,
            "partitioner": "murmur2_random",
            "linger.ms": 5,
            "enable.idempotence": True,
        }
    )
    for key, value in records:
        p.produce(changelog_topic(s), value, key)
    assert p.flush(30) == 0


def _store(s: Settings) -> Any:
    app = create_app(s, role="route")
    return app.sentpipe.seen.data  # type: ignore[attr-defined]


def table_files(s: Settings) -> tuple[dict[bytes, bytes], dict[int, int]]:
    """What the RocksDB files hold, read with Faust's own store options: records and persisted offsets."""
    store = _store(s)
    rows: dict[bytes, bytes] = {}
    offsets: dict[int, int] = {}
    for p in range(s.raw_partitions):
        db = store.rocksdb_options.open(store.partition_path(p))
        try:
            for key, value in db.items():
                if key == store.offset_key:
                    offsets[p] = int(value)
                else:
                    rows[key] = value
        finally:
            db.close()
    return rows, offsets


def test_restore_writes_what_faust_would_and_a_warm_restart_reads_only_the_tail(
    settings: Settings, tmp_path: Path
) -> None:
    s = settings.model_copy(update={"table_store": "rocksdb://", "data_dir": tmp_path / "faust"})
    topic = changelog_topic(s)
    admin = admin_client(s)
    spec = NewTopic(topic, s.raw_partitions, 1, config={"cleanup.policy": "compact"})
    admin.create_topics([spec])[topic].result(30)
    now = int(time.time() * 1000)  # inside the dedup window: the router's sweep keeps them
    v1, v2 = encode_seen({"default": now}), encode_seen({"default": now, "acme": now + 1})
    # 3,000 marks, 500 of them later updated, 300 later swept (a tombstone each).
    first = [(_key(i), v1) for i in range(3000)]
    _write(s, first + [(_key(i), v2) for i in range(500)] + [(_key(i), None) for i in range(2700, 3000)])
    expected = {_key(i): (v2 if i < 500 else v1) for i in range(2700)}

    done = restore_dedup_table(s, _store(s))
    assert done is not None and done.records == 3800
    rows, offsets = table_files(s)
    assert rows == expected
    ends = end_offsets(s.kafka_bootstrap, topic)
    assert offsets == {p: end - 1 for p, end in ends.items() if end > 0}

    again = restore_dedup_table(s, _store(s))
    assert again is not None and again.records == 0  # warm: nothing new in the changelog

    _write(s, [(_key(i), v1) for i in range(3000, 3100)] + [(_key(0), None)])
    tail = restore_dedup_table(s, _store(s))
    assert tail is not None and tail.records == 101
    expected.update({_key(i): v1 for i in range(3000, 3100)})
    del expected[_key(0)]
    assert table_files(s)[0] == expected

    # Faust takes the files over: the router is ready with every id, recovering only what it must.
    worker = start_worker(
        s, tmp_path, worker_role="route", table_store="rocksdb://", dedup_sweep_interval_s=1
    )
    try:
        wait_for(
            lambda: metric_sum(scrape(worker.metrics_port), "sentpipe_dedup_table_keys"),
            lambda n: n == len(expected),
            90,
            "the router holding every restored id",
            worker.proc.tail,
        )
    finally:
        worker.stop()
    assert "restoring the dedup table" not in worker.proc.tail(400)  # warm already: nothing to read


def test_restore_leaves_memory_tables_to_faust(settings: Settings) -> None:
    assert restore_dedup_table(settings, _store(settings)) is None
