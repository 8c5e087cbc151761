"""aiokafka's reader of fetched records, made to read a record whose header name is not UTF-8.

aiokafka decodes header names strictly (its C reader and its Python one): one record a foreign producer
wrote with such a name raised UnicodeDecodeError on every fetch of its partition, the records before it in
the fetch included, and the router stopped there for good. Here the fetcher keeps each partition's fetched
bytes; when aiokafka's reader fails that way, the rest of the fetch is read again batch by batch, and only
a batch aiokafka cannot read is read by the v2 record format here, its header names decoded with
replacement characters. The record is then routed (or dead-lettered) like any other, and a warning names
it. Nothing changes for fetches aiokafka reads.

Only the fetcher's two module names are replaced (`install`), and only for read_uncommitted consumers (the
router's and its table's): the fallback does not follow aborted transactions, so a read_committed consumer
keeps aiokafka's error.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from aiokafka import codec
from aiokafka.consumer import fetcher
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.record.util import decode_varint

log = logging.getLogger("sentpipe.worker")

# A v2 record batch: the fields read here, by offset (Kafka's RecordBatch layout).
_BATCH_HEAD = struct.Struct(">qi")  # base offset, length of the rest
_LOG_OVERHEAD = 12
_MAGIC_AT = 16
_ATTRIBUTES = struct.Struct(">hiqq")  # attributes, last offset delta, base timestamp, max timestamp, at 21
_RECORDS_AT = 61
_CODEC_MASK = 0x07
_LOG_APPEND_TIME = 0x08
_DECOMPRESS = {1: codec.gzip_decode, 2: codec.snappy_decode, 3: codec.lz4_decode, 4: codec.zstd_decode}


@dataclass(frozen=True, slots=True)
class Record:
    """One record as aiokafka's reader gives it (what `PartitionRecords._consumer_record` reads)."""

    offset: int
    timestamp: int
    timestamp_type: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]]
    checksum: None = None


def read_v2_batch(batch: bytes) -> list[Record]:
    """The records of one v2 batch (`batch` is the whole batch); header names that are not UTF-8 are read
    with replacement characters. Raises ValueError when the bytes are not a v2 batch."""
    if len(batch) < _RECORDS_AT or batch[_MAGIC_AT] != 2:
        raise ValueError("not a v2 record batch")
    base_offset, _ = _BATCH_HEAD.unpack_from(batch)
    attributes, _, base_ts, max_ts = _ATTRIBUTES.unpack_from(batch, 21)
    count = struct.unpack_from(">i", batch, 57)[0]
    data: bytes = batch[_RECORDS_AT:]
    codec_id = attributes & _CODEC_MASK
    if codec_id:
        if codec_id not in _DECOMPRESS:
            raise ValueError(f"unknown compression {codec_id}")
        data = _DECOMPRESS[codec_id](data)
    try:
        return _read_records(bytearray(data), base_offset, count, attributes, base_ts, max_ts)
    except IndexError as exc:  # a varint past the end
        raise ValueError("a record runs past the end of its batch") from exc


def _read_records(
    buf: bytearray, base_offset: int, count: int, attributes: int, base_ts: int, max_ts: int
) -> list[Record]:
    ts_type = 1 if attributes & _LOG_APPEND_TIME else 0
    out: list[Record] = []
    pos = 0
    for _ in range(count):
        length, pos = decode_varint(buf, pos)
        end = pos + length
        pos += 1  # record attributes: none are defined
        ts_delta, pos = decode_varint(buf, pos)
        offset_delta, pos = decode_varint(buf, pos)
        key, pos = _read_bytes(buf, pos)
        value, pos = _read_bytes(buf, pos)
        n_headers, pos = decode_varint(buf, pos)
        headers: list[tuple[str, bytes | None]] = []
        for _ in range(n_headers):
            name, pos = _read_bytes(buf, pos)
            header_value, pos = _read_bytes(buf, pos)
            headers.append(((name or b"").decode("utf-8", errors="replace"), header_value))
        if pos != end:
            raise ValueError("record length does not match its fields")
        timestamp = max_ts if ts_type else base_ts + ts_delta
        out.append(Record(base_offset + offset_delta, timestamp, ts_type, key, value, headers))
    return out


def _read_bytes(buf: bytearray, pos: int) -> tuple[bytes | None, int]:
    length, pos = decode_varint(buf, pos)
    if length < 0:
        return None, pos
    if pos + length > len(buf):
        raise ValueError("a field runs past the end of its batch")
    return bytes(buf[pos : pos + length]), pos + length


def _batches(data: bytes) -> Iterator[bytes]:
    """Each whole batch of a fetch (a fetch may end with part of one: the broker cuts at its size limit)."""
    pos = 0
    while pos + _LOG_OVERHEAD <= len(data):
        _, length = _BATCH_HEAD.unpack_from(data, pos)
        end = pos + _LOG_OVERHEAD + length
        if length < 0 or end > len(data):
            return
        yield data[pos:end]
        pos = end


class FetchedRecords:
    """aiokafka's `MemoryRecords` that keeps the fetched bytes for the fallback."""

    __slots__ = ("_reader", "data")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self._reader: Any = MemoryRecords(data)

    def size_in_bytes(self) -> int:
        return int(self._reader.size_in_bytes())

    def has_next(self) -> bool:
        return bool(self._reader.has_next())

    def next_batch(self) -> Any:
        return self._reader.next_batch()


class PartitionRecords(fetcher.PartitionRecords):  # type: ignore[misc]
    """aiokafka's records of one partition's fetch, read on past a header name that is not UTF-8."""

    next_fetch_offset: int  # aiokafka's: the offset after the last record handed over

    def _unpack_records(self) -> Iterator[Any]:
        try:
            yield from super()._unpack_records()
            return
        except UnicodeDecodeError:
            data = getattr(self._records, "data", None)
            if self._isolation_level == fetcher.READ_COMMITTED or data is None:
                raise
        yield from self._read_on(data)

    def _read_on(self, data: bytes) -> Iterator[Any]:
        """The records from `next_fetch_offset` on: each batch by aiokafka, unless it cannot read it."""
        tp = self._tp
        for raw in _batches(data):
            batch = MemoryRecords(raw).next_batch()
            if batch is None or batch.next_offset <= self.next_fetch_offset:
                continue  # read before aiokafka's reader failed
            if self._check_crcs and not batch.validate_crc():
                raise fetcher.Errors.CorruptRecordException(f"Invalid CRC - {tp}")
            if batch.is_control_batch:
                self.next_fetch_offset = batch.next_offset
                continue
            try:
                records: list[Any] = list(batch)
            except UnicodeDecodeError:
                records = read_v2_batch(raw)
                log.warning(
                    "read a record batch whose header names are not all UTF-8 (another producer wrote it);"
                    " those names are read with replacement characters",
                    extra={"topic": tp.topic, "partition": tp.partition, "offset": batch.base_offset},
                )
            for record in records:
                if record.offset < self.next_fetch_offset:
                    continue
                consumer_record = self._consumer_record(tp, record)
                self.next_fetch_offset = record.offset + 1
                yield consumer_record
            self.next_fetch_offset = batch.next_offset


def install() -> None:
    """Make aiokafka's fetcher, in this process, read fetches as above."""
    fetcher.MemoryRecords = FetchedRecords
    fetcher.PartitionRecords = PartitionRecords
