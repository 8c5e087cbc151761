"""The ingress's durable local spool: records the broker cannot take right now wait on disk until it can.

Layout: one directory per ingress process, holding numbered segment files and a drain checkpoint.

    <dir>/.lock                     flock()ed by the process that owns the spool
    <dir>/0000000000000001.seg      frames, appended only; a new segment past SENTPIPE_SPOOL_SEGMENT_BYTES
    <dir>/drain.pos                 {"segment": n, "offset": o}: everything before it is on the broker
    <dir>/refused.rec               records the broker refused for what they are (too large), set aside

A frame is `MAGIC | payload length (u32) | CRC-32 of the payload (u32) | payload`. A torn write (the process
or the machine died mid-append) leaves a frame whose length runs past the end of its file or whose CRC does
not match: it is counted, logged and skipped, and reading resumes at the next MAGIC that starts a valid
frame, so one bad frame never hides the records after it and is never misread as a record.

Appends are group-committed: the records of every request that arrives while one write+fdatasync is running
go out together in the next one, and each request is answered only after the fdatasync that covers its
record. A segment is deleted only when the drain has every record in it acknowledged by the broker; the
checkpoint is a hint (lost, the drain re-sends records, and the worker's dedup table drops them), so one that
does not fit the segments on disk is ignored rather than trusted with deleting anything.

A record the broker refuses for what it is (larger than a topic's limit) would stop the drain for good, and
every record behind it: it is set aside in refused.rec (fsynced, same framing) and the drain goes on. Each
start puts it back at the end of the spool, so it is sent again once the limit is fixed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import struct
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson

from sentpipe import metrics as m
from sentpipe.broker import QUEUE_FULL, Delivered, ProduceRejected
from sentpipe.kafka import AsyncProducer
from sentpipe.settings import Settings

log = logging.getLogger("sentpipe.ingress.spool")

MAGIC = b"\xf5spl"
_HEAD = struct.Struct(">4sII")  # magic, payload length, crc32(payload)
_FIXED = struct.Struct(">QHIIH")  # spooled_at_ms, topic length, key length, value length, header count
_HEADER = struct.Struct(">HI")  # header name length, header value length
MAX_FRAME = 256 * 1024**2  # a length beyond this is corruption, not a record (records are a few MiB at most)
READ_CHUNK = 4 * 1024**2
SEGMENT_SUFFIX = ".seg"
CHECKPOINT = "drain.pos"
REFUSED = "refused.rec"
MAX_CHECKPOINT = 2**62  # beyond it a checkpoint number is corruption (and not something JSON can carry back)
DRAIN_WINDOW = 2000  # records in flight to the broker at once while draining
DRAIN_BACKOFF_S = (0.25, 5.0)
# A drained record acknowledged this recently: the broker takes records, new ones go to it directly.
DRAIN_ACKED_FRESH_S = 1.0
CHECKPOINT_EVERY_S = 0.5


# After a write the disk refused, the pod is taken out of service this long; then requests try the disk again
# (a transient error clears, a full disk is met again and refused again).
WRITE_RETRY_S = 10.0


class SpoolFull(Exception):
    """SENTPIPE_SPOOL_MAX_BYTES reached: the record was not written."""


class SpoolError(Exception):
    """The disk refused the write (ENOSPC, EIO, ...): the record may not be durable and must not be acked."""


class SpoolLocked(Exception):
    """Another process owns this spool directory."""


class SegmentCut(Exception):
    """A segment's file is shorter (`size`) than what was written to it (`end`) when it was read."""

    def __init__(self, size: int, end: int) -> None:
        super().__init__(size, end)
        self.size, self.end = size, end


@dataclass(frozen=True, slots=True)
class SpoolRecord:
    topic: str
    key: bytes
    value: bytes
    headers: tuple[tuple[str, bytes], ...]
    spooled_at_ms: int


# --- framing (pure) ---------------------------------------------------------------------------------------
def encode_frame(rec: SpoolRecord) -> bytes:
    topic = rec.topic.encode()
    parts = [
        _FIXED.pack(rec.spooled_at_ms, len(topic), len(rec.key), len(rec.value), len(rec.headers)),
        topic,
        rec.key,
        rec.value,
    ]
    for name, value in rec.headers:
        raw = name.encode()
        parts += [_HEADER.pack(len(raw), len(value)), raw, value]
    payload = b"".join(parts)
    return _HEAD.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


def decode_payload(payload: bytes) -> SpoolRecord:
    """ValueError for anything that is not exactly one encoded record."""
    try:
        at, tlen, klen, vlen, nh = _FIXED.unpack_from(payload, 0)
        pos = _FIXED.size
        topic = payload[pos : pos + tlen].decode()
        pos += tlen
        key = payload[pos : pos + klen]
        pos += klen
        value = payload[pos : pos + vlen]
        pos += vlen
        headers = []
        for _ in range(nh):
            nlen, hlen = _HEADER.unpack_from(payload, pos)
            pos += _HEADER.size
            name = payload[pos : pos + nlen].decode()
            pos += nlen
            headers.append((name, payload[pos : pos + hlen]))
            pos += hlen
    except (struct.error, UnicodeDecodeError) as exc:
        raise ValueError(f"undecodable record: {exc}") from None
    if pos != len(payload) or len(key) != klen or len(value) != vlen:
        raise ValueError("record length does not match its fields")
    return SpoolRecord(topic, key, value, tuple(headers), at)


@dataclass(frozen=True, slots=True)
class Frame:
    start: int  # offsets within the buffer scanned
    end: int
    record: SpoolRecord | None  # None: a corrupt or torn region, skipped


