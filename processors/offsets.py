"""Offsets: windows of a topic (by time or explicit offsets) read to a fixed end, and consumer group resets.

Every operations command (replay, DLQ, events show) reads Kafka through `Log`: an assigned consumer that
never joins a group or commits, bounded by the end offsets captured before reading, so a command that
produces into the topic it reads (redrive) still terminates.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from types import TracebackType
from typing import Any, Literal, TypeVar

from confluent_kafka import (
    Consumer,
    ConsumerGroupTopicPartitions,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, OffsetSpec  # type: ignore[attr-defined]

from sentpipe.kafka import (
    BrokerUnavailable,
    admin_client,
    client_config,
    committed_offsets,
    existing_partitions,
)
from sentpipe.schemas.events import parse_time
from sentpipe.settings import Settings


class OpsError(Exception):
    """Bad input, or a state that forbids the operation; the CLI prints it as one line."""


class NotFound(OpsError):
    """Well-formed, and not there: a record or partition the log does not hold (the console's 404)."""


def _kafka_text(exc: KafkaException) -> str:
    err = exc.args[0] if exc.args else None
    return str(err.str()) if isinstance(err, KafkaError) else str(exc)


# --- parsing the user's bounds ---------------------------------------------------------------------------
def parse_when(text: str, option: str) -> int:
    """An ISO-8601 time as epoch milliseconds; a time without a zone is UTC."""
    parsed = parse_time(text.strip()) if text.strip() else None
    if parsed is None:
        # One message for both: 1969-12-31T23:59:59Z is ISO-8601, but no Kafka record is that old.
        raise OpsError(
            f"{option}: {text!r} is not an ISO-8601 time within 1970..9999 (for example 2026-01-31T12:00:00Z)"
        )
    # Exact: through a float, 9999-12-31T23:59:59.999999Z rounded up into year 10000.
    return (parsed - _EPOCH) // _MILLISECOND


def parse_since(text: str, option: str = "--since") -> int:
    """A window's start: a time in the future selected nothing, and the run ended "read 0" with exit 0, as
    if there were nothing to do."""
    since_ms = parse_when(text, option)
    if since_ms > (time.time() + CLOCK_SKEW_S) * 1000:
        raise OpsError(f"{option} {text.strip()} is in the future: no record is that new yet")
    return since_ms


def parse_until(text: str, option: str = "--until") -> int:
    """A window's (exclusive) end: one at the epoch's first instant selected nothing, like a future start."""
    until_ms = parse_when(text, option)
    if until_ms <= 0:
        raise OpsError(f"{option} {text.strip()} is the epoch's first instant: no record is older")
    return until_ms


CLOCK_SKEW_S = 300  # a producer's clock ahead of this machine's (Kafka's CreateTime is the producer's)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MILLISECOND = timedelta(milliseconds=1)


@dataclass(frozen=True, slots=True)
class PartitionOffset:
    partition: int
    offset: int

    def __str__(self) -> str:
        return f"{self.partition}:{self.offset}"


# Kafka's partitions are int32 and its offsets int64.
MAX_PARTITION = 2**31 - 1
MAX_OFFSET = 2**63 - 1
# ASCII only: str.isdigit() also takes superscripts (which int() refuses) and other scripts' digits (which
# int() reads: Arabic-Indic one is 1). Twenty digits are more than either bound has, and far below the
# length int() refuses.
_NUMBER = re.compile(r"[0-9]{1,20}")


def ascii_int(text: str | None, high: int) -> int | None:
    """A non-negative decimal of ASCII digits up to `high`, else None (for values anyone may have written,
    such as a record's headers)."""
    if not text or not _NUMBER.fullmatch(text):
        return None
    value = int(text)
    return value if value <= high else None


def parse_partition_offset(text: str, option: str) -> PartitionOffset:
    part, sep, off = text.strip().partition(":")
    if not sep or not _NUMBER.fullmatch(part) or not _NUMBER.fullmatch(off):
        raise OpsError(f"{option}: {text!r} is not PARTITION:OFFSET (for example 3:1200)")
    partition, offset = int(part), int(off)
    if partition > MAX_PARTITION:
        raise OpsError(f"{option}: partition {partition} is beyond Kafka's largest, {MAX_PARTITION}")
    if offset > MAX_OFFSET:
        raise OpsError(f"{option}: offset {offset} is beyond Kafka's largest, {MAX_OFFSET}")
    return PartitionOffset(partition, offset)


@dataclass(frozen=True, slots=True)
class _WindowNames:
    """What a window's inputs are called in its errors and resume hints: the CLI's options or the console's
    fields (a console job told to go on "with --from-offset 0:12", an option its page has no field for)."""

    since: str
    until: str
    from_offsets: str
    to_offsets: str
    fields: bool = False

    def offsets(self, name: str, pairs: Iterable[tuple[int, int]]) -> str:
        """`--from-offset 0:12 --from-offset 3:4`, or the field's `from_offsets 0:12, 3:4`."""
        if self.fields:
            return f"{name} " + ", ".join(f"{p}:{o}" for p, o in pairs)
        return " ".join(f"{name} {p}:{o}" for p, o in pairs)


_OPTIONS = _WindowNames("--since", "--until", "--from-offset", "--to-offset")
_FIELDS = _WindowNames("since", "until", "from_offsets", "to_offsets", fields=True)


@dataclass(frozen=True, slots=True)
class Window:
    """Which records of a topic to read. `until_ms` is exclusive, `to_offsets` inclusive (a listed offset
    is the last one read), so `--from-offset 2:57 --to-offset 2:57` is exactly one record."""

    since_ms: int | None = None
    until_ms: int | None = None
    from_offsets: Mapping[int, int] = field(default_factory=dict)
    to_offsets: Mapping[int, int] = field(default_factory=dict)
    names: _WindowNames = field(default=_OPTIONS, compare=False)

    @property
    def named_partitions(self) -> set[int]:
        return set(self.from_offsets) | set(self.to_offsets)

    def admits_time(self, timestamp_ms: int) -> bool:
        # offsets_for_times only finds the first record at or after a time; producer clocks are not
        # monotonic, so the records inside the offset range are checked one by one as well.
        if self.since_ms is not None and timestamp_ms < self.since_ms:
            return False
        return self.until_ms is None or timestamp_ms < self.until_ms


# Timestamps in a partition are not in order: a record stamped just before `until` may follow one stamped
# after it (two ingress processes' batches, a retried one). Cut at the first record at `until`, the range
# left it out, and adjacent windows (a replay hour by hour) both missed it. The end is looked up this much
# later; `admits_time` checks the records in between one by one. (The start needs none: offsets_for_times
# finds the earliest offset at or after `since`, and every record before it is older.)
UNTIL_SLACK_MS = 60_000


def make_window(
    *,
    since: str | None = None,
    until: str | None = None,
    from_offsets: Iterable[str] = (),
    to_offsets: Iterable[str] = (),
    fields: bool = False,
) -> Window:
    """`fields`: errors name the console's fields (`since`, `from_offsets`), not the CLI's options."""
    names = _FIELDS if fields else _OPTIONS
    since_ms = parse_since(since, names.since) if since is not None else None
    until_ms = parse_until(until, names.until) if until is not None else None
    if since_ms is not None and until_ms is not None and since_ms >= until_ms:
        raise OpsError(f"{names.since} {since} is not before {names.until} {until}: the time range is empty")
    starts = _by_partition(from_offsets, names.from_offsets)
    ends = _by_partition(to_offsets, names.to_offsets)
    for p in sorted(set(starts) & set(ends)):
        if starts[p] > ends[p]:
            raise OpsError(f"{names.from_offsets} {p}:{starts[p]} is after {names.to_offsets} {p}:{ends[p]}")
    return Window(since_ms, until_ms, starts, ends, names)


def _by_partition(specs: Iterable[str], option: str) -> dict[int, int]:
    out: dict[int, int] = {}
    for spec in specs:
        po = parse_partition_offset(spec, option)
        if po.partition in out:
            raise OpsError(f"{option} names partition {po.partition} twice")
        out[po.partition] = po.offset
    return out


# --- reading ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Range:
    """Offsets [start, end) of one partition."""

    topic: str
    partition: int
    start: int
    end: int
    gone: int = 0  # offsets asked for before it that retention has deleted (`--from-offset` below the log)
    # A `--since` window that starts before the partition's first record retention kept: records of the
    # window may be deleted, how many nothing tells (their timestamps went with them).
    older_deleted: bool = False

    @property
    def size(self) -> int:
        return max(0, self.end - self.start)


def capped(ranges: Sequence[Range], upto: Mapping[int, int] | None) -> list[Range]:
    """The ranges cut at `upto` (partition -> end offset, exclusive), a partition it does not name left
    empty: a run confirmed from a dry run reads what the dry run counted, not what arrived since."""
    if upto is None:
        return list(ranges)
    return [
        Range(
            x.topic,
            x.partition,
            x.start,
            max(x.start, min(x.end, upto.get(x.partition, x.start))),
            # Of what a dry run read up to, the part retention deleted since (or had before).
            max(0, min(x.gone, upto[x.partition] - (x.start - x.gone))) if x.partition in upto else 0,
            x.older_deleted and x.partition in upto,
        )
        for x in ranges
    ]


_NOT_AUTHORIZED = frozenset({KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.GROUP_AUTHORIZATION_FAILED})

# (the range, its first offset deleted, how many offsets from there) of records retention deleted while
# `Log.read` read their range: librdkafka's reset jumped past them.
OnDeleted = Callable[[Range, int, int], None]


_T = TypeVar("_T")
# A partition's leader moving: a broker restarting, a topic just created. Asked again, not a broker away.
LEADER_MOVING = frozenset(
    {
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.OFFSET_NOT_AVAILABLE,
        KafkaError.FENCED_LEADER_EPOCH,
        KafkaError.UNKNOWN_LEADER_EPOCH,
    }
)
LEADER_MOVE_RETRY_S = 0.2


class Log:
    """Read-only access to topics for one command: metadata, watermarks, bounded reads."""

    def __init__(self, settings: Settings, timeout: float = 10.0, stall_s: float = 30.0) -> None:
        bootstrap = self.bootstrap = settings.kafka_bootstrap
        self.timeout = timeout
        self.stall_s = stall_s
        self.admin: AdminClient = admin_client(settings)
        # Fails within `timeout` naming the address when nothing answers: checked before anything else.
        self.topics = existing_partitions(self.admin, bootstrap, timeout)
        self._last_error: KafkaError | None = None
        self.consumer = Consumer(
            {
                **client_config(settings),
                # Required by the client even though nothing here joins the group or commits.
                "group.id": f"sentpipe-ops-{uuid.uuid4().hex}",
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": "earliest",
                "enable.partition.eof": True,
                "socket.timeout.ms": int(timeout * 1000),
                "error_cb": self._on_error,
                "log_level": 0,
            }
        )

    def _on_error(self, err: KafkaError) -> None:
        self._last_error = err

    def __enter__(self) -> Log:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self.consumer.close()

    def partition_count(self, topic: str) -> int:
        if topic not in self.topics:
            raise OpsError(f"topic {topic} does not exist on {self.bootstrap}")
        return self.topics[topic]

    def check_partitions(
        self, topic: str, partitions: Iterable[int], *, missing: type[OpsError] = OpsError
    ) -> None:
        """A partition named in a request (a 400) or in a record's id (`missing=NotFound`, a 404)."""
        n = self.partition_count(topic)
        for p in sorted(set(partitions)):
            if not 0 <= p < n:
                raise missing(f"{topic} has partitions 0..{n - 1}; there is no partition {p}")

    def _unavailable(self, exc: KafkaException | None = None) -> BrokerUnavailable:
        why = _kafka_text(exc) if exc is not None else "no answer"
        return BrokerUnavailable(f"Kafka broker at {self.bootstrap} did not answer: {why}")

    def _through_leader_moves(self, ask: Callable[[], _T]) -> _T:
        """`ask()`, asked again while a partition's leadership moves, until `timeout`. librdkafka answers
        those errors at once and does not ask again: a trace, `dlq list` or a replay failed "did not answer"
        for a routine rolling restart of the brokers (or a topic created a moment before)."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                return ask()
            except KafkaException as exc:
                err = exc.args[0] if exc.args else None
                moving = isinstance(err, KafkaError) and err.code() in LEADER_MOVING
                if not moving or time.monotonic() + LEADER_MOVE_RETRY_S >= deadline:
                    raise self._unavailable(exc) from exc
            time.sleep(LEADER_MOVE_RETRY_S)

    def watermarks(self, topic: str, partitions: Iterable[int]) -> dict[int, tuple[int, int]]:
        out: dict[int, tuple[int, int]] = {}
        for p in partitions:
            ask = partial(self.consumer.get_watermark_offsets, TopicPartition(topic, p), timeout=self.timeout)
            got = self._through_leader_moves(ask)
            if got is None:
                raise self._unavailable()
            out[p] = (int(got[0]), int(got[1]))
        return out

    def offsets_at(self, topic: str, partitions: Iterable[int], ms: int) -> dict[int, int | None]:
        """The first offset at or after `ms` per partition; None when every record is older."""
        query = [TopicPartition(topic, p, ms) for p in partitions]
        if not query:
            return {}

        def ask() -> list[TopicPartition]:
            found: list[TopicPartition] = self.consumer.offsets_for_times(query, timeout=self.timeout)
            for tp in found:
                if tp.error is not None:  # read as "every record is older", a --since skipped the partition
                    raise KafkaException(tp.error)
            return found

        found = self._through_leader_moves(ask)
        return {tp.partition: (tp.offset if tp.offset >= 0 else None) for tp in found}

    def ranges(self, topic: str, window: Window, partitions: Iterable[int] | None = None) -> list[Range]:
        """The offset ranges a window covers, ending at the end offsets of this moment."""
        n = self.partition_count(topic)
        self.check_partitions(topic, window.named_partitions)
        if partitions is None:
            partitions = sorted(window.named_partitions) if window.named_partitions else range(n)
        parts = sorted(set(partitions))
        marks = self.watermarks(topic, parts)
        starts = {p: marks[p][0] for p in parts}
        ends = {p: marks[p][1] for p in parts}
        since_at: dict[int, int | None] = {}
        if window.since_ms is not None:
            since_at = self.offsets_at(topic, parts, window.since_ms)
            for p, off in since_at.items():
                starts[p] = ends[p] if off is None else max(starts[p], off)
        if window.until_ms is not None:
            for p, off in self.offsets_at(topic, parts, window.until_ms + UNTIL_SLACK_MS).items():
                if off is not None:
                    ends[p] = min(ends[p], off)
        # An offset that names no record the log holds selected nothing, and the run ended as if it were
        # done: one past the end (a partition's next record) is still a bound, anything further is not.
        gone: dict[int, int] = {}
        for p, off in window.from_offsets.items():
            if p in starts:
                if off > marks[p][1]:
                    raise OpsError(
                        f"{window.names.from_offsets} {p}:{off} is past the end of {topic} partition {p} (its"
                        f" next record will be offset {marks[p][1]})"
                    )
                # Read from the log's first record instead, and said: the run had fewer records to show
                # and no word that part of the window was gone. Not when `--since` starts it later anyway.
                if starts[p] == marks[p][0]:
                    gone[p] = max(0, marks[p][0] - off)
                starts[p] = max(starts[p], off)
        for p, off in window.to_offsets.items():
            if p in ends:
                if off < marks[p][0]:
                    raise OpsError(
                        f"{window.names.to_offsets} {p}:{off} is before the first record {topic} partition"
                        f" {p} still holds (offset {marks[p][0]}; older ones are past retention)"
                    )
                ends[p] = min(ends[p], off + 1)
        # `--since` found the partition's first record kept, and retention deleted records before it: the
        # window may reach into them. A replay after a restore from an older backup read from the log's start
        # and ended exit 0 with no word that the first part of its window was gone. (A `--from-offset` below
        # the log is counted exactly, in `gone`.)
        older = {
            p
            for p, off in since_at.items()
            if off is not None and 0 < marks[p][0] == off and p not in window.from_offsets
        }
        return [
            Range(topic, p, starts[p], max(starts[p], ends[p]), gone.get(p, 0), p in older) for p in parts
        ]

    def read(
        self, ranges: Sequence[Range], on_deleted: OnDeleted | None = None
    ) -> Generator[Message, None, None]:
        """Every record in the ranges, in offset order per partition; stops at each range's end.
        `on_deleted` is told of the offsets retention deleted before they were read."""
        pending = {(r.topic, r.partition): r for r in ranges if r.size > 0}
        if not pending:
            return
        # partition -> the offset after the last one accounted for. Retention deleting a range's start
        # (before or while it is read) makes librdkafka reset to the log's new start without a word
        # (auto.offset.reset): a gap is the only sign, and a replay ended "read" short, exit 0.
        expected = {where: r.start for where, r in pending.items()}
        assigned = [TopicPartition(r.topic, r.partition, r.start) for r in pending.values()]
        self.consumer.assign(assigned)
        # librdkafka keeps a partition paused (`_done`) across unassign and assign: a second read of it on
        # this Log got nothing and ended "no records from Kafka broker" after `stall_s`.
        self.consumer.resume(assigned)
        last_progress = time.monotonic()
        try:
            while pending:
                batch = self.consumer.consume(500, 0.5)
                # Not only after an empty poll: a fetch error returned each time would have kept it going.
                if time.monotonic() - last_progress > self.stall_s:
                    why = f": {self._last_error.str()}" if self._last_error is not None else ""
                    raise BrokerUnavailable(
                        f"no records from Kafka broker at {self.bootstrap} for {self.stall_s:.0f}s{why}"
                    )
                for msg in batch:
                    where = (msg.topic() or "", msg.partition() or 0)
                    r = pending.get(where)
                    if r is None:
                        continue  # a partition already read to its end
                    err = msg.error()
                    if err is not None:
                        if err.code() == KafkaError._PARTITION_EOF:
                            # Nothing more right now; the end captured at start cannot be beyond it.
                            if on_deleted is not None:
                                self._deleted(r, expected[where], r.end, on_deleted)
                            self._done(pending, where)
                        elif err.fatal():
                            raise KafkaException(err)
                        elif err.code() in _NOT_AUTHORIZED:
                            # ACLs: waiting cannot help (it ended "no records from Kafka broker" after 30 s).
                            raise OpsError(
                                f"Kafka at {self.bootstrap} refused to let this client read {where[0]}: "
                                f"{err.str()} (an ACL must grant READ on the topic)"
                            )
                        else:
                            self._last_error = err  # named if nothing comes (the partition's leader away)
                        continue
                    offset = msg.offset() or 0
                    if on_deleted is not None and offset > expected[where]:
                        self._deleted(r, expected[where], min(offset, r.end), on_deleted)
                    expected[where] = offset + 1
                    if offset >= r.end:
                        self._done(pending, where)
                        continue
                    yield msg
                    # Counted from when the caller asks for more: the time it spends on a record (a replay
                    # waiting for its producer's room) is not the broker's silence.
                    last_progress = time.monotonic()
                    if offset >= r.end - 1:
                        self._done(pending, where)
        finally:
            self.consumer.unassign()

    def _deleted(self, r: Range, start: int, upto: int, on_deleted: OnDeleted) -> None:
        """Offsets [start, upto) of `r` never came: those below the log's start now were deleted. The rest
        of a gap held no records (compaction, transaction markers)."""
        if upto <= start:
            return
        low = self.watermarks(r.topic, [r.partition])[r.partition][0]
        if min(low, upto) > start:
            on_deleted(r, start, min(low, upto) - start)

    def _done(self, pending: dict[tuple[str, int], Range], where: tuple[str, int]) -> None:
        pending.pop(where, None)
        self.consumer.pause([TopicPartition(where[0], where[1])])


def timestamp_ms(msg: Message) -> int:
    _kind, ts = msg.timestamp()
    return int(ts) if ts is not None and ts >= 0 else int(time.time() * 1000)


# --- consumer group offsets ------------------------------------------------------------------------------
ResetTo = Literal["earliest", "latest"] | int  # an int is a time in epoch milliseconds


@dataclass(frozen=True, slots=True)
class OffsetChange:
    topic: str
    partition: int
    before: int | None  # None: the group had no committed offset there
    after: int


def _result(future: Any, timeout: float, bootstrap: str) -> Any:
    try:
        return future.result(timeout=timeout)
    except KafkaException as exc:
        raise OpsError(f"Kafka at {bootstrap}: {_kafka_text(exc)}") from exc
    except TimeoutError as exc:
        raise BrokerUnavailable(f"Kafka broker at {bootstrap} did not answer within {timeout:g}s") from exc


# Of a name the user typed, echoed in an error line.
MAX_SHOWN = 256
# A group id is a Kafka protocol string, but ids far shorter already fail in the broker without a reason.
MAX_GROUP_LENGTH = 255


def group_problem(group: str) -> str | None:
    """Why `group` cannot be a consumer group's id, or None."""
    if not group.strip():
        return "--group is empty"
    if len(group) > MAX_GROUP_LENGTH or not group.isprintable():
        return f"--group must be 1 to {MAX_GROUP_LENGTH} printable characters"
    return None


def deployment_groups(settings: Settings) -> tuple[str, ...]:
    """The consumer groups this deployment's processes use: the router's, the projector's, the redrive's."""
    return (settings.app_id, f"{settings.app_id}-projections", f"{settings.app_id}-redrive")


def reset_note(settings: Settings, group: str) -> str | None:
    """What resetting `group` will not do that an operator may expect of it."""
    if group != settings.app_id:
        return None
    return (
        f"the router reads these records again, but its dedup table drops each one still inside the dedup "
        f"window ({settings.dedup_window_s:,} s): to rebuild the database reset {group}-projections instead, "
        "to route events again use `sentpipe replay`"
    )


def active_members(group: str, members: Sequence[Any]) -> str:
    who = ", ".join(sorted({f"{m.client_id}@{m.host}" for m in members}))
    return (
        f"consumer group {group} has {len(members)} active member(s) ({who}); "
        "stop them before resetting its offsets"
    )


def reset_group_offsets(
    settings: Settings,
    group: str,
    to: ResetTo,
    topics: Sequence[str] = (),
    *,
    dry_run: bool = False,
    timeout: float = 10.0,
) -> tuple[list[OffsetChange], str | None]:
    """Move a stopped group's committed offsets; refuses while the group has members. Returns the changes
    and, for a dry run of a group with members, why the reset itself would be refused."""
    bootstrap = settings.kafka_bootstrap
    ours = (settings.topic_prefix, f"{settings.app_id}-")
    if group in deployment_groups(settings):
        for t in topics:
            if not t.startswith(ours):
                # The worker refuses to start with offsets outside its prefix, and nothing here deletes them.
                raise OpsError(
                    f"--topic {t[:MAX_SHOWN]} is not one of this deployment's topics (prefix "
                    f"{settings.topic_prefix!r}); group {group} must keep to them"
                )
    admin = admin_client(settings)
    have = existing_partitions(admin, bootstrap, timeout)
    for t in topics:
        if t not in have:
            raise OpsError(f"topic {t[:MAX_SHOWN]} does not exist on {bootstrap}")
    desc = _result(
        admin.describe_consumer_groups([group], request_timeout=timeout)[group], timeout, bootstrap
    )
    busy = active_members(group, desc.members) if desc.members else None
    if busy is not None and not dry_run:  # a dry run is how one prepares the reset before stopping them
        raise OpsError(busy)
    # Not the admin API's list_consumer_group_offsets: librdkafka 2.16 crashes the process on it while a
    # restarted broker's coordinator loads (sentpipe.kafka.committed_offsets).
    try:
        listed = committed_offsets(
            settings,
            group,
            [TopicPartition(t, p) for t, n in sorted(have.items()) for p in range(n)],
            timeout,
        )
    except KafkaException as exc:
        raise OpsError(f"Kafka at {bootstrap}: {_kafka_text(exc)}") from exc
    before = {(tp.topic, tp.partition): tp.offset for tp in listed if tp.error is None and tp.offset >= 0}
    targets = sorted(set(topics)) or sorted({t for t, _ in before if t in have})
    if not targets:
        raise OpsError(f"consumer group {group} has no committed offsets; name the topics with --topic")
    tps = [TopicPartition(t, p) for t in targets for p in range(have[t])]
    after = _list_offsets(admin, tps, to, timeout, bootstrap)
    changes = [
        OffsetChange(
            tp.topic, tp.partition, before.get((tp.topic, tp.partition)), after[tp.topic, tp.partition]
        )
        for tp in tps
    ]
    if not dry_run:
        request = ConsumerGroupTopicPartitions(
            group, [TopicPartition(c.topic, c.partition, c.after) for c in changes]
        )
        done = _result(
            admin.alter_consumer_group_offsets([request], request_timeout=timeout)[group], timeout, bootstrap
        )
        for tp in done.topic_partitions:
            if tp.error is not None:
                raise OpsError(
                    f"could not reset {tp.topic}[{tp.partition}] for group {group}: {tp.error.str()}"
                )
    return changes, busy


def _list_offsets(
    admin: AdminClient, tps: Sequence[TopicPartition], to: ResetTo, timeout: float, bootstrap: str
) -> dict[tuple[str, int], int]:
    def query(spec: OffsetSpec) -> dict[tuple[str, int], int]:
        futures = admin.list_offsets({tp: spec for tp in tps}, request_timeout=timeout)
        return {
            (tp.topic, tp.partition): int(_result(f, timeout, bootstrap).offset) for tp, f in futures.items()
        }

    if to == "earliest":
        return query(OffsetSpec.earliest())  # type: ignore[no-untyped-call]
    latest = query(OffsetSpec.latest())  # type: ignore[no-untyped-call]
    if to == "latest":
        return latest
    at = query(OffsetSpec.for_timestamp(int(to)))
    # No record at or after the time: the group starts at the end, like kafka-consumer-groups does.
    return {k: (v if v >= 0 else latest[k]) for k, v in at.items()}
