"""The PostgreSQL sink against the real database: idempotent batches, savepoints per handler call."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from sentpipe import CanonicalEvent, HandlerContext, PermanentError, RetryableError
from sentpipe.processors.handlers import HandlerRegistry
from sentpipe.processors.retry import classify
from sentpipe.processors.sink import PostgresSink
from sentpipe.schemas import routing as r
from sentpipe.schemas.events import MAX_EPOCH_MS, EventType
from sentpipe.schemas.samples import SampleFactory
from sentpipe.schemas.topics import Topics


def status_events(n: int) -> list[CanonicalEvent]:
    out = []
    for sample in (SampleFactory(3).message_status(f"m{i}", "delivered") for i in range(n)):
        routed = r.route(
            None,
            sample.body,
            {},
            topics=Topics(),
            id_source="auto",
            default_tenant="t",
            record_timestamp_ms=1,
        )
        assert routed.event is not None
        out.append(routed.event)
    return out


def count(db_url: str, table: str) -> int:
    with psycopg.connect(db_url) as c:
        row = c.execute(f"SELECT count(*) FROM {table}").fetchone()
        return int(row[0]) if row else 0


async def test_a_batch_applies_once_however_often_it_is_delivered(
    pool: AsyncConnectionPool, db_url: str
) -> None:
    events = status_events(20)
    sink = PostgresSink(pool, HandlerRegistry())
    assert await sink.apply(EventType.MESSAGE_STATUS, events, 1) == []
    assert await sink.apply(EventType.MESSAGE_STATUS, events[::-1], 2) == []
    assert count(db_url, "message_events") == 20


def routed_event(body: bytes, event_id: str) -> CanonicalEvent:
    doc = orjson.loads(body)
    doc["id"] = event_id
    body = orjson.dumps(doc)
    routed = r.route(
        None, body, {}, topics=Topics(), id_source="auto", default_tenant="t", record_timestamp_ms=1
    )
    assert routed.event is not None
    return routed.event


async def test_an_event_id_sent_again_with_other_content_changes_no_status(
    pool: AsyncConnectionPool, db_url: str
) -> None:
    """The history kept the first content of an event id, but the status tables took the second too (a
    replay or a redelivery past the dedup window): message B showed `delivered` from an event whose
    history said it was message A's `sent`. The first content wins everywhere, in one batch or two."""
    f = SampleFactory(31)
    first = routed_event(f.message_status("A", "sent").body, "evt-reused")
    second = routed_event(f.message_status("B", "read").body, "evt-reused")
    t_first = routed_event(f.template("tpl-A", "approved").body, "evt-t-reused")
    t_second = routed_event(f.template("tpl-B", "rejected").body, "evt-t-reused")
    sink = PostgresSink(pool, HandlerRegistry())
    assert await sink.apply(EventType.MESSAGE_STATUS, [first], 1) == []
    assert await sink.apply(EventType.MESSAGE_STATUS, [second], 1) == []
    assert await sink.apply(EventType.TEMPLATE_APPROVAL, [t_first, t_second], 1) == []
    with psycopg.connect(db_url) as c:
        assert c.execute("SELECT message_id, status FROM message_events").fetchall() == [("A", "sent")]
        assert c.execute("SELECT message_id, status FROM message_status").fetchall() == [("A", "sent")]
        assert c.execute("SELECT template_id, status FROM template_events").fetchall() == [
            ("tpl-A", "approved")
        ]
        assert c.execute("SELECT template_id, status FROM template_status").fetchall() == [
            ("tpl-A", "approved")
        ]


async def test_a_failing_handler_call_is_reported_and_its_neighbours_commit(
    pool: AsyncConnectionPool, db_url: str
) -> None:
    events = status_events(5)
    bad = events[2].id
    handlers = HandlerRegistry()
    with psycopg.connect(db_url, autocommit=True) as c:
        c.execute("CREATE TABLE seen (event_id text)")

    async def record(event: CanonicalEvent, ctx: HandlerContext) -> None:
        await ctx.conn.execute("INSERT INTO seen VALUES (%s)", (event.id,))  # rolled back for the bad one
        if event.id == bad:
            raise PermanentError("no")

    handlers.register("message.status.updated", record, "record")
    failures = await PostgresSink(pool, handlers).apply(EventType.MESSAGE_STATUS, events, 1)
    assert [(f.event.id, f.handler, type(f.error).__name__) for f in failures] == [
        (bad, "record", "PermanentError")
    ]
    assert count(db_url, "seen") == 4 and count(db_url, "message_events") == 5


