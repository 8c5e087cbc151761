"""The dedup table restored from the changelog with librdkafka (RocksDB files, or the memory store), then
taken over by Faust; ids marked in hex by the previous version still found."""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from confluent_kafka import Producer
from confluent_kafka.admin import NewTopic  # type: ignore[attr-defined]
from faust.types import TP

from sentpipe.kafka import admin_client
from sentpipe.processors.dedup import decode_seen, encode_seen, partition_of, table_key
from sentpipe.processors.restore import restore_dedup_table
from sentpipe.processors.store import DedupMemoryStore
from sentpipe.processors.topics import changelog_topic
from sentpipe.processors.worker import create_app
from sentpipe.schemas.events import frame
from sentpipe.schemas.samples import SampleFactory
from sentpipe.schemas.topics import Topics
from sentpipe.settings import Settings
from tests.http_tools import metric_sum, post_all, scrape
from tests.kafka_tools import end_offsets, read_topic, record_count
from tests.pipeline import lag, start_ingress, start_worker, wait_caught_up, wait_for


def _key(i: int) -> bytes:
    """A Sent-shape id's table key, as the router writes it (compact)."""
    return table_key(hashlib.sha256(i.to_bytes(8, "big")).hexdigest().encode())


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
        # The router's partition for the key: its hex event id's murmur2 partition, as the raw record's.
        p.produce(changelog_topic(s), value, key, partition=partition_of(key, s.raw_partitions))
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


def _create_changelog(s: Settings) -> str:
    topic = changelog_topic(s)
    spec = NewTopic(topic, s.raw_partitions, 1, config={"cleanup.policy": "compact"})
    admin = admin_client(s)  # held until the result is in: a collected client cancels its requests
    admin.create_topics([spec])[topic].result(30)
    return topic


def _event(key: bytes, value: bytes | None, partition: int, offset: int) -> Any:
    """What Faust's recovery hands a store: the decoded key and value, and the record's position."""
    return SimpleNamespace(
        key=key, value=value, message=SimpleNamespace(partition=partition, offset=offset, value=value)
    )


def _delete_changelog(s: Settings) -> None:
    topic = changelog_topic(s)
    admin = admin_client(s)
    admin.delete_topics([topic], operation_timeout=30)[topic].result(30)
    deadline = time.monotonic() + 60
    while topic in admin.list_topics(timeout=10).topics:  # the broker finishes the deletion after it answers
        assert time.monotonic() < deadline, "the changelog was not deleted"
        time.sleep(0.5)


def _rocksdb_with_marks(settings: Settings, tmp_path: Path, n: int) -> tuple[Settings, str, bytes]:
    """RocksDB settings whose files hold `n` marks restored from a new changelog; the changelog; the value."""
    s = settings.model_copy(update={"table_store": "rocksdb://", "data_dir": tmp_path / "faust"})
    topic = _create_changelog(s)
    v = encode_seen({"default": int(time.time() * 1000)})
    _write(s, [(_key(i), v) for i in range(n)])
    restore_dedup_table(s, _store(s))
    return s, topic, v


def test_rocksdb_files_ahead_of_their_changelog_are_restored_from_it_again(
    settings: Settings, tmp_path: Path
) -> None:
    # The files' offsets (about 500 a partition) are past the recreated changelog's end (about 25): taken
    # as current, none of its marks was read, and Faust's recovery, finding the files ahead of the log,
    # refused to start.
    s, topic, v = _rocksdb_with_marks(settings, tmp_path, 2000)
    _delete_changelog(s)  # and made again, as when Kafka's data is reset and the router's volume kept
    _create_changelog(s)
    _write(s, [(_key(i), v) for i in range(5000, 5100)])

    done = restore_dedup_table(s, _store(s))
    assert done is not None and done.records == 100
    rows, offsets = table_files(s)
    assert rows == {_key(i): v for i in range(5000, 5100)}  # the changelog's marks, and only those
    assert offsets == {p: end - 1 for p, end in end_offsets(s.kafka_bootstrap, topic).items() if end > 0}


