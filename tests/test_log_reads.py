"""A bounded read of a topic (replay, dlq list and redrive, events show) that Kafka refuses ends at once with
the reason, against librdkafka's mock broker told to answer fetches with an error."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from confluent_kafka import Producer

from sentpipe.processors.offsets import Log, OpsError, Range
from sentpipe.settings import Settings
from tests.kafka_mock import MockCluster

FETCH = 1  # the Kafka protocol's ApiKey
TOPIC_AUTHORIZATION_FAILED = 29


@pytest.fixture
def mock() -> Iterator[MockCluster]:
    cluster = MockCluster()
    cluster.create_topic("t", 1)
    p = Producer({"bootstrap.servers": cluster.bootstrap})
    for _ in range(10):
        p.produce("t", b"v", b"k")
    assert p.flush(10) == 0
    yield cluster
    cluster.close()


def test_a_read_kafka_does_not_authorize_names_the_acl_at_once(mock: MockCluster) -> None:
    """It ended "no records from Kafka broker ... for 30s" (the error was skipped as a partition's hiccup)."""
    mock.answer_with_errors(FETCH, *[TOPIC_AUTHORIZATION_FAILED] * 1000)
    with (
        Log(Settings(kafka_bootstrap=mock.bootstrap), timeout=5, stall_s=20) as log,
        pytest.raises(OpsError, match=r"Topic authorization failed.*READ on the topic"),
    ):
        list(log.read([Range("t", 0, 0, 10)]))
