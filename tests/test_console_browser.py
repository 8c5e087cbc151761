"""The console in a real browser: Debian's Chromium driven by Playwright, against a real ingress, worker,
broker and database, as a user signs in and works through it.

Chromium comes from the `chromium` package (`make install` installs it as root); Playwright only drives it
(never `playwright install`). Without either, these tests fail with a message saying so: they never skip.
Screenshots of every page go to $SENTPIPE_TEST_OUTPUT/console (default .local/test-output/console).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson
import psycopg
import pytest
from confluent_kafka import Producer

from sentpipe.processors.migrate import migrate
from sentpipe.processors.topics import ensure_topics
from sentpipe.schemas import routing as r
from sentpipe.schemas.events import frame
from sentpipe.schemas.samples import SampleFactory
from sentpipe.schemas.topics import Topics
from sentpipe.settings import Settings
from tests.http_tools import post_all
from tests.kafka_tools import wait_topics_ready
from tests.pipeline import Worker, start_ingress, start_worker, wait_for
from tests.processes import Proc, free_port, settings_env
from tests.services import REPO, Services

CHROMIUM = os.environ.get("SENTPIPE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TOKEN = "browser-test-token-0123456789"
OUT = Path(os.environ.get("SENTPIPE_TEST_OUTPUT", REPO / ".local" / "test-output")) / "console"
SCRIPT_ID = "<script>window.__xss = 1</script>"
IMG_TEXT = '"><img src=x onerror="window.__xss = 2">'

pytestmark = pytest.mark.service


@dataclass
class Stack:
    settings: Settings
    db: str
    ingress_url: str
    worker: Worker
    console: Proc
    console_url: str

    def send(self, *bodies: bytes) -> None:
        secret = self.settings.webhook_secret.get_secret_value()
        url = f"{self.ingress_url}/webhooks/sent"
        # Playwright's sync API keeps an event loop on this thread: deliver from another one.
        with ThreadPoolExecutor(1) as pool:
            statuses = pool.submit(lambda: asyncio.run(post_all(url, list(bodies), secret))).result()
        assert statuses == [200] * len(bodies), statuses

    def logs(self) -> str:
        return f"console:\n{self.console.tail()}\nworker:\n{self.worker.proc.tail()}"


@pytest.fixture(scope="module")
def stack(services: Services, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    unique = uuid.uuid4().hex[:10]
    schema = f"t_{unique}"
    with psycopg.connect(services.database_url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    db = f"{services.database_url}?options={quote(f'-csearch_path={schema}')}"
    migrate(db)
    s = Settings(
        kafka_bootstrap=services.kafka_bootstrap,
        database_url=db,
        topic_prefix=f"t{unique}.",
        raw_partitions=2,
        routed_partitions=2,
        app_id=f"sentpipe-t{unique}",
    )
    ensure_topics(s)
    t = Topics(s.topic_prefix)
    wait_topics_ready(s.kafka_bootstrap, [t.raw, *t.routed, t.unrouted, t.dlq])
    logs = tmp_path_factory.mktemp("console")
    ingress, url, ingress_metrics = start_ingress(s, logs)
    worker = start_worker(s, logs)
    port = free_port()
    env = settings_env(
        s,
        console_host="127.0.0.1",
        console_port=port,
        console_token=TOKEN,
        console_ingress_url=f"{url}/webhooks/sent",
        console_metrics_urls=json.dumps(
            [f"http://127.0.0.1:{worker.metrics_port}/metrics", f"http://127.0.0.1:{ingress_metrics}/metrics"]
        ),
    )
    console = Proc(["console"], env, logs / "console.log").start()
    console.wait_http(f"http://127.0.0.1:{port}/healthz")
    try:
        yield Stack(s, db, url, worker, console, f"http://127.0.0.1:{port}")
    finally:
        console.stop()
        worker.stop()
        ingress.stop()
        with psycopg.connect(services.database_url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        pytest.fail(f"Playwright for Python is missing ({exc}): run `make install`", pytrace=False)
    if not Path(CHROMIUM).is_file():
        pytest.fail(
            f"no Chromium at {CHROMIUM}: `make install` installs Debian's chromium as root "
            "(apt-get install chromium), or set SENTPIPE_CHROMIUM to a Chromium binary",
            pytrace=False,
        )
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


def new_tab(browser: Any) -> Any:
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    # Any script an event smuggles in would set this; the page must never change it.
    context.add_init_script("window.__xss = 0;")
    pg = context.new_page()
    pg.set_default_timeout(15_000)
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    pg.errors = errors
    return pg


@pytest.fixture(scope="module")
def page(browser: Any, stack: Stack) -> Iterator[Any]:
    """One signed-in tab for the module, signed in here: with the sign-in left to the first test, any test
    run alone (`-k`) failed waiting for a page it was never shown."""
    pg = new_tab(browser)
    pg.goto(stack.console_url + "/")
    pg.fill("input[name=token]", TOKEN)
    pg.click("button[type=submit]")
    pg.wait_for_selector("main[data-ready='overview']")
    yield pg
    pg.context.close()


def shot(page: Any, name: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(OUT / f"{name}.png"), full_page=True)


def goto(page: Any, stack: Stack, view: str) -> None:
    page.goto(f"{stack.console_url}/#/{view}")
    page.wait_for_selector(f"main[data-ready='{view.split('/')[0]}']")


def assert_no_script_ran(page: Any) -> None:
    assert page.evaluate("window.__xss") == 0
    assert page.locator("main img").count() == 0
    assert page.locator("main script").count() == 0
    assert not page.errors, page.errors


def event_id_of(body: bytes) -> str:
    return frame(body, webhook_id=None).event_id


def test_sign_in(browser: Any, stack: Stack) -> None:
    page = new_tab(browser)  # a tab of its own: the module's is signed in already
    try:
        page.goto(stack.console_url + "/")
        assert page.url.endswith("/login")
        page.fill("input[name=token]", "not-the-token-at-all")
        page.click("button[type=submit]")
        page.wait_for_selector("text=Wrong token.")
        shot(page, "sign-in")
        page.fill("input[name=token]", TOKEN)
        page.click("button[type=submit]")
        page.wait_for_selector("main[data-ready='overview']")
        (cookie,) = [c for c in page.context.cookies() if c["name"] == "sentpipe_console"]
        assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"
        assert page.evaluate("document.cookie") == ""  # HttpOnly: scripts cannot read it
    finally:
        page.context.close()


def test_live_shows_a_sent_event_within_2_s_and_a_row_opens_its_trace(page: Any, stack: Stack) -> None:
    goto(page, stack, "live")
    page.wait_for_selector("#live-status:text('live')")
    body = SampleFactory().message_status("msg-live-" + uuid.uuid4().hex[:8], "delivered").body
    event_id = event_id_of(body)
    stack.send(body)
    sent = time.monotonic()
    row = page.wait_for_selector(f"tr[data-event-id='{event_id}']", timeout=2000)
    assert time.monotonic() - sent < 2.0
    assert "message.status.updated" in row.inner_text() and "default" in row.inner_text()
    shot(page, "live")

    # The trace: wait until the worker has projected it, then open it from the row.
    wait_for(lambda: db_rows(stack.db, event_id), bool, 60, "the event projected", stack.logs)
    page.click(f"tr[data-event-id='{event_id}']")
    page.wait_for_selector("main[data-ready='event']")
    assert page.inner_text("#event-id") == event_id
    text = page.inner_text("main")
    assert "sentpipe-tenant" in text and "sentpipe-webhook-id" in text  # raw record headers
    assert page.inner_text("#dedup").startswith("seen")
    assert "message_events" in page.inner_text("#db") and "delivered" in page.inner_text("#db")
    assert f'"message_id": "{json.loads(body)["payload"]["message_id"]}"' in text  # pretty-printed body
    assert page.locator("button.copy").count() >= 3
    shot(page, "trace")


def test_a_live_row_opens_its_trace_from_the_keyboard(page: Any, stack: Stack) -> None:
    """Live rows opened on a click only: no row held anything Tab stops at, so a keyboard user could
    watch events arrive and open none of them."""
    goto(page, stack, "live")
    page.wait_for_selector("#live-status:text('live')")
    body = SampleFactory().message_status("msg-keys-" + uuid.uuid4().hex[:8], "delivered").body
    event_id = event_id_of(body)
    stack.send(body)
    page.wait_for_selector(f"tr[data-event-id='{event_id}']")  # the newest row: the first in the table
    focused = "document.activeElement.closest('#live-rows tr')?.dataset.eventId"
    page.locator("#pause").focus()  # the last control before the rows
    for _ in range(10):  # past the filters to the rows
        page.keyboard.press("Tab")
        if page.evaluate(focused) == event_id:
            break
    assert page.evaluate(focused) == event_id, page.evaluate("document.activeElement.outerHTML")
    page.keyboard.press("Enter")
    page.wait_for_selector("main[data-ready='event']")
    assert page.inner_text("#event-id") == event_id


def live_rows(topic: str, offsets: range, backlog: bool = False) -> bytes:
    """Server-sent events as /api/live writes them: one row per offset, then a short reconnection delay."""
    out = b"retry: 50\n\n"
    for offset in offsets:
        row = {
            "kind": "raw",
            "topic": topic,
            "partition": 0,
            "offset": offset,
            "time": 1_700_000_000_000 + offset,
            "tenant": "default",
            "type": "message.status.updated",
            "event_id": f"evt-reconnect-{offset}",
            "subject": "",
            "status": "delivered",
            "error": "",
            "backlog": backlog,
        }
        out += b"data: " + orjson.dumps(row) + b"\n\n"
    return out + b"event: ready\ndata: {}\n\n"


def held_live_streams(page: Any) -> Callable[[int], Any]:
    """The page's requests to /api/live, held until the test answers them: `next_stream(n)` waits for the
    n-th and gives it (the caller unroutes `**/api/live` when done)."""
    streams: list[Any] = []
    page.route("**/api/live", lambda route: streams.append(route))

    def next_stream(n: int) -> Any:
        while len(streams) < n:
            page.wait_for_timeout(20)  # lets Playwright deliver the request; no time is asserted
        return streams[n - 1]

    return next_stream


def test_live_after_a_reconnection_shows_each_row_once_and_counts_what_a_pause_drops(
    page: Any, stack: Stack
) -> None:
    """Each connection starts with the latest rows again (`backlog`): after a reconnection the page showed
    them twice. And a pause kept 2,000 new rows and dropped the rest without a word."""
    next_stream = held_live_streams(page)
    topic = Topics(stack.settings.topic_prefix).raw
    sse = {"status": 200, "headers": {"Content-Type": "text/event-stream"}}
    try:
        goto(page, stack, "live")
        next_stream(1).fulfill(body=live_rows(topic, range(2), backlog=True), **sse)
        # The stream ended: the page connects again, and is sent the latest rows again with a new one.
        next_stream(2).fulfill(
            body=live_rows(topic, range(2), backlog=True) + live_rows(topic, range(2, 3)), **sse
        )
        page.wait_for_selector("tr[data-event-id='evt-reconnect-2']")
        assert page.locator("#live-rows tr").count() == 3
        page.click("#pause")
        next_stream(3).fulfill(body=live_rows(topic, range(3, 3 + 2005)), **sse)
        next_stream(4)  # every row of the third stream was handled before the page reconnected
        status = page.inner_text("#live-status")
        assert status.startswith("paused, 2005 new (the oldest 5 dropped"), status
        page.click("#pause")
        assert "5 of the rows that came while paused were not kept" in page.inner_text("#live-status")
        assert page.locator("tr[data-event-id='evt-reconnect-2007']").count() == 1
        assert page.locator("tr[data-event-id='evt-reconnect-7']").count() == 0  # dropped: among the oldest
    finally:
        goto(page, stack, "overview")  # closes the page's stream before its requests are let go
        page.unroute("**/api/live")


def test_live_says_when_the_console_cannot_read_kafka_and_when_it_can_again(page: Any, stack: Stack) -> None:
    """Through a broker outage the page said "live" over an empty table, as if no events came in."""
    next_stream = held_live_streams(page)
    topic = Topics(stack.settings.topic_prefix).raw
    sse = {"status": 200, "headers": {"Content-Type": "text/event-stream"}}
    down = b'event: kafka\ndata: {"problem":"Kafka broker at 127.0.0.1:1 did not answer within 10s"}\n\n'
    try:
        goto(page, stack, "live")
        next_stream(1).fulfill(body=live_rows(topic, range(1)) + down, **sse)
        page.wait_for_selector("#live-kafka:text('cannot read Kafka')")
        assert "127.0.0.1:1 did not answer" in page.inner_text("#live-kafka")
        # The next stream (a reconnection) finds Kafka again: the warning goes.
        next_stream(2).fulfill(body=live_rows(topic, range(1, 2)), **sse)
        page.wait_for_selector("tr[data-event-id='evt-reconnect-1']")
        assert page.inner_text("#live-kafka") == ""
        next_stream(3).fulfill(
            body=live_rows(topic, range(2, 3)) + down + b'event: kafka\ndata: {"problem":null}\n\n', **sse
        )
        page.wait_for_selector("tr[data-event-id='evt-reconnect-2']")
        next_stream(4)
        assert page.inner_text("#live-kafka") == ""
    finally:
        goto(page, stack, "overview")  # closes the page's stream before its requests are let go
        page.unroute("**/api/live")


def test_a_trace_that_fails_says_so_and_no_longer_says_searching(page: Any, stack: Stack) -> None:
    """A trace the console could not make (the broker down) showed its error under "Searching Kafka and the
    database…", as if still at it."""
    error = {"error": "Kafka broker at 127.0.0.1:1 did not answer within 10s", "code": "broker_unavailable"}
    page.route("**/api/event?*", lambda route: route.fulfill(status=503, json=error))
    try:
        goto(page, stack, "event/evt-down")
        assert page.inner_text("main .error") == error["error"]
        assert "Searching" not in page.inner_text("main"), page.inner_text("main")
    finally:
        page.unroute("**/api/event?*")


