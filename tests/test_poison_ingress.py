"""Hostile but signed bodies through the real ingress: each is answered 200 `dead_lettered` with its reason
and lands on the DLQ topic, never on the raw topic, so no worker ever sees it."""

from __future__ import annotations

import time

import aiohttp
import orjson

from sentpipe.schemas import routing as r
from sentpipe.schemas.samples import SampleFactory
from sentpipe.schemas.signature import signature_headers
from sentpipe.schemas.topics import Topics
from sentpipe.settings import Settings
from tests.hostile import HOSTILE
from tests.kafka_tools import read_topic


async def test_hostile_signed_bodies_are_dead_lettered_at_the_ingress(
    ingress: str, settings: Settings, topics: Topics
) -> None:
    secret = settings.webhook_secret.get_secret_value()
    control = SampleFactory(17).message_status("m-ok", "delivered").body
    url = f"{ingress}/webhooks/sent"
    async with aiohttp.ClientSession() as session:
        for i, case in enumerate(HOSTILE):
            headers = {
                **signature_headers(secret, f"msg_{i}", int(time.time()), case.body),
                "content-type": "application/json",
            }
            async with session.post(url, data=case.body, headers=headers) as resp:
                answer = orjson.loads(await resp.read())
                assert resp.status == 200, (case.name, answer)
                assert answer == {"status": "accepted", "outcome": "dead_lettered", "reason": case.reason}, (
                    case.name
                )
        headers = {
            **signature_headers(secret, "msg_ok", int(time.time()), control),
            "content-type": "application/json",
        }
        async with session.post(url, data=control, headers=headers) as resp:
            assert resp.status == 200 and (await resp.json())["status"] == "accepted"

    dlq = read_topic(settings.kafka_bootstrap, topics.dlq, at_least=len(HOSTILE))
    assert sorted(rec.value for rec in dlq) == sorted(case.body for case in HOSTILE)
    by_body = {rec.value: rec for rec in dlq}
    for case in HOSTILE:
        rec = by_body[case.body]
        assert rec.headers[r.H_DLQ_STAGE] == b"ingress"
        assert rec.headers[r.H_DLQ_ERROR_CLASS] == case.reason.encode(), case.name
        assert rec.headers[r.H_SIGNATURE_VERIFIED] == b"true"
        assert b"\x00" not in rec.headers[r.H_DLQ_MESSAGE]
    raw = read_topic(settings.kafka_bootstrap, topics.raw, at_least=1)
    assert [rec.value for rec in raw] == [control]


async def test_a_sent_payload_time_the_model_never_reads_does_not_dead_letter_the_event(
    ingress: str, settings: Settings, topics: Topics
) -> None:
    """An inbound message whose `received_at` (never read: Sent's envelope carries the event's `timestamp`)
    is in a form the time parser refuses, here Meta's epoch seconds as a string, was answered
    `dead_lettered`: the customer's message never reached `inbound_messages`. It is accepted as any other."""
    body = orjson.dumps(
        {
            "field": "message",
            "sub_type": "message.received",
            "timestamp": "2025-10-31T10:10:42Z",
            "payload": {
                "from": "+1234567890",
                "to": "+1987654321",
                "text": "STOP",
                "received_at": "1761905440",
            },
        }
    )
    headers = {
        **signature_headers(settings.webhook_secret.get_secret_value(), "msg_t", int(time.time()), body),
        "content-type": "application/json",
    }
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{ingress}/webhooks/sent", data=body, headers=headers) as resp,
    ):
        assert resp.status == 200
        assert (await resp.json())["status"] == "accepted" and "outcome" not in await resp.json()
    raw = read_topic(settings.kafka_bootstrap, topics.raw, at_least=1)
    assert [rec.value for rec in raw] == [body]
