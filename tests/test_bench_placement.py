"""The ingress bench's "isolated" placement puts the threads where it says and gives them back afterwards."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from bench.placement import available, isolated, pin_threads, placed, split_cpus, threads_of

# A server stand-in: a main thread and two helper threads, all waiting.
SERVER = """
import threading, time
for _ in range(2):
    threading.Thread(target=time.sleep, args=(600,), daemon=True).start()
print("ready", flush=True)
time.sleep(600)
"""


@pytest.fixture
def server() -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    yield proc
    proc.kill()
    proc.wait()


@pytest.fixture
def bystander() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield proc
    proc.kill()
    proc.wait()


def affinities(pid: int) -> dict[int, set[int]]:
    return {tid: os.sched_getaffinity(tid) for tid in threads_of(pid)}


def test_the_isolated_placement_gives_the_loop_a_cpu_of_its_own_and_gives_back_what_each_process_had(
    server: subprocess.Popen[str], bystander: subprocess.Popen[bytes]
) -> None:
    everything = os.sched_getaffinity(0)
    split = split_cpus()
    if split is None:
        # One CPU: there is nothing to isolate, and the bench runs the shared placement only.
        assert available() == ("shared",)
        with pytest.raises(RuntimeError, match="two CPUs"), isolated(server.pid, [bystander.pid]):
            pass
        return
    loop_cpu, rest = split
    assert available() == ("shared", "isolated")
    assert len(threads_of(server.pid)) == 3
    # A process kept on some CPUs of its own (say, a broker restricted beforehand) gets those back.
    os.sched_setaffinity(bystander.pid, loop_cpu)
    with placed("isolated", server.pid, [bystander.pid]) as unmoved:
        assert unmoved == []
        server_threads = affinities(server.pid)
        assert server_threads.pop(server.pid) == loop_cpu
        assert server_threads and all(cpus == rest for cpus in server_threads.values())
        assert {frozenset(c) for c in affinities(bystander.pid).values()} == {frozenset(rest)}
        # This process, and so the load generator it starts, keeps off the loop's CPU.
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        try:
            time.sleep(0.05)
            assert os.sched_getaffinity(child.pid) == rest
        finally:
            child.kill()
            child.wait()
    for pid in (server.pid, os.getpid()):
        assert {frozenset(c) for c in affinities(pid).values()} == {frozenset(everything)}
    assert os.sched_getaffinity(bystander.pid) == loop_cpu


def test_a_process_that_cannot_be_moved_is_reported_not_fatal(server: subprocess.Popen[str]) -> None:
    # No CPU has this number: the call fails as it does for another user's process or a container's cpuset.
    nowhere = {max(os.sched_getaffinity(0)) + 4096}
    with pytest.raises(OSError):
        pin_threads([server.pid], nowhere)
    assert pin_threads([server.pid], nowhere, best_effort=True) is False
    assert pin_threads([server.pid], os.sched_getaffinity(0), best_effort=True) is True


def test_a_process_the_placement_cannot_reach_is_named_in_the_log(server: subprocess.Popen[str]) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lines: list[str] = []
    if split_cpus() is None:  # one CPU: nothing to isolate, and nothing is logged
        with (
            pytest.raises(RuntimeError, match="two CPUs"),
            placed("isolated", server.pid, [gone.pid], lines.append),
        ):
            pass
        assert lines == []
        return
    with placed("isolated", server.pid, [gone.pid], lines.append) as unmoved:
        assert unmoved == [gone.pid]
    assert lines == [f"isolated: could not move pids [{gone.pid}] off the loop's CPU"]


def test_the_shared_placement_moves_nothing(server: subprocess.Popen[str]) -> None:
    before = affinities(server.pid)
    with placed("shared", server.pid, []) as unmoved:
        assert unmoved == []
        assert affinities(server.pid) == before


def test_an_unknown_placement_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown placement 'pinned'"):
        placed("pinned", os.getpid(), [])
