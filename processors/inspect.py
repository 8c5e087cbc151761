"""`events show`: everywhere one event is, from the raw record to its database rows.

Kafka is searched where the event must be first (the murmur2 partition of its key, which is where the
ingress and the worker's producers put it) and only then more widely. Every scan stops at the end offsets
of the moment it starts and reads at most `scan_limit` records per partition (the newest); the report's
notes say what was read and when a scan was cut short.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import orjson
import psycopg
from confluent_kafka import Message, murmur2
from psycopg.types.json import set_json_loads

from sentpipe.kafka import message_headers
from sentpipe.processors import reading
from sentpipe.processors.dedup import decode_seen, partition_of, table_key
from sentpipe.processors.dlq import DlqEntry, Ledger, redriven
from sentpipe.processors.offsets import Log, Range, Window, timestamp_ms
from sentpipe.schemas import exact_json
from sentpipe.schemas import routing as r
from sentpipe.schemas.events import MalformedEvent
from sentpipe.schemas.topics import Topics
from sentpipe.settings import Settings

Match = Callable[[Message], bool]


@dataclass(frozen=True, slots=True)
class Found:
    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes
    headers: dict[str, bytes]

    @classmethod
    def of(cls, msg: Message) -> Found:
        return cls(
            msg.topic() or "",
            msg.partition() or 0,
            msg.offset() or 0,
            timestamp_ms(msg),
            msg.key(),
            msg.value() or b"",
            dict(message_headers(msg)),
        )


@dataclass(frozen=True, slots=True)
class DedupState:
    topic: str
    partition: int
    offset: int
    tombstone: bool  # deleted by the dedup window sweep: a redelivery now would be routed again
    first_routed_ms: int | None
    # The tenants the table marks the id for, with each one's first routing: the table dedups (id, tenant)
    # pairs, so the id of tenant A alone is no duplicate for tenant B (and a sweep may drop A's mark only).
    tenants: dict[str, int] = field(default_factory=dict)


@dataclass
class EventReport:
    event_id: str
    raw: list[Found] = field(default_factory=list)
    dedup: DedupState | None = None
    dedup_topic: str | None = None  # None when the worker never created its changelog
    routed: list[Found] = field(default_factory=list)
    dlq: list[DlqEntry] = field(default_factory=list)
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    db_error: str | None = None  # why the database had no answer, one line
    notes: list[str] = field(default_factory=list)

    @property
    def found(self) -> bool:
        return bool(self.raw or self.dedup or self.routed or self.dlq or any(self.rows.values()))


# Rows that mention the event; the status tables also show the current state of its message/template. A
# status row is found through the event's history rows, by its key: the projections write a status row only
# beside its event's history row (projections.py), so one naming the event is among them. Asked for by its
# `event_id` as well, which no index holds, every trace read the whole status table (0.65 s at 3 million
# messages, growing with them).
_QUERIES = {
    "message_events": "SELECT * FROM message_events WHERE event_id = %(id)s",
    "message_status": """SELECT s.* FROM message_status s WHERE (s.tenant, s.message_id) IN
           (SELECT tenant, message_id FROM message_events WHERE event_id = %(id)s)""",
    "inbound_messages": "SELECT * FROM inbound_messages WHERE event_id = %(id)s",
    "template_events": "SELECT * FROM template_events WHERE event_id = %(id)s",
    "template_status": """SELECT s.* FROM template_status s WHERE (s.tenant, s.template_id) IN
           (SELECT tenant, template_id FROM template_events WHERE event_id = %(id)s)""",
}


def database_rows(database_url: str, event_id: str) -> dict[str, list[dict[str, Any]]]:
    with reading.connect(database_url) as conn:
        # The payloads as stored, numbers digit for digit: psycopg's own loader (json.loads) made an int of
        # a 5,000-digit number, past CPython's limit, and the whole report failed.
        set_json_loads(_exact_loads, conn)
        return {table: conn.execute(sql, {"id": event_id}).fetchall() for table, sql in _QUERIES.items()}


def json_text(value: object) -> object:
    """A row's jsonb value (its payload) as JSON text, numbers digit for digit; any other value as it is.
    How `events show` and the console show it: the console's page reads its answer with JSON.parse, whose
    numbers are doubles, and showed a stored 9007199254740993 as 9007199254740992."""
    return exact_json.dumps(value).decode() if isinstance(value, dict | list) else value


def _exact_loads(data: bytes | bytearray | memoryview | str) -> Any:
    return exact_json.loads(data.encode() if isinstance(data, str) else bytes(data))


def _key_is(event_id: str) -> Match:
    key = event_id.encode()
    return lambda msg: msg.key() == key


def _canonical_id_is(event_id: str) -> Match:
    # The id as a routed record's JSON holds it: escaped where JSON must (`"`, `\`, control characters),
    # non-ASCII as it is or as \uXXXX.
    needles = {orjson.dumps(event_id)[1:-1], json.dumps(event_id)[1:-1].encode()}

    def match(msg: Message) -> bool:
        value = msg.value() or b""
        if not any(n in value for n in needles):  # a substring test is cheap; most records fail it
            return False
        try:
            doc = exact_json.loads(value, exact=False)  # a routed record may hold 1E+400 (exact_json)
        except orjson.JSONDecodeError:
            return False
        return isinstance(doc, dict) and doc.get("id") == event_id

    return match


class _Search:
    def __init__(self, kafka: Log, limit: int, notes: list[str]) -> None:
        self.kafka, self.limit, self.notes = kafka, limit, notes

    def __call__(
        self,
        what: str,
        topic: str,
        match: Match,
        partitions: Iterable[int] | None = None,
        since_ms: int | None = None,
    ) -> list[Message]:
        full = self.kafka.ranges(topic, Window(since_ms=since_ms), partitions)
        ranges = [Range(x.topic, x.partition, max(x.start, x.end - self.limit), x.end) for x in full]
        hits = [msg for msg in self.kafka.read(ranges) if match(msg)]
        parts = ",".join(str(x.partition) for x in ranges)
        short = any(x.start > f.start for x, f in zip(ranges, full, strict=True))
        cut = " (cut short by --scan-limit)" if short else ""
        self.notes.append(f"{what}: read {sum(x.size for x in ranges)} record(s) of {topic}[{parts}]{cut}")
        return hits


def locate(
    settings: Settings, event_id: str, *, scan_limit: int = 200_000, timeout: float = 10.0
) -> EventReport:
    from sentpipe.processors.topics import changelog_topic

    topics = Topics(settings.topic_prefix)
    rep = EventReport(event_id)
    key = event_id.encode()
    with Log(settings, timeout) as kafka:
        search = _Search(kafka, scan_limit, rep.notes)
        n_raw = kafka.partition_count(topics.raw)
        home = murmur2(key, n_raw)
        hits = search("raw", topics.raw, _key_is(event_id), [home])
        if not hits:  # the partition count may have changed since it was written
            hits = search("raw", topics.raw, _key_is(event_id), [p for p in range(n_raw) if p != home])
        rep.raw = [Found.of(m) for m in hits]

        changelog = changelog_topic(settings)
        if changelog in kafka.topics:
            rep.dedup_topic = changelog
            # The router writes the compact key (dedup.py); a table from before it, the id itself.
            tkey = table_key(key)
            forms = {tkey, key}
            at = [partition_of(tkey, kafka.topics[changelog])]
            hits = search("dedup", changelog, lambda msg: msg.key() in forms, at)
            # The compact key's last record, when it has one: moving an id to it, the router tombstones the
            # older key just after, and that tombstone (the newest record) read as "swept".
            hits = [m for m in hits if m.key() == tkey] or hits
            if hits:
                last = hits[-1]
                value = last.value()
                seen = decode_seen(value)
                first_ms = min(seen.values()) if seen else None
                rep.dedup = DedupState(
                    changelog, last.partition() or 0, last.offset() or 0, value is None, first_ms, seen
                )

        rep.routed = _find_routed(search, kafka, settings, topics, rep)
        by_key, by_id = _key_is(event_id), _canonical_id_is(event_id)
        hits = search("dlq", topics.dlq, lambda msg: by_key(msg) or by_id(msg))
        taken = (redriven(kafka, topics) or Ledger()) if hits else Ledger()
        rep.dlq = [replace(e, redriven_by=taken.taken_by(e)) for e in map(DlqEntry.from_message, hits)]
    try:
        rep.rows = database_rows(settings.database_url.get_secret_value(), event_id)
    except psycopg.Error as exc:
        rep.db_error = reading.unavailable(exc)
    return rep


def _find_routed(
    search: _Search, kafka: Log, settings: Settings, topics: Topics, rep: EventReport
) -> list[Found]:
    """From the raw records, where their routed records must be (one per tenant that sent the id: the
    routed key is the tenant's); without one, every routed topic's tail."""
    if rep.raw:
        # (topic, partition) -> whether records there are found by key (unrouted: the raw body), and the
        # earliest a routed record there can be (routing follows the raw record; a minute for clock skew).
        places: dict[tuple[str, int], tuple[bool, int]] = {}
        routable = 0
        for raw in rep.raw:
            try:
                routed = r.route(
                    raw.key,
                    raw.value,
                    raw.headers,
                    topics=topics,
                    id_source=settings.event_id_source,
                    default_tenant=settings.default_tenant,
                    record_timestamp_ms=raw.timestamp_ms,
                )
            except MalformedEvent as exc:
                note = f"routed: the raw record does not route ({exc.reason}), so it has no routed record"
                if note not in rep.notes:
                    rep.notes.append(note)
                continue
            routable += 1
            if routed.topic in kafka.topics:
                where = (routed.topic, murmur2(routed.key, kafka.topics[routed.topic]))
                since = raw.timestamp_ms - 60_000
                places[where] = (routed.event is None, min(places.get(where, (False, since))[1], since))
        if not routable:
            return []
        if places:
            found: dict[tuple[str, int, int], Found] = {}
            for (topic, part), (by_key, since) in sorted(places.items()):
                match = _key_is(rep.event_id) if by_key else _canonical_id_is(rep.event_id)
                for m in search("routed", topic, match, [part], since_ms=since):
                    found[(topic, part, m.offset() or 0)] = Found.of(m)
            return list(found.values())
    out: list[Found] = []
    for topic in topics.routed:
        if topic in kafka.topics:
            out += [Found.of(m) for m in search("routed", topic, _canonical_id_is(rep.event_id))]
    return out
