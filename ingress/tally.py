"""Per-request metrics at the cost of a list or dict increment: observations and counts are tallied in plain
Python containers on the event loop and added to their Prometheus metrics when /metrics is scraped.

prometheus_client's `Histogram.observe` walks the buckets in Python and takes a lock for the sum and one for
the bucket, a few microseconds each time, and every `inc` takes a lock; the ingress observes three
histograms and counts one counter per request. A `Tally` finds the bucket with `bisect` (C), a `Counts`
adds to a dict entry; neither takes a lock: only the event loop's thread touches them. `flush_all()` (called
by the metrics handler before it renders the page) moves what was tallied into the metrics, so a scrape
sees every request answered before it.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

from prometheus_client import Counter, Histogram


class Tally:
    """Observations for one unlabelled Histogram, added to it by `flush()`."""

    __slots__ = ("_bounds", "_counts", "_histogram", "_sum")

    def __init__(self, histogram: Histogram) -> None:
        self._histogram = histogram
        # The histogram's finite upper bounds; a value above all of them lands in +Inf (the last slot).
        bounds: list[float] = list(histogram._upper_bounds)  # type: ignore[attr-defined]
        self._bounds = bounds[:-1] if bounds and bounds[-1] == float("inf") else bounds
        self._counts = [0] * (len(self._bounds) + 1)
        self._sum = 0.0

    def observe(self, value: float) -> None:
        # Prometheus buckets are "less than or equal": the first bound >= value.
        self._counts[bisect_left(self._bounds, value)] += 1
        self._sum += value

    def flush(self) -> None:
        counts, total = self._counts, self._sum
        if not any(counts):
            return
        self._counts = [0] * len(counts)
        self._sum = 0.0
        h: Any = self._histogram
        for i, n in enumerate(counts):
            if n:
                h._buckets[i].inc(n)
        h._sum.inc(total)


class Counts:
    """Increments of a labelled Counter by label values, added to it by `flush()`."""

    __slots__ = ("_counter", "_counts")

    def __init__(self, counter: Counter) -> None:
        self._counter = counter
        self._counts: dict[tuple[str, ...], int] = {}

    def inc(self, labels: tuple[str, ...]) -> None:
        counts = self._counts
        counts[labels] = counts.get(labels, 0) + 1

    def flush(self) -> None:
        counts, self._counts = self._counts, {}
        for labels, n in counts.items():
            self._counter.labels(*labels).inc(n)


_TALLIES: dict[Histogram | Counter, Tally | Counts] = {}


def tally(histogram: Histogram) -> Tally:
    """The process's one tally for this histogram."""
    found = _TALLIES.get(histogram)
    if not isinstance(found, Tally):
        found = _TALLIES[histogram] = Tally(histogram)
    return found


def counts(counter: Counter) -> Counts:
    """The process's one tally for this labelled counter."""
    found = _TALLIES.get(counter)
    if not isinstance(found, Counts):
        found = _TALLIES[counter] = Counts(counter)
    return found


def flush_all() -> None:
    """Every tally into its histogram (before /metrics renders)."""
    for t in _TALLIES.values():
        t.flush()
