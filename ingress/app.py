"""The aiohttp ingress: the only part of sentpipe that Sent talks to."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from importlib import resources
from typing import Any, NamedTuple, Protocol

import orjson
from aiohttp import hdrs, web
from aiohttp.http import HttpVersion11
from aiohttp.http_exceptions import PayloadEncodingError
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestPayloadError
from aiohttp.web_urldispatcher import MatchInfoError
from confluent_kafka import KafkaException
from multidict import CIMultiDictProxy
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sentpipe import metrics as m
from sentpipe.broker import Delivered, ProduceRejected
from sentpipe.guarded_http import ENCODINGS, decodable, json_errors
from sentpipe.ingress.spool import (
    Spool,
    SpoolError,
    SpoolFull,
    SpoolLocked,
    SpoolRecord,
    adopt_orphans,
    process_dir,
)
from sentpipe.kafka import (
    AsyncProducer,
    BrokerRefused,
    BrokerUnavailable,
    admin_client,
    check_connection,
    topic_max_message_bytes,
)
from sentpipe.schemas import routing as r
from sentpipe.schemas.events import REASONS, MalformedEvent, frame
from sentpipe.schemas.signature import Reason, SignatureError, Verifier
from sentpipe.schemas.topics import Topics, record_limit_problems
from sentpipe.settings import UNKNOWN_TENANT, Settings

log = logging.getLogger("sentpipe.ingress")

PRODUCER = web.AppKey("producer", AsyncProducer)
SPOOL = web.AppKey("spool", Spool)
STALL_AFTER_S = web.AppKey("stall_after_s", float)
# How often the broker check is refreshed when no probe asks: the accepting gauge, read at scrape time,
# cannot wait for a metadata request, so it reads an answer at most this old (plus the request's timeout).
# The kubelet's readiness period: each refresh is a full metadata request, from every ingress process.
BROKER_CHECK_EVERY_S = 5.0
# A producer is hung once records wait this much longer than librdkafka's own delivery timeout, and at least
# SENTPIPE_STALL_AFTER_S: librdkafka reports every record (delivered or failed) within that timeout.
STALL_MARGIN_S = 10.0
WEBHOOK_PATH = "/webhooks/sent"

OPENAPI = resources.files("sentpipe.schemas") / "ingress.openapi.json"
RETRY_AFTER_S = "5"

# HTTP header limits, set explicitly (they are aiohttp's defaults): a request line or one header line longer
# than MAX_LINE_SIZE / MAX_FIELD_SIZE bytes, or more than MAX_HEADERS headers, is answered 400 by aiohttp
# before any handler runs. The webhook id (one header) goes into each raw record, so MAX_FIELD_SIZE is part
# of the record overhead that `schemas.topics.RECORD_OVERHEAD_BYTES` allows for.
MAX_LINE_SIZE = 8190
MAX_FIELD_SIZE = 8190
MAX_HEADERS = 128
# x-request-id is not signed: printable ASCII of at most this length is kept (and logged, stored, echoed),
# anything else is replaced by a generated id.
REQUEST_ID_MAX = 128


class StartupError(Exception):
    """Configuration the ingress cannot run with; one line for the operator (`sentpipe ingress` exits 1)."""


class _RequestIds:
    """Ids for requests that bring no usable x-request-id: 32 random hex digits like a uuid4's, drawn
    `BATCH` at a time (one system call per batch) and never shared with a forked child."""

    BATCH = 1024

    def __init__(self) -> None:
        self._ids: Iterator[str] = iter(())
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._ids = iter(())

    def next(self) -> str:
        # A bound method, not __call__, and no int formatting: this runs for nearly every request.
        for found in self._ids:
            return found
        drawn = os.urandom(16 * self.BATCH).hex()
        self._ids = iter([drawn[i : i + 32] for i in range(32, len(drawn), 32)])
        return drawn[:32]


new_request_id = _RequestIds().next


def request_id_of(value: str | None) -> str:
    """The caller's x-request-id if printable ASCII without spaces, cut to REQUEST_ID_MAX; else a new id."""
    if value and value.isascii() and value.isprintable() and " " not in value:
        return value[:REQUEST_ID_MAX]
    return new_request_id()


def _printable(value: str, limit: int = 64) -> str:
    """Untrusted text (a tenant from the URL) fit for a log line."""
    return "".join(c if c.isascii() and c.isprintable() else "?" for c in value[:limit])


def error(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps({"error": code, "detail": detail}),
        content_type="application/json",
        headers=headers,
    )


class Answer(NamedTuple):
    """A webhook request's answer: a JSON body with its status, and headers besides Content-Type."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()
    close: bool = False  # no keep-alive after it: the rest of the request's body is not wanted

    def response(self, request_id: str) -> web.Response:
        """As an aiohttp response (the routed path), with the request's id."""
        resp = web.Response(
            status=self.status,
            body=self.body,
            content_type="application/json",
            headers=(*self.headers, ("x-request-id", request_id)),
        )
        if self.close:
            resp.force_close()
        return resp


