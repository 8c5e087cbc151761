"""Operator commands survive hostile records: Rich markup, emoji codes, terminal escapes and bidi overrides
in keys, headers, bodies and error messages are printed as visible text, never interpreted.

The records go straight onto this test's own DLQ topic; the commands run as real subprocesses.
"""

from __future__ import annotations

import re
import subprocess
import sys
from datetime import UTC, datetime

import pytest
from confluent_kafka import Producer

from sentpipe.cli_base import terminal_safe
from sentpipe.schemas import routing as r
from sentpipe.schemas.events import CanonicalEvent, EventType
from sentpipe.schemas.topics import Topics
from sentpipe.settings import Settings
from tests.processes import settings_env

ESC, BEL, CSI8, RLO = "\x1b", "\x07", "\x9b", "\u202e"
CLEAR = ESC + "[2J"  # clears the screen
TITLE = ESC + "]0;pwned" + BEL  # sets the window title
# Never in the output, in either mode (SGR colour codes are Rich's own in the terminal mode).
FORBIDDEN = (BEL, CSI8, RLO, "\r", "\x00")
SGR = re.compile(r"\x1b\[[0-9;]*m")
# A progress bar's own controls on stderr (terminal mode): hide and show the cursor, move up, clear the line.
PROGRESS = re.compile(r"\x1b\[\?25[lh]|\r?\x1b\[2K|\x1b\[1A")

RAW_KEY = "[/x]" + CLEAR
ROUTED_ID = "[/x]" + RLO + "gnp.exe"


def hostile_records() -> list[tuple[bytes, bytes, list[tuple[str, bytes]]]]:
    raw = (
        RAW_KEY.encode(),
        f"not json {CLEAR}\r[/x] [bold]loud[/bold] {CSI8}31m".encode(),
        [
            (r.H_TENANT, b":smile:[/x]"),
            ("x-evil" + ESC + "[31m", TITLE.encode()),
            *r.dlq_headers(
                stage="route",
                error_class="[bold red]boom[/]",
                message=f"bad {CLEAR} body\nsecond line",
                topic="t.events.raw",
                partition=0,
                offset=7,
            ),
        ],
    )
    event = CanonicalEvent(
        id=ROUTED_ID,
        type=EventType.MESSAGE_INBOUND,
        tenant=f"acme{TITLE}",
        occurred_at=datetime(2026, 1, 1, tzinfo=UTC),
        received_at_ms=1_767_225_600_000,
        sub_type="message.received",
        shape="sent",
        subject=ROUTED_ID,
        status=None,
        data={"text": f"hi {CLEAR}{TITLE} [/x] {CSI8}2J {RLO}txet", "n": 1},
    )
    routed = (
        f"acme/{ROUTED_ID}".encode(),
        event.to_json(),
        r.dlq_headers(
            stage="handler",
            error_class="PermanentError",
            message=f"handler: {TITLE}[link=http://evil]x[/link]",
            topic="t.message.inbound",
            partition=1,
            offset=2,
        ),
    )
    return [raw, routed]


@pytest.fixture
def hostile_dlq(settings: Settings) -> Settings:
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "enable.idempotence": True})
    for key, value, headers in hostile_records():
        producer.produce(Topics(settings.topic_prefix).dlq, value=value, key=key, headers=headers)
    assert producer.flush(30) == 0
    return settings


def run_cli(s: Settings, *args: str, terminal: bool) -> subprocess.CompletedProcess[str]:
    env = {**settings_env(s), "COLUMNS": "250"}
    for name in ("FORCE_COLOR", "NO_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        env.pop(name, None)
    if terminal:  # as on an operator's terminal: Rich writes its own colour codes
        env["FORCE_COLOR"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "sentpipe", *args], env=env, capture_output=True, text=True, timeout=120
    )


def assert_inert(res: subprocess.CompletedProcess[str], terminal: bool) -> str:
    """No traceback, no escape sequence but Rich's own colours; returns stdout without those colours."""
    assert "Traceback" not in res.stderr, res.stderr
    for stream in (res.stdout, PROGRESS.sub("", res.stderr) if terminal else res.stderr):
        plain = SGR.sub("", stream) if terminal else stream
        assert ESC not in plain, ascii(stream)
        for char in FORBIDDEN:
            assert char not in plain, (ascii(char), ascii(stream))
    return SGR.sub("", res.stdout)


