"""The spool's byte count (`sentpipe_spool_bytes`, and what SENTPIPE_SPOOL_MAX_BYTES is checked against)
against the files on disk, when a failed write could not be cut back either. Pure logic: the disk's
failures are injected."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from sentpipe.ingress.spool import SpoolError
from tests.test_spool import Broker, rec, segments_in, spool_in


def test_a_failed_write_that_could_not_be_cut_back_is_counted_in_the_spool_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seen in an audit: the segment's size took in the bytes of a write whose fdatasync failed and whose cut
    back failed too (the drain reads them), but the spool's byte count did not; once that segment was
    drained the count went below zero (the gauge said -N bytes for good), and the full check let the spool
    grow past SENTPIPE_SPOOL_MAX_BYTES by as much."""

    async def main() -> None:
        s = spool_in(tmp_path)
        await s.append(rec(0))
        failing = [True]

        def fdatasync(fd: int) -> None:
            if failing[0]:
                raise OSError(errno.EIO, "injected")

        def ftruncate(fd: int, length: int) -> None:
            raise OSError(errno.EIO, "injected")

        with monkeypatch.context() as patch:
            patch.setattr("sentpipe.ingress.spool.os.fdatasync", fdatasync)
            patch.setattr("sentpipe.ingress.spool.os.ftruncate", ftruncate)
            with pytest.raises(SpoolError):
                await s.append(rec(1))
        on_disk = sum(p.stat().st_size for p in segments_in(tmp_path))
        assert s.bytes == on_disk, (s.bytes, on_disk)
        assert REGISTRY.get_sample_value("sentpipe_spool_bytes") == on_disk
        await s.append(rec(2))
        b = Broker()
        await s.drain(b.send, once=True)
        # The one answered 503 too: a duplicate at worst (Sent sends it again; the dedup table drops one).
        assert [r.key for r in b.got] == [b"id-0", b"id-1", b"id-2"]
        assert not segments_in(tmp_path)
        assert s.bytes == 0 and REGISTRY.get_sample_value("sentpipe_spool_bytes") == 0
        s.close()

    asyncio.run(main())


def test_a_drained_segment_the_disk_will_not_delete_does_not_stop_the_drain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seen in an audit: a drained segment whose unlink failed (a filesystem remounted read-only after an
    error, EROFS) raised out of the drain, which retried that same unlink every 5 s for as long as it
    failed: every record behind it, each answered 200, stayed off the broker although it could be read and
    sent."""

    async def main() -> None:
        s = spool_in(tmp_path, segment_bytes=64 * 1024)
        for i in range(12):
            await s.append(rec(i, 20_000))
        assert len(s.segments) >= 3
        unlink = Path.unlink

        def refused(self: Path, missing_ok: bool = False) -> None:
            if self.suffix == ".seg":
                raise OSError(errno.EROFS, "Read-only file system", str(self))
            unlink(self, missing_ok=missing_ok)

        b = Broker()
        with monkeypatch.context() as patch:
            patch.setattr(Path, "unlink", refused)
            await s.drain(b.send, once=True)
        assert [r.key for r in b.got] == [f"id-{i}".encode() for i in range(12)]
        assert s.records == 0 and not s.segments
        s.close()

    asyncio.run(main())
