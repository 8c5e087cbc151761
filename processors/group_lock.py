"""One holder at a time across processes: a topic's single partition, owned through a consumer group.

A redrive holds its ledger's lock, so two at once (the console and a terminal, two terminals) cannot both
read the ledger before either has written it and send the same dead letters twice. Kafka arbitrates: the
group's members share the topic's one partition, and the cooperative-sticky assignor leaves it with its
owner, so a newcomer is given nothing until the owner leaves or its session times out (a killed holder).
Nothing is ever read from the topic or committed for the group.
"""

from __future__ import annotations

import time
from types import TracebackType

from confluent_kafka import Consumer, KafkaError, TopicPartition

from sentpipe.kafka import client_config
from sentpipe.processors.offsets import OpsError
from sentpipe.settings import Settings

# How soon the lock of a holder that was killed is free again; heartbeats go from librdkafka's own thread.
SESSION_TIMEOUT_S = 10.0
# A holder that has not checked for this long may have been suspended (Ctrl-Z, SIGSTOP, a frozen VM) with
# its heartbeats: the group may have another holder by now, and librdkafka says so only once the next
# heartbeat is answered. Resumed, a redrive went on sending records the next holder had already taken.
SUSPECT_GAP_S = SESSION_TIMEOUT_S * 0.8
CONFIRM_S = 3.0  # three heartbeats (heartbeat.interval.ms below)
# The least time given to the group's answer, whatever the caller's timeout: a broker holds the first join
# of an empty group for group.initial.rebalance.delay.ms (3 s by default), so `dlq redrive --timeout 2`
# was refused as if another redrive were running, every time.
MIN_WAIT_S = 15.0


class LockBusy(Exception):
    """Another process holds the lock (or the group's coordinator did not answer in time)."""


class LockRefused(OpsError):
    """Kafka's ACLs refuse this client the group or its topic: no holder to wait for, and no waiting helps."""


def refusal(error: KafkaError, group: str, topic: str, bootstrap: str) -> LockRefused | None:
    """The LockRefused an error returned while joining means, or None for one that may pass."""
    if error.code() == KafkaError.GROUP_AUTHORIZATION_FAILED:
        what = f"consumer group {group}: {error.str()} (an ACL must grant READ on the group)"
    elif error.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED:
        what = f"topic {topic}: {error.str()} (an ACL must grant READ on the topic)"
    else:
        return None
    return LockRefused(f"Kafka at {bootstrap} refused this client {what}")


class GroupLock:
    def __init__(self, settings: Settings, topic: str, group: str, timeout: float = 10.0) -> None:
        self.settings, self.topic, self.group = settings, topic, group
        self.timeout = max(timeout, MIN_WAIT_S)
        self._held = False
        self._answered = False  # the group has given this member an assignment, empty or not
        self._checked_at = 0.0  # monotonic time of the last `held`
        self.paused_s = 0.0  # how long the pause was after which the lock was found lost, if one was
        self._consumer: Consumer | None = None

    def __enter__(self) -> GroupLock:
        self.acquire()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    def acquire(self) -> None:
        """Join the group and wait, at most `timeout` (MIN_WAIT_S at least), for its answer: the partition, or
        LockBusy; LockRefused at once when Kafka's ACLs refuse the group."""
        consumer = self._consumer = Consumer(
            {
                **client_config(self.settings),
                "group.id": self.group,
                "partition.assignment.strategy": "cooperative-sticky",
                "session.timeout.ms": int(SESSION_TIMEOUT_S * 1000),
                "heartbeat.interval.ms": 1000,
                "enable.auto.commit": False,
                "auto.offset.reset": "latest",
                "log_level": 0,
            }
        )
        consumer.subscribe(
            [self.topic], on_assign=self._assigned, on_revoke=self._revoked, on_lost=self._revoked
        )
        deadline = time.monotonic() + self.timeout
        error = None
        while not self._answered and time.monotonic() < deadline:
            msg = consumer.poll(0.1)
            if msg is None or (got := msg.error()) is None:
                continue
            error = got
            # Reported as a busy lock after the whole wait, it sent the operator looking for another holder
            # that was never there.
            if (refused := refusal(got, self.group, self.topic, self.settings.kafka_bootstrap)) is not None:
                self.release()
                raise refused
        self._checked_at = time.monotonic()
        if not self._held:
            self.release()
            waited = ""
            if not self._answered:
                waited = f", or the group's coordinator did not answer within {self.timeout:g} s"
                waited += f" ({error.str()})" if error is not None else ""
            raise LockBusy(
                f"consumer group {self.group} is held by another process{waited}; a holder that was killed "
                f"frees it within {SESSION_TIMEOUT_S:g} s"
            )

    def held(self) -> bool:
        """Still the holder. Call it often: it also takes part in the group's rebalances, which a newcomer's
        join waits for, and stays within the group's poll interval."""
        if self._consumer is not None:
            self._consumer.poll(0)  # what it reads is ignored: only membership matters
        now = time.monotonic()
        if self._consumer is not None and self._held and now - self._checked_at >= SUSPECT_GAP_S:
            # Confirmed before it is trusted: the heartbeats go on, and their answers (the group lost, if it
            # is) come back through poll.
            confirm_until = now + CONFIRM_S
            while self._held and time.monotonic() < confirm_until:
                self._consumer.poll(0.1)
            if not self._held:
                self.paused_s = now - self._checked_at
        self._checked_at = time.monotonic()
        return self._held

    def release(self) -> None:
        consumer, self._consumer = self._consumer, None
        self._held = False
        if consumer is not None:
            consumer.close()  # leaves the group at once: the next holder need not wait for a timeout

    def _assigned(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._answered = True
        if any(tp.topic == self.topic for tp in partitions):
            self._held = True

    def _revoked(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if any(tp.topic == self.topic for tp in partitions):
            self._held = False
