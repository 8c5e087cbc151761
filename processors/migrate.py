"""Apply the versioned SQL files in sentpipe/processors/migrations/, each once, in order.

All pending migrations run in one transaction: a failure (or the server killed midway) leaves none of them
applied, and the next run starts again. Each applied file's SHA-256 is kept beside its version; a file
changed after it was applied is refused, as it would never run again and the tables would disagree with
it silently.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

import psycopg
from psycopg import sql

log = logging.getLogger("sentpipe.migrate")

# How long one migration statement waits for a table another session holds. Unbounded, one reader left
# idle in a transaction kept `db migrate` waiting forever, and every projector insert queued behind the
# waiting ALTER TABLE: the worker stalled as long as `db migrate` did.
LOCK_TIMEOUT_S = 10.0

# One migrator at a time per database (several replicas may start together).
_ADVISORY_KEY = 7366726


# The indexes a migration builds, by name. `CREATE INDEX IF NOT EXISTS` skips a name whatever its index's
# state, so one left INVALID by an interrupted CREATE INDEX CONCURRENTLY (an operator building a migration's
# indexes ahead, to keep writes going) was taken for the index: the migration was recorded, and the index was
# never used by a query, yet kept up by every insert.
_BUILDS_INDEX = re.compile(r"CREATE INDEX IF NOT EXISTS (\w+)", re.IGNORECASE)

_INVALID = """
    SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
    JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = current_schema() AND c.relname = ANY(%s) AND NOT i.indisvalid ORDER BY c.relname"""


class MigrationError(Exception):
    """`db migrate` cannot go on; nothing was applied."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: str
    sql: str

    @property
    def checksum(self) -> str:
        # Line endings are a checkout's, not the migration's.
        return hashlib.sha256(self.sql.replace("\r\n", "\n").encode()).hexdigest()


def migrations() -> list[Migration]:
    files = resources.files("sentpipe.processors").joinpath("migrations")
    return sorted(
        (
            Migration(f.name.removesuffix(".sql"), f.read_text())
            for f in files.iterdir()
            if f.name.endswith(".sql")
        ),
        key=lambda m: m.version,
    )


def _connect(database_url: str) -> psycopg.Connection[Any]:
    # (Settings refuses a URL libpq cannot parse, whose error would quote the password.)
    conn = psycopg.connect(database_url, autocommit=False, connect_timeout=10)
    # Whatever the role's default (serializable, say): a migrator that waited for the advisory lock must
    # then see what the one before it committed, or it applies the same migrations again and fails.
    conn.isolation_level = psycopg.IsolationLevel.READ_COMMITTED
    return conn


