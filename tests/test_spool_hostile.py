"""The spool against what operators, disks and brokers do to it: a checkpoint that lies, a directory removed
while in use, a disk that refuses a write, a record the broker will never take, a directory named twice,
a kill -9 with workers sharing the spool root.

Disk faults are real (a file size limit, a deleted directory); the broker is the real one, made "away" for
an ingress by giving it an address nothing listens on, so no test here stops the shared broker."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import os
import resource
import shutil
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]
from prometheus_client import REGISTRY

from sentpipe.broker import QUEUE_FULL, Delivered, ProduceRejected
from sentpipe.ingress import spool as spool_mod
from sentpipe.ingress.spool import (
    CHECKPOINT,
    REFUSED,
    WRITE_RETRY_S,
    Spool,
    SpoolError,
    SpoolFull,
    SpoolRecord,
    adopt_orphans,
    drain_directories,
    encode_frame,
    process_dir,
    status_of,
)
from sentpipe.schemas import routing as r
from sentpipe.schemas.samples import SampleFactory
from sentpipe.schemas.signature import signature_headers
from sentpipe.schemas.topics import Topics
from sentpipe.settings import Settings
from tests.http_tools import metric_sum, post_signed, scrape
from tests.kafka_tools import read_topic
from tests.pipeline import wait_until
from tests.processes import Proc, free_port, start_ingress


def rec(i: int, size: int = 100, topic: str = "sent.events.raw") -> SpoolRecord:
    return SpoolRecord(topic, f"id-{i}".encode(), b"v" * size, (("tenant", b"t"),), 1000 + i)


class Broker:
    """Settles one future per record; `refuse` names the reason the broker gives a record (None: takes it).
    With raise_at_send the refusal is raised by send itself, as librdkafka does for a record over its
    message.max.bytes."""

    def __init__(
        self, refuse: Callable[[SpoolRecord], str | None] = lambda r: None, raise_at_send: bool = False
    ) -> None:
        self.got: list[SpoolRecord] = []
        self.refuse = refuse
        self.raise_at_send = raise_at_send

    def send(self, r: SpoolRecord) -> asyncio.Future[Delivered]:
        reason = self.refuse(r)
        if reason is not None and self.raise_at_send:
            raise ProduceRejected(reason)
        fut: asyncio.Future[Delivered] = asyncio.get_running_loop().create_future()
        if reason is not None:
            fut.set_exception(ProduceRejected(reason))
        else:
            self.got.append(r)
            fut.set_result(Delivered(r.topic, 0, len(self.got)))
        return fut


def spool_in(path: Path, max_bytes: int = 10**9, segment_bytes: int = 10**8) -> Spool:
    s = Spool(path, max_bytes, segment_bytes)
    s.open()
    return s


def segments_in(path: Path) -> list[Path]:
    return sorted(path.glob("*.seg"))


async def fill(path: Path, n: int, size: int = 100) -> None:
    s = spool_in(path)
    await asyncio.gather(*(s.append(rec(i, size)) for i in range(n)))
    s.close()


# --- the checkpoint is a hint, never a reason to lose a record ---------------------------------------------
@pytest.mark.parametrize(
    "checkpoint",
    [
        b'{"segment": 1, "offset": 999999}',  # past the end of its segment (the segment lost its tail)
        b'{"segment": 1, "offset": -5}',
        b'{"segment": 99, "offset": 0}',  # past every segment on disk
        b'{"segment": 1e30, "offset": 0}',
        b'{"segment": -3, "offset": 0}',
        b'{"segment": true, "offset": 0}',
        b"\x00\xff{",
    ],
)
def test_a_checkpoint_that_does_not_fit_the_segments_loses_nothing(tmp_path: Path, checkpoint: bytes) -> None:
    async def main() -> None:
        await fill(tmp_path, 10)
        (tmp_path / CHECKPOINT).write_bytes(checkpoint)
        s = spool_in(tmp_path)  # the ingress starts: no traceback, no crash loop
        assert s.records == 10
        b = Broker()
        await s.drain(b.send, once=True)
        assert b.got == [rec(i) for i in range(10)]
        s.close()
        # Records spooled after it are not hidden by it either.
        s = spool_in(tmp_path)
        await s.append(rec(10))
        s.close()
        s = spool_in(tmp_path)
        b = Broker()
        await s.drain(b.send, once=True)
        assert b.got == [rec(10)]
        s.close()

    asyncio.run(main())


def test_a_checkpoint_past_the_end_of_a_later_segment_deletes_none_before_it(tmp_path: Path) -> None:
    """Ignored for its offset, the checkpoint was still trusted with its segment: every segment before the
    one it named was deleted, their records with them."""

    async def main() -> None:
        s = spool_in(tmp_path, segment_bytes=1000)
        for i in range(6):  # one record a segment
            await s.append(rec(i, 2000))
        s.close()
        second = int(segments_in(tmp_path)[1].stem)
        (tmp_path / CHECKPOINT).write_bytes(b'{"segment": %d, "offset": 999999}' % second)
        s = spool_in(tmp_path)
        assert s.records == 6 and len(segments_in(tmp_path)) == 6
        b = Broker()
        await s.drain(b.send, once=True)
        assert b.got == [rec(i, 2000) for i in range(6)]
        s.close()

    asyncio.run(main())


def test_a_segment_cut_while_the_ingress_runs_does_not_hang_the_drain(tmp_path: Path) -> None:
    """A segment file shorter than what was written to it: the drain read no bytes where it expected frames
    and spun for ever in its thread (the process could not even exit). Now what is left is drained, the rest
    said lost, and the records behind it go on."""

    async def main() -> None:
        s = spool_in(tmp_path, segment_bytes=10_000)
        for i in range(6):  # three records a segment
            await s.append(rec(i, 4000))
        first = segments_in(tmp_path)[0]
        with first.open("r+b") as f:  # its last record cut away
            f.truncate(first.stat().st_size // 3 * 2)
        b = Broker()
        async with asyncio.timeout(30):
            await s.drain(b.send, once=True)
        assert b.got == [rec(i, 4000) for i in (0, 1, 3, 4, 5)]
        assert s.records == 0 and not segments_in(tmp_path)
        s.close()

    asyncio.run(main())


def test_a_full_producer_queue_ends_the_window_without_pausing_the_drain(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The producer's `local_queue_full` (its queue shared with the requests' records) was taken for the
    broker's refusal: the drain logged "drain paused" and backed off, up to 5 s a window."""

    async def main() -> None:
        await fill(tmp_path, 1000)
        s = spool_in(tmp_path)
        calls = itertools.count(1)
        b = Broker(lambda r: QUEUE_FULL if next(calls) % 300 == 0 else None, raise_at_send=True)
        await s.drain(b.send, once=True)
        assert b.got == [rec(i) for i in range(1000)] and s.records == 0
        s.close()

    with caplog.at_level(logging.WARNING, "sentpipe.ingress.spool"):
        asyncio.run(main())
    assert "drain paused" not in caplog.text


