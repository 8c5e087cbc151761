"""Answers a group coordinator gives while it loads or moves (a broker just restarted) never crash a process.

librdkafka (2.16 and before) dies by SIGSEGV when the admin API's OffsetFetch is answered NOT_COORDINATOR or
COORDINATOR_NOT_AVAILABLE (librdkafka issue #5040), on one of its own threads, where faulthandler prints
nothing. A worker started right after the broker came back died that way before its first line of output
(tests/test_chaos_worker.py, the broker and the database restarted together). Each case runs in a process of
its own against librdkafka's mock broker, told to answer the next OffsetFetch requests with those errors.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tests.services import REPO

_SETUP = """
from confluent_kafka import Consumer, TopicPartition
from sentpipe.settings import Settings
from tests.kafka_mock import (
    COORDINATOR_LOAD_IN_PROGRESS, COORDINATOR_NOT_AVAILABLE, NOT_COORDINATOR, OFFSET_FETCH, MockCluster
)

mock = MockCluster()
s = Settings(kafka_bootstrap=mock.bootstrap, topic_prefix="mine.", app_id="sentpipe-mine")
for name in ("mine.raw", "other.raw"):
    mock.create_topic(name, 2)

def commit(group, topic, partition, offset):
    c = Consumer({"bootstrap.servers": mock.bootstrap, "group.id": group, "enable.auto.commit": False})
    c.commit(offsets=[TopicPartition(topic, partition, offset)], asynchronous=False)
    c.close()

def coordinator_restarting():
    errors = (NOT_COORDINATOR, COORDINATOR_NOT_AVAILABLE, COORDINATOR_LOAD_IN_PROGRESS, NOT_COORDINATOR)
    mock.answer_with_errors(OFFSET_FETCH, *errors)
"""


def _run(body: str) -> subprocess.CompletedProcess[str]:
    script = _SETUP + textwrap.dedent(body)
    res = subprocess.run(
        [sys.executable, "-X", "faulthandler", "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode >= 0, f"killed by signal {-res.returncode}\n{res.stdout}\n{res.stderr}"
    return res


@pytest.mark.parametrize("group", ["sentpipe-mine", "sentpipe-mine-projections"])
def test_the_worker_start_up_check_survives_a_coordinator_that_is_loading(group: str) -> None:
    res = _run(f"""
        from sentpipe.processors.topics import CopartitioningError, check_group_owns_prefix
        commit({group!r}, "mine.raw", 1, 7)
        coordinator_restarting()
        check_group_owns_prefix(s, {group!r})  # the group's own offsets only: passes
        commit({group!r}, "other.raw", 0, 3)
        coordinator_restarting()
        try:
            check_group_owns_prefix(s, {group!r})
        except CopartitioningError as exc:
            print("refused:", exc)
        check_group_owns_prefix(s, "a-group-never-seen")  # nothing committed
        print("done")
    """)
    assert res.returncode == 0, res.stderr
    assert "refused:" in res.stdout and "other.raw" in res.stdout and "done" in res.stdout, res.stdout


def test_committed_offsets_are_read_through_a_coordinator_that_is_loading() -> None:
    res = _run("""
        from sentpipe.kafka import committed_offsets
        commit("g", "other.raw", 1, 42)
        coordinator_restarting()
        tps = [TopicPartition("other.raw", 0), TopicPartition("other.raw", 1)]
        print(sorted((tp.topic, tp.partition, tp.offset) for tp in committed_offsets(s, "g", tps, 10)))
    """)
    assert res.returncode == 0, res.stderr
    assert "[('other.raw', 0, -1001), ('other.raw', 1, 42)]" in res.stdout, res.stdout


def test_the_router_reads_where_its_group_resumes_through_a_coordinator_that_is_loading() -> None:
    """The bug: the router asks this for its first batch after an assignment, which after a broker restart
    comes while the coordinator loads; NOT_COORDINATOR crashed its agent, whose fetched records were then read
    again (ERROR lines and SentpipeRawRecordsReread for a routine broker restart)."""
    res = _run("""
        from sentpipe.kafka import RangeReader
        commit("g", "other.raw", 1, 42)
        reader = RangeReader(s, "g")
        coordinator_restarting()
        print(sorted(reader.start_offsets([("other.raw", 0), ("other.raw", 1)]).items()))
        reader.close()
    """)
    assert res.returncode == 0, res.stderr
    assert "[(('other.raw', 0), 0), (('other.raw', 1), 42)]" in res.stdout, res.stdout


def test_nothing_reads_offsets_through_the_admin_api() -> None:
    """The crash is silent and needs a broker restart at the wrong moment to show: keep the call out."""
    needle = ".list_consumer_group_offsets" + "("  # not itself a call this test would find
    calls = [
        f"{path.relative_to(REPO)}:{n}"
        for top in ("sentpipe", "processors", "ingress", "schemas", "sender", "tests", "bench")
        for path in sorted((REPO / top).rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if needle in line
    ]
    assert calls == []


def test_reads_of_the_log_go_on_through_a_partition_leader_moving() -> None:
    """librdkafka answers ListOffsets' leadership errors at once and does not ask again: a trace or a replay
    failed "did not answer" for a rolling restart of the brokers."""
    res = _run("""
        from sentpipe.processors.offsets import Log
        from tests.kafka_mock import LEADER_NOT_AVAILABLE, LIST_OFFSETS, NOT_LEADER_FOR_PARTITION
        with Log(s, timeout=10.0) as log:
            mock.answer_with_errors(LIST_OFFSETS, *[NOT_LEADER_FOR_PARTITION] * 6)
            print("watermarks", log.watermarks("mine.raw", [0, 1]))
            mock.answer_with_errors(LIST_OFFSETS, NOT_LEADER_FOR_PARTITION, LEADER_NOT_AVAILABLE)
            print("since", log.offsets_at("mine.raw", [0, 1], 0))
    """)
    assert res.returncode == 0, res.stderr
    assert "watermarks {0: (0, 0), 1: (0, 0)}" in res.stdout, res.stdout
    assert "since {0: None, 1: None}" in res.stdout, res.stdout