def test_rocksdb_files_of_a_deleted_changelog_are_emptied_and_kept_otherwise(
    settings: Settings, tmp_path: Path
) -> None:
    # Gone for good, the changelog leaves the files' marks stale (the next changelog starts at offset 0); a
    # changelog that is there keeps them, whatever else the restore finds.
    s, _, _ = _rocksdb_with_marks(settings, tmp_path, 500)
    assert restore_dedup_table(s, _store(s)) is not None  # again, nothing new: the files are kept
    assert len(table_files(s)[0]) == 500
    _delete_changelog(s)

    done = restore_dedup_table(s, _store(s))
    assert done is not None and done.records == 0
    assert table_files(s) == ({}, {})


def test_a_rocksdb_partition_file_found_corrupt_is_rebuilt_from_the_changelog(
    settings: Settings, tmp_path: Path
) -> None:
    # A damaged file of a partition's (here its MANIFEST, and another's CURRENT gone) ended every start with
    # RocksDB's "Corruption" until someone deleted the directory by hand.
    s, topic, v = _rocksdb_with_marks(settings, tmp_path, 2000)
    store = _store(s)
    for manifest in store.partition_path(0).glob("MANIFEST-*"):
        with manifest.open("r+b") as f:
            f.truncate(10)
    (store.partition_path(1) / "CURRENT").unlink()

    ends = end_offsets(s.kafka_bootstrap, topic)
    done = restore_dedup_table(s, _store(s))
    assert done is not None and done.records == ends[0] + ends[1]  # those two read again, whole
    rows, offsets = table_files(s)
    assert rows == {_key(i): v for i in range(2000)}
    assert offsets == {p: end - 1 for p, end in ends.items() if end > 0}


def test_a_memory_store_ahead_of_its_changelog_forgets_those_partitions_and_restores_them(
    settings: Settings,
) -> None:
    # The memory store's side of the RocksDB test above: restored twice in one process, across a changelog
    # made anew, it keeps none of the old log's marks and reads every one of the new log's.
    s = settings.model_copy(update={"table_store": "memory://"})
    _create_changelog(s)
    v = encode_seen({"default": int(time.time() * 1000)})
    _write(s, [(_key(i), v) for i in range(2000)])
    store = _store(s)
    restore_dedup_table(s, store)
    _delete_changelog(s)
    _create_changelog(s)
    _write(s, [(_key(i), v) for i in range(5000, 5100)])

    done = restore_dedup_table(s, store)
    assert done is not None and done.records == 100
    assert dict(store.data.items()) == {_key(i): v for i in range(5000, 5100)}


