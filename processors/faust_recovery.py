"""Faust's table recovery, without the records it threw away at the end of each recovery.

Faust 0.15.3 ends a recovery in `Recovery.on_recovery_completed`, with the consumer's flow running (the
standby changelog partitions were just resumed, `Starting standby partitions...`): it awaits the tables'
callbacks, resumes the stream partitions, awaits their seek to the committed offsets, and then resumes the
streams with `flow_control.resume()`, which empties every queue made with `clear_on_resume=True`: the
changelog queue and the streams' own. Two kinds of records were lost there.

Standby changelog records fetched during those awaits were dropped, the consumer's position already past
them, and the next ones were applied on top: the store's persisted offset moved past records it never held.
When that standby partition became the router's own, recovery started from that offset, and every id
marked in the lost records was routed again when its duplicate arrived, its handlers called a second time:
after a rolling restart of three routers under load, one event in nine delivered again. The changelog
queue is therefore kept out of that one clear. The clear is for records fetched before a rebalance; the
queue still gets it at every revocation, and here too when a rebalance came meanwhile.

Raw records were dropped the same way: the seek asks the broker for each partition's committed offset in
turn and seeks it there, and the partitions already sought were fetched from their new position meanwhile,
their records put on the streams' queues and then emptied out of them, the consumer past them. The router
read the holes back (`raw records skipped by the stream`, `_with_skipped` in processors/worker.py), so
nothing was lost, but a rolling restart of three routers logged 16 to 82 such errors and raised
SentpipeRawRecordsReread. The stream partitions are therefore sought while still paused, and resumed with
the streams' flow in one step, with nothing fetched between the clear and the resume.
"""

from __future__ import annotations

import asyncio
from typing import Any

from faust.tables.recovery import Recovery


async def _on_recovery_completed(self: Recovery, generation_id: int = 0) -> None:
    """Faust 0.15.3's `Recovery.on_recovery_completed`, with the two changes above."""
    app: Any = self.app
    consumer = app.consumer
    queue = app.tables.changelog_queue
    managed = app.flow_control._queues  # the queues `flow_control.resume()` empties
    self.log.info("Restore complete!")
    await app.on_rebalance_complete.send()
    self._set_recovery_ended()
    callbacks = [
        asyncio.ensure_future(
            table.on_recovery_completed(self.actives_for_table[table], self.standbys_for_table[table])
        )
        for table in self.tables.values()
    ]
    if callbacks:
        await asyncio.wait(callbacks)
    assignment = consumer.assignment()
    if _rebalanced(self, generation_id):
        return
    if assignment:
        # Still paused: nothing of theirs is fetched until they are resumed below, after the seek.
        self.log.info("Seek stream partitions to committed offsets.")
        await self._wait(consumer.perform_seek(), timeout=app.conf.broker_request_timeout)
    if _rebalanced(self, generation_id):  # the new assignment's recovery resumes the streams
        return
    # From here to the flow's resume nothing awaits: no fetch lands between the clear and the resume.
    consumer.resume_partitions({tp for tp in assignment if not self._is_changelog_tp(tp)})
    self.completed.set()
    managed.discard(queue)
    try:
        app.flow_control.resume()
    finally:
        managed.add(queue)
    consumer.resume_flow()
    # finally make sure the fetcher is running.
    await app._fetcher.maybe_start()
    self.tables.on_actives_ready()
    if not app.assignor.assigned_standbys():
        self.tables.on_standbys_ready()
    app.on_rebalance_end()
    self.log.info("Worker ready")


def _rebalanced(self: Recovery, generation_id: int) -> bool:
    """Whether a rebalance came during the awaits; then what the changelog queue holds was fetched for the
    old assignment, and is dropped."""
    app: Any = self.app
    if app.consumer_generation_id == generation_id:
        return False
    self.log.warning(f"Recovery rebalancing again app id {app.consumer_generation_id} param {generation_id}")
    app.tables.changelog_queue.clear()
    return True


def install() -> None:
    """Replace Faust's `Recovery.on_recovery_completed` in this process (idempotent)."""
    Recovery.on_recovery_completed = _on_recovery_completed  # type: ignore[method-assign]
