"""The one place settings are read: environment variables with the SENTPIPE_ prefix."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    BeforeValidator,
    Field,
    FilePath,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from sentpipe.schemas.events import MAX_ID_LENGTH, EventIdSource
from sentpipe.schemas.topics import RECORD_OVERHEAD_BYTES


def _not_a_service_link(value: object) -> object:
    # Kubernetes gives every pod <SERVICE>_PORT=tcp://<ip>:<port> for each Service in its namespace: a
    # Service named sentpipe-ingress or sentpipe-console sets SENTPIPE_INGRESS_PORT / SENTPIPE_CONSOLE_PORT.
    if isinstance(value, str) and value.startswith(("tcp://", "udp://")):
        raise PydanticCustomError(
            "service_link",
            "is a Kubernetes service link (a Service named like the variable), not a port: set "
            "enableServiceLinks: false in the pod spec, as the Helm chart does",
        )
    return value


# A TCP port; 0 lets the system pick one. (uvloop would take 99999 as 34463 and say 99999.)
Port = Annotated[int, BeforeValidator(_not_a_service_link), Field(ge=0, le=65535)]

DAY_S = 86_400
_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
# Shorter topic retention deletes acknowledged events before an ordinary outage is over.
MIN_RETENTION_MS = 3_600_000


def _seconds(default: float, le: float = DAY_S, ge: float | None = None) -> Any:
    """A duration: finite, above zero (or `ge`), at most `le`. Without the ceiling `inf` passed `gt=0` and
    surfaced later as an OverflowError from librdkafka's or the event loop's integer milliseconds, and 1e12 s
    wrapped librdkafka's 32-bit value into a negative one."""
    if ge is not None:
        return Field(default, ge=ge, le=le, allow_inf_nan=False)
    return Field(default, gt=0, le=le, allow_inf_nan=False)


# Local development only: `make run` and the sender use it when no secret is configured, and the ingress
# logs a warning whenever it is in use. It is not a secret and must never guard real traffic.
DEVELOPMENT_SECRET = "whsec_c2VudHBpcGUtbG9jYWwtZGV2ZWxvcG1lbnQtb25seQ=="

WorkerRole = Literal["all", "route", "project"]
KafkaSecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
# OAUTHBEARER is not offered: aiokafka (the router's client) has no OIDC client-credentials flow of its own.
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]

# Every usual spelling of a level (any case) -> the name Python's logging gives it.
LOG_LEVEL_NAMES: dict[str, LogLevel] = {
    "DEBUG": "DEBUG",
    "INFO": "INFO",
    "WARNING": "WARNING",
    "WARN": "WARNING",
    "ERROR": "ERROR",
    "CRITICAL": "CRITICAL",
    "CRIT": "CRITICAL",
    "FATAL": "CRITICAL",
}


_HEX = frozenset("0123456789abcdefABCDEF")
_TOPIC_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
# Kafka refuses topic names over 249 characters; the longest name made from the prefix adds this suffix.
MAX_TOPIC_PREFIX = 249 - len("events.dlq.redriven")
# The app id names the router's group and its changelog topic, "<app id>-dedup-changelog".
MAX_APP_ID = 249 - len("-dedup-changelog")


# The ingress's metrics label for every request whose path names a tenant with no secret (and for requests
# the HTTP parser refused before any path): made-up paths stay one series. SentpipeSignatureFailuresAll leaves
# it out (every such request fails its signature), so a configured tenant of this name, counted among them,
# could never page when its own secret stops matching.
UNKNOWN_TENANT = "unknown"


