"""The dedup table's in-memory store: Faust's memory store, filled by our librdkafka restore, kept compact.

Faust's own memory store reports no persisted offsets, so every start (and every rebalance) reads the whole
changelog through aiokafka, one Python event per record: minutes per million ids. This store

- is filled before Faust starts by processors/restore.py (librdkafka batches of thousands of records), and
  reports the offset it has applied per changelog partition as its persisted offset for the rest of the
  process's life, so Faust's recovery reads only what came after;
- keeps that offset true afterwards: Faust's recovery batches and the router's own acknowledged writes
  (`set_persisted_offset`, only through writes that follow on from it: processors/held_offsets.py) move it
  forward, and a partition whose keys are dropped, or whose changelog skipped offsets on the way in,
  forgets it, so the next assignment of that partition reads it from the beginning again (never "up to
  date" with keys missing);
- holds its keys in SHARDS dicts by key hash (`Shards`), compact keys as 256-bit ints, without Faust's
  second dict of key -> partition (a key's partition is computed from the key, processors/dedup.py), and
  shares identical values: a million ids routed within the same seconds carry a few thousand distinct
  values. The shards let the dedup sweep snapshot a few thousand keys at a time.

Registered with Faust's store registry as `sentpipe-memory://`; the router uses it for the dedup table when
`SENTPIPE_TABLE_STORE` is `memory://`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from typing import Any

from faust.stores import STORES
from faust.stores.memory import Store as FaustMemoryStore
from faust.types import TP, EventT

from sentpipe.processors.changelog_gaps import ChangelogGaps
from sentpipe.processors.dedup import is_compact, partition_of

# With a host: a bare "scheme://" is a false yarl URL, and Faust would fall back to the app's store.
URL = "sentpipe-memory://dedup"
SCHEME = URL.split(":", 1)[0]
# Distinct values remembered for sharing. Past this the memo starts again (values already stored stay
# shared); it only bounds the memo itself, which would otherwise grow with every second of routing.
INTERN_MAX = 65_536


SHARDS = 64
_MASK = SHARDS - 1
_COMPACT_LEN = 33
Inner = bytes | int  # how a key is held inside a shard


def _inner(key: bytes) -> Inner:
    """A compact key (processors/dedup.py) is held as the integer of its 33 bytes: a 256-bit int takes 64
    bytes of memory where a 33-byte bytes object takes 80 (CPython rounds allocations to 16), 16 MB per
    million ids. An int never equals a bytes object, so the two kinds cannot collide in one dict."""
    return int.from_bytes(key, "big") if is_compact(key) else key


def _outer(inner: Inner) -> bytes:
    return inner.to_bytes(_COMPACT_LEN, "big") if type(inner) is int else inner  # type: ignore[return-value]


class Shards(MutableMapping[bytes, bytes]):
    """A mapping kept in SHARDS plain dicts, by key hash. Each dict holds only ints and bytes, so the
    collector never tracks it; `walk()` snapshots one shard at a time, so a walk that yields to the event
    loop between keys never copies the whole table (15 ms for a million keys, and 25 ms more for the
    collector's first look at the copy)."""

    __slots__ = ("dicts",)

    def __init__(self) -> None:
        self.dicts: list[dict[Inner, bytes]] = [{} for _ in range(SHARDS)]

    def __getitem__(self, key: bytes) -> bytes:
        k = _inner(key)
        return self.dicts[hash(k) & _MASK][k]

    def __setitem__(self, key: bytes, value: bytes) -> None:
        k = _inner(key)
        self.dicts[hash(k) & _MASK][k] = value

    def __delitem__(self, key: bytes) -> None:
        k = _inner(key)
        del self.dicts[hash(k) & _MASK][k]

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, bytes):
            return False
        k = _inner(key)
        return k in self.dicts[hash(k) & _MASK]

    def __iter__(self) -> Iterator[bytes]:
        for shard in self.dicts:
            for k in shard:
                yield _outer(k)

    def __len__(self) -> int:
        return sum(map(len, self.dicts))

    def get(self, key: bytes, default: Any = None) -> Any:
        k = _inner(key)
        return self.dicts[hash(k) & _MASK].get(k, default)

    def discard(self, key: bytes) -> None:
        k = _inner(key)
        self.dicts[hash(k) & _MASK].pop(k, None)

    def clear(self) -> None:
        for shard in self.dicts:
            shard.clear()

    def walk(self) -> Iterator[bytes]:
        """Every key, safe to interleave with changes: one shard's keys are copied (a C-speed tuple of a few
        thousand) before they are handed out. Keys added meanwhile may or may not be seen."""
        for shard in self.dicts:
            for k in tuple(shard):
                yield _outer(k)


def register() -> None:
    """Make `sentpipe-memory://` a Faust store URL (Faust's registry of store names, FactoryMapping)."""
    STORES.aliases.setdefault(SCHEME, f"{__name__}:DedupMemoryStore")


