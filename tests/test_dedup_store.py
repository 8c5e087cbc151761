"""The dedup table's memory store (processors/store.py): a mapping like a dict, walks that tolerate
changes, and partitions dropped together with their offsets."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest
from faust.types import TP
from hypothesis import given
from hypothesis import strategies as st

from sentpipe import metrics as m
from sentpipe.processors.dedup import partition_of, table_key
from sentpipe.processors.rocks_store import DedupRocksStore
from sentpipe.processors.store import DedupMemoryStore, Shards
from sentpipe.processors.worker import create_app
from sentpipe.settings import Settings

KEYS = st.one_of(
    st.binary(min_size=32, max_size=32).map(lambda b: table_key(b.hex().encode())),  # compact
    st.binary(min_size=1, max_size=40).filter(lambda b: b[:1] != b"\x00"),  # text ids
    st.just(b"\x00" * 33),  # compact, all zero: the smallest int
)
OPS = st.lists(st.tuples(st.sampled_from(["set", "del", "get"]), KEYS, st.binary(max_size=20)), max_size=200)


@given(OPS)
def test_shards_behave_like_a_dict(ops: list[tuple[str, bytes, bytes]]) -> None:
    shards, model = Shards(), {}
    for op, key, value in ops:
        if op == "set":
            shards[key] = value
            model[key] = value
        elif op == "del":
            shards.discard(key)
            model.pop(key, None)
        assert shards.get(key) == model.get(key)
        assert (key in shards) == (key in model)
    assert len(shards) == len(model)
    assert dict(shards.items()) == model
    assert sorted(shards.walk()) == sorted(model)


def test_a_walk_yields_every_key_that_stays_once_while_keys_come_and_go() -> None:
    shards = Shards()
    keys = [table_key(hashlib.sha256(str(i).encode()).hexdigest().encode()) for i in range(5000)]
    for k in keys:
        shards[k] = b"v"
    seen = []
    for i, k in enumerate(shards.walk()):
        seen.append(k)
        shards.discard(k)  # the sweep deletes as it goes
        shards[b"new-%d" % i] = b"v"  # the router marks new ids meanwhile
    assert sorted(k for k in seen if k in set(keys)) == sorted(keys)


def _store() -> tuple[DedupMemoryStore, str]:
    s = Settings(kafka_bootstrap="127.0.0.1:1", raw_partitions=4, table_store="memory://")
    table = create_app(s, role="route").sentpipe.seen  # type: ignore[attr-defined]
    store = table.data
    assert isinstance(store, DedupMemoryStore)
    return store, table.changelog_topic.get_topic_name()


def test_partitions_left_behind_are_dropped_with_their_offsets_and_the_rest_kept() -> None:
    store, topic = _store()
    keys = [table_key(hashlib.sha256(str(i).encode()).hexdigest().encode()) for i in range(400)]
    by_partition: dict[int, list[bytes]] = {}
    for k in keys:
        by_partition.setdefault(partition_of(k, 4), []).append(k)
    for p, ks in by_partition.items():
        store.restore_batch(p, [(k, b"v") for k in ks], last=len(ks) - 1)
    active, standby = {TP(topic, 0)}, {TP(topic, 1)}
    asyncio.run(store.on_recovery_completed(active, standby))
    assert set(store.data) == set(by_partition[0] + by_partition[1])
    # Gone with its keys: the next assignment of partitions 2 and 3 reads them from the beginning.
    assert store.persisted_offset(TP(topic, 2)) is None and store.persisted_offset(TP(topic, 3)) is None
    assert store.persisted_offset(TP(topic, 0)) == len(by_partition[0]) - 1

    store.reset_state()
    assert not store.data and store.persisted_offset(TP(topic, 0)) is None


def test_a_partition_faust_asks_for_while_the_drop_is_walking_is_kept_whole() -> None:
    # A new assignment's recovery reads the offset to start from: its keys must all still be there.
    store, topic = _store()
    keys = [table_key(hashlib.sha256(str(i).encode()).hexdigest().encode()) for i in range(400)]
    for k in keys:
        store.restore_batch(partition_of(k, 4), [(k, b"v")], last=0)

    async def rebalance_meanwhile() -> None:
        drop = asyncio.ensure_future(store.on_recovery_completed({TP(topic, 0)}, set()))
        await asyncio.sleep(0)  # the walk has started and yielded
        assert store.persisted_offset(TP(topic, 2)) == 0
        await drop

    asyncio.run(rebalance_meanwhile())
    held = {partition_of(k, 4) for k in store.data}
    assert held == {0, 2}
    assert store.persisted_offset(TP(topic, 2)) == 0 and store.persisted_offset(TP(topic, 3)) is None


def test_a_late_write_to_a_dropped_partition_gives_it_no_offset() -> None:
    """A batch that settles after its partition was revoked and dropped: with an offset from that write, the
    next assignment's recovery would start there, the partition's earlier marks missing."""
    store, topic = _store()
    for p in range(4):
        store.restore_batch(p, [], last=99)
    asyncio.run(store.on_recovery_completed({TP(topic, 0)}, set()))
    store.set_persisted_offset(TP(topic, 2), 120)  # the late acknowledgement
    assert store.persisted_offset(TP(topic, 2)) is None  # reassigned: read from the beginning
    store.set_persisted_offset(TP(topic, 2), 130)  # ours again: the router's writes count
    assert store.persisted_offset(TP(topic, 2)) == 130
    store.set_persisted_offset(TP(topic, 0), 140)
    assert store.persisted_offset(TP(topic, 0)) == 140


class _Msg:
    def __init__(self, key: bytes, partition: int, offset: int, value: bytes | None) -> None:
        self.key, self.partition, self.offset, self.value = key, partition, offset, value
        self.tp = TP("changelog", partition)


class _Event:
    def __init__(self, key: bytes, partition: int, offset: int) -> None:
        self.key, self.value, self.message = key, b"v", _Msg(key, partition, offset, b"v")


def test_a_copy_whose_changelog_skipped_offsets_stops_vouching_for_the_partition() -> None:
    """A standby copy applied offsets 0..826 of a partition, then 828..854: its consumer had dropped 827 at a
    rebalance. Its offset said 854, so when the partition became the router's own, recovery started there
    and the id marked at 827 was routed again. Now the copy's offset is forgotten until the next assignment,
    which reads the partition from the beginning; a batch without a gap, or a record read again, is none."""
    store, topic = _store()
    ident = lambda x: x  # noqa: E731
    store.restore_batch(2, [], last=826)
    store.apply_changelog_batch([_Event(b"a", 2, 826), _Event(b"b", 2, 827)], ident, ident)  # 826 read again
    assert store.persisted_offset(TP(topic, 2)) == 827
    gaps = m.DEDUP_CHANGELOG_GAPS._value.get()
    store.apply_changelog_batch([_Event(b"c", 2, 829), _Event(b"d", 2, 830)], ident, ident)  # 828 never came
    store.set_persisted_offset(TP(topic, 2), 831)  # nor does an acknowledged write of the router's vouch
    assert m.DEDUP_CHANGELOG_GAPS._value.get() == gaps + 1  # sentpipe_dedup_changelog_gaps_total
    assert store.data.get(b"d") == b"v"  # what came is kept
    assert store.persisted_offset(TP(topic, 2)) is None  # the next assignment reads from the beginning
    store.apply_changelog_batch([_Event(b"a", 2, 0), _Event(b"e", 2, 1)], ident, ident)
    assert store.persisted_offset(TP(topic, 2)) == 1  # read again from the start: vouched for again


def test_a_copy_read_from_the_beginning_takes_compacted_offsets_for_no_gap(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Read from the beginning, a compacted changelog skips the offsets of every record a later one with its
    key replaced. Taken for dropped records, each such read warned and vouched for nothing, so every later
    assignment read the whole partition again. A copy that follows on from an offset is still checked."""
    store, topic = _store()
    ident = lambda x: x  # noqa: E731
    assert store.persisted_offset(TP(topic, 3)) is None  # an assignment with nothing held: from the start
    store.apply_changelog_batch([_Event(b"a", 3, 0), _Event(b"b", 3, 4), _Event(b"c", 3, 9)], ident, ident)
    store.apply_changelog_batch([_Event(b"d", 3, 12)], ident, ident)
    assert "never reached" not in caplog.text
    assert store.persisted_offset(TP(topic, 3)) == 12  # the next assignment reads on from there
    store.apply_changelog_batch([_Event(b"e", 3, 13), _Event(b"f", 3, 15)], ident, ident)  # 14 never came
    assert "offsets 14..14 never reached" in caplog.text
    assert store.persisted_offset(TP(topic, 3)) is None