def tenant_name_problem(name: str) -> str | None:
    """Why a tenant name cannot be served, or None. The router refuses events of a tenant it cannot key
    (events.required_id: 1-256 characters, no NUL), so such a name would dead-letter every one of its
    events; and a URL path segment cannot carry '/'."""
    if not name:
        return "is empty"
    if name == UNKNOWN_TENANT:
        return f"is reserved: the metrics count requests for tenants without a secret as {UNKNOWN_TENANT!r}"
    if len(name) > MAX_ID_LENGTH:
        return f"is longer than {MAX_ID_LENGTH} characters"
    if any(c < " " or c == "\x7f" for c in name):
        return "holds a control character"
    if not name.isprintable():
        # Line and paragraph separators (U+0085, U+2028, U+2029: lines to str.splitlines and to many log
        # readers), C1 controls, format and unassigned characters: a name no one can read or type back.
        return "holds a character that is not printable (a C1 control, a line or paragraph separator)"
    if "/" in name:
        return "holds '/', which no URL path segment (/webhooks/sent/<tenant>) can carry"
    return None


# How every sentpipe connection to PostgreSQL encodes text, whatever the session's default (the URL's
# options, PGCLIENTENCODING, ALTER ROLE ... SET): events carry text of any script. In LATIN1, an emoji
# failed its row in the client, and a payload's UTF-8 bytes (orjson's) were read as LATIN1 and stored
# garbled. Given as a startup parameter, so RESET ALL keeps it.
DATABASE_CLIENT_ENCODING = "UTF8"


def database_url_problem(url: str) -> str | None:
    """Why libpq would misread this URL, or None. The message never quotes the URL: a password typed
    unencoded is what makes it wrong, and libpq's own error would echo it (`invalid percent-encoded
    token: "s3cr%zz"`, or the part after a `#` as the host name)."""
    if not url.strip():
        # libpq reads an empty string as "every default": PG* variables, the local socket, another database.
        return "is empty: give a postgresql:// URL"
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("postgresql", "postgres"):
        return _libpq_parse_problem(url)
    if "#" in url:
        return "a URL cannot hold '#'; percent-encode it in the password as %23"
    for i, c in enumerate(url):
        if c == "%" and not (i + 2 < len(url) and url[i + 1] in _HEX and url[i + 2] in _HEX):
            return "'%' must start a percent-encoding (%25 for '%' itself, in the password too)"
    netloc = rest.split("/", 1)[0].split("?", 1)[0]
    if netloc.count("@") > 1 or ("@" not in netloc and "@" in rest):
        return "percent-encode '@', '/' and '?' in the user name and password (%40, %2F, %3F)"
    return _libpq_parse_problem(url)


_QUOTED = re.compile(r'"([^"]*)"')


def _libpq_parse_problem(conninfo: str) -> str | None:
    """libpq's own parse (no connection made), its message with every quoted part longer than one
    character cut: libpq quotes a malformed URI whole (an unclosed '[') and the words of a key=value string
    (a password with an unquoted space), which every client, the worker's pool included, would then log."""
    # Imported here: only a process given a database URL pays for psycopg (not a deployed ingress).
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    try:
        conninfo_to_dict(conninfo)
    except psycopg.Error as exc:
        message = (str(exc).strip() or "unreadable").splitlines()[0]
        return "libpq cannot read it: " + _QUOTED.sub(
            lambda found: found[0] if len(found[1]) <= 1 else '"..."', message
        )
    return None


# Files and directories: a name the file system holds, which need not be UTF-8 (the other settings are text).
PATH_SETTINGS = (
    "kafka_ssl_ca_file",
    "kafka_ssl_cert_file",
    "kafka_ssl_key_file",
    "secrets_file",
    "spool_dir",
    "data_dir",
)