@pytest.mark.parametrize("terminal", [False, True], ids=["pipe", "terminal"])
def test_dlq_list_and_show_print_hostile_records_as_visible_text(
    hostile_dlq: Settings, terminal: bool
) -> None:
    s = hostile_dlq
    res = run_cli(s, "dlq", "list", terminal=terminal)
    assert res.returncode == 0, res.stderr
    out = assert_inert(res, terminal)
    assert "2 shown, 2 matching, 2 in the DLQ" in out
    assert "[/x]\\x1b[2J" in out  # the raw record's key: its markup intact, ESC shown as \x1b
    assert "[bold red]boom[/]" in out  # an error class that looks like markup is shown, not applied
    assert ":smile:[/x]" in out  # emoji codes stay text
    assert "[/x]\\u202egnp.exe" in out  # the bidi override is visible, so the id reads as it is
    assert "acme\\x1b]0;pwned\\x07" in out

    res = run_cli(s, "dlq", "show", "0:0", terminal=terminal)
    assert res.returncode == 0, res.stderr
    out = assert_inert(res, terminal)
    assert "key [/x]\\x1b[2J" in out
    assert "x-evil\\x1b[31m" in out and "\\x1b]0;pwned\\x07" in out  # header name and value
    assert "bad \\x1b[2J body\\x0asecond line" in out  # one line, as the header is one value
    assert "not json \\x1b[2J\\x0d[/x] [bold]loud[/bold] \\x9b31m" in out  # the body, word for word

    res = run_cli(s, "dlq", "show", "0:1", terminal=terminal)
    assert res.returncode == 0, res.stderr
    out = assert_inert(res, terminal)
    assert "[link=http://evil]x[/link]" in out
    assert '"id": "[/x]\\u202egnp.exe"' in out  # pretty-printed JSON, its strings still escaped
    assert "[/x] \\x9b2J \\u202etxet" in out
    assert "\\u001b[2J" in out  # JSON's own escape for ESC


def test_events_show_and_errors_print_hostile_text_as_visible_text(hostile_dlq: Settings) -> None:
    res = run_cli(hostile_dlq, "events", "show", RAW_KEY, terminal=False)
    assert res.returncode == 0, res.stderr  # found in the DLQ
    out = assert_inert(res, False)
    assert "[bold red]boom[/]" in out

    res = run_cli(hostile_dlq, "dlq", "show", "[/x]" + TITLE, terminal=False)
    assert res.returncode == 1
    assert_inert(res, False)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "[/x]" in lines[0], res.stderr


def test_terminal_safe_shows_every_control_character_and_keeps_the_rest() -> None:
    assert terminal_safe("[/x] :smile: [bold]b").plain == "[/x] :smile: [bold]b"
    assert terminal_safe(b"\x1b[2J\xc2\x9b\x07\x7f").plain == "\\x1b[2J\\x9b\\x07\\x7f"
    assert terminal_safe("a\tb\r\nc\u2028").plain == "a\\x09b\\x0d\\x0ac\\u2028"
    assert terminal_safe("a\tb\r\nc", multiline=True).plain == "a\tb\\x0d\nc"
    for bidi in ("\u061c", "\u200e", "\u200f", "\u202a", "\u202e", "\u2066", "\u2069"):
        assert terminal_safe(bidi).plain == f"\\u{ord(bidi):04x}"
    # Invisible: "evt_1" and "evt_1\u200b" are two ids that looked the same.
    for invisible, shown in (
        ("\u00ad", "\\xad"),
        ("\u180e", "\\u180e"),
        ("\u200b", "\\u200b"),
        ("\u2060", "\\u2060"),
        ("\u2064", "\\u2064"),
        ("\ufeff", "\\ufeff"),
    ):
        assert terminal_safe(f"evt_1{invisible}").plain == f"evt_1{shown}"
    assert terminal_safe("\ud800").plain == "\\ud800"  # a lone surrogate cannot be written at all
    kept = "olá 😀 Ωmega \u200d (a zero-width joiner, as in emoji sequences)"
    assert terminal_safe(kept).plain == kept
    assert terminal_safe(b"\xff").plain == "\ufffd"