def scan(buf: bytes | memoryview, *, final: bool) -> Iterator[Frame]:
    """The frames of `buf` in order, corrupt regions as Frame(record=None).

    With final=False an incomplete frame at the end is not reported (more bytes may come); with final=True
    (the end of a file) it is a torn write and reported as corrupt."""
    view = memoryview(buf)
    size = len(view)
    pos = 0
    while pos < size:
        bad_at: int | None = None
        if size - pos < _HEAD.size:
            if final:
                yield Frame(pos, size, None)
            return
        magic, length, crc = _HEAD.unpack_from(view, pos)
        if magic != MAGIC or length > MAX_FRAME:
            bad_at = pos
        elif pos + _HEAD.size + length > size:
            if not final:
                return
            bad_at = pos  # runs past the end: torn, unless a valid frame starts inside it
        else:
            payload = bytes(view[pos + _HEAD.size : pos + _HEAD.size + length])
            if zlib.crc32(payload) != crc:
                bad_at = pos
            else:
                try:
                    rec = decode_payload(payload)
                except ValueError:
                    bad_at = pos
                else:
                    end = pos + _HEAD.size + length
                    yield Frame(pos, end, rec)
                    pos = end
                    continue
        # Resynchronise: the next MAGIC after the bad one (a false MAGIC inside data fails its CRC in turn).
        nxt = bytes(view[bad_at + 1 :]).find(MAGIC)
        if nxt >= 0:
            end = bad_at + 1 + nxt
        elif final:
            end = size
        else:
            # A MAGIC may straddle the end of this read: stop where its first bytes begin, so the next read
            # sees it whole. Reported to the end, the intact record behind a corrupt one was lost too.
            end = size
            for k in range(len(MAGIC) - 1, 0, -1):
                if size - k > bad_at and view[size - k :] == MAGIC[:k]:
                    end = size - k
                    break
        yield Frame(bad_at, end, None)
        pos = end


def _retrieved(fut: asyncio.Future[None]) -> None:
    """Done callback of a record's future nobody awaits any more: its exception is not "never retrieved"."""
    if not fut.cancelled():
        fut.exception()


# --- the spool --------------------------------------------------------------------------------------------
@dataclass
class _Segment:
    seq: int
    path: Path
    size: int  # bytes known durable (committed appends; whole file for segments found at start)
    records: int  # records not yet acknowledged by the broker


@dataclass
class DrainProgress:
    drained: int
    remaining: int
    corrupt: int


