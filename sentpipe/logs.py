"""Logging setup shared by every process: plain text, or one JSON object per line."""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
from collections.abc import Callable, Hashable, Mapping
from typing import Any

import orjson

from sentpipe.settings import LOG_LEVEL_NAMES

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if _has_exception(record):
            out["exc"] = self.formatException(record.exc_info)  # type: ignore[arg-type]
        return orjson.dumps(out, default=str).decode()


def _has_exception(record: logging.LogRecord) -> bool:
    """`exc_info=True` outside an `except` (mode's supervisor restarting an agent) holds no exception: its
    traceback would be the words "NoneType: None" (in text, a line of their own)."""
    exc_info = record.exc_info
    return exc_info is not None and exc_info[0] is not None


# An extra's value longer than this is cut: an id from a record could be kilobytes long.
EXTRA_MAX_CHARS = 512


def _one_line(value: object) -> str:
    """An extra's value as it may appear on a text line: values come from records (an event id, a tenant),
    and a newline in one forged a log line of its own."""
    text = str(value)
    if len(text) > EXTRA_MAX_CHARS:
        text = text[:EXTRA_MAX_CHARS] + "..."
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def _printable(char: str) -> str:
    return char if char.isprintable() else char.encode("unicode_escape").decode("ascii")


class TextFormatter(logging.Formatter):
    def formatMessage(self, record: logging.LogRecord) -> str:
        # A message is one line: libpq's errors carry a second ("\n\tIs the server running on that host
        # ...?"), and a value from a record with a newline in it would forge a line of its own. A traceback
        # (exc_info) is added after this, on its own lines.
        # Other control characters (an event id's ESC [2J clears the terminal the log is read on, U+202E
        # turns the rest of the line around) are shown as escapes, as in the extras.
        if not record.message.isprintable():
            line = " ".join(part.strip() for part in record.message.splitlines())
            record.message = line if line.isprintable() else "".join(map(_printable, line))
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info and not _has_exception(record):
            record.exc_info = None
        base = super().format(record)
        extra = " ".join(f"{k}={_one_line(v)}" for k, v in vars(record).items() if k not in _STANDARD)
        return f"{base} {extra}" if extra else base


# Faust's `--loglevel` choices are crit, error, warn, info and debug. Its "crit" is no level Python's logging
# knows (mode resolves names with logging.getLevelName), so the worker's logging setup fails and the worker
# hangs: CRITICAL runs Faust at "error", the strictest level it can set up.
_FAUST_LEVELS = {"DEBUG": "debug", "INFO": "info", "WARNING": "warn", "ERROR": "error", "CRITICAL": "error"}


def faust_log_level(level: str) -> str:
    """Faust's `--loglevel` name for a log level name (Python's, or any spelling Settings accepts)."""
    name = LOG_LEVEL_NAMES.get(level.strip().upper())
    if name is None:
        raise ValueError(f"unknown log level {level!r}")
    return _FAUST_LEVELS[name]


def faust_quiet_options(level: str) -> list[str]:
    """Faust's global options for a log level: its start-up banner (a table on stdout) only at DEBUG."""
    return [] if faust_log_level(level) == "debug" else ["--quiet"]


# Loggers whose INFO records Faust's log formatter draws as multi-line tables at start-up and on every
# rebalance: subscriptions, assigned partitions, changelog highwaters and offsets, recovery progress.
_TABLE_LOGGERS = (
    "aiokafka.consumer.consumer",
    "aiokafka.consumer.subscription_state",
    "aiokafka.consumer.group_coordinator",
    "faust.agents.agent",
    "faust.tables.recovery",
)


def _is_table(arg: object) -> bool:
    if isinstance(arg, str):  # drawn already (faust.utils.terminal.logtable)
        return "\n+" in arg and "\n|" in arg
    # Topics and partitions: Faust's formatter draws non-empty collections of them as tables.
    return isinstance(arg, set | frozenset | list | tuple | Mapping) and len(arg) > 0


