"""The overview page's numbers: per-minute counts from the tail, consumer lag from Kafka, and what the
services' Prometheus endpoints say (duplicates dropped, spool state) when they can be reached.

Events in and dead letters are counted from the raw topic and the DLQ themselves (tail.py), so they are
right even when no metrics endpoint is reachable. Lag is the worker's committed offsets against the end
offsets, for the router's group on the raw topic and the projector's group on the routed topics.
Duplicates dropped only the worker knows: its `sentpipe_duplicates_dropped_total`, scraped.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from confluent_kafka import TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from sentpipe.console.tail import MINUTE_MS, Tail
from sentpipe.kafka import committed_offsets, existing_partitions
from sentpipe.processors.offsets import Log
from sentpipe.processors.topics import projections_group
from sentpipe.schemas.topics import Topics
from sentpipe.sender.delivery import shown as without_password
from sentpipe.settings import Settings

log = logging.getLogger("sentpipe.console")

SAMPLE_EVERY_S = 10.0
KEEP_SAMPLES = 400  # a little over an hour at one sample per 10 s


def metrics_urls(settings: Settings) -> list[str]:
    if settings.console_metrics_urls is not None:
        return list(settings.console_metrics_urls)
    return [
        f"http://127.0.0.1:{settings.ingress_metrics_port}/metrics",
        f"http://127.0.0.1:{settings.worker_metrics_port}/metrics",
    ]


def consumer_lag(kafka: Log, settings: Settings) -> dict[str, int]:
    """Records not yet committed, per consumer group (router on the raw topic, projector on the routed)."""
    topics = Topics(settings.topic_prefix)
    kafka.topics = existing_partitions(kafka.admin, settings.kafka_bootstrap, kafka.timeout)
    out: dict[str, int] = {}
    for group, names in (
        (settings.app_id, [topics.raw]),
        (projections_group(settings), list(topics.routed)),
    ):
        names = [name for name in names if name in kafka.topics]
        tps = [TopicPartition(name, p) for name in names for p in range(kafka.topics[name])]
        # Not the admin API's list_consumer_group_offsets: librdkafka 2.16 crashes the process on it while
        # a restarted broker's coordinator loads (sentpipe.kafka.committed_offsets).
        listed = committed_offsets(settings, group, tps, kafka.timeout)
        committed = {
            (tp.topic, tp.partition): tp.offset for tp in listed if tp.error is None and tp.offset >= 0
        }
        behind = 0
        for name in names:
            for p, (low, high) in kafka.watermarks(name, range(kafka.topics[name])).items():
                behind += max(0, high - max(low, committed.get((name, p), low)))
        out[group] = behind
    return out


# Ages are not added up over processes (an ingress's workers, several pods): the oldest is the largest.
OLDEST = ("_oldest_age_seconds",)


def add_up(totals: dict[str, float], name: str, value: float) -> None:
    """`value` into `totals[name]`: summed, or the largest for an age (OLDEST)."""
    if name.endswith(OLDEST):
        totals[name] = max(totals.get(name, 0.0), value)
    else:
        totals[name] = totals.get(name, 0.0) + value


def scrape_totals(text: str) -> dict[str, float]:
    """Sum each sample name over its labels (an age: its largest): what the overview needs."""
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("sentpipe_"):
                add_up(totals, sample.name, float(sample.value))
    return totals


def spool_state(totals: dict[str, float]) -> dict[str, float] | None:
    """The spool's gauges and counters, when an ingress has its spool on (an ingress exports the series
    either way, with a limit of 0 bytes when it is off); None otherwise."""
    if not totals.get("sentpipe_spool_max_bytes"):
        return None
    return {
        k: v
        for k, v in totals.items()
        if k.startswith("sentpipe_spool") and not k.endswith(("_bucket", "_sum", "_count", "_created"))
    }


@dataclass
class Sampler:
    settings: Settings
    tail: Tail
    lag: deque[tuple[int, dict[str, int]]] = field(default_factory=lambda: deque(maxlen=KEEP_SAMPLES))
    # (time, endpoint as shown -> its totals), the endpoints that answered only.
    scraped: deque[tuple[int, dict[str, dict[str, float]]]] = field(
        default_factory=lambda: deque(maxlen=KEEP_SAMPLES)
    )
    lag_error: str | None = None
    scrape_errors: dict[str, str] = field(default_factory=dict)
    _kafka: Log | None = None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as http:
            while True:
                now = int(time.time() * 1000)
                try:
                    self.lag.append((now, await loop.run_in_executor(None, self._lag_once)))
                    self.lag_error = None
                except Exception as exc:
                    self.lag_error = " ".join(str(exc).split()) or type(exc).__name__
                    self._close_kafka()
                self.scraped.append((now, await self._scrape(http)))
                await asyncio.sleep(SAMPLE_EVERY_S)

    def _lag_once(self) -> dict[str, int]:
        if self._kafka is None:
            self._kafka = Log(self.settings, timeout=5.0)
        return consumer_lag(self._kafka, self.settings)

    def _close_kafka(self) -> None:
        if self._kafka is not None:
            with contextlib.suppress(Exception):
                self._kafka.close()
            self._kafka = None

    def close(self) -> None:
        self._close_kafka()

    async def _scrape(self, http: aiohttp.ClientSession) -> dict[str, dict[str, float]]:
        """Each endpoint's totals, apart: a counter's increase is taken per endpoint (`_per_minute`)."""
        by_url: dict[str, dict[str, float]] = {}
        seen: set[str] = set()
        for url in metrics_urls(self.settings):
            # Keyed by the URL as shown: the overview's answer lists these, and a password in a metrics URL
            # is a credential.
            shown = without_password(url)
            if shown in seen:
                # One endpoint listed twice (or with and without its credentials) was summed twice.
                continue
            seen.add(shown)
            try:
                async with http.get(url) as resp:
                    if resp.status != 200:
                        # An error page parses as an empty exposition: it counted as a scrape with nothing
                        # in it. Its status only: the body may be anything, a secret included.
                        self.scrape_errors[shown] = f"HTTP {resp.status}"
                        continue
                    text = await resp.text()
                totals = by_url.setdefault(shown, {})
                for name, value in scrape_totals(text).items():
                    add_up(totals, name, value)
                self.scrape_errors.pop(shown, None)
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                self.scrape_errors[shown] = type(exc).__name__
        return by_url

    def _last_totals(self) -> dict[str, float]:
        """The last sample's totals over its endpoints (an age: the oldest)."""
        totals: dict[str, float] = {}
        for one in (self.scraped[-1][1] if self.scraped else {}).values():
            for name, value in one.items():
                add_up(totals, name, value)
        return totals

    # --- the page's JSON ----------------------------------------------------------------------------------
    def overview(self) -> dict[str, Any]:
        now_min = int(time.time() * 1000) // MINUTE_MS
        minutes = list(range(now_min - 59, now_min + 1))
        events_in, dead = self.tail.stats.snapshot()
        by_type: dict[str, list[int]] = {}
        by_tenant: dict[str, list[int]] = {}
        by_stage: dict[str, list[int]] = {}
        for i, m in enumerate(minutes):
            for (type_, tenant), n in events_in.get(m, {}).items():
                by_type.setdefault(type_, [0] * 60)[i] += n
                by_tenant.setdefault(tenant, [0] * 60)[i] += n
            for stage, n in dead.get(m, {}).items():
                by_stage.setdefault(stage, [0] * 60)[i] += n
        duplicates = self._per_minute("sentpipe_duplicates_dropped_total", minutes)
        lag_series = {
            group: [[t, v.get(group, 0)] for t, v in self.lag]
            for group in (self.lag[-1][1] if self.lag else {})
        }
        last = self._last_totals()
        return {
            "minutes": [m * MINUTE_MS for m in minutes],
            "events_in": {"by_type": by_type, "by_tenant": by_tenant},
            "dead_letters": {"by_stage": by_stage},
            "duplicates": duplicates,
            "lag": lag_series,
            "totals": {
                "events_in_last_hour": sum(sum(v) for v in by_type.values()),
                # The last whole minute: the one under way (v[-1]) read about 0 in its first seconds.
                "events_in_last_minute": sum(v[-2] for v in by_type.values()),
                "dead_letters_last_hour": sum(sum(v) for v in by_stage.values()),
                "duplicates_dropped_total": last.get("sentpipe_duplicates_dropped_total"),
                "consumer_lag": self.lag[-1][1] if self.lag else None,
            },
            "spool": spool_state(last),
            "tail": {
                "state": self.tail.state,
                "since": self.tail.started_ms,
                "backfill_partial": self.tail.backfill_partial,
            },
            "problems": {
                "lag": self.lag_error,
                "metrics": dict(self.scrape_errors),
            },
        }

    def _per_minute(self, name: str, minutes: list[int]) -> list[float] | None:
        """A scraped counter's increase per minute (None when it was never scraped); restarts count 0.

        Per endpoint, then added up: taken from the sum, an endpoint that missed one scrape left the sum
        with its whole counter and came back with it, a burst of everything it had ever counted."""
        out = [0.0] * len(minutes)
        first = minutes[0]
        seen = False
        for url in {u for _, by_url in self.scraped for u in by_url}:
            points = [(t, by_url[url][name]) for t, by_url in self.scraped if name in by_url.get(url, {})]
            seen |= bool(points)
            for (_, a), (t, b) in itertools.pairwise(points):
                i = t // MINUTE_MS - first
                if 0 <= i < len(out) and b >= a:
                    out[i] += b - a
        return out if seen else None
