"""/readyz and `sentpipe_ingress_accepting` (what the SentpipeIngressDown alert reads) against the real
broker: one answer, and the truth about whether a delivery would be taken.

A broker that is there but answers nothing (SIGSTOP: a long pause, a partition that keeps connections open):
librdkafka reports its brokers down only once its sockets time out (up to a minute); a metadata request that
times out says so sooner."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
from prometheus_client import REGISTRY

from sentpipe.ingress.app import create_app, producer_for
from sentpipe.settings import Settings
from tests.http_tools import ingress_server
from tests.services import Services
from tests.test_ingress_limits import exchange

# Well under librdkafka's socket timeout (60 s), after which its own "all brokers down" report would make
# the gauge 0 anyway; well over a metadata request's 2 s timeout and the probe cache.
AGREE_WITHIN_S = 20.0


def accepting() -> float | None:
    return REGISTRY.get_sample_value("sentpipe_ingress_accepting")


async def readyz(port: int) -> int:
    return (await exchange(port, b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n", timeout=30))[0]


async def until(what: Callable[[], bool], within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if what():
            return True
        await asyncio.sleep(0.1)
    return what()


async def test_the_accepting_gauge_follows_readiness_to_a_frozen_broker_and_back(
    services: Services, settings: Settings
) -> None:
    """Seen in an audit: with the broker frozen /readyz turned 503 within seconds, while the gauge followed
    only librdkafka's own report and stayed 1 for up to a minute more: SentpipeIngressDown fired late."""
    if not services.kafka_local:
        pytest.fail(
            "this test freezes the broker: run it with the local launcher (unset SENTPIPE_KAFKA_BOOTSTRAP)"
        )
    producer = producer_for(settings)  # no spool (off unless asked for): accepting is the broker's answer
    server = await ingress_server(create_app(settings, producer))
    try:
        assert server.port is not None
        assert await readyz(server.port) == 200
        assert accepting() == 1
        await asyncio.to_thread(services.freeze_kafka)
        try:
            deadline = time.monotonic() + AGREE_WITHIN_S
            while await readyz(server.port) != 503:
                assert time.monotonic() < deadline, "/readyz stayed 200 with the broker frozen"
                await asyncio.sleep(0.2)
            # No more probes: the gauge gets there on its own (a pod's scrapes need not follow its probes).
            assert await until(lambda: accepting() == 0, AGREE_WITHIN_S), accepting()
            assert producer.unavailable is None  # librdkafka has not noticed yet: the case this is about
        finally:
            await asyncio.to_thread(services.thaw_kafka)
        assert await until(lambda: accepting() == 1, AGREE_WITHIN_S), accepting()
        deadline = time.monotonic() + AGREE_WITHIN_S
        while await readyz(server.port) != 200:
            assert time.monotonic() < deadline, "/readyz stayed 503 with the broker back"
            await asyncio.sleep(0.2)
    finally:
        await server.close()
