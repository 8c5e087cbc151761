"""Run sentpipe's own processes (ingress, worker) as real subprocesses in tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from sentpipe.settings import Settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_on_a_terminal(
    args: list[str], env: dict[str, str], timeout: float = 120
) -> tuple[subprocess.CompletedProcess[str], bytes]:
    """Run `sentpipe ARGS` with stderr on a pseudo-terminal (where progress shows) and stdout a pipe: the
    finished process and everything its terminal showed."""
    import pty
    import threading

    terminal, stderr = pty.openpty()
    shown: list[bytes] = []

    def read_terminal() -> None:
        while True:
            try:
                chunk = os.read(terminal, 65536)
            except OSError:  # the other end closed
                return
            if not chunk:
                return
            shown.append(chunk)

    reader = threading.Thread(target=read_terminal, daemon=True)
    reader.start()
    try:
        res = subprocess.run(
            [sys.executable, "-m", "sentpipe", *args],
            env={**env, "TERM": "xterm", "COLUMNS": "250"},
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            timeout=timeout,
        )
    finally:
        os.close(stderr)
        reader.join(timeout=10)
        os.close(terminal)
    return res, b"".join(shown)


def settings_env(s: Settings, **extra: object) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SENTPIPE_")}
    for name, value in s.model_dump().items():
        if value is None:
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        if isinstance(value, list):
            import json

            value = json.dumps(value)
        env[f"SENTPIPE_{name.upper()}"] = str(value)
    env.update({f"SENTPIPE_{k.upper()}": str(v) for k, v in extra.items()})
    return env


class Proc:
    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.args, self.env, self.log = args, env, log
        self.p: subprocess.Popen[bytes] | None = None
        self.preexec: Callable[[], object] | None = None  # run in the child before it starts

    def start(self) -> Proc:
        fh = self.log.open("ab")
        self.p = subprocess.Popen(
            [sys.executable, "-m", "sentpipe", *self.args],
            env=self.env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # kill() takes its children along (role `all`'s projector process)
            preexec_fn=self.preexec,
        )
        return self

    def wait_http(self, url: str, timeout: float = 60.0) -> None:
        """Wait until `url` answers 200; fails at once if the process exits, else with the last answer."""
        deadline = time.monotonic() + timeout
        last: object = "no attempt"
        while True:
            assert self.p is not None
            if self.p.poll() is not None:
                raise RuntimeError(f"{self.args[0]} exited with {self.p.returncode}: {self.tail()}")
            try:
                with urllib.request.urlopen(url, timeout=1) as r:
                    if r.status == 200:
                        return
                    last = f"HTTP {r.status}"
            except OSError as exc:  # refused while starting, or an HTTPError (a status other than 2xx)
                last = exc
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{url} not ready after {timeout}s; last answer: {last!r}\n{self.tail()}")
            time.sleep(0.2)

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        if self.p is None or self.p.poll() is not None:
            return self.p.returncode if self.p else None
        self.p.send_signal(sig)
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            return self.p.wait(10)

    def kill(self) -> None:
        """SIGKILL to the process and its children, as a container's end kills every process in it."""
        if self.p is None or self.p.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.p.pid, signal.SIGKILL)
        self.p.wait(10)


def start_ingress(s: Settings, log_dir: Path, **extra: object) -> tuple[Proc, str, int]:
    if s.ingress_workers == 0:  # one process unless asked (the default is one per CPU)
        extra.setdefault("ingress_workers", 1)
    port, mport = free_port(), free_port()
    env = settings_env(s, ingress_host="127.0.0.1", ingress_port=port, ingress_metrics_port=mport, **extra)
    proc = Proc(["ingress"], env, log_dir / f"ingress-{port}.log").start()
    proc.wait_http(f"http://127.0.0.1:{port}/healthz")
    return proc, f"http://127.0.0.1:{port}", mport
