"""Framing, event ids, normalization and routing: pure logic, no services."""

from __future__ import annotations

import hashlib
import math
from datetime import UTC, datetime

import orjson
import pytest

from sentpipe.schemas import events as ev
from sentpipe.schemas.events import CanonicalEvent, EventType, MalformedEvent, frame, normalize
from sentpipe.schemas.routing import H_RECEIVED_AT, H_TENANT, route
from sentpipe.schemas.samples import SampleFactory
from sentpipe.schemas.topics import Topics
from tests.hostile import HOSTILE, Hostile, guide, inbound, nest, status, template

T = Topics("sent.")


def _route(body: bytes, key: bytes | None = None, tenant: bytes = b"acme"):  # type: ignore[no-untyped-def]
    return route(
        key,
        body,
        {H_TENANT: tenant, H_RECEIVED_AT: b"1700000000000"},
        topics=T,
        id_source="auto",
        default_tenant="default",
        record_timestamp_ms=1,
    )


@pytest.mark.parametrize("shape", ["sent", "guide"])
def test_each_type_routes_to_its_topic_keyed_by_its_entity(shape) -> None:  # type: ignore[no-untyped-def]
    f = SampleFactory(7)
    status = f.message_status("m-1", "delivered", shape)
    r = _route(status.body)
    assert r.topic == T.message_status and r.key == b"acme/m-1"
    assert r.event is not None and r.event.status == "delivered" and r.event.tenant == "acme"
    inbound = f.inbound(shape)
    r = _route(inbound.body, key=b"evt-9")
    assert r.topic == T.message_inbound and r.key == b"acme/evt-9" and r.event and r.event.id == "evt-9"
    tpl = f.template("tpl-1", "approved", shape)
    r = _route(tpl.body)
    assert (
        r.topic == T.template_approval and r.key == b"acme/tpl-1" and r.event and r.event.status == "approved"
    )


def test_event_id_sources() -> None:
    body = SampleFactory(1).inbound().body
    assert frame(body, webhook_id="w", id_source="auto").event_id == hashlib.sha256(body).hexdigest()
    assert frame(body, webhook_id="w", id_source="header").event_id == "w"
    reserialized = orjson.dumps(orjson.loads(body), option=orjson.OPT_INDENT_2)
    assert (
        frame(body, webhook_id=None, id_source="content").event_id
        == frame(reserialized, webhook_id=None, id_source="content").event_id
    )
    guide = SampleFactory(1).inbound("guide")
    assert frame(guide.body, webhook_id=None).event_id == guide.doc["id"]
    # A blank envelope id is not given, like "": the body's hash, as for an event without one.
    blank = orjson.dumps({**guide.doc, "id": "  "})
    assert frame(blank, webhook_id=None).event_id == hashlib.sha256(blank).hexdigest()
    with pytest.raises(MalformedEvent) as e:
        frame(body, webhook_id=" ", id_source="header")
    assert e.value.reason == "missing_event_id"


def test_unknown_types_are_unrouted_not_dropped() -> None:
    body = b'{"field":"accounts","payload":{}}'
    r = _route(body)
    assert r.topic == T.unrouted and r.value == body and r.event is None
    assert frame(b'{"event":{"type":"x.y"},"data":{}}', webhook_id=None).type is EventType.UNROUTED


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"not json", "not_json"),
        (b"[1,2]", "not_an_object"),
        (b'{"hello":"world"}', "no_envelope"),
        (b'{"field":"message","sub_type":"message.sent","payload":{"x":1}}', "missing_message_id"),
        (b'{"field":"templates","payload":{"template_id":"t"}}', "missing_status"),
        (b'{"field":"message","sub_type":"message.sent","payload":[1]}', "bad_payload"),
    ],
)
def test_malformed_bodies_have_reasons(body: bytes, reason: str) -> None:
    with pytest.raises(MalformedEvent) as e:
        _route(body)
    assert e.value.reason == reason


def test_occurred_at_falls_back_to_received_at() -> None:
    framed = frame(b'{"field":"message","sub_type":"message.received","payload":{}}', webhook_id=None)
    ev = normalize(framed, tenant="t", received_at_ms=1_700_000_000_000)
    assert ev.occurred_at.timestamp() == 1_700_000_000
    assert ev.type is EventType.MESSAGE_INBOUND and ev.subject == framed.event_id


def test_canonical_json_round_trips() -> None:
    r = _route(SampleFactory(2).template("t", "paused").body)
    assert r.event is not None
    assert CanonicalEvent.from_json(r.value) == r.event


