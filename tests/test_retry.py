"""Failure kinds by SQLSTATE (and for the broker), and how `retrying` treats each kind.

The database errors that matter most are real ones, raised by the running PostgreSQL; the rest are the
same psycopg classes built directly.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import psycopg
import psycopg_pool
import pytest
from aiokafka.errors import KafkaConnectionError, MessageSizeTooLargeError
from confluent_kafka import KafkaError, KafkaException

from sentpipe.broker import ProduceRejected
from sentpipe.kafka import BrokerUnavailable
from sentpipe.processors.handlers import PermanentError, RetryableError
from sentpipe.processors.retry import UNKNOWN_ATTEMPTS, backoff, classify, is_temporary, retrying
from tests.services import Services

TINY = {"initial": 0.001, "cap": 0.002}


# --- real errors from the running PostgreSQL -------------------------------------------------------------
@pytest.fixture(scope="module")
def conn(services: Services) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    with psycopg.connect(services.database_url, autocommit=True, connect_timeout=10) as c:
        yield c


def raised_by(conn: psycopg.Connection[tuple[object, ...]], *statements: str) -> psycopg.Error:
    """The error the last statement raises (the others set it up, in one rolled-back transaction)."""
    with pytest.raises(psycopg.Error) as info, conn.transaction():
        for sql in statements:
            conn.execute(sql.encode())
    return info.value


def test_real_data_errors_are_permanent(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    division = raised_by(conn, "SELECT 1/0")
    assert (division.sqlstate, classify(division)) == ("22012", "permanent")

    missing = raised_by(conn, "SELECT * FROM nope_no_such_table")
    assert (missing.sqlstate, classify(missing)) == ("42P01", "permanent")

    create = "CREATE TEMP TABLE retry_t (v text PRIMARY KEY) ON COMMIT DROP"
    duplicate = raised_by(
        conn, create, "INSERT INTO retry_t VALUES ('a')", "INSERT INTO retry_t VALUES ('a')"
    )
    assert (duplicate.sqlstate, classify(duplicate)) == ("23505", "permanent")

    # Random hex compresses badly: far beyond what a btree index row may hold.
    huge = "INSERT INTO retry_t SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 2000)"
    too_big = raised_by(conn, create, huge)
    assert too_big.sqlstate == "54000"
    assert isinstance(too_big, psycopg.OperationalError)  # which is why "every OperationalError" was wrong
    assert classify(too_big) == "permanent" and not is_temporary(too_big)


def test_real_statement_timeout_is_temporary(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    canceled = raised_by(conn, "SET LOCAL statement_timeout = '10ms'", "SELECT pg_sleep(5)")
    assert canceled.sqlstate == "57014"  # query_canceled, in the operator intervention class
    assert classify(canceled) == "temporary"


def test_real_lock_not_available_is_temporary(
    conn: psycopg.Connection[tuple[object, ...]], services: Services, unique: str
) -> None:
    table = f"retry_lock_{unique}"
    conn.execute(f"CREATE TABLE {table} (v int)".encode())
    try:
        with psycopg.connect(services.database_url) as holder:
            holder.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE".encode())  # until it ends
            locked = raised_by(conn, f"LOCK TABLE {table} IN ACCESS SHARE MODE NOWAIT")
    finally:
        conn.execute(f"DROP TABLE {table}".encode())
    assert (locked.sqlstate, classify(locked)) == ("55P03", "temporary")


def test_real_raise_exception_is_unknown(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    raised = raised_by(conn, "DO $$ BEGIN RAISE EXCEPTION 'custom'; END $$")
    assert (raised.sqlstate, classify(raised)) == ("P0001", "unknown")
    assert not is_temporary(raised)


def test_a_connection_refused_is_temporary() -> None:
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect("postgresql://postgres@127.0.0.1:1/sentpipe", connect_timeout=2)
    assert info.value.sqlstate is None
    assert classify(info.value) == "temporary"


# --- every rule, with exception objects built directly ---------------------------------------------------
def pg(sqlstate: str) -> psycopg.Error:
    error = psycopg.errors.lookup(sqlstate)("built in a test")
    assert error.sqlstate == sqlstate
    return error


@pytest.mark.parametrize(
    "sqlstate",
    [
        "08000",
        "08006",
        "08003",
        "40001",
        "40P01",
        "53100",
        "53200",
        "53300",
        "57P01",
        "57P03",
        "25006",
        "55P03",
        "58030",
        "58P01",
    ],
)
def test_temporary_sqlstates(sqlstate: str) -> None:
    assert classify(pg(sqlstate)) == "temporary"
    assert is_temporary(pg(sqlstate))


@pytest.mark.parametrize("sqlstate", ["22001", "22012", "22P02", "23502", "23503", "23505", "42703", "54000"])
def test_permanent_sqlstates(sqlstate: str) -> None:
    assert classify(pg(sqlstate)) == "permanent"


@pytest.mark.parametrize("sqlstate", ["XX000", "P0001", "0A000", "55006", "40002", "25P02"])
def test_other_sqlstates_are_unknown(sqlstate: str) -> None:
    assert classify(pg(sqlstate)) == "unknown"
    assert not is_temporary(pg(sqlstate))


def test_errors_without_a_sqlstate() -> None:
    assert classify(psycopg.OperationalError("server closed the connection unexpectedly")) == "temporary"
    assert classify(psycopg_pool.PoolTimeout("couldn't get a connection after 30 sec")) == "temporary"
    assert (
        classify(psycopg.DataError("PostgreSQL text fields cannot contain NUL (0x00) bytes")) == "permanent"
    )
    assert classify(psycopg.InterfaceError("bad use of the API")) == "unknown"


def test_network_and_broker_errors_are_temporary() -> None:
    for exc in (
        ConnectionRefusedError(),
        ConnectionResetError(),
        TimeoutError(),
        socket.gaierror(-3, "Temporary failure in name resolution"),
        ProduceRejected("msg_timed_out"),
        ProduceRejected("local_queue_full"),
        RetryableError("try later"),
        BrokerUnavailable("Kafka broker at 127.0.0.1:9092 did not answer"),
        BufferError("Local: Queue full"),
        KafkaException(KafkaError(KafkaError._MSG_TIMED_OUT)),
        KafkaException(KafkaError(KafkaError._TRANSPORT)),
        KafkaConnectionError(),
    ):
        assert classify(exc) == "temporary", exc


def test_everything_else_is_permanent() -> None:
    for exc in (
        PermanentError("no"),
        ValueError("bad"),
        # An OSError that is not about the network is the record's (or the code's) own, e.g. the
        # "Value too large" a timestamp of 1e20 raised in datetime.fromtimestamp.
        OSError(75, "Value too large for defined data type"),
        FileNotFoundError("handler config"),
        ProduceRejected("msg_size_too_large"),
        KeyError("k"),
        KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE)),
        MessageSizeTooLargeError(),
    ):
        assert classify(exc) == "permanent", exc


# --- retrying ---------------------------------------------------------------------------------------------
class Script:
    """fn(attempt) for `retrying`: raises the scripted errors in turn, then returns "done"."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.attempts: list[int] = []

    async def __call__(self, attempt: int) -> str:
        self.attempts.append(attempt)
        if self.errors:
            raise self.errors.pop(0)
        return "done"


