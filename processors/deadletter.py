"""What a dead letter is: the original record untouched, plus headers saying where and why it failed."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sentpipe import metrics as m
from sentpipe.broker import Headers, RecordProducer
from sentpipe.processors.retry import retrying
from sentpipe.schemas import routing as r


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


async def send_dead_letters(
    producer: RecordProducer,
    dlq_topic: str,
    letters: Sequence[DeadLetter],
    *,
    initial: float,
    cap: float,
    should_stop: Callable[[], bool] = lambda: False,
) -> None:
    """Write the dead letters and wait for the broker's acknowledgements; retried while it is away."""
    if not letters:
        return

    async def attempt(_: int) -> None:
        futs = [producer.produce(dlq_topic, d.key, d.value, d.dlq_headers()) for d in letters]
        await asyncio.gather(*futs)

    await retrying(attempt, stage="dlq", initial=initial, cap=cap, should_stop=should_stop)
    for d in letters:
        m.DLQ_EVENTS.labels(d.stage, d.error_class).inc()
