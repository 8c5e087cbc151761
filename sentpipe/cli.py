"""The `sentpipe` command: parsing and printing only; the work lives in ingress/ and processors/."""

from __future__ import annotations

import faulthandler
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from sentpipe.cli_base import (
    MAX_TIMEOUT_S,
    MIN_TIMEOUT_S,
    CliError,
    TimeoutOption,
    err,
    fail,
    out,
    print_untrusted_body,
    seconds,
    settings,
    sigterm_as_ctrl_c,
    terminal_safe,
    utf8,
)

if TYPE_CHECKING:
    from sentpipe.processors.inspect import Found
    from sentpipe.processors.replay import RunResult
    from sentpipe.settings import Settings

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Sent webhooks into Kafka, deduplicated.")
topics_app = typer.Typer(no_args_is_help=True, help="Kafka topics.")
db_app = typer.Typer(no_args_is_help=True, help="PostgreSQL schema.")
app.add_typer(topics_app, name="topics")
app.add_typer(db_app, name="db")


def _connect(s: Settings, timeout: float) -> None:
    """Every Kafka command starts here: a broker that refuses the security settings, or does not answer,
    is one line naming it (BrokerRefused / BrokerUnavailable, printed by `run`)."""
    from sentpipe.kafka import check_connection

    check_connection(s, timeout)


@app.command()
def ingress(
    host: Annotated[
        str | None, typer.Option(callback=utf8, help="Listen address [SENTPIPE_INGRESS_HOST].")
    ] = None,
    port: Annotated[
        int | None, typer.Option(min=0, max=65535, help="Webhook port [SENTPIPE_INGRESS_PORT].")
    ] = None,
    metrics_port: Annotated[
        int | None, typer.Option(min=0, max=65535, help="Metrics port [SENTPIPE_INGRESS_METRICS_PORT].")
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=256,
            help="Processes on the one port, their metrics served as one on the metrics port; "
            "0: one per available CPU [SENTPIPE_INGRESS_WORKERS, default 0].",
        ),
    ] = None,
) -> None:
    """Serve the webhook endpoint: verify, produce to Kafka, answer once durable."""
    from sentpipe.ingress.server import run
    from sentpipe.logs import configure

    s = settings()
    if workers is not None:
        s = s.model_copy(update={"ingress_workers": workers})
    configure(s.log_level, s.log_json)
    run(
        s,
        s.ingress_host if host is None else host,
        s.ingress_port if port is None else port,  # 0 is a port: the system picks one
        s.ingress_metrics_port if metrics_port is None else metrics_port,
    )


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def worker(
    ctx: typer.Context,
    role: Annotated[
        str | None,
        typer.Option(
            callback=utf8,
            help="all (both stages: the router here, the projector in a child process this worker starts "
            "and stops), route (dedup + routing) or project (projections + handlers) [SENTPIPE_WORKER_ROLE].",
        ),
    ] = None,
) -> None:
    """Run the stream processors (router on Faust, projector on librdkafka); extra arguments go to Faust."""
    import mode.loop

    from sentpipe.logs import configure, faust_log_level, faust_quiet_options
    from sentpipe.open_files import raise_open_files_limit
    from sentpipe.processors.handlers import load_modules
    from sentpipe.processors.projector_process import run_projector
    from sentpipe.processors.topics import (
        check_copartitioning,
        check_group_owns_prefix,
        check_no_other_group_reads,
        projections_group,
    )
    from sentpipe.processors.worker import create_app, restore_table

    s = settings()
    if role is not None:
        if role not in ("all", "route", "project"):
            fail(f"--role must be all, route or project, not {role!r}")
        s = s.model_copy(update={"worker_role": role})
    _check_faust_args(s.worker_role, ctx.args)
    configure(s.log_level, s.log_json)
    raise_open_files_limit()  # the dedup table's RocksDB files, the broker and database connections
    _connect(s, s.kafka_connect_timeout_s)
    if s.worker_role != "project":
        check_copartitioning(s)
        check_group_owns_prefix(s, s.app_id)
        check_no_other_group_reads(s, s.app_id)
    if s.worker_role != "route":
        check_group_owns_prefix(s, projections_group(s))
        check_no_other_group_reads(s, projections_group(s))
    load_modules(s.handler_modules)
    # /metrics, /livez and /readyz on SENTPIPE_WORKER_METRICS_PORT are served by the worker's own loop.
    if s.worker_role == "project":
        run_projector(s)  # librdkafka batches, no Faust: nothing of Faust's command line applies
        return
    _data_dir_ready(s.data_dir)  # the dedup table's files (the projector makes it only when it writes there)
    # Before anything makes a loop: Faust's own `-L uvloop` is read when `faust` is imported, long before.
    mode.loop.use("uvloop")
    faust_app = create_app(s)
    restore_table(faust_app, s)
    argv = list(ctx.args)
    if not any(a in ("-l", "--loglevel") or a.startswith("--loglevel=") for a in argv):
        argv += ["--loglevel", faust_log_level(s.log_level)]
    sys.argv = ["sentpipe worker", *faust_quiet_options(s.log_level), "worker", *argv]
    faust_app.main()