class TablesAtDebug(logging.Filter):
    """Moves the table-drawing INFO records of Faust and aiokafka to DEBUG (a logger filter: Faust's worker
    replaces the root handlers with its own, but leaves other loggers' filters alone)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else (record.args,)
        if record.levelno == logging.INFO and any(_is_table(a) for a in args):
            record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
        return True


class NowAndThen:
    """At most one line of each kind per `every_s`; the next one logged says how many were left out."""

    # Kinds remembered: a library that logs formatted text as its template makes a new kind of each line.
    MAX_KINDS = 1000

    def __init__(self, every_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._every_s, self._clock = every_s, clock
        self._seen: dict[Hashable, tuple[float, int]] = {}  # kind -> (logged at, left out since)
        self._lock = threading.Lock()  # loggers are called from librdkafka's and Faust's threads too

    def admit(self, kind: Hashable) -> int | None:
        """None: leave this line out. Else log it, with the number of lines of its kind left out before it."""
        now = self._clock()
        with self._lock:
            logged_at, left_out = self._seen.get(kind, (-math.inf, 0))
            if now - logged_at < self._every_s:
                self._seen[kind] = (logged_at, left_out + 1)
                return None
            if kind not in self._seen and len(self._seen) >= self.MAX_KINDS:
                self._seen.clear()
            self._seen[kind] = (now, 0)
            return left_out


# aiokafka (Faust's client) logs every failed attempt while a broker is away: 1,690 ERROR lines in a 15 s
# outage, against librdkafka's few (see sentpipe.kafka). Each module's logger: a filter sees only the
# records of the logger it is on.
_RETRYING_LOGGERS = (
    "aiokafka",
    "aiokafka.cluster",
    "aiokafka.conn",
    "aiokafka.consumer.consumer",
    "aiokafka.consumer.fetcher",
    "aiokafka.consumer.group_coordinator",
    "aiokafka.producer.producer",
    "aiokafka.producer.sender",
    # psycopg's pool logs each failed connection attempt (every second or two while PostgreSQL is away).
    "psycopg.pool",
)
REPEATS_EVERY_S = 30.0


class RepeatsNowAndThen(logging.Filter):
    """A logger's WARNING and ERROR lines at most one of a kind (the same template) per `every_s`. Lower
    levels pass: a second rebalance's lines within the period are news, not a repeat."""

    def __init__(self, every_s: float = REPEATS_EVERY_S, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._limit = NowAndThen(every_s, clock)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        template = record.msg if isinstance(record.msg, str) else type(record.msg).__name__
        left_out = self._limit.admit((record.name, record.levelno, template))
        if left_out is None:
            return False
        if left_out:
            # Formatted here: a "%d" added to the template would not fit arguments given as a dict.
            record.msg = f"{record.getMessage()} (and {left_out} more like it since the last one logged)"
            record.args = ()
        return True


def _sasl_token(arg: object) -> bool:
    return type(arg).__name__.startswith("SaslAuthenticate")  # aiokafka's SaslAuthenticateRequest_v1 etc.


class SaslTokensHidden(logging.Filter):
    """aiokafka logs every request and response at DEBUG, SASL's tokens too: PLAIN's holds the password as
    given, SCRAM's the salt and the client's proof (enough to guess the password offline). Logged without."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(_sasl_token(a) for a in record.args):
            record.args = tuple(
                f"{type(a).__name__}(token hidden)" if _sasl_token(a) else a for a in record.args
            )
        return True


def _add_once(name: str, kind: type[logging.Filter], make: Callable[[], logging.Filter]) -> None:
    logger = logging.getLogger(name)
    if not any(isinstance(f, kind) for f in logger.filters):
        logger.addFilter(make())


# The root logger's one handler, as `configure` made it: see `restore_handler`.
_HANDLER: logging.Handler | None = None


def configure(level: str = "INFO", json: bool = False) -> None:
    for name in _TABLE_LOGGERS:
        _add_once(name, TablesAtDebug, TablesAtDebug)
    repeats = RepeatsNowAndThen()  # one for all: a kind is told apart by its logger's name
    for name in _RETRYING_LOGGERS:
        _add_once(name, RepeatsNowAndThen, lambda: repeats)
    _add_once("aiokafka.conn", SaslTokensHidden, SaslTokensHidden)
    global _HANDLER
    _HANDLER = logging.StreamHandler(sys.stderr)
    _HANDLER.setFormatter(
        JsonFormatter() if json else TextFormatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [_HANDLER]
    root.setLevel(level.upper())
    # aiohttp's access log duplicates our request log line.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    threading.excepthook = _log_thread_exception


def restore_handler(root: logging.Logger, level: int) -> None:
    """Puts `configure`'s handler back on `root`, in place of the one Faust's worker set up at `level`: its
    own text format made every line of the worker's main process plain text with SENTPIPE_LOG_JSON=true,
    and left out every record's extras (stage, topic, partition) in either format."""
    if _HANDLER is not None:
        # Faust's handler had the level: the records TablesAtDebug moves to DEBUG are dropped here.
        _HANDLER.setLevel(level)
        root.handlers[:] = [_HANDLER]


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
    """A thread's uncaught exception as one log record. Python's own hook writes the traceback to stderr,
    which Faust's worker turns into one WARNING record per write: a traceback split over dozens of lines
    (`^`, `asyncio.exceptions`, `.`, `CancelledError`)."""
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "unknown"
    exc_info = (args.exc_type, args.exc_value or args.exc_type(), args.exc_traceback)
    logging.getLogger("sentpipe").error("uncaught exception in thread %s", name, exc_info=exc_info)
