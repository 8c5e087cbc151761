"""The side ports (the ingress's and the worker's metrics and probes): any client gets there what it gets on
the webhook port (`ingress/protocol.py`), without the webhook shortcut.

- A request head not complete within `head_timeout_s` is answered 408 and its connection closed. aiohttp
  has no such timeout: a client trickling header bytes held its connection for ever, and enough of them
  used up the file descriptors the webhook port needs too (Sent's deliveries were reset at accept).
- A request aiohttp cannot parse is answered in JSON and logged at INFO without its bytes. aiohttp's own
  answer quoted the bytes back in plain text and logged them at ERROR with a traceback, so anything that
  reached the port could fill the log.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import ContentEncodingError, PayloadEncodingError
from aiohttp.web_protocol import RequestHandler, RequestPayloadError
from aiohttp.web_request import BaseRequest

log = logging.getLogger("sentpipe.http")

HEAD_TIMEOUT_S = 10.0

# (code, detail) -> an error answer's JSON body, in the shape of the API on that port.
ErrorBody = Callable[[str, str], bytes]


def code_and_detail(code: str, detail: str) -> bytes:
    """The ingress's shape (and its side ports'): `{"error": code, "detail": detail}`."""
    return orjson.dumps({"error": code, "detail": detail})


class GuardedProtocol(RequestHandler):
    """aiohttp's `RequestHandler` with a head timeout and quiet, JSON answers to malformed requests."""

    __slots__ = ("_error_body", "_head_timeout_s", "_head_timer")

    def __init__(
        self, manager: web.Server, *, head_timeout_s: float, error_body: ErrorBody, **kwargs: Any
    ) -> None:
        super().__init__(manager, **kwargs)
        self._head_timeout_s = head_timeout_s
        self._error_body = error_body
        self._head_timer: asyncio.TimerHandle | None = None  # running while a head has begun, not ended

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._messages:
            self._stop_head_timer()
        elif self._head_timer is None:
            self._head_timer = self._loop.call_later(self._head_timeout_s, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        transport, waiter = self.transport, self._waiter
        if self._messages or transport is None:
            return  # the head ended after all
        if waiter is None or waiter.done():
            # aiohttp's task is answering a request (or has not begun): an answer written now would land
            # in the middle of that one. Looked at again later.
            self._head_timer = self._loop.call_later(self._head_timeout_s, self._head_timed_out)
            return
        log.info("header timeout: the request's head did not end in time")
        detail = f"the request's headers did not arrive within {self._head_timeout_s:g}s"
        body = self._error_body("header_timeout", detail)
        transport.write(
            b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
        )
        self.force_close()

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def log_exception(self, *args: Any, **kwargs: Any) -> None:
        if not logged_as_the_clients(kwargs.get("exc_info"), log):
            super().log_exception(*args, **kwargs)

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        return error_answer(request, status, exc, log, body=self._error_body)


def logged_as_the_clients(exc: object, logger: logging.Logger) -> bool:
    """A body cut short or badly framed, met while aiohttp reads or drains it, is the client's doing: one
    INFO line (True), not aiohttp's ERROR with a traceback."""
    if isinstance(exc, (RequestPayloadError, PayloadEncodingError, ConnectionResetError)):
        logger.info("request body unreadable: %s", type(exc).__name__)
        return True
    return False


# aiohttp decodes these before the handler reads the body; the signature covers the decoded bytes.
ENCODINGS = "Content-Encoding must be gzip, deflate or identity (one coding)"


def decodable(content_encoding: str | None) -> bool:
    """A body aiohttp decoded, or did not need to: an unknown coding (or two stacked) was passed on as is,
    and its bytes answered 401 or went to the DLQ instead of a clear refusal."""
    return content_encoding is None or content_encoding.strip().lower() in ("", "identity", "gzip", "deflate")


def error_answer(
    request: BaseRequest,
    status: int,
    exc: BaseException | None,
    logger: logging.Logger,
    refused: Callable[[str, int], None] | None = None,
    body: ErrorBody = code_and_detail,
) -> web.StreamResponse:
    """aiohttp's answer to a request it could not parse, or to a bug in a handler: JSON, connection closed,
    and a log line without the request's bytes (aiohttp's own quoted them back and logged them at ERROR).
    `refused(code, status)` is told of each request refused this way (not of a bug's 500)."""
    code = "internal_error" if status >= 500 else "malformed_request"
    try:
        detail = HTTPStatus(status).phrase
    except ValueError:
        detail = "error"
    if isinstance(exc, ContentEncodingError):  # br or zstd: aiohttp knows them but has no decoder here
        status, code, detail = 415, "unsupported_encoding", ENCODINGS
    if status >= 500:
        logger.error("error handling request", exc_info=exc)  # a bug of ours: its traceback helps
    else:
        # The status sent, not the parser's: a br body was logged as a 400 and answered 415.
        logger.info("malformed HTTP request", extra={"status": status, "error": type(exc).__name__})
    if request.writer.output_size > 0:
        raise ConnectionError("an answer was sent already, the error cannot follow it")
    if refused is not None and status < 500:  # counted as answered: only once the answer can be sent
        refused(code, status)
    response = web.Response(status=status, body=body(code, detail), content_type="application/json")
    response.force_close()
    return response


@web.middleware
async def json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """aiohttp's own answers to a path no route has (404) or a method it does not take (405) in JSON with a
    code, as every other error on these ports: they were plain text ('404: Not Found'). A side port's few
    requests can afford the middleware; the webhook port uses fallback routes instead."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        try:
            phrase = HTTPStatus(exc.status).phrase
        except ValueError:
            phrase = "Error"
        code = "_".join(phrase.lower().split())  # not_found, method_not_allowed
        allow = exc.headers.get("Allow")
        return web.Response(
            status=exc.status,
            body=code_and_detail(code, phrase),
            content_type="application/json",
            headers={"Allow": allow} if allow is not None else None,
        )


class GuardedServer(web.Server):
    """aiohttp's low-level server, making `GuardedProtocol`s; a runner's server becomes one in place."""

    head_timeout_s: float
    error_body: ErrorBody

    def __call__(self) -> RequestHandler:
        return GuardedProtocol(
            self,
            loop=self._loop,
            head_timeout_s=self.head_timeout_s,
            error_body=self.error_body,
            **self._kwargs,
        )


def guard(
    runner: web.AppRunner, head_timeout_s: float = HEAD_TIMEOUT_S, error_body: ErrorBody = code_and_detail
) -> None:
    """Serve the runner's connections with `GuardedProtocol`, its errors shaped by `error_body`. Call it
    after `runner.setup()`, before its site starts."""
    server = runner.server
    if server is None:
        raise RuntimeError("guard needs a runner that is set up")
    # In place, not a new server: the runner's shutdown holds this object.
    server.__class__ = GuardedServer
    assert isinstance(server, GuardedServer)
    server.head_timeout_s = head_timeout_s
    server.error_body = error_body
