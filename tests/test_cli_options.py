"""Option values as a user can mistype them: every command refuses them in one line naming the option,
before anything is contacted, never with a Python exception's name. And `spool drain` checks the broker first
and does not call a pass that skipped corrupt frames a success.

Most cases run the CLI in this process (fast); text that is not UTF-8 and `spool drain` run it as a real
subprocess, since they depend on the real argv and on asyncio.run.
"""

from __future__ import annotations

import asyncio
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sentpipe.cli import app, run
from sentpipe.cli_base import fraction, per_second, seconds
from sentpipe.ingress.spool import Spool, SpoolRecord, status_of
from sentpipe.processors.offsets import OpsError, PartitionOffset, parse_partition_offset
from tests.processes import free_port, run_on_a_terminal
from tests.services import Services

HUGE = str(10**27)


@pytest.fixture
def nowhere(monkeypatch: pytest.MonkeyPatch) -> str:
    """A broker address nothing listens on: a case that got past parsing fails fast, naming it instead."""
    address = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("SENTPIPE_KAFKA_BOOTSTRAP", address)
    return address


def invoke(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = run(lambda: app(args=list(args), prog_name="sentpipe", standalone_mode=False))
    return code, capsys.readouterr().err


def assert_refused(code: int, stderr: str, *needles: str) -> None:
    lines = stderr.strip().splitlines()
    assert code != 0, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for internal in ("Traceback", "ValueError", "OverflowError", "UnicodeEncodeError", "did not answer"):
        assert internal not in lines[0], lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]


def cli_limited(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI in a subprocess that cannot take the machine down with it: `send --count 10**27` once built
    every event before sending, until memory ran out."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_DATA, (2 * 1024**3, 2 * 1024**3))

    return subprocess.run(
        [sys.executable, "-m", "sentpipe", *args],
        env={**os.environ, "SENTPIPE_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}"},
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=limit,
    )


@pytest.mark.parametrize("command", [["send"], ["trigger", "message.status.updated"]], ids=" ".join)
def test_an_empty_url_is_refused_not_taken_for_the_local_ingress(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, command: list[str]
) -> None:
    """`sentpipe send "$URL"` with URL unset posted to the local ingress, as if no URL had been given."""
    monkeypatch.setenv("SENTPIPE_INGRESS_PORT", str(free_port()))  # the "local ingress": nothing there
    assert_refused(*invoke(capsys, *command, ""), "URL is empty")


def unreachable_url() -> str:
    return f"http://127.0.0.1:{free_port()}/webhooks/sent"


# --- floats: finite, positive, bounded ----------------------------------------------------------------------
TIMEOUT_COMMANDS = [
    ["topics", "ensure"],
    ["replay"],
    ["dlq", "list"],
    ["dlq", "show", "0:1"],
    ["dlq", "redrive"],
    ["offsets", "reset", "--group", "g", "--to-latest"],
    ["events", "show", "evt_1"],
    ["spool", "drain"],
    ["send", "URL"],
    ["trigger", "message.status.updated", "URL"],
]
BAD_SECONDS = ["nan", "inf", "-inf", "1e308", "-1", "0", "301"]


@pytest.mark.parametrize("value", BAD_SECONDS)
@pytest.mark.parametrize("command", TIMEOUT_COMMANDS, ids=" ".join)
def test_a_timeout_is_a_finite_positive_number_of_seconds(
    capsys: pytest.CaptureFixture[str], nowhere: str, command: list[str], value: str
) -> None:
    args = [unreachable_url() if a == "URL" else a for a in command]
    code, stderr = invoke(capsys, *args, "--timeout", value)
    assert_refused(code, stderr, "--timeout", "between 0.01 and 300 seconds")


@pytest.mark.parametrize(
    ("option", "value", "needle"),
    [
        ("--rate", "nan", "per second"),
        ("--rate", "inf", "per second"),
        ("--rate", "1e-300", "per second"),  # one event every 1e300 s: the run never ends
        ("--rate", "0", "per second"),
        ("--rate", "1e9", "per second"),
        ("--duplicates", "nan", "between 0 and 1"),
        ("--duplicates", "inf", "between 0 and 1"),
        ("--duplicates", "1.5", "between 0 and 1"),
        ("--retry-schedule", "1,1e308", "3600"),
        ("--retry-schedule", "0.1,nan", "3600"),
    ],
)
def test_send_refuses_rates_fractions_and_delays_it_cannot_use(
    capsys: pytest.CaptureFixture[str], option: str, value: str, needle: str
) -> None:
    code, stderr = invoke(capsys, "send", unreachable_url(), option, value)
    assert_refused(code, stderr, option, needle)


def test_the_shared_checks_keep_their_bounds_and_defaults() -> None:
    assert seconds(0.01) == 0.01 and seconds(300.0) == 300.0 and seconds(None) is None
    assert per_second(0.001) == 0.001 and per_second(100_000.0) == 100_000.0
    assert fraction(0.0) == 0.0 and fraction(1.0) == 1.0


# --- integers: bounded --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args",
    [
        ["dlq", "list", "--limit", HUGE],
        ["dlq", "list", "--limit", "0"],
        ["events", "show", "evt_1", "--scan-limit", HUGE],
        ["events", "show", "evt_1", "--scan-limit", "0"],
        ["send", "URL", "--count", HUGE],
        ["send", "URL", "--count", "0"],
        ["send", "URL", "--concurrency", HUGE],
        ["send", "URL", "--seed", HUGE],
        ["send", "URL", "--seed", "-1"],
        ["trigger", "message.status.updated", "URL", "--seed", HUGE],
    ],
    ids=" ".join,
)
def test_integer_options_have_a_floor_and_a_ceiling(args: list[str]) -> None:
    args = [unreachable_url() if a == "URL" else a for a in args]
    res = cli_limited(*args)
    assert_refused(res.returncode, res.stderr, next(a for a in args if a.startswith("--")))


