"""The dedup table's values: which tenants have sent an event id, and when it was first routed.

Event ids are unique per tenant only, so a table value maps tenant -> first-routed time (ms). Packed, not
JSON: a million ids are held in memory, and each value is one small bytes object per id.
Layout, repeated per tenant: 8-byte big-endian milliseconds, 2-byte length, the tenant in UTF-8.
"""

from __future__ import annotations

import struct

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


def expire(tenants: dict[str, int], cutoff_ms: int) -> dict[str, int]:
    """The tenants whose first routing is still inside the window."""
    return {t: ms for t, ms in tenants.items() if ms >= cutoff_ms}
