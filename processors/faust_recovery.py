"""Faust's table recovery, without the standby changelog records it threw away at the end of each recovery.

Faust 0.15.3 resumes a router's standby changelog partitions (`Starting standby partitions...`) and then,
in `Recovery.on_recovery_completed`, awaits the tables' callbacks and the streams' seek before it resumes
the streams with `flow_control.resume()`, which also empties the changelog queue (it is made with
`clear_on_resume=True`). Standby records fetched during those awaits were dropped there, the consumer's
position already past them, and the next ones were applied on top: the store's persisted offset moved
past records it never held. When that standby partition became the router's own, recovery started from
that offset, and every id marked in the lost records was routed again when its duplicate arrived, its
handlers called a second time: after a rolling restart of three routers under load, one event in nine
delivered again (tests/test_rolling_routers.py).

The changelog queue is therefore kept out of that one clear. The clear is for records fetched before a
rebalance; the queue still gets it at every revocation, and here too when a rebalance came meanwhile.
"""

from __future__ import annotations

from typing import Any

from faust.tables.recovery import Recovery

_faust_on_recovery_completed = Recovery.on_recovery_completed


async def _on_recovery_completed(self: Recovery, generation_id: int = 0) -> None:
    app: Any = self.app
    queue = app.tables.changelog_queue
    managed = app.flow_control._queues  # the queues `flow_control.resume()` empties
    managed.discard(queue)
    try:
        await _faust_on_recovery_completed(self, generation_id)
    finally:
        managed.add(queue)
    if app.consumer_generation_id != generation_id:
        # A rebalance came during the awaits: what the queue holds was fetched for the old assignment.
        queue.clear()


def install() -> None:
    """Replace Faust's `Recovery.on_recovery_completed` in this process (idempotent)."""
    Recovery.on_recovery_completed = _on_recovery_completed  # type: ignore[method-assign]