def test_the_memory_store_is_restored_reports_its_offsets_and_shares_values(settings: Settings) -> None:
    s = settings.model_copy(update={"table_store": "memory://"})
    topic = _create_changelog(s)
    now = int(time.time() * 1000)
    v1, v2 = encode_seen({"default": now}), encode_seen({"default": now, "acme": now + 1})
    first = [(_key(i), v1) for i in range(3000)]
    _write(s, first + [(_key(i), v2) for i in range(500)] + [(_key(i), None) for i in range(2700, 3000)])
    expected = {_key(i): (v2 if i < 500 else v1) for i in range(2700)}

    app = create_app(s, role="route")
    table = app.sentpipe.seen  # type: ignore[attr-defined]
    store = table.data
    assert isinstance(store, DedupMemoryStore)
    done = restore_dedup_table(s, store)
    assert done is not None and done.records == 3800
    assert dict(store.data.items()) == expected
    # Equal values are one object: a million ids marked in the same second cost one value, not a million.
    assert len({id(v) for v in store.data.values()}) == 2
    # What Faust's recovery asks the table (tables/recovery.py) before reading a changelog partition: it
    # starts there, so it reads nothing of what was restored.
    ends = end_offsets(s.kafka_bootstrap, topic)
    assert {p: table.persisted_offset(TP(topic, p)) for p in ends if ends[p]} == {
        p: end - 1 for p, end in ends.items() if end
    }

    again = restore_dedup_table(s, store)
    assert again is not None and again.records == 0  # up to date: nothing read twice
    _write(s, [(_key(i), v1) for i in range(3000, 3100)] + [(_key(0), None)])
    tail = restore_dedup_table(s, store)
    assert tail is not None and tail.records == 101
    expected.update({_key(i): v1 for i in range(3000, 3100)})
    del expected[_key(0)]
    assert dict(store.data.items()) == expected

    # Faust's recovery of what came later (tombstones included) moves the offsets on; so do the router's
    # own acknowledged writes.
    k = _key(1)
    p = partition_of(k, s.raw_partitions)
    end = end_offsets(s.kafka_bootstrap, topic)[p]
    store.apply_changelog_batch([_event(k, None, p, end), _event(_key(9999), v1, p, end + 1)], bytes, bytes)
    assert k not in store.data and store.data[_key(9999)] == v1
    assert table.persisted_offset(TP(topic, p)) == end + 1
    table.data.set_persisted_offset(TP(topic, p), end + 5)
    assert table.persisted_offset(TP(topic, p)) == end + 5


def test_a_memory_router_restores_its_table_and_faust_reads_none_of_it_again(
    settings: Settings, tmp_path: Path
) -> None:
    s = settings.model_copy(update={"table_store": "memory://"})
    _create_changelog(s)
    now = int(time.time() * 1000)
    v = encode_seen({"default": now})
    _write(s, [(_key(i), v) for i in range(3000)] + [(_key(i), None) for i in range(2500, 3000)])
    worker = start_worker(s, tmp_path, worker_role="route", log_level="INFO", dedup_sweep_interval_s=1)
    try:
        wait_for(
            lambda: metric_sum(scrape(worker.metrics_port), "sentpipe_dedup_table_keys"),
            lambda n: n == 2500,
            90,
            "the router holding every restored id, and none swept",
            worker.proc.tail,
        )
    finally:
        worker.stop()
    log = worker.proc.tail(2000)
    assert "restoring the dedup table" in log  # ours, with librdkafka
    assert "Restoring state from changelog topics" not in log  # Faust found every partition current


def test_a_duplicate_of_an_id_marked_in_hex_by_the_previous_version_is_dropped(
    settings: Settings, tmp_path: Path
) -> None:
    """Tables written before compact keys hold the hex form: the router must look there on a miss."""
    s = settings.model_copy(update={"table_store": "memory://"})
    topics = Topics(s.topic_prefix)
    _create_changelog(s)
    body, other = (sample.body for sample in SampleFactory(5).mix(2))
    hex_id, other_id = (frame(b, webhook_id=None).event_id.encode() for b in (body, other))
    assert table_key(hex_id) != hex_id  # a Sent-shape id: SHA-256 hex of the body
    now = int(time.time() * 1000)
    # The previous version's mark (hex), and this version's (compact), both from before this start.
    _write(
        s,
        [
            (hex_id, encode_seen({s.default_tenant: now})),
            (table_key(other_id), encode_seen({s.default_tenant: now})),
        ],
    )
    ingress, url, _ = start_ingress(s, tmp_path)
    worker = start_worker(s, tmp_path, worker_role="route")
    try:
        secret = s.webhook_secret.get_secret_value()
        assert asyncio.run(post_all(f"{url}/webhooks/sent", [body, other], secret)) == [200, 200]
        wait_caught_up(s, 60, "the redeliveries processed", worker.proc.tail)
        dropped = metric_sum(scrape(worker.metrics_port), "sentpipe_duplicates_dropped_total")
        assert sum(record_count(s.kafka_bootstrap, t) for t in topics.routed) == 0
        assert dropped == 2
    finally:
        worker.stop()
        ingress.stop()
    # The mark moved to the compact key (with its first-routed time), and the hex key was tombstoned.
    marks = read_topic(s.kafka_bootstrap, changelog_topic(s), at_least=4)
    last = {rec.key: rec.value for rec in marks}
    assert last[hex_id] is None
    assert s.default_tenant in decode_seen(last[table_key(hex_id)])