def _data_dir_ready(path: Path) -> None:
    """SENTPIPE_DATA_DIR made if missing; one line naming it when it cannot be: a file there ended the start
    with "FileExistsError: [Errno 17] File exists", which named neither the setting nor the trouble."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        fail(f"SENTPIPE_DATA_DIR {path} is not a directory")
    except OSError as exc:
        fail(f"SENTPIPE_DATA_DIR {path}: {exc.strerror or exc}")


def _check_faust_args(role: str, args: list[str]) -> None:
    """Faust's own options, checked before the broker is contacted, in one line: Faust's parser answered
    a typo only after the start-up checks, with a usage block naming `sentpipe worker worker`."""
    if not args:
        return
    if role == "project":  # no Faust in this process: an option would be silently ignored
        fail(f"--role project takes no Faust options, got {' '.join(args)!r}")
    import click
    from faust.cli.faust import cli as faust_cli

    try:
        faust_cli.commands["worker"].make_context("sentpipe worker", list(args))
    except click.ClickException as exc:
        fail(f"{exc.format_message()} (Faust's worker options: faust worker --help)")


@topics_app.command("ensure")
def topics_ensure(
    timeout: TimeoutOption = 10.0,
) -> None:
    """Create every topic sentpipe uses that does not exist yet and bring the retentions and record limits
    of those that do to what the settings ask for (idempotent)."""
    from sentpipe.processors.topics import ensure_topics

    s = settings()
    with _ops():
        _connect(s, timeout)
        states = ensure_topics(s, timeout=timeout)
    table = Table("topic", "partitions", "state", "changed", title=f"topics on {s.kafka_bootstrap}")
    for st in states:
        state = "created" if st.created else "updated" if st.changes else "exists"
        shown = (
            f"{c.key} {_config_value(c.key, c.before)} -> {_config_value(c.key, c.after)}" for c in st.changes
        )
        table.add_row(st.name, str(st.partitions), state, "\n".join(shown))
    out.print(table)


def _config_value(key: str, value: str) -> str:
    """A topic setting as a reader takes it in: a duration in its largest whole unit (30d, not 2592000000)."""
    if not key.endswith(".ms") or not value.lstrip("-").isdigit():
        return value
    ms = int(value)
    if ms < 0:
        return "forever"
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("min", 60_000), ("s", 1000)):
        if ms and ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


@db_app.command("migrate")
def db_migrate(
    lock_timeout: Annotated[
        float | None,
        typer.Option(
            callback=seconds,
            help="Seconds a migration waits for a table another session holds before it gives up, applying "
            f"nothing ({MIN_TIMEOUT_S:g} to {MAX_TIMEOUT_S:g}; default 10).",
        ),
    ] = None,
) -> None:
    """Apply the SQL migrations that have not been applied yet (idempotent)."""
    from sentpipe.processors.migrate import LOCK_TIMEOUT_S, migrate

    url = settings().database_url.get_secret_value()
    t0 = time.monotonic()

    def applying(version: str) -> None:
        # Said as it starts: building 0003's indexes over a large history takes minutes, said nothing before.
        out.print(f"{version}: applying", highlight=False)

    with sigterm_as_ctrl_c():
        result = migrate(url, LOCK_TIMEOUT_S if lock_timeout is None else lock_timeout, applying)
    table = Table("migration", "state", title=f"database migrations ({time.monotonic() - t0:.1f} s)")
    for version, applied in result:
        table.add_row(version, "applied" if applied else "already applied")
    out.print(table)


def _register_sender() -> None:
    from sentpipe.cli_send import send_command, trigger_command

    app.command("send")(send_command)
    app.command("trigger")(trigger_command)


_register_sender()


# --- operations: replay, DLQ, offsets, events ---------------------------------------------------------------
dlq_app = typer.Typer(no_args_is_help=True, help="The dead-letter topic: list, show and redrive records.")
offsets_app = typer.Typer(no_args_is_help=True, help="Consumer group offsets.")
events_app = typer.Typer(no_args_is_help=True, help="Single events across topics and tables.")
app.add_typer(dlq_app, name="dlq")
app.add_typer(offsets_app, name="offsets")
app.add_typer(events_app, name="events")
# Rows of one table on a terminal, and records read per partition: far above any use, and small enough that
# no count reaches a C integer or a buffer the size of the number.
MAX_LIST_LIMIT = 100_000
MAX_SCAN_LIMIT = 100_000_000


@contextmanager
def _ops(s: Settings | None = None) -> Iterator[None]:
    """Operations errors as one line; with settings, log lines go to stderr as the services' do."""
    from sentpipe.logs import configure
    from sentpipe.processors.offsets import OpsError

    if s is not None:
        configure(s.log_level, s.log_json)
    try:
        with sigterm_as_ctrl_c():
            yield
    except OpsError as exc:
        fail(str(exc))