# --- PARTITION:OFFSET: ASCII digits within Kafka's ranges ---------------------------------------------------
@pytest.mark.parametrize(
    "text",
    [
        *("\u00b2:0", "0:\u00b2", "\u0661:0", "0:\u0661", "\uff11:0"),  # superscript, Arabic-Indic, fullwidth
        *("2147483648:0", "0:9223372036854775808", "9" * 5000 + ":0", "0:" + "9" * 5000),
        *("-1:0", "+1:0", "1_0:0"),
    ],
)
def test_partition_offset_takes_ascii_digits_within_kafkas_ranges(text: str) -> None:
    with pytest.raises(OpsError, match="--from-offset"):
        parse_partition_offset(text, "--from-offset")


def test_partition_offset_takes_kafkas_largest() -> None:
    largest = parse_partition_offset(" 2147483647:9223372036854775807 ", "--to-offset")
    assert largest == PartitionOffset(2**31 - 1, 2**63 - 1)
    assert parse_partition_offset("3:1200", "--to-offset") == PartitionOffset(3, 1200)


@pytest.mark.parametrize("text", ["\u00b2:0", "\u0661:0"])
def test_replay_refuses_non_ascii_digits_in_one_line(
    capsys: pytest.CaptureFixture[str], nowhere: str, text: str
) -> None:
    code, stderr = invoke(capsys, "replay", "--from-offset", text)
    assert_refused(code, stderr, "--from-offset", "PARTITION:OFFSET")


# --- text that is not UTF-8 ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "name"),
    [
        ([b"replay", b"--event-id", b"\xff"], "'--event-id'"),
        ([b"replay", b"--tenant", b"acme", b"--tenant", b"ac\xfeme"], "'--tenant'"),
        ([b"events", b"show", b"evt_\xff"], "'EVENT_ID'"),
        ([b"dlq", b"show", b"0:\xff"], "'ID'"),
        ([b"offsets", b"reset", b"--group", b"g\xff", b"--to-latest"], "'--group'"),
        ([b"trigger", b"message.status.updated", b"--status", b"\xc3"], "'--status'"),
    ],
    ids=lambda v: " ".join(a.decode(errors="replace") for a in v) if isinstance(v, list) else v,
)
def test_arguments_that_are_not_utf8_are_refused_naming_them(args: list[bytes], name: str) -> None:
    env = {**os.environ, "SENTPIPE_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}"}
    res = subprocess.run(
        [sys.executable.encode(), b"-m", b"sentpipe", *args], env=env, capture_output=True, timeout=60
    )
    stderr = res.stderr.decode()
    assert_refused(res.returncode, stderr, name, "not valid UTF-8")
    assert "\\xff" in stderr or "\\xfe" in stderr or "\\xc3" in stderr  # the bytes shown, escaped


