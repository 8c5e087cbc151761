"""The ingress bench's baseline: the ingress's aiohttp server setup (uvloop, one process), no-op handler.

Run as `python -m bench.noop_server PORT`. The handler still reads the body, as any webhook handler must,
and answers a small JSON body like the ingress does; everything else (signature, framing, Kafka) is gone.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import uvloop
from aiohttp import web

MAX_BODY = 1024 * 1024  # the ingress's default SENTPIPE_MAX_BODY_BYTES
ACCEPTED = b'{"status":"accepted"}'


async def webhook(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=ACCEPTED, content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def serve(port: int) -> None:
    app = web.Application(client_max_size=MAX_BODY)
    app.router.add_post("/webhooks/sent", webhook)
    app.router.add_get("/healthz", healthz)
    # Same runner/site options as ingress/server.py.
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=2048).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main() -> None:
    uvloop.run(serve(int(sys.argv[1])))


if __name__ == "__main__":
    main()