async def test_temporary_errors_are_retried_until_success() -> None:
    fn = Script(pg("08006"), psycopg.OperationalError("gone"), pg("40P01"), RetryableError("busy"))
    assert await retrying(fn, stage="test", **TINY) == "done"
    assert fn.attempts == [1, 2, 3, 4, 5]


async def test_temporary_errors_are_retried_beyond_the_unknown_bound() -> None:
    fn = Script(*(pg("53300") for _ in range(UNKNOWN_ATTEMPTS * 2)))
    assert await retrying(fn, stage="test", **TINY) == "done"
    assert len(fn.attempts) == UNKNOWN_ATTEMPTS * 2 + 1


async def test_a_permanent_error_raises_at_once() -> None:
    fn = Script(pg("54000"))
    with pytest.raises(psycopg.errors.ProgramLimitExceeded):
        await retrying(fn, stage="test", **TINY)
    assert fn.attempts == [1]


async def test_an_unknown_error_is_retried_a_bounded_number_of_times_then_raises() -> None:
    fn = Script(*(pg("XX000") for _ in range(100)))
    with pytest.raises(psycopg.errors.InternalError_) as info:
        await retrying(fn, stage="test", **TINY)
    assert fn.attempts == list(range(1, UNKNOWN_ATTEMPTS + 1))
    assert not is_temporary(info.value)  # so the caller isolates the record and dead-letters it


async def test_an_unknown_error_that_goes_away_is_not_a_failure() -> None:
    fn = Script(*(pg("XX000") for _ in range(UNKNOWN_ATTEMPTS - 1)))
    assert await retrying(fn, stage="test", **TINY) == "done"


async def test_only_unknown_failures_count_against_the_bound() -> None:
    fn = Script(pg("XX000"), pg("08006"), pg("08006"), pg("XX000"))
    assert await retrying(fn, stage="test", unknown_attempts=3, **TINY) == "done"
    assert len(fn.attempts) == 5
    fn = Script(pg("XX000"), pg("08006"), pg("XX000"), pg("08006"), pg("XX000"), pg("XX000"))
    with pytest.raises(psycopg.errors.InternalError_):
        await retrying(fn, stage="test", unknown_attempts=3, **TINY)
    assert len(fn.attempts) == 5


async def test_stopping_ends_the_retries_of_a_temporary_error() -> None:
    fn = Script(*(pg("08006") for _ in range(100)))
    with pytest.raises(psycopg.errors.ConnectionFailure):
        await retrying(fn, stage="test", should_stop=lambda: len(fn.attempts) >= 3, **TINY)
    assert fn.attempts == [1, 2, 3]


# --- however long it lasts -------------------------------------------------------------------------------
def test_backoff_stays_within_its_cap_however_many_attempts() -> None:
    for attempt in (1, 2, 30, 64, 65, 1024, 1025, 10**6):
        assert 0 <= backoff(attempt, 0.2, 30.0) <= 30.0


async def test_a_temporary_failure_is_retried_past_a_thousand_attempts() -> None:
    """About four hours of a database outage at the 30 s cap: the 1,025th attempt computed 2 ** 1024 as a
    float and raised OverflowError, a permanent error, so the records held back were dead-lettered."""
    fn = Script(*(pg("08006") for _ in range(1100)))
    assert await retrying(fn, stage="test", initial=0.0, cap=0.0) == "done"
    assert len(fn.attempts) == 1101
