"""Retry temporary failures with capped exponential backoff, forever: the stream waits, nothing is skipped."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import psycopg
import psycopg_pool

from sentpipe import metrics as m
from sentpipe.processors.handlers import RetryableError

T = TypeVar("T")
log = logging.getLogger("sentpipe.retry")

TEMPORARY: tuple[type[BaseException], ...] = (
    RetryableError,
    psycopg.OperationalError,
    psycopg_pool.PoolTimeout,
    ConnectionError,
    TimeoutError,
)


def is_temporary(exc: BaseException) -> bool:
    if isinstance(exc, TEMPORARY):
        return True
    try:  # aiokafka's errors when the broker is away
        from aiokafka.errors import KafkaConnectionError, KafkaTimeoutError, NotLeaderForPartitionError

        return isinstance(exc, KafkaConnectionError | KafkaTimeoutError | NotLeaderForPartitionError)
    except ImportError:  # pragma: no cover
        return False


def backoff(attempt: int, initial: float, cap: float) -> float:
    """Full-jitter exponential backoff for the given 1-based attempt."""
    return random.uniform(0, min(cap, initial * 2 ** (attempt - 1)))


async def retrying(
    fn: Callable[[int], Awaitable[T]],
    *,
    stage: str,
    initial: float,
    cap: float,
    should_stop: Callable[[], bool] = lambda: False,
) -> T:
    """Call fn(attempt) until it does not raise a temporary error; permanent errors propagate."""
    attempt = 1
    while True:
        try:
            return await fn(attempt)
        except Exception as exc:
            if not is_temporary(exc) or should_stop():
                raise
            delay = backoff(attempt, initial, cap)
            m.RETRIES.labels(stage).inc()
            log.warning(
                "temporary failure, retrying",
                extra={
                    "stage": stage,
                    "attempt": attempt,
                    "error": type(exc).__name__,
                    "delay_s": round(delay, 2),
                },
            )
            await asyncio.sleep(delay)
            attempt += 1