def test_a_corrupt_frame_behind_a_failing_record_is_counted_once(tmp_path: Path) -> None:
    """Each retry of a window read the corrupt frame behind its failing record again, and counted it again
    (`sentpipe_spool_corrupt_frames_total`, the drain's summary)."""

    async def main() -> None:
        await fill(tmp_path, 3)
        seg = segments_in(tmp_path)[0]
        data = bytearray(seg.read_bytes())
        data[len(encode_frame(rec(0))) + 20] ^= 0xFF  # the second record's CRC fails
        seg.write_bytes(bytes(data))
        s = spool_in(tmp_path)
        down = iter([True, True])
        b = Broker(lambda r: "all_brokers_down" if r == rec(0) and next(down, False) else None)
        for _ in range(3):  # refused twice, then taken
            await s.drain(b.send, once=True)
        assert b.got[-2:] == [rec(0), rec(2)] and s.records == 0  # (rec 2 went in each window: a duplicate)
        assert s.corrupt == 1
        s.close()

    asyncio.run(main())


def test_a_corrupt_region_longer_than_a_read_is_counted_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The drain reads a segment READ_CHUNK (4 MiB) at a time: a region of garbage that spanned three reads
    was counted (and logged) three times. Two torn frames side by side are still two."""
    monkeypatch.setattr(spool_mod, "READ_CHUNK", 4096)

    async def main() -> None:
        await fill(tmp_path, 4)
        seg = segments_in(tmp_path)[0]
        frame = len(encode_frame(rec(0)))
        data = bytearray(seg.read_bytes())
        data[frame * 2 + 20] ^= 0xFF  # the third and fourth records' CRCs fail: two frames, side by side
        data[frame * 3 + 20] ^= 0xFF
        seg.write_bytes(bytes(data[:frame]) + b"\x00" * 10_000 + bytes(data[frame:]))  # no magic in it
        s = spool_in(tmp_path)
        b = Broker()
        await s.drain(b.send, once=True)
        assert b.got == [rec(0), rec(1)] and s.records == 0
        assert s.corrupt == 3  # the garbage once, and each torn frame
        s.close()

    asyncio.run(main())


def test_a_foreign_directory_named_like_a_segment_does_not_stop_the_spool(tmp_path: Path) -> None:
    async def main() -> None:
        await fill(tmp_path, 3)
        (tmp_path / "0000000000000007.seg").mkdir()
        (tmp_path / "notes.seg").write_bytes(b"not a segment")
        s = spool_in(tmp_path)
        b = Broker()
        await s.drain(b.send, once=True)
        assert b.got == [rec(i) for i in range(3)]
        await s.append(rec(3))  # a new segment never takes a number a foreign file has
        s.close()
        assert status_of(tmp_path).records == 1

    asyncio.run(main())


def test_a_checkpoint_the_disk_refuses_does_not_stop_the_drain(tmp_path: Path) -> None:
    """The checkpoint cannot be written (here its temporary name is taken by a directory; a full disk does
    the same): the drain goes on, since a lost checkpoint only costs records sent twice."""

    async def main() -> None:
        await fill(tmp_path, 3000)
        (tmp_path / (CHECKPOINT + ".tmp")).mkdir()
        s = spool_in(tmp_path)
        b = Broker()
        done = await s.drain(b.send, once=True)
        assert done.drained == 3000 and b.got == [rec(i) for i in range(3000)]
        assert not segments_in(tmp_path)
        s.close()

    asyncio.run(main())


def test_spool_status_while_the_owner_deletes_a_drained_segment(tmp_path: Path) -> None:
    """`spool status` lists the segments, then the running ingress deletes one it has drained before status
    reads it: status shows the rest instead of failing with FileNotFoundError."""

    async def main() -> None:
        s = spool_in(tmp_path, segment_bytes=64 * 1024)
        for i in range(0, 40, 10):
            await asyncio.gather(*(s.append(rec(j, 10_000)) for j in range(i, i + 10)))
        s.close()
        assert len(segments_in(tmp_path)) >= 3

    asyncio.run(main())

    class RacedStatus(Spool):
        def _segment_files(self) -> list[tuple[int, Path]]:
            listed = super()._segment_files()
            listed[0][1].unlink()  # the owner's drain, between the listing and the read
            return listed

    raced = RacedStatus(tmp_path, max_bytes=1, segment_bytes=1)
    assert raced._load(take_over=False) == 0
    assert len(raced.segments) == len(segments_in(tmp_path)) and 0 < raced.records < 40


# --- the directory or a segment removed while the spool runs -----------------------------------------------
def test_a_spool_directory_removed_at_run_time_never_answers_200_for_a_lost_record(tmp_path: Path) -> None:
    async def main() -> None:
        d = tmp_path / "ingress-0"
        s = spool_in(d)
        await s.append(rec(0))
        shutil.rmtree(d)  # an operator, or a cleanup job
        acked = []
        for i in range(1, 6):
            try:
                await s.append(rec(i))
            except SpoolError:
                continue  # 503: Sent retries it
            acked.append(i)
        assert acked, "the spool never took a request again"
        # The running drain goes past what was deleted and sends every record answered 200 since.
        b = Broker()
        await s.drain(b.send, once=True)
        assert b.got == [rec(i) for i in acked]
        await s.append(rec(6))
        acked.append(6)
        s.close()
        # ... and what the restart finds is exactly what the disk was said to hold.
        again = spool_in(d)
        b = Broker()
        await again.drain(b.send, once=True)
        assert b.got == [rec(6)]
        again.close()

    asyncio.run(main())


def test_a_spool_whose_directory_another_process_made_again_writes_nothing_there(tmp_path: Path) -> None:
    """Its directory removed, and made again by a second ingress (which locked it), a running spool checked
    only that the directory existed and went on writing segments into the other's directory: two owners,
    and the other's next start could delete records it had answered 200 for."""

    async def main() -> None:
        d = tmp_path / "ingress-0"
        first = spool_in(d)
        await first.append(rec(0))
        shutil.rmtree(d)
        second = spool_in(d)  # makes the directory again and locks it
        await second.append(rec(10))
        for i in range(1, 4):
            with pytest.raises(SpoolError):
                await first.append(rec(i))  # 503: the directory is not its own any more
        first.close()
        b = Broker()
        await second.drain(b.send, once=True)
        assert b.got == [rec(10)]
        second.close()

    asyncio.run(main())


