"""Session fixtures: a real Kafka broker and a real PostgreSQL, isolated per test by prefix and schema.

A test that needs a service fails (never skips) when the service cannot be had.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from urllib.parse import quote

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from sentpipe.ingress.app import create_app, producer_for
from sentpipe.processors.migrate import migrate
from sentpipe.processors.topics import ensure_topics, projections_group
from sentpipe.schemas.topics import Topics
from sentpipe.settings import Settings
from tests.http_tools import ingress_server
from tests.kafka_tools import delete_topics, wait_topics_ready
from tests.services import Services, ServiceUnavailable, acquire

_SESSION = pytest.StashKey[pytest.Session]()


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_SESSION] = session


@pytest.hookimpl(tryfirst=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Leave with the session's verdict, without the interpreter's teardown. At the end of a full run this
    process still holds what the in-process tests built (counted once: 36 librdkafka producers, 10 consumers,
    7 RocksDB stores, 33 Faust apps, 14 libpq connections), and the teardown frees those C clients in no set
    order, their Python callbacks included: a CI run whose 1247 tests had all passed died there with
    SIGSEGV (exit status 2). By now the session fixture has stopped the services and the summary is printed;
    a crash during the tests is still reported (pytest's faulthandler)."""
    session = config.stash.get(_SESSION, None)
    if session is None:  # no session ran (--help, a usage error): the usual exit
        return
    config.get_terminal_writer().flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(session.exitstatus))


@pytest.fixture(scope="session")
def services() -> Iterator[Services]:
    try:
        svc = acquire()
    except ServiceUnavailable as exc:
        pytest.fail(f"test services unavailable: {exc}", pytrace=False)
    yield svc
    svc.close()


@pytest.fixture
def unique() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture
def db_url(services: Services, unique: str) -> Iterator[str]:
    """A database URL whose search_path is a fresh schema with the migrations applied."""
    schema = f"t_{unique}"
    with psycopg.connect(services.database_url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    sep = "&" if "?" in services.database_url else "?"
    url = f"{services.database_url}{sep}options={quote(f'-csearch_path={schema}')}"
    migrate(url)
    yield url
    try:
        with psycopg.connect(services.database_url, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    except psycopg.OperationalError:
        pass  # a chaos test may have left the database stopped; the schema dies with the cluster


@pytest.fixture
async def pool(db_url: str) -> AsyncIterator[AsyncConnectionPool]:
    """A small connection pool on the test's schema."""
    p = AsyncConnectionPool(db_url, min_size=1, max_size=2, open=False)
    await p.open()
    yield p
    await p.close()


@pytest.fixture
def settings(services: Services, db_url: str, unique: str) -> Iterator[Settings]:
    """Settings for one test: its own topics (prefix) and schema; topics are created, and deleted after
    the test with the app's own (changelog) topics and groups."""
    s = Settings(
        kafka_bootstrap=services.kafka_bootstrap,
        database_url=db_url,
        topic_prefix=f"t{unique}.",
        raw_partitions=4,
        routed_partitions=4,
        app_id=f"sentpipe-t{unique}",
        ingress_workers=1,  # one process unless a test asks for more (the default is one per CPU)
    )
    ensure_topics(s)
    t = Topics(s.topic_prefix)
    wait_topics_ready(s.kafka_bootstrap, [t.raw, *t.routed, t.unrouted, t.dlq])
    yield s
    groups = [s.app_id, projections_group(s)]
    delete_topics(s.kafka_bootstrap, [s.topic_prefix, f"{s.app_id}-"], groups, timeout=5)


@pytest.fixture
def topics(settings: Settings) -> Topics:
    return Topics(settings.topic_prefix)


@pytest.fixture
async def ingress(settings: Settings) -> AsyncIterator[str]:
    """The ingress app in this process on a free port, for this test's settings; yields its base URL. Served
    as `sentpipe ingress` serves it: with the webhook shortcut (`ingress/protocol.py`)."""
    server = await ingress_server(create_app(settings, producer_for(settings)))
    yield f"http://127.0.0.1:{server.port}"
    await server.close()
