"""The console's aiohttp app: pages, a JSON API over the CLI's own functions, server-sent live events.

Every answer is built from the functions the CLI calls (`inspect.locate`, `dlq.list_entries`/`show_entry`/
`redrive`, `replay.replay`, the sender's `one_event`/`deliver`); this module parses requests and shapes
JSON. The browser renders every value with textContent, so nothing from an event is ever markup.
"""

from __future__ import annotations

import asyncio
import html
import logging
import random
import re
import secrets
import signal
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import orjson
import psycopg
from aiohttp import web
from aiohttp.http_exceptions import PayloadEncodingError
from aiohttp.web_protocol import RequestPayloadError

from sentpipe.console.auth import (
    COOKIE,
    LOGIN_COOKIE,
    Session,
    Sessions,
    cross_site,
    csrf_ok,
    host_is_loopback,
    set_cookie,
    set_login_cookie,
)
from sentpipe.console.calls import NoFreeSlot, off_loop
from sentpipe.console.jobs import STOP_TIMEOUT_S, Busy, Job, Jobs, Kind, fingerprint
from sentpipe.console.overview import Sampler
from sentpipe.console.tail import JOIN_TIMEOUT_S, Tail
from sentpipe.guarded_http import guard
from sentpipe.kafka import BrokerUnavailable
from sentpipe.processors import dlq as dlq_ops
from sentpipe.processors import history, reading
from sentpipe.processors import inspect as trace
from sentpipe.processors import replay as replay_ops
from sentpipe.processors.offsets import Log, NotFound, OpsError, Window, make_window, parse_when
from sentpipe.schemas import exact_json
from sentpipe.schemas import routing as r
from sentpipe.schemas.events import ROUTED_TYPES, EventType, parse_time, searched_id_problem
from sentpipe.schemas.samples import SampleFactory
from sentpipe.schemas.topics import Topics
from sentpipe.sender.delivery import Outcome, Unreachable, deliver, probe
from sentpipe.sender.delivery import shown as without_password
from sentpipe.sender.plan import one_event, parse_shape, parse_status, plan_deliveries
from sentpipe.settings import DEVELOPMENT_SECRET, Settings

log = logging.getLogger("sentpipe.console")

STATIC = Path(__file__).resolve().parent / "static"
SETTINGS = web.AppKey("settings", Settings)
SESSIONS = web.AppKey("sessions", Sessions)
TAIL = web.AppKey("tail", Tail)
SAMPLER = web.AppKey("sampler", Sampler)
JOBS = web.AppKey("jobs", Jobs)
# Read once, at start, as the ingress reads its secrets: not the file on the loop at every call.
DEVELOPMENT_SECRET_IN_USE = web.AppKey("development_secret_in_use", bool)
# The request's session (or None); a typed key where aiohttp has them (3.12+), else the plain name.
SESSION: Any = web.RequestKey("console_session", object) if hasattr(web, "RequestKey") else "console_session"

PUBLIC = ("/login", "/healthz", "/static/")
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self';"
    " object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_BODY = 64 * 1024
MAX_DLQ_LIMIT = 1000  # the page's own maximum; every listed entry is held in memory
MAX_SCAN_LIMIT = 10_000_000


T = TypeVar("T")