# --- a write the disk refuses ------------------------------------------------------------------------------
@contextlib.contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """Writes past `limit` bytes in any file fail (EFBIG), part way through, as on a full disk."""
    before = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, before[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, before)
        signal.signal(signal.SIGXFSZ, handler)


def test_a_write_the_disk_refuses_leaves_no_torn_frame_and_no_stray_segment(tmp_path: Path) -> None:
    """Only what was answered 200 is drained, no corrupt frame is reported for a request answered 503, and a
    refused write leaves no empty segment behind (one a request, for as long as the disk stays full)."""

    async def main() -> None:
        s = spool_in(tmp_path)
        acked: list[SpoolRecord] = []
        refused = 0
        with file_size_limit(1024 * 1024):
            for r in [*(rec(i, 100_000) for i in range(14)), rec(14, 2_000_000), rec(15, 2_000_000)]:
                try:
                    await s.append(r)
                except SpoolError:
                    refused += 1
                    continue
                acked.append(r)
        assert refused >= 3 and len(acked) >= 10
        s.close()
        st = status_of(tmp_path)
        assert st.corrupt_frames == 0 and st.records == len(acked), st
        assert all(p.stat().st_size > 0 for p in segments_in(tmp_path)), segments_in(tmp_path)
        assert len(segments_in(tmp_path)) == st.segments <= 3, segments_in(tmp_path)
        again = spool_in(tmp_path)
        b = Broker()
        done = await again.drain(b.send, once=True)
        assert b.got == acked and done.corrupt == 0
        again.close()

    asyncio.run(main())


