"""The contract as files: JSON Schema for both raw envelope shapes and for each routed topic's value.

Generated, never hand-edited, from the canonical model in `events.py`: its limits (MAX_ID_LENGTH, ...) and
its field tables (PAYLOAD_FIELDS, SENT_ENVELOPE_FIELDS, ...) become pydantic models here, and pydantic
writes their JSON Schema (draft 2020-12) into `schemas/json/<name>.schema.json`:

    python -m sentpipe.schemas.contract --write   # regenerate the files
    python -m sentpipe.schemas.contract --check   # exit 1, one line naming the stale files, if they differ

The code in `events.py` stays the authority. Every event it accepts validates; the schemas refuse what
JSON Schema can say (types, lengths, numeric time ranges, five-digit years, NUL in the named fields,
missing ids and statuses), but not the nesting depth, NUL in free-form payload fields, or an ISO time
that leaves 1970..9999 only once converted to UTC: the code refuses those too.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Sequence
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, cast

from pydantic import ConfigDict, Field, StringConstraints, TypeAdapter, create_model
from pydantic.types import Strict

from sentpipe.schemas import exact_json
from sentpipe.schemas.events import (
    ENTITY_ID_FIELDS,
    GUIDE_ENVELOPE_FIELDS,
    GUIDE_PAYLOAD_FIELDS,
    MAX_EPOCH_MS,
    MAX_ID_LENGTH,
    MAX_STATUS_LENGTH,
    MAX_TIMESTAMP_LENGTH,
    MAX_TYPE_LENGTH,
    PAYLOAD_FIELDS,
    ROUTED_TYPES,
    SENT_ENVELOPE_FIELDS,
    STATUS_FIELDS,
    STRING_KINDS,
    EventType,
    FieldSpec,
)

JSON_DIR = Path(__file__).resolve().parent / "json"
DIALECT = "https://json-schema.org/draft/2020-12/schema"
SENT_ENVELOPE = "sent.envelope"
GUIDE_ENVELOPE = "guide.envelope"
ENVELOPE_SCHEMAS = {"sent": SENT_ENVELOPE, "guide": GUIDE_ENVELOPE}
TOPIC_SCHEMAS = {t: t.value for t in ROUTED_TYPES}

# No NUL (U+0000): PostgreSQL's text and jsonb refuse it.
NO_NUL = r"^[^\u0000]*$"
# An ISO-8601 time whose year is 1969..9999 (the code checks the instant after zone conversion: 1970 and
# later, so a local 1969 evening west of UTC is in); "" means "not given".
ISO_TIME = r"^$|^(?:19(?:69|[7-9][0-9])|[2-9][0-9]{3})(?:-|W|[0-9]{4}(?:[^0-9]|$))"
SENT_MESSAGE_FIELDS = ("message", "messages")
SENT_TEMPLATE_FIELDS = ("template", "templates")


def _any_case(text: str) -> str:
    """A pattern for `text` in any case: JSON Schema's ECMA-262 patterns have no case-insensitive flag."""
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else re.escape(c) for c in text)


# The code reads the sub-type without regard to case ("MESSAGE.RECEIVED" is inbound).
INBOUND_SUB_TYPE = rf"^{_any_case('message.received')}$"
# A Sent status sub-type: "message." and the status, which is at most MAX_STATUS_LENGTH long.
STATUS_SUB_TYPE = rf"^{_any_case('message.')}[\s\S]{{1,{MAX_STATUS_LENGTH}}}$"
LONG_STATUS_SUB_TYPE = rf"^{_any_case('message.')}[\s\S]{{{MAX_STATUS_LENGTH + 1}}}"


def _text(limit: int, min_length: int = 0) -> Any:
    return Annotated[str, StringConstraints(min_length=min_length or None, max_length=limit, pattern=NO_NUL)]


def _integer() -> Any:
    # The model reads a larger integer as a number and refuses it: without the bounds, the schema took
    # {"message_id": 18446744073709551616}, which the ingress dead-letters.
    return Annotated[int, Strict(), Field(ge=exact_json.INT_MIN, le=exact_json.UINT_MAX)]


