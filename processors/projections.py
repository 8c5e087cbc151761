"""The built-in PostgreSQL projections: pure functions from canonical events to rows, plus their SQL.

Every statement is idempotent and order-independent, so redelivery, replay and any arrival order end in
the same state: a message's status advances by rank and never backwards (ties: later occurred_at, then
larger event id), a template's status is last-writer-wins on occurred_at (tie: larger event id).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

from psycopg.types.json import Jsonb as _Jsonb

from sentpipe.schemas import exact_json
from sentpipe.schemas.events import STATUS_RANK, CanonicalEvent, EventType

Row = tuple[Any, ...]
# The payload as received: numbers a double cannot hold are Decimals (exact_json), written digit for digit.
Jsonb = partial(_Jsonb, dumps=exact_json.dumps)


_INSERT = re.compile(r"INSERT\s+INTO\s+(\w+)(?:\s+AS\s+\w+)?\s*\(([^)]*)\)", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Statement:
    sql: str
    rows: Callable[[CanonicalEvent], Sequence[Row]]

    @property
    def table(self) -> str:
        return self._target()[0]

    @property
    def columns(self) -> frozenset[str]:
        """The columns the statement writes: any other column of its table gets its default."""
        return self._target()[1]

    def _target(self) -> tuple[str, frozenset[str]]:
        # Read from the SQL itself, so the two can never disagree.
        found = _INSERT.search(self.sql)
        if found is None:
            raise ValueError(f"not an INSERT with a column list: {self.sql[:60]!r}")
        return found[1], frozenset(c.strip() for c in found[2].split(","))


@dataclass(frozen=True, slots=True)
class Projection:
    type: EventType
    statements: tuple[Statement, ...]

    def rows(self, events: Sequence[CanonicalEvent]) -> list[tuple[str, list[Row]]]:
        return [(st.sql, [row for ev in events for row in st.rows(ev)]) for st in self.statements]


def status_rank(status: str | None) -> int:
    # Unknown statuses are kept in history but never displace a known one.
    return STATUS_RANK.get(status or "", -1)


def _received(ev: CanonicalEvent) -> datetime:
    return datetime.fromtimestamp(ev.received_at_ms / 1000, UTC)


def _text(data: dict[str, Any], key: str) -> str | None:
    # Absent, null and "" are "not given" (events.py reads them alike): NULL in the column. Stored as "", an
    # inbound message without text or a template without a reason was not found by `IS NULL`.
    v = data.get(key)
    return None if v is None or v == "" else str(v)


MESSAGE_EVENTS = Statement(
    """INSERT INTO message_events (event_id, tenant, message_id, status, occurred_at, received_at, payload)
       VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (tenant, event_id) DO NOTHING""",
    lambda ev: [(ev.id, ev.tenant, ev.subject, ev.status, ev.occurred_at, _received(ev), Jsonb(ev.data))],
)

# Advance by (rank, occurred_at, event_id): the row holds the maximum whatever the arrival order. Ids compare
# byte by byte (COLLATE "C"): under the database's collation (en_US.UTF-8 in the postgres images) a tie went
# to another event than in a database of another locale, or after a glibc upgrade re-sorted strings. Only
# with the history's content for that event id: an id sent again with other content (dropped live by the
# dedup table, but applied by a replay or after the dedup window) must not move another message's status.
MESSAGE_STATUS = Statement(
    """INSERT INTO message_status AS cur (tenant, message_id, status, status_rank, occurred_at, event_id)
       SELECT * FROM (VALUES (%s::text, %s::text, %s::text, %s::smallint, %s::timestamptz, %s::text))
           AS v (tenant, message_id, status, status_rank, occurred_at, event_id)
       WHERE EXISTS (SELECT FROM message_events e
                     WHERE (e.tenant, e.event_id, e.message_id, e.status, e.occurred_at)
                         = (v.tenant, v.event_id, v.message_id, v.status, v.occurred_at))
       ON CONFLICT (tenant, message_id) DO UPDATE
       SET status = EXCLUDED.status, status_rank = EXCLUDED.status_rank, occurred_at = EXCLUDED.occurred_at,
           event_id = EXCLUDED.event_id, updated_at = now()
       WHERE (EXCLUDED.status_rank, EXCLUDED.occurred_at, EXCLUDED.event_id COLLATE "C")
           > (cur.status_rank, cur.occurred_at, cur.event_id COLLATE "C")""",
    lambda ev: [(ev.tenant, ev.subject, ev.status, status_rank(ev.status), ev.occurred_at, ev.id)],
)

INBOUND = Statement(
    """INSERT INTO inbound_messages (event_id, tenant, from_number, to_number, text, channel, provider,
                                     occurred_at, received_at, payload)
       VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (tenant, event_id) DO NOTHING""",
    lambda ev: [
        (
            ev.id,
            ev.tenant,
            _text(ev.data, "from"),
            _text(ev.data, "to"),
            _text(ev.data, "text"),
            _text(ev.data, "channel"),
            _text(ev.data, "provider"),
            ev.occurred_at,
            _received(ev),
            Jsonb(ev.data),
        )
    ],
)

TEMPLATE_EVENTS = Statement(
    """INSERT INTO template_events (event_id, tenant, template_id, status, occurred_at, payload)
       VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (tenant, event_id) DO NOTHING""",
    lambda ev: [(ev.id, ev.tenant, ev.subject, ev.status, ev.occurred_at, Jsonb(ev.data))],
)

# An event cannot happen after it was received: Sent signs each delivery with its time, and the ingress
# refuses one more than its tolerance (5 minutes by default) away. A template event dated later (a sender's
# clock gone wrong, a year 9999) won last-writer-wins over every real event to come: its status stood for
# good, whatever Sent said after (paused, rejected). Its time counts as at most its receipt plus this much.
FUTURE_SKEW = timedelta(minutes=5)


def order_time(ev: CanonicalEvent) -> datetime:
    """The time a template event counts as for last-writer-wins (what `template_status.occurred_at` holds)."""
    received = _received(ev)
    # Compared before the sum: received in the last minutes of year 9999 (the model's bound), the sum
    # overflowed datetime, and the event was dead-lettered.
    return ev.occurred_at if ev.occurred_at - FUTURE_SKEW <= received else received + FUTURE_SKEW


# Templates move back and forth (approved, paused, approved): the latest event wins, ties by event id.
# Only with the history's content for that event id, as for MESSAGE_STATUS. A row written before times were
# capped counts as at most its last update plus FUTURE_SKEW (its event came before that update).
_TEMPLATE_ROW = """
    INSERT INTO template_status AS cur (tenant, template_id, name, status, reason, occurred_at, event_id)
       SELECT v.tenant, v.template_id, v.name, v.status, v.reason, v.order_at, v.event_id
       FROM (VALUES (%s::text, %s::text, %s::text, %s::text, %s::text, %s::timestamptz, %s::text,
                     %s::timestamptz))
           AS v (tenant, template_id, name, status, reason, occurred_at, event_id, order_at)
       WHERE EXISTS (SELECT FROM template_events e
                     WHERE (e.tenant, e.event_id, e.template_id, e.status, e.occurred_at)
                         = (v.tenant, v.event_id, v.template_id, v.status, v.occurred_at))"""


def _template_row(ev: CanonicalEvent) -> Row:
    return (
        ev.tenant,
        ev.subject,
        _text(ev.data, "template_name") or _text(ev.data, "name"),
        ev.status,
        _text(ev.data, "reason"),
        ev.occurred_at,
        ev.id,
        order_time(ev),
    )


# A template's name does not change (WhatsApp cannot rename one), but not every event carries it: a later
# event without a name kept its status and blanked the name the earlier ones gave.
TEMPLATE_STATUS = Statement(
    _TEMPLATE_ROW
    + """
       ON CONFLICT (tenant, template_id) DO UPDATE
       SET name = COALESCE(EXCLUDED.name, cur.name), status = EXCLUDED.status, reason = EXCLUDED.reason,
           occurred_at = EXCLUDED.occurred_at, event_id = EXCLUDED.event_id, updated_at = now()
       WHERE (EXCLUDED.occurred_at, EXCLUDED.event_id COLLATE "C")
           > (LEAST(cur.occurred_at, cur.updated_at + %s::interval), cur.event_id COLLATE "C")""",
    lambda ev: [(*_template_row(ev), FUTURE_SKEW)],
)

# ... and an older event that carries the name, applied after a newer one that did not (any arrival order
# ends alike), names the template without touching its status. The row exists: TEMPLATE_STATUS ran first,
# with the same history check.
TEMPLATE_NAME = Statement(
    _TEMPLATE_ROW
    + """ AND v.name IS NOT NULL
       ON CONFLICT (tenant, template_id) DO UPDATE SET name = EXCLUDED.name WHERE cur.name IS NULL""",
    lambda ev: [_template_row(ev)],
)

PROJECTIONS: dict[EventType, Projection] = {
    EventType.MESSAGE_STATUS: Projection(EventType.MESSAGE_STATUS, (MESSAGE_EVENTS, MESSAGE_STATUS)),
    EventType.MESSAGE_INBOUND: Projection(EventType.MESSAGE_INBOUND, (INBOUND,)),
    EventType.TEMPLATE_APPROVAL: Projection(
        EventType.TEMPLATE_APPROVAL, (TEMPLATE_EVENTS, TEMPLATE_STATUS, TEMPLATE_NAME)
    ),
}
