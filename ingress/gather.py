"""One /metrics for N ingress worker processes: the supervisor serves every worker's exposition at once.

Each worker serves its own metrics on a loopback port it picked (the supervisor learns it through a pipe).
A scrape of the supervisor's metrics port fetches them all and returns one exposition in which every sample
carries a `worker` label ("0" .. "N-1"), so one Prometheus target covers the pod and `sum()` in a query
adds the workers up. Merging is done on the text: each family's HELP/TYPE lines once, then its samples from
every worker; no sample is parsed or re-rendered, so nothing of it can change on the way.

A worker that does not answer makes the whole scrape fail (503): Prometheus marks the target down (`up` is
0, which the ingress alerts watch) instead of silently counting less.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST

log = logging.getLogger("sentpipe.ingress")

FETCH_TIMEOUT_S = 5.0
# A connection to the metrics port that sends no request within this long is closed: each one holds a thread.
IDLE_TIMEOUT_S = 10.0


def label_sample(line: str, label: str) -> str:
    """A sample line with `label` (already rendered, `name="value"`) as its first label."""
    # A metric name is [a-zA-Z_:][a-zA-Z0-9_:]*, so the first "{" or " " ends it.
    for i, c in enumerate(line):
        if c == "{":
            rest = line[i + 1 :]
            return f"{line[: i + 1]}{label}{'' if rest.startswith('}') else ','}{rest}"
        if c == " ":
            return f"{line[:i]}{{{label}}}{line[i:]}"
    return line  # not a sample line; expositions have none such


def merge(expositions: Sequence[str], label_name: str = "worker") -> str:
    """The text expositions of several processes as one: family headers once, each process's samples
    labelled with its index in `expositions`."""
    headers: dict[str, list[str]] = {}  # family name -> its HELP/TYPE lines, in first-seen order
    samples: dict[str, list[str]] = {}
    for index, text in enumerate(expositions):
        label = f'{label_name}="{index}"'
        family = ""
        # "\n" only: the format's one line end. str.splitlines also splits on U+0085, U+2028 and U+2029,
        # which a label value may hold (they are not escaped), and the halves parse as nothing.
        for line in text.split("\n"):
            if not line:
                continue
            if line.startswith("#"):
                parts = line.split(" ", 3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    family = parts[2]
                    seen = headers.setdefault(family, [])
                    samples.setdefault(family, [])
                    if line not in seen:
                        seen.append(line)
                continue
            samples.setdefault(family, []).append(label_sample(line, label))
            headers.setdefault(family, [])
    out: list[str] = []
    for family, lines in headers.items():
        out += lines
        out += samples[family]
    return "\n".join(out) + "\n"


# No proxy, whatever the environment says: urllib sends even 127.0.0.1 through http_proxy unless no_proxy
# names it, and with a proxy injected into the container every scrape was 503 worker_unavailable.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def fetch(port: int, timeout_s: float = FETCH_TIMEOUT_S) -> str:
    with _DIRECT.open(f"http://127.0.0.1:{port}/metrics", timeout=timeout_s) as resp:
        body: bytes = resp.read()
    return body.decode()


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        """A client gone mid-answer is its business; socketserver printed each one's traceback to stderr."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            log.info("metrics client went away: %s", type(exc).__name__)
        else:
            log.error("metrics request failed", exc_info=exc)


class Gatherer:
    """The supervisor's metrics server: bound at once (a taken port fails the start), answering 503 until
    `serve_workers` tells it where the workers' own metrics are."""

    def __init__(self, host: str, port: int) -> None:
        self._ports: list[int] | None = None
        gatherer = self

        class Handler(BaseHTTPRequestHandler):
            # Per read only (a byte every few seconds went on for ever); longer than the head's timer, whose
            # 408 it would otherwise race to close a silent connection without a word.
            timeout = IDLE_TIMEOUT_S + 1

            def setup(self) -> None:
                super().setup()
                # So the whole head (one request per connection: HTTP/1.0) has IDLE_TIMEOUT_S.
                self.cut_off = False
                self._head_done = False
                self._head_lock = threading.Lock()  # the 408 and the handler's own answer: never both
                self._head_timer = threading.Timer(IDLE_TIMEOUT_S, self._cut_off)
                self._head_timer.daemon = True
                self._head_timer.start()

            def _cut_off(self) -> None:
                with self._head_lock:
                    if self._head_done:
                        return
                    self.cut_off = True
                # From the timer's thread: the handler's is blocked reading the head, and this ends it.
                detail = f"the request's headers did not arrive within {IDLE_TIMEOUT_S:g}s"
                body = json.dumps({"error": "header_timeout", "detail": detail}).encode()
                with contextlib.suppress(OSError):
                    self.connection.sendall(
                        b"HTTP/1.0 408 Request Timeout\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
                    )
                    self.connection.shutdown(socket.SHUT_RDWR)

            def parse_request(self) -> bool:
                try:
                    parsed = super().parse_request()
                finally:
                    with self._head_lock:
                        self._head_done = True
                    self._head_timer.cancel()
                return parsed and not self.cut_off  # cut off: a head read to its EOF, answered 408

            def finish(self) -> None:
                self._head_timer.cancel()
                super().finish()

            def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
                # JSON like every other answer; the stock page quoted the request's bytes back.
                self.close_connection = True
                if self.cut_off:
                    return  # a head cut short by its timeout: answered 408 already
                self.request_version = "HTTP/1.0"  # a request line it could not read left 0.9: no headers
                try:
                    phrase = HTTPStatus(code).phrase
                except ValueError:
                    phrase = "error"
                body = json.dumps({"error": "malformed_request", "detail": phrase}).encode()
                self._answer(code, body, "application/json")

            def do_GET(self) -> None:
                if self.path.split("?", 1)[0] != "/metrics":
                    self._answer(404, b'{"error":"not_found","detail":"Not Found"}', "application/json")
                    return
                status, body, content_type = gatherer.scrape()
                self._answer(status, body, content_type)

            def _answer(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # no access log, like the workers' own metrics servers

        self._server = _QuietServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True)
        self._thread.start()

    def serve_workers(self, ports: Sequence[int]) -> None:
        self._ports = list(ports)

    def scrape(self) -> tuple[int, bytes, str]:
        ports = self._ports
        if ports is None:
            return 503, b'{"error":"starting","detail":"ingress workers starting"}\n', "application/json"
        texts = []
        for index, port in enumerate(ports):
            try:
                texts.append(fetch(port))
            except (OSError, urllib.error.URLError, UnicodeDecodeError) as exc:
                log.warning("ingress worker %d did not answer its metrics scrape: %s", index, exc)
                detail = f"ingress worker {index} did not answer"
                return (
                    503,
                    f'{{"error":"worker_unavailable","detail":"{detail}"}}\n'.encode(),
                    "application/json",
                )
        return 200, merge(texts).encode(), CONTENT_TYPE_LATEST

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