def failed(status: int, code: str, detail: str, *, retry: bool = False, close: bool = False) -> Answer:
    """An error answer: {"error": code, "detail": detail}, with Retry-After when Sent should retry."""
    headers = (("Retry-After", RETRY_AFTER_S),) if retry else ()
    return Answer(status, orjson.dumps({"error": code, "detail": detail}), headers, close)


def _answering(
    status: int, code: str, detail: str, headers: dict[str, str] | None = None
) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def answer(request: web.Request) -> web.Response:
        return error(status, code, detail, headers)

    return answer


async def expect_continue(request: web.Request) -> web.Response | None:
    """The routes' `Expect` handler: aiohttp's (100 Continue to an HTTP/1.1 `100-continue`), except that any
    other expectation gets a JSON 417 like every other error, not aiohttp's plain text."""
    if request.version != HttpVersion11:
        return None  # HTTP/1.0 has no 100 Continue; the body simply follows
    if request.headers.get(hdrs.EXPECT, "").lower() != "100-continue":
        response = error(417, "expectation_failed", "only Expect: 100-continue is supported")
        response.force_close()  # the client may or may not send its body now: nothing after it can be read
        return response
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0  # the answer proper is still to come
    return None


class _JsonRouter(web.UrlDispatcher):
    """The app's router (`add_json_fallbacks`): a request-target no route can match at all, which the
    catch-all `/{path}` does not take (`OPTIONS *`, CONNECT's `host:port`), is a JSON 404 too, not aiohttp's
    plain text. One more frame for a request the shortcut does not answer; none for one it does."""

    async def resolve(self, request: web.Request) -> web.UrlMappingMatchInfo:
        match = await super().resolve(request)
        if isinstance(match, MatchInfoError) and match.http_exception.status == 404:
            text = orjson.dumps({"error": "not_found", "detail": "Not Found"}).decode()
            not_found = web.HTTPNotFound(text=text, content_type="application/json")
            not_found.charset = None  # as every other answer's Content-Type
            return MatchInfoError(not_found)
        return match


def add_json_fallbacks(app: web.Application) -> None:
    """What aiohttp would answer 404 or 405 in plain text is answered in JSON like every other error. Routes,
    not a middleware (a middleware costs every request two more coroutine frames): after its own routes,
    every path answers any other method 405 with `Allow`, and a last catch-all route answers 404. Call it
    once every route is added. (413 is the webhook handler's own answer.)"""
    for resource in list(app.router.resources()):
        if not isinstance(resource, web.Resource):  # plain and dynamic resources; there are no others here
            continue
        allow = ",".join(sorted({route.method for route in resource}))
        resource.add_route(
            "*",
            _answering(405, "method_not_allowed", "Method Not Allowed", {"Allow": allow}),
            expect_handler=expect_continue,
        )
    app.router.add_route(
        "*", "/{path:.*}", _answering(404, "not_found", "Not Found"), expect_handler=expect_continue
    )
    app.router.__class__ = _JsonRouter  # in place: the app holds this object


_HANDLERS: weakref.WeakSet[WebhookHandler] = weakref.WeakSet()


def _in_flight() -> float:
    return sum(h.in_flight + h.waiting for h in list(_HANDLERS))


m.INGRESS_IN_FLIGHT.set_function(_in_flight)  # read when scraped, nothing to update per request


async def finish_in_flight(timeout_s: float) -> int:
    """Wait until no webhook request is being handled (at most `timeout_s`); how many still are."""
    deadline = time.monotonic() + timeout_s
    while _in_flight() and time.monotonic() < deadline:  # noqa: ASYNC110 - an Event would cost every request
        await asyncio.sleep(0.01)
    return int(_in_flight())


def _init_metrics(tenants: list[str]) -> None:
    """Create the bounded label sets the alerts read at zero: a rate or increase() needs a sample before
    the first 503, 401 or dead letter, or the first one is never seen (and `_created` series are off)."""
    for reason in REASONS:
        m.DLQ_EVENTS.labels("ingress", reason)
    for refused in (
        "overloaded",
        "body_timeout",
        "header_timeout",
        "write_timeout",
        "broker_down",
        "spool_full",
        "spool_write_failed",
    ):
        m.INGRESS_REFUSED.labels(refused)
    for tenant in [*tenants, UNKNOWN_TENANT]:
        for outcome, status in (
            ("accepted", "200"),
            ("spooled", "200"),
            ("unavailable", "503"),
            ("overloaded", "503"),
            ("error", "500"),
        ):
            m.INGRESS_REQUESTS.zero((tenant, outcome, status))
        reasons = ["unknown_tenant"] if tenant == UNKNOWN_TENANT else [why.value for why in Reason]
        for reason in reasons:
            m.INGRESS_SIGNATURE_FAILURES.labels(tenant, reason)
            m.INGRESS_REQUESTS.zero((tenant, "signature_" + reason, "401"))


