"""`python -m bench` (`make bench`): run every bench (ingress, instructions, naive, pipeline, recovery), print
tables, save JSON.

These are comparisons, not tests: nothing here asserts on timings.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import platform
import shutil
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any

import orjson

from bench import ingress, instructions, naive, pipeline, placement, recovery
from bench.common import LOCAL, REPO, console, jsonable
from bench.ui import BenchResult, Ui, print_summary
from tests.services import acquire


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="shorter runs and 10,000 pipeline events")
    only = p.add_mutually_exclusive_group()
    only.add_argument("--ingress", dest="only", action="store_const", const="ingress", help="ingress only")
    only.add_argument("--pipeline", dest="only", action="store_const", const="pipeline", help="pipeline only")
    only.add_argument(
        "--naive",
        dest="only",
        action="store_const",
        const="naive",
        help="ingress --workers N vs the naive Flask+PostgreSQL receiver with N workers only",
    )
    only.add_argument(
        "--instructions",
        dest="only",
        action="store_const",
        const="instructions",
        help="CPU instructions per request (callgrind), ingress vs the no-op handler, only",
    )
    only.add_argument(
        "--recovery", dest="only", action="store_const", const="recovery", help="dedup table recovery only"
    )
    g = p.add_argument_group("ingress")
    g.add_argument("--seconds", type=float, help="measurement length per server (20; quick 8)")
    g.add_argument("--warmup", type=float, help="warm-up before each measurement (5; quick 3)")
    g.add_argument("--rounds", type=int, help="alternating rounds, median reported (2; quick 1)")
    g.add_argument("--connections", type=int, default=64, help="concurrent connections (64)")
    g.add_argument("--threads", type=int, default=2, help="wrk threads (2)")
    g.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto")
    g.add_argument(
        "--placement",
        choices=(*placement.PLACEMENTS, "both"),
        default="both",
        help="shared: every process on every CPU; isolated: the server's event loop alone on one CPU; "
        "both (the default; isolated needs two CPUs): a table each",
    )
    g.add_argument(
        "--workers", type=int, default=2, help="processes each for the naive-receiver comparison (2)"
    )
    g = p.add_argument_group("pipeline")
    g.add_argument("--events", type=int, help="events pushed into the raw topic (50,000; quick 10,000)")
    g.add_argument("--latency-rate", type=float, help="paced events/s for end-to-end latency (200)")
    g.add_argument("--latency-seconds", type=float, help="length of the paced phase (15; quick 6)")
    g = p.add_argument_group("recovery")
    g.add_argument("--ids", type=int, help="ids in the dedup changelog (1,000,000; quick 200,000)")
    p.add_argument("--keep", action="store_true", help="keep work files (pools, logs) under .local/bench")
    return p.parse_args(argv)


def configs(args: argparse.Namespace) -> tuple[ingress.IngressConfig, pipeline.PipelineConfig]:
    q = args.quick
    ic = ingress.IngressConfig(
        seconds=args.seconds or (8.0 if q else 20.0),
        warmup=args.warmup or (3.0 if q else 5.0),
        rounds=args.rounds or (1 if q else 2),
        connections=args.connections,
        threads=args.threads,
        loadgen=args.loadgen,
        placements=placement.available() if args.placement == "both" else (args.placement,),
    )
    pc = pipeline.PipelineConfig(
        events=args.events or (10_000 if q else 50_000),
        latency_rate=args.latency_rate or 200.0,
        latency_seconds=args.latency_seconds or (6.0 if q else 15.0),
    )
    return ic, pc


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.placement != "both" and args.placement not in placement.available():
        print(f"error: the {args.placement} placement needs at least two CPUs", file=sys.stderr)
        return 2
    # Ctrl-C and SIGTERM (e.g. `timeout`) both unwind through the finally blocks that stop our processes;
    # set explicitly because a shell starts background jobs with SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    ic, pc = configs(args)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    work = LOCAL / f"run-{stamp}"
    out_path = LOCAL / f"results-{stamp}.json"
    results: list[BenchResult] = []
    extra: dict[str, Any] = {}
    failed = False
    svc = None
    try:
        with Ui() as ui:
            with ui.phase("services: Kafka broker and PostgreSQL"):
                svc = acquire()
            if args.only in (None, "ingress"):
                results.extend(ingress.run(svc, ic, ui, work / "ingress"))
            if args.only in (None, "instructions"):
                counted = instructions.run(svc, instructions.InstructionsConfig(), ui, work / "instructions")
                if counted is not None:
                    results.append(counted)
            if args.only in (None, "naive"):
                results.append(naive.run(svc, ic, args.workers, ui, work / "naive"))
            if args.only in (None, "pipeline"):
                results.append(pipeline.run(svc, pc, ui, work / "pipeline"))
            if args.only in (None, "recovery"):
                ids = args.ids or (200_000 if args.quick else 1_000_000)
                extra["recovery"] = recovery.run(svc, recovery.RecoveryConfig(ids), ui, work / "recovery")
    except KeyboardInterrupt:
        console.print("[red]interrupted: processes stopped, partial results below")
        failed = True
    except Exception as exc:
        console.print(f"[red]bench failed: {type(exc).__name__}: {exc}")
        console.print(f"[dim]logs under {work}")
        failed = True
        args.keep = True
    finally:
        if svc is not None:
            svc.close()
    for r in results:
        print_summary(console, r)
    if results or extra:
        _save(out_path, args, results, extra)
        shown = out_path.relative_to(REPO) if out_path.is_relative_to(REPO) else out_path
        console.print(f"\nresults: {shown}")
    if not args.keep:
        with contextlib.suppress(OSError):
            shutil.rmtree(work)
    return 1 if failed else 0


def _save(path: Path, args: argparse.Namespace, results: list[BenchResult], extra: dict[str, Any]) -> None:
    doc: dict[str, Any] = {
        "started": path.stem.removeprefix("results-"),
        "argv": sys.argv[1:],
        "quick": args.quick,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "node": platform.node()},
        "results": {**{r.bench: r.as_json() for r in results}, **extra},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(jsonable(doc), option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    sys.exit(main())
