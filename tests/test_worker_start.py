"""What the worker checks before it starts (its consumer groups belong to its topic prefix), and what it
keeps checking while it runs (the raw topic's partition count)."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewPartitions

from sentpipe.processors.topics import ensure_topics
from sentpipe.schemas.topics import Topics
from sentpipe.settings import Settings, default_app_id
from tests.kafka_tools import wait_topics_ready
from tests.pipeline import start_worker
from tests.processes import free_port
from tests.test_ops_cli import sentpipe


def test_the_default_app_id_follows_the_topic_prefix() -> None:
    assert Settings().app_id == "sentpipe"  # the default prefix keeps the historical group
    assert Settings(topic_prefix="acme.").app_id == "sentpipe-acme"
    assert Settings(topic_prefix="acme.", app_id="mine").app_id == "mine"
    assert default_app_id("a.b.") != default_app_id("a.c.")


def commit_offset(bootstrap: str, group: str, topic: str) -> None:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        c.commit(offsets=[TopicPartition(topic, 0, 0)], asynchronous=False)
    finally:
        c.close()


def test_a_group_holding_another_prefixs_offsets_is_refused_with_one_line(
    settings: Settings, tmp_path: Path
) -> None:
    other = settings.model_copy(update={"topic_prefix": f"o{uuid.uuid4().hex[:8]}."})
    ensure_topics(other)
    # Created moments ago, a topic is listed before its leader is elected: a commit then was refused with
    # UNKNOWN_TOPIC_OR_PART (seen once in a run of this file).
    wait_topics_ready(settings.kafka_bootstrap, [Topics(other.topic_prefix).raw])
    commit_offset(settings.kafka_bootstrap, settings.app_id, Topics(other.topic_prefix).raw)
    res = sentpipe(settings, "worker", timeout=60)
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "outside the prefix" in lines[0] and other.topic_prefix in lines[0], res.stderr


def test_a_group_of_its_own_prefix_starts(settings: Settings, tmp_path: Path) -> None:
    commit_offset(settings.kafka_bootstrap, settings.app_id, Topics(settings.topic_prefix).raw)
    worker = start_worker(settings, tmp_path)  # waits for its metrics port: it started
    worker.stop()


def test_a_kafka_error_while_faust_starts_ends_the_worker_with_one_line(
    settings: Settings, tmp_path: Path
) -> None:
    """Past the start-up checks, Faust creates its own topics and joins the group: an error of the broker's
    there (a broker lost just after the checks, in the chaos soak; here a replication factor above the
    broker count, refused for Faust's leader topic) ended the worker with mode's 50-line traceback."""
    brokers = len(
        AdminClient({"bootstrap.servers": settings.kafka_bootstrap}).list_topics(timeout=10).brokers
    )
    res = sentpipe(
        settings,
        "worker",
        timeout=120,
        replication_factor=brokers + 1,
        worker_web_port=free_port(),
        worker_metrics_port=free_port(),
        data_dir=tmp_path / "faust",
    )
    assert res.returncode == 1, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-6000:]
    errors = [line for line in res.stderr.splitlines() if "ERROR" in line or "CRITICAL" in line]
    assert len(errors) == 1, errors
    assert "the worker could not start" in errors[0] and "InvalidReplicationFactorError" in errors[0], errors


def test_partitions_added_to_the_raw_topic_while_the_worker_runs_stop_it_with_one_line(
    settings: Settings, tmp_path: Path
) -> None:
    """The ingress writes to added partitions at once, and the dedup table has no partition for them: the
    router's agent crashed and was restarted on every batch that held one, their records in no lag and no
    stall, /livez 200, until a restart refused to start. Now the running worker stops, saying why."""
    worker = start_worker(settings, tmp_path, worker_role="route")
    raw = Topics(settings.topic_prefix).raw
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    admin.create_partitions([NewPartitions(raw, settings.raw_partitions + 1)])[raw].result(timeout=30)
    assert worker.proc.p is not None
    try:
        code = worker.proc.p.wait(90)
    except subprocess.TimeoutExpired:
        worker.stop()
        raise AssertionError("the worker went on with a raw partition the table has none for") from None
    assert code == 1, worker.proc.tail(60)
    refusal = f"{raw} has {settings.raw_partitions + 1} partitions but SENTPIPE_RAW_PARTITIONS is"
    criticals = [line for line in worker.proc.tail(400).splitlines() if "CRITICAL sentpipe" in line]
    assert any(refusal in line and "the worker stops" in line for line in criticals), worker.proc.tail(60)