# --- the canonical model refuses what it cannot represent (schemas/events.py, module doc) ---------------


def _body(doc: object) -> bytes:
    return orjson.dumps(doc)


@pytest.mark.parametrize("case", HOSTILE, ids=[h.name for h in HOSTILE])
def test_hostile_bodies_are_refused_at_framing(case: Hostile) -> None:
    with pytest.raises(MalformedEvent) as e:
        frame(case.body, webhook_id="w")
    assert e.value.reason == case.reason, e.value.detail
    assert e.value.reason in ev.REASONS
    # The detail names the field and the limit, never echoes the value (it goes into headers and logs).
    assert len(e.value.detail) < 200 and "\x00" not in e.value.detail
    with pytest.raises(MalformedEvent):  # the worker, replay and redrive refuse it the same way
        _route(case.body)


def test_reason_codes_are_short_snake_case() -> None:
    assert all(r.isidentifier() and r == r.lower() and len(r) <= 32 for r in ev.REASONS)
    assert {h.reason for h in HOSTILE} <= set(ev.REASONS)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, datetime(1970, 1, 1, tzinfo=UTC)),
        (1_700_000_000, datetime.fromtimestamp(1_700_000_000, UTC)),
        (1_700_000_000_000, datetime.fromtimestamp(1_700_000_000, UTC)),  # above 1e11: milliseconds
        (1e11, datetime.fromtimestamp(1e11, UTC)),  # exactly 1e11 is still seconds (year 5138)
        (ev.MAX_EPOCH_MS, datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC)),
        ("2025-10-31T10:10:42Z", datetime(2025, 10, 31, 10, 10, 42, tzinfo=UTC)),
        ("2025-10-31T12:10:42+02:00", datetime(2025, 10, 31, 10, 10, 42, tzinfo=UTC)),
        ("2025-10-31T10:10:42", datetime(2025, 10, 31, 10, 10, 42, tzinfo=UTC)),  # no zone: UTC
        ("9999-12-31T23:59:59.999999Z", datetime.max.replace(tzinfo=UTC)),
        ("1970-01-01T00:00:00Z", ev.EPOCH),
        (None, None),
        ("", None),
    ],
)
def test_timestamps_within_1970_and_9999_are_read(value: object, expected: datetime | None) -> None:
    got = ev.parse_timestamp(value)
    assert got == expected
    assert got is None or got.tzinfo is UTC


@pytest.mark.parametrize(
    "value",
    [
        1e20,
        -1e15,
        -1,
        2**64 - 1,
        10**400,  # a Python int beyond a float's range never reaches the division
        ev.MAX_EPOCH_MS + 1,
        math.nan,
        math.inf,
        -math.inf,
        True,
        False,
        [1],
        {"t": 1},
        "99999-01-01",
        "1969-12-31T23:59:59Z",
        "1970-01-01T00:30:00+01:00",  # 1969 in UTC
        "9999-12-31T23:59:59-00:01",  # year 10000 in UTC
        "not a time",
        "2026-01-01T00:00:00" + " " * 100,
    ],
    ids=repr,
)
def test_timestamps_outside_or_of_the_wrong_type_are_refused(value: object) -> None:
    with pytest.raises(MalformedEvent) as e:
        ev.parse_timestamp(value, "timestamp")
    assert e.value.reason == "bad_timestamp"
    assert ev.parse_time(value) is None  # the lenient form (CLI bounds) never raises


def test_absurd_timestamps_no_longer_crash_normalize() -> None:
    for value in (1e20, -1e15, 2**64 - 1, "99999-01-01"):
        framed = ev.Framed(
            "e", EventType.MESSAGE_STATUS, "message.sent", "sent", {**status(), "timestamp": value}
        )
        with pytest.raises(MalformedEvent) as e:
            normalize(framed, tenant="t", received_at_ms=1_700_000_000_000)
        assert e.value.reason == "bad_timestamp"


@pytest.mark.parametrize("received_at_ms", [-1, ev.MAX_EPOCH_MS + 1, 2**64, True])
def test_received_at_outside_the_range_is_refused(received_at_ms: int) -> None:
    framed = frame(_body(inbound()), webhook_id=None)
    with pytest.raises(MalformedEvent) as e:
        normalize(framed, tenant="t", received_at_ms=received_at_ms)
    assert e.value.reason == "bad_received_at"


