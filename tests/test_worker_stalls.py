"""A database that holds the projector back without going away: locks, a schema someone changed, a
read-only switch, no connection slots. Each must hold the line (nothing dead-lettered), say so (an ERROR
line naming the stage and partition, /livez 503), and, once it clears, end in the oracle's state."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import orjson
import psycopg
import pytest
from confluent_kafka import Producer
from psycopg_pool.base import AttemptWithBackoff

from sentpipe.processors.projector_process import open_pool
from sentpipe.schemas import routing as r
from sentpipe.schemas.samples import SampleFactory
from sentpipe.schemas.topics import Topics
from sentpipe.settings import Settings
from tests.kafka_tools import record_count
from tests.oracle import actual_state, expected_state, row_count
from tests.pipeline import SEEDED_RECEIPT_MS, Worker, lag, start_worker, wait_for, wait_until


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _produce_routed(settings: Settings, bodies: list[bytes]) -> None:
    """Routed records as the router writes them, straight to their topics (no router needed)."""
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
    for body in bodies:
        routed = r.route(
            None,
            body,
            {},
            topics=Topics(settings.topic_prefix),
            id_source="auto",
            default_tenant="default",
            record_timestamp_ms=SEEDED_RECEIPT_MS,  # received after the seeded events happen, as in life
        )
        producer.produce(routed.topic, routed.value, routed.key)
    assert producer.flush(10) == 0


def _livez(worker: Worker) -> tuple[int, list[str]]:
    status, body = _get(f"http://127.0.0.1:{worker.metrics_port}/livez")
    return status, [str(s) for s in orjson.loads(body).get("stalls", [])]


@contextmanager
def _projector(settings: Settings, tmp_path: Path, **extra: object) -> Iterator[Worker]:
    worker = start_worker(
        settings, tmp_path, None, worker_role="project", stall_after_s=3, retry_max_s=1, **extra
    )
    try:
        wait_until(
            lambda: _get(f"http://127.0.0.1:{worker.metrics_port}/readyz")[0] == 200,
            60,
            "/readyz 200",
            worker.proc.tail,
        )
        yield worker
    finally:
        worker.stop()


def _assert_stalled_loudly(worker: Worker, where: str) -> None:
    """/livez 503 and an ERROR line, both naming the projector and a partition of `where` (a topic, or the
    prefix for any routed topic)."""

    def stalls() -> list[str]:
        status, found = _livez(worker)
        return found if status == 503 else []

    named = f"project: {where}"
    found = wait_for(
        stalls, lambda s: any(x.startswith(named) for x in s), 60, "/livez 503", worker.proc.tail
    )
    assert all(x.startswith("project: ") and "[" in x for x in found), found
    # The offset that holds the line, from the batch in hand: it said "stuck at start" until this process
    # had applied a batch, which is all a worker restarted by its liveness probe ever said.
    assert any(" stuck at offset " in x for x in found if x.startswith(named)), found
    wait_until(
        lambda: f"ERROR sentpipe.health worker stalled: {named}" in worker.proc.tail(400),
        30,
        "the stall logged as an error",
        worker.proc.tail,
    )


def _assert_resumed_exactly(worker: Worker, settings: Settings, bodies: list[bytes]) -> None:
    db = settings.database_url.get_secret_value()
    expected = expected_state(bodies)
    wait_for(
        lambda: actual_state(db), lambda got: got == expected, 120, "the oracle's state", worker.proc.tail
    )
    wait_for(lambda: lag(settings), lambda behind: not behind, 60, "every routed record committed")
    wait_until(lambda: _livez(worker)[0] == 200, 60, "/livez 200 again", worker.proc.tail)
    assert record_count(settings.kafka_bootstrap, Topics(settings.topic_prefix).dlq) == 0
    assert actual_state(db) == expected


def _state_but_templates(db: str) -> tuple[dict[str, str], dict[tuple[str, str], str], set[str], int]:
    """`actual_state` without template_status (renamed away), and the template events' count."""
    with psycopg.connect(db) as c:
        events = dict(c.execute("SELECT event_id, status FROM message_events").fetchall())
        rows = c.execute("SELECT tenant, message_id, event_id FROM message_status").fetchall()
        inbound = {row[0] for row in c.execute("SELECT event_id FROM inbound_messages").fetchall()}
        templates = c.execute("SELECT count(*) FROM template_events").fetchone()
    return events, {(t, m): e for t, m, e in rows}, inbound, templates[0] if templates else -1


def _bodies(n: int, seed: int) -> list[bytes]:
    return [s.body for s in SampleFactory(seed).mix(n)]


def test_a_table_lock_held_past_the_stall_time_fails_liveness_and_loses_nothing(
    settings: Settings, tmp_path: Path
) -> None:
    db = settings.database_url.get_secret_value()
    bodies = _bodies(60, 11)
    with _projector(settings, tmp_path) as worker, psycopg.connect(db) as locker:
        locker.execute("LOCK TABLE message_status IN ACCESS EXCLUSIVE MODE")  # an open transaction
        _produce_routed(settings, bodies)
        _assert_stalled_loudly(worker, f"{settings.topic_prefix}message.status")
        locker.rollback()
        _assert_resumed_exactly(worker, settings, bodies)


