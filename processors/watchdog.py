"""The progress watchdog: a partition with work waiting whose position has not moved is a stall.

Pure bookkeeping (the clock is injected); the stages report progress and lag, the health endpoint asks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from sentpipe.broker import Partition


@dataclass(frozen=True, slots=True)
class Stall:
    stage: str
    topic: str
    partition: int
    offset: int | None  # the next offset to process, None while not known
    lag: int
    for_s: float

    def __str__(self) -> str:
        at = "start" if self.offset is None else f"offset {self.offset}"
        return (
            f"{self.stage}: {self.topic}[{self.partition}] stuck at {at} with {self.lag} records waiting "
            f"for {self.for_s:.0f}s"
        )


@dataclass
class Watchdog:
    stage: str
    stall_after_s: float
    clock: Callable[[], float] = time.monotonic
    _position: dict[Partition, int] = field(default_factory=dict)
    _lag: dict[Partition, int] = field(default_factory=dict)
    _since: dict[Partition, float] = field(default_factory=dict)  # last move, or when work appeared

    def progress(self, positions: Mapping[Partition, int]) -> None:
        """Next offsets to process after a batch was applied (or dead-lettered) and acknowledged."""
        now = self.clock()
        for where, pos in positions.items():
            if self._position.get(where) != pos:
                self._position[where] = pos
                self._since[where] = now

    def lag(self, lags: Mapping[Partition, int]) -> None:
        """Records waiting per partition; partitions absent here are no longer this worker's."""
        now = self.clock()
        for where in set(self._lag) - set(lags):
            self._lag.pop(where, None)
            self._since.pop(where, None)
            self._position.pop(where, None)
        for where, n in lags.items():
            if n > 0 and self._lag.get(where, 0) == 0:
                self._since[where] = now  # work just appeared: the clock starts now
            self._lag[where] = n

    def waiting(self, where: Partition) -> int:
        """Records last told waiting on `where` (0: none, or not this worker's)."""
        return self._lag.get(where, 0)

    def waiting_at(self, positions: Mapping[Partition, int]) -> None:
        """Where records wait before this process has moved a partition (the committed offset, the first of
        a batch in hand): a stall names that offset, not "start", which is all a worker restarted by its
        liveness probe would otherwise say. Starts no clock."""
        for where, pos in positions.items():
            self._position.setdefault(where, pos)

    def working(self, where: Iterable[Partition]) -> None:
        """Records of these partitions are being worked through (a slow batch's handler calls end one by
        one): not a stall, though the position moves only when the batch is committed."""
        now = self.clock()
        for p in where:
            if p in self._since:
                self._since[p] = now

    def hold(self) -> None:
        """Positions cannot move now (the table's recovery after a rebalance): every clock restarts, so that
        time is not counted as a stall."""
        now = self.clock()
        for where in self._since:
            self._since[where] = now

    def stalls(self) -> list[Stall]:
        now = self.clock()
        out = []
        for where, n in sorted(self._lag.items()):
            since = self._since.get(where, now)
            if n > 0 and now - since >= self.stall_after_s:
                out.append(Stall(self.stage, where[0], where[1], self._position.get(where), n, now - since))
        return out


@dataclass
class RecoveryHold:
    """Whether a recovery in progress still holds the watchdog's clocks: for at most `limit_s`, so a
    recovery after a rebalance gets as long as the first one had (the startup probe's window), and one
    that never ends still fails liveness."""

    limit_s: float
    clock: Callable[[], float] = time.monotonic
    _since: float | None = None

    def holds(self, recovering: bool) -> bool:
        now = self.clock()
        if not recovering:
            self._since = None
            return False
        if self._since is None:
            self._since = now
        return now - self._since < self.limit_s
