"""librdkafka's own mock cluster (rdkafka_mock.h), reached through ctypes: brokers on loopback that answer
the Kafka protocol and can be told to answer a request with an error, as a real broker does only at the wrong
moment (a coordinator still loading after a restart). The library is the one confluent_kafka ships and loads.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import confluent_kafka

# ApiKeys and error codes of the Kafka protocol.
OFFSET_FETCH = 9
LIST_OFFSETS = 2
NOT_LEADER_FOR_PARTITION = 6
LEADER_NOT_AVAILABLE = 5
NOT_COORDINATOR = 16
COORDINATOR_NOT_AVAILABLE = 15
COORDINATOR_LOAD_IN_PROGRESS = 14

_PRODUCER = 0


def _librdkafka() -> ctypes.CDLL:
    libs = Path(confluent_kafka.__file__).parent.parent / "confluent_kafka.libs"
    found = sorted(libs.glob("librdkafka*.so*"))
    lib = ctypes.CDLL(str(found[0]) if found else "librdkafka.so.1")  # the wheel's, else the system's
    vp, cp = ctypes.c_void_p, ctypes.c_char_p
    lib.rd_kafka_conf_new.restype = vp
    lib.rd_kafka_conf_set.argtypes = [vp, cp, cp, cp, ctypes.c_size_t]
    lib.rd_kafka_new.restype = vp
    lib.rd_kafka_new.argtypes = [ctypes.c_int, vp, cp, ctypes.c_size_t]
    lib.rd_kafka_destroy.argtypes = [vp]
    lib.rd_kafka_mock_cluster_new.restype = vp
    lib.rd_kafka_mock_cluster_new.argtypes = [vp, ctypes.c_int]
    lib.rd_kafka_mock_cluster_destroy.argtypes = [vp]
    lib.rd_kafka_mock_cluster_bootstraps.restype = cp
    lib.rd_kafka_mock_cluster_bootstraps.argtypes = [vp]
    lib.rd_kafka_mock_topic_create.argtypes = [vp, cp, ctypes.c_int, ctypes.c_int]
    lib.rd_kafka_mock_push_request_errors_array.argtypes = [
        vp,
        ctypes.c_int16,
        ctypes.c_size_t,
        ctypes.POINTER(ctypes.c_int),
    ]
    return lib


class MockCluster:
    """One mock broker in this process, for as long as the object lives (`close` ends it)."""

    def __init__(self) -> None:
        self._lib = _librdkafka()
        errstr = ctypes.create_string_buffer(512)
        # A client handle owns the cluster; it never connects anywhere (no bootstrap servers: quiet about it).
        conf = self._lib.rd_kafka_conf_new()
        self._lib.rd_kafka_conf_set(conf, b"log_level", b"0", errstr, len(errstr))
        self._rk = self._lib.rd_kafka_new(_PRODUCER, conf, errstr, len(errstr))
        assert self._rk, errstr.value
        self._cluster = self._lib.rd_kafka_mock_cluster_new(self._rk, 1)
        assert self._cluster
        self.bootstrap = self._lib.rd_kafka_mock_cluster_bootstraps(self._cluster).decode()

    def create_topic(self, name: str, partitions: int) -> None:
        assert self._lib.rd_kafka_mock_topic_create(self._cluster, name.encode(), partitions, 1) == 0

    def answer_with_errors(self, api_key: int, *errors: int) -> None:
        """The next requests of `api_key`, whoever sends them, are answered with `errors` in turn."""
        codes = (ctypes.c_int * len(errors))(*errors)
        self._lib.rd_kafka_mock_push_request_errors_array(self._cluster, api_key, len(errors), codes)

    def close(self) -> None:
        self._lib.rd_kafka_mock_cluster_destroy(self._cluster)
        self._lib.rd_kafka_destroy(self._rk)


_VTYPE_END, _VTYPE_TOPIC, _VTYPE_PARTITION, _VTYPE_VALUE, _VTYPE_KEY, _VTYPE_HEADER = (
    0,
    1,
    3,
    4,
    5,
    9,
)


def produce_with_header_name(
    bootstrap: str, topic: str, partition: int, key: bytes, value: bytes, header_name: bytes
) -> None:
    """One record whose header name is `header_name` as it is (see `produce_as_bytes`)."""
    produce_as_bytes(bootstrap, topic, partition, [(key, value, [(header_name, b"v")])])


def produce_as_bytes(
    bootstrap: str, topic: str, partition: int, records: list[tuple[bytes, bytes, list[tuple[bytes, bytes]]]]
) -> None:
    """Records (key, value, headers) with header names as they are, in one batch where they fit: the Python
    client takes names as str and encodes them, so a name that is not UTF-8 (which any other producer can
    write) takes librdkafka itself."""
    lib = _librdkafka()
    errstr = ctypes.create_string_buffer(512)
    conf = lib.rd_kafka_conf_new()
    settings = ((b"bootstrap.servers", bootstrap.encode()), (b"log_level", b"0"), (b"linger.ms", b"500"))
    for name, setting in settings:
        assert lib.rd_kafka_conf_set(conf, name, setting, errstr, len(errstr)) == 0, errstr.value
    rk = lib.rd_kafka_new(_PRODUCER, conf, errstr, len(errstr))
    assert rk, errstr.value
    try:
        vp, cp, size = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t
        for key, value, headers in records:
            args: list[object] = [
                ctypes.c_int(_VTYPE_TOPIC),
                cp(topic.encode()),
                ctypes.c_int(_VTYPE_PARTITION),
                ctypes.c_int32(partition),
                ctypes.c_int(_VTYPE_KEY),
                cp(key),
                size(len(key)),
                ctypes.c_int(_VTYPE_VALUE),
                cp(value),
                size(len(value)),
            ]
            for name, header_value in headers:
                args += [
                    ctypes.c_int(_VTYPE_HEADER),
                    cp(name),
                    cp(header_value),
                    ctypes.c_ssize_t(len(header_value)),
                ]
            err = lib.rd_kafka_producev(vp(rk), *args, ctypes.c_int(_VTYPE_END))
            assert err == 0, err
        lib.rd_kafka_flush.argtypes = [vp, ctypes.c_int]
        assert lib.rd_kafka_flush(rk, 10_000) == 0
    finally:
        lib.rd_kafka_destroy(rk)
