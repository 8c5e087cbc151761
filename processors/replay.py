"""Replay: push a window of the raw topic through the worker's routing again, straight to the routed topics.

Replayed records skip the dedup table on purpose: the point is that every projecting consumer applies
them again, which is safe because projections are idempotent and order-independent. Each carries a
fresh `sentpipe-replay-id`, so handlers and operators can tell a replay from first delivery.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Literal

from confluent_kafka import KafkaError, KafkaException, Message, murmur2

from sentpipe.broker import ProduceRejected
from sentpipe.kafka import BrokerUnavailable, Producer, readable_headers
from sentpipe.processors.offsets import Log, OpsError, Range, Window, capped, timestamp_ms
from sentpipe.schemas import routing as r
from sentpipe.schemas.events import EventType, MalformedEvent
from sentpipe.schemas.topics import Topics
from sentpipe.settings import Settings

log = logging.getLogger("sentpipe.replay")

Progress = Callable[[int, int], None]  # (records done, records in the window)
Headers = list[tuple[str, bytes]]

# Headers that describe one trip through the DLQ or one replay; never carried on to the next trip.
TRIP_HEADERS = frozenset((*r.H_DLQ_KEYS, r.H_REPLAY_ID, r.H_REDRIVE_ID))


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:8]


def parse_types(names: Iterable[str]) -> frozenset[EventType]:
    """The --type filter: any canonical type, "unrouted" included; none means every type."""
    try:
        return frozenset(r.parse_event_types(names))
    except ValueError as exc:
        raise OpsError(str(exc)) from None


@dataclass(frozen=True, slots=True)
class Filter:
    types: frozenset[EventType] = frozenset()
    tenants: frozenset[str] = frozenset()
    event_ids: frozenset[str] = frozenset()

    def admits(self, type_: str | None, tenant: str, event_id: str | None) -> bool:
        if self.types and type_ not in self.types:
            return False
        if self.tenants and tenant not in self.tenants:
            return False
        return not self.event_ids or event_id in self.event_ids


@dataclass(frozen=True, slots=True)
class Decision:
    action: Literal["replay", "skip", "fail"]
    type: str  # canonical type, "unknown" when a malformed record has no type header
    tenant: str
    event_id: str | None
    routed: r.Routed | None = None
    error: MalformedEvent | None = None


def decide(
    key: bytes | None,
    value: bytes,
    headers: Headers,
    record_ms: int,
    *,
    window: Window,
    flt: Filter,
    settings: Settings,
    topics: Topics,
) -> Decision:
    """What replay does with one raw record: the same `route` as the worker, then the user's filters."""
    hmap = r.header_map(headers)
    head_tenant = hmap.get(r.H_TENANT, b"").decode(errors="replace") or settings.default_tenant
    head_type = hmap.get(r.H_TYPE, b"").decode(errors="replace") or None
    key_id = key.decode(errors="replace") if key else None
    if not window.admits_time(record_ms):
        return Decision("skip", head_type or "unknown", head_tenant, key_id)
    if flt.event_ids and key_id is not None and key_id not in flt.event_ids:
        return Decision("skip", head_type or "unknown", head_tenant, key_id)  # no need to parse it
    try:
        routed = r.route(
            key,
            value,
            hmap,
            topics=topics,
            id_source=settings.event_id_source,
            default_tenant=settings.default_tenant,
            record_timestamp_ms=record_ms,
        )
    except Exception as exc:  # anything raised for one record is that record's failure: to the DLQ
        if not flt.admits(head_type, head_tenant, key_id):
            return Decision("skip", head_type or "unknown", head_tenant, key_id)
        return Decision("fail", head_type or "unknown", head_tenant, key_id, error=as_malformed(exc))
    if routed.event is not None:
        type_, tenant, event_id = routed.event.type.value, routed.event.tenant, routed.event.id
    else:
        type_, tenant, event_id = EventType.UNROUTED.value, head_tenant, routed.key.decode(errors="replace")
    if not flt.admits(type_, tenant, event_id):
        return Decision("skip", type_, tenant, event_id)
    return Decision("replay", type_, tenant, event_id, routed=routed)


def as_malformed(exc: Exception) -> MalformedEvent:
    """Any error raised while routing one record, as the DLQ reason it is filed under."""
    if isinstance(exc, MalformedEvent):
        return exc
    return MalformedEvent(type(exc).__name__, f"unexpected error while routing: {exc}"[:500])


