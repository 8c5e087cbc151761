"""Topic names and their configuration, derived from one prefix."""

from __future__ import annotations

from dataclasses import dataclass

# The topic setting that caps a record batch's size (the broker's default is 1 MiB + 12 bytes).
MAX_MESSAGE_BYTES = "max.message.bytes"


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
    def dlq_redriven(self) -> str:
        """The redrive ledger: one record per DLQ record a redrive took (key: its `partition:offset`)."""
        return f"{self.prefix}events.dlq.redriven"

    @property
    def routed(self) -> tuple[str, str, str]:
        return (self.message_status, self.message_inbound, self.template_approval)


# What Kafka counts beyond the body: the record batch header (61 bytes), the record's varints, its key (an
# event id of at most 1 KiB) and headers (the webhook id, bounded by the ingress's header field limit of
# 8 KiB, the request id, tenant, type; dead-letter headers add at most ~4 KiB), and compression that does
# not pay (lz4 grows incompressible data by about 1/255).
RECORD_OVERHEAD_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class RecordLimits:
    """The largest record (bytes, as Kafka's `max.message.bytes` counts them) each kind of topic must accept
    so that every body the ingress accepts (at most `max_body_bytes`) is stored, never refused for its size.
    """

    raw: int  # the raw and unrouted topics: the body as received, plus headers
    # The canonical JSON writes the payload again: numbers can grow (`1e15,` becomes `1000000000000000.0,`,
    # 3.8 times as long), whitespace and escapes shrink. Four times the body bounds it.
    routed: int
    dlq: int  # any of the above, plus the dead-letter headers

    @property
    def producer(self) -> int:
        """librdkafka's `message.max.bytes`: the largest record of any topic (each topic enforces its own)."""
        return self.dlq

    def for_topic(self, topics: Topics, name: str) -> int:
        if name == topics.dlq:
            return self.dlq
        return self.routed if name in topics.routed else self.raw


def record_limits(max_body_bytes: int) -> RecordLimits:
    overhead = RECORD_OVERHEAD_BYTES + max_body_bytes // 64
    raw = max_body_bytes + overhead
    routed = 4 * max_body_bytes + overhead
    return RecordLimits(raw=raw, routed=routed, dlq=routed + overhead)


def record_limit_problems(topics: Topics, max_body_bytes: int, have: dict[str, int | None]) -> list[str]:
    """One line per topic whose `max.message.bytes` (in `have`; None: no such topic) is below what the body
    limit needs."""
    limits = record_limits(max_body_bytes)
    out = []
    for name, actual in have.items():
        need = limits.for_topic(topics, name)
        if actual is not None and actual < need:
            out.append(
                f"topic {name} takes records up to {actual} bytes ({MAX_MESSAGE_BYTES}) but"
                f" SENTPIPE_MAX_BODY_BYTES={max_body_bytes} needs {need}: run `sentpipe topics ensure`"
                " (it raises the limit) or lower SENTPIPE_MAX_BODY_BYTES"
            )
    return out


@dataclass(frozen=True, slots=True)
class ConfigChange:
    """One setting of an existing topic that `topics ensure` brings to what the settings ask for."""

    key: str
    before: str
    after: str

    def __str__(self) -> str:
        return f"{self.key} {self.before} -> {self.after}"


# What `topics ensure` keeps in line on existing topics: the retentions follow SENTPIPE_*_RETENTION_MS both
# ways (the replay window and the DLQ's keep are what the settings say, and the redrive ledger must outlive
# the DLQ), the record limit only grows. min.insync.replicas is left as it is: it is bounded by the topic's
# real replication factor, which `topics ensure` never changes, and one above it refuses every write.
FOLLOWED_CONFIGS = ("retention.ms", "segment.ms")


def config_changes(wanted: dict[str, str], have: dict[str, str]) -> list[ConfigChange]:
    """What an existing topic (its effective configuration `have`) needs changed to match its spec's
    `wanted` configuration."""
    out = []
    for key, want in wanted.items():
        now = have.get(key)
        if now is None:
            continue
        follows = key in FOLLOWED_CONFIGS and int(now) != int(want)
        grows = key == MAX_MESSAGE_BYTES and int(now) < int(want)
        if follows or grows:
            out.append(ConfigChange(key, now, want))
    return out


# The DLQ and its redrive ledger roll a segment a day (Kafka's default is a week, or what the broker says),
# so a dead letter outlives its retention by a day at most; the ledger keeps its entries that much longer.
DLQ_SEGMENT_MS = 24 * 3600 * 1000
LEDGER_MARGIN_MS = 24 * 3600 * 1000


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
    max_body_bytes: int,
) -> list[TopicSpec]:
    """Every topic sentpipe uses, with its partitions, retention and largest record."""
    keep = {"retention.ms": str(raw_retention_ms)}
    min_isr = {"min.insync.replicas": str(min(2, replication_factor))}
    limits = record_limits(max_body_bytes)

    def size(name: str) -> dict[str, str]:
        return {MAX_MESSAGE_BYTES: str(limits.for_topic(topics, name))}

    specs = [
        TopicSpec(topics.raw, raw_partitions, replication_factor, {**keep, **min_isr, **size(topics.raw)})
    ]
    specs += [
        TopicSpec(t, routed_partitions, replication_factor, {**keep, **min_isr, **size(t)})
        for t in topics.routed
    ]
    specs.append(
        TopicSpec(
            topics.unrouted,
            routed_partitions,
            replication_factor,
            {**keep, **min_isr, **size(topics.unrouted)},
        )
    )
    dlq_segment = {"segment.ms": str(DLQ_SEGMENT_MS)}
    specs.append(
        TopicSpec(
            topics.dlq,
            1,
            replication_factor,
            {"retention.ms": str(dlq_retention_ms), **dlq_segment, **min_isr, **size(topics.dlq)},
        )
    )
    # Written after the DLQ record it names, and kept longer: Kafka deletes a whole segment once its newest
    # record is past retention, so a DLQ record can outlive its retention by up to a segment's age, and its
    # ledger entry, kept exactly as long, went first: the next redrive sent that recovered event again.
    ledger_ms = -1 if dlq_retention_ms == -1 else dlq_retention_ms + DLQ_SEGMENT_MS + LEDGER_MARGIN_MS
    specs.append(
        TopicSpec(
            topics.dlq_redriven,
            1,
            replication_factor,
            {"retention.ms": str(ledger_ms), **dlq_segment, **min_isr, **size(topics.dlq_redriven)},
        )
    )
    return specs
