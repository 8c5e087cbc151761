"""What the sender delivers, and in which order: events, duplicates and shuffles, all from one rng."""

from __future__ import annotations

import codecs
import hashlib
import itertools
import random
import stat
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO, Literal

import orjson

from sentpipe.schemas import exact_json
from sentpipe.schemas.events import (
    ROUTED_TYPES,
    STATUS_RANK,
    EventType,
    MalformedEvent,
    frame,
    normalize,
)
from sentpipe.schemas.routing import parse_event_types
from sentpipe.schemas.samples import TEMPLATE_STATUSES, Sample, SampleFactory

ShapeChoice = Literal["sent", "guide", "mixed"]
SHAPES: tuple[ShapeChoice, ...] = ("sent", "guide", "mixed")


@dataclass(frozen=True, slots=True)
class Delivery:
    """One delivery of one body. A retry is another attempt of the same delivery; a duplicate is not."""

    webhook_id: str  # kept across retries (Standard Webhooks); a duplicate gets its own
    body: bytes
    category: str  # x-webhook-event-type: "messages" or "templates"
    type: EventType
    index: int  # position of the event in the samples the plan was made from
    duplicate: bool = False


class BadLine(ValueError):
    """A line of a JSONL file that is not one JSON object."""

    def __init__(self, line_no: int, reason: str) -> None:
        super().__init__(f"line {line_no}: {reason}")
        self.line_no = line_no
        self.reason = reason


def parse_types(names: Iterable[str]) -> tuple[EventType, ...]:
    """Routed type names -> types (all routed types when none); ValueError names the valid ones."""
    return parse_event_types(names, ROUTED_TYPES) or ROUTED_TYPES


def parse_shape(text: str, name: str = "--shape") -> ShapeChoice:
    """A shape; ValueError naming the option or field `name` (the console's is `shape`) for any other."""
    for shape in SHAPES:
        if text == shape:
            return shape
    raise ValueError(f"{name} must be one of {', '.join(SHAPES)}, not {text!r}")


def webhook_id(rng: random.Random) -> str:
    """A redelivery's id: drawn from the plan's rng, so a seeded run repeats its ids exactly."""
    return f"msg_{uuid.UUID(int=rng.getrandbits(128), version=4).hex}"


def event_webhook_id(body: bytes) -> str:
    """An event's first delivery's id, from its body: the same event has the same id in every run, and other
    events never have it. Drawn from the plan's rng, a run resumed with --skip gave its first event the id
    the interrupted run had given event 0 (and so on), and a seeded run with another --type reused the ids
    for other events: a receiver keying on x-webhook-id (SENTPIPE_EVENT_ID_SOURCE=header) dropped them all
    as duplicates while the sender counted them accepted."""
    return f"msg_{hashlib.sha256(body).hexdigest()[:32]}"


def category(sample: Sample) -> str:
    """The parent category Sent puts in x-webhook-event-type: `messages` or `templates`, nothing else. (An
    unrouted line's own `field` went into the header as it was: a control character in it ended a whole
    `send --file` run with a ValueError from the HTTP client.)"""
    if sample.type is EventType.TEMPLATE_APPROVAL:
        return "templates"
    if sample.type is EventType.UNROUTED:
        field = sample.doc.get("field")
        if isinstance(field, str) and field.startswith("template"):
            return "templates"
    return "messages"


def iter_events(
    factory: SampleFactory, types: Sequence[EventType], shape: ShapeChoice, count: int
) -> Iterator[Sample]:
    """`count` events of `types`, each message's or template's events in their true order, made as they
    are taken: memory does not grow with `count`."""
    # The same weights as SampleFactory.mix: message lifecycles dominate real traffic.
    weights = [{EventType.MESSAGE_STATUS: 3}.get(t, 1) for t in types]
    left = count
    while left > 0:
        type_ = factory.rng.choices(list(types), weights)[0]
        s = factory.rng.choice(("sent", "guide")) if shape == "mixed" else shape
        group = factory.of_type(type_, s)[:left]
        left -= len(group)
        yield from group


def generate(
    factory: SampleFactory, types: Sequence[EventType], shape: ShapeChoice, count: int
) -> list[Sample]:
    """`iter_events` as a list."""
    return list(iter_events(factory, types, shape, count))


# The statuses `trigger --status` can give each type; a type not listed has none.
STATUSES: dict[EventType, tuple[str, ...]] = {
    EventType.MESSAGE_STATUS: tuple(STATUS_RANK),
    EventType.TEMPLATE_APPROVAL: TEMPLATE_STATUSES,
}


def parse_status(type_: EventType, status: str | None, name: str = "--status") -> str | None:
    """A status for an event of `type_` (any case, returned in lower case); ValueError, naming the option or
    field `name`, for one the type does not know, or for any status of a type that has none."""
    if status is None:
        return None
    known = STATUSES.get(type_)
    if known is None:
        raise ValueError(f"{name} does not apply to {type_.value}: its events have no status")
    # Compared in ASCII lower case: Sent writes statuses in either case, and the set is ASCII.
    if status.lower() not in known:
        raise ValueError(f"{name} for {type_.value} must be one of {', '.join(known)}, not {status!r}")
    return status.lower()


