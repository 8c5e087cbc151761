"""Framing and normalization of Sent's two envelope shapes into the canonical event.

This module is the single implementation of "what is this event": the ingress uses `frame` to derive
the event id and type, and routing (worker, replay, redrive) uses `normalize` for the canonical event.

The canonical model refuses what it cannot represent. `frame` checks every value the model will read, so
such a body is dead-lettered at the ingress instead of crashing a worker:

- the whole body: nesting deeper than `MAX_DEPTH`, or NUL (U+0000) in any key or string (PostgreSQL's
  text and jsonb refuse it);
- timestamps outside 1970-01-01T00:00:00Z..9999-12-31T23:59:59.999999Z, of the wrong JSON type, or not
  ISO-8601; a number above `MS_THRESHOLD` is epoch milliseconds, otherwise epoch seconds;
- ids (the envelope `id`, message and template ids): a string of at most `MAX_ID_LENGTH` characters or
  an integer; true/false, floats, lists and objects are refused, never replaced by a fallback
  (`normalize` holds the tenant and the event id it is given to the same limit);
- statuses and type names: strings of at most `MAX_STATUS_LENGTH` / `MAX_TYPE_LENGTH` characters;
- the text fields bound for PostgreSQL columns: strings (addresses may also be integers) within their
  limits. A wrongly typed one is refused rather than stored as null, because the payload is kept verbatim
  as jsonb and a column silently disagreeing with it would be a quiet loss; the DLQ keeps it redrivable.

A field that is absent, null or "" is "not given", and so is an id or a status that is only whitespace
(nothing could be looked up by it): only then do fallbacks apply (event id from the body hash,
occurred_at from received_at). Missing required keys (a message event without a message id or a
status, a template event without an id or a status) are not the framing's business: `normalize` refuses
them, so they are dead-lettered by the router, as before. `CanonicalEvent.from_json` is a tolerant but
safe reader of routed records (see there). `schemas/contract.py` generates JSON Schema from the limits
and field tables below; this module stays the authority.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from typing import Any, Literal, NamedTuple

import orjson

from sentpipe.schemas import exact_json

EventIdSource = Literal["auto", "body", "header", "content"]


class EventType(StrEnum):
    MESSAGE_STATUS = "message.status.updated"
    MESSAGE_INBOUND = "message.inbound.received"
    TEMPLATE_APPROVAL = "template.approval.updated"
    UNROUTED = "unrouted"


ROUTED_TYPES = (EventType.MESSAGE_STATUS, EventType.MESSAGE_INBOUND, EventType.TEMPLATE_APPROVAL)

# Outbound message status rank: a lower rank never overwrites a higher one (Sent does not keep order).
STATUS_RANK = {"queued": 0, "routed": 1, "sent": 2, "failed": 3, "delivered": 4, "read": 5}

# --- the limits of the canonical model: one place, also read by the JSON Schema generator ---------------
# Containers nested in one another, the body itself being level 1. Sent's envelope uses 2 or 3; orjson
# refuses to write beyond 255 (CanonicalEvent.to_json would crash) and to read beyond 1024.
MAX_DEPTH = 32
# Event, message and template ids and the tenant: Kafka keys and primary-key columns. 256 characters are
# at most 1 KiB of UTF-8, so (tenant, id) stays under PostgreSQL's btree entry limit of about 2.7 KB, and
# far above any id seen (UUIDs, evt_ + 32 hex, SHA-256 hex).
MAX_ID_LENGTH = 256
# A status ("delivered", "APPROVED"): a short code, ranked and compared.
MAX_STATUS_LENGTH = 64
# Envelope type names: Sent's `field` and `sub_type`, the guide's `event.type`.
MAX_TYPE_LENGTH = 128
# Short text columns: inbound from/to (phone numbers, WhatsApp or RCS ids), channel, provider, template
# name (WhatsApp allows 512).
MAX_LABEL_LENGTH = 512
# Free text columns: the inbound message text (WhatsApp allows 4096) and a template's rejection reason.
MAX_TEXT_LENGTH = 65_536
# An ISO-8601 time string ("2025-10-31T10:10:42.123456+05:30" is 32).
MAX_TIMESTAMP_LENGTH = 64
# A numeric timestamp above this is epoch milliseconds (1e11 s is the year 5138; 1e11 ms is 1973).
MS_THRESHOLD = 1e11
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# The last representable instant: 9999-12-31T23:59:59.999Z as epoch milliseconds (numeric timestamps
# must stay below MAX_EPOCH_MS + 1; see `parse_timestamp`).
MAX_EPOCH_MS = 253_402_300_799_999

# Reason codes a MalformedEvent carries (a bounded set: they label metrics and DLQ records).
REASONS = (
    "not_json",
    "not_an_object",
    "no_envelope",
    "too_deep",
    "nul_character",
    "bad_type",
    "bad_sub_type",
    "bad_event_id",
    "missing_event_id",
    "bad_message_id",
    "bad_template_id",
    "bad_tenant",
    "bad_status",
    "bad_timestamp",
    "bad_received_at",
    "bad_field",
    "bad_payload",
    "missing_message_id",
    "missing_template_id",
    "missing_status",
    "bad_canonical_event",
)


class MalformedEvent(ValueError):
    """A body that can never be processed (a permanent failure): goes to the DLQ with `reason`.

    `reason` is one of `REASONS`; `detail` names the field and the limit, never the offending value. A
    ValueError, so callers that treat bad input as ValueError (e.g. around `CanonicalEvent.from_json`)
    catch it too.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class Framed(NamedTuple):  # a tuple: one per request at the ingress; a frozen dataclass costs 3x to build
    event_id: str
    type: EventType
    sub_type: str | None
    shape: Literal["sent", "guide"]
    doc: dict[str, Any]
    # The checked values `normalize` builds the event from: read once by `frame`, not again by `normalize`
    # (which reads `doc` itself for a Framed made without them).
    read: Read | None = None


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
        return exact_json.dumps(
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
        """The event `to_json` wrote; raises MalformedEvent (a ValueError) for anything else.

        A tolerant reader that is still safe: every field gets its declared Python type, the times are
        within 1970..9999 and `data` is an object nested at most MAX_DEPTH deep (so `to_json` can write it
        again), or the record is refused. What only PostgreSQL refuses (NUL, oversized ids) is left to the
        database, whose SQLSTATE 22/54 errors dead-letter the one record: a record written by an older or
        buggy router still reaches that backstop instead of vanishing here.
        """
        d = _load_object(value, nul=False)
        type_name = d.get("type")
        if type_name not in _ROUTED_NAMES:
            raise MalformedEvent("bad_canonical_event", "'type' is not a routed event type")
        occurred_text = d.get("occurred_at")
        if not isinstance(occurred_text, str) or not occurred_text:
            raise MalformedEvent("bad_canonical_event", "'occurred_at' is not an ISO-8601 string")
        occurred_at = parse_timestamp(occurred_text, "occurred_at")
        if occurred_at is None:  # unreachable for a non-empty string; keeps the type narrow
            raise MalformedEvent("bad_canonical_event", "'occurred_at' is empty")
        shape = d.get("shape", "sent")
        if shape not in ("sent", "guide"):
            raise MalformedEvent("bad_canonical_event", "'shape' is neither 'sent' nor 'guide'")
        data = d.get("data")
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise MalformedEvent("bad_payload", "'data' is not an object")
        return cls(
            id=_nonempty(d.get("id"), "id"),
            type=EventType(type_name),
            tenant=_nonempty(d.get("tenant"), "tenant"),
            occurred_at=occurred_at,
            received_at_ms=_received_at(d.get("received_at")),
            sub_type=_optional_str(d.get("sub_type"), "sub_type"),
            shape=shape,
            subject=_nonempty(d.get("subject"), "subject"),
            status=_optional_str(d.get("status"), "status"),
            data=data,
        )


def searched_id_problem(value: str) -> str | None:
    """Why no event, message or tenant can have this id a person searches for (None: one may), so the CLI
    and the console refuse it before reading a topic or a table."""
    if not value.strip():
        return "is empty"
    if "\x00" in value:
        return "must not contain NUL characters"  # nor can PostgreSQL text
    if len(value) > MAX_ID_LENGTH:
        return f"is longer than {MAX_ID_LENGTH} characters, so nothing matches it"
    return None


def _nonempty(value: object, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise MalformedEvent("bad_canonical_event", f"{where!r} must be a non-empty string")
    return value


def _optional_str(value: object, where: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise MalformedEvent("bad_canonical_event", f"{where!r} must be a string or null")
    return value


_ROUTED_NAMES = frozenset(t.value for t in ROUTED_TYPES)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _kind(value: object) -> str:
    """The JSON type of a parsed value, for messages (never the value itself)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float | Decimal):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


# --- the whole document -------------------------------------------------------------------------------
def _load_object(body: bytes, *, nul: bool = True, exact: bool = True) -> dict[str, Any]:
    try:
        doc = exact_json.loads(body, exact=exact)
    except orjson.JSONDecodeError as exc:
        if "depth" in str(exc) or "recursion" in str(exc):
            raise MalformedEvent("too_deep", f"body nests deeper than {MAX_DEPTH} levels") from None
        # Valid JSON: "not valid JSON" would send people looking for a typo.
        if "beyond what can be held" in str(exc):
            detail = "body has a number no decimal holds (an exponent beyond 10^18 in size)"
            raise MalformedEvent("not_json", detail) from None
        raise MalformedEvent("not_json", "body is not valid JSON") from None
    if not isinstance(doc, dict):
        raise MalformedEvent("not_an_object", "body is JSON but not an object")
    check_structure(doc, body, nul=nul)
    return doc


def check_structure(doc: object, raw: bytes | None = None, *, nul: bool = True) -> None:
    """Refuse nesting deeper than MAX_DEPTH and (unless `nul` is false) NUL in any key or string.

    Iterative, never recursive. With the raw JSON at hand the walk is skipped when it cannot find anything:
    fewer opening brackets than the limit, and no escaped NUL (the only way JSON can carry one).
    """
    # Every request's path at the ingress: a backslash, searched with memchr, is rare in a webhook; only
    # then is the six-byte escape searched for (a slower search).
    nul_free = not nul or (raw is not None and (b"\\" not in raw or b"\\u0000" not in raw))
    if raw is not None and nul_free and raw.count(b"{") + raw.count(b"[") <= MAX_DEPTH:
        return
    stack: list[tuple[object, int]] = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            values: Any = node.values()
            if not nul_free:
                for key in node:
                    if "\x00" in key:
                        raise MalformedEvent("nul_character", "a key contains NUL (U+0000)")
        elif isinstance(node, list):
            values = node
        else:
            continue
        if depth > MAX_DEPTH:
            raise MalformedEvent("too_deep", f"body nests deeper than {MAX_DEPTH} levels")
        for v in values:
            if isinstance(v, dict | list):
                stack.append((v, depth + 1))
            elif not nul_free and isinstance(v, str) and "\x00" in v:
                raise MalformedEvent("nul_character", "a string contains NUL (U+0000)")


# --- single values ------------------------------------------------------------------------------------
# What a field holds. Strings: (integers allowed too, longest length in characters). "time" is a number
# (epoch seconds, or milliseconds above MS_THRESHOLD) or an ISO-8601 string, within 1970..9999.
Kind = Literal["id", "address", "label", "text", "status", "type", "time"]
STRING_KINDS: dict[str, tuple[bool, int]] = {
    "id": (True, MAX_ID_LENGTH),
    "address": (True, MAX_LABEL_LENGTH),
    "label": (False, MAX_LABEL_LENGTH),
    "text": (False, MAX_TEXT_LENGTH),
    "status": (False, MAX_STATUS_LENGTH),
    "type": (False, MAX_TYPE_LENGTH),
}


_STRING_LIMITS = {kind: limit for kind, (_, limit) in STRING_KINDS.items()}


class FieldSpec(NamedTuple):
    """One field the model reads: its JSON name, what it holds, the reason code when it is wrong."""

    name: str
    kind: Kind
    reason: str
    where: str  # how messages name it


# A blank id or status is not given, like "": nothing could be looked up by it (the CLI and the console
# refuse to search for one), and as a key it would merge unrelated events.
_BLANK_IS_ABSENT = frozenset({"id", "status"})


def _string(value: object, where: str, reason: str, kind: str) -> str | None:
    """A string (or integer, for ids and addresses) within the kind's length; None when not given."""
    if (
        type(value) is str
        and 0 < len(value) <= _STRING_LIMITS[kind]
        and "\x00" not in value
        and not (value.isspace() and kind in _BLANK_IS_ABSENT)
    ):
        return value  # the usual case, decided before anything else: several calls per request
    if value is None or value == "" or (type(value) is str and value.isspace() and kind in _BLANK_IS_ABSENT):
        return None
    integer_ok, limit = STRING_KINDS[kind]
    if isinstance(value, str):
        text = value
    elif integer_ok and isinstance(value, int) and not isinstance(value, bool):
        text = str(value)
    else:
        # An integer beyond 64 bits is read as a number (a float, or a Decimal), never as an int.
        wanted = "a string or a 64-bit integer" if integer_ok else "a string"
        raise MalformedEvent(reason, f"{where} must be {wanted}, not {_kind(value)}")
    if len(text) > limit:
        raise MalformedEvent(reason, f"{where} is longer than {limit} characters")
    if "\x00" in text:
        raise MalformedEvent("nul_character", f"{where} contains NUL (U+0000)")
    return text


def _id(value: object, where: str, reason: str) -> str | None:
    return _string(value, where, reason, "id")


def _required_id(value: object, where: str, reason: str) -> str:
    found = _id(value, where, reason)
    if found is None or not isinstance(value, str):
        raise MalformedEvent(reason, f"{where} must be a non-empty string")
    return found


def required_id(value: object, where: str, reason: str) -> str:
    """An id: a string (or integer) of at most MAX_ID_LENGTH characters, no NUL; else MalformedEvent."""
    return _required_id(value, where, reason)


def _status(value: object, where: str) -> str | None:
    return _string(value, where, "bad_status", "status")


def _type_name(value: object, where: str, reason: str) -> str | None:
    return _string(value, where, reason, "type")


def _received_at(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_EPOCH_MS:
        raise MalformedEvent(
            "bad_received_at", "received_at must be integer epoch milliseconds within 1970..9999"
        )
    return value


def parse_timestamp(value: object, where: str = "timestamp") -> datetime | None:
    """A timestamp as an aware UTC datetime; None when not given (absent, null or "").

    Numbers are epoch seconds, or milliseconds above MS_THRESHOLD; strings are ISO-8601 (no zone: UTC).
    Raises MalformedEvent("bad_timestamp") for any other type, an unparseable string, or an instant
    outside 1970-01-01T00:00:00Z..9999-12-31T23:59:59.999999Z.
    """
    if value is None or value == "":
        return None
    if type(value) is str:  # the usual case first: Sent sends ISO-8601 strings
        return _iso_timestamp(value, where)
    if isinstance(value, Decimal):  # digits a double cannot hold: beyond a microsecond, or out of range
        value = float(value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        # Compared before any arithmetic: an int beyond a float's range must not reach the division.
        if not (isinstance(value, int) or math.isfinite(value)) or not 0 <= value <= MAX_EPOCH_MS:
            raise MalformedEvent("bad_timestamp", f"{where} is outside 1970-01-01..9999-12-31")
        try:
            if isinstance(value, int):  # exact, no float rounding
                return EPOCH + (
                    timedelta(milliseconds=value) if value > MS_THRESHOLD else timedelta(seconds=value)
                )
            return datetime.fromtimestamp(value / 1000 if value > MS_THRESHOLD else value, UTC)
        except (OverflowError, OSError, ValueError):
            raise MalformedEvent("bad_timestamp", f"{where} is outside 1970-01-01..9999-12-31") from None
    if not isinstance(value, str):
        raise MalformedEvent("bad_timestamp", f"{where} must be a number or an ISO-8601 string")
    return _iso_timestamp(value, where)


def _rfc3339(value: str) -> datetime:
    """`fromisoformat`, plus what RFC 3339 allows and Python 3.11 refuses: a lower-case "z", and second 60
    (read as the next minute's first second, as PostgreSQL reads it)."""
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        text = value[:-1] + "Z" if value.endswith("z") else value
        if text[16:19] == ":60":
            return datetime.fromisoformat(text[:17] + "59" + text[19:]) + timedelta(seconds=1)
        return datetime.fromisoformat(text)


def _iso_timestamp(value: str, where: str) -> datetime:
    if len(value) > MAX_TIMESTAMP_LENGTH:
        raise MalformedEvent("bad_timestamp", f"{where} is longer than {MAX_TIMESTAMP_LENGTH} characters")
    try:
        parsed = _rfc3339(value)
        zone = parsed.tzinfo
        if zone is None:
            parsed = parsed.replace(tzinfo=UTC)
        elif zone is not UTC:  # "Z" and "+00:00" parse to UTC itself: nothing to convert
            parsed = parsed.astimezone(UTC)
    except (OverflowError, ValueError):
        raise MalformedEvent("bad_timestamp", f"{where} is not an ISO-8601 time within 1970..9999") from None
    if parsed < EPOCH:
        raise MalformedEvent("bad_timestamp", f"{where} is outside 1970-01-01..9999-12-31")
    return parsed


def parse_time(value: object) -> datetime | None:
    """Lenient `parse_timestamp` for user input (CLI bounds): None instead of an error."""
    try:
        return parse_timestamp(value)
    except MalformedEvent:
        return None


# What `_read` takes from a table: the first given value among a role's aliases (in lookup order).
_TIME, _SUBJECT, _STATUS = "time", "subject", "status"


class _Fields(NamedTuple):
    """A field table as the per-request check reads it, in table order: each field's name, spec, longest
    length (0 for a time) and role (`_TIME`, `_SUBJECT`, `_STATUS` or None)."""

    entries: tuple[tuple[str, FieldSpec, int, str | None], ...]


def _compiled(specs: tuple[FieldSpec, ...], roles: dict[str, tuple[str, ...]]) -> _Fields:
    names = [spec.name for spec in specs]
    assert len(set(names)) == len(names), "a field table names a field twice"
    role_of: dict[str, str] = {}
    for role, aliases in roles.items():
        # The first given in table order must be the first given in lookup order.
        assert [n for n in names if n in aliases] == list(aliases), f"{role}: {aliases} out of table order"
        role_of.update(dict.fromkeys(aliases, role))
    return _Fields(
        tuple(
            (spec.name, spec, 0 if spec.kind == "time" else _STRING_LIMITS[spec.kind], role_of.get(spec.name))
            for spec in specs
        )
    )


def _check_fields(d: dict[str, Any], fields: _Fields) -> dict[str, Any]:
    """Check every given field of a table in `d`; the first checked value (str or datetime) of each role."""
    found: dict[str, Any] = {}
    checked: Any
    # In table order, so the first wrong one in the table is the one reported; an absent name costs one
    # membership test (a body has a few of a table's names).
    for name, spec, limit, role in fields.entries:
        if name not in d:
            continue
        value = d[name]
        if value is None or value == "":
            continue
        if not limit:  # a time; an ISO string, the usual case, straight to its parser
            checked = (
                _iso_timestamp(value, spec.where)
                if type(value) is str
                else parse_timestamp(value, spec.where)
            )
        elif type(value) is str and len(value) <= limit and "\x00" not in value and not value.isspace():
            checked = value  # the usual case, decided inline: exactly what _string returns for it
        else:
            checked = _string(value, spec.where, spec.reason, spec.kind)
        if role is not None and role not in found and checked is not None:
            found[role] = checked
    return found


# --- the envelope and the payloads (the JSON Schema contract is generated from these tables) -----------
def _f(name: str, kind: Kind, reason: str, prefix: str = "payload field ") -> FieldSpec:
    return FieldSpec(name, kind, reason, f"{prefix}{name!r}")


def _times(*names: str, prefix: str = "payload field ") -> tuple[FieldSpec, ...]:
    return tuple(_f(n, "time", "bad_timestamp", prefix) for n in names)


# The envelope fields read besides the type: every one given is checked; the first time given is
# occurred_at. (`field`, `sub_type`, `event.type` and the guide's top-level `type` are read by _classify.)
SENT_ENVELOPE_FIELDS = (_f("id", "id", "bad_event_id", ""), *_times("timestamp", prefix=""))
GUIDE_ENVELOPE_FIELDS = (
    _f("id", "id", "bad_event_id", ""),
    *_times("created_at", "timestamp", "occurred_at", prefix=""),
)
SENT_TIME_FIELDS = ("timestamp",)
GUIDE_TIME_FIELDS = ("created_at", "timestamp", "occurred_at")
# The guide's fallback inside `data` when its envelope has no time. Sent's envelope always carries its
# `timestamp`, so a Sent payload's times (and an inbound message's `received_at`) are never read.
PAYLOAD_TIME_FIELDS = ("timestamp", "occurred_at")
# The entity id and status of a routed type: aliases in the order they are looked up.
MESSAGE_ID_FIELDS = ("message_id", "messageId", "id")
TEMPLATE_ID_FIELDS = ("template_id", "templateId", "id")
ENTITY_ID_FIELDS: dict[EventType, tuple[str, ...]] = {
    EventType.MESSAGE_STATUS: MESSAGE_ID_FIELDS,
    EventType.TEMPLATE_APPROVAL: TEMPLATE_ID_FIELDS,
}
STATUS_FIELDS: dict[EventType, tuple[str, ...]] = {
    EventType.MESSAGE_STATUS: ("message_status", "status"),
    EventType.TEMPLATE_APPROVAL: ("status",),
}
# Every payload field of a routed type that the model or the projections read, checked when given; any
# other field is kept as sent and never checked (Sent adds fields: one the model does not read, in a form it
# would refuse, must not dead-letter every event of its type). Text bound for PostgreSQL columns is refused
# when wrongly typed ("bad_field"), never nulled: see above.
PAYLOAD_FIELDS: dict[EventType, tuple[FieldSpec, ...]] = {
    EventType.MESSAGE_STATUS: (
        *(_f(n, "id", "bad_message_id") for n in MESSAGE_ID_FIELDS),
        _f("message_status", "status", "bad_status"),
        _f("status", "status", "bad_status"),
        _f("template_id", "id", "bad_template_id"),
    ),
    EventType.MESSAGE_INBOUND: (
        _f("from", "address", "bad_field"),
        _f("to", "address", "bad_field"),
        _f("text", "text", "bad_field"),
        _f("channel", "label", "bad_field"),
        _f("provider", "label", "bad_field"),
    ),
    EventType.TEMPLATE_APPROVAL: (
        *(_f(n, "id", "bad_template_id") for n in TEMPLATE_ID_FIELDS),
        _f("status", "status", "bad_status"),
        _f("template_name", "label", "bad_field"),
        _f("name", "label", "bad_field"),
        _f("reason", "text", "bad_field"),
    ),
}
# The guide's `data` is read for the event's time too.
GUIDE_PAYLOAD_FIELDS: dict[EventType, tuple[FieldSpec, ...]] = {
    t: (*PAYLOAD_FIELDS[t], *_times(*PAYLOAD_TIME_FIELDS)) for t in PAYLOAD_FIELDS
}


# The guide's type names; a dict, not `EventType(name)` (Python code in the Enum machinery, every request).
_TYPE_BY_NAME = {t.value: t for t in ROUTED_TYPES}


def _classify(doc: dict[str, Any]) -> tuple[EventType, str | None, Literal["sent", "guide"]]:
    field = doc.get("field")
    if isinstance(field, str):
        # The usual names are decided inline; anything else gets _type_name's verdict (or its "not given").
        if not 0 < len(field) <= MAX_TYPE_LENGTH or "\x00" in field:
            _type_name(field, "'field'", "bad_type")
        sub = doc.get("sub_type")
        if type(sub) is not str or not 0 < len(sub) <= MAX_TYPE_LENGTH or "\x00" in sub:
            sub = _type_name(sub, "'sub_type'", "bad_sub_type")
        if field in ("message", "messages"):
            # Case-blind, as the status read from the other sub-types is.
            if sub is not None and sub.lower() == "message.received":
                return EventType.MESSAGE_INBOUND, sub, "sent"
            return EventType.MESSAGE_STATUS, sub, "sent"
        if field in ("template", "templates"):
            return EventType.TEMPLATE_APPROVAL, sub, "sent"
        return EventType.UNROUTED, sub, "sent"
    event = doc.get("event")
    if isinstance(event, dict) and isinstance(event.get("type"), str):
        name = event["type"]
    elif isinstance(doc.get("type"), str):
        name = doc["type"]
    else:
        _wrongly_typed_envelope(field, event, doc.get("type"))
        raise MalformedEvent("no_envelope", "body has neither Sent's 'field' nor the guide's 'event.type'")
    _type_name(name, "the event type", "bad_type")
    return _TYPE_BY_NAME.get(name, EventType.UNROUTED), name, "guide"


def _wrongly_typed_envelope(field: object, event: object, top_type: object) -> None:
    """MalformedEvent("bad_type") for a type name that is given but not a string (`"field": ["message"]`,
    `"event": {"type": 5}`): filed as no_envelope, "body has neither Sent's 'field' nor ...", it sent people
    looking for a key the body has."""
    _type_name(field, "'field'", "bad_type")
    if isinstance(event, dict):
        _type_name(event.get("type"), "'event.type'", "bad_type")
    elif event is not None and event != "":
        raise MalformedEvent("bad_type", f"'event' must be an object, not {_kind(event)}")
    _type_name(top_type, "'type'", "bad_type")


class Read(NamedTuple):  # a tuple: built for every request at the ingress, cheaper than a dataclass
    data: object  # the payload; an object (or absent) for every routed type
    occurred_at: datetime | None
    subject: str | None  # message or template id, when given
    status: str | None  # as given, not lower-cased


# Each routed type's payload tables, compiled once: Sent's `payload` (and a routed event's `data`), the
# guide's `data`.
_BY_TYPE: dict[EventType, _Fields] = {
    t: _compiled(
        PAYLOAD_FIELDS[t], {_SUBJECT: ENTITY_ID_FIELDS.get(t, ()), _STATUS: STATUS_FIELDS.get(t, ())}
    )
    for t in ROUTED_TYPES
}
_GUIDE_BY_TYPE: dict[EventType, _Fields] = {
    t: _compiled(
        GUIDE_PAYLOAD_FIELDS[t],
        {
            _TIME: PAYLOAD_TIME_FIELDS,
            _SUBJECT: ENTITY_ID_FIELDS.get(t, ()),
            _STATUS: STATUS_FIELDS.get(t, ()),
        },
    )
    for t in ROUTED_TYPES
}
_SENT_ENVELOPE = _compiled(SENT_ENVELOPE_FIELDS, {_TIME: SENT_TIME_FIELDS})
_GUIDE_ENVELOPE = _compiled(GUIDE_ENVELOPE_FIELDS, {_TIME: GUIDE_TIME_FIELDS})


def _read(
    doc: dict[str, Any], type_: EventType, sub_type: str | None, shape: Literal["sent", "guide"]
) -> Read:
    """Every value of a framed body that the model reads, checked; values not given are None."""
    if shape == "sent":
        occurred = _check_fields(doc, _SENT_ENVELOPE).get(_TIME)
        data = doc.get("payload")
    else:
        occurred = _check_fields(doc, _GUIDE_ENVELOPE).get(_TIME)
        data = doc.get("data")
    if type_ is EventType.UNROUTED:  # kept as received: its payload is nobody's business yet
        return Read(data, occurred, None, None)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise MalformedEvent("bad_payload", "event payload is not an object")
    found = _check_fields(data, (_BY_TYPE if shape == "sent" else _GUIDE_BY_TYPE)[type_])
    if shape == "guide" and occurred is None:
        occurred = found.get(_TIME)
    status = found.get(_STATUS)
    named = sub_type if type_ is EventType.MESSAGE_STATUS and shape == "sent" else None
    if named and named[:8].lower() == "message.":
        # Sent's sub_type ("message.delivered") names the status; the payload's is the fallback. Case-blind
        # like the inbound check above: "MESSAGE.DELIVERED" routed the payload's "sent" instead.
        status = _status(named[8:], "the status in 'sub_type'") or status
    return Read(data, occurred, found.get(_SUBJECT), status)


def check_payload(type_: EventType, data: object) -> None:
    """The payload checks `frame` applies (PAYLOAD_FIELDS: what the projections read; an event's time is its
    `occurred_at`, never read from `data`), for an event read back from a routed topic that anyone may have
    written: MalformedEvent for a wrongly typed, overlong or NUL-holding field."""
    if not isinstance(data, dict):
        raise MalformedEvent("bad_field", f"data must be an object, not {_kind(data)}")
    fields = _BY_TYPE.get(type_)
    if fields is not None:
        _check_fields(data, fields)


def frame(
    body: bytes, *, webhook_id: str | None, id_source: EventIdSource = "auto", exact: bool = True
) -> Framed:
    """Parse and check a raw body (the module doc's limits), key and type it; raises MalformedEvent.

    `exact=False` (the ingress, which keeps the body's bytes) may round a number a double cannot hold in
    `doc`; every check and the event id come out the same either way, but for a negative exponent no
    Decimal holds, which only the exact read refuses (the router dead-letters it; see `exact_json.loads`).
    """
    # The "content" id hashes the document as parsed: the ingress and the router must parse it alike.
    doc = _load_object(body, exact=exact or id_source == "content")
    type_, sub_type, shape = _classify(doc)
    event_id = _event_id(doc, body, webhook_id, id_source)
    return Framed(event_id, type_, sub_type, shape, doc, _read(doc, type_, sub_type, shape))


def _event_id(doc: dict[str, Any], body: bytes, webhook_id: str | None, source: EventIdSource) -> str:
    # The envelope id is checked whatever the source: a wrongly typed one is refused, never replaced.
    envelope_id = doc.get("id")
    if envelope_id is not None and (
        type(envelope_id) is not str
        or not 0 < len(envelope_id) <= MAX_ID_LENGTH
        or "\x00" in envelope_id
        or envelope_id.isspace()
    ):
        envelope_id = _id(envelope_id, "the envelope 'id'", "bad_event_id")
    if source == "auto":
        return envelope_id if envelope_id is not None else _sha256(body)  # Sent retries the same body
    if source == "body":
        return _sha256(body)
    if source == "header":
        header_id = _id(webhook_id, "x-webhook-id", "bad_event_id")
        if header_id is None:
            raise MalformedEvent("missing_event_id", "event id source is 'header' but x-webhook-id is empty")
        return header_id
    # "content": stable across a re-serialization of the same event (key order, whitespace).
    return _sha256(exact_json.dumps(doc, option=orjson.OPT_SORT_KEYS))


def normalize(framed: Framed, *, tenant: str, received_at_ms: int) -> CanonicalEvent:
    """The canonical event for a framed body; raises MalformedEvent when a routed type lacks its keys."""
    read = framed.read or _read(framed.doc, framed.type, framed.sub_type, framed.shape)
    data = {} if read.data is None else read.data
    if not isinstance(data, dict):
        raise MalformedEvent("bad_payload", "event payload is not an object")
    tenant = _required_id(tenant, "tenant", "bad_tenant")
    event_id = _required_id(framed.event_id, "event id", "bad_event_id")
    received_at_ms = _received_at(received_at_ms)
    occurred_at = read.occurred_at or datetime.fromtimestamp(received_at_ms / 1000, UTC)

    subject = event_id
    status: str | None = None
    if framed.type is EventType.MESSAGE_STATUS:
        if read.subject is None:
            raise MalformedEvent("missing_message_id", "message status event without a message id")
        if read.status is None:
            raise MalformedEvent("missing_status", "message status event without a status")
        subject, status = read.subject, read.status.lower()
    elif framed.type is EventType.TEMPLATE_APPROVAL:
        if read.subject is None:
            raise MalformedEvent("missing_template_id", "template event without a template id")
        if read.status is None:
            raise MalformedEvent("missing_status", "template event without a status")
        subject, status = read.subject, read.status.lower()

    return CanonicalEvent(
        id=event_id,
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
