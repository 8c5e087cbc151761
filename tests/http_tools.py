"""Signed HTTP deliveries for end-to-end tests (the sender's engine is tested on its own)."""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request
import uuid

import aiohttp
import orjson
from aiohttp import web
from aiohttp.test_utils import TestServer

from sentpipe.ingress.protocol import answer_webhooks_directly
from sentpipe.schemas.signature import signature_headers


async def ingress_server(app: web.Application) -> TestServer:
    """The ingress app on a free port, started; served as `sentpipe ingress` serves it (the webhook
    shortcut of `ingress/protocol.py`)."""
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    assert isinstance(server.runner, web.AppRunner)
    answer_webhooks_directly(server.runner)
    return server


async def post_all(
    url: str, bodies: list[bytes], secret: str, concurrency: int = 16, retry_until: float = 120.0
) -> list[int]:
    """POST every body signed; retries 5xx/connection errors (like Sent) until accepted or out of time."""
    sem = asyncio.Semaphore(concurrency)
    deadline = time.monotonic() + retry_until

    async def one(session: aiohttp.ClientSession, body: bytes) -> int:
        webhook_id = f"msg_{uuid.uuid4().hex}"
        async with sem:
            while True:
                headers = {
                    **signature_headers(secret, webhook_id, int(time.time()), body),
                    "content-type": "application/json",
                }
                try:
                    async with session.post(url, data=body, headers=headers) as resp:
                        await resp.read()
                        if resp.status < 500 or time.monotonic() > deadline:
                            return resp.status
                except aiohttp.ClientError:
                    if time.monotonic() > deadline:
                        return 599
                await asyncio.sleep(0.5)

    async with aiohttp.ClientSession() as session:
        return await asyncio.gather(*(one(session, b) for b in bodies))


def scrape(port: int) -> dict[str, float]:
    """Prometheus text exposition -> {'name{labels}': value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def metric_sum(samples: dict[str, float], name: str) -> float:
    return sum(v for k, v in samples.items() if k == name or k.startswith(name + "{"))


def post_signed(url: str, body: bytes, secret: str) -> tuple[int, dict[str, str], dict[str, object]]:
    """One signed delivery, blocking (from a thread, or with no loop to run): status, headers, JSON."""
    headers = {
        **signature_headers(secret, "spool", int(time.time()), body),
        "content-type": "application/json",
    }
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, data=body, headers=headers), timeout=30
        ) as resp:
            return resp.status, dict(resp.headers), orjson.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), orjson.loads(e.read() or b"{}")


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 answer read off a raw connection: status, headers (lower-case names), body."""
    status_line = await reader.readline()
    headers: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(status_line.split()[1]), headers, body
