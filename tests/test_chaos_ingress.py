"""The broker goes away: the ingress answers 503 (nothing acknowledged) and recovers without a restart."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from sentpipe.schemas.samples import SampleFactory
from sentpipe.schemas.signature import signature_headers
from sentpipe.settings import Settings
from tests.kafka_tools import read_topic
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
            deadline = time.monotonic() + 20
            while _status(f"{base}/readyz") != 503 and time.monotonic() < deadline:
                time.sleep(0.5)
            assert _status(f"{base}/readyz") == 503
            assert _status(f"{base}/healthz") == 200
        finally:
            services.start_kafka()
        after = f.inbound()
        deadline = time.monotonic() + 60
        status = 0
        while time.monotonic() < deadline:
            status = _post(url, after.body, secret)[0]
            if status == 200:
                break
            time.sleep(1)
        assert status == 200, proc.tail()
        accepted.append(after.body)
        deadline = time.monotonic() + 20
        while _status(f"{base}/readyz") != 200 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _status(f"{base}/readyz") == 200
    finally:
        proc.stop()
    values = [rec.value for rec in read_topic(settings.kafka_bootstrap, topics.raw, at_least=2)]
    # Every acknowledged event is stored; the one answered 503 may or may not be (Sent retries it anyway).
    assert set(accepted) <= set(values)


def test_sigterm_finishes_in_flight_requests_and_loses_no_acknowledged_event(
    settings: Settings,
    topics,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    import asyncio
    import signal

    import aiohttp

    proc, base, _ = start_ingress(settings, tmp_path)
    secret = settings.webhook_secret.get_secret_value()
    bodies = [s.body for s in SampleFactory(23).mix(400)]
    results: list[tuple[bytes, int]] = []

    async def run() -> None:
        sem = asyncio.Semaphore(32)
        hundred = asyncio.Event()

        async def one(session: aiohttp.ClientSession, body: bytes) -> None:
            async with sem:
                headers = {
                    **signature_headers(secret, "term", int(time.time()), body),
                    "content-type": "application/json",
                }
                try:
                    async with session.post(f"{base}/webhooks/sent", data=body, headers=headers) as resp:
                        await resp.read()
                        results.append((body, resp.status))
                except aiohttp.ClientError:
                    results.append((body, 0))  # refused after shutdown began: not acknowledged
                if len(results) >= 100:
                    hundred.set()

        async def terminate_soon() -> None:
            await hundred.wait()
            assert proc.p is not None
            proc.p.send_signal(signal.SIGTERM)

        async with aiohttp.ClientSession() as session:
            await asyncio.gather(terminate_soon(), *(one(session, b) for b in bodies))

    asyncio.run(run())
    assert proc.p is not None and proc.p.wait(30) == 0, proc.tail()
    statuses = {s for _, s in results}
    assert statuses <= {200, 503, 0}, statuses
    acknowledged = {b for b, s in results if s == 200}
    assert len(acknowledged) >= 100
    stored = {
        rec.value for rec in read_topic(settings.kafka_bootstrap, topics.raw, at_least=len(acknowledged))
    }
    assert acknowledged <= stored
