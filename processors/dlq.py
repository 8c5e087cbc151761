"""The dead-letter topic: list, show and redrive its records.

The DLQ has one partition, so `partition:offset` is a record's stable ID. Two kinds of records live there:
raw bodies that could not be routed (stages ingress, route, replay) and canonical events a projection or
handler gave up on (stages project, handler). Redrive sends each back where it can succeed: raw bodies
through `route()` again, canonical events to the routed topic they came from. The redriven record keeps
`sentpipe-dlq-attempts`, so a second failure dead-letters it again with the count incremented.

A log cannot delete what it holds, so a redriven record stays in the DLQ: the redrive ledger
(`<prefix>events.dlq.redriven`, keyed by the record's ID) says which records a redrive already took, once
the broker has what it sent for them. Listing and redrive pass those by; a record that failed again is
taken through its newer copy. Without the ledger each redrive took every earlier one again: handlers ran
twice for events that had recovered, and records still failing doubled in the DLQ with every pass.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

import orjson
from confluent_kafka import KafkaError, KafkaException, Message

from sentpipe.broker import ProduceRejected
from sentpipe.kafka import (
    BrokerUnavailable,
    Fenced,
    Producer,
    TransactionAborted,
    TransactionalProducer,
    message_headers,
)
from sentpipe.processors.group_lock import GroupLock, LockBusy
from sentpipe.processors.offsets import (
    MAX_OFFSET,
    MAX_PARTITION,
    Log,
    NotFound,
    OpsError,
    PartitionOffset,
    Range,
    Window,
    ascii_int,
    capped,
    parse_since,
    timestamp_ms,
)
from sentpipe.processors.replay import (
    Progress,
    RunResult,
    as_malformed,
    carried_headers,
    interruptible,
    log_run,
    new_run_id,
)
from sentpipe.schemas import routing as r
from sentpipe.schemas.events import CanonicalEvent
from sentpipe.schemas.topics import Topics
from sentpipe.settings import Settings

log = logging.getLogger("sentpipe.dlq")

RAW_STAGES = ("ingress", "route", "replay")
ROUTED_STAGES = ("project", "handler")
STAGES = RAW_STAGES + ROUTED_STAGES
# What `dlq list` shows for a record no sentpipe stage wrote (no stage header, or one sentpipe does not know):
# a filter by it finds them, though redrive can never send them anywhere.
UNKNOWN_STAGE = "unknown"


# Times a header may carry: 1970 up to the end of year 9999, what a datetime can show.
MAX_TIME_MS = 253_402_300_799_999


def parse_entry_id(text: str) -> PartitionOffset:
    """`partition:offset`, or a bare offset (the DLQ has one partition)."""
    part, sep, off = text.strip().rpartition(":")
    partition = ascii_int(part, MAX_PARTITION) if sep else 0
    offset = ascii_int(off, MAX_OFFSET)
    if partition is None or offset is None:
        shown = text if len(text) <= 40 else text[:40] + "..."
        raise OpsError(f"{shown!r} is not a DLQ record ID (PARTITION:OFFSET as `dlq list` shows, e.g. 0:12)")
    return PartitionOffset(partition, offset)


def parse_stages(names: Iterable[str]) -> frozenset[str]:
    out = frozenset(n.strip() for n in names)
    unknown = sorted(out - set(STAGES) - {UNKNOWN_STAGE})
    if unknown:
        raise OpsError(f"unknown stage {unknown[0]!r} (known: {', '.join(STAGES)}, {UNKNOWN_STAGE})")
    return out


@dataclass(frozen=True, slots=True)
class DlqEntry:
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]
    redriven_by: str | None = None  # the redrive that took it (the ledger's entry), if one did

    @property
    def id(self) -> str:
        return f"{self.partition}:{self.offset}"

    def header(self, name: str) -> str | None:
        v = r.header_map(self.headers).get(name)
        return None if v is None else v.decode(errors="replace")

    @property
    def stage(self) -> str:
        return self.header(r.H_DLQ_STAGE) or UNKNOWN_STAGE

    @property
    def error_class(self) -> str:
        return self.header(r.H_DLQ_ERROR_CLASS) or "unknown"

    @property
    def message(self) -> str:
        return self.header(r.H_DLQ_MESSAGE) or ""

    # Headers are whatever a producer wrote: a value out of range reads as absent, never as an error.
    @property
    def attempts(self) -> int:
        return max(1, ascii_int(self.header(r.H_DLQ_ATTEMPTS), 1_000_000_000) or 1)

    @property
    def dead_at_ms(self) -> int:
        at = ascii_int(self.header(r.H_DLQ_AT), MAX_TIME_MS)
        return at if at is not None else min(max(self.timestamp_ms, 0), MAX_TIME_MS)

    @property
    def original(self) -> tuple[str, int, int] | None:
        topic, part, off = (self.header(h) for h in (r.H_DLQ_TOPIC, r.H_DLQ_PARTITION, r.H_DLQ_OFFSET))
        partition, offset = ascii_int(part, MAX_PARTITION), ascii_int(off, MAX_OFFSET)
        if topic is None or partition is None or offset is None:
            return None
        return topic, partition, offset

    def canonical(self) -> CanonicalEvent | None:
        if self.stage not in ROUTED_STAGES:
            return None
        try:
            return CanonicalEvent.from_json(self.value)
        except (ValueError, KeyError, TypeError):
            return None

    def identity(self) -> tuple[str | None, str | None, str | None]:
        """(event id, type, tenant), from one parse of the body."""
        ev = self.canonical()
        if ev is not None:
            return ev.id, ev.type.value, ev.tenant
        # An ingress record's key is a random id: framing failed, so the event never had one.
        unframed = self.stage in ROUTED_STAGES or self.stage == "ingress" or not self.key
        event_id = None if unframed or self.key is None else self.key.decode(errors="replace")
        return event_id, self.header(r.H_TYPE), self.header(r.H_TENANT)

    @property
    def event_id(self) -> str | None:
        return self.identity()[0]

    @property
    def type(self) -> str | None:
        return self.identity()[1]

    @property
    def tenant(self) -> str | None:
        return self.identity()[2]

    def row(self) -> DlqRow:
        event_id, type_, tenant = self.identity()
        return DlqRow(
            self.id,
            self.timestamp_ms,
            self.dead_at_ms,
            self.stage,
            self.error_class,
            self.message,
            event_id,
            self.key,
            type_,
            tenant,
            self.original,
            self.attempts,
            self.redriven_by,
        )

    @classmethod
    def from_message(cls, msg: Message) -> DlqEntry:
        return cls(
            msg.partition() or 0,
            msg.offset() or 0,
            timestamp_ms(msg),
            msg.key(),
            msg.value() or b"",
            message_headers(msg),
        )


@dataclass(frozen=True, slots=True)
class DlqRow:
    """What a listing shows of a record, its body parsed once: no body and no headers."""

    id: str
    timestamp_ms: int
    dead_at_ms: int
    stage: str
    error_class: str
    message: str
    event_id: str | None
    key: bytes | None
    type: str | None
    tenant: str | None
    original: tuple[str, int, int] | None
    attempts: int
    redriven_by: str | None = None


def parse_reasons(reasons: Iterable[str], option: str = "--reason") -> frozenset[str]:
    """Error classes to select. One no dead letter can carry (empty, over the header's limit, control
    characters) matched nothing, and the command ended as if there were nothing to do."""
    out = frozenset(reasons)
    for reason in out:
        if not reason.strip():
            raise OpsError(f"{option} is empty: name an error class, as `sentpipe dlq list` shows them")
        if len(reason) > r.MAX_DLQ_ERROR_CLASS or not reason.isprintable():
            raise OpsError(
                f"{option} must be printable text of at most {r.MAX_DLQ_ERROR_CLASS} characters: "
                "no dead letter has another error class"
            )
    return out


@dataclass(frozen=True, slots=True)
class DlqSelection:
    ids: frozenset[PartitionOffset] = frozenset()
    reasons: frozenset[str] = frozenset()
    stages: frozenset[str] = frozenset()
    since_ms: int | None = None

    def admits(self, e: DlqEntry) -> bool:
        if self.ids and PartitionOffset(e.partition, e.offset) not in self.ids:
            return False
        if self.reasons and e.error_class not in self.reasons:
            return False
        if self.stages and (e.stage if e.stage in STAGES else UNKNOWN_STAGE) not in self.stages:
            return False
        return self.since_ms is None or e.dead_at_ms >= self.since_ms


def make_selection(
    *,
    ids: Iterable[str] = (),
    reasons: Iterable[str] = (),
    stages: Iterable[str] = (),
    since: str | None = None,
    fields: bool = False,
) -> DlqSelection:
    """`fields`: errors name the console's fields (`reasons`, `since`), not the CLI's options."""
    return DlqSelection(
        frozenset(parse_entry_id(i) for i in ids),
        parse_reasons(reasons, "reasons" if fields else "--reason"),
        parse_stages(stages),
        None if since is None else parse_since(since, "since" if fields else "--since"),
    )


def _ranges(kafka: Log, dlq: str, sel: DlqSelection) -> list[Range]:
    if not sel.ids:
        return kafka.ranges(dlq, Window(since_ms=sel.since_ms))
    kafka.check_partitions(dlq, {i.partition for i in sel.ids}, missing=NotFound)
    marks = kafka.watermarks(dlq, sorted({i.partition for i in sel.ids}))
    for i in sorted(sel.ids, key=lambda x: (x.partition, x.offset)):
        low, high = marks[i.partition]
        if not low <= i.offset < high:
            held = f"offsets {low}..{high - 1}" if high > low else "no records"
            raise NotFound(f"no DLQ record {i} (partition {i.partition} holds {held})")
    out = []
    for p in sorted({i.partition for i in sel.ids}):
        offsets = [i.offset for i in sel.ids if i.partition == p]
        out.append(Range(dlq, p, min(offsets), max(offsets) + 1))
    return out


def check_selection(settings: Settings, sel: DlqSelection, *, timeout: float = 10.0) -> None:
    """NotFound for a DLQ record the selection names by ID and the DLQ does not hold (the check a redrive
    makes as it starts), for a caller that accepts the request before the redrive runs."""
    if sel.ids:
        with Log(settings, timeout) as kafka:
            _ranges(kafka, Topics(settings.topic_prefix).dlq, sel)


# --- the redrive ledger -----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Ledger:
    """The dead letters redrives took: DLQ record ID -> (the redrive, the record's timestamp)."""

    entries: dict[str, tuple[str, int | None]] = field(default_factory=dict)

    def taken_by(self, e: DlqEntry) -> str | None:
        """The redrive that took `e`, if one did. By ID and timestamp: a DLQ topic recreated (to purge it, or
        on a new cluster) starts at offset 0 again, and by ID alone its new dead letters read as taken by
        redrives that ran before they existed, hidden from `dlq list` and never redriven. Entries written
        before the timestamp was recorded match by ID alone."""
        got = self.entries.get(e.id)
        if got is None:
            return None
        run, dead_at_ms = got
        return run if dead_at_ms is None or dead_at_ms == e.dead_at_ms else None


def redriven(kafka: Log, topics: Topics, keep_alive: Callable[[], object] | None = None) -> Ledger | None:
    """The ledger as it is now; None when its topic is missing (`sentpipe topics ensure` creates it).
    `keep_alive` is called every `KEEP_ALIVE_EVERY` records."""
    if topics.dlq_redriven not in kafka.topics:
        return None
    taken: dict[str, tuple[str, int | None]] = {}
    for n, msg in enumerate(kafka.read(kafka.ranges(topics.dlq_redriven, Window())), 1):
        if keep_alive is not None and n % KEEP_ALIVE_EVERY == 0:
            keep_alive()
        key = msg.key()
        if not key:
            continue
        try:
            value = orjson.loads(msg.value() or b"{}")
            run, dead_at_ms = value.get("redrive_id"), value.get("dead_at_ms")
        except (orjson.JSONDecodeError, AttributeError):
            run = dead_at_ms = None
        taken[key.decode(errors="replace")] = (
            run if isinstance(run, str) else "unknown",
            dead_at_ms if type(dead_at_ms) is int else None,
        )
    return Ledger(taken)


# A redrive reads the whole ledger holding its lock. Unpolled for that long (millions of records), the
# lock's member paid a confirmation after what looked like a suspension and, past the group's poll
# interval, was dropped from the group: the pass ended "lost" before it sent anything, every time.
KEEP_ALIVE_EVERY = 1000


def redrive_group(settings: Settings) -> str:
    """The consumer group whose one member at a time may redrive (`group_lock`): it owns the ledger."""
    return f"{settings.app_id}-redrive"


def ledger_entry(e: DlqEntry, redrive_id: str, to: str, outcome: str) -> tuple[bytes, bytes]:
    """Key and value of the ledger's record for `e`: taken by `redrive_id`, sent to `to`."""
    value = {
        "redrive_id": redrive_id,
        "at_ms": int(time.time() * 1000),
        "to": to,
        "outcome": outcome,
        "dead_at_ms": e.dead_at_ms,  # which record had this ID (`Ledger.taken_by`)
    }
    return e.id.encode(), orjson.dumps(value)


@dataclass(frozen=True, slots=True)
class DlqListing:
    entries: list[DlqRow]  # the newest `limit` matches, oldest first
    matched: int
    total: int  # records in the DLQ right now
    redriven: int = 0  # matching records a redrive already took (listed only with `include_redriven`)


LIST_PROGRESS_EVERY = 500  # records read between two progress reports of a listing


def list_entries(
    settings: Settings,
    sel: DlqSelection,
    *,
    limit: int = 50,
    timeout: float = 10.0,
    include_redriven: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> DlqListing:
    """The newest `limit` records that match; those a redrive already took only with `include_redriven`.
    `progress` is told (records read, records to read) as the DLQ is read: all of it, to show the newest."""
    if not 1 <= limit <= 1_000_000:
        raise OpsError("--limit must be between 1 and 1000000")
    topics = Topics(settings.topic_prefix)
    with Log(settings, timeout) as kafka:
        marks = kafka.watermarks(topics.dlq, range(kafka.partition_count(topics.dlq)))
        taken = redriven(kafka, topics) or Ledger()
        # Whole records, made rows at the end: a row parses the body, and only the rows shown are worth it
        # (parsing every match cost ~40 us each, 40 s over a million letters to show 50).
        newest: deque[DlqEntry] = deque(maxlen=limit)
        matched = passed = read = 0
        ranges = _ranges(kafka, topics.dlq, sel)
        size = sum(rng.size for rng in ranges)
        for n, msg in enumerate(kafka.read(ranges), 1):
            read = n
            if progress is not None and n % LIST_PROGRESS_EVERY == 0:
                progress(n, size)
            e = DlqEntry.from_message(msg)
            if not sel.admits(e):
                continue
            by = taken.taken_by(e)
            if by is not None:
                passed += 1
                if not include_redriven:
                    continue
                e = replace(e, redriven_by=by)
            matched += 1
            newest.append(e)
    # Read whole, the DLQ's records are those read: its offsets also count the commit markers (and aborted
    # copies) of redrives' transactions, "9 in the DLQ" where it held 8. Read in part, the offsets are all
    # there is to go by.
    whole = not sel.ids and sel.since_ms is None
    total = read if whole else sum(high - low for low, high in marks.values())
    return DlqListing([e.row() for e in newest], matched, total, passed)


def show_entry(settings: Settings, entry_id: str, *, timeout: float = 10.0) -> DlqEntry:
    want = parse_entry_id(entry_id)
    topics = Topics(settings.topic_prefix)
    with Log(settings, timeout) as kafka:
        for msg in kafka.read(_ranges(kafka, topics.dlq, DlqSelection(ids=frozenset({want})))):
            if msg.offset() == want.offset:
                e = DlqEntry.from_message(msg)
                return replace(e, redriven_by=(redriven(kafka, topics) or Ledger()).taken_by(e))
    raise NotFound(f"no DLQ record {want}")  # e.g. compacted away between the check and the read


# --- redrive ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RedriveStep:
    """Where one DLQ record goes: `send` back into the pipeline, `dlq` again (it still fails), or `keep`."""

    action: Literal["send", "dlq", "keep"]
    topic: str
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]
    reason: str = ""


def plan(e: DlqEntry, settings: Settings, topics: Topics, redrive_id: str) -> RedriveStep:
    carried = carried_headers(e.headers)
    marks = [(r.H_DLQ_ATTEMPTS, str(e.attempts).encode()), (r.H_REDRIVE_ID, redrive_id.encode())]
    key = e.key or b""
    if e.stage in ROUTED_STAGES:
        original = e.original
        if original is None or original[0] not in topics.routed:
            where = original[0] if original else "none"
            return RedriveStep("keep", "", key, e.value, [], f"original topic {where} is not a routed topic")
        return RedriveStep("send", original[0], key, e.value, carried + marks)
    if e.stage not in RAW_STAGES:
        why = "no sentpipe stage" if e.header(r.H_DLQ_STAGE) is None else f"unknown stage {e.stage!r}"
        return RedriveStep("keep", "", key, e.value, [], why)
    try:
        routed = r.route(
            # An ingress record's key is random (framing failed): the body alone says what the event is.
            None if e.stage == "ingress" else e.key,
            e.value,
            r.header_map(carried),
            topics=topics,
            id_source=settings.event_id_source,
            default_tenant=settings.default_tenant,
            record_timestamp_ms=e.timestamp_ms,
        )
    except Exception as caught:  # anything raised for one record is that record's failure
        exc = as_malformed(caught)
        # Still broken: back to the DLQ under its original stage (so the next redrive treats it the same
        # way) and original coordinates, one attempt more.
        original = e.original
        dlq = r.dlq_headers(
            stage=e.stage,
            error_class=exc.reason,
            message=exc.detail,
            attempts=e.attempts + 1,
            topic=original[0] if original else None,
            partition=original[1] if original else None,
            offset=original[2] if original else None,
        )
        return RedriveStep("dlq", topics.dlq, key, e.value, carried + dlq + marks[1:], exc.reason)
    return RedriveStep("send", routed.topic, routed.key, routed.value, carried + marks)


# A redrive sends in transactions: what it sent and the ledger entries saying so become visible together, at
# each commit. A commit every so many records or seconds bounds what a redrive stopped at once (killed,
# fenced) leaves for the next one to send.
COMMIT_EVERY = 500
COMMIT_AFTER_S = 2.0
# What a transaction left open (its redrive killed, or suspended) holds back the routed partitions it wrote,
# for their read-committed readers (the projector), until Kafka aborts it: within this time, less than the
# minute after which a worker with lag and no progress fails its liveness.
TXN_TIMEOUT_S = 30.0
TXN_WAIT_S = 10.0  # the least time given to starting, committing or aborting a transaction
DELIVERY_TIMEOUT_S = 20.0  # per record: librdkafka wants it within the transaction's timeout


def _redrive_producer(settings: Settings) -> TransactionalProducer:
    """One transactional.id per deployment, as the lock's group: each redrive fences the one before."""
    return TransactionalProducer.transactional(
        settings,
        redrive_group(settings),
        delivery_timeout_s=DELIVERY_TIMEOUT_S,
        transaction_timeout_s=TXN_TIMEOUT_S,
    )


Counts = tuple[int, int, Counter[str], Counter[tuple[str, str]], Counter[str]]


def _counts(result: RunResult) -> Counts:
    """What a transaction's sends change in `result`, to put back when the transaction is aborted."""
    return (
        result.produced,
        result.failed,
        Counter(result.failures),
        Counter(result.selected),
        Counter(result.unrecorded),
    )


def _restore(result: RunResult, counts: Counts) -> None:
    result.produced, result.failed = counts[0], counts[1]
    result.failures, result.selected, result.unrecorded = Counter(counts[2]), Counter(counts[3]), counts[4]


@dataclass
class _Txn:
    """The open transaction: the counts before it, the records it sent and what Kafka refused in it."""

    before: Counts
    records: list[tuple[DlqEntry, RedriveStep]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    began: float = field(default_factory=time.monotonic)

    def due(self) -> bool:
        return len(self.records) >= COMMIT_EVERY or (
            bool(self.records) and time.monotonic() - self.began >= COMMIT_AFTER_S
        )


def _finish(
    sender: TransactionalProducer,
    topics: Topics,
    acknowledged: list[tuple[bytes, bytes]],
    result: RunResult,
    txn: _Txn,
    timeout: float,
) -> None:
    sender.flush()  # every delivery report: each record Kafka took gets its ledger entry in this transaction
    _write_ledger(sender, topics, acknowledged, result, txn)
    sender.commit(max(timeout, TXN_WAIT_S))


def _commit(
    sender: TransactionalProducer,
    topics: Topics,
    acknowledged: list[tuple[bytes, bytes]],
    result: RunResult,
    txn: _Txn,
    timeout: float,
) -> None:
    """Commit the open transaction. One Kafka refused part of (a record larger than its topic takes, say) is
    aborted whole, so its records are sent again one transaction each: the one refused fails alone, its
    neighbours go on. Fenced or BrokerUnavailable, the counts are put back to what is committed."""
    try:
        try:
            _finish(sender, topics, acknowledged, result, txn, timeout)
            return
        except TransactionAborted:
            _restore(result, txn.before)
            acknowledged.clear()
        for e, step in txn.records:
            one = _Txn(_counts(result))
            sender.begin(max(timeout, TXN_WAIT_S))
            txn = one
            _redrive_one(e, step, sender, result, acknowledged, one)
            try:
                _finish(sender, topics, acknowledged, result, one, timeout)
            except TransactionAborted as exc:
                _restore(result, one.before)
                acknowledged.clear()
                reason = one.refused[0] if one.refused else f"transaction:{exc}"
                result.failed += 1
                copy = DLQ_COPY if step.action == "dlq" and reason.startswith("delivery:") else ""
                result.failures[copy + reason] += 1
    except (Fenced, BrokerUnavailable):
        _restore(result, txn.before)  # nothing of the open transaction will be visible
        acknowledged.clear()
        raise


REDRIVE_AT_ONCE = (
    "redrive interrupted at once: what it sent and had not committed with its ledger entries is taken back"
    f" (Kafka aborts it within {TXN_TIMEOUT_S:g} s, or when the next redrive starts); the next redrive sends"
    " those records"
)


def redrive(
    settings: Settings,
    sel: DlqSelection,
    *,
    dry_run: bool = False,
    progress: Progress | None = None,
    timeout: float = 10.0,
    stop: threading.Event | None = None,
    upto: Mapping[int, int] | None = None,
) -> RunResult:
    """One pass over the DLQ as it is now, past the records an earlier redrive took; records it dead-letters
    again land after the end and wait for the next pass. `stop` and `upto` as for `replay`."""
    try:
        return _redrive(settings, sel, dry_run, progress, timeout, stop, upto)
    except KeyboardInterrupt:  # Ctrl-C before it began to read
        raise OpsError(REDRIVE_AT_ONCE) from None


def _redrive(
    settings: Settings,
    sel: DlqSelection,
    dry_run: bool,
    progress: Progress | None,
    timeout: float,
    stop_event: threading.Event | None,
    upto: Mapping[int, int] | None,
) -> RunResult:
    topics = Topics(settings.topic_prefix)
    result = RunResult(new_run_id(), dry_run)
    lost = unconfirmed = False
    gone: Exception | None = None
    done = total = 0
    with Log(settings, timeout) as kafka, interruptible(REDRIVE_AT_ONCE, stop_event) as stop:
        if not dry_run and topics.dlq_redriven not in kafka.topics:
            raise OpsError(
                f"topic {topics.dlq_redriven} does not exist on {kafka.bootstrap}: run `sentpipe topics "
                "ensure` first (it records which dead letters a redrive took, so none is taken twice)"
            )
        # Held from before the ledger is read until what this pass wrote to it is flushed.
        lock = None if dry_run else GroupLock(settings, topics.dlq_redriven, redrive_group(settings), timeout)
        try:
            if lock is not None:
                lock.acquire()
        except LockBusy as exc:
            raise OpsError(f"another redrive is running: {exc}") from None
        txn: _Txn | None = None
        sender: TransactionalProducer | None = None
        try:
            if not dry_run:
                # Before the ledger is read: this fences the redrive that held the lock before (one
                # suspended past its session, then resumed), aborting what it had not committed, so the
                # ledger read next holds all that redrive sent, and nothing it sends later counts.
                sender = _redrive_producer(settings)
                try:
                    sender.begin(max(timeout, TXN_WAIT_S))
                except (Fenced, BrokerUnavailable) as exc:
                    raise OpsError(f"the redrive could not start: {exc}") from None
                txn = _Txn(_counts(result))
            taken = redriven(kafka, topics, lock.held if lock is not None else None) or Ledger()
            ranges = capped(_ranges(kafka, topics.dlq, sel), upto)
            result.ends = {x.partition: x.end for x in ranges}
            total = sum(x.size for x in ranges)
            log.info(
                "redrive started",
                extra={"redrive_id": result.run_id, "records": total, "dry_run": dry_run},
            )
            # Ledger records to write: the broker has their sends.
            acknowledged: list[tuple[bytes, bytes]] = []
            if progress is not None:
                progress(0, total)
            # Closed here when the loop breaks, not later by the collector (see `_Replay.read`).
            cut_short = True  # until the loop ends by itself
            deleted_in: set[int] = set()

            def deleted(x: Range, first: int, count: int) -> None:
                # Retention deleting dead letters the pass planned to read: librdkafka skipped them without
                # a word, "read" ended short and a dead letter asked for by ID was not redriven, exit 0.
                nonlocal done
                done += count
                result.past_retention += count
                named = sorted(sel.ids, key=lambda i: (i.partition, i.offset))
                result.missing_ids += [
                    str(i) for i in named if i.partition == x.partition and first <= i.offset < first + count
                ]
                if x.partition not in deleted_in:
                    deleted_in.add(x.partition)
                    log.warning(
                        "redrive: retention deleted dead letters before the redrive read them",
                        extra={
                            "redrive_id": result.run_id,
                            "partition": x.partition,
                            "first_offset": first,
                            "records": count,
                        },
                    )

            try:
                with contextlib.closing(kafka.read(ranges, deleted)) as records:
                    for msg in records:
                        # A stop between records (or before the first: Ctrl-C while the ledger was read):
                        # every send so far reaches the ledger below. Stopped by the KeyboardInterrupt, a
                        # pass left the acknowledged ones out, and each still-failing record among them
                        # stayed in the DLQ twice for good.
                        if stop.is_set():
                            break
                        if lock is not None and not lock.held():
                            lost = True  # another process may take over: stop sending, record what was sent
                            break
                        done += 1
                        result.read += 1
                        e = DlqEntry.from_message(msg)
                        if not sel.admits(e):
                            result.skipped += 1
                        elif taken.taken_by(e) is not None:
                            result.already_redriven += 1
                        else:
                            step = plan(e, settings, topics, result.run_id)
                            _redrive_one(e, step, sender, result, acknowledged, txn)
                        if sender is not None and acknowledged:
                            _write_ledger(sender, topics, acknowledged, result, txn)
                        if sender is not None and txn is not None and txn.due():
                            try:
                                _commit(sender, topics, acknowledged, result, txn, timeout)
                                txn = None
                                sender.begin(max(timeout, TXN_WAIT_S))
                                txn = _Txn(_counts(result))
                            except Fenced:
                                lost = True  # another redrive started: what this one had open is aborted
                                txn = None
                                break
                            except BrokerUnavailable:
                                unconfirmed = txn is not None  # its commit's outcome is not known
                                txn = None
                                raise
                        if progress is not None and (done % 500 == 0 or done == total):
                            progress(done, total)
                        if stop.is_set():
                            break
                cut_short = stop.is_set() or lost
                if progress is not None and not cut_short:
                    progress(done, total)  # dead letters deleted last never came to say the pass was done
            except Fenced:
                lost = True  # another redrive started: what this one had not committed is aborted
            except (BrokerUnavailable, KafkaException) as exc:
                gone = exc  # the broker gone mid-pass: the pass ends saying how far it got, as a Ctrl-C does
            finally:
                # Whatever ended the pass, what the broker took is committed with its ledger entries: an
                # error out of the loop left the sends made so far out of the ledger, to be sent again by
                # every later pass.
                if sender is not None and txn is not None:
                    if cut_short and sender.pending:
                        log.warning(
                            f"redrive stopping: waiting up to {sender.delivery_timeout_s:.0f}s for Kafka to "
                            f"confirm {sender.pending} record(s) it was sent",
                            extra={"redrive_id": result.run_id},
                        )
                    try:
                        _commit(sender, topics, acknowledged, result, txn, timeout)
                    except Fenced:
                        lost = True
                    except BrokerUnavailable as exc:
                        gone, unconfirmed = gone or exc, True
        finally:
            if lock is not None:
                lock.release()
    if result.failed or result.kept:
        log.warning(
            f"redrive: {result.failed + result.kept.total()} records {'would not be' if dry_run else 'not'}"
            " redriven",
            extra={
                "redrive_id": result.run_id,
                "reasons": dict((result.failures + result.kept).most_common(10)),
            },
        )
    log_run("redrive", result, interrupted=stop.is_set() or gone is not None)
    if gone is not None:
        ledger = (
            "records Kafka did not confirm may be sent again by the next redrive"
            if unconfirmed
            else _in_the_ledger(result)
        )
        raise OpsError(
            f"{gone}; redrive {result.run_id} stopped after {done} of {total} records ({result.produced} "
            f"redriven, {result.failed} failed); {ledger}, and running it again goes on with the rest"
        )
    if lost:
        why = "the broker took this process for dead"
        if lock is not None and lock.paused_s:
            why = f"it was paused for {lock.paused_s:.0f} s, long enough for another redrive to take over"
        raise OpsError(
            f"the redrive lost consumer group {redrive_group(settings)} after {result.read} records ({why});"
            f" {_in_the_ledger(result)}: run it again"
        )
    if stop.is_set():
        raise OpsError(
            f"redrive {result.run_id} interrupted after {done} of {total} records ({result.produced} "
            f"redriven, {result.failed} failed); {_in_the_ledger(result)}, so running it again goes on "
            "with the rest"
        )
    return result


def _in_the_ledger(result: RunResult) -> str:
    # Said of every stop, it was untrue when the broker left mid-pass: records sent, their ledger writes lost.
    unrecorded = result.unrecorded.total()
    if not unrecorded:
        return "what it sent is in the ledger"
    return f"{unrecorded} record(s) it sent are not in the ledger (the next redrive sends them again)"


def redrive_failed(result: RunResult, sel: DlqSelection) -> str | None:
    """The closing line of a redrive that did not do what it was asked, or None.

    Records no stage can take fail a redrive only when it named them by ID: an unfiltered pass would
    otherwise fail for as long as one sits in the DLQ.
    """
    lines = []
    if not result.dry_run and (result.failed or result.unrecorded or (sel.ids and result.kept)):
        lines.append(redrive_failures(result))
    if result.missing_ids:  # asked for by ID, deleted by retention before it was read: not redriven
        lines.append(
            f"{len(result.missing_ids)} dead letter(s) asked for by ID were deleted by retention before the"
            f" redrive read them: {', '.join(result.missing_ids)}"
        )
    return "; ".join(lines) or None


TOO_LARGE = "delivery:MSG_SIZE_TOO_LARGE"  # a topic's max.message.bytes below the record
PRODUCER_TOO_LARGE = "produce:msg_size_too_large"  # the producer's own message.max.bytes below it


# A record whose ledger entry Kafka refused: its transaction, what was sent for it included, was aborted.
LEDGER_REFUSED = "ledger:"
# A record still failing whose new dead letter Kafka did not take: it is not back in the DLQ, so it is told
# apart by what happened to that copy, as a record sent back is.
DLQ_COPY = "dlq "


def redrive_failures(result: RunResult) -> str:
    """The closing line of a redrive that failed, by what the operator does next."""
    failures: Counter[str] = Counter()
    for reason, n in result.failures.items():
        failures[reason.removeprefix(DLQ_COPY)] += n
    too_large = failures[TOO_LARGE]
    kafka = sum(n for reason, n in failures.items() if reason.startswith("delivery:")) - too_large
    refused = {reason: n for reason, n in failures.items() if reason.startswith("produce:")}
    unledgered = sum(n for reason, n in failures.items() if reason.startswith(LEDGER_REFUSED))
    again = result.failed - kafka - too_large - sum(refused.values()) - unledgered
    ledger = result.unrecorded.total()
    parts = []
    if result.kept:
        parts.append(
            f"{result.kept.total()} record(s) cannot be redriven (no sentpipe stage or routed topic takes"
            f" them); left in the DLQ (`sentpipe dlq list --stage {UNKNOWN_STAGE}` lists those without a"
            " stage)"
        )
    if again:
        parts.append(f"{again} record(s) failed again; they are back in the DLQ (or left there)")
    if kafka:
        parts.append(f"{kafka} record(s) Kafka did not take (is it reachable?): run the redrive again")
    if too_large:
        # Not a broker away: running it again alone meets the same refusal.
        parts.append(
            f"{too_large} record(s) larger than their topic's max.message.bytes: left in the DLQ; raise the"
            " limit (`sentpipe topics ensure` sets it from the settings) and run the redrive again"
        )
    if n := refused.pop(PRODUCER_TOO_LARGE, 0):
        # The producer's own limit follows SENTPIPE_MAX_BODY_BYTES: lowered since these were dead-lettered.
        parts.append(
            f"{n} record(s) larger than this process's producer takes (SENTPIPE_MAX_BODY_BYTES sets its"
            " limit): left in the DLQ; run the redrive with the SENTPIPE_MAX_BODY_BYTES they arrived under"
        )
    if refused:
        why = ", ".join(f"{n} {reason.removeprefix('produce:')}" for reason, n in sorted(refused.items()))
        parts.append(
            f"{sum(refused.values())} record(s) the producer refused before sending ({why}): left in the DLQ"
        )
    if unledgered:
        why = ", ".join(
            reason.removeprefix(LEDGER_REFUSED)
            for reason in sorted(failures)
            if reason.startswith(LEDGER_REFUSED)
        )
        parts.append(
            f"{unledgered} record(s) not redriven: Kafka refused their ledger entries ({why}), so what was"
            " sent for them was taken back; left in the DLQ"
        )
    if ledger:
        parts.append(
            f"{ledger} record(s) sent but not recorded in the ledger: the next redrive sends them again"
        )
    return "; ".join(parts)


def _redrive_one(
    e: DlqEntry,
    step: RedriveStep,
    sender: Producer | None,
    result: RunResult,
    acknowledged: list[tuple[bytes, bytes]],
    txn: _Txn | None = None,
) -> None:
    ctx = {"redrive_id": result.run_id, "dlq_id": e.id, "stage": e.stage, "attempts": e.attempts}
    if step.action == "keep":
        result.kept[step.reason] += 1
        # Per record at DEBUG: a pass over a DLQ still failing for one reason wrote a warning per record,
        # thousands of lines burying the progress bar. The summary says how many and why.
        log.debug("redrive: record left in the DLQ", extra={**ctx, "reason": step.reason})
        return
    if step.action == "dlq":
        result.failed += 1
        result.failures[step.reason] += 1
        again = "would be dead-lettered again" if sender is None else "dead-lettered again"
        log.debug(f"redrive: still failing, {again}", extra={**ctx, "reason": step.reason})
    elif sender is None:
        result.selected[e.stage, step.topic] += 1
    if sender is None:
        return

    def delivered(err: KafkaError | None) -> None:
        if err is None:
            # Taken: the ledger says so once the broker has it (a record sent again, or its newer copy).
            outcome = "sent" if step.action == "send" else "dead-lettered again"
            acknowledged.append(ledger_entry(e, result.run_id, step.topic, outcome))
            if step.action == "send":
                result.produced += 1
                result.selected[e.stage, step.topic] += 1  # what Kafka took
        elif step.action == "send":
            result.failed += 1
            result.failures[f"delivery:{err.name()}"] += 1
        else:  # counted failed already; its new copy was not written, so it stays untaken for the next pass
            _recount(result, step.reason, f"dlq delivery:{err.name()}")
        if err is not None and txn is not None:
            txn.refused.append(f"delivery:{err.name()}")  # which record made the transaction fail

    try:
        sender.send(step.topic, step.key, step.value, step.headers, delivered)
        if txn is not None:
            txn.records.append((e, step))
    except ProduceRejected as exc:
        # Refused before it left (larger than the producer takes now, say): this record's failure, left
        # untaken, as a replay counts it. It ended every pass at this record, the ones after it never read.
        if step.action == "send":
            result.failed += 1
            result.failures[f"produce:{exc.reason}"] += 1
        else:  # counted failed already; no new copy, so it stays untaken for the next pass
            _recount(result, step.reason, f"dlq produce:{exc.reason}")
        log.warning(
            "redrive: Kafka refused the record before sending it; left in the DLQ",
            extra={**ctx, "reason": exc.reason},
        )


def _recount(result: RunResult, was: str, now: str) -> None:
    """A failure counted under `was` moved to `now`: the breakdown adds up to `failed`, each record once
    (a record failing again whose new copy Kafka refused was counted under both)."""
    result.failures[was] -= 1
    if result.failures[was] <= 0:
        del result.failures[was]
    result.failures[now] += 1


def _write_ledger(
    sender: Producer,
    topics: Topics,
    acknowledged: list[tuple[bytes, bytes]],
    result: RunResult,
    txn: _Txn | None = None,
) -> None:
    entries = acknowledged[:]
    acknowledged.clear()

    def written(err: KafkaError | None) -> None:
        if err is not None:
            # The record was sent but the ledger does not say so: a later redrive would take it again. Not a
            # failure: the record is counted already, redriven or failed again.
            result.unrecorded[f"{LEDGER_REFUSED}{err.name()}"] += 1
            if txn is not None:
                txn.refused.append(f"{LEDGER_REFUSED}{err.name()}")

    for key, value in entries:
        sender.send(topics.dlq_redriven, key, value, [], written)