def _time() -> Any:
    number = Annotated[float, Field(ge=0, le=MAX_EPOCH_MS)]
    text = Annotated[str, StringConstraints(max_length=MAX_TIMESTAMP_LENGTH, pattern=ISO_TIME)]
    return number | text


def _kind_type(kind: str) -> Any:
    if kind == "time":
        return _time()
    integer_ok, limit = STRING_KINDS[kind]
    return _text(limit) | _integer() if integer_ok else _text(limit)


def _const(*values: str) -> Any:
    return cast(Any, Literal)[values]


DESCRIPTIONS = {
    "id": f"an id: a string of at most {MAX_ID_LENGTH} characters, or a 64-bit integer",
    "address": "an address (phone number, WhatsApp or RCS id): a string or a 64-bit integer",
    "label": "a short text stored in a PostgreSQL column",
    "text": "free text stored in a PostgreSQL column",
    "status": "a status code, compared case-insensitively",
    "type": "an event type name",
    "time": "epoch seconds, epoch milliseconds (above 1e11), or ISO-8601 (no zone: UTC), within 1970..9999",
}


def _spec_fields(specs: Sequence[FieldSpec]) -> dict[str, Any]:
    """create_model arguments for optional fields (absent, null and "" mean "not given")."""
    return {
        f"f_{i}": (
            _kind_type(spec.kind) | None,
            Field(default=None, alias=spec.name, description=DESCRIPTIONS[spec.kind]),
        )
        for i, spec in enumerate(specs)
    }


def _not_one_of(values: list[str]) -> Any:
    return {"not": {"enum": values}}


def _required_one_of(names: Sequence[str]) -> dict[str, Any]:
    return {"anyOf": [{"required": [n]} for n in names]}


def _model(name: str, doc: str, fields: dict[str, Any], rules: Sequence[dict[str, Any]] = ()) -> Any:
    """A model allowing extra keys; `rules` (cross-field constraints) go under allOf."""
    config = ConfigDict(extra="allow", json_schema_extra={"allOf": list(rules)} if rules else None)
    return create_model(name, __config__=config, __doc__=doc, **fields)


# --- payloads: one per routed type, from events.PAYLOAD_FIELDS (the guide's: GUIDE_PAYLOAD_FIELDS) ------
def _payload(type_: EventType, guide: bool = False) -> Any:
    rules: list[dict[str, Any]] = []
    if type_ in ENTITY_ID_FIELDS:
        rules.append(_required_one_of(ENTITY_ID_FIELDS[type_]))
    if type_ is EventType.TEMPLATE_APPROVAL:
        rules.append(_required_one_of(STATUS_FIELDS[type_]))
    name = "".join(part.title() for part in type_.value.split("."))
    if guide:
        return _model(
            f"{name}GuideData",
            f"The guide's `data` of a {type_.value} event: its times are read when the envelope has none.",
            _spec_fields(GUIDE_PAYLOAD_FIELDS[type_]),
            rules,
        )
    return _model(
        f"{name}Payload",
        f"The payload of a {type_.value} event (Sent's `payload`, the canonical `data`).",
        _spec_fields(PAYLOAD_FIELDS[type_]),
        rules,
    )


PAYLOADS: dict[EventType, Any] = {t: _payload(t) for t in ROUTED_TYPES}
GUIDE_PAYLOADS: dict[EventType, Any] = {t: _payload(t, guide=True) for t in ROUTED_TYPES}
STATUS_IN_PAYLOAD = _required_one_of(STATUS_FIELDS[EventType.MESSAGE_STATUS])
TYPE_NAME = _text(MAX_TYPE_LENGTH)


# --- Sent's envelope: {"field", "sub_type", "timestamp", "payload"} ------------------------------------
def _sent_variant(
    name: str, doc: str, field: Any, sub_type: Any, payload: Any, rules: Sequence[dict[str, Any]] = ()
) -> Any:
    fields = {"field": field, "sub_type": sub_type, "payload": payload, **_spec_fields(SENT_ENVELOPE_FIELDS)}
    return _model(name, doc, fields, rules)


