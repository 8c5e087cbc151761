"""The console's trace of one event ("where is this event id") against the real broker and database: what it
says of the dedup table, which marks (event id, tenant) pairs, not ids alone."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestServer
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from sentpipe.console import create_app
from sentpipe.processors.dedup import encode_seen, partition_of, table_key
from sentpipe.processors.topics import changelog_topic
from sentpipe.schemas import exact_json
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


async def test_a_payload_is_shown_with_its_numbers_as_stored(settings: Settings, console: str) -> None:
    """The page parses the answer with JSON.parse, whose numbers are doubles: a stored 9007199254740993 was
    shown as 9007199254740992, and numbers no double holds (sent as strings by the answer's fallback) were
    shown quoted, "1E+400". `events show` prints them digit for digit; so does the page, from the text."""
    stored = '{"big": 12345678901234567890123, "id": 9007199254740993, "huge": 1e400, "n": 1.5, "s": "x"}'
    with psycopg.connect(settings.database_url.get_secret_value(), autocommit=True) as c:
        c.execute(
            "INSERT INTO inbound_messages (event_id, tenant, occurred_at, received_at, payload)"
            " VALUES ('evt-digits', 't', now(), now(), %s::jsonb)",
            (stored,),
        )
    # The test's topics are new: their leaders may not be elected yet (a 503 naming the broker).
    async with ClientSession() as client:
        for _ in range(120):
            async with client.get(f"{console}/api/event", params={"id": "evt-digits"}) as r:
                if r.status != 503:
                    break
            await asyncio.sleep(0.5)
    (row,) = (await trace(console, "evt-digits"))["rows"]["inbound_messages"]
    shown = row["payload"]
    assert isinstance(shown, str), shown  # the JSON text, for the page to show as it is
    assert exact_json.loads(shown.encode()) == exact_json.loads(stored.encode())
    assert "9007199254740993" in shown and "12345678901234567890123" in shown and '"1E+400"' not in shown
