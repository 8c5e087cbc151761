"""The dead-letter topic: list, show and redrive its records.

The DLQ has one partition, so `partition:offset` is a record's stable ID. Two kinds of records live there:
raw bodies that could not be routed (stages ingress, route, replay) and canonical events a projection or
handler gave up on (stages project, handler). Redrive sends each back where it can succeed: raw bodies
through `route()` again, canonical events to the routed topic they came from. The redriven record keeps
`sentpipe-dlq-attempts`, so a second failure dead-letters it again with the count incremented.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from confluent_kafka import KafkaError, Message

from sentpipe.kafka import Producer
from sentpipe.processors.offsets import (
    Log,
    OpsError,
    PartitionOffset,
    Range,
    Window,
    parse_when,
    timestamp_ms,
)
from sentpipe.processors.replay import (
    Progress,
    RunResult,
    as_malformed,
    carried_headers,
    log_run,
    new_run_id,
    ops_producer,
)
from sentpipe.schemas import routing as r
from sentpipe.schemas.events import CanonicalEvent
from sentpipe.schemas.topics import Topics
from sentpipe.settings import Settings

log = logging.getLogger("sentpipe.dlq")

RAW_STAGES = ("ingress", "route", "replay")
ROUTED_STAGES = ("project", "handler")
STAGES = RAW_STAGES + ROUTED_STAGES


def parse_entry_id(text: str) -> PartitionOffset:
    """`partition:offset`, or a bare offset (the DLQ has one partition)."""
    part, sep, off = text.strip().rpartition(":")
    if not off.isdigit() or (sep and not part.isdigit()):
        raise OpsError(f"{text!r} is not a DLQ record ID (PARTITION:OFFSET as `dlq list` shows, e.g. 0:12)")
    return PartitionOffset(int(part) if sep else 0, int(off))


def parse_stages(names: Iterable[str]) -> frozenset[str]:
    out = frozenset(n.strip() for n in names)
    unknown = sorted(out - set(STAGES))
    if unknown:
        raise OpsError(f"unknown stage {unknown[0]!r} (known: {', '.join(STAGES)})")
    return out


@dataclass(frozen=True, slots=True)
class DlqEntry:
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]

    @property
    def id(self) -> str:
        return f"{self.partition}:{self.offset}"

    def header(self, name: str) -> str | None:
        v = r.header_map(self.headers).get(name)
        return None if v is None else v.decode(errors="replace")

    @property
    def stage(self) -> str:
        return self.header(r.H_DLQ_STAGE) or "unknown"

    @property
    def error_class(self) -> str:
        return self.header(r.H_DLQ_ERROR_CLASS) or "unknown"

    @property
    def message(self) -> str:
        return self.header(r.H_DLQ_MESSAGE) or ""

    @property
    def attempts(self) -> int:
        try:
            return max(1, int(self.header(r.H_DLQ_ATTEMPTS) or 1))
        except ValueError:
            return 1

    @property
    def dead_at_ms(self) -> int:
        try:
            return int(self.header(r.H_DLQ_AT) or self.timestamp_ms)
        except ValueError:
            return self.timestamp_ms

    @property
    def original(self) -> tuple[str, int, int] | None:
        topic, part, off = (self.header(h) for h in (r.H_DLQ_TOPIC, r.H_DLQ_PARTITION, r.H_DLQ_OFFSET))
        if topic is None or part is None or off is None:
            return None
        try:
            return topic, int(part), int(off)
        except ValueError:
            return None

    def canonical(self) -> CanonicalEvent | None:
        if self.stage not in ROUTED_STAGES:
            return None
        try:
            return CanonicalEvent.from_json(self.value)
        except (ValueError, KeyError, TypeError):
            return None

    @property
    def event_id(self) -> str | None:
        ev = self.canonical()
        if ev is not None:
            return ev.id
        # An ingress record's key is a random id: framing failed, so the event never had one.
        if self.stage in ROUTED_STAGES or self.stage == "ingress" or not self.key:
            return None
        return self.key.decode(errors="replace")

    @property
    def type(self) -> str | None:
        ev = self.canonical()
        return ev.type.value if ev is not None else self.header(r.H_TYPE)

    @property
    def tenant(self) -> str | None:
        ev = self.canonical()
        return ev.tenant if ev is not None else self.header(r.H_TENANT)

    @classmethod
    def from_message(cls, msg: Message) -> DlqEntry:
        return cls(
            msg.partition() or 0,
            msg.offset() or 0,
            timestamp_ms(msg),
            msg.key(),
            msg.value() or b"",
            r.header_list(msg.headers()),
        )


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
        if self.stages and e.stage not in self.stages:
            return False
        return self.since_ms is None or e.dead_at_ms >= self.since_ms


def make_selection(
    *,
    ids: Iterable[str] = (),
    reasons: Iterable[str] = (),
    stages: Iterable[str] = (),
    since: str | None = None,
) -> DlqSelection:
    return DlqSelection(
        frozenset(parse_entry_id(i) for i in ids),
        frozenset(reasons),
        parse_stages(stages),
        parse_when(since, "--since") if since is not None else None,
    )


def _ranges(kafka: Log, dlq: str, sel: DlqSelection) -> list[Range]:
    if not sel.ids:
        return kafka.ranges(dlq, Window(since_ms=sel.since_ms))
    kafka.check_partitions(dlq, {i.partition for i in sel.ids})
    marks = kafka.watermarks(dlq, sorted({i.partition for i in sel.ids}))
    for i in sorted(sel.ids, key=lambda x: (x.partition, x.offset)):
        low, high = marks[i.partition]
        if not low <= i.offset < high:
            held = f"offsets {low}..{high - 1}" if high > low else "no records"
            raise OpsError(f"no DLQ record {i} (partition {i.partition} holds {held})")
    out = []
    for p in sorted({i.partition for i in sel.ids}):
        offsets = [i.offset for i in sel.ids if i.partition == p]
        out.append(Range(dlq, p, min(offsets), max(offsets) + 1))
    return out


@dataclass(frozen=True, slots=True)
class DlqListing:
    entries: list[DlqEntry]  # the newest `limit` matches, oldest first
    matched: int
    total: int  # records in the DLQ right now


def list_entries(
    settings: Settings, sel: DlqSelection, *, limit: int = 50, timeout: float = 10.0
) -> DlqListing:
    if limit < 1:
        raise OpsError("--limit must be at least 1")
    dlq = Topics(settings.topic_prefix).dlq
    with Log(settings, timeout) as kafka:
        marks = kafka.watermarks(dlq, range(kafka.partition_count(dlq)))
        newest: deque[DlqEntry] = deque(maxlen=limit)
        matched = 0
        for msg in kafka.read(_ranges(kafka, dlq, sel)):
            e = DlqEntry.from_message(msg)
            if sel.admits(e):
                matched += 1
                newest.append(e)
    return DlqListing(list(newest), matched, sum(high - low for low, high in marks.values()))


def show_entry(settings: Settings, entry_id: str, *, timeout: float = 10.0) -> DlqEntry:
    want = parse_entry_id(entry_id)
    dlq = Topics(settings.topic_prefix).dlq
    with Log(settings, timeout) as kafka:
        for msg in kafka.read(_ranges(kafka, dlq, DlqSelection(ids=frozenset({want})))):
            if msg.offset() == want.offset:
                return DlqEntry.from_message(msg)
    raise OpsError(f"no DLQ record {want}")  # e.g. compacted away between the check and the read


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
        return RedriveStep("keep", "", key, e.value, [], f"unknown stage {e.stage!r}")
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


def redrive(
    settings: Settings,
    sel: DlqSelection,
    *,
    dry_run: bool = False,
    progress: Progress | None = None,
    timeout: float = 10.0,
) -> RunResult:
    """One pass over the DLQ as it is now; records it dead-letters again land after the end and wait."""
    topics = Topics(settings.topic_prefix)
    result = RunResult(new_run_id(), dry_run)
    with Log(settings, timeout) as kafka:
        ranges = _ranges(kafka, topics.dlq, sel)
        total = sum(x.size for x in ranges)
        log.info(
            "redrive started",
            extra={"redrive_id": result.run_id, "records": total, "dry_run": dry_run},
        )
        sender = None if dry_run else ops_producer(settings)
        if progress is not None:
            progress(0, total)
        for done, msg in enumerate(kafka.read(ranges), 1):
            result.read += 1
            e = DlqEntry.from_message(msg)
            if not sel.admits(e):
                result.skipped += 1
            else:
                _redrive_one(e, plan(e, settings, topics, result.run_id), sender, result)
            if progress is not None and (done % 500 == 0 or done == total):
                progress(done, total)
        if sender is not None:
            sender.flush()
    log_run("redrive", result)
    return result


def _redrive_one(e: DlqEntry, step: RedriveStep, sender: Producer | None, result: RunResult) -> None:
    ctx = {"redrive_id": result.run_id, "dlq_id": e.id, "stage": e.stage, "attempts": e.attempts}
    if step.action == "keep":
        result.failed += 1
        result.failures[step.reason] += 1
        log.warning("redrive: record left in the DLQ", extra={**ctx, "reason": step.reason})
        return
    if step.action == "dlq":
        result.failed += 1
        result.failures[step.reason] += 1
        again = "would be dead-lettered again" if sender is None else "dead-lettered again"
        log.warning(f"redrive: still failing, {again}", extra={**ctx, "reason": step.reason})
    else:
        result.selected[e.stage, step.topic] += 1
    if sender is None:
        return

    def delivered(err: KafkaError | None) -> None:
        if step.action != "send":
            return
        if err is None:
            result.produced += 1
        else:
            result.failed += 1
            result.failures[f"delivery:{err.name()}"] += 1

    sender.send(step.topic, step.key, step.value, step.headers, delivered)
