"""The console under hostile or careless clients: floods, odd encodings, out-of-range and unknown parameters.

Every mistake of a client gets a JSON answer naming what is wrong (never a 500, never a traceback in the
log, never "database unavailable" for bad input). The app runs in this process against the real broker and
database, as in test_console_security.py.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any

import orjson
import psycopg
import pytest
from aiohttp import ClientSession, ClientTimeout, CookieJar, web
from aiohttp.test_utils import TestServer, make_mocked_request
from pydantic import SecretStr
from yarl import URL

from sentpipe.console import calls, create_app
from sentpipe.console.app import SAMPLER, SESSIONS, SETTINGS, entry_json, send_json
from sentpipe.console.auth import Session, Sessions
from sentpipe.console.calls import MAX_CALLS, off_loop
from sentpipe.processors import dlq as dlq_ops
from sentpipe.processors import reading
from sentpipe.processors.dlq import DlqEntry
from sentpipe.schemas import routing as r
from sentpipe.schemas.topics import Topics
from sentpipe.settings import Settings
from tests.kafka_tools import wait_topics_ready
from tests.processes import settings_env
from tests.test_console_security import TOKEN, sign_in
from tests.test_dlq import _handler_dead_letters

CAP = 5


async def serve(app: web.Application) -> AsyncIterator[str]:
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield f"http://127.0.0.1:{server.port}"
    await server.close()


@pytest.fixture
def app(settings: Settings) -> web.Application:
    s = settings.model_copy(update={"console_token": SecretStr(TOKEN), "console_metrics_urls": []})
    app = create_app(s)
    app[SESSIONS].max_sessions = CAP
    return app


@pytest.fixture
async def console(app: web.Application) -> AsyncIterator[str]:
    async for base in serve(app):
        yield base


@pytest.fixture
async def open_app(settings: Settings) -> AsyncIterator[tuple[str, web.Application]]:
    """A console without a token (loopback only), its session table capped at CAP."""
    app = create_app(settings.model_copy(update={"console_metrics_urls": []}))
    app[SESSIONS].max_sessions = CAP
    async for base in serve(app):
        yield base, app


@pytest.fixture
async def http(console: str) -> AsyncIterator[tuple[ClientSession, str, dict[str, str]]]:
    """A signed-in client, the console's URL and the headers a POST needs."""
    async with ClientSession(cookie_jar=CookieJar(unsafe=True)) as client:
        status, csrf = await sign_in(client, console)
        assert status == 303
        yield client, console, {"X-CSRF-Token": csrf}


