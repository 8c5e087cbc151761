"""The connection the operator tools read the projections through (`events show`, the console's trace and
search), whatever defaults the URL, the environment or the role give a session."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import dict_row

from sentpipe.settings import DATABASE_CLIENT_ENCODING


def connect(database_url: str) -> psycopg.Connection[dict[str, Any]]:
    conn = psycopg.connect(
        database_url, connect_timeout=5, row_factory=dict_row, client_encoding=DATABASE_CLIENT_ENCODING
    )
    try:
        # psycopg reads a timestamptz only in the ISO DateStyle: a database or role set to another
        # (`SQL, DMY`, `German`, common in older installations) failed every trace and search with a row.
        conn.execute("SET DateStyle = ISO")
    except BaseException:
        conn.close()
        raise
    return conn
