"""The console's trace of one event ("where is this event id") against the real broker and database: what it
says of the dedup table, which marks (event id, tenant) pairs, not ids alone."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestServer
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from sentpipe.console import create_app
from sentpipe.processors.dedup import encode_seen, partition_of, table_key
from sentpipe.processors.topics import changelog_topic
from sentpipe.settings import Settings


@pytest.fixture
async def console(settings: Settings) -> AsyncIterator[str]:
    """A console without a token (loopback only) on a free port."""
    app: web.Application = create_app(settings.model_copy(update={"console_metrics_urls": []}))
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield f"http://127.0.0.1:{server.port}"
    await server.close()


def write_table(settings: Settings, records: list[tuple[bytes, bytes | None]]) -> None:
    """Records on the dedup table's changelog as the router writes them (its key, its tenants' marks)."""
    topic = changelog_topic(settings)
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    for future in admin.create_topics([NewTopic(topic, settings.raw_partitions, 1)]).values():
        future.result(30)
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
    for key, value in records:
        producer.produce(topic, value, key=key, partition=partition_of(key, settings.raw_partitions))
        assert producer.flush(30) == 0  # one at a time: the order on the partition is the order here


async def trace(console: str, event_id: str) -> dict[str, Any]:
    async with ClientSession() as client, client.get(f"{console}/api/event", params={"id": event_id}) as r:
        assert r.status == 200, await r.text()
        answer: dict[str, Any] = await r.json()
        return answer


async def test_the_dedup_state_names_the_tenants_the_id_is_marked_for(
    settings: Settings, console: str
) -> None:
    """An id routed for tenant A only was shown as "seen", as if a copy from tenant B would be dropped too
    (it is routed: the table marks (id, tenant) pairs); one routed for both looked the same."""
    now = int(time.time() * 1000)
    one, both = "evt-trace-one-tenant", "evt-trace-two-tenants"
    write_table(
        settings,
        [
            (table_key(one.encode()), encode_seen({"tenant-a": now - 5000})),
            (table_key(both.encode()), encode_seen({"tenant-a": now - 4000, "tenant-b": now - 3000})),
        ],
    )
    assert (await trace(console, one))["dedup"]["tenants"] == {"tenant-a": now - 5000}
    d = (await trace(console, both))["dedup"]
    assert d["tenants"] == {"tenant-a": now - 4000, "tenant-b": now - 3000}
    assert d["first_routed"] == now - 4000 and not d["tombstone"]


async def test_an_id_moved_to_the_compact_key_is_not_shown_as_swept(settings: Settings, console: str) -> None:
    """A table from before compact keys holds a SHA-256 id under its hex form; the router moves it to the
    compact key and tombstones the hex one just after. That tombstone, the newest record of the two keys, was
    shown as "swept out of the dedup window" for an id the table still holds."""
    event_id = "ab" * 32
    hex_key, compact = event_id.encode(), table_key(event_id.encode())
    assert compact != hex_key
    now = int(time.time() * 1000)
    write_table(
        settings,
        [
            (hex_key, encode_seen({"tenant-a": now - 9000})),  # as an older version wrote it
            (compact, encode_seen({"tenant-a": now - 9000})),  # moved ...
            (hex_key, None),  # ... and the old key's tombstone
        ],
    )
    d = (await trace(console, event_id))["dedup"]
    assert not d["tombstone"], d
    assert d["tenants"] == {"tenant-a": now - 9000}
