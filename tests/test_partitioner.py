"""The C partitioner picks exactly the partitions Java's and aiokafka's murmur2 pick; a compact dedup key goes
where its hex event id goes (the raw record's partition)."""

from __future__ import annotations

import random

from aiokafka.partitioner import DefaultPartitioner, murmur2

from sentpipe.processors.dedup import event_id_of, is_compact, table_key
from sentpipe.processors.partitioner import murmur2_partitioner


def test_the_same_partition_as_aiokafka_for_any_key_and_count() -> None:
    rng = random.Random(7)
    default = DefaultPartitioner()
    for _ in range(20_000):
        key = rng.randbytes(rng.randint(0, 80))
        n = rng.randint(1, 64)
        parts = list(range(n))
        hashed = event_id_of(key) if is_compact(key) else key  # random 33 bytes from NUL: compact form
        assert murmur2_partitioner(key, parts, parts) == default(hashed, parts, parts), key


def test_a_compact_dedup_key_lands_where_the_raw_record_of_its_hex_id_lands() -> None:
    # The ingress's producer (librdkafka murmur2_random) partitions the raw record by the hex id; aiokafka's
    # partitioner is the reference for it (above). The table's mark must land on that same partition.
    rng = random.Random(11)
    default = DefaultPartitioner()
    for _ in range(5_000):
        hex_id = rng.randbytes(32).hex().encode()
        key = table_key(hex_id)
        assert is_compact(key) and len(key) == 33
        for n in (1, 4, 12, 64):
            parts = list(range(n))
            assert murmur2_partitioner(key, parts, parts) == default(hex_id, parts, parts)


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