@contextmanager
def _bar(label: str) -> Iterator[Callable[[int, int], None] | None]:
    """A progress bar on a terminal (stderr); nothing when stderr is a file or a pipe."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if not err.is_terminal:
        yield None
        return
    progress = Progress(
        TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err, transient=True
    )
    task = progress.add_task(label, total=None)

    def update(done: int, total: int) -> None:
        progress.update(task, completed=done, total=total)

    with progress:
        # Log lines written while the bar is up go through the bar's stderr proxy, above the bar.
        streams = [h for h in logging.getLogger().handlers if isinstance(h, logging.StreamHandler)]
        before = [h.setStream(sys.stderr) for h in streams]
        try:
            yield update
        finally:
            for h, stream in zip(streams, before, strict=True):
                if stream is not None:
                    h.setStream(stream)


def _when(ms: int | None) -> str:
    from datetime import UTC, datetime

    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _text(data: bytes | None) -> str:
    return "-" if data is None else data.decode(errors="replace")


def _cell(value: object) -> str:
    from sentpipe.processors.inspect import json_text

    return "-" if value is None else str(json_text(value))


def _run_summary(title: str, result: RunResult, sent_label: str, target: str) -> None:
    """The end-of-run tables of replay and redrive."""
    dry = result.dry_run
    out.print(title + (" (dry run: nothing produced)" if dry else ""), highlight=False)
    table = Table("", "", show_header=False)
    table.add_row("read", str(result.read))
    table.add_row(
        f"would be {sent_label}" if dry else sent_label,
        str(sum(result.selected.values()) if dry else result.produced),
    )
    table.add_row("skipped by filter", str(result.skipped))
    if result.past_retention:
        table.add_row("past retention (deleted before it was read)", str(result.past_retention))
    if result.start_past_retention:
        table.add_row(
            "window starts past retention (partitions; older records deleted)",
            ", ".join(map(str, result.start_past_retention)),
        )
    if result.already_redriven:
        table.add_row("already taken by an earlier redrive", str(result.already_redriven))
    table.add_row("would fail" if dry else "failed", str(result.failed))
    for reason, n in sorted(result.failures.items()):
        table.add_row(terminal_safe(f"  {reason}"), str(n))
    if result.kept:
        table.add_row("cannot be redriven (left in the DLQ)", str(result.kept.total()))
        for reason, n in sorted(result.kept.items()):
            table.add_row(terminal_safe(f"  {reason}"), str(n))
    if result.unrecorded:  # counted above too, as redriven or failed: not part of the sum
        table.add_row(
            "sent, not in the ledger (the next redrive sends them again)", str(result.unrecorded.total())
        )
    out.print(table)
    if result.selected:
        by = Table(*target.split("/"), "records", title=("would be " if dry else "") + sent_label)
        for (a, b), n in sorted(result.selected.items()):
            by.add_row(terminal_safe(a), terminal_safe(b), str(n))
        out.print(by)


@app.command()
def replay(
    since: Annotated[
        str | None, typer.Option(callback=utf8, help="Records written at or after this ISO-8601 time.")
    ] = None,
    until: Annotated[
        str | None, typer.Option(callback=utf8, help="Records written before this ISO-8601 time.")
    ] = None,
    from_offset: Annotated[
        list[str] | None,
        typer.Option(
            callback=utf8,
            metavar="PART:OFF",
            help="Read partition PART from offset OFF (repeatable; only named partitions).",
        ),
    ] = None,
    to_offset: Annotated[
        list[str] | None,
        typer.Option(
            callback=utf8,
            metavar="PART:OFF",
            help="Read partition PART up to offset OFF, inclusive (repeatable).",
        ),
    ] = None,
    type_: Annotated[
        list[str] | None,
        typer.Option(
            "--type",
            callback=utf8,
            metavar="TYPE",
            help="Only this canonical type, e.g. message.status.updated (repeatable).",
        ),
    ] = None,
    tenant: Annotated[
        list[str] | None, typer.Option(callback=utf8, metavar="TENANT", help="Only this tenant (repeatable).")
    ] = None,
    event_id: Annotated[
        list[str] | None, typer.Option(callback=utf8, metavar="ID", help="Only this event id (repeatable).")
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="Count what would be replayed; produce nothing.")] = False,
    timeout: TimeoutOption = 10.0,
) -> None:
    """Route raw events again, straight to the routed topics, so every projection applies them again.

    Reads the raw topic up to its end at start.

    Malformed records count as failed; the router dead-lettered each when it arrived (stage route).
    """
    from sentpipe.processors.offsets import make_window
    from sentpipe.processors.replay import Filter, parse_types
    from sentpipe.processors.replay import failure_line as replay_failure_line
    from sentpipe.processors.replay import replay as run_replay
    from sentpipe.schemas.events import searched_id_problem

    for option, values in (("--tenant", tenant), ("--event-id", event_id)):
        for value in values or ():
            if (problem := searched_id_problem(value)) is not None:
                fail(f"{option} {problem}")
    s = settings()
    with _ops(s):
        window = make_window(
            since=since, until=until, from_offsets=from_offset or (), to_offsets=to_offset or ()
        )
        flt = Filter(parse_types(type_ or ()), frozenset(tenant or ()), frozenset(event_id or ()))
        _connect(s, timeout)
        with _bar("replaying") as progress:
            result = run_replay(s, window, flt, dry_run=dry_run, progress=progress, timeout=timeout)
    _run_summary(f"replay {result.run_id}", result, "replayed", "type/tenant")
    if result.failed and not dry_run:
        fail(replay_failure_line(result))
    if result.missing_ids:  # asked for by id and not replayed: a script must not read that as done
        # An id in the window but of another type or tenant than asked is passed over as one outside it.
        also = " or not of the --type/--tenant asked" if type_ or tenant else ""
        fail(f"not found in the window{also}: {', '.join(result.missing_ids)}")


@dlq_app.command("list")
def dlq_list(
    limit: Annotated[
        int, typer.Option(min=1, max=MAX_LIST_LIMIT, help="Show at most this many (the newest).")
    ] = 50,
    since: Annotated[
        str | None, typer.Option(callback=utf8, help="Dead-lettered at or after this ISO-8601 time.")
    ] = None,
    reason: Annotated[
        list[str] | None,
        typer.Option(callback=utf8, metavar="CLASS", help="Only this error class (repeatable)."),
    ] = None,
    stage: Annotated[
        list[str] | None, typer.Option(callback=utf8, metavar="STAGE", help="Only this stage (repeatable).")
    ] = None,
    all_: Annotated[
        bool, typer.Option("--all", help="Also the records a redrive already took (column 'redriven by').")
    ] = False,
    timeout: TimeoutOption = 10.0,
) -> None:
    """Dead-lettered records no redrive took yet, oldest first; ID is partition:offset in the DLQ topic."""
    from sentpipe.processors.dlq import list_entries, make_selection

    s = settings()
    with _ops():
        sel = make_selection(reasons=reason or (), stages=stage or (), since=since)
        _connect(s, timeout)
        with _bar("reading the DLQ") as progress:
            listing = list_entries(
                s, sel, limit=limit, timeout=timeout, include_redriven=all_, progress=progress
            )
    columns = ["ID", "time", "stage", "error", "event / key", "type", "tenant", "original", "attempts"]
    table = Table(*columns, *(["redriven by"] if all_ else []))
    for e in listing.entries:
        orig = e.original
        table.add_row(
            e.id,
            _when(e.dead_at_ms),
            terminal_safe(e.stage),
            terminal_safe(e.error_class),
            terminal_safe(e.event_id or f"key {_text(e.key)}"),
            terminal_safe(e.type or "-"),
            terminal_safe(e.tenant or "-"),
            terminal_safe(f"{orig[0]}:{orig[1]}:{orig[2]}" if orig else "-"),
            str(e.attempts),
            *([terminal_safe(e.redriven_by or "-")] if all_ else []),
        )
    out.print(table)
    taken = "" if all_ or not listing.redriven else f"; {listing.redriven} more a redrive took (--all)"
    out.print(
        f"{len(listing.entries)} shown, {listing.matched} matching, {listing.total} in the DLQ{taken}",
        highlight=False,
    )


@dlq_app.command("show")
def dlq_show(
    entry_id: Annotated[
        str, typer.Argument(callback=utf8, metavar="ID", help="partition:offset, as `dlq list` shows.")
    ],
    timeout: TimeoutOption = 10.0,
) -> None:
    """One dead-lettered record: every header, then the value (JSON pretty-printed)."""
    from sentpipe.processors.dlq import parse_entry_id, show_entry

    s = settings()
    with _ops():
        parse_entry_id(entry_id)  # a malformed ID is refused before the broker is asked, not after
        _connect(s, timeout)
        e = show_entry(s, entry_id, timeout=timeout)
    title = terminal_safe(f"DLQ {e.id}  written {_when(e.timestamp_ms)}  key {_text(e.key)}")
    table = Table("header", "value", title=title)
    for name, value in e.headers:
        table.add_row(terminal_safe(name), terminal_safe(value))
    out.print(table)
    if e.redriven_by is not None:
        out.print(
            terminal_safe(f"taken by redrive {e.redriven_by}: no redrive takes it again"), highlight=False
        )
    print_untrusted_body(out, e.value)


@dlq_app.command("redrive")
def dlq_redrive(
    id_: Annotated[
        list[str] | None,
        typer.Option("--id", callback=utf8, metavar="ID", help="Only this record ID (repeatable)."),
    ] = None,
    reason: Annotated[
        list[str] | None,
        typer.Option(callback=utf8, metavar="CLASS", help="Only this error class (repeatable)."),
    ] = None,
    stage: Annotated[
        list[str] | None, typer.Option(callback=utf8, metavar="STAGE", help="Only this stage (repeatable).")
    ] = None,
    since: Annotated[
        str | None, typer.Option(callback=utf8, help="Dead-lettered at or after this ISO-8601 time.")
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="Count what would be redriven; produce nothing.")] = False,
    timeout: TimeoutOption = 10.0,
) -> None:
    """Send dead-lettered records back into the pipeline (one pass over the DLQ as it is now).

    Raw bodies (stages ingress, route, replay) are routed again.

    Canonical events (stages project, handler) go back to the routed topic they came from.

    A record that fails again is dead-lettered again with one more attempt.
    """
    from sentpipe.processors.dlq import make_selection, redrive, redrive_failed

    s = settings()
    with _ops(s):
        sel = make_selection(ids=id_ or (), reasons=reason or (), stages=stage or (), since=since)
        _connect(s, timeout)
        with _bar("redriving") as progress:
            result = redrive(s, sel, dry_run=dry_run, progress=progress, timeout=timeout)
    _run_summary(f"redrive {result.run_id}", result, "redriven", "stage/topic")
    if (why := redrive_failed(result, sel)) is not None:
        fail(why)


@offsets_app.command("reset")
def offsets_reset(
    group: Annotated[
        str, typer.Option(callback=utf8, help="Consumer group; the worker's is SENTPIPE_APP_ID.")
    ],
    to_datetime: Annotated[
        str | None, typer.Option(callback=utf8, help="The first offset at or after this ISO-8601 time.")
    ] = None,
    to_earliest: Annotated[bool, typer.Option(help="The oldest offset still kept.")] = False,
    to_latest: Annotated[bool, typer.Option(help="The end: skip everything there is now.")] = False,
    topic: Annotated[
        list[str] | None,
        typer.Option(
            callback=utf8,
            metavar="TOPIC",
            help="Only this topic (repeatable); default: every topic the group has.",
        ),
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="Show the new offsets; change nothing.")] = False,
    timeout: TimeoutOption = 10.0,
) -> None:
    """Move a consumer group's committed offsets to reprocess (or skip); refused while it has members
    (a --dry-run shows the new offsets anyway)."""
    from sentpipe.processors.offsets import (
        ResetTo,
        group_problem,
        parse_when,
        reset_group_offsets,
        reset_note,
    )

    if (problem := group_problem(group)) is not None:
        fail(problem)
    s = settings()
    if [to_datetime is not None, to_earliest, to_latest].count(True) != 1:
        fail("choose exactly one of --to-datetime, --to-earliest, --to-latest")
    with _ops():
        to: ResetTo = "earliest" if to_earliest else "latest"
        if to_datetime is not None:
            to = parse_when(to_datetime, "--to-datetime")
        _connect(s, timeout)
        changes, busy = reset_group_offsets(s, group, to, topic or (), dry_run=dry_run, timeout=timeout)
    title = f"group {group}: " + ("new offsets (dry run, nothing changed)" if dry_run else "offsets reset")
    table = Table("topic", "partition", "before", "after", title=title)
    for c in changes:
        table.add_row(c.topic, str(c.partition), "-" if c.before is None else str(c.before), str(c.after))
    out.print(table)
    if (note := reset_note(s, group)) is not None:
        err.print(f"note: {note}", markup=False, highlight=False)
    if busy is not None:
        err.print(terminal_safe(f"note: {busy}"), soft_wrap=True)


spool_app = typer.Typer(
    no_args_is_help=True, help="The ingress's local spool (SENTPIPE_SPOOL=on): status, and a drain pass."
)
app.add_typer(spool_app, name="spool")
SpoolDirOption = Annotated[
    list[Path] | None,
    typer.Option(
        "--dir",
        help="A process's spool directory, or a directory of them (repeatable) \\[default: every one under "
        "SENTPIPE_SPOOL_DIR].",
    ),
]


def _spool_dirs(dirs: list[Path] | None) -> list[Path]:
    from sentpipe.ingress.spool import SpoolError, process_dirs, spool_dirs_at

    if dirs:
        try:
            return [found for d in dirs for found in spool_dirs_at(d)]
        except SpoolError as exc:
            fail(str(exc))
    root = settings().spool_dir
    if root.exists() and not root.is_dir():
        # A file there read as "no spool directories", exit 0: all clear, for a spool that is not where it
        # was looked for.
        fail(f"SENTPIPE_SPOOL_DIR {root} is not a directory")
    return process_dirs(root)


@spool_app.command("status")
def spool_status(dirs: SpoolDirOption = None) -> None:
    """Records waiting in each spool directory; exit status 0 even when some wait."""
    from sentpipe.ingress.spool import status_of

    found = _spool_dirs(dirs)
    table = Table(
        "directory", "in use", "segments", "records", "bytes", "oldest", "corrupt frames", "refused by broker"
    )
    for d in found:
        st = status_of(d)
        oldest = "-" if st.oldest_age_s is None else f"{st.oldest_age_s:.0f} s ago"
        table.add_row(
            terminal_safe(str(d)),
            "yes" if st.in_use else "no",
            str(st.segments),
            str(st.records),
            str(st.bytes),
            oldest,
            str(st.corrupt_frames),
            str(st.refused),
        )
    if not found:
        out.print(terminal_safe(f"no spool directories under {settings().spool_dir}"))
        return
    out.print(table)


@spool_app.command("drain")
def spool_drain(dirs: SpoolDirOption = None, timeout: TimeoutOption = 10.0) -> None:
    """One pass: produce what spool directories no ingress holds have to Kafka, deleting what lands.

    A running ingress drains its own spool; this is for directories left behind (a pod that will not come
    back, a volume mounted elsewhere). Exit status 1 when anything is left or corrupt frames were skipped."""
    import asyncio

    from sentpipe.ingress.spool import drain_directories

    s = settings()
    with _ops(s):
        found = _spool_dirs(dirs)
        _connect(s, timeout)
        with _bar("draining") as progress:
            outcomes = asyncio.run(drain_directories(s, found, progress))
    table = Table("directory", "outcome", "drained", "left", "corrupt frames", title="spool drain")
    for o in outcomes:
        table.add_row(terminal_safe(str(o.dir)), o.state, str(o.drained), str(o.remaining), str(o.corrupt))
    out.print(table)
    stopped = [o for o in outcomes if o.state in ("interrupted", "not_reached")]
    if stopped:
        drained = sum(o.drained for o in outcomes)
        fail(
            f"interrupted after {drained} of {drained + sum(o.remaining for o in stopped)} record(s) drained;"
            " the rest are still spooled: run it again to go on"
        )
    problems = []
    left = [o for o in outcomes if o.state == "incomplete"]
    if left:
        problems.append(
            f"{sum(o.remaining for o in left)} record(s) left: the broker refused them; run it again"
        )
    in_use = [o for o in outcomes if o.state == "in_use"]
    if in_use:
        n = len(in_use)
        problems.append(f"{n} director{'y is' if n == 1 else 'ies are'} held by a running ingress")
    corrupt = [o for o in outcomes if o.corrupt]
    if corrupt:
        # The drain skips what it cannot read and deletes the segment once past it: those records are gone,
        # which a clean exit would hide.
        problems.append(
            f"{sum(o.corrupt for o in corrupt)} corrupt frame(s) skipped in {len(corrupt)} "
            f"director{'y' if len(corrupt) == 1 else 'ies'}: what they held was not produced"
        )
    if problems:
        fail("; ".join(problems))


@events_app.command("show")
def events_show(
    event_id: Annotated[str, typer.Argument(callback=utf8, metavar="EVENT_ID")],
    scan_limit: Annotated[
        int,
        typer.Option(
            min=1,
            max=MAX_SCAN_LIMIT,
            help="Read at most this many of the newest records per partition searched.",
        ),
    ] = 200_000,
    timeout: TimeoutOption = 10.0,
) -> None:
    """Where an event is: raw record(s), dedup table, routed record(s), database rows, DLQ entries."""
    from sentpipe.processors.inspect import locate
    from sentpipe.schemas.events import searched_id_problem

    problem = searched_id_problem(event_id)
    if problem is not None:
        fail(f"EVENT_ID {problem}")
    s = settings()
    with _ops():
        _connect(s, timeout)
        # Up to --scan-limit records per partition read, seconds of them: on a terminal, not in silence.
        with _bar("looking for the event"):
            rep = locate(s, event_id, scan_limit=scan_limit, timeout=timeout)

    def records(title: str, found: list[Found]) -> None:
        table = Table("topic", "partition", "offset", "time", "key", "headers", title=title)
        for f in found:
            hdrs = ", ".join(f"{k}={_text(v)}" for k, v in f.headers.items())
            table.add_row(
                f.topic,
                str(f.partition),
                str(f.offset),
                _when(f.timestamp_ms),
                terminal_safe(_text(f.key)),
                terminal_safe(hdrs),
            )
        out.print(table if found else f"{title}: none", highlight=False)

    records("raw record(s)", rep.raw)
    if rep.dedup_topic is None:
        out.print("dedup table: no changelog topic (the worker has not run)", highlight=False)
    elif rep.dedup is None:
        out.print(f"dedup table: not in {rep.dedup_topic}", highlight=False)
    else:
        d = rep.dedup
        # Per tenant: the table marks (id, tenant) pairs, so a tenant not listed would have its copy routed.
        marked = ", ".join(f"{terminal_safe(t)} (first routed {_when(ms)})" for t, ms in d.tenants.items())
        state = (
            "tombstone (swept out of the dedup window)"
            if d.tombstone
            else f"seen for tenant {marked}; not for any other tenant"
            if marked
            else f"seen, first routed {_when(d.first_routed_ms)}"
        )
        out.print(f"dedup table: {state}  ({d.topic}:{d.partition}:{d.offset})", highlight=False)
    records("routed record(s)", rep.routed)
    if rep.db_error is not None:
        out.print(terminal_safe(rep.db_error))
    for table_name, rows in rep.rows.items():
        if not rows:
            continue
        table = Table(*rows[0].keys(), title=f"database: {table_name}")
        for row in rows:
            table.add_row(*(terminal_safe(_cell(v)) for v in row.values()))
        out.print(table)
    if rep.rows and not any(rep.rows.values()):
        out.print("database: no rows", highlight=False)
    dlq = Table("ID", "time", "stage", "error", "attempts", title="DLQ entries")
    for e in rep.dlq:
        dlq.add_row(
            e.id, _when(e.dead_at_ms), terminal_safe(e.stage), terminal_safe(e.error_class), str(e.attempts)
        )
    out.print(dlq if rep.dlq else "DLQ entries: none", highlight=False)
    for note in rep.notes:
        out.print(terminal_safe(f"searched {note}"), style="dim", soft_wrap=True)
    if rep.db_error is not None:
        fail(rep.db_error)
    if not rep.found:
        fail(f"event {event_id} not found")


@app.command()
def console(
    host: Annotated[
        str | None, typer.Option(callback=utf8, help="Listen address [SENTPIPE_CONSOLE_HOST].")
    ] = None,
    port: Annotated[int | None, typer.Option(min=0, max=65535, help="Port [SENTPIPE_CONSOLE_PORT].")] = None,
) -> None:
    """Serve the web console: overview, live events, event trace, search, dead letters, replay.

    Anything but a loopback address needs SENTPIPE_CONSOLE_TOKEN.
    """
    from sentpipe.console import CannotListen, check_bind, run
    from sentpipe.logs import configure

    s = settings()
    host = s.console_host if host is None else host
    try:
        check_bind(host, s.console_token.get_secret_value() if s.console_token else None)
    except ValueError as exc:
        fail(str(exc))
    configure(s.log_level, s.log_json)
    sign_in = "sign in with SENTPIPE_CONSOLE_TOKEN" if s.console_token else "no token: this machine only"
    try:
        run(
            s,
            host,
            s.console_port if port is None else port,
            lambda url: out.print(f"console on {url} ({sign_in})", highlight=False),
        )
    except CannotListen as exc:
        fail(str(exc))


def _one_line_text(text: str) -> str:
    return " ".join(text.split())


def _one_line(exc: BaseException) -> str:
    text = _one_line_text(str(exc)) or type(exc).__name__
    return text if len(text) < 300 else text[:297] + "..."


def _interrupted() -> int:
    # Requests in flight when the loop stopped are coroutines never awaited: Python warned of each as the
    # process exited, lines after this one that ask nothing of the user (`sys:1: RuntimeWarning: ...`).
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
    err.print("interrupted")
    return 130


def run(main: Callable[[], Any]) -> int:
    """Run the CLI with errors as one line on stderr; SENTPIPE_DEBUG=1 shows tracebacks."""
    try:
        # A tenth of a second of loading (psycopg's types, librdkafka): a Ctrl-C in it was a traceback.
        import psycopg
        from confluent_kafka import KafkaException

        from sentpipe.kafka import BrokerUnavailable
        from sentpipe.processors.handlers import HandlerModuleError
        from sentpipe.processors.migrate import MigrationError
        from sentpipe.processors.restore import StoreUnusable
        from sentpipe.processors.topics import CopartitioningError
    except KeyboardInterrupt:
        return _interrupted()

    try:
        # Typer answers Ctrl-C outside standalone mode by returning 130, not raising: without this, every
        # command interrupted ended with status 0 and no word.
        rc = main()
        if rc == 130:
            _interrupted()
        if isinstance(rc, int) and not isinstance(rc, bool):
            return rc
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    except KeyboardInterrupt:
        return _interrupted()
    except (
        CliError,
        BrokerUnavailable,
        CopartitioningError,
        HandlerModuleError,
        MigrationError,
        StoreUnusable,
    ) as exc:
        err.print(terminal_safe(f"error: {exc}"), soft_wrap=True)
        return 1
    except psycopg.OperationalError as exc:
        err.print(terminal_safe(f"error: database unavailable: {_one_line(exc)}"), soft_wrap=True)
        return 1
    except KafkaException as exc:
        err.print(terminal_safe(f"error: Kafka: {_one_line(exc)}"), soft_wrap=True)
        return 1
    except Exception as exc:
        # Typer vendors its own click, so its usage errors are recognised by shape, not class.
        if type(exc).__name__ == "Abort":
            return _interrupted()
        format_message = getattr(exc, "format_message", None)
        if callable(format_message) and isinstance(getattr(exc, "exit_code", None), int):
            message = _one_line_text(str(format_message()))
            # A group named without its command: click has printed the group's help, and says no more.
            what = message or "a command is missing: choose one of those listed above"
            err.print(terminal_safe(f"error: {what} (see --help)"), soft_wrap=True)
            return int(exc.exit_code)  # type: ignore[attr-defined]
        if os.environ.get("SENTPIPE_DEBUG"):
            raise
        err.print(terminal_safe(f"error: {type(exc).__name__}: {_one_line(exc)}"), soft_wrap=True)
        return 1
    return 0


def main() -> None:
    # A crash inside a C library (librdkafka, RocksDB) leaves a Python traceback on stderr, not a bare exit.
    faulthandler.enable()
    sys.exit(run(lambda: app(standalone_mode=False)))