def one_event(factory: SampleFactory, type_: EventType, shape: ShapeChoice, status: str | None) -> Sample:
    """A single realistic event of `type_` (for `trigger`): one status, not a whole lifecycle."""
    s = factory.rng.choice(("sent", "guide")) if shape == "mixed" else shape
    if type_ is EventType.MESSAGE_STATUS:
        status = status or factory.rng.choice(("sent", "delivered", "read", "failed"))
        return factory.message_status(str(uuid.UUID(int=factory.rng.getrandbits(128), version=4)), status, s)
    if type_ is EventType.TEMPLATE_APPROVAL:
        return factory.template(status=status, shape=s)
    if type_ is EventType.MESSAGE_INBOUND:
        return factory.inbound(s)
    raise ValueError(f"no samples for {type_}")


def sample_from_body(body: bytes) -> Sample:
    """A sample for a body given by the user; raises BadLine's reason as ValueError when not an object."""
    try:
        # As the ingress reads it: numbers beyond a double (1e400), which the pipeline keeps, are JSON too.
        doc = exact_json.loads(body, exact=False)
    except orjson.JSONDecodeError as exc:
        where = f" (error at column {exc.colno})" if exc.colno else ""
        raise ValueError(f"not valid JSON{where}") from None
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    try:
        type_ = frame(body, webhook_id=None).type
    except MalformedEvent:
        # No recognizable envelope: still sent, so the ingress's dead-letter path can be tried too.
        type_ = EventType.UNROUTED
    return Sample(type_, body, doc)


# A line longer than this is a bad line, read past and never held whole: a file without newlines (a JSON
# array of a million events, /dev/zero) grew the sender by gigabytes. 16 MiB is 16 times the ingress's
# default body limit, so oversized bodies can still be sent to see the 413.
MAX_LINE_BYTES = 16 * 1024 * 1024


def _lines(fh: BinaryIO) -> Iterator[bytes | None]:
    """A file's lines, None for one longer than MAX_LINE_BYTES (its rest is read past in 1 MiB steps)."""
    while line := fh.readline(MAX_LINE_BYTES + 1):
        if len(line) <= MAX_LINE_BYTES:
            yield line
            continue
        yield None  # first: a reader that stops here (a bad line stops the run) reads no further
        while line and not line.endswith(b"\n"):
            line = fh.readline(1 << 20)


def read_jsonl(lines: Iterable[bytes | None], skip_bad: bool) -> Iterator[Sample | BadLine]:
    """Samples from JSONL lines, byte for byte; a bad line raises BadLine, or is yielded when skipping.
    A line given as None was too long to read (`_lines`)."""
    for line_no, raw in enumerate(lines, start=1):
        try:
            if raw is None:
                raise ValueError(f"longer than {MAX_LINE_BYTES:,} bytes")
            body = raw.rstrip(b"\r\n")
            if line_no == 1:
                # A UTF-8 byte order mark marks the file's encoding (Windows editors and PowerShell write
                # one), not the first event: it made line 1 "not valid JSON (error at column 1)", a line that
                # looked valid. JSON lets a reader ignore it (RFC 8259, 8.1); Sent never sends one.
                body = body.removeprefix(codecs.BOM_UTF8)
            if not body.strip():
                continue  # blank lines (a trailing newline, spacing) are not events
            yield sample_from_body(body)
        except ValueError as exc:
            bad = BadLine(line_no, str(exc))
            if not skip_bad:
                raise bad from None
            yield bad


@dataclass(frozen=True, slots=True)
class JsonlScan:
    """What a first pass over a JSONL file found: events of the chosen types, the lines skipped, and the
    file to send them from."""

    events: int
    skipped: list[BadLine]
    path: Path


@contextmanager
def scan_jsonl(
    path: Path, skip_bad: bool, types: Sequence[EventType], limit: int | None = None
) -> Iterator[JsonlScan]:
    """Count the file's events of `types` and check every line, holding none of them: a bad line stops the
    run before anything is sent (BadLine) unless skipping. OSError when the file cannot be read.

    The events are read again as they are sent (`stream_jsonl`), from the file itself when it is a regular
    file. A stream (a pipe, /dev/stdin, process substitution) read a second time is empty, and the run
    sent nothing and said it succeeded: its events are copied as they are checked into a temporary file,
    removed on exit.

    With a `limit`, reading stops at that many events: nothing past them is sent, and a stream that does
    not end (`--file <(yes ...) --count 10`) was read, and copied to disk, for as long as it went on."""
    if stat.S_ISREG(path.stat().st_mode):
        with path.open("rb") as fh:
            yield _scan(fh, skip_bad, types, None, path, limit)
        return
    with tempfile.NamedTemporaryFile(prefix="sentpipe-send-", suffix=".jsonl") as copy, path.open("rb") as fh:
        scan = _scan(fh, skip_bad, types, copy, Path(copy.name), limit)
        copy.flush()
        yield scan


