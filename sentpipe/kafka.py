"""The one Kafka client module: client configuration, the admin client and the producer wrapper.

Every Kafka client of sentpipe is configured here, so the connection settings (bootstrap and security:
TLS, SASL, mTLS) are mapped once; `tls_context` gives the same TLS settings to the router's aiokafka client.
`check_connection` is what every command runs first: a broker that refuses us (wrong password, unknown CA,
plaintext against a TLS listener) is one line naming the broker and the cause, within the connect timeout.

The producer has one implementation with two faces: `Producer` reports
deliveries to callbacks (replay and redrive, which run in a plain thread), and `AsyncProducer` settles
asyncio futures (the ingress and the worker's dead letters).

librdkafka does the batching, network and retries in its own threads. The async face serves reports from
one thread of its own, which waits inside librdkafka (`poll` with the GIL released) and hands each batch
of delivery reports to the loop with one `call_soon_threadsafe`, where the futures are settled. An
acknowledgement is picked up as soon as it arrives, and an idle process sleeps. Serving reports on the loop
instead needs a timer: uvloop's count whole milliseconds (a shorter one runs as call_soon, a busy loop that
kept a core at 100% whatever the load), and a 1 ms tick left a process at 64 connections waiting on it
(`bench/RESULTS.md`). A slow tick on the loop expires the backstop guards of `send_and_wait` (a deque in
deadline order, not a timer per record).

Broker state. librdkafka reports through `error_cb` when every broker connection is down
(`_ALL_BROKERS_DOWN`) but says nothing when one comes back, so the producer tracks it: down on that report
(the report thread serves it as it comes), up again on the next successful delivery or metadata answer (a
probe asks every 250 ms while down). `unavailable` names why new records cannot be accepted right now, so a
caller can refuse at once instead of waiting out the delivery timeout; records already queued keep waiting.
A fatal error (`err.fatal()`, e.g. the idempotent producer lost its sequence) makes librdkafka's producer
unusable for good: the async face replaces it with a new one (undelivered records of the old one fail), with a
backoff if fatal errors repeat. So does a client that lost its brokers: in a broker's restart librdkafka can
drop every broker from its list, bootstrap entry included, and then never connect again (an audit saw an
ingress stay "all brokers down" for 5 min with the broker back, 2 restarts in 11): down for
`LOST_BROKERS_AFTER_S`, a new client asks the bootstrap servers, and if they answer twice in a row, the
producer's client is replaced.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import operator
import re
import socket
import ssl
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import confluent_kafka
from confluent_kafka import KafkaError, KafkaException, Message
from confluent_kafka.admin import AdminClient  # type: ignore[attr-defined]

from sentpipe import metrics as m
from sentpipe.broker import (
    MAX_POLL_INTERVAL_S,
    QUEUE_FULL,
    CommitRejected,
    Delivered,
    Partition,
    ProduceRejected,
    Record,
    Waiting,
    failed_future,
    first_offsets,
)
from sentpipe.logs import NowAndThen
from sentpipe.schemas.topics import MAX_MESSAGE_BYTES, record_limits
from sentpipe.settings import Settings

log = logging.getLogger("sentpipe.kafka")

REPORT_WAIT_S = 0.05  # the report thread's longest wait in librdkafka (how soon it notices close())
# One librdkafka flush per call: confluent-kafka splits a longer one into 200 ms parts and serves the next
# part's reports with a fatal error raised in the last one still pending, and a report callback can lose it.
FLUSH_PART_S = 0.1
SWEEP_S = 0.1  # how often guards and replaced producers are swept while records are in flight
# Polling on the loop (before start and during close). Not below 1 ms: uvloop's timers count whole
# milliseconds and run a shorter delay as call_soon, which spins the loop.
TICK_S = 0.001
FILL_S = 0.01  # the projector's longest wait to fill a batch once its first record is there
PROBE_INTERVAL_S = 0.25  # while every broker is down: how often to ask for metadata to notice one is back
PROBE_TIMEOUT_S = 1.0
# Down this long, a new client also asks the bootstrap servers, this often: whether the brokers are away, or
# only this producer's client lost them.
LOST_BROKERS_AFTER_S = 10.0
LOST_BROKERS_PROBE_EVERY_S = 5.0
RECREATE_BACKOFF_S = (1.0, 30.0)  # after a fatal error: first retry delay, cap (doubling while they repeat)
RETIRED_GRACE_S = 10.0  # a replaced producer is polled this long at most for its (purged) delivery reports

# What `unavailable` says.
ALL_BROKERS_DOWN = "all_brokers_down"
PRODUCER_FATAL = "producer_fatal_error"

Headers = Sequence[tuple[str, bytes]]


class BrokerUnavailable(Exception):
    """The broker did not answer in time; one line for the operator."""


class BrokerRefused(BrokerUnavailable):
    """The broker answered but would not let us in (TLS or SASL failed): the settings are wrong, so waiting
    longer does not help. One line naming the broker and librdkafka's reason (never a secret)."""


def security_config(settings: Settings) -> dict[str, Any]:
    """SENTPIPE_KAFKA_SECURITY_PROTOCOL and friends in librdkafka's names."""
    proto = settings.kafka_security_protocol
    conf: dict[str, Any] = {"security.protocol": proto.lower()}
    if proto.startswith("SASL_"):
        assert settings.kafka_sasl_password is not None  # the settings refuse SASL without one
        conf["sasl.mechanism"] = settings.kafka_sasl_mechanism
        conf["sasl.username"] = settings.kafka_sasl_username
        conf["sasl.password"] = settings.kafka_sasl_password.get_secret_value()
    if proto.endswith("SSL"):
        # Unset: librdkafka probes the system's CA bundle, as aiokafka's default context loads it.
        if settings.kafka_ssl_ca_file is not None:
            conf["ssl.ca.location"] = str(settings.kafka_ssl_ca_file)
        if settings.kafka_ssl_cert_file is not None and settings.kafka_ssl_key_file is not None:
            conf["ssl.certificate.location"] = str(settings.kafka_ssl_cert_file)
            conf["ssl.key.location"] = str(settings.kafka_ssl_key_file)
        if settings.kafka_ssl_key_password is not None:
            conf["ssl.key.password"] = settings.kafka_ssl_key_password.get_secret_value()
        verify_host = settings.kafka_ssl_check_hostname
        conf["ssl.endpoint.identification.algorithm"] = "https" if verify_host else "none"
    return conf


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The same TLS settings for Python clients (aiokafka under Faust); None without TLS. BrokerRefused,
    naming the setting, for a file Python's ssl module cannot load."""
    if not settings.kafka_security_protocol.endswith("SSL"):
        return None
    ca = settings.kafka_ssl_ca_file
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=None if ca is None else str(ca))
    except (OSError, ssl.SSLError) as exc:
        raise BrokerRefused(f"SENTPIPE_KAFKA_SSL_CA_FILE {ca}: not a usable CA file ({exc})") from None
    # Python 3.13's default context verifies strictly (a CA's basicConstraints marked critical, its key
    # usage given, ...); librdkafka and Kafka's Java clients do not. With a CA made without them, the
    # start-up check (librdkafka) passed and the router's aiokafka was refused: verified as librdkafka does.
    ctx.verify_flags &= ~ssl.VERIFY_X509_STRICT
    if settings.kafka_ssl_cert_file is not None and settings.kafka_ssl_key_file is not None:
        password = settings.kafka_ssl_key_password
        try:
            ctx.load_cert_chain(
                str(settings.kafka_ssl_cert_file),
                str(settings.kafka_ssl_key_file),
                None if password is None else password.get_secret_value(),
            )
        except (OSError, ssl.SSLError) as exc:
            raise BrokerRefused(
                "SENTPIPE_KAFKA_SSL_CERT_FILE/_KEY_FILE: not a usable certificate and key"
                f" ({type(exc).__name__}: {exc.args[-1] if exc.args else exc})"
            ) from None
    ctx.check_hostname = settings.kafka_ssl_check_hostname
    return ctx


def client_config(settings: Settings) -> dict[str, Any]:
    """What every librdkafka client shares: where the cluster is, how to get in, and librdkafka's log via
    `logging`."""
    return {
        "bootstrap.servers": settings.kafka_bootstrap,
        **security_config(settings),
        "logger": log,
        # A broker's restart can leave librdkafka with no broker in its metadata (the leader "not found in
        # cache"), and nothing reconnects until it bootstraps again: 5 min by default. An ingress stayed
        # "all brokers down" with the broker back, its spool undrained and every delivery refused.
        "metadata.recovery.rebootstrap.trigger.ms": REBOOTSTRAP_AFTER_MS,
    }


