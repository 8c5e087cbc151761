"""Resource exhaustion at the ingress's HTTP edge, against the real broker: clients that do not read their
answers (connections held for ever, unsent answers growing), and `Expect: 100-continue` on a request its
headers already refuse."""

from __future__ import annotations

import asyncio
import os
import resource
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import orjson

from sentpipe.ingress.app import WEBHOOK, WebhookHandler, create_app, producer_for
from sentpipe.ingress.protocol import WebhookProtocol
from sentpipe.schemas.samples import SampleFactory
from sentpipe.schemas.signature import signature_headers
from sentpipe.settings import Settings
from tests.http_tools import ingress_server, post_signed, read_response
from tests.processes import start_ingress

# An unsigned webhook: answered 401 at once, its answer (echoing the request id) larger than the request.
UNSIGNED = (
    b"POST /webhooks/sent HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
    b"x-request-id: " + b"r" * 128 + b"\r\n\r\n{}"
)


def signed_request(secret: str, body: bytes, extra: bytes = b"") -> bytes:
    headers = signature_headers(secret, f"msg_{time.time_ns()}", int(time.time()), body)
    lines = [b"POST /webhooks/sent HTTP/1.1", b"Host: x", b"Content-Type: application/json"]
    lines += [f"Content-Length: {len(body)}".encode(), *(f"{k}: {v}".encode() for k, v in headers.items())]
    return b"\r\n".join(lines) + b"\r\n" + extra + b"\r\n" + body


def not_reading(port: int) -> socket.socket:
    """A connected client socket with a small receive buffer, which its owner never reads."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    return await asyncio.wait_for(read_response(reader), 30)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def accepted(port: int) -> int:
    """Connections the ingress has accepted on `port` and still holds (established, or closed by the client
    only), from the kernel's table: its descriptors also count its broker connections, which come and go."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as fh:
            for line in fh.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                if int(local.rsplit(":", 1)[1], 16) == port and state in ("01", "08"):
                    count += 1
    return count


async def wait_until(condition: Callable[[], bool], deadline_s: float) -> bool:
    """Poll `condition` until it holds or `deadline_s` (a generous bound, not a measurement) passes."""
    end = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > end:
            return False
        await asyncio.sleep(0.2)
    return True


# --- a client that does not read its answers ----------------------------------------------------------------
async def test_connections_whose_client_never_reads_are_dropped_not_held_for_ever(
    settings: Settings, tmp_path: Path
) -> None:
    """Pipelined requests and no reading: once the answers fill the socket, aiohttp's writer waited for the
    client without a timeout, so every such connection (its descriptor and megabytes of socket buffers) was
    held for as long as the client liked; the keep-alive timeout does not apply to a connection mid-answer."""
    proc, base, _ = start_ingress(settings, tmp_path, body_timeout_s=1)
    assert proc.p is not None
    pid, port = proc.p.pid, int(base.rsplit(":", 1)[1])
    loop = asyncio.get_running_loop()
    try:
        baseline = open_fds(pid)
        assert await wait_until(lambda: accepted(port) == 0, 10)  # the readiness probe's connection is gone
        clients = [not_reading(port) for _ in range(3)]

        async def fill(sock: socket.socket) -> int:
            """Pipeline until the ingress stops reading (a send waits 2 s) or drops the connection: how many
            requests went."""
            sent = 0
            while True:
                try:
                    await asyncio.wait_for(loop.sock_sendall(sock, UNSIGNED * 500), 2)
                except (TimeoutError, ConnectionError):
                    return sent
                sent += 500

        sent = await asyncio.gather(*(fill(sock) for sock in clients))
        assert all(n >= 500 for n in sent), sent
        # SENTPIPE_BODY_TIMEOUT_S (1 s) after its answers stop moving each is dropped; the deadline only
        # leaves room for the requests already read to be answered first.
        dropped = await wait_until(lambda: accepted(port) == 0, 90)
        held = accepted(port)
        for sock in clients:
            sock.close()
        assert dropped, f"{held} connections still held by clients that do not read"
        assert open_fds(pid) <= baseline + 2, (open_fds(pid), baseline)  # none left (librdkafka's may vary)
        body = SampleFactory(61).inbound().body
        status, _, answer = await asyncio.to_thread(
            post_signed, f"{base}/webhooks/sent", body, settings.webhook_secret.get_secret_value()
        )
        assert status == 200, answer
    finally:
        assert proc.p.poll() is None, proc.tail()
        assert proc.stop() == 0, proc.tail()
    log = proc.log.read_text(errors="replace")
    assert "write timeout" in log
    assert "Traceback" not in log and " ERROR " not in log, proc.tail()


