"""The ground every feature stands on: the real broker, the real database, the admin commands."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    ResourceType,
)
from pydantic import SecretStr

from sentpipe.kafka import topic_configs
from sentpipe.processors import topics as topics_module
from sentpipe.processors.migrate import migrate
from sentpipe.processors.topics import ensure_topics
from sentpipe.schemas.topics import ConfigChange, Topics, config_changes, topic_specs
from sentpipe.settings import Settings


def test_produce_and_consume_on_the_real_broker(settings: Settings, topics) -> None:
    p = Producer({"bootstrap.servers": settings.kafka_bootstrap, "enable.idempotence": True})
    p.produce(topics.raw, key=b"k1", value=b"hello")
    assert p.flush(10) == 0
    c = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": "t-foundation",
            "auto.offset.reset": "earliest",
        }
    )
    c.subscribe([topics.raw])
    got = None
    deadline = time.monotonic() + 30
    while got is None and time.monotonic() < deadline:
        msg = c.poll(0.5)
        if msg is not None and msg.error() is None:
            got = (msg.key(), msg.value())
    c.close()
    assert got == (b"k1", b"hello")


def test_topics_ensure_is_idempotent(settings: Settings) -> None:
    second = ensure_topics(settings)
    assert [t.created for t in second] == [False] * 7
    assert {t.partitions for t in second if t.name.endswith("events.raw")} == {4}


def test_the_redrive_ledger_outlives_the_dead_letters_it_names(settings: Settings) -> None:
    """Kafka deletes a segment once its newest record is past retention: a dead letter in a segment that
    went on filling for days outlived its 30 days, while its ledger entry, kept exactly as long, did not,
    and the next redrive sent that recovered event again. The DLQ rolls daily; the ledger keeps longer."""
    topics = Topics(settings.topic_prefix)
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    wanted = [ConfigResource(ResourceType.TOPIC, t) for t in (topics.dlq, topics.dlq_redriven)]
    dlq, ledger = (
        {k: int(v.value) for k, v in fut.result(30).items() if k in ("retention.ms", "segment.ms")}
        for fut in admin.describe_configs(wanted).values()
    )
    day = 24 * 3600 * 1000
    assert dlq == {"retention.ms": settings.dlq_retention_ms, "segment.ms": day}
    assert ledger["retention.ms"] >= dlq["retention.ms"] + dlq["segment.ms"] + day
    forever = topic_specs(
        topics,
        raw_partitions=1,
        routed_partitions=1,
        replication_factor=1,
        raw_retention_ms=-1,
        dlq_retention_ms=-1,
        max_body_bytes=1024,
    )
    assert {s.config["retention.ms"] for s in forever if s.name in (topics.dlq, topics.dlq_redriven)} == {
        "-1"
    }


def test_config_changes_follow_retentions_both_ways_and_only_raise_the_record_limit() -> None:
    wanted = {"retention.ms": "7200000", "segment.ms": "86400000", "max.message.bytes": "2000000"}
    wanted |= {"min.insync.replicas": "2"}
    assert config_changes(wanted, dict(wanted)) == []
    have = {"retention.ms": "-1", "segment.ms": "604800000", "max.message.bytes": "1000000"}
    have |= {"min.insync.replicas": "1"}
    assert config_changes(wanted, have) == [
        ConfigChange("retention.ms", "-1", "7200000"),
        ConfigChange("segment.ms", "604800000", "86400000"),
        ConfigChange("max.message.bytes", "1000000", "2000000"),
    ]
    larger = {**wanted, "retention.ms": "9999999999", "max.message.bytes": "50000000"}
    assert config_changes(wanted, larger) == [ConfigChange("retention.ms", "9999999999", "7200000")]
    assert config_changes({"retention.ms": "-1"}, {}) == []  # not described: nothing to compare
    assert str(ConfigChange("retention.ms", "-1", "7200000")) == "retention.ms -1 -> 7200000"


def test_topics_ensure_brings_existing_topics_to_the_retentions_the_settings_ask_for(
    settings: Settings,
) -> None:
    """A retention changed after the topics were made took no effect: `topics ensure` only created topics,
    so the replay window and the DLQ's keep stayed what they were at the first deploy."""
    first = settings.model_copy(update={"topic_prefix": f"r{uuid.uuid4().hex[:8]}."})
    assert all(t.created for t in ensure_topics(first))
    topics = Topics(first.topic_prefix)
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    # An operator's own choices, which ensure keeps: min.insync.replicas, a larger record limit.
    by_hand = [
        ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET)
        for k, v in (("min.insync.replicas", "1"), ("max.message.bytes", "9000000"))
    ]
    resource = ConfigResource(ResourceType.TOPIC, topics.raw, incremental_configs=by_hand)
    for fut in admin.incremental_alter_configs([resource]).values():
        fut.result(30)

    hour = 3600 * 1000
    later = first.model_copy(update={"raw_retention_ms": 2 * hour, "dlq_retention_ms": 3 * hour})
    states = {t.name: t for t in ensure_topics(later)}
    assert not any(t.created for t in states.values())
    before_raw, before_dlq = str(first.raw_retention_ms), str(first.dlq_retention_ms)
    for name in (topics.raw, *topics.routed, topics.unrouted):
        assert states[name].changes == (ConfigChange("retention.ms", before_raw, str(2 * hour)),), name
    assert states[topics.dlq].changes == (ConfigChange("retention.ms", before_dlq, str(3 * hour)),)
    ledger_ms = 3 * hour + 2 * 24 * hour
    assert [c.key for c in states[topics.dlq_redriven].changes] == ["retention.ms"]
    assert states[topics.dlq_redriven].changes[0].after == str(ledger_ms)

    now = topic_configs(admin, settings.kafka_bootstrap, [s for s in states])
    assert {n: c and c["retention.ms"] for n, c in now.items()} == {
        **{n: str(2 * hour) for n in (topics.raw, *topics.routed, topics.unrouted)},
        topics.dlq: str(3 * hour),
        topics.dlq_redriven: str(ledger_ms),
    }
    raw = now[topics.raw] or {}
    assert (raw["min.insync.replicas"], raw["max.message.bytes"]) == ("1", "9000000")
    assert all(t.changes == () and not t.created for t in ensure_topics(later))  # idempotent