REBOOTSTRAP_AFTER_MS = 15_000


# librdkafka's words for a broker that answered but refused us (after "<proto>://host:port/id: ").
_ADDRESS = re.compile(r"^\S+://\S+?: ")
_AFTER = re.compile(r" \(after \d+ms in state \w+\)$")
_REFUSED_CODES = frozenset(
    code
    for code in (
        getattr(KafkaError, "_AUTHENTICATION", None),
        getattr(KafkaError, "_SSL", None),
        getattr(KafkaError, "SASL_AUTHENTICATION_FAILED", None),
        getattr(KafkaError, "UNSUPPORTED_SASL_MECHANISM", None),
        getattr(KafkaError, "ILLEGAL_SASL_STATE", None),
    )
    if code is not None
)


def _reason(text: str) -> str:
    return _AFTER.sub("", _ADDRESS.sub("", text.strip()))


def refusal(protocol: str, error_code: int | None, text: str) -> str | None:
    """The cause, when one of librdkafka's error reports or connection-failure log lines means the broker
    refuses this client's security settings (as opposed to not answering at all); else None."""
    if error_code in _REFUSED_CODES:
        reason = _reason(text)
        if reason.endswith("supported mechanisms:"):  # librdkafka's list is empty: no SASL on that listener
            reason += (
                f" none (the listener takes no SASL; is SENTPIPE_KAFKA_SECURITY_PROTOCOL={protocol.upper()}"
                " right for it?)"
            )
        return reason
    lower = text.lower()
    if error_code == KafkaError._TRANSPORT and (
        "ssl handshake failed" in lower or "ssl/tls alert" in lower or "certificate" in lower
    ):
        return _reason(text)  # a TLS alert from the broker: e.g. no or unknown client certificate (mTLS)
    protocol = protocol.upper()
    # Only from log lines (no error code), and counted by the caller: a broker that is shutting down can
    # close one connection this way too.
    first_request_closed = "closed by peer" in text and "APIVERSION_QUERY" in text
    if error_code is None and not protocol.endswith("SSL") and first_request_closed:
        # A TLS listener drops a plaintext client's first request; a plaintext one would have answered.
        return (
            "the broker closed the connection at the first request, as a TLS listener does for a client"
            f" with SENTPIPE_KAFKA_SECURITY_PROTOCOL={protocol} (use SSL or SASL_SSL for this listener)"
        )
    return None


# librdkafka's names of the files, as its errors at construction give them ("ssl.key.location failed: ...").
_FILE_PROPERTIES = {
    "ssl.ca.location": "SENTPIPE_KAFKA_SSL_CA_FILE",
    "ssl.certificate.location": "SENTPIPE_KAFKA_SSL_CERT_FILE",
    "ssl.key.location": "SENTPIPE_KAFKA_SSL_KEY_FILE",
}
_PROPERTY_FAILED = re.compile(r"^(?:Failed to create \w+(?: \w+)?: )?(ssl\.[a-z.]+) failed: (.*)$", re.DOTALL)


def _unusable_file(settings: Settings, text: str) -> str:
    """librdkafka's error at construction in the user's words: the setting and its file, and for a key what
    "PEM lib" means (encrypted without SENTPIPE_KAFKA_SSL_KEY_PASSWORD, or not a key at all)."""
    found = _PROPERTY_FAILED.match(text.strip())
    if found is None or found[1] not in _FILE_PROPERTIES:
        return _reason(text)
    prop, why = found[1], found[2].strip()
    path = {
        "ssl.ca.location": settings.kafka_ssl_ca_file,
        "ssl.certificate.location": settings.kafka_ssl_cert_file,
        "ssl.key.location": settings.kafka_ssl_key_file,
    }[prop]
    line = f"{_FILE_PROPERTIES[prop]} {path}: not usable ({why})"
    if prop != "ssl.key.location" or path is None:
        return line
    if "key values mismatch" in why:
        return f"{line}: it is not the key of SENTPIPE_KAFKA_SSL_CERT_FILE"
    try:
        encrypted = b"ENCRYPTED" in Path(path).read_bytes()[:4096]
    except OSError:
        return line
    if encrypted and settings.kafka_ssl_key_password is None:
        return f"{line}: the key is encrypted; give its password in SENTPIPE_KAFKA_SSL_KEY_PASSWORD"
    if encrypted:
        return f"{line}: SENTPIPE_KAFKA_SSL_KEY_PASSWORD does not decrypt it"
    return f"{line}: it holds no PEM private key"


class _ConnectReports:
    """The error_cb and logger of a connection check: keeps what librdkafka said about failed connects."""

    def __init__(self, settings: Settings) -> None:
        self.protocol = settings.kafka_security_protocol
        self.refused: list[str] = []
        self.closed_at_first_request = 0

    def error(self, err: KafkaError) -> None:
        reason = refusal(self.protocol, err.code(), err.str())
        if reason is not None:
            self.refused.append(reason)

    def log(self, level: int, msg: str, *args: Any) -> None:
        if args[:1] != ("FAIL",) or len(args) < 3:
            return
        reason = refusal(self.protocol, None, str(args[2]))
        if reason is not None:
            self.closed_at_first_request += 1
            if self.closed_at_first_request >= 2:  # once may be a broker shutting down
                self.refused.append(reason)


# librdkafka's words for every certificate it could not verify, whatever the cause.
_COULD_NOT_VERIFY = re.compile(
    r": broker certificate could not be verified, verify that ssl\.ca\.location.*$"
)


def _unverified(settings: Settings, reason: str) -> str:
    """librdkafka says "verify that ssl.ca.location is correctly configured" for any certificate it could not
    verify, a name the certificate does not hold included (the CA is right then). OpenSSL's own cause, from a
    handshake with the same settings through Python's ssl; librdkafka's words when that does not tell."""
    first = settings.kafka_bootstrap.split(",")[0].strip().split("://")[-1]
    host, _, port = first.rpartition(":")
    host = host.strip("[]")
    try:
        ctx = tls_context(settings)
        assert ctx is not None  # librdkafka verified a certificate: TLS is on
        with socket.create_connection((host, int(port)), timeout=5.0) as sock:
            ctx.wrap_socket(sock, server_hostname=host).close()
    except ssl.SSLCertVerificationError as exc:
        cause = exc.verify_message
    except Exception:  # the broker went away, or another TLS failure: nothing more to say than librdkafka
        return reason
    else:
        return reason
    cause = cause.rstrip(".")
    if "mismatch" in cause:
        cause += (
            " (a name in SENTPIPE_KAFKA_BOOTSTRAP and the brokers' advertised names must be in their"
            " certificates; SENTPIPE_KAFKA_SSL_CHECK_HOSTNAME=false skips this check)"
        )
    elif ("issuer" in cause or "self-signed" in cause) and settings.kafka_ssl_ca_file is None:
        cause += " (SENTPIPE_KAFKA_SSL_CA_FILE is unset: none of the system's CAs signed it)"
    elif "issuer" in cause or "self-signed" in cause:
        cause += f" (the CA in SENTPIPE_KAFKA_SSL_CA_FILE {settings.kafka_ssl_ca_file} did not sign it)"
    return _COULD_NOT_VERIFY.sub("", reason) + ": " + cause


# The TLS alerts a broker sends about the client's certificate (OpenSSL's words, after "ssl/tls alert").
_CLIENT_CERTIFICATE_ALERTS = (
    "certificate unknown",
    "bad certificate",
    "certificate expired",
    "unknown ca",
    "certificate required",
)


def _client_certificate_hint(settings: Settings) -> str:
    """The broker's alert says no more than "certificate unknown" or "bad certificate", for a client
    certificate expired, not yet valid or signed by a CA it does not trust, or for none: which setting."""
    cert = settings.kafka_ssl_cert_file
    if cert is None:
        return " (SENTPIPE_KAFKA_SSL_CERT_FILE is unset: this listener wants a client certificate, mTLS)"
    return (
        f" (the broker did not accept SENTPIPE_KAFKA_SSL_CERT_FILE {cert}: expired or not yet valid, or"
        " signed by a CA it does not trust)"
    )


