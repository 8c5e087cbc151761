"""What a dead letter is: the original record untouched, plus headers saying where and why it failed."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sentpipe import metrics as m
from sentpipe.broker import Delivered, Headers, ProduceRejected, RecordProducer, failed_future
from sentpipe.processors.retry import backoff, retrying
from sentpipe.schemas import routing as r

log = logging.getLogger("sentpipe.deadletter")


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One record that failed for good in `stage`; `origin` is its (topic, partition, offset)."""

    key: bytes
    value: bytes
    headers: Headers
    origin: tuple[str, int, int]
    stage: str
    error_class: str
    message: str

    def dlq_headers(self) -> list[tuple[str, bytes]]:
        attempts = 1
        kept: list[tuple[str, bytes]] = []
        for k, v in self.headers:
            if k == r.H_DLQ_ATTEMPTS:
                attempts = _int(v) + 1  # a redriven record that fails again counts one trip more
            elif k not in r.H_DLQ_KEYS:
                kept.append((k, v))
        topic, partition, offset = self.origin
        return kept + r.dlq_headers(
            stage=self.stage,
            error_class=self.error_class,
            message=self.message,
            attempts=attempts,
            topic=topic,
            partition=partition,
            offset=offset,
        )


def _int(raw: bytes) -> int:
    try:
        return int(raw)
    except ValueError:
        return 0


def error_class(exc: BaseException) -> str:
    """A bounded label for an exception: its SQLSTATE when the database gave one, else its class name."""
    sqlstate = getattr(exc, "sqlstate", None)
    if isinstance(sqlstate, str) and sqlstate:
        return f"sqlstate_{r.dlq_text(sqlstate, r.MAX_DLQ_ERROR_CLASS)}"
    return r.exception_class(exc)


# Distinct reasons per stage that get a series of their own; later ones are counted as OTHER_REASON. A
# handler's error class is the reason, and a handler making classes at run time (type(name, ...)) made a
# new series per dead letter, without end.
MAX_REASONS = 200
OTHER_REASON = "other"
_reasons: dict[str, set[str]] = {}


def _reason_label(stage: str, reason: str) -> str:
    seen = _reasons.setdefault(stage, set())
    if reason in seen:
        return reason
    if len(seen) >= MAX_REASONS:
        return OTHER_REASON
    seen.add(reason)
    return reason


async def send_dead_letters(
    producer: RecordProducer,
    dlq_topic: str,
    letters: Sequence[DeadLetter],
    *,
    initial: float,
    cap: float,
    should_stop: Callable[[], bool] = lambda: False,
    hold_refused: bool = False,
) -> None:
    """Write the dead letters and wait for the broker's acknowledgements; retried while it is away, each
    time with only the letters not yet acknowledged (resent whole, a batch of 500 letters whose last one
    met a broker hiccup was in the DLQ twice). `hold_refused`: letters the DLQ refuses for good (an ACL, a
    size limit lowered) are sent again with backoff until it takes them, or until `should_stop()`."""
    if not letters:
        return
    pending = list(letters)

    async def attempt(_: int) -> None:
        nonlocal pending
        futs = [_produce(producer, dlq_topic, d) for d in pending]
        results = await asyncio.gather(*futs, return_exceptions=True)
        failed = [(d, res) for d, res in zip(pending, results, strict=True) if isinstance(res, BaseException)]
        pending = [d for d, _ in failed]
        if failed:
            raise failed[0][1]

    refusals = 0
    while True:
        try:
            await retrying(attempt, stage="dlq", initial=initial, cap=cap, should_stop=should_stop)
            break
        except Exception as exc:
            if not hold_refused or should_stop():
                raise
            refusals += 1
            delay = backoff(refusals, initial, cap)
            log.error(
                "the dead-letter topic refuses %d letters (%s: %s); sending them again in %.1f s",
                len(pending),
                type(exc).__name__,
                exc,
                delay,
            )
            await asyncio.sleep(delay)
    for d in letters:
        m.DLQ_EVENTS.labels(d.stage, _reason_label(d.stage, d.error_class)).inc()


def _produce(producer: RecordProducer, topic: str, d: DeadLetter) -> asyncio.Future[Delivered]:
    # Refused before it was queued (the local queue full): raised, it ended the attempt with the letters
    # queued before it unwatched, and the retry sent those again (each in the DLQ twice).
    try:
        return producer.produce(topic, d.key, d.value, d.dlq_headers())
    except ProduceRejected as exc:
        return failed_future(exc)