async def test_a_retryable_handler_error_rolls_the_whole_batch_back(
    pool: AsyncConnectionPool, db_url: str
) -> None:
    handlers = HandlerRegistry()

    async def later(event: CanonicalEvent, ctx: HandlerContext) -> None:
        raise RetryableError("the payment service is down")

    handlers.register("message.status.updated", later)
    with pytest.raises(RetryableError):
        await PostgresSink(pool, handlers).apply(EventType.MESSAGE_STATUS, status_events(3), 1)
    assert count(db_url, "message_events") == 0


async def test_what_postgresql_refuses_is_a_permanent_error_of_the_batch(pool: AsyncConnectionPool) -> None:
    (event,) = status_events(1)
    poisoned = CanonicalEvent(**{**{f: getattr(event, f) for f in event.__slots__}, "data": {"t": "a\x00b"}})
    with pytest.raises(psycopg.Error) as caught:
        await PostgresSink(pool, HandlerRegistry()).apply(EventType.MESSAGE_STATUS, [poisoned], 1)
    assert classify(caught.value) == "permanent"


def template_event(
    template_id: str, status: str, at: str, received: datetime, name: str | None = None
) -> CanonicalEvent:
    """A Sent-shape template event dated `at`, received at `received`, with `template_name` if given."""
    payload = {"template_id": template_id, "status": status}
    if name is not None:
        payload["template_name"] = name
    body = orjson.dumps({"field": "templates", "timestamp": at, "payload": payload})
    routed = r.route(
        None,
        body,
        {},
        topics=Topics(),
        id_source="auto",
        default_tenant="t",
        record_timestamp_ms=int(received.timestamp() * 1000),
    )
    assert routed.event is not None
    return routed.event


async def test_a_template_event_dated_far_ahead_does_not_pin_the_status_for_good(
    pool: AsyncConnectionPool, db_url: str
) -> None:
    """Template status is last-writer-wins on the event's time, which the model takes up to year 9999: one
    event dated 9999 (received in 2026: no signed delivery comes before its event) beat every later one,
    and the template showed `approved` for good after Sent paused it. Its time now counts as at most five
    minutes past its receipt, in either order; the history keeps the time it carried; and a row an older
    version pinned that way gives way too."""
    received = datetime(2026, 12, 1, 8, tzinfo=UTC)
    sink = PostgresSink(pool, HandlerRegistry())
    for template_id, first_future in (("tpl-1", True), ("tpl-2", False)):
        future = template_event(template_id, "approved", "9999-12-31T00:00:00Z", received)
        paused = template_event(template_id, "paused", "2026-12-01T09:00:00Z", received + timedelta(hours=1))
        for batch in ([future], [paused]) if first_future else ([paused], [future]):
            assert await sink.apply(EventType.TEMPLATE_APPROVAL, batch, 1) == []
    later = received + timedelta(hours=2)
    with psycopg.connect(db_url, autocommit=True) as c:
        assert dict(c.execute("SELECT template_id, status FROM template_status").fetchall()) == {
            "tpl-1": "paused",
            "tpl-2": "paused",
        }
        years = c.execute("SELECT DISTINCT extract(year FROM occurred_at) FROM template_events").fetchall()
        assert sorted(int(y) for (y,) in years) == [2026, 9999]
        # As an older version left it: the 9999 event's own time, written now.
        c.execute(
            "UPDATE template_status SET status = 'rejected', occurred_at = '9999-12-31T00:00:00Z', "
            "updated_at = %s WHERE template_id = 'tpl-1'",
            (received,),
        )
    approved = template_event("tpl-1", "approved", "2026-12-01T10:00:00Z", later)
    assert await sink.apply(EventType.TEMPLATE_APPROVAL, [approved], 1) == []
    with psycopg.connect(db_url) as c:
        row = c.execute("SELECT status FROM template_status WHERE template_id = 'tpl-1'").fetchone()
        assert row == ("approved",), row


