"""What kind of failure an exception is, and retrying with capped exponential backoff.

Three kinds (`classify`):
- temporary: the database or broker is away or busy (connection loss, SQLSTATE classes 08, 53, 57 and
  40001, 40P01, 25006, 55P03, broker timeouts, RetryableError). Retried forever: the stream waits, nothing
  is skipped.
- permanent: this record can never succeed (SQLSTATE classes 22, 23, 42, 54, and every error that is not a
  database or broker error). Raised at once, so the caller dead-letters the record.
- unknown: any other SQLSTATE, and a handler that caught a database error and went on (TransactionAborted).
  Retried at most `UNKNOWN_ATTEMPTS` times, then treated as permanent.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
from collections.abc import Awaitable, Callable
from typing import Literal, TypeVar

import psycopg
from confluent_kafka import KafkaError, KafkaException

from sentpipe import metrics as m
from sentpipe.broker import ProduceRejected
from sentpipe.kafka import BrokerUnavailable
from sentpipe.processors.handlers import RetryableError, TransactionAborted

T = TypeVar("T")
Kind = Literal["temporary", "permanent", "unknown"]
log = logging.getLogger("sentpipe.retry")

# How many attempts an error of unknown kind gets before it counts as permanent.
UNKNOWN_ATTEMPTS = 5

# SQLSTATE: the first two characters are the class (PostgreSQL manual, appendix A).
TEMPORARY_SQLSTATE_CLASSES = frozenset(
    {
        "08",  # connection exception
        "53",  # insufficient resources (disk full, out of memory, too many connections)
        "57",  # operator intervention (admin shutdown, crash shutdown, cannot connect now, query canceled)
        # System error (an I/O error, a file missing) on the server: the database's trouble, not a record's.
        # As "unknown" it dead-lettered every record after 5 attempts while the disk failed.
        "58",
    }
)
TEMPORARY_SQLSTATES = frozenset(
    {
        "40001",  # serialization_failure
        "40P01",  # deadlock_detected
        "25006",  # read_only_sql_transaction (a failover in progress)
        "55P03",  # lock_not_available
    }
)
PERMANENT_SQLSTATE_CLASSES = frozenset(
    {
        "22",  # data exception (division by zero, bad value, out of range)
        "23",  # integrity constraint violation
        "42",  # syntax error or access rule violation (undefined table or column)
        "54",  # program limit exceeded (index row size, too many columns)
    }
)

# librdkafka errors that only say the broker is not reachable or not answering yet.
_TEMPORARY_KAFKA_CODES = frozenset(
    {
        KafkaError._TRANSPORT,
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError._TIMED_OUT,
        KafkaError._MSG_TIMED_OUT,
        KafkaError._QUEUE_FULL,
        KafkaError.REQUEST_TIMED_OUT,
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.NOT_ENOUGH_REPLICAS,
        KafkaError.NOT_ENOUGH_REPLICAS_AFTER_APPEND,
    }
)


def _classify_database(exc: psycopg.Error) -> Kind:
    state = exc.sqlstate
    if state is None:
        # Raised by the client, not the server: an OperationalError without a SQLSTATE is a connection
        # that failed or was lost (PoolTimeout included); DataError/IntegrityError refuse this record's
        # values before sending them (a NUL in text, say).
        if isinstance(exc, psycopg.OperationalError):
            return "temporary"
        if isinstance(exc, psycopg.DataError | psycopg.IntegrityError):
            return "permanent"
        return "unknown"
    if state in TEMPORARY_SQLSTATES or state[:2] in TEMPORARY_SQLSTATE_CLASSES:
        return "temporary"
    if state[:2] in PERMANENT_SQLSTATE_CLASSES:
        return "permanent"
    return "unknown"


def _is_temporary_broker_error(exc: BaseException) -> bool:
    if isinstance(exc, BrokerUnavailable | BufferError):  # BufferError: librdkafka's local queue is full
        return True
    if isinstance(exc, KafkaException):
        err = exc.args[0] if exc.args else None
        return isinstance(err, KafkaError) and (err.retriable() or err.code() in _TEMPORARY_KAFKA_CODES)
    try:  # aiokafka's errors when the broker is away
        from aiokafka.errors import KafkaConnectionError, KafkaTimeoutError
        from aiokafka.errors import KafkaError as AioKafkaError
    except ImportError:  # pragma: no cover
        return False
    if isinstance(exc, KafkaConnectionError | KafkaTimeoutError):
        return True
    return isinstance(exc, AioKafkaError) and bool(exc.retriable)


def classify(exc: BaseException) -> Kind:
    """Whether retrying `exc` can help: always (temporary), never (permanent), or perhaps (unknown)."""
    if isinstance(exc, RetryableError):
        return "temporary"
    if isinstance(exc, TransactionAborted):  # a handler caught a database error: perhaps a deadlock
        return "unknown"
    if isinstance(exc, psycopg.Error):
        return _classify_database(exc)
    if isinstance(exc, ConnectionError | TimeoutError | socket.gaierror):  # the network, not the record
        return "temporary"
    if isinstance(exc, ProduceRejected):  # the seam's producers: refused for what it is, or not delivered
        return "temporary" if exc.temporary else "permanent"
    if _is_temporary_broker_error(exc):
        return "temporary"
    return "permanent"


def is_temporary(exc: BaseException) -> bool:
    """True when `exc` is worth retrying without limit (see `classify`)."""
    return classify(exc) == "temporary"


# Doublings after which the ceiling is the cap for any sensible `initial`. Without the bound, the 1,025th
# attempt computed 2 ** 1024, which no float holds: four hours into a database outage (30 s cap), retrying
# raised OverflowError, a permanent error, and dead-lettered the records it was holding back.
MAX_DOUBLINGS = 64


def backoff(attempt: int, initial: float, cap: float) -> float:
    """Full-jitter exponential backoff for the given 1-based attempt."""
    ceiling = cap if attempt > MAX_DOUBLINGS else min(cap, initial * 2 ** (attempt - 1))
    return random.uniform(0, ceiling)


async def retrying(
    fn: Callable[[int], Awaitable[T]],
    *,
    stage: str,
    initial: float,
    cap: float,
    should_stop: Callable[[], bool] = lambda: False,
    unknown_attempts: int = UNKNOWN_ATTEMPTS,
) -> T:
    """Call fn(attempt) until it succeeds.

    A temporary error is retried with backoff for as long as it lasts (or until `should_stop()`), a
    permanent one propagates at once, and an unknown one propagates on its `unknown_attempts`-th
    occurrence, after which callers treat it as permanent (`is_temporary` is False for it).
    """
    attempt = 1
    unknown = 0
    while True:
        try:
            return await fn(attempt)
        except Exception as exc:
            kind = classify(exc)
            if kind == "permanent" or should_stop():
                raise
            sqlstate = exc.sqlstate if isinstance(exc, psycopg.Error) else None
            if kind == "unknown":
                unknown += 1
                if unknown >= unknown_attempts:
                    log.warning(
                        "failure of unknown kind persists, giving up",
                        extra={
                            "stage": stage,
                            "attempts": attempt,
                            "error": type(exc).__name__,
                            "sqlstate": sqlstate,
                        },
                    )
                    raise
            delay = backoff(attempt, initial, cap)
            m.RETRIES.labels(stage).inc()
            log.warning(
                f"{kind} failure, retrying",
                extra={
                    "stage": stage,
                    "attempt": attempt,
                    "error": type(exc).__name__,
                    "sqlstate": sqlstate,
                    "delay_s": round(delay, 2),
                },
            )
            await asyncio.sleep(delay)
            attempt += 1
