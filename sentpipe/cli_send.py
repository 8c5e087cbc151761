"""`sentpipe send` and `sentpipe trigger`: parsing and printing; the work is in sentpipe.sender."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import resource
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Annotated
from urllib.parse import quote, urlsplit, urlunsplit

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from sentpipe.cli_base import (
    MAX_RATE,
    MAX_TIMEOUT_S,
    MIN_RATE,
    MIN_TIMEOUT_S,
    fail,
    fraction,
    out,
    per_second,
    print_untrusted_body,
    seconds,
    settings,
    sigterm_as_ctrl_c,
    terminal_safe,
    utf8,
    utf8_secret,
)
from sentpipe.schemas.events import EventType
from sentpipe.schemas.samples import Sample, SampleFactory
from sentpipe.schemas.signature import secret_key
from sentpipe.sender.delivery import (
    SENT_RETRY_SCHEDULE,
    Outcome,
    SigningMode,
    Stats,
    Unreachable,
    check_url,
    deliver,
    parse_schedule,
    probe,
    shown,
)
from sentpipe.sender.plan import (
    PLAN_WINDOW,
    ShapeChoice,
    iter_events,
    one_event,
    parse_shape,
    parse_status,
    parse_types,
    plan_deliveries,
    plan_stream,
    planned_deliveries,
    scan_jsonl,
    stream_jsonl,
)
from sentpipe.settings import Settings

DEFAULT_COUNT = 100
# Events are made as they are sent, so this bounds the run's length and its latency record (8 bytes per
# answered attempt), not what is held at once.
MAX_COUNT = 1_000_000
DEFAULT_CONCURRENCY = 8
# With --rate the pace is the limit; this only keeps a slow receiver from piling up unbounded work.
RATE_MODE_CONCURRENCY = 1000
MAX_CONCURRENCY = 10_000
# Options `send` and `trigger` share.
TenantOption = Annotated[
    str | None, typer.Option(callback=utf8, help="Post to URL/<tenant> with that tenant's secret.")
]
SecretOption = Annotated[
    list[str] | None,
    typer.Option(
        callback=utf8_secret,
        help="Signing secret whsec_...; repeat to sign with each, as Sent does while a secret is rotated "
        "\\[default: SENTPIPE_WEBHOOK_SECRET].",
    ),
]
UrlArgument = Annotated[
    str | None,
    typer.Argument(
        metavar="URL",
        callback=utf8,
        help="Webhook URL \\[default: http://127.0.0.1:$SENTPIPE_INGRESS_PORT/webhooks/sent].",
    ),
]
ShapeOption = Annotated[str, typer.Option(callback=utf8, help="Envelope: sent, guide or mixed.")]
# random.Random takes any int; a bound keeps a seed something a person can type and repeat.
MAX_SEED = 2**64 - 1


def _resolve_target(url: str | None, tenant: str | None, s: Settings) -> str:
    if url == "":  # `send "$URL"` with the variable unset: it posted to the local ingress instead
        fail("URL is empty: give the receiver's http(s) URL, or leave it out for the local ingress")
    base = f"http://127.0.0.1:{s.ingress_port}/webhooks/sent" if url is None else url
    if not tenant:
        return base
    # Onto the path: after a query string (`?x=1/acme`) it posted to the default tenant with acme's secret.
    parts = urlsplit(base)
    return urlunsplit(parts._replace(path=f"{parts.path.rstrip('/')}/{quote(tenant, safe='')}"))


def _resolve_secret(secret: list[str] | None, tenant: str | None, s: Settings) -> tuple[str, ...]:
    if secret is not None and "" in secret:
        fail("--secret is empty")
    if tenant == "":
        fail("--tenant is empty")
    if secret:
        return tuple(_usable(one, "--secret") for one in secret)
    try:
        tenants = s.tenant_secrets()
    except (OSError, ValueError) as exc:
        fail(f"cannot read SENTPIPE_SECRETS_FILE: {exc}")
    name = tenant or s.default_tenant
    if not tenants.get(name):
        # Signing with the default secret instead would test a tenant that does not exist as if it did. An
        # empty list (every secret rotated out) was an IndexError naming neither tenant nor file.
        fail(f"tenant {name!r} has no secret in SENTPIPE_SECRETS_FILE; add it there or pass --secret")
    # The first secret of a tenant is the one it signs with; the others are still accepted (rotation).
    return (_usable(tenants[name][0], s.secret_source(name, tenants[name])),)


def _usable(secret: str, source: str) -> str:
    # Named by where it came from, as the ingress names it at start: "webhook secret is not valid base64"
    # left the user to guess between --secret, the environment and the secrets file.
    try:
        secret_key(secret)
    except ValueError as exc:
        fail(f"{source}: {exc}")
    return secret


def _check_target(target: str) -> None:
    try:
        check_url(target)
    except ValueError as exc:
        fail(str(exc))


# Descriptors the process holds besides the request sockets: the interpreter, the file, the terminal.
RESERVED_FILES = 64


def _open_files_for(concurrency: int, explicit: bool) -> int:
    """The concurrency the open-file limit allows, the soft limit raised towards it first. Beyond the limit
    every new connection failed with "Too many open files", counted as the receiver's "connection error"
    and retried: `--rate`'s 1000 requests in flight passed the usual `ulimit -n` of 1024."""
    needed = concurrency + RESERVED_FILES
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        soft = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return concurrency
    if explicit or soft <= RESERVED_FILES:
        fail(
            f"--concurrency {concurrency} needs about {needed} open files, and this process may open {soft} "
            "(ulimit -n): lower --concurrency or raise the limit"
        )
    return soft - RESERVED_FILES


