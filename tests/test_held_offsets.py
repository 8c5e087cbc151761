"""The dedup store's offset moves only through the router's own acknowledged writes that follow on from it."""

from __future__ import annotations

from sentpipe.processors.held_offsets import HeldOffsets


def test_writes_that_follow_on_move_the_offset_even_when_acknowledged_out_of_order() -> None:
    held = HeldOffsets()
    assert held.acknowledged(3, range(101, 151), lambda: 100) == 150
    # Pipelined batches: the later one's acknowledgements arrive first, and wait for the gap to fill.
    assert held.acknowledged(3, range(201, 251), lambda: None) is None
    assert held.acknowledged(3, range(151, 201), lambda: None) == 250
    assert held.acknowledged(4, [0, 1], lambda: None) == 1  # nothing applied yet: from the start


def test_records_someone_else_wrote_between_ours_stop_the_offset_until_a_recovery_reads_them() -> None:
    """A router paused past its session writes after its successor marked ids in the partition: moved to
    its own write's offset, the store claimed the successor's marks, and their duplicates were routed."""
    held = HeldOffsets(max_waiting=100)
    assert held.acknowledged(9, range(1000, 1010), lambda: 999) == 1009
    # The successor wrote 1010..1019; the paused router's held batches land after them.
    assert held.acknowledged(9, range(1020, 1070), lambda: 0) is None
    assert held.acknowledged(9, range(1070, 1200), lambda: 0) is None  # past max_waiting: given up on
    assert held.acknowledged(9, range(1200, 1210), lambda: 0) is None
    # Revoked and assigned again: the recovery read everything, and the store's offset is read afresh.
    held.forget(9)
    assert held.acknowledged(9, [1300], lambda: 1299) == 1300


def test_the_stores_offset_is_read_once_per_assignment() -> None:
    asked: list[int] = []

    def stored() -> int:
        asked.append(1)
        return 10

    held = HeldOffsets()
    for start in (11, 12, 13):
        held.acknowledged(0, [start], stored)
    assert len(asked) == 1
    held.forget(0)
    held.acknowledged(0, [14], stored)
    assert len(asked) == 2
