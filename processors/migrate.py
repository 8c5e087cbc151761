"""Apply the versioned SQL files in sentpipe/processors/migrations/, each once, in order."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import psycopg


@dataclass(frozen=True, slots=True)
class Migration:
    version: str
    sql: str


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


def migrate(database_url: str) -> list[tuple[str, bool]]:
    """Returns (version, applied_now) for every migration; safe to run concurrently."""
    result = []
    with psycopg.connect(database_url, autocommit=False, connect_timeout=10) as conn:
        # One migrator at a time (several replicas may start together).
        conn.execute("SELECT pg_advisory_xact_lock(7366726)")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version text PRIMARY KEY,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r[0] for r in conn.execute("SELECT version FROM schema_migrations")}
        for m in migrations():
            if m.version in done:
                result.append((m.version, False))
                continue
            conn.execute(m.sql.encode())
            conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (m.version,))
            result.append((m.version, True))
        conn.commit()
    return result