def _shape(text: str) -> ShapeChoice:
    try:
        return parse_shape(text)
    except ValueError as exc:
        fail(str(exc))


def _choice(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        fail(f"{name} must be one of {', '.join(valid)}, not {value!r}")


PROGRESS_BAR_WIDTH = 20


@contextmanager
def _live(total: int, console: Console) -> Iterator[Callable[[Stats], None]]:
    """A progress line on a terminal (stderr); nothing when output goes to a file or pipe."""
    if not console.is_terminal:
        yield lambda stats: None
        return
    # Within 80 columns for a million deliveries: wider, rich cut the columns down, the count first, and
    # an 80-column terminal showed 543210 of 1100000 as "54321…". Accepted is the count less not accepted.
    progress = Progress(
        TextColumn("sending"),
        BarColumn(bar_width=PROGRESS_BAR_WIDTH),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )
    task = progress.add_task("send", total=total, detail="")

    def update(stats: Stats) -> None:
        detail = f"not accepted {stats.not_accepted}  retried {stats.retried}"
        progress.update(task, completed=stats.done, detail=detail)

    with progress:
        yield update


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def _per_s(rate: float) -> str:
    return f"{rate:.0f}/s" if rate >= 10 else f"{rate:.2g}/s"


def summary_table(
    stats: Stats, unique: int, url: str, *, stopped: bool = False, rate: float | None = None
) -> Table:
    """The run's summary; `stopped`: cut short (Ctrl-C), so the events are those planned, not all sent;
    `rate`: the --rate asked for, shown beside the pace kept."""
    table = Table("", "", show_header=False)
    table.add_row("url", terminal_safe(shown(url)))
    table.add_row("events planned" if stopped else "events", str(unique))
    table.add_row("duplicates", str(stats.duplicates))
    table.add_row("sent", str(stats.sent))
    table.add_row("accepted", str(stats.accepted))
    if stats.spooled:
        table.add_row("  of which spooled", str(stats.spooled))
    table.add_row("retried", str(stats.retried))
    for outcome, n in sorted(stats.rejected.items()):
        table.add_row(terminal_safe(f"rejected {outcome}"), str(n))
    if not stats.rejected:
        table.add_row("rejected", "0")
    if stats.interrupted:
        table.add_row("interrupted", str(stats.interrupted))
    table.add_row("latency p50", _ms(stats.percentile(0.50)))
    table.add_row("latency p99", _ms(stats.percentile(0.99)))
    if rate is not None:
        kept = stats.send_rate
        table.add_row("rate", f"{'-' if kept is None else _per_s(kept)} of {_per_s(rate)} asked")
    done_rate = stats.done / stats.elapsed_s if stats.elapsed_s > 0 else 0.0
    table.add_row("elapsed", f"{stats.elapsed_s:.2f} s ({done_rate:.0f} deliveries/s)")
    return table


# Below this share of --rate, the run did not keep the pace asked for, and says so.
RATE_KEPT = 0.9


def _rate_note(stats: Stats, rate: float | None) -> str | None:
    """Why a run's pace fell short of --rate; None when it kept it (or there was none)."""
    kept = stats.send_rate
    if rate is None or kept is None or kept >= RATE_KEPT * rate:
        return None
    # The elapsed row's deliveries/s counts answers, retries' waits included: it did not tell a run that
    # fell behind --rate (every request slot busy, or this machine's CPU) from one that kept it.
    return (
        f"first attempts went out at {_per_s(kept)}, not the {_per_s(rate)} asked: the receiver's answers "
        "or this machine could not keep up"
    )


def _events(
    file: Path | None,
    types: list[str],
    shape: ShapeChoice,
    count: int | None,
    seed: int | None,
    skip: int,
    skip_bad: bool,
    err: Console,
    files: ExitStack,
) -> tuple[Iterable[Sample], int]:
    """The events to send and how many, both lazily, the first `skip` left out: a file is checked whole
    first (a bad line stops the run before anything is sent), then read again as its events are sent (a
    stream: from a copy of its events that `files` removes)."""
    try:
        chosen = parse_types(types)
    except ValueError as exc:
        fail(str(exc))
    if file is None:
        n = count or DEFAULT_COUNT
        if skip >= n:
            fail(f"--skip {skip} leaves none of the {n} events to send")
        # Made and dropped: with --seed the events after them are the same as in the run being resumed.
        return _passed_over(iter_events(SampleFactory(seed), chosen, shape, n), skip), n - skip
    # --file without --type sends every line, unrouted ones too (the ingress's dead-letter path).
    wanted = chosen if types else tuple(EventType)
    # Checked whole before the first event goes (about 5 s for 100 MB): on a terminal, a spinner says so
    # rather than nothing until the progress line.
    checking = err.status(terminal_safe(f"checking {file}")) if err.is_terminal else contextlib.nullcontext()
    try:
        with checking:
            scan = files.enter_context(scan_jsonl(file, skip_bad, wanted, count))
    except OSError as exc:
        fail(f"cannot read {file}: {exc.strerror or exc}")
    except ValueError as exc:  # a BadLine: its message starts with the line number
        fail(f"{file}: {exc} (use --on-bad-line skip to send the other lines)")
    for bad in scan.skipped:
        err.print(terminal_safe(f"skipped {file} {bad}"), soft_wrap=True)
    if not scan.events:
        # Before --skip is looked at: "--skip 0 leaves none of the 0 events" blamed an option never given.
        what = f"no {' or '.join(chosen)} events" if types else "no events"
        fail(f"{file} has {what} to send")
    n = scan.events if count is None else min(count, scan.events)
    if skip >= n:
        fail(f"--skip {skip} leaves none of the {n} events of {file} to send")
    # Read again as the events are sent: the file is never held in memory.
    return itertools.islice(_passed_over(stream_jsonl(scan.path, wanted), skip), n - skip), n - skip


def _passed_over(events: Iterator[Sample], skip: int) -> Iterator[Sample]:
    """`events` with the first `skip` read and dropped now. Dropped lazily, inside the run, they held its
    first deliveries back (15 us an event) and then `--rate`'s pacing sent the backlog all at once."""
    next(itertools.islice(events, skip, skip), None)
    return events


def _resume_hint(stats: Stats, skip: int, n_events: int) -> str | None:
    """How to send again from the first event not accepted; None when that is this run's first event (the
    same command again) or there is none."""
    if not 0 < stats.accepted_prefix < n_events:
        return None
    resume_at = skip + stats.accepted_prefix
    return f"every event before the first one not accepted was accepted: --skip {resume_at} sends the rest"


def send_command(
    url: UrlArgument = None,
    type_: Annotated[
        list[str] | None,
        typer.Option(
            "--type", callback=utf8, help="Canonical event type; repeat for several \\[default: all]."
        ),
    ] = None,
    shape: Annotated[
        str | None,
        typer.Option(
            callback=utf8, help="Envelope of the events made: sent, guide or mixed \\[default: sent]."
        ),
    ] = None,
    count: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=MAX_COUNT,
            help=f"Events to send, made as they are sent \\[default: {DEFAULT_COUNT}; all lines of --file].",
        ),
    ] = None,
    rate: Annotated[
        float | None,
        typer.Option(
            callback=per_second,
            help=f"Pace first attempts at this many deliveries per second, duplicates included"
            f" ({MIN_RATE:g} to {MAX_RATE:g}).",
        ),
    ] = None,
    concurrency: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=MAX_CONCURRENCY,
            help=f"Requests in flight at most \\[default: {DEFAULT_CONCURRENCY}; "
            f"{RATE_MODE_CONCURRENCY} with --rate].",
        ),
    ] = None,
    duplicates: Annotated[
        float,
        typer.Option(
            callback=fraction,
            help=f"Fraction of events delivered again, as new deliveries, at a random later point within "
            f"the same {PLAN_WINDOW:,} events.",
        ),
    ] = 0.0,
    shuffle: Annotated[
        bool,
        typer.Option(
            "--shuffle",
            help=f"Deliver each message's/template's events out of order (within each {PLAN_WINDOW:,} "
            "events).",
        ),
    ] = False,
    file: Annotated[
        Path | None, typer.Option(help="Send these events instead: one JSON object per line.")
    ] = None,
    on_bad_line: Annotated[
        str, typer.Option(callback=utf8, help="A malformed --file line: stop or skip.")
    ] = "stop",
    skip: Annotated[
        int,
        typer.Option(
            min=0,
            max=sys.maxsize,
            help="Leave out the first N events of --file (or of --seed's): resumes a run that stopped; its "
            "last lines say N.",
        ),
    ] = 0,
    bad_signature: Annotated[
        bool,
        typer.Option("--bad-signature", help="Sign with a wrong key; success means every event rejected."),
    ] = False,
    stale: Annotated[
        bool,
        typer.Option(
            "--stale", help="Sign with a two-day-old timestamp; success means every event rejected."
        ),
    ] = False,
    seed: Annotated[
        int | None,
        typer.Option(min=0, max=MAX_SEED, help="Seed for events, ids, duplicates and shuffling."),
    ] = None,
    tenant: TenantOption = None,
    secret: SecretOption = None,
    retry_schedule: Annotated[
        str | None,
        typer.Option(
            callback=utf8,
            help="Seconds between retries, e.g. 0.01,0.02 \\[default: Sent's 1,2,...,64].",
        ),
    ] = None,
    no_retry: Annotated[bool, typer.Option("--no-retry", help="One attempt per delivery.")] = False,
    timeout: Annotated[
        float,
        typer.Option(
            callback=seconds,
            help=f"Seconds before an attempt counts as timed out ({MIN_TIMEOUT_S:g} to {MAX_TIMEOUT_S:g}).",
        ),
    ] = 10.0,
) -> None:
    """Sign events exactly as Sent does and post them: duplicates, shuffling, retries, a summary."""
    shape_choice = _shape("sent" if shape is None else shape)
    _choice("--on-bad-line", on_bad_line, ("stop", "skip"))
    if file is not None and shape is not None:
        # A file's lines are sent byte for byte: a --shape would be ignored while the run passed.
        fail("--shape is for the events send makes; --file sends its lines as they are: choose one")
    if bad_signature and stale:
        fail("--bad-signature and --stale are separate tests; choose one")
    if no_retry and retry_schedule is not None:
        fail("--no-retry and --retry-schedule contradict each other; choose one")
    # Only a file or a seed makes the same events again; a run's own are new each time.
    resumable = file is not None or seed is not None
    if skip and not resumable:
        fail("--skip resumes a run of the same events: it needs --file or --seed")
    schedule: tuple[float, ...] = () if no_retry else SENT_RETRY_SCHEDULE
    if retry_schedule is not None:  # an empty one is refused, not taken for Sent's whole schedule
        try:
            schedule = parse_schedule(retry_schedule)
        except ValueError as exc:
            fail(str(exc))

    s = settings()
    err = Console(stderr=True)
    target = _resolve_target(url, tenant, s)
    signing_secret = _resolve_secret(secret, tenant, s)
    _check_target(target)
    mode = SigningMode.BAD_SIGNATURE if bad_signature else SigningMode.STALE if stale else SigningMode.VALID
    in_flight = _open_files_for(
        concurrency or (RATE_MODE_CONCURRENCY if rate else DEFAULT_CONCURRENCY), concurrency is not None
    )
    # From before the file is read: a SIGTERM while a stream was copied ended the process where it stood,
    # its temporary copy left behind.
    with sigterm_as_ctrl_c(), ExitStack() as files:
        samples, n_events = _events(
            file, type_ or [], shape_choice, count, seed, skip, on_bad_line == "skip", err, files
        )
        if not n_events:
            fail("no events to send")
        deliveries = plan_stream(samples, duplicates, shuffle, random.Random(seed))
        total = planned_deliveries(n_events, duplicates)

        async def main(on_update: Callable[[Stats], None]) -> Stats:
            await probe(target, timeout_s=min(timeout, 5.0))
            return await deliver(
                target,
                deliveries,
                signing_secret,
                total=total,
                schedule=schedule,
                concurrency=in_flight,
                rate=rate,
                timeout_s=timeout,
                mode=mode,
                on_update=on_update,
            )

        so_far: list[Stats] = []

        def progress(stats: Stats) -> None:
            so_far[:] = [stats]
            on_update(stats)

        try:
            with _live(total, err) as on_update:
                stats = asyncio.run(main(progress))
        except Unreachable as exc:
            fail(str(exc))
        except KeyboardInterrupt:
            # What was accepted before the interrupt: the progress line that said so is gone with it.
            if so_far:
                out.print(summary_table(so_far[0], n_events, target, stopped=True, rate=rate))
                hint = (
                    _resume_hint(so_far[0], skip, n_events)
                    if resumable and mode is SigningMode.VALID
                    else None
                )
                if hint:
                    err.print(hint, soft_wrap=True, highlight=False)
            raise

    out.print(summary_table(stats, n_events, target, rate=rate))
    if note := _rate_note(stats, rate):
        err.print(note, soft_wrap=True, highlight=False)
    if stats.done < total:  # the file shrank between its check and its sending
        fail(f"only {stats.done} of {total} planned deliveries were made: {file} changed while it was sent")
    if mode is not SigningMode.VALID:
        flag = "--" + mode.value.replace("_", "-")
        if stats.accepted:
            fail(f"{stats.accepted} of {stats.done} deliveries were accepted despite {flag}")
        # Only a 401 is the receiver refusing the signature: a 500 or no answer at all passed for one.
        other = {outcome: n for outcome, n in stats.rejected.items() if outcome != "401"}
        if other:
            shown = ", ".join(f"{outcome}: {n}" for outcome, n in sorted(other.items()))
            n = sum(other.values())
            fail(f"{n} of {stats.done} deliveries with {flag} were not refused with 401 ({shown})")
    elif stats.not_accepted:
        hint = _resume_hint(stats, skip, n_events) if resumable else None
        fail(
            f"{stats.not_accepted} of {stats.done} deliveries were not accepted"
            + (f"; {hint}" if hint else "")
        )


