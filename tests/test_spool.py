"""The spool on a real local disk: framing, torn and corrupt frames, group commit, rotation, drain, restart.

The broker side is a function that settles futures (pure logic here); tests/test_spool_e2e.py drains to the
real broker."""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sentpipe.broker import Delivered, ProduceRejected
from sentpipe.ingress.spool import (
    DRAIN_WINDOW,
    Spool,
    SpoolFull,
    SpoolLocked,
    SpoolRecord,
    adopt_orphans,
    decode_payload,
    encode_frame,
    process_dir,
    scan,
    status_of,
)

records_st = st.builds(
    SpoolRecord,
    topic=st.text(min_size=1, max_size=40),
    key=st.binary(max_size=64),
    value=st.binary(max_size=2000),
    headers=st.lists(st.tuples(st.text(max_size=20), st.binary(max_size=50)), max_size=6).map(tuple),
    spooled_at_ms=st.integers(0, 2**63 - 1),
)


def rec(i: int, size: int = 100) -> SpoolRecord:
    return SpoolRecord(
        "sent.events.raw", f"id-{i}".encode(), b"v" * size + str(i).encode(), (("tenant", b"t"),), 1000 + i
    )


@given(records_st)
def test_a_record_survives_its_frame(r: SpoolRecord) -> None:
    frame = encode_frame(r)
    assert decode_payload(frame[12:]) == r
    assert [f.record for f in scan(frame, final=True)] == [r]


@settings(max_examples=50, deadline=None)
@given(st.lists(records_st, min_size=1, max_size=5), st.data())
def test_a_torn_last_frame_is_skipped_never_misread(rs: list[SpoolRecord], data: st.DataObject) -> None:
    frames = [encode_frame(r) for r in rs]
    whole = b"".join(frames[:-1])
    cut = data.draw(st.integers(1, len(frames[-1]) - 1))
    found = list(scan(whole + frames[-1][:cut], final=True))
    assert [f.record for f in found if f.record is not None] == rs[:-1]
    # The torn bytes, and only they, are skipped: one region, or several where the torn frame's own data
    # holds MAGIC (each false start fails its CRC in turn).
    torn = [(f.start, f.end) for f in found if f.record is None]
    assert torn and torn[0][0] == len(whole) and torn[-1][1] == len(whole) + cut
    assert all(a[1] == b[0] for a, b in itertools.pairwise(torn))
    # Not final (more bytes may come): the incomplete frame is neither a record nor reported.
    assert [f.record for f in scan(whole + frames[-1][:cut], final=False)] == rs[:-1]


@settings(max_examples=50, deadline=None)
@given(st.lists(records_st, min_size=3, max_size=6), st.data())
def test_a_corrupt_frame_in_the_middle_hides_nothing_after_it(
    rs: list[SpoolRecord], data: st.DataObject
) -> None:
    frames = [encode_frame(r) for r in rs]
    bad = data.draw(st.integers(0, len(rs) - 1))
    pos = data.draw(st.integers(0, len(frames[bad]) - 1))
    broken = bytearray(frames[bad])
    broken[pos] ^= 0xFF
    frames[bad] = bytes(broken)
    got = [f.record for f in scan(b"".join(frames), final=True)]
    assert [r for r in got if r is not None] == rs[:bad] + rs[bad + 1 :]
    assert got.count(None) >= 1


@pytest.mark.parametrize("into_magic", [1, 2, 3])
def test_a_read_that_ends_inside_the_magic_after_a_corrupt_frame_loses_nothing(into_magic: int) -> None:
    """A read ending inside the MAGIC of the intact frame behind a corrupt one reported the corrupt region up
    to the end of the read; the next read began inside that MAGIC, so the intact record was skipped too."""
    a, b, c = (encode_frame(SpoolRecord("t", f"k{i}".encode(), b"v" * 100, (), i)) for i in range(3))
    broken = bytearray(b)
    broken[20] ^= 0xFF  # its CRC fails
    data = a + bytes(broken) + c
    cut = len(a) + len(b) + into_magic
    first = list(scan(data[:cut], final=False))
    assert first[0].record is not None and all(f.record is None for f in first[1:])
    resume = first[-1].end
    assert resume == len(a) + len(b)  # where the MAGIC begins: the corrupt region is counted once
    rest = [f.record for f in scan(data[resume:], final=True)]
    assert [r.key for r in rest if r is not None] == [b"k2"]


def test_garbage_is_never_a_record() -> None:
    junk = os.urandom(50_000)
    assert all(f.record is None for f in scan(junk, final=True))


