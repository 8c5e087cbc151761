"""The webhook shortcut (`ingress/protocol.py`) against the real broker, over raw sockets: which requests it
takes, that its answers are aiohttp's, and the connection's order, keep-alive and close."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from sentpipe.ingress.app import WEBHOOK, WebhookHandler, create_app, producer_for
from sentpipe.ingress.protocol import WebhookProtocol
from sentpipe.schemas.samples import SampleFactory
from sentpipe.schemas.signature import signature_headers
from sentpipe.schemas.topics import Topics
from sentpipe.settings import Settings
from tests.http_tools import ingress_server
from tests.kafka_tools import read_topic

Answer = tuple[int, dict[str, str], bytes]


class Ingress:
    """The ingress app served with the shortcut; `routed` lists the paths aiohttp's request cycle answered."""

    def __init__(self, server: TestServer, routed: list[str]) -> None:
        assert server.port is not None and server.runner is not None
        self.server = server
        self.port = server.port
        self.routed = routed
        self.webhook: WebhookHandler = server.app[WEBHOOK]  # type: ignore[index]

    def connections(self) -> list[WebhookProtocol]:
        """The server's open connections (each a WebhookProtocol, or the shortcut is not in place)."""
        assert self.server.runner is not None and self.server.runner.server is not None
        found = self.server.runner.server.connections
        assert all(isinstance(c, WebhookProtocol) for c in found)
        return [c for c in found if isinstance(c, WebhookProtocol)]

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)

    async def exchange(self, request: bytes) -> Answer:
        reader, writer = await self.connect()
        try:
            writer.write(request)
            return await read_answer(reader)
        finally:
            writer.close()


@asynccontextmanager
async def serving(s: Settings) -> AsyncIterator[Ingress]:
    app = create_app(s, producer_for(s))
    routed: list[str] = []

    async def note(request: web.Request, response: web.StreamResponse) -> None:
        routed.append(request.path_qs)  # runs for what aiohttp's cycle answers, never for the shortcut

    app.on_response_prepare.append(note)
    server = await ingress_server(app)
    ingress = Ingress(server, routed)
    try:
        yield ingress
    finally:
        await server.close()


async def read_answer(reader: asyncio.StreamReader, timeout: float = 30.0) -> Answer:
    async def read() -> Answer:
        status_line = await reader.readline()
        assert status_line.startswith(b"HTTP/1."), status_line
        headers: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            assert name.lower() not in headers, f"{name} twice"
            headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers["content-length"]))
        return int(status_line.split()[1]), headers, body

    return await asyncio.wait_for(read(), timeout)


