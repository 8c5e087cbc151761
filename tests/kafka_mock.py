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
