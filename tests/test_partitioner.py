"""The C partitioner picks exactly the partitions Java's and aiokafka's murmur2 pick."""

from __future__ import annotations

import random

from aiokafka.partitioner import DefaultPartitioner, murmur2

from sentpipe.processors.partitioner import murmur2_partitioner


def test_the_same_partition_as_aiokafka_for_any_key_and_count() -> None:
    rng = random.Random(7)
    default = DefaultPartitioner()
    for _ in range(20_000):
        key = rng.randbytes(rng.randint(0, 80))
        n = rng.randint(1, 64)
        parts = list(range(n))
        assert murmur2_partitioner(key, parts, parts) == default(key, parts, parts), key


def test_java_reference_values() -> None:
    # org.apache.kafka.common.utils.UtilsTest#testMurmur2: the hashes Java computes for these keys.
    cases = {
        b"21": -973932308,
        b"foobar": -790332482,
        b"a-little-bit-long-string": -985981536,
        b"a-little-bit-longer-string": -1486304829,
        b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
        b"abc": 479470107,
    }
    for key, java in cases.items():
        assert murmur2(key) & 0xFFFFFFFF == java & 0xFFFFFFFF
        for n in (1, 3, 12, 100):
            assert murmur2_partitioner(key, list(range(n)), []) == (java & 0x7FFFFFFF) % n


def test_keyless_records_go_to_an_available_partition() -> None:
    assert murmur2_partitioner(None, [0, 1, 2], [2]) == 2
    assert murmur2_partitioner(None, [0, 1, 2], []) in (0, 1, 2)
