"""Kafka TLS/SASL/mTLS and PostgreSQL TLS, against a broker and a database the tests secure themselves.

The whole pipeline (ingress -> worker -> PostgreSQL, then replay) runs over SASL_SSL with SCRAM-SHA-512 and
with PLAIN, with PostgreSQL `sslmode=verify-full`, and over mTLS (client certificates for Kafka and
PostgreSQL); the operator commands (`spool drain`, `events show`, `dlq list`, `offsets reset`) do their work
over mTLS and SASL_SSL.
Then the failures a new deployment meets: a wrong password, an unknown CA and a plaintext client against a
TLS listener, each one line naming the broker and the cause, a non-zero exit, within the connect timeout,
for the ingress, the worker and `topics ensure` (and the wrong password for every other Kafka command).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest

from sentpipe.console.tail import Tail
from sentpipe.ingress.spool import process_dir
from sentpipe.kafka import BrokerRefused, check_connection, refusal, security_config, tls_context
from sentpipe.processors.offsets import Log
from sentpipe.processors.worker import broker_credentials
from sentpipe.schemas import routing as r
from sentpipe.schemas.topics import Topics
from sentpipe.settings import Settings
from tests.kafka_tools import read_topic, wait_topics_ready
from tests.oracle import row_count
from tests.pipeline import deliver, start_ingress, start_worker, wait_caught_up, wait_for
from tests.processes import free_port, settings_env
from tests.secured import Secured, ToolMissing, start_secured
from tests.services import ServiceUnavailable
from tests.test_ops_cli import sentpipe
from tests.test_pipeline_e2e import assert_matches_oracle, deliveries
from tests.test_replay import TABLES
from tests.test_spool_e2e import _prefill

CONNECT_TIMEOUT_S = 10.0


@pytest.fixture(scope="module")
def secured() -> Iterator[Secured]:
    try:
        sec = start_secured()
    except (ToolMissing, ServiceUnavailable) as exc:
        pytest.fail(f"secured test services unavailable: {exc}", pytrace=False)
    yield sec
    sec.close()


def _settings(kafka_env: dict[str, str], **values: object) -> Settings:
    kafka = {k.removeprefix("SENTPIPE_").lower(): v for k, v in kafka_env.items()}
    return Settings(**{**kafka, **values})  # type: ignore[arg-type]


def _schema_url(admin_url: str, client_url: str, owner: str) -> str:
    """A fresh schema (made over TLS as postgres, owned by `owner`); `client_url` with it as search_path."""
    schema = f"t_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=10) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}" AUTHORIZATION "{owner}"')
    return f"{client_url}&options={quote(f'-csearch_path={schema}')}"


def _other_ca(tmp_path: Path) -> Path:
    """A CA nobody signed the broker with."""
    ca = tmp_path / "other-ca.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"),
            *("-subj", "/CN=not the CA", "-keyout", str(tmp_path / "other-ca.key"), "-out", str(ca)),
        ],
        check=True,
        capture_output=True,
    )
    return ca


# --- the whole pipeline, secured ------------------------------------------------------------------------


# PLAIN over TLS is what Confluent Cloud's API keys use; the router's aiokafka takes it as librdkafka does.
@pytest.mark.parametrize("mode", ["sasl_ssl+verify-full", "sasl_ssl-plain+verify-full", "mtls+client-cert"])
def test_pipeline_signed_sent_projected_replayed_over_tls(
    secured: Secured, mode: str, tmp_path: Path
) -> None:
    unique_id = uuid.uuid4().hex[:10]
    if mode.startswith("sasl_ssl"):
        kafka_env, db = (
            secured.sasl_ssl,
            _schema_url(secured.pg_verify_full, secured.pg_verify_full, "postgres"),
        )
        assert kafka_env["SENTPIPE_KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-512"
        if "plain" in mode:
            kafka_env = {**kafka_env, "SENTPIPE_KAFKA_SASL_MECHANISM": "PLAIN"}
    else:
        kafka_env = secured.mtls
        db = _schema_url(secured.pg_verify_full, secured.pg_client_cert, "sentpipe")
        assert "SENTPIPE_KAFKA_SASL_USERNAME" not in kafka_env
    assert "sslmode=verify-full" in db
    s = _settings(
        kafka_env,
        database_url=db,
        topic_prefix=f"tls{unique_id}.",
        app_id=f"sentpipe-tls{unique_id}",
        raw_partitions=2,
        routed_partitions=2,
    )
    topics = Topics(s.topic_prefix)
    # What the test reads back goes through the broker's plaintext listener; sentpipe never does.
    plain = s.model_copy(update={"kafka_bootstrap": secured.plaintext_bootstrap})

    for args in (["topics", "ensure"], ["db", "migrate"]):
        res = sentpipe(s, *args)
        assert res.returncode == 0, res.stderr
    wait_topics_ready(plain.kafka_bootstrap, [topics.raw, *topics.routed, topics.unrouted, topics.dlq])

    unique, to_send = deliveries(120, 0.25, seed=14)
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 60))
    ingress, url, _ = start_ingress(s, tmp_path)
    worker = start_worker(s, tmp_path)
    try:
        deliver(s, url, to_send, worker, len(unique))
        wait_caught_up(plain, 60, "the worker caught up", worker.proc.tail)
        assert_matches_oracle(db, unique)
        n_raw = len(read_topic(plain.kafka_bootstrap, topics.raw))
        assert n_raw == len(to_send)

        with psycopg.connect(db, autocommit=True) as c:
            c.execute(f"TRUNCATE {', '.join(TABLES)}")
        res = sentpipe(s, "replay", "--since", since)
        assert res.returncode == 0, res.stderr
        wait_for(lambda: row_count(db), lambda n: n >= len(unique), 120, "replay projected", worker.proc.tail)
        wait_caught_up(plain, 60, "the replay applied", worker.proc.tail)
        assert_matches_oracle(db, unique)
    finally:
        worker.stop()
        ingress.stop()
    replayed = [
        rec
        for t in topics.routed
        for rec in read_topic(plain.kafka_bootstrap, t)
        if r.H_REPLAY_ID in rec.headers
    ]
    assert len(replayed) == n_raw
    # Each side saw TLS: the database session of the projections, and the broker listener the clients used.
    with psycopg.connect(db) as c:
        assert c.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone() == (True,)


# --- refusals: one line, non-zero, within the connect timeout --------------------------------------------


def _refused_env(secured: Secured, failure: str, tmp_path: Path) -> tuple[dict[str, str], list[str]]:
    """Failure -> (the client's SENTPIPE_KAFKA_* settings, what its one line must say)."""
    sasl = secured.sasl_ssl
    if failure == "wrong password":
        return {**sasl, "SENTPIPE_KAFKA_SASL_PASSWORD": "not-the-password"}, ["SASL authentication"]
    if failure == "unknown CA":
        return {**sasl, "SENTPIPE_KAFKA_SSL_CA_FILE": str(_other_ca(tmp_path))}, ["certificate verify failed"]
    assert failure == "plaintext against TLS"
    return {"SENTPIPE_KAFKA_BOOTSTRAP": sasl["SENTPIPE_KAFKA_BOOTSTRAP"]}, ["TLS listener", "PLAINTEXT"]


def _assert_refused(
    res: subprocess.CompletedProcess[str], took: float, bootstrap: str, needles: list[str]
) -> None:
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    assert res.returncode != 0, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    assert len(lines) == 1, res.stderr
    line = lines[0]
    assert line.startswith("error: "), line
    assert f"Kafka broker at {bootstrap} refused the connection" in line, line
    for needle in needles:
        assert needle in line, line
    assert "not-the-password" not in res.stderr + res.stdout
    assert took < CONNECT_TIMEOUT_S, f"took {took:.1f}s, the connect timeout is {CONNECT_TIMEOUT_S}s: {line}"


COMMANDS = {
    "ingress": lambda: ["ingress", "--host", "127.0.0.1", "--port", str(free_port())],
    "worker": lambda: ["worker"],
    "topics ensure": lambda: ["topics", "ensure", "--timeout", str(CONNECT_TIMEOUT_S)],
}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("failure", ["wrong password", "unknown CA", "plaintext against TLS"])
def test_refused_connection_is_one_line_naming_broker_and_cause(
    secured: Secured, command: str, failure: str, tmp_path: Path
) -> None:
    kafka_env, needles = _refused_env(secured, failure, tmp_path)
    s = _settings(
        kafka_env,
        topic_prefix=f"tlsneg{uuid.uuid4().hex[:8]}.",
        kafka_connect_timeout_s=CONNECT_TIMEOUT_S,
        ingress_metrics_port=free_port(),
        worker_web_port=free_port(),
        worker_metrics_port=free_port(),
        data_dir=tmp_path / "faust",
    )
    t0 = time.monotonic()
    res = sentpipe(s, *COMMANDS[command](), timeout=60)
    _assert_refused(res, time.monotonic() - t0, s.kafka_bootstrap, needles)


OTHER_COMMANDS = [
    ["replay", "--dry-run"],
    ["dlq", "list"],
    ["dlq", "redrive", "--dry-run"],
    ["events", "show", "evt_1"],
    ["offsets", "reset", "--group", "g", "--to-latest", "--dry-run"],
    ["worker", "--role", "project"],
]


@pytest.mark.parametrize("args", OTHER_COMMANDS, ids=[" ".join(a) for a in OTHER_COMMANDS])
def test_every_other_kafka_command_refused_in_one_line(
    secured: Secured, args: list[str], tmp_path: Path
) -> None:
    s = _settings(secured.sasl_ssl, kafka_sasl_password="not-the-password")
    t0 = time.monotonic()
    res = sentpipe(s, *args, timeout=60, data_dir=tmp_path, worker_metrics_port=free_port())
    _assert_refused(res, time.monotonic() - t0, s.kafka_bootstrap, ["SASL authentication"])


@pytest.mark.parametrize("listener", ["mtls", "sasl_ssl-plain"])
def test_operator_commands_work_over_a_secured_listener(
    secured: Secured, listener: str, tmp_path: Path
) -> None:
    """The commands the refusal tests reach only with a wrong password, each doing its work over TLS: `spool
    drain` produces what a spool left behind holds, `events show` finds an event, `dlq list`,
    `offsets reset --dry-run` and the console's live tail read the topics."""
    kafka_env = (
        secured.mtls if listener == "mtls" else {**secured.sasl_ssl, "SENTPIPE_KAFKA_SASL_MECHANISM": "PLAIN"}
    )
    s = _settings(
        kafka_env,
        database_url=_schema_url(secured.pg_verify_full, secured.pg_verify_full, "postgres"),
        topic_prefix=f"tlsops{uuid.uuid4().hex[:8]}.",
        raw_partitions=2,
        routed_partitions=2,
        spool_dir=tmp_path / "spool",
    )
    topics = Topics(s.topic_prefix)
    for args in (["topics", "ensure"], ["db", "migrate"]):
        res = sentpipe(s, *args)
        assert res.returncode == 0, res.stderr
    keys = _prefill(process_dir(s.spool_dir, 0), s, 5, 100)
    res = sentpipe(s, "spool", "drain")
    assert res.returncode == 0, res.stderr
    raw = read_topic(secured.plaintext_bootstrap, topics.raw, at_least=5, timeout=60)
    assert {rec.key.decode() for rec in raw if rec.key is not None} == set(keys)
    res = sentpipe(s, "events", "show", keys[0])
    assert res.returncode == 0 and f"{topics.raw}[" in res.stdout, res.stdout + res.stderr
    res = sentpipe(s, "dlq", "list")
    assert res.returncode == 0 and "0 in the DLQ" in res.stdout, res.stdout + res.stderr
    res = sentpipe(s, "offsets", "reset", "--group", "g", "--topic", topics.raw, "--to-earliest", "--dry-run")
    assert res.returncode == 0 and topics.raw in res.stdout, res.stdout + res.stderr
    # The console's live tail reads the last hour of the topics at start.
    loop = asyncio.new_event_loop()
    try:
        tail = Tail(s)
        tail._loop = loop
        tail._backfill()
        loop.run_until_complete(asyncio.sleep(0))
    finally:
        loop.close()
    assert {row["event_id"] for row in tail.recent} == set(keys)


@pytest.mark.parametrize("failure", ["wrong password", "plaintext against TLS"])
def test_console_reads_say_the_broker_refused_not_that_it_did_not_answer(
    secured: Secured, failure: str, tmp_path: Path
) -> None:
    """The console starts without a connection check (its database pages work while Kafka is away): its
    live tail, Kafka pages and jobs met a broker refusing the settings through `Log`, which said "did not
    answer within 10s", sending the operator to the network instead of the password or protocol."""
    kafka_env, needles = _refused_env(secured, failure, tmp_path)
    s = _settings(kafka_env)
    with pytest.raises(BrokerRefused) as refused:
        Log(s, timeout=5.0)
    line = str(refused.value)
    assert line.startswith(f"Kafka broker at {s.kafka_bootstrap} refused the connection: "), line
    for needle in needles:
        assert needle in line, line
    assert "not-the-password" not in line


# The router's aiokafka client, set up as the worker sets it up, with the worker's logging at DEBUG.
_ROUTER_CLIENT_AT_DEBUG = """
import asyncio
from aiokafka import AIOKafkaClient
from sentpipe.logs import configure
from sentpipe.processors.worker import broker_credentials
from sentpipe.settings import Settings

s = Settings()
configure("DEBUG")
creds = broker_credentials(s)

async def main():
    client = AIOKafkaClient(
        bootstrap_servers=s.kafka_bootstrap,
        security_protocol="SASL_SSL",
        ssl_context=creds.ssl_context,
        sasl_mechanism=s.kafka_sasl_mechanism,
        sasl_plain_username=creds.username,
        sasl_plain_password=creds.password,
    )
    await client.bootstrap()
    await client.close()

asyncio.run(main())
"""


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-512"])
def test_the_router_logs_no_sasl_token_at_debug(secured: Secured, mechanism: str) -> None:
    """aiokafka logs each request and response at DEBUG: with SENTPIPE_LOG_LEVEL=DEBUG, the worker's log held
    PLAIN's password as given (Confluent Cloud's API secret), and SCRAM's salt and client proof."""
    s = _settings(secured.sasl_ssl, kafka_sasl_mechanism=mechanism)
    password = secured.sasl_ssl["SENTPIPE_KAFKA_SASL_PASSWORD"]
    res = subprocess.run(
        [sys.executable, "-c", _ROUTER_CLIENT_AT_DEBUG],
        env=settings_env(s),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert "SaslAuthenticateRequest" in res.stderr, res.stderr  # the requests are logged, at DEBUG
    assert f"via {mechanism}" in res.stderr, res.stderr  # and authentication succeeded
    assert password not in res.stderr and password[:12] not in res.stderr
    assert "sasl_auth_bytes" not in res.stderr, res.stderr


def test_mtls_listener_without_client_certificate_is_refused(secured: Secured) -> None:
    s = _settings({k: v for k, v in secured.mtls.items() if "CERT" not in k and "KEY" not in k})
    t0 = time.monotonic()
    res = sentpipe(s, "topics", "ensure", "--timeout", str(CONNECT_TIMEOUT_S), timeout=60)
    _assert_refused(res, time.monotonic() - t0, s.kafka_bootstrap, ["bad certificate"])


def _client_certificate(tmp_path: Path, ca: Path, ca_key: Path, *, expired: bool) -> Path:
    """A client certificate and its key (beside it), signed by `ca`: valid now, or expired in 2020."""
    key = tmp_path / "client.key"
    _openssl("genrsa", "-out", str(key), "2048")
    _openssl("req", "-new", "-key", str(key), "-subj", "/CN=sentpipe", "-out", str(tmp_path / "client.csr"))
    cert = tmp_path / "client.pem"
    if not expired:
        _openssl(
            *("x509", "-req", "-in", str(tmp_path / "client.csr"), "-CA", str(ca), "-CAkey", str(ca_key)),
            *("-CAcreateserial", "-days", "2", "-out", str(cert)),
        )
        return cert
    (tmp_path / "newcerts").mkdir()
    (tmp_path / "index.txt").write_text("")
    (tmp_path / "serial").write_text("1000\n")
    (tmp_path / "ca.cnf").write_text(
        f"[ca]\ndefault_ca=c\n[c]\ndir={tmp_path}\ndatabase=$dir/index.txt\nnew_certs_dir=$dir/newcerts\n"
        "serial=$dir/serial\ndefault_md=sha256\npolicy=p\n[p]\ncommonName=supplied\n"
    )
    _openssl(
        *("ca", "-batch", "-config", str(tmp_path / "ca.cnf"), "-cert", str(ca), "-keyfile", str(ca_key)),
        *("-in", str(tmp_path / "client.csr"), "-out", str(cert), "-notext"),
        *("-startdate", "20200101000000Z", "-enddate", "20200102000000Z"),
    )
    return cert


@pytest.mark.parametrize("certificate", ["expired", "signed by another CA", "none"])
def test_a_client_certificate_the_broker_refuses_is_named(
    secured: Secured, certificate: str, tmp_path: Path
) -> None:
    """A broker says no more than "ssl/tls alert certificate unknown" or "bad certificate" of a client
    certificate expired or signed by a CA it does not trust, or of none: the line names the setting."""
    ca = Path(secured.mtls["SENTPIPE_KAFKA_SSL_CA_FILE"])
    env = {k: v for k, v in secured.mtls.items() if "CERT" not in k and "KEY" not in k}
    if certificate == "expired":
        cert = _client_certificate(tmp_path, ca, ca.with_name("ca.key"), expired=True)
    elif certificate == "signed by another CA":
        other = _other_ca(tmp_path)
        cert = _client_certificate(tmp_path, other, tmp_path / "other-ca.key", expired=False)
    if certificate != "none":
        env |= {
            "SENTPIPE_KAFKA_SSL_CERT_FILE": str(cert),
            "SENTPIPE_KAFKA_SSL_KEY_FILE": str(cert.with_suffix(".key")),
        }
    with pytest.raises(BrokerRefused) as refused:
        check_connection(_settings(env), CONNECT_TIMEOUT_S)
    line = str(refused.value)
    if certificate == "none":
        assert line.endswith(
            "(SENTPIPE_KAFKA_SSL_CERT_FILE is unset: this listener wants a client certificate, mTLS)"
        ), line
    else:
        assert "ssl/tls alert" in line, line
        assert line.endswith(
            f"(the broker did not accept SENTPIPE_KAFKA_SSL_CERT_FILE {cert}: expired or not yet valid, or"
            " signed by a CA it does not trust)"
        ), line


def test_scram_sha_256_and_hostname_verification(secured: Secured) -> None:
    """The same user over SCRAM-SHA-256; `localhost` is in the broker's certificate, so verification holds
    by name as well as by address."""
    port = secured.sasl_ssl["SENTPIPE_KAFKA_BOOTSTRAP"].rsplit(":", 1)[1]
    check_connection(_settings(secured.sasl_ssl, kafka_sasl_mechanism="SCRAM-SHA-256"), CONNECT_TIMEOUT_S)
    check_connection(_settings(secured.sasl_ssl, kafka_bootstrap=f"localhost:{port}"), CONNECT_TIMEOUT_S)


def test_a_certificate_not_verified_says_why(secured: Secured, tmp_path: Path) -> None:
    """librdkafka says "verify that ssl.ca.location is correctly configured" for any certificate it could not
    verify: for a name the broker's certificate does not hold (`127.1` is 127.0.0.1, not in its names), the
    line sent the operator to a CA that was right. It says the name does not match, and the way out."""
    port = secured.sasl_ssl["SENTPIPE_KAFKA_BOOTSTRAP"].rsplit(":", 1)[1]
    s = _settings(secured.sasl_ssl, kafka_bootstrap=f"127.1:{port}")
    with pytest.raises(BrokerRefused) as refused:
        check_connection(s, CONNECT_TIMEOUT_S)
    line = str(refused.value)
    assert "certificate verify failed: Hostname mismatch, certificate is not valid for '127.1'" in line, line
    assert "SENTPIPE_KAFKA_SSL_CHECK_HOSTNAME=false" in line and "ssl.ca.location" not in line, line
    check_connection(
        _settings(secured.sasl_ssl, kafka_bootstrap=f"127.1:{port}", kafka_ssl_check_hostname=False),
        CONNECT_TIMEOUT_S,
    )
    # A CA that did not sign it: said so, naming the file.
    other = _other_ca(tmp_path)
    with pytest.raises(BrokerRefused) as refused:
        check_connection(_settings(secured.sasl_ssl, kafka_ssl_ca_file=other), CONNECT_TIMEOUT_S)
    line = str(refused.value)
    assert f"(the CA in SENTPIPE_KAFKA_SSL_CA_FILE {other} did not sign it)" in line, line
    assert "ssl.ca.location" not in line, line


def test_database_tls_refusals_are_one_line(secured: Secured) -> None:
    """PostgreSQL over the URL: no TLS, an unknown CA and a missing client certificate are refused."""
    url = secured.pg_verify_full
    base = url.split("?", 1)[0]
    cert_user_without_cert = secured.pg_client_cert.split("&sslcert=", 1)[0]
    for bad, needle in [
        (f"{base}?sslmode=disable", "no encryption"),
        (url.replace("sslrootcert=", "sslrootcert=/nonexistent/"), "root certificate file"),
        (cert_user_without_cert, "certificate"),
    ]:
        s = Settings(database_url=bad)
        res = sentpipe(s, "db", "migrate", timeout=60)
        lines = res.stderr.strip().splitlines()
        assert res.returncode != 0 and len(lines) == 1, res.stderr
        assert lines[0].startswith("error: database unavailable") and needle in lines[0], lines[0]


# --- mapping, without a broker ----------------------------------------------------------------------------


def test_settings_map_to_librdkafka_and_aiokafka(tmp_path: Path) -> None:
    import faust

    ca = tmp_path / "ca.pem"
    ca.write_text("")
    plain = Settings()
    assert security_config(plain) == {"security.protocol": "plaintext"}
    assert tls_context(plain) is None and broker_credentials(plain) is None

    sasl = Settings(
        kafka_security_protocol="sasl_plaintext", kafka_sasl_username="u", kafka_sasl_password="s3cr3t-pw"
    )
    assert security_config(sasl) == {
        "security.protocol": "sasl_plaintext",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "u",
        "sasl.password": "s3cr3t-pw",
    }
    creds = broker_credentials(sasl)
    assert isinstance(creds, faust.SASLCredentials)
    assert (creds.protocol.value, creds.mechanism.value, creds.username, creds.password) == (
        "SASL_PLAINTEXT",
        "SCRAM-SHA-512",
        "u",
        "s3cr3t-pw",
    )
    assert "s3cr3t-pw" not in repr(sasl) + repr(creds)

    no_hostname = Settings(kafka_security_protocol="SSL", kafka_ssl_check_hostname=False)
    assert security_config(no_hostname) == {
        "security.protocol": "ssl",
        "ssl.endpoint.identification.algorithm": "none",
    }
    ctx = tls_context(no_hostname)
    assert ctx is not None and not ctx.check_hostname
    assert tls_context(Settings(kafka_security_protocol="SSL")).check_hostname  # type: ignore[union-attr]


def test_the_router_verifies_certificates_as_librdkafka_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """Python 3.13's default context adds VERIFY_X509_STRICT, which refuses a CA whose basicConstraints is
    not marked critical (tried: "Basic Constraints of CA cert not marked critical"); librdkafka accepts it,
    so the start-up check passed and the router could not connect. The default context as 3.13 makes it:"""
    import ssl

    default = ssl.create_default_context

    def as_in_3_13(*args: object, **kwargs: object) -> ssl.SSLContext:
        ctx = default(*args, **kwargs)  # type: ignore[arg-type]
        ctx.verify_flags |= ssl.VERIFY_X509_STRICT
        return ctx

    monkeypatch.setattr(ssl, "create_default_context", as_in_3_13)
    ctx = tls_context(Settings(kafka_security_protocol="SSL"))
    assert ctx is not None and ctx.verify_mode == ssl.CERT_REQUIRED
    assert not ctx.verify_flags & ssl.VERIFY_X509_STRICT


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"kafka_security_protocol": "SASL_SSL"}, "needs SENTPIPE_KAFKA_SASL_USERNAME"),
        ({"kafka_sasl_username": "u", "kafka_sasl_password": "p"}, "SECURITY_PROTOCOL is PLAINTEXT"),
        ({"kafka_ssl_ca_file": __file__}, "SSL_CA_FILE is set but"),
        ({"kafka_security_protocol": "SSL", "kafka_ssl_cert_file": __file__}, "go together"),
        ({"kafka_security_protocol": "SSL", "kafka_ssl_key_password": "pw"}, "KEY_PASSWORD is set but"),
        ({"kafka_ssl_key_password": "pw"}, "KEY_PASSWORD is set but"),
        ({"kafka_security_protocol": "TLS"}, "kafka_security_protocol"),
        ({"kafka_security_protocol": "SSL", "kafka_ssl_ca_file": "/nonexistent.pem"}, "kafka_ssl_ca_file"),
    ],
)
def test_half_a_security_configuration_is_refused_by_the_settings(
    values: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        Settings(**values)  # type: ignore[arg-type]


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.mark.parametrize(
    ("key", "password", "says"),
    [
        ("encrypted", None, "the key is encrypted; give its password in SENTPIPE_KAFKA_SSL_KEY_PASSWORD"),
        ("encrypted", "not-the-key-password", "SENTPIPE_KAFKA_SSL_KEY_PASSWORD does not decrypt it"),
        ("garbage", None, "it holds no PEM private key"),
        ("another", None, "it is not the key of SENTPIPE_KAFKA_SSL_CERT_FILE"),
    ],
)
def test_an_unusable_client_key_is_named_with_its_cause(
    tmp_path: Path, key: str, password: str | None, says: str
) -> None:
    """librdkafka says "ssl.key.location failed: ... PEM lib" for a key it cannot load, whatever the cause:
    the line names the setting and the file, and tells an encrypted key without its password from no key."""
    cert, plain = tmp_path / "client.pem", tmp_path / "client.key"
    _openssl(
        *("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=c"),
        *("-keyout", str(plain), "-out", str(cert)),
    )
    given = tmp_path / f"{key}.key"
    if key == "encrypted":
        _openssl(
            "pkey", "-in", str(plain), "-aes256", "-passout", "pass:the-key-password", "-out", str(given)
        )
    elif key == "garbage":
        given.write_text("not a key\n")
    else:
        _openssl("genrsa", "-out", str(given), "2048")
    s = Settings(
        kafka_security_protocol="SSL",
        kafka_ssl_cert_file=cert,
        kafka_ssl_key_file=given,
        kafka_ssl_key_password=password,  # type: ignore[arg-type]
    )
    with pytest.raises(BrokerRefused) as refused:
        check_connection(s, 1.0)
    line = str(refused.value)
    assert f"invalid TLS/SASL settings: SENTPIPE_KAFKA_SSL_KEY_FILE {given}: not usable (" in line, line
    assert line.endswith(says), line
    assert "ssl.key.location" not in line and "key-password" not in line, line


def test_refusal_tells_a_refusing_broker_from_an_absent_one() -> None:
    from confluent_kafka import KafkaError

    assert (
        refusal(
            "SASL_SSL",
            KafkaError._AUTHENTICATION,
            "sasl_ssl://h:1/bootstrap: SASL authentication error: x (after 3ms in state AUTH_REQ)",
        )
        == "SASL authentication error: x"
    )
    # SASL against a plaintext listener: librdkafka lists the broker's mechanisms, and there are none.
    assert refusal(
        "sasl_plaintext",
        KafkaError._AUTHENTICATION,
        "sasl_plaintext://h:1/bootstrap: SASL SCRAM-SHA-512 mechanism handshake failed: Broker: Unsupported"
        " SASL mechanism: broker's supported mechanisms: (after 1ms in state AUTH_HANDSHAKE)",
    ) == (
        "SASL SCRAM-SHA-512 mechanism handshake failed: Broker: Unsupported SASL mechanism: broker's"
        " supported mechanisms: none (the listener takes no SASL; is"
        " SENTPIPE_KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT right for it?)"
    )
    assert (
        refusal(
            "PLAINTEXT",
            KafkaError._TRANSPORT,
            "h:1/bootstrap: Connect to ipv4#h:1 failed: Connection refused",
        )
        is None
    )
    assert (
        refusal(
            "PLAINTEXT",
            None,
            "h:1/bootstrap: Disconnected: connection closed by peer: receive 0 after POLLIN"
            " (after 2ms in state APIVERSION_QUERY)",
        )
        is not None
    )
    assert (
        refusal(
            "SSL",
            None,
            "h:1/bootstrap: Disconnected: connection closed by peer (after 2ms in state APIVERSION_QUERY)",
        )
        is None
    )