async def test_a_template_event_without_a_name_keeps_the_name_in_any_order(
    pool: AsyncConnectionPool, db_url: str
) -> None:
    """Not every template event carries `template_name`: a later one without it blanked the name the
    earlier one gave (`name` NULL beside status `paused`). Either arrival order, in one batch or two, ends
    with the later status and the name."""
    received = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    sink = PostgresSink(pool, HandlerRegistry())
    orders = {"in-order": False, "reversed": True, "one-batch": None}
    for n, (template_id, reverse) in enumerate(orders.items()):
        named = template_event(template_id, "approved", "2026-12-01T09:00:00Z", received, f"name-{n}")
        later = template_event(template_id, "paused", "2026-12-01T10:00:00Z", received)
        if reverse is None:
            assert await sink.apply(EventType.TEMPLATE_APPROVAL, [later, named], 1) == []
            continue
        for ev in [later, named] if reverse else [named, later]:
            assert await sink.apply(EventType.TEMPLATE_APPROVAL, [ev], 1) == []
    with psycopg.connect(db_url) as c:
        rows = c.execute("SELECT template_id, name, status FROM template_status ORDER BY name").fetchall()
    assert rows == [(t, f"name-{n}", "paused") for n, t in enumerate(orders)]


async def test_a_template_event_received_at_the_end_of_time_is_projected(
    pool: AsyncConnectionPool, db_url: str
) -> None:
    """Receipt plus the five minutes overflowed datetime for a record received in the last minutes of year
    9999 (a raw record's timestamp, which the model allows): the event was dead-lettered, not projected."""
    received = datetime.fromtimestamp(MAX_EPOCH_MS / 1000, UTC)
    event = template_event("tpl-end", "approved", "9999-12-31T23:58:00Z", received)
    assert await PostgresSink(pool, HandlerRegistry()).apply(EventType.TEMPLATE_APPROVAL, [event], 1) == []
    with psycopg.connect(db_url) as c:
        row = c.execute("SELECT status FROM template_status WHERE template_id = 'tpl-end'").fetchone()
        assert row == ("approved",), row


# Bodies written from /work/shared/sent-webhooks.md ("Body: two envelope shapes seen in the wild"), not from
# SampleFactory, which could share the code's mistakes.
SENT_DELIVERED: dict[str, Any] = {
    "field": "message",
    "sub_type": "message.delivered",
    "timestamp": "2025-10-31T12:10:42+02:00",
    "payload": {
        "account_id": "7ba7b810-9dad-11d1-80b4-00c04fd430c8",
        "message_id": "8ba7b810-9dad-11d1-80b4-00c04fd430c8",
        "message_status": "DELIVERED",
        "channel": "sms",
        "inbound_number": "+1234567890",
        "outbound_number": "+1987654321",
        "template_id": "9ba7b810-9dad-11d1-80b4-00c04fd430c8",
        "agent_id": "agent_abc123",
    },
}
SENT_RECEIVED: dict[str, Any] = {
    "field": "message",
    "sub_type": "message.received",
    "timestamp": "2025-10-31T10:10:42Z",
    "payload": {
        "account_id": "7ba7b810-9dad-11d1-80b4-00c04fd430c8",
        "from": "+1234567890",
        "to": "+1987654321",
        "text": "Hello",
        "channel": "sms",
        "provider": "twilio",
        "received_at": "2025-10-31T10:10:40Z",
    },
}
SENT_TEMPLATE: dict[str, Any] = {
    "field": "templates",
    "timestamp": "2025-10-31T10:10:42Z",
    "payload": {
        "account_id": "7ba7b810-9dad-11d1-80b4-00c04fd430c8",
        "template_id": "9ba7b810-9dad-11d1-80b4-00c04fd430c8",
        "template_name": "order_confirmation",
        "whatsapp_template_id": "1234567890123456",
        "status": "APPROVED",
        "language": "en_US",
        "category": "UTILITY",
        "channel": "whatsapp",
        "reason": None,
    },
}
RECEIVED_MS = 1_761_905_443_000  # 2025-10-31T10:10:43Z, a second after Sent's timestamp