def trigger_command(
    type_: Annotated[
        str,
        typer.Argument(
            metavar="TYPE", callback=utf8, help="Canonical event type, e.g. message.status.updated."
        ),
    ],
    url: UrlArgument = None,
    shape: ShapeOption = "sent",
    status: Annotated[
        str | None,
        typer.Option(
            callback=utf8,
            help="Status of a message.status.updated (queued, routed, sent, failed, delivered, read) or "
            "template.approval.updated (pending, approved, rejected, paused) event.",
        ),
    ] = None,
    tenant: TenantOption = None,
    secret: SecretOption = None,
    seed: Annotated[
        int | None, typer.Option(min=0, max=MAX_SEED, help="Seed for a reproducible event.")
    ] = None,
    timeout: Annotated[
        float,
        typer.Option(
            callback=seconds,
            help=f"Seconds to wait for the answer ({MIN_TIMEOUT_S:g} to {MAX_TIMEOUT_S:g}).",
        ),
    ] = 10.0,
) -> None:
    """Send one realistic, signed event of TYPE and print it and the answer (one attempt, no retries)."""
    try:
        (event_type,) = parse_types([type_])
        checked_status = parse_status(event_type, status)
    except ValueError as exc:
        fail(str(exc))
    shape_choice = _shape(shape)
    s = settings()
    target = _resolve_target(url, tenant, s)
    signing_secret = _resolve_secret(secret, tenant, s)
    _check_target(target)
    sample = one_event(SampleFactory(seed), event_type, shape_choice, checked_status)
    (delivery,) = plan_deliveries([sample], 0.0, False, random.Random(seed))
    print_untrusted_body(out, sample.body)
    outcomes: list[Outcome] = []

    async def main() -> None:
        await probe(target, timeout_s=min(timeout, 5.0))
        await deliver(
            target, [delivery], signing_secret, schedule=(), timeout_s=timeout, on_outcome=outcomes.append
        )

    try:
        asyncio.run(main())
    except Unreachable as exc:
        fail(str(exc))
    final = outcomes[0].final
    out.print(terminal_safe(f"POST {shown(target)}  x-webhook-id {delivery.webhook_id}"), soft_wrap=True)
    if final.status is None:
        fail(f"no answer from {shown(target)}: {final.outcome}")
    out.print(f"HTTP {final.status}", highlight=False)
    print_untrusted_body(out, final.body)  # the receiver's answer: anything at all
    if not final.accepted:
        fail(f"event not accepted: HTTP {final.status}")