def _sent_envelope() -> Any:
    status = _sent_variant(
        "SentMessageStatusEnvelope",
        "An outbound message status: field message(s), any sub_type but message.received.",
        (_const(*SENT_MESSAGE_FIELDS), ...),
        (
            TYPE_NAME | None,
            Field(
                default=None,
                json_schema_extra={
                    "not": {"anyOf": [{"pattern": INBOUND_SUB_TYPE}, {"pattern": LONG_STATUS_SUB_TYPE}]}
                },
            ),
        ),
        (PAYLOADS[EventType.MESSAGE_STATUS], ...),
        # The status is the sub_type's tail ("message.delivered"), or else the payload's.
        [
            {
                "anyOf": [
                    {"required": ["sub_type"], "properties": {"sub_type": {"pattern": STATUS_SUB_TYPE}}},
                    {"properties": {"payload": STATUS_IN_PAYLOAD}},
                ]
            }
        ],
    )
    inbound = _sent_variant(
        "SentInboundEnvelope",
        "An inbound message: field message(s), sub_type message.received (any case).",
        (_const(*SENT_MESSAGE_FIELDS), ...),
        (Annotated[str, StringConstraints(pattern=INBOUND_SUB_TYPE)], ...),
        (PAYLOADS[EventType.MESSAGE_INBOUND] | None, None),
    )
    template = _sent_variant(
        "SentTemplateEnvelope",
        "A template approval update: field template(s).",
        (_const(*SENT_TEMPLATE_FIELDS), ...),
        (TYPE_NAME | None, None),
        (PAYLOADS[EventType.TEMPLATE_APPROVAL], ...),
    )
    other = _sent_variant(
        "SentUnroutedEnvelope",
        "Any other field: kept on the unrouted topic as received.",
        (
            TYPE_NAME,
            Field(json_schema_extra={"not": {"enum": [*SENT_MESSAGE_FIELDS, *SENT_TEMPLATE_FIELDS]}}),
        ),
        (TYPE_NAME | None, None),
        (Any, None),
    )
    return status | inbound | template | other


# --- the integration guide's envelope: {"id", "event": {"type"}, "data"} -------------------------------
def _guide_variant(
    name: str, doc: str, type_name: Any, data: Any, rules: Sequence[dict[str, Any]] = ()
) -> Any:
    ref = _model(f"{name}Type", "The event's type.", {"type": (type_name, ...)})
    fields = {
        "event": (ref | None, None),
        "type": (type_name | None, Field(default=None, description="the type, where `event` is absent")),
        "data": data,
        **_spec_fields(GUIDE_ENVELOPE_FIELDS),
    }
    return _model(name, doc, fields, [_required_one_of(("event", "type")), *rules])


def _guide_envelope() -> Any:
    routed = {t.value for t in ROUTED_TYPES}
    status = _guide_variant(
        "GuideMessageStatusEnvelope",
        "An outbound message status.",
        _const(EventType.MESSAGE_STATUS.value),
        (GUIDE_PAYLOADS[EventType.MESSAGE_STATUS], ...),
        [{"properties": {"data": STATUS_IN_PAYLOAD}}],
    )
    inbound = _guide_variant(
        "GuideInboundEnvelope",
        "An inbound message.",
        _const(EventType.MESSAGE_INBOUND.value),
        (GUIDE_PAYLOADS[EventType.MESSAGE_INBOUND] | None, None),
    )
    template = _guide_variant(
        "GuideTemplateEnvelope",
        "A template approval update.",
        _const(EventType.TEMPLATE_APPROVAL.value),
        (GUIDE_PAYLOADS[EventType.TEMPLATE_APPROVAL], ...),
    )
    other = _guide_variant(
        "GuideUnroutedEnvelope",
        "Any other type: kept on the unrouted topic as received.",
        Annotated[TYPE_NAME, Field(json_schema_extra=_not_one_of(sorted(routed)))],
        (Any, None),
    )
    return status | inbound | template | other


