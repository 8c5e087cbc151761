"""The dedup table's RocksDB store: Faust's, with the changelog gap rules of processors/changelog_gaps.py.

Faust's RocksDB store moves a partition's persisted offset to the last record of every changelog batch it
applies, whatever offsets the batch skipped: a standby copy whose consumer dropped records at a rebalance
reported the partition held past them, and when it became the router's own the ids marked there were routed
again. The Helm chart runs this store by default.

Registered with Faust's store registry as `sentpipe-rocksdb://`; the router uses it for the dedup table when
`SENTPIPE_TABLE_STORE` is `rocksdb://`. The files are Faust's own (same paths, same offset key): a worker
of an earlier release left nothing to convert.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from faust.stores import STORES
from faust.stores.rocksdb import Store as FaustRocksStore
from faust.types import TP, EventT
from yarl import URL

from sentpipe.processors.changelog_gaps import ChangelogGaps

SCHEME = "sentpipe-rocksdb"


def url(table_store: str, table: str) -> str:
    """The table's store URL for `SENTPIPE_TABLE_STORE` (`rocksdb://...`): the files where Faust's own
    store keeps them (its path, or the table's name). Never a bare `scheme://`: a false yarl URL, for which
    Faust takes the app's store instead."""
    return f"{SCHEME}:{URL(table_store).path or table}"


def register() -> None:
    """Make `sentpipe-rocksdb://` a Faust store URL."""
    STORES.aliases.setdefault(SCHEME, f"{__name__}:DedupRocksStore")


class DedupRocksStore(FaustRocksStore):
    """Faust's RocksDB store, whose persisted offsets stop where the changelog it applied has a gap."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._gaps = ChangelogGaps()

    def restored_offset(self, partition: int) -> int | None:
        """The offset the partition's file holds, read without counting as Faust's question."""
        stored = self._db_for_partition(partition).get(self.offset_key)
        return None if stored is None else int(stored)

    def persisted_offset(self, tp: TP) -> int | None:
        offset = self.restored_offset(tp.partition)
        self._gaps.assigned(tp.partition, offset)
        return offset

    def set_persisted_offset(self, tp: TP, offset: int) -> None:
        if self._gaps.vouches(tp.partition):
            super().set_persisted_offset(tp, offset)

    def apply_changelog_batch(
        self,
        batch: Iterable[EventT[Any]],
        to_key: Callable[[Any], Any],
        to_value: Callable[[Any], Any],
    ) -> None:
        batch = list(batch)
        for partition in self._gaps.check(batch, self.restored_offset):
            # Gone from the file itself: a restart's restore (processors/restore.py) also reads it whole.
            self._db_for_partition(partition).delete(self.offset_key)
        super().apply_changelog_batch(batch, to_key, to_value)

    def reset_state(self) -> None:
        super().reset_state()
        self._gaps.clear()
