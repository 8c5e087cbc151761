"""SENTPIPE_KAFKA_SESSION_TIMEOUT_S reaches both stages' consumers, within the range brokers accept.

Pure configuration: the failover it shortens is exercised by tests/test_chaos_worker.py, whose workers run
with a 10 s session against the real broker.
"""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from sentpipe.kafka import batch_consumer_config
from sentpipe.processors.worker import create_app
from sentpipe.settings import Settings


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
