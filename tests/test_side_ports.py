"""The metrics and probe ports under careless or hostile clients, as the webhook port is.

They listen where the webhook port does (every address, by default) and share its process's file
descriptors: a client trickling header bytes held a connection there for ever, and enough of them had Sent's
deliveries reset at accept. Malformed requests were answered with their own bytes quoted back in plain text,
and logged at ERROR with a traceback.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import orjson
from aiohttp.test_utils import TestClient, TestServer

from sentpipe.ingress.app import create_metrics_app
from sentpipe.processors.health import Health, health_app
from sentpipe.settings import Settings
from tests.pipeline import start_worker
from tests.processes import Proc, start_ingress
from tests.test_console_hostile import _console as console
from tests.test_ingress_workers import start_workers

MALFORMED = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Secret: a\x01b\r\n\r\n"
# Python's http.server takes any header value: a request line it cannot read (its page quoted it back).
MALFORMED_LINE = b"GET /metrics HTTP/1.1 X-Secret\r\n\r\n"


def trickled_head(port: int, limit_s: float = 60.0) -> bytes:
    """Send a head one byte a second, never ending it; what the server answered once it closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nX-A: ")
        deadline = time.monotonic() + limit_s
        answer = b""
        while time.monotonic() < deadline:
            try:
                sock.sendall(b"a")
            except OSError:
                break  # closed by the server
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                chunk = None
            except OSError:
                break
            if chunk == b"":
                break
            if chunk:
                answer += chunk
            time.sleep(1)
        else:
            raise AssertionError(f"the connection was still open after {limit_s:g} s")
        return answer


def malformed_answer(port: int, request: bytes = MALFORMED) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer


def assert_json_400(answer: bytes, code_key: str = "error") -> None:
    """`code_key`: where the answer's code is (the console's API says `code`, its `error` is for a person)."""
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b" ", 2)[1] == b"400", answer
    assert orjson.loads(body)[code_key] == "malformed_request", answer
    assert b"X-Secret" not in answer and b"a\x01b" not in answer


def assert_quiet(proc: Proc) -> None:
    log = proc.tail(400)
    assert "Traceback" not in log and "X-Secret" not in log, log


def test_the_ingress_metrics_port_times_out_heads_and_answers_malformed_requests_in_json(
    settings: Settings, tmp_path: Path
) -> None:
    proc, _, mport = start_ingress(settings, tmp_path, body_timeout_s=2)
    try:
        answer = trickled_head(mport)
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert orjson.loads(answer.partition(b"\r\n\r\n")[2])["error"] == "header_timeout"
        assert_json_400(malformed_answer(mport))
    finally:
        proc.stop()
    assert_quiet(proc)


def test_the_worker_metrics_port_times_out_heads_and_answers_malformed_requests_in_json(
    settings: Settings, tmp_path: Path
) -> None:
    worker = start_worker(settings, tmp_path)
    try:
        assert trickled_head(worker.metrics_port).startswith(b"HTTP/1.1 408")
        assert_json_400(malformed_answer(worker.metrics_port))
    finally:
        worker.stop()
    assert_quiet(worker.proc)


def test_the_ingress_supervisors_metrics_port_times_out_heads_and_answers_malformed_requests_in_json(
    settings: Settings, tmp_path: Path
) -> None:
    proc, _, mport = start_workers(settings, tmp_path)
    try:
        answer = trickled_head(mport)  # it closed the connection without a word
        assert answer.startswith(b"HTTP/1.0 408"), answer
        assert orjson.loads(answer.partition(b"\r\n\r\n")[2])["error"] == "header_timeout"
        assert_json_400(malformed_answer(mport, MALFORMED_LINE))
    finally:
        proc.stop()
    assert_quiet(proc)


def test_the_console_times_out_heads_and_answers_malformed_requests_in_json(settings: Settings) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = console(settings, port, body_timeout_s="2")
    try:
        assert proc.stdout is not None and proc.stdout.readline().startswith("console on")
        assert trickled_head(port).startswith(b"HTTP/1.1 408")
        assert_json_400(malformed_answer(port), code_key="code")
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err  # SIGTERM: a clean stop
    assert "Traceback" not in err and "X-Secret" not in err, err


async def test_the_metrics_ports_answer_an_unknown_path_or_method_in_json() -> None:
    """aiohttp's own 404 and 405 were plain text ('404: Not Found') on the ingress's and the worker's
    metrics ports, while every other error there (and the --workers supervisor's 404) is JSON with a code."""
    for app in (create_metrics_app(), health_app(Health())):
        async with TestClient(TestServer(app)) as client:
            for method, path, status, code in (
                ("GET", "/nope", 404, "not_found"),
                ("POST", "/metrics", 405, "method_not_allowed"),
            ):
                resp = await client.request(method, path)
                assert resp.status == status, (method, path)
                assert resp.content_type == "application/json", await resp.text()
                assert (await resp.json())["error"] == code
                if status == 405:
                    assert "GET" in resp.headers["Allow"]
