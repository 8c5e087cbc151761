"""The test harness itself: a service that cannot start fails the run loudly, never skips it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_a_broker_that_cannot_start_fails_the_tests_with_the_reason(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SENTPIPE_")}
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")  # the launcher cannot create its state under a file
    env |= {
        "SENTPIPE_LOCAL_DIR": str(blocked),
        "SENTPIPE_KAFKA_PORT": "19093",
        "DOCKER_HOST": "unix:///nonexistent",
    }
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_foundation.py::test_topics_ensure_is_idempotent",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode != 0
    assert "test services unavailable: kafka.sh start failed" in res.stdout
    assert "skipped" not in res.stdout.splitlines()[-1]
