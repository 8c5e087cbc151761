"""What operators and users do to the database, against the real PostgreSQL: schema changes under the
projections, `db migrate` beside open transactions, edited and foreign migrations, limited roles, and URLs
holding a password."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import AsyncConnectionPool
from pydantic import SecretStr, ValidationError

from sentpipe.broker import LocalBroker
from sentpipe.processors import migrate as migrate_module
from sentpipe.processors.handlers import HandlerRegistry
from sentpipe.processors.migrate import Migration, MigrationError, migrate, migrations
from sentpipe.processors.projector import Projector, Tuning
from sentpipe.processors.retry import classify
from sentpipe.processors.sink import PostgresSink, ProjectionUnusable
from sentpipe.schemas import routing as r
from sentpipe.schemas.events import CanonicalEvent, EventType
from sentpipe.schemas.samples import SampleFactory
from sentpipe.schemas.topics import Topics
from sentpipe.settings import Settings
from tests.services import Services

TOPICS = Topics("h.")
FAST = Tuning(batch_size=50, within_s=0.01, retry_initial_s=0.001, retry_max_s=0.01)
# A bound on waits that only a regression reaches (a hang), never a measure of speed.
BOUND_S = 60.0

FILL_X_EXCEPT_M1 = """
    CREATE FUNCTION fill_x() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF NEW.message_id <> 'm1' THEN NEW.x := 1; END IF;
        RETURN NEW;
    END $$;
    CREATE TRIGGER fill_x BEFORE INSERT ON message_events FOR EACH ROW EXECUTE FUNCTION fill_x()"""


def sql(url: str, statement: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(statement)
        return cur.fetchall() if cur.description else []


def status_events(n: int) -> list[CanonicalEvent]:
    events = []
    for i in range(n):
        sample = SampleFactory(3).message_status(f"m{i}", "delivered")
        routed = r.route(
            None, sample.body, {}, topics=TOPICS, id_source="auto", default_tenant="t", record_timestamp_ms=1
        )
        assert routed.event is not None
        events.append(routed.event)
    return events


class CountingSink(PostgresSink):
    def __init__(self, pool: AsyncConnectionPool) -> None:
        super().__init__(pool, HandlerRegistry())
        self.refused = 0

    async def apply(self, type_: EventType, events: Any, attempt: int, unknown_retries: int = 4) -> Any:
        try:
            return await super().apply(type_, events, attempt, unknown_retries)
        except Exception:
            self.refused += 1
            raise


def broker_with(events: list[CanonicalEvent]) -> LocalBroker:
    broker = LocalBroker()
    for t in (*TOPICS.routed, TOPICS.dlq):
        broker.create_topic(t, 1)
    for ev in events:
        broker.append(TOPICS.message_status, ev.subject.encode(), ev.to_json(), [])
    return broker


def dead_letter_classes(broker: LocalBroker) -> list[bytes | None]:
    return [dict(rec.headers).get(r.H_DLQ_ERROR_CLASS) for rec in broker.records(TOPICS.dlq)]


# --- the projections under a changed schema ----------------------------------------------------------------


@pytest.mark.parametrize(
    "change,repair",
    [
        ("ALTER TABLE message_events ADD COLUMN x int NOT NULL", "ALTER TABLE message_events DROP COLUMN x"),
        ("ALTER TABLE message_status ADD COLUMN x int NOT NULL", "ALTER TABLE message_status DROP COLUMN x"),
        (
            "ALTER TABLE message_status ALTER COLUMN updated_at DROP DEFAULT",
            "ALTER TABLE message_status ALTER COLUMN updated_at SET DEFAULT now()",
        ),
    ],
    ids=["new column in history", "new column in current status", "default dropped"],
)
async def test_a_not_null_column_no_row_can_fill_holds_the_line_instead_of_dead_lettering_every_event(
    pool: AsyncConnectionPool, db_url: str, change: str, repair: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The projection's fixed SQL fails for every record alike (23502), as class 42 does: before, each event
    # was isolated and dead-lettered, quietly, for as long as the column stayed.
    sql(db_url, change)
    events = status_events(10)
    sink = CountingSink(pool)
    with pytest.raises(ProjectionUnusable, match="23502"):
        await sink.apply(EventType.MESSAGE_STATUS, events[:1], 1)
    broker = broker_with(events)
    projector = Projector(broker.consumer("g", TOPICS.routed), broker.producer(), sink, TOPICS, FAST)
    applied, holds, deadline = 0, 0, time.monotonic() + BOUND_S
    while not applied and time.monotonic() < deadline:
        try:  # as `Projector.run` goes on after a hold
            applied = await asyncio.wait_for(projector.step(), BOUND_S)
        except ProjectionUnusable:
            holds += 1
            if holds == 5:
                # From a thread: a sink's transaction may hold the table until this loop lets it roll back.
                await asyncio.to_thread(sql, db_url, repair)
    assert (applied, holds, sink.refused) == (10, 5, 6)  # one refusal above, then one per hold
    assert dead_letter_classes(broker) == []
    assert sql(db_url, "SELECT count(*) FROM message_events") == [(10,)]
    # The server's DETAIL ("Failing row contains (...)": an event's payload) stays out of the log.
    assert "23502" in caplog.text and "Failing row" not in caplog.text and "m0" not in caplog.text


async def test_a_null_a_users_trigger_leaves_for_one_row_is_that_records_own(
    pool: AsyncConnectionPool, db_url: str
) -> None:
    sql(db_url, "ALTER TABLE message_events ADD COLUMN x int NOT NULL")
    sql(db_url, FILL_X_EXCEPT_M1)
    events = status_events(10)
    with pytest.raises(psycopg.errors.NotNullViolation) as caught:
        await PostgresSink(pool, HandlerRegistry()).apply(EventType.MESSAGE_STATUS, events[1:2], 1)
    assert classify(caught.value) == "permanent"
    broker = broker_with(events)
    projector = Projector(
        broker.consumer("g", TOPICS.routed),
        broker.producer(),
        PostgresSink(pool, HandlerRegistry()),
        TOPICS,
        FAST,
    )
    assert await asyncio.wait_for(projector.step(), BOUND_S) == 10
    assert dead_letter_classes(broker) == [b"sqlstate_23502"]
    assert sql(db_url, "SELECT count(*) FROM message_events") == [(9,)]


RAISE_FOR_M1 = """
    CREATE FUNCTION refuse_m1() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF NEW.message_id = 'm1' THEN RAISE EXCEPTION 'not m1'; END IF;
        RETURN NEW;
    END $$;
    CREATE TRIGGER refuse_m1 BEFORE INSERT ON message_events FOR EACH ROW EXECUTE FUNCTION refuse_m1()"""


# A table per message, chosen by a statement the trigger builds for each row: only m1's is missing (42P01).
ARCHIVE_PER_MESSAGE = """
    CREATE TABLE archive_m0 (id text);
    CREATE FUNCTION archive() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF NEW.message_id IN ('m0', 'm1') THEN
            EXECUTE format('INSERT INTO %I VALUES ($1)', 'archive_' || NEW.message_id) USING NEW.event_id;
        END IF;
        RETURN NEW;
    END $$;
    CREATE TRIGGER archive BEFORE INSERT ON message_events FOR EACH ROW EXECUTE FUNCTION archive()"""


@pytest.mark.parametrize(
    "change,error_class",
    [
        ("ALTER TABLE message_events ADD CONSTRAINT not_m1 CHECK (message_id <> 'm1')", b"sqlstate_23514"),
        ("ALTER TABLE message_events ALTER COLUMN message_id TYPE varchar(2)", b"sqlstate_22001"),  # m10
        (RAISE_FOR_M1, b"sqlstate_P0001"),
        # Was held as the projection's own SQL refused (class 42), the whole stage behind one record.
        (ARCHIVE_PER_MESSAGE, b"sqlstate_42P01"),
    ],
    ids=["check", "narrower type", "trigger", "trigger's per-row statement"],
)
async def test_a_users_rule_one_record_breaks_dead_letters_that_record_alone(
    pool: AsyncConnectionPool, db_url: str, change: str, error_class: bytes
) -> None:
    sql(db_url, change)
    broker = broker_with(status_events(11))
    sink = PostgresSink(pool, HandlerRegistry())
    projector = Projector(broker.consumer("g", TOPICS.routed), broker.producer(), sink, TOPICS, FAST)
    assert await asyncio.wait_for(projector.step(), BOUND_S) == 11
    assert dead_letter_classes(broker) == [error_class]
    assert sql(db_url, "SELECT count(*) FROM message_events") == [(10,)]


async def test_a_triggers_fixed_statement_on_a_missing_table_holds_the_line(
    pool: AsyncConnectionPool, db_url: str
) -> None:
    """The same 42P01 from a statement written into the trigger fails for every row alike: held."""
    sql(
        db_url,
        """CREATE FUNCTION audit() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN INSERT INTO audit_gone (id) VALUES (NEW.event_id); RETURN NEW; END $$;
        CREATE TRIGGER audit BEFORE INSERT ON message_events FOR EACH ROW EXECUTE FUNCTION audit()""",
    )
    with pytest.raises(ProjectionUnusable, match="42P01"):
        await PostgresSink(pool, HandlerRegistry()).apply(EventType.MESSAGE_STATUS, status_events(2), 1)


async def test_a_worker_upgraded_before_the_database_is_held_and_told_to_migrate(
    pool: AsyncConnectionPool, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A rolling upgrade from 0.1 that starts the new worker before `db migrate`: its ON CONFLICT (tenant,
    # event_id) has no key to use. Held, rightly, but its log gave the server's words alone, which do not
    # say that a migration is missing.
    sql(db_url, "DELETE FROM schema_migrations WHERE version <> '0001_projections'")
    sql(db_url, "ALTER TABLE message_events DROP CONSTRAINT message_events_pkey, ADD PRIMARY KEY (event_id)")
    events = status_events(3)
    sink = PostgresSink(pool, HandlerRegistry())
    lacks = "lacks migrations 0002_tenant_scoped_ids, 0003_search_indexes: run `sentpipe db migrate`"
    with pytest.raises(ProjectionUnusable, match="42P10") as caught:
        await sink.apply(EventType.MESSAGE_STATUS, events, 1)
    assert lacks in str(caught.value) and lacks in caplog.text
    await asyncio.to_thread(migrate, db_url)
    assert await sink.apply(EventType.MESSAGE_STATUS, events, 2) == []
    assert sql(db_url, "SELECT count(*) FROM message_events") == [(3,)]


async def test_a_held_type_names_no_migration_when_none_is_missing(
    pool: AsyncConnectionPool, db_url: str
) -> None:
    sql(db_url, "ALTER TABLE message_events RENAME TO message_events_old")
    with pytest.raises(ProjectionUnusable, match="42P01") as caught:
        await PostgresSink(pool, HandlerRegistry()).apply(EventType.MESSAGE_STATUS, status_events(1), 1)
    assert "migrat" not in str(caught.value)


@pytest.mark.parametrize("first", [0, 1])
async def test_a_status_tie_goes_to_the_byte_larger_event_id_whatever_the_collation(
    pool: AsyncConnectionPool, db_url: str, first: int
) -> None:
    """Same rank, same occurred_at: the larger event id wins. Under a linguistic collation (the postgres
    images' en_US.UTF-8) `evt_B2` sorts after `evt_a1`, in bytes (and in the oracle) before it."""
    for table in ("message_status", "template_status"):
        sql(db_url, f'ALTER TABLE {table} ALTER COLUMN event_id TYPE text COLLATE "en-x-icu"')
    template = r.route(
        None,
        SampleFactory(3).template("t1", "approved").body,
        {},
        topics=TOPICS,
        id_source="auto",
        default_tenant="t",
        record_timestamp_ms=1,
    ).event
    assert template is not None
    sink = PostgresSink(pool, HandlerRegistry())
    for type_, event in (
        (EventType.MESSAGE_STATUS, status_events(1)[0]),
        (EventType.TEMPLATE_APPROVAL, template),
    ):
        pair = [dataclasses.replace(event, id=i) for i in ("evt_a1", "evt_B2")]
        for ev in (pair[first], pair[1 - first]):
            await sink.apply(type_, [ev], 1)
    assert max(("evt_a1", "evt_B2")) == "evt_a1"  # the oracle's order
    assert sql(
        db_url, "SELECT event_id FROM message_status UNION ALL SELECT event_id FROM template_status"
    ) == [
        ("evt_a1",),
        ("evt_a1",),
    ]


# --- db migrate --------------------------------------------------------------------------------------------


def bounded(fn: Callable[[], Any], url: str, app: str) -> Any:
    """fn() in a thread; if it is still waiting after BOUND_S, its session (application_name `app`) is
    cancelled so that a hang fails the test instead of stopping the run."""
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        future = ex.submit(fn)
        try:
            return future.result(BOUND_S)
        except concurrent.futures.TimeoutError:
            sql(url, f"SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE application_name = '{app}'")
            future.result(BOUND_S)
            raise


def with_param(url: str, **params: str) -> str:
    return make_conninfo(url, **params)


def test_migrate_beside_an_open_transaction_gives_up_in_one_line_instead_of_waiting_forever(
    db_url: str, unique: str
) -> None:
    # As after an upgrade from 0.1: 0002 is pending while a reader sits idle in its transaction. Waiting
    # for its lock without end, `db migrate` hung and every projector insert queued behind its ALTER TABLE.
    sql(db_url, "DELETE FROM schema_migrations WHERE version = '0002_tenant_scoped_ids'")
    app = f"hostile-{unique}"
    with psycopg.connect(db_url) as reader:
        reader.execute("SELECT count(*) FROM message_events").fetchone()
        with pytest.raises(migrate_module.MigrationError, match="0002_tenant_scoped_ids") as caught:
            bounded(lambda: migrate(with_param(db_url, application_name=app), 0.2), db_url, app)
        assert "\n" not in str(caught.value)
        # The command line's limit, and its refusal of one that is no duration.
        ran = subprocess.run(
            [sys.executable, "-m", "sentpipe", "db", "migrate", "--lock-timeout", "0.3"],
            env={**os.environ, "SENTPIPE_DATABASE_URL": db_url},
            capture_output=True,
            text=True,
            timeout=BOUND_S,
        )
        assert ran.returncode == 1 and ran.stderr.count("\n") == 1, ran.stderr
        assert ran.stderr.startswith("error: migration 0002_tenant_scoped_ids waited 0.3 s"), ran.stderr
        for bad in ("0", "nan", "inf", "-1"):
            ran = subprocess.run(
                [sys.executable, "-m", "sentpipe", "db", "migrate", "--lock-timeout", bad],
                env={**os.environ, "SENTPIPE_DATABASE_URL": db_url},
                capture_output=True,
                text=True,
                timeout=BOUND_S,
            )
            assert ran.returncode != 0 and "--lock-timeout" in ran.stderr and "Traceback" not in ran.stderr
    assert [v for v, applied in migrate(db_url) if applied] == ["0002_tenant_scoped_ids"]


def test_a_statement_timeout_meant_for_the_worker_does_not_cancel_a_migration(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow = Migration("9000_slow", "SELECT pg_sleep(0.3);")
    monkeypatch.setattr(migrate_module, "migrations", lambda: [*migrations(), slow])
    url = with_param(db_url, options=f"{conninfo_to_dict(db_url).get('options', '')} -cstatement_timeout=50")
    assert ("9000_slow", True) in migrate(url)


def test_a_migration_changed_after_it_was_applied_is_refused(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    edited = [Migration(m.version, m.sql + "\nDROP TABLE message_status;\n") for m in migrations()]
    monkeypatch.setattr(migrate_module, "migrations", lambda: edited)
    with pytest.raises(migrate_module.MigrationError, match="0001_projections was changed"):
        migrate(db_url)
    assert sql(db_url, "SELECT count(*) FROM message_status") == [(0,)]


def test_checksums_are_recorded_for_migrations_applied_before_they_were_kept(db_url: str) -> None:
    sql(db_url, "ALTER TABLE schema_migrations DROP COLUMN IF EXISTS checksum")
    assert all(not applied for _, applied in migrate(db_url))
    assert sql(db_url, "SELECT count(*) FROM schema_migrations WHERE checksum IS NULL") == [(0,)]


def test_versions_from_a_newer_sentpipe_are_listed_not_hidden(db_url: str) -> None:
    sql(db_url, "INSERT INTO schema_migrations (version) VALUES ('9999_from_the_future')")
    result = migrate(db_url)
    assert result[-1] == ("9999_from_the_future", False)
    assert all(not applied for _, applied in result)


@pytest.fixture
def dml_role(services: Services, db_url: str, unique: str) -> Iterator[str]:
    """A URL for a role that may use the test's schema and read its tables, and create nothing."""
    role = f"hostile_dml_{unique}"
    schema = str(conninfo_to_dict(db_url)["options"]).split("=", 1)[1]
    sql(services.database_url, f"CREATE ROLE {role} LOGIN")
    sql(services.database_url, f'GRANT USAGE ON SCHEMA "{schema}" TO {role}')
    sql(services.database_url, f'GRANT SELECT ON ALL TABLES IN SCHEMA "{schema}" TO {role}')
    yield with_param(db_url, user=role)
    sql(services.database_url, f"DROP OWNED BY {role}")
    sql(services.database_url, f"DROP ROLE {role}")


def test_an_up_to_date_database_is_already_applied_for_a_role_that_may_not_create(dml_role: str) -> None:
    assert all(not applied for _, applied in migrate(dml_role))


def test_a_role_that_may_not_create_is_told_so_in_one_line(services: Services, unique: str) -> None:
    role, schema = f"hostile_ro_{unique}", f"t_ro_{unique}"
    sql(services.database_url, f'CREATE SCHEMA "{schema}"')
    sql(services.database_url, f"CREATE ROLE {role} LOGIN")
    try:
        sql(services.database_url, f'GRANT USAGE ON SCHEMA "{schema}" TO {role}')
        url = with_param(services.database_url, user=role, options=f"-csearch_path={schema}")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied for schema"):
            migrate(url)
    finally:
        sql(services.database_url, f'DROP SCHEMA "{schema}" CASCADE')
        sql(services.database_url, f"DROP OWNED BY {role}")
        sql(services.database_url, f"DROP ROLE {role}")


def test_migrate_says_each_migration_as_it_starts_and_ends_with_a_table(
    services: Services, unique: str
) -> None:
    # Building 0003's indexes over a large history takes minutes, and `db migrate` said nothing until all
    # were committed.
    schema = f"t_cli_{unique}"
    sql(services.database_url, f'CREATE SCHEMA "{schema}"')
    env = {
        **os.environ,
        "SENTPIPE_DATABASE_URL": with_param(services.database_url, options=f"-csearch_path={schema}"),
    }
    try:
        outputs = []
        for _ in range(2):
            ran = subprocess.run(
                [sys.executable, "-m", "sentpipe", "db", "migrate"],
                env=env,
                capture_output=True,
                text=True,
                timeout=BOUND_S,
            )
            assert ran.returncode == 0 and ran.stderr == "", ran.stderr
            outputs.append(ran.stdout.splitlines())
        versions = [m.version for m in migrations()]
        first, again = outputs
        assert first[: len(versions)] == [f"{v}: applying" for v in versions], first
        rows = [line.split("│")[1:3] for line in first if line.startswith("│")]
        assert [(v.strip(), state.strip()) for v, state in rows] == [(v, "applied") for v in versions], first
        assert not any("applying" in line for line in again), again
        rows = [line.split("│")[1:3] for line in again if line.startswith("│")]
        assert [(v.strip(), state.strip()) for v, state in rows] == [(v, "already applied") for v in versions]
    finally:
        sql(services.database_url, f'DROP SCHEMA "{schema}" CASCADE')


def test_a_search_path_naming_no_schema_is_told_in_one_line(services: Services, unique: str) -> None:
    # A schema name mistyped in the URL's options: the server's "no schema has been selected to create in"
    # quoted sentpipe's own CREATE TABLE and named neither the path nor the schema.
    url = with_param(services.database_url, options=f"-csearch_path=t_none_{unique}")
    ran = subprocess.run(
        [sys.executable, "-m", "sentpipe", "db", "migrate"],
        env={**os.environ, "SENTPIPE_DATABASE_URL": url},
        capture_output=True,
        text=True,
        timeout=BOUND_S,
    )
    assert ran.returncode == 1 and ran.stderr.count("\n") == 1, ran.stderr
    assert ran.stderr.startswith(f"error: no schema of the search_path (t_none_{unique}) exists"), ran.stderr
    assert "CREATE TABLE" not in ran.stderr


@pytest.mark.parametrize("encoding", ["LATIN1", "SQL_ASCII"])
def test_a_database_that_cannot_store_every_script_is_refused_by_migrate(
    services: Services, unique: str, encoding: str
) -> None:
    """Events carry text of any script, stored as sent. In a LATIN1 database an inbound text with an emoji
    failed its row in the client (UnicodeEncodeError), and SQL_ASCII refused every non-ASCII string (0A000):
    events acknowledged with 200 were dead-lettered by the projector, one after another, for a setting
    `db migrate` could have named at once."""
    name = f"t_enc_{encoding.lower()}_{unique}"
    sql(
        services.database_url,
        f"CREATE DATABASE {name} TEMPLATE template0 ENCODING '{encoding}' LC_COLLATE 'C' LC_CTYPE 'C'",
    )
    try:
        url = with_param(services.database_url, dbname=name)
        with pytest.raises(MigrationError, match=f"encoding is {encoding}, not UTF8") as caught:
            migrate(url)
        assert "\n" not in str(caught.value) and "nothing was applied" in str(caught.value)
        assert sql(url, "SELECT to_regclass('schema_migrations')") == [(None,)]
    finally:
        sql(services.database_url, f"DROP DATABASE {name}")


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:TopSecretQ@[::1:5432/sentpipe",  # libpq quotes the whole URI
        "host=127.0.0.1 user=u password=Top SecretQ",  # and here the password's second word
    ],
)
def test_a_url_libpq_cannot_parse_is_refused_at_start_without_its_password(url: str) -> None:
    """Refused by Settings, so no client (the worker's pool logs every failed connect) ever quotes it."""
    with pytest.raises(ValidationError) as caught:
        Settings(database_url=SecretStr(url))
    assert "libpq cannot read it" in str(caught.value) and "SecretQ" not in str(caught.value)
    ran = subprocess.run(
        [sys.executable, "-m", "sentpipe", "db", "migrate"],
        env={**os.environ, "SENTPIPE_DATABASE_URL": url},
        capture_output=True,
        text=True,
        timeout=BOUND_S,
    )
    assert ran.returncode == 1 and ran.stderr.count("\n") == 1, ran.stderr
    assert "SENTPIPE_DATABASE_URL" in ran.stderr and "SecretQ" not in ran.stderr + ran.stdout


def test_two_migrators_at_once_apply_each_migration_once(services: Services, unique: str) -> None:
    schema = f"t_two_{unique}"
    sql(services.database_url, f'CREATE SCHEMA "{schema}"')
    try:
        url = with_param(services.database_url, options=f"-csearch_path={schema}")
        with concurrent.futures.ThreadPoolExecutor(2) as ex:
            results = [f.result(BOUND_S) for f in [ex.submit(migrate, url) for _ in range(2)]]
        applied = sorted(v for result in results for v, now in result if now)
        assert applied == sorted(m.version for m in migrations())
        assert sql(url, "SELECT count(*) FROM schema_migrations") == [(len(applied),)]
    finally:
        sql(services.database_url, f'DROP SCHEMA "{schema}" CASCADE')


def test_a_migration_failing_midway_leaves_none_of_the_run_applied(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    extra = [Migration("9001_a", "CREATE TABLE hostile_a (x int);"), Migration("9002_b", "SELECT 1/0;")]
    monkeypatch.setattr(migrate_module, "migrations", lambda: [*migrations(), *extra])
    with pytest.raises(psycopg.errors.DivisionByZero):
        migrate(db_url)
    assert sql(db_url, "SELECT to_regclass('hostile_a') IS NULL") == [(True,)]
    assert sql(db_url, "SELECT count(*) FROM schema_migrations WHERE version LIKE '900%'") == [(0,)]


def test_two_migrators_agree_under_a_serializable_default(services: Services, unique: str) -> None:
    # Both wait for the advisory lock after their first statement: under a role's serializable (or
    # repeatable read) default, the second then read the table as it was before the first committed,
    # applied everything again and failed.
    schema = f"t_ser_{unique}"
    sql(services.database_url, f'CREATE SCHEMA "{schema}"')
    apps = [f"hostile-ser{i}-{unique}" for i in range(2)]
    options = f"-csearch_path={schema} -cdefault_transaction_isolation=serializable"
    urls = [with_param(services.database_url, options=options, application_name=app) for app in apps]
    try:
        with (
            psycopg.connect(services.database_url, autocommit=True) as gate,
            concurrent.futures.ThreadPoolExecutor(2) as ex,
        ):
            gate.execute("SELECT pg_advisory_lock(7366726)")
            try:
                futures = [ex.submit(migrate, url) for url in urls]
                waiting = 0
                while waiting < 2 and not any(f.done() for f in futures):
                    waiting = gate.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE application_name = ANY(%s)"
                        " AND wait_event = 'advisory'",
                        (apps,),
                    ).fetchall()[0][0]
            finally:
                gate.execute("SELECT pg_advisory_unlock(7366726)")
            results = [f.result(BOUND_S) for f in futures]
        applied = sorted(v for result in results for v, now in result if now)
        assert applied == sorted(m.version for m in migrations())
    finally:
        sql(services.database_url, f'DROP SCHEMA "{schema}" CASCADE')


def test_a_lock_timeout_meant_for_the_worker_does_not_end_the_wait_for_another_migrator(
    services: Services, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Replicas all run `db migrate` as they start. With the role's (or the URL's) lock_timeout applying to
    # the wait for the one migrating, every other replica failed "canceling statement due to lock timeout"
    # while the first built its indexes.
    schema, app = f"t_lt_{unique}", f"hostile-lt-{unique}"
    sql(services.database_url, f'CREATE SCHEMA "{schema}"')
    url = with_param(
        services.database_url, options=f"-csearch_path={schema} -clock_timeout=50", application_name=app
    )
    try:
        with (
            psycopg.connect(services.database_url, autocommit=True) as gate,
            concurrent.futures.ThreadPoolExecutor(1) as ex,
        ):
            gate.execute("SELECT pg_advisory_lock(7366726)")
            try:
                future = ex.submit(migrate, url)
                waited = 0
                while not waited and not future.done():
                    waited = gate.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
                        " AND wait_event = 'advisory' AND state_change < now() - interval '200 ms'",
                        (app,),
                    ).fetchall()[0][0]
            finally:
                gate.execute("SELECT pg_advisory_unlock(7366726)")
            result = future.result(BOUND_S)
        assert [v for v, applied in result if applied] == [m.version for m in migrations()]
        assert "another `sentpipe db migrate` is running" in caplog.text
    finally:
        sql(services.database_url, f'DROP SCHEMA "{schema}" CASCADE')


KILLED_MIGRATOR = """
import sys
from sentpipe.processors import migrate as m
known = m.migrations()
m.migrations = lambda: [*known, m.Migration("9000_endless", "SELECT pg_sleep(3600)")]
m.migrate(sys.argv[1])
"""


def test_a_migrator_killed_midway_leaves_nothing_held_and_the_next_one_finishes(
    services: Services, unique: str
) -> None:
    # Killed with SIGKILL while its migrations ran, a migrator's server session went on (for as long as
    # an index build takes), holding the tables and the migration lock: the next `db migrate` (and the
    # worker's writes) waited for a transaction nobody would commit.
    schema, app = f"t_kill_{unique}", f"hostile-kill-{unique}"
    sql(services.database_url, f'CREATE SCHEMA "{schema}"')
    url = with_param(services.database_url, options=f"-csearch_path={schema}")
    killed = subprocess.Popen(
        [sys.executable, "-c", KILLED_MIGRATOR, with_param(url, application_name=app)],
        env={**os.environ, "SENTPIPE_DATABASE_URL": url},
    )
    try:
        deadline = time.monotonic() + BOUND_S
        while not sql(
            url, f"SELECT 1 FROM pg_stat_activity WHERE application_name = '{app}' AND wait_event = 'PgSleep'"
        ):
            assert killed.poll() is None and time.monotonic() < deadline
        killed.kill()
        killed.wait(BOUND_S)
        result = bounded(lambda: migrate(with_param(url, application_name=f"{app}-next")), url, f"{app}-next")
        assert [v for v, applied in result if applied] == [m.version for m in migrations()]
    finally:
        killed.kill()
        sql(
            services.database_url,
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = '{app}'",
        )
        sql(services.database_url, f'DROP SCHEMA "{schema}" CASCADE')


def test_an_index_an_interrupted_concurrent_build_left_invalid_is_built_by_its_migration(db_url: str) -> None:
    # An operator builds 0003's indexes ahead with CONCURRENTLY (to keep the worker's writes going over a
    # large history), and one build is interrupted: it leaves an INVALID index of the name. `CREATE INDEX IF
    # NOT EXISTS` skipped it, 0003 was recorded, and searches by message id read the whole table for good.
    sql(db_url, "DELETE FROM schema_migrations WHERE version = '0003_search_indexes'")
    sql(db_url, "DROP INDEX message_events_subject")
    with psycopg.connect(db_url) as writer, psycopg.connect(db_url, autocommit=True) as operator:
        # The build waits for this open writer, and its wait is interrupted (as by Ctrl-C).
        writer.execute("INSERT INTO message_events VALUES ('e1', 't', 'm1', 'sent', now(), now(), '{}')")
        operator.execute("SET statement_timeout = 200")
        with pytest.raises(psycopg.errors.QueryCanceled):
            operator.execute(
                "CREATE INDEX CONCURRENTLY message_events_subject ON message_events (message_id)"
            )
    valid = "SELECT indisvalid FROM pg_index WHERE indexrelid = 'message_events_subject'::regclass"
    assert sql(db_url, valid) == [(False,)]
    assert [v for v, applied in migrate(db_url) if applied] == ["0003_search_indexes"]
    assert sql(db_url, valid) == [(True,)]


async def test_a_client_encoding_set_for_the_session_neither_costs_nor_garbles_events(db_url: str) -> None:
    """A default client_encoding (the URL's options, PGCLIENTENCODING, ALTER ROLE or DATABASE ... SET) made
    psycopg encode the stage's text in it. In LATIN1, an inbound text with an emoji failed its row in the
    client (UnicodeEncodeError, permanent): every such event was dead-lettered by the projector. Worse, one
    of Latin-1 text was stored garbled: its text column right, its payload (UTF-8 bytes from orjson, read
    as LATIN1 by the server) "cafÃ©"."""
    from sentpipe.processors import history
    from sentpipe.processors.inspect import database_rows
    from sentpipe.processors.projector_process import open_pool

    options = conninfo_to_dict(db_url).get("options") or ""
    url = with_param(db_url, options=f"{options} -cclient_encoding=LATIN1")
    texts = ["caf\u00e9", "caf\u00e9 \U0001f600 \u4e2d\u6587"]
    events = []
    for text in texts:
        body = orjson.dumps({"field": "message", "sub_type": "message.received", "payload": {"text": text}})
        routed = r.route(
            None, body, {}, topics=TOPICS, id_source="auto", default_tenant="t", record_timestamp_ms=1
        )
        assert routed.event is not None
        events.append(routed.event)
    pool = open_pool(Settings(database_url=url, db_pool_size=1))
    await pool.open()
    try:
        sink = PostgresSink(pool, HandlerRegistry())
        for event in events:
            assert await sink.apply(EventType.MESSAGE_INBOUND, [event], 1) == []
    finally:
        await pool.close()
    stored = sql(db_url, "SELECT text, payload->>'text' FROM inbound_messages ORDER BY length(text)")
    assert stored == [(text, text) for text in texts]
    # And read back as stored by `events show` and the console over such a session.
    (row,) = database_rows(url, events[1].id)["inbound_messages"]
    assert (row["text"], row["payload"]) == (texts[1], {"text": texts[1]})
    assert history.search(url, history.HistoryQuery(text="\U0001f600")).rows == []  # a search's own text


@pytest.mark.parametrize("datestyle", ["SQL, DMY", "German", "Postgres, MDY"])
async def test_a_date_style_set_for_the_session_does_not_fail_a_trace_or_a_search(
    db_url: str, datestyle: str
) -> None:
    """psycopg reads a timestamptz in the ISO DateStyle only: over a session whose default is another (the
    URL's options, PGOPTIONS, ALTER ROLE or DATABASE ... SET), `events show`, the console's trace and its
    search failed on the first row they met."""
    from sentpipe.processors import history
    from sentpipe.processors.inspect import database_rows

    body = orjson.dumps({"field": "message", "sub_type": "message.received", "payload": {"text": "hi"}})
    routed = r.route(
        None, body, {}, topics=TOPICS, id_source="auto", default_tenant="t", record_timestamp_ms=1
    )
    assert routed.event is not None
    pool = AsyncConnectionPool(db_url, min_size=1, max_size=1, open=False)
    await pool.open()
    try:
        assert (
            await PostgresSink(pool, HandlerRegistry()).apply(EventType.MESSAGE_INBOUND, [routed.event], 1)
            == []
        )
    finally:
        await pool.close()
    options = conninfo_to_dict(db_url).get("options") or ""
    url = with_param(db_url, options=f"{options} -cDateStyle={datestyle.replace(' ', '')}")
    (row,) = database_rows(url, routed.event.id)["inbound_messages"]
    assert row["received_at"].tzinfo is not None, row
    page = history.search(url, history.HistoryQuery(text=routed.event.id))
    assert [found["event_id"] for found in page.rows] == [routed.event.id], page.rows
