"""Progress display (rich) and the summary tables every bench prints."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from bench.common import console


class Ui:
    """One live progress display for the whole run; phases come and go as tasks."""

    def __init__(self, out: Console = console) -> None:
        self.console = out
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=out,
            transient=False,
        )

    def __enter__(self) -> Ui:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def log(self, message: str) -> None:
        self.progress.console.log(message)

    @contextmanager
    def phase(self, description: str, total: float | None = None) -> Iterator[Phase]:
        task = self.progress.add_task(description, total=total, info="")
        ph = Phase(self.progress, task)
        try:
            yield ph
            # An open-ended phase shows as 1/1 once done, so finished phases all read as complete.
            done = total if total is not None else 1
            self.progress.update(task, total=done, completed=done)
        finally:
            self.progress.stop_task(task)


@dataclass
class Phase:
    progress: Progress
    task: TaskID

    def update(self, completed: float, info: str = "") -> None:
        self.progress.update(self.task, completed=completed, info=info)


@dataclass
class Row:
    name: str
    rate: float | None
    p50_ms: float | None
    p99_ms: float | None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class BenchResult:
    bench: str
    title: str
    unit: str  # "requests/s" or "events/s"
    latency_label: str
    reference: Row
    sentpipe: Row
    notes: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    def ratios(self) -> dict[str, float | None]:
        def ratio(b: float | None, a: float | None) -> float | None:
            return None if a in (None, 0) or b is None else round(b / a, 3)

        s, r = self.sentpipe, self.reference
        return {
            "rate": ratio(s.rate, r.rate),
            "p50": ratio(s.p50_ms, r.p50_ms),
            "p99": ratio(s.p99_ms, r.p99_ms),
        }

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["ratio"] = self.ratios()
        return out


def _num(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def _cost_table(result: BenchResult) -> Table:
    """Costs per request (lower is better): the event loop's, the other threads', and their ratio."""
    t = Table(title=result.title, title_justify="left")
    t.add_column("")
    t.add_column(f"{result.unit}, event loop", justify="right")
    t.add_column("other threads", justify="right")
    for row in (result.reference, result.sentpipe):
        t.add_row(row.name, _num(row.rate, 0), _num(row.detail.get("others"), 0))
    ratio = result.ratios()["rate"]
    t.add_row("[bold]ratio sentpipe/reference", _num(ratio, 2) + ("x" if ratio is not None else ""), "")
    return t


def summary_table(result: BenchResult) -> Table:
    if result.unit == "instructions/request":
        return _cost_table(result)
    t = Table(title=result.title, title_justify="left")
    t.add_column("")
    t.add_column(result.unit, justify="right")
    t.add_column(f"p50 {result.latency_label}", justify="right")
    t.add_column(f"p99 {result.latency_label}", justify="right")
    for row in (result.reference, result.sentpipe):
        t.add_row(row.name, _num(row.rate, 0), _num(row.p50_ms, 2), _num(row.p99_ms, 2))
    ratios = result.ratios()
    t.add_row(
        "[bold]ratio sentpipe/reference",
        _num(ratios["rate"], 3),
        _num(ratios["p50"], 2) + ("x" if ratios["p50"] is not None else ""),
        _num(ratios["p99"], 2) + ("x" if ratios["p99"] is not None else ""),
    )
    return t


def print_summary(out: Console, result: BenchResult) -> None:
    out.print()
    out.print(summary_table(result))
    for note in result.notes:
        out.print(f"  [dim]{note}[/dim]")