def test_a_write_the_disk_refused_takes_the_spool_out_of_service_until_one_succeeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A spool whose disk refused its writes still said it took records: /readyz answered 200 "spooling"
    and `sentpipe_ingress_accepting` 1 while every delivery got 503 `spool_write_failed`."""
    clock = [1000.0]
    monkeypatch.setattr("sentpipe.ingress.spool.time.monotonic", lambda: clock[0])

    async def main() -> None:
        s = spool_in(tmp_path)
        assert s.takes_records
        with file_size_limit(1024), pytest.raises(SpoolError):
            await s.append(rec(0, 100_000))
        assert not s.takes_records  # out of service: the disk refuses
        clock[0] += WRITE_RETRY_S - 1
        assert not s.takes_records
        clock[0] += 1
        assert s.takes_records  # time to try the disk again
        with file_size_limit(1024), pytest.raises(SpoolError):
            await s.append(rec(1, 100_000))
        assert not s.takes_records
        await s.append(rec(2))  # the disk takes writes again: back at once
        assert s.takes_records
        s.close()

    asyncio.run(main())


def test_records_being_written_count_against_the_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch left the pending count when its write began and reached the spool's bytes only once it
    ended: appends meanwhile were checked against neither, and the spool grew past SENTPIPE_SPOOL_MAX_BYTES
    (80 x 100 KB taken with a limit of 4 MiB)."""
    disk = threading.Event()
    fdatasync = os.fdatasync

    def slow(fd: int) -> None:
        disk.wait(60)
        fdatasync(fd)

    monkeypatch.setattr("sentpipe.ingress.spool.os.fdatasync", slow)

    async def main() -> None:
        s = spool_in(tmp_path, max_bytes=1_000_000)
        first = asyncio.ensure_future(s.append(rec(0, 300_000)))
        await asyncio.sleep(0.2)  # its batch is in the writer's thread, held in fdatasync
        rest = [asyncio.ensure_future(s.append(rec(i, 300_000))) for i in range(1, 10)]
        await asyncio.sleep(0.1)
        disk.set()
        results = await asyncio.gather(first, *rest, return_exceptions=True)
        taken = [i for i, r in enumerate(results) if r is None]
        assert all(r is None or isinstance(r, SpoolFull) for r in results), results
        assert taken == [0, 1, 2], results
        assert s.bytes <= 1_000_000 and sum(p.stat().st_size for p in segments_in(tmp_path)) == s.bytes
        s.close()

    try:
        asyncio.run(main())
    finally:
        disk.set()


