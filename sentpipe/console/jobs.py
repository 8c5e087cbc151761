"""Replays and redrives started from the console: one at a time, in a thread, with progress.

The work is `processors.replay.replay` and `processors.dlq.redrive`, the functions `sentpipe replay` and
`sentpipe dlq redrive` call; this only runs them off the event loop and keeps their progress and result
for the page to poll. A real run must follow a finished dry run of exactly the same settings in the same
browser session (the fingerprint of the settings), so nobody replays or redrives without seeing the count.
The page's Stop button asks the same of the running job. A stopped job ends `stopped`, its error the line
that says how far it got and how to go on; a stopped dry run confirms nothing. On shutdown the running job
is asked to stop after the record in hand, as `sentpipe replay` is on SIGTERM, and waited for.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from sentpipe.console.calls import in_daemon_thread
from sentpipe.processors.replay import Progress, RunResult

log = logging.getLogger("sentpipe.console")

Kind = Literal["replay", "redrive"]
# The work: its progress callback, and an event set when it is to stop after the record in hand.
Work = Callable[[Progress, threading.Event], RunResult]
# Long enough for a stopped run to flush what it sent (a replay's producer waits up to 30 s for a broker
# gone away) and write the redrive ledger; the process exits after it even if the job has not ended.
STOP_TIMEOUT_S = 40.0


def fingerprint(kind: Kind, params: dict[str, Any]) -> str:
    return hashlib.sha256(kind.encode() + orjson.dumps(params, option=orjson.OPT_SORT_KEYS)).hexdigest()


def result_json(result: RunResult) -> dict[str, Any]:
    return {
        "run_id": result.run_id,
        "dry_run": result.dry_run,
        "read": result.read,
        "sent": sum(result.selected.values()) if result.dry_run else result.produced,
        "produced": result.produced,
        "skipped": result.skipped,
        "past_retention": result.past_retention,
        "start_past_retention": result.start_past_retention,
        "already_redriven": result.already_redriven,
        "failed": result.failed,
        "selected": [[a, b, n] for (a, b), n in sorted(result.selected.items())],
        "failures": dict(sorted(result.failures.items())),
        "kept": dict(sorted(result.kept.items())),
        "unrecorded": dict(sorted(result.unrecorded.items())),
        "missing_ids": result.missing_ids,
    }


@dataclass
class Job:
    kind: Kind
    dry_run: bool
    fingerprint: str
    session_id: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    state: Literal["running", "done", "failed", "stopped"] = "running"
    done: int = 0
    total: int | None = None
    started: float = field(default_factory=time.time)
    finished: float | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    stop: threading.Event = field(default_factory=threading.Event, repr=False)
    ends: dict[int, int] = field(default_factory=dict)  # partition -> end offset read to, once done

    def progress(self, done: int, total: int) -> None:  # called from the job's thread
        self.done, self.total = done, total

    def json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "dry_run": self.dry_run,
            "state": self.state,
            "stopping": self.state == "running" and self.stop.is_set(),
            "done": self.done,
            "total": self.total,
            "started": int(self.started * 1000),
            "finished": int(self.finished * 1000) if self.finished else None,
            "result": self.result,
            "error": self.error,
        }


class Busy(Exception):
    def __init__(self, job: Job) -> None:
        super().__init__(f"a {job.kind} is running ({job.done} of {job.total or '?'} records); wait for it")
        self.job = job


class Jobs:
    """At most one replay or redrive at a time, in this console process."""

    def __init__(self) -> None:
        self.current: Job | None = None
        self.by_id: dict[str, Job] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def start(
        self,
        job: Job,
        work: Work,
        on_done: Callable[[Job], None],
        describe_error: Callable[[BaseException], str],
    ) -> Job:
        if self.current is not None and self.current.state == "running":
            raise Busy(self.current)
        self.current = job
        self.by_id[job.id] = job
        while len(self.by_id) > 50:
            del self.by_id[next(iter(self.by_id))]
        loop = asyncio.get_running_loop()
        ended = in_daemon_thread(functools.partial(work, job.progress, job.stop), f"console-{job.kind}")

        async def run() -> None:
            try:
                result = await ended
            except Exception as exc:
                job.error = describe_error(exc)
                # Asked to stop, it ends by saying where it stopped (an OpsError): not a failure.
                job.state = "stopped" if job.stop.is_set() else "failed"
            else:
                job.result = result_json(result)
                job.ends = dict(result.ends)
                job.state = "done"
                on_done(job)
            finally:
                job.finished = time.time()

        task = loop.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    def request_stop(self, job_id: str) -> Job | None:
        """Asks the running job (`job_id`, or "current") to stop after the record in hand; the job, or None
        when that is not the running one."""
        job = self.current
        if job is None or job.state != "running" or job_id not in ("current", job.id):
            return None
        if not job.stop.is_set():
            log.warning(f"console: {job.kind} {job.id} asked to stop", extra={"job": job.id})
            job.stop.set()
        return job

    async def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Asks the running job to stop after the record in hand and waits for it, `timeout_s` at most."""
        job = self.current
        if job is None or job.state != "running":
            return
        job.stop.set()
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=timeout_s)
        if pending:
            log.warning(
                f"console: the {job.kind} did not stop within {timeout_s:g} s; exiting without it",
                extra={"job": job.id},
            )
