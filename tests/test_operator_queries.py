"""The operator tools' database reads at a heavy tenant's volume: each finds its rows through an index and
reads a page's worth of the tables, whatever their size. Checked by the blocks a query touches (EXPLAIN's
buffer counts), not by its time: a query that reads a table whole touches every block of it."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import psycopg
import pytest
from psycopg import sql

from sentpipe.processors import history, reading
from sentpipe.processors.inspect import _QUERIES, database_rows
from sentpipe.schemas.events import EventType

ROWS = 30_000  # per history table: some hundreds of blocks each, far above what one page needs
BLOCKS = 120  # what a page of 50 may touch: index pages and the heap pages its rows are on
BOUND_S = 60.0  # a read still waiting after this is hanging

# Shaped as the projector writes them (projections.py): ten tenants, five events per message, 64-hex ids.
FILL = f"""
INSERT INTO message_events (event_id, tenant, message_id, status, occurred_at, received_at, payload)
SELECT encode(sha256(('m' || g)::bytea), 'hex'), 'tenant' || (g % 10), md5('msg' || (g / 5)),
       (ARRAY['queued', 'routed', 'sent', 'delivered', 'read'])[g % 5 + 1],
       timestamptz '2026-11-20' + g * interval '1 s', timestamptz '2026-11-20' + g * interval '1 s',
       jsonb_build_object('message_id', md5('msg' || (g / 5)), 'channel', 'sms')
FROM generate_series(1, {ROWS}) g;
INSERT INTO message_status (tenant, message_id, status, status_rank, occurred_at, event_id)
SELECT DISTINCT ON (tenant, message_id) tenant, message_id, status, 3, occurred_at, event_id
FROM message_events ORDER BY tenant, message_id, occurred_at DESC;
INSERT INTO inbound_messages (event_id, tenant, from_number, to_number, text, channel, provider,
                              occurred_at, received_at, payload)
SELECT encode(sha256(('i' || g)::bytea), 'hex'), 'tenant' || (g % 10), '+1234567890', '+1987654321',
       'hello ' || g, 'sms', 'p', timestamptz '2026-11-20' + g * interval '1 s',
       timestamptz '2026-11-20' + g * interval '1 s', jsonb_build_object('text', 'hello ' || g)
FROM generate_series(1, {ROWS}) g;
INSERT INTO template_events (event_id, tenant, template_id, status, occurred_at, payload)
SELECT encode(sha256(('t' || g)::bytea), 'hex'), 'tenant' || (g % 10), md5('tpl' || (g / 5)),
       (ARRAY['approved', 'paused'])[g % 2 + 1], timestamptz '2026-11-20' + g * interval '1 s',
       jsonb_build_object('status', 'APPROVED')
FROM generate_series(1, {ROWS}) g;
INSERT INTO template_status (tenant, template_id, name, status, occurred_at, event_id)
SELECT DISTINCT ON (tenant, template_id) tenant, template_id, 'n', status, occurred_at, event_id
FROM template_events ORDER BY tenant, template_id, occurred_at DESC;
"""


@pytest.fixture
def filled(db_url: str) -> str:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(FILL)
        conn.execute("ANALYZE")
    return db_url


def blocks(url: str, query: sql.Composable | str, params: dict[str, Any]) -> int:
    """The buffers a query touched (hit or read), from EXPLAIN ANALYZE."""
    with psycopg.connect(url) as conn:
        explain = sql.SQL("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) ") + (
            sql.SQL(query) if isinstance(query, str) else query
        )
        ((plan,),) = conn.execute(explain, params).fetchall()
    top = plan[0]["Plan"]
    return int(top["Shared Hit Blocks"]) + int(top["Shared Read Blocks"])


def ids(url: str) -> tuple[str, str, str]:
    """A message event's id, its message id, a template id: from the middle of the history."""
    with psycopg.connect(url) as conn:
        ((event_id, message_id),) = conn.execute(
            "SELECT event_id, message_id FROM message_events WHERE received_at = %s",
            (datetime(2026, 11, 20, 4, tzinfo=UTC),),
        ).fetchall()
        ((template_id,),) = conn.execute("SELECT template_id FROM template_events LIMIT 1 OFFSET 9000")
    return event_id, message_id, template_id


# The search's whole list, newest first, as an oracle: every history row, ordered as the search orders them.
LISTED = """
SELECT * FROM (
    SELECT 'message.status.updated' AS type, tenant, event_id, received_at AS at FROM message_events
    UNION ALL SELECT 'message.inbound.received', tenant, event_id, received_at FROM inbound_messages
    UNION ALL SELECT 'template.approval.updated', tenant, event_id, occurred_at FROM template_events
) e WHERE tenant = coalesce(%(tenant)s, tenant)
ORDER BY at DESC, event_id DESC, tenant DESC, type DESC OFFSET %(skip)s LIMIT %(count)s
"""


def listed(url: str, tenant: str | None, skip: int, count: int) -> list[dict[str, Any]]:
    with psycopg.connect(url, row_factory=psycopg.rows.dict_row) as conn:
        return conn.execute(LISTED, {"tenant": tenant, "skip": skip, "count": count}).fetchall()


DEEP = {None: 30_000, "tenant3": 3_000}  # rows above a deep page: a third of the list (90,000; 9,000)


def deep(url: str, tenant: str | None) -> history.Cursor:
    """Where a page far down the search's list starts: after its row DEEP[tenant]."""
    (row,) = listed(url, tenant, DEEP[tenant] - 1, 1)
    return history.Cursor.of(row)