def test_received_at_header_out_of_range_is_dead_lettered_by_routing() -> None:
    with pytest.raises(MalformedEvent) as e:
        route(
            None,
            _body(inbound()),
            {H_TENANT: b"acme", H_RECEIVED_AT: b"99999999999999999999"},
            topics=T,
            id_source="auto",
            default_tenant="d",
            record_timestamp_ms=1,
        )
    assert e.value.reason == "bad_received_at"


def test_tenant_is_an_id_too() -> None:
    framed = frame(_body(inbound()), webhook_id=None)
    for tenant in ("", "t" * (ev.MAX_ID_LENGTH + 1), "a\x00b"):
        with pytest.raises(MalformedEvent) as e:
            normalize(framed, tenant=tenant, received_at_ms=1)
        assert e.value.reason in ("bad_tenant", "nul_character")


def test_depth_limit_is_exact() -> None:
    # The body is level 1 and its payload level 2: MAX_DEPTH containers in all are fine, one more is not.
    ok = _body({**inbound(), "payload": {"text": "hi", "x": nest(ev.MAX_DEPTH - 2)}})
    assert frame(ok, webhook_id=None).type is EventType.MESSAGE_INBOUND
    event = _route(ok).event
    assert event is not None and CanonicalEvent.from_json(event.to_json()) == event  # writable and readable
    deep = _body({**inbound(), "payload": {"text": "hi", "x": nest(ev.MAX_DEPTH - 1)}})
    with pytest.raises(MalformedEvent) as e:
        frame(deep, webhook_id=None)
    assert e.value.reason == "too_deep"


def test_wide_bodies_are_walked_without_false_alarms() -> None:
    # More brackets than MAX_DEPTH (no shortcut), but shallow; an escaped backslash before "u0000" is no NUL.
    doc = status(items=[{"n": i, "tags": [str(i)]} for i in range(500)], note="C:\\u0000dir")
    body = _body(doc)
    assert body.count(b"{") > ev.MAX_DEPTH and b"\\\\u0000" in body
    assert frame(body, webhook_id=None).type is EventType.MESSAGE_STATUS


def test_check_structure_is_iterative() -> None:
    # Far deeper than Python's recursion limit: still a clean refusal, no RecursionError.
    value: object = []
    for _ in range(100_000):
        value = [value]
    with pytest.raises(MalformedEvent) as e:
        ev.check_structure(value)
    assert e.value.reason == "too_deep"
    with pytest.raises(MalformedEvent) as e:
        ev.check_structure({"k": ["x\x00"]})
    assert e.value.reason == "nul_character"


def test_id_limits_are_exact_and_integers_stay_ids() -> None:
    longest = "i" * ev.MAX_ID_LENGTH
    assert frame(_body(guide(id=longest)), webhook_id=None).event_id == longest
    assert frame(_body(guide(id=12)), webhook_id=None).event_id == "12"
    r = _route(_body(status(message_id=42)))
    assert r.event is not None and r.event.subject == "42" and r.key == b"acme/42"
    r = _route(_body(template(template_id=longest)))
    assert r.event is not None and r.event.subject == longest
    # Not given (null or ""): the fallbacks still apply.
    for empty in (None, ""):
        body = _body(guide(id=empty))
        assert frame(body, webhook_id=None).event_id == hashlib.sha256(body).hexdigest()
    r = _route(_body(status(message_id=None, messageId="m-2")))
    assert r.event is not None and r.event.subject == "m-2"


def test_a_wrongly_typed_envelope_id_is_refused_whatever_the_id_source() -> None:
    body = _body(guide(id=True))
    for source in ("auto", "body", "header", "content"):
        with pytest.raises(MalformedEvent) as e:
            frame(body, webhook_id="w", id_source=source)  # type: ignore[arg-type]
        assert e.value.reason == "bad_event_id"
    with pytest.raises(MalformedEvent) as e:
        frame(_body(inbound()), webhook_id="w" * (ev.MAX_ID_LENGTH + 1), id_source="header")
    assert e.value.reason == "bad_event_id"


def test_status_limits_and_text_fields() -> None:
    r = _route(_body(template(status="A" * ev.MAX_STATUS_LENGTH)))
    assert r.event is not None and r.event.status == "a" * ev.MAX_STATUS_LENGTH
    r = _route(
        _body(
            inbound(
                **{"from": 15551234567, "to": "+15550000000"},
                text="t" * ev.MAX_TEXT_LENGTH,
                channel=None,
                provider="",
            )
        )
    )
    assert r.event is not None and r.event.data["from"] == 15551234567  # the payload is kept verbatim
    r = _route(_body(template(template_name=None, reason=None)))
    assert r.event is not None and r.event.status == "approved"