def migrate(
    database_url: str,
    lock_timeout_s: float = LOCK_TIMEOUT_S,
    on_apply: Callable[[str], None] | None = None,
) -> list[tuple[str, bool]]:
    """Returns (version, applied_now) for every migration, then (version, False) for each version in the
    database this sentpipe does not know (applied by a newer one); safe to run concurrently. A migration
    waits at most `lock_timeout_s` for a table another session holds (MigrationError, nothing applied).
    `on_apply` is told each version as it starts (committed with the others at the end)."""
    result = []
    with _connect(database_url) as conn:
        # Events carry text of any script, stored as sent: in another encoding each event holding a
        # character it lacks fails its row (an emoji in LATIN1; anything past ASCII in SQL_ASCII) and is
        # dead-lettered by the projector, one after another. The encoding is fixed when the database is made.
        encoding = conn.info.parameter_status("server_encoding")  # reported by the server as it connects
        if encoding != "UTF8":
            raise MigrationError(
                f"the database's encoding is {encoding}, not UTF8: it cannot store the text of every event"
                " (each one it could not would be dead-lettered); create the database with ENCODING 'UTF8'"
                " (createdb -E UTF8 -T template0): nothing was applied"
            )
        # The URL's (or the role's) statement_timeout is meant for the worker's statements; a migration
        # building a primary key over a large table must not be cancelled midway by it.
        conn.execute("SET LOCAL statement_timeout = 0")
        # A migrator killed midway (kill -9, the OOM killer, a Job's deadline) left its server session
        # building on for minutes, holding its tables and the migration lock: the worker's writes and the next
        # `db migrate` waited for a transaction nobody would commit. PostgreSQL 14+ notices the client gone.
        conn.execute(
            "SELECT set_config(name, '1s', true) FROM pg_settings"
            " WHERE name = 'client_connection_check_interval'"
        )
        # Nor may its lock_timeout end the wait for another migrator: replicas started together failed
        # ("canceling statement due to lock timeout") while the first built its indexes. That one is bounded
        # by the lock timeout below wherever it waits for a table.
        conn.execute("SET LOCAL lock_timeout = 0")
        if conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (_ADVISORY_KEY,)).fetchone() != (True,):
            # Said, as the wait lasts as long as the other's index builds: silence looked like a hang.
            log.warning("another `sentpipe db migrate` is running on this database; waiting for it to end")
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_ADVISORY_KEY,))
        conn.execute(f"SET LOCAL lock_timeout = {max(1, round(lock_timeout_s * 1000))}")
        where = conn.execute("SELECT current_schema(), current_setting('search_path')").fetchone()
        if where is not None and where[0] is None:
            # The server's words were "no schema has been selected to create in", quoting the CREATE TABLE.
            raise MigrationError(
                f"no schema of the search_path ({where[1]}) exists in this database: create it (CREATE"
                " SCHEMA) or correct the search_path the URL's options or the role set: nothing was applied"
            )
        # Created where CREATE TABLE would put it, and only then: an up-to-date database answers a role
        # without CREATE on the schema (one that may only read and write the tables) "already applied".
        found = conn.execute("SELECT to_regclass(quote_ident(current_schema()) || '.schema_migrations')")
        if (row := found.fetchone()) is None or row[0] is None:
            conn.execute(
                "CREATE TABLE schema_migrations (version text PRIMARY KEY,"
                " applied_at timestamptz NOT NULL DEFAULT now(), checksum text)"
            )
        if not conn.execute(  # a table created before checksums were kept
            "SELECT 1 FROM pg_attribute WHERE attrelid = 'schema_migrations'::regclass"
            " AND attname = 'checksum' AND NOT attisdropped"
        ).fetchone():
            conn.execute("ALTER TABLE schema_migrations ADD COLUMN checksum text")
        done: dict[str, str | None] = dict(
            conn.execute("SELECT version, checksum FROM schema_migrations").fetchall()
        )
        known = migrations()
        for m in known:
            if m.version in done:
                kept = done[m.version]
                if kept is None:  # applied before checksums were kept: this file is the record now
                    conn.execute(
                        "UPDATE schema_migrations SET checksum = %s WHERE version = %s",
                        (m.checksum, m.version),
                    )
                elif kept != m.checksum:
                    raise MigrationError(
                        f"migration {m.version} was changed after it was applied (checksum {m.checksum[:12]},"
                        f" applied {kept[:12]}); restore the original file: nothing was applied"
                    )
                result.append((m.version, False))
                continue
            if on_apply is not None:
                on_apply(m.version)
            try:
                for (name,) in conn.execute(_INVALID, (_BUILDS_INDEX.findall(m.sql),)).fetchall():
                    log.warning(
                        "index %s is invalid (an interrupted CREATE INDEX CONCURRENTLY?): built again", name
                    )
                    conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(name)))
                conn.execute(m.sql.encode())
            except psycopg.errors.LockNotAvailable as exc:
                raise MigrationError(
                    f"migration {m.version} waited {lock_timeout_s:g} s for a table another session holds"
                    f" (an open transaction?); nothing was applied: run `sentpipe db migrate` again once it"
                    f" ends ({exc.sqlstate})"
                ) from exc
            conn.execute(
                "INSERT INTO schema_migrations (version, checksum) VALUES (%s, %s)", (m.version, m.checksum)
            )
            result.append((m.version, True))
        names = {m.version for m in known}
        for version in sorted(v for v in done if v not in names):
            # Refusing would also refuse a rollback's `db migrate`; the newer tables are what they are.
            log.warning("%s was applied by a newer sentpipe; this one does not know it", version)
            result.append((version, False))
        conn.commit()
    return result
