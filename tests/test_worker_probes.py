"""The worker's probes see what Kubernetes must see: a blocked event loop fails liveness (the probe is
served by the loop that does the work), Faust's web server is not listening (its /table views would
expose dedup keys), and the consumer-lag gauge holds only the partitions this worker owns."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from confluent_kafka import Producer
from prometheus_client import generate_latest

from sentpipe.processors.worker import LagSeries
from sentpipe.schemas import routing as r
from sentpipe.schemas.samples import SampleFactory
from sentpipe.schemas.topics import Topics
from sentpipe.settings import Settings
from tests.pipeline import start_worker, wait_for


def _status(url: str, timeout: float = 2.0) -> int | str:
    """The HTTP status, or "timeout" / "refused" when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except TimeoutError:
        return "timeout"
    except urllib.error.URLError as exc:
        return "timeout" if isinstance(exc.reason, TimeoutError) else "refused"


def _body(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return str(resp.read().decode())
    except urllib.error.HTTPError as exc:
        return str(exc.read().decode())
    except OSError as exc:
        return repr(exc)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize(("role", "blocked"), [("all", 503), ("project", "timeout")])
def test_a_blocked_event_loop_fails_liveness_and_faust_web_is_off(
    settings: Settings, tmp_path: Path, role: str, blocked: int | str
) -> None:
    """Role `all` projects on a loop of its own beside Faust's: its heartbeat fails /livez with a 503. Role
    `project` has one loop, which serves the probe too: the probe times out."""
    worker = start_worker(settings, tmp_path, handler_modules=["tests.handlers_block"], worker_role=role)
    base = f"http://127.0.0.1:{worker.metrics_port}"
    try:
        wait_for(lambda: _status(f"{base}/readyz"), lambda s: s == 200, 60, "/readyz 200", worker.proc.tail)
        assert _status(f"{base}/livez") == 200
        web_port = int(worker.proc.env["SENTPIPE_WORKER_WEB_PORT"])
        assert not _listening(web_port), "Faust's web server listens: its /table views expose dedup keys"

        sample = SampleFactory(7).message_status("m-block", "delivered")
        routed = r.route(
            None,
            sample.body,
            {},
            topics=Topics(settings.topic_prefix),
            id_source="auto",
            default_tenant="default",
            record_timestamp_ms=0,
        )
        producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
        producer.produce(routed.topic, routed.value, routed.key)
        assert producer.flush(10) == 0

        # The handler holds the projector's loop for 20 s: the probe must fail, though the process is alive
        # and its sockets accept connections (the kernel does that); a TCP probe would pass.
        wait_for(lambda: _status(f"{base}/livez"), lambda s: s == blocked, 30, "/livez to fail")
        assert worker.proc.p is not None and worker.proc.p.poll() is None
        assert _listening(worker.metrics_port)
        # Once the handler lets go, the same loop answers again.
        wait_for(
            lambda: _status(f"{base}/livez"),
            lambda s: s == 200,
            40,
            "/livez 200 again",
            lambda: _body(f"{base}/livez") + "\n" + worker.proc.tail(),
        )
    finally:
        worker.stop()


def _lag_lines() -> list[str]:
    """This test's series only: other tests in the process report lag for their own topics."""
    return [
        x
        for x in generate_latest().decode().splitlines()
        if x.startswith("sentpipe_consumer_lag{") and 'topic="t.raw"' in x
    ]


def test_lag_series_of_revoked_partitions_are_dropped() -> None:
    lag = LagSeries()
    lag.report(("t.raw", 0), 5)
    lag.report(("t.raw", 1), 3)
    lag.forget({("t.raw", 0)})  # revoked in a rebalance
    assert _lag_lines() == ['sentpipe_consumer_lag{partition="1",topic="t.raw"} 3.0']
    lag.keep_only(set())  # the next report: nothing assigned any more
    assert _lag_lines() == []