class Broker:
    """Settles one future per record; `fail` decides which ones the broker refuses."""

    def __init__(self, fail: Callable[[SpoolRecord], bool] = lambda r: False) -> None:
        self.got: list[SpoolRecord] = []
        self.fail = fail

    def send(self, r: SpoolRecord) -> asyncio.Future[Delivered]:
        fut: asyncio.Future[Delivered] = asyncio.get_running_loop().create_future()
        if self.fail(r):
            fut.set_exception(ProduceRejected("all_brokers_down"))
        else:
            self.got.append(r)
            fut.set_result(Delivered(r.topic, 0, len(self.got)))
        return fut


def segments_in(path: Path) -> list[Path]:
    return sorted(path.glob("*.seg"))


def truncate_last_segment(path: Path, n: int) -> None:
    seg = segments_in(path)[-1]
    seg.write_bytes(seg.read_bytes()[:-n])


def spool_in(path: Path, max_bytes: int = 10**9, segment_bytes: int = 10**8) -> Spool:
    s = Spool(path, max_bytes, segment_bytes)
    s.open()
    return s


def test_appends_are_durable_grouped_and_drained_in_order(tmp_path: Path) -> None:
    async def main() -> None:
        s = spool_in(tmp_path)
        await asyncio.gather(*(s.append(rec(i)) for i in range(500)))
        assert s.records == 500 and s.active
        s.close()
        again = spool_in(tmp_path)  # what a restart finds
        assert again.records == 500
        b = Broker()
        done = await again.drain(b.send, once=True)
        assert done.drained == 500 and again.records == 0 and not again.active
        assert b.got == [rec(i) for i in range(500)]
        assert not segments_in(tmp_path)
        again.close()

    asyncio.run(main())


def test_new_records_go_around_the_spool_only_while_the_broker_takes_its_drain(tmp_path: Path) -> None:
    """Always queued behind the spool, a busy ingress answered from one disk for as long as its traffic
    lasted after a broker blip: the spool is empty only in a pause between requests. New records go behind
    it while the broker takes nothing, and to the broker directly once it acknowledges a drain window."""

    async def main() -> None:
        s = spool_in(tmp_path)
        sent: list[tuple[SpoolRecord, asyncio.Future[Delivered]]] = []
        more = asyncio.Event()

        def send(r: SpoolRecord) -> asyncio.Future[Delivered]:
            fut: asyncio.Future[Delivered] = asyncio.get_running_loop().create_future()
            sent.append((r, fut))
            more.set()
            return fut

        async def sent_count(n: int) -> None:
            async with asyncio.timeout(10):
                while len(sent) < n:
                    more.clear()
                    await more.wait()

        await asyncio.gather(s.append(rec(0)), s.append(rec(1)))  # one window of two
        assert s.holds_new_records  # nothing acknowledged yet
        drain = asyncio.create_task(s.drain(send))
        await sent_count(2)
        sent[0][1].set_result(Delivered("t", 0, 0))
        await asyncio.sleep(0)  # its callbacks run
        # Acknowledged, though its window is not over yet (a big backlog's windows take a while).
        assert s.records == 2 and s.active and not s.holds_new_records
        sent[1][1].set_exception(ProduceRejected("all_brokers_down"))
        for _ in range(10_000):  # the drain takes the refusal in
            if s.acked_at is None:
                break
            await asyncio.sleep(0.001)
        assert s.records == 1 and s.holds_new_records  # refused: behind it again
        drain.cancel()
        with pytest.raises(asyncio.CancelledError):
            await drain
        s.close()

    asyncio.run(main())


def test_segments_rotate_and_each_goes_once_drained(tmp_path: Path) -> None:
    async def main() -> None:
        s = spool_in(tmp_path, segment_bytes=64 * 1024)
        for i in range(0, 3000, 100):
            await asyncio.gather(*(s.append(rec(j, 500)) for j in range(i, i + 100)))
        assert len(s.segments) > 10
        b = Broker()
        seen_segments: list[int] = []
        await s.drain(b.send, once=True, progress=lambda p: seen_segments.append(len(s.segments)))
        assert b.got == [rec(j, 500) for j in range(3000)]
        assert seen_segments == sorted(seen_segments, reverse=True)  # deleted as they empty, oldest first
        assert not segments_in(tmp_path)
        s.close()

    asyncio.run(main())