def request(
    path: str,
    body: bytes,
    headers: dict[str, str] | None = None,
    *,
    secret: str | None = None,
    version: str = "1.1",
    webhook_id: str = "msg_1",
) -> bytes:
    """A POST as Sent sends it (signed with `secret` unless None given and `headers` carry their own)."""
    sent: dict[str, str] = {"Content-Type": "application/json", "x-request-id": "req-1"}
    if secret is not None:
        sent.update(signature_headers(secret, webhook_id, int(time.time()), body))
    sent.update(headers or {})
    lines = [f"POST {path} HTTP/{version}", "Host: 127.0.0.1", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in sent.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def comparable(answer: Answer) -> tuple[int, dict[str, str], bytes]:
    status, headers, body = answer
    return status, {k: v for k, v in headers.items() if k != "date"}, body


async def test_the_shortcut_answers_what_aiohttp_s_cycle_answers(settings: Settings, topics: Topics) -> None:
    s = settings.model_copy(update={"max_body_bytes": 4096})
    secret = s.webhook_secret.get_secret_value()
    f = SampleFactory(41)
    good = f.message_status("m41", "delivered").body
    cases: dict[str, tuple[bytes, dict[str, str], str | None]] = {
        "accepted": (good, {}, secret),
        "bad signature": (good, {}, "whsec_" + "d3Jvbmcx" * 4),
        "unsigned": (good, {}, None),
        "not JSON": (b"{", {}, secret),
        "wrong content type": (good, {"Content-Type": "text/plain"}, secret),
        "too large": (b" " * 5000, {}, secret),
        "no request id": (good, {"x-request-id": "has space"}, secret),
    }
    async with serving(s) as ingress:
        for name, (body, extra, key) in cases.items():
            direct = await ingress.exchange(request("/webhooks/sent", body, extra, secret=key))
            routed = await ingress.exchange(request("/webhooks/sent?via=router", body, extra, secret=key))
            direct_headers = direct[1]
            if name == "no request id":  # each gets a new id: equal in form, not in value
                assert len(direct_headers.pop("x-request-id")) == len(routed[1].pop("x-request-id")) == 32
            assert comparable(direct) == comparable(routed), name
            assert direct_headers["content-type"] == "application/json", name
            assert orjson.loads(direct[2]), name
        assert ingress.routed == ["/webhooks/sent?via=router"] * len(cases)
    # Stored once per request that was answered 200 for an event: the accepted pair and "no request id".
    assert len(read_topic(s.kafka_bootstrap, topics.raw, at_least=4)) == 4
    assert len(read_topic(s.kafka_bootstrap, topics.dlq, at_least=2)) == 2  # "not JSON", twice


async def test_tenant_paths_take_the_shortcut_only_when_the_router_would_read_them_alike(
    settings: Settings,
) -> None:
    secret = settings.webhook_secret.get_secret_value()
    body = SampleFactory(42).inbound().body
    async with serving(settings) as ingress:
        plain = await ingress.exchange(request("/webhooks/sent/default", body, secret=secret))
        escaped = await ingress.exchange(request("/webhooks/sent/defaul%74", body, secret=secret))
        unknown = await ingress.exchange(request("/webhooks/sent/nobody", body, secret=secret))
        unknown_escaped = await ingress.exchange(request("/webhooks/sent/nobod%79", body, secret=secret))
        nested = await ingress.exchange(request("/webhooks/sent/default/x", body, secret=secret))
        # Dot segments are not resolved by either path: a tenant named ".." is just an unknown tenant.
        dots = await ingress.exchange(request("/webhooks/sent/..", body, secret=secret))
        dots_routed = await ingress.exchange(request("/webhooks/sent/..?via=router", body, secret=secret))
    assert comparable(plain) == comparable(escaped) and plain[0] == 200
    # An unknown tenant is a bad signature on either path (same status, same body).
    assert comparable(unknown) == comparable(unknown_escaped) and unknown[0] == 401
    assert nested[0] == 404
    assert comparable(dots) == comparable(dots_routed) and dots[0] == 401
    assert ingress.routed == [
        "/webhooks/sent/defaul%74",
        "/webhooks/sent/nobod%79",
        "/webhooks/sent/default/x",
        "/webhooks/sent/..?via=router",
    ]


async def test_requests_the_shortcut_leaves_to_aiohttp(settings: Settings) -> None:
    secret = settings.webhook_secret.get_secret_value()
    f = SampleFactory(43)
    async with serving(settings) as ingress:
        # HTTP/1.0, Connection: close and Expect are aiohttp's to answer (it closes, or says 100 Continue).
        b1, b2, b3 = f.inbound().body, f.inbound().body, f.inbound().body
        old = await ingress.exchange(request("/webhooks/sent", b1, secret=secret, version="1.0"))
        closing = await ingress.exchange(
            request("/webhooks/sent", b2, {"Connection": "close"}, secret=secret)
        )
        reader, writer = await ingress.connect()
        writer.write(request("/webhooks/sent", b3, {"Expect": "100-continue"}, secret=secret)[: -len(b3)])
        assert await reader.readline() == b"HTTP/1.1 100 Continue\r\n"
        assert await reader.readline() == b"\r\n"
        writer.write(b3)
        expected = await read_answer(reader)
        writer.close()
        # A body that is still on its way when the headers are read.
        b4 = f.inbound().body
        reader, writer = await ingress.connect()
        writer.write(request("/webhooks/sent", b4, secret=secret)[:-10])
        await asyncio.sleep(0.2)
        writer.write(b4[-10:])
        partial = await read_answer(reader)
        writer.close()
        # Another method on the path, and a chunked body.
        get = await ingress.exchange(b"GET /webhooks/sent HTTP/1.1\r\nHost: x\r\n\r\n")
        b5 = f.inbound().body
        chunked = request("/webhooks/sent", b5, {"Transfer-Encoding": "chunked"}, secret=secret)
        chunked = chunked.replace(f"Content-Length: {len(b5)}\r\n".encode(), b"")
        chunked = chunked[: -len(b5)] + b"%x\r\n" % len(b5) + b5 + b"\r\n0\r\n\r\n"
        by_chunks = await ingress.exchange(chunked)
    assert [a[0] for a in (old, closing, expected, partial, by_chunks)] == [200] * 5
    assert closing[1]["connection"] == "close"
    assert get[0] == 405 and orjson.loads(get[2])["error"] == "method_not_allowed"
    assert ingress.routed == ["/webhooks/sent"] * 6


async def test_one_connection_keeps_alive_across_many_shortcut_answers(
    settings: Settings, topics: Topics
) -> None:
    secret = settings.webhook_secret.get_secret_value()
    f = SampleFactory(44)
    bodies = [f.message_status(f"m{i}", "sent").body for i in range(20)]
    async with serving(settings) as ingress:
        reader, writer = await ingress.connect()
        answers = []
        for i, body in enumerate(bodies):
            writer.write(request("/webhooks/sent", body, {"x-request-id": f"r{i}"}, secret=secret))
            answers.append(await read_answer(reader))
        writer.close()
    assert [(a[0], a[1]["x-request-id"]) for a in answers] == [(200, f"r{i}") for i in range(20)]
    assert all("connection" not in a[1] for a in answers)
    assert ingress.routed == []
    assert len(read_topic(settings.kafka_bootstrap, topics.raw, at_least=20)) == 20


def gate_first_answer(webhook: WebhookHandler) -> tuple[asyncio.Event, asyncio.Event]:
    """Hold the first answer until `release` is set; `entered` is set once the first request is in it."""
    entered, release = asyncio.Event(), asyncio.Event()
    respond: Callable[..., Awaitable[object]] = webhook.respond
    calls = 0

    async def gated(*args: object) -> object:
        nonlocal calls
        calls += 1
        if calls == 1:
            entered.set()
            await release.wait()
        return await respond(*args)

    webhook.respond = gated  # type: ignore[method-assign,assignment]
    return entered, release


async def wait_for(condition: Callable[[], bool]) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never held")


async def test_a_request_pipelined_behind_a_shortcut_answer_is_answered_after_it(settings: Settings) -> None:
    secret = settings.webhook_secret.get_secret_value()
    f = SampleFactory(45)
    first, second = f.inbound().body, f.inbound().body
    async with serving(settings) as ingress:
        entered, release = gate_first_answer(ingress.webhook)
        reader, writer = await ingress.connect()
        writer.write(request("/webhooks/sent", first, {"x-request-id": "first"}, secret=secret))
        await asyncio.wait_for(entered.wait(), 10)
        writer.write(request("/webhooks/sent", second, {"x-request-id": "second"}, secret=secret))
        # The second request's bytes are held by the connection until the first is answered.
        await wait_for(lambda: any(c._held for c in ingress.connections()))
        release.set()
        one, two = await read_answer(reader), await read_answer(reader)
        writer.close()
    assert [(a[0], a[1]["x-request-id"]) for a in (one, two)] == [(200, "first"), (200, "second")]
    assert ingress.routed == []  # the held request took the shortcut too, once it was its turn


async def test_a_request_split_across_a_held_answer_is_parsed_whole_after_it(settings: Settings) -> None:
    """The first request and the head of the second come in one segment (the parser keeps that head), the
    rest of the second while the first is being answered (held): the second is parsed from both parts."""
    secret = settings.webhook_secret.get_secret_value()
    f = SampleFactory(48)
    first = request("/webhooks/sent", f.inbound().body, {"x-request-id": "first"}, secret=secret)
    second = request("/webhooks/sent", f.inbound().body, {"x-request-id": "second"}, secret=secret)
    async with serving(settings) as ingress:
        entered, release = gate_first_answer(ingress.webhook)
        reader, writer = await ingress.connect()
        writer.write(first + second[:40])
        await asyncio.wait_for(entered.wait(), 10)
        writer.write(second[40:])
        await wait_for(lambda: any(c._held for c in ingress.connections()))
        release.set()
        one, two = await read_answer(reader), await read_answer(reader)
        writer.close()
    assert [(a[0], a[1]["x-request-id"]) for a in (one, two)] == [(200, "first"), (200, "second")]
    assert ingress.routed == []


async def test_two_requests_in_one_segment_are_answered_in_order(settings: Settings) -> None:
    secret = settings.webhook_secret.get_secret_value()
    f = SampleFactory(46)
    async with serving(settings) as ingress:
        reader, writer = await ingress.connect()
        writer.write(
            request("/webhooks/sent", f.inbound().body, {"x-request-id": "a"}, secret=secret)
            + request("/webhooks/sent", f.inbound().body, {"x-request-id": "b"}, secret=secret)
        )
        one, two = await read_answer(reader), await read_answer(reader)
        writer.close()
    assert [(a[0], a[1]["x-request-id"]) for a in (one, two)] == [(200, "a"), (200, "b")]


async def test_a_handler_that_raises_answers_a_json_500_and_closes_on_either_path(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    secret = settings.webhook_secret.get_secret_value()
    body = SampleFactory(47).inbound().body
    answers = []
    async with serving(settings) as ingress:

        def boom(*args: object) -> object:
            raise RuntimeError("a bug")

        monkeypatch.setattr(ingress.webhook, "_handle", boom)
        for path in ("/webhooks/sent", "/webhooks/sent?via=router"):
            reader, writer = await ingress.connect()
            writer.write(request(path, body, secret=secret))
            answers.append(await read_answer(reader))
            assert await asyncio.wait_for(reader.read(), 10) == b""  # closed
            writer.close()
    assert comparable(answers[0]) == comparable(answers[1])
    status, headers, answer = answers[0]
    assert (status, orjson.loads(answer)["error"], headers["connection"]) == (500, "internal_error", "close")
    assert b"a bug" not in answer
    assert ingress.routed == ["/webhooks/sent?via=router"]
    assert [r.exc_info is not None for r in caplog.records if r.message == "unexpected error"] == [True] * 2
