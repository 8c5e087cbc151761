"""Whether a copy of the dedup table still holds every changelog record up to the offset it reports.

A standby copy following a changelog partition has been seen to skip records its consumer dropped at a
rebalance (Faust 0.15.3 / aiokafka), its offset then moved past them: when the copy became the router's own,
recovery started from that offset, and the ids marked in the lost records were routed again. A gap cannot be
told from a record compaction removed, so a copy whose changelog skips offsets stops vouching for the
partition until its next assignment, which reads it from the beginning.

Only a copy that started from an offset is checked: one read from the beginning meets the compacted part of
the log, whose gaps are every record a later one with its key replaced. Checked there, each such read warned,
vouched for nothing, and every later assignment read the whole partition again. Both table stores
(processors/store.py, processors/rocks_store.py) keep their offsets by these rules.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from faust.types import EventT

from sentpipe import metrics as m

log = logging.getLogger("sentpipe.worker")


class ChangelogGaps:
    """The changelog partitions one store copy no longer vouches for, and those it reads from the start."""

    def __init__(self) -> None:
        self._gapped: set[int] = set()
        self._from_start: set[int] = set()

    def assigned(self, partition: int, offset: int | None) -> None:
        """Faust asked for the partition's offset: an assignment's recovery starts there (None: the
        beginning)."""
        self._gapped.discard(partition)
        if offset is None:
            self._from_start.add(partition)
        else:
            self._from_start.discard(partition)

    def vouches(self, partition: int) -> bool:
        return partition not in self._gapped

    def check(self, batch: Iterable[EventT[Any]], held: Callable[[int], int | None]) -> list[int]:
        """The partitions `batch` shows skipped offsets in (after `held(partition)`, the offset the copy
        reports, or between its records), no longer vouched for from now on: the store forgets their
        offsets."""
        gapped, unchecked = self._gapped, self._from_start
        last: dict[int, int] = {}
        found: list[int] = []
        for event in batch:
            msg = event.message
            partition, offset = msg.partition, msg.offset
            if partition in gapped or partition in unchecked:
                continue
            expected = last.get(partition)
            if expected is None:
                expected = held(partition)
            if expected is not None and offset > expected + 1:
                log.warning(
                    "dedup table changelog partition %d: offsets %d..%d never reached this copy; its next"
                    " assignment reads the partition from the beginning",
                    partition,
                    expected + 1,
                    offset - 1,
                )
                m.DEDUP_CHANGELOG_GAPS.inc()
                gapped.add(partition)
                found.append(partition)
                continue
            last[partition] = offset
        return found

    def clear(self) -> None:
        self._gapped.clear()
        self._from_start.clear()
