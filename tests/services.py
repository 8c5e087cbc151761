"""Where the tests get a real broker and database: explicit env > testcontainers > local launchers."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
KAFKA_SH = REPO / "deploy" / "kafka" / "kafka.sh"
POSTGRES_SH = REPO / "deploy" / "postgres" / "postgres.sh"


class ServiceUnavailable(Exception):
    pass


def _docker_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _launcher(script: Path, action: str) -> str:
    proc = subprocess.run([str(script), action], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise ServiceUnavailable(f"{script.name} {action} failed: {(proc.stderr or proc.stdout).strip()}")
    return proc.stdout


@dataclass
class Services:
    kafka_bootstrap: str
    database_url: str
    kafka_local: bool  # started by deploy/kafka/kafka.sh, so tests may stop and start it
    postgres_local: bool
    _cleanup: list[object] = field(default_factory=list)

    def stop_kafka(self) -> None:
        _launcher(KAFKA_SH, "stop")

    def start_kafka(self) -> None:
        _launcher(KAFKA_SH, "start")

    def freeze_kafka(self) -> None:
        """The broker suspended: there, but answering nothing (a partition, a long pause)."""
        _launcher(KAFKA_SH, "freeze")

    def thaw_kafka(self) -> None:
        _launcher(KAFKA_SH, "thaw")

    def stop_postgres(self) -> None:
        _launcher(POSTGRES_SH, "stop")

    def start_postgres(self) -> None:
        _launcher(POSTGRES_SH, "start")

    def close(self) -> None:
        for item in reversed(self._cleanup):
            if callable(item):
                item()


def acquire() -> Services:
    kafka = os.environ.get("SENTPIPE_KAFKA_BOOTSTRAP")
    db = os.environ.get("SENTPIPE_DATABASE_URL")
    cleanup: list[object] = []
    use_containers = (kafka is None or db is None) and _docker_answers()
    if use_containers:  # pragma: no cover - needs a Docker engine, which CI machines here lack
        from testcontainers.kafka import KafkaContainer
        from testcontainers.postgres import PostgresContainer

        if kafka is None:
            kc = KafkaContainer("apache/kafka:4.1.1").with_kraft()
            kc.start()
            cleanup.append(kc.stop)
            kafka = kc.get_bootstrap_server()
        if db is None:
            pc = PostgresContainer("postgres:16", dbname="sentpipe", driver=None)
            pc.start()
            cleanup.append(pc.stop)
            db = pc.get_connection_url()
        return Services(kafka, db, False, False, cleanup)

    kafka_local = kafka is None
    pg_local = db is None
    if kafka_local:
        was_running = subprocess.run([str(KAFKA_SH), "status"], capture_output=True).returncode == 0
        _launcher(KAFKA_SH, "start")
        if not was_running:
            cleanup.append(lambda: _launcher(KAFKA_SH, "stop"))
        kafka = "127.0.0.1:" + os.environ.get("SENTPIPE_KAFKA_PORT", "9092")
    if pg_local:
        was_running = subprocess.run([str(POSTGRES_SH), "status"], capture_output=True).returncode == 0
        _launcher(POSTGRES_SH, "start")
        if not was_running:
            cleanup.append(lambda: _launcher(POSTGRES_SH, "stop"))
        db = f"postgresql://postgres@127.0.0.1:{os.environ.get('SENTPIPE_PG_PORT', '5432')}/sentpipe"
    assert kafka is not None and db is not None
    return Services(kafka, db, kafka_local, pg_local, cleanup)