class PostedRequest(Protocol):
    """What the webhook handler reads of a request: a `web.Request`, or the protocol's `Posted`."""

    @property
    def headers(self) -> CIMultiDictProxy[str]: ...
    @property
    def content_type(self) -> str: ...
    @property
    def content_length(self) -> int | None: ...
    @property
    def content(self) -> StreamReader: ...
    async def read(self) -> bytes: ...


class WebhookHandler:
    """POST /webhooks/sent[/{tenant}]: verify, frame, produce, answer once durable.

    The accepted path is the hot one (profiled with py-spy under `make bench`): the request counter and the
    histograms take no lock (`sentpipe/loop_metrics.py`), the in-flight gauge is read at scrape time, log
    context is built only when a line is written, a body that came with the headers is taken without a timer
    or an await, the delivery future is awaited directly, and request ids need no system call.
    """

    def __init__(
        self,
        settings: Settings,
        producer: AsyncProducer,
        verifiers: dict[str, Verifier],
        spool: Spool | None = None,
    ) -> None:
        self.s = settings
        self.default_tenant = settings.default_tenant
        self.max_body_bytes = settings.max_body_bytes
        self.producer = producer
        self.spool = spool
        self.verifiers = verifiers
        # Unknown tenants are checked against keys nobody has: same work, same answers as a bad signature.
        # As many keys as the tenant with the most (`verifiers_for` pads every tenant's work to that): with
        # the default tenant's count, a tenant with more keys answered a bad signature measurably slower.
        work = max((v.work for v in verifiers.values()), default=1)
        self.decoy = Verifier.decoy(work, settings.signature_tolerance_s)
        self.topics = Topics(settings.topic_prefix)
        self.raw_topic = self.topics.raw
        self.in_flight = 0  # requests with their body, being verified and produced
        self.waiting = 0  # requests whose body is still arriving
        self.max_in_flight = settings.ingress_max_in_flight
        self.body_timeout_s = settings.body_timeout_s
        self.produce_timeout_s = settings.produce_timeout_s
        self.id_source = settings.event_id_source
        self.closing = False  # shutdown began: each connection closes once its request in hand is answered
        _HANDLERS.add(self)
        _init_metrics(sorted(verifiers))

    def _ctx(self, request_id: str, label: str, tenant: str) -> dict[str, Any]:
        """Log context (bounded), built only for a line that is written."""
        ctx: dict[str, Any] = {"request_id": request_id, "tenant": label}
        if tenant not in self.verifiers:
            ctx["requested_tenant"] = _printable(tenant)
        return ctx

    async def handle(self, request: web.Request) -> web.Response:
        """The routes' handler, for what the connection's shortcut does not take (`ingress/protocol.py`)."""
        answer, request_id = await self.respond(
            request, request.match_info.get("tenant", self.default_tenant)
        )
        response = answer.response(request_id)
        if answer.close and request.protocol is not None:
            # Written, then the connection closed: left to aiohttp, it first reads what is left of the body
            # for up to 10 s (its lingering close), a slow client's connection held that long after its 408.
            await response.prepare(request)
            await response.write_eof()
            request.protocol.force_close()
        return response

    async def expect(self, request: web.Request) -> web.Response | None:
        """`Expect: 100-continue` on the webhook routes: a request its headers already refuse (content type,
        Content-Length over the limit) gets that answer instead of an invitation to send a body that would be
        refused; the connection closes, as the client may send the body all the same."""
        length = request.content_length
        if request.version == HttpVersion11 and (
            (length is not None and length > self.max_body_bytes)
            or (
                request.headers.get("Content-Type") != "application/json"
                and request.content_type != "application/json"
            )
        ):
            response = await self.handle(request)  # answered from the headers: the body is never read
            response.force_close()
            return response
        return await expect_continue(request)

    async def respond(self, request: PostedRequest, tenant: str) -> tuple[Answer, str]:
        """The answer to one webhook request for `tenant` (from its path), and the request's id."""
        started = time.perf_counter()
        label = tenant if tenant in self.verifiers else UNKNOWN_TENANT
        request_id = request_id_of(request.headers.get("x-request-id"))
        outcome, status = "error", 500
        try:
            outcome, answer = await self._handle(request, tenant, label, request_id)
            status = answer.status
        except asyncio.CancelledError:
            # aiohttp cancels a handler whose client left (or at shutdown, past its grace period): not a 500.
            outcome, status = "cancelled", 499
            raise
        except Exception:
            # A bug, not the request's fault: logged with its traceback; the client gets a JSON 500 (whichever
            # path took the request) and a closed connection, and Sent retries.
            log.exception("unexpected error", extra={"request_id": request_id, "tenant": label})
            answer = failed(500, "internal_error", "unexpected error", close=True)
        finally:
            m.INGRESS_REQUESTS.inc((label, outcome, str(status)))
            m.INGRESS_REQUEST_SECONDS.observe(time.perf_counter() - started)
        return answer, request_id

    def _overloaded(self, what: str, close: bool = False) -> tuple[str, Answer]:
        # Turned away before any work; Sent retries later.
        m.INGRESS_REFUSED.labels("overloaded").inc()
        detail = f"more than {self.max_in_flight} requests {what}; retry"
        return "overloaded", failed(503, "overloaded", detail, retry=True, close=close)

    async def _handle(
        self, request: PostedRequest, tenant: str, label: str, request_id: str
    ) -> tuple[str, Answer]:
        req_headers = request.headers
        # The header as Sent sends it is taken as is; anything else (parameters, case) is parsed by aiohttp.
        if (
            req_headers.get("Content-Type") != "application/json"
            and request.content_type != "application/json"
        ):
            return "unsupported_media_type", failed(
                415, "unsupported_media_type", "Content-Type must be application/json"
            )
        # Every Content-Encoding header, as aiohttp reads them (the last decides): the first alone let
        # `identity` then `x-gzip` through, its bytes dead-lettered as not JSON. Looked up once first: a
        # `getall` and its join on every request cost six times a `get` (0.67 against 0.11 us).
        if req_headers.get("Content-Encoding") is not None and not decodable(
            ", ".join(req_headers.getall("Content-Encoding"))
        ):
            return "unsupported_encoding", failed(415, "unsupported_encoding", ENCODINGS)
        limit = self.max_body_bytes
        length = request.content_length
        if length is not None and length > limit:
            # Closed once answered: left open, aiohttp first read the unwanted body for up to 10 s.
            detail = f"body is over the {limit} byte limit"
            return "too_large", failed(413, "body_too_large", detail, close=True)
        content = request.content
        try:
            if content.is_eof():
                # The whole body came with the headers (the usual webhook): take it, no timer, no await.
                body = content.read_nowait()
                if len(body) > limit:  # chunked: no Content-Length was checked above
                    raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=len(body))
            else:
                # A body still arriving holds no slot of in_flight: a client that sends headers and then
                # nothing (no signature checked yet) must not turn Sent's complete deliveries away.
                if self.waiting >= self.max_in_flight:
                    # Closed once answered, as for 408 and 413: left open, aiohttp read the unwanted body
                    # for up to 10 s more, each refused connection held as long as the cap is there to stop.
                    return self._overloaded("waiting for their body", close=True)
                self.waiting += 1
                try:
                    async with asyncio.timeout(self.body_timeout_s):
                        body = await request.read()  # chunked: aiohttp stops reading at client_max_size
                finally:
                    self.waiting -= 1
        except web.HTTPRequestEntityTooLarge:
            detail = f"body is over the {limit} byte limit"
            return "too_large", failed(413, "body_too_large", detail, close=True)
        except TimeoutError:
            m.INGRESS_REFUSED.labels("body_timeout").inc()
            log.info("body timeout", extra=self._ctx(request_id, label, tenant))
            detail = f"the body did not arrive within {self.body_timeout_s:g}s"
            return "body_timeout", failed(408, "body_timeout", detail, close=True)
        except ConnectionResetError:
            # The client left mid-body: nobody to answer, nothing stored, nothing wrong with the ingress.
            log.info("client closed the connection mid-body", extra=self._ctx(request_id, label, tenant))
            return "client_gone", failed(499, "client_gone", "the connection closed before the body ended")
        except (RequestPayloadError, PayloadEncodingError):
            # A chunked or Content-Encoding body that does not decode.
            log.info("undecodable body", extra=self._ctx(request_id, label, tenant))
            detail = "the body does not decode (chunked framing or Content-Encoding)"
            return "bad_body", failed(400, "malformed_body", detail, close=True)

        if self.in_flight >= self.max_in_flight:
            return self._overloaded("in flight")
        self.in_flight += 1
        try:
            return await self._process(request, body, tenant, label, request_id)
        finally:
            self.in_flight -= 1

    async def _process(
        self, request: PostedRequest, body: bytes, tenant: str, label: str, request_id: str
    ) -> tuple[str, Answer]:
        verifier = self.verifiers.get(tenant)
        if verifier is None:
            verifier = self.decoy
        req_headers = request.headers
        try:
            now = time.time()
            verified = verifier.verify(req_headers, body, now)
        except SignatureError as exc:
            reason = exc.reason.value if verifier is not self.decoy else "unknown_tenant"
            m.INGRESS_SIGNATURE_FAILURES.labels(label, reason).inc()
            log.info("signature rejected", extra={**self._ctx(request_id, label, tenant), "reason": reason})
            return "signature_" + reason, failed(401, exc.reason.value, exc.detail)
        m.INGRESS_BODY_BYTES.observe(len(body))

        received_ms = int(now * 1000)
        try:
            # exact=False: the body's bytes go to the topic as they came; the router reads numbers exactly.
            framed = frame(body, webhook_id=verified.webhook_id, id_source=self.id_source, exact=False)
        except MalformedEvent as exc:
            # Signed but unusable: a permanent failure. Keep it in the DLQ and answer 2xx so Sent stops.
            ctx = self._ctx(request_id, label, tenant)
            key = uuid.uuid4().hex.encode()
            dlq_headers = [
                *r.raw_headers(
                    tenant=tenant,
                    received_at_ms=received_ms,
                    webhook_id=verified.webhook_id,
                    request_id=request_id,
                    event_type=None,
                ),
                *r.dlq_headers(stage="ingress", error_class=exc.reason, message=exc.detail),
            ]
            try:
                delivered = await self._produce(self.topics.dlq, key, body, dlq_headers)
            except ProduceRejected as rej:
                return self._refused(rej, ctx)
            m.DLQ_EVENTS.labels("ingress", exc.reason).inc()
            log.warning("malformed event sent to DLQ", extra={**ctx, "reason": exc.reason})
            reply: dict[str, Any] = {"status": "accepted", "outcome": "dead_lettered", "reason": exc.reason}
            if delivered is None:
                reply["spooled"] = True
            return "dlq", Answer(200, orjson.dumps(reply))

        event_id = framed.event_id
        event_type: str = framed.type  # a StrEnum is its value (`.value` is a Python-level property)
        headers = r.raw_headers(
            tenant=tenant,
            received_at_ms=received_ms,
            webhook_id=verified.webhook_id,
            request_id=request_id,
            event_type=event_type,
        )
        try:
            msg = await self._produce(self.raw_topic, event_id.encode(), body, headers)
        except ProduceRejected as rej:
            return self._refused(rej, self._ctx(request_id, label, tenant))
        if msg is None:
            log.info(
                "spooled",
                extra={**self._ctx(request_id, label, tenant), "event_id": event_id, "type": event_type},
            )
            return "spooled", Answer(
                200, orjson.dumps({"status": "accepted", "spooled": True, "event_id": event_id})
            )
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "accepted",
                extra={
                    **self._ctx(request_id, label, tenant),
                    "event_id": event_id,
                    "type": event_type,
                    "partition": msg.partition,
                },
            )
        return "accepted", Answer(200, orjson.dumps({"status": "accepted", "event_id": event_id}))

    async def _produce(
        self, topic: str, key: bytes, value: bytes, headers: list[tuple[str, bytes]]
    ) -> Delivered | None:
        """The broker's acknowledgement, or None once the record is fsynced in the spool instead.
        ProduceRejected: neither holds it (the caller answers 503 or 413)."""
        spool = self.spool
        down = self.producer.unavailable
        if spool is not None and (down is not None or spool.holds_new_records):
            await self._spool(spool, topic, key, value, headers)
            return None
        if down is not None:
            # The producer knows it cannot deliver now (every broker down, or a fatal error being repaired):
            # answer at once instead of waiting out the produce timeout. Records already queued keep waiting.
            m.INGRESS_REFUSED.labels("broker_down").inc()
            raise ProduceRejected(down)
        t0 = time.perf_counter()
        try:
            # The future itself is awaited (no coroutine in between): this is every request's path.
            msg = await self.producer.produce(topic, key, value, headers, self.produce_timeout_s)
        except ProduceRejected as rej:
            # Timed out or refused, still a produce's time: counted only when delivered, a broker slower
            # than the produce timeout left no sample, and the p99 alert went quiet when it was worst.
            m.INGRESS_PRODUCE_SECONDS.observe(time.perf_counter() - t0)
            if spool is None or not rej.temporary:
                raise
            # Timed out, queue full or broker gone mid-request: the spool takes it (a duplicate at worst,
            # if the broker did get it after all; the dedup table drops that).
            await self._spool(spool, topic, key, value, headers)
            return None
        m.INGRESS_PRODUCE_SECONDS.observe(time.perf_counter() - t0)
        return msg

    async def _spool(
        self, spool: Spool, topic: str, key: bytes, value: bytes, headers: list[tuple[str, bytes]]
    ) -> None:
        rec = SpoolRecord(topic, key, value, tuple(headers), int(time.time() * 1000))
        try:
            await spool.append(rec)
        except SpoolFull:
            m.INGRESS_REFUSED.labels("spool_full").inc()
            raise ProduceRejected("spool_full") from None
        except SpoolError:
            m.INGRESS_REFUSED.labels("spool_write_failed").inc()
            raise ProduceRejected("spool_write_failed") from None

    def _refused(self, rej: ProduceRejected, ctx: dict[str, Any]) -> tuple[str, Answer]:
        if not rej.temporary:
            # The broker refused the record for what it is (its size): retrying can never succeed, so this is
            # a 413, never a 503. Only a topic whose max.message.bytes is below what SENTPIPE_MAX_BODY_BYTES
            # needs gets here (`sentpipe topics ensure` raises it; the ingress checks it at start).
            log.error(
                "event refused by Kafka for its size: a topic's max.message.bytes is below what"
                " SENTPIPE_MAX_BODY_BYTES needs; run `sentpipe topics ensure`",
                extra={**ctx, "reason": rej.reason},
            )
            return "too_large", failed(413, "body_too_large", f"event refused by the broker ({rej.reason})")
        if rej.reason in ("spool_full", "spool_write_failed"):
            # A WARNING with its reason, like broker_down's (the disk's own failure is logged by the spool).
            log.warning(
                "event not accepted: broker unavailable and %s",
                rej.reason,
                extra={**ctx, "reason": rej.reason},
            )
            detail = "broker unavailable and the local spool cannot take the event; retry"
            return "unavailable", failed(503, rej.reason, detail, retry=True)
        log.warning("event not accepted: broker unavailable", extra={**ctx, "reason": rej.reason})
        return "unavailable", failed(
            503, "broker_unavailable", f"event not stored ({rej.reason}); retry", retry=True
        )