@pytest.mark.parametrize(
    ("doc", "kept"),
    [
        # Meta's style of time (epoch seconds as a string) in a field Sent's payload might add.
        (status(timestamp="1761905442"), "1761905442"),
        (template(occurred_at="2025-10-31 10:10:42 +0000 UTC"), "2025-10-31 10:10:42 +0000 UTC"),
        (inbound(received_at="Fri, 31 Oct 2025 10:10:40 GMT"), "Fri, 31 Oct 2025 10:10:40 GMT"),
        (inbound(received_at="99999-01-01T00:00:00Z"), "99999-01-01T00:00:00Z"),
    ],
)
def test_payload_times_the_model_never_reads_are_kept_not_refused(doc: dict[str, object], kept: str) -> None:
    """Sent's envelope always carries its `timestamp`, so a Sent payload's own times (and an inbound message's
    `received_at`, in either shape) are never read: checked anyway, a form the parser does not take
    dead-lettered every event of that type, although the payload keeps any string as it came."""
    r = _route(_body(doc))
    assert r.event is not None
    assert r.event.occurred_at == (
        datetime(2026, 1, 1, tzinfo=UTC) if "timestamp" in doc else datetime.fromtimestamp(1_700_000_000, UTC)
    )
    assert kept in r.event.data.values()
    ev.check_payload(r.event.type, r.event.data)  # and the projector takes the routed event


def test_missing_keys_are_still_the_routers_business() -> None:
    # Framing accepts them (they reach the raw topic); normalize dead-letters them as before.
    for doc, reason in (
        (
            {"field": "message", "sub_type": "message.read", "payload": {"note": "no id"}},
            "missing_message_id",
        ),
        ({"field": "message", "sub_type": "message.", "payload": {"message_id": "m"}}, "missing_status"),
        ({"field": "templates", "payload": {"status": "APPROVED"}}, "missing_template_id"),
        # Blank is not given: an id nobody could search for, a key merging unrelated events.
        (
            {"field": "message", "sub_type": "message.read", "payload": {"message_id": " \t"}},
            "missing_message_id",
        ),
        ({"field": "message", "sub_type": "message. ", "payload": {"message_id": "m"}}, "missing_status"),
        (
            {"field": "templates", "payload": {"template_id": "  ", "status": "APPROVED"}},
            "missing_template_id",
        ),
        ({"field": "templates", "payload": {"template_id": "t", "status": "\n"}}, "missing_status"),
    ):
        frame(_body(doc), webhook_id=None)
        with pytest.raises(MalformedEvent) as e:
            _route(_body(doc))
        assert e.value.reason == reason


def _canonical(**changes: object) -> bytes:
    r = _route(SampleFactory(4).message_status("m-1", "sent").body)
    assert r.event is not None
    return orjson.dumps({**orjson.loads(r.event.to_json()), **changes})


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"not json", "not_json"),
        (b"[]", "not_an_object"),
        (b'{"data":' + b"[" * 3000 + b"]" * 3000 + b"}", "too_deep"),
        (_canonical(data={"x": nest(ev.MAX_DEPTH)}), "too_deep"),
        (_canonical(id=True), "bad_canonical_event"),
        (_canonical(id=7), "bad_canonical_event"),
        (_canonical(id=""), "bad_canonical_event"),
        (_canonical(tenant=None), "bad_canonical_event"),
        (_canonical(subject=["m"]), "bad_canonical_event"),
        (_canonical(type="nope"), "bad_canonical_event"),
        (_canonical(type="unrouted"), "bad_canonical_event"),
        (_canonical(occurred_at="99999-01-01T00:00:00Z"), "bad_timestamp"),
        (_canonical(occurred_at="0001-01-01T00:00:00Z"), "bad_timestamp"),
        (_canonical(occurred_at=1_700_000_000), "bad_canonical_event"),
        (_canonical(received_at=1e20), "bad_received_at"),
        (_canonical(received_at=-1), "bad_received_at"),
        (_canonical(received_at="1"), "bad_received_at"),
        (_canonical(received_at=True), "bad_received_at"),
        (_canonical(status=5), "bad_canonical_event"),
        (_canonical(sub_type={"a": 1}), "bad_canonical_event"),
        (_canonical(shape="other"), "bad_canonical_event"),
        (_canonical(data=[1]), "bad_payload"),
    ],
)
def test_from_json_refuses_what_it_cannot_type(value: bytes, reason: str) -> None:
    with pytest.raises(MalformedEvent) as e:
        CanonicalEvent.from_json(value)
    assert e.value.reason == reason
    assert isinstance(e.value, ValueError)  # the worker and the DLQ tools catch ValueError


