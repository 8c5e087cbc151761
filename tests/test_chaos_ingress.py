"""The broker goes away: the ingress answers 503 (nothing acknowledged) and recovers without a restart."""

from __future__ import annotations

import asyncio
import signal
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from sentpipe.schemas.samples import SampleFactory
from sentpipe.schemas.signature import signature_headers
from sentpipe.settings import Settings
from tests.kafka_tools import read_topic
from tests.pipeline import wait_for
from tests.processes import start_ingress
from tests.services import Services


def _post(url: str, body: bytes, secret: str) -> tuple[int, dict[str, str], float]:
    headers = {
        **signature_headers(secret, "chaos", int(time.time()), body),
        "content-type": "application/json",
    }
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body, headers=headers), timeout=30) as r:
            return r.status, dict(r.headers), time.monotonic() - t0
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), time.monotonic() - t0


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return e.code


def test_broker_down_means_503_and_not_ready_then_recovers(
    services: Services,
    settings: Settings,
    topics,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    if not services.kafka_local:
        pytest.fail(
            "this test stops the broker: run it with the local launcher (unset SENTPIPE_KAFKA_BOOTSTRAP)"
        )
    proc, base, _ = start_ingress(settings, tmp_path, produce_timeout_s=2.0)
    secret = settings.webhook_secret.get_secret_value()
    url = f"{base}/webhooks/sent"
    f = SampleFactory(21)
    before = f.inbound()
    accepted = []
    try:
        assert _post(url, before.body, secret)[0] == 200
        accepted.append(before.body)
        services.stop_kafka()
        try:
            during = f.inbound()
            status, headers, took = _post(url, during.body, secret)
            assert status == 503 and headers.get("Retry-After")
            assert took < 2.0 + 3.0  # the produce timeout plus slack: never an unbounded wait
            wait_for(lambda: _status(f"{base}/readyz"), lambda s: s == 503, 20, "/readyz 503", proc.tail)
            assert _status(f"{base}/healthz") == 200
        finally:
            services.start_kafka()
        after = f.inbound()
        # Sent retries a 503; so does this, until the broker is back.
        wait_for(lambda: _post(url, after.body, secret)[0], lambda s: s == 200, 60, "a 200", proc.tail)
        accepted.append(after.body)
        wait_for(lambda: _status(f"{base}/readyz"), lambda s: s == 200, 20, "/readyz 200", proc.tail)
    finally:
        exit_code = proc.stop()
    assert exit_code == 0, proc.tail()
    values = [rec.value for rec in read_topic(settings.kafka_bootstrap, topics.raw, at_least=len(accepted))]
    # Every acknowledged event is stored; the one answered 503 may or may not be (Sent retries it anyway).
    assert set(accepted) <= set(values)


def test_sigterm_finishes_in_flight_requests_and_loses_no_acknowledged_event(
    settings: Settings,
    topics,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    """SIGTERM under load: every request the ingress had begun handling when the signal came is answered 200
    and stored; later ones may be refused (0) or turned away (503), never acknowledged and lost.

    "Begun handling" is known, not guessed: each request asks `Expect: 100-continue`, and aiohttp sends
    its body only after the ingress answered "100 Continue", which the ingress does from inside the
    request's handling. Sixteen requests hold their bodies back until just after the signal, so there
    are requests in flight at that moment, and they can only succeed if shutdown lets them finish.
    """
    proc, base, _ = start_ingress(settings, tmp_path)
    secret = settings.webhook_secret.get_secret_value()
    bodies = [s.body for s in SampleFactory(23).mix(400)]
    held = set(range(16))  # the first requests: they get the semaphore first
    results: dict[int, int] = {}  # request -> HTTP status, 0 when refused or cut off
    handling: set[int] = set()  # the ingress has begun handling these ("100 Continue" came back)
    at_signal: dict[str, set[int]] = {}

    async def run() -> None:
        sem = asyncio.Semaphore(32)
        hundred, held_in, release = asyncio.Event(), asyncio.Event(), asyncio.Event()

        async def body_of(i: int) -> AsyncIterator[bytes]:
            handling.add(i)  # aiohttp asks for the body only after "100 Continue"
            if i in held:
                if held <= handling:
                    held_in.set()
                await release.wait()
            yield bodies[i]

        async def one(session: aiohttp.ClientSession, i: int) -> None:
            async with sem:
                headers = {
                    **signature_headers(secret, f"term{i}", int(time.time()), bodies[i]),
                    "content-type": "application/json",
                }
                try:
                    async with session.post(
                        f"{base}/webhooks/sent", data=body_of(i), headers=headers, expect100=True
                    ) as resp:
                        await resp.read()
                        results[i] = resp.status
                except aiohttp.ClientError:
                    results[i] = 0  # refused after shutdown began: not acknowledged
                if len(results) >= 100:
                    hundred.set()

        async def terminate_mid_load() -> None:
            await asyncio.wait_for(hundred.wait(), 60)
            await asyncio.wait_for(held_in.wait(), 60)
            # Both sets are taken at the signal: nothing runs on this loop in between.
            at_signal["handling"], at_signal["answered"] = set(handling), set(results)
            assert proc.p is not None
            proc.p.send_signal(signal.SIGTERM)
            release.set()

        async with aiohttp.ClientSession() as session:
            await asyncio.gather(terminate_mid_load(), *(one(session, i) for i in range(len(bodies))))

    asyncio.run(run())
    assert proc.p is not None and proc.p.wait(30) == 0, proc.tail()
    assert len(results) == len(bodies)
    statuses = set(results.values())
    assert statuses <= {200, 503, 0}, statuses
    in_flight = at_signal["handling"] - at_signal["answered"]
    assert held <= in_flight, (held, in_flight)
    assert {i: results[i] for i in at_signal["handling"] if results[i] != 200} == {}
    acknowledged = {bodies[i] for i, status in results.items() if status == 200}
    assert len(acknowledged) >= 100
    # The process has exited, its producer flushed: the watermarks say what is stored, all of it.
    stored = {rec.value for rec in read_topic(settings.kafka_bootstrap, topics.raw)}
    assert {bodies[i] for i in at_signal["handling"]} <= stored
    assert acknowledged <= stored
