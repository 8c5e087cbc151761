"""A broker that is there but answers nothing (SIGSTOP: a network partition, a long pause) while the
projector commits. librdkafka's synchronous commit then waits as long as the broker does not answer, and
its other consumer calls wait behind it. The process must keep answering its probes and say why it is
stuck, stop when told, and, once the broker is back, end in the oracle's state with nothing applied twice.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import psycopg
import pytest

from sentpipe.settings import Settings
from tests.services import Services
from tests.test_worker_stalls import (
    _assert_resumed_exactly,
    _assert_stalled_loudly,
    _bodies,
    _livez,
    _produce_routed,
    _projector,
)

FROZEN_S = 35.0  # past the 30 s after which a waiting commit is logged, and past several lag exports


def test_a_commit_waiting_for_a_frozen_broker_keeps_the_projector_answering_and_stoppable(
    services: Services, settings: Settings, tmp_path: Path
) -> None:
    """Seen in an audit: the projector's loop read the lag from librdkafka, which waited behind a commit
    that waited for the broker, and the process answered nothing, its probes included, and ignored
    SIGTERM. Here a table lock holds a fetched batch until the broker is frozen; released, the batch is
    applied and its commit waits."""
    if not services.kafka_local:
        pytest.fail(
            "this test freezes the broker: run it with the local launcher (unset SENTPIPE_KAFKA_BOOTSTRAP)"
        )
    db = settings.database_url.get_secret_value()
    bodies = _bodies(60, 31)
    with _projector(settings, tmp_path) as worker, psycopg.connect(db) as locker:
        locker.execute("LOCK TABLE message_status IN ACCESS EXCLUSIVE MODE")  # an open transaction
        _produce_routed(settings, bodies)
        _assert_stalled_loudly(worker, f"{settings.topic_prefix}message.status")
        services.freeze_kafka()
        try:
            locker.rollback()
            answers: list[int] = []
            frozen_at = time.monotonic()
            while time.monotonic() - frozen_at < FROZEN_S:
                status, stalls = _livez(worker)  # raises if the process does not answer within 5 s
                assert status == 503 and any(s.startswith("project: ") for s in stalls), (status, stalls)
                answers.append(status)
                time.sleep(1.0)
            assert "a commit has waited 30 s for the broker; still waiting" in worker.proc.tail(400)

            assert worker.proc.p is not None
            worker.proc.p.send_signal(signal.SIGTERM)
            stopped_at = time.monotonic()
            try:
                code = worker.proc.p.wait(30)
            except subprocess.TimeoutExpired:
                pytest.fail(f"SIGTERM did not stop the projector in 30 s:\n{worker.proc.tail(60)}")
            log = worker.proc.tail(400)
            assert code == 0, log
            assert "stopped with a batch uncommitted" in log, log
            assert "the consumer was not closed" in log, log
            took = time.monotonic() - stopped_at
            print(f"{len(answers)} probes answered while frozen; stopped in {took:.1f} s")
        finally:
            services.thaw_kafka()
    with _projector(settings, tmp_path) as worker:
        _assert_resumed_exactly(worker, settings, bodies)
