"""Raw record framing and routing: one pure function used by the worker, replay and redrive."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from sentpipe.schemas.events import (
    CanonicalEvent,
    EventIdSource,
    EventType,
    MalformedEvent,
    frame,
    normalize,
    required_id,
)
from sentpipe.schemas.topics import Topics

# Headers on a raw record; its value is the body exactly as received.
H_TENANT = "sentpipe-tenant"
H_TYPE = "sentpipe-type"
H_RECEIVED_AT = "sentpipe-received-at"
H_WEBHOOK_ID = "sentpipe-webhook-id"
H_SIGNATURE_VERIFIED = "sentpipe-signature-verified"
H_REQUEST_ID = "sentpipe-request-id"
# Set on records pushed again by replay or redrive: consumers apply them even if seen before.
H_REPLAY_ID = "sentpipe-replay-id"
H_REDRIVE_ID = "sentpipe-redrive-id"

# Headers on a dead-letter record, beside the original headers; the value is the original, untouched.
H_DLQ_STAGE = "sentpipe-dlq-stage"
H_DLQ_ERROR_CLASS = "sentpipe-dlq-error-class"
H_DLQ_MESSAGE = "sentpipe-dlq-message"
H_DLQ_ATTEMPTS = "sentpipe-dlq-attempts"
H_DLQ_TOPIC = "sentpipe-dlq-original-topic"
H_DLQ_PARTITION = "sentpipe-dlq-original-partition"
H_DLQ_OFFSET = "sentpipe-dlq-original-offset"
H_DLQ_AT = "sentpipe-dlq-at"
H_DLQ_KEYS = (
    H_DLQ_STAGE,
    H_DLQ_ERROR_CLASS,
    H_DLQ_MESSAGE,
    H_DLQ_ATTEMPTS,
    H_DLQ_TOPIC,
    H_DLQ_PARTITION,
    H_DLQ_OFFSET,
    H_DLQ_AT,
)

HeaderList = list[tuple[str, bytes]]
# Headers as the Kafka clients hand them over: confluent-kafka a list of pairs or None, aiokafka and Faust
# a list or a dict; a value may be None, and str where the producer sent text.
ClientHeaders = Mapping[str, bytes | str | None] | Iterable[tuple[str, bytes | str | None]] | None


def parse_event_types(
    names: Iterable[str], allowed: Iterable[EventType] = EventType
) -> tuple[EventType, ...]:
    """Canonical type names -> types, in the given order, each once; ValueError names the allowed ones."""
    valid = {t.value: t for t in allowed}
    chosen: list[EventType] = []
    for name in names:
        type_ = valid.get(name)
        if type_ is None:
            raise ValueError(f"unknown event type {name!r} (known: {', '.join(valid)})")
        if type_ not in chosen:
            chosen.append(type_)
    return tuple(chosen)


def raw_headers(
    *, tenant: str, received_at_ms: int, webhook_id: str, request_id: str, event_type: str | None
) -> HeaderList:
    """The headers of a raw record; the type is absent for a malformed body."""
    out: HeaderList = [
        (H_TENANT, tenant.encode()),
        (H_RECEIVED_AT, b"%d" % received_at_ms),
        (H_WEBHOOK_ID, webhook_id.encode()),
        (H_SIGNATURE_VERIFIED, b"true"),
        (H_REQUEST_ID, request_id.encode()),
    ]
    if event_type is not None:
        out.append((H_TYPE, event_type.encode()))
    return out


# A dead letter's error headers carry at most this much: a handler's exception class can be made at run
# time with a name of any length, and a message can be of any size.
MAX_DLQ_ERROR_CLASS = 200
MAX_DLQ_MESSAGE = 1000


def dlq_text(text: str, limit: int) -> str:
    """`text` cut to `limit` characters and made UTF-8 safe: a dead letter that cannot be written holds its
    stage, so a header is never an encoding error (a lone surrogate becomes its escape)."""
    return text[:limit].encode(errors="backslashreplace").decode()


def exception_class(exc: BaseException) -> str:
    """The exception's class name as a DLQ header and a metric label carry it."""
    return dlq_text(type(exc).__name__, MAX_DLQ_ERROR_CLASS)


def exception_message(exc: BaseException) -> str:
    """str(exc) as a DLQ header carries it, or a note when it cannot be read: a record's exception must not
    fail the stage."""
    try:
        return dlq_text(str(exc), MAX_DLQ_MESSAGE)
    except Exception as inner:
        return f"(its message cannot be read: {type(inner).__name__})"