def test_a_full_mark_made_beside_a_write_that_then_failed_does_not_outlive_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refused for the bytes of a write in hand that the disk then refused, a record marked the spool full
    with nothing left in it, and only a drained segment cleared that: readiness said "the spool is full" at
    every later broker outage, until a restart."""
    disk = threading.Event()

    def refused(fd: int) -> None:
        disk.wait(60)
        raise OSError(5, "Input/output error")

    monkeypatch.setattr("sentpipe.ingress.spool.os.fdatasync", refused)

    async def main() -> None:
        s = spool_in(tmp_path, max_bytes=1_000_000)
        first = asyncio.ensure_future(s.append(rec(0, 600_000)))
        await asyncio.sleep(0.2)  # its batch is in the writer's thread
        with pytest.raises(SpoolFull):
            await s.append(rec(1, 600_000))
        assert s.full
        disk.set()
        with pytest.raises(SpoolError):
            await first
        assert not s.full and s.records == 0 and s.bytes == 0
        s.close()

    try:
        asyncio.run(main())
    finally:
        disk.set()


def test_a_record_too_large_for_an_empty_spool_does_not_leave_it_full(tmp_path: Path) -> None:
    """Refused for its own size, such a record marked the spool full, and only a drained segment cleared
    that: readiness said "the spool is full" (503) with nothing in it. Settings now refuse such a spool."""

    async def main() -> None:
        s = spool_in(tmp_path, max_bytes=1024 * 1024)
        with pytest.raises(SpoolFull):
            await s.append(rec(0, 2 * 1024 * 1024))
        assert not s.full and s.takes_records
        await s.append(rec(1))
        with pytest.raises(SpoolFull):  # with records in it, it is full
            await s.append(rec(2, 1024 * 1024))
        assert s.full and not s.takes_records
        s.close()

    asyncio.run(main())


def test_settings_refuse_a_spool_that_cannot_hold_one_largest_body() -> None:
    big = {"spool": True, "max_body_bytes": 2 * 1024 * 1024}
    with pytest.raises(ValueError, match=r"SENTPIPE_SPOOL_MAX_BYTES \(1048576\) cannot hold one body"):
        Settings(_env_file=None, **big, spool_max_bytes=1024 * 1024)  # type: ignore[arg-type]
    Settings(_env_file=None, **big, spool_max_bytes=4 * 1024 * 1024)  # type: ignore[arg-type]
    Settings(_env_file=None, **{**big, "spool": False}, spool_max_bytes=1024 * 1024)  # type: ignore[arg-type]


# --- a record the broker refuses for what it is ------------------------------------------------------------
@pytest.mark.parametrize("raise_at_send", [False, True], ids=["broker_refuses", "producer_refuses"])
def test_a_record_the_broker_will_never_take_does_not_stop_the_drain(
    tmp_path: Path, raise_at_send: bool
) -> None:
    async def main() -> None:
        await fill(tmp_path, 20)
        s = spool_in(tmp_path)
        b = Broker(lambda r: "msg_size_too_large" if r.key == b"id-5" else None, raise_at_send)
        done = await s.drain(b.send, once=True)
        assert b.got == [rec(i) for i in range(20) if i != 5]
        assert not s.segments and s.records == 0 and not s.active  # new requests go to the broker again
        assert done.drained == 19 and s.refused == 1
        s.close()
        # Kept on disk and shown, not dropped.
        assert (tmp_path / REFUSED).is_file()
        st = status_of(tmp_path)
        assert (st.records, st.refused) == (1, 1), st
        # The limit fixed, the next start sends it.
        again = spool_in(tmp_path)
        b = Broker()
        await again.drain(b.send, once=True)
        assert b.got == [rec(5)]
        assert not (tmp_path / REFUSED).exists() and status_of(tmp_path).records == 0
        again.close()

    asyncio.run(main())


def test_a_temporary_refusal_still_pauses_the_drain(tmp_path: Path) -> None:
    """A broker that is away is not a poison record: nothing is set aside, the drain waits."""

    async def main() -> None:
        await fill(tmp_path, 20)
        s = spool_in(tmp_path)
        b = Broker(lambda r: "all_brokers_down" if r.key == b"id-5" else None)
        await s.drain(b.send, once=True)
        assert [r.key for r in b.got][:5] == [f"id-{i}".encode() for i in range(5)]
        assert s.records == 15 and s.refused == 0 and not (tmp_path / REFUSED).exists()
        s.close()

    asyncio.run(main())


# --- orphaned directories ----------------------------------------------------------------------------------
def test_an_orphan_with_something_foreign_in_it_does_not_stop_the_others(tmp_path: Path) -> None:
    async def main() -> None:
        for index in (1, 2):
            s = spool_in(process_dir(tmp_path, index))
            await s.append(rec(index))
            s.close()
        (process_dir(tmp_path, 1) / "lost+found").mkdir()
        b = Broker()
        await adopt_orphans(tmp_path, 1, b.send, lambda: True)
        assert sorted(b.got, key=lambda r: r.key) == [rec(1), rec(2)]
        assert not process_dir(tmp_path, 2).exists()
        assert (process_dir(tmp_path, 1) / "lost+found").is_dir()  # not ours to delete: the directory stays
        assert status_of(process_dir(tmp_path, 1)).records == 0

    asyncio.run(main())


def test_an_orphan_keeps_the_records_the_broker_refused(tmp_path: Path) -> None:
    async def main() -> None:
        s = spool_in(process_dir(tmp_path, 1))
        await asyncio.gather(*(s.append(rec(i)) for i in range(3)))
        s.close()
        b = Broker(lambda r: "msg_size_too_large" if r.key == b"id-1" else None)
        await adopt_orphans(tmp_path, 1, b.send, lambda: True)
        assert b.got == [rec(0), rec(2)]
        assert status_of(process_dir(tmp_path, 1)).refused == 1

    asyncio.run(main())


def test_an_orphans_records_count_in_the_gauges_of_the_spool_that_adopts_it(tmp_path: Path) -> None:
    """Answered 200 and not on Kafka, an orphan's backlog showed in no gauge while it waited, nor what the
    broker refused of it afterwards."""

    def gauge(name: str) -> float | None:
        return REGISTRY.get_sample_value(name)

    async def main() -> None:
        orphan = spool_in(process_dir(tmp_path, 1))
        await asyncio.gather(*(orphan.append(rec(i)) for i in range(3)))
        orphan.close()
        own = spool_in(process_dir(tmp_path, 0))
        await own.append(dataclasses.replace(rec(10), spooled_at_ms=int(time.time() * 1000)))
        reachable = asyncio.Event()
        b = Broker(lambda r: "msg_size_too_large" if r.key == b"id-1" else None)
        adopting = asyncio.ensure_future(adopt_orphans(tmp_path, 1, b.send, reachable.is_set, own))
        for _ in range(100):
            if gauge("sentpipe_spool_records") == 4:
                break
            await asyncio.sleep(0.05)
        assert gauge("sentpipe_spool_records") == 4  # its own record and the orphan's three
        # The orphan's records, spooled at 1970 + 1 s, are the oldest: not the one spooled just now.
        assert gauge("sentpipe_spool_oldest_age_seconds") == pytest.approx(time.time() - 1.0, abs=60)
        reachable.set()
        await asyncio.wait_for(adopting, 30)
        assert b.got == [rec(0), rec(2)]
        assert gauge("sentpipe_spool_records") == 1
        assert gauge("sentpipe_spool_refused_records") == 1  # kept in the orphan's refused.rec
        own.close()

    asyncio.run(main())


# --- against the real broker -------------------------------------------------------------------------------
POISON_VALUE = os.urandom(10_000)  # incompressible: too large for _tiny_topic whatever the compression


def _tiny_topic(s: Settings) -> str:
    """A topic whose max.message.bytes is below the records spooled for it: the broker refuses them."""
    name = f"{s.topic_prefix}tiny"
    admin = AdminClient({"bootstrap.servers": s.kafka_bootstrap})
    admin.create_topics([NewTopic(name, 1, 1, config={"max.message.bytes": "2000"})])[name].result(30)
    return name


def _prefill(directory: Path, records: list[SpoolRecord]) -> None:
    async def go() -> None:
        s = spool_in(directory)
        for one in records:
            await s.append(one)
        s.close()

    asyncio.run(go())


def _raw(s: Settings, key: str, size: int = 300) -> SpoolRecord:
    headers = r.raw_headers(
        tenant="default",
        received_at_ms=int(time.time() * 1000),
        webhook_id=key,
        request_id=key,
        event_type="message.inbound",
    )
    return SpoolRecord(Topics(s.topic_prefix).raw, key.encode(), b"x" * size, tuple(headers), 1)


def _raw_keys(s: Settings, at_least: int) -> set[str]:
    records = read_topic(s.kafka_bootstrap, Topics(s.topic_prefix).raw, at_least=at_least, timeout=120)
    return {rec.key.decode() for rec in records if rec.key is not None}


def test_a_record_the_broker_refuses_does_not_block_the_ingress_spool(
    settings: Settings, tmp_path: Path
) -> None:
    """A record spooled for a topic that no longer takes its size sits between good ones: the ingress drains
    the others, keeps it aside, and takes new requests straight to the broker again."""
    tiny = _tiny_topic(settings)
    spool_dir = tmp_path / "spool"
    directory = process_dir(spool_dir, 0)
    before = [_raw(settings, f"before-{i}") for i in range(20)]
    after = [_raw(settings, f"after-{i}") for i in range(20)]
    poison = SpoolRecord(tiny, b"poison", POISON_VALUE, (), 1)
    _prefill(directory, [*before, poison, *after])
    proc, base, metrics_port = start_ingress(settings, tmp_path, spool="on", spool_dir=spool_dir)
    try:
        wait_until(lambda: status_of(directory).segments == 0, 60, "the spool drained", proc.tail)
        assert status_of(directory).refused == 1
        # What SentpipeSpoolRecordRefused and the dashboard read.
        assert metric_sum(scrape(metrics_port), "sentpipe_spool_refused_total") == 1
        # Answered 200 and not on Kafka: counted as waiting, though it is no longer in the drain's backlog.
        assert metric_sum(scrape(metrics_port), "sentpipe_spool_refused_records") == 1
        keys = {rec.key.decode() for rec in [*before, *after]}
        assert _raw_keys(settings, len(keys)) >= keys
        status, _, doc = post_signed(
            f"{base}/webhooks/sent",
            SampleFactory(3).inbound().body,
            settings.webhook_secret.get_secret_value(),
        )
        assert status == 200 and "spooled" not in doc, doc
        assert "kept in" in proc.tail(200)
    finally:
        assert proc.stop() == 0, proc.tail()


def test_spool_drain_names_a_directory_twice_and_drains_it_once(settings: Settings, tmp_path: Path) -> None:
    directory = tmp_path / "left-behind"
    keys = [f"twice-{i}" for i in range(50)]
    _prefill(directory, [_raw(settings, k) for k in keys])
    outcomes = asyncio.run(drain_directories(settings, [directory, directory / ".." / directory.name]))
    assert [(o.state, o.drained, o.remaining) for o in outcomes] == [("drained", 50, 0)], outcomes
    assert _raw_keys(settings, 50) == set(keys)


def test_spool_drain_reports_what_the_broker_refused_as_left(settings: Settings, tmp_path: Path) -> None:
    tiny = _tiny_topic(settings)
    directory = tmp_path / "left-behind"
    keys = [f"good-{i}" for i in range(10)]
    _prefill(directory, [_raw(settings, keys[0]), SpoolRecord(tiny, b"poison", POISON_VALUE, (), 1)])
    _prefill(directory, [_raw(settings, k) for k in keys[1:]])
    outcomes = asyncio.run(drain_directories(settings, [directory]))
    assert [(o.state, o.drained, o.remaining) for o in outcomes] == [("incomplete", 10, 1)], outcomes
    assert _raw_keys(settings, 10) == set(keys)
    assert status_of(directory).refused == 1


def _dead_address() -> str:
    """A broker address nothing listens on: to the ingress, every broker is away."""
    return f"127.0.0.1:{free_port()}"


@pytest.mark.timeout(600)
def test_kill_9_of_two_workers_spooling_then_one_worker_drains_everything_acknowledged(
    settings: Settings, tmp_path: Path
) -> None:
    """Two workers share the spool root while the broker is away, a kill -9 takes both in the middle of
    group commits; one worker with the broker back drains its own directory and adopts the other's."""
    spool_dir = tmp_path / "spool"
    secret = settings.webhook_secret.get_secret_value()
    away = settings.model_copy(update={"kafka_bootstrap": _dead_address(), "ingress_workers": 2})
    proc, base, _ = start_ingress(away, tmp_path, spool="on", spool_dir=spool_dir)
    f = SampleFactory(21)
    lock = threading.Lock()
    acked: list[str] = []
    stop = threading.Event()
    refused: list[object] = []

    def load(n: int) -> None:
        i = 0
        while not stop.is_set():
            with lock:
                body = orjson.dumps({**f.inbound().doc, "load": [n, i]})
            i += 1
            try:
                status, _, doc = post_signed(f"{base}/webhooks/sent", body, secret)
            except OSError:
                continue  # killed mid-request: never answered, nothing acknowledged
            if status == 200:
                assert doc.get("spooled") is True, doc
                with lock:
                    acked.append(str(doc["event_id"]))
            else:
                refused.append((status, doc))

    threads = [threading.Thread(target=load, args=(n,), daemon=True) for n in range(8)]
    restarted: Proc | None = None
    try:
        for t in threads:
            t.start()
        wait_until(lambda: len(acked) >= 400, 120, "400 events spooled", proc.tail)
        proc.kill()  # SIGKILL to the supervisor and both workers
        stop.set()
        for t in threads:
            t.join(60)
        assert all(status_of(process_dir(spool_dir, i)).segments for i in (0, 1)), "both workers spooled"
        on_disk = sum(status_of(process_dir(spool_dir, i)).records for i in (0, 1))
        assert on_disk >= len(acked), (on_disk, len(acked))
        restarted, _, _ = start_ingress(settings, tmp_path, spool="on", spool_dir=spool_dir)
        wait_until(
            lambda: (
                status_of(process_dir(spool_dir, 0)).segments == 0 and not process_dir(spool_dir, 1).exists()
            ),
            180,
            "both directories drained",
            restarted.tail,
        )
        missing = set(acked) - _raw_keys(settings, len(set(acked)))
        assert not missing, f"{len(missing)} of {len(acked)} acknowledged events missing"
        assert not refused, refused[:3]
    finally:
        stop.set()
        proc.kill()
        if restarted is not None:
            assert restarted.stop() == 0, restarted.tail()


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as e:
        return e.code