def test_topics_made_meanwhile_are_reported_existing_and_brought_to_the_settings(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Listed as missing (made by a concurrent run since, or listed with an error), a topic's creation
    failed with TOPIC_ALREADY_EXISTS, which was taken as created: "created", its retention left as it was."""
    first = settings.model_copy(update={"topic_prefix": f"m{uuid.uuid4().hex[:8]}."})
    ensure_topics(first)
    hour = 3600 * 1000
    later = first.model_copy(update={"raw_retention_ms": 2 * hour})
    real, listed = topics_module.existing_partitions, []

    def raced(*args: Any, **kwargs: Any) -> dict[str, int]:
        listed.append(1)
        return {} if len(listed) == 1 else real(*args, **kwargs)  # the first list saw none of them

    monkeypatch.setattr(topics_module, "existing_partitions", raced)
    states = {t.name: t for t in ensure_topics(later)}
    raw = Topics(first.topic_prefix).raw
    assert not any(t.created for t in states.values())
    assert states[raw].partitions == first.raw_partitions
    assert states[raw].changes == (ConfigChange("retention.ms", str(first.raw_retention_ms), str(2 * hour)),)


def test_migrations_are_idempotent_and_tables_exist(db_url: str) -> None:
    assert all(not applied for _, applied in migrate(db_url))
    with psycopg.connect(db_url) as conn:
        conn.execute(
            "INSERT INTO message_status (tenant, message_id, status, status_rank, occurred_at, event_id)"
            " VALUES ('t', 'm', 'sent', 2, now(), 'e')"
        )
        assert conn.execute("SELECT status FROM message_status").fetchone() == ("sent",)


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, "-m", "sentpipe", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_topics_ensure_cli_twice_creates_nothing_the_second_time(settings: Settings) -> None:
    env = {
        "SENTPIPE_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "SENTPIPE_TOPIC_PREFIX": settings.topic_prefix + "cli.",
    }
    first = _cli("topics", "ensure", env=env)
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("created") == 7
    second = _cli("topics", "ensure", env=env)
    assert second.returncode == 0 and "created" not in second.stdout and second.stdout.count("exists") == 7
    third = _cli("topics", "ensure", env={**env, "SENTPIPE_DLQ_RETENTION_MS": "7200000"})
    assert third.returncode == 0, third.stderr
    assert third.stdout.count("updated") == 2 and third.stdout.count("exists") == 5, third.stdout
    assert third.stdout.count("retention.ms 30d -> 2h") == 1, third.stdout  # the DLQ
    assert third.stdout.count("retention.ms 32d -> 50h") == 1, third.stdout  # its ledger: 2h and two days


def test_topics_ensure_against_unreachable_broker_is_one_line_within_15s() -> None:
    start = time.monotonic()
    res = _cli("topics", "ensure", env={"SENTPIPE_KAFKA_BOOTSTRAP": "127.0.0.1:1"})
    assert time.monotonic() - start < 15
    assert res.returncode != 0
    assert res.stderr.strip().count("\n") == 0 and "127.0.0.1:1" in res.stderr
    assert "Traceback" not in res.stderr


def test_invalid_setting_is_a_one_line_error() -> None:
    res = _cli("topics", "ensure", env={"SENTPIPE_RAW_PARTITIONS": "zero"})
    assert res.returncode != 0 and "SENTPIPE_RAW_PARTITIONS" in res.stderr and "Traceback" not in res.stderr


def test_a_database_url_libpq_would_misread_is_refused_without_quoting_it() -> None:
    """An unencoded `%`, `#`, `@` or `/` in a password: libpq's own error echoed the password."""
    for url in (
        "postgresql://postgres:s3cr%zzetpw@127.0.0.1/sentpipe",
        "postgresql://postgres:my#s3cretpw@127.0.0.1/sentpipe",
        "postgresql://postgres:my/s3cretpw@127.0.0.1/sentpipe",
        "postgres://postgres:my@s3cretpw@127.0.0.1/sentpipe",
    ):
        res = _cli("db", "migrate", env={"SENTPIPE_DATABASE_URL": url})
        assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
        assert res.stderr.startswith("error: invalid setting SENTPIPE_DATABASE_URL: "), res.stderr
        assert "s3cr" not in res.stderr + res.stdout and res.stderr.count("\n") == 1, res.stderr
    encoded = "postgresql://u:p%40ss%23w@127.0.0.1:5432/db?sslmode=disable"
    assert Settings(database_url=SecretStr(encoded)).database_url.get_secret_value() == encoded


# Each value passed the old checks and failed later: an OverflowError or librdkafka's own error at start
# (inf, 1e12), a busy sweep loop (0.001), a broker that refused the topic (-5), every event of the tenant
# dead-lettered by the router (a name it cannot key), a topic name Kafka refuses (300 characters).
ABSURD_SETTINGS = [
    # What Kubernetes puts there for a Service named sentpipe-console when the pod keeps service links.
    ("SENTPIPE_CONSOLE_PORT", "tcp://10.96.0.13:8090", "enableServiceLinks: false"),
    ("SENTPIPE_PRODUCE_TIMEOUT_S", "inf", "finite"),
    ("SENTPIPE_TOPIC_PREFIX", "", "is empty"),
    ("SENTPIPE_PRODUCE_TIMEOUT_S", "1e12", "less than or equal"),
    ("SENTPIPE_BODY_TIMEOUT_S", "nan", "finite"),
    ("SENTPIPE_KAFKA_CONNECT_TIMEOUT_S", "inf", "finite"),
    ("SENTPIPE_RETRY_MAX_S", "1e300", "less than or equal"),
    ("SENTPIPE_STALL_AFTER_S", "inf", "finite"),
    ("SENTPIPE_DEDUP_SWEEP_INTERVAL_S", "0.001", "greater than or equal to 0.1"),
    ("SENTPIPE_PRODUCER_LINGER_MS", "99999999999", "less than or equal"),
    ("SENTPIPE_PRODUCER_MAX_IN_FLIGHT", "99999999999", "less than or equal"),
    ("SENTPIPE_MAX_BODY_BYTES", "99999999999999", "less than or equal"),
    ("SENTPIPE_SIGNATURE_TOLERANCE_S", "99999999999999999999", "less than or equal"),
    ("SENTPIPE_RAW_RETENTION_MS", "-5", "greater than or equal to -1"),
    # Topics created with retention.ms=0: acknowledged events deleted before any worker read them.
    ("SENTPIPE_RAW_RETENTION_MS", "0", "must be -1 (forever) or at least 3600000 (one hour)"),
    ("SENTPIPE_DLQ_RETENTION_MS", "1", "must be -1 (forever) or at least 3600000 (one hour)"),
    ("SENTPIPE_RAW_PARTITIONS", "1000000000", "less than or equal"),
    ("SENTPIPE_BATCH_SIZE", "1000000000000", "less than or equal"),
    ("SENTPIPE_DEFAULT_TENANT", "", "the tenant name is empty"),
    ("SENTPIPE_DEFAULT_TENANT", "a/b", "holds '/'"),
    ("SENTPIPE_DEFAULT_TENANT", "t" * 257, "longer than 256"),
    # The metrics' label for path tenants without a secret: the default feed counted among them never paged
    # (SentpipeSignatureFailuresAll leaves that label out).
    ("SENTPIPE_DEFAULT_TENANT", "unknown", "the tenant name is reserved"),
    ("SENTPIPE_KAFKA_BOOTSTRAP", " ", "names no broker"),
    # Reported as a broker that did not answer, after the whole connect timeout.
    ("SENTPIPE_KAFKA_BOOTSTRAP", "127.0.0.1:9092,127.0.0.1:99999", "port 99999 of '127.0.0.1:99999' is not"),
    ("SENTPIPE_KAFKA_BOOTSTRAP", "SSL://[::1]:0", "port 0 of"),
    ("SENTPIPE_KAFKA_BOOTSTRAP", "h:" + "9" * 5000, "port 999999999999 of 'h:9999"),  # past int()'s digits
    # Credentials in the address: every "did not answer" error printed the password (never quoted now).
    ("SENTPIPE_KAFKA_BOOTSTRAP", "user:s3cret@127.0.0.1:1", "holds '@': a broker address carries no user"),
    ("SENTPIPE_KAFKA_BOOTSTRAP", "SASL_SSL://u:s3cret@127.0.0.1:99999", "holds '@'"),
    ("SENTPIPE_TOPIC_PREFIX", "x" * 231, "longer than 230"),
    ("SENTPIPE_APP_ID", "a:b", "letters, digits"),
    # A pydantic-settings JSON error naming no setting; the item's index taken for part of the name; a
    # ModuleNotFoundError from Faust naming no setting.
    ("SENTPIPE_HANDLER_MODULES", "[oops", "is not a JSON list"),
    ("SENTPIPE_HANDLER_MODULES", "[1, 2]", "item 0: Input should be a valid string"),
    ("SENTPIPE_HANDLER_MODULES", "myapp.handlers, my app", "'my app' is not a module name"),
    ("SENTPIPE_TABLE_STORE", "bogus://", "must be memory:// or rocksdb://"),
    # A line break to str.splitlines: a metrics page labelled with it did not parse once merged.
    ("SENTPIPE_DEFAULT_TENANT", "a\u2028b", "holds a character that is not printable"),
    # An empty path was Path("."): a secrets file that "is a directory", a spool in the current directory.
    # An empty database URL was libpq's defaults (the local socket, PG* variables: another database).
    ("SENTPIPE_DATABASE_URL", "", "is empty"),
    ("SENTPIPE_SECRETS_FILE", "", "is empty"),
    ("SENTPIPE_SPOOL_DIR", " ", "is empty"),
    ("SENTPIPE_DATA_DIR", "", "is empty"),
    ("SENTPIPE_KAFKA_SSL_CA_FILE", "", "is empty"),
    # Bytes that are not UTF-8 (lone surrogates in Python): a SystemError from librdkafka's constructor, a
    # SASL user name "must be set", a token no browser can send.
    ("SENTPIPE_KAFKA_BOOTSTRAP", "127.0.0.1:9092\udcff", "is not valid UTF-8"),
    ("SENTPIPE_KAFKA_SASL_USERNAME", "user\udcff", "is not valid UTF-8"),
    ("SENTPIPE_CONSOLE_TOKEN", "token\udcff", "is not valid UTF-8"),
    # pydantic's FilePath let the OSError out, naming no setting.
    ("SENTPIPE_KAFKA_SSL_CA_FILE", "x" * 3000, "cannot be read: File name too long"),
]


def test_handler_modules_are_a_json_list_or_comma_separated_names() -> None:
    for given in ('["myapp.handlers", "b"]', "myapp.handlers,b", " myapp.handlers , b ,"):
        assert Settings(_env_file=None, handler_modules=given).handler_modules == ["myapp.handlers", "b"]
    assert Settings(handler_modules="").handler_modules == []


@pytest.mark.parametrize(("name", "value", "message"), ABSURD_SETTINGS)
def test_absurd_settings_are_refused_in_one_line_naming_the_setting(
    name: str, value: str, message: str
) -> None:
    res = _cli(
        "topics", "ensure", "--timeout", "1", env={name: value, "SENTPIPE_KAFKA_BOOTSTRAP": "127.0.0.1:1"}
    )
    if name == "SENTPIPE_KAFKA_BOOTSTRAP":
        res = _cli("topics", "ensure", "--timeout", "1", env={name: value})
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.startswith(f"error: invalid setting {name}: "), res.stderr
    assert message in res.stderr and res.stderr.count("\n") == 1, res.stderr
    assert "Value error" not in res.stderr and "s3cret" not in res.stderr


@pytest.mark.parametrize("command", ["status", "drain"])
def test_a_spool_dir_that_is_a_file_is_refused_not_reported_empty(command: str, tmp_path: Path) -> None:
    path = tmp_path / "spool"
    path.write_bytes(b"not a directory")
    res = _cli(
        "spool", command, env={"SENTPIPE_SPOOL_DIR": str(path), "SENTPIPE_KAFKA_BOOTSTRAP": "127.0.0.1:1"}
    )
    assert res.returncode == 1 and "Traceback" not in res.stderr, (res.stdout, res.stderr)
    assert res.stderr == f"error: SENTPIPE_SPOOL_DIR {path} is not a directory\n", res.stderr


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"t": 5}', "tenant 't': give a secret (a string) or a list of them"),
        (b'{"t": null}', "tenant 't': give a secret"),
        (b'{"t": [{"a": 1}]}', "tenant 't': give a secret"),  # was taken as the secret "{'a': 1}"
        (b'{"": "whsec_c2VudHBpcGU="}', "tenant '' is empty"),
        (b'{"a/b": "whsec_c2VudHBpcGU="}', "tenant 'a/b' holds '/'"),
        (b'{"unknown": "whsec_c2VudHBpcGU="}', "tenant 'unknown' is reserved"),
        (b'{"a\\u0000b": "whsec_c2VudHBpcGU="}', "holds a control character"),
        (b'{"a\\u2028b": "whsec_c2VudHBpcGU="}', "holds a character that is not printable"),
        (b'{"a\\u0085b": "whsec_c2VudHBpcGU="}', "holds a character that is not printable"),
        (b'["whsec_c2VudHBpcGU="]', "must be a JSON object"),
        (b'\xff\xfe{"t": "whsec_c2VudHBpcGU="}', "is not UTF-8 text (byte 0 is not)"),  # a UTF-16 file
        (b'{"t": "whsec_c2VudHBpcGU=\xff"}', "is not UTF-8 text (byte 25 is not)"),
        (b'{"t": "whsec_c2VudHBpcGU=", ', "is not JSON (unexpected end of data"),
    ],
)
def test_a_secrets_file_of_the_wrong_shape_is_refused_naming_the_tenant(
    content: bytes, message: str, tmp_path: Path
) -> None:
    path = tmp_path / "secrets.json"
    path.write_bytes(content)
    res = _cli("ingress", env={"SENTPIPE_SECRETS_FILE": str(path), "SENTPIPE_KAFKA_BOOTSTRAP": "127.0.0.1:1"})
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.startswith(f"error: SENTPIPE_SECRETS_FILE {path}: "), res.stderr
    assert message in res.stderr and res.stderr.count("\n") == 1, res.stderr
    assert "c2VudHBpcGU" not in res.stderr  # never a secret