def _scan(
    fh: BinaryIO,
    skip_bad: bool,
    types: Sequence[EventType],
    copy: IO[bytes] | None,
    path: Path,
    limit: int | None,
) -> JsonlScan:
    events, skipped = 0, []
    for item in read_jsonl(_lines(fh), skip_bad):
        if isinstance(item, BadLine):
            skipped.append(item)
        elif item.type in types:
            events += 1
            if copy is not None:
                copy.write(item.body + b"\n")
            if events == limit:
                break
    return JsonlScan(events, skipped, path)


def stream_jsonl(path: Path, types: Sequence[EventType]) -> Iterator[Sample]:
    """The file's events of `types`, read as they are sent (after `scan_jsonl` checked the file)."""
    with path.open("rb") as fh:
        for item in read_jsonl(_lines(fh), skip_bad=True):
            if not isinstance(item, BadLine) and item.type in types:
                yield item


def _subject(sample: Sample) -> str | None:
    """The entity whose event order matters (message or template id), as the pipeline itself sees it."""
    try:
        event = normalize(frame(sample.body, webhook_id=None), tenant="-", received_at_ms=0)
    except MalformedEvent:
        return None
    if event.type in (EventType.MESSAGE_STATUS, EventType.TEMPLATE_APPROVAL):
        return f"{event.type.value}:{event.subject}"
    return None


def shuffle_within_subjects(samples: Sequence[Sample], rng: random.Random) -> list[int]:
    """An order of `samples` (indices) where each subject's events swap places among their own slots.

    Events of different subjects keep their relative positions, so the stream still looks like
    interleaved traffic; only each message's or template's own sequence arrives out of order.
    """
    slots: dict[str, list[int]] = {}
    for i, sample in enumerate(samples):
        subject = _subject(sample)
        if subject is not None:
            slots.setdefault(subject, []).append(i)
    order = list(range(len(samples)))
    for positions in slots.values():
        if len(positions) < 2:
            continue
        moved = positions[:]
        rng.shuffle(moved)
        if moved == positions:
            moved = moved[1:] + moved[:1]  # a shuffle that changed nothing would test nothing
        for slot, source in zip(positions, moved, strict=True):
            order[slot] = source
    return order


# Events planned at a time by `plan_stream`: what one shuffle or duplicate spans, and what is held at once.
PLAN_WINDOW = 10_000


def _check_fraction(duplicates: float) -> None:
    if not 0.0 <= duplicates <= 1.0:
        raise ValueError("duplicates is a fraction between 0 and 1")


def planned_deliveries(events: int, duplicates: float) -> int:
    """How many deliveries a plan of `events` events with a `duplicates` fraction has."""
    return events + round(duplicates * events)


def plan_deliveries(
    samples: Sequence[Sample], duplicates: float, shuffle: bool, rng: random.Random
) -> list[Delivery]:
    """Every sample once (optionally out of order per subject), plus `duplicates` x len(samples) redeliveries.

    A redelivery repeats the identical body as a new delivery (fresh webhook id) at a random point after
    the original, as Sent does after a lost acknowledgement.
    """
    _check_fraction(duplicates)
    return _plan(samples, 0, round(duplicates * len(samples)), shuffle, rng)


def plan_stream(
    samples: Iterable[Sample],
    duplicates: float,
    shuffle: bool,
    rng: random.Random,
    window: int = PLAN_WINDOW,
) -> Iterator[Delivery]:
    """`plan_deliveries`, made lazily `window` samples at a time, so memory does not grow with the run:
    shuffles and redeliveries stay inside their window, and `planned_deliveries` gives the total."""
    _check_fraction(duplicates)
    if window < 1:
        raise ValueError("window must be at least 1")
    it = iter(samples)
    start = 0
    while chunk := list(itertools.islice(it, window)):
        end = start + len(chunk)
        # Rounded on the running total, so the run as a whole has round(duplicates x events).
        n_dup = min(len(chunk), round(duplicates * end) - round(duplicates * start))
        yield from _plan(chunk, start, n_dup, shuffle, rng)
        start = end


def _plan(
    samples: Sequence[Sample], first_index: int, n_dup: int, shuffle: bool, rng: random.Random
) -> list[Delivery]:
    order = shuffle_within_subjects(samples, rng) if shuffle else list(range(len(samples)))
    keyed: list[tuple[float, int, Delivery]] = []
    for position, index in enumerate(order):
        s = samples[index]
        delivery = Delivery(event_webhook_id(s.body), s.body, category(s), s.type, first_index + index)
        keyed.append((float(position), 0, delivery))
    for position in sorted(rng.sample(range(len(order)), n_dup)):
        index = order[position]
        s = samples[index]
        # Any point after the original: a sort key strictly between its position and the end.
        later = rng.uniform(position, len(order))
        later = later if later > position else position + 0.5
        delivery = Delivery(webhook_id(rng), s.body, category(s), s.type, first_index + index, True)
        keyed.append((later, 1, delivery))
    keyed.sort(key=lambda k: (k[0], k[1]))
    return [d for _, _, d in keyed]