def carried_headers(headers: Headers) -> Headers:
    return [(k, v) for k, v in headers if k not in TRIP_HEADERS]


@dataclass
class RunResult:
    """Counts of one replay or redrive; `produced` only counts records the broker acknowledged."""

    run_id: str
    dry_run: bool
    read: int = 0
    produced: int = 0
    skipped: int = 0
    past_retention: int = 0  # offsets of the window retention had deleted before the run read them
    # partitions whose first record kept is inside a `--since` window, retention having deleted older ones:
    # the window's start may be gone there, how many records nothing tells (`Range.older_deleted`)
    start_past_retention: list[int] = field(default_factory=list)
    already_redriven: int = 0  # redrive: DLQ records an earlier redrive took (the redrive ledger)
    failed: int = 0
    selected: Counter[tuple[str, str]] = field(default_factory=Counter)  # what Kafka took (or would be sent)
    failures: Counter[str] = field(default_factory=Counter)  # reason -> count
    # redrive: reason -> records no stage can take (no sentpipe stage, no routed topic), left in the DLQ.
    # Not failures: every later pass meets them again, so an unfiltered redrive would never succeed.
    kept: Counter[str] = field(default_factory=Counter)
    # redrive: reason -> records Kafka took (redriven, or dead-lettered again: counted there) whose ledger
    # write failed. Not failures: counted under `failed` too, a record was counted twice and "read" no
    # longer added up.
    unrecorded: Counter[str] = field(default_factory=Counter)
    missing_ids: list[str] = field(default_factory=list)
    # partition -> the end offset (exclusive) it was read to: a dry run's, passed as `upto`, makes the real
    # run read exactly the records it counted
    ends: dict[int, int] = field(default_factory=dict)
    # replay: partition -> its first record Kafka did not take (refused, or not delivered): where a run
    # that sends those again starts
    undelivered: dict[int, int] = field(default_factory=dict)


UNREADABLE_HEADERS = "unreadable_headers"


def failure_line(result: RunResult) -> str:
    """The one line a replay with failures ends with: which kinds, and what to do about each."""
    kinds = ", ".join(f"{n} {reason}" for reason, n in sorted(result.failures.items()))
    text = f"{result.failed} record(s) failed ({kinds})"
    if result.failures[UNREADABLE_HEADERS]:
        text += (
            f"; {UNREADABLE_HEADERS}: a header name that is not UTF-8 (another producer's), so replay cannot"
            " tell their tenant; the router routed them when they arrived"
        )
    if any(
        not reason.startswith(("delivery:", "produce:")) and reason != UNREADABLE_HEADERS
        for reason in result.failures
    ):
        text += (
            "; the router dead-lettered malformed ones when they arrived, unless it had taken a copy of the"
            " same event before (`sentpipe dlq list --stage route`)"
        )
    if result.undelivered:
        go_on = " ".join(f"--from-offset {p}:{o}" for p, o in sorted(result.undelivered.items()))
        text += f"; to send again what Kafka did not take, run it with {go_on} (and its other options)"
    return text


def key_partitions(keys: Iterable[str], partitions: int) -> set[int]:
    """Where the ingress put records with these keys (its producer partitions by murmur2, like Java's)."""
    return {murmur2(k.encode(), partitions) for k in keys}


REPLAY_AT_ONCE = (
    "replay interrupted at once: records it had sent may not all have reached Kafka; running it again is"
    " safe (what it sent is applied idempotently)"
)


def replay(
    settings: Settings,
    window: Window,
    flt: Filter,
    *,
    dry_run: bool = False,
    progress: Progress | None = None,
    timeout: float = 10.0,
    stop: threading.Event | None = None,
    upto: Mapping[int, int] | None = None,
) -> RunResult:
    """`stop`, set: end after the record in hand (as on SIGTERM). `upto`: read no partition past this end
    offset (exclusive), and none it does not name (a dry run's `ends`)."""
    topics = Topics(settings.topic_prefix)
    try:
        return _replay(settings, topics, window, flt, dry_run, progress, timeout, stop, upto)
    except KeyboardInterrupt:
        # Ctrl-C before it began to read: a line and a non-zero status, not typer's Exit(130) that
        # `sentpipe` ends with 0.
        raise OpsError(REPLAY_AT_ONCE) from None