def test_a_secrets_file_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    # Some editors start UTF-8 files with one; it was refused as an "unexpected character" at column 1.
    path = tmp_path / "secrets.json"
    path.write_bytes(b'\xef\xbb\xbf{"acme": "whsec_c2VudHBpcGU="}')
    assert Settings(_env_file=None, secrets_file=path).tenant_secrets()["acme"] == ["whsec_c2VudHBpcGU="]


def test_a_port_in_use_is_one_line_naming_the_setting() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = _cli(
            "ingress",
            env={
                "SENTPIPE_INGRESS_HOST": "127.0.0.1",
                "SENTPIPE_INGRESS_PORT": str(port),
                "SENTPIPE_INGRESS_WORKERS": "1",
                "SENTPIPE_KAFKA_BOOTSTRAP": "127.0.0.1:1",
            },
        )
    # Before it: the log's lines about the broker at 127.0.0.1:1, which nobody answers.
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"error: cannot listen on http://127.0.0.1:{port} (SENTPIPE_INGRESS_HOST, SENTPIPE_INGRESS_PORT): "
    ), res.stderr
    assert last.endswith("address already in use"), res.stderr


def test_a_host_no_url_can_hold_is_one_line_naming_the_setting() -> None:
    """The failed bind was named with yarl's URL of the address, which refuses a host with a space: the line
    was "ValueError: Host 'my host' cannot contain ' '", naming neither the setting nor the failure."""
    res = _cli(
        "ingress",
        env={
            "SENTPIPE_INGRESS_HOST": "my host",
            "SENTPIPE_INGRESS_PORT": "0",
            "SENTPIPE_INGRESS_METRICS_PORT": "0",
            "SENTPIPE_INGRESS_WORKERS": "1",
            "SENTPIPE_KAFKA_BOOTSTRAP": "127.0.0.1:1",
        },
    )
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "error: cannot listen on my host:0 (SENTPIPE_INGRESS_HOST, SENTPIPE_INGRESS_PORT): "
    )
    assert "ValueError" not in res.stderr
