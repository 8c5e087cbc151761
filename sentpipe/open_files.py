"""The process's limit on open files, raised to what the system allows before anything opens many."""

from __future__ import annotations

import logging
import resource

log = logging.getLogger("sentpipe")


def raise_open_files_limit() -> tuple[int, int]:
    """Raise the soft limit on open files to the hard one, as Go's runtime does at start; (before, after).

    Under systemd's soft default of 1,024 (the hard limit is 524,288 there): every ingress connection is a
    descriptor, and a burst of deliveries got connections reset at accept; every RocksDB partition of the
    worker's dedup table holds six before its first data file, and a worker given 170 partitions stopped
    with "Too many open files". Child processes inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == resource.RLIM_INFINITY or soft >= hard:
        return soft, soft  # unlimited: nothing to raise, and Linux refuses an infinite soft limit
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):  # a sandbox that forbids it: the soft limit stands
        return soft, soft
    log.info("open files limit raised", extra={"soft_before": soft, "soft": hard})
    return soft, hard
