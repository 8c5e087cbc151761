"""Create the design's topics, idempotently."""

from __future__ import annotations

from dataclasses import dataclass

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from schemas.topics import Topics, topic_specs
from sentpipe.settings import Settings


class BrokerUnavailable(Exception):
    """The broker did not answer in time; the message names the address."""


@dataclass(frozen=True, slots=True)
class TopicState:
    name: str
    partitions: int
    created: bool


def admin_client(bootstrap: str) -> AdminClient:
    # librdkafka prints every failed connect to stderr; the caller reports one line instead.
    return AdminClient({"bootstrap.servers": bootstrap, "socket.timeout.ms": 5000, "log_level": 0})


def existing_partitions(admin: AdminClient, bootstrap: str, timeout: float = 10.0) -> dict[str, int]:
    try:
        md = admin.list_topics(timeout=timeout)
    except KafkaException as exc:
        raise BrokerUnavailable(f"Kafka broker at {bootstrap} did not answer within {timeout:.0f}s") from exc
    return {name: len(t.partitions) for name, t in md.topics.items() if t.error is None}


def ensure_topics(settings: Settings, timeout: float = 10.0) -> list[TopicState]:
    bootstrap = settings.kafka_bootstrap
    admin = admin_client(bootstrap)
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
