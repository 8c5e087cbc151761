"""The router's partitioner for Faust's producer: Java's murmur2, computed in C by librdkafka.

Faust's default (aiokafka's `DefaultPartitioner`) runs murmur2 in pure Python for every keyed send: the
routed records and each dedup-table mark. librdkafka's `murmur2` is the same function (the ingress's
`murmur2_random` partitioner relies on it too), so records and table marks land where they did before;
tests/test_partitioner.py checks it against aiokafka's and Java's published values.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from confluent_kafka import murmur2


def murmur2_partitioner(key: bytes | None, all_partitions: Sequence[int], available: Sequence[int]) -> int:
    if key is None:
        return random.choice(available or all_partitions)
    return all_partitions[murmur2(key, len(all_partitions))]
