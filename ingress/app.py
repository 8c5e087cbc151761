"""The aiohttp ingress: the only part of sentpipe that Sent talks to."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sentpipe import metrics as m
from sentpipe.broker import Delivered, ProduceRejected
from sentpipe.kafka import AsyncProducer
from sentpipe.schemas import routing as r
from sentpipe.schemas.events import MalformedEvent, frame
from sentpipe.schemas.signature import SignatureError, Verifier
from sentpipe.schemas.topics import Topics
from sentpipe.settings import Settings

log = logging.getLogger("sentpipe.ingress")

PRODUCER = web.AppKey("producer", AsyncProducer)

OPENAPI = resources.files("sentpipe.schemas") / "ingress.openapi.json"
RETRY_AFTER_S = "5"


def error(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps({"error": code, "detail": detail}),
        content_type="application/json",
        headers=headers,
    )


@web.middleware
async def json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """aiohttp's own 404/405/413 answers become JSON like every other error."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(
            exc.status, "http_error"
        )
        return error(
            exc.status, code, exc.reason, headers={k: v for k, v in exc.headers.items() if k == "Allow"}
        )


class WebhookHandler:
    """POST /webhooks/sent[/{tenant}]: verify, frame, produce, answer once durable."""

    def __init__(self, settings: Settings, producer: AsyncProducer, verifiers: dict[str, Verifier]) -> None:
        self.s = settings
        self.producer = producer
        self.verifiers = verifiers
        self.topics = Topics(settings.topic_prefix)

    async def handle(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        m.INGRESS_IN_FLIGHT.inc()
        tenant = request.match_info.get("tenant", self.s.default_tenant)
        label = tenant if tenant in self.verifiers else "unknown"
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        outcome, status = "error", 500
        try:
            outcome, resp = await self._handle(request, tenant, request_id)
            status = resp.status
        except Exception:
            log.exception("unexpected error", extra={"request_id": request_id, "tenant": label})
            raise
        finally:
            m.INGRESS_IN_FLIGHT.dec()
            m.INGRESS_REQUESTS.labels(label, outcome, str(status)).inc()
            m.INGRESS_REQUEST_SECONDS.observe(time.perf_counter() - started)
        resp.headers["x-request-id"] = request_id
        return resp

    async def _handle(self, request: web.Request, tenant: str, request_id: str) -> tuple[str, web.Response]:
        ctx: dict[str, Any] = {"request_id": request_id, "tenant": tenant}  # log context, bounded
        verifier = self.verifiers.get(tenant)
        if verifier is None:
            return "unknown_tenant", error(404, "unknown_tenant", "no such tenant")
        if request.content_type != "application/json":
            return "unsupported_media_type", error(
                415, "unsupported_media_type", "Content-Type must be application/json"
            )
        limit = self.s.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            return "too_large", error(413, "body_too_large", f"body is over the {limit} byte limit")
        try:
            body = await request.read()  # chunked bodies: aiohttp stops reading at client_max_size
        except web.HTTPRequestEntityTooLarge:
            return "too_large", error(413, "body_too_large", f"body is over the {limit} byte limit")

        try:
            verified = verifier.verify(request.headers, body, time.time())
        except SignatureError as exc:
            m.INGRESS_SIGNATURE_FAILURES.labels(tenant, exc.reason.value).inc()
            log.info("signature rejected", extra={**ctx, "reason": exc.reason.value})
            return "signature_" + exc.reason.value, error(401, exc.reason.value, exc.detail)
        m.INGRESS_BODY_BYTES.observe(len(body))

        received_ms = int(time.time() * 1000)
        try:
            framed = frame(body, webhook_id=verified.webhook_id, id_source=self.s.event_id_source)
        except MalformedEvent as exc:
            # Signed but unusable: a permanent failure. Keep it in the DLQ and answer 2xx so Sent stops.
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
                await self._produce(self.topics.dlq, key, body, dlq_headers)
            except ProduceRejected as rej:
                return "unavailable", self._unavailable(rej, ctx)
            m.DLQ_EVENTS.labels("ingress", exc.reason).inc()
            log.warning("malformed event sent to DLQ", extra={**ctx, "reason": exc.reason})
            return "dlq", web.json_response(
                {"status": "accepted", "outcome": "dead_lettered", "reason": exc.reason}
            )

        headers = r.raw_headers(
            tenant=tenant,
            received_at_ms=received_ms,
            webhook_id=verified.webhook_id,
            request_id=request_id,
            event_type=framed.type.value,
        )
        try:
            msg = await self._produce(self.topics.raw, framed.event_id.encode(), body, headers)
        except ProduceRejected as rej:
            return "unavailable", self._unavailable(rej, ctx)
        log.debug(
            "accepted",
            extra={
                **ctx,
                "event_id": framed.event_id,
                "type": framed.type.value,
                "partition": msg.partition,
            },
        )
        return "accepted", web.Response(
            body=orjson.dumps({"status": "accepted", "event_id": framed.event_id}),
            content_type="application/json",
        )

    async def _produce(
        self, topic: str, key: bytes, value: bytes, headers: list[tuple[str, bytes]]
    ) -> Delivered:
        t0 = time.perf_counter()
        msg = await self.producer.send_and_wait(topic, key, value, headers, timeout=self.s.produce_timeout_s)
        m.INGRESS_PRODUCE_SECONDS.observe(time.perf_counter() - t0)
        return msg

    def _unavailable(self, rej: ProduceRejected, ctx: dict[str, Any]) -> web.Response:
        log.warning("event not accepted: broker unavailable", extra={**ctx, "reason": rej.reason})
        return error(
            503,
            "broker_unavailable",
            f"event not stored ({rej.reason}); retry",
            headers={"Retry-After": RETRY_AFTER_S},
        )


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    if await request.app[PRODUCER].ready():
        return web.json_response({"status": "ready"})
    return error(503, "not_ready", "Kafka broker unreachable", headers={"Retry-After": RETRY_AFTER_S})


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=OPENAPI.read_bytes(), content_type="application/json")


async def metrics_handler(request: web.Request) -> web.Response:
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


def create_app(settings: Settings, producer: AsyncProducer) -> web.Application:
    """The ingress app; the producer is started and flushed with the app."""
    app = web.Application(middlewares=[json_errors], client_max_size=settings.max_body_bytes)
    app[PRODUCER] = producer
    verifiers = {
        tenant: Verifier(secrets, settings.signature_tolerance_s)
        for tenant, secrets in settings.tenant_secrets().items()
    }

    async def producer_ctx(app: web.Application) -> AsyncIterator[None]:
        await producer.start()
        yield
        await producer.close(timeout=settings.produce_timeout_s * 2)

    app.cleanup_ctx.append(producer_ctx)
    handler = WebhookHandler(settings, producer, verifiers)
    app.router.add_post("/webhooks/sent", handler.handle)
    app.router.add_post("/webhooks/sent/{tenant}", handler.handle)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/openapi.json", openapi)
    return app


def create_metrics_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/metrics", metrics_handler)
    return app


def producer_for(settings: Settings) -> AsyncProducer:
    return AsyncProducer.from_settings(settings)
