"""The dedup table's value codec and window rule (pure)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from sentpipe.processors.dedup import decode_seen, encode_seen, expire


@given(st.dictionaries(st.text(max_size=300), st.integers(min_value=0, max_value=2**63 - 1), max_size=5))
def test_round_trip(tenants: dict[str, int]) -> None:
    assert decode_seen(encode_seen(tenants)) == tenants


def test_compact_for_the_usual_single_tenant() -> None:
    assert len(encode_seen({"default": 1_764_510_000_000})) == 17


def test_unreadable_values_read_as_unseen() -> None:
    for junk in (None, b"", b"12345", b'{"default": 1}', encode_seen({"a": 1})[:-1]):
        assert decode_seen(junk) == {}


def test_expire_keeps_the_tenants_inside_the_window() -> None:
    assert expire({"a": 100, "b": 200, "c": 300}, 200) == {"b": 200, "c": 300}
    assert expire({"a": 100}, 101) == {}