def test_a_renamed_projection_table_holds_the_line_instead_of_dead_lettering_everything(
    settings: Settings, tmp_path: Path
) -> None:
    db = settings.database_url.get_secret_value()
    bodies = _bodies(60, 12)
    with _projector(settings, tmp_path) as worker, psycopg.connect(db, autocommit=True) as admin:
        admin.execute("ALTER TABLE template_status RENAME TO template_status_away")
        _produce_routed(settings, bodies)
        _assert_stalled_loudly(worker, f"{settings.topic_prefix}template.approval")
        # Only the template type waits: retried in place, the held projection held every type of its batch.
        expected = expected_state(bodies)
        assert expected.template_events and expected.message_events and expected.inbound
        wait_for(
            lambda: _state_but_templates(db),
            lambda got: got == (expected.message_events, expected.message_status, expected.inbound, 0),
            60,
            "every other type applied while the template type is held",
            worker.proc.tail,
        )
        admin.execute("ALTER TABLE template_status_away RENAME TO template_status")
        _assert_resumed_exactly(worker, settings, bodies)


@contextmanager
def _role(settings: Settings, unique: str) -> Iterator[tuple[str, str]]:
    """A login role of this test's own, allowed into its schema: (role, the worker's database URL). What
    is done to the role (read-only, no connection slots, sessions ended) touches nobody else."""
    admin_url = settings.database_url.get_secret_value()
    role = f"sp_{unique}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        schema = admin.execute("SELECT current_schema()").fetchone()
        assert schema is not None
        admin.execute(f'CREATE ROLE "{role}" LOGIN')
        admin.execute(f'GRANT USAGE ON SCHEMA "{schema[0]}" TO "{role}"')
        admin.execute(f'GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA "{schema[0]}" TO "{role}"')
    assert admin_url.startswith("postgresql://postgres@"), admin_url
    try:
        yield role, admin_url.replace("postgresql://postgres@", f"postgresql://{role}@", 1)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'ALTER ROLE "{role}" CONNECTION LIMIT 0')
            _end_sessions(admin, role)
            admin.execute(f'DROP OWNED BY "{role}"')
            admin.execute(f'DROP ROLE "{role}"')


def _end_sessions(admin: psycopg.Connection[tuple[object, ...]], role: str) -> int:
    """As a database restart does to them: every session of `role` ends, mid-transaction or not."""
    rows = admin.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,)
    ).fetchall()
    return len(rows)


def test_a_read_only_database_holds_the_line(settings: Settings, tmp_path: Path, unique: str) -> None:
    """A failover's read-only window (25006): retried, never dead-lettered; loud while it lasts."""
    bodies = _bodies(60, 13)
    admin_url = settings.database_url.get_secret_value()
    with (
        _role(settings, unique) as (role, url),
        _projector(settings, tmp_path, database_url=url) as worker,
        psycopg.connect(admin_url, autocommit=True) as admin,
    ):
        admin.execute(f'ALTER ROLE "{role}" SET default_transaction_read_only = on')
        _end_sessions(admin, role)
        _produce_routed(settings, bodies)
        _assert_stalled_loudly(worker, settings.topic_prefix)
        assert "25006" in worker.proc.tail(400) or "read-only" in worker.proc.tail(400)
        admin.execute(f'ALTER ROLE "{role}" RESET default_transaction_read_only')
        _end_sessions(admin, role)
        _assert_resumed_exactly(worker, settings, bodies)


def test_no_connection_slots_holds_the_line(settings: Settings, tmp_path: Path, unique: str) -> None:
    """PostgreSQL answers but refuses the session (53300, as with max_connections used up by others)."""
    bodies = _bodies(60, 14)
    admin_url = settings.database_url.get_secret_value()
    with (
        _role(settings, unique) as (role, url),
        _projector(settings, tmp_path, database_url=url) as worker,
        psycopg.connect(admin_url, autocommit=True) as admin,
    ):
        admin.execute(f'ALTER ROLE "{role}" CONNECTION LIMIT 0')
        _end_sessions(admin, role)
        _produce_routed(settings, bodies)
        _assert_stalled_loudly(worker, settings.topic_prefix)
        admin.execute(f'ALTER ROLE "{role}" CONNECTION LIMIT -1')
        _assert_resumed_exactly(worker, settings, bodies)


# 199 s in the full suite on 2 cores (up to 400 sessions ended, each a reconnection with backoff), two thirds
# of the suite's 300 s per-test bound: this one is for a hang, with room for a busier machine.
@pytest.mark.timeout(600)
def test_sessions_ended_mid_batch_lose_and_double_nothing(
    settings: Settings, tmp_path: Path, unique: str
) -> None:
    """A database restart, over and over, while a backlog is projected."""
    bodies = _bodies(3000, 15)
    admin_url = settings.database_url.get_secret_value()
    with (
        _role(settings, unique) as (role, url),
        _projector(settings, tmp_path, database_url=url, batch_size=100) as worker,
        psycopg.connect(admin_url, autocommit=True) as admin,
    ):
        _produce_routed(settings, bodies)
        ended = 0
        db = settings.database_url.get_secret_value()
        expected = expected_state(bodies).total
        while row_count(db) < expected and ended < 400:
            ended += _end_sessions(admin, role)
            time.sleep(0.05)
        assert ended > 0
        _assert_resumed_exactly(worker, settings, bodies)


def test_the_pool_never_pauses_its_reconnection_attempts_longer_than_a_retry() -> None:
    """After an outage of a few minutes psycopg_pool's default backoff tried next up to two minutes after
    the database was back (seen: a 70 s outage, resumed 44 s late), so the watchdog failed liveness with the
    database up. The pool's own backoff policy, run over a reconnection round, bounds the pause."""
    pool = open_pool(Settings())
    attempt = AttemptWithBackoff(timeout=pool.reconnect_timeout)
    now, longest = 0.0, 0.0
    while True:
        attempt.update_delay(now)
        if attempt.time_to_give_up(now):
            break  # the round ends; the projector's next retry starts another at once
        longest = max(longest, attempt.delay)
        now += attempt.delay
    assert longest <= Settings().retry_max_s / 3, longest
