"""Stream processors: dedup, routing, projections into PostgreSQL, user handlers, DLQ, replay."""
