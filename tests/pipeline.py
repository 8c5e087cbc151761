"""Start the whole pipeline (ingress + worker as processes) for end-to-end tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sentpipe.settings import Settings
from tests.processes import Proc, free_port, settings_env, start_ingress


@dataclass
class Worker:
    proc: Proc
    metrics_port: int

    def kill(self) -> None:
        self.proc.kill()

    def stop(self) -> None:
        self.proc.stop()


def start_worker(
    s: Settings, log_dir: Path, handler_modules: list[str] | None = None, **extra: object
) -> Worker:
    mport = free_port()
    env = settings_env(
        s,
        worker_web_port=free_port(),
        worker_metrics_port=mport,
        data_dir=log_dir / "faust",
        handler_modules='["' + '","'.join(handler_modules) + '"]' if handler_modules else "[]",
        dedup_sweep_interval_s=extra.pop("dedup_sweep_interval_s", 60),
        **extra,
    )
    proc = Proc(["worker"], env, log_dir / f"worker-{mport}.log").start()
    proc.wait_http(f"http://127.0.0.1:{mport}/metrics")
    return Worker(proc, mport)


def wait_until(
    cond: Callable[[], bool], timeout: float, what: str, on_fail: Callable[[], str] = lambda: ""
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if cond():
                return
        except Exception:  # the database may be down on purpose
            pass
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{on_fail()}")


__all__ = ["Worker", "start_ingress", "start_worker", "wait_until"]