class Refused(Exception):
    """A client's mistake, answered with `status` and the message as JSON."""

    def __init__(self, message: str, status: int = 400, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


# --- helpers --------------------------------------------------------------------------------------------
def dumps(data: Any) -> bytes:
    option = orjson.OPT_NON_STR_KEYS
    try:
        return orjson.dumps(data, default=str, option=option)
    except orjson.JSONEncodeError:
        # One odd value (an integer beyond 64 bits from a header, a lone surrogate) must not cost the
        # whole answer: retried with such values made encodable.
        return orjson.dumps(encodable(data), default=str, option=option)


def encodable(value: Any) -> Any:
    if isinstance(value, dict):
        return {encodable(k): encodable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [encodable(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**64:
        return str(value)
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode()
    return value


def send_json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=dumps(data), status=status, content_type="application/json")


# Each error answer's `code`, for scripts: by status, unless the answer names a finer one.
ERROR_CODES = {
    400: "bad_request",
    401: "sign_in_required",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "body_too_large",
    415: "unsupported_media_type",
    502: "ingress_unreachable",
    503: "unavailable",
}


def problem(status: int, message: str, code: str | None = None) -> web.Response:
    """An error answer: `error`, one line for a person; `code`, the fixed word a script tests."""
    body = problem_body(code or ERROR_CODES.get(status, "error"), message)
    return web.Response(body=body, status=status, content_type="application/json")


def problem_body(code: str, message: str) -> bytes:
    """`problem`'s body; also what the HTTP guard answers before a handler runs (its default is the
    ingress's `{error: code, detail}`, and a script testing `code` found none)."""
    return dumps({"error": message, "code": code})


def one_line(exc: BaseException, limit: int | None = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if limit is None or len(text) < limit else text[: limit - 3] + "..."


def text_of(data: bytes | None) -> str | None:
    return None if data is None else data.decode(errors="replace")


def body_json(value: bytes) -> dict[str, Any]:
    """A record's value as the page shows it: the text, and the JSON pretty-printed when it is JSON."""
    return {"text": value.decode(errors="replace"), "pretty": exact_json.pretty(value), "bytes": len(value)}


def found_json(f: trace.Found) -> dict[str, Any]:
    return {
        "topic": f.topic,
        "partition": f.partition,
        "offset": f.offset,
        "time": f.timestamp_ms,
        "key": text_of(f.key),
        "headers": [[k, v.decode(errors="replace")] for k, v in f.headers.items()],
        "body": body_json(f.value),
    }


def entry_json(e: dlq_ops.DlqRow) -> dict[str, Any]:
    orig = e.original
    return {
        "id": e.id,
        "time": e.dead_at_ms,
        "written": e.timestamp_ms,
        "stage": e.stage,
        "error": e.error_class,
        "message": e.message,
        "event_id": e.event_id,
        "key": text_of(e.key),
        "type": e.type,
        "tenant": e.tenant,
        "original": f"{orig[0]}:{orig[1]}:{orig[2]}" if orig else None,
        "attempts": e.attempts,
    }


def letter_json(e: dlq_ops.DlqEntry) -> dict[str, Any]:
    """One record in full: its listing row, headers and body."""
    headers = [[k, v.decode(errors="replace")] for k, v in e.headers]
    return {**entry_json(e.row()), "headers": headers, "body": body_json(e.value)}


def listed(values: Any, what: str) -> list[str]:
    """A JSON list of strings, or one comma-separated string; blanks dropped."""
    if values is None or values == "":
        return []
    if isinstance(values, str):
        values = values.split(",")
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise OpsError(f"{what} must be a list of strings")
    return [v.strip() for v in values if v.strip()]


def optional_text(value: Any, what: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise OpsError(f"{what} must be a string")
    return value.strip() or None


def shown(text: str) -> str:
    """A client's value quoted in an error, cut short."""
    return repr(text if len(text) <= 40 else text[:40] + "...")


def known(given: Collection[str], allowed: Collection[str], noun: str = "parameter") -> None:
    """Refuses names the endpoint does not take: a misspelt filter must not widen a selection unseen."""
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise Refused(f"unknown {noun} {shown(unknown[0])} (known: {', '.join(sorted(allowed))})")
    # A query string may repeat a name (`?stage=route&stage=handler`): only the first value was read, and
    # the selection narrowed unseen. Lists are one comma-separated value.
    getall = getattr(given, "getall", None)  # a query string's MultiDict; a JSON body's dict has none
    if getall is not None:
        twice = sorted(name for name in set(given) if len(getall(name)) > 1)
        if twice:
            raise Refused(f"{noun} {shown(twice[0])} given more than once; give one comma-separated value")


def int_param(query: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    text = query.get(name, "").strip()
    if not text:
        return default
    # ASCII digits only: int() takes other scripts' digits (Arabic-Indic), str.isdigit() even superscripts.
    if not re.fullmatch(r"-?[0-9]+", text):
        raise Refused(f"{name} must be an integer from {low} to {high}")
    if len(text) > 20 or not low <= int(text) <= high:
        raise Refused(f"{name} must be from {low} to {high}")
    return int(text)


def text_param(query: Mapping[str, str], name: str) -> str | None:
    """An id or tenant to look for: no NUL (PostgreSQL text cannot hold one), no longer than any id."""
    value = query.get(name, "").strip()
    if not value:
        return None
    problem = searched_id_problem(value)
    if problem is not None:
        raise Refused(f"{name} {problem}")
    return value


async def within_body_timeout(request: web.Request, read: Callable[[], Awaitable[T]]) -> T:
    """The body, read within SENTPIPE_BODY_TIMEOUT_S: a stalled body held its connection for ever, and
    enough of them (no sign-in needed at /login) left no socket for anyone else."""
    limit = request.app[SETTINGS].body_timeout_s
    try:
        async with asyncio.timeout(limit):
            return await read()
    except TimeoutError:
        raise Refused(f"the body did not arrive within {limit:g} s", 408, "body_timeout") from None


async def read_json(request: web.Request) -> dict[str, Any]:
    try:
        text = await within_body_timeout(request, request.text)
    except LookupError:
        raise Refused(f"charset {shown(request.charset or '')} is not supported; send UTF-8", 415) from None
    except ValueError:
        raise Refused(f"the body is not text in its charset ({request.charset or 'utf-8'})") from None
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise Refused("the body must be JSON") from None
    if not isinstance(data, dict):
        raise Refused("the body must be an object")
    return data


# --- middleware: headers, sign-in, CSRF ----------------------------------------------------------------
@web.middleware
async def security_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        response = exc
        if exc.status >= 400 and (request.path.startswith("/api/") or request.method == "POST"):
            response = http_error_json(request, exc)
    response.headers.setdefault("Content-Security-Policy", CSP)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    # same-origin, not no-referrer: under no-referrer Chromium sends `Origin: null` with form posts.
    response.headers.setdefault("Referrer-Policy", "same-origin")
    response.headers.setdefault("X-Frame-Options", "DENY")
    if not request.path.startswith("/static/"):
        response.headers.setdefault("Cache-Control", "no-store")
    if isinstance(response, web.HTTPException):
        raise response
    return response


def http_error_json(request: web.Request, exc: web.HTTPException) -> web.StreamResponse:
    """aiohttp's own error answers (no route, wrong method, body too large) as the API's JSON errors."""
    if exc.content_type == "application/json":
        return exc
    if exc.status == 404:
        message = "no such endpoint"
    elif exc.status == 405:
        message = f"{request.method} is not allowed here (allowed: {exc.headers.get('Allow', 'none')})"
    elif exc.status == 413:
        message = f"the body is larger than {MAX_BODY // 1024} KiB"
    else:
        message = exc.reason.lower()
    response = problem(exc.status, message)
    if "Allow" in exc.headers:
        response.headers["Allow"] = exc.headers["Allow"]
    return response


@web.middleware
async def sign_in(request: web.Request, handler: Handler) -> web.StreamResponse:
    sessions = request.app[SESSIONS]
    if sessions.token is None and not host_is_loopback(request):
        # Without a token the console only answers names of this machine (no DNS rebinding).
        message = "this console has no token and answers only on localhost or a loopback address"
        return problem(403, message, "localhost_only")
    if request.path.startswith("/api/") and cross_site(request):
        # A page on any site could make the browser GET the API (an <img>, say): it reads nothing back,
        # but without a token it needs no session, so it could start 10-million-record trace scans and
        # history searches at will. The console's own page asks from its own origin.
        return problem(403, "the API answers only the console's own page, not other sites", "cross_site")
    # No session is made here: a probe, a static file or the sign-in form needs none, and a session made
    # for every cookie-less request would let anyone fill the table.
    session = request[SESSION] = sessions.get(request)
    public = any(request.path == p or (p.endswith("/") and request.path.startswith(p)) for p in PUBLIC)
    if request.method == "POST" and request.path != "/login" and not csrf_ok(request, session):
        return problem(403, "missing or wrong CSRF token: reload the page", "bad_csrf_token")
    if sessions.token is not None and not public and (session is None or not session.signed_in):
        if request.path.startswith("/api/"):
            return problem(401, "sign in first")
        raise web.HTTPSeeOther("/login")
    return await handler(request)


# --- pages ----------------------------------------------------------------------------------------------
LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>sentpipe console: sign in</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="stylesheet" href="/static/app.css"></head>
<body class="login"><form method="post" action="/login" class="card">
<h1>sentpipe console</h1>
<p>Sign in with the console token (<code>SENTPIPE_CONSOLE_TOKEN</code>).</p>
<input type="hidden" name="csrf" value="{csrf}">
<label>Token <input type="password" name="token" autocomplete="current-password" autofocus required></label>
<button type="submit">Sign in</button>
<p class="error" role="alert">{message}</p>
</form></body></html>
"""


async def login_page(request: web.Request) -> web.StreamResponse:
    sessions = request.app[SESSIONS]
    session = request[SESSION]
    if sessions.token is None or (session is not None and session.signed_in):
        raise web.HTTPSeeOther("/")
    nonce = request.cookies.get(LOGIN_COOKIE, "")
    fresh = not re.fullmatch(r"[A-Za-z0-9_-]{43}", nonce)
    if fresh:
        nonce = secrets.token_urlsafe(32)
    csrf = sessions.login_csrf(nonce)
    response = web.Response(
        text=LOGIN_PAGE.format(csrf=html.escape(csrf), message=""), content_type="text/html"
    )
    if fresh:
        set_login_cookie(response, request, nonce)
    return response


async def login(request: web.Request) -> web.StreamResponse:
    sessions = request.app[SESSIONS]
    session = request[SESSION]
    if sessions.token is None:
        raise web.HTTPSeeOther("/")  # nothing to sign in to
    try:
        form = await within_body_timeout(request, request.post)
    except LookupError:
        return problem(415, f"charset {shown(request.charset or '')} is not supported; send UTF-8")
    except ValueError:
        return problem(400, "the form is not text in its charset")
    csrf, token = form.get("csrf"), form.get("token")
    if not isinstance(csrf, str) or not sessions.login_csrf_ok(request, csrf):
        return problem(403, "missing or wrong CSRF token: reload the sign-in page", "bad_csrf_token")
    if not isinstance(token, str) or not sessions.token_matches(token):
        async with sessions.wrong_token:  # two guesses a second, however many are sent at once
            await asyncio.sleep(0.5)
        return web.Response(
            status=401,
            text=LOGIN_PAGE.format(csrf=html.escape(csrf), message="Wrong token."),
            content_type="text/html",
        )
    # A new session id on sign-in: a cookie planted before it is worth nothing after it.
    if session is not None:
        sessions.drop(session)
    signed_in = sessions.new(signed_in=True)
    response = web.HTTPSeeOther("/")
    set_cookie(response, request, signed_in)
    response.del_cookie(LOGIN_COOKIE, path="/login")
    raise response


async def logout(request: web.Request) -> web.StreamResponse:
    session = request[SESSION]
    if session is not None:
        request.app[SESSIONS].drop(session)
    response = web.HTTPSeeOther("/login")
    response.del_cookie(COOKIE, path="/")
    raise response


async def index(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(STATIC / "index.html", headers={"Content-Type": "text/html; charset=utf-8"})


async def healthz(request: web.Request) -> web.StreamResponse:
    return send_json({"status": "ok"})


# --- API ------------------------------------------------------------------------------------------------
async def session_info(request: web.Request) -> web.StreamResponse:
    s = request.app[SETTINGS]
    session: Session | None = request[SESSION]
    new_session = None
    if session is None:  # only without a token (else sign_in answered 401): the page's CSRF token
        session = new_session = request.app[SESSIONS].new(signed_in=False)
    response = send_json(
        {
            "csrf": session.csrf,
            "signed_in": request.app[SESSIONS].token is not None,
            "trigger": request.app[DEVELOPMENT_SECRET_IN_USE],
            "topic_prefix": s.topic_prefix,
            "default_tenant": s.default_tenant,
            "types": [t.value for t in EventType],
            "routed_types": [t.value for t in ROUTED_TYPES],
            "stages": list(dlq_ops.STAGES),
        }
    )
    if new_session is not None:
        set_cookie(response, request, new_session)
    return response


async def overview(request: web.Request) -> web.StreamResponse:
    return send_json(request.app[SAMPLER].overview())


LIVE_STATE_EVERY_S = 2.0  # how soon a Live page hears that the tail lost Kafka, or found it again
LIVE_KEEP_ALIVE_S = 15.0


async def live(request: web.Request) -> web.StreamResponse:
    """Server-sent events: the latest rows at once, then every raw and DLQ record as it arrives."""
    tail = request.app[TAIL]
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    )
    await response.prepare(request)
    sub = tail.subscribe()
    reported = 0
    said: str | None = None

    def event(row: dict[str, Any]) -> bytes:
        # The id is what the browser sends back (Last-Event-ID) when it reconnects.
        return b"id: " + tail.row_id(row).encode() + b"\ndata: " + dumps(row) + b"\n\n"

    async def say_kafka() -> None:
        # The tail's trouble with Kafka, as it starts and as it ends: without it the page said "live"
        # through a broker outage, and no rows read as no events coming in.
        nonlocal said
        if tail.problem != said:
            said = tail.problem
            await response.write(b"event: kafka\ndata: " + dumps({"problem": said}) + b"\n\n")

    try:
        # Taken with no await since subscribing: a row is either in it or in the queue, never in both.
        backlog, missed = tail.resumed(request.headers.get("Last-Event-ID"))
        for old in backlog:
            await response.write(event({**old, "backlog": True}))
        await response.write(b"event: ready\ndata: {}\n\n")
        if missed:  # came while the page was away, and no longer held: said, not skipped unseen
            await response.write(b"event: dropped\ndata: " + str(missed).encode() + b"\n\n")
        idle = 0.0
        while True:
            await say_kafka()
            try:
                row: dict[str, Any] | None = await asyncio.wait_for(sub.queue.get(), LIVE_STATE_EVERY_S)
            except TimeoutError:
                idle += LIVE_STATE_EVERY_S
                if idle >= LIVE_KEEP_ALIVE_S:
                    idle = 0.0
                    await response.write(b": keep-alive\n\n")
                continue
            idle = 0.0
            if row is None:
                break
            await response.write(event(row))
            if sub.dropped != reported:
                reported = sub.dropped
                await response.write(b"event: dropped\ndata: " + str(reported).encode() + b"\n\n")
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        tail.unsubscribe(sub)
    return response


async def event_trace(request: web.Request) -> web.StreamResponse:
    known(request.query, ("id", "scan_limit"))
    event_id = text_param(request.query, "id")
    if not event_id:
        return problem(400, "give an event id")
    scan_limit = int_param(request.query, "scan_limit", 200_000, 1, MAX_SCAN_LIMIT)
    rep: trace.EventReport = await off_loop(
        trace.locate, request.app[SETTINGS], event_id, scan_limit=scan_limit
    )
    d = rep.dedup
    return send_json(
        {
            "event_id": rep.event_id,
            "found": rep.found,
            "raw": [found_json(f) for f in rep.raw],
            "dedup_topic": rep.dedup_topic,
            "dedup": None
            if d is None
            else {
                "topic": d.topic,
                "partition": d.partition,
                "offset": d.offset,
                "tombstone": d.tombstone,
                "first_routed": d.first_routed_ms,
                # tenant -> first routed (ms): the table marks (id, tenant) pairs, not the id alone
                "tenants": d.tenants,
            },
            "routed": [found_json(f) for f in rep.routed],
            "rows": {
                table: [{name: trace.json_text(v) for name, v in row.items()} for row in rows]
                for table, rows in rep.rows.items()
            },
            "db_error": rep.db_error,
            "dlq": [letter_json(e) for e in rep.dlq],
            "notes": rep.notes,
        }
    )


def _time(text: str | None, what: str) -> datetime | None:
    if not text:
        return None
    parse_when(text, what)  # refuses what is not a time, naming the field
    # The datetime itself, not one made from milliseconds: through a float, 9999-12-31T23:59:59.999999Z
    # rounds up into year 10000.
    return parse_time(text.strip())


async def search(request: web.Request) -> web.StreamResponse:
    q = request.query
    known(q, ("q", "tenant", "type", "since", "until", "after", "page_size"))
    try:
        # Routed types only: `unrouted` has no history table, and answered "no events" as if it had.
        types = frozenset(r.parse_event_types(listed(q.get("type"), "type"), ROUTED_TYPES))
    except ValueError as exc:
        return problem(400, str(exc))
    since, until = _time(q.get("since"), "since"), _time(q.get("until"), "until")
    if since is not None and until is not None and since >= until:
        # As replay refuses it: an empty range answered "no events" as if there were none.
        raise Refused(
            f"since {shown(q['since'])} is not before until {shown(q['until'])}: the time range is empty"
        )
    query = history.HistoryQuery(
        text=text_param(q, "q"),
        tenant=text_param(q, "tenant"),
        types=types,
        since=since,
        until=until,
        after=_cursor(q.get("after", "").strip()),
        page_size=int_param(q, "page_size", 50, 1, history.MAX_PAGE_SIZE),
    )
    page: history.HistoryPage = await off_loop(
        history.search, request.app[SETTINGS].database_url.get_secret_value(), query
    )
    return send_json(
        {
            "rows": page.rows,
            "page_size": page.page_size,
            "has_more": page.has_more,
            # The next page is the rows after this one's last (`after=<next>`): not an offset, which rows
            # arriving meanwhile shifted (a row shown twice, or never).
            "next": page.next.token() if page.next else None,
        }
    )


def _cursor(text: str) -> history.Cursor | None:
    if not text:
        return None
    try:
        return history.Cursor.parse(text)
    except history.BadCursor as exc:
        raise Refused(f"after {exc}") from None


DLQ_FILTERS = ("reasons", "reason", "stages", "stage", "since")


def _one_of(data: dict[str, Any] | Any, plural: str, singular: str) -> Any:
    """The filter under either of its names; both at once is refused, since one of them was ignored."""
    if data.get(plural) not in (None, "") and data.get(singular) not in (None, ""):
        raise Refused(f"give {plural} or {singular}, not both")
    return data.get(plural) or data.get(singular)


def _selection(data: dict[str, Any] | Any) -> dict[str, Any]:
    """The DLQ filters of a request, normalized (also what a dry run's fingerprint is taken over)."""
    return {
        "ids": sorted(str(dlq_ops.parse_entry_id(i)) for i in listed(data.get("ids"), "ids")),
        "reasons": sorted(listed(_one_of(data, "reasons", "reason"), "reasons")),
        "stages": sorted(listed(_one_of(data, "stages", "stage"), "stages")),
        "since": optional_text(data.get("since"), "since"),
    }


async def dlq_list(request: web.Request) -> web.StreamResponse:
    # `dlq list` takes no ids (the page opens one record by its id): refused, not silently ignored.
    known(request.query, (*DLQ_FILTERS, "limit"))
    sel = _selection(request.query)
    limit = int_param(request.query, "limit", 50, 1, MAX_DLQ_LIMIT)
    listing: dlq_ops.DlqListing = await off_loop(
        dlq_ops.list_entries,
        request.app[SETTINGS],
        dlq_ops.make_selection(reasons=sel["reasons"], stages=sel["stages"], since=sel["since"], fields=True),
        limit=limit,
    )
    return send_json(
        {
            "entries": [entry_json(e) for e in reversed(listing.entries)],  # newest first
            "matched": listing.matched,
            "total": listing.total,
            # What `dlq list` says as "N more a redrive took": without it, after a redrive the page read
            # "0 matching, 120000 in the DLQ" and nothing said where they had gone.
            "redriven": listing.redriven,
        }
    )


async def dlq_entry(request: web.Request) -> web.StreamResponse:
    known(request.query, ("id",))
    e = await off_loop(dlq_ops.show_entry, request.app[SETTINGS], request.query.get("id", ""))
    return send_json(letter_json(e))


# A job's work: its progress callback, its stop event, and the end offsets of the dry run it follows.
JobWork = Callable[[replay_ops.Progress, threading.Event, Mapping[int, int] | None], replay_ops.RunResult]


def _start(
    request: web.Request, kind: Kind, params: dict[str, Any], dry_run: bool, work: JobWork
) -> web.Response:
    session: Session = request[SESSION]
    fp = fingerprint(kind, params)
    confirmed = session.confirmed.get(kind)
    if not dry_run and (confirmed is None or confirmed[0] != fp):
        message = f"run a dry run of exactly these settings first, then the {kind}"
        return problem(409, message, "dry_run_first")
    upto = None if dry_run or confirmed is None else confirmed[1]

    def on_done(job: Job) -> None:
        if job.dry_run:
            session.confirmed[kind] = (job.fingerprint, job.ends)
        else:
            session.confirmed.pop(kind, None)

    def run(progress: replay_ops.Progress, stop: threading.Event) -> replay_ops.RunResult:
        return work(progress, stop, upto)

    try:
        job = request.app[JOBS].start(Job(kind, dry_run, fp, session.id), run, on_done, describe_error)
    except Busy as exc:
        return send_json({"error": str(exc), "code": "job_running", "job": exc.job.json()}, 409)
    return send_json(job.json(), 202)


def _dry_run(data: dict[str, Any]) -> bool:
    """`dry_run`: true or false, absent meaning false. Anything else ("true", 1) is refused: read as false,
    it started a real run where a dry run was meant."""
    value = data.get("dry_run", False)
    if not isinstance(value, bool):
        raise Refused(f"dry_run must be true or false, not {type(value).__name__}")
    return value


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, psycopg.Error):
        return f"database unavailable: {one_line(exc)}"
    if isinstance(exc, OpsError):
        # The line a stopped or broken-off job ends with names every partition to go on from: cut at 300
        # characters, a replay of 12 partitions or more lost the last of them, and their records were never
        # sent by the run that went on. Its length is bounded by the partition count.
        return one_line(exc, limit=None)
    return one_line(exc)


async def dlq_redrive(request: web.Request) -> web.StreamResponse:
    data = await read_json(request)
    known(data, (*DLQ_FILTERS, "ids", "dry_run"), "field")
    params = _selection(data)
    dry_run = _dry_run(data)
    sel = dlq_ops.make_selection(**params, fields=True)  # bad input fails here, before any job starts
    settings = request.app[SETTINGS]
    # Checked before the job is accepted, as the replay's offsets are (a real run follows a dry run): an ID
    # the DLQ does not hold was a 202, then a failed job.
    if dry_run:
        await off_loop(dlq_ops.check_selection, settings, sel)

    def work(
        progress: replay_ops.Progress, stop: threading.Event, upto: Mapping[int, int] | None
    ) -> replay_ops.RunResult:
        return dlq_ops.redrive(settings, sel, dry_run=dry_run, progress=progress, stop=stop, upto=upto)

    return _start(request, "redrive", params, dry_run, work)


REPLAY_FIELDS = ("since", "until", "from_offsets", "to_offsets", "types", "tenants", "event_ids", "dry_run")


def check_raw_window(settings: Settings, window: Window) -> None:
    """The checks `sentpipe replay` makes as it starts (the partitions named exist, the log holds the
    offsets named), in the API's field names: left to the job, an offset past the end failed it after it was
    accepted."""
    with Log(settings) as kafka:
        kafka.ranges(Topics(settings.topic_prefix).raw, window)


async def replay(request: web.Request) -> web.StreamResponse:
    data = await read_json(request)
    known(data, REPLAY_FIELDS, "field")
    since, until = optional_text(data.get("since"), "since"), optional_text(data.get("until"), "until")
    # make_window below checks them (ASCII digits within Kafka's ranges), as for `sentpipe replay`.
    from_offsets = listed(data.get("from_offsets"), "from_offsets")
    to_offsets = listed(data.get("to_offsets"), "to_offsets")
    types = sorted(listed(data.get("types"), "types"))
    tenants = sorted(listed(data.get("tenants"), "tenants"))
    event_ids = sorted(listed(data.get("event_ids"), "event_ids"))
    params: dict[str, Any] = {
        "since": since,
        "until": until,
        "from_offsets": from_offsets,
        "to_offsets": to_offsets,
        "types": types,
        "tenants": tenants,
        "event_ids": event_ids,
    }
    dry_run = _dry_run(data)
    window = make_window(
        since=since, until=until, from_offsets=from_offsets, to_offsets=to_offsets, fields=True
    )
    flt = replay_ops.Filter(replay_ops.parse_types(types), frozenset(tenants), frozenset(event_ids))
    settings = request.app[SETTINGS]
    # Checked before the job is accepted; a real run follows a dry run of the same settings, which did.
    if dry_run and window.named_partitions:
        await off_loop(check_raw_window, settings, window)

    def work(
        progress: replay_ops.Progress, stop: threading.Event, upto: Mapping[int, int] | None
    ) -> replay_ops.RunResult:
        return replay_ops.replay(
            settings, window, flt, dry_run=dry_run, progress=progress, stop=stop, upto=upto
        )

    return _start(request, "replay", params, dry_run, work)


async def job_status(request: web.Request) -> web.StreamResponse:
    jobs = request.app[JOBS]
    job_id = request.match_info["job"]
    job = jobs.current if job_id == "current" else jobs.by_id.get(job_id)
    if job is None:
        return send_json(None) if job_id == "current" else problem(404, "no such job")
    return send_json(job.json())


async def job_stop(request: web.Request) -> web.StreamResponse:
    """Stop the running replay or redrive after the record in hand (Ctrl-C's effect on `sentpipe replay`)."""
    jobs = request.app[JOBS]
    job_id = request.match_info["job"]
    job = jobs.request_stop(job_id)
    if job is not None:
        return send_json(job.json(), 202)
    if job_id != "current" and job_id not in jobs.by_id:
        return problem(404, "no such job")
    return problem(409, "that job is not running", "job_not_running")


def ingress_url(s: Settings) -> str:
    return s.console_ingress_url or f"http://127.0.0.1:{s.ingress_port}/webhooks/sent"


async def trigger(request: web.Request) -> web.StreamResponse:
    """`sentpipe trigger` from the page: one signed event, one attempt; only with the development secret."""
    s = request.app[SETTINGS]
    if not request.app[DEVELOPMENT_SECRET_IN_USE]:
        message = "test events can be sent only while the built-in development secret is in use"
        return problem(403, message, "not_dev_secret")
    data = await read_json(request)
    known(data, ("type", "status", "shape"), "field")
    try:
        # Strings checked as such: str() made `5` an unknown type '5' and an object its Python repr.
        (type_,) = r.parse_event_types([optional_text(data.get("type"), "type") or ""], ROUTED_TYPES)
        shape = parse_shape(optional_text(data.get("shape"), "shape") or "sent", "shape")
        status = parse_status(type_, optional_text(data.get("status"), "status"), "status")
    except ValueError as exc:
        return problem(400, str(exc))
    sample = one_event(SampleFactory(), type_, shape, status)
    (delivery,) = plan_deliveries([sample], 0.0, False, random.Random())
    target = ingress_url(s)
    outcomes: list[Outcome] = []
    try:
        await probe(target, timeout_s=5.0)
        await deliver(
            target,
            [delivery],
            DEVELOPMENT_SECRET,  # what the default tenant takes (DEVELOPMENT_SECRET_IN_USE), file or not
            schedule=(),
            timeout_s=10.0,
            on_outcome=outcomes.append,
        )
    except Unreachable as exc:
        return problem(502, str(exc))
    final = outcomes[0].final
    answer: Any = None
    try:
        answer = orjson.loads(final.body) if final.body else None
    except orjson.JSONDecodeError:
        answer = None
    event_id = answer.get("event_id") if isinstance(answer, dict) else None
    return send_json(
        {
            "url": without_password(target),  # aiohttp sends a password in it as Basic auth: never shown
            "webhook_id": delivery.webhook_id,
            "status": final.status,
            "outcome": final.outcome,
            "accepted": final.accepted,
            "answer": body_json(final.body),
            "event": body_json(sample.body),
            "event_id": event_id,
        }
    )


@web.middleware
async def api_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bad input and unreachable services as one-line JSON errors (the CLI's one-line errors)."""
    try:
        return await handler(request)
    except Refused as exc:
        response = problem(exc.status, str(exc), exc.code)
        if exc.status == 408 and request.protocol is not None:
            # Written, then closed: left to aiohttp, it would read what is left of the body for up to 10 s.
            await response.prepare(request)
            await response.write_eof()
            request.protocol.force_close()
        return response
    except (ConnectionResetError, RequestPayloadError, PayloadEncodingError) as exc:
        # A client that left mid-body, or framing that does not decode: the client's doing, not a defect.
        # Logged as one, with its traceback, anyone could fill the log with them (before signing in).
        log.info("console: request body unreadable (%s)", type(exc).__name__, extra={"path": request.path})
        return problem(400, "the body did not arrive whole (connection closed or framing broken)", "bad_body")
    except NotFound as exc:
        return problem(404, str(exc), "not_found")
    except OpsError as exc:
        return problem(400, str(exc))
    except ValueError as exc:
        if request.path.startswith("/api/"):
            return problem(400, one_line(exc))
        raise
    except BrokerUnavailable as exc:
        return problem(503, str(exc), "broker_unavailable")
    except NoFreeSlot as exc:
        response = problem(503, f"the console is busy: {exc}", "busy")
        response.headers["Retry-After"] = "5"
        return response
    except psycopg.Error as exc:
        return problem(503, reading.unavailable(exc), "database_unavailable")
    except web.HTTPException:
        raise
    except Exception:
        if not request.path.startswith("/api/"):
            raise
        # A defect, not the request's: its traceback in the console's log, never in the answer.
        log.exception("console: unexpected error", extra={"path": request.path})
        return problem(500, "unexpected error (the console's log has the details)", "internal_error")


# --- the app --------------------------------------------------------------------------------------------
def create_app(settings: Settings) -> web.Application:
    token = settings.console_token.get_secret_value() if settings.console_token else None
    app = web.Application(middlewares=[security_headers, sign_in, api_errors], client_max_size=MAX_BODY)
    app[SETTINGS] = settings
    app[DEVELOPMENT_SECRET_IN_USE] = settings.uses_development_secret
    app[SESSIONS] = Sessions(token)
    app[JOBS] = Jobs()
    tail = app[TAIL] = Tail(settings)
    app[SAMPLER] = Sampler(settings, tail)

    async def background(app: web.Application) -> AsyncIterator[None]:
        tail.start(asyncio.get_running_loop())
        sampler = asyncio.create_task(app[SAMPLER].run())
        yield
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
        await asyncio.get_running_loop().run_in_executor(None, tail.stop)
        app[SAMPLER].close()

    async def end_streams(app: web.Application) -> None:
        for sub in list(tail.subscribers):
            sub.end()

    app.cleanup_ctx.append(background)

    async def stop_job(app: web.Application) -> None:
        # SIGTERM reaches only the main thread: without this a running job went on (and the process with
        # it) until SIGKILL, perhaps between a send and its ledger record.
        await app[JOBS].stop()

    app.on_shutdown.append(end_streams)
    app.on_shutdown.append(stop_job)
    app.router.add_get("/", index)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/login", login_page)
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout)
    app.router.add_get("/api/session", session_info)
    app.router.add_get("/api/overview", overview)
    app.router.add_get("/api/live", live)
    app.router.add_get("/api/event", event_trace)
    app.router.add_get("/api/search", search)
    app.router.add_get("/api/dlq", dlq_list)
    app.router.add_get("/api/dlq/entry", dlq_entry)
    app.router.add_post("/api/dlq/redrive", dlq_redrive)
    app.router.add_post("/api/replay", replay)
    app.router.add_get("/api/jobs/{job}", job_status)
    app.router.add_post("/api/jobs/{job}/stop", job_stop)
    app.router.add_post("/api/trigger", trigger)
    app.router.add_static("/static/", STATIC, show_index=False)
    return app


# Stopping, one after the other: a running replay or redrive, the requests in hand, the live tail. Helm and
# compose give the console longer than all three (it was 55 s against their 50: the tail's close was cut).
SERVER_SHUTDOWN_S = 5.0
STOP_BOUND_S = STOP_TIMEOUT_S + SERVER_SHUTDOWN_S + JOIN_TIMEOUT_S


def browser_url(host: str, port: int) -> str:
    """Where a browser on this machine opens the console: a wildcard address (0.0.0.0) is none to open."""
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


class CannotListen(Exception):
    """The console's address is taken or cannot be bound (the message names the settings)."""


def run(settings: Settings, host: str, port: int, on_ready: Callable[[str], None] | None = None) -> None:
    """Serve until SIGINT or SIGTERM; `on_ready` gets the URL once the port is bound."""
    asyncio.run(_serve(create_app(settings), host, port, on_ready))


async def _serve(app: web.Application, host: str, port: int, on_ready: Callable[[str], None] | None) -> None:
    # A runner of its own, not run_app: its connections get the side ports' protocol (a head timeout, JSON
    # for malformed requests; aiohttp's own quoted their bytes back and logged them at ERROR).
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SERVER_SHUTDOWN_S)
    await runner.setup()
    guard(runner, app[SETTINGS].body_timeout_s, error_body=problem_body)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:  # a port in use fails before anything is announced
            settings = "--host/--port, SENTPIPE_CONSOLE_HOST/SENTPIPE_CONSOLE_PORT"
            why = exc.strerror or exc
            raise CannotListen(f"cannot listen on {host}:{port} ({settings}): {why}") from None
        if on_ready is not None:
            # Port 0 is the system's pick: announced as 0, it was a URL no browser opens.
            bound = next((a[1] for a in runner.addresses if isinstance(a, tuple) and len(a) >= 2), port)
            on_ready(browser_url(host, bound if port == 0 else port))
        await stop.wait()
    finally:
        await runner.cleanup()