WEBHOOK = web.AppKey("webhook", WebhookHandler)


def liveness_problem(app: web.Application) -> tuple[str, str] | None:
    """Why this process is hung (error code, detail), or None. Hung is: records waiting for the broker and
    no delivery report for longer than librdkafka takes to report any record (its report path is broken),
    or a spool whose drain has not finished a window for SENTPIPE_STALL_AFTER_S while a broker is reachable.
    A restart is the remedy for both (spooled records stay on disk; unreported ones were never answered
    200, so Sent sends them again)."""
    producer = app[PRODUCER]
    waited = producer.stalled_s()
    if waited > max(app[STALL_AFTER_S], producer.delivery_timeout_s + STALL_MARGIN_S):
        if waited == math.inf:
            return "producer_stalled", "the Kafka producer's report thread is gone"
        return "producer_stalled", f"records waiting for Kafka delivery reports, none for {waited:.0f} s"
    spool = app.get(SPOOL)
    if spool is not None:
        # A disk that stopped answering: every delivery gets 503 (`Spool.write_stalled`) and only a new
        # process (on a node whose disk answers) helps. Bounded like a stalled drain, and at least as long as
        # a request waits for its write.
        writing = spool.write_running_s()
        if writing > max(app[STALL_AFTER_S], spool.write_timeout_s or 0.0):
            return "spool_write_stalled", f"a spool write (fdatasync) has not finished for {writing:.0f} s"
    if spool is not None and spool.records and producer.unavailable is None:
        # A window waits for the broker up to the produce timeout (librdkafka's message.timeout.ms): with that
        # at or above SENTPIPE_STALL_AFTER_S, a partition without a leader restarted every ingress process.
        still = time.monotonic() - spool.progress_at
        if still > max(app[STALL_AFTER_S], producer.delivery_timeout_s + STALL_MARGIN_S):
            return "spool_drain_stalled", f"{spool.records} spooled records, drain hung for {still:.0f} s"
    return None