def default_app_id(topic_prefix: str) -> str:
    """`sentpipe` for the default prefix, `sentpipe-<prefix>` for any other."""
    name = topic_prefix.strip(".")
    return "sentpipe" if topic_prefix == "sent." else f"sentpipe-{name or 'default'}"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SENTPIPE_", frozen=True, extra="ignore")

    kafka_bootstrap: str = "127.0.0.1:9092"
    # How every Kafka client (librdkafka and the router's aiokafka) connects: one set, mapped in
    # sentpipe/kafka.py and processors/worker.py. PLAINTEXT is the local default; production clusters
    # want SSL or SASL_SSL.
    kafka_security_protocol: KafkaSecurityProtocol = "PLAINTEXT"
    kafka_sasl_mechanism: SaslMechanism = "SCRAM-SHA-512"
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    # TLS: the CA that signed the brokers' certificates (unset: the system's CAs), and for mTLS a client
    # certificate and its key (PEM). Hostname verification stays on unless turned off here.
    kafka_ssl_ca_file: FilePath | None = None
    kafka_ssl_cert_file: FilePath | None = None
    kafka_ssl_key_file: FilePath | None = None
    kafka_ssl_key_password: SecretStr | None = None
    kafka_ssl_check_hostname: bool = True
    # How long the worker waits at start for the broker to answer (the ingress at most 5 s, then starts
    # anyway and answers 503 until Kafka does; CLI commands: --timeout). A refusing broker fails at once.
    kafka_connect_timeout_s: float = _seconds(10.0, le=3600)
    database_url: SecretStr = SecretStr("postgresql://postgres@127.0.0.1:5432/sentpipe")
    webhook_secret: SecretStr = SecretStr(DEVELOPMENT_SECRET)
    secrets_file: Path | None = None
    default_tenant: str = "default"
    topic_prefix: str = "sent."
    event_id_source: EventIdSource = "auto"

    # topics
    # Ceilings are what the clients and the broker take (Kafka's partition counts and replication factor
    # are 32-bit and 16-bit; -1 retention is "forever"), so a typo fails here in one line, not in the broker.
    raw_partitions: int = Field(12, ge=1, le=10_000)
    routed_partitions: int = Field(12, ge=1, le=10_000)
    replication_factor: int = Field(1, ge=1, le=32_767)
    raw_retention_ms: int = Field(14 * DAY_S * 1000, ge=-1, le=2**63 - 1)
    dlq_retention_ms: int = Field(30 * DAY_S * 1000, ge=-1, le=2**63 - 1)

    # ingress
    ingress_host: str = "0.0.0.0"
    ingress_port: Port = 8080
    ingress_metrics_port: Port = 9100
    signature_tolerance_s: int = Field(300, ge=1, le=DAY_S)
    # The raw topic's max.message.bytes is sized from it. 64 MiB is far past any webhook, and a produce
    # request must stay under the broker's socket.request.max.bytes (100 MiB by default): at 100 MiB the
    # broker dropped the connection, and each such body got 503 until the produce timeout, never its 413.
    max_body_bytes: int = Field(1024 * 1024, ge=1024, le=64 * 1024 * 1024)
    # The whole body must arrive within this time of the request's headers, or the answer is 408; so must the
    # headers, from their first byte (a client that trickles them holds a connection).
    body_timeout_s: float = _seconds(10.0, le=3600)
    # A connection with no request for this long is closed. Keep it above the idle timeout of any load
    # balancer in front (AWS ALB 60 s, Google's 600 s): a balancer reusing a connection the ingress has
    # just closed answers 502, which Sent counts as a failure.
    ingress_keepalive_s: float = _seconds(75.0)
    # Requests handled at once by one ingress process; beyond it, 503 at once with Retry-After.
    ingress_max_in_flight: int = Field(1024, ge=1, le=1_000_000)
    # Processes serving the one webhook port (SO_REUSEPORT), each with its own producer; 0: one per CPU the
    # process may use (affinity and cgroup quota), see ingress/server.py. Capped: an absurd value would start
    # that many processes, each with its own producer.
    ingress_workers: int = Field(0, ge=0, le=256)
    produce_timeout_s: float = _seconds(5.0, le=3600)
    # librdkafka's own ranges (queue.buffering.max.messages, linger.ms).
    producer_max_in_flight: int = Field(20000, ge=1, le=10_000_000)
    producer_linger_ms: int = Field(1, ge=0, le=900_000)
    producer_compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = "lz4"
    # The durable local spool: what the broker cannot take right now is fsynced here and answered 200, then
    # drained to Kafka when it is back. Off unless asked for: until drained, those events live on one disk.
    spool: bool = False
    spool_dir: Path = Path(".local/spool")
    spool_max_bytes: int = Field(1024**3, ge=1024 * 1024, le=1024**5)
    spool_segment_bytes: int = Field(64 * 1024**2, ge=64 * 1024, le=1024**3)
    log_json: bool = False
    log_level: LogLevel = "INFO"  # any standard spelling, normalized to the Python name

    # worker
    # The router's consumer group and changelog prefix. Derived from the topic prefix when unset, so two
    # prefixes never share a group or a dedup changelog (`sent.` keeps the historical `sentpipe`).
    app_id: str = "sentpipe"
    worker_role: WorkerRole = "all"
    worker_web_port: Port = 6066
    worker_metrics_port: Port = 9101
    worker_metrics_host: str = "0.0.0.0"
    table_store: str = "memory://"
    # Restore the dedup table (RocksDB files, or sentpipe's memory store) from the changelog with librdkafka
    # before Faust starts (seconds per million ids); off leaves it all to Faust's own recovery (minutes).
    table_fast_restore: bool = True
    # Faust's standby copies of other workers' dedup table partitions (its default, 1): a failover restores
    # from the standby instead of the whole changelog, at the cost of disk or memory (each router holds
    # about (1 + standbys) / routers of the table) and changelog reads. 0 with a single router (nowhere to
    # put it).
    table_standby_replicas: int = Field(1, ge=0, le=100)
    data_dir: Path = Path(".local/faust")
    # Sent's retries of one delivery end within about two minutes (1+2+...+64 s); a day covers those many
    # times over, and a day-long incident on either side, while 10 events/s stays under a million ids.
    dedup_window_s: int = Field(DAY_S, ge=1, le=3650 * DAY_S)
    # Each sweep walks the whole table: more often than ten times a second is a busy loop.
    dedup_sweep_interval_s: float = _seconds(60.0, ge=0.1)
    batch_size: int = Field(500, ge=1, le=100_000)
    # The router waits at most this long to fill a batch: at light load it is added to every event's
    # latency; under a backlog batches fill before it (measured in bench/, README "Performance").
    batch_within_s: float = _seconds(0.02, le=60)
    retry_initial_s: float = _seconds(0.2, le=3600)
    retry_max_s: float = _seconds(30.0, le=3600)
    # A JSON list or comma-separated names: `myapp.handlers` alone was a JSON parse error naming no setting.
    handler_modules: Annotated[list[str], NoDecode] = Field(default_factory=list)
    db_pool_size: int = Field(4, ge=1, le=1000)
    # One user handler call: past it the call is cancelled and its event dead-lettered (HandlerTimeout). Below
    # SENTPIPE_STALL_AFTER_S, so a handler that hangs is its event's failure, not a stall and a restart.
    handler_timeout_s: float = _seconds(30.0, le=3600)
    # A stage with records waiting whose position has not moved for this long fails its liveness probe.
    stall_after_s: float = _seconds(60.0)
    # How long the group waits for a worker that stopped heartbeating (killed, its node lost) before its
    # partitions move: the pause a crash costs. A stop leaves the group at once. Both stages' consumers;
    # the brokers' group.min/max.session.timeout.ms must allow it (Kafka's defaults: 6 s to 30 min).
    kafka_session_timeout_s: float = Field(45.0, ge=6.0, le=300.0, allow_inf_nan=False)
    # The dedup table's recovery after a rebalance pauses the router: not a stall for this long.
    recovery_stall_after_s: float = _seconds(600.0)

    # console (`sentpipe console`): live events, event trace, search, dead letters, replay in a browser
    console_host: str = "127.0.0.1"
    console_port: Port = 8090
    # Required whenever the console listens on anything but loopback; the browser signs in with it once.
    console_token: SecretStr | None = None
    # Where "Send a test event" posts (development secret only); default: this machine's ingress port.
    console_ingress_url: str | None = None
    # Prometheus endpoints the overview reads for duplicates dropped and spool state; default: the
    # ingress and worker metrics ports on this machine. An empty list turns scraping off.
    console_metrics_urls: list[str] | None = None

    @field_validator("log_level", mode="before")
    @classmethod
    def _standard_level_name(cls, v: object) -> str:
        name = LOG_LEVEL_NAMES.get(str(v).strip().upper())
        if name is None:
            raise ValueError(
                f"unknown log level {v!r}: use DEBUG, INFO, WARNING, ERROR or CRITICAL"
                " (any case; WARN, CRIT and FATAL work too)"
            )
        return name

    @field_validator("kafka_security_protocol", "kafka_sasl_mechanism", mode="before")
    @classmethod
    def _upper_case(cls, v: object) -> object:
        return v.strip().upper() if isinstance(v, str) else v

    @model_validator(mode="after")
    def _kafka_security_consistent(self) -> Settings:
        """Half a configuration is refused at start, naming the settings: a CA without TLS, SASL without a
        user, a certificate without its key."""
        proto = self.kafka_security_protocol
        sasl, tls = proto.startswith("SASL_"), proto.endswith("SSL")
        if sasl and (not self.kafka_sasl_username or self.kafka_sasl_password is None):
            raise ValueError(
                f"SENTPIPE_KAFKA_SECURITY_PROTOCOL={proto} needs SENTPIPE_KAFKA_SASL_USERNAME"
                " and SENTPIPE_KAFKA_SASL_PASSWORD"
            )
        if not sasl and (self.kafka_sasl_username or self.kafka_sasl_password is not None):
            raise ValueError(
                "SENTPIPE_KAFKA_SASL_USERNAME/_PASSWORD are set but SENTPIPE_KAFKA_SECURITY_PROTOCOL"
                f" is {proto}: use SASL_SSL (or SASL_PLAINTEXT)"
            )
        files = {
            "SENTPIPE_KAFKA_SSL_CA_FILE": self.kafka_ssl_ca_file,
            "SENTPIPE_KAFKA_SSL_CERT_FILE": self.kafka_ssl_cert_file,
            "SENTPIPE_KAFKA_SSL_KEY_FILE": self.kafka_ssl_key_file,
        }
        given = [name for name, value in files.items() if value is not None]
        if not tls and given:
            raise ValueError(
                f"{given[0]} is set but SENTPIPE_KAFKA_SECURITY_PROTOCOL is {proto}: use SSL or SASL_SSL"
            )
        if (self.kafka_ssl_cert_file is None) != (self.kafka_ssl_key_file is None):
            raise ValueError(
                "SENTPIPE_KAFKA_SSL_CERT_FILE and SENTPIPE_KAFKA_SSL_KEY_FILE go together (mTLS)"
            )
        if self.kafka_ssl_key_password is not None and self.kafka_ssl_key_file is None:
            # Else ignored by every client: an mTLS set-up with its file settings misspelt ran without one.
            raise ValueError(
                "SENTPIPE_KAFKA_SSL_KEY_PASSWORD is set but SENTPIPE_KAFKA_SSL_KEY_FILE is not: give the"
                " key (and SENTPIPE_KAFKA_SSL_CERT_FILE) for mTLS, or leave the password unset"
            )
        return self

    @model_validator(mode="after")
    def _spool_holds_a_body(self) -> Settings:
        """A spool smaller than one largest body and its record's framing refused that body with 503
        spool_full while the broker was away, however empty (Sent retried it until it gave up): refused at
        start."""
        need = self.max_body_bytes + RECORD_OVERHEAD_BYTES
        if self.spool and self.spool_max_bytes < need:
            raise ValueError(
                f"SENTPIPE_SPOOL_MAX_BYTES ({self.spool_max_bytes}) cannot hold one body of"
                f" SENTPIPE_MAX_BODY_BYTES ({self.max_body_bytes}) with its record's framing: give at least"
                f" {need}"
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _app_id_from_prefix(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("app_id"):
            data = {**data, "app_id": default_app_id(str(data.get("topic_prefix") or "sent."))}
        return data

    @field_validator(*PATH_SETTINGS, mode="before")
    @classmethod
    def _a_path_given(cls, v: object, info: ValidationInfo) -> object:
        # An empty value is Path("."), the current directory: a spool or table store written wherever the
        # command started, or a secrets file that "is a directory".
        if isinstance(v, str) and not v.strip():
            raise ValueError("is empty: give a path, or leave the variable unset")
        if isinstance(v, str) and info.field_name and info.field_name.startswith("kafka_ssl_"):
            try:  # pydantic's FilePath lets OSErrors other than "no such file" escape (a name too long)
                Path(v).is_file()
            except OSError as exc:
                raise ValueError(f"cannot be read: {exc.strerror}") from None
        return v

    @field_validator("database_url")
    @classmethod
    def _database_url_is_unambiguous(cls, v: SecretStr) -> SecretStr:
        problem = database_url_problem(v.get_secret_value())
        if problem is not None:
            # Not ValueError: pydantic's message would carry the input, and this input holds a password.
            raise PydanticCustomError("database_url", problem)
        return v

    @field_validator("topic_prefix", "app_id")
    @classmethod
    def _topic_safe(cls, v: str, info: ValidationInfo) -> str:
        if not v:  # an empty line in an env file, most likely: topics named events.raw (an empty app id is
            raise ValueError("is empty")  # the prefix's default: it never gets here)
        if not set(v) <= _TOPIC_CHARS:
            raise ValueError("may only contain letters, digits, '.', '_' and '-' (it names Kafka topics)")
        longest = MAX_TOPIC_PREFIX if info.field_name == "topic_prefix" else MAX_APP_ID
        if len(v) > longest:
            raise ValueError(f"is longer than {longest} characters (Kafka topic names end at 249)")
        return v

    @field_validator("handler_modules", mode="before")
    @classmethod
    def _module_list(cls, v: Any) -> Any:
        if not isinstance(v, str):
            return v
        if v.lstrip().startswith("["):
            try:
                return orjson.loads(v)
            except orjson.JSONDecodeError:
                raise ValueError(
                    "is not a JSON list: give '[\"myapp.handlers\"]' or myapp.handlers"
                ) from None
        return [name.strip() for name in v.split(",") if name.strip()]

    @field_validator("handler_modules")
    @classmethod
    def _importable_names(cls, v: list[str]) -> list[str]:
        for name in v:
            if not _MODULE_NAME.fullmatch(name):
                shown = name if len(name) <= 80 else name[:80] + "..."
                raise ValueError(
                    f"{shown!r} is not a module name (dotted Python identifiers, e.g. myapp.handlers)"
                )
        return v

    @field_validator("table_store")
    @classmethod
    def _known_store(cls, v: str) -> str:
        # Faust imports a store from its URL's scheme: a typo was a ModuleNotFoundError naming no setting.
        if v.split(":", 1)[0] not in ("memory", "rocksdb") or "://" not in v:
            raise ValueError("must be memory:// or rocksdb://")
        return v

    @field_validator("raw_retention_ms", "dlq_retention_ms")
    @classmethod
    def _retention_outlasts_an_outage(cls, v: int) -> int:
        # Kafka deletes records past retention whether or not anyone read them: a raw topic kept for a
        # minute loses acknowledged events in any outage of the workers or the database longer than that.
        if v != -1 and v < MIN_RETENTION_MS:
            raise ValueError(f"must be -1 (forever) or at least {MIN_RETENTION_MS} (one hour)")
        return v

    @field_validator("default_tenant")
    @classmethod
    def _servable_tenant(cls, v: str) -> str:
        problem = tenant_name_problem(v)
        if problem is not None:
            raise PydanticCustomError("tenant", "the tenant name {problem}", {"problem": problem})
        return v

    @field_validator("*", mode="before")
    @classmethod
    def _utf8_text(cls, v: object, info: ValidationInfo) -> object:
        # Bytes that are not UTF-8 come from the environment as lone surrogates, which no client can send:
        # a bootstrap address of them was a SystemError from librdkafka's constructor, a SASL user name
        # "must be set". The value is not quoted: it may be a secret.
        if isinstance(v, str) and info.field_name not in PATH_SETTINGS:
            try:
                v.encode()
            except UnicodeEncodeError:
                raise PydanticCustomError("utf8", "is not valid UTF-8") from None
        return v

    @field_validator("kafka_bootstrap")
    @classmethod
    def _some_broker(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("names no broker: give host:port[,host:port...]")
        if "@" in v:
            # No host name holds one: `user:password@host:port` is a URL's credentials, which librdkafka does
            # not read, and every "did not answer" error then printed the password. Not quoted here either.
            raise ValueError(
                "holds '@': a broker address carries no user name or password (give them in"
                " SENTPIPE_KAFKA_SASL_USERNAME and SENTPIPE_KAFKA_SASL_PASSWORD)"
            )
        for entry in v.split(","):
            # A port no socket can have was librdkafka's "did not answer within N s", a wait and a wrong lead.
            _, sep, port = entry.strip().rpartition(":")
            if sep and port.isascii() and port.isdigit() and (len(port) > 5 or not 0 < int(port) < 65536):
                raise ValueError(f"port {port[:12]} of {entry.strip()[:80]!r} is not between 1 and 65535")
        return v

    def tenant_secrets(self) -> dict[str, list[str]]:
        """Tenant -> accepted signing secrets (several during rotation). ValueError naming the tenant, never
        a secret, for a file that is not {"tenant": "secret" or ["secret", ...]} with servable names."""
        tenants = {self.default_tenant: [self.webhook_secret.get_secret_value()]}
        if self.secrets_file is None:
            return tenants
        raw = self.secrets_file.read_bytes()
        try:
            # An editor's byte order mark is taken; orjson refused it as an "unexpected character".
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            # orjson said "str is not valid UTF-8: surrogates not allowed" of a file that holds no str.
            raise ValueError(f"is not UTF-8 text (byte {exc.start} is not)") from None
        try:
            data = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"is not JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ValueError("must be a JSON object: tenant -> secret, or tenant -> list of secrets")
        for tenant, secrets in data.items():
            shown = repr(tenant if len(tenant) <= 40 else tenant[:40] + "...")
            problem = tenant_name_problem(tenant)
            if problem is not None:
                raise ValueError(f"tenant {shown} {problem}")
            listed = [secrets] if isinstance(secrets, str) else secrets
            # Anything else was made a string before: {"a": 1} became the secret "{'a': 1}".
            if not isinstance(listed, list) or not all(isinstance(x, str) for x in listed):
                raise ValueError(f"tenant {shown}: give a secret (a string) or a list of them")
            tenants[tenant] = listed
        return tenants

    def secret_source(self, tenant: str, secrets: list[str], shown: Callable[[str], str] = repr) -> str:
        """Where `tenant`'s `secrets` (from `tenant_secrets`) were set, for an error that names it: an
        unusable secret left its reader to guess between the environment and the file."""
        if tenant == self.default_tenant and secrets == [self.webhook_secret.get_secret_value()]:
            return "SENTPIPE_WEBHOOK_SECRET"
        return f"SENTPIPE_SECRETS_FILE, tenant {shown(tenant)}"

    @property
    def kafka_heartbeat_interval_s(self) -> float:
        """Kafka's own ratio (3 s for its 45 s default), and a third of shorter sessions: three heartbeats
        can go missing before the session ends."""
        return min(3.0, self.kafka_session_timeout_s / 3)

    @property
    def uses_development_secret(self) -> bool:
        """Whether the default tenant takes the built-in development secret: SENTPIPE_SECRETS_FILE can give
        it others (compared with SENTPIPE_WEBHOOK_SECRET alone, the console offered test events signed with
        a secret the ingress refused)."""
        try:
            return DEVELOPMENT_SECRET in self.tenant_secrets()[self.default_tenant]
        except (OSError, ValueError):  # the file is unreadable: every command that serves says so
            return self.webhook_secret.get_secret_value() == DEVELOPMENT_SECRET
