"""Loaded by a worker of role `all`: in its first projector process, the first commit never returns (as
librdkafka's did after a broker restart), and the projector gives up on a commit after 3 s, not 60, of the
broker answering. The process after it, started for the restart, commits as usual."""

from __future__ import annotations

import functools
import multiprocessing
import os
import threading
from collections.abc import Mapping
from pathlib import Path

from sentpipe import kafka
from sentpipe.broker import Partition
from sentpipe.processors import projector_process
from sentpipe.processors.projector import Tuning

_marker = Path(os.environ["TEST_RESTART_MARKER"])
_commit = kafka.BatchConsumer.commit


def _commit_that_hangs_once(self: kafka.BatchConsumer, offsets: Mapping[Partition, int]) -> None:
    if offsets and not _marker.exists():
        _marker.write_text(str(os.getpid()))
        threading.Event().wait()  # the consumer's thread, in the call, for good
    _commit(self, offsets)


if multiprocessing.current_process().name == "sentpipe-projector" and not _marker.exists():
    kafka.BatchConsumer.commit = _commit_that_hangs_once  # type: ignore[method-assign]
    # What ProjectorService builds its Tuning with, looked up when the service starts.
    projector_process.Tuning = functools.partial(Tuning, commit_stuck_s=3.0)  # type: ignore[attr-defined,misc,assignment]
