"""Where a bench's processes run: all on every CPU ("shared"), or the server's event loop alone on one CPU
("isolated").

On this kind of machine (two CPUs) the ingress bench runs the broker, the load generator and the server on
the same cores. Nothing like it happens in a deployment, where the broker has machines of its own: here the
broker's threads, librdkafka's and wrk's wake thousands of times a second, preempt the server's event loop
and evict its caches, so each request costs the loop more CPU than it would. "Isolated" gives the server's
main thread (one process: its event loop) the first CPU and moves everything else the bench controls (the
server's other threads, the broker, the load generator started from this process) to the others. Both
contestants are placed alike, and the kernel still runs what the bench does not control anywhere.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator

PLACEMENTS = ("shared", "isolated")


def split_cpus() -> tuple[set[int], set[int]] | None:
    """(the loop's CPU, every other CPU this process may use); None with fewer than two."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    return {cpus[0]}, set(cpus[1:])


def threads_of(pid: int) -> list[int]:
    """The thread ids of a process (empty once it is gone)."""
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


def _pin(tids: Iterable[int], cpus: set[int]) -> None:
    for tid in tids:
        # A thread may end between the listing and the call.
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(tid, cpus)


@contextlib.contextmanager
def isolated(server_pid: int, others: Iterable[int]) -> Iterator[None]:
    """Run the block with `server_pid`'s main thread alone on the first CPU and its other threads, the
    processes in `others` and this process (so the load generator it starts) on the rest; every CPU again
    afterwards. Threads started meanwhile inherit their creator's CPUs."""
    split = split_cpus()
    if split is None:
        raise RuntimeError("the isolated placement needs at least two CPUs")
    loop_cpu, rest = split
    everything = loop_cpu | rest
    others = list(others)
    _pin([server_pid], loop_cpu)
    _pin([t for t in threads_of(server_pid) if t != server_pid], rest)
    for pid in others:
        _pin(threads_of(pid), rest)
    own = threads_of(os.getpid())
    _pin(own, rest)
    try:
        yield
    finally:
        _pin(threads_of(server_pid), everything)
        for pid in others:
            _pin(threads_of(pid), everything)
        _pin(threads_of(os.getpid()), everything)


def placed(placement: str, server_pid: int, others: Iterable[int]) -> contextlib.AbstractContextManager[None]:
    """The context a measurement runs in for `placement` (one of PLACEMENTS)."""
    if placement == "shared":
        return contextlib.nullcontext()
    if placement == "isolated":
        return isolated(server_pid, others)
    raise ValueError(f"unknown placement {placement!r}; expected one of {', '.join(PLACEMENTS)}")


def available() -> tuple[str, ...]:
    """The placements this machine can run."""
    return PLACEMENTS if split_cpus() is not None else ("shared",)
