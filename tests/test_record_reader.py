"""The router's fetch reader reads on past a record whose header name is not UTF-8 (aiokafka raised on every
fetch of that partition: the router stopped there for good). Batches are built with aiokafka's own writer
and one header name's bytes replaced, as another producer can write it."""

from __future__ import annotations

import struct

import pytest
from aiokafka.consumer import fetcher
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.record.util import calc_crc32c
from aiokafka.structs import TopicPartition

from sentpipe.processors.record_reader import FetchedRecords, PartitionRecords, read_v2_batch

READ_UNCOMMITTED = 0


def batch(base: int, names: list[str], *, compression: int = 0, bad: str | None = None) -> bytes:
    """A v2 batch of one record per header name, from offset `base`; `bad`'s last two bytes become
    0xff 0xfe (uncompressed only: the replaced bytes must be on the wire)."""
    b = DefaultRecordBatchBuilder(2, compression, 0, -1, -1, -1, 1_000_000)
    for i, name in enumerate(names):
        b.append(i, timestamp=1_000 + i, key=f"k{base + i}".encode(), value=b"v", headers=[(name, b"h")])
    buf = bytearray(b.build())
    struct.pack_into(">q", buf, 0, base)
    if bad is not None:
        at = buf.index(bad.encode()) + len(bad) - 2
        buf[at : at + 2] = b"\xff\xfe"
        struct.pack_into(">I", buf, 17, calc_crc32c(bytes(buf[21:])))
    return bytes(buf)


def read_all(data: bytes, fetch_offset: int) -> tuple[list[tuple[int, tuple[tuple[str, bytes], ...]]], int]:
    records = PartitionRecords(
        TopicPartition("raw", 0), FetchedRecords(data), [], fetch_offset, None, None, True, READ_UNCOMMITTED
    )
    got = [(rec.offset, rec.headers) for rec in records]
    return got, records.next_fetch_offset


def test_aiokafka_alone_cannot_read_such_a_fetch() -> None:
    """What the fallback is for: the whole partition's fetch fails, good records before the bad one too."""
    data = batch(0, ["a", "b"]) + batch(2, ["ok", "x-AB", "ok"], bad="x-AB")
    records = fetcher.PartitionRecords(
        TopicPartition("raw", 0), MemoryRecords(data), [], 0, None, None, True, READ_UNCOMMITTED
    )
    with pytest.raises(UnicodeDecodeError):
        list(records)


def test_every_record_of_the_fetch_is_read_with_the_bad_name_replaced() -> None:
    data = batch(0, ["a", "b"]) + batch(2, ["ok", "x-AB", "ok"], bad="x-AB") + batch(5, ["c"])
    got, next_offset = read_all(data, 0)
    assert [offset for offset, _ in got] == [0, 1, 2, 3, 4, 5]
    assert got[3][1] == (("x-\ufffd\ufffd", b"h"),)
    assert [headers for _, headers in got[:3]] == [(("a", b"h"),), (("b", b"h"),), (("ok", b"h"),)]
    assert next_offset == 6


def test_records_before_the_fetch_offset_are_not_handed_over_twice() -> None:
    """A fetch starts at its batch's first record; those before the position were read already."""
    data = batch(2, ["ok", "x-AB", "ok"], bad="x-AB") + batch(5, ["c"])
    got, next_offset = read_all(data, 3)
    assert [offset for offset, _ in got] == [3, 4, 5]
    got, _ = read_all(data, 5)
    assert [offset for offset, _ in got] == [5]
    assert next_offset == 6


def test_a_fetch_cut_inside_its_last_batch_stops_before_it() -> None:
    whole = batch(0, ["ok", "x-AB"], bad="x-AB")
    got, next_offset = read_all(whole + batch(2, ["c", "d"])[:30], 0)
    assert [offset for offset, _ in got] == [0, 1] and next_offset == 2


def test_compressed_batches_and_absent_fields_are_read_as_aiokafka_reads_them() -> None:
    for compression in (0, 1):  # none, gzip
        raw = batch(7, ["a", "b", "c"], compression=compression)
        ours = read_v2_batch(raw)
        theirs = list(MemoryRecords(raw).next_batch())
        assert [(r.offset, r.timestamp, r.timestamp_type, r.key, r.value, r.headers) for r in ours] == [
            (r.offset, r.timestamp, r.timestamp_type, r.key, r.value, r.headers) for r in theirs
        ]
    b = DefaultRecordBatchBuilder(2, 0, 0, -1, -1, -1, 1_000_000)
    b.append(0, timestamp=5, key=None, value=None, headers=[("n", None)])
    assert [(r.key, r.value, r.headers) for r in read_v2_batch(bytes(b.build()))] == [
        (None, None, [("n", None)])
    ]


def test_bytes_that_are_not_a_batch_are_refused() -> None:
    raw = bytearray(batch(0, ["a"]))
    raw[16] = 1  # magic 1: no headers, aiokafka reads it
    with pytest.raises(ValueError):
        read_v2_batch(bytes(raw))
    with pytest.raises(ValueError):
        read_v2_batch(batch(0, ["a"])[:-3])
