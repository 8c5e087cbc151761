"""Create every topic sentpipe uses, idempotently."""

from __future__ import annotations

from dataclasses import dataclass

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import NewTopic  # type: ignore[attr-defined]

from sentpipe.kafka import admin_client, existing_partitions
from sentpipe.schemas.topics import Topics, topic_specs
from sentpipe.settings import Settings

# The worker's dedup table; Faust names its changelog topic after the app id and the table.
DEDUP_TABLE = "dedup"


def changelog_topic(settings: Settings) -> str:
    return f"{settings.app_id}-{DEDUP_TABLE}-changelog"


def projections_group(settings: Settings) -> str:
    """The projector's consumer group, apart from the router's so neither waits behind the other."""
    return f"{settings.app_id}-projections"


@dataclass(frozen=True, slots=True)
class TopicState:
    name: str
    partitions: int
    created: bool


def ensure_topics(settings: Settings, timeout: float = 10.0) -> list[TopicState]:
    bootstrap = settings.kafka_bootstrap
    admin = admin_client(settings)
    have = existing_partitions(admin, bootstrap, timeout)
    specs = topic_specs(
        Topics(settings.topic_prefix),
        raw_partitions=settings.raw_partitions,
        routed_partitions=settings.routed_partitions,
        replication_factor=settings.replication_factor,
        raw_retention_ms=settings.raw_retention_ms,
        dlq_retention_ms=settings.dlq_retention_ms,
    )
    missing = [s for s in specs if s.name not in have]
    if missing:
        futures = admin.create_topics(
            [NewTopic(s.name, s.partitions, s.replication_factor, config=s.config) for s in missing],
            operation_timeout=timeout,
            request_timeout=timeout,
        )
        for fut in futures.values():
            try:
                fut.result(timeout=timeout)
            except KafkaException as exc:
                if exc.args[0].name() != "TOPIC_ALREADY_EXISTS":  # created by a concurrent run
                    raise
        have |= {s.name: s.partitions for s in missing}
    created = {s.name for s in missing}
    return [TopicState(s.name, have[s.name], s.name in created) for s in specs]


def check_copartitioning(settings: Settings, timeout: float = 10.0) -> None:
    """Refuse to run when the dedup table cannot be co-partitioned with the raw topic."""
    have = existing_partitions(admin_client(settings), settings.kafka_bootstrap, timeout)
    raw = Topics(settings.topic_prefix).raw
    if raw not in have:
        raise CopartitioningError(f"topic {raw} does not exist: run `sentpipe topics ensure` first")
    if have[raw] != settings.raw_partitions:
        raise CopartitioningError(
            f"{raw} has {have[raw]} partitions but SENTPIPE_RAW_PARTITIONS is {settings.raw_partitions}: "
            "the dedup table must have exactly the raw topic's partition count"
        )
    changelog = changelog_topic(settings)
    if changelog in have and have[changelog] != have[raw]:
        raise CopartitioningError(
            f"{changelog} has {have[changelog]} partitions, {raw} has {have[raw]}: they must match"
        )


class CopartitioningError(Exception):
    pass


def check_group_owns_prefix(settings: Settings, group: str, timeout: float = 10.0) -> None:
    """Refuse a consumer group that has committed offsets for another prefix's topics.

    A group shared by two prefixes (one SENTPIPE_APP_ID for several SENTPIPE_TOPIC_PREFIX values) also
    shares the dedup changelog, and Faust then takes its recovery path with records already waiting: a
    start-up race in Faust 0.15 that can freeze the group's commits without a word.
    """
    from confluent_kafka import ConsumerGroupTopicPartitions, KafkaException

    admin = admin_client(settings)
    try:
        future = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)])[group]
        committed = future.result(timeout=timeout)
    except KafkaException as exc:
        err = exc.args[0] if exc.args else None
        if getattr(err, "code", lambda: None)() == KafkaError.GROUP_ID_NOT_FOUND:
            return
        raise
    ours = (settings.topic_prefix, f"{settings.app_id}-")
    foreign = sorted({tp.topic for tp in committed.topic_partitions if not tp.topic.startswith(ours)})
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise CopartitioningError(
            f"consumer group {group} has committed offsets for topics outside the prefix "
            f"{settings.topic_prefix!r} ({shown}): give this prefix its own SENTPIPE_APP_ID"
        )