def test_live_says_so_when_the_console_refuses_its_stream(page: Any, stack: Stack) -> None:
    """Refused (a 401 once a restart of the console has signed everyone out), the stream is never tried
    again by the browser, and the page said "reconnecting…" for good."""
    refused: list[Any] = []
    page.route("**/api/live", lambda route: refused.append(route))
    try:
        goto(page, stack, "live")
        while not refused:
            page.wait_for_timeout(20)  # lets Playwright deliver the request; no time is asserted
        refused[0].fulfill(
            status=401,
            headers={"Content-Type": "application/json"},
            body=b'{"error":"sign in first","code":"sign_in_required"}',
        )
        page.locator("#live-status", has_text="disconnected").wait_for()
        assert len(refused) == 1, "the browser tried the refused stream again"
    finally:
        goto(page, stack, "overview")
        page.unroute("**/api/live")


def db_rows(db: str, event_id: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(db) as conn:
        return conn.execute("SELECT status FROM message_events WHERE event_id = %s", (event_id,)).fetchall()


def test_search_finds_an_event_by_message_id(page: Any, stack: Stack) -> None:
    message_id = "msg-search-" + uuid.uuid4().hex[:8]
    f = SampleFactory()
    bodies = [f.message_status(message_id, s).body for s in ("queued", "sent", "delivered")]
    stack.send(*bodies)
    ids = {event_id_of(b) for b in bodies}
    wait_for(
        lambda: {i for i in ids if db_rows(stack.db, i)}, lambda got: got == ids, 60, "projected", stack.logs
    )
    goto(page, stack, "search")
    page.fill("input[name=q]", message_id)
    page.click("form button[type=submit]")
    page.wait_for_selector(f"#results a:text('{next(iter(ids))}')")
    links = page.locator("#results tbody a").all_inner_texts()
    assert sorted(links) == sorted(ids)
    assert page.locator("#results tbody tr").count() == 3
    shot(page, "search")
    page.click(f"#results a:text('{next(iter(ids))}')")
    page.wait_for_selector("main[data-ready='event']")


def test_search_pages_forward_and_back_without_repeating_rows_while_events_arrive(
    page: Any, stack: Stack
) -> None:
    """Next asked for the next OFFSET: events that arrived meanwhile pushed the list down, and the next page
    began with rows the page before had shown. It now starts after the last row shown; Previous goes back."""
    tenant = "paging-" + uuid.uuid4().hex[:8]
    insert = (
        "INSERT INTO message_events (event_id, tenant, message_id, status, occurred_at, received_at, payload)"
        " SELECT %(tenant)s || '-' || lpad(g::text, 3, '0'), %(tenant)s, 'm' || g, 'sent',"
        " %(at)s + g * interval '1 ms', %(at)s + g * interval '1 ms', '{}'"
        " FROM generate_series(%(first)s::int, %(last)s::int) g"
    )
    at = datetime(2026, 12, 1, tzinfo=UTC)

    def shown() -> list[int]:
        return [int(t.rsplit("-", 1)[1]) for t in page.locator("#results tbody a").all_inner_texts()]

    def turn(button: str, number: int) -> list[int]:
        page.click(button)
        page.wait_for_selector(f"#search-page:text('page {number}')")
        return shown()

    with psycopg.connect(stack.db, autocommit=True) as db:
        db.execute(insert, {"tenant": tenant, "at": at, "first": 1, "last": 120})
        goto(page, stack, "search")
        page.fill("input[name=tenant]", tenant)
        page.click("form button[type=submit]")
        page.wait_for_selector(f"#results a:text('{tenant}-120')")
        assert shown() == list(range(120, 70, -1))
        db.execute(insert, {"tenant": tenant, "at": at, "first": 121, "last": 140})  # arrive meanwhile
    assert turn("#search-next", 2) == list(range(70, 20, -1))
    assert turn("#search-next", 3) == list(range(20, 0, -1))
    assert page.locator("#search-next").is_disabled()
    assert turn("#search-prev", 2) == list(range(70, 20, -1))
    assert turn("#search-prev", 1) == list(range(140, 90, -1))  # the first page: the newest, as it is now
    assert page.locator("#search-prev").is_disabled()


def test_event_values_render_as_text_never_as_markup(page: Any, stack: Stack) -> None:
    f = SampleFactory()
    status = f.message_status(SCRIPT_ID, "delivered").body
    inbound = json.loads(f.inbound().body)
    inbound["payload"]["text"] = IMG_TEXT
    inbound_body = orjson.dumps(inbound)
    stack.send(status, inbound_body)
    goto(page, stack, "live")
    page.wait_for_selector(f"tr[data-event-id='{event_id_of(inbound_body)}']")
    assert page.get_by_text(SCRIPT_ID, exact=True).count() >= 1  # the subject column, as text
    assert_no_script_ran(page)
    for body in (status, inbound_body):
        wait_for(lambda b=body: event_in_db(stack.db, event_id_of(b)), bool, 60, "projected", stack.logs)
        goto(page, stack, "event/" + quote(event_id_of(body), safe=""))
        page.wait_for_selector("#db table")
        text = page.inner_text("main")
        assert (SCRIPT_ID if body is status else IMG_TEXT) in text
        assert_no_script_ran(page)
    shot(page, "xss-as-text")
    goto(page, stack, "search")
    page.fill("input[name=q]", SCRIPT_ID)
    page.click("form button[type=submit]")
    page.wait_for_selector("#results tbody tr")
    assert page.get_by_text(SCRIPT_ID, exact=True).count() == 1
    assert_no_script_ran(page)


def test_bidi_controls_in_event_values_show_as_escapes(page: Any, stack: Stack) -> None:
    """A text holding U+202E was displayed reversed: "\u202edereviled" read "delivered". Shown as the
    CLI shows it, the escape visible."""
    inbound = json.loads(SampleFactory().inbound().body)
    inbound["payload"]["text"] = "\u202edereviled\u200b"  # and a zero-width space: invisible, not absent
    body = orjson.dumps(inbound)
    stack.send(body)
    wait_for(lambda: event_in_db(stack.db, event_id_of(body)), bool, 60, "projected", stack.logs)
    goto(page, stack, "event/" + quote(event_id_of(body), safe=""))
    page.wait_for_selector("#db table")
    text = page.inner_text("main")
    assert "\\u202edereviled\\u200b" in text and "\u202e" not in text and "\u200b" not in text


def event_in_db(db: str, event_id: str) -> bool:
    with psycopg.connect(db) as conn:
        n = conn.execute(
            "SELECT (SELECT count(*) FROM message_events WHERE event_id = %(id)s)"
            " + (SELECT count(*) FROM inbound_messages WHERE event_id = %(id)s)",
            {"id": event_id},
        ).fetchone()
    return bool(n and n[0])


def test_an_address_with_a_percent_that_starts_no_escape_still_opens_its_view(
    page: Any, stack: Stack
) -> None:
    """`#/event/%` threw a URIError before the view was drawn: the page went on showing the view before."""
    goto(page, stack, "search")
    goto(page, stack, "event/100%")
    assert "100%" in page.inner_text("main")


def test_dead_letters_list_and_redrive_after_a_dry_run(page: Any, stack: Stack) -> None:
    s = stack.settings
    topics = Topics(s.topic_prefix)
    # A malformed delivery (signed, not JSON): the ingress dead-letters it.
    stack.send(b"this is not json <b>bold</b>")
    # A good event that an earlier routing bug dead-lettered: redrive routes it and it reaches the database.
    good = SampleFactory().message_status("msg-redrive-" + uuid.uuid4().hex[:8], "read").body
    good_id = event_id_of(good)
    headers = r.raw_headers(
        tenant="default",
        received_at_ms=int(time.time() * 1000),
        webhook_id="msg_x",
        request_id="req",
        event_type=None,
    ) + r.dlq_headers(
        stage="route",
        error_class="bug_fixed_since",
        message="a routing bug",
        topic=topics.raw,
        partition=0,
        offset=0,
    )
    producer = Producer({"bootstrap.servers": s.kafka_bootstrap})
    producer.produce(topics.dlq, good, good_id.encode(), headers=headers)
    assert producer.flush(10) == 0

    goto(page, stack, "dlq")
    page.wait_for_selector("#dlq-list tbody tr")
    wait_for(lambda: reload_dlq(page), lambda n: n >= 2, 30, "both dead letters listed", stack.logs)
    listing = page.inner_text("#dlq-list")
    assert "ingress" in listing and "bug_fixed_since" in listing
    shot(page, "dead-letters")

    # The injected record alone: count first, then redrive exactly that.
    row = page.locator("#dlq-list tbody tr", has_text="bug_fixed_since")
    entry_id = row.get_attribute("data-id")
    row.locator("input[type=checkbox]").check()
    assert page.is_disabled("#redrive-run")
    page.click("#redrive-dry")
    page.wait_for_selector("#redrive .result")
    assert page.get_attribute("#redrive .result", "data-sent") == "1"
    assert "would be redriven" in page.inner_text("#redrive") and "nothing was sent" in page.inner_text(
        "#redrive"
    )
    page.click("#redrive-run")
    page.wait_for_selector("#redrive h3:text('Outcome')")
    assert page.get_attribute("#redrive .result", "data-sent") == "1"
    wait_for(lambda: db_rows(stack.db, good_id), bool, 60, "the redriven event projected", stack.logs)
    shot(page, "redrive")
    # Counted again, it is taken already: the button offered "Redrive 0 record(s)", enabled.
    page.click("#redrive-dry")
    page.wait_for_selector("#redrive h3:text('Dry run: nothing was sent')")
    assert "already taken by an earlier redrive" in page.inner_text("#redrive")
    assert page.inner_text("#redrive-run") == "Redrive 0 record(s)" and page.is_disabled("#redrive-run")

    # One record's page: headers and body, as text.
    goto(page, stack, "dlq/" + quote(entry_id or "", safe=""))
    text = page.inner_text("main")
    assert "sentpipe-dlq-stage" in text and "a routing bug" in text
    malformed = page.locator("a", has_text="All dead letters")
    assert malformed.count() == 1
    assert_no_script_ran(page)


def reload_dlq(page: Any) -> int:
    page.click("#dlq-list ~ * button, form button[type=submit]")
    page.wait_for_selector("#dlq-count")
    return page.locator("#dlq-list tbody tr").count()


def test_replay_dry_run_counts_then_replays_with_progress(page: Any, stack: Stack) -> None:
    goto(page, stack, "replay")
    page.check("input[name=type][value='message.status.updated']")
    assert page.is_disabled("#replay-run")
    page.click("#replay-dry")
    page.wait_for_selector("#replay-result .result")
    would = int(page.get_attribute("#replay-result .result", "data-sent") or 0)
    assert would >= 5  # every message status event sent so far
    assert "nothing was sent" in page.inner_text("#replay-result")
    assert page.inner_text("#replay-run") == f"Replay {would} event(s)"
    shot(page, "replay-dry-run")
    page.click("#replay-run")
    page.wait_for_selector("#replay-result h3:text('Outcome')")
    assert page.get_attribute("#replay-result .result", "data-sent") == str(would)
    assert page.get_attribute("#replay-progress", "value") is not None
    # Changing the form after a dry run asks for a new one.
    page.fill("input[name=tenants]", "default")
    assert page.is_disabled("#replay-run")
    shot(page, "replay")


def test_an_action_without_the_csrf_token_is_refused(page: Any, stack: Stack) -> None:
    goto(page, stack, "overview")
    statuses = page.evaluate(
        """async () => {
            const body = JSON.stringify({dry_run: true});
            const json = {'Content-Type': 'application/json'};
            const plain = await fetch('/api/replay', {method: 'POST', body, headers: json});
            const wrong = await fetch('/api/dlq/redrive', {method: 'POST', body,
                headers: {'Content-Type': 'application/json', 'X-CSRF-Token': 'guessed'}});
            const form = new FormData(); form.append('type', 'message.status.updated');
            const trigger = await fetch('/api/trigger', {method: 'POST', body: form});
            return [plain.status, wrong.status, trigger.status];
        }"""
    )
    assert statuses == [403, 403, 403]


def test_send_a_test_event_with_the_development_secret(page: Any, stack: Stack) -> None:
    assert stack.settings.uses_development_secret
    goto(page, stack, "trigger")
    assert page.is_visible("#nav-trigger")
    page.select_option("select[name=type]", "template.approval.updated")
    page.fill("input[name=status]", "approved")
    page.click("#trigger-send")
    page.wait_for_selector("#trigger-result table")
    text = page.inner_text("#trigger-result")
    assert "HTTP 200" in text and '"status": "accepted"' in text
    shot(page, "trigger")
    page.click("#trigger-result a.mono")
    page.wait_for_selector("main[data-ready='event']")
    assert "template.approval" in page.inner_text("main") or "templates" in page.inner_text("main")


def test_overview_charts_the_last_hour(page: Any, stack: Stack) -> None:
    goto(page, stack, "overview")
    page.wait_for_selector("#overview .charts")
    # The tail counted what was sent (by type and tenant); the worker's metrics give duplicates.
    wait_for(
        lambda: overview_totals(page),
        lambda t: t["in"] >= 7 and t["dead"] >= 2,
        30,
        "the overview's totals",
        stack.logs,
    )
    text = page.inner_text("#overview")
    assert "message.status.updated" in text and "default" in text
    assert page.locator("#overview svg.chart rect").count() >= 3
    assert_no_script_ran(page)
    shot(page, "overview")
    # Live again, now that there is history: the latest rows arrive at once when the page opens.
    goto(page, stack, "live")
    page.wait_for_selector("#live-rows tr:nth-child(8)")
    assert_no_script_ran(page)
    shot(page, "live-history")


def test_the_overview_says_when_its_numbers_stop_refreshing(page: Any, stack: Stack) -> None:
    """A refresh that failed was dropped without a word: the last numbers stayed up, looking current."""
    goto(page, stack, "overview")
    page.wait_for_selector("#overview .totals")
    assert page.locator("#overview-stale").is_hidden()
    page.route("**/api/overview", lambda route: route.abort())  # the console gone away, as the page sees it
    page.wait_for_selector("#overview-stale", state="visible", timeout=30_000)
    assert "Not refreshed since" in page.inner_text("#overview-stale")
    page.unroute("**/api/overview")
    page.wait_for_selector("#overview-stale", state="hidden", timeout=30_000)


def overview_totals(page: Any) -> dict[str, int]:
    page.reload()
    page.wait_for_selector("#overview .totals")
    nums = page.locator("#overview .total .num").all_inner_texts()
    return {"in": int(nums[1]), "dead": int(nums[2])}


def test_a_running_dry_run_stops_at_the_stop_button(page: Any, stack: Stack) -> None:
    """A replay started too wide ran to its end: the page had no way to stop it. Last in this module: it
    puts many copies of one event on the raw topic (the worker's dedup table drops them), so that a dry run
    over them lasts seconds, long enough to press Stop."""
    body = SampleFactory(11).message_status("msg-stop", "delivered").body
    producer = Producer({"bootstrap.servers": stack.settings.kafka_bootstrap, "linger.ms": 50})
    raw = Topics(stack.settings.topic_prefix).raw
    for _ in range(150_000):
        while True:
            try:
                producer.produce(raw, body, b"stop-copy")
                break
            except BufferError:  # librdkafka's local queue is full: let it send some
                producer.poll(0.1)
    assert producer.flush(60) == 0
    goto(page, stack, "replay")
    assert page.is_hidden("#replay-stop")
    page.click("#replay-dry")
    page.click("#replay-stop")  # waits for it to show: the job is running
    page.wait_for_selector("#replay-result p.warn")
    text = page.inner_text("#replay-result")
    done = re.search(r"^Stopped: replay \S+ interrupted after (\d+) of (\d+) records", text)
    assert done is not None, text
    assert int(done[1]) < int(done[2]) and int(done[2]) >= 150_000, text
    assert "to go on where it stopped" in text, text
    assert page.is_hidden("#replay-stop")
    assert page.is_disabled("#replay-run")  # a stopped dry run counted nothing to replay
    assert_no_script_ran(page)
    shot(page, "replay-stopped")
