"""Counters and histograms for one event loop's hot path: an update is a list or dict increment.

prometheus_client's `Histogram.observe` walks the buckets in Python and takes a lock for the sum and one for
the bucket, and every `Counter.inc` takes a lock: a few microseconds each, paid on every request the ingress
answers. These collectors keep their values in plain Python containers, find a bucket with `bisect` (C) and
take no lock, because only the thread of the event loop that serves the process's requests and its /metrics
updates or reads them. They are registered like any metric and render the same exposition.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from itertools import accumulate

from prometheus_client.core import REGISTRY, CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString


class LoopCounter(Collector):
    """A labelled counter: `inc(("a", "b"))` adds one to the sample with those label values."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry | None = REGISTRY,
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = tuple(labelnames)
        self._values: dict[tuple[str, ...], int] = {}
        if registry is not None:
            registry.register(self)

    def inc(self, labels: tuple[str, ...]) -> None:
        values = self._values
        values[labels] = values.get(labels, 0) + 1

    def zero(self, labels: tuple[str, ...]) -> None:
        """Expose these label values at 0 before their first `inc`, so `increase()` sees that first one."""
        if len(labels) != len(self._labelnames):
            raise ValueError(f"{self._name} takes {len(self._labelnames)} label values, not {len(labels)}")
        self._values.setdefault(labels, 0)

    def describe(self) -> Iterable[CounterMetricFamily]:
        return [CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)]

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)
        for labels, value in list(self._values.items()):
            family.add_metric(labels, value)
        yield family


class LoopHistogram(Collector):
    """An unlabelled histogram with fixed finite bucket bounds (and +Inf)."""

    def __init__(
        self,
        name: str,
        documentation: str,
        buckets: Sequence[float],
        registry: CollectorRegistry | None = REGISTRY,
    ) -> None:
        bounds = tuple(float(b) for b in buckets if b != float("inf"))
        if not bounds or list(bounds) != sorted(set(bounds)):
            raise ValueError(f"{name}: bucket bounds must be increasing and not empty")
        self._name = name
        self._documentation = documentation
        self._bounds = bounds
        self._les = [floatToGoString(b) for b in bounds] + ["+Inf"]  # type: ignore[no-untyped-call]
        # Per bucket, not cumulative: a value above every bound lands in the last slot (+Inf).
        self._counts = [0] * (len(bounds) + 1)
        self._sum = 0.0
        if registry is not None:
            registry.register(self)

    def observe(self, value: float) -> None:
        # Prometheus buckets are "less than or equal": the first bound >= value.
        self._counts[bisect_left(self._bounds, value)] += 1
        self._sum += value

    def describe(self) -> Iterable[HistogramMetricFamily]:
        return [HistogramMetricFamily(self._name, self._documentation)]

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self._name, self._documentation)
        cumulative = accumulate(self._counts)
        family.add_metric([], list(zip(self._les, cumulative, strict=True)), self._sum)
        yield family
