"""Hostile bodies the canonical model must refuse at framing: absurd values, wrong JSON types, NUL, huge
sizes, deep nesting. Shared by the unit, contract and ingress tests.

`in_schema` says whether the envelope JSON Schema can refuse it too (the code is the authority: nesting
depth and NUL inside free-form payload fields are beyond what the schema says).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from sentpipe.schemas.events import (
    MAX_DEPTH,
    MAX_ID_LENGTH,
    MAX_LABEL_LENGTH,
    MAX_STATUS_LENGTH,
    MAX_TEXT_LENGTH,
    MAX_TYPE_LENGTH,
)


@dataclass(frozen=True)
class Hostile:
    name: str
    body: bytes
    reason: str
    in_schema: bool = True


def nest(levels: int) -> Any:
    """A value made of `levels` containers nested in one another (0: a plain number)."""
    value: Any = 1
    for i in range(levels):
        value = {"k": value} if i % 2 else [value]
    return value


def status(**payload: Any) -> dict[str, Any]:
    return {
        "field": "message",
        "sub_type": "message.delivered",
        "timestamp": "2026-01-01T00:00:00Z",
        "payload": {"message_id": "m-1", **payload},
    }


def inbound(**payload: Any) -> dict[str, Any]:
    return {"field": "message", "sub_type": "message.received", "payload": {"text": "hi", **payload}}


def template(**payload: Any) -> dict[str, Any]:
    return {"field": "templates", "payload": {"template_id": "t-1", "status": "APPROVED", **payload}}


def guide(type_: str = "message.inbound.received", **envelope: Any) -> dict[str, Any]:
    return {"id": "evt_1", "event": {"type": type_}, "data": {}, **envelope}


def _h(name: str, doc: dict[str, Any] | bytes, reason: str, in_schema: bool = True) -> Hostile:
    return Hostile(name, doc if isinstance(doc, bytes) else orjson.dumps(doc), reason, in_schema)


TOO_LONG_ID = "x" * (MAX_ID_LENGTH + 1)

HOSTILE: list[Hostile] = [
    # timestamps: absurd, wrongly typed, outside 1970..9999
    _h("ts_1e20", {**status(), "timestamp": 1e20}, "bad_timestamp"),
    _h("ts_minus_1e15", {**status(), "timestamp": -1e15}, "bad_timestamp"),
    _h("ts_u64_max", {**status(), "timestamp": 2**64 - 1}, "bad_timestamp"),
    _h("ts_five_digit_year", {**status(), "timestamp": "99999-01-01"}, "bad_timestamp"),
    _h("ts_year_1", {**status(), "timestamp": "0001-01-01T00:00:00Z"}, "bad_timestamp"),
    # The schema takes a 1969 year (it cannot convert zones: 1969 west of UTC can be 1970).
    _h("ts_before_1970", {**status(), "timestamp": "1969-12-31T23:59:59Z"}, "bad_timestamp", False),
    _h("ts_before_1969", {**status(), "timestamp": "1968-12-31T23:59:59-12:00"}, "bad_timestamp"),
    _h("ts_past_9999_in_utc", {**status(), "timestamp": "9999-12-31T23:59:59-05:00"}, "bad_timestamp", False),
    _h("ts_not_iso", {**status(), "timestamp": "yesterday"}, "bad_timestamp"),
    _h("ts_huge_string", {**status(), "timestamp": "2026-01-01T00:00:00" + "0" * 10_000}, "bad_timestamp"),
    _h("ts_boolean", {**status(), "timestamp": True}, "bad_timestamp"),
    _h("ts_object", {**status(), "timestamp": {"s": 1}}, "bad_timestamp"),
    _h("guide_created_at_1e20", guide(created_at=1e20), "bad_timestamp"),
    _h("guide_occurred_at_list", guide(occurred_at=[2026]), "bad_timestamp"),
    _h(
        "guide_data_timestamp",
        {**guide("message.status.updated"), "data": {"message_id": "m", "status": "sent", "timestamp": -1}},
        "bad_timestamp",
    ),
    _h(
        "guide_data_occurred_at",
        {
            **guide("template.approval.updated"),
            "data": {"template_id": "t", "status": "x", "occurred_at": "99999"},
        },
        "bad_timestamp",
    ),
    # nesting
    _h("deep_payload", {**status(), "payload": {"message_id": "m", "x": nest(MAX_DEPTH)}}, "too_deep", False),
    _h("deep_unrouted", {"field": "accounts", "payload": nest(MAX_DEPTH + 5)}, "too_deep", False),
    _h(
        "deeper_than_orjson",
        b'{"field":"message","payload":' + b"[" * 2000 + b"]" * 2000 + b"}",
        "too_deep",
        False,
    ),
    # NUL, in keys and values, named fields and free-form ones
    _h("nul_message_id", status(message_id="m\u0000"), "nul_character"),
    _h("nul_text", inbound(text="a\u0000b"), "nul_character"),
    _h("nul_nested_value", status(extra={"deep": ["ok", "a\u0000"]}), "nul_character", False),
    _h("nul_key", status(**{"we\u0000ird": 1}), "nul_character", False),
    _h("nul_unrouted", {"field": "accounts", "payload": {"x": "\u0000"}}, "nul_character", False),
    # ids: wrong JSON type, too long
    _h("event_id_true", guide(id=True), "bad_event_id"),
    _h("event_id_float", guide(id=1.5), "bad_event_id"),
    _h("event_id_list", guide(id=["evt"]), "bad_event_id"),
    _h("event_id_object", guide(id={"v": 1}), "bad_event_id"),
    _h("event_id_too_long", guide(id=TOO_LONG_ID), "bad_event_id"),
    _h("message_id_true", status(message_id=True), "bad_message_id"),
    _h("message_id_float", status(message_id=3.5), "bad_message_id"),
    # JSON Schema's "integer" includes 3.0 (a number with no fraction); the code refuses any float.
    _h("message_id_integral_float", status(message_id=3.0), "bad_message_id", False),
    _h("message_id_too_long", status(message_id=TOO_LONG_ID), "bad_message_id"),
    # Integers beyond 64 bits are read as numbers (orjson's float, the exact read's Decimal): refused, as the
    # schema says. orjson cannot write them, hence the bytes.
    _h(
        "message_id_beyond_64_bits",
        orjson.dumps(status(message_id="M")).replace(b'"M"', str(2**64).encode()),
        "bad_message_id",
    ),
    _h(
        "event_id_below_64_bits",
        orjson.dumps(guide(id="E")).replace(b'"E"', str(-(2**64)).encode()),
        "bad_event_id",
    ),
    _h("template_id_object", template(template_id={"id": 1}), "bad_template_id"),
    _h("template_id_too_long", template(template_id=TOO_LONG_ID), "bad_template_id"),
    _h("status_template_id_list", status(template_id=["t"]), "bad_template_id"),
    # statuses and type names
    _h("template_status_integer", template(status=5), "bad_status"),
    _h("template_status_too_long", template(status="A" * (MAX_STATUS_LENGTH + 1)), "bad_status"),
    _h("message_status_list", status(message_status=["DELIVERED"]), "bad_status"),
    _h(
        "sub_type_status_too_long",
        {**status(), "sub_type": "message." + "x" * (MAX_STATUS_LENGTH + 1)},
        "bad_status",
    ),
    _h("sub_type_integer", {**status(), "sub_type": 7}, "bad_sub_type"),
    _h("field_too_long", {"field": "f" * (MAX_TYPE_LENGTH + 1), "payload": {}}, "bad_type"),
    # a type name given but not a string is a wrong type, not a body without an envelope
    _h("field_list", {"field": ["message"], "payload": {}}, "bad_type"),
    _h("field_number", {"field": 1, "payload": {}}, "bad_type"),
    _h("event_type_integer", {"id": "evt_1", "event": {"type": 5}, "data": {}}, "bad_type"),
    _h("event_a_string", {"id": "evt_1", "event": "message.inbound.received", "data": {}}, "bad_type"),
    _h("guide_type_object", {"id": "evt_1", "type": {"name": "x"}, "data": {}}, "bad_type"),
    # text bound for PostgreSQL columns
    _h("inbound_text_integer", inbound(text=5), "bad_field"),
    _h("inbound_text_too_long", inbound(text="t" * (MAX_TEXT_LENGTH + 1)), "bad_field"),
    _h("inbound_from_list", inbound(**{"from": ["+1"]}), "bad_field"),
    _h("inbound_to_float", inbound(to=1.5), "bad_field"),
    _h("inbound_channel_object", inbound(channel={"name": "sms"}), "bad_field"),
    _h("inbound_provider_true", inbound(provider=True), "bad_field"),
    _h("inbound_provider_too_long", inbound(provider="p" * (MAX_LABEL_LENGTH + 1)), "bad_field"),
    _h("template_name_integer", template(template_name=5), "bad_field"),
    _h("template_reason_list", template(reason=["INVALID_FORMAT"]), "bad_field"),
    # a routed payload that is not an object
    _h("payload_list", {**status(), "payload": [1]}, "bad_payload"),
    # a number no Decimal holds: a 500 with a traceback
    _h("exponent_19_digits", b'{"field":"message","payload":{"x":1e' + b"9" * 19 + b"}}", "not_json", False),
]