# --- spool drain --------------------------------------------------------------------------------------------
def spool_with_one_record(directory: Path) -> None:
    async def fill() -> None:
        spool = Spool(directory, 10**8, 10**7, gauges=False)
        spool.open()
        await spool.append(SpoolRecord("t.events.raw", b"key", b"{}", (), 1000))
        spool.close()

    directory.mkdir()
    asyncio.run(fill())


def drain(directory: Path, bootstrap: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sentpipe", "spool", "drain", "--dir", str(directory), *extra],
        env={**os.environ, "SENTPIPE_KAFKA_BOOTSTRAP": bootstrap, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_spool_drain_checks_the_broker_first_and_names_it(tmp_path: Path) -> None:
    spool_with_one_record(tmp_path / "ingress-0")
    address = f"127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    res = drain(tmp_path / "ingress-0", address, "--timeout", "1")
    assert time.monotonic() - t0 < 15
    lines = res.stderr.strip().splitlines()
    assert res.returncode != 0 and len(lines) == 1, res.stderr
    assert lines[0].startswith(f"error: Kafka broker at {address} did not answer"), lines
    assert "refused" not in res.stderr
    assert status_of(tmp_path / "ingress-0").records == 1  # nothing touched


def test_spool_drain_fails_when_it_skipped_corrupt_frames(services: Services, tmp_path: Path) -> None:
    directory = tmp_path / "ingress-0"
    directory.mkdir()
    (directory / "1.seg").write_bytes(b"\x00not a frame\xff" * 300)
    res = drain(directory, services.kafka_bootstrap)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1, res
    assert lines[-1].startswith("error: 1 corrupt frame(s) skipped in 1 directory"), res.stderr
    assert "Traceback" not in res.stderr
    assert "corrupt frames" in res.stdout  # the summary table still shows


def test_a_time_is_exact_milliseconds_up_to_the_last_one_a_datetime_holds() -> None:
    """Through a float, the last microsecond of 9999 rounded into year 10000, and a listing then failed."""
    from sentpipe.processors.offsets import parse_when

    assert parse_when("9999-12-31T23:59:59.999999Z", "--since") == 253_402_300_799_999
    assert parse_when("2026-01-31T12:00:00.0015+01:00", "--since") == 1_769_857_200_001
    assert parse_when("2026-01-31T12:00:00", "--since") == 1_769_860_800_000  # no zone: UTC


def test_ctrl_c_while_the_command_is_still_loading_is_interrupted_not_a_traceback() -> None:
    """The installed `sentpipe` script: importing the CLI takes about half a second, and a Ctrl-C then
    ended in a KeyboardInterrupt traceback. The signal is sent once pydantic's compiled core is mapped in,
    about a third of the way through those imports."""
    script = Path(sys.executable).parent / "sentpipe"
    proc = subprocess.Popen(
        [str(script), "send", "--count", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=Path(__file__).parent.parent,
    )
    maps = Path(f"/proc/{proc.pid}/maps")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and "_pydantic_core" not in maps.read_text():
        time.sleep(0.001)
    proc.send_signal(2)  # SIGINT, as Ctrl-C sends it
    _, err = proc.communicate(timeout=60)
    assert "Traceback" not in err.decode() and err.decode().strip().splitlines()[-1] == "interrupted", err
    assert proc.returncode == 130


def test_ctrl_c_while_the_error_handling_loads_is_interrupted_not_a_traceback() -> None:
    """The CLI loaded, `run` imports psycopg and librdkafka's bindings for the errors it names, outside
    the guard of the command: a Ctrl-C then ended in a KeyboardInterrupt traceback. The process sends
    itself SIGINT as psycopg's import starts (a real signal, at that moment whatever the machine's load)."""
    ctrl_c_at_psycopg = """
import os, signal, sys

class CtrlC:
    def find_spec(self, name, path=None, target=None):
        if name == "psycopg":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None

from sentpipe.launch import main
sys.meta_path.insert(0, CtrlC())
sys.argv = ["sentpipe", "send", "--count", "1", sys.argv[1]]
main()
"""
    res = subprocess.run(
        [sys.executable, "-c", ctrl_c_at_psycopg, unreachable_url()],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parent.parent,
    )
    assert "Traceback" not in res.stderr and res.stderr.strip().splitlines()[-1] == "interrupted", res.stderr
    assert res.returncode == 130


def test_ctrl_c_with_requests_in_flight_ends_on_interrupted_not_a_warning() -> None:
    """`send` stopped by SIGTERM mid-run once ended with `sys:1: RuntimeWarning: coroutine
    'ClientRequest.write_bytes' was never awaited` after its "interrupted": a request in flight when the loop
    stopped, collected as the process exits. Here a coroutine never awaited stands for it."""
    abandoned_request = """
import sys
from sentpipe.cli import run

async def request():
    pass

abandoned = []

def main():
    abandoned.append(request())
    raise KeyboardInterrupt

sys.exit(run(main))
"""
    res = subprocess.run(
        [sys.executable, "-c", abandoned_request],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parent.parent,
    )
    assert (res.returncode, res.stderr) == (130, "interrupted\n"), res.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--role", "route", "--bogus-opt"], "No such option: --bogus-opt"),
        (["--role", "all", "--web-port", "abc"], "'abc' is not a valid range"),
        (["--role", "route", "stray"], "unexpected extra argument (stray)"),
        # The projector runs no Faust: an option meant for it was silently ignored.
        (["--role", "project", "--web-port", "6067"], "--role project takes no Faust options"),
    ],
)
def test_faust_options_are_checked_before_the_broker_in_one_line(
    capsys: pytest.CaptureFixture[str], nowhere: str, args: list[str], needle: str
) -> None:
    code, stderr = invoke(capsys, "worker", *args)
    assert_refused(code, stderr, needle)
    assert nowhere not in stderr  # refused before any connection was tried


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["offsets", "reset", "--group", " ", "--to-latest"], "--group is empty"),
        (["events", "show", ""], "EVENT_ID is empty"),
        (["events", "show", "e" * 257], "EVENT_ID is longer than 256 characters"),
        (["events", "show", "evt\x00"], "EVENT_ID must not contain NUL"),
    ],
)
def test_names_nothing_can_have_are_refused_before_the_broker(
    capsys: pytest.CaptureFixture[str], nowhere: str, args: list[str], needle: str
) -> None:
    code, stderr = invoke(capsys, *args)
    assert_refused(code, stderr, needle)
    assert nowhere not in stderr


