"""Numbers arrive in PostgreSQL as Sent wrote them: big integers, long decimals, exponents past a double's.

The unit tests pin the codec (pure logic); the end-to-end test sends such payloads through the ingress and
a worker and asks PostgreSQL itself whether the stored payload equals the one in the sent body.
"""

from __future__ import annotations

import asyncio
from decimal import Decimal
from pathlib import Path

import orjson
import psycopg
import pytest

from sentpipe.schemas import exact_json
from sentpipe.schemas import routing as r
from sentpipe.schemas.events import CanonicalEvent, MalformedEvent, frame, normalize
from sentpipe.schemas.samples import SampleFactory
from sentpipe.settings import Settings
from tests.http_tools import post_all
from tests.kafka_tools import read_topic
from tests.oracle import row_count
from tests.pipeline import start_ingress, start_worker, wait_until
from tests.test_ops_cli import sentpipe

LONG = "9" * 5000  # beyond int()'s 4,300-digit limit for str -> int
# Each a number orjson alone changes (or refuses): the text, as JSON carries it.
INEXACT = {
    "big": "123456789012345678901234567890",
    "below_int64": "-9223372036854775809",
    "above_uint64": "18446744073709551616",
    "long_decimal": "0.1000000000000000055511151231257827",
    "pi": "3.14159265358979323846264338327950288",
    "underflow": "1e-400",
    "subnormal": "1.23456789e-320",
    "overflow": "1E+400",
    "long": LONG,
}
EXACT = {"int64_min": "-9223372036854775808", "uint64_max": "18446744073709551615", "price": "12.5"}


def _doc(numbers: dict[str, str]) -> bytes:
    return ("{" + ",".join(f'"{k}":{v}' for k, v in numbers.items()) + "}").encode()


def test_inexact_numbers_come_back_digit_for_digit() -> None:
    body = _doc(INEXACT | EXACT)
    doc = exact_json.loads(body)
    for name, text in INEXACT.items():
        assert isinstance(doc[name], Decimal), name
        assert doc[name] == Decimal(text), name
    assert doc["int64_min"] == -(2**63) and doc["uint64_max"] == 2**64 - 1 and doc["price"] == 12.5
    assert exact_json.loads(exact_json.dumps(doc)) == doc
    written = exact_json.dumps(doc).decode()
    for text in INEXACT.values():
        assert str(Decimal(text)) in written


def test_documents_without_a_float_are_orjsons_own() -> None:
    body = SampleFactory(3).inbound().body
    assert exact_json.loads(body) == orjson.loads(body)
    assert exact_json.dumps(orjson.loads(body)) == orjson.dumps(orjson.loads(body))


@pytest.mark.parametrize(
    "body",
    [
        b'{"a": NaN}',
        b'{"a": Infinity, "b": 1e400}',
        b'{"a": 1e400, "b": "\\ud800"}',  # a lone surrogate after the number orjson stopped at
        b'{"a": 1e400, "b": tru}',
        '{"a": 1e400}'.encode("utf-16"),
        b'{"a": 1e400, "b": "\xff"}',
        b"[" * 5000 + b"1e400" + b"]" * 5000,
    ],
)
def test_what_orjson_refuses_stays_refused(body: bytes) -> None:
    with pytest.raises(orjson.JSONDecodeError):
        exact_json.loads(body)
    with pytest.raises(orjson.JSONDecodeError):
        exact_json.loads(body, exact=False)


@pytest.mark.parametrize("number", ["1e-" + "9" * 30, "1e" + "9" * 19, "-1E+" + "9" * 1000])
def test_an_exponent_no_decimal_holds_is_refused_as_json(number: str) -> None:
    """decimal's InvalidOperation escaped: a 500 at the ingress, and every reader of the dead letter the
    router made of a negative one (read as 0.0 by the ingress) failed: events show, dlq show, the console."""
    body = ('{"a": ' + number + "}").encode()
    with pytest.raises(orjson.JSONDecodeError):
        exact_json.loads(body)
    if "e-" not in number.lower():  # orjson refuses it too; a negative one it reads as 0.0 (`loads`)
        with pytest.raises(orjson.JSONDecodeError):
            exact_json.loads(body, exact=False)
    else:
        assert exact_json.loads(body, exact=False) == {"a": 0.0}
    assert exact_json.pretty(body) is None  # a reader shows the bytes instead of failing
    with pytest.raises(MalformedEvent) as caught:
        frame(_sent_status('"x": ' + number), webhook_id=None)
    assert caught.value.reason == "not_json"
    assert "an exponent beyond 10^18 in size" in str(
        caught.value
    )  # valid JSON: the detail says what is wrong


def test_a_deep_document_with_a_float_is_too_deep_not_a_crash() -> None:
    with pytest.raises(MalformedEvent) as caught:
        frame(b'{"payload": ' + b"[" * 300 + b"1.5" + b"]" * 300 + b"}", webhook_id=None)
    assert caught.value.reason == "too_deep"


def test_pretty_keeps_the_digits() -> None:
    text = exact_json.pretty(_doc(INEXACT))
    assert text is not None and LONG in text and "123456789012345678901234567890" in text
    assert exact_json.pretty(b"not json") is None
    assert exact_json.pretty(b"[" * 300 + b"]" * 300) is None  # beyond what orjson writes


