"""Operations commands as a user runs them: `offsets reset`, `events show`, and one-line errors on bad input.

The commands run as real subprocesses (`python -m sentpipe ...`) against the real broker and database.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from urllib.parse import quote

import orjson
import psycopg
import pytest
from confluent_kafka.admin import AdminClient
from pydantic import SecretStr

from sentpipe.schemas.events import frame
from sentpipe.schemas.samples import SampleFactory
from sentpipe.schemas.topics import Topics
from sentpipe.settings import Settings
from tests.handlers_fixture import create_fixture_tables
from tests.kafka_tools import group_offsets, read_topic
from tests.pipeline import deliver, start_ingress, start_worker, wait_for
from tests.processes import free_port, run_on_a_terminal, settings_env


def sentpipe(
    s: Settings, *args: str, timeout: float = 120, **env: object
) -> subprocess.CompletedProcess[str]:
    """Run `python -m sentpipe ARGS` with the test's settings (plus SENTPIPE_* overrides in `env`)."""
    return subprocess.run(
        [sys.executable, "-m", "sentpipe", *args],
        env={**settings_env(s, **env), "COLUMNS": "250"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def sentpipe_interrupted(
    s: Settings,
    *args: str,
    when: str,
    after_s: float = 0.0,
    sig: int = signal.SIGINT,
    then: int | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `python -m sentpipe ARGS` and press Ctrl-C (or send `sig`) `after_s` after a line on stderr
    holds `when`; `then`: a second signal right after it."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "sentpipe", *args],
        env={**settings_env(s), "COLUMNS": "250"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if when in line:
            time.sleep(after_s)
            proc.send_signal(sig)
            if then is not None:
                proc.send_signal(then)
            break
    out, rest = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "".join(seen) + rest)


def assert_one_line_error(res: subprocess.CompletedProcess[str], *needles: str) -> None:
    lines = res.stderr.strip().splitlines()
    assert res.returncode != 0, res
    assert "Traceback" not in res.stderr, res.stderr
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: "), lines
    for needle in needles:
        assert needle in lines[0], lines[0]


def group_members(bootstrap: str, group: str) -> int:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    return len(admin.describe_consumer_groups([group])[group].result(10).members)


BAD_INPUT = [
    (
        ["replay", "--since", "2026-01-02T00:00:00Z", "--until", "2026-01-01T00:00:00Z"],
        ["time range is empty"],
    ),
    (["replay", "--since", "yesterday"], ["--since", "ISO-8601"]),
    (["replay", "--from-offset", "3-100"], ["--from-offset", "PARTITION:OFFSET"]),
    (["replay", "--to-offset", "a:1"], ["--to-offset", "PARTITION:OFFSET"]),
    (["replay", "--from-offset", "0:10", "--to-offset", "0:5"], ["after --to-offset"]),
    (["replay", "--from-offset", "99:0"], ["no partition 99"]),
    # The test's topics are empty: offset 0 is where partition 0's next record goes, offset 5 is nothing.
    (
        ["replay", "--from-offset", "0:5"],
        ["--from-offset 0:5 is past the end", "next record will be offset 0"],
    ),
    (["replay", "--type", "message.bounced"], ["unknown event type", "message.status.updated"]),
    (["replay", "--bogus"], ["--bogus"]),
    (["replay", "--event-id", ""], ["--event-id is empty"]),
    (["replay", "--tenant", "t" * 300], ["--tenant is longer than 256"]),
    (["offsets", "reset", "--group", "g", "--to-earliest", "--topic", "no.such.topic"], ["no.such.topic"]),
    (["offsets", "reset", "--group", "g"], ["exactly one of"]),
    (["offsets", "reset", "--to-earliest"], ["Missing option '--group'"]),
    (["offsets", "reset", "--group", "g", "--to-earliest", "--to-latest"], ["exactly one of"]),
    (["offsets", "reset", "--group", "g", "--to-datetime", "soon"], ["ISO-8601"]),
    (["offsets", "reset", "--group", "g" * 32768, "--to-earliest"], ["--group", "printable characters"]),
    (["offsets", "reset", "--group", "g\tx", "--to-earliest"], ["--group", "printable characters"]),
    (["offsets", "reset", "--group", "g", "--to-datetime", "1969-12-31T23:59:59Z"], ["within 1970..9999"]),
    (["dlq", "show", "zero"], ["not a DLQ record ID"]),
    (["dlq", "show", "0:12345"], ["no DLQ record 0:12345"]),
    (["dlq", "redrive", "--stage", "shipping"], ["unknown stage", "handler"]),
    (["dlq", "redrive", "--id", "0:7"], ["no DLQ record 0:7"]),
    (["dlq", "list", "--limit", "0"], ["--limit"]),
    # Other scripts' digits: str.isdigit() took them; int() refused a superscript, read Arabic-Indic ones.
    (["replay", "--from-offset", "\u00b2:0"], ["--from-offset", "PARTITION:OFFSET"]),
    (["replay", "--to-offset", "0:\u0661"], ["--to-offset", "PARTITION:OFFSET"]),
    (["replay", "--from-offset", "0:9223372036854775808"], ["--from-offset", "beyond"]),
    (["dlq", "list", "--limit", str(10**27)], ["--limit"]),
    (["dlq", "list", "--timeout", "nan"], ["--timeout", "seconds"]),
    (["offsets", "reset", "--group", "g", "--to-latest", "--timeout", "1e308"], ["--timeout", "seconds"]),
    (["events", "show", "evt_1", "--timeout", "-1"], ["--timeout", "seconds"]),
]


@pytest.mark.parametrize(("args", "needles"), BAD_INPUT, ids=[" ".join(a) for a, _ in BAD_INPUT])
def test_bad_input_is_one_line_and_non_zero(settings: Settings, args: list[str], needles: list[str]) -> None:
    assert_one_line_error(sentpipe(settings, *args), *needles)


UNREACHABLE = [
    ["replay"],
    ["replay", "--dry-run"],
    ["dlq", "list"],
    ["dlq", "redrive"],
    ["events", "show", "evt_1"],
    ["offsets", "reset", "--group", "g", "--to-latest"],
]


def test_unreachable_broker_fails_fast_naming_the_address(settings: Settings) -> None:
    address = f"127.0.0.1:{free_port()}"

    def run(args: list[str]) -> tuple[float, subprocess.CompletedProcess[str]]:
        t0 = time.monotonic()
        res = sentpipe(settings, *args, kafka_bootstrap=address, timeout=60)
        return time.monotonic() - t0, res

    # Concurrently: each one waits out the broker timeout on its own.
    with ThreadPoolExecutor(len(UNREACHABLE)) as pool:
        for args, (took, res) in zip(UNREACHABLE, pool.map(run, UNREACHABLE), strict=True):
            # Not a timing measure (these machines are shared): a bound that only a wait without end, or one
            # per retry, passes; 10 s is the broker timeout each one waits out.
            assert took < 45, (args, took)
            assert_one_line_error(res, address)


def test_a_replay_of_an_event_not_in_the_window_is_not_a_success(settings: Settings) -> None:
    """It ended with status 0, so a script could not tell it had replayed nothing."""
    res = sentpipe(settings, "replay", "--event-id", "evt_never_sent", "--dry-run")
    assert res.returncode == 1, res.stderr
    assert res.stderr.splitlines()[-1] == "error: not found in the window: evt_never_sent", res.stderr
    # With a type or tenant asked too, the id may be in the window and of another: the line says both.
    res = sentpipe(settings, "replay", "--event-id", "evt_never_sent", "--tenant", "acme", "--dry-run")
    assert res.returncode == 1, res.stderr
    last = res.stderr.splitlines()[-1]
    assert last == "error: not found in the window or not of the --type/--tenant asked: evt_never_sent", last


@pytest.mark.parametrize("group", ["dlq", "topics", "offsets"])
def test_a_group_without_its_command_says_what_is_missing(settings: Settings, group: str) -> None:
    """The help, then an empty `error:  (see --help)`."""
    res = sentpipe(settings, group)
    assert res.returncode == 2 and "Commands" in res.stdout, res.stdout
    assert res.stderr.strip() == "error: a command is missing: choose one of those listed above (see --help)"


def test_unknown_raw_topic_is_one_line(settings: Settings) -> None:
    res = sentpipe(settings, "replay", topic_prefix="nosuchprefix.")
    assert_one_line_error(res, "nosuchprefix.events.raw does not exist")
    assert_one_line_error(sentpipe(settings, "dlq", "list", topic_prefix="nosuchprefix."), "does not exist")


def test_offsets_reset_refuses_while_the_worker_runs_and_works_once_stopped(
    settings: Settings, topics: Topics, tmp_path: Path
) -> None:
    bootstrap, group = settings.kafka_bootstrap, settings.app_id
    bodies = [s.body for s in SampleFactory(21).mix(60)]
    ingress, url, _ = start_ingress(settings, tmp_path)
    worker = start_worker(settings, tmp_path)
    try:
        deliver(settings, url, bodies, worker, len(bodies), timeout=60)
        wait_for(
            lambda: sum(n for (t, _), n in group_offsets(bootstrap, group).items() if t == topics.raw),
            lambda n: n == len(bodies),
            30,
            "the worker committed the raw topic",
            worker.proc.tail,
        )
        refused = sentpipe(settings, "offsets", "reset", "--group", group, "--to-earliest")
        assert_one_line_error(refused, f"consumer group {group}", "active member", "stop them")
        # The dry run is how the reset is prepared, before the worker is stopped: shown, with the members.
        preview = sentpipe(settings, "offsets", "reset", "--group", group, "--to-earliest", "--dry-run")
        assert preview.returncode == 0, preview.stderr
        assert "dry run," in preview.stdout and topics.raw in preview.stdout
        assert "active member" in preview.stderr and "stop them" in preview.stderr
        assert sum(n for (t, _), n in group_offsets(bootstrap, group).items() if t == topics.raw) == len(
            bodies
        )
    finally:
        worker.stop()
        ingress.stop()
    wait_for(lambda: group_members(bootstrap, group), lambda n: n == 0, 60, "the group to empty")
    committed = group_offsets(bootstrap, group)
    raw_end = {p: n for (t, p), n in committed.items() if t == topics.raw}
    assert sum(raw_end.values()) == len(bodies)

    dry = sentpipe(settings, "offsets", "reset", "--group", group, "--to-earliest", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert group_offsets(bootstrap, group) == committed

    # Another deployment's topic (a copied command): the worker would refuse to start with its offsets.
    outside = sentpipe(
        settings, "offsets", "reset", "--group", group, "--to-earliest", "--topic", "sent.events.raw"
    )
    assert_one_line_error(outside, "--topic sent.events.raw", "not one of this deployment's topics")
    assert group_offsets(bootstrap, group) == committed

    res = sentpipe(settings, "offsets", "reset", "--group", group, "--to-earliest", "--topic", topics.raw)
    assert res.returncode == 0, res.stderr
    # The router's dedup table drops what it reads again: said, with where to go instead.
    assert "dedup table drops" in res.stderr and f"{group}-projections" in res.stderr
    after = group_offsets(bootstrap, group)
    assert {p: n for (t, p), n in after.items() if t == topics.raw} == {p: 0 for p in range(4)}
    # Only the named topic moved.
    assert {k: v for k, v in after.items() if k[0] != topics.raw} == {
        k: v for k, v in committed.items() if k[0] != topics.raw
    }

    res = sentpipe(settings, "offsets", "reset", "--group", group, "--to-latest", "--topic", topics.raw)
    assert res.returncode == 0, res.stderr
    assert {p: n for (t, p), n in group_offsets(bootstrap, group).items() if t == topics.raw} == {
        p: raw_end.get(p, 0) for p in range(4)
    }

    # A time after every record: nothing to reprocess, the group sits at the end.
    res = sentpipe(
        settings,
        "offsets",
        "reset",
        "--group",
        group,
        "--to-datetime",
        "2999-01-01T00:00:00Z",
        "--topic",
        topics.raw,
    )
    assert res.returncode == 0, res.stderr
    assert sum(n for (t, _), n in group_offsets(bootstrap, group).items() if t == topics.raw) == len(bodies)
    res = sentpipe(
        settings,
        "offsets",
        "reset",
        "--group",
        group,
        "--to-datetime",
        "2000-01-01T00:00:00Z",
        "--topic",
        topics.raw,
    )
    assert res.returncode == 0, res.stderr
    assert sum(n for (t, _), n in group_offsets(bootstrap, group).items() if t == topics.raw) == 0


def test_events_show_finds_an_event_everywhere_it_is(
    settings: Settings, topics: Topics, tmp_path: Path
) -> None:
    db = settings.database_url.get_secret_value()
    create_fixture_tables(db)
    f = SampleFactory(22)
    inbound = [f.inbound() for _ in range(10)]
    ids = [frame(s.body, webhook_id=None).event_id for s in inbound]
    with psycopg.connect(db, autocommit=True) as c:
        c.execute("INSERT INTO poison (event_id) VALUES (%s)", (ids[3],))
    ingress, url, _ = start_ingress(settings, tmp_path)
    worker = start_worker(settings, tmp_path, handler_modules=["tests.handlers_fixture"])
    try:
        bodies = [s.body for s in inbound]
        deliver(settings, url, bodies, worker, len(bodies), timeout=60)
        read_topic(settings.kafka_bootstrap, topics.dlq, at_least=1, timeout=60)  # the poisoned one
    finally:
        worker.stop()
        ingress.stop()
    raw = {r.key: r for r in read_topic(settings.kafka_bootstrap, topics.raw)}

    res = sentpipe(settings, "events", "show", ids[0])
    assert res.returncode == 0, res.stderr
    rec = raw[ids[0].encode()]
    assert any(topics.raw in line and f" {rec.offset} " in line for line in res.stdout.splitlines()), (
        res.stdout
    )
    assert f"dedup table: seen for tenant {settings.default_tenant} (first routed" in res.stdout
    assert topics.message_inbound in res.stdout
    assert "database: inbound_messages" in res.stdout
    assert "DLQ entries: none" in res.stdout

    res = sentpipe(settings, "events", "show", ids[3])
    assert res.returncode == 0, res.stderr
    assert "DLQ entries" in res.stdout and "handler" in res.stdout and "PermanentError" in res.stdout

    res = sentpipe(settings, "events", "show", "evt_nowhere")
    assert_one_line_error(res, "evt_nowhere not found")
    assert "raw record(s): none" in res.stdout and "searched raw" in res.stdout


def test_events_show_on_a_database_without_the_tables_says_to_migrate(settings: Settings) -> None:
    """A database no `db migrate` ran on was reported as "database unavailable", with the SQL of the
    query that failed: the line named neither the cause nor the fix."""
    url = settings.database_url.get_secret_value()
    schema = f"{settings.app_id}_empty".replace("-", "_")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        base = url.split("?")[0]
        empty = settings.model_copy(
            update={"database_url": SecretStr(f"{base}?options={quote(f'-csearch_path={schema}')}")}
        )
        res = sentpipe(empty, "events", "show", "evt_1")
        assert_one_line_error(res, "error: database has no sentpipe tables: run `sentpipe db migrate`")
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


def write_as_ingress_and_router(
    s: Settings, topics: Topics, body: bytes, event_id: str, tenants: list[str]
) -> None:
    """The raw record of each tenant's delivery and its routed record, where the ingress and the router put
    them (murmur2 partitions, as Kafka's Java clients)."""
    from confluent_kafka import Producer

    from sentpipe.schemas import routing as r

    producer = Producer({"bootstrap.servers": s.kafka_bootstrap, "partitioner": "murmur2_random"})
    now_ms = int(time.time() * 1000)
    for tenant in tenants:
        headers = r.raw_headers(
            tenant=tenant, received_at_ms=now_ms, webhook_id="msg_1", request_id="rq", event_type=None
        )
        producer.produce(topics.raw, body, event_id.encode(), headers=headers, timestamp=now_ms)
        routed = r.route(
            event_id.encode(),
            body,
            dict(headers),
            topics=topics,
            id_source="auto",
            default_tenant="default",
            record_timestamp_ms=now_ms,
        )
        producer.produce(routed.topic, routed.value, routed.key, timestamp=now_ms)
    assert producer.flush(30) == 0


@pytest.mark.parametrize(
    "event_id", ['evt"quoted', "evt\\back", "evt\ttab", "evt-\u00e9t\u00e9", "evt\u001bx"]
)
def test_events_show_finds_the_routed_record_of_an_id_json_escapes(
    settings: Settings, topics: Topics, event_id: str
) -> None:
    """The routed record was looked for by the id's bytes, which its JSON holds escaped (`\\"`, `\\t`):
    an event whose id has such a character showed "routed record(s): none" though it was projected."""

    from sentpipe.processors.inspect import locate

    doc = orjson.loads(SampleFactory(24).message_status("m-escaped", "read").body)
    doc["id"] = event_id
    body = orjson.dumps(doc)
    assert frame(body, webhook_id=None).event_id == event_id
    # Partitioned as the ingress and the router do (murmur2, as Kafka's Java clients).
    write_as_ingress_and_router(settings, topics, body, event_id, ["default"])

    report = locate(settings, event_id, timeout=10)
    assert len(report.raw) == 1
    assert [f.key for f in report.routed] == [b"default/m-escaped"]


def test_events_show_prints_a_payload_number_of_any_size_as_stored(settings: Settings) -> None:
    """A payload holding a number of more than 4,300 digits (accepted and stored digit for digit) made
    `events show` fail with CPython's int-conversion limit: the whole report was lost."""
    digits = "1" + "0" * 5000
    with psycopg.connect(settings.database_url.get_secret_value(), autocommit=True) as c:
        c.execute(
            "INSERT INTO inbound_messages (event_id, tenant, occurred_at, received_at, payload)"
            " VALUES ('evt-big', 't', now(), now(), %s::jsonb)",
            (f'{{"amount": {digits}, "small": 0.1}}',),
        )
    from sentpipe.processors.inspect import database_rows

    (row,) = database_rows(settings.database_url.get_secret_value(), "evt-big")["inbound_messages"]
    assert row["payload"] == {"amount": Decimal(digits), "small": 0.1}
    res = sentpipe(settings, "events", "show", "evt-big")
    assert res.returncode == 0, res.stderr
    assert "database: inbound_messages" in res.stdout and "100000000" in res.stdout


def test_events_show_finds_the_routed_record_of_every_tenant_that_sent_the_id(
    settings: Settings, topics: Topics
) -> None:
    """Two tenants may send the same event id (their events are both kept); the routed key is the tenant's,
    so their routed records sit in different partitions, and only the first tenant's was searched."""
    from confluent_kafka import murmur2

    from sentpipe.processors.inspect import locate

    n = 4  # the routed partitions of this test's topics

    def partition(key: str) -> int:  # as the ingress and the router partition (Kafka's Java clients')
        return int(murmur2(key.encode(), n))

    # One whose two routed keys fall in different partitions.
    message_id = next(f"m-{i}" for i in range(100) if partition(f"default/m-{i}") != partition(f"acme/m-{i}"))
    body = SampleFactory(23).message_status(message_id, "read").body
    event_id = frame(body, webhook_id=None).event_id
    write_as_ingress_and_router(settings, topics, body, event_id, ["default", "acme"])

    report = locate(settings, event_id, timeout=10)
    assert len(report.raw) == 2
    assert sorted(f.key for f in report.routed) == sorted(
        [f"acme/{message_id}".encode(), f"default/{message_id}".encode()]
    )


WAITING_FOR_THE_BROKER = [
    ["topics", "ensure"],
    ["replay"],
    ["dlq", "list"],
    ["dlq", "show", "0:1"],
    ["dlq", "redrive"],
    ["spool", "drain"],
    ["events", "show", "evt_1"],
    ["offsets", "reset", "--group", "g", "--to-latest"],
]


@pytest.mark.parametrize("args", WAITING_FOR_THE_BROKER, ids=[" ".join(a) for a in WAITING_FOR_THE_BROKER])
def test_sigterm_while_a_command_waits_for_the_broker_says_interrupted(
    args: list[str], tmp_path: Path
) -> None:
    """`topics ensure`, `replay`, `dlq redrive` and `spool drain` asked the broker before the SIGTERM handler
    was in place: killed there, they ended with status 143 and no word."""
    with socket.socket() as broker:  # takes the connection and never answers: the command waits
        broker.bind(("127.0.0.1", 0))
        broker.listen()
        broker.settimeout(60)
        host, port = broker.getsockname()
        proc = subprocess.Popen(
            [sys.executable, "-m", "sentpipe", *args, "--timeout", "60"],
            env=settings_env(Settings(spool_dir=tmp_path), kafka_bootstrap=f"{host}:{port}"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            conn, _ = broker.accept()  # the command is asking the broker now
            with conn:
                proc.send_signal(signal.SIGTERM)
                _, err = proc.communicate(timeout=30)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130 and err.strip().splitlines() == ["interrupted"], (proc.returncode, err)


def test_dlq_show_refuses_a_malformed_id_before_asking_the_broker() -> None:
    """It asked the broker first: with the broker down, the ID's error came only after the timeout, replaced
    by the broker's."""
    with socket.socket() as broker:
        broker.bind(("127.0.0.1", 0))
        broker.listen()
        host, port = broker.getsockname()
        res = sentpipe(Settings(), "dlq", "show", "x", "--timeout", "5", kafka_bootstrap=f"{host}:{port}")
        broker.setblocking(False)
        with pytest.raises(BlockingIOError):
            broker.accept()[0].close()  # nobody connected
    assert_one_line_error(res, "'x' is not a DLQ record ID")


def test_events_show_into_a_pipe_keeps_every_cell_whole(settings: Settings, topics: Topics) -> None:
    """Written to a pipe or a file (`events show ID > ticket.txt`, `dlq list | grep`), the tables were cut
    to 80 columns: "sent.event…", "2026-12-07T…", the key and headers cut, each header on its own line."""
    body = SampleFactory(25).message_status("m-piped", "read").body
    event_id = frame(body, webhook_id=None).event_id
    write_as_ingress_and_router(settings, topics, body, event_id, ["default"])
    env = {k: v for k, v in settings_env(settings).items() if k != "COLUMNS"}
    res = subprocess.run(
        [sys.executable, "-m", "sentpipe", "events", "show", event_id],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "…" not in res.stdout, res.stdout
    (raw_row,) = [line for line in res.stdout.splitlines() if f" {topics.raw} " in line]
    assert event_id in raw_row and "sentpipe-tenant=default, " in raw_row, res.stdout


def test_events_show_on_a_terminal_says_it_is_looking(settings: Settings, topics: Topics) -> None:
    """`events show` reads up to --scan-limit records per partition of several topics: seconds in which a
    terminal showed nothing at all until the tables."""
    body = SampleFactory(26).message_status("m-tty", "read").body
    event_id = frame(body, webhook_id=None).event_id
    write_as_ingress_and_router(settings, topics, body, event_id, ["default"])
    res, shown = run_on_a_terminal(["events", "show", event_id], settings_env(settings))
    assert res.returncode == 0, res
    assert event_id in res.stdout, res.stdout
    assert b"looking for the event" in shown, shown
