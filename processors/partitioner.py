"""The router's partitioner for Faust's producer: Java's murmur2, computed in C by librdkafka.

Faust's default (aiokafka's `DefaultPartitioner`) runs murmur2 in pure Python for every keyed send: the
routed records and each dedup-table mark. librdkafka's `murmur2` is the same function (the ingress's
`murmur2_random` partitioner relies on it too), so records and table marks land where they did before;
tests/test_partitioner.py checks it against aiokafka's and Java's published values.

A dedup table key in compact form (processors/dedup.py) goes to the partition of its hex event id, the
raw record's partition, so the table stays co-partitioned with the raw topic. No other key Faust's
producer sends has that form (routed and dead-letter records go through librdkafka; their keys are text).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from sentpipe.processors.dedup import partition_of


def murmur2_partitioner(key: bytes | None, all_partitions: Sequence[int], available: Sequence[int]) -> int:
    if key is None:
        return random.choice(available or all_partitions)
    return all_partitions[partition_of(key, len(all_partitions))]
