"""The webhook port's connection protocol: aiohttp's own, with a shortcut for the request Sent makes.

aiohttp answers each request through its request cycle: a waiter to wake its connection task, a
`web.Request`, a task, a `web.Response` prepared and written header by header. For a no-op handler that
cycle is about 60% of the cost (`bench/RESULTS.md`, "The webhook shortcut"). A webhook that arrives whole
on an idle connection (POST to the webhook path, HTTP/1.1 keep-alive, a Content-Length body already read,
no `Expect`) goes from the parser to `WebhookHandler.respond` and its answer is written in one piece.
Everything else keeps aiohttp's cycle unchanged: other paths and methods, a body still arriving, chunked
bodies, parse errors, upgrades, and a request pipelined behind one being answered (held until that answer
is written, so answers keep their order). The answers are the same either way: the same handler builds
them, and `tests/test_ingress_protocol.py` compares their status, headers and body.

This reaches into `aiohttp.web_protocol.RequestHandler`'s connection state (`_waiter`, `_messages`,
`_parser`): `pyproject.toml` pins aiohttp's 3.14 series, and the tests above fail if that state changes
shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from http import HTTPStatus
from typing import Any

from aiohttp import hdrs, web
from aiohttp.helpers import HeadersMixin, rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE, HttpVersion11, RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from multidict import CIMultiDictProxy

from sentpipe import metrics as m
from sentpipe.guarded_http import error_answer, logged_as_the_clients
from sentpipe.ingress.app import WEBHOOK, WEBHOOK_PATH, Answer, WebhookHandler, failed, request_id_of
from sentpipe.settings import UNKNOWN_TENANT

# The tenant segment the shortcut takes: characters a URL carries unencoded, so the router would have
# matched the same name. Anything else (percent-escapes, a further slash) goes through the router.
_TENANT_PATH = re.compile(re.escape(WEBHOOK_PATH) + r"/([A-Za-z0-9._~-]{1,255})")
_SERVER = SERVER_SOFTWARE.encode()
log = logging.getLogger("sentpipe.ingress")


def _count_refused(code: str, status: int) -> None:
    # Counted with the webhook answers: a request the parser refused reached no handler, and its tenant is
    # not known (aiohttp hands over a placeholder path).
    m.INGRESS_REQUESTS.inc((UNKNOWN_TENANT, code, str(status)))


class Posted(HeadersMixin):
    """A webhook request that came whole: what `WebhookHandler.respond` reads of a `web.Request`."""

    __slots__ = ("_headers", "content")
    _headers: CIMultiDictProxy[str]

    def __init__(self, headers: CIMultiDictProxy[str], content: StreamReader) -> None:
        self._headers = headers
        self.content = content

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        return self._headers

    async def read(self) -> bytes:
        return self.content.read_nowait()  # the whole body is in the buffer: the shortcut takes no other


_STATUS_LINES = {int(s): b"HTTP/1.1 %d %s\r\n" % (s, s.phrase.encode()) for s in HTTPStatus}


def encode_answer(answer: Answer, request_id: str, close: bool = False) -> bytes:
    """The answer as aiohttp writes it to an HTTP/1.1 request (the same headers; their order may differ)."""
    body = answer.body
    head = [
        _STATUS_LINES.get(answer.status) or b"HTTP/1.1 %d \r\n" % answer.status,
        b"Content-Type: application/json\r\nx-request-id: ",
        request_id.encode(),  # printable ASCII (`request_id_of`)
        b"\r\nContent-Length: %d\r\nDate: " % len(body),
        rfc822_formatted_time().encode(),
        b"\r\nServer: " + _SERVER + b"\r\n",
    ]
    head += [f"{name}: {value}\r\n".encode() for name, value in answer.headers]
    if close:
        head.append(b"Connection: close\r\n")
    head += [b"\r\n", body]
    return b"".join(head)


class WebhookProtocol(RequestHandler):
    """aiohttp's `RequestHandler` for one connection, answering whole webhooks itself (module docstring)."""

    __slots__ = ("_answer_task", "_answering", "_head_timer", "_held", "_started", "_webhook", "_write_timer")

    def __init__(self, manager: web.Server, *, webhook: WebhookHandler, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._webhook = webhook
        self._answering = False  # a shortcut answer not yet written
        self._held = b""  # bytes that arrived meanwhile, parsed once it is
        self._answer_task: asyncio.Task[None] | None = None  # the loop keeps only a weak reference
        # Running while a request's head has begun and not ended: aiohttp has no such timeout, so a client
        # trickling headers held its connection until the keep-alive timeout, with no request to time out.
        self._head_timer: asyncio.TimerHandle | None = None
        # Running while answers wait in this process for the client to read them (writing is paused), for
        # SENTPIPE_BODY_TIMEOUT_S: aiohttp waits for that without a timeout, and the keep-alive timer does not
        # run mid-answer, so a client that never read held its connection (and socket buffers) for ever.
        self._write_timer: asyncio.TimerHandle | None = None
        self._started = False  # aiohttp's task for the connection has begun (`start`)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # Writing pauses as soon as an answer cannot go straight into the socket, whose kernel buffer holds
        # megabytes: only a client that does not read its answers gets there (Sent's are a few hundred
        # bytes each). At the default mark (64 KiB) a connection closed with less than that unsent was never
        # paused, and its close waited for the client to read it, for ever; at 0 every unsent byte is under
        # the write timer. One call per connection, nothing per request.
        if self.transport is not None:  # set by connection_made just now
            self.transport.set_write_buffer_limits(high=0)
        if self._webhook.closing:
            self.force_close()  # accepted just before the listening socket closed: no request read yet

    def _idle(self) -> bool:
        """Between requests: none in hand (being answered, handled, queued or with its head begun)."""
        waiter = self._waiter
        return (
            waiter is not None
            and not waiter.done()
            and not self._messages
            and not self._answering
            and self._head_timer is None
        )

    def stop_reading(self) -> None:
        """Shutdown: this connection reads no new request. One in hand is still read to its end (its body
        may be arriving) and answered with `Connection: close`, then the connection closes; an idle one
        closes now. aiohttp's own `close()` stops reading at once, the rest of a body in hand included."""
        if self._idle():
            self.force_close()

    async def shutdown(self, timeout: float | None = 15.0) -> None:
        """aiohttp's shutdown waits for the request its own cycle handles, but the shortcut's answer task is
        not one it knows of (its in-progress flag never rises): it closed the connection under it, and a
        record already on the broker was never answered (Sent's retry: a duplicate)."""
        task = self._answer_task
        if task is not None and not task.done():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await asyncio.shield(task)
        await super().shutdown(timeout)

    async def finish_response(
        self, request: BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        if self._webhook.closing:
            resp.force_close()  # the last answer on this connection says so (unless already written)
        return await super().finish_response(request, resp, start_time)

    def pause_writing(self) -> None:
        super().pause_writing()
        transport = self.transport
        if transport is not None and self._write_timer is None:
            self._write_timer = self._loop.call_later(
                self._webhook.body_timeout_s, self._write_timed_out, transport
            )

    def resume_writing(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        super().resume_writing()

    def _write_timed_out(self, transport: asyncio.Transport) -> None:
        self._write_timer = None
        m.INGRESS_REFUSED.labels("write_timeout").inc()
        log.info("write timeout: the client did not read its answers in time")
        # close() would first wait for the unsent bytes, i.e. for ever: the connection is dropped instead.
        transport.abort()
        self.force_close()

    def data_received(self, data: bytes) -> None:
        if self._webhook.closing and self._idle():
            # A new request after shutdown began: not read, so never half done; the client sends it again.
            self.force_close()
            return
        if self._answering:
            # A request pipelined behind the one being answered: it waits, and so does the socket.
            self._held += data
            if self.transport is not None:
                self.transport.pause_reading()
            return
        waiter = self._waiter
        if waiter is None or waiter.done() or self._messages:
            super().data_received(data)  # aiohttp's task is busy with a request: queue behind it
            if not self._started and not self._messages and self._head_timer is None:
                # The first bytes came before the task began waiting (uvloop delivers them in the same
                # round as the connection): a head begun, timed like any other, not left to keep-alive.
                self._head_timer = self._loop.call_later(self._webhook.body_timeout_s, self._head_timed_out)
            return
        # aiohttp's task waits for a request: parse without waking it until the request is known not ours.
        self._waiter = None
        try:
            super().data_received(data)
        finally:
            self._waiter = waiter
        messages = self._messages
        if not messages:
            if self._head_timer is None:
                self._head_timer = self._loop.call_later(self._webhook.body_timeout_s, self._head_timed_out)
        elif self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if len(messages) == 1:
            msg, payload = messages[0]
            # A parse error comes as aiohttp's own note, not a RawRequestMessage: its task answers it 400.
            if isinstance(msg, RawRequestMessage):
                tenant = self._shortcut_tenant(msg, payload)
                if tenant is not None:
                    messages.popleft()
                    if self._parser is not None:
                        self._parser.message_consumed()
                    self._answering = True
                    # aiohttp's keep-alive timer sees an idle connection (its task waits): not for this long.
                    self._next_keepalive_close_time = self._loop.time() + self._keepalive_timeout
                    self._answer_task = self._loop.create_task(self._answer(msg, payload, tenant))
                    return
        if messages and not waiter.done():
            waiter.set_result(None)

    async def start(self) -> None:
        self._started = True
        await super().start()

    def _head_timed_out(self) -> None:
        self._head_timer = None
        waiter, transport = self._waiter, self.transport
        if self._messages or waiter is None or waiter.done() or transport is None or self._answering:
            return  # a request came after all
        m.INGRESS_REFUSED.labels("header_timeout").inc()
        log.info("header timeout: the request's head did not end in time")
        detail = f"the request's headers did not arrive within {self._webhook.body_timeout_s:g}s"
        transport.write(encode_answer(failed(408, "header_timeout", detail), request_id_of(None), close=True))
        self.force_close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        super().connection_lost(exc)

    def log_exception(self, *args: Any, **kwargs: Any) -> None:
        """A body that does not decode, or a connection closed mid-body, met again when aiohttp drains what
        is left of the body after the answer: the client's business, not an error of the ingress."""
        if not logged_as_the_clients(kwargs.get("exc_info"), log):
            super().log_exception(*args, **kwargs)

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's answer to a request it could not parse, or to a bug in a handler (a webhook body holds
        phone numbers and message text: its bytes must not reach the log or go back in plain text)."""
        return error_answer(request, status, exc, log, _count_refused)

    def _shortcut_tenant(self, msg: RawRequestMessage, payload: StreamReader) -> str | None:
        """The tenant when the request is a whole webhook the shortcut answers; else None."""
        if (
            msg.method != "POST"
            or msg.version != HttpVersion11
            or msg.should_close
            or msg.upgrade
            or msg.chunked
            or not payload.is_eof()
            or hdrs.EXPECT in msg.headers
        ):
            return None
        path = msg.path
        if path == WEBHOOK_PATH:
            return self._webhook.default_tenant
        match = _TENANT_PATH.fullmatch(path)
        return match.group(1) if match else None

    async def _answer(self, msg: RawRequestMessage, payload: StreamReader, tenant: str) -> None:
        answer, request_id = await self._webhook.respond(Posted(msg.headers, payload), tenant)
        transport = self.transport
        if transport is None:
            return  # the client left; the event is in Kafka all the same, and Sent's retry is a duplicate
        close = answer.close or self._force_close or self._webhook.closing
        transport.write(encode_answer(answer, request_id, close))
        if close:
            self.force_close()
            return
        self._next_keepalive_close_time = self._loop.time() + self._keepalive_timeout
        if self._paused:
            # The client is not reading its answers: read no more requests until it does (or the write
            # timer drops it), as aiohttp's writer waits; else every request read grew the unsent answers.
            try:
                await self._drain_helper()
            except ConnectionError:
                return
            if self.transport is None:
                return
        self._answering = False
        held, self._held = self._held, b""
        if held:
            transport.resume_reading()
            self.data_received(held)


class WebhookServer(web.Server):
    """aiohttp's low-level server, making `WebhookProtocol`s; a runner's server becomes one in place."""

    webhook: WebhookHandler

    def __call__(self) -> RequestHandler:
        return WebhookProtocol(self, loop=self._loop, webhook=self.webhook, **self._kwargs)


def stop_reading(runner: web.AppRunner) -> None:
    """Shutdown, once the listening socket is closed: no connection reads another request, so the requests
    in hand finish (steady keep-alive traffic kept them coming until the grace period cut everything) and
    each is answered before its connection closes (`WebhookProtocol.stop_reading`)."""
    server = runner.server
    if server is None:
        return
    runner.app[WEBHOOK].closing = True
    for conn in server.connections:
        if isinstance(conn, WebhookProtocol):
            conn.stop_reading()
        else:  # not this module's: aiohttp's own stop (a body in hand is not read on)
            conn.close()


def answer_webhooks_directly(runner: web.AppRunner) -> None:
    """Serve the runner's new connections with `WebhookProtocol`. Call it after `runner.setup()`; a site
    started already gets it for the connections it accepts from then on."""
    server = runner.server
    if server is None:
        raise RuntimeError("answer_webhooks_directly needs a runner that is set up")
    # In place, not a new server: a started site and the runner's shutdown hold this object.
    server.__class__ = WebhookServer
    assert isinstance(server, WebhookServer)
    server.webhook = runner.app[WEBHOOK]
