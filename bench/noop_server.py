"""The ingress bench's baseline: the ingress's aiohttp server setup (uvloop, one process), no-op handler.

Run as `python -m bench.noop_server PORT [PROCESSES]`. The handler still reads the body, as any webhook
handler must, and answers a small JSON body like the ingress does; everything else (signature, framing,
Kafka) is gone. With PROCESSES > 1 that many processes share the port (SO_REUSEPORT, as `sentpipe ingress
--workers` does): the most any server of that many processes can answer on the machine.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
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


async def serve(port: int, reuse_port: bool = False) -> None:
    app = web.Application(client_max_size=MAX_BODY)
    app.router.add_post("/webhooks/sent", webhook)
    app.router.add_get("/healthz", healthz)
    # Same runner/site options as ingress/server.py.
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=2048, reuse_port=reuse_port or None).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main() -> None:
    port = int(sys.argv[1])
    processes = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    if processes <= 1:
        uvloop.run(serve(port))
        return
    # The others are this module run with "-": one process, port shared. They get SIGTERM with this one.
    others = [
        subprocess.Popen([sys.executable, "-m", "bench.noop_server", str(port), "-"])
        for _ in range(processes - 1)
    ]
    try:
        uvloop.run(serve(port, reuse_port=True))
    finally:
        for p in others:
            p.terminate()
        for p in others:
            p.wait()


def main_shared() -> None:
    uvloop.run(serve(int(sys.argv[1]), reuse_port=True))


if __name__ == "__main__":
    if sys.argv[2:] == ["-"]:
        main_shared()
    else:
        main()