def test_a_console_port_in_use_is_one_line_naming_the_settings() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = cli_limited("console", "--host", "127.0.0.1", "--port", str(port))
    last = res.stderr.strip().splitlines()[-1]
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert last.startswith(
        f"error: cannot listen on 127.0.0.1:{port} (--host/--port, SENTPIPE_CONSOLE_HOST"
    ), last
    assert "address already in use" in last


def test_make_run_points_the_stack_at_the_broker_and_database_it_starts() -> None:
    """With only the launchers' variables set, `make run` started Kafka on SENTPIPE_KAFKA_PORT and then ran
    `topics ensure`, the ingress and the worker against whatever answered on 9092 (and 5432)."""
    from sentpipe.devstack import local_stack_env

    env = {"SENTPIPE_KAFKA_PORT": "9692", "SENTPIPE_PG_PORT": "5632", "SENTPIPE_LOCAL_DIR": "/tmp/x"}
    derived = local_stack_env(env)
    assert derived == {
        "SENTPIPE_KAFKA_BOOTSTRAP": "127.0.0.1:9692",
        "SENTPIPE_DATABASE_URL": "postgresql://postgres@127.0.0.1:5632/sentpipe",
        "SENTPIPE_SPOOL_DIR": "/tmp/x/spool",
        "SENTPIPE_DATA_DIR": "/tmp/x/faust",
    }
    from sentpipe.settings import Settings

    assert {k.removeprefix("SENTPIPE_").lower() for k in derived} <= set(Settings.model_fields)
    explicit = {**env, "SENTPIPE_KAFKA_BOOTSTRAP": "kafka:9092"}
    assert "SENTPIPE_KAFKA_BOOTSTRAP" not in local_stack_env(explicit)  # what is set stays
    assert local_stack_env({}) == {}


