"""The dedup table's key rule (processors/dedup.py): SHA-256 hex ids stored as NUL + raw digest, partitioned
by the hex form; every other id unchanged."""

from __future__ import annotations

import hashlib

from aiokafka.partitioner import murmur2
from hypothesis import given
from hypothesis import strategies as st

from sentpipe.processors.dedup import event_id_of, is_compact, legacy_key, partition_of, table_key
from sentpipe.schemas.events import frame

HEX_IDS = st.binary(min_size=32, max_size=32).map(lambda b: b.hex().encode())
# Text ids as the ingress can produce them: the model refuses NUL, so none starts with it.
TEXT_IDS = st.text(
    st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), min_size=1, max_size=256
).map(str.encode)


def _java_partition(key: bytes, n: int) -> int:
    return (murmur2(key) & 0x7FFFFFFF) % n


@given(HEX_IDS)
def test_a_sha256_hex_id_is_stored_as_nul_and_its_digest_and_comes_back_exactly(hex_id: bytes) -> None:
    key = table_key(hex_id)
    assert key == b"\x00" + bytes.fromhex(hex_id.decode())
    assert is_compact(key)
    assert event_id_of(key) == hex_id
    assert legacy_key(key) == hex_id


@given(TEXT_IDS)
def test_every_other_id_is_stored_as_it_is(text_id: bytes) -> None:
    if len(text_id) == 64 and all(c in b"0123456789abcdef" for c in text_id):
        return  # a hex id written as text is the hex case above
    assert table_key(text_id) == text_id
    assert not is_compact(text_id)
    assert event_id_of(text_id) == text_id
    assert legacy_key(text_id) is None


@given(st.binary(min_size=64, max_size=64))
def test_only_lowercase_hex_is_compacted(raw: bytes) -> None:
    # Uppercase hex would come back lowercase: another key, on another partition than its raw record.
    key = table_key(raw)
    assert key == raw or event_id_of(key) == raw


@given(st.one_of(HEX_IDS, TEXT_IDS), st.integers(min_value=1, max_value=128))
def test_a_key_s_partition_is_the_java_murmur2_partition_of_its_event_id(eid: bytes, n: int) -> None:
    assert partition_of(table_key(eid), n) == _java_partition(eid, n)


def test_sent_shape_ids_are_compacted() -> None:
    # The Sent shape has no envelope id: the event id is SHA-256 hex of the body.
    body = (
        b'{"field":"messages","sub_type":"message.status.updated","timestamp":"2026-01-01T00:00:00Z",'
        b'"payload":{"message_id":"m-1","status":"delivered"}}'
    )
    eid = frame(body, webhook_id=None).event_id.encode()
    assert eid == hashlib.sha256(body).hexdigest().encode()
    assert is_compact(table_key(eid))
