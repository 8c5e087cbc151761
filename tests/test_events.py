"""Framing, event ids, normalization and routing: pure logic, no services."""

from __future__ import annotations

import hashlib

import orjson
import pytest

from sentpipe.schemas.events import EventType, MalformedEvent, frame, normalize
from sentpipe.schemas.routing import H_RECEIVED_AT, H_TENANT, route
from sentpipe.schemas.samples import SampleFactory
from sentpipe.schemas.topics import Topics

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
    from sentpipe.schemas.events import CanonicalEvent

    assert CanonicalEvent.from_json(r.value) == r.event
