"""A secured broker and database for the security tests, started by the tests themselves with the launchers.

`SENTPIPE_KAFKA_SECURITY=tls deploy/kafka/kafka.sh start` runs a second broker (ports SENTPIPE_KAFKA_PORT +
100..103) with an mTLS listener and a SASL_SSL listener (SCRAM users made at format time), and
`SENTPIPE_PG_SECURITY=tls deploy/postgres/postgres.sh start` a TLS-only PostgreSQL (port SENTPIPE_PG_PORT +
100). Both print the settings a client needs (`env`, `url`), which is what the tests use, so the tests read
exactly what a user would. What this fixture started, it stops.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from dataclasses import dataclass, field

from tests.services import KAFKA_SH, POSTGRES_SH, ServiceUnavailable


class ToolMissing(Exception):
    pass


def _run(script: str, *args: str, security: dict[str, str]) -> str:
    proc = subprocess.run(
        [script, *args], capture_output=True, text=True, timeout=600, env={**os.environ, **security}
    )
    if proc.returncode != 0:
        raise ServiceUnavailable(
            f"{os.path.basename(script)} {' '.join(args)} failed: {(proc.stderr or proc.stdout).strip()}"
        )
    return proc.stdout


def _pairs(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


KAFKA_TLS = {"SENTPIPE_KAFKA_SECURITY": "tls"}
PG_TLS = {"SENTPIPE_PG_SECURITY": "tls"}


@dataclass
class Secured:
    sasl_ssl: dict[str, str]  # SENTPIPE_KAFKA_* for the SASL_SSL (SCRAM-SHA-512) listener
    mtls: dict[str, str]  # SENTPIPE_KAFKA_* for the SSL listener with client certificates
    plaintext_bootstrap: str  # the secured broker's loopback plaintext listener, for reading topics back
    pg_verify_full: str  # user postgres over TLS, sslmode=verify-full
    pg_client_cert: str  # user sentpipe, authenticated by its client certificate, sslmode=verify-full
    _stop: list[tuple[str, dict[str, str]]] = field(default_factory=list)

    def close(self) -> None:
        for script, env in reversed(self._stop):
            with contextlib.suppress(ServiceUnavailable):
                _run(script, "stop", security=env)


def start_secured() -> Secured:
    for tool in ("openssl", "java"):
        if shutil.which(tool) is None:
            raise ToolMissing(
                f"{tool} is required for the TLS/SASL tests (the launchers make certificates with openssl"
                " and run the broker with java): install it, e.g. apt-get install openssl openjdk-17-jre"
            )
    stop: list[tuple[str, dict[str, str]]] = []
    for script, env in ((str(KAFKA_SH), KAFKA_TLS), (str(POSTGRES_SH), PG_TLS)):
        was_running = (
            subprocess.run([script, "status"], capture_output=True, env={**os.environ, **env}).returncode == 0
        )
        _run(script, "start", security=env)
        if not was_running:
            stop.append((script, env))
    return Secured(
        sasl_ssl=_pairs(_run(str(KAFKA_SH), "env", "sasl_ssl", security=KAFKA_TLS)),
        mtls=_pairs(_run(str(KAFKA_SH), "env", "ssl", security=KAFKA_TLS)),
        plaintext_bootstrap=_pairs(_run(str(KAFKA_SH), "env", "plaintext", security=KAFKA_TLS))[
            "SENTPIPE_KAFKA_BOOTSTRAP"
        ],
        pg_verify_full=_run(str(POSTGRES_SH), "url", "verify-full", security=PG_TLS).strip(),
        pg_client_cert=_run(str(POSTGRES_SH), "url", "cert", security=PG_TLS).strip(),
        _stop=stop,
    )
