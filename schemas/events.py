"""Framing and normalization of Sent's two envelope shapes into the canonical event.

This module is the single implementation of "what is this event": the ingress uses `frame` to derive
the event id and type, and routing (worker, replay, redrive) uses `normalize` for the canonical event.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal

import orjson

EventIdSource = Literal["auto", "body", "header", "content"]


class EventType(StrEnum):
    MESSAGE_STATUS = "message.status.updated"
    MESSAGE_INBOUND = "message.inbound.received"
    TEMPLATE_APPROVAL = "template.approval.updated"
    UNROUTED = "unrouted"


ROUTED_TYPES = (EventType.MESSAGE_STATUS, EventType.MESSAGE_INBOUND, EventType.TEMPLATE_APPROVAL)

# Outbound message status rank: a lower rank never overwrites a higher one (DESIGN "Ordering").
STATUS_RANK = {"queued": 0, "routed": 1, "sent": 2, "failed": 3, "delivered": 4, "read": 5}


class MalformedEvent(Exception):
    """A body that can never be processed (a permanent failure): goes to the DLQ with `reason`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Framed:
    event_id: str
    type: EventType
    sub_type: str | None
    shape: Literal["sent", "guide"]
    doc: dict[str, Any]


@dataclass(frozen=True, slots=True)
class CanonicalEvent:
    id: str
    type: EventType
    tenant: str
    occurred_at: datetime
    received_at_ms: int
    sub_type: str | None
    shape: str
    subject: str  # the entity whose order matters: message id, template id, or the event id
    status: str | None  # lower-case status for messages and templates
    data: dict[str, Any]

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "id": self.id,
                "type": self.type.value,
                "tenant": self.tenant,
                "occurred_at": self.occurred_at.isoformat().replace("+00:00", "Z"),
                "received_at": self.received_at_ms,
                "sub_type": self.sub_type,
                "shape": self.shape,
                "subject": self.subject,
                "status": self.status,
                "data": self.data,
            }
        )

    @classmethod
    def from_json(cls, value: bytes) -> CanonicalEvent:
        d = orjson.loads(value)
        return cls(
            id=d["id"],
            type=EventType(d["type"]),
            tenant=d["tenant"],
            occurred_at=datetime.fromisoformat(d["occurred_at"]),
            received_at_ms=int(d["received_at"]),
            sub_type=d.get("sub_type"),
            shape=d.get("shape", "sent"),
            subject=d["subject"],
            status=d.get("status"),
            data=d.get("data") or {},
        )


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _classify(doc: dict[str, Any]) -> tuple[EventType, str | None, Literal["sent", "guide"]]:
    field = doc.get("field")
    if isinstance(field, str):
        sub_type = doc.get("sub_type")
        sub = sub_type if isinstance(sub_type, str) else None
        if field in ("message", "messages"):
            if sub == "message.received":
                return EventType.MESSAGE_INBOUND, sub, "sent"
            return EventType.MESSAGE_STATUS, sub, "sent"
        if field in ("template", "templates"):
            return EventType.TEMPLATE_APPROVAL, sub, "sent"
        return EventType.UNROUTED, sub, "sent"
    event = doc.get("event")
    if isinstance(event, dict) and isinstance(event.get("type"), str):
        try:
            return EventType(event["type"]), event["type"], "guide"
        except ValueError:
            return EventType.UNROUTED, event["type"], "guide"
    if isinstance(doc.get("type"), str):
        try:
            return EventType(doc["type"]), doc["type"], "guide"
        except ValueError:
            return EventType.UNROUTED, doc["type"], "guide"
    raise MalformedEvent("no_envelope", "body has neither Sent's 'field' nor the guide's 'event.type'")


def frame(body: bytes, *, webhook_id: str | None, id_source: EventIdSource = "auto") -> Framed:
    """Parse a raw body just enough to key and type it; raises MalformedEvent."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise MalformedEvent("not_json", "body is not valid JSON") from None
    if not isinstance(doc, dict):
        raise MalformedEvent("not_an_object", "body is JSON but not an object")
    type_, sub_type, shape = _classify(doc)
    return Framed(_event_id(doc, body, webhook_id, id_source), type_, sub_type, shape, doc)


def _event_id(doc: dict[str, Any], body: bytes, webhook_id: str | None, source: EventIdSource) -> str:
    if source == "auto":
        envelope_id = doc.get("id")
        if isinstance(envelope_id, str | int) and str(envelope_id):
            return str(envelope_id)
        return _sha256(body)  # Sent retries with the identical body
    if source == "body":
        return _sha256(body)
    if source == "header":
        if not webhook_id:
            raise MalformedEvent("missing_event_id", "event id source is 'header' but x-webhook-id is empty")
        return webhook_id
    # "content": stable across a re-serialization of the same event (key order, whitespace).
    return _sha256(orjson.dumps(doc, option=orjson.OPT_SORT_KEYS))


def parse_time(value: object) -> datetime | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = value / 1000 if value > 1e11 else value
        return datetime.fromtimestamp(seconds, UTC)
    if isinstance(value, str) and value:
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return None


def _text(d: dict[str, Any], *names: str) -> str | None:
    for name in names:
        v = d.get(name)
        if isinstance(v, str) and v:
            return v
        if isinstance(v, int) and not isinstance(v, bool):
            return str(v)
    return None


def normalize(framed: Framed, *, tenant: str, received_at_ms: int) -> CanonicalEvent:
    """The canonical event for a framed body; raises MalformedEvent when a routed type lacks its keys."""
    doc = framed.doc
    if framed.shape == "sent":
        data = doc.get("payload")
        occurred = parse_time(doc.get("timestamp"))
    else:
        data = doc.get("data")
        occurred = parse_time(doc.get("created_at") or doc.get("timestamp") or doc.get("occurred_at"))
        if isinstance(data, dict) and occurred is None:
            occurred = parse_time(data.get("timestamp") or data.get("occurred_at"))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise MalformedEvent("bad_payload", "event payload is not an object")
    received = datetime.fromtimestamp(received_at_ms / 1000, UTC)
    occurred_at = occurred or received

    subject = framed.event_id
    status: str | None = None
    if framed.type is EventType.MESSAGE_STATUS:
        message_id = _text(data, "message_id", "messageId", "id")
        if message_id is None:
            raise MalformedEvent("missing_message_id", "message status event without a message id")
        subject = message_id
        if framed.shape == "sent" and framed.sub_type and framed.sub_type.startswith("message."):
            status = framed.sub_type.removeprefix("message.")
        else:
            status = _text(data, "message_status", "status")
        if status is None:
            raise MalformedEvent("missing_status", "message status event without a status")
        status = status.lower()
    elif framed.type is EventType.TEMPLATE_APPROVAL:
        template_id = _text(data, "template_id", "templateId", "id")
        if template_id is None:
            raise MalformedEvent("missing_template_id", "template event without a template id")
        subject = template_id
        found = _text(data, "status")
        if found is None:
            raise MalformedEvent("missing_status", "template event without a status")
        status = found.lower()

    return CanonicalEvent(
        id=framed.event_id,
        type=framed.type,
        tenant=tenant,
        occurred_at=occurred_at,
        received_at_ms=received_at_ms,
        sub_type=framed.sub_type,
        shape=framed.shape,
        subject=subject,
        status=status,
        data=data,
    )
