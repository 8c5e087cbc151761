"""How far the dedup store holds each changelog partition, as the router's own acknowledged writes move it.

The store's offset says "every changelog record up to here is applied": the recovery after a rebalance, or a
warm RocksDB restart, reads only what comes after it. An acknowledged write of the router's own is in the
store, but the records before it need not be: a router paused past its session (SIGSTOP, a frozen VM) writes
the marks of the batches it held after another member took its partitions and marked ids there. Moved to
its own write's offset, the store claimed those marks and never read them: their duplicates were routed
again for the rest of the process's life (scale audit, 2026-12-04). So the offset moves only through
acknowledged offsets that follow on from it; a gap stays until a recovery reads it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

# Acknowledged offsets kept beyond a gap, waiting for it to fill: at most a few pipelined batches (or sweep
# slices) arrive out of order; this many means the gap is someone else's records, which the next recovery
# of the partition reads.
MAX_WAITING = 100_000


class HeldOffsets:
    def __init__(self, max_waiting: int = MAX_WAITING) -> None:
        self._held: dict[int, int] = {}
        self._waiting: dict[int, set[int]] = {}
        self._max_waiting = max_waiting

    def acknowledged(
        self, partition: int, offsets: Iterable[int], stored: Callable[[], int | None]
    ) -> int | None:
        """The offset the store now holds every record up to, if these acknowledged writes moved it, or
        None. `stored()`, the store's own offset (None: nothing applied), is read once per assignment."""
        held = self._held.get(partition)
        if held is None:
            start = stored()
            held = -1 if start is None else start
        waiting = self._waiting.setdefault(partition, set())
        waiting.update(o for o in offsets if o > held)
        moved = held
        while moved + 1 in waiting:
            moved += 1
            waiting.remove(moved)
        self._held[partition] = moved
        if len(waiting) > self._max_waiting:
            waiting.clear()  # never filled by a write of ours: it stays where it is until forgotten
        return moved if moved > held else None

    def forget(self, partition: int) -> None:
        """Revoked: assigned again, the partition is recovered first, and its offset read again."""
        self._held.pop(partition, None)
        self._waiting.pop(partition, None)
