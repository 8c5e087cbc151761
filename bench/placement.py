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
from collections.abc import Callable, Iterable, Iterator

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


def pin_threads(tids: Iterable[int], cpus: set[int], best_effort: bool = False) -> bool:
    """Move the threads; False when one could not be moved (only with `best_effort`: another user's
    process, or CPUs outside its container's set)."""
    moved = True
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cpus)
        except ProcessLookupError:  # it ended between the listing and the call
            pass
        except OSError:
            if not best_effort:
                raise
            moved = False
    return moved


@contextlib.contextmanager
def isolated(
    server_pid: int, others: Iterable[int], log: Callable[[str], None] | None = None
) -> Iterator[list[int]]:
    """Run the block with `server_pid`'s main thread alone on the first CPU and its other threads, the
    processes in `others` and this process (so the load generator it starts) on the rest. Yields the pids
    of `others` that could not be moved; afterwards each process's threads get back the CPUs its main
    thread had. Threads started meanwhile inherit their creator's CPUs. One server process: the threads
    of its children stay where they are."""
    split = split_cpus()
    if split is None:
        raise RuntimeError("the isolated placement needs at least two CPUs")
    loop_cpu, rest = split
    own = os.getpid()
    before = {pid: os.sched_getaffinity(pid) for pid in (server_pid, own)}
    unmoved: list[int] = []
    for pid in others:
        if pid in before:
            continue
        try:
            before[pid] = os.sched_getaffinity(pid)
        except OSError:  # gone, or not ours to read: it stays where it is
            unmoved.append(pid)
    try:
        pin_threads([server_pid], loop_cpu)
        pin_threads([t for t in threads_of(server_pid) if t != server_pid], rest)
        pin_threads(threads_of(own), rest)
        for pid in before:
            if pid not in (server_pid, own) and not pin_threads(threads_of(pid), rest, best_effort=True):
                unmoved.append(pid)
        if unmoved and log is not None:
            log(f"isolated: could not move pids {unmoved} off the loop's CPU")
        yield unmoved
    finally:
        for pid, cpus in before.items():
            pin_threads(threads_of(pid), cpus, best_effort=pid not in (server_pid, own))


def placed(
    placement: str, server_pid: int, others: Iterable[int], log: Callable[[str], None] | None = None
) -> contextlib.AbstractContextManager[list[int]]:
    """The context a measurement runs in for `placement` (one of PLACEMENTS); it yields the pids of
    `others` it could not move, and says so through `log`."""
    if placement == "shared":
        return contextlib.nullcontext([])
    if placement == "isolated":
        return isolated(server_pid, others, log)
    raise ValueError(f"unknown placement {placement!r}; expected one of {', '.join(PLACEMENTS)}")


def available() -> tuple[str, ...]:
    """The placements this machine can run."""
    return PLACEMENTS if split_cpus() is not None else ("shared",)
