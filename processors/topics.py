"""Create every topic sentpipe uses and keep their settings in line with sentpipe's, idempotently."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from confluent_kafka import KafkaException, TopicPartition
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewTopic,
    ResourceType,
)

from sentpipe.kafka import (
    BrokerUnavailable,
    admin_client,
    committed_offsets,
    existing_partitions,
    topic_configs,
    topic_max_message_bytes,
)
from sentpipe.schemas.topics import (
    ConfigChange,
    Topics,
    TopicSpec,
    config_changes,
    record_limit_problems,
    topic_specs,
)
from sentpipe.settings import Settings

log = logging.getLogger("sentpipe.topics")

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
    changes: tuple[ConfigChange, ...] = ()


def ensure_topics(settings: Settings, timeout: float = 10.0) -> list[TopicState]:
    """Create the topics that are missing and bring the existing ones' retentions and record limits to what
    the settings ask for (`config_changes`); partitions and replication are never changed."""
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
        max_body_bytes=settings.max_body_bytes,
    )
    changes = _converge_configs(admin, settings, [s for s in specs if s.name in have], timeout)
    missing = [s for s in specs if s.name not in have]
    if missing:
        futures = admin.create_topics(
            [NewTopic(s.name, s.partitions, s.replication_factor, config=s.config) for s in missing],
            operation_timeout=timeout,
            request_timeout=timeout,
        )
        existed: list[str] = []
        for name, fut in futures.items():
            try:
                fut.result(timeout=timeout)
            except KafkaException as exc:
                if exc.args[0].name() != "TOPIC_ALREADY_EXISTS":
                    raise
                existed.append(name)
        have |= {s.name: s.partitions for s in missing if s.name not in existed}
        if existed:
            # Created by a concurrent run, or listed without metadata (an error on it): an existing topic,
            # converged as one. Taken as created, it was reported "created" and its retention left as it was.
            deadline = time.monotonic() + timeout
            again = existing_partitions(admin, bootstrap, timeout)
            while (unknown := [n for n in existed if n not in again]) and time.monotonic() < deadline:
                time.sleep(0.2)  # a topic made a moment ago is listed with an error until it has leaders
                again = existing_partitions(admin, bootstrap, timeout)
            if unknown:
                raise BrokerUnavailable(
                    f"Kafka broker at {bootstrap} says {', '.join(unknown)} exists but lists it with an error"
                    f" for {timeout:g}s (a partition without a leader, or DESCRIBE on the topic not allowed)"
                )
            have |= {name: again[name] for name in existed}
            changes |= _converge_configs(admin, settings, [s for s in specs if s.name in existed], timeout)
            missing = [s for s in missing if s.name not in existed]
    created = {s.name for s in missing}
    return [
        TopicState(s.name, have[s.name], s.name in created, tuple(changes.get(s.name, ()))) for s in specs
    ]


def _converge_configs(
    admin: AdminClient, settings: Settings, specs: list[TopicSpec], timeout: float
) -> dict[str, list[ConfigChange]]:
    """Apply to existing topics what `config_changes` finds (one request), and return it per topic."""
    if not specs:
        return {}
    have = topic_configs(admin, settings.kafka_bootstrap, [s.name for s in specs], timeout)
    changes = {
        s.name: found
        for s in specs
        if (config := have.get(s.name)) is not None and (found := config_changes(s.config, config))
    }
    if not changes:
        return {}
    futures = admin.incremental_alter_configs(
        [
            ConfigResource(
                ResourceType.TOPIC,
                name,
                incremental_configs=[
                    ConfigEntry(c.key, c.after, incremental_operation=AlterConfigOpType.SET) for c in found
                ],
            )
            for name, found in changes.items()
        ],
        request_timeout=timeout,
    )
    for resource, fut in futures.items():
        fut.result(timeout=timeout)
        for change in changes[resource.name]:
            log.warning(
                "topic %s: %s changed from %s to %s", resource.name, change.key, change.before, change.after
            )
    # The controller has the change; a broker answers DescribeConfigs from its copy of the metadata, which
    # can lag for a moment. Return once it shows, so a start check right after this sees the new limits.
    deadline = time.monotonic() + timeout
    while True:
        now = topic_configs(admin, settings.kafka_bootstrap, list(changes), timeout)
        behind = [
            name
            for name, found in changes.items()
            if any((now.get(name) or {}).get(c.key) != c.after for c in found)
        ]
        if not behind:
            return changes
        if time.monotonic() > deadline:
            log.warning("broker does not show the new configuration of %s yet", ", ".join(behind))
            return changes
        time.sleep(0.1)


def check_record_limits(settings: Settings, timeout: float = 10.0) -> None:
    """Refuse to run when a topic would refuse records the ingress accepts (its max.message.bytes is below
    what SENTPIPE_MAX_BODY_BYTES needs); missing topics are left to the other checks."""
    topics = Topics(settings.topic_prefix)
    names = [topics.raw, *topics.routed, topics.unrouted, topics.dlq]
    have = topic_max_message_bytes(admin_client(settings), settings.kafka_bootstrap, names, timeout)
    problems = record_limit_problems(topics, settings.max_body_bytes, have)
    if problems:
        raise CopartitioningError(
            problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
        )


def check_copartitioning(settings: Settings, timeout: float = 10.0) -> None:
    """Refuse to run when the dedup table cannot be co-partitioned with the raw topic, or when a topic's
    max.message.bytes is too small for the records the worker writes (`check_record_limits`)."""
    check_record_limits(settings, timeout)
    have = existing_partitions(admin_client(settings), settings.kafka_bootstrap, timeout)
    raw = Topics(settings.topic_prefix).raw
    if raw not in have:
        raise CopartitioningError(f"topic {raw} does not exist: run `sentpipe topics ensure` first")
    if (refused := raw_partitions_refusal(settings, have[raw])) is not None:
        raise refused
    changelog = changelog_topic(settings)
    if changelog in have and have[changelog] != have[raw]:
        raise CopartitioningError(
            f"{changelog} has {have[changelog]} partitions, {raw} has {have[raw]}: they must match"
        )


class CopartitioningError(Exception):
    pass


def raw_partitions_refusal(settings: Settings, count: int) -> CopartitioningError | None:
    """The refusal a raw topic of `count` partitions earns (None: it fits SENTPIPE_RAW_PARTITIONS); checked
    at the start and, since partitions can be added to a topic at any time, while the router runs."""
    if count == settings.raw_partitions:
        return None
    return CopartitioningError(
        f"{Topics(settings.topic_prefix).raw} has {count} partitions but SENTPIPE_RAW_PARTITIONS is "
        f"{settings.raw_partitions}: the dedup table must have exactly the raw topic's partition count"
    )


def check_no_other_group_reads(settings: Settings, group: str, timeout: float = 10.0) -> None:
    """Refuse to join `group` while a group of another SENTPIPE_APP_ID, with members, reads the same topics.

    A worker started with another app id (set by hand on one pod, or left over from an older release)
    joins a consumer group of its own, reads the raw topic from its start with a dedup table of its own,
    and routes every event a second time, whose handlers then run twice; a projector of another app id
    applies every routed event again. Only a running group of the same stage counts (a router's group has
    its dedup changelog, a projector's ends in `-projections`): a stopped one from an older release is
    history, and replay or redrive readers are neither."""
    admin = admin_client(settings)
    projector = group.endswith("-projections")
    topics = Topics(settings.topic_prefix)
    have = existing_partitions(admin, settings.kafka_bootstrap, timeout)
    ours = [topics.raw] if not projector else list(topics.routed)
    try:
        listed = admin.list_consumer_groups(request_timeout=timeout).result(timeout)
    except (KafkaException, TimeoutError) as exc:
        # A guard against a mistake, not a condition of running: the broker was reachable a moment ago.
        log.warning("could not list the consumer groups to look for workers of another app id: %s", exc)
        return
    peers = sorted(
        g.group_id
        for g in listed.valid
        if g.group_id != group
        and (
            g.group_id.endswith("-projections")
            if projector
            else f"{g.group_id}-{DEDUP_TABLE}-changelog" in have
        )
    )
    if not peers:
        return
    partitions = [TopicPartition(name, p) for name in ours if name in have for p in range(have[name])]
    described = admin.describe_consumer_groups(peers, request_timeout=timeout)
    for peer in peers:
        try:
            members = described[peer].result(timeout).members
            committed = committed_offsets(settings, peer, partitions, timeout) if members else []
        except (KafkaException, TimeoutError):
            continue  # gone since it was listed, or not ours to describe
        if any(tp.error is None and tp.offset >= 0 for tp in committed):
            app_id = peer.removesuffix("-projections") if projector else peer
            raise CopartitioningError(
                f"consumer group {peer} ({len(members)} member(s)) already reads {ours[0]}: this worker's "
                f"group {group} would {'project' if projector else 'route'} every event a second time; give "
                f"it the running workers' SENTPIPE_APP_ID ({app_id})"
            )


def check_group_owns_prefix(settings: Settings, group: str, timeout: float = 10.0) -> None:
    """Refuse a consumer group that has committed offsets for another prefix's topics.

    A group shared by two prefixes (one SENTPIPE_APP_ID for several SENTPIPE_TOPIC_PREFIX values) also
    shares the dedup changelog, and Faust then takes its recovery path with records already waiting: a
    start-up race in Faust 0.15 that can freeze the group's commits without a word.
    """
    admin = admin_client(settings)
    ours = (settings.topic_prefix, f"{settings.app_id}-")
    others = [
        TopicPartition(name, p)
        for name, count in sorted(existing_partitions(admin, settings.kafka_bootstrap, timeout).items())
        if not name.startswith(ours)
        for p in range(count)
    ]
    # Only the topics that exist: a group's offsets for a deleted topic share nothing with this prefix.
    committed = committed_offsets(settings, group, others, timeout)
    foreign = sorted({tp.topic for tp in committed if tp.error is None and tp.offset >= 0})
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise CopartitioningError(
            f"consumer group {group} has committed offsets for topics outside the prefix "
            f"{settings.topic_prefix!r} ({shown}): give this prefix its own SENTPIPE_APP_ID"
        )