class DedupMemoryStore(FaustMemoryStore[bytes, bytes]):
    """Faust's memory store with persisted offsets, bulk restore and shared values."""

    def __post_init__(self) -> None:
        self.data: Shards = Shards()
        # Faust's memory store keeps key -> partition for every key (a second dict as big as the first):
        # this one computes it when needed (on_recovery_completed) and keeps the attribute empty.
        self._key_partition: dict[bytes, int] = {}
        self._offsets: dict[int, int] = {}  # changelog partition -> last offset applied to `data`
        self._interned: dict[bytes, bytes] = {}
        self._asked: set[int] = set()  # partitions whose offset Faust asked for (on_recovery_completed)
        # Partitions dropped since Faust last asked for their offset: a late acknowledgement of the router's
        # write there (a batch that settles after its partition was revoked) must not give them an offset.
        self._dropped: set[int] = set()
        self._gaps = ChangelogGaps()

    def intern(self, value: bytes) -> bytes:
        """The stored object equal to `value`, so a million equal values are one object."""
        memo = self._interned
        found = memo.get(value)
        if found is None:
            if len(memo) >= INTERN_MAX:
                memo.clear()
            found = memo[value] = value
        return found

    def __setitem__(self, key: bytes, value: bytes) -> None:
        self.data[key] = self.intern(value)

    # --- restore (processors/restore.py) --------------------------------------------------------------

    def restored_offset(self, partition: int) -> int | None:
        return self._offsets.get(partition)

    def restore_batch(self, partition: int, records: Iterable[tuple[bytes, bytes | None]], last: int) -> None:
        """Apply changelog records of one partition, in log order, up to offset `last`."""
        data, intern = self.data, self.intern
        for key, value in records:
            if value is None:
                data.discard(key)
            else:
                data[key] = intern(value)
        self._advance(partition, last)

    def forget_partition(self, partition: int) -> None:
        """Drop one partition's keys and offset: the next restore or recovery reads it from the beginning."""
        n = self.table.partitions
        assert n is not None  # the router's table names its partition count
        for key in self.data.walk():
            if partition_of(key, n) == partition:
                self.data.discard(key)
        self._offsets.pop(partition, None)

    # --- Faust's recovery and offsets -----------------------------------------------------------------

    def _advance(self, partition: int, offset: int) -> None:
        if offset > self._offsets.get(partition, -1):
            self._offsets[partition] = offset

    def apply_changelog_batch(
        self,
        batch: Iterable[EventT[Any]],
        to_key: Callable[[Any], Any],
        to_value: Callable[[Any], Any],
    ) -> None:
        """Faust's recovery: apply changelog events, and remember how far each partition got (as far as the
        copy vouches for it: processors/changelog_gaps.py)."""
        batch = list(batch)
        for partition in self._gaps.check(batch, self._offsets.get):
            self._offsets.pop(partition, None)
        data, intern = self.data, self.intern
        last: dict[int, int] = {}
        for event in batch:
            msg = event.message
            key = to_key(event.key)
            if msg.value is None:
                data.discard(key)
            else:
                data[key] = intern(to_value(event.value))
            last[msg.partition] = msg.offset
        for partition, offset in last.items():
            if self._gaps.vouches(partition):
                self._advance(partition, offset)

    def persisted_offset(self, tp: TP) -> int | None:
        """How far `data` holds the changelog partition: Faust's recovery starts reading there."""
        self._asked.add(tp.partition)
        self._dropped.discard(tp.partition)  # assigned again: recovered from the beginning, then ours
        offset = self._offsets.get(tp.partition)
        self._gaps.assigned(tp.partition, offset)
        return offset

    def set_persisted_offset(self, tp: TP, offset: int) -> None:
        """Faust calls this when one of the router's own table writes is acknowledged.

        Not for a dropped partition: its offset would say "held up to here" with the keys before it gone,
        and the next assignment's recovery would start there, its duplicates routed again."""
        if tp.partition not in self._dropped and self._gaps.vouches(tp.partition):
            self._advance(tp.partition, offset)

    def reset_state(self) -> None:
        self.data.clear()
        self._offsets.clear()
        self._dropped.clear()
        self._gaps.clear()
        self._interned.clear()

    async def on_recovery_completed(self, active_tps: set[TP], standby_tps: set[TP]) -> None:
        """Drop the keys of partitions this process neither serves nor keeps a standby of (as Faust's memory
        store does), and their offsets with them: the keys held and the offsets reported stay consistent.

        The walk that finds them yields to the loop; the drop itself does not, and skips a partition whose
        offset Faust asked for meanwhile (a new assignment recovering from it must find its keys)."""
        keep = {tp.partition for tp in active_tps | standby_tps}
        if not set(self._offsets) - keep:
            return
        n = self.table.partitions
        assert n is not None  # the router's table names its partition count
        self._asked.clear()
        doomed: list[bytes] = []
        for i, key in enumerate(self.data.walk()):
            if partition_of(key, n) not in keep:
                doomed.append(key)
            if i % 10_000 == 0:
                await asyncio.sleep(0)
        gone = set(self._offsets) - keep - self._asked
        for key in doomed:
            if partition_of(key, n) in gone:
                self.data.discard(key)
        for partition in gone:
            self._offsets.pop(partition, None)
        self._dropped |= gone
