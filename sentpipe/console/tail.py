"""The console's view of Kafka as it happens: the raw topic and the DLQ, tailed, fanned out to browsers.

One thread reads both topics with librdkafka (assigned, never in a group, never committing). At start it
reads back the last hour (at most `BACKFILL_PER_PARTITION` records per partition) so the overview has its
history and the live page its latest rows; then it follows the end. Each raw record is described with the
worker's own `route()`: the same type, tenant, event id and subject the worker gives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import secrets
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import OFFSET_END, Consumer, KafkaError, KafkaException, Message, TopicPartition

from sentpipe.kafka import client_config, message_headers
from sentpipe.processors.dlq import DlqEntry
from sentpipe.processors.offsets import Log, Range, Window, timestamp_ms
from sentpipe.processors.replay import as_malformed
from sentpipe.schemas import routing as r
from sentpipe.schemas.topics import Topics
from sentpipe.settings import Settings

log = logging.getLogger("sentpipe.console")
# How long a stop waits for the tail's thread (a Kafka poll in hand) before it leaves it behind.
JOIN_TIMEOUT_S = 10.0

Row = dict[str, Any]
HOUR_MS = 3600 * 1000
MINUTE_MS = 60 * 1000
BACKFILL_PER_PARTITION = 5000
RECENT_ROWS = 200
SUBSCRIBER_QUEUE = 2000
# How often the tail asks whether its topics still have the partitions it follows: one added later (the raw
# topic grown) was never read, one topic deleted left it "tailing" nothing.
PARTITION_CHECK_S = 10.0


def describe_raw(msg: Message, settings: Settings, topics: Topics) -> Row:
    """One raw record as a live row: what `route()` makes of it, or why it does not route."""
    hmap = dict(message_headers(msg))
    key = msg.key()
    row: Row = {
        "kind": "raw",
        "topic": msg.topic(),
        "partition": msg.partition(),
        "offset": msg.offset(),
        "time": timestamp_ms(msg),
        "tenant": hmap.get(r.H_TENANT, b"").decode(errors="replace") or settings.default_tenant,
        "type": hmap.get(r.H_TYPE, b"").decode(errors="replace") or "unknown",
        "event_id": key.decode(errors="replace") if key else "",
        "subject": "",
        "status": "",
        "error": "",
    }
    try:
        routed = r.route(
            key,
            msg.value() or b"",
            hmap,
            topics=topics,
            id_source=settings.event_id_source,
            default_tenant=settings.default_tenant,
            record_timestamp_ms=row["time"],
        )
    except Exception as exc:  # a record that does not route is shown with its reason, never dropped
        row["error"] = as_malformed(exc).reason
        return row
    ev = routed.event
    if ev is None:
        row["type"] = "unrouted"
    else:
        row.update(type=ev.type.value, tenant=ev.tenant, event_id=ev.id, subject=ev.subject)
        row["status"] = ev.status or ""
    return row


def describe_dlq(msg: Message) -> Row:
    e = DlqEntry.from_message(msg)
    event_id, type_, tenant = e.identity()  # one parse of the body for the three
    return {
        "kind": "dlq",
        "id": e.id,
        "topic": msg.topic(),
        "partition": e.partition,
        "offset": e.offset,
        "time": e.dead_at_ms,
        "tenant": tenant or "",
        "type": type_ or "unknown",
        "event_id": event_id or "",
        "subject": "",
        "status": "",
        "stage": e.stage,
        "error": e.error_class,
    }


@dataclass
class MinuteStats:
    """Counts per minute over the last hour; written by the tail thread, read by the web handlers."""

    events_in: dict[int, Counter[tuple[str, str]]] = field(default_factory=dict)  # (type, tenant)
    dead_letters: dict[int, Counter[str]] = field(default_factory=dict)  # stage
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, rows: list[Row]) -> None:
        with self.lock:
            for row in rows:
                minute = int(row["time"]) // MINUTE_MS
                if row["kind"] == "raw":
                    self.events_in.setdefault(minute, Counter())[row["type"], row["tenant"]] += 1
                else:
                    self.dead_letters.setdefault(minute, Counter())[row.get("stage", "unknown")] += 1
            oldest = int(time.time() * 1000) // MINUTE_MS - 61
            for table in (self.events_in, self.dead_letters):
                for m in [m for m in table if m < oldest]:
                    del table[m]

    def replace(self, other: MinuteStats) -> None:
        """Takes `other`'s counts as they are: a backfill counts the hour afresh, and adding its counts to
        these counted every record read before again."""
        with self.lock:
            self.events_in, self.dead_letters = other.events_in, other.dead_letters

    def snapshot(self) -> tuple[dict[int, Counter[tuple[str, str]]], dict[int, Counter[str]]]:
        with self.lock:
            return (
                {m: Counter(c) for m, c in self.events_in.items()},
                {m: Counter(c) for m, c in self.dead_letters.items()},
            )


class Subscriber:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.queue: asyncio.Queue[Row | None] = asyncio.Queue(SUBSCRIBER_QUEUE)
        self.dropped = 0
        self.loop = loop

    def offer(self, row: Row) -> None:
        try:
            self.queue.put_nowait(row)
        except asyncio.QueueFull:
            self.dropped += 1  # a browser that cannot keep up loses rows, never the console its memory

    def end(self) -> None:
        """The stream ends after the rows queued. Into a full queue the marker takes the oldest row's place:
        dropped, it left the page's stream open until the console's shutdown timeout ran out."""
        if self.queue.full():
            self.queue.get_nowait()
            self.dropped += 1
        self.queue.put_nowait(None)


class Tail:
    def __init__(self, settings: Settings, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.topics = Topics(settings.topic_prefix)
        self.clock = clock
        self.stats = MinuteStats()
        self.recent: deque[Row] = deque(maxlen=RECENT_ROWS)
        self.subscribers: set[Subscriber] = set()
        # Each row sent to the pages gets `seq`, one more than the last: a page reconnecting names the last
        # it has (Last-Event-ID, as `<run>-<seq>`: this process's, not a restarted console's) and gets the
        # rows after it, not merely the latest 50.
        self.run_id = secrets.token_hex(4)
        self.seq = 0
        self.state = "starting"  # starting, backfilling, tailing, or an error line
        self.backfill_partial = False
        self.started_ms = int(clock() * 1000)
        # (topic, partition) -> the offset after the last row sent to the pages: a second backfill (after a
        # broker error) reads records the pages already have.
        self._shown: dict[tuple[str, int], int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- the web side (event loop) ----------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="console-tail", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=JOIN_TIMEOUT_S)

    def subscribe(self) -> Subscriber:
        sub = Subscriber(asyncio.get_running_loop())
        self.subscribers.add(sub)
        return sub

    @property
    def problem(self) -> str | None:
        """Kafka's error the tail meets now (it retries meanwhile), or None while it reads."""
        _, found, why = self.state.partition("Kafka: ")
        return why if found else None

    def row_id(self, row: Row) -> str:
        return f"{self.run_id}-{row['seq']}"

    def resumed(self, last_id: str | None) -> tuple[list[Row], int]:
        """What a page starts with: after `last_id` (a Last-Event-ID), every row held since it and how many
        came since that are no longer held; without one (or one of another run), the latest 50."""
        held = list(self.recent)
        run, _, text = (last_id or "").partition("-")
        # Digits past any count first: int() of a header's 5,000 digits raised (a 500 to the page).
        ok = run == self.run_id and text.isascii() and text.isdigit() and len(text) <= 19
        last = int(text) if ok else -1
        if not 0 <= last <= self.seq:
            return held[-50:], 0
        after = [row for row in held if row["seq"] > last]
        return after, self.seq - last - len(after)

    def unsubscribe(self, sub: Subscriber) -> None:
        self.subscribers.discard(sub)

    def _fanout(self, rows: list[Row]) -> None:
        for row in rows:
            self.seq += 1
            row["seq"] = self.seq
            self.recent.append(row)
            for sub in self.subscribers:
                sub.offer(row)

    # --- the Kafka side (thread) ------------------------------------------------------------------------
    def _publish(self, rows: list[Row]) -> None:
        if not rows:
            return
        # Against the offsets shown before this batch: a backfill's rows are in time order, not offsets.
        new = [row for row in rows if row["offset"] >= self._shown.get((row["topic"], row["partition"]), 0)]
        for row in new:
            key = row["topic"], row["partition"]
            self._shown[key] = max(self._shown.get(key, 0), row["offset"] + 1)
        if new and self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                self._loop.call_soon_threadsafe(self._fanout, new)

    def _describe(self, msg: Message) -> Row:
        if msg.topic() == self.topics.dlq:
            return describe_dlq(msg)
        return describe_raw(msg, self.settings, self.topics)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                ends = self._backfill()
                self._follow(ends)
            except Exception as exc:  # the broker went away or the topics are missing: try again soon
                # librdkafka's own line, not the KafkaError's repr (`KafkaError{code=_TIMED_OUT,...}`).
                err = exc.args[0] if isinstance(exc, KafkaException) and exc.args else None
                why = err.str() if isinstance(err, KafkaError) else str(exc)
                self.state = f"Kafka: {' '.join(why.split()) or type(exc).__name__}"
                log.warning("console tail: %s; retrying in 5 s", self.state)
                self._stop.wait(5)

    def _backfill(self) -> dict[tuple[str, int], int]:
        """Read the last hour of both topics (bounded); returns where each partition ends."""
        self.state = "backfilling"
        since = int(self.clock() * 1000) - HOUR_MS
        ends: dict[tuple[str, int], int] = {}
        counts = MinuteStats()  # swapped in at the end: the hour is counted afresh on every backfill
        partial = False
        # The newest rows read, by time: what the Live page opens with. Published as they were read, partition
        # after partition, the page opened with one partition's last rows rather than the newest.
        newest: list[tuple[int, int, Row]] = []
        # Rows after those the pages have of a partition followed before (a backfill after an error): all of
        # them go out, not only the newest, or what came during the outage beyond those never reached a page.
        missed: list[tuple[int, int, Row]] = []
        with Log(self.settings, timeout=10.0) as kafka:
            ranges: list[Range] = []
            for topic in (self.topics.raw, self.topics.dlq):
                for x in kafka.ranges(topic, Window(since_ms=since)):
                    start = max(x.start, x.end - BACKFILL_PER_PARTITION)
                    partial |= start > x.start
                    ranges.append(Range(x.topic, x.partition, start, x.end))
                    ends[x.topic, x.partition] = x.end
                    if x.end < self._shown.get((x.topic, x.partition), 0):  # the topic was made anew
                        self._shown[x.topic, x.partition] = 0
            batch: list[Row] = []
            for n, msg in enumerate(kafka.read(ranges)):
                if self._stop.is_set():
                    break
                row = self._describe(msg)
                batch.append(row)
                if len(batch) >= 500:
                    counts.add(batch)
                    batch = []
                item = (row["time"], n, row)
                shown = self._shown.get((row["topic"], row["partition"]))
                if shown is not None and row["offset"] >= shown:
                    missed.append(item)
                elif len(newest) < RECENT_ROWS:
                    heapq.heappush(newest, item)
                else:
                    heapq.heappushpop(newest, item)
            counts.add(batch)
        self._publish([row for _, _, row in sorted(newest + missed)])
        self.stats.replace(counts)
        self.backfill_partial = partial  # of the last backfill: one cut short said so for good
        return ends

    def _follow(self, ends: dict[tuple[str, int], int]) -> None:
        consumer = Consumer(
            {
                **client_config(self.settings),
                "group.id": "sentpipe-console-tail",  # required by the client; never joined or committed
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": "latest",
                "fetch.wait.max.ms": 100,
                "log_level": 0,
            }
        )
        try:
            consumer.assign(
                [TopicPartition(t, p, off if off >= 0 else OFFSET_END) for (t, p), off in ends.items()]
            )
            self.state = "tailing"
            followed = Counter(topic for topic, _ in ends)
            checked = time.monotonic()
            while not self._stop.is_set():
                msgs = consumer.consume(500, 0.2)
                rows = []
                for msg in msgs:
                    err = msg.error()
                    if err is not None:
                        if err.code() == KafkaError._PARTITION_EOF:
                            continue
                        if err.fatal():
                            raise KafkaException(err)
                        # Said where the overview shows the tail's state (librdkafka retries it meanwhile).
                        self.state = f"tailing; Kafka: {' '.join(err.str().split())}"
                        continue
                    rows.append(self._describe(msg))
                if rows:
                    self.stats.add(rows)
                self._publish(rows)
                if time.monotonic() - checked >= PARTITION_CHECK_S:
                    checked = time.monotonic()
                    changed = self._partitions_changed(consumer, followed)
                    if changed:
                        # Back to a backfill: it reads the partitions there are now, and only what the
                        # pages have not had yet.
                        log.warning("console tail: %s; reading the topics again", changed)
                        return
                    self.state = "tailing"
        finally:
            consumer.close()

    def _partitions_changed(self, consumer: Consumer, followed: Counter[str]) -> str | None:
        """Why the partitions followed are no longer those of the topics (None when they are)."""
        for topic in (self.topics.raw, self.topics.dlq):
            meta = consumer.list_topics(topic, timeout=5).topics.get(topic)
            if meta is None or meta.error is not None:
                if meta is None or meta.error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                    # Made anew, the topic's offsets start again at 0: those shown of the old one would hide
                    # its first records (a backfill notices a new topic only when it is shorter than the
                    # old). Not on any error: a leader being elected is no new topic, and its rows are shown.
                    for key in [key for key in self._shown if key[0] == topic]:
                        del self._shown[key]
                raise KafkaException(meta.error if meta is not None else f"topic {topic} not found")
            if len(meta.partitions) != followed[topic]:
                return f"{topic} has {len(meta.partitions)} partition(s), {followed[topic]} followed"
        return None
