"""The supervisor's one /metrics for N ingress workers (`ingress/gather.py`): merging expositions on the text,
and the server's answers (unit tests: real HTTP on loopback, no broker)."""

from __future__ import annotations

import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from sentpipe.ingress import gather
from sentpipe.ingress.gather import Gatherer, label_sample, merge
from tests.processes import free_port


def exposition(requests: int, seconds: list[float], in_flight: float) -> str:
    reg = CollectorRegistry()
    c = Counter("sp_requests", "Requests.", ["tenant", "status"], registry=reg)
    h = Histogram("sp_seconds", "Latency.", buckets=(0.01, 0.1), registry=reg)
    g = Gauge("sp_in_flight", "In flight.", registry=reg)
    c.labels('we"ird} name', "200").inc(requests)
    for s in seconds:
        h.observe(s)
    g.set(in_flight)
    return generate_latest(reg).decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_merge_labels_every_sample_with_its_worker_and_keeps_each_family_once() -> None:
    a, b = exposition(3, [0.005, 0.5], 2), exposition(5, [0.05], 0)
    merged = merge([a, b])
    got = samples(merged)
    for worker, text in (("0", a), ("1", b)):
        for (name, labels), value in samples(text).items():
            assert got[(name, tuple(sorted((*labels, ("worker", worker)))))] == value
    assert len(got) == len(samples(a)) + len(samples(b))
    for header in ("# HELP sp_requests_total Requests.", "# TYPE sp_seconds histogram"):
        assert merged.count(header + "\n") == 1
    # Each family's samples follow its own header (what the text format requires).
    lines = merged.splitlines()
    start = lines.index("# TYPE sp_in_flight gauge")
    assert lines[start + 1 : start + 3] == ['sp_in_flight{worker="0"} 2.0', 'sp_in_flight{worker="1"} 0.0']


def test_a_label_value_holding_a_unicode_line_separator_survives_the_merge() -> None:
    """A tenant label holding U+2028 (or U+0085, U+2029): split there too, the merged page did not parse and
    the multi-worker scrape failed as a whole."""
    reg = CollectorRegistry()
    c = Counter("sp_requests", "Requests.", ["tenant"], registry=reg)
    for tenant in ("a\u2028b", "c\u0085d", "e\u2029f"):
        c.labels(tenant).inc()
    text = generate_latest(reg).decode()
    got = samples(merge([text, text]))
    assert got[("sp_requests_total", (("tenant", "a\u2028b"), ("worker", "1")))] == 1.0
    assert len(got) == len(samples(text)) * 2


@pytest.mark.parametrize(
    ("line", "want"),
    [
        ("up 1.0", 'up{worker="3"} 1.0'),
        ('x_total{a="b"} 2.0', 'x_total{worker="3",a="b"} 2.0'),
        ('x{a="} {b"} 2.0', 'x{worker="3",a="} {b"} 2.0'),
        ("x{} 2.0", 'x{worker="3"} 2.0'),
    ],
)
def test_label_sample(line: str, want: str) -> None:
    assert label_sample(line, 'worker="3"') == want


class _Worker(BaseHTTPRequestHandler):
    body = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def worker_port() -> Iterator[int]:
    handler = type("W", (_Worker,), {"body": exposition(7, [0.2], 1).encode()})
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def get(port: int, path: str = "/metrics") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_gatherer_answers_503_until_told_then_the_merged_page_then_503_for_a_silent_worker(
    worker_port: int,
) -> None:
    port = free_port()
    g = Gatherer("127.0.0.1", port)
    try:
        assert get(port) == (503, '{"error":"starting","detail":"ingress workers starting"}\n')
        g.serve_workers([worker_port, worker_port])
        status, text = get(port)
        assert status == 200
        got = samples(text)
        assert (
            got[("sp_requests_total", (("status", "200"), ("tenant", 'we"ird} name'), ("worker", "1")))] == 7
        )
        assert get(port, "/other")[0] == 404
        g.serve_workers([worker_port, free_port()])  # nobody listens there
        status, text = get(port)
        assert status == 503 and '"worker_unavailable"' in text and "ingress worker 1" in text
    finally:
        g.close()


def test_the_workers_are_asked_directly_whatever_proxy_the_environment_names(
    worker_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """urllib sends even 127.0.0.1 through http_proxy unless no_proxy names it: with a proxy injected into
    the container, every scrape was 503 worker_unavailable and the replica-down alert fired for every pod."""
    for name in ("http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{free_port()}")  # nobody listens there
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(urllib.request, "_opener", None)  # urlopen's, built once from the environment
    assert "sp_requests_total" in gather.fetch(worker_port)


def test_a_taken_metrics_port_is_an_error_at_start(worker_port: int) -> None:
    with pytest.raises(OSError):
        Gatherer("127.0.0.1", worker_port)


def test_a_connection_that_sends_nothing_is_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gather, "IDLE_TIMEOUT_S", 0.5)
    port = free_port()
    g = Gatherer("127.0.0.1", port)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as idle:
            # Answered and closed. Left open, recv raises TimeoutError after our own 30 s.
            answer = b""
            while chunk := idle.recv(1024):
                answer += chunk
            assert answer.startswith(b"HTTP/1.0 408 ") and b'"header_timeout"' in answer, answer
        assert get(port)[0] == 503  # and the server still answers
    finally:
        g.close()
