"""Replays and redrives started from the console: one at a time, in a thread, with progress.

The work is `processors.replay.replay` and `processors.dlq.redrive`, the functions `sentpipe replay` and
`sentpipe dlq redrive` call; this only runs them off the event loop and keeps their progress and result
for the page to poll. A real run must follow a finished dry run of exactly the same settings in the same
browser session (the fingerprint of the settings), so nobody replays or redrives without seeing the count.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from sentpipe.processors.replay import Progress, RunResult

Kind = Literal["replay", "redrive"]


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
        "already_redriven": result.already_redriven,
        "failed": result.failed,
        "selected": [[a, b, n] for (a, b), n in sorted(result.selected.items())],
        "failures": dict(sorted(result.failures.items())),
        "missing_ids": result.missing_ids,
    }


@dataclass
class Job:
    kind: Kind
    dry_run: bool
    fingerprint: str
    session_id: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    state: Literal["running", "done", "failed"] = "running"
    done: int = 0
    total: int | None = None
    started: float = field(default_factory=time.time)
    finished: float | None = None
    result: dict[str, Any] | None = None
    error: str | None = None

    def progress(self, done: int, total: int) -> None:  # called from the job's thread
        self.done, self.total = done, total

    def json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "dry_run": self.dry_run,
            "state": self.state,
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
        work: Callable[[Progress], RunResult],
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

        async def run() -> None:
            try:
                result = await loop.run_in_executor(None, work, job.progress)
            except Exception as exc:
                job.error = describe_error(exc)
                job.state = "failed"
            else:
                job.result = result_json(result)
                job.state = "done"
                on_done(job)
            finally:
                job.finished = time.time()

        task = loop.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job
