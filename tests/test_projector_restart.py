"""Role `all`: a projector process that asks for a new one (EXIT_RESTART, its answer to a Kafka client
stuck for good) gets one from its worker, which stays up; the batch it held is applied by the new one. And
a commit that never returns is what makes the projector's process ask for it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from sentpipe.schemas.samples import SampleFactory
from sentpipe.settings import Settings
from tests.pipeline import Worker, deliver, start_ingress, start_worker, wait_caught_up


@contextlib.contextmanager
def _pipeline(settings: Settings, tmp_path: Path, handler_module: str) -> Iterator[tuple[str, Worker]]:
    """An ingress and a worker of role `all` with `handler_module` loaded; both stopped afterwards."""
    ingress, url, _ = start_ingress(settings, tmp_path)
    worker = start_worker(settings, tmp_path, handler_modules=[handler_module])
    try:
        yield url, worker
    finally:
        worker.stop()
        ingress.stop()


def _restarted_once(worker: Worker) -> str:
    """The worker's log, once it shows one projector process replaced by a second, the worker still up."""
    log = worker.proc.tail(400)
    assert "the projector process asked for a restart: starting a new one" in log, log
    assert log.count("projector process started") == 2, log
    assert worker.proc.p is not None and worker.proc.p.poll() is None, "the worker exited\n" + log
    return log


def test_a_projector_asking_for_a_restart_is_restarted_and_its_batch_applied(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "restarted-at"
    monkeypatch.setenv("TEST_RESTART_MARKER", str(marker))  # inherited by the worker and its child
    f = SampleFactory(21)
    bodies = [f.inbound().body for _ in range(40)]
    with _pipeline(settings, tmp_path, "tests.handlers_restart") as (url, worker):
        deliver(settings, url, bodies, worker, rows=len(bodies), timeout=180)
        assert marker.exists(), "the handler never ended the first projector process"
        _restarted_once(worker)


def test_a_commit_that_never_returns_ends_in_a_new_projector_process(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "hung-in"
    monkeypatch.setenv("TEST_RESTART_MARKER", str(marker))
    f = SampleFactory(22)
    bodies = [f.inbound().body for _ in range(40)]
    with _pipeline(settings, tmp_path, "tests.handlers_commit_stuck") as (url, worker):
        deliver(settings, url, bodies, worker, rows=len(bodies), timeout=180)
        assert marker.exists(), "no commit hung: the test proved nothing"
        # The rows were in before the commit hung: only the commit of a new process moves the group.
        wait_caught_up(settings, 180, "the records committed", lambda: worker.proc.tail(60))
        log = _restarted_once(worker)
        assert "the projector restarts with a new Kafka client" in log, log
