"""Did an ingress change make it faster? `python -m bench.ingress_ab --base REV`: the ingress of commit REV
(checked out in a temporary git worktree) against the ingress of this tree, and the no-op handler.
With `--instructions`, CPU instructions per request are counted instead (callgrind, bench/instructions.py):
one run each, and a difference of a percent is real, where the wall-clock rounds below need several percent.

Every round starts a fresh process for each contestant, in alternating order: one long-lived process per
contestant carries its own luck for the whole run (hash seeds, memory layout, which core it lands on), which
in one run here turned a +7% change into a -7% one. Fresh processes per round make the rounds independent.
Same pre-signed deliveries and `wrk` load as `--ingress`; one process each (SENTPIPE_INGRESS_WORKERS=1).
Each ingress starts in its own tree (checked before the first round: its `sentpipe` is imported from there).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from bench.common import REPO, Proc, console, run_id, service_pids, settings_env
from bench.ingress import BENCH_SECRET, IngressConfig, Measurement, measure
from bench.instructions import Count, InstructionsConfig, count_ingress, count_noop, counting
from bench.loadgen import Wrk, ensure_wrk
from bench.placement import PLACEMENTS, available, placed
from bench.ui import Ui
from sentpipe.processors.topics import ensure_topics
from sentpipe.settings import Settings
from tests.kafka_tools import delete_topics
from tests.processes import free_port
from tests.services import acquire


def _contestant(name: str, tree: Path | None, settings: Settings, work: Path) -> tuple[Proc, str, bool]:
    port = free_port()
    if tree is None:
        argv = [sys.executable, "-m", "bench.noop_server", str(port)]
        return Proc(name, argv, work / f"{name}.log"), f"http://127.0.0.1:{port}", False
    env = settings_env(
        {
            "kafka_bootstrap": settings.kafka_bootstrap,
            "webhook_secret": BENCH_SECRET,
            "topic_prefix": settings.topic_prefix,
            "signature_tolerance_s": settings.signature_tolerance_s,
            "ingress_host": "127.0.0.1",
            "ingress_port": port,
            "ingress_metrics_port": free_port(),
            "ingress_workers": 1,
        }
    )
    # Started in its tree: `python -m` looks in the working directory first, so this is the code that runs.
    argv = [sys.executable, "-m", "sentpipe", "ingress"]
    return Proc(name, argv, work / f"{name}.log", env, cwd=tree), f"http://127.0.0.1:{port}", True


def _imports_from(tree: Path) -> Path:
    out = subprocess.run(
        [sys.executable, "-c", "import sentpipe; print(sentpipe.__file__)"],
        cwd=tree,
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(out.stdout.strip()).resolve()


class _Refused(Exception):
    """A one-line reason the comparison cannot run."""


@contextlib.contextmanager
def _base_worktree(rev: str, work: Path) -> Iterator[Path]:
    """REV checked out in a temporary worktree, removed afterwards (with the work directory)."""
    tree = work / "base"
    try:
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), rev],
            check=True,
            capture_output=True,
        )
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(work, ignore_errors=True)
        raise _Refused(f"cannot check out {rev!r}: {exc.stderr.decode().strip()}") from None
    try:
        yield tree
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ingress_ab", description=__doc__)
    p.add_argument("--base", required=True, help="the commit to compare against (any git revision)")
    p.add_argument("--rounds", type=int, default=8, help="rounds, a fresh process per contestant each (8)")
    p.add_argument("--seconds", type=float, default=8.0, help="measurement per contestant and round (8)")
    p.add_argument("--warmup", type=float, default=3.0, help="warm-up before each measurement (3)")
    p.add_argument(
        "--placement",
        choices=PLACEMENTS,
        default="shared",
        help="shared (every process on every CPU) or isolated (the server's event loop alone on one CPU); "
        "see bench/placement.py",
    )
    p.add_argument(
        "--instructions",
        action="store_true",
        help="count CPU instructions per request with callgrind instead (one run each: counts do not drift)",
    )
    args = p.parse_args(argv)
    if args.placement not in available():
        print(f"error: the {args.placement} placement needs at least two CPUs", file=sys.stderr)
        return 2
    cfg = IngressConfig(
        seconds=args.seconds, warmup=args.warmup, rounds=args.rounds, placements=(args.placement,)
    )
    results: dict[str, list[Measurement]] = {"base": [], "this tree": [], "no-op": []}
    counts: dict[str, Count] = {}
    try:
        with _base_worktree(args.base, Path(tempfile.mkdtemp(prefix="sentpipe-ab-"))) as base_tree:
            for tree in (base_tree, REPO):
                if not _imports_from(tree).is_relative_to(tree.resolve()):
                    raise _Refused(f"a process started in {tree} does not import its sentpipe")
            if args.instructions:
                _count(base_tree, base_tree.parent, counts)
            else:
                _run(cfg, {"base": base_tree, "this tree": REPO, "no-op": None}, base_tree.parent, results)
    except _Refused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        console.print("[red]interrupted")
        return 1
    if args.instructions:
        _count_summary(args.base, counts)
    else:
        _summary(args.base, results)
    return 0


def _count(base_tree: Path, work: Path, counts: dict[str, Count]) -> None:
    svc = None
    try:
        with Ui() as ui:
            with ui.phase("services: Kafka broker and PostgreSQL"):
                svc = acquire()
            with counting(svc, InstructionsConfig(), ui, work / "instructions") as ctx:
                if ctx is None:
                    raise _Refused("valgrind is not installed and could not be installed")
                counts["base"] = count_ingress(ctx, "base", base_tree)
                counts["this tree"] = count_ingress(ctx, "this-tree", REPO)
                counts["no-op"] = count_noop(ctx)
    finally:
        if svc is not None:
            svc.close()


def _count_summary(base: str, counts: dict[str, Count]) -> None:
    from rich.table import Table

    table = Table(title=f"ingress A/B: instructions per request (callgrind), this tree against {base}")
    for col in ("", "event loop", "vs base", "other threads", "vs no-op"):
        table.add_column(col, justify="right" if col else "left")
    for name, c in counts.items():
        vs_base = f"{c.main / counts['base'].main - 1:+.1%}" if name != "base" else ""
        table.add_row(name, f"{c.main:,}", vs_base, f"{c.others:,}", f"{c.main / counts['no-op'].main:.2f}x")
    console.print(table)


def _run(
    cfg: IngressConfig, trees: dict[str, Path | None], work: Path, results: dict[str, list[Measurement]]
) -> None:
    svc = None
    try:
        with Ui() as ui:
            with ui.phase("services: Kafka broker and PostgreSQL"):
                svc = acquire()
            binary = ensure_wrk(ui.log)
            if binary is None:
                raise _Refused("wrk is not installed and could not be installed")
            load = Wrk(binary, work, cfg.threads, cfg.connections)
            settings = Settings(
                kafka_bootstrap=svc.kafka_bootstrap,
                topic_prefix=f"benchab{run_id()}.",
                webhook_secret=BENCH_SECRET,
                signature_tolerance_s=max(300, int(cfg.rounds * 3 * (cfg.seconds + cfg.warmup + 10))),
            )
            ensure_topics(settings)
            try:
                for rnd in range(cfg.rounds):
                    order = list(trees) if rnd % 2 == 0 else list(trees)[::-1]
                    for name in order:
                        proc, url, ingress = _contestant(name, trees[name], settings, work)
                        with contextlib.ExitStack() as stack:
                            stack.callback(proc.stop)
                            proc.start().wait_http(f"{url}/healthz")
                            if ingress:
                                proc.wait_http(f"{url}/readyz")
                            placement = cfg.placements[0]
                            stack.enter_context(
                                placed(placement, proc.pid, service_pids().get("kafka", []), ui.log)
                            )
                            url_in = f"{url}/webhooks/sent"
                            results[name].append(
                                measure(
                                    name, rnd, proc, url_in, cfg, load, ui, [], bench="ab", label=placement
                                )
                            )
            finally:
                delete_topics(svc.kafka_bootstrap, [settings.topic_prefix])
    finally:
        if svc is not None:
            svc.close()


def _summary(base: str, results: dict[str, list[Measurement]]) -> None:
    from rich.table import Table

    base_rps = statistics.median(m.load.rps for m in results["base"])
    table = Table(title=f"ingress A/B: this tree against {base}, one process each, fresh per round")
    for col in ("", "req/s (median)", "vs base", "loop CPU us/request", "p99 ms", "rounds won vs base"):
        table.add_column(col, justify="right" if col else "left")
    for name, ms in results.items():
        rps = statistics.median(m.load.rps for m in ms)
        cpu = statistics.median(m.cpu["main_thread"] / m.load.rps * 1e6 for m in ms if m.load.rps)
        won = (
            f"{sum(a.load.rps > b.load.rps for a, b in zip(ms, results['base'], strict=True))}/{len(ms)}"
            if name == "this tree"
            else ""
        )
        p99 = statistics.median(m.load.p99_ms for m in ms)
        table.add_row(name, f"{rps:,.0f}", f"{rps / base_rps:.3f}x", f"{cpu:.1f}", f"{p99:.1f}", won)
    console.print(table)


if __name__ == "__main__":
    raise SystemExit(main())
