"""Kafka refusing a read or a group (ACLs) or failing every fetch, against librdkafka's mock broker told to
answer with those errors: the redrive lock and the dedup-table restore end at once, or within their idle
bound, with a line naming what is missing, instead of waiting or hanging without a word."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from confluent_kafka import Producer

from sentpipe.kafka import BrokerRefused, BrokerUnavailable
from sentpipe.processors import restore
from sentpipe.processors.dlq import redrive_group
from sentpipe.processors.group_lock import GroupLock, LockRefused
from sentpipe.processors.topics import changelog_topic
from sentpipe.processors.worker import create_app
from sentpipe.schemas.topics import Topics
from sentpipe.settings import Settings
from tests.kafka_mock import MockCluster
from tests.processes import settings_env

# ApiKeys and error codes of the Kafka protocol.
FETCH, FIND_COORDINATOR, JOIN_GROUP = 1, 10, 11
UNKNOWN_SERVER_ERROR, TOPIC_AUTHORIZATION_FAILED, GROUP_AUTHORIZATION_FAILED = -1, 29, 30


@pytest.fixture
def mock() -> Iterator[MockCluster]:
    cluster = MockCluster()
    yield cluster
    cluster.close()


@pytest.mark.parametrize("api_key", [FIND_COORDINATOR, JOIN_GROUP], ids=["find-coordinator", "join-group"])
def test_a_lock_whose_group_kafka_does_not_authorize_names_the_acl_at_once(
    mock: MockCluster, api_key: int
) -> None:
    """It waited its whole 15 s and said the group was held by another process."""
    mock.create_topic("ledger", 1)
    mock.answer_with_errors(api_key, *[GROUP_AUTHORIZATION_FAILED] * 100)
    started = time.monotonic()
    with pytest.raises(
        LockRefused, match=r"consumer group g: .*Group authorization failed.*READ on the group"
    ):
        GroupLock(Settings(kafka_bootstrap=mock.bootstrap), "ledger", "g", timeout=5).acquire()
    assert time.monotonic() - started < 12  # a bound, not a measure: the wait it replaces was 15 s


def test_a_redrive_refused_its_group_says_so_not_that_another_redrive_runs(mock: MockCluster) -> None:
    s = Settings(kafka_bootstrap=mock.bootstrap, topic_prefix="r.", app_id="r")
    topics = Topics(s.topic_prefix)
    for name in (topics.dlq, topics.dlq_redriven):
        mock.create_topic(name, 1)
    mock.answer_with_errors(FIND_COORDINATOR, *[GROUP_AUTHORIZATION_FAILED] * 100)
    res = subprocess.run(
        [sys.executable, "-m", "sentpipe", "dlq", "redrive"],
        env={**settings_env(s), "COLUMNS": "250"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and len(lines) == 1, res.stderr
    assert lines[0].startswith(f"error: Kafka at {mock.bootstrap} refused this client consumer group "), lines
    assert redrive_group(s) in lines[0] and "READ on the group" in lines[0], lines
    assert "another redrive" not in lines[0], lines


def _changelog(mock: MockCluster) -> tuple[Settings, object]:
    """Settings for a router on the mock broker, its changelog holding ten ids, and its (empty) store."""
    s = Settings(kafka_bootstrap=mock.bootstrap, table_store="memory://", app_id="x")
    topic = changelog_topic(s)
    mock.create_topic(topic, 1)
    p = Producer({"bootstrap.servers": mock.bootstrap})
    for i in range(10):
        p.produce(topic, b"v", b"k%d" % i)
    assert p.flush(10) == 0
    return s, create_app(s, role="route").sentpipe.seen.data  # type: ignore[attr-defined]


def test_a_restore_kafka_does_not_authorize_names_the_acl_at_once(mock: MockCluster) -> None:
    s, store = _changelog(mock)
    mock.answer_with_errors(FETCH, *[TOPIC_AUTHORIZATION_FAILED] * 100)
    started = time.monotonic()
    with pytest.raises(
        BrokerRefused, match=r"x-dedup-changelog: .*Topic authorization failed.*READ on the topic"
    ):
        restore.restore_dedup_table(s, store)
    assert time.monotonic() - started < restore.IDLE_TIMEOUT_S / 2


def test_a_restore_whose_every_fetch_fails_ends_within_its_idle_bound_naming_the_error(
    mock: MockCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The error events, dropped, reset the idle clock: a fetch error returned every time (a partition
    without a leader) kept the worker restoring forever, without a line. Here the errors stop after about
    20 s and the restore then succeeded, instead of ending after 3."""
    monkeypatch.setattr(restore, "IDLE_TIMEOUT_S", 3.0)
    s, store = _changelog(mock)
    mock.answer_with_errors(FETCH, *[UNKNOWN_SERVER_ERROR] * 20)
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable, match=r"stopped arriving during restore .*: Fetch .*failed"):
        restore.restore_dedup_table(s, store)
    assert time.monotonic() - started < 18  # a bound, not a measure: the errors alone last about 20 s