def _refused(settings: Settings, reason: str) -> BrokerRefused:
    """The one line for a broker that refused the security settings, with what librdkafka's reason leaves
    out: why a certificate was not verified, which setting a TLS alert about ours points at."""
    if "certificate verify failed" in reason:
        reason = _unverified(settings, reason)
    elif any(f"alert {alert}" in reason for alert in _CLIENT_CERTIFICATE_ALERTS):
        reason += _client_certificate_hint(settings)
    return BrokerRefused(f"Kafka broker at {settings.kafka_bootstrap} refused the connection: {reason}")


def check_connection(settings: Settings, timeout: float) -> None:
    """Ask the cluster for metadata as every command does first. BrokerRefused as soon as the broker refuses
    the security settings (about a second: librdkafka reports it on the first connect), BrokerUnavailable
    when nothing answers within `timeout`; both one line naming the bootstrap address."""
    bootstrap = settings.kafka_bootstrap
    reports = _ConnectReports(settings)
    config: dict[str, Any] = {
        **client_config(settings),
        "error_cb": reports.error,
        "logger": reports,
        "log_level": 6,
        "socket.timeout.ms": max(1000, int(timeout * 1000)),
    }
    try:
        admin = AdminClient(config)
    except KafkaException as exc:  # e.g. a key file librdkafka cannot read or decrypt
        err = exc.args[0] if exc.args else None
        text = err.str() if isinstance(err, KafkaError) else str(exc)
        raise BrokerRefused(
            f"Kafka client for {bootstrap}: invalid TLS/SASL settings: {_unusable_file(settings, text)}"
        ) from None
    deadline = time.monotonic() + timeout
    while True:
        try:
            md = admin.list_topics(timeout=min(0.25, max(0.01, deadline - time.monotonic())))
            if md.brokers:
                return
        except KafkaException:
            pass
        admin.poll(0)  # serves error_cb
        if reports.refused:
            raise _refused(settings, reports.refused[0])
        if time.monotonic() >= deadline:
            raise BrokerUnavailable(f"Kafka broker at {bootstrap} did not answer within {timeout:g}s")


def producer_config(settings: Settings, *, delivery_timeout_s: float | None = None) -> dict[str, Any]:
    timeout_s = settings.produce_timeout_s if delivery_timeout_s is None else delivery_timeout_s
    return {
        **client_config(settings),
        # Durable before 2xx: every in-sync replica has it, and retries never duplicate or reorder.
        "acks": "all",
        "enable.idempotence": True,
        # Java's and aiokafka's partitioner: the worker's dedup table relies on landing on the same partition.
        "partitioner": "murmur2_random",
        "linger.ms": settings.producer_linger_ms,
        "batch.size": 256 * 1024,
        "compression.type": settings.producer_compression,
        # Bounded local queue: when full, produce() raises BufferError and the request gets 503 at once.
        "queue.buffering.max.messages": settings.producer_max_in_flight,
        "queue.buffering.max.kbytes": 256 * 1024,
        # The largest record: every accepted body plus headers and framing (librdkafka's default, 1,000,000,
        # is below the 1 MiB body limit). Each topic's max.message.bytes is set to fit by `topics ensure`.
        "message.max.bytes": min(record_limits(settings.max_body_bytes).producer, 1_000_000_000),
        # A record not delivered in this time fails its future instead of waiting forever.
        "message.timeout.ms": max(1000, int(timeout_s * 1000)),
        # Reconnect within a second once a broker is back (librdkafka's default backs off up to 10 s).
        "reconnect.backoff.max.ms": 1000,
        "socket.keepalive.enable": True,
        "log_level": 4,
    }


class Admin(AdminClient):  # type: ignore[misc]
    """An AdminClient that keeps what librdkafka said of failed connects, so that a request that failed
    says the broker refused the security settings (a wrong password, say) rather than "did not answer"."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.reports = _ConnectReports(settings)
        # librdkafka's FAIL lines (level 6) tell a TLS listener dropping a plaintext client; they are kept,
        # not logged: the caller reports one line instead.
        config: dict[str, Any] = {
            **client_config(settings),
            "socket.timeout.ms": 5000,
            "error_cb": self.reports.error,
            "logger": self.reports,
            "log_level": 6,
        }
        super().__init__(config)


def admin_client(settings: Settings) -> AdminClient:
    return Admin(settings)


def _no_answer(admin: AdminClient, bootstrap: str, timeout: float) -> BrokerUnavailable:
    """What to raise when a request of `admin` failed: BrokerRefused with the broker's reason when it refused
    the security settings (it will go on refusing), else BrokerUnavailable."""
    if isinstance(admin, Admin):
        admin.poll(0)  # serves error_cb: librdkafka's reports of the failed connects
        if admin.reports.refused:
            return _refused(admin.settings, admin.reports.refused[0])
    return BrokerUnavailable(f"Kafka broker at {bootstrap} did not answer within {timeout:g}s")


# The group coordinator is not answering yet (a broker just started and still loading its offsets topic) or
# has moved: asked again, it answers.
_COORDINATOR_MOVING = frozenset(
    {
        KafkaError.NOT_COORDINATOR,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
        KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
        KafkaError._WAIT_COORD,
        KafkaError._TRANSPORT,
    }
)


def committed_offsets(
    settings: Settings, group: str, partitions: Sequence[confluent_kafka.TopicPartition], timeout: float
) -> list[confluent_kafka.TopicPartition]:
    """`group`'s committed offsets for `partitions` (offset < 0: none), read by a consumer handle of the group
    that never joins it. KafkaException when the coordinator does not answer within `timeout`.

    Never `AdminClient.list_consumer_group_offsets`: librdkafka (2.16 and before) crashes the whole process
    with SIGSEGV when its OffsetFetch is answered NOT_COORDINATOR or COORDINATOR_NOT_AVAILABLE, as a broker
    that has just started answers while it loads the group's offsets. It asks the admin handle's consumer
    group (there is none: NULL) to look for the coordinator again, on librdkafka's own thread, whose blocked
    signals leave faulthandler nothing to print (librdkafka issue #5040). A consumer handle has that group:
    it finds the coordinator again and retries."""
    if not partitions:
        return []
    consumer = confluent_kafka.Consumer(
        {
            **client_config(settings),
            "group.id": group,
            "enable.auto.commit": False,
            "socket.timeout.ms": 5000,
            "log_level": 0,
        }
    )
    try:
        return committed_through_moves(consumer, partitions, timeout)
    finally:
        consumer.close()


def committed_through_moves(
    consumer: confluent_kafka.Consumer, partitions: Sequence[confluent_kafka.TopicPartition], timeout: float
) -> list[confluent_kafka.TopicPartition]:
    """`consumer.committed`, asked again while the group coordinator loads or moves (a broker just restarted),
    until `timeout`; KafkaException past it, or for any other error."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            found: list[confluent_kafka.TopicPartition] = consumer.committed(
                list(partitions), timeout=max(0.1, deadline - time.monotonic())
            )
            return found
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            if not isinstance(err, KafkaError) or err.code() not in _COORDINATOR_MOVING:
                raise
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.1)


def existing_partitions(admin: AdminClient, bootstrap: str, timeout: float = 10.0) -> dict[str, int]:
    """Topic -> partition count; BrokerUnavailable naming the address when nothing answers in time."""
    try:
        md = admin.list_topics(timeout=timeout)
    except KafkaException as exc:
        raise _no_answer(admin, bootstrap, timeout) from exc
    return {name: len(t.partitions) for name, t in md.topics.items() if t.error is None}


def topic_configs(
    admin: AdminClient, bootstrap: str, names: Sequence[str], timeout: float = 10.0
) -> dict[str, dict[str, str] | None]:
    """Topic -> its effective configuration (None: the topic does not exist)."""
    from confluent_kafka.admin import ConfigResource, ResourceType  # type: ignore[attr-defined]

    futures = admin.describe_configs(
        [ConfigResource(ResourceType.TOPIC, n) for n in names], request_timeout=timeout
    )
    out: dict[str, dict[str, str] | None] = {}
    for resource, fut in futures.items():
        try:
            entries = fut.result(timeout=timeout)
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            if isinstance(err, KafkaError) and err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                out[resource.name] = None
                continue
            if isinstance(err, KafkaError) and err.code() in (KafkaError._TIMED_OUT, KafkaError._TRANSPORT):
                raise _no_answer(admin, bootstrap, timeout) from exc
            raise
        except TimeoutError as exc:
            raise _no_answer(admin, bootstrap, timeout) from exc
        out[resource.name] = {key: entry.value for key, entry in entries.items() if entry.value is not None}
    return out