def _replay(
    settings: Settings,
    topics: Topics,
    window: Window,
    flt: Filter,
    dry_run: bool,
    progress: Progress | None,
    timeout: float,
    stop_event: threading.Event | None,
    upto: Mapping[int, int] | None,
) -> RunResult:
    with Log(settings, timeout) as kafka, interruptible(REPLAY_AT_ONCE, stop_event) as stop:
        n = kafka.partition_count(topics.raw)
        kafka.check_partitions(topics.raw, window.named_partitions)
        # Event ids are record keys: look in their partitions first, and in the others only for ids not
        # found there (the partition count may have changed since they were written).
        first: list[int] | None = None
        if flt.event_ids and not window.named_partitions:
            first = sorted(key_partitions(flt.event_ids, n))
        run = _Replay(settings, topics, window, flt, None if dry_run else ops_producer(settings), progress)
        run.stop = stop
        # The broker gone mid-run: what was sent is still waited for, and the run ends saying how far it
        # got and where to go on, as a Ctrl-C does (it ended with the read's error alone, and the records
        # in the producer's queue were dropped unreported).
        gone: Exception | None = None
        ended = True  # until the reads end by themselves
        try:
            run.read(kafka, capped(kafka.ranges(topics.raw, window, first), upto))
            if first is not None and not flt.event_ids <= run.seen_ids and not stop.is_set():
                others = [p for p in range(n) if p not in first]
                run.read(kafka, capped(kafka.ranges(topics.raw, window, others), upto))
                first = None
            ended = False
        except (BrokerUnavailable, KafkaException, OpsError) as exc:
            # Any error that ends the read once it began (an ACL refusing READ mid-run is an OpsError) ends
            # the run with the resume line; before it began (an offset past the end), the error alone.
            if isinstance(exc, OpsError) and not run.ranges:
                raise
            gone = exc
        finally:
            # Whatever ended the read, the records queued are flushed and counted: an error other than the
            # broker's skipped this, and they were dropped unreported.
            try:
                run.finish(stopping=ended)
            except BrokerUnavailable as exc:
                gone = gone or exc
    result = run.result
    result.missing_ids = sorted(flt.event_ids - run.seen_ids)
    log_run("replay", result, interrupted=stop.is_set() or gone is not None)
    if gone is not None:
        raise OpsError(f"{gone}; {run.interrupted(resumable=first is None)}")
    if stop.is_set():
        raise OpsError(run.interrupted(resumable=first is None))
    return result