@asynccontextmanager
async def serving(
    s: Settings,
) -> AsyncIterator[tuple[int, WebhookHandler, Callable[[], list[WebhookProtocol]]]]:
    """The ingress app in this process (with the shortcut): its port, webhook handler and open connections."""
    server = await ingress_server(create_app(s, producer_for(s)))
    assert server.port is not None and server.runner is not None and server.runner.server is not None
    web_server = server.runner.server

    def connections() -> list[WebhookProtocol]:
        return [c for c in web_server.connections if isinstance(c, WebhookProtocol)]

    try:
        yield server.port, server.app[WEBHOOK], connections  # type: ignore[index]
    finally:
        await server.close()


async def small_server_buffer(connections: Callable[[], list[WebhookProtocol]]) -> WebhookProtocol:
    """The one open connection, its kernel send buffer made small: unread answers fill it in kilobytes."""
    assert await wait_until(lambda: len(connections()) == 1, 10)
    (conn,) = connections()
    assert conn.transport is not None
    conn.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    return conn


async def test_the_shortcut_reads_no_more_requests_while_its_answers_are_not_taken(
    settings: Settings,
) -> None:
    """One request at a time, each answered by the shortcut before the next is sent, and the answers never
    read: the shortcut wrote every answer into the transport's buffer and went on reading, so one connection
    grew the process's memory by an answer per request, without bound (aiohttp's own writer waits)."""
    s = settings.model_copy(update={"body_timeout_s": 30.0})  # the write timer is not what this is about
    loop = asyncio.get_running_loop()
    async with serving(s) as (port, webhook, connections):
        answered, one_more = 0, asyncio.Event()
        respond: Callable[..., Awaitable[object]] = webhook.respond

        async def counted(*args: object) -> object:
            nonlocal answered
            result = await respond(*args)
            answered += 1
            one_more.set()
            return result

        webhook.respond = counted  # type: ignore[method-assign,assignment]
        sock = not_reading(port)
        conn = await small_server_buffer(connections)
        assert conn.transport is not None
        transport = conn.transport
        unsent = 0
        requests = 3000  # ~1.2 MB of answers
        for _ in range(requests):
            one_more.clear()
            await loop.sock_sendall(sock, UNSIGNED)
            try:
                await asyncio.wait_for(one_more.wait(), 2)
            except TimeoutError:
                break  # the ingress stopped taking requests: its answers are not read
            unsent = max(unsent, transport.get_write_buffer_size())
        sock.close()
    assert answered < requests, "every request was answered though no answer was read"
    assert unsent < 16 * 1024, f"{unsent} bytes of answers buffered for a client that does not read"


async def test_a_connection_closed_with_unread_answers_is_dropped(settings: Settings) -> None:
    """Pipelined requests, the last with `Connection: close`, answers never read: less than the transport's
    pause mark (64 KiB) stayed unsent, so writing never paused, and the close waited for the client to read
    them, for ever: the connection (and its descriptor) stayed open."""
    s = settings.model_copy(update={"body_timeout_s": 1.0})
    loop = asyncio.get_running_loop()
    async with serving(s) as (port, _, connections):
        sock = not_reading(port)
        await small_server_buffer(connections)
        closing = UNSIGNED.replace(b"Host: x\r\n", b"Host: x\r\nConnection: close\r\n")
        await loop.sock_sendall(sock, UNSIGNED * 100 + closing)  # ~40 KB of answers
        dropped = await wait_until(lambda: not connections(), 60)
        sock.close()
    assert dropped, "the connection waits for a client that does not read"


# --- Expect: 100-continue -----------------------------------------------------------------------------------
async def test_expect_continue_is_not_sent_for_a_body_the_headers_already_refuse(settings: Settings) -> None:
    """`Expect: 100-continue` with a Content-Length over the limit (or the wrong content type) was invited to
    send its body (100 Continue), then refused 413 (415); an expectation other than 100-continue got
    aiohttp's plain-text 417, not a JSON error."""
    secret = settings.webhook_secret.get_secret_value()
    body = SampleFactory(62).inbound().body
    too_long = settings.max_body_bytes + 1
    async with serving(settings) as (port, _, _):

        async def first_answer(raw: bytes, closed: bool = False) -> tuple[int, dict[str, str], bytes]:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(raw)
                answer = await read_answer(reader)
                if closed:  # by the ingress, at once: not after reading the unwanted body for 10 s
                    assert await asyncio.wait_for(reader.read(), 5) == b""
                return answer
            finally:
                writer.close()

        for path in ("/webhooks/sent", "/webhooks/sent/default?via=router"):
            over = signed_request(secret, body, b"Expect: 100-continue\r\n")[: -len(body)]
            over = over.replace(
                f"Content-Length: {len(body)}".encode(), f"Content-Length: {too_long}".encode()
            )
            over = over.replace(b"/webhooks/sent", path.encode(), 1)
            status, headers, answer = await first_answer(over, closed=True)
            assert (status, orjson.loads(answer)["error"]) == (413, "body_too_large"), answer
            assert headers["connection"] == "close"
            # Without the expectation: refused from its headers too, and the body it announced never read.
            status, headers, answer = await first_answer(
                over.replace(b"Expect: 100-continue\r\n", b""), closed=True
            )
            assert (status, orjson.loads(answer)["error"]) == (413, "body_too_large"), answer
            assert headers["connection"] == "close"
            text = signed_request(secret, body, b"Expect: 100-continue\r\n")[: -len(body)]
            text = text.replace(b"application/json", b"text/plain").replace(
                b"/webhooks/sent", path.encode(), 1
            )
            status, headers, answer = await first_answer(text)
            assert (status, orjson.loads(answer)["error"]) == (415, "unsupported_media_type"), answer
            assert headers["connection"] == "close"
        for raw in (
            signed_request(secret, body, b"Expect: 200-ok\r\n")[: -len(body)],
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nExpect: 200-ok\r\n\r\n",
        ):
            status, headers, answer = await first_answer(raw)
            assert (status, headers["content-type"]) == (417, "application/json"), answer
            assert orjson.loads(answer)["error"] == "expectation_failed"
        # A body within the limits is still invited, and accepted.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(signed_request(secret, body, b"Expect: 100-continue\r\n")[: -len(body)])
        assert await asyncio.wait_for(reader.readline(), 30) == b"HTTP/1.1 100 Continue\r\n"
        assert await reader.readline() == b"\r\n"
        writer.write(body)
        assert (await read_answer(reader))[0] == 200
        writer.close()


