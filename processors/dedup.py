"""The dedup table's keys and values: which tenants have sent an event id, and when it was first routed.

Event ids are unique per tenant only, so a table value maps tenant -> first-routed time (ms). Packed, not
JSON: a million ids are held in memory, and each value is one small bytes object per id.
Layout, repeated per tenant: 8-byte big-endian milliseconds, 2-byte length, the tenant in UTF-8.
"""

from __future__ import annotations

import math
import struct

from confluent_kafka import murmur2

_HEAD = struct.Struct(">QH")


def encode_seen(tenants: dict[str, int]) -> bytes:
    out = bytearray()
    for tenant, ms in tenants.items():
        name = tenant.encode()
        out += _HEAD.pack(max(0, ms), len(name)) + name
    return bytes(out)


def decode_seen(value: bytes | None) -> dict[str, int]:
    """The tenants of a table value; an unreadable value (written by an older version) reads as none."""
    out: dict[str, int] = {}
    if not value:
        return out
    view, pos = memoryview(value), 0
    while pos + _HEAD.size <= len(view):
        ms, size = _HEAD.unpack_from(view, pos)
        pos += _HEAD.size
        if pos + size > len(view):
            return {}
        out[bytes(view[pos : pos + size]).decode(errors="replace")] = ms
        pos += size
    return out if pos == len(view) else {}


def mark_ms(now_s: float) -> int:
    """The first-routed time a mark records for `now_s`: whole seconds, so ids marked within the same second
    share one stored value (processors/store.py), rounded up. Rounded down, a mark read up to a second older
    than it was, and the sweep expired it before the window had passed since it was routed: a redelivery
    just inside the window was routed again."""
    return math.ceil(now_s) * 1000


def expire(tenants: dict[str, int], cutoff_ms: int) -> dict[str, int]:
    """The tenants whose first routing is still inside the window."""
    return {t: ms for t, ms in tenants.items() if ms >= cutoff_ms}


# --- Keys -------------------------------------------------------------------------------------------------
# Most event ids are SHA-256 hex of the body (schemas/events.py): 64 characters that hold 32 bytes. The table
# stores those as COMPACT + the raw digest (33 bytes instead of 64: a bytes object of 80 rather than 112 in
# CPython's allocator, per id held in memory and per changelog record). Every other id is stored as it is.
# Text ids never start with NUL (the model refuses NUL anywhere), so the two forms cannot be confused.
#
# The table is co-partitioned with the raw topic, whose partition is murmur2 of the *hex* id (the ingress's
# murmur2_random partitioner): a compact key's partition is murmur2 of its hex form, everywhere (the Faust
# producer's partitioner, the router's writes, the sweep, the restore). Only lowercase hex is compacted, so
# the hex form recreated from the digest is byte for byte the raw record's key.

COMPACT = b"\x00"
_DIGEST = 32
_COMPACT_LEN = 1 + _DIGEST
_HEX = frozenset(b"0123456789abcdef")


def table_key(event_id: bytes) -> bytes:
    """The table's key for a raw record's key (its event id)."""
    if len(event_id) == 2 * _DIGEST and _HEX.issuperset(event_id):
        return COMPACT + bytes.fromhex(event_id.decode())
    return event_id


def is_compact(key: bytes) -> bool:
    return len(key) == _COMPACT_LEN and key[:1] == COMPACT


def event_id_of(key: bytes) -> bytes:
    """The event id (the raw record's key) a table key stands for: the inverse of `table_key`."""
    return key[1:].hex().encode() if is_compact(key) else key


def legacy_key(key: bytes) -> bytes | None:
    """The key an older version wrote for the same id (hex, not compact); None when it is the same key.

    Tables written before compact keys hold hex keys until the dedup window sweeps them: a lookup that misses
    the compact key must look there too, or a duplicate of an event first seen before the upgrade passes."""
    return key[1:].hex().encode() if is_compact(key) else None


def partition_of(key: bytes, partitions: int) -> int:
    """The changelog (and raw) partition of a table key: murmur2 of the event id, in C (librdkafka)."""
    return murmur2(event_id_of(key), partitions)
