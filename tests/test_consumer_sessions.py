"""SENTPIPE_KAFKA_SESSION_TIMEOUT_S reaches both stages' consumers, within the range brokers accept; the
projector's consumer logs a broker's absence now and then, not per connection attempt.

Configuration only: the failover the session shortens is exercised by tests/test_chaos_worker.py, whose
workers run with a 10 s session against the real broker.
"""

from __future__ import annotations

import logging
import math
import time

import pytest
from pydantic import ValidationError

from sentpipe.kafka import BatchConsumer, _FailuresNowAndThen, batch_consumer_config
from sentpipe.processors.worker import create_app
from sentpipe.settings import Settings
from tests.processes import free_port


def test_the_default_is_kafkas_own_and_heartbeats_come_every_third_of_short_sessions() -> None:
    s = Settings()
    assert (s.kafka_session_timeout_s, s.kafka_heartbeat_interval_s) == (45.0, 3.0)
    assert Settings(kafka_session_timeout_s=6).kafka_heartbeat_interval_s == 2.0


@pytest.mark.parametrize("value", [5.9, 0, -1, 300.5, math.nan, math.inf, "soon"])
def test_a_session_the_brokers_would_refuse_by_default_is_refused_at_start(value: object) -> None:
    with pytest.raises(ValidationError, match="kafka_session_timeout_s"):
        Settings(kafka_session_timeout_s=value)


def test_the_projectors_librdkafka_consumer_gets_the_session() -> None:
    config = batch_consumer_config(Settings(kafka_session_timeout_s=12), "g")
    assert (config["session.timeout.ms"], config["heartbeat.interval.ms"]) == (12_000, 3_000)


@pytest.mark.parametrize("session", [6.0, 300.0])
def test_the_routers_faust_consumer_gets_the_session(session: float) -> None:
    conf = create_app(Settings(kafka_session_timeout_s=session)).conf
    assert conf.broker_session_timeout == session
    assert conf.broker_heartbeat_interval == min(3.0, session / 3)
    # Faust (and aiokafka) want a request to outlast the session.
    assert conf.broker_request_timeout > session


def test_a_consumer_whose_broker_is_away_logs_its_connection_failures_now_and_then(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A real librdkafka consumer, its broker a closed port: one line for its failures, not one per attempt
    (a worker logged about 20 ERROR lines a second through a broker outage)."""
    caplog.set_level(logging.DEBUG, logger="sentpipe.kafka")
    consumer = BatchConsumer(Settings(kafka_bootstrap=f"127.0.0.1:{free_port()}"), "g", ["t"])
    try:
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            consumer.poll_batch(10, 0.2)
    finally:
        consumer.close()
    failures = [
        r for r in caplog.records if r.name == "sentpipe.kafka" and "Connection refused" in r.getMessage()
    ]
    assert len(failures) == 1, [r.getMessage() for r in failures]


def test_connection_failures_left_out_are_counted_in_the_next_line_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    quiet = _FailuresNowAndThen(30.0, clock=lambda: now[0])
    caplog.set_level(logging.DEBUG, logger="sentpipe.kafka")
    for t in range(0, 61):  # one failure a second for a minute, and other lines between them
        now[0] = float(t)
        quiet.log(logging.ERROR, "%s [%s] %s", "FAIL", "consumer-1", "Connection refused")
        quiet.log(logging.INFO, "%s [%s] %s", "REBALANCE", "consumer-1", "assigned")
    lines = [r.getMessage() for r in caplog.records]
    assert lines.count("REBALANCE [consumer-1] assigned") == 61
    assert [x for x in lines if x.startswith("FAIL")] == [
        "FAIL [consumer-1] Connection refused",
        "FAIL [consumer-1] Connection refused (and 29 more connection failures since the last one logged)",
        "FAIL [consumer-1] Connection refused (and 29 more connection failures since the last one logged)",
    ]