def test_a_refused_window_is_sent_again_from_its_first_failure(tmp_path: Path) -> None:
    async def main() -> None:
        s = spool_in(tmp_path)
        await asyncio.gather(*(s.append(rec(i)) for i in range(DRAIN_WINDOW + 500)))
        down = {"yes": True}
        b = Broker(fail=lambda r: down["yes"] and r.key == b"id-700")
        first = await s.drain(b.send, once=True)
        assert first.drained == 700 and s.records == DRAIN_WINDOW + 500 - 700
        down["yes"] = False
        await s.drain(b.send, once=True)
        keys = [r.key for r in b.got]
        # Everything arrives; anything sent twice is a duplicate that the dedup table drops.
        assert set(keys) == {f"id-{i}".encode() for i in range(DRAIN_WINDOW + 500)}
        assert keys[:700] == [f"id-{i}".encode() for i in range(700)]
        s.close()

    asyncio.run(main())


def test_the_checkpoint_resumes_a_drain_after_a_restart(tmp_path: Path) -> None:
    async def main() -> None:
        s = spool_in(tmp_path)
        await asyncio.gather(*(s.append(rec(i)) for i in range(3000)))
        b = Broker(fail=lambda r: r.key == b"id-2500")
        await s.drain(b.send, once=True)
        s.close()
        again = spool_in(tmp_path)
        assert again.records == 500  # what the checkpoint says is on the broker is not counted again
        b2 = Broker()
        await again.drain(b2.send, once=True)
        assert [r.key for r in b2.got] == [f"id-{i}".encode() for i in range(2500, 3000)]
        again.close()

    asyncio.run(main())


def test_a_torn_tail_on_disk_is_skipped_and_the_rest_drains(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        s = spool_in(tmp_path)
        await asyncio.gather(*(s.append(rec(i)) for i in range(10)))
        s.close()
        truncate_last_segment(tmp_path, 7)  # the machine died mid-append
        assert status_of(tmp_path).corrupt_frames == 1
        again = spool_in(tmp_path)
        b = Broker()
        done = await again.drain(b.send, once=True)
        assert b.got == [rec(i) for i in range(9)] and done.corrupt == 1
        assert "torn or corrupt frame" in caplog.text
        assert not segments_in(tmp_path)
        again.close()

    asyncio.run(main())


def test_full_means_not_written(tmp_path: Path) -> None:
    async def main() -> None:
        s = spool_in(tmp_path, max_bytes=1024 * 1024)
        n = 0
        with pytest.raises(SpoolFull):
            while True:
                await s.append(rec(n, 10_000))
                n += 1
        s.close()
        again = spool_in(tmp_path, max_bytes=1024 * 1024)
        assert again.records == n  # every append that returned is on disk; the refused one is not
        assert again.bytes <= 1024 * 1024
        again.close()

    asyncio.run(main())


def test_one_process_per_directory(tmp_path: Path) -> None:
    s = spool_in(tmp_path)
    with pytest.raises(SpoolLocked):
        spool_in(tmp_path)
    assert status_of(tmp_path).in_use
    s.close()
    assert not status_of(tmp_path).in_use
    spool_in(tmp_path).close()


def test_process_zero_adopts_the_spools_of_workers_that_are_gone(tmp_path: Path) -> None:
    async def main() -> None:
        for index in (0, 1, 2):
            s = spool_in(process_dir(tmp_path, index))
            await s.append(rec(index))
            s.close()
        held = spool_in(process_dir(tmp_path, 1))  # worker 1 still runs: its spool is its own
        b = Broker()
        await adopt_orphans(tmp_path, 1, b.send, lambda: True)
        assert b.got == [rec(2)]
        assert not process_dir(tmp_path, 2).exists() and process_dir(tmp_path, 1).exists()
        held.close()

    asyncio.run(main())


def test_records_committed_while_the_drain_reads_its_last_window_are_not_deleted(tmp_path: Path) -> None:
    """The drain reads a window in a thread; an append can commit after that read and before the drain,
    finding nothing more, finishes the segment. The segment must then stay: those records were answered
    200."""

    async def main() -> None:
        s = spool_in(tmp_path)
        await s.append(rec(1))
        seg = s.segments[0]
        frames = s._read_window(seg)  # the drain's last read: one record, then the end of the file
        s.drain_off = frames[-1].end  # ... which the broker acknowledged
        await s.append(rec(2))  # committed after that read
        s._finish_segment(seg)
        b = Broker()
        await s.drain(b.send, once=True)
        assert b.got == [rec(2)] and s.records == 0
        s.close()

    asyncio.run(main())