def test_a_search_page_reads_a_page_not_the_history(filled: str) -> None:
    """The console's search without a tenant: its first page (no filter at all), a type, a time window, a
    message or template id alone. Each read whole tables (the time columns and a message id without its
    tenant had no index): seconds a page at a few million rows, and more as the history grew."""
    event_id, message_id, template_id = ids(filled)
    cases = {
        "first page": history.HistoryQuery(),
        "a tenant": history.HistoryQuery(tenant="tenant3"),
        "a type": history.HistoryQuery(types=frozenset({EventType.MESSAGE_STATUS})),
        "templates": history.HistoryQuery(types=frozenset({EventType.TEMPLATE_APPROVAL})),
        "a window": history.HistoryQuery(
            since=datetime(2026, 11, 20, 3, tzinfo=UTC), until=datetime(2026, 11, 20, 5, tzinfo=UTC)
        ),
        "an event id": history.HistoryQuery(text=event_id),
        "a message id": history.HistoryQuery(text=message_id),
        "a template id": history.HistoryQuery(text=template_id),
        # Page 600 or so (newest first): OFFSET pages read every row above them in each table (page 600 of
        # 50 touched some 1,500 blocks here, growing with the depth); a keyset page reads a page.
        "a deep page": history.HistoryQuery(after=deep(filled, None)),
        "a tenant, deep": history.HistoryQuery(tenant="tenant3", after=deep(filled, "tenant3")),
    }
    touched = {}
    for name, q in cases.items():
        stmt = history.statement(q)
        assert stmt is not None
        touched[name] = blocks(filled, *stmt)
    assert all(n < BLOCKS for n in touched.values()), touched
    # And they find what they look for.
    assert [r["event_id"] for r in history.search(filled, cases["an event id"]).rows] == [event_id]
    assert len(history.search(filled, cases["a message id"]).rows) == 5
    assert len(history.search(filled, cases["a template id"]).rows) == 5
    got = history.search(filled, cases["a tenant"])
    assert len(got.rows) == 50 and {r["tenant"] for r in got.rows} == {"tenant3"} and got.has_more
    # A deep page holds exactly the rows after its cursor.
    for name, tenant in (("a deep page", None), ("a tenant, deep", "tenant3")):
        got = history.search(filled, cases[name])
        want = listed(filled, tenant, DEEP[tenant], 50)
        assert [(r["type"], r["event_id"]) for r in got.rows] == [(r["type"], r["event_id"]) for r in want]


def test_a_trace_reads_the_status_tables_by_their_key(filled: str) -> None:
    """`events show` and the console's trace found an event's status rows by the row's `event_id` too,
    which no index holds: each trace read the whole status table (0.65 s at 3 million messages)."""
    event_id, message_id, _ = ids(filled)
    with psycopg.connect(filled) as conn:
        ((template_event,),) = conn.execute("SELECT event_id FROM template_status LIMIT 1 OFFSET 1000")
    touched = {table: blocks(filled, q, {"id": event_id}) for table, q in _QUERIES.items()}
    touched |= {f"{t} (template)": blocks(filled, _QUERIES[t], {"id": template_event}) for t in _QUERIES}
    assert all(n < BLOCKS for n in touched.values()), touched
    # The status rows are still found: the message's current one, and one the event itself set.
    (status,) = database_rows(filled, event_id)["message_status"]
    assert status["message_id"] == message_id
    (status,) = database_rows(filled, template_event)["template_status"]
    assert status["event_id"] == template_event


def test_a_read_behind_a_held_table_ends_in_one_line_instead_of_waiting(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A table another session holds (a migration's ALTER TABLE holds one as long as it builds: minutes on a
    large history) kept a search and `events show` waiting as long, and the console's page with no answer
    (test_console_hostile checks its answers)."""
    monkeypatch.setattr(reading, "STATEMENT_TIMEOUT_S", 0.5)
    # The holder closes first, so a read that still hangs ends with the test.
    with ThreadPoolExecutor(2) as pool, psycopg.connect(db_url) as holder:
        holder.execute("LOCK TABLE message_events IN ACCESS EXCLUSIVE MODE")
        search = pool.submit(history.search, db_url, history.HistoryQuery())
        trace = pool.submit(database_rows, db_url, "e-1")
        for read in (search, trace):
            with pytest.raises(psycopg.errors.QueryCanceled) as caught:
                read.result(BOUND_S)
            line = reading.unavailable(caught.value)
            assert line.startswith("database did not answer within its statement timeout"), line
            assert "\n" not in line


def test_a_lower_statement_timeout_of_the_role_or_url_is_kept(db_url: str) -> None:
    with reading.connect(db_url) as conn:
        assert conn.execute("SHOW statement_timeout").fetchone() == {"statement_timeout": "30s"}
    lower = f"{db_url}{quote(' -cstatement_timeout=200')}"  # after the fixture's search_path option
    with reading.connect(lower) as conn:
        assert conn.execute("SHOW statement_timeout").fetchone() == {"statement_timeout": "200ms"}


def test_a_search_on_a_database_without_the_tables_says_to_migrate(db_url: str) -> None:
    """The console's search on a database no `db migrate` ran on answered 503 "database unavailable:
    relation "message_events" does not exist LINE 1: ..." (the query's SQL), where `events show` named the
    fix."""
    for table in ("message_events", "inbound_messages", "template_events"):
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(table)))
    for read in (
        lambda: history.search(db_url, history.HistoryQuery()),
        lambda: database_rows(db_url, "e-1"),
    ):
        with pytest.raises(psycopg.errors.UndefinedTable) as caught:
            read()
        assert (
            reading.unavailable(caught.value) == "database has no sentpipe tables: run `sentpipe db migrate`"
        )