def _raw_held(port: int, raw: str) -> set[int]:
    """The raw partitions a router holds now (its lag series lists only those)."""
    try:
        samples = scrape(port)
    except OSError:
        return set()
    held = set()
    for name in samples:
        if name.startswith("sentpipe_consumer_lag{"):
            # Only work waiting: not the changelog a recovery reads, nor Faust's assignor topic.
            assert f'topic="{raw}"' in name, name
            held.add(int(name.split('partition="', 1)[1].split('"', 1)[0]))
    return held


def test_memory_routers_drop_every_duplicate_across_rebalances(settings: Settings, tmp_path: Path) -> None:
    """A second router restores the table and takes half the partitions; the first drops those (no
    standbys) with their offsets, and must read them again from the beginning when they come back."""
    s = settings.model_copy(update={"table_store": "memory://", "table_standby_replicas": 0})
    topics = Topics(s.topic_prefix)
    secret = s.webhook_secret.get_secret_value()
    bodies = [sample.body for sample in SampleFactory(41).mix(40)]
    ingress, url, _ = start_ingress(s, tmp_path)
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
    first = start_worker(s, tmp_path / "a", worker_role="route", log_level="INFO")
    second = None
    try:

        def routed() -> int:
            return sum(record_count(s.kafka_bootstrap, t) for t in topics.routed)

        def raw_done(what: str, on_fail: Any) -> None:
            # Route-only routers: the routed topics wait for a projector; only the raw topic must drain.
            behind = lambda: {tp: n for tp, n in lag(s).items() if tp[0] == topics.raw}  # noqa: E731
            wait_for(behind, lambda b: not b, 90, what, on_fail)

        def dropped(*workers: Any) -> float:
            return sum(
                metric_sum(scrape(w.metrics_port), "sentpipe_duplicates_dropped_total") for w in workers
            )

        assert asyncio.run(post_all(f"{url}/webhooks/sent", bodies, secret)).count(200) == len(bodies)
        raw_done("first deliveries routed", first.proc.tail)
        assert routed() == len(bodies)

        second = start_worker(s, tmp_path / "b", worker_role="route", log_level="INFO")
        a, b = first, second
        wait_for(
            lambda: (_raw_held(a.metrics_port, topics.raw), _raw_held(b.metrics_port, topics.raw)),
            lambda held: held[0] and held[1] and not held[0] & held[1] and len(held[0] | held[1]) == 4,
            90,
            "the raw partitions split between the routers",
            lambda: first.proc.tail() + second.proc.tail(),  # type: ignore[union-attr]
        )
        # A few only: the rest are marked nowhere but in the changelog before the rebalance (a router
        # rewrites the mark of a duplicate it drops), which is what the first router must read again.
        few = bodies[:10]
        assert asyncio.run(post_all(f"{url}/webhooks/sent", few, secret)).count(200) == len(few)
        raw_done("redeliveries processed by two routers", second.proc.tail)
        assert routed() == len(bodies)
        assert dropped(first, second) == len(few)

        second.stop()
        second = None
        wait_for(
            lambda: _raw_held(a.metrics_port, topics.raw),
            lambda held: len(held) == 4,
            90,
            "the first router holding every raw partition again",
            first.proc.tail,
        )
        assert asyncio.run(post_all(f"{url}/webhooks/sent", bodies, secret)).count(200) == len(bodies)
        raw_done("redeliveries processed by the first router alone", first.proc.tail)
        assert routed() == len(bodies)  # the partitions it had dropped were read again, from the start
    finally:
        if second is not None:
            second.stop()
        first.stop()
        ingress.stop()
