"""A child process that stops with the process that started it.

A parent killed with SIGKILL (or by the OOM killer) cannot stop its children: re-parented, they went on
serving, the projector holding its partitions and ingress workers their share of the port, beside the
set a restart started.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys

log = logging.getLogger("sentpipe")

# <linux/prctl.h>: the signal a process gets when the thread that made it ends. Both parents start their
# children from the main thread, which ends with the process.
PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int, parent: str, child: str) -> None:
    """SIGTERM from the kernel when `parent_pid` dies (Linux), whatever this process's loop is doing; a
    parent already gone is a one-line exit. SIGTERM is the child's own graceful stop."""
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))
    if os.getppid() != parent_pid:  # it died before the signal was asked for
        raise SystemExit(f"the {parent} process {parent_pid} is gone: {child} does not start")