async def test_a_request_target_no_route_can_match_gets_a_json_404(settings: Settings) -> None:
    """`OPTIONS *` and CONNECT's `host:port` are not paths, so the catch-all route never saw them: aiohttp
    answered its plain-text `404: Not Found`, the one answer that was not JSON."""
    async with serving(settings) as (port, _, _):
        for raw in (
            b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
            b"CONNECT 127.0.0.1:9092 HTTP/1.1\r\nHost: 127.0.0.1:9092\r\n\r\n",
            b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n",  # the catch-all's, for comparison
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(raw)
            status, headers, answer = await read_answer(reader)
            writer.close()
            assert (status, headers["content-type"]) == (404, "application/json"), (raw, answer)
            assert orjson.loads(answer) == {"error": "not_found", "detail": "Not Found"}


# --- slow heads and bodies on a real `sentpipe ingress` (uvloop) --------------------------------------------
async def test_a_head_begun_with_the_connection_is_timed_out_like_any_other(
    settings: Settings, tmp_path: Path
) -> None:
    """uvloop hands over bytes that came with the connection before aiohttp's task waits for a request:
    such a partial head started no head timer and was held, unanswered, until keep-alive ended it (75 s)."""
    proc, base, _ = start_ingress(settings, tmp_path, body_timeout_s=1)
    port = int(base.rsplit(":", 1)[1])
    partial = b"POST /webhooks/sent HTTP/1.1\r\nHost: x\r\nContent-Type: appli"

    async def begun_at_connect() -> int:
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(partial)  # at once: in the same loop round as the connection, often
        reader, writer = await asyncio.open_connection(sock=sock)
        try:
            status, _, body = await read_answer(reader)  # waits 30 s at most: well short of 75 s
            assert orjson.loads(body)["error"] == "header_timeout"
            return status
        finally:
            writer.close()

    try:
        statuses = await asyncio.gather(*(begun_at_connect() for _ in range(10)))
    finally:
        assert proc.stop() == 0, proc.tail()
    assert statuses == [408] * 10


async def test_a_slow_body_is_answered_408_and_its_connection_closed_at_once(
    settings: Settings, tmp_path: Path
) -> None:
    """The 408 came on time, but aiohttp then read what was left of the body for up to 10 s more (its
    lingering close) before closing: a slow client kept its connection 10 s past its timeout."""
    proc, base, _ = start_ingress(settings, tmp_path, body_timeout_s=1)
    port = int(base.rsplit(":", 1)[1])
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        body = SampleFactory(63).inbound().body
        writer.write(signed_request(settings.webhook_secret.get_secret_value(), body)[:-10])
        status, _, answer = await read_answer(reader)
        assert (status, orjson.loads(answer)["error"]) == (408, "body_timeout")
        # Closed by the ingress with nothing more sent: EOF, well before the 10 s lingering would end.
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
    finally:
        assert proc.stop() == 0, proc.tail()


def _open_files_soft_limit(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no open files limit")


def test_the_ingress_raises_its_open_files_limit_to_the_hard_one(settings: Settings, tmp_path: Path) -> None:
    """Started under a soft limit of 256 (systemd's default is 1,024), it reset connections at accept while
    the hard limit allowed many more; it now raises the soft limit to the hard one at start."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # An unlimited hard limit has no soft counterpart on Linux: give the ingress a finite one.
    child_hard = 8192 if hard == resource.RLIM_INFINITY else hard
    assert child_hard > 256, f"this test needs a hard limit above 256, not {hard}"
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, child_hard))
    try:
        proc, _, _ = start_ingress(settings, tmp_path)  # inherits the 256
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        assert proc.p is not None
        assert _open_files_soft_limit(proc.p.pid) == child_hard
    finally:
        proc.stop()