async def healthz(request: web.Request) -> web.Response:
    """Liveness: 503 while the process is hung (`liveness_problem`)."""
    problem = liveness_problem(request.app)
    if problem is not None:
        log.error("ingress hung: %s", problem[1], extra={"reason": problem[0]})
        return error(503, *problem)
    return web.json_response({"status": "ok"})


class BrokerCheck:
    """Whether the producer reaches a broker: the one answer /readyz and `sentpipe_ingress_accepting` give.
    librdkafka reports its brokers down only when their connections fail; a broker that is there but answers
    nothing (paused, partitioned with connections left open) goes unreported for up to its socket timeout, a
    minute, and only a metadata request that times out says so sooner. The gauge is read at scrape time and
    cannot wait for one, so it reads the last answer, which `_refresh` keeps fresh when no probe asks."""

    def __init__(self, producer: AsyncProducer) -> None:
        self.producer = producer
        self._metadata_ok = True
        self._asking: asyncio.Task[bool] | None = None
        self._refresher: asyncio.Task[None] | None = None

    async def check(self) -> bool:
        """Readiness with a metadata round trip (cached briefly by the producer)."""
        if self.producer.unavailable is not None:
            # The producer's own signal decides while it is down; the metadata answer from before it is
            # stale, and kept it would hold the gauge at 0 after the producer's probe found a broker again.
            self._metadata_ok = True
            return False
        # One request at a time, its answer for every caller: a second `ready()` while one is in flight
        # returns the cached answer from before it (False at start), and a probe got 503 for nothing.
        if self._asking is None:
            self._asking = asyncio.get_running_loop().create_task(self._ask())
        return await asyncio.shield(self._asking)

    async def _ask(self) -> bool:
        try:
            self._metadata_ok = await self.producer.ready()
        finally:
            self._asking = None
        return self._metadata_ok

    def start(self) -> None:
        self._refresher = asyncio.get_running_loop().create_task(self._refresh())

    async def stop(self) -> None:
        for task in (self._refresher, self._asking):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    @property
    def up(self) -> bool:
        """The last answer, without waiting: False at once when the producer knows it cannot deliver."""
        if self.producer.unavailable is not None:
            return False
        return self._metadata_ok

    async def _refresh(self) -> None:
        while True:
            try:
                await self.check()
            except Exception:  # a refresher that died would leave the gauge saying the last answer forever
                log.exception("broker check failed; going on")
            await asyncio.sleep(BROKER_CHECK_EVERY_S)


