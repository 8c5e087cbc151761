"""The connection the operator tools read the projections through (`events show`, the console's trace and
search), whatever defaults the URL, the environment or the role give a session."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import dict_row

from sentpipe.settings import DATABASE_CLIENT_ENCODING

# How long one read may run, waiting for a lock included. Unbounded, a search or a trace behind a table
# another session held (a migration's ALTER TABLE holds one for as long as it builds) waited as long: the
# console's page had no answer, one of its six call slots was taken, and `events show` hung with it. A
# lower limit the role or the URL sets is kept.
STATEMENT_TIMEOUT_S = 30.0

_BOUND = """SELECT set_config('statement_timeout', %(ms)s, false)
    WHERE current_setting('statement_timeout')::interval NOT BETWEEN interval '1 ms' AND %(ms)s::interval"""


def connect(database_url: str) -> psycopg.Connection[dict[str, Any]]:
    conn = psycopg.connect(
        database_url, connect_timeout=5, row_factory=dict_row, client_encoding=DATABASE_CLIENT_ENCODING
    )
    try:
        # psycopg reads a timestamptz only in the ISO DateStyle: a database or role set to another
        # (`SQL, DMY`, `German`, common in older installations) failed every trace and search with a row.
        conn.execute("SET DateStyle = ISO")
        conn.execute(_BOUND, {"ms": f"{max(1, round(STATEMENT_TIMEOUT_S * 1000))}ms"})
    except BaseException:
        conn.close()
        raise
    return conn


def unavailable(exc: psycopg.Error) -> str:
    """Why the database gave a read no answer, in one line."""
    if isinstance(
        exc, psycopg.errors.UndefinedTable
    ):  # a database no `db migrate` has run on: that is the fix
        return "database has no sentpipe tables: run `sentpipe db migrate`"
    if isinstance(exc, psycopg.errors.QueryCanceled):
        return (
            "database did not answer within its statement timeout: another session holds a table (a"
            " migration, say), or the query reads too much (a search page far back: narrow it by time)"
        )
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"database unavailable: {text if len(text) < 300 else text[:297] + '...'}"
