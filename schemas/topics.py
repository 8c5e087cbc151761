"""Topic names and their configuration, derived from one prefix."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Topics:
    prefix: str = "sent."

    @property
    def raw(self) -> str:
        return f"{self.prefix}events.raw"

    @property
    def message_status(self) -> str:
        return f"{self.prefix}message.status"

    @property
    def message_inbound(self) -> str:
        return f"{self.prefix}message.inbound"

    @property
    def template_approval(self) -> str:
        return f"{self.prefix}template.approval"

    @property
    def unrouted(self) -> str:
        return f"{self.prefix}events.unrouted"

    @property
    def dlq(self) -> str:
        return f"{self.prefix}events.dlq"

    @property
    def routed(self) -> tuple[str, str, str]:
        return (self.message_status, self.message_inbound, self.template_approval)


@dataclass(frozen=True, slots=True)
class TopicSpec:
    name: str
    partitions: int
    replication_factor: int
    config: dict[str, str]


def topic_specs(
    topics: Topics,
    *,
    raw_partitions: int,
    routed_partitions: int,
    replication_factor: int,
    raw_retention_ms: int,
    dlq_retention_ms: int,
) -> list[TopicSpec]:
    """Every topic sentpipe uses, with its partitions and retention."""
    keep = {"retention.ms": str(raw_retention_ms)}
    min_isr = {"min.insync.replicas": str(min(2, replication_factor))}
    specs = [TopicSpec(topics.raw, raw_partitions, replication_factor, {**keep, **min_isr})]
    specs += [TopicSpec(t, routed_partitions, replication_factor, {**keep, **min_isr}) for t in topics.routed]
    specs.append(TopicSpec(topics.unrouted, routed_partitions, replication_factor, {**keep, **min_isr}))
    specs.append(
        TopicSpec(topics.dlq, 1, replication_factor, {"retention.ms": str(dlq_retention_ms), **min_isr})
    )
    return specs