BROKER_CHECK = web.AppKey("broker_check", BrokerCheck)


async def readyz(request: web.Request) -> web.Response:
    producer = request.app[PRODUCER]
    spool = request.app.get(SPOOL)
    if spool is not None and spool.write_stalled and spool.holds_new_records:
        # Every delivery goes behind the write in hand and gets 503 at once: out of service until the disk
        # answers, or the broker takes the drain's records (then deliveries go to it directly).
        return error(503, "not_ready", spool.refusal, headers={"Retry-After": RETRY_AFTER_S})
    if await request.app[BROKER_CHECK].check():
        if spool is not None and spool.holds_new_records and not spool.takes_records:
            # A broker that answers metadata but acknowledges none of the drain's records (a partition
            # without a leader): deliveries still go into the spool, and one that is full (or whose disk
            # refused a write) answers each 503 at once. Ready, the pod stayed in service refusing them all.
            return error(503, "not_ready", spool.refusal, headers={"Retry-After": RETRY_AFTER_S})
        return web.json_response({"status": "ready"})
    if spool is not None and spool.takes_records:
        # Requests are answered 200 from the spool: the pod stays in service through a broker outage.
        return web.json_response({"status": "ready", "spooling": True, "spooled_records": spool.records})
    detail = {"producer_fatal_error": "Kafka producer being replaced after a fatal error"}.get(
        producer.unavailable or "", "Kafka broker unreachable"
    )
    if spool is not None:  # the cause the operator acts on (SentpipeSpoolNearlyFull's runbook)
        detail += f", and {spool.refusal}"
    return error(503, "not_ready", detail, headers={"Retry-After": RETRY_AFTER_S})


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=OPENAPI.read_bytes(), content_type="application/json")