def _sent_status(payload_extra: str, timestamp: str = '"2026-01-01T00:00:00Z"') -> bytes:
    return (
        '{"field":"message","sub_type":"message.delivered","timestamp":' + timestamp + ","
        '"payload":{"message_id":"m-1","message_status":"DELIVERED",' + payload_extra + "}}"
    ).encode()


@pytest.mark.parametrize("id_source", ["auto", "body", "content"])
def test_the_ingress_and_the_router_frame_alike(id_source: str) -> None:
    """The ingress reads numbers inexactly (it keeps the bytes); the outcome must not depend on it."""
    bodies = [
        _sent_status(",".join(f'"{k}":{v}' for k, v in INEXACT.items())),
        _sent_status('"n": 1', timestamp="1767225600.1234567890123456789"),
        _sent_status('"n": 1', timestamp="1e400"),
        _sent_status('"message_id_2": 1', timestamp="123456789012345678901234567890"),
        b'{"id": 123456789012345678901234567890, "type": "message.status.updated", "data": {}}',
        # An exponent no Decimal holds: a 500 with a traceback at the ingress.
        _sent_status('"x": 1e' + "9" * 19),
        _sent_status('"x": 1E+' + "9" * 1000),
        _sent_status('"x": 1e-' + "9" * 18),  # a Decimal holds this one
        _sent_status('"x": 1.5, "text": "e-' + "9" * 20 + '"'),  # the bytes in a string: nothing to refuse
    ]
    for body in bodies:
        outcomes = []
        for exact in (True, False):
            try:
                f = frame(body, webhook_id="w", id_source=id_source, exact=exact)  # type: ignore[arg-type]
                outcomes.append((f.event_id, f.type, f.read.occurred_at if f.read else None))
            except MalformedEvent as exc:
                outcomes.append((exc.reason, exc.detail))
        assert outcomes[0] == outcomes[1], body[:80]


def test_a_negative_exponent_no_decimal_holds_is_left_to_the_router() -> None:
    """The one number the two reads tell apart, on purpose (see `exact_json.loads`): the ingress takes it
    (orjson reads 0.0) and the router dead-letters it, rather than every request paying a float walk."""
    body = _sent_status('"x": 1e-' + "9" * 20)
    assert frame(body, webhook_id="w", exact=False).type == "message.status.updated"
    with pytest.raises(MalformedEvent) as caught:
        frame(body, webhook_id="w")
    assert caught.value.reason == "not_json"


def test_the_canonical_event_carries_the_digits_to_the_projector() -> None:
    body = _sent_status(",".join(f'"{k}":{v}' for k, v in INEXACT.items()))
    event = normalize(frame(body, webhook_id=None), tenant="t", received_at_ms=1)
    back = CanonicalEvent.from_json(event.to_json())
    for name, text in INEXACT.items():
        assert back.data[name] == Decimal(text), name


def test_numbers_reach_postgresql_as_sent(settings: Settings, topics, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    db = settings.database_url.get_secret_value()
    numbers = [f'"{k}":{v}' for k, v in (INEXACT | EXACT).items()]
    bodies = [_sent_status(n).replace(b'"m-1"', f'"m-{i}"'.encode()) for i, n in enumerate(numbers)]
    bodies.append(_sent_status('"all":{' + ",".join(numbers) + '},"list":[1e-400,' + LONG + "]"))
    bodies.append(_sent_status('"n": 1', timestamp="1767225600.1234567890123456789").replace(b"m-1", b"m-ts"))
    # Beyond PostgreSQL's numeric (1e131072 overflows it): dead-lettered by the projector, alone.
    too_big = _sent_status('"n": 1e200000').replace(b"m-1", b"m-too-big")
    ingress, url, _ = start_ingress(settings, tmp_path)
    worker = start_worker(settings, tmp_path)
    try:
        statuses = asyncio.run(
            post_all(f"{url}/webhooks/sent", [*bodies, too_big], settings.webhook_secret.get_secret_value())
        )
        assert statuses == [200] * (len(bodies) + 1)
        wait_until(lambda: row_count(db) >= len(bodies), 120, "every event projected", worker.proc.tail)
        dlq = read_topic(settings.kafka_bootstrap, topics.dlq, at_least=1, timeout=60)
    finally:
        worker.stop()
        ingress.stop()
    assert len(dlq) == 1 and exact_json.loads(dlq[0].value)["id"] == frame(too_big, webhook_id=None).event_id
    assert dlq[0].headers[r.H_DLQ_ERROR_CLASS] == b"sqlstate_22003"  # numeric overflow
    with psycopg.connect(db) as c:
        for body in bodies:
            event_id = frame(body, webhook_id=None).event_id
            # PostgreSQL parses the body it was sent and compares numerics exactly.
            same = c.execute(
                "SELECT payload = (%s::jsonb -> 'payload') FROM message_events WHERE event_id = %s",
                (body.decode(), event_id),
            ).fetchone()
            assert same == (True,), body[:120]
        occurred = c.execute(
            "SELECT extract(epoch FROM occurred_at) FROM message_events WHERE message_id = 'm-ts'"
        ).fetchone()
    assert occurred is not None and abs(float(occurred[0]) - 1767225600.123457) < 1e-6
    # `events show` finds the routed record of an event whose number orjson alone cannot read.
    res = sentpipe(settings, "events", "show", frame(too_big, webhook_id=None).event_id)
    assert res.returncode == 0, res.stderr
    assert topics.message_status in res.stdout and "routed record(s): none" not in res.stdout, res.stdout
