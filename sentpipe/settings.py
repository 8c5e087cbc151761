"""The one place settings are read: environment variables with the SENTPIPE_ prefix."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import orjson
from pydantic import Field, FilePath, SecretStr, field_validator, model_validator
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, SettingsConfigDict

from sentpipe.schemas.events import EventIdSource

# A TCP port; 0 lets the system pick one. (uvloop would take 99999 as 34463 and say 99999.)
Port = Annotated[int, Field(ge=0, le=65535)]

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


def database_url_problem(url: str) -> str | None:
    """Why libpq would misread this URL, or None. The message never quotes the URL: a password typed
    unencoded is what makes it wrong, and libpq's own error would echo it (`invalid percent-encoded
    token: "s3cr%zz"`, or the part after a `#` as the host name)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("postgresql", "postgres"):
        return None  # key=value connection strings: libpq's errors there name keys, not values
    if "#" in url:
        return "a URL cannot hold '#'; percent-encode it in the password as %23"
    for i, c in enumerate(url):
        if c == "%" and not (i + 2 < len(url) and url[i + 1] in _HEX and url[i + 2] in _HEX):
            return "'%' must start a percent-encoding (%25 for '%' itself, in the password too)"
    netloc = rest.split("/", 1)[0].split("?", 1)[0]
    if netloc.count("@") > 1 or ("@" not in netloc and "@" in rest):
        return "percent-encode '@', '/' and '?' in the user name and password (%40, %2F, %3F)"
    return None


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
    kafka_connect_timeout_s: float = Field(10.0, gt=0)
    database_url: SecretStr = SecretStr("postgresql://postgres@127.0.0.1:5432/sentpipe")
    webhook_secret: SecretStr = SecretStr(DEVELOPMENT_SECRET)
    secrets_file: Path | None = None
    default_tenant: str = "default"
    topic_prefix: str = "sent."
    event_id_source: EventIdSource = "auto"

    # topics
    raw_partitions: int = Field(12, ge=1)
    routed_partitions: int = Field(12, ge=1)
    replication_factor: int = Field(1, ge=1)
    raw_retention_ms: int = 14 * 24 * 3600 * 1000
    dlq_retention_ms: int = 30 * 24 * 3600 * 1000

    # ingress
    ingress_host: str = "0.0.0.0"
    ingress_port: Port = 8080
    ingress_metrics_port: Port = 9100
    signature_tolerance_s: int = Field(300, ge=1)
    max_body_bytes: int = Field(1024 * 1024, ge=1024)
    # The whole body must arrive within this time of the request's headers, or the answer is 408; so must the
    # headers, from their first byte (a client that trickles them holds a connection).
    body_timeout_s: float = Field(10.0, gt=0)
    # A connection with no request for this long is closed. Keep it above the idle timeout of any load
    # balancer in front (AWS ALB 60 s, Google's 600 s): a balancer reusing a connection the ingress has
    # just closed answers 502, which Sent counts as a failure.
    ingress_keepalive_s: float = Field(75.0, gt=0, le=86400)
    # Requests handled at once by one ingress process; beyond it, 503 at once with Retry-After.
    ingress_max_in_flight: int = Field(1024, ge=1)
    # Processes serving the one webhook port (SO_REUSEPORT), each with its own producer; 0: one per CPU the
    # process may use (affinity and cgroup quota), see ingress/server.py. Capped: an absurd value would start
    # that many processes, each with its own producer.
    ingress_workers: int = Field(0, ge=0, le=256)
    produce_timeout_s: float = Field(5.0, gt=0)
    producer_max_in_flight: int = Field(20000, ge=1)
    producer_linger_ms: int = Field(1, ge=0)
    producer_compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = "lz4"
    # The durable local spool: what the broker cannot take right now is fsynced here and answered 200, then
    # drained to Kafka when it is back. Off unless asked for: until drained, those events live on one disk.
    spool: bool = False
    spool_dir: Path = Path(".local/spool")
    spool_max_bytes: int = Field(1024**3, ge=1024 * 1024)
    spool_segment_bytes: int = Field(64 * 1024**2, ge=64 * 1024)
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
    table_standby_replicas: int = Field(1, ge=0)
    data_dir: Path = Path(".local/faust")
    # Sent's retries of one delivery end within about two minutes (1+2+...+64 s); a day covers those many
    # times over, and a day-long incident on either side, while 10 events/s stays under a million ids.
    dedup_window_s: int = Field(24 * 3600, ge=1)
    dedup_sweep_interval_s: float = Field(60.0, gt=0)
    batch_size: int = Field(500, ge=1)
    # The router waits at most this long to fill a batch: at light load it is added to every event's
    # latency; under a backlog batches fill before it (measured in bench/, README "Performance").
    batch_within_s: float = Field(0.02, gt=0)
    retry_initial_s: float = Field(0.2, gt=0)
    retry_max_s: float = Field(30.0, gt=0)
    handler_modules: list[str] = Field(default_factory=list)
    db_pool_size: int = Field(4, ge=1)
    # A stage with records waiting whose position has not moved for this long fails its liveness probe.
    stall_after_s: float = Field(60.0, gt=0)
    # The dedup table's recovery after a rebalance pauses the router: not a stall for this long.
    recovery_stall_after_s: float = Field(600.0, gt=0)

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
        return self

    @model_validator(mode="before")
    @classmethod
    def _app_id_from_prefix(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("app_id"):
            data = {**data, "app_id": default_app_id(str(data.get("topic_prefix") or "sent."))}
        return data

    @field_validator("database_url")
    @classmethod
    def _database_url_is_unambiguous(cls, v: SecretStr) -> SecretStr:
        problem = database_url_problem(v.get_secret_value())
        if problem is not None:
            # Not ValueError: pydantic's message would carry the input, and this input holds a password.
            raise PydanticCustomError("database_url", problem)
        return v

    @field_validator("topic_prefix")
    @classmethod
    def _prefix_is_topic_safe(cls, v: str) -> str:
        allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
        if not set(v) <= allowed:
            raise ValueError("may only contain letters, digits, '.', '_' and '-'")
        return v

    def tenant_secrets(self) -> dict[str, list[str]]:
        """Tenant -> accepted signing secrets (several during rotation)."""
        tenants = {self.default_tenant: [self.webhook_secret.get_secret_value()]}
        if self.secrets_file is not None:
            data = orjson.loads(self.secrets_file.read_bytes())
            if not isinstance(data, dict):
                raise ValueError("secrets file must map tenant -> list of secrets")
            for tenant, secrets in data.items():
                tenants[str(tenant)] = [secrets] if isinstance(secrets, str) else [str(s) for s in secrets]
        return tenants

    @property
    def uses_development_secret(self) -> bool:
        return self.webhook_secret.get_secret_value() == DEVELOPMENT_SECRET