async def metrics_handler(request: web.Request) -> web.Response:
    return web.Response(
        body=generate_latest(m.SERVED["ingress"]), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


def verifiers_for(settings: Settings) -> dict[str, Verifier]:
    """Tenant -> verifier; StartupError naming the setting and tenant (never the secret) for a secret that is
    empty, a bare `whsec_`, or not base64."""
    try:
        tenants = settings.tenant_secrets()
    except (OSError, ValueError) as exc:
        raise StartupError(f"SENTPIPE_SECRETS_FILE {settings.secrets_file}: {exc}") from None
    out = {}
    # Each tenant does the work of the one with the most keys for a bad signature: the time it takes says
    # nothing about which tenant (or whether one) was asked, nor how many keys it has.
    work = max(len(secrets) for secrets in tenants.values())
    for tenant, secrets in tenants.items():
        where = settings.secret_source(tenant, secrets, lambda name: repr(_printable(name)))
        try:
            out[tenant] = Verifier(secrets, settings.signature_tolerance_s, work=work)
        except ValueError as exc:
            raise StartupError(f"{where}: {exc}") from None
    return out


def check_topic_limits(settings: Settings, timeout: float = 5.0) -> None:
    """At start: StartupError when the broker refuses the Kafka security settings (wrong password, unknown
    CA, plaintext against a TLS listener: waiting would not help), or when the raw topic or the DLQ would
    refuse a body the ingress accepts (their max.message.bytes is below what SENTPIPE_MAX_BODY_BYTES needs).
    An unreachable broker or a missing topic only logs a warning: the ingress starts anyway and answers 503
    until Kafka is there."""
    try:
        check_connection(settings, min(timeout, settings.kafka_connect_timeout_s))
    except BrokerRefused as exc:
        raise StartupError(str(exc)) from None
    except BrokerUnavailable as exc:
        meanwhile = "are spooled (200)" if settings.spool else "get 503"
        log.warning("%s: starting anyway; webhooks %s until it answers", exc, meanwhile)
        return
    topics = Topics(settings.topic_prefix)
    try:
        have = topic_max_message_bytes(
            admin_client(settings), settings.kafka_bootstrap, [topics.raw, topics.dlq], timeout
        )
    except (BrokerUnavailable, KafkaException) as exc:  # unreachable, or no DescribeConfigs permission
        log.warning("could not check the topics' max.message.bytes: %s", exc)
        return
    missing = [name for name, value in have.items() if value is None]
    if missing:
        log.warning(
            "topic(s) %s not known to the broker (yet): their size limits were not checked;"
            " run `sentpipe topics ensure` if they do not exist",
            ", ".join(sorted(missing)),
        )
    problems = record_limit_problems(topics, settings.max_body_bytes, have)
    if problems:
        raise StartupError(problems[0])


def open_spool(settings: Settings, index: int = 0) -> Spool | None:
    """This process's spool when SENTPIPE_SPOOL is on, with what a previous run left in it. StartupError: the
    directory is unusable or another process has it."""
    if not settings.spool:
        return None
    spool = Spool(
        process_dir(settings.spool_dir, index),
        settings.spool_max_bytes,
        settings.spool_segment_bytes,
        write_timeout_s=settings.produce_timeout_s,  # a request waits for the disk as for the broker
    )
    try:
        spool.open()
    except SpoolLocked as exc:
        raise StartupError(f"SENTPIPE_SPOOL_DIR: {exc}") from None
    except OSError as exc:
        raise StartupError(f"SENTPIPE_SPOOL_DIR {spool.dir}: {exc.strerror or exc}") from None
    except ValueError as exc:  # what a damaged directory holds: one line, not a crash loop
        raise StartupError(f"SENTPIPE_SPOOL_DIR {spool.dir}: {exc}") from None
    if spool.records:
        log.warning(
            "spool holds %d records from a previous run: draining them to Kafka",
            spool.records,
            extra={"spool_dir": str(spool.dir)},
        )
    return spool


def create_app(settings: Settings, producer: AsyncProducer, spool: Spool | None = None) -> web.Application:
    """The ingress app; the producer is started and flushed with the app, the spool drained while it runs.
    StartupError: unusable secrets."""
    verifiers = verifiers_for(settings)
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        handler_args={
            "max_line_size": MAX_LINE_SIZE,
            "max_field_size": MAX_FIELD_SIZE,
            "max_headers": MAX_HEADERS,
        },
    )
    app[PRODUCER] = producer
    app[STALL_AFTER_S] = settings.stall_after_s
    broker = app[BROKER_CHECK] = BrokerCheck(producer)

    def accepting() -> float:
        # Read at scrape time. While the pod is unready (a full Kafka outage without spool room) no request
        # reaches it and nothing is counted; this gauge is what the outage alert sees instead.
        if spool is not None and spool.holds_new_records and not spool.takes_records:
            return 0.0
        return float(broker.up or (spool is not None and spool.takes_records))

    m.INGRESS_ACCEPTING.set_function(accepting)

    async def producer_ctx(app: web.Application) -> AsyncIterator[None]:
        await producer.start()
        broker.start()
        yield
        await broker.stop()
        # A stage of server.stop_deadline_s, which the grace periods of the deployments cover.
        await producer.close(timeout=settings.produce_timeout_s * 2)

    app.cleanup_ctx.append(producer_ctx)
    if spool is not None:
        app[SPOOL] = spool

        async def drain_ctx(app: web.Application) -> AsyncIterator[None]:
            # After the producer starts and (cleanup runs in reverse) stopped before it flushes: records the
            # drain has in flight are flushed; any it has not seen acknowledged are sent again next start.
            def send(rec: SpoolRecord) -> asyncio.Future[Delivered]:
                return producer.produce(rec.topic, rec.key, rec.value, rec.headers)

            def can_send() -> bool:
                return producer.unavailable is None

            loop = asyncio.get_running_loop()
            tasks = [loop.create_task(spool.run(send, can_send))]
            if spool.dir == process_dir(settings.spool_dir, 0):
                tasks.append(
                    loop.create_task(
                        adopt_orphans(
                            settings.spool_dir, max(1, settings.ingress_workers), send, can_send, spool
                        )
                    )
                )
            yield
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            # Records of requests cut off at the grace period may still be in the writer's hands: closed
            # under it, the segment's fd was gone mid-write (a torn frame) or, worse, reused by another file.
            if not await spool.settle(settings.produce_timeout_s):  # a stage of server.stop_deadline_s
                log.error("spool: a write was still running at shutdown; its segment is left open")
            spool.close()

        app.cleanup_ctx.append(drain_ctx)
    handler = WebhookHandler(settings, producer, verifiers, spool)
    app[WEBHOOK] = handler
    # With a trailing slash too: a URL registered in Sent's dashboard as `.../webhooks/sent/` answered 404 to
    # every delivery, and Sent disables a webhook after 10 failed events.
    for path in (WEBHOOK_PATH, WEBHOOK_PATH + "/", WEBHOOK_PATH + "/{tenant}", WEBHOOK_PATH + "/{tenant}/"):
        app.router.add_post(path, handler.handle, expect_handler=handler.expect)
    app.router.add_get("/healthz", healthz, expect_handler=expect_continue)
    app.router.add_get("/readyz", readyz, expect_handler=expect_continue)
    app.router.add_get("/openapi.json", openapi, expect_handler=expect_continue)
    add_json_fallbacks(app)
    return app


def create_metrics_app() -> web.Application:
    app = web.Application(middlewares=[json_errors])
    app.router.add_get("/metrics", metrics_handler)
    return app


def producer_for(settings: Settings) -> AsyncProducer:
    return AsyncProducer.from_settings(settings)
