"""The lock-free collectors render what prometheus_client's own Counter and Histogram render."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest

from sentpipe.loop_metrics import LoopCounter, LoopHistogram

disable_created_metrics()  # type: ignore[no-untyped-call]  # as sentpipe/metrics.py does

BUCKETS = (0.001, 0.01, 0.1, 1.0)
# On a bound, between bounds, below the first, above the last (+Inf), zero and negative.
VALUES = (0.001, 0.005, 0.0001, 7.5, 0.0, -1.0, 1.0, 0.1, 0.01, 0.02)


def test_a_loop_histogram_renders_as_a_histogram_does() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    mine = LoopHistogram("x_seconds", "Doc.", buckets=BUCKETS, registry=ours)
    reference = Histogram("x_seconds", "Doc.", buckets=BUCKETS, registry=theirs)
    assert generate_latest(ours) == generate_latest(theirs)
    for value in VALUES:
        mine.observe(value)
        reference.observe(value)
    assert generate_latest(ours) == generate_latest(theirs)
    assert ours.get_sample_value("x_seconds_bucket", {"le": "+Inf"}) == len(VALUES)


def test_a_loop_counter_renders_as_a_labelled_counter_does() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    mine = LoopCounter("y", "Doc.", ["tenant", "status"], registry=ours)
    reference = Counter("y", "Doc.", ["tenant", "status"], registry=theirs)
    mine.zero(("a", "500"))
    reference.labels("a", "500")
    for labels in (("a", "200"), ("b", "200"), ("a", "200")):
        mine.inc(labels)
        reference.labels(*labels).inc()
    assert generate_latest(ours) == generate_latest(theirs)
    assert ours.get_sample_value("y_total", {"tenant": "a", "status": "500"}) == 0


def test_names_collide_as_with_any_metric() -> None:
    registry = CollectorRegistry()
    LoopHistogram("z_seconds", "Doc.", buckets=BUCKETS, registry=registry)
    with pytest.raises(ValueError):
        Histogram("z_seconds", "Doc.", registry=registry)
    with pytest.raises(ValueError):
        LoopCounter("z_seconds_count", "Doc.", [], registry=registry)


@pytest.mark.parametrize("buckets", [(), (1.0, 0.5), (1.0, 1.0), (float("inf"),)])
def test_bucket_bounds_must_increase(buckets: tuple[float, ...]) -> None:
    with pytest.raises(ValueError):
        LoopHistogram("w", "Doc.", buckets=buckets, registry=None)


def test_zero_takes_one_value_per_label() -> None:
    with pytest.raises(ValueError):
        LoopCounter("v", "Doc.", ["a", "b"], registry=None).zero(("only",))
