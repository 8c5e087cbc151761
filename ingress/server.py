"""Run the ingress: the webhook app and the metrics app, with graceful shutdown on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

from sentpipe.ingress.app import create_app, create_metrics_app, producer_for
from sentpipe.settings import Settings

log = logging.getLogger("sentpipe.ingress")


async def serve(settings: Settings, host: str, port: int, metrics_port: int) -> None:
    app = create_app(settings, producer_for(settings))
    # shutdown_timeout: in-flight requests get this long to finish before the producer flushes.
    runner = web.AppRunner(app, shutdown_timeout=settings.produce_timeout_s + 5, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=2048).start()
    metrics_runner = web.AppRunner(create_metrics_app(), access_log=None)
    await metrics_runner.setup()
    await web.TCPSite(metrics_runner, host, metrics_port).start()
    if settings.uses_development_secret:
        log.warning(
            "using the built-in development webhook secret: set SENTPIPE_WEBHOOK_SECRET for real traffic"
        )
    log.info(
        "ingress listening",
        extra={"url": f"http://{host}:{port}/webhooks/sent", "metrics_port": metrics_port},
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: finishing in-flight requests and flushing the producer")
    await runner.cleanup()
    await metrics_runner.cleanup()


def run(settings: Settings, host: str, port: int, metrics_port: int) -> None:
    try:
        import uvloop

        uvloop.run(serve(settings, host, port, metrics_port))
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported platform
        asyncio.run(serve(settings, host, port, metrics_port))
