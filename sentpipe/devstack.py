"""`make run`: the whole stack on this machine in the foreground; Ctrl-C stops what it started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path

from sentpipe.console import browser_url
from sentpipe.settings import DEVELOPMENT_SECRET, Settings

REPO = Path(__file__).resolve().parent.parent
KAFKA_SH = REPO / "deploy" / "kafka" / "kafka.sh"
POSTGRES_SH = REPO / "deploy" / "postgres" / "postgres.sh"


def _status(script: Path) -> bool:
    return subprocess.run([str(script), "status"], capture_output=True).returncode == 0


def _step(*cmd: str) -> None:
    if subprocess.run(cmd).returncode != 0:
        raise SystemExit(f"make run: step failed: {' '.join(cmd)}")


# How long the ingress and the worker get to answer before `make run` gives up (a first start of the broker
# and a worker recovering a large changelog can take a while).
READY_TIMEOUT_S = 120.0


def _http_problem(url: str) -> str | None:
    """None when `url` answers 200; otherwise what it did instead."""
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return None if resp.status == 200 else f"HTTP {resp.status}"
    except urllib.error.HTTPError as exc:
        body = exc.read(300).decode(errors="replace").strip()
        return f"HTTP {exc.code} {body}".strip()
    except urllib.error.URLError as exc:
        return str(exc.reason)
    except OSError as exc:
        return str(exc) or type(exc).__name__


def _wait_ready(
    checks: dict[str, str],
    procs: list[tuple[str, subprocess.Popen[bytes]]],
    stopping: Callable[[], bool],
    timeout: float = READY_TIMEOUT_S,
) -> str | None:
    """Poll every `name -> URL` until each answers 200; None when all do, else why not (one line)."""
    pending = dict(checks)
    last: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while pending and not stopping():
        for name, p in procs:
            if p.poll() is not None:
                return f"{name} exited with {p.returncode} before it was ready"
        for name, url in list(pending.items()):
            problem = _http_problem(url)
            if problem is None:
                del pending[name]
            else:
                last[name] = problem
        if pending and time.monotonic() >= deadline:
            return f"not ready after {timeout:.0f} s: " + "; ".join(
                f"{name} {url} answered: {last[name]}" for name, url in pending.items()
            )
        if pending:
            time.sleep(0.2)
    return None


def local_stack_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The settings that point sentpipe at the broker and database the launchers start, from the launchers'
    own variables (SENTPIPE_KAFKA_PORT, SENTPIPE_PG_PORT, SENTPIPE_LOCAL_DIR): with only those set, the
    stack started Kafka on the port asked for and then used whatever answered on 9092 and 5432. What is set
    explicitly stays."""
    derived = {}
    if "SENTPIPE_KAFKA_PORT" in environ:
        derived["SENTPIPE_KAFKA_BOOTSTRAP"] = f"127.0.0.1:{environ['SENTPIPE_KAFKA_PORT']}"
    if "SENTPIPE_PG_PORT" in environ:
        derived["SENTPIPE_DATABASE_URL"] = (
            f"postgresql://postgres@127.0.0.1:{environ['SENTPIPE_PG_PORT']}/sentpipe"
        )
    if "SENTPIPE_LOCAL_DIR" in environ:
        local = Path(environ["SENTPIPE_LOCAL_DIR"])
        derived |= {"SENTPIPE_SPOOL_DIR": str(local / "spool"), "SENTPIPE_DATA_DIR": str(local / "faust")}
    return {k: v for k, v in derived.items() if k not in environ}


def banner(s: Settings) -> str:
    """What `make run` prints once the stack is ready: where to send, with which secret, and how to try it."""
    url = f"http://127.0.0.1:{s.ingress_port}/webhooks/sent"
    # The secret the default tenant's deliveries are verified and `sentpipe send` signs with: the first one
    # SENTPIPE_SECRETS_FILE lists for it when it lists the tenant, else SENTPIPE_WEBHOOK_SECRET (the ingress
    # has already read the file, or it would not be ready).
    secret = s.tenant_secrets()[s.default_tenant][0]
    note = "  (built-in development secret)" if secret == DEVELOPMENT_SECRET else ""
    sign_in = "  (sign in with SENTPIPE_CONSOLE_TOKEN)" if s.console_token else ""
    return (
        f"\n  webhook URL   {url}\n"
        f"  secret        {secret}{note}\n"
        f"  metrics       http://127.0.0.1:{s.ingress_metrics_port}/metrics (ingress), "
        f"http://127.0.0.1:{s.worker_metrics_port}/metrics (worker)\n"
        f"  console       {browser_url(s.console_host, s.console_port)}{sign_in}\n"
        # With the URL: run from another terminal, without the ports `make run` was given, trigger posted to
        # the default port (connection refused, or another stack's ingress).
        f"  try           .venv/bin/sentpipe trigger message.status.updated {url}\n"
        f"  stop          Ctrl-C\n"
    )


def main() -> int:
    os.environ.update(local_stack_env(os.environ))
    s = Settings()
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    # Children run in their own sessions, so Ctrl-C reaches only this supervisor, which then stops them
    # in order (SIGTERM: the ingress drains and flushes, the worker commits) instead of all at once.
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    started: list[Path] = []
    for script in (KAFKA_SH, POSTGRES_SH):
        if not _status(script):
            _step(str(script), "start")
            started.append(script)
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []
    try:
        exe = [sys.executable, "-m", "sentpipe"]
        _step(*exe, "topics", "ensure")
        _step(*exe, "db", "migrate")
        # The ingress spools under .local/spool while the broker is away (unless SENTPIPE_SPOOL is set).
        envs = {
            "ingress": {"SENTPIPE_SPOOL": "on", **os.environ},
            "worker": os.environ.copy(),
            "console": os.environ.copy(),
        }
        for name, env in envs.items():
            procs.append((name, subprocess.Popen([*exe, name], env=env, start_new_session=True)))
        # The banner comes last, once both say they are ready, so start-up logs do not bury it.
        not_ready = _wait_ready(
            {
                "ingress": f"http://127.0.0.1:{s.ingress_port}/readyz",
                "worker": f"http://127.0.0.1:{s.worker_metrics_port}/readyz",
                "console": f"http://127.0.0.1:{s.console_port}/healthz",
            },
            procs,
            lambda: stopping,
        )
        if not_ready is not None:
            print(f"make run: {not_ready}; stopping (see the logs above)", file=sys.stderr, flush=True)
            return 1
        if stopping:
            print("\nmake run: stopping", flush=True)
            return 0
        print(banner(s), flush=True)
        while not stopping:
            for name, p in procs:
                if p.poll() is not None:
                    print(f"make run: {name} exited with {p.returncode}; stopping", file=sys.stderr)
                    return 1
            time.sleep(0.2)
        print("\nmake run: stopping", flush=True)
        return 0
    finally:
        for _, p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for _, p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        for script in reversed(started):
            subprocess.run([str(script), "stop"])


if __name__ == "__main__":
    sys.exit(main())