class Spool:
    """One process's spool directory. Appends and drains run on one event loop; disk work runs in threads."""

    def __init__(
        self,
        directory: Path,
        max_bytes: int,
        segment_bytes: int,
        *,
        gauges: bool = True,
        write_timeout_s: float | None = None,
    ) -> None:
        self.dir = directory
        # How long a request waits for its record's write+fdatasync (None: for as long as it takes). A disk
        # that stops answering (an EBS or NFS stall) blocks fdatasync without an error: unbounded, every
        # request hung with it while the probes said the pod was fine.
        self.write_timeout_s = write_timeout_s
        self._write_started: float | None = None  # monotonic time the write in its thread began
        self._stall_logged: float | None = None
        self.gauges = gauges  # this process's own spool sets the spool gauges; an adopted one does not
        # Adopted orphans (see `adopt_orphans`): their records are answered 200 and not on Kafka either, so
        # they count in the gauges of the spool that adopted them, kept after their drain for what the
        # broker refused (it waits in their refused.rec).
        self.adopted: list[Spool] = []
        self._counted_in: Spool | None = None
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.segments: list[_Segment] = []  # oldest first; the last one takes appends
        self.bytes = 0  # on disk, in segments
        self.records = 0  # not yet acknowledged by the broker
        self.corrupt = 0  # frames skipped since open
        self._corrupt_noted = (0, 0)  # (segment, offset): corrupt frames before it are counted already
        self.refused = 0  # records set aside in REFUSED since open
        self.oldest_ms: int | None = None  # spooled_at of the oldest record not yet acknowledged
        self.drain_seg = 0  # where the drain goes on: segment seq and byte offset
        self.drain_off = 0
        self._lock_fd: int | None = None
        self._fd: int | None = None  # the segment taking appends (None: next append opens a new one)
        self._fd_seq = 0
        self._next_seq = 1
        self._pending: list[tuple[bytes, int, asyncio.Future[None]]] = []
        self._pending_bytes = 0
        self._writing_bytes = 0  # the batch in the writer's hands: in neither _pending_bytes nor bytes yet
        self._writer: asyncio.Task[None] | None = None
        self._gave_up: set[asyncio.Future[None]] = set()  # requests that stopped waiting for their write
        self._appended = asyncio.Event()
        self._checkpointed_at = 0.0
        self._full = False
        self._write_failed_at: float | None = None  # the disk refused the last write (monotonic time)
        # Last time a drain window ended (acknowledged or refused), or the spool started filling: a drain
        # that stops ending windows while records wait is hung. A broker that refuses is not (the oldest
        # record's age shows that).
        self.progress_at = time.monotonic()
        self.acked_at: float | None = None  # monotonic: the broker's last acknowledgement of a drained record

    # --- open / close ----------------------------------------------------------------------------------
    def open(self) -> None:
        """Take the directory (SpoolLocked if another process has it) and read what a previous run left."""
        fd = self._take_dir()
        if fd is None:
            raise SpoolLocked(f"spool directory {self.dir} is in use by another process")
        self._lock_fd = fd
        self._load(take_over=True)
        if (self.dir / REFUSED).is_file():
            # What a previous run set aside is tried again, behind everything else, as one more segment.
            seq = self._next_seq
            os.rename(self.dir / REFUSED, self._segment_path(seq))
            self._fsync_dir()
            log.warning("spool: sending records the broker refused before again (%s)", self.dir)
            self._load(take_over=True)
        if self.gauges:
            m.SPOOL_MAX_BYTES.set(self.max_bytes)
            m.SPOOL_OLDEST_AGE.set_function(self._oldest_age_counted)
        self._update_gauges()

    def _take_dir(self) -> int | None:
        """Make the directory if needed and lock it: the lock's fd, or None when another process holds it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def _segment_path(self, seq: int) -> Path:
        return self.dir / f"{seq:016d}{SEGMENT_SUFFIX}"

    def _segment_files(self) -> list[tuple[int, Path]]:
        """The segment files, oldest first: ordered by number (names outgrow their padding), foreign names
        and anything that is not a regular file left alone."""
        found = []
        for path in self.dir.glob("*" + SEGMENT_SUFFIX):
            stem = path.stem
            if stem.isascii() and stem.isdigit() and path.is_file():
                found.append((int(stem), path))
        return sorted(found)

    def _load(self, *, take_over: bool) -> int:
        """Read the segments a previous run left; the number of corrupt regions found in them. Only the
        owner (take_over) deletes segments that the checkpoint says are drained."""
        seg_no, offset = self._read_checkpoint()
        files = self._segment_files()
        # New segments are numbered past anything the checkpoint names, trusted or not: one that took its
        # number would otherwise be read from its offset, or have the segments before it deleted.
        self._next_seq = max(seg_no, files[-1][0] if files else 0) + 1
        present = dict(files)
        trusted = True
        if files and seg_no not in present and seg_no > files[-1][0]:
            # Past every segment while some remain: not a checkpoint this spool wrote (or the files were
            # restored from elsewhere). Trusting it would delete them all; ignoring it re-sends a few.
            trusted = False
        elif seg_no in present:
            with contextlib.suppress(FileNotFoundError):
                # Shorter than the checkpoint says: read all of it.
                trusted = offset <= present[seg_no].stat().st_size
        if not trusted:
            log.warning(
                "spool: checkpoint %s (segment %d, offset %d) does not fit the segments on disk: ignored"
                " (records sent twice are dropped downstream)",
                self.dir / CHECKPOINT,
                seg_no,
                offset,
            )
            # From the first segment: reading the one it names again from its start still trusted it to say
            # that the segments before it were drained, and they were deleted.
            seg_no, offset = 0, 0
        self.segments = []
        self.records = self.bytes = 0
        self.oldest_ms = None
        corrupt = 0
        for seq, path in files:
            if seq < seg_no and seg_no in present:  # drained before the last checkpoint; not yet deleted
                if take_over:
                    path.unlink(missing_ok=True)
                continue
            start = offset if seq == seg_no else 0
            try:
                with path.open("rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    f.seek(start)
                    data = f.read(max(0, size - start))
            except FileNotFoundError:
                continue  # drained and deleted by the process that owns it since the listing (`spool status`)
            records = 0
            oldest: int | None = None
            for frame in scan(data, final=True):
                if frame.record is None:
                    corrupt += 1
                    continue
                records += 1
                if oldest is None:
                    oldest = frame.record.spooled_at_ms
            self.segments.append(_Segment(seq, path, size, records))
            self.records += records
            self.bytes += size
            if self.oldest_ms is None:
                self.oldest_ms = oldest
        if self.segments:
            first = self.segments[0]
            self.drain_seg, self.drain_off = first.seq, (offset if first.seq == seg_no else 0)
        if not trusted and take_over:
            self._write_checkpoint(force=True)
        return corrupt

    def oldest_age_s(self) -> float:
        return 0.0 if self.oldest_ms is None else max(0.0, time.time() - self.oldest_ms / 1000)

    def _oldest_age_counted(self) -> float:
        return max(s.oldest_age_s() for s in (self, *self.adopted))

    def count_in(self, owner: Spool) -> None:
        """This (adopted) spool's records count in `owner`'s gauges from now on."""
        self._counted_in = owner
        owner.adopted.append(self)
        owner._update_gauges()

    def _note_corrupt(self, seg: _Segment, frame: Frame, *, at_magic: bool) -> None:
        """`at_magic`: the region starts at a frame's magic bytes (a frame of its own, torn or corrupt)."""
        # Once: a window sent again after a failure reads the corrupt frames behind that failure again.
        if (seg.seq, frame.start) < self._corrupt_noted:
            return
        # A region that no magic starts, right where the last one ended, is the rest of that one: cut by the
        # end of a read (READ_CHUNK), it was counted once per read it spanned.
        rest = not at_magic and (seg.seq, frame.start) == self._corrupt_noted
        self._corrupt_noted = (seg.seq, frame.end)
        if rest:
            return
        path = seg.path
        self.corrupt += 1
        m.SPOOL_CORRUPT.inc()
        log.warning(
            "spool: skipped %d unreadable bytes in %s at offset %d (torn or corrupt frame)",
            frame.end - frame.start,
            path.name,
            frame.start,
        )

    async def settle(self, timeout_s: float | None = None) -> bool:
        """Wait (at most `timeout_s`) for the writes in hand and queued; True when none is left."""
        writer = self._writer
        if writer is not None and not writer.done():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await asyncio.shield(writer)
        return not self._writer_busy

    def close(self) -> None:
        if self._writer_busy:
            # A thread still writes the segment (a disk that does not answer): its fd and the directory's
            # lock stay open until the process exits, never closed (and their numbers reused) under it.
            return
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # --- state -------------------------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        """Records wait in the spool (or are being written)."""
        return self.records > 0 or bool(self._pending) or self._writer_busy

    @property
    def holds_new_records(self) -> bool:
        """Whether a new record goes into the spool without trying the broker: records wait in it and the
        broker has not acknowledged a drained record for DRAIN_ACKED_FRESH_S (or refused one since). Behind
        them while the broker takes nothing, so a broker gone silently costs one produce timeout, not one per
        request; around them once it takes the drain's records (Sent keeps no order, so nothing downstream
        relies on it). Always behind, a busy ingress went on answering from one disk for as long as its
        traffic lasted after a broker blip: the spool is empty only in a pause between requests."""
        if not self.active:
            return False
        acked = self.acked_at
        return acked is None or time.monotonic() - acked > DRAIN_ACKED_FRESH_S

    @property
    def _writer_busy(self) -> bool:
        return self._writer is not None and not self._writer.done()

    @property
    def full(self) -> bool:
        """A record was refused for lack of room, and no segment has been drained since."""
        return self._full

    def write_running_s(self) -> float:
        """How long the write+fdatasync in hand has been running; 0 when none is."""
        started = self._write_started
        return 0.0 if started is None else time.monotonic() - started

    @property
    def write_stalled(self) -> bool:
        """The write in hand has run longer than a request may wait for it: the disk is not answering."""
        bound = self.write_timeout_s
        return bound is not None and self.write_running_s() > bound

    @property
    def takes_records(self) -> bool:
        """What readiness reads while the broker is away. Not while full, nor for `WRITE_RETRY_S` after the
        disk refused a write (full, EIO) or did not finish one in time, nor while such a write still runs: a
        pod whose spool disk failed answered /readyz 200 "spooling" and stayed in service, every delivery
        refused with 503, the outage alert silent."""
        if self._full or self.write_stalled:
            return False
        failed = self._write_failed_at
        return failed is None or time.monotonic() - failed >= WRITE_RETRY_S

    @property
    def refusal(self) -> str:
        """Why it takes no records now, for /readyz (read when `takes_records` is False)."""
        if self._full:
            return "the spool is full"
        if self.write_stalled:
            return f"the spool's disk has not finished a write for {self.write_running_s():.0f} s"
        return "the spool's disk refused a write"

    def _write_timed_out(self) -> SpoolError:
        """A request stops waiting for a write its disk has not finished: counted as a failed write, and the
        pod out of service as after one. The write itself goes on: should it land after all, its record is
        drained although the request got 503 (a duplicate; Sent retries it)."""
        self._write_failed_at = time.monotonic()
        running = self.write_running_s()
        if self._write_started is not None and self._stall_logged != self._write_started:
            self._stall_logged = self._write_started  # once per stalled write, not once per request
            m.SPOOL_WRITE_ERRORS.inc()
            log.error(
                "spool: a write to %s has not finished for %.1f s (disk not answering): deliveries get 503"
                " spool_write_failed until it does",
                self.dir,
                running,
            )
        return SpoolError(f"spool write not finished after {running:.1f} s (disk not answering)")

    def _update_gauges(self) -> None:
        if self._counted_in is not None:
            self._counted_in._update_gauges()
            return
        if not self.gauges:
            return
        counted = (self, *self.adopted)
        m.SPOOL_RECORDS.set(sum(s.records for s in counted))
        m.SPOOL_BYTES.set(self.bytes)  # what SENTPIPE_SPOOL_MAX_BYTES limits: this process's own segments
        m.SPOOL_REFUSED_RECORDS.set(sum(s.refused for s in counted))

    # --- appends -----------------------------------------------------------------------------------------
    async def append(self, rec: SpoolRecord) -> None:
        """Return once `rec` is fsynced. SpoolFull: no room under SENTPIPE_SPOOL_MAX_BYTES; SpoolError: the
        disk failed."""
        if self.write_stalled:
            # The disk has not finished the write in hand within a request's wait: the records queued behind
            # it would wait as long, so the answer is 503 now, not after the timeout.
            raise self._write_timed_out()
        frame = encode_frame(rec)
        taken = self.bytes + self._writing_bytes + self._pending_bytes
        if taken + len(frame) > self.max_bytes:
            # Into an empty spool the record does not fit for its own size: the spool is not full (readiness
            # reads `_full`, cleared only once a segment is drained, which an empty spool never is).
            self._full = taken > 0
            raise SpoolFull(f"spool is full ({taken} of {self.max_bytes} bytes, writes in hand included)")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((frame, rec.spooled_at_ms, fut))
        self._pending_bytes += len(frame)
        if not self._writer_busy:
            self._writer = asyncio.get_running_loop().create_task(self._commit())
        # A request that goes away still has its record written: it will be drained (a duplicate at worst).
        if self.write_timeout_s is None:
            await asyncio.shield(fut)
            return
        try:
            async with asyncio.timeout(self.write_timeout_s):
                await asyncio.shield(fut)
        except TimeoutError:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                return  # written in the turn the wait ran out: durable, so answered 200 after all
            fut.add_done_callback(_retrieved)  # its late failure, if any, is logged by _commit already
            self._gave_up.add(fut)  # answered 503: not counted as spooled should the write land
            raise self._write_timed_out() from None

    async def _commit(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            self._pending_bytes -= sum(len(f) for f, _, _ in batch)
            data = b"".join(f for f, _, _ in batch)
            self._writing_bytes = len(data)
            t0 = time.perf_counter()
            self._write_started = time.monotonic()
            try:
                seq, path, size = await asyncio.to_thread(self._write, data)
            except OSError as exc:
                log.error("spool: write to %s failed: %s", self.dir, exc)
                if self._stall_logged != self._write_started:  # not counted already as stalled
                    m.SPOOL_WRITE_ERRORS.inc()
                self._write_failed_at = time.monotonic()
                self._abandon_segment()
                if not self.segments and not self._pending:
                    # A record refused beside these bytes marked the spool full; with them gone it is empty,
                    # and an empty spool drains no segment, the only other thing that clears the mark.
                    self._full = False
                self._gave_up.difference_update(fut for _, _, fut in batch)
                for _, _, fut in batch:
                    if not fut.done():
                        fut.set_exception(SpoolError(f"spool write failed ({exc.strerror or exc})"))
                continue
            finally:
                if self.write_stalled:  # its requests were answered 503 meanwhile: say the disk is back
                    log.warning("spool: a write to %s ended after %.0f s", self.dir, self.write_running_s())
                self._write_started = None
                self._writing_bytes = 0  # in self.bytes below (no await between), or nowhere: it failed
            m.SPOOL_FSYNC_SECONDS.observe(time.perf_counter() - t0)
            self._write_failed_at = None
            if not self.segments or self.segments[-1].seq != seq:
                self.segments.append(_Segment(seq, path, 0, 0))
                if len(self.segments) == 1:
                    self.drain_seg, self.drain_off = seq, 0
            if self.records == 0:
                self.progress_at = time.monotonic()  # a drain's clock starts when there is work
            seg = self.segments[-1]
            seg.size = size
            seg.records += len(batch)
            self.records += len(batch)
            self.bytes += len(data)
            if self.oldest_ms is None:
                self.oldest_ms = batch[0][1]
            answered = len(batch)
            if self._gave_up:
                answered -= sum(1 for _, _, fut in batch if fut in self._gave_up)
                self._gave_up.difference_update(fut for _, _, fut in batch)
            m.SPOOL_SPOOLED.inc(answered)
            self._update_gauges()
            for _, _, fut in batch:
                if not fut.done():
                    fut.set_result(None)
            self._appended.set()

    def _write(self, data: bytes) -> tuple[int, Path, int]:
        """In a thread: append to the current segment (a new one past the segment size) and fdatasync. On an
        OSError the segment is cut back to what was committed before (a new one removed), so a write the disk
        refused leaves neither a torn frame nor a record that was answered 503 to be drained later."""
        committed = 0
        if self._fd is not None:
            committed = os.fstat(self._fd).st_size
            if committed >= self.segment_bytes:
                os.close(self._fd)
                self._fd = None
        created = self._fd is None
        if self._fd is None:
            seq, self._next_seq = self._next_seq, self._next_seq + 1
            path = self._segment_path(seq)
            if not self._holds_dir():
                self._retake_dir()
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self._fd_seq = seq
            committed = 0
        fd, seq = self._fd, self._fd_seq
        try:
            if created:
                self._fsync_dir()  # the new file's name is as durable as its contents
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fdatasync(fd)
            st = os.fstat(fd)
            if st.st_nlink == 0:
                # Deleted under us (the directory removed by hand or by a cleanup job): a write that lands
                # only in an unlinked file dies with the process, although its request was answered 200.
                raise FileNotFoundError(errno.ENOENT, "spool segment deleted while in use", str(self.dir))
        except OSError:
            self._fd = None
            with contextlib.suppress(OSError):
                os.ftruncate(fd, committed)
            with contextlib.suppress(OSError):
                os.close(fd)
            if created:
                with contextlib.suppress(OSError):
                    os.unlink(self._segment_path(seq))
            raise
        return seq, self._segment_path(seq), st.st_size

    def _holds_dir(self) -> bool:
        """The lock this spool holds is still its directory's. Removed and made again by another process
        (which then holds the new lock), the directory is theirs: a spool that only checked that the
        directory existed went on writing segments into it, which the other's next start could delete."""
        if self._lock_fd is None:
            return False
        try:
            mine, there = os.fstat(self._lock_fd), os.stat(self.dir / ".lock")
        except FileNotFoundError:
            return False
        return mine.st_nlink > 0 and (mine.st_ino, mine.st_dev) == (there.st_ino, there.st_dev)

    def _retake_dir(self) -> None:
        """In a thread: the directory was removed while the spool ran. Make it and lock it again, so the
        requests that follow are spooled (each answered only once on disk there) instead of refused."""
        fd = self._take_dir()
        if fd is None:
            raise OSError(errno.EBUSY, "spool directory re-created and taken by another process")
        old, self._lock_fd = self._lock_fd, fd
        if old is not None:
            os.close(old)
        log.error("spool: directory %s was removed while in use: created again", self.dir)

    def _abandon_segment(self) -> None:
        """After a failed write appends go to a new segment. Should the cut back have failed too, the drain
        reads the whole file: a torn frame there is skipped, a whole one drained although its request got
        503 (a duplicate)."""
        if self.segments:
            seg = self.segments[-1]
            with contextlib.suppress(OSError):
                size = seg.path.stat().st_size
                if size > seg.size:  # shorter is a cut, the drain's to find and report (`_cut_short`)
                    # Counted as the drain will subtract them: else the count went below zero once the
                    # segment was drained, and the spool grew past its limit by as much.
                    self.bytes += size - seg.size
                    seg.size = size
                    self._update_gauges()

    def _fsync_dir(self) -> None:
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # --- drain -------------------------------------------------------------------------------------------
    def _read_checkpoint(self) -> tuple[int, int]:
        try:
            data = orjson.loads((self.dir / CHECKPOINT).read_bytes())
            seg_no, offset = data["segment"], data["offset"]
        except (OSError, ValueError, KeyError, TypeError):
            return 0, 0
        if not all(type(v) is int and 0 <= v < MAX_CHECKPOINT for v in (seg_no, offset)):
            return 0, 0
        return seg_no, offset

    def _write_checkpoint(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checkpointed_at < CHECKPOINT_EVERY_S:
            return
        self._checkpointed_at = now
        tmp = self.dir / (CHECKPOINT + ".tmp")
        # No fsync: a lost checkpoint only means records drained again (and dropped by the dedup table). For
        # the same reason a checkpoint the disk refuses (full, say) must not stop the drain that frees it.
        try:
            tmp.write_bytes(orjson.dumps({"segment": self.drain_seg, "offset": self.drain_off}))
            tmp.replace(self.dir / CHECKPOINT)
        except OSError as exc:
            log.warning("spool: could not write the drain checkpoint in %s: %s", self.dir, exc)

    async def drain(
        self,
        send: Callable[[SpoolRecord], asyncio.Future[Delivered]],
        *,
        can_send: Callable[[], bool] = lambda: True,
        progress: Callable[[DrainProgress], None] | None = None,
        once: bool = False,
    ) -> DrainProgress:
        """Produce the spooled records oldest first, DRAIN_WINDOW at a time, and delete what the broker has.

        A failed window is sent again from its first failed record after a backoff (records after it that
        did land are sent twice: the dedup table drops them). Runs until cancelled; with once=True it
        returns when the spool is empty or a window fails."""
        try:
            return await self._drain(send, can_send, progress, once)
        finally:
            # Cancelled too (Ctrl-C in `spool drain`): the checkpoint, written at most every few seconds, was
            # left behind what the broker had acknowledged, which the next drain sent again.
            self._write_checkpoint(force=True)

    async def _drain(
        self,
        send: Callable[[SpoolRecord], asyncio.Future[Delivered]],
        can_send: Callable[[], bool],
        progress: Callable[[DrainProgress], None] | None,
        once: bool,
    ) -> DrainProgress:
        drained = 0
        delay = DRAIN_BACKOFF_S[0]
        while True:
            if not self.segments or (not can_send() and not once):
                if once:
                    break
                self._appended.clear()
                if not self.segments:
                    await self._appended.wait()
                else:
                    # Waiting for the broker is not a stall: the drain's clock (`progress_at`, what liveness
                    # reads) runs only while it could send.
                    self.progress_at = time.monotonic()
                    await asyncio.sleep(DRAIN_BACKOFF_S[0])
                continue
            seg = self.segments[0]
            try:
                frames = await asyncio.to_thread(self._read_window, seg)
            except FileNotFoundError:
                self._drop_vanished(seg)
                continue
            except SegmentCut as cut:
                self._cut_short(seg, cut)
                continue
            if not frames:
                if self._finish_segment(seg):
                    continue
                # The current segment is drained up to what is committed; wait for more appends.
                if once:
                    break
                self._appended.clear()
                await self._appended.wait()
                continue
            records = [f.record for f in frames if f.record is not None]
            futs: list[asyncio.Future[Delivered]] = []
            refused: BaseException | None = None
            queue_full = False
            for rec in records:
                try:
                    futs.append(send(rec))
                except ProduceRejected as exc:
                    # The producer's queue full (of these and the requests' records): the window ends here and
                    # the rest go in the next one. A failure, it paused the drain with a growing backoff.
                    queue_full = exc.reason == QUEUE_FULL
                    refused = None if queue_full else exc
                    break
            for fut in futs:
                # Each acknowledgement, not the window's end: a window longer than DRAIN_ACKED_FRESH_S (a big
                # backlog) sent new requests behind the spool again until it ended.
                fut.add_done_callback(self._acked)
            results: list[Delivered | BaseException] = list(
                await asyncio.gather(*futs, return_exceptions=True)
            )
            if refused is not None:
                results.append(refused)
            ok = passed = 0  # acknowledged; acknowledged or set aside
            failure: BaseException | None = None
            for i, result in enumerate(results):
                if isinstance(result, BaseException):
                    if (
                        isinstance(result, ProduceRejected)
                        and not result.temporary
                        and await asyncio.to_thread(self._set_aside, records[i], result.reason)
                    ):
                        passed += 1
                        continue
                    failure = result
                    break
                ok += 1
                passed += 1
            # Advance past every frame before the first failure (corrupt regions included).
            acked_until = self.drain_off
            done_records = 0
            for frame in frames:
                if frame.record is not None:
                    if done_records == passed:
                        break
                    done_records += 1
                acked_until = frame.end
            if passed == len(records):
                acked_until = frames[-1].end
            self.drain_off = acked_until
            self.progress_at = time.monotonic()
            if failure is not None:
                self.acked_at = None  # the broker refused: new requests go behind the spool again
            # Never below zero: a segment's tail read whole after a failed write holds records never counted.
            seg.records = max(0, seg.records - passed)
            self.records = max(0, self.records - passed)
            drained += ok
            m.SPOOL_DRAINED.inc(ok)
            self.oldest_ms = self._next_oldest(frames, acked_until)
            self._write_checkpoint()
            self._update_gauges()
            if progress is not None:
                progress(DrainProgress(drained, self.records, self.corrupt))
            if failure is not None:
                reason = failure.reason if isinstance(failure, ProduceRejected) else repr(failure)
                log.warning("spool: drain paused, broker refused a record (%s); retrying", reason)
                if once:
                    break
                await asyncio.sleep(delay)
                delay = min(delay * 2, DRAIN_BACKOFF_S[1])
            else:
                delay = DRAIN_BACKOFF_S[0]
                if queue_full and not futs:  # full of the requests' records: let the producer send some
                    await asyncio.sleep(DRAIN_BACKOFF_S[0])
        return DrainProgress(drained, self.records, self.corrupt)

    async def run(
        self,
        send: Callable[[SpoolRecord], asyncio.Future[Delivered]],
        can_send: Callable[[], bool],
    ) -> None:
        """The ingress's background drain: `drain` for as long as the process runs, restarted after an
        unexpected error (a disk read failing) so spooled records are never left behind silently."""
        while True:
            try:
                await self.drain(send, can_send=can_send)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("spool: drain failed; retrying in %.0f s", DRAIN_BACKOFF_S[1])
                await asyncio.sleep(DRAIN_BACKOFF_S[1])

    def _next_oldest(self, frames: Sequence[Frame], acked_until: int) -> int | None:
        if self.records == 0:
            return None
        for frame in frames:
            if frame.start >= acked_until and frame.record is not None:
                return frame.record.spooled_at_ms
        return self.oldest_ms  # the next record is beyond this window; refreshed on the next one

    def _acked(self, fut: asyncio.Future[Delivered]) -> None:
        if not fut.cancelled() and fut.exception() is None:
            self.acked_at = time.monotonic()

    def _read_window(self, seg: _Segment) -> list[Frame]:
        """In a thread: up to DRAIN_WINDOW frames of `seg` from the drain position, within its durable
        size."""
        if self.drain_seg != seg.seq:
            self.drain_seg, self.drain_off = seg.seq, 0
        end = seg.size
        out: list[Frame] = []
        start = self.drain_off
        with seg.path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < end:
                # Read to its old end, the drain found no bytes where it expected frames and never moved on.
                raise SegmentCut(size, end)
            while start < end and len(out) < DRAIN_WINDOW:
                f.seek(start)
                data = f.read(min(READ_CHUNK, end - start))
                # The last read of a file that is sealed (or fully committed) may end in a torn frame.
                final = start + len(data) >= end
                got = 0
                for frame in scan(data, final=final):
                    at_magic = data[frame.start : frame.start + len(MAGIC)] == MAGIC
                    frame = Frame(start + frame.start, start + frame.end, frame.record)
                    if frame.record is None:
                        self._note_corrupt(seg, frame, at_magic=at_magic)
                    out.append(frame)
                    got = frame.end - start
                    if len(out) >= DRAIN_WINDOW:
                        break
                if got == 0:
                    if len(data) < end - start:  # one frame larger than the chunk: read it whole
                        f.seek(start)
                        data = f.read(end - start)
                        for frame in scan(data, final=True):
                            at_magic = data[frame.start : frame.start + len(MAGIC)] == MAGIC
                            frame = Frame(start + frame.start, start + frame.end, frame.record)
                            if frame.record is None:
                                self._note_corrupt(seg, frame, at_magic=at_magic)
                            out.append(frame)
                            break
                        if out:
                            start = out[-1].end
                            continue
                    break
                start += got
        return out

    def _set_aside(self, rec: SpoolRecord, reason: str) -> bool:
        """In a thread: keep a record the broker refuses for what it is in REFUSED (fsynced), so the drain can
        go past it. False if the disk refused that too: the drain then waits and tries the record again."""
        path = self.dir / REFUSED
        try:
            created = not path.exists()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                before = os.fstat(fd).st_size
                try:
                    view = memoryview(encode_frame(rec))
                    while view:
                        view = view[os.write(fd, view) :]
                    os.fdatasync(fd)
                except OSError:
                    with contextlib.suppress(OSError):
                        os.ftruncate(fd, before)  # no torn frame to report as corrupt at the next start
                    raise
            finally:
                os.close(fd)
            if created:
                self._fsync_dir()
        except OSError as exc:
            log.error("spool: could not set aside a record the broker refused (%s): %s", reason, exc)
            return False
        self.refused += 1
        m.SPOOL_REFUSED.inc()
        log.error(
            "spool: the broker refused record %r for %s (%s, %d bytes): kept in %s, sent again at the next"
            " start; the drain goes on",
            rec.key[:256].decode(errors="replace"),
            rec.topic,
            reason,
            len(rec.value),
            path,
        )
        return True

    def _cut_short(self, seg: _Segment, cut: SegmentCut) -> None:
        """`seg`'s file is shorter than what was written to it (cut by hand, a filesystem repair): what was
        past its new end cannot be sent. Said loudly; the drain goes on with what is left."""
        size = cut.size
        log.error(
            "spool: segment %s was cut from %d to %d bytes while its records were not all on the broker yet:"
            " the records past its new end are lost",
            seg.path,
            cut.end,
            size,
        )
        self.bytes -= cut.end - size
        if seg.size == cut.end:
            seg.size = size
        # Else a write landed since the read, at the file's new end (O_APPEND), and set the size to the
        # file's: its records, answered 200, start at the cut, where the drain goes on.
        if self.drain_seg == seg.seq:
            self.drain_off = min(self.drain_off, size)

    def _drop_vanished(self, seg: _Segment) -> None:
        """`seg`'s file is gone (deleted by hand, or with the directory): what it held cannot be sent. Said
        loudly, and the drain goes on with the next segment instead of failing on it forever."""
        log.error(
            "spool: segment %s was deleted while %d of its records were not on the broker yet: they are lost",
            seg.path,
            seg.records,
        )
        if seg is self.segments[-1] and self._fd is not None and not self._writer_busy:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        self.segments.remove(seg)
        self.records = max(0, self.records - seg.records)
        self.bytes = max(0, self.bytes - seg.size)
        self._full = False
        if self.segments:
            self.drain_seg, self.drain_off = self.segments[0].seq, 0
        else:
            self.oldest_ms = None
        self._update_gauges()

    def _finish_segment(self, seg: _Segment) -> bool:
        """The drain reached the end of `seg`: delete it if nothing can be appended to it any more. True when
        the drain may go on with the next segment."""
        if self.drain_off < seg.size:
            # Records were committed after the window was read (the read runs in a thread): not the end.
            return True
        is_current = seg is self.segments[-1]
        if is_current and (self._pending or self._writer_busy):
            return False
        if is_current and self._fd is not None:
            os.close(self._fd)  # the next append opens a new segment
            self._fd = None
        try:
            seg.path.unlink(missing_ok=True)
        except OSError as exc:
            # A filesystem remounted read-only, say. Raised, the drain retried this unlink for as long as it
            # failed and no record behind it reached the broker; left, its records are sent again after a
            # restart (the dedup table drops them).
            log.error("spool: could not delete drained segment %s (%s): left on disk", seg.path, exc)
        self.segments.pop(0)
        self.bytes -= seg.size
        self._full = False
        self.records -= seg.records  # only records lost to corruption can remain counted here
        seg.records = 0
        if self.segments:
            self.drain_seg, self.drain_off = self.segments[0].seq, 0
        else:
            self.drain_seg, self.drain_off = seg.seq, seg.size
            self.records = 0
            self.oldest_ms = None
        self._write_checkpoint(force=True)
        self._update_gauges()
        return True


@dataclass(frozen=True)
class SpoolStatus:
    dir: Path
    in_use: bool  # an ingress process holds it
    segments: int
    records: int  # not on the broker yet, those set aside (`refused`) included
    bytes: int
    oldest_age_s: float | None
    corrupt_frames: int
    refused: int = 0  # set aside after the broker refused them for what they are


def status_of(directory: Path) -> SpoolStatus:
    """What `sentpipe spool status` shows for one directory, read without taking it over."""
    spool = Spool(directory, max_bytes=1, segment_bytes=1)
    corrupt = spool._load(take_over=False)
    refused = refused_records(directory)
    return SpoolStatus(
        dir=directory,
        in_use=is_locked(directory),
        segments=len(spool.segments),
        records=spool.records + refused,
        bytes=spool.bytes,
        oldest_age_s=None if spool.oldest_ms is None else spool.oldest_age_s(),
        corrupt_frames=corrupt,
        refused=refused,
    )


def refused_records(directory: Path) -> int:
    """Records set aside in `directory` because the broker refused them."""
    try:
        data = (directory / REFUSED).read_bytes()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return 0
    return sum(1 for frame in scan(data, final=True) if frame.record is not None)


def is_locked(directory: Path) -> bool:
    try:
        fd = os.open(directory / ".lock", os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops a lock taken here
    return False


def process_dir(root: Path, index: int) -> Path:
    """Each ingress process (SENTPIPE_INGRESS_WORKERS) has its own directory under SENTPIPE_SPOOL_DIR."""
    return root / f"ingress-{index}"


async def adopt_orphans(
    root: Path,
    workers: int,
    send: Callable[[SpoolRecord], asyncio.Future[Delivered]],
    can_send: Callable[[], bool],
    counted_in: Spool | None = None,
) -> None:
    """Drain the directories of process indexes >= `workers` that no process holds (left behind when
    SENTPIPE_INGRESS_WORKERS went down), then remove them. Run by process 0. A directory that still holds
    records the broker refused, or anything sentpipe did not put there, is kept (and `spool status` shows
    it); one that fails is logged and the others go on."""
    for path in process_dirs(root):
        index = int(path.name.removeprefix("ingress-"))
        if index < workers:
            continue
        try:
            await _adopt(path, send, can_send, counted_in)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("spool: could not drain the orphaned spool directory %s; it stays", path)


async def _adopt(
    path: Path,
    send: Callable[[SpoolRecord], asyncio.Future[Delivered]],
    can_send: Callable[[], bool],
    counted_in: Spool | None,
) -> None:
    orphan = Spool(path, max_bytes=1, segment_bytes=1, gauges=False)
    try:
        orphan.open()
    except (SpoolLocked, OSError):
        return
    if counted_in is not None:
        orphan.count_in(counted_in)
    try:
        if orphan.records:
            log.warning("spool: draining %d records left in %s", orphan.records, path)
        while orphan.segments:
            if can_send():
                await orphan.drain(send, once=True)
            if orphan.segments:
                await asyncio.sleep(DRAIN_BACKOFF_S[0])
        if orphan.refused:
            log.error("spool: %s keeps %d records the broker refused; not removed", path, orphan.refused)
            return
        foreign = _remove_drained(path)
        if foreign:
            log.warning("spool: %s drained but kept: it holds files not the spool's: %s", path, foreign)
    finally:
        orphan.close()


def _remove_drained(path: Path) -> list[str]:
    """Remove a drained process directory; what it holds that the spool did not put there (then it stays)."""
    ours = {".lock", CHECKPOINT, CHECKPOINT + ".tmp"}
    foreign = sorted(p.name for p in path.iterdir() if p.name not in ours)
    if foreign:
        return foreign
    for name in ours:
        (path / name).unlink(missing_ok=True)
    path.rmdir()
    return []


def process_dirs(root: Path) -> list[Path]:
    """Every process directory under SENTPIPE_SPOOL_DIR, in index order."""
    found = []
    for path in root.glob("ingress-*"):
        suffix = path.name.removeprefix("ingress-")
        if path.is_dir() and suffix.isdigit():
            found.append((int(suffix), path))
    return [path for _, path in sorted(found)]


def spool_dirs_at(path: Path) -> list[Path]:
    """The process directories `path` names: itself when it is one, those under it when it is a spool root.
    SpoolError for anything else: a drain of it would find nothing and leave a lock file behind."""
    if not path.is_dir():
        raise SpoolError(f"no spool directory at {path}")
    if (path / ".lock").exists() or any(path.glob("*" + SEGMENT_SUFFIX)):
        return [path]
    under = process_dirs(path)
    if under:
        return under
    raise SpoolError(
        f"{path} is not a spool directory (no segments, no lock, no ingress-N directories): give a "
        "process's directory or the SENTPIPE_SPOOL_DIR that holds them"
    )


@dataclass(frozen=True)
class DrainOutcome:
    dir: Path
    # drained | empty | in_use (an ingress holds it: it drains it itself) | incomplete | interrupted (Ctrl-C
    # or SIGTERM during its pass) | not_reached (its turn had not come)
    state: str
    drained: int
    remaining: int
    corrupt: int


async def drain_directories(
    settings: Settings, dirs: Sequence[Path], progress: Callable[[int, int], None] | None = None
) -> list[DrainOutcome]:
    """`sentpipe spool drain`: one pass over spool directories no process holds, each to the broker and
    deleted as it empties. A window the broker refuses ends that directory's pass (state incomplete).

    A cancellation (asyncio.run's answer to Ctrl-C) ends the pass and returns what it did: the directory in
    hand `interrupted`, those after it `not_reached`. It ended in a bare "interrupted" that said nothing of
    how far the drain got. A second one is raised."""
    producer = AsyncProducer.from_settings(settings)
    await producer.start()
    outcomes = []
    interrupted = False
    try:
        spools: list[tuple[Path, Spool | None]] = []
        seen: set[Path] = set()
        for path in dirs:
            if path.resolve() in seen:  # named twice: its own lock would call it in use by another process
                continue
            seen.add(path.resolve())
            held = Spool(path, settings.spool_max_bytes, settings.spool_segment_bytes, gauges=False)
            try:
                held.open()
            except SpoolLocked:
                spools.append((path, None))
                continue
            spools.append((path, held))
        total = sum(s.records for _, s in spools if s is not None)
        done = 0
        for path, spool in spools:
            if spool is None:
                outcomes.append(DrainOutcome(path, "in_use", 0, status_of(path).records, 0))
                continue
            try:
                if not spool.segments:
                    outcomes.append(DrainOutcome(path, "empty", 0, 0, 0))
                    continue
                if interrupted:
                    outcomes.append(DrainOutcome(path, "not_reached", 0, spool.records + spool.refused, 0))
                    continue
                before = done
                so_far = DrainProgress(0, spool.records, 0)

                def report(p: DrainProgress, before: int = before) -> None:
                    nonlocal so_far
                    so_far = p
                    if progress is not None:
                        progress(before + p.drained, total)

                try:
                    result = await spool.drain(
                        lambda rec: producer.produce(rec.topic, rec.key, rec.value, rec.headers),
                        once=True,
                        progress=report,
                    )
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if task is None or task.uncancel() > 0:  # asked twice: stop now
                        raise
                    interrupted = True
                    done += so_far.drained
                    left = spool.records + spool.refused
                    outcomes.append(DrainOutcome(path, "interrupted", so_far.drained, left, so_far.corrupt))
                    continue
                done += result.drained
                state = "drained" if not spool.segments and not spool.refused else "incomplete"
                left = spool.records + spool.refused
                outcomes.append(DrainOutcome(path, state, result.drained, left, result.corrupt))
            finally:
                spool.close()
    finally:
        await producer.close(timeout=settings.produce_timeout_s * 2)
    return outcomes
