"""Per-request cost in CPU instructions: `sentpipe ingress` against the no-op handler, counted by callgrind.

Wall-clock ratios on a shared machine move a lot between identical runs (two A/A runs of the ingress here
differed by 13%); an instruction count moves by well under 1%. So this is the bench that says whether a
change made a request cheaper. It is not time: cache misses, contention and the kernel's share are not
counted, and valgrind runs everything about 50x slower, so only counts are reported, never rates.

Each server runs under valgrind's callgrind with one profile per thread. After a warm-up the counters are
zeroed, a fixed number of signed deliveries is sent (fixed concurrency, every one answered 200), and the
counters are dumped: instructions per request on the event loop (the main thread: what limits one
process) and in the other threads (librdkafka's, for the ingress).

What runs on a timer is overcounted: valgrind slows the server about 50x, so a timer that paces
per-request work fires far more often per request. The ingress has none on its hot path (delivery
reports come from the producer's report thread); trees before 2026-12-01's evening served them on an
event-loop tick and count high here (`bench.ingress_ab --base` with such a tree: compare wall clock).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from bench.common import REPO, Proc, ensure_debian_tool, run_id, settings_env, stopping
from bench.ingress import BENCH_SECRET
from bench.loadgen import Delivery, signed_pool
from bench.ui import BenchResult, Row, Ui
from sentpipe.processors.topics import ensure_topics
from sentpipe.settings import Settings
from tests.kafka_tools import delete_topics
from tests.processes import free_port
from tests.services import Services

UNIT = "instructions/request"
# Under valgrind a Python server takes tens of seconds to start.
START_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class InstructionsConfig:
    requests: int = 2000
    warmup: int = 300
    concurrency: int = 16


@dataclass(frozen=True)
class Count:
    main: int  # instructions per request on the main thread (the event loop)
    others: int  # ... in every other thread


def ensure_valgrind(log: Callable[[str], None]) -> str | None:
    """valgrind's path, installing Debian's package when missing and we may; None otherwise."""
    return ensure_debian_tool("valgrind", log)


async def _send(url: str, pool: list[Delivery], concurrency: int) -> int:
    """Post every delivery of `pool` once; how many were not answered 2xx."""
    queue = list(reversed(pool))
    failed = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal failed
        while queue:
            d = queue.pop()
            async with session.post(url, data=d.body, headers=d.headers) as resp:
                await resp.read()
                failed += resp.status >= 300

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return failed


def _totals(files: list[Path]) -> dict[int, int]:
    """Instructions by thread number in one callgrind dump (one file per thread)."""
    out: dict[int, int] = {}
    for f in files:
        text = f.read_text(errors="replace")
        thread = re.search(r"^thread: (\d+)$", text, re.M)
        total = re.search(r"^totals: (\d+)", text, re.M)
        if thread and total:
            out[int(thread.group(1))] = int(total.group(1))
    return out


def count(
    name: str,
    argv: list[str],
    env: dict[str, str] | None,
    base_url: str,
    ready: list[str],
    ctx: Counting,
    cwd: Path = REPO,
) -> Count:
    """Instructions per request of one server started by `argv` (in `cwd`) under callgrind."""
    cfg, ui, work = ctx.cfg, ctx.ui, ctx.work
    out = work / f"{name}.%p.out"
    cmd = [ctx.valgrind, "--tool=callgrind", "--separate-threads=yes", f"--callgrind-out-file={out}", *argv]
    proc = Proc(name, cmd, work / f"{name}.log", env, cwd=cwd)
    control = shutil.which("callgrind_control") or "callgrind_control"
    url = f"{base_url}/webhooks/sent"
    with stopping(proc):
        with ui.phase(f"instructions: start {name} under callgrind"):
            proc.start()
            for path in ready:
                proc.wait_http(f"{base_url}{path}", timeout=START_TIMEOUT_S)
        with ui.phase(f"instructions: {name} warm-up ({cfg.warmup} requests)"):
            failed = asyncio.run(_send(url, signed_pool(BENCH_SECRET, cfg.warmup, seed=3), cfg.concurrency))
        pool = signed_pool(BENCH_SECRET, cfg.requests, seed=4)
        subprocess.run([control, "--zero", str(proc.pid)], check=True, capture_output=True)
        with ui.phase(f"instructions: {name} measure ({cfg.requests} requests)"):
            failed += asyncio.run(_send(url, pool, cfg.concurrency))
        subprocess.run([control, "--dump", str(proc.pid)], check=True, capture_output=True)
        pid = proc.pid
    if failed:
        raise RuntimeError(f"{name}: {failed} requests were not answered 2xx (see {work / (name + '.log')})")
    by_thread = _totals(sorted(work.glob(f"{name}.{pid}.out.1-*")))
    if 1 not in by_thread:
        raise RuntimeError(f"{name}: no callgrind dump found in {work}")
    others = sum(v for k, v in by_thread.items() if k != 1)
    return Count(round(by_thread[1] / cfg.requests), round(others / cfg.requests))


@dataclass(frozen=True)
class Counting:
    cfg: InstructionsConfig
    valgrind: str
    ui: Ui
    work: Path
    kafka_bootstrap: str
    topic_prefix: str


def count_noop(ctx: Counting) -> Count:
    port = free_port()
    argv = [sys.executable, "-m", "bench.noop_server", str(port)]
    return count("reference", argv, None, f"http://127.0.0.1:{port}", ["/healthz"], ctx)


def count_ingress(ctx: Counting, name: str = "sentpipe", tree: Path = REPO) -> Count:
    """`sentpipe ingress` of `tree` (started there: `python -m` imports from the working directory)."""
    port = free_port()
    env = settings_env(
        {
            "kafka_bootstrap": ctx.kafka_bootstrap,
            "webhook_secret": BENCH_SECRET,
            "topic_prefix": ctx.topic_prefix,
            # Signed before the warm-up; the slow start under valgrind must not make them stale.
            "signature_tolerance_s": 3600,
            "produce_timeout_s": 60,
            "ingress_host": "127.0.0.1",
            "ingress_port": port,
            "ingress_metrics_port": free_port(),
            "ingress_workers": 1,
        }
    )
    argv = [sys.executable, "-m", "sentpipe", "ingress"]
    return count(name, argv, env, f"http://127.0.0.1:{port}", ["/healthz", "/readyz"], ctx, cwd=tree)


@contextlib.contextmanager
def counting(svc: Services, cfg: InstructionsConfig, ui: Ui, work: Path) -> Iterator[Counting | None]:
    """What `count` needs, with fresh topics deleted afterwards; None without valgrind."""
    valgrind = ensure_valgrind(ui.log)
    if valgrind is None:
        ui.log("instructions: valgrind is not installed and could not be installed: not measured")
        yield None
        return
    work.mkdir(parents=True, exist_ok=True)
    prefix = f"bench{run_id()}."
    settings = Settings(kafka_bootstrap=svc.kafka_bootstrap, topic_prefix=prefix, webhook_secret=BENCH_SECRET)
    with ui.phase(f"instructions: create topics {prefix}*"):
        ensure_topics(settings)
    try:
        yield Counting(cfg, valgrind, ui, work, svc.kafka_bootstrap, prefix)
    finally:
        delete_topics(svc.kafka_bootstrap, [prefix])


def run(svc: Services, cfg: InstructionsConfig, ui: Ui, work: Path) -> BenchResult | None:
    with counting(svc, cfg, ui, work) as ctx:
        if ctx is None:
            return None
        reference = count_noop(ctx)
        sentpipe = count_ingress(ctx)
    ratio = sentpipe.main / reference.main if reference.main else None
    notes = [
        f"callgrind, {cfg.requests:,} signed deliveries after {cfg.warmup} warm-up, {cfg.concurrency} "
        "concurrent; counts, not time (valgrind runs ~50x slower)",
        f"event-loop cost ratio sentpipe/reference: {ratio:.2f}x (one process's req/s ratio cannot exceed "
        f"about {1 / ratio:.2f} where it is CPU-bound)"
        if ratio
        else "event-loop cost ratio: -",
    ]
    return BenchResult(
        bench="instructions",
        title="ingress: CPU instructions per request (callgrind), one server process",
        unit=UNIT,
        latency_label="",
        reference=Row(
            "reference: no-op aiohttp handler", reference.main, None, None, {"others": reference.others}
        ),
        sentpipe=Row(
            "sentpipe ingress (verify + produce acks=all)",
            sentpipe.main,
            None,
            None,
            {"others": sentpipe.others},
        ),
        notes=notes,
        config={"requests": cfg.requests, "warmup": cfg.warmup, "concurrency": cfg.concurrency},
    )
