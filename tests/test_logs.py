"""Log level names: every standard spelling is accepted once, in Settings, and Faust gets names it knows."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from mode.utils.logging import level_number
from pydantic import ValidationError

from sentpipe.logs import (
    JsonFormatter,
    NowAndThen,
    RepeatsNowAndThen,
    TablesAtDebug,
    TextFormatter,
    faust_log_level,
    faust_quiet_options,
)
from sentpipe.settings import Settings
from tests.processes import Proc, free_port, settings_env

SPELLINGS = [
    ("DEBUG", "DEBUG"),
    ("debug", "DEBUG"),
    ("Info", "INFO"),
    ("WARNING", "WARNING"),
    ("warning", "WARNING"),
    ("WARN", "WARNING"),
    ("warn", "WARNING"),
    ("ERROR", "ERROR"),
    ("error", "ERROR"),
    ("CRITICAL", "CRITICAL"),
    ("crit", "CRITICAL"),
    ("FATAL", "CRITICAL"),
    (" info ", "INFO"),
]


@pytest.mark.parametrize(("given", "python_name"), SPELLINGS)
def test_every_standard_spelling_becomes_the_python_name(
    given: str, python_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert Settings(log_level=given).log_level == python_name
    monkeypatch.setenv("SENTPIPE_LOG_LEVEL", given)
    assert Settings().log_level == python_name
    assert logging.getLevelName(python_name) in (10, 20, 30, 40, 50)


@pytest.mark.parametrize("bad", ["bogus", "", "10", "verbose", "WARNINGS"])
def test_an_unknown_level_is_a_validation_error_on_log_level(bad: str) -> None:
    with pytest.raises(ValidationError) as info:
        Settings(log_level=bad)
    (error,) = info.value.errors()
    assert error["loc"] == ("log_level",)
    assert repr(bad) in error["msg"] and "WARNING" in error["msg"]


def test_faust_gets_a_name_from_its_own_list_that_its_logging_setup_can_resolve() -> None:
    faust_choices = {"crit", "error", "warn", "info", "debug"}  # faust.cli.base.LOGLEVELS
    expected = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "ERROR": 40, "CRITICAL": 40}
    for given, python_name in SPELLINGS:
        name = faust_log_level(given)
        assert name in faust_choices, given
        # mode turns the name into a number with logging.getLevelName: "crit" is not one ("Level CRIT"),
        # and the worker would hang in its logging setup.
        assert level_number(name) == expected[python_name], given
    assert not isinstance(level_number("crit"), int)
    with pytest.raises(ValueError, match="bogus"):
        faust_log_level("bogus")


def test_faust_prints_its_banner_only_at_debug() -> None:
    assert faust_quiet_options("DEBUG") == []
    for level in ("INFO", "WARNING", "ERROR", "CRITICAL"):
        assert faust_quiet_options(level) == ["--quiet"]


def test_table_records_are_debug_and_other_info_records_stay_info() -> None:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("tests.test_logs.tables")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addFilter(TablesAtDebug())
    handler = Keep(logging.INFO)
    logger.addHandler(handler)
    try:
        table = "\n+Highwater--+\n| t | 1 |\n+---+---+"
        logger.info("Updating subscribed topics to: %s", frozenset({"a", "b"}))
        logger.info("Setting newly assigned partitions %s for group %s", {("t", 0)}, "g")
        logger.info("[^---Recovery]: Highwater for %s changelog partitions:\n%s", "active", table)
        logger.info("Revoking previously assigned partitions %s for group %s", set(), "g")
        logger.info("Joined group %r (generation %s)", "g", 3)
        logger.warning("a warning with a set %s", {1, 2})
        assert [r.getMessage().split(" ")[0] for r in records] == ["Revoking", "Joined", "a"]
        assert [r.levelname for r in records] == ["INFO", "INFO", "WARNING"]
        handler.setLevel(logging.DEBUG)
        records.clear()
        logger.info("Subscribed to topic(s): %s", {"a"})
        assert [(r.levelno, r.levelname) for r in records] == [(logging.DEBUG, "DEBUG")]
    finally:
        logger.removeHandler(handler)


@pytest.mark.parametrize("command", [["worker"], ["ingress"], ["replay", "--dry-run"]])
def test_an_unknown_level_stops_a_command_with_one_line(command: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SENTPIPE_")}
    env["SENTPIPE_LOG_LEVEL"] = "bogus"
    res = subprocess.run(
        [sys.executable, "-m", "sentpipe", *command], env=env, capture_output=True, text=True, timeout=60
    )
    assert res.returncode != 0, res
    assert "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: invalid setting SENTPIPE_LOG_LEVEL: "), lines[0]
    assert "'bogus'" in lines[0]


@pytest.mark.service
def test_worker_starts_with_python_level_names(settings: Settings, tmp_path: Path) -> None:
    """The bug: SENTPIPE_LOG_LEVEL=WARNING made Faust refuse its --loglevel and the worker exit."""
    metrics = free_port()
    env = settings_env(
        settings,
        log_level="WARNING",
        worker_web_port=free_port(),
        worker_metrics_port=metrics,
        data_dir=tmp_path / "faust",
    )
    proc = Proc(["worker"], env, tmp_path / "worker.log").start()
    try:
        # Ready once Faust has started (its table recovered): Faust took its options.
        proc.wait_http(f"http://127.0.0.1:{metrics}/readyz")
        assert proc.p is not None and proc.p.poll() is None, proc.tail()
    finally:
        assert proc.stop() == 0, proc.tail()
    log = (tmp_path / "worker.log").read_text(errors="replace")
    assert "is not one of" not in log
    # Lines are "date time LEVEL logger message" (sentpipe's format, Faust's records included).
    info = [line for line in log.splitlines() if line.split(" ")[2:3] == ["INFO"]]
    assert not info and "ƒaµS†" not in log, log[-3000:]


@pytest.mark.service
def test_with_json_logs_every_line_of_the_worker_is_a_json_object(settings: Settings, tmp_path: Path) -> None:
    """The bug: Faust's worker replaced the root handler with its own text format, so with
    SENTPIPE_LOG_JSON=true (the chart's default) every line of the worker's main process (Faust's, and
    sentpipe's own, extras left out) was plain text; only the projector's process wrote JSON."""
    metrics = free_port()
    env = settings_env(
        settings,
        log_json="true",
        worker_web_port=free_port(),
        worker_metrics_port=metrics,
        data_dir=tmp_path / "faust",
    )
    proc = Proc(["worker"], env, tmp_path / "worker.log").start()
    try:
        proc.wait_http(f"http://127.0.0.1:{metrics}/readyz")
    finally:
        assert proc.stop() == 0, proc.tail()
    lines = (tmp_path / "worker.log").read_text(errors="replace").splitlines()
    not_json = [line for line in lines if not line.startswith("{")]
    assert not not_json, not_json[:5]
    records = [orjson.loads(line) for line in lines]
    loggers = {r["logger"] for r in records}
    assert "faust.worker" in loggers and "sentpipe.worker" in loggers, loggers
    # Faust's tables, moved to DEBUG, are still left out at INFO.
    assert not [r for r in records if r["level"] == "debug"]


def test_a_text_line_is_one_line_whatever_a_record_put_in_its_extras() -> None:
    """An event id from a routed record, `x\\n2026-12-02 09:00:00,000 ERROR ...`, forged a line of its own."""
    from sentpipe.logs import EXTRA_MAX_CHARS, TextFormatter

    forged = "evt-1\n2026-12-02 09:00:00,000 ERROR sentpipe.worker INJECTED\x00"
    record = logging.LogRecord("sentpipe.worker", logging.WARNING, __file__, 1, "record failed", None, None)
    record.event_id = forged
    record.tenant = "t" * 10_000
    line = TextFormatter("%(levelname)s %(name)s %(message)s").format(record)
    assert "\n" not in line and "\x00" not in line, line
    assert "event_id=evt-1\\n2026-12-02" in line
    assert len(line) < EXTRA_MAX_CHARS + 300
    record.tenant = "ok-tenant"
    assert "tenant=ok-tenant" in TextFormatter("%(message)s").format(record)


def test_a_text_line_is_one_line_whatever_its_message_holds_and_a_traceback_follows() -> None:
    """libpq's errors carry a second line: psycopg's pool logged each failed connection on two."""
    from sentpipe.logs import TextFormatter

    message = (
        'connection failed: connection to server at "127.0.0.1", port 1 failed: refused\n\tIs the server'
    )
    record = logging.LogRecord(
        "psycopg.pool", logging.WARNING, __file__, 1, "error connecting: %s", (message,), None
    )
    line = TextFormatter("%(levelname)s %(name)s %(message)s").format(record)
    assert line == f"WARNING psycopg.pool error connecting: {message.replace(chr(10) + chr(9), ' ')}"
    try:
        raise ValueError("boom")
    except ValueError:
        failed = logging.LogRecord(
            "sentpipe", logging.ERROR, __file__, 1, "a\u2028b\rc", None, sys.exc_info()
        )
    first, *traceback = TextFormatter("%(message)s").format(failed).splitlines()
    assert first == "a b c" and traceback[0].startswith("Traceback") and traceback[-1] == "ValueError: boom"


def test_exc_info_without_an_exception_adds_no_traceback() -> None:
    """mode's supervisor logs an agent's restart with exc_info=1 outside any `except`: the record's
    exc_info is (None, None, None), which both formats drew as the traceback "NoneType: None"."""
    record = logging.makeLogRecord({"msg": "Restarting dead agent", "exc_info": (None, None, None)})
    assert "exc" not in orjson.loads(JsonFormatter().format(record))
    record = logging.makeLogRecord({"msg": "Restarting dead agent", "exc_info": (None, None, None)})
    text = TextFormatter("%(levelname)s %(message)s").format(record)
    assert "\n" not in text and "NoneType" not in text, text


def test_a_value_from_a_record_in_a_message_cannot_drive_the_terminal() -> None:
    """An event id is an argument of some messages ("handler %s ... with event %s"): its ESC [2J cleared the
    terminal the log was read on, and U+202E turned the rest of the line around. Shown as escapes, as the
    extras' are; printable text of any script stays as it is."""
    from sentpipe.logs import TextFormatter

    event_id = "évt-1\x1b[2J\x07\x9b31m\u202egnp.exe"
    record = logging.LogRecord(
        "sentpipe.handlers", logging.ERROR, __file__, 1, "handler h failed with event %s", (event_id,), None
    )
    line = TextFormatter("%(levelname)s %(message)s").format(record)
    assert line == "ERROR handler h failed with event évt-1\\x1b[2J\\x07\\x9b31m\\u202egnp.exe", ascii(line)


def test_a_threads_uncaught_exception_is_one_record_with_its_traceback() -> None:
    """Python's hook wrote the traceback to stderr, which Faust's worker logs one write at a time: an
    aiokafka thread's CancelledError came out as a dozen WARNING lines (`^`, `asyncio.exceptions`, ...)."""
    script = (
        "import threading\n"
        "from sentpipe.logs import configure\n"
        "configure('INFO', json=True)\n"
        "def boom():\n"
        "    raise RuntimeError('from a thread')\n"
        "t = threading.Thread(target=boom, name='fetcher')\n"
        "t.start(); t.join()\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    record = orjson.loads(lines[0])
    assert record["level"] == "error" and record["msg"] == "uncaught exception in thread fetcher", record
    assert "RuntimeError: from a thread" in str(record), record


class _Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_repeated_warnings_and_errors_are_logged_now_and_then_with_the_count_left_out() -> None:
    now = [0.0]
    repeats = RepeatsNowAndThen(30.0, clock=lambda: now[0])
    loggers = [logging.getLogger(f"tests.test_logs.repeats.{n}") for n in ("client", "fetcher")]
    kept = _Kept()
    for logger in loggers:
        logger.propagate = False
        logger.setLevel(logging.DEBUG)
        logger.addFilter(repeats)
        logger.addHandler(kept)
    client, fetcher = loggers
    try:
        for tick in range(6100):  # a broker away for 61 s: a failed attempt every 10 ms
            now[0] = tick / 100
            client.error("Unable connect to node with id %s: %s", 1, "[Errno 111] Connection refused")
            fetcher.error("Unable connect to node with id %s: %s", 1, "[Errno 111] Connection refused")
            if tick % 1000 == 0:
                client.info("Discovered coordinator %s for group %s", 1, "g")
                client.warning("100%% of %s", "attempts")  # a template with an escaped percent sign
        lines = [(r.name.rsplit(".", 1)[1], r.levelname, r.getMessage()) for r in kept.records]
        refused = "Unable connect to node with id 1: [Errno 111] Connection refused"
        more = " (and 2999 more like it since the last one logged)"
        for name in ("client", "fetcher"):  # each logger's lines are a kind of their own
            assert [m for n, lv, m in lines if n == name and lv == "ERROR"] == [
                refused,
                refused + more,
            ] * 1 + [refused + more]
        assert [m for _, lv, m in lines if lv == "INFO"] == ["Discovered coordinator 1 for group g"] * 7
        assert [m for _, lv, m in lines if lv == "WARNING"] == [
            "100% of attempts",
            "100% of attempts (and 2 more like it since the last one logged)",
            "100% of attempts (and 2 more like it since the last one logged)",
        ]
    finally:
        for logger in loggers:
            logger.removeFilter(repeats)
            logger.removeHandler(kept)


def test_now_and_then_forgets_its_kinds_past_its_limit_and_still_admits_each_once() -> None:
    limit = NowAndThen(30.0, clock=lambda: 0.0)
    for n in range(NowAndThen.MAX_KINDS * 3):  # a library logging formatted text: every line a new kind
        assert limit.admit(f"line {n}") == 0
        assert limit.admit(f"line {n}") is None
    assert len(limit._seen) <= NowAndThen.MAX_KINDS


def test_configure_quiets_the_loggers_of_faust_s_kafka_client() -> None:
    """Through `configure`, as every process sets up its logging: aiokafka's modules (and psycopg's pool) log
    under their own
    names, and a filter sees only the records of the logger it is on. Configured twice, one filter each."""
    script = (
        "import logging\n"
        "from sentpipe.logs import RepeatsNowAndThen, configure\n"
        "configure('INFO', json=True); configure('INFO', json=True)\n"
        "for name in ('aiokafka', 'aiokafka.consumer.fetcher', 'aiokafka.consumer.group_coordinator',\n"
        "             'psycopg.pool'):\n"
        "    filters = logging.getLogger(name).filters\n"
        "    assert sum(isinstance(f, RepeatsNowAndThen) for f in filters) == 1, name\n"
        "    for _ in range(100):\n"
        "        logging.getLogger(name).error('Unable connect to node with id %s: %s', 1, 'refused')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = [orjson.loads(line) for line in proc.stderr.strip().splitlines()]
    assert [(x["logger"], x["msg"]) for x in lines] == [
        (name, "Unable connect to node with id 1: refused")
        for name in (
            "aiokafka",
            "aiokafka.consumer.fetcher",
            "aiokafka.consumer.group_coordinator",
            "psycopg.pool",
        )
    ]