# A 1 MiB spool holds a largest body and its framing only with bodies up to 1 MiB - 64 KiB (Settings).
MAX_BODY = 256 * 1024


def test_a_full_spool_answers_503_with_retry_after_and_every_200_is_drained(
    settings: Settings, tmp_path: Path
) -> None:
    """The broker away: the spool takes requests up to SENTPIPE_SPOOL_MAX_BYTES, then each gets 503
    spool_full with Retry-After (never a 200 that is not on disk); with the broker back every 200 lands."""
    spool_dir = tmp_path / "spool"
    away = settings.model_copy(update={"kafka_bootstrap": _dead_address()})
    proc, base, _ = start_ingress(
        away, tmp_path, spool="on", spool_dir=spool_dir, spool_max_bytes=1024 * 1024, max_body_bytes=MAX_BODY
    )
    secret = settings.webhook_secret.get_secret_value()
    f = SampleFactory(8)
    acked: list[str] = []
    answers: list[tuple[int, object]] = []
    try:
        for i in range(40):  # 64 KiB each: the 1 MiB spool takes about 15
            body = orjson.dumps({**f.inbound().doc, "padding": "x" * 65536, "n": i})
            headers = {
                **signature_headers(secret, "spool", int(time.time()), body),
                "content-type": "application/json",
            }
            request = urllib.request.Request(f"{base}/webhooks/sent", data=body, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=30) as resp:
                    doc = orjson.loads(resp.read())
                    assert doc["spooled"] is True, doc
                    acked.append(str(doc["event_id"]))
                    answers.append((resp.status, None))
            except urllib.error.HTTPError as e:
                doc = orjson.loads(e.read())
                assert e.headers.get("Retry-After"), dict(e.headers)
                answers.append((e.code, doc.get("error")))
        assert 10 <= len(acked) < 40, answers
        assert answers[len(acked) :] == [(503, "spool_full")] * (40 - len(acked)), answers
        assert status_of(process_dir(spool_dir, 0)).records == len(acked)
        assert _get(f"{base}/readyz") == 503  # full and no broker: out of service
        try:
            urllib.request.urlopen(f"{base}/readyz", timeout=10)
        except urllib.error.HTTPError as e:  # the cause the runbook acts on, not only "broker unreachable"
            assert orjson.loads(e.read())["detail"] == "Kafka broker unreachable, and the spool is full"
        refusals = [line for line in proc.log.read_text().splitlines() if "and spool_full" in line]
        assert len(refusals) == 40 - len(acked), proc.tail()
        assert all(" WARNING " in line and "reason=spool_full" in line for line in refusals), refusals[:1]
    finally:
        assert proc.stop() == 0, proc.tail()
    restarted, _, _ = start_ingress(
        settings,
        tmp_path,
        spool="on",
        spool_dir=spool_dir,
        spool_max_bytes=1024 * 1024,
        max_body_bytes=MAX_BODY,
    )
    try:
        wait_until(lambda: status_of(process_dir(spool_dir, 0)).segments == 0, 60, "drained", restarted.tail)
        assert set(acked) <= _raw_keys(settings, len(acked))
    finally:
        assert restarted.stop() == 0, restarted.tail()