def dlq_headers(
    *,
    stage: str,
    error_class: str,
    message: str,
    attempts: int = 1,
    topic: str | None = None,
    partition: int | None = None,
    offset: int | None = None,
    now_ms: int | None = None,
) -> HeaderList:
    import time

    out: HeaderList = [
        (H_DLQ_STAGE, stage.encode()),
        (H_DLQ_ERROR_CLASS, dlq_text(error_class, MAX_DLQ_ERROR_CLASS).encode()),
        (H_DLQ_MESSAGE, dlq_text(message, MAX_DLQ_MESSAGE).encode()),
        (H_DLQ_ATTEMPTS, str(attempts).encode()),
        (H_DLQ_AT, str(now_ms if now_ms is not None else int(time.time() * 1000)).encode()),
    ]
    if topic is not None:
        out += [
            (H_DLQ_TOPIC, topic.encode()),
            (H_DLQ_PARTITION, str(partition).encode()),
            (H_DLQ_OFFSET, str(offset).encode()),
        ]
    return out


def header_list(headers: ClientHeaders) -> HeaderList:
    """Kafka headers as (name, bytes) pairs in record order, from any client's shape; None values dropped."""
    items = headers.items() if isinstance(headers, Mapping) else headers or ()
    return [(str(k), v.encode() if isinstance(v, str) else bytes(v)) for k, v in items if v is not None]


def header_map(headers: ClientHeaders) -> dict[str, bytes]:
    """Kafka headers as a dict (the last value of a repeated name wins); see `header_list`."""
    return dict(header_list(headers))


@dataclass(frozen=True, slots=True)
class Routed:
    topic: str
    key: bytes
    value: bytes
    event: CanonicalEvent | None  # None for unrouted records, which keep the raw body


def record_identity(
    key: bytes | None, headers: Mapping[str, bytes], default_tenant: str
) -> tuple[str | None, str]:
    """The event id a raw record's key names (None without a key) and its tenant, as `route` reads them;
    MalformedEvent (bad_event_id, bad_tenant, nul_character) for bytes that are not UTF-8, or an id or a
    tenant that is no id. The router checks them before it marks anything seen: the dedup table holds them.
    (With `errors="replace"` two keys that differ in their undecodable bytes named one event.)"""
    try:
        event_id = key.decode() if key else None
    except UnicodeDecodeError:
        raise MalformedEvent("bad_event_id", "the record key is not UTF-8") from None
    try:
        tenant = headers.get(H_TENANT, b"").decode() or default_tenant
    except UnicodeDecodeError:
        raise MalformedEvent("bad_tenant", "the tenant header is not UTF-8") from None
    if event_id is not None:
        event_id = required_id(event_id, "the record key", "bad_event_id")
    return event_id, required_id(tenant, "tenant", "bad_tenant")


def route(
    key: bytes | None,
    value: bytes,
    headers: Mapping[str, bytes],
    *,
    topics: Topics,
    id_source: EventIdSource,
    default_tenant: str,
    record_timestamp_ms: int,
) -> Routed:
    """Where a raw record goes and what it becomes; raises MalformedEvent for the DLQ."""
    key_id, tenant = record_identity(key, headers, default_tenant)
    webhook_id = headers.get(H_WEBHOOK_ID, b"").decode(errors="replace") or None
    framed = frame(value, webhook_id=webhook_id, id_source=id_source)
    event_id = key_id or framed.event_id
    if event_id != framed.event_id:
        # The ingress keyed it; keep that id so dedup, rows and replay all agree.
        framed = framed._replace(event_id=event_id)
    received_raw = headers.get(H_RECEIVED_AT)
    try:
        received_at_ms = int(received_raw) if received_raw else record_timestamp_ms
    except ValueError:
        received_at_ms = record_timestamp_ms
    if framed.type is EventType.UNROUTED:
        return Routed(topics.unrouted, event_id.encode(), value, None)
    event = normalize(framed, tenant=tenant, received_at_ms=received_at_ms)
    topic = {
        EventType.MESSAGE_STATUS: topics.message_status,
        EventType.MESSAGE_INBOUND: topics.message_inbound,
        EventType.TEMPLATE_APPROVAL: topics.template_approval,
    }[event.type]
    # Key by tenant and subject: order matters per message/template, and tenants never share one.
    return Routed(topic, f"{tenant}/{event.subject}".encode(), event.to_json(), event)


__all__ = [
    "H_TENANT",
    "HeaderList",
    "MalformedEvent",
    "Routed",
    "dlq_headers",
    "header_list",
    "header_map",
    "parse_event_types",
    "raw_headers",
    "route",
]