def sent_event(doc: dict[str, Any]) -> CanonicalEvent:
    routed = r.route(
        None,
        orjson.dumps(doc),
        {r.H_RECEIVED_AT: b"%d" % RECEIVED_MS},
        topics=Topics(),
        id_source="auto",
        default_tenant="t",
        record_timestamp_ms=1,
    )
    assert routed.event is not None
    return routed.event


async def test_what_sent_documents_lands_in_every_column_and_the_payload_verbatim(
    pool: AsyncConnectionPool, db_url: str
) -> None:
    """Each documented Sent body, field by field: ids, lower-cased statuses, times in UTC, the inbound
    columns, the template's name and null reason, and every payload field (numbers-as-strings included)
    kept as Sent wrote it."""
    sink = PostgresSink(pool, HandlerRegistry())
    for type_, doc in (
        (EventType.MESSAGE_STATUS, SENT_DELIVERED),
        (EventType.MESSAGE_INBOUND, SENT_RECEIVED),
        (EventType.TEMPLATE_APPROVAL, SENT_TEMPLATE),
    ):
        assert await sink.apply(type_, [sent_event(doc)], 1) == []
    at = datetime(2025, 10, 31, 10, 10, 42, tzinfo=UTC)
    received = datetime(2025, 10, 31, 10, 10, 43, tzinfo=UTC)
    with psycopg.connect(db_url) as c:
        assert c.execute(
            "SELECT tenant, message_id, status, occurred_at, received_at, payload FROM message_events"
        ).fetchall() == [
            (
                "t",
                SENT_DELIVERED["payload"]["message_id"],
                "delivered",
                at,
                received,
                SENT_DELIVERED["payload"],
            )
        ]
        assert c.execute(
            "SELECT tenant, message_id, status, status_rank, occurred_at FROM message_status"
        ).fetchall() == [("t", "8ba7b810-9dad-11d1-80b4-00c04fd430c8", "delivered", 4, at)]
        assert c.execute(
            "SELECT tenant, from_number, to_number, text, channel, provider, occurred_at, received_at,"
            " payload FROM inbound_messages"
        ).fetchall() == [
            (
                "t",
                "+1234567890",
                "+1987654321",
                "Hello",
                "sms",
                "twilio",
                at,
                received,
                SENT_RECEIVED["payload"],
            )
        ]
        assert c.execute(
            "SELECT tenant, template_id, status, occurred_at, payload FROM template_events"
        ).fetchall() == [
            ("t", "9ba7b810-9dad-11d1-80b4-00c04fd430c8", "approved", at, SENT_TEMPLATE["payload"])
        ]
        assert c.execute(
            "SELECT tenant, template_id, name, status, reason, occurred_at FROM template_status"
        ).fetchall() == [
            ("t", "9ba7b810-9dad-11d1-80b4-00c04fd430c8", "order_confirmation", "approved", None, at)
        ]


async def test_empty_text_is_stored_as_null_like_an_absent_or_null_field(
    pool: AsyncConnectionPool, db_url: str
) -> None:
    """The model reads "" as "not given" (README, Validation limits), but the columns kept "": a media-only
    inbound message or a template approved with `"reason": ""` was missed by `IS NULL`."""
    inbound = sent_event(
        {
            **SENT_RECEIVED,
            "payload": {**SENT_RECEIVED["payload"], "text": "", "provider": "", "channel": None},
        }
    )
    template = sent_event({**SENT_TEMPLATE, "payload": {**SENT_TEMPLATE["payload"], "reason": ""}})
    sink = PostgresSink(pool, HandlerRegistry())
    assert await sink.apply(EventType.MESSAGE_INBOUND, [inbound], 1) == []
    assert await sink.apply(EventType.TEMPLATE_APPROVAL, [template], 1) == []
    with psycopg.connect(db_url) as c:
        assert c.execute(
            "SELECT text, channel, provider, payload->>'text' FROM inbound_messages"
        ).fetchall() == [(None, None, None, "")]
        assert c.execute("SELECT name, reason FROM template_status").fetchall() == [
            ("order_confirmation", None)
        ]