def topic_max_message_bytes(
    admin: AdminClient, bootstrap: str, names: Sequence[str], timeout: float = 10.0
) -> dict[str, int | None]:
    """Topic -> its effective `max.message.bytes` (None: the topic does not exist)."""
    return {
        name: None if config is None else int(config[MAX_MESSAGE_BYTES])
        for name, config in topic_configs(admin, bootstrap, names, timeout).items()
    }


OnDelivery = Callable[[KafkaError | None, Message], None]

# A delivery report of success that carries no offset is not proof the record is stored. librdkafka takes
# a broker's DUPLICATE_SEQUENCE_NUMBER answer to a record it sent again as "stored the first time", and
# reports it so. In a broker restart under load (test_spool_e2e, about one run in ten here) librdkafka
# reported 3 records of a partition delivered without an offset, and none of them was on the topic: the
# spool deleted three events answered 200. Failed instead, the record is sent again (a true duplicate is
# dropped by the dedup table).
DELIVERY_UNCONFIRMED = "delivery_unconfirmed"
_UNCONFIRMED = KafkaError(
    KafkaError._NO_OFFSET, "delivery reported without an offset: not known to be stored"
)


def fatal_error(exc: BaseException | None) -> KafkaError | None:
    """The fatal error an exception out of confluent-kafka carries. confluent-kafka never gives a fatal
    error to error_cb: it raises it from poll or flush, as a SystemError caused by it when a delivery report
    was served after it."""
    seen: set[int] = set()  # a chain can loop (as traceback guards against): called from the report thread
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        err = exc.args[0] if isinstance(exc, KafkaException) and exc.args else None
        if isinstance(err, KafkaError) and err.fatal():
            return err
        exc = exc.__cause__ or exc.__context__
    return None


def _confirmed(err: KafkaError | None, msg: Message) -> KafkaError | None:
    """The report's error, with a success that names no offset made a failure."""
    if err is None and msg.offset() is None:
        m.PRODUCER_UNCONFIRMED.inc()
        return _UNCONFIRMED
    return err


class _QuietWhileDown:
    """librdkafka's log lines for one producer, into `logging`. While every broker is known to be down, its
    connection failures (one per attempt, every few tens of ms while metadata is asked for) are dropped: the
    producer has said so in one line already, and says so again when a broker is back."""

    def __init__(self, owner: Producer) -> None:
        self._owner = weakref.ref(owner)  # no cycle between the client and its owner

    def log(self, level: int, msg: str, *args: Any) -> None:
        owner = self._owner()
        if owner is not None and owner._down_since is not None and args[:1] == ("FAIL",):
            return
        log.log(level, msg, *args)