@contextlib.contextmanager
def interruptible(at_once: str, stop: threading.Event | None = None) -> Iterator[threading.Event]:
    """Ctrl-C (SIGINT) or SIGTERM as a request to stop: a replay or redrive ends after the record in hand
    and waits for what it has sent, instead of a KeyboardInterrupt raised inside librdkafka's calls (where
    it surfaced as a SystemError, or as typer's Exit(130), which `sentpipe` ended with status 0 and no
    word), or a SIGTERM (a job's timeout, an orchestrator) ending it between a send and its ledger record.
    A second signal ends the process at once with the line `at_once`. Signals only in the main thread: the
    console runs replays in others, and passes `stop`, which it sets on its own SIGTERM."""
    stop = threading.Event() if stop is None else stop
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            # Not a KeyboardInterrupt: raised inside librdkafka's calls, it became a SystemError.
            sys.stderr.write(f"error: {at_once}\n")
            sys.stderr.flush()
            os._exit(128 + signum)
        stop.set()

    for sig in previous:
        signal.signal(sig, on_signal)
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class _Replay:
    def __init__(
        self,
        settings: Settings,
        topics: Topics,
        window: Window,
        flt: Filter,
        sender: Producer | None,
        progress: Progress | None,
    ) -> None:
        self.s, self.topics, self.window, self.flt = settings, topics, window, flt
        self.sender, self.progress = sender, progress
        self.result = RunResult(new_run_id(), sender is None)
        self.mark = (r.H_REPLAY_ID, self.result.run_id.encode())
        self.seen_ids: set[str] = set()
        self.done = self.total = 0
        self.stop = threading.Event()  # set: end after the record in hand
        self.ranges: dict[int, Range] = {}  # partition -> the range read (or to read) in it
        self.next: dict[int, int] = {}  # partition -> the offset after the last record handled
        # partition -> its first record whose send failed: a resume starts there, not past it
        self.undelivered: dict[int, int] = {}
        self.unreported: set[tuple[int, int]] = set()  # sent, no delivery report yet: (partition, offset)
        self.unconfirmed = 0  # sent, and the flush gave up before Kafka said whether it took them
        self.deleted_in: set[int] = set()  # partitions retention deleted records of while they were read

    def read(self, kafka: Log, ranges: Sequence[Range]) -> None:
        self.total += sum(x.size for x in ranges)
        log.info(
            "replay reading",
            extra={
                "replay_id": self.result.run_id,
                "partitions": [x.partition for x in ranges if x.size],
                "records": sum(x.size for x in ranges),
                "dry_run": self.sender is None,
            },
        )
        self.ranges.update({x.partition: x for x in ranges})
        self.result.ends.update({x.partition: x.end for x in ranges})
        gone = {x.partition: x.gone for x in ranges if x.gone}
        if gone:
            self.result.past_retention += sum(gone.values())
            log.warning(
                "replay: part of the window is past retention (deleted from the raw topic)",
                extra={"replay_id": self.result.run_id, "records_by_partition": gone},
            )
        older = sorted(x.partition for x in ranges if x.older_deleted)
        if older:
            self.result.start_past_retention = sorted({*self.result.start_past_retention, *older})
            log.warning(
                "replay: the window starts before the oldest record retention kept (older ones are deleted"
                " from the raw topic): records of the window may be gone",
                extra={"replay_id": self.result.run_id, "partitions": older},
            )
        self._report(force=True)
        # Closed here when the loop breaks: a generator left to the collector unassigns later, where a
        # second Ctrl-C was printed as "Exception ignored ... Traceback".
        with contextlib.closing(kafka.read(ranges, self._deleted)) as records:
            for msg in records:
                if self.stop.is_set():  # checked first too: a Ctrl-C while the ranges were read sends nothing
                    break
                self.one(msg)
                self.done += 1
                self.next[msg.partition() or 0] = (msg.offset() or 0) + 1
                self._report()
                if self.stop.is_set():
                    break
        self._report(force=True)

    def _deleted(self, x: Range, first: int, count: int) -> None:
        """Records of the window retention deleted while the run read it: counted as the window's start
        below the log's is (`Range.gone`); they were left out of every count."""
        self.result.past_retention += count
        self.done += count  # nothing left to do for them: the progress still ends at the window's size
        if x.partition not in self.deleted_in:
            self.deleted_in.add(x.partition)
            log.warning(
                "replay: retention deleted part of the window while it was read (from the raw topic)",
                extra={
                    "replay_id": self.result.run_id,
                    "partition": x.partition,
                    "first_offset": first,
                    "records": count,
                },
            )

    def interrupted(self, *, resumable: bool) -> str:
        """The one line an interrupted replay ends with: how far it got, and how to go on."""
        res = self.result
        text = (
            f"replay {res.run_id} interrupted after {self.done} of {self.total} records"
            f" ({res.produced} replayed, {res.failed} failed"
            f"{f', {self.unconfirmed} not confirmed by Kafka' if self.unconfirmed else ''}); what it sent is"
            " applied idempotently, so running it again is safe"
        )
        left = []
        for p, x in sorted(self.ranges.items()):
            # From the first record not sent, or sent and not delivered (the broker went away meanwhile).
            resume = min(self.next.get(p, x.start), self.undelivered.get(p, x.end))
            if resume < x.end:
                left.append((p, resume))
        if resumable and left:
            names = self.window.names
            text += (
                f"; to go on where it stopped, run it with {names.offsets(names.from_offsets, left)} (and its"
                f" other {'fields' if names.fields else 'options'})"
            )
        return text

    def _report(self, force: bool = False) -> None:
        if self.progress is not None and (force or self.done % 500 == 0):
            self.progress(self.done, self.total)

    def one(self, msg: Message) -> None:
        res = self.result
        res.read += 1
        key, value, headers = msg.key(), msg.value() or b"", readable_headers(msg)
        if headers is None:
            # Another producer's header name that is not UTF-8: the router read the record's tenant and type
            # by the record format itself and routed it; read without its headers here, it would be routed
            # again under the default tenant (rows and handler calls of another tenant).
            key_id = key.decode(errors="replace") if key else None
            if not self.window.admits_time(timestamp_ms(msg)) or (
                self.flt.event_ids and key_id not in self.flt.event_ids
            ):
                res.skipped += 1  # as `decide` skips it, by time or by its key, before reading headers
                return
            if self.flt.event_ids:
                self.seen_ids.add(key_id or "")
            res.failed += 1
            res.failures[UNREADABLE_HEADERS] += 1
            return
        d = decide(
            key,
            value,
            headers,
            timestamp_ms(msg),
            window=self.window,
            flt=self.flt,
            settings=self.s,
            topics=self.topics,
        )
        if d.action == "skip":
            res.skipped += 1
            return
        if self.flt.event_ids:  # only needed to report ids not found; unbounded otherwise
            self.seen_ids.add(d.event_id or "")
        if d.action == "fail":
            # Not dead-lettered again: the router dead-lettered it when it arrived (stage route), and each
            # run over the window added one more copy, every one of them redriven (its handlers run once per
            # copy). Counted, and one DEBUG line each: the summary says how many and why.
            assert d.error is not None
            res.failed += 1
            res.failures[d.error.reason] += 1
            log.debug(
                "replay: malformed raw record, left in the DLQ where the router put it",
                extra={
                    "replay_id": res.run_id,
                    "partition": msg.partition(),
                    "offset": msg.offset(),
                    "reason": d.error.reason,
                },
            )
            return
        assert d.routed is not None
        if self.sender is None:
            res.selected[d.type, d.tenant] += 1
        else:
            rt = d.routed
            where = (msg.partition() or 0, msg.offset() or 0)
            self.unreported.add(where)
            try:
                self.sender.send(
                    rt.topic,
                    rt.key,
                    rt.value,
                    [*carried_headers(headers), self.mark],
                    functools.partial(self._delivered, where, (d.type, d.tenant)),
                )
            except ProduceRejected as exc:
                # Refused before it left (larger than the producer takes, say): this record's failure;
                # the records after it are replayed.
                self.unreported.discard(where)
                res.failed += 1
                res.failures[f"produce:{exc.reason}"] += 1
                self._undelivered(where)

    def _delivered(self, where: tuple[int, int], selected: tuple[str, str], err: KafkaError | None) -> None:
        self.unreported.discard(where)
        if err is None:
            self.result.produced += 1
            self.result.selected[selected] += 1  # what Kafka took, not what was handed to the producer
        else:
            self.result.failed += 1
            self.result.failures[f"delivery:{err.name()}"] += 1
            self._undelivered(where)

    def _undelivered(self, where: tuple[int, int]) -> None:
        partition, offset = where
        self.undelivered[partition] = min(offset, self.undelivered.get(partition, offset))
        self.result.undelivered[partition] = self.undelivered[partition]

    def finish(self, *, stopping: bool = False) -> None:
        if self.sender is not None:
            if (stopping or self.stop.is_set()) and self.sender.pending:  # broker away: up to its timeout
                log.warning(
                    f"replay stopping: waiting up to {self.sender.delivery_timeout_s:.0f}s for Kafka to "
                    f"confirm {self.sender.pending} record(s) it was sent",
                    extra={"replay_id": self.result.run_id},
                )
            try:
                self.sender.flush()
            finally:
                self.unconfirmed = len(self.unreported)
                for where in sorted(self.unreported):  # their fate unknown: a resume sends them again
                    self._undelivered(where)


def ops_producer(settings: Settings) -> Producer:
    # A replay has no client waiting on it: give each record longer than a webhook request gets.
    return Producer.from_settings(settings, delivery_timeout_s=30.0)


__all__ = ["Filter", "RunResult", "decide", "failure_line", "parse_types", "replay"]


def log_run(mode: Literal["replay", "redrive"], result: RunResult, *, interrupted: bool = False) -> None:
    """One log line per replay or redrive; the worker's metrics count what it then applies."""
    log.info(
        f"{mode} {'interrupted' if interrupted else 'finished'}",
        extra={
            f"{mode}_id": result.run_id,
            "read": result.read,
            "produced": result.produced,
            "skipped": result.skipped,
            "failed": result.failed,
            "kept": result.kept.total(),
            "past_retention": result.past_retention,
            "unrecorded": result.unrecorded.total(),
            "dry_run": result.dry_run,
        },
    )