def test_make_run_prints_the_secret_the_default_tenant_is_verified_with(tmp_path: Path) -> None:
    """With SENTPIPE_SECRETS_FILE listing the default tenant, `make run` printed SENTPIPE_WEBHOOK_SECRET (the
    built-in one, without its note) as "the secret in use": the ingress refused deliveries signed with it."""
    from sentpipe.devstack import banner
    from sentpipe.settings import DEVELOPMENT_SECRET, Settings

    assert f"secret        {DEVELOPMENT_SECRET}  (built-in development secret)\n" in banner(Settings())
    own = "whsec_" + "b3duLXNlY3JldC1vZi10aGUtdGVuYW50"
    secrets = tmp_path / "secrets.json"
    secrets.write_text(f'{{"default": ["{own}", "{DEVELOPMENT_SECRET}"], "acme": ["whsec_YWNtZQ=="]}}')
    shown = banner(Settings(secrets_file=secrets))
    assert f"secret        {own}\n" in shown
    assert DEVELOPMENT_SECRET not in shown
    assert f"secret        {own}\n" in banner(Settings(webhook_secret=own))


def test_make_run_offers_a_trigger_that_reaches_its_ingress_from_any_terminal() -> None:
    """`SENTPIPE_INGRESS_PORT=9000 make run` offered `sentpipe trigger message.status.updated`, which, run in
    another terminal, posted to port 8080: connection refused, or another stack's ingress."""
    from sentpipe.devstack import banner
    from sentpipe.settings import Settings

    try_line = next(line for line in banner(Settings(ingress_port=9000)).splitlines() if "try" in line)
    assert try_line.split()[1:] == [
        ".venv/bin/sentpipe",
        "trigger",
        "message.status.updated",
        "http://127.0.0.1:9000/webhooks/sent",
    ]


def test_worker_help_says_role_all_runs_the_projector_in_a_process_of_its_own() -> None:
    """`sentpipe worker --help` said role all was "one process": the projector runs in a child process (two
    cores, its own pid, killed and restarted apart, status 70/75), as the README's "Worker roles" says."""
    out = subprocess.run(
        [sys.executable, "-m", "sentpipe", "worker", "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "300"},
        check=True,
    ).stdout
    role = " ".join(line.strip("│ ") for line in out.splitlines() if "│" in line)
    assert "one process" not in role
    assert "child process" in role


def test_the_console_announces_an_address_a_browser_can_open() -> None:
    """`sentpipe console --host 0.0.0.0` said `console on http://0.0.0.0:8090/`, which no browser opens."""
    from sentpipe.console import browser_url

    assert browser_url("0.0.0.0", 8090) == "http://127.0.0.1:8090/"
    assert browser_url("::", 8090) == "http://127.0.0.1:8090/"
    assert browser_url("::1", 8090) == "http://[::1]:8090/"
    assert browser_url("console.internal", 80) == "http://console.internal:80/"


def test_send_says_on_a_terminal_that_it_checks_the_file(tmp_path: Path) -> None:
    """`--file` is checked whole before the first event goes (about 5 s for 100 MB): the terminal showed
    nothing for as long as that took, then the progress line."""
    from sentpipe.schemas.samples import SampleFactory

    events = tmp_path / "events.jsonl"
    f = SampleFactory(5)
    events.write_bytes(b"".join(f.message_status(f"m{i}", "read").body + b"\n" for i in range(50)))
    res, seen = run_on_a_terminal(["send", unreachable_url(), "--file", str(events)], dict(os.environ), 60)
    assert res.returncode == 1  # nothing listens there: checked, then refused in one line
    assert f"checking {events}".encode() in seen and b"cannot reach" in seen, seen
