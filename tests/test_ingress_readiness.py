"""/readyz and `sentpipe_ingress_accepting` (what the SentpipeIngressDown alert reads) against the real
broker: one answer, and the truth about whether a delivery would be taken.

A broker that is there but answers nothing (SIGSTOP: a long pause, a partition that keeps connections open):
librdkafka reports its brokers down only once its sockets time out (up to a minute); a metadata request that
times out says so sooner. A broker that answers metadata but takes no record (a partition without a leader):
the spool fills, and every delivery is refused."""

from __future__ import annotations

import asyncio
import inspect
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client import REGISTRY

from sentpipe.ingress.app import create_app, liveness_problem, producer_for
from sentpipe.ingress.spool import Spool, SpoolRecord, process_dir
from sentpipe.schemas import routing as r
from sentpipe.schemas.samples import SampleFactory
from sentpipe.schemas.topics import Topics
from sentpipe.settings import Settings
from tests.http_tools import ingress_server
from tests.processes import free_port
from tests.services import Services
from tests.test_ingress_limits import exchange, head, signed

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


async def test_a_full_spool_that_takes_every_delivery_makes_the_pod_unready(
    settings: Settings, topics: Topics, tmp_path: Path
) -> None:
    """Seen in an audit: the broker answered metadata but acknowledged none of the drain's records (here a
    record for a topic that does not exist holds the window; in production a partition without a leader),
    so new deliveries went into the spool, and once it was full every one got 503 `spool_full` while
    /readyz answered 200 and the gauge said 1: the pod stayed in service refusing everything, and
    SentpipeIngressDown could not fire (SentpipeSpoolNearlyFull's runbook says such a pod turns unready)."""
    secret = settings.webhook_secret.get_secret_value()
    f = SampleFactory(41)
    # Room for a few deliveries (the settings' floor is 1 MiB: built here to fill it in a few requests).
    spool = Spool(process_dir(tmp_path / "spool", 0), 16 * 1024, 64 * 1024, write_timeout_s=5.0)
    spool.open()
    headers = tuple(
        r.raw_headers(
            tenant="default", received_at_ms=1, webhook_id="w", request_id="rid", event_type="message.inbound"
        )
    )
    await spool.append(SpoolRecord(f"{topics.prefix}missing", b"k", b"v", headers, 1))
    producer = producer_for(settings)
    server = await ingress_server(create_app(settings, producer, spool))
    try:
        assert server.port is not None
        statuses: list[tuple[int, str]] = []
        for _ in range(100):
            body = f.inbound().body
            status, _, answer = await exchange(
                server.port, head("/webhooks/sent", signed(secret, body), len(body)), body
            )
            statuses.append((status, "" if status == 200 else orjson.loads(answer)["error"]))
            if status != 200:
                break
        assert statuses[-1] == (503, "spool_full") and len(statuses) > 1, statuses
        assert spool.holds_new_records and producer.unavailable is None
        status, _, answer = await exchange(server.port, b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 503 and "the spool is full" in orjson.loads(answer)["detail"], answer
        assert accepting() == 0
    finally:
        await server.close()


def _described_503(doc: dict[str, Any], path: str) -> str:
    """The description of `path`'s 503 answer in the OpenAPI document, its `$ref` followed."""
    answer = doc["paths"][path]["get"]["responses"]["503"]
    if "$ref" in answer:
        answer = doc["components"]["responses"][answer["$ref"].rsplit("/", 1)[1]]
    return str(answer["description"])


async def test_the_openapi_document_names_the_codes_the_probes_answer_503_with(settings: Settings) -> None:
    """/openapi.json gave /readyz's 503 the webhook's codes (broker_unavailable, overloaded, spool_full, ...)
    while it answers `not_ready`, and left `spool_write_stalled` out of /healthz's 503: a probe or client
    written from the contract did not know the codes it got."""
    unreachable = settings.model_copy(update={"kafka_bootstrap": f"127.0.0.1:{free_port()}"})
    producer = producer_for(unreachable)
    server = await ingress_server(create_app(unreachable, producer))
    try:
        assert server.port is not None
        status, _, body = await exchange(server.port, b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 200
        doc = orjson.loads(body)
        deadline = time.monotonic() + AGREE_WITHIN_S
        while (answer := await exchange(server.port, b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n"))[0] != 503:
            assert time.monotonic() < deadline, "/readyz stayed 200 with no broker"
            await asyncio.sleep(0.2)
        code, readyz_503 = orjson.loads(answer[2])["error"], _described_503(doc, "/readyz")
        assert re.search(rf"\b{code}\b", readyz_503), (code, readyz_503)
        assert "broker_unavailable" not in readyz_503
    finally:
        await server.close()
    # Every reason liveness_problem returns (the codes /healthz answers 503 with) is named.
    reasons = set(re.findall(r'return "([a-z_]+)"', inspect.getsource(liveness_problem)))
    assert reasons >= {"producer_stalled", "spool_write_stalled", "spool_drain_stalled"}
    healthz = _described_503(doc, "/healthz")
    assert {r for r in reasons if not re.search(rf"\b{r}\b", healthz)} == set(), healthz