def test_from_json_leaves_what_only_postgresql_refuses_to_the_database() -> None:
    # A record an older or buggy router wrote: well typed, but poison for PostgreSQL. Reading it must not
    # fail, so the projection meets SQLSTATE 22P05/54000 and dead-letters exactly this record.
    value = _canonical(subject="m" * 6000, data={"text": "a\u0000b"}, status=None)
    event = CanonicalEvent.from_json(value)
    assert event.subject == "m" * 6000 and event.data == {"text": "a\x00b"} and event.status is None
    assert CanonicalEvent.from_json(event.to_json()) == event


def test_canonical_json_round_trips_for_every_sample() -> None:
    for sample in SampleFactory(21).mix(60, "mixed"):
        r = _route(sample.body)
        assert r.event is not None
        assert CanonicalEvent.from_json(r.value) == r.event
        assert r.event.occurred_at.tzinfo is UTC


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2016-12-31T23:59:60Z", datetime(2017, 1, 1, tzinfo=UTC)),  # a leap second, as PostgreSQL reads it
        ("2025-10-31T10:10:42z", datetime(2025, 10, 31, 10, 10, 42, tzinfo=UTC)),
        ("2025-10-31t10:10:42.5z", datetime(2025, 10, 31, 10, 10, 42, 500000, tzinfo=UTC)),
        ("2016-12-31T23:59:60.250+01:00", datetime(2016, 12, 31, 23, 0, 0, 250000, tzinfo=UTC)),
    ],
)
def test_rfc3339_times_python_refuses_are_read(text: str, expected: datetime) -> None:
    """RFC 3339 allows second 60 and a lower-case "z"; Python 3.11 refused both, so a signed event with
    either was dead-lettered for good (bad_timestamp)."""
    body = orjson.dumps(status() | {"timestamp": text})
    for exact in (True, False):
        framed = frame(body, webhook_id=None, exact=exact)
        event = normalize(framed, tenant="t", received_at_ms=1_700_000_000_000)
        assert event.occurred_at == expected


@pytest.mark.parametrize("text", ["9999-12-31T23:59:60Z", "2016-12-31T23:59:61Z", "2016-12-31T23:60:00Z"])
def test_a_second_past_60_or_past_9999_stays_refused(text: str) -> None:
    body = orjson.dumps(status() | {"timestamp": text})
    with pytest.raises(MalformedEvent) as caught:
        normalize(frame(body, webhook_id=None), tenant="t", received_at_ms=1_700_000_000_000)
    assert caught.value.reason == "bad_timestamp"


@pytest.mark.parametrize("sub_type", ["message.RECEIVED", "Message.Received"])
def test_the_inbound_sub_type_is_read_without_regard_to_case_like_the_statuses(sub_type: str) -> None:
    """An upper-case inbound sub-type was read as a status event: dead-lettered (missing_message_id)."""
    body = orjson.dumps(inbound() | {"sub_type": sub_type})
    framed = frame(body, webhook_id=None)
    assert framed.type is EventType.MESSAGE_INBOUND
    assert normalize(framed, tenant="t", received_at_ms=1_700_000_000_000).type is EventType.MESSAGE_INBOUND


@pytest.mark.parametrize("sub_type", ["MESSAGE.DELIVERED", "Message.Delivered", "message.delivered"])
def test_the_status_in_the_sub_type_is_read_without_regard_to_case(sub_type: str) -> None:
    """An upper-case "MESSAGE." prefix was not taken for one: the payload's status ("sent") was routed
    instead of the sub-type's, and without one in the payload the event was dead-lettered (missing_status)."""
    for payload in ({"message_id": "m1", "message_status": "SENT"}, {"message_id": "m1"}):
        body = orjson.dumps({"field": "message", "sub_type": sub_type, "payload": payload})
        event = normalize(frame(body, webhook_id="w"), tenant="t", received_at_ms=1_700_000_000_000)
        assert (event.type, event.status) == (EventType.MESSAGE_STATUS, "delivered")