def test_a_rocksdb_copy_whose_changelog_skipped_offsets_stops_vouching_for_the_partition(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Faust's RocksDB store (the Helm chart's default) moved its offset over the same gap as the memory
    store did, and kept it in the partition's file. Now the file forgets it, so a restart restores the
    partition whole too; a copy read from the beginning takes compaction's gaps for none."""
    s = Settings(kafka_bootstrap="127.0.0.1:1", raw_partitions=4, table_store="rocksdb://", data_dir=tmp_path)
    table = create_app(s, role="route").sentpipe.seen  # type: ignore[attr-defined]
    store = table.data
    assert isinstance(store, DedupRocksStore)
    tp = TP(table.changelog_topic.get_topic_name(), 2)
    ident = lambda x: x  # noqa: E731
    store.set_persisted_offset(tp, 826)  # where a restore left the file
    assert store.persisted_offset(tp) == 826
    store.apply_changelog_batch([_Event(b"a", 2, 826), _Event(b"b", 2, 827)], ident, ident)
    assert store.persisted_offset(tp) == 827
    store.apply_changelog_batch([_Event(b"c", 2, 829), _Event(b"d", 2, 830)], ident, ident)  # 828 never came
    store.set_persisted_offset(tp, 831)  # nor does an acknowledged write of the router's vouch
    assert "offsets 828..828 never reached" in caplog.text
    assert store._db_for_partition(2).get(b"d") == b"v"  # what came is kept
    assert store.restored_offset(2) is None  # in the file too: a restart's restore reads it whole
    assert store.persisted_offset(tp) is None  # the next assignment reads from the beginning
    caplog.clear()
    store.apply_changelog_batch([_Event(b"a", 2, 0), _Event(b"e", 2, 4), _Event(b"f", 2, 9)], ident, ident)
    assert "never reached" not in caplog.text  # compacted offsets
    assert store.persisted_offset(tp) == 9