class _FailuresNowAndThen:
    """librdkafka's log lines for one consumer, into `logging`, its connection failures (FAIL: one per
    attempt, about 20 a second while a broker is away) at most one per `every_s`, with a count of those
    left out. The consumer has no "all brokers down" report of its own to quiet them like the producer's."""

    def __init__(self, every_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._limit = NowAndThen(every_s, clock)

    def log(self, level: int, msg: str, *args: Any) -> None:
        if args[:1] == ("FAIL",):
            left_out = self._limit.admit("FAIL")
            if left_out is None:
                return
            if left_out:
                msg += " (and %d more connection failures since the last one logged)"
                args = (*args, left_out)
        log.log(level, msg, *args)


CONSUMER_FAILURES_EVERY_S = 30.0


class Producer:
    """An idempotent acks=all producer whose delivery reports go to per-record callbacks."""

    def __init__(self, config: dict[str, Any]) -> None:
        self._config = dict(config)
        self._last_error: KafkaError | None = None
        self._fatal_error: KafkaError | None = None  # set until the producer is replaced
        self._down_since: float | None = None  # monotonic time librdkafka said every broker is down
        self._refusal_logged = False
        self._unreported = 0  # records `send` queued whose delivery report has not come
        # What the "all brokers down" warning says becomes of new records: the ingress's spool takes them.
        self.while_down = "new records are refused until one answers"
        self._producer = self._new_client()
        self._ready_checked_at = 0.0
        self._ready = False

    def _new_client(self) -> confluent_kafka.Producer:
        return confluent_kafka.Producer(
            {**self._config, "error_cb": self._on_error, "logger": _QuietWhileDown(self)}
        )

    @classmethod
    def from_settings(cls, settings: Settings, *, delivery_timeout_s: float | None = None) -> Producer:
        return cls(producer_config(settings, delivery_timeout_s=delivery_timeout_s))

    @property
    def bootstrap(self) -> str:
        return str(self._config.get("bootstrap.servers", ""))

    @property
    def delivery_timeout_s(self) -> float:
        return int(self._config.get("message.timeout.ms", 300_000)) / 1000

    def _on_error(self, err: KafkaError) -> None:
        """librdkafka's error reports (served by poll): "every broker is down", and fatal errors (which
        confluent-kafka raises instead: `serve`, `flush` and `_enqueue` pass them on)."""
        self._last_error = err
        reason = refusal(str(self._config.get("security.protocol", "")), err.code(), err.str())
        if reason is not None and not self._refusal_logged:  # once until a delivery succeeds again
            self._refusal_logged = True
            log.error("Kafka broker at %s refused the connection: %s", self.bootstrap, reason)
        if err.fatal():
            if self._fatal_error is None:
                log.error("fatal Kafka producer error: %s", err.str())
            self._fatal_error = err
        elif err.code() == KafkaError._ALL_BROKERS_DOWN:
            self._mark_down()

    def _mark_down(self) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            m.PRODUCER_BROKERS_DOWN.set(1)
            log.warning("Kafka at %s unreachable (all brokers down): %s", self.bootstrap, self.while_down)

    def _mark_up(self) -> None:
        self._refusal_logged = False
        if self._down_since is not None:
            down_s = time.monotonic() - self._down_since
            self._down_since = None
            m.PRODUCER_BROKERS_DOWN.set(0)
            log.warning("Kafka at %s reachable again after %.1fs", self.bootstrap, down_s)

    @property
    def unavailable(self) -> str | None:
        """Why a new record cannot be accepted right now (None: go ahead and produce)."""
        if self._fatal_error is not None:
            return PRODUCER_FATAL
        if self._down_since is not None:
            return ALL_BROKERS_DOWN
        return None

    def _enqueue(
        self,
        topic: str,
        key: bytes,
        value: bytes | None,
        headers: Headers,
        on_delivery: OnDelivery,
        partition: int = -1,  # librdkafka's RD_KAFKA_PARTITION_UA: the partitioner chooses
    ) -> None:
        try:
            self._producer.produce(
                topic,
                value,
                key,
                partition,
                headers=headers if type(headers) is list else list(headers),
                on_delivery=on_delivery,
            )
        except BufferError:
            raise ProduceRejected(QUEUE_FULL) from None
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            if isinstance(err, KafkaError) and err.code() == KafkaError._FATAL:
                # The producer is unusable for good, though no poll has raised its error yet.
                self._on_error(KafkaError(KafkaError._FATAL, err.str(), fatal=True))
            raise ProduceRejected(
                err.name().lower() if isinstance(err, KafkaError) else "produce_error"
            ) from None

    def send(
        self,
        topic: str,
        key: bytes,
        value: bytes,
        headers: Headers,
        on_done: Callable[[KafkaError | None], None],
    ) -> None:
        """Enqueue a record, waiting for room when the local queue is full; `on_done` gets the outcome."""

        def report(err: KafkaError | None, msg: Message) -> None:
            self._unreported -= 1
            if err is None:
                self._mark_up()
            on_done(_confirmed(err, msg))

        while True:
            try:
                self._enqueue(topic, key, value, headers, report)
                break
            except ProduceRejected as exc:
                if exc.reason != QUEUE_FULL:
                    raise
                self.serve(0.1)  # let deliveries drain the queue
        self._unreported += 1
        self.serve(0)  # serve delivery reports as we go

    def serve(self, timeout_s: float) -> int:
        """librdkafka's poll: delivery and error reports. Its fatal error goes to `_on_error` as error_cb's
        others do, and is raised."""
        try:
            return int(self._producer.poll(timeout_s))
        except (KafkaException, SystemError) as exc:
            self._note_fatal(exc)
            raise

    def _note_fatal(self, exc: BaseException) -> None:
        err = fatal_error(exc)
        if err is not None:
            self._on_error(err)

    @property
    def pending(self) -> int:
        """Records sent and not yet reported on (librdkafka's queue length also counts its own events)."""
        return self._unreported

    def flush(self, timeout_s: float | None = None) -> None:
        """Wait for every delivery report; raises BrokerUnavailable when some never came."""
        wait = self.delivery_timeout_s + 5 if timeout_s is None else timeout_s
        deadline = time.monotonic() + wait
        while True:
            try:
                remaining = self._producer.flush(min(FLUSH_PART_S, max(0.0, deadline - time.monotonic())))
            except (KafkaException, SystemError) as exc:
                self._note_fatal(exc)
                raise
            if not remaining or not self._unreported or time.monotonic() >= deadline:
                break
        if self._unreported:
            raise BrokerUnavailable(
                f"{self._unreported} record(s) not acknowledged by Kafka at {self.bootstrap} within"
                f" {wait:.0f}s"
            )

    def fatal(self) -> bool:
        return self._fatal_error is not None

    async def ready(self, timeout: float = 2.0, cache_s: float = 1.0) -> bool:
        """False at once while the producer knows it cannot deliver (every broker down, fatal error); else
        True when a broker answers a metadata request, cached briefly so probes stay cheap."""
        if self.unavailable is not None:
            return False
        now = time.monotonic()
        if now - self._ready_checked_at < cache_s:
            return self._ready
        self._ready_checked_at = now
        try:
            md = await asyncio.to_thread(self._producer.list_topics, timeout=timeout)
            self._ready = bool(md.brokers) and not self.fatal()
        except KafkaException:
            self._ready = False
        return self._ready


class Fenced(Exception):
    """A newer producer with this one's transactional.id took its place (or Kafka gave up on it): what it had
    not committed never will be, and it can write nothing more."""


class TransactionAborted(Exception):
    """The open transaction failed (Kafka refused a record in it) and was aborted: nothing in it is
    visible, and another can begin."""


class TransactionalProducer(Producer):
    """A producer whose records count only once committed (librdkafka's consumers read committed records
    only, by default), fenced by a newer one with the same transactional.id: that one's start aborts what
    this one had not committed and Kafka refuses this one's later writes. A lock two processes can hold at
    once (one of them suspended past its session, then resumed) is harmless behind it: the one that lost it
    can no longer write."""

    def __init__(self, config: dict[str, Any], transactional_id: str, transaction_timeout_s: float) -> None:
        # The coordinator aborts a transaction left open this long (its producer killed or suspended).
        timeout_ms = int(transaction_timeout_s * 1000)
        super().__init__(
            {**config, "transactional.id": transactional_id, "transaction.timeout.ms": timeout_ms}
        )
        self._started = False

    @classmethod
    def transactional(
        cls,
        settings: Settings,
        transactional_id: str,
        *,
        delivery_timeout_s: float,
        transaction_timeout_s: float,
    ) -> TransactionalProducer:
        config = producer_config(settings, delivery_timeout_s=delivery_timeout_s)
        return cls(config, transactional_id, transaction_timeout_s)

    def send(
        self,
        topic: str,
        key: bytes,
        value: bytes,
        headers: Headers,
        on_done: Callable[[KafkaError | None], None],
    ) -> None:
        with self._fatal_as_fenced("send"):
            super().send(topic, key, value, headers, on_done)

    def flush(self, timeout_s: float | None = None) -> None:
        with self._fatal_as_fenced("deliver"):
            super().flush(timeout_s)

    @contextlib.contextmanager
    def _fatal_as_fenced(self, what: str) -> Iterator[None]:
        """Fenced for the fatal error a transactional producer raises from anywhere once fenced: out of a
        poll or a flush (noted there), or a send refused with `_fatal` after one."""
        try:
            yield
        except (KafkaException, SystemError, ProduceRejected) as exc:
            err = fatal_error(exc) or self._fatal_error
            if err is None and not (isinstance(exc, ProduceRejected) and exc.reason == "_fenced"):
                raise
            text = err.str() if err is not None else "fenced by a newer instance"
            raise Fenced(f"the Kafka producer could not {what}: {text}") from None

    def begin(self, timeout_s: float) -> None:
        """Open a transaction; the first one fences every earlier producer with this transactional.id,
        waiting for Kafka to abort what it had open."""
        if not self._started:
            self._retrying(self._producer.init_transactions, timeout_s, "could not start its transactions")
            self._started = True
        try:
            self._producer.begin_transaction()
        except KafkaException as exc:
            raise self._failure(exc, "could not begin a transaction") from None

    def commit(self, timeout_s: float) -> None:
        """Commit what was sent since `begin` (delivering it first). TransactionAborted when Kafka refused
        part of it, the whole of it then aborted; Fenced, or BrokerUnavailable when Kafka did not answer."""
        try:
            self._retrying(self._producer.commit_transaction, timeout_s, "did not commit")
        except _Abortable as exc:
            self._retrying(self._producer.abort_transaction, timeout_s, "did not abort")
            raise TransactionAborted(exc.name) from None

    def _retrying(self, call: Callable[[float], None], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                call(max(0.1, deadline - time.monotonic()))
                return
            except KafkaException as exc:
                err = exc.args[0] if exc.args else None
                if not isinstance(err, KafkaError):
                    raise
                if err.txn_requires_abort():
                    raise _Abortable(err.name()) from None
                if err.fatal() or not err.retriable() or time.monotonic() >= deadline:
                    raise self._failure(exc, what) from None

    def _failure(self, exc: KafkaException, what: str) -> Exception:
        err = exc.args[0] if exc.args else None
        text = err.str() if isinstance(err, KafkaError) else str(exc)
        if isinstance(err, KafkaError) and err.fatal():
            return Fenced(f"the Kafka producer {what}: {text}")
        return BrokerUnavailable(f"Kafka at {self.bootstrap} {what}: {text}")


class _Abortable(Exception):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class AsyncProducer(Producer):
    """The same producer, with a future per record settled on the event loop."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._in_flight = 0
        self._ticking = False
        self._running = False
        self._probe_task: asyncio.Task[None] | None = None
        self._recreate_handle: asyncio.TimerHandle | None = None
        self._recreate_delay_s = RECREATE_BACKOFF_S[0]
        self._recreated_at = 0.0
        # Replaced producers still owing delivery reports, each with a time after which it is let go.
        self._retired: list[tuple[confluent_kafka.Producer, float]] = []
        # send_and_wait's backstops, (monotonic deadline, future), oldest first: swept by the tick.
        self._guards: collections.deque[tuple[float, asyncio.Future[Delivered]]] = collections.deque()
        self.recreated = 0
        # Delivery reports served by the report thread, waiting to be settled on the loop. Never replaced:
        # deque.append and popleft are atomic, so a report appended while the loop drains is never lost.
        self._reports: collections.deque[tuple[asyncio.Future[Delivered], KafkaError | None, Message]] = (
            collections.deque()
        )
        self._settle_scheduled = False
        self._reporter: threading.Thread | None = None
        # When a delivery report last came, or (nothing in flight before it) the record now waiting was sent.
        self._progress_at = time.monotonic()

    @classmethod
    def from_settings(cls, settings: Settings, *, delivery_timeout_s: float | None = None) -> AsyncProducer:
        return cls(producer_config(settings, delivery_timeout_s=delivery_timeout_s))

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._running = True
        self._reporter = threading.Thread(target=self._serve_reports, name="sentpipe-reports", daemon=True)
        self._reporter.start()
        if self._down_since is not None or self._fatal_error is not None:  # reported before start
            self._loop.call_soon(self._after_error)

    def _serve_reports(self) -> None:
        """The report thread: waits in librdkafka for reports, then hands what came to the loop at once."""
        loop = self._loop
        assert loop is not None
        while self._running and not loop.is_closed():
            try:
                # Delivery reports go to `_reports`; error reports are handled where they come
                # (`_on_error` is thread-safe). The GIL is released while librdkafka waits.
                self.serve(REPORT_WAIT_S)
            except Exception as exc:  # a thread that died would leave every later record without its report
                if fatal_error(exc) is None:  # a fatal one is logged, and the producer replaced (_on_error)
                    log.exception("serving Kafka producer reports failed; going on")
                time.sleep(REPORT_WAIT_S)
                continue
            if self._reports and not self._settle_scheduled:
                self._settle_scheduled = True
                try:
                    loop.call_soon_threadsafe(self._settle)
                except RuntimeError:  # the loop is closed: nobody is waiting for a report any more
                    return

    def _settle(self) -> None:
        """Settle the futures of the reports that came (on the loop), in the order they came."""
        self._settle_scheduled = False  # cleared first: a report appended from here on schedules another
        reports = self._reports
        if reports:
            self._progress_at = time.monotonic()
        unconfirmed = 0
        while reports:
            fut, err, msg = reports.popleft()
            self._in_flight -= 1
            if err is None and self._down_since is not None:
                self._mark_up()
            err = _confirmed(err, msg)
            if err is _UNCONFIRMED:
                unconfirmed += 1
            if fut.done():  # the guard in send() gave up on it already
                continue
            if err is _UNCONFIRMED:
                fut.set_exception(ProduceRejected(DELIVERY_UNCONFIRMED))
            elif err is not None:
                fut.set_exception(ProduceRejected(err.name().lower()))
            else:
                fut.set_result(Delivered(msg.topic() or "", msg.partition() or 0, msg.offset() or 0))
        if unconfirmed:
            log.warning(
                "Kafka reported %d record(s) delivered without an offset: not known to be stored, failed so"
                " they are sent again",
                unconfirmed,
            )

    def _poll(self) -> None:
        """On the loop: serve what the report thread does not (replaced producers; everything while the
        thread is not running, or is gone: slowly, on the sweep, until the process that lost it stops)."""
        reporter = self._reporter
        if reporter is None or not reporter.is_alive():
            try:
                self.serve(0)
            except (KafkaException, SystemError) as exc:
                if fatal_error(exc) is None:  # a fatal one is noted: the producer is replaced
                    raise
        if self._retired:
            now = time.monotonic()
            kept = []
            for old, until in self._retired:
                old.poll(0)
                left = len(old)
                if left and now < until:
                    kept.append((old, until))
                elif left:
                    # Let go: these reports will never be served, so they no longer count as waiting (an
                    # idle process would otherwise look hung to `stalled_s` forever).
                    self._in_flight -= left
                    log.warning("replaced Kafka producer let go with %d records never reported", left)
            self._retired = kept
        if self._reports:
            self._settle()

    def _tick(self) -> None:
        self._poll()
        if self._guards:
            self._expire_guards()
        if (self._in_flight > 0 or self._retired) and self._loop is not None:
            self._loop.call_later(self._tick_s(), self._tick)
        else:
            self._ticking = False

    def _tick_s(self) -> float:
        # With the report thread the tick only sweeps guards and replaced producers: it need not be quick.
        return SWEEP_S if self._reporter is not None else TICK_S

    def _start_ticking(self) -> None:
        if not self._ticking and self._loop is not None:
            self._ticking = True
            self._loop.call_later(self._tick_s(), self._tick)

    # --- broker state ------------------------------------------------------------------------------------
    def _on_error(self, err: KafkaError) -> None:
        super()._on_error(err)
        if self._loop is not None and self._running and (err.fatal() or self._down_since is not None):
            with contextlib.suppress(RuntimeError):  # the loop is closed
                self._loop.call_soon_threadsafe(self._after_error)  # error_cb may run in another thread

    def _after_error(self) -> None:
        if not self._running or self._loop is None:
            return
        if self._fatal_error is not None:
            self._schedule_recreate()
        elif self._down_since is not None and (self._probe_task is None or self._probe_task.done()):
            self._probe_task = self._loop.create_task(self._probe())

    async def _probe(self) -> None:
        """While every broker is down: ask for metadata until one answers, then accept records again."""
        asked_bootstrap = 0.0
        # Two answers in a row, LOST_BROKERS_PROBE_EVERY_S apart: a broker just back is reached by our
        # client within its 1 s reconnect backoff, and must not cost it the records it holds.
        answered = 0
        while self._running and self._down_since is not None and self._fatal_error is None:
            try:
                md = await asyncio.to_thread(self._producer.list_topics, timeout=PROBE_TIMEOUT_S)
            except KafkaException:
                md = None
            if md is not None and md.brokers:
                self._mark_up()
                return
            now = time.monotonic()
            down_since = self._down_since
            if (
                down_since is not None
                and now - down_since >= LOST_BROKERS_AFTER_S
                and now - asked_bootstrap >= LOST_BROKERS_PROBE_EVERY_S
            ):
                asked_bootstrap = now
                answered = answered + 1 if await asyncio.to_thread(self._bootstrap_answers) else 0
                if answered >= 2 and self._running:
                    answered = 0
                    self._replace_client(
                        f"it reached no broker for {now - down_since:.0f} s while the bootstrap servers"
                        " answer a new client (librdkafka lost its broker list)"
                    )
            await asyncio.sleep(PROBE_INTERVAL_S)

    def _bootstrap_answers(self) -> bool:
        """In a thread: whether a new client, configured as this producer's, gets the cluster's brokers."""
        try:
            fresh = confluent_kafka.Producer({**self._config, "log_level": 0, "error_cb": _ignore_error})
            md = fresh.list_topics(timeout=PROBE_TIMEOUT_S * 2)
        except KafkaException:
            return False
        return bool(md.brokers)

    def _schedule_recreate(self) -> None:
        if self._recreate_handle is not None or self._loop is None:
            return
        # A rare fatal error is handled at once; fatal errors that come back soon after a replacement (a
        # broker that refuses this producer for good) back off, doubling up to the cap.
        if self.recreated == 0 or time.monotonic() - self._recreated_at > 60.0:
            delay, self._recreate_delay_s = 0.0, RECREATE_BACKOFF_S[0]
        else:
            delay = self._recreate_delay_s
            self._recreate_delay_s = min(delay * 2, RECREATE_BACKOFF_S[1])
        self._recreate_handle = self._loop.call_later(delay, self._recreate)

    def _recreate(self) -> None:
        """Replace a producer that hit a fatal error."""
        self._recreate_handle = None
        if not self._running or self._fatal_error is None:
            return
        error = self._fatal_error
        self._fatal_error = None
        self._replace_client(f"a fatal error ({error.str()})")
        self._after_error()  # still every broker down: keep probing with the new producer

    def _replace_client(self, why: str) -> None:
        """A new librdkafka client in place of the current one, whose undelivered records fail (callers
        answer 503: nothing they had was acknowledged)."""
        old = self._producer
        self._producer = self._new_client()
        self._recreated_at = time.monotonic()
        self.recreated += 1
        m.PRODUCER_RECREATED.inc()
        with contextlib.suppress(KafkaException):  # purge of a fatal producer works in librdkafka 2.x
            old.purge(in_queue=True, in_flight=True, blocking=False)
        self._retired.append((old, time.monotonic() + RETIRED_GRACE_S))
        self._start_ticking()
        log.warning("Kafka producer replaced after %s; its undelivered records failed", why)

    # --- records -----------------------------------------------------------------------------------------
    def _on_delivery(self, fut: asyncio.Future[Delivered], err: KafkaError | None, msg: Message) -> None:
        # Runs in whichever thread polled (mostly the report thread): futures are settled on the loop.
        self._reports.append((fut, err, msg))

    def produce(
        self,
        topic: str,
        key: bytes,
        value: bytes | None,
        headers: Headers,
        timeout: float | None = None,
        partition: int = -1,
    ) -> asyncio.Future[Delivered]:
        """Enqueue a record; the future resolves when the broker acknowledges it (or fails). With `timeout`,
        it fails with ProduceRejected("delivery_timeout") at the latest a second after that, should no
        report ever come (librdkafka fails a record itself after message.timeout.ms). A `partition` >= 0
        overrides the partitioner; a None value is a tombstone."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        fut: asyncio.Future[Delivered] = loop.create_future()
        self._enqueue(topic, key, value, headers, partial(self._on_delivery, fut), partition)
        if not self._in_flight:
            self._progress_at = time.monotonic()
        self._in_flight += 1
        if not self._ticking:
            self._start_ticking()
        if timeout is not None:
            # A backstop, not a timer: an entry in a deque the tick sweeps (no timer, no task per record).
            self._guards.append((time.monotonic() + timeout + 1.0, fut))
        return fut

    def produce_or_fail(
        self, topic: str, key: bytes, value: bytes | None, headers: Headers, partition: int = -1
    ) -> asyncio.Future[Delivered]:
        """`produce`, with a record refused before it was queued (ProduceRejected) as a failed future: for
        callers that wait for a batch of futures together and retry what failed."""
        try:
            return self.produce(topic, key, value, headers, partition=partition)
        except ProduceRejected as exc:
            return failed_future(exc)

    async def send_and_wait(
        self, topic: str, key: bytes, value: bytes, headers: Headers, timeout: float
    ) -> Delivered:
        return await self.produce(topic, key, value, headers, timeout)

    def _expire_guards(self) -> None:
        """Drop settled guards from the front; fail the records whose guard ran out. Guards are appended in
        deadline order as long as callers use one timeout (the ingress does); a shorter one behind a longer
        one expires when that one leaves the front (it is only a backstop)."""
        guards = self._guards
        now = time.monotonic()
        while guards:
            deadline, fut = guards[0]
            if not fut.done():
                if deadline > now:
                    return
                fut.set_exception(ProduceRejected("delivery_timeout"))
            guards.popleft()

    def stalled_s(self) -> float:
        """How long records have waited without any delivery report coming (0: none waiting); infinite when
        the report thread is gone while the producer runs. librdkafka reports every record, delivered or
        failed, within message.timeout.ms: a wait much longer than that means reports no longer come."""
        reporter = self._reporter
        if self._running and reporter is not None and not reporter.is_alive():
            return math.inf
        if not self._in_flight:
            return 0.0
        return time.monotonic() - self._progress_at

    def _queued(self) -> int:
        return len(self._producer) + sum(len(old) for old, _ in self._retired)

    async def close(self, timeout: float = 10.0) -> None:
        """Deliver what is queued (graceful shutdown), serving reports on the loop as it goes."""
        deadline = time.monotonic() + timeout
        while self._queued() > 0 and time.monotonic() < deadline:
            self._poll()
            await asyncio.sleep(TICK_S)
        self._running = False
        if self._reporter is not None:
            await asyncio.to_thread(self._reporter.join)  # within REPORT_WAIT_S
            self._reporter = None
        self._poll()
        if self._recreate_handle is not None:
            self._recreate_handle.cancel()
            self._recreate_handle = None
        if self._probe_task is not None:
            self._probe_task.cancel()
            self._probe_task = None
        if self._queued():
            log.warning("producer closed with %d undelivered records", self._queued())


# Commit errors that mean the partitions are another member's now: retrying the commit cannot succeed.
_ASSIGNMENT_GONE = frozenset(
    {
        KafkaError.ILLEGAL_GENERATION,
        KafkaError.UNKNOWN_MEMBER_ID,
        KafkaError.REBALANCE_IN_PROGRESS,
        KafkaError.FENCED_INSTANCE_ID,
        KafkaError._ASSIGNMENT_LOST,
        KafkaError._STATE,
    }
)


def _ignore_error(_err: KafkaError) -> None:
    """A probe's errors: whether it got metadata is the whole answer."""


_HEADERS = operator.methodcaller("headers")  # see message_headers: never `msg.headers()` in Python code


def message_headers(msg: Message) -> list[tuple[str, bytes]]:
    """A consumed record's headers as (name, bytes) pairs, None values dropped; none at all when a name is
    not UTF-8 (`readable_headers`)."""
    return readable_headers(msg) or []


def readable_headers(msg: Message) -> list[tuple[str, bytes]] | None:
    """A consumed record's headers as (name, bytes) pairs, None values dropped; None when a name is
    not UTF-8. Any producer can write such a name, and confluent-kafka cannot hand it over: `headers()`
    returns a list holding a NULL name with a UnicodeDecodeError pending, and caches that list. Called
    from C (`_HEADERS`), Python turns that into a SystemError; called from Python code, a call site the
    interpreter has specialized (a hot one: every record's) skips that check, and the next look at the list
    was a segmentation fault. Raised, that one record stopped the projector for good, and `dlq list`,
    `dlq redrive`, `replay` and `events show` over its topic. Call it once per message."""
    try:
        headers: Any = _HEADERS(msg) or []  # the stubs do not know it is a list of pairs
    except (SystemError, UnicodeDecodeError):
        log.warning(
            "a record's header name is not UTF-8: read without its headers",
            extra={"topic": msg.topic(), "partition": msg.partition(), "offset": msg.offset()},
        )
        return None
    return [(str(k), bytes(v)) for k, v in headers if v is not None]


def _records(msgs: Sequence[Message]) -> list[Record]:
    out: list[Record] = []
    for msg in msgs:
        err = msg.error()
        if err is not None:
            if err.code() != KafkaError._PARTITION_EOF:
                log.warning("consumer error: %s", err.str())
            continue
        _, ts = msg.timestamp()
        key: Any = msg.key()
        out.append(
            Record(
                msg.topic() or "",
                msg.partition() or 0,
                msg.offset() or 0,
                key,
                msg.value() or b"",
                tuple(message_headers(msg)),
                int(ts) if ts and ts > 0 else int(time.time() * 1000),
            )
        )
    return out


class RangeReader:
    """Reads given offset ranges of partitions, outside any group, and where a group's work starts.

    `group` is only asked for its committed offsets: this consumer never joins it and never commits."""

    def __init__(self, settings: Settings, group: str) -> None:
        self._consumer = confluent_kafka.Consumer(
            {
                **client_config(settings),
                "group.id": group,
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": "earliest",  # a range partly deleted by retention: what is left
                "log_level": 4,
            }
        )

    def start_offsets(self, partitions: Sequence[Partition], timeout_s: float = 10.0) -> dict[Partition, int]:
        """Where the group resumes each partition: its committed offset, or the log's start when it has
        none (the worker's reset policy is earliest) or the commit fell off the log."""
        tps = [confluent_kafka.TopicPartition(t, p) for t, p in partitions]
        out: dict[Partition, int] = {}
        # Through a coordinator still loading: the router asks this for its first batch after an assignment,
        # which after a broker restart comes while it loads, and the error crashed the routing agent (its
        # fetched records dropped, read again: SentpipeRawRecordsReread for a routine broker restart).
        for tp in committed_through_moves(self._consumer, tps, timeout_s):
            low, _ = self._consumer.get_watermark_offsets(tp, timeout=timeout_s)
            out[(tp.topic, tp.partition)] = max(tp.offset, low) if tp.offset >= 0 else low
        return out

    def end_offsets(
        self, partitions: Sequence[Partition], timeout_s: float = 2.0, partial: bool = False
    ) -> dict[Partition, int]:
        """Each partition's end offset (the next one to be written), as the broker says now. `partial`: the
        partitions that answered, the others left out (their leader away), instead of the first error."""
        out: dict[Partition, int] = {}
        for topic, partition in partitions:
            tp = confluent_kafka.TopicPartition(topic, partition)
            try:
                out[(topic, partition)] = self._consumer.get_watermark_offsets(tp, timeout=timeout_s)[1]
            except KafkaException:
                if not partial:
                    raise
        return out

    def partition_count(self, topic: str, timeout_s: float = 2.0) -> int | None:
        """How many partitions the broker says `topic` has now (None: it did not say)."""
        found = self._consumer.list_topics(topic, timeout=timeout_s).topics.get(topic)
        return None if found is None or found.error is not None else len(found.partitions)

    def read(self, where: Partition, start: int, end: int, timeout_s: float = 30.0) -> list[Record]:
        """The records at offsets [start, end) that are still in the log; BrokerUnavailable when they
        do not all come within `timeout_s`."""
        topic, partition = where
        self._consumer.assign([confluent_kafka.TopicPartition(topic, partition, start)])
        out: list[Record] = []
        seen = start - 1
        deadline = time.monotonic() + timeout_s
        try:
            while seen < end - 1:
                if time.monotonic() > deadline:
                    raise BrokerUnavailable(f"{topic}[{partition}]: read up to {seen} of {start}..{end - 1}")
                # Only this partition's: records fetched for an earlier read can still come out of
                # librdkafka's queue after it was unassigned.
                batch = [
                    r
                    for r in _records(self._consumer.consume(min(10_000, end - start), 1.0))
                    if r.partition == partition and r.topic == topic
                ]
                if batch:
                    seen = max(seen, batch[-1].offset)
                out += [r for r in batch if start <= r.offset < end]
        finally:
            self._consumer.unassign()
        return out

    def close(self) -> None:
        self._consumer.close()


def batch_consumer_config(
    settings: Settings, group: str, max_poll_interval_s: float = MAX_POLL_INTERVAL_S
) -> dict[str, Any]:
    """librdkafka's configuration of a `BatchConsumer` in `group`."""
    return {
        **client_config(settings),
        "group.id": group,
        "max.poll.interval.ms": round(max_poll_interval_s * 1000),
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "session.timeout.ms": round(settings.kafka_session_timeout_s * 1000),
        "heartbeat.interval.ms": round(settings.kafka_heartbeat_interval_s * 1000),
        # Routed topics are read by one consumer per process: fetch big, wait little. With the default
        # minimum of one byte, every fetch came back with the router's latest few records: hundreds
        # of fetches a second over 48 partitions, and the broker's CPU. The broker now holds a fetch
        # until 64 KiB are there, or 25 ms at most, the most it adds to a quiet pipeline's latency
        # (a 50,000-event drain: 3,150-3,250 -> 3,900-4,100 events/s; the broker 0.4 -> 0.26 cores).
        "fetch.min.bytes": 64 * 1024,
        "fetch.wait.max.ms": 25,
        "queued.max.messages.kbytes": 64 * 1024,
        "log_level": 4,
        # A broker away: ~20 ERROR lines a second (1,162 in a minute), where the ingress says it once.
        "logger": _FailuresNowAndThen(CONSUMER_FAILURES_EVERY_S),
    }


# How long lag() waits for each answer about a partition it has not read from: it runs in the consumer's
# thread, between polls.
LAG_ASK_TIMEOUT_S = 2.0
LAG_UNREAD_EVERY_S = 10.0


class BatchConsumer:
    """A consumer-group member on librdkafka: batches of detached records, commits only when told.

    Offsets are committed synchronously after the caller's work is durable, never automatically, so a
    crash re-reads the uncommitted tail (at-least-once). Rebalances happen inside `poll_batch`, between
    batches, so a revoked partition never has work in flight.
    """

    def __init__(
        self,
        settings: Settings,
        group: str,
        topics: Sequence[str],
        max_poll_interval_s: float = MAX_POLL_INTERVAL_S,
    ) -> None:
        self._consumer = confluent_kafka.Consumer(batch_consumer_config(settings, group, max_poll_interval_s))
        self._assigned: set[Partition] = set()
        self.joined = False  # set by the first assignment, an empty one included
        # Per assigned partition not read from yet: the group's commit at the assignment (lag()).
        self._resumes_at: dict[Partition, int] = {}
        self._unread_lag: dict[Partition, Waiting] = {}
        # Where rewind() sought each partition: librdkafka has no position for it until the next record is
        # consumed, and lag() lost the partition (or counted it from a stale answer) after every rewind.
        self._sought: dict[Partition, int] = {}
        self._unread_asked_at = -math.inf
        self.on_revoke: list[Callable[[set[Partition]], None]] = []
        self._consumer.subscribe(list(topics), on_assign=self._on_assign, on_revoke=self._on_revoke)

    # A new set each time, never changed in place: lag() reads it on the event loop while a rebalance
    # inside poll_batch (a worker thread) replaces it.
    def _on_assign(self, _c: Any, tps: list[confluent_kafka.TopicPartition]) -> None:
        self._assigned = self._assigned | {(tp.topic, tp.partition) for tp in tps}
        self.joined = True
        # librdkafka keeps a partition's pause through a rebalance that takes it away and gives it back, and
        # whoever paused it need not know of the rebalance: paused still, it was read by no one again.
        if tps:
            try:
                self._consumer.resume(tps)
            except KafkaException as exc:
                log.warning("could not resume the partitions assigned: %s", exc)

    def _on_revoke(self, _c: Any, tps: list[confluent_kafka.TopicPartition]) -> None:
        gone = {(tp.topic, tp.partition) for tp in tps}
        self._assigned = self._assigned - gone
        for where in gone:
            self._resumes_at.pop(where, None)  # assigned again, the group's commit has moved
            self._sought.pop(where, None)
        for cb in self.on_revoke:
            cb(gone)

    def poll_batch(self, max_records: int, timeout_s: float) -> list[Record]:
        # Wait up to timeout_s for a first record only, then at most FILL_S for the rest of the batch:
        # a quiet topic adds at most FILL_S to an event's latency, a backlog still fills whole batches
        # (one transaction and one commit per batch, not per handful).
        msgs = self._consumer.consume(1, timeout_s)
        if msgs and max_records > 1:
            msgs += self._consumer.consume(max_records - 1, min(timeout_s, FILL_S))
        return _records(msgs)

    def commit(self, offsets: Mapping[Partition, int]) -> None:
        if not offsets:
            return
        tps = [confluent_kafka.TopicPartition(t, p, o) for (t, p), o in offsets.items()]
        try:
            results = self._consumer.commit(offsets=tps, asynchronous=False) or []
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            if isinstance(err, KafkaError):
                raise CommitRejected(err.name(), assignment_lost=err.code() in _ASSIGNMENT_GONE) from None
            raise CommitRejected(str(exc)) from None
        for tp in results:  # per-partition errors of an otherwise answered commit
            if tp.error is not None:
                raise CommitRejected(tp.error.name(), assignment_lost=tp.error.code() in _ASSIGNMENT_GONE)

    def rewind(self, records: Sequence[Record]) -> None:
        for (topic, partition), offset in first_offsets(records).items():
            if (topic, partition) not in self._assigned:
                continue
            try:
                self._consumer.seek(confluent_kafka.TopicPartition(topic, partition, offset))
            except KafkaException as exc:  # revoked in between: the new owner reads from the commit
                log.warning("could not rewind %s[%d] to %d: %s", topic, partition, offset, exc)
            else:
                self._sought = {**self._sought, (topic, partition): offset}

    def pause(self, partitions: Iterable[Partition]) -> None:
        self._pause_or_resume(self._consumer.pause, partitions)

    def resume(self, partitions: Iterable[Partition]) -> None:
        self._pause_or_resume(self._consumer.resume, partitions)

    def _pause_or_resume(
        self, call: Callable[[list[confluent_kafka.TopicPartition]], None], partitions: Iterable[Partition]
    ) -> None:
        tps = [confluent_kafka.TopicPartition(t, p) for t, p in partitions if (t, p) in self._assigned]
        if not tps:
            return
        try:
            call(tps)
        except KafkaException as exc:  # revoked in between: the new owner reads them, unpaused
            log.warning(
                "could not pause or resume %s: %s", sorted((tp.topic, tp.partition) for tp in tps), exc
            )

    def lag(self) -> dict[Partition, Waiting]:
        """Records waiting per assigned partition. One not read from since its assignment has no position
        and no cached watermarks: it counts from where the group resumes it (its commit, asked once per
        assignment, or the log's start), against the broker's end offset. Left out, it was on no dashboard
        and no stall, however long its records waited (scale audit)."""
        out: dict[Partition, Waiting] = {}
        unread: list[confluent_kafka.TopicPartition] = []
        tps = [confluent_kafka.TopicPartition(t, p) for t, p in self._assigned]
        for tp in self._consumer.position(tps) if tps else []:
            where = (tp.topic, tp.partition)
            at = tp.offset if tp.offset >= 0 else self._sought.get(where, -1)
            _, high = self._consumer.get_watermark_offsets(tp, cached=True)
            if at >= 0 and high >= 0:
                out[where] = Waiting(at, max(0, high - at))
            else:
                unread.append(tp)
        now = time.monotonic()
        if unread and now - self._unread_asked_at >= LAG_UNREAD_EVERY_S:
            # Requests to the broker, made between polls (lag() is read for every batch): now and then.
            self._unread_asked_at = now
            self._unread_lag = self._ask_lag(unread)
        for tp in unread:
            where = (tp.topic, tp.partition)
            if where in self._unread_lag:
                out[where] = self._unread_lag[where]
        return out

    def _ask_lag(self, unread: list[confluent_kafka.TopicPartition]) -> dict[Partition, Waiting]:
        out: dict[Partition, Waiting] = {}
        try:
            asked = [
                tp for tp in unread if tp.offset < 0 and (tp.topic, tp.partition) not in self._resumes_at
            ]
            for tp in self._consumer.committed(asked, timeout=LAG_ASK_TIMEOUT_S) if asked else []:
                self._resumes_at[(tp.topic, tp.partition)] = tp.offset  # negative: no commit
            for tp in unread:
                low, high = self._consumer.get_watermark_offsets(tp, timeout=LAG_ASK_TIMEOUT_S)
                at = tp.offset if tp.offset >= 0 else self._resumes_at.get((tp.topic, tp.partition), -1)
                at = max(at, low)
                out[(tp.topic, tp.partition)] = Waiting(at, max(0, high - at))
        except KafkaException:
            pass  # best effort: the broker slow or away; asked again next time
        return out

    def close(self) -> None:
        self._consumer.close()
