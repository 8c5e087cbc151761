"""What every CLI module shares: the one-line error, the settings loader, the two consoles."""

from __future__ import annotations

import math
import os
import re
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Annotated, NoReturn, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.highlighter import JSONHighlighter
from rich.text import Text

from sentpipe.schemas import exact_json
from sentpipe.settings import Settings

# Wider than any row: a table's width is its content's, so this only stops cells being cut.
PIPE_WIDTH = 100_000


def stdout_console() -> Console:
    """The console for results. On a terminal Rich fits tables to it; written to a pipe or a file, where
    grep or a ticket reads them, a table must keep every cell whole and every row on one line: Rich's
    80 columns there cut topics, times and keys to "sent.event…" and folded each header onto its own
    line. COLUMNS, when set, is kept."""
    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=PIPE_WIDTH)
    return console


out = stdout_console()
err = Console(stderr=True)


class CliError(Exception):
    """A failure the user can act on; printed as one line."""


def fail(message: str) -> NoReturn:
    raise CliError(message)


def settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        if not first["loc"]:  # a rule across settings; its message names them
            fail(f"invalid settings: {first['msg'].removeprefix('Value error, ')}")
        # A list's item has its index in the location (handler_modules, 1): not part of the variable's name.
        name = "SENTPIPE_" + "_".join(p for p in first["loc"] if isinstance(p, str)).upper()
        items = "".join(f"item {p}: " for p in first["loc"] if isinstance(p, int))
        fail(f"invalid setting {name}: {items}{first['msg'].removeprefix('Value error, ')}")


# --- option values: one rule each, shared by every command that takes the option ---------------------------
# librdkafka takes socket timeouts from 10 ms to 300 s (socket.timeout.ms); outside that range the client
# refuses its own configuration with an error that blames the security settings. HTTP waits share the rule.
MIN_TIMEOUT_S = 0.01
MAX_TIMEOUT_S = 300.0
# A rate is paced as 1/rate seconds between first attempts: at the lowest, one every 1000 s.
MIN_RATE = 0.001
MAX_RATE = 100_000.0


def finite_range(low: float, high: float, unit: str) -> Callable[[float | None], float | None]:
    """A typer callback refusing a float outside [low, high], NaN and infinities included: typer's own
    min/max let infinity through, and answer NaN with a bound it does not break."""

    def check(value: float | None) -> float | None:
        if value is not None and not (math.isfinite(value) and low <= value <= high):
            raise typer.BadParameter(f"must be between {low:g} and {high:g}{unit}, not {value:g}")
        return value

    return check


seconds = finite_range(MIN_TIMEOUT_S, MAX_TIMEOUT_S, " seconds")
per_second = finite_range(MIN_RATE, MAX_RATE, " per second")
fraction = finite_range(0.0, 1.0, "")

TimeoutOption = Annotated[
    float,
    typer.Option(
        callback=seconds, help=f"Seconds to wait for the broker ({MIN_TIMEOUT_S:g} to {MAX_TIMEOUT_S:g})."
    ),
]

_Text = TypeVar("_Text", str, list[str], None)


def _not_utf8(value: str) -> bytes | None:
    """The argument's bytes when the OS gave undecodable ones (Python keeps them as lone surrogates)."""
    try:
        value.encode()
    except UnicodeEncodeError:
        try:
            return value.encode(errors="surrogateescape")
        except UnicodeEncodeError:  # a surrogate that stands for no byte
            return value.encode(errors="backslashreplace")
    return None


def utf8(value: _Text) -> _Text:
    """A typer callback refusing text arguments that are not UTF-8: they cannot go to Kafka, PostgreSQL or
    HTTP, and would otherwise fail deep inside with a UnicodeEncodeError."""
    for text in value if isinstance(value, list) else [value]:
        if text is not None and (raw := _not_utf8(text)) is not None:
            raise typer.BadParameter(f"{raw!r} is not valid UTF-8")
    return value


def utf8_secret(value: _Text) -> _Text:
    """`utf8` for a secret (or a repeated option's secrets): the error names the option, never the value."""
    for text in value if isinstance(value, list) else [value]:
        if text is not None and _not_utf8(text) is not None:
            raise typer.BadParameter("the secret is not valid UTF-8")
    return value


# What must not reach a terminal from a record: C0 and C1 control characters (ESC starts escape sequences,
# CR rewrites the line, 0x9b is CSI on its own), DEL, line/paragraph separators, bidi controls (they reorder
# what is shown), invisible format characters (two ids differing by a zero-width space looked the same; the
# joiners stay, emoji sequences and some scripts need them) and lone surrogates (they cannot be encoded).
_UNSAFE = (
    "\x00-\x08\x0b-\x1f\x7f-\x9f\u00ad\u061c\u180e\u200b\u200e\u200f\u2028-\u202e\u2060-\u2069"
    "\ufeff\ud800-\udfff"
)
_UNSAFE_IN_LINE = re.compile(f"[\t\n{_UNSAFE}]")
_UNSAFE_IN_LINES = re.compile(f"[{_UNSAFE}]")  # keeps tabs and line breaks


def _visible(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def terminal_safe(value: str | bytes, *, multiline: bool = False) -> Text:
    """Untrusted text (record keys, headers, bodies, error messages) fit to print: a Text, so Rich never
    reads it as markup or emoji codes, with every control character shown as an escape (ESC as \\x1b,
    U+202E as \\u202e). Tabs and line breaks are escaped too unless `multiline`."""
    text = value.decode(errors="replace") if isinstance(value, bytes) else value
    return Text((_UNSAFE_IN_LINES if multiline else _UNSAFE_IN_LINE).sub(_visible, text))


def print_untrusted_body(console: Console, body: bytes) -> None:
    """A body from a record or a remote server: JSON pretty-printed, other text as it is (both made safe
    with `terminal_safe`), an empty one not at all."""
    if not body:
        return
    pretty = exact_json.pretty(body)
    if pretty is None:
        console.print(terminal_safe(body, multiline=True), soft_wrap=True)
        return
    console.print(JSONHighlighter()(terminal_safe(pretty, multiline=True)), soft_wrap=True)


@contextmanager
def sigterm_as_ctrl_c() -> Iterator[None]:
    """SIGTERM (a job's timeout, `kill`) stops an operator command as Ctrl-C does: its cleanup runs and it
    says so. It ended the process where it stood, without a word, its temporary files left behind."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        # As SIGINT, not a KeyboardInterrupt raised here: in an event loop that lands in whichever task
        # runs (a traceback, "Task exception was never retrieved"), where asyncio's own SIGINT handler
        # cancels the main task and raises it cleanly.
        if callable(signal.getsignal(signal.SIGINT)):
            signal.raise_signal(signal.SIGINT)
        else:
            # SIGINT ignored, as a shell script's `cmd &` starts it: the raised SIGINT was dropped and the
            # SIGTERM with it, and the command ran to its end and exited 0.
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
