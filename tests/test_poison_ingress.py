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