@pytest.fixture
def no_tracebacks(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Fails the test when anything logs an error or a traceback (a client's mistake is not one)."""
    caplog.set_level(logging.WARNING)
    yield
    bad = [rec for rec in caplog.records if rec.levelno >= logging.ERROR or rec.exc_info]
    assert not bad, [rec.getMessage() for rec in bad]


async def answer(http: ClientSession, method: str, url: str, **kwargs: Any) -> tuple[int, dict[str, Any]]:
    async with http.request(method, url, allow_redirects=False, **kwargs) as resp:
        assert resp.content_type == "application/json", (resp.status, await resp.text())
        return resp.status, await resp.json()


# --- 1. session flood ------------------------------------------------------------------------------------
def with_cookie(session: Session) -> web.Request:
    return make_mocked_request("GET", "/", headers={"Cookie": f"sentpipe_console={session.id}"})


def test_at_the_cap_sessions_not_signed_in_go_first() -> None:
    sessions = Sessions(TOKEN, max_sessions=3)
    signed = sessions.new(signed_in=True)
    kept = sessions.new(signed_in=False)
    assert sessions.get(with_cookie(kept)) is kept  # its cookie came back: a page in use
    for _ in range(10):
        sessions.new(signed_in=False)
    assert len(sessions) == 3
    assert sessions.get(with_cookie(signed)) is signed and sessions.get(with_cookie(kept)) is kept
    # Only when nothing else is left does a signed-in session go, the least recently used first.
    newer = sessions.new(signed_in=True)
    assert sessions.get(with_cookie(signed)) is signed
    sessions.new(signed_in=True)
    assert sessions.get(with_cookie(kept)) is None and sessions.get(with_cookie(signed)) is signed
    sessions.new(signed_in=True)
    assert sessions.get(with_cookie(newer)) is None and sessions.get(with_cookie(signed)) is signed


async def test_a_flood_of_requests_without_a_cookie_signs_nobody_out(
    app: web.Application, http: tuple[ClientSession, str, dict[str, str]]
) -> None:
    client, base, headers = http
    async with ClientSession() as stranger:  # no cookie jar kept between requests
        for _ in range(4 * CAP):
            for path in ("/login", "/healthz", "/static/app.css", "/api/session", "/"):
                async with stranger.get(f"{base}{path}", cookies={}, allow_redirects=False) as resp:
                    assert resp.status in (200, 303, 401), (path, resp.status)
            async with stranger.post(f"{base}/login", data={"csrf": "x", "token": "y"}) as resp:
                assert resp.status == 403
    assert len(app[SESSIONS]) == 1  # only the signed-in one: nothing else made a session
    async with client.get(f"{base}/api/session") as resp:
        assert resp.status == 200
    # Its POSTs still pass the CSRF check (and fail on the input instead).
    status, body = await answer(client, "POST", f"{base}/api/replay", json={"since": "x"}, headers=headers)
    assert status == 400 and "ISO-8601" in body["error"]


async def test_without_a_token_a_flood_keeps_the_open_page_session(
    open_app: tuple[str, web.Application],
) -> None:
    base, app = open_app
    async with ClientSession(cookie_jar=CookieJar(unsafe=True)) as page:
        status, info = await answer(page, "GET", f"{base}/api/session")
        assert status == 200
        await answer(page, "GET", f"{base}/api/overview")  # the page's cookie comes back
        async with ClientSession() as stranger:
            for _ in range(4 * CAP):
                for path in ("/healthz", "/static/app.css", "/api/overview", "/"):
                    async with stranger.get(f"{base}{path}") as resp:
                        assert resp.status == 200 and "Set-Cookie" not in resp.headers, path
                    stranger.cookie_jar.clear()
                # /api/session hands out a session (the page's CSRF token): these go first at the cap.
                async with stranger.get(f"{base}/api/session") as resp:
                    assert resp.status == 200
                stranger.cookie_jar.clear()
        assert len(app[SESSIONS]) == CAP
        status, body = await answer(
            page, "POST", f"{base}/api/replay", json={"since": "x"}, headers={"X-CSRF-Token": info["csrf"]}
        )
        assert status == 400 and "ISO-8601" in body["error"]


# --- 2-4. bad input: 400 naming the parameter, never a 500 or a 503 ----------------------------------------
async def all_refused(client: ClientSession, base: str, cases: dict[str, str]) -> None:
    """Each GET path answers 400 with an error that starts with its message (no Python internals)."""
    for path, message in cases.items():
        status, body = await answer(client, "GET", f"{base}{path}")
        assert status == 400 and body["error"].startswith(message), (path, body)
        assert "invalid literal" not in body["error"], (path, body)


@pytest.mark.usefixtures("no_tracebacks")
async def test_out_of_range_and_malformed_numbers_are_400_naming_the_parameter(
    http: tuple[ClientSession, str, dict[str, str]],
) -> None:
    client, base, _ = http
    cases = {
        "/api/dlq?limit=1000000000000000000000000000000": "limit must be from 1 to 1000",
        "/api/dlq?limit=0": "limit must be from 1 to 1000",
        "/api/dlq?limit=abc": "limit must be an integer from 1 to 1000",
        "/api/dlq?limit=%C2%B2": "limit must be an integer",  # superscript two
        "/api/dlq?limit=%D9%A1": "limit must be an integer",  # Arabic-Indic one
        "/api/search?page_size=0": "page_size must be from 1 to",
        "/api/event?id=abc&scan_limit=-5": "scan_limit must be from 1 to",
        "/api/event?id=abc&scan_limit=1e3": "scan_limit must be an integer",
    }
    await all_refused(client, base, cases)


def _token(value: object) -> str:
    """`value` encoded as `history.Cursor.token` encodes a cursor's fields."""
    return base64.urlsafe_b64encode(orjson.dumps(value)).decode().rstrip("=")


@pytest.mark.usefixtures("no_tracebacks")
async def test_text_the_database_cannot_hold_is_400_not_database_unavailable(
    http: tuple[ClientSession, str, dict[str, str]],
) -> None:
    client, base, _ = http
    cases = {
        "/api/search?q=%00": "q must not contain NUL",
        "/api/search?tenant=a%00b": "tenant must not contain NUL",
        "/api/event?id=%00abc": "id must not contain NUL",
        f"/api/search?q={'x' * 257}": "q is longer than 256",
        "/api/search?type=unrouted": "unknown event type 'unrouted'",  # no history: not "no events"
        "/api/search?after=abc": "after is not a cursor a search gave",
        # Cursors shaped as a search gives them, with what no search gives: a NUL, a wrong JSON type, nesting,
        # a time without a zone, an unknown type, a size past any real one.
        **{
            f"/api/search?after={_token(v)}": "after is not a cursor a search gave"
            for v in (
                ["2026-01-01T00:00:00+00:00", "e\u0000", "t", "message.status.updated"],
                ["2026-01-01T00:00:00+00:00", 7, "t", "message.status.updated"],
                {"at": "2026-01-01T00:00:00+00:00"},
                [[["2026-01-01T00:00:00+00:00"]], "e", "t", "message.status.updated"],
                ["2026-01-01T00:00:00", "e", "t", "message.status.updated"],
                ["2026-01-01T00:00:00+00:00", "e", "t", "no.such.type"],
                ["2026-01-01T00:00:00+00:00", "e" * 3000, "t", "message.status.updated"],
            )
        },
        "/api/search?page=2": "unknown parameter 'page'",  # pages are cursors (`after`), not numbers
        "/api/dlq/entry?id=%C2%B2": "'²' is not a DLQ record ID",
        "/api/dlq/entry?id=0:99999999999999999999999": "'0:99999999999999999999999' is not a DLQ record ID",
    }
    await all_refused(client, base, cases)
    # The last second a time can name is a bound, not "year 10000 is out of range".
    status, body = await answer(client, "GET", f"{base}/api/search?since=9999-12-31T23:59:59.999999Z")
    assert status == 200 and body["rows"] == [], body
    status, body = await answer(client, "GET", f"{base}/api/search?until=9999-12-31T23:59:59.999999Z")
    assert status == 200, body


@pytest.mark.usefixtures("no_tracebacks")
async def test_a_search_or_trace_behind_a_held_table_answers_instead_of_waiting(
    open_app: tuple[str, web.Application], settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Behind a table a migration holds, Search had no answer for as long as it held it (69 s measured
    behind a 70 s lock), and its call slot stayed taken."""
    monkeypatch.setattr(reading, "STATEMENT_TIMEOUT_S", 0.5)
    base, _ = open_app
    with psycopg.connect(settings.database_url.get_secret_value()) as holder:
        holder.execute("LOCK TABLE message_events IN ACCESS EXCLUSIVE MODE")
        async with ClientSession(cookie_jar=CookieJar(unsafe=True), timeout=ClientTimeout(60)) as page:
            assert (await answer(page, "GET", f"{base}/api/session"))[0] == 200
            status, body = await answer(page, "GET", f"{base}/api/search")
            assert status == 503 and body["code"] == "database_unavailable", body
            assert body["error"].startswith("database did not answer within its statement timeout"), body
            status, body = await answer(page, "GET", f"{base}/api/event?id=e-1")
            assert status == 200 and body["db_error"] == reading.unavailable(
                psycopg.errors.QueryCanceled()
            ), body


@pytest.mark.usefixtures("no_tracebacks")
async def test_the_dead_letters_page_counts_what_a_redrive_took(
    open_app: tuple[str, web.Application], settings: Settings
) -> None:
    """After a redrive of 120,000 dead letters the page said "0 shown, 0 matching, 120000 in the DLQ", and
    nothing where they had gone (`dlq list` says "120000 more a redrive took")."""
    base, _ = open_app
    topics = Topics(settings.topic_prefix)
    wait_topics_ready(settings.kafka_bootstrap, [topics.dlq_redriven])
    _handler_dead_letters(settings, topics, 3)
    assert dlq_ops.redrive(settings, dlq_ops.make_selection(ids=["0:0", "0:1"])).produced == 2
    async with ClientSession(cookie_jar=CookieJar(unsafe=True)) as page:
        assert (await answer(page, "GET", f"{base}/api/session"))[0] == 200
        status, body = await answer(page, "GET", f"{base}/api/dlq")
        assert status == 200 and [e["id"] for e in body["entries"]] == ["0:2"], body
        assert (body["matched"], body["total"], body["redriven"]) == (1, 3, 2), body
        status, body = await answer(page, "GET", f"{base}/api/dlq?stage=route")
        assert (body["matched"], body["total"], body["redriven"]) == (0, 3, 0), body


@pytest.mark.usefixtures("no_tracebacks")
async def test_a_dlq_record_that_is_not_there_is_404_not_found(
    http: tuple[ClientSession, str, dict[str, str]], topics: Topics
) -> None:
    """A well-formed ID past the end of the DLQ, or on a partition it does not have: a 400 said the caller
    had asked wrongly, when the record simply is not there."""
    client, base, headers = http
    for entry_id in ("0:999", "999:0"):
        for _ in range(60):
            status, body = await answer(client, "GET", f"{base}/api/dlq/entry?id={entry_id}")
            # The topic was made for this test a moment ago: until its partition has a leader the answer
            # is a 503 broker_unavailable (right, and what a client retries), as it was once under load.
            if body.get("code") != "broker_unavailable":
                break
            await asyncio.sleep(0.5)
        assert (status, body["code"]) == (404, "not_found"), body
        assert topics.dlq in body["error"] or "no DLQ record" in body["error"], body
        # Asked to redrive it: a 202 and a job that failed a moment later.
        status, body = await answer(
            client,
            "POST",
            f"{base}/api/dlq/redrive",
            json={"ids": [entry_id], "dry_run": True},
            headers=headers,
        )
        assert (status, body.get("code")) == (404, "not_found"), body


@pytest.mark.usefixtures("no_tracebacks")
async def test_an_unknown_charset_is_415_on_the_api_and_on_the_sign_in_form(
    console: str, http: tuple[ClientSession, str, dict[str, str]]
) -> None:
    client, base, headers = http
    for path in ("/api/replay", "/api/dlq/redrive", "/api/trigger"):
        status, body = await answer(
            client,
            "POST",
            f"{base}{path}",
            data=b'{"dry_run": true}',
            headers={**headers, "Content-Type": "application/json; charset=foo-bar"},
        )
        assert status == 415 and "charset 'foo-bar' is not supported" in body["error"], (path, body)
    async with ClientSession(cookie_jar=CookieJar(unsafe=True)) as stranger:
        status, body = await answer(
            stranger,
            "POST",
            f"{console}/login",
            data=b"csrf=x&token=y",
            headers={"Content-Type": "application/x-www-form-urlencoded; charset=foo"},
        )
        assert status == 415 and "charset 'foo'" in body["error"]
        status, body = await answer(
            stranger,
            "POST",
            f"{console}/login",
            data=b"csrf=%FF&token=\xff",
            headers={"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"},
        )
        assert status in (400, 403), body


# --- 5. aiohttp's own errors as JSON -----------------------------------------------------------------------
@pytest.mark.usefixtures("no_tracebacks")
async def test_not_found_wrong_method_and_too_large_are_json_on_the_api(
    http: tuple[ClientSession, str, dict[str, str]],
) -> None:
    client, base, headers = http
    status, body = await answer(client, "GET", f"{base}/api/no-such-thing")
    assert status == 404 and body == {"error": "no such endpoint", "code": "not_found"}
    async with client.get(f"{base}/api/replay") as resp:
        assert resp.status == 405 and resp.content_type == "application/json"
        assert "POST" in resp.headers["Allow"] and "GET is not allowed" in (await resp.json())["error"]
        assert (await resp.json())["code"] == "method_not_allowed"
    status, body = await answer(
        client, "POST", f"{base}/api/replay", json={"tenants": ["x" * (70 * 1024)]}, headers=headers
    )
    assert status == 413 and body == {"error": "the body is larger than 64 KiB", "code": "body_too_large"}


@pytest.mark.usefixtures("no_tracebacks")
async def test_a_parameter_given_twice_is_refused_not_half_read(
    http: tuple[ClientSession, str, dict[str, str]],
) -> None:
    """`?stage=route&stage=handler` listed the route stage's records only (the first value read, the other
    dropped unseen), and `?id=A&id=B` traced A alone: refused, naming the comma-separated form."""
    client, base, _ = http
    for path in ("/api/dlq?stage=route&stage=handler", "/api/event?id=a&id=b", "/api/search?type=a&type=b"):
        status, body = await answer(client, "GET", f"{base}{path}")
        assert status == 400 and body["code"] == "bad_request", (path, body)
        assert "given more than once" in body["error"], (path, body)


@pytest.mark.usefixtures("no_tracebacks")
async def test_a_filter_under_both_its_names_is_refused_not_half_read(
    http: tuple[ClientSession, str, dict[str, str]],
) -> None:
    """`?stages=route&stage=handler` listed the route stage alone (the singular dropped unseen), and a redrive
    of `{"reasons": [...], "reason": ...}` took one of the two: refused, in the list and in a redrive."""
    client, base, headers = http
    for path in ("/api/dlq?stages=route&stage=handler", "/api/dlq?reason=a&reasons=b"):
        status, body = await answer(client, "GET", f"{base}{path}")
        assert status == 400 and body["code"] == "bad_request", (path, body)
        assert "not both" in body["error"], (path, body)
    status, body = await answer(
        client,
        "POST",
        f"{base}/api/dlq/redrive",
        json={"stages": ["route"], "stage": "handler", "dry_run": True},
        headers=headers,
    )
    assert status == 400 and body == {"error": "give stages or stage, not both", "code": "bad_request"}, body


# --- 6. the API agrees with the CLI ------------------------------------------------------------------------
@pytest.mark.usefixtures("no_tracebacks")
async def test_unknown_parameters_are_refused_and_replay_partitions_checked_before_accepting(
    http: tuple[ClientSession, str, dict[str, str]],
) -> None:
    client, base, headers = http
    # `dlq list` takes no ids: refused rather than silently listing everything.
    status, body = await answer(client, "GET", f"{base}/api/dlq?ids=0:1")
    assert status == 400 and body["error"].startswith("unknown parameter 'ids'"), body
    assert body["code"] == "bad_request"
    for _ in range(20):  # a topic this new may still be electing its leader (503)
        status, body = await answer(client, "GET", f"{base}/api/dlq?stage=route&limit=5")
        if status != 503:
            break
        await asyncio.sleep(0.5)
    assert status == 200 and body["entries"] == [], body
    status, body = await answer(
        client, "POST", f"{base}/api/replay", json={"form_offsets": ["0:0"], "dry_run": True}, headers=headers
    )
    assert status == 400 and body["error"].startswith("unknown field 'form_offsets'"), body
    # The test's raw topic has 4 partitions: partition 100 is refused at once, not in a failed job.
    for spec, message in {
        "100:0": "has partitions 0..3; there is no partition 100",
        "\u00b2:0": "'\u00b2:0' is not PARTITION:OFFSET",
        "0:99999999999999999999": "offset 99999999999999999999 is beyond Kafka's largest",
    }.items():
        status, body = await answer(
            client,
            "POST",
            f"{base}/api/replay",
            json={"from_offsets": [spec], "dry_run": True},
            headers=headers,
        )
        assert status == 400 and message in body["error"], (spec, body)
    status, body = await answer(
        client, "POST", f"{base}/api/replay", json={"from_offsets": ["3:0"], "dry_run": True}, headers=headers
    )
    assert status == 202, body


# --- the console's JSON survives one bad value --------------------------------------------------------------
def test_an_integer_beyond_64_bits_or_a_lone_surrogate_does_not_break_an_answer() -> None:
    e = DlqEntry(0, 7, 1_700_000_000_000, b"k", b"{}", [(r.H_DLQ_STAGE, b"route")])
    resp = send_json({"entries": [{**entry_json(e.row()), "time": 10**40}], "bad": "\ud800"})
    assert resp.status == 200 and isinstance(resp.body, bytes)
    assert b'"time":"1' + b"0" * 40 + b'"' in resp.body and b'"bad":"?"' in resp.body


def test_a_call_still_running_does_not_hold_the_console_s_exit() -> None:
    """The API's database and Kafka calls ran in the default executor, whose threads asyncio.run waits for at
    exit: a SIGTERM during a long trace scan kept the console up past its stop bound, until a SIGKILL."""
    released = threading.Event()

    async def main() -> None:
        call = asyncio.ensure_future(off_loop(released.wait, 120))
        await asyncio.sleep(0.05)
        call.cancel()

    ran = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    ran.start()
    ran.join(60)
    try:
        assert not ran.is_alive() and not released.is_set()  # the loop ended with the call still running
    finally:
        released.set()


def test_at_most_max_calls_run_at_once_a_request_gone_included() -> None:
    """A thread per call and no cap: reloading a trace page piled up Kafka scans and database connections
    without end. A call whose request went away keeps its place until it ends."""
    release = threading.Event()
    lock = threading.Lock()
    running = [0, 0]  # now, most at once

    def scan() -> None:
        with lock:
            running[0] += 1
            running[1] = max(running[1], running[0])
        release.wait(30)
        with lock:
            running[0] -= 1

    async def main() -> None:
        calls = [asyncio.ensure_future(off_loop(scan)) for _ in range(MAX_CALLS + 3)]
        for _ in range(1000):
            if running[0] == MAX_CALLS:
                break
            await asyncio.sleep(0.01)
        calls[0].cancel()  # its page closed: the scan goes on, in its place
        await asyncio.sleep(0.1)
        assert running[0] == MAX_CALLS
        release.set()
        await asyncio.gather(*calls[1:])
        for _ in range(1000):  # the page gone's call ends too
            if running[0] == 0:
                break
            await asyncio.sleep(0.01)

    asyncio.run(main())
    assert running == [0, MAX_CALLS]


@pytest.mark.usefixtures("no_tracebacks")
async def test_with_every_slot_held_a_call_is_503_busy_not_a_request_that_never_ends(
    app: web.Application, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Waiting for a slot had no bound: six calls that never return (a hung query) held every later API
    request, each page waiting without an answer."""
    monkeypatch.setattr(calls, "SLOT_WAIT_S", 0.3)
    release = threading.Event()
    async for base in serve(app):
        hung = [asyncio.ensure_future(off_loop(release.wait, 30)) for _ in range(MAX_CALLS)]
        try:
            async with ClientSession(cookie_jar=CookieJar(unsafe=True)) as client:
                assert (await sign_in(client, base))[0] == 303
                async with client.get(f"{base}/api/dlq/entry?id=0:0") as resp:
                    body = await resp.json()
                    assert (resp.status, body["code"]) == (503, "busy"), body
                    assert resp.headers["Retry-After"] == "5" and "still running" in body["error"]
                release.set()
                await asyncio.gather(*hung)
                for _ in range(20):  # a topic this new may still be electing its leader (a 503)
                    status, body = await answer(client, "GET", f"{base}/api/dlq/entry?id=0:0")
                    if body.get("code") != "broker_unavailable":
                        break
                    await asyncio.sleep(0.5)
                assert status in (200, 404), body  # the slots are free again: an entry, or none there
        finally:
            release.set()
            await asyncio.gather(*hung, return_exceptions=True)


# --- 7. the URL is announced only once the port is bound ----------------------------------------------------
def _console(settings: Settings, port: int, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "sentpipe", "console", "--host", "127.0.0.1", "--port", str(port)],
        env=settings_env(settings, console_metrics_urls="[]", **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_the_url_is_announced_only_after_the_port_is_bound(settings: Settings) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        proc = _console(settings, busy.getsockname()[1])
        try:
            out, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
        assert proc.returncode != 0 and "console on" not in out, (out, err)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = _console(settings, port)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith(f"console on http://127.0.0.1:{port}/"), line
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            pass  # already listening when announced: no retry needed
        assert time.monotonic() - started < 1
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def test_port_0_announces_the_port_the_system_picked(settings: Settings) -> None:
    """`--port 0` (the option's range allows it) announced http://127.0.0.1:0/, a URL no browser opens."""
    proc = _console(settings, 0)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        found = re.match(r"console on http://127\.0\.0\.1:(\d+)/ ", line)
        assert found is not None and found[1] != "0", line
        with socket.create_connection(("127.0.0.1", int(found[1])), timeout=5):
            pass
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


@pytest.mark.usefixtures("no_tracebacks")
async def test_a_test_event_takes_only_a_status_its_type_has(
    http: tuple[ClientSession, str, dict[str, str]], app: web.Application
) -> None:
    """The status was sent as given: `bogus` for a message, any status for an inbound message."""
    client, base, headers = http
    assert app[SETTINGS].uses_development_secret  # the only case where the page can send test events
    for body, why in (
        ({"type": "message.status.updated", "status": "bogus"}, "status for message.status.updated must be"),
        ({"type": "message.inbound.received", "status": "read"}, "status does not apply"),
        # The page's field names, not the CLI's options; a value of the wrong type named as such.
        ({"type": "message.status.updated", "shape": "odd"}, "shape must be one of sent, guide, mixed"),
        ({"type": "message.status.updated", "shape": {"a": 1}}, "shape must be a string"),
        ({"type": 5}, "type must be a string"),
    ):
        status, answer_ = await answer(client, "POST", f"{base}/api/trigger", json=body, headers=headers)
        assert status == 400 and answer_["error"].startswith(why), answer_


def test_the_overview_shows_a_spool_only_when_one_is_on() -> None:
    """An ingress exports the spool's series with its spool off too: the overview showed a spool of 0
    bytes' limit, with a histogram's parts flattened into it."""
    from prometheus_client import REGISTRY, generate_latest

    from sentpipe import metrics as m
    from sentpipe.console.overview import scrape_totals, spool_state

    # Another test's ingress may have set it.
    was = REGISTRY.get_sample_value("sentpipe_spool_max_bytes") or 0.0
    try:
        m.SPOOL_MAX_BYTES.set(0)  # what an ingress with its spool off exports
        assert spool_state(scrape_totals(generate_latest(REGISTRY).decode())) is None
        m.SPOOL_MAX_BYTES.set(1 << 30)
        shown = spool_state(scrape_totals(generate_latest(REGISTRY).decode()))
    finally:
        m.SPOOL_MAX_BYTES.set(was)
    assert shown is not None and shown["sentpipe_spool_max_bytes"] == 1 << 30
    assert "sentpipe_spool_records" in shown
    assert not [k for k in shown if k.endswith(("_bucket", "_sum", "_count"))]


async def test_a_defect_behind_the_api_is_a_json_500_without_its_traceback(
    app: web.Application, caplog: pytest.LogCaptureFixture
) -> None:
    """An exception no handler expected (decimal's InvalidOperation on a stored payload, say) was
    aiohttp's plain-text 500 page: no JSON `code` for the page's script, and nothing it could show."""

    async def defect(request: web.Request) -> web.StreamResponse:
        raise ArithmeticError("a secret detail of the defect")

    app.router.add_get("/api/defect", defect)
    async for base in serve(app):
        async with ClientSession(cookie_jar=CookieJar(unsafe=True)) as client:
            assert (await sign_in(client, base))[0] == 303
            status, body = await answer(client, "GET", f"{base}/api/defect")
            assert (status, body["code"]) == (500, "internal_error"), body
            assert "secret detail" not in body["error"]
    assert any(rec.exc_info and "secret detail" in str(rec.exc_info[1]) for rec in caplog.records)


@pytest.mark.usefixtures("no_tracebacks")
async def test_a_dry_run_flag_that_is_not_a_boolean_is_400_not_a_real_run(
    http: tuple[ClientSession, str, dict[str, str]],
) -> None:
    """`{"dry_run": "true"}` was read as false: a real replay or redrive started (202) where a dry run was
    meant."""
    client, base, headers = http
    for path in ("/api/replay", "/api/dlq/redrive"):
        for flag in (b'"true"', b"1", b"null", b"[]"):
            status, body = await answer(
                client,
                "POST",
                f"{base}{path}",
                data=b'{"dry_run": ' + flag + b"}",
                headers={**headers, "Content-Type": "application/json"},
            )
            assert (status, body["code"]) == (400, "bad_request"), (path, flag, body)
            assert "dry_run must be true or false" in body["error"], body


def test_a_client_that_leaves_mid_body_is_not_logged_as_a_console_defect(settings: Settings) -> None:
    """A POST that announced more body than it sent, then closed, was logged as an ERROR with its traceback:
    through the sign-in form, anyone who could reach the console could fill its log with them. (Seen only
    with the console as `sentpipe console` serves it: in a test server the handler never ran.)"""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    base = f"http://127.0.0.1:{port}"

    async def signed_in() -> str:
        async with ClientSession(cookie_jar=CookieJar(unsafe=True)) as client:
            status, csrf = await sign_in(client, base)
            assert status == 303
            cookie = client.cookie_jar.filter_cookies(URL(base))["sentpipe_console"].value
        return f"Cookie: sentpipe_console={cookie}\r\nX-CSRF-Token: {csrf}\r\n"

    proc = _console(settings, port, console_token=TOKEN)
    try:
        assert proc.stdout is not None and proc.stdout.readline().startswith("console on")
        sent = [
            ("/login", "application/x-www-form-urlencoded", ""),  # before signing in
            ("/login", "multipart/form-data; boundary=x", ""),
            ("/api/replay", "application/json", asyncio.run(signed_in())),
        ]
        for path, content_type, more in sent:
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(
                    f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {content_type}\r\n"
                    f'{more}Content-Length: 1000\r\n\r\n{{"a"'.encode()
                )
                time.sleep(0.3)  # the handler is reading the body when the client leaves
        time.sleep(1)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert err.count("request body unreadable (ConnectionResetError)") == len(sent), err
    assert "Traceback" not in err and " ERROR " not in err, err


def test_a_body_that_stalls_is_answered_408_and_its_connection_closed(settings: Settings) -> None:
    """No timeout bounded the console's body reads: a stalled `POST /login` (no sign-in needed) held its
    connection for ever, and a few hundred of them left no socket for anyone, the sign-in page included."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = _console(settings, port, console_token=TOKEN, body_timeout_s="1")
    try:
        assert proc.stdout is not None and proc.stdout.readline().startswith("console on")
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(
                f"POST /login HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                "Content-Type: application/x-www-form-urlencoded\r\n"
                "Content-Length: 60000\r\n\r\ncsrf=".encode()
            )
            answer = sock.recv(65536)
            # Then closed at once, not after reading what is left of the body for up to 10 s more.
            sock.settimeout(5)
            while chunk := sock.recv(65536):
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), answer
        assert orjson.loads(body)["code"] == "body_timeout"
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert "Traceback" not in err, err


def test_what_the_http_guard_refuses_is_answered_in_the_consoles_shape(settings: Settings) -> None:
    """The guard answers before any handler: it used the ingress's `{error: code, detail}`, so a script
    testing the console's `code` found none."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sent = [
        (b"NOT HTTP AT ALL\r\n\r\n", 400, "malformed_request"),
        (b"GET /login HTTP/1.1\r\nHost: x\r\nX-Slow: ", 408, "header_timeout"),  # the head never ends
        (
            b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            b"Content-Encoding: br\r\nContent-Length: 4\r\n\r\nxxxx",
            415,
            "unsupported_encoding",
        ),
    ]
    proc = _console(settings, port, console_token=TOKEN, body_timeout_s="1")
    try:
        assert proc.stdout is not None and proc.stdout.readline().startswith("console on")
        for request, status, code in sent:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                sock.sendall(request)
                answer = b""
                while chunk := sock.recv(65536):
                    answer += chunk
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.split(b" ")[1] == b"%d" % status, answer
            doc = orjson.loads(body)
            assert set(doc) == {"error", "code"} and doc["code"] == code, doc
            assert doc["error"] and doc["error"] != code, doc  # one line for a person
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert "Traceback" not in err, err


async def test_wrong_tokens_are_answered_one_at_a_time(console: str) -> None:
    """Each wrong token waited 0.5 s to slow guessing down, but in parallel: 1,000 guesses took 1.8 s."""
    async with ClientSession(cookie_jar=CookieJar(unsafe=True)) as client:
        async with client.get(f"{console}/login") as resp:
            page = await resp.text()
        csrf = re.search(r'name="csrf" value="([^"]+)"', page)
        assert csrf is not None

        async def guess(n: int) -> int:
            form = {"csrf": csrf.group(1), "token": f"wrong-token-{n:08d}"}
            async with client.post(f"{console}/login", data=form, allow_redirects=False) as resp:
                return resp.status

        started = time.monotonic()
        assert await asyncio.gather(*(guess(n) for n in range(6))) == [401] * 6
        # A lower bound only: the sleeps cannot end early, however busy the machine.
        assert time.monotonic() - started >= 6 * 0.5


async def raw_request(base: str, head: bytes) -> tuple[int, dict[str, Any]]:
    """One request written byte for byte (aiohttp's client sends only text headers); its status and JSON."""
    url = URL(base)
    assert url.host is not None and url.port is not None
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(head)
        await writer.drain()
        answer = await reader.read()
    finally:
        writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    _, _, body = rest.partition(b"\r\n\r\n")
    return int(status_line.split()[1]), orjson.loads(body)


@pytest.mark.usefixtures("no_tracebacks")
async def test_bytes_that_are_not_utf8_in_the_cookie_or_the_csrf_header_are_a_wrong_token(
    console: str, http: tuple[ClientSession, str, dict[str, str]]
) -> None:
    """They raised UnicodeEncodeError where the token was compared: a 500 and a logged traceback, for
    anyone who could reach the sign-in form."""
    client, base, _ = http
    host = URL(base).authority.encode()
    form = b"csrf=abc&token=def"
    status, body = await raw_request(
        base,
        b"POST /login HTTP/1.1\r\nHost: " + host + b"\r\nCookie: sentpipe_console_login=\xff\xfe\x80\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: %d\r\n"
        b"Connection: close\r\n\r\n" % len(form) + form,
    )
    assert (status, body["code"]) == (403, "bad_csrf_token"), body
    cookie = client.cookie_jar.filter_cookies(URL(base))["sentpipe_console"].value.encode()
    status, body = await raw_request(
        base,
        b"POST /api/replay HTTP/1.1\r\nHost: " + host + b"\r\nCookie: sentpipe_console=" + cookie + b"\r\n"
        b"X-CSRF-Token: \xff\xfe\x80\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
        b"Connection: close\r\n\r\n{}",
    )
    assert (status, body["code"]) == (403, "bad_csrf_token"), body


@pytest.mark.usefixtures("no_tracebacks")
async def test_search_pages_neither_repeat_nor_skip_rows_while_events_arrive(
    http: tuple[ClientSession, str, dict[str, str]], settings: Settings
) -> None:
    """Search paged by OFFSET: events received between two pages pushed the list down under the reader,
    and the next page began with rows the one before had shown (here 20 of 50), during an incident, when
    events arrive all the time. Each page now starts after the last row of the one before."""
    client, base, _ = http
    insert = (
        "INSERT INTO message_events (event_id, tenant, message_id, status, occurred_at, received_at, payload)"
        " SELECT 'e' || g, 't' || (g %% 3), 'm' || g, 'sent', %(at)s + g * interval '1 ms',"
        " %(at)s + g * interval '1 ms', '{}' FROM generate_series(%(first)s::int, %(last)s::int) g"
    )
    at = datetime(2026, 12, 1, tzinfo=UTC)
    with psycopg.connect(settings.database_url.get_secret_value(), autocommit=True) as db:
        db.execute(insert, {"at": at, "first": 1, "last": 120})
        shown: list[str] = []
        status, body = await answer(client, "GET", f"{base}/api/search")
        assert status == 200 and len(body["rows"]) == 50 and body["next"], body
        shown += [row["event_id"] for row in body["rows"]]
        db.execute(insert, {"at": at, "first": 121, "last": 140})  # newer events, while the page is read
        while body["next"]:
            status, body = await answer(client, "GET", f"{base}/api/search", params={"after": body["next"]})
            assert status == 200, body
            shown += [row["event_id"] for row in body["rows"]]
    assert shown == [f"e{g}" for g in range(120, 0, -1)]  # each row once, in order: none repeated or skipped


@pytest.mark.usefixtures("no_tracebacks")
async def test_a_search_whose_since_is_not_before_its_until_is_400(
    http: tuple[ClientSession, str, dict[str, str]],
) -> None:
    """It answered 200 with no rows, as if no event had come in; replay refuses the same range."""
    client, base, _ = http
    for since, until in (("2026-01-02T00:00:00Z", "2026-01-01T00:00:00Z"), ("2026-01-01T00:00:00Z",) * 2):
        status, body = await answer(client, "GET", f"{base}/api/search?since={since}&until={until}")
        assert (status, body["code"]) == (400, "bad_request"), body
        assert "is not before until" in body["error"], body


@pytest.mark.usefixtures("no_tracebacks")
async def test_refusals_name_the_apis_fields_not_the_clis_options(
    http: tuple[ClientSession, str, dict[str, str]],
) -> None:
    """`POST /api/replay {"since": "bogus"}` answered "--since: 'bogus' is not an ISO-8601 time"."""
    client, base, headers = http
    for data, field in (
        ({"since": "bogus"}, "since"),
        ({"until": "1970-01-01T00:00:00Z"}, "until"),
        ({"since": "2026-01-02T00:00:00Z", "until": "2026-01-01T00:00:00Z"}, "since"),
        ({"from_offsets": ["0:x"]}, "from_offsets"),
        ({"from_offsets": ["0:5"], "to_offsets": ["0:1"]}, "from_offsets"),
    ):
        status, body = await answer(
            client, "POST", f"{base}/api/replay", json={**data, "dry_run": True}, headers=headers
        )
        assert (status, body["code"]) == (400, "bad_request"), (data, body)
        assert body["error"].startswith(field) and "--" not in body["error"], (data, body)
    for query, field in (("since=bogus", "since"), ("reason=a%01b", "reasons")):
        status, body = await answer(client, "GET", f"{base}/api/dlq?{query}")
        assert (status, body.get("code")) == (400, "bad_request"), (query, body)
        assert body["error"].startswith(field) and "--" not in body["error"], (query, body)
    status, body = await answer(
        client, "POST", f"{base}/api/dlq/redrive", json={"since": "bogus", "dry_run": True}, headers=headers
    )
    assert status == 400 and body["error"].startswith("since:"), body


async def test_a_metrics_endpoint_answering_an_error_status_is_a_problem_not_a_scrape(
    settings: Settings, console: str
) -> None:
    """A 401 or a 404 page parsed as an empty exposition: the overview listed no problem, and its
    duplicates chart went flat."""
    urls = [f"{console}/api/session", f"{console}/static/no-such-file"]  # 401 (signed out), 404: with bodies
    app = create_app(settings.model_copy(update={"console_metrics_urls": urls}))
    sampler = app[SAMPLER]
    async with ClientSession() as client:
        await sampler._scrape(client)
    assert sampler.overview()["problems"]["metrics"] == {urls[0]: "HTTP 401", urls[1]: "HTTP 404"}


def test_the_spool_s_oldest_age_is_the_largest_of_the_processes_not_their_sum() -> None:
    """Summed over an ingress's worker processes (the page adds every sample up), two workers each 60 s
    behind showed a spool two minutes old."""
    from sentpipe.console.overview import scrape_totals

    text = (
        "# TYPE sentpipe_spool_oldest_age_seconds gauge\n"
        'sentpipe_spool_oldest_age_seconds{worker="0"} 60.0\n'
        'sentpipe_spool_oldest_age_seconds{worker="1"} 45.0\n'
        "# TYPE sentpipe_spool_records gauge\n"
        'sentpipe_spool_records{worker="0"} 3.0\n'
        'sentpipe_spool_records{worker="1"} 4.0\n'
    )
    totals = scrape_totals(text)
    assert totals["sentpipe_spool_oldest_age_seconds"] == 60.0 and totals["sentpipe_spool_records"] == 7.0


@pytest.mark.usefixtures("no_tracebacks")
async def test_replay_offsets_the_log_does_not_hold_are_400_naming_the_field(
    http: tuple[ClientSession, str, dict[str, str]],
) -> None:
    """Accepted (202), they failed the dry run's job a moment later with "--from-offset 0:999999 is past the
    end", a command-line option the page has no field for."""
    client, base, headers = http
    for data, field in (({"from_offsets": ["0:999999"]}, "from_offsets"), ({"to_offsets": ["1:5"]}, None)):
        for _ in range(20):  # a topic this new may still be electing its leader (503)
            status, body = await answer(
                client, "POST", f"{base}/api/replay", json={**data, "dry_run": True}, headers=headers
            )
            if status != 503:
                break
            await asyncio.sleep(0.5)
        if field is None:  # an offset past the end is a bound (the records to come), not a mistake
            assert status == 202, body
            await wait_for_job(client, base, body["id"])
            continue
        assert (status, body.get("code")) == (400, "bad_request"), (data, body)
        assert body["error"].startswith(field) and "--" not in body["error"], (data, body)
        assert "past the end" in body["error"], body


async def wait_for_job(client: ClientSession, base: str, job_id: str) -> dict[str, Any]:
    while True:
        status, job = await answer(client, "GET", f"{base}/api/jobs/{job_id}")
        assert status == 200, job
        if job["state"] != "running":
            return job
        await asyncio.sleep(0.2)
