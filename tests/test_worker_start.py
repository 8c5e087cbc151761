"""What the worker checks before it starts: its consumer groups belong to its topic prefix."""

from __future__ import annotations

import uuid
from pathlib import Path

from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from sentpipe.processors.topics import ensure_topics
from sentpipe.schemas.topics import Topics
from sentpipe.settings import Settings, default_app_id
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