# --- the routed topics' value: CanonicalEvent.to_json --------------------------------------------------
def _canonical(type_: EventType) -> Any:
    required_id = _text(MAX_ID_LENGTH, min_length=1)
    status: Any = _text(MAX_STATUS_LENGTH, min_length=1) if type_ in STATUS_FIELDS else None
    fields: dict[str, Any] = {
        "id": (required_id, Field(description="the event id (the dedup key)")),
        "type": (_const(type_.value), ...),
        "tenant": (required_id, ...),
        "occurred_at": (
            Annotated[
                str, StringConstraints(max_length=MAX_TIMESTAMP_LENGTH, pattern=ISO_TIME, min_length=1)
            ],
            Field(description="when it happened (ISO-8601, UTC); the ingress time when the event has none"),
        ),
        "received_at": (
            Annotated[int, Strict(), Field(ge=0, le=MAX_EPOCH_MS)],
            Field(description="when the ingress received it, epoch milliseconds"),
        ),
        "sub_type": (TYPE_NAME | None, Field(description="Sent's sub_type or the guide's event type")),
        "shape": (_const("sent", "guide"), ...),
        "subject": (
            required_id,
            Field(description="the entity whose order matters: message id, template id, or the event id"),
        ),
        "status": (status, Field(description="lower-case status" if status is not None else "always null")),
        "data": (PAYLOADS[type_], ...),
    }
    name = "".join(part.title() for part in type_.value.split("."))
    return _model(f"{name}Event", f"The value of a record on the {type_.value} topic.", fields)


SCHEMAS: dict[str, tuple[str, Callable[[], Any]]] = {
    SENT_ENVELOPE: ("Sent's webhook body (field/sub_type/timestamp/payload)", _sent_envelope),
    GUIDE_ENVELOPE: ("The integration guide's webhook body (id/event.type/data)", _guide_envelope),
    **{
        t.value: (f"A {t.value} record's value (the canonical event)", partial(_canonical, t))
        for t in ROUTED_TYPES
    },
}


def generate(name: str) -> dict[str, Any]:
    title, build = SCHEMAS[name]
    schema = TypeAdapter(build()).json_schema()
    schema.pop("title", None)
    return {"$schema": DIALECT, "$id": f"urn:sentpipe:schema:{name}", "title": title, **schema}


def render(name: str) -> str:
    return json.dumps(generate(name), indent=2, ensure_ascii=False) + "\n"


def path_of(name: str) -> Path:
    return JSON_DIR / f"{name}.schema.json"


def load(name: str) -> dict[str, Any]:
    """A shipped schema (package data), e.g. load("message.status.updated")."""
    text = (resources.files("sentpipe.schemas") / "json" / f"{name}.schema.json").read_text()
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def stale() -> list[Path]:
    """The files that differ from what the generator writes, are missing, or are not generated at all."""
    out = [path_of(n) for n in SCHEMAS if not path_of(n).is_file() or path_of(n).read_text() != render(n)]
    expected = {path_of(n).name for n in SCHEMAS}
    out += sorted(p for p in JSON_DIR.glob("*.schema.json") if p.name not in expected)
    return out


def write() -> list[Path]:
    JSON_DIR.mkdir(exist_ok=True)
    expected = {path_of(n).name for n in SCHEMAS}
    for extra in JSON_DIR.glob("*.schema.json"):
        if extra.name not in expected:
            extra.unlink()
    written = []
    for name in SCHEMAS:
        text = render(name)
        if not path_of(name).is_file() or path_of(name).read_text() != text:
            path_of(name).write_text(text)
            written.append(path_of(name))
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sentpipe.schemas.contract", description=__doc__)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="regenerate schemas/json/*.schema.json")
    mode.add_argument("--check", action="store_true", help="exit 1 if a checked-in file is stale")
    args = parser.parse_args(argv)
    if args.write:
        for p in write():
            print(f"wrote {_shown(p)}")
        return 0
    bad = stale()
    if bad:
        names = ", ".join(_shown(p) for p in bad)
        print(
            f"error: stale contract file(s): {names}; run python -m sentpipe.schemas.contract --write",
            file=sys.stderr,
        )
        return 1
    return 0


def _shown(p: Path) -> str:
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(p)


if __name__ == "__main__":
    sys.exit(main())
