"""The local sender: Sent's signatures, retries, duplicates and shuffling, against stubs and the ingress."""

from __future__ import annotations

import asyncio
import base64
import codecs
import io
import itertools
import os
import random
import re
import resource
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from copy import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from rich.console import Console
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from sentpipe.cli_send import _live, _resolve_target
from sentpipe.schemas.events import ROUTED_TYPES, EventType, frame
from sentpipe.schemas.samples import Sample, SampleFactory
from sentpipe.schemas.signature import Reason, SignatureError, Verifier
from sentpipe.schemas.topics import Topics
from sentpipe.sender import (
    SENT_RETRY_SCHEDULE,
    Outcome,
    Signer,
    SigningMode,
    Stats,
    Unreachable,
    deliver,
    plan,
    plan_deliveries,
    probe,
)
from sentpipe.sender.delivery import Attempt, check_url, parse_schedule, post_once, shown
from sentpipe.sender.plan import (
    BadLine,
    Delivery,
    generate,
    iter_events,
    parse_status,
    parse_types,
    plan_stream,
    planned_deliveries,
    read_jsonl,
)
from sentpipe.settings import Settings
from tests.kafka_tools import read_topic

REPO = Path(__file__).resolve().parent.parent
SECRET = Settings().webhook_secret.get_secret_value()  # what the ingress and the CLI both default to

# Registers the commands on the real app unless sentpipe/cli.py already does, then runs the real entry point.
CLI_SCRIPT = (
    "from sentpipe.cli import app, main\n"
    "from sentpipe.cli_send import send_command, trigger_command\n"
    "if 'send' not in {c.name for c in app.registered_commands}:\n"
    "    app.command('send')(send_command)\n"
    "    app.command('trigger')(trigger_command)\n"
    "main()\n"
)


async def sentpipe_process(*args: str, stdin: bool = False, **kwargs: Any) -> asyncio.subprocess.Process:
    """`sentpipe ARGS` as a child process run from the repository, its output piped (its input too with
    `stdin`); `kwargs` go to `asyncio.create_subprocess_exec` (env, preexec_fn, another stdout)."""
    pipes = {"stdout": asyncio.subprocess.PIPE, "stderr": asyncio.subprocess.PIPE}
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CLI_SCRIPT,
        *args,
        cwd=REPO,
        stdin=asyncio.subprocess.PIPE if stdin else None,
        **{**pipes, **kwargs},
    )


def _standard_headers(headers: dict[str, str]) -> dict[str, str]:
    """Sent's x-webhook-* names as the public library spells them."""
    return {k.removeprefix("x-"): v for k, v in headers.items() if k.startswith("x-webhook-")}


def _plan(
    n: int = 30, seed: int = 1, duplicates: float = 0.0, shuffle: bool = False
) -> tuple[list[Sample], list[Delivery]]:
    samples = SampleFactory(seed).mix(n, "mixed")
    return samples, plan_deliveries(samples, duplicates, shuffle, random.Random(seed))


# --- signing -------------------------------------------------------------------------------------------


def test_signatures_verify_with_standardwebhooks_and_the_project_verifier() -> None:
    _, deliveries = _plan(20)
    signer = Signer(SECRET)
    verifier = Verifier([SECRET], tolerance_s=300)
    for d in deliveries:
        headers = signer.headers(d)
        assert re.fullmatch(r"msg_[0-9a-f]{32}", headers["x-webhook-id"])
        assert headers["x-webhook-event-type"] == (
            "templates" if d.type is EventType.TEMPLATE_APPROVAL else "messages"
        )
        assert Webhook(SECRET).verify(d.body, _standard_headers(headers)) == orjson.loads(d.body)
        verified = verifier.verify(headers, d.body, time.time())
        assert verified.webhook_id == d.webhook_id


async def test_repeated_secrets_sign_as_sent_does_while_a_secret_is_rotated(stub: Stub) -> None:
    """One signature a secret, space-separated: a receiver that knows either one accepts the delivery. The
    option took only the last secret, so the header Sent sends during a rotation could not be made."""
    new = "whsec_" + base64.b64encode(b"the-secret-rotated-in").decode()
    ran = await cli("send", stub.url, "--count", "3", "--secret", new, "--secret", SECRET)
    assert ran.returncode == 0, ran
    for hit in stub.hits:
        assert [entry[:3] for entry in hit.headers["x-webhook-signature"].split(" ")] == ["v1,", "v1,"]
        for known in (new, SECRET):  # the receiver before the rotation, and after it
            Webhook(known).verify(hit.body, _standard_headers(hit.headers))
            Verifier([known], tolerance_s=300).verify(hit.headers, hit.body, time.time())
    with pytest.raises(SignatureError):  # and only those two: a third secret matches neither signature
        other = "whsec_" + base64.b64encode(b"neither").decode()
        Verifier([other], tolerance_s=300).verify(stub.hits[0].headers, stub.hits[0].body, time.time())


@pytest.mark.parametrize(
    ("mode", "reason", "library_says"),
    [
        (SigningMode.BAD_SIGNATURE, Reason.INVALID_SIGNATURE, "No matching signature"),
        (SigningMode.STALE, Reason.STALE_TIMESTAMP, "too old"),
    ],
)
def test_negative_modes_fail_verification_for_the_intended_reason(
    mode: SigningMode, reason: Reason, library_says: str
) -> None:
    _, (d, *_) = _plan(3)
    headers = Signer(SECRET, mode).headers(d)
    with pytest.raises(WebhookVerificationError, match=library_says):
        Webhook(SECRET).verify(d.body, _standard_headers(headers))
    with pytest.raises(SignatureError) as info:
        Verifier([SECRET], tolerance_s=300).verify(headers, d.body, time.time())
    assert info.value.reason is reason


def test_a_broken_secret_is_refused_before_anything_is_signed() -> None:
    with pytest.raises(ValueError, match="base64"):
        Signer("whsec_***")
    # Not ASCII: base64 raised its own "string argument should contain only ASCII characters", naming
    # neither the secret nor the setting.
    with pytest.raises(ValueError, match=r"^webhook secret is not valid base64"):
        Signer("whsec_S\u00fcper")


# --- planning ------------------------------------------------------------------------------------------


def test_duplicates_repeat_the_identical_body_later_as_new_deliveries() -> None:
    samples, deliveries = _plan(40, duplicates=0.25)
    originals = [d for d in deliveries if not d.duplicate]
    dups = [d for d in deliveries if d.duplicate]
    assert [d.body for d in originals] == [s.body for s in samples]
    assert len(dups) == 10
    assert len({d.webhook_id for d in deliveries}) == len(deliveries)  # each a delivery of its own
    for dup in dups:
        first = next(i for i, d in enumerate(deliveries) if d.body == dup.body and not d.duplicate)
        assert deliveries.index(dup) > first
        assert dup.index == deliveries[first].index
    assert Counter(d.body for d in deliveries) == Counter([s.body for s in samples] + [d.body for d in dups])


def test_shuffle_reorders_events_only_within_their_message_or_template() -> None:
    factory = SampleFactory(5)
    samples = generate(factory, ROUTED_TYPES, "sent", 200)
    deliveries = plan_deliveries(samples, 0.0, True, random.Random(5))
    assert sorted(d.index for d in deliveries) == list(range(len(samples)))

    def subject(i: int) -> str | None:
        payload = samples[i].doc["payload"]
        if samples[i].type is EventType.MESSAGE_INBOUND:
            return None
        return str(payload.get("message_id") or payload["template_id"])

    moved_subjects = 0
    groups: dict[str, list[int]] = {}
    for position, d in enumerate(deliveries):
        if subject(d.index) is None:
            assert d.index == position  # inbound events have no sequence: they stay put
        else:
            assert subject(d.index) == subject(position)  # a slot keeps its subject
            groups.setdefault(str(subject(d.index)), []).append(d.index)
    for indices in groups.values():
        if len(indices) > 1:
            assert indices != sorted(indices)
            moved_subjects += 1
    assert moved_subjects > 10


def test_a_seed_reproduces_the_whole_plan() -> None:
    def plan(seed: int) -> list[tuple[str, bytes, bool]]:
        samples = generate(SampleFactory(seed), ROUTED_TYPES, "mixed", 50)
        return [
            (d.webhook_id, d.body, d.duplicate)
            for d in plan_deliveries(samples, 0.3, True, random.Random(seed))
        ]

    assert plan(9) == plan(9)
    assert plan(9) != plan(10)


def test_generate_keeps_to_the_chosen_types_and_shape() -> None:
    samples = generate(SampleFactory(2), (EventType.TEMPLATE_APPROVAL,), "guide", 25)
    assert len(samples) == 25
    assert {s.type for s in samples} == {EventType.TEMPLATE_APPROVAL}
    assert all(s.doc["event"]["type"] == "template.approval.updated" for s in samples)


def test_events_are_made_as_they_are_taken() -> None:
    # A billion events: made whole first, this would run out of memory long before the first is taken.
    lazy = plan_stream(
        iter_events(SampleFactory(3), ROUTED_TYPES, "mixed", 10**9), 0.5, True, random.Random(3)
    )
    t0 = time.monotonic()
    first = list(itertools.islice(lazy, 25_000))  # across plan windows
    assert len(first) == 25_000 and time.monotonic() - t0 < 20
    assert generate(SampleFactory(4), ROUTED_TYPES, "sent", 333) == list(
        iter_events(SampleFactory(4), ROUTED_TYPES, "sent", 333)
    )


@pytest.mark.parametrize("window", [1, 7, 40, 1000])
def test_a_plan_made_in_windows_keeps_every_event_duplicate_and_order_rule(window: int) -> None:
    samples = SampleFactory(6).mix(120, "mixed")[:120]
    deliveries = list(plan_stream(samples, 0.3, True, random.Random(6), window=window))
    originals = [d for d in deliveries if not d.duplicate]
    assert len(deliveries) == planned_deliveries(120, 0.3) == 120 + 36
    assert sorted(d.index for d in originals) == list(range(120))
    assert [d.body for d in deliveries if not d.duplicate] == [samples[d.index].body for d in originals]
    for position, d in enumerate(deliveries):
        if d.duplicate:
            assert any(o.index == d.index and not o.duplicate for o in deliveries[:position])
    windows = [d.index // window for d in deliveries]
    assert windows == sorted(windows)  # nothing, shuffled or delivered again, leaves its window
    whole = plan_deliveries(samples, 0.3, True, random.Random(6))
    if window >= 120:  # one window is the whole-run plan, exactly
        assert deliveries == whole


async def test_deliver_takes_a_lazy_plan_and_counts_as_it_goes(stub: Stub) -> None:
    samples = SampleFactory(7).mix(40)[:40]
    lazy = plan_stream(iter(samples), 0.25, False, random.Random(7), window=16)
    seen: list[Stats] = []
    stats = await deliver(stub.url, lazy, SECRET, total=50, on_update=lambda st: seen.append(copy(st)))
    assert (stats.total, stats.sent, stats.duplicates, stats.accepted) == (50, 50, 10, 50)
    assert seen[0].total == 50  # progress knows the end from the start
    assert len(stub.hits) == 50


def test_a_status_must_be_one_the_type_has() -> None:
    assert parse_status(EventType.MESSAGE_STATUS, "DELIVERED") == "delivered"
    assert parse_status(EventType.TEMPLATE_APPROVAL, "paused") == "paused"
    assert parse_status(EventType.MESSAGE_INBOUND, None) is None
    with pytest.raises(
        ValueError, match=re.escape("--status for message.status.updated must be one of queued")
    ):
        parse_status(EventType.MESSAGE_STATUS, "bogus")
    with pytest.raises(ValueError, match="approved"):
        parse_status(EventType.TEMPLATE_APPROVAL, "delivered")
    with pytest.raises(ValueError, match=re.escape("--status does not apply to message.inbound.received")):
        parse_status(EventType.MESSAGE_INBOUND, "delivered")


def test_plan_refuses_a_fraction_outside_0_to_1() -> None:
    with pytest.raises(ValueError):
        plan_deliveries([], 1.5, False, random.Random(0))


def test_unknown_type_names_the_valid_ones() -> None:
    assert parse_types([]) == ROUTED_TYPES
    with pytest.raises(ValueError, match=re.escape(", ".join(t.value for t in ROUTED_TYPES))):
        parse_types(["message.delivered"])


def test_jsonl_keeps_bytes_and_reports_bad_lines_by_number() -> None:
    good = b'{"field": "templates", "payload": {"template_id": "t", "status": "approved"}}'
    # Numbers no double holds are JSON, and the pipeline keeps them digit for digit: sent like any other.
    huge = b'{"anything": 1e400, "tiny": 1e-400, "long": 123456789012345678901234567890}'
    lines = [good + b"\n", b"\n", b"{not json\n", b"[1, 2]\n", b'{"anything": 1}\r\n', huge + b"\n"]
    with pytest.raises(BadLine, match="line 3: not valid JSON"):
        list(read_jsonl(lines, skip_bad=False))
    items = list(read_jsonl(lines, skip_bad=True))
    assert [i.line_no for i in items if isinstance(i, BadLine)] == [3, 4]
    samples = [i for i in items if not isinstance(i, BadLine)]
    assert [s.body for s in samples] == [good, b'{"anything": 1}', huge]  # exact bytes: the id is their hash
    assert [s.type for s in samples] == [EventType.TEMPLATE_APPROVAL, EventType.UNROUTED, EventType.UNROUTED]


def test_events_without_a_seed_are_stamped_when_they_are_made() -> None:
    """The sample clock advanced 5 ms to 2 s per event: a thousand events were stamped up to 17 minutes
    ahead of their arrival."""
    before = time.time()
    made = [frame(smp.body, webhook_id=None) for smp in SampleFactory().mix(1000)]
    after = time.time()
    stamps = [f.read.occurred_at.timestamp() for f in made if f.read.occurred_at is not None]
    assert len(stamps) == len(made)
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)  # each after the one before
    assert before - 0.001 <= stamps[0] and stamps[-1] <= after + 1.0  # 1 ms apart at least
    # Seeded: the seed's own clock, the same bodies again.
    assert [x.body for x in SampleFactory(7).mix(20)] == [x.body for x in SampleFactory(7).mix(20)]


def test_retry_schedule_parsing() -> None:
    assert SENT_RETRY_SCHEDULE == (1, 2, 4, 8, 16, 32, 64)
    assert parse_schedule("0.01, 0.02") == (0.01, 0.02)
    for bad in ("", "a,b", "-1", "nan"):
        with pytest.raises(ValueError):
            parse_schedule(bad)


# --- the engine against stub receivers -----------------------------------------------------------------


@dataclass
class Hit:
    at: float
    headers: dict[str, str]
    body: bytes


@dataclass
class Stub:
    """A receiver whose answer to the n-th request (1-based) is decided by `answer`."""

    answer: Callable[[int], Awaitable[int] | int] = lambda n: 200
    hits: list[Hit] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.hits.append(Hit(asyncio.get_running_loop().time(), dict(request.headers), await request.read()))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            status = self.answer(len(self.hits))
            if not isinstance(status, int):
                status = await status
        finally:
            self.in_flight -= 1
        return web.json_response({"status": status}, status=status)


@pytest.fixture
async def stub() -> AsyncIterator[Stub]:
    s = Stub()
    app = web.Application()
    app.router.add_post("/webhooks/sent", s.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    s.url = f"http://127.0.0.1:{server.port}/webhooks/sent"
    yield s
    await server.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_retries_follow_the_schedule_with_the_same_id_and_fresh_signatures(stub: Stub) -> None:
    failures = 3
    stub.answer = lambda n: 503 if n <= failures else 200
    schedule = (0.05, 0.1, 0.2, 0.4)
    # A clock that jumps 1000 s per reading shows each attempt is signed with a timestamp of its own.
    clock = itertools.count(1_700_000_000, 1000).__next__
    _, deliveries = _plan(1)
    stats = await deliver(stub.url, deliveries[:1], SECRET, schedule=schedule, clock=clock)

    assert (stats.sent, stats.accepted, stats.retried, stats.done) == (1, 1, failures, 1)
    assert len(stub.hits) == failures + 1
    assert {h.headers["x-webhook-id"] for h in stub.hits} == {deliveries[0].webhook_id}
    stamps = [int(h.headers["x-webhook-timestamp"]) for h in stub.hits]
    assert stamps == sorted(set(stamps))
    for hit, stamp in zip(stub.hits, stamps, strict=True):
        assert hit.body == deliveries[0].body
        Verifier([SECRET], tolerance_s=1).verify(hit.headers, hit.body, now=stamp)
    gaps = [b.at - a.at for a, b in itertools.pairwise(stub.hits)]
    # Only lower bounds and ordering: how late a loaded machine wakes up is not the sender's behaviour.
    for gap, delay in zip(gaps, schedule, strict=False):
        assert gap >= delay - 0.002
    assert gaps == sorted(gaps)


async def test_a_delivery_fails_after_the_last_retry(stub: Stub) -> None:
    stub.answer = lambda n: 503
    _, deliveries = _plan(1)
    outcomes: list[Outcome] = []
    stats = await deliver(stub.url, deliveries[:1], SECRET, schedule=(0.01, 0.02), on_outcome=outcomes.append)
    assert len(stub.hits) == 3
    assert (stats.accepted, stats.retried, stats.not_accepted) == (0, 2, 1)
    assert stats.rejected == Counter({"503": 1})
    assert [a.status for a in outcomes[0].attempts] == [503, 503, 503]


async def test_deliveries_waiting_for_a_retry_are_bounded_so_a_dead_receiver_cannot_grow_the_sender(
    stub: Stub,
) -> None:
    """Waiting for a retry holds no request slot, and nothing else bounded it: against a receiver that had
    gone down, every delivery of the run was started and parked (6.5 kB each: gigabytes for a million)."""

    def first_refused_retry_accepted(n: int) -> int:
        this = stub.hits[-1].headers["x-webhook-id"]
        return 503 if [h.headers["x-webhook-id"] for h in stub.hits].count(this) == 1 else 200

    stub.answer = first_refused_retry_accepted
    _, deliveries = _plan(10)
    stats = await deliver(stub.url, deliveries, SECRET, schedule=(0.5,), concurrency=1, max_unfinished=3)
    assert (stats.accepted, stats.retried, len(stub.hits)) == (10, 10, 20)
    unfinished: set[str] = set()
    most = 0
    for hit in stub.hits:
        webhook_id = hit.headers["x-webhook-id"]
        if webhook_id in unfinished:
            unfinished.discard(webhook_id)  # its retry, accepted
        else:
            unfinished.add(webhook_id)
        most = max(most, len(unfinished))
    assert most == 3


@pytest.mark.parametrize("status", [204, 299])
async def test_any_2xx_is_accepted_at_once(stub: Stub, status: int) -> None:
    stub.answer = lambda n: status
    _, deliveries = _plan(1)
    stats = await deliver(stub.url, deliveries[:1], SECRET, schedule=(0.01, 0.01))
    assert (len(stub.hits), stats.accepted, stats.retried) == (1, 1, 0)


@pytest.mark.parametrize("status", [400, 401, 404, 413, 422, 300])
async def test_every_other_answer_is_retried_as_sent_retries_it(stub: Stub, status: int) -> None:
    """sent-webhooks.md: a non-2xx answer makes Sent retry; a 4xx counts towards auto-disable like a 5xx."""
    stub.answer = lambda n: status
    _, deliveries = _plan(1)
    stats = await deliver(stub.url, deliveries[:1], SECRET, schedule=(0.01, 0.01))
    assert len(stub.hits) == 3
    assert (stats.retried, stats.rejected) == (2, Counter({str(status): 1}))


async def test_a_redirect_is_an_answer_and_is_not_followed() -> None:
    """Following it would post the signed event to wherever the Location points."""
    elsewhere: list[bytes] = []
    asked: list[bytes] = []

    async def moved(request: web.Request) -> web.Response:
        asked.append(await request.read())
        raise web.HTTPTemporaryRedirect("/elsewhere")

    async def other(request: web.Request) -> web.Response:
        elsewhere.append(await request.read())
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/webhooks/sent", moved)
    app.router.add_post("/elsewhere", other)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        _, deliveries = _plan(1)
        url = f"http://127.0.0.1:{server.port}/webhooks/sent"
        stats = await deliver(url, deliveries[:1], SECRET, schedule=(0.01,))
    finally:
        await server.close()
    assert (len(asked), elsewhere) == (2, [])
    assert (stats.accepted, stats.rejected) == (0, Counter({"307": 1}))


async def test_a_timeout_is_retried(stub: Stub) -> None:
    release = asyncio.Event()

    async def first_hangs(n: int) -> int:
        if n == 1:
            await release.wait()
        return 200

    stub.answer = first_hangs
    _, deliveries = _plan(1)
    outcomes: list[Outcome] = []
    try:
        stats = await deliver(
            stub.url, deliveries[:1], SECRET, schedule=(0.01,), timeout_s=0.2, on_outcome=outcomes.append
        )
    finally:
        release.set()
    assert [a.outcome for a in outcomes[0].attempts] == ["timeout", "200"]
    assert (stats.accepted, stats.retried) == (1, 1)


async def test_connection_errors_are_retried_then_reported() -> None:
    url = f"http://127.0.0.1:{free_port()}/webhooks/sent"
    _, deliveries = _plan(2)
    outcomes: list[Outcome] = []
    stats = await deliver(url, deliveries[:2], SECRET, schedule=(0.01,), on_outcome=outcomes.append)
    assert stats.rejected == Counter({"connection error": 2})
    assert all(len(o.attempts) == 2 for o in outcomes)
    with pytest.raises(Unreachable, match=url):
        await probe(url)


async def test_concurrency_bounds_requests_in_flight(stub: Stub) -> None:
    total, concurrency = 12, 3
    changed = asyncio.Condition()
    answered = 0

    async def when_all_allowed_are_in(n: int) -> int:
        # Each request is held until as many as the sender may send at once are in flight (or all that
        # remain): a sender that keeps fewer in flight never gets an answer, one that sends more is seen.
        nonlocal answered
        async with changed:
            changed.notify_all()
            await asyncio.wait_for(
                changed.wait_for(lambda: stub.in_flight >= min(concurrency, total - answered)), 30
            )
            answered += 1
        return 200

    stub.answer = when_all_allowed_are_in
    _, deliveries = _plan(total)
    stats = await deliver(stub.url, deliveries, SECRET, concurrency=concurrency)
    assert stats.accepted == total
    assert stub.max_in_flight == concurrency


async def test_rate_paces_first_attempts(stub: Stub) -> None:
    _, deliveries = _plan(6)
    rate = 50.0
    stats = await deliver(stub.url, deliveries, SECRET, rate=rate)
    assert stats.accepted == 6
    # Measured where they arrive: the first one also paid for opening the connection, so a loaded machine
    # can bring the others closer to it by a few ms. One interval of slack covers that; unpaced, all six
    # would arrive within a few ms of each other and this fails from the third on.
    start = stub.hits[0].at
    for i, hit in enumerate(stub.hits[1:], start=1):
        assert hit.at - start >= (i - 1) / rate


async def test_rate_paces_from_the_first_delivery_in_hand(stub: Stub) -> None:
    """Paced from before the session opened and the first plan window was made (a quarter second for
    10,000 events), every delivery due meanwhile went out at once: 476 in the first 100 ms at 1,000/s."""
    _, made = _plan(6)

    def slow_to_start() -> Iterator[Delivery]:
        time.sleep(0.3)  # the first window's planning, in the sender's thread
        yield from made

    rate = 50.0
    stats = await deliver(stub.url, slow_to_start(), SECRET, rate=rate, total=len(made))
    assert stats.accepted == len(made)
    start = stub.hits[0].at
    for i, hit in enumerate(stub.hits[1:], start=1):
        assert hit.at - start >= (i - 1) / rate  # as above; from the start, all came in the first 20 ms


async def test_an_answer_in_chunks_is_kept_whole() -> None:
    async def chunked(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(status=500)
        await resp.prepare(request)
        await resp.write(b"first,")
        await asyncio.sleep(0.3)
        await resp.write(b"second")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/webhooks/sent", chunked)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        _, deliveries = _plan(1)
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{server.port}/webhooks/sent"
            attempt = await post_once(session, url, deliveries[0], Signer(SECRET), 1)
    finally:
        await server.close()
    assert (attempt.status, attempt.body) == (500, b"first,second")


@pytest.mark.parametrize(
    ("answer", "outcome"),
    [
        (b"HELLO, THIS IS NOT HTTP\r\n\r\n", "malformed answer"),
        (b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"status":', "answer cut short"),
    ],
)
async def test_an_answer_that_is_not_whole_http_is_named_for_the_user(answer: bytes, outcome: str) -> None:
    """The summary's rows read "rejected ClientResponseError" and "rejected ClientPayloadError"."""

    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = re.search(rb"(?i)content-length: *(\d+)", head)
        await reader.readexactly(int(length[1]) if length else 0)
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(reply, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        _, deliveries = _plan(1)
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{port}/webhooks/sent"
            attempt = await post_once(session, url, deliveries[0], Signer(SECRET), 1)
    finally:
        server.close()
        await server.wait_closed()
    assert (attempt.status, attempt.outcome, attempt.accepted) == (None, outcome, False)


def self_signed(where: Path) -> ssl.SSLContext:
    """A server's TLS context with a certificate no system trusts."""
    key, cert = where / "key.pem", where / "cert.pem"
    subject = ["-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)]
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", *subject],
        check=True,
        capture_output=True,
    )
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    return tls


async def test_a_certificate_the_system_does_not_trust_is_a_one_line_error(tmp_path: Path) -> None:
    """It was a "connection error" retried for two minutes per delivery (the probe only opened TCP)."""
    tls = self_signed(tmp_path)

    async def accept(_: web.Request) -> web.Response:
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/webhooks/sent", accept)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server(ssl=tls)
    try:
        url = f"https://127.0.0.1:{server.port}/webhooks/sent"
        send, one = await asyncio.gather(
            cli("send", url, "--count", "2"), cli("trigger", "message.status.updated", url)
        )
    finally:
        await server.close()
    for ran in (send, one):
        line = one_line_error(ran)
        assert "TLS handshake" in line and "certificate" in line, line


# --- against the real ingress and broker ---------------------------------------------------------------


@pytest.fixture
def webhook_url(ingress: str) -> str:
    return f"{ingress}/webhooks/sent"


@pytest.mark.service
async def test_events_are_accepted_and_land_on_the_raw_topic_with_their_duplicates(
    webhook_url: str, settings: Settings, topics: Topics
) -> None:
    _, deliveries = _plan(60, seed=3, duplicates=0.2, shuffle=True)
    outcomes: list[Outcome] = []
    stats = await deliver(webhook_url, deliveries, SECRET, schedule=(0.05, 0.1), on_outcome=outcomes.append)
    assert {o.final.status for o in outcomes} == {200}
    assert stats.accepted == len(deliveries) == 60 + 12
    assert stats.duplicates == 12
    records = read_topic(settings.kafka_bootstrap, topics.raw, at_least=len(deliveries))
    assert len(records) == 60 + 12
    assert Counter(r.value for r in records) == Counter(d.body for d in deliveries)


@pytest.mark.service
async def test_tenant_paths_reach_the_tenant_or_answer_401(webhook_url: str) -> None:
    _, deliveries = _plan(2)
    ok = await deliver(f"{webhook_url}/{Settings().default_tenant}", deliveries[:1], SECRET, schedule=(0.01,))
    assert ok.accepted == 1
    # An unknown tenant is answered like a bad signature (tenant names are not probeable), and retried as
    # Sent would retry it.
    missing = await deliver(f"{webhook_url}/no-such-tenant", deliveries[1:2], SECRET, schedule=(0.01,))
    assert missing.rejected == Counter({"401": 1}) and missing.retried == 1


@pytest.mark.service
@pytest.mark.parametrize(
    ("mode", "reason"),
    [(SigningMode.BAD_SIGNATURE, "invalid_signature"), (SigningMode.STALE, "stale_timestamp")],
)
async def test_negative_modes_are_rejected_by_the_ingress_and_store_nothing(
    webhook_url: str, settings: Settings, topics: Topics, mode: SigningMode, reason: str
) -> None:
    _, deliveries = _plan(5)
    outcomes: list[Outcome] = []
    stats = await deliver(
        webhook_url, deliveries, SECRET, schedule=(0.01,), mode=mode, on_outcome=outcomes.append
    )
    assert stats.accepted == 0 and stats.retried == 0  # a rejection is what these modes want: not retried
    assert stats.rejected == Counter({"401": 5})
    assert {orjson.loads(o.final.body)["error"] for o in outcomes} == {reason}
    # The 401s came after any produce would have been acknowledged: the watermarks are final.
    assert read_topic(settings.kafka_bootstrap, topics.raw) == []


# --- the commands --------------------------------------------------------------------------------------


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


async def cli(*args: str, env: dict[str, str] | None = None) -> Ran:
    """The CLI in a subprocess without blocking the loop, so in-process servers keep answering."""
    proc = await sentpipe_process(
        *args,
        env={**os.environ, **(env or {})},
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 120)
    except TimeoutError:
        proc.kill()  # never left behind: one that hung here once burned a core for the rest of the run
        await proc.wait()
        raise
    assert proc.returncode is not None
    return Ran(proc.returncode, out.decode(), err.decode())


def row(stdout: str, name: str) -> str:
    """A value from the summary table."""
    match = re.search(rf"│ {re.escape(name)}\s*│ ([^│]*?)\s*│", stdout)
    assert match, stdout
    return match.group(1)


def one_line_error(ran: Ran) -> str:
    assert ran.returncode != 0, ran
    assert "Traceback" not in ran.stderr
    lines = ran.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), ran.stderr
    return lines[0]


@pytest.mark.service
async def test_send_command_delivers_to_the_ingress(
    webhook_url: str, settings: Settings, topics: Topics
) -> None:
    args = ["--count", "20", "--duplicates", "0.25", "--shuffle", "--shape", "mixed", "--seed", "4"]
    ran = await cli("send", webhook_url, *args, "--retry-schedule", "0.05")
    assert ran.returncode == 0, ran
    assert (row(ran.stdout, "events"), row(ran.stdout, "sent"), row(ran.stdout, "accepted")) == (
        "20",
        "25",
        "25",
    )
    assert row(ran.stdout, "rejected") == "0"
    assert row(ran.stdout, "latency p99").endswith(" ms")
    assert len(read_topic(settings.kafka_bootstrap, topics.raw, at_least=25)) == 25


@pytest.mark.service
async def test_send_command_negative_mode_succeeds_when_everything_is_rejected(webhook_url: str) -> None:
    ran = await cli("send", webhook_url, "--count", "5", "--bad-signature")
    assert ran.returncode == 0, ran
    assert row(ran.stdout, "rejected 401") == "5"


@pytest.mark.service
async def test_trigger_prints_the_event_and_the_answer(webhook_url: str) -> None:
    ran = await cli("trigger", "message.inbound.received", webhook_url, "--shape", "guide")
    assert ran.returncode == 0, ran
    event_json, answer = ran.stdout.split("POST ", 1)
    assert orjson.loads(event_json)["event"]["type"] == "message.inbound.received"
    assert "HTTP 200" in answer and '"status": "accepted"' in answer


async def test_send_command_exits_non_zero_when_events_are_not_accepted(stub: Stub) -> None:
    stub.answer = lambda n: 503
    ran = await cli("send", stub.url, "--count", "6", "--retry-schedule", "0.01")
    assert (row(ran.stdout, "rejected 503"), row(ran.stdout, "retried")) == ("6", "6")
    assert "6 of 6 deliveries were not accepted" in one_line_error(ran)


async def test_a_negative_mode_fails_unless_every_delivery_is_refused_with_401(stub: Stub) -> None:
    """A receiver answering 500 (or nothing) to everything passed `--bad-signature` and `--stale`: only an
    accepted delivery failed them."""
    stub.answer = lambda n: 500 if n % 2 else 401
    broken, stale = await asyncio.gather(
        cli("send", stub.url, "--count", "4", "--bad-signature"),
        cli("send", stub.url, "--count", "4", "--stale"),
    )
    assert "were not refused with 401 (500: " in one_line_error(broken)
    assert "--bad-signature" in one_line_error(broken)
    assert "--stale" in one_line_error(stale)
    stub.answer = lambda n: 401
    assert (await cli("send", stub.url, "--count", "3", "--bad-signature")).returncode == 0


async def test_a_secret_that_is_not_utf8_is_refused_without_showing_it() -> None:
    url = f"http://127.0.0.1:{free_port()}/webhooks/sent"
    # A byte that is not UTF-8 reaches Python as a surrogate escape, as from a shell.
    secret = "whsec_SuperSecret" + "\udcff"
    runs = await asyncio.gather(
        cli("send", url, "--secret", secret),
        cli("trigger", "message.status.updated", url, "--secret", secret),
    )
    for ran in runs:
        assert ran.returncode != 0 and "Traceback" not in ran.stderr
        assert "SuperSecret" not in ran.stdout + ran.stderr, ran.stderr
        assert "not valid UTF-8" in ran.stderr


def test_a_tenant_goes_onto_the_path_not_after_the_query() -> None:
    s = Settings()
    assert _resolve_target("http://h/webhooks/sent?x=1", "acme", s) == "http://h/webhooks/sent/acme?x=1"
    assert _resolve_target("http://h/webhooks/sent/", "a b", s) == "http://h/webhooks/sent/a%20b"
    assert _resolve_target("http://h/webhooks/sent", None, s) == "http://h/webhooks/sent"


async def test_skip_mode_sends_the_good_lines(stub: Stub, tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    lines = [s.body for s in SampleFactory(8).mix(4)]
    events.write_bytes(b"\n".join([lines[0], b"{oops", *lines[1:]]) + b"\n")
    ran = await cli("send", stub.url, "--file", str(events), "--on-bad-line", "skip")
    assert ran.returncode == 0, ran
    assert "line 2" in ran.stderr
    assert sorted(h.body for h in stub.hits) == sorted(lines)


async def test_an_unrouted_line_s_field_never_reaches_a_header_as_it_is(stub: Stub, tmp_path: Path) -> None:
    """A line without a known envelope sent its own `field` as x-webhook-event-type: a control character in it
    ended the whole run with `error: ValueError: Forbidden control character...`, no summary, the other lines'
    outcomes lost. Sent only ever puts `messages` or `templates` there."""
    events = tmp_path / "events.jsonl"
    good = [s.body for s in SampleFactory(9).mix(3)]
    odd = [b'{"field": "a\\nb"}', b'{"field": "templates"}', b'{"field": "x" }']
    events.write_bytes(b"\n".join([good[0], *odd, *good[1:]]) + b"\n")
    ran = await cli("send", stub.url, "--file", str(events))
    assert ran.returncode == 0 and "Traceback" not in ran.stderr, ran
    assert sorted(h.body for h in stub.hits) == sorted([*good, *odd])
    kinds = {h.body: h.headers["x-webhook-event-type"] for h in stub.hits}
    assert [kinds[b] for b in odd] == ["messages", "templates", "messages"]


async def test_a_file_is_streamed_and_a_line_without_end_is_refused_not_read_whole(
    stub: Stub, tmp_path: Path
) -> None:
    """`--file` used to hold every line, parsed, before sending: /dev/zero grew it by gigabytes."""
    events = tmp_path / "events.jsonl"
    lines = [s.body for s in SampleFactory(9).mix(30)]
    events.write_bytes(b"\n".join(lines) + b"\n")
    typed = [b for b in lines if frame(b, webhook_id=None).type is EventType.MESSAGE_INBOUND]
    ran, only_inbound, zero = await asyncio.gather(
        cli("send", stub.url, "--file", str(events), "--count", "7"),
        cli("send", stub.url, "--file", str(events), "--type", "message.inbound.received"),
        cli("send", stub.url, "--file", "/dev/zero"),
    )
    assert ran.returncode == 0 and only_inbound.returncode == 0, (ran, only_inbound)
    assert row(ran.stdout, "events") == "7" and row(only_inbound.stdout, "events") == str(len(typed))
    assert sorted(h.body for h in stub.hits) == sorted(lines[:7] + typed)
    assert "line 1: longer than 16,777,216 bytes" in one_line_error(zero)


async def test_a_file_run_that_failed_says_where_to_resume_and_skip_resumes_there(
    stub: Stub, tmp_path: Path
) -> None:
    """A `--file` run that stopped half way could only be sent again whole: a million events for the last
    few. Its error names the `--skip` that sends the rest from the first event not accepted."""
    events = tmp_path / "events.jsonl"
    lines = [s.body for s in SampleFactory(11).mix(20)]
    events.write_bytes(b"\n".join(lines) + b"\n")
    stub.answer = lambda n: 400 if n == 5 else 200
    one = ("--concurrency", "1", "--no-retry")
    failed = await cli("send", stub.url, "--file", str(events), *one)
    assert "1 of 20 deliveries were not accepted" in one_line_error(failed)
    assert one_line_error(failed).endswith("--skip 4 sends the rest"), failed.stderr
    stub.hits.clear()
    stub.answer = lambda n: 200
    resumed = await cli("send", stub.url, "--file", str(events), "--skip", "4", *one)
    assert resumed.returncode == 0 and row(resumed.stdout, "events") == "16", resumed
    assert [h.body for h in stub.hits] == lines[4:]
    too_far, no_source = await asyncio.gather(
        cli("send", stub.url, "--file", str(events), "--skip", "20"),
        cli("send", stub.url, "--skip", "3"),  # events made anew: a skip would resume nothing
    )
    assert "--skip 20 leaves none of the 20 events" in one_line_error(too_far)
    assert "--skip resumes a run of the same events: it needs --file or --seed" in one_line_error(no_source)


async def test_a_file_without_events_to_send_says_so_not_that_skip_left_none(tmp_path: Path) -> None:
    """An empty file, one of blank lines, or one with no event of the `--type` asked for ended with
    "--skip 0 leaves none of the 0 events", blaming an option that was never given."""
    empty, blank, typed = tmp_path / "empty.jsonl", tmp_path / "blank.jsonl", tmp_path / "typed.jsonl"
    empty.write_bytes(b"")
    blank.write_bytes(b"\n  \n\r\n")
    typed.write_bytes(
        b"\n".join(s.body for s in SampleFactory(12).mix(10) if s.type is not EventType.MESSAGE_STATUS)
        + b"\n"
    )
    url = f"http://127.0.0.1:{free_port()}/webhooks/sent"  # refused before anything is sent
    runs = await asyncio.gather(
        cli("send", url, "--file", str(empty)),
        cli("send", url, "--file", str(blank), "--count", "5"),
        cli("send", url, "--file", str(typed), "--type", "message.status.updated"),
        cli("send", url, "--file", str(typed), "--type", "message.status.updated", "--skip", "2"),
    )
    errors = [one_line_error(r) for r in runs]
    assert errors[0] == f"error: {empty} has no events to send", errors[0]
    assert errors[1] == f"error: {blank} has no events to send", errors[1]
    for e in errors[2:]:
        assert e == f"error: {typed} has no message.status.updated events to send", e


async def test_shape_with_a_file_is_refused_not_ignored(stub: Stub, tmp_path: Path) -> None:
    """A file's lines are sent as they are: `--file f --shape guide` sent them unchanged and exited 0."""
    events = tmp_path / "events.jsonl"
    events.write_bytes(b"\n".join(s.body for s in SampleFactory(13).mix(3)) + b"\n")
    runs = await asyncio.gather(
        cli("send", stub.url, "--file", str(events), "--shape", "guide"),
        cli("send", stub.url, "--file", str(events), "--shape", "sent"),  # given, even if the default
    )
    for ran in runs:
        assert ran.returncode == 1, ran  # as the other options that contradict each other
        assert "--shape" in one_line_error(ran) and "--file" in one_line_error(ran)
    assert stub.hits == []
    assert (await cli("send", stub.url, "--file", str(events))).returncode == 0


async def test_a_file_that_starts_with_a_byte_order_mark_is_sent_without_it(
    stub: Stub, tmp_path: Path
) -> None:
    """Saved by a Windows editor, a file's first line began with a UTF-8 BOM: "line 1: not valid JSON (error
    at column 1)", about a line that looked valid."""
    bodies = [s.body for s in SampleFactory(8).mix(3)]
    events = tmp_path / "events.jsonl"
    events.write_bytes(codecs.BOM_UTF8 + b"\r\n".join(bodies) + b"\r\n")
    ran = await cli("send", stub.url, "--file", str(events), "--concurrency", "1")
    assert ran.returncode == 0, ran
    assert [h.body for h in stub.hits] == bodies  # the first too, byte for byte, the mark left out
    # Only at the start of the file: within a line it is part of the line, and not JSON.
    events.write_bytes(bodies[0] + b"\n" + codecs.BOM_UTF8 + bodies[1] + b"\n")
    assert "line 2: not valid JSON" in one_line_error(await cli("send", stub.url, "--file", str(events)))


async def test_skip_with_a_seed_sends_the_seeds_later_events(stub: Stub) -> None:
    whole = await cli("send", stub.url, "--seed", "3", "--count", "12", "--concurrency", "1")
    bodies = [h.body for h in stub.hits]
    ids = [h.headers["x-webhook-id"] for h in stub.hits]
    stub.hits.clear()
    rest = await cli("send", stub.url, "--seed", "3", "--count", "12", "--skip", "5", "--concurrency", "1")
    assert whole.returncode == 0 and rest.returncode == 0, (whole, rest)
    assert [h.body for h in stub.hits] == bodies[5:]
    # Each event with its own id again: the rest took the ids of events 0-6, which a receiver keying on
    # x-webhook-id (SENTPIPE_EVENT_ID_SOURCE=header) had seen, and it dropped them all as duplicates.
    assert [h.headers["x-webhook-id"] for h in stub.hits] == ids[5:]


def test_an_event_has_one_webhook_id_whatever_else_the_run_sends() -> None:
    def ids(types: tuple[EventType, ...], shuffle: bool) -> dict[bytes, str]:
        samples = generate(SampleFactory(4), types, "sent", 60)
        plan = plan_deliveries(samples, 0.0, shuffle, random.Random(4))
        return {d.body: d.webhook_id for d in plan}

    statuses, templates = (EventType.MESSAGE_STATUS,), (EventType.TEMPLATE_APPROVAL,)
    # Other events, the same seed: no id given to two events (a receiver would take one for the other).
    assert not set(ids(statuses, False).values()) & set(ids(templates, False).values())
    # The same events in another order: each keeps its id.
    assert ids(statuses, True) == ids(statuses, False)


def test_the_accepted_prefix_waits_for_events_out_of_order_and_stops_at_a_failure() -> None:
    stats = Stats()

    def outcome(index: int, status: int, duplicate: bool = False) -> Outcome:
        delivery = Delivery("msg_x", b"{}", "messages", EventType.MESSAGE_STATUS, index, duplicate)
        return Outcome(delivery, (Attempt(1, status, None, 0.001),))

    for index, status in [(1, 200), (2, 200), (0, 500)]:
        stats.record_outcome(outcome(index, status))
    assert stats.accepted_prefix == 0
    stats = Stats()
    for index, status in [(2, 200), (0, 200), (3, 200)]:
        stats.record_outcome(outcome(index, status))
    assert stats.accepted_prefix == 1  # 1 is still out
    stats.record_outcome(outcome(1, 200, duplicate=True))  # a redelivery's outcome is not the event's
    assert stats.accepted_prefix == 1
    stats.record_outcome(outcome(5, 400))
    stats.record_outcome(outcome(6, 200))  # past the failure: kept out
    stats.record_outcome(outcome(1, 200))
    assert stats.accepted_prefix == 4
    stats.record_outcome(outcome(4, 200))
    assert stats.accepted_prefix == 5  # not past 5, which failed


async def test_events_piped_in_are_sent_not_read_twice(stub: Stub) -> None:
    """`--file /dev/stdin` (a pipe, process substitution): the file is checked whole and then read again
    to send it, and a pipe read again is empty. The run sent nothing and exited 0."""
    lines = [s.body for s in SampleFactory(10).mix(12)]
    proc = await sentpipe_process(
        *("send", stub.url, "--file", "/dev/stdin", "--on-bad-line", "skip"),
        stdin=True,
    )
    out, err = await asyncio.wait_for(proc.communicate(b"\n".join([*lines, b"{oops"]) + b"\n"), 120)
    assert proc.returncode == 0, err
    assert "line 13" in err.decode()
    assert row(out.decode(), "accepted") == "12"
    assert sorted(h.body for h in stub.hits) == sorted(lines)


async def test_a_stream_that_does_not_end_is_read_only_up_to_count(stub: Stub) -> None:
    """The whole stream was checked (and copied to disk) before anything was sent, `--count` or not: one
    that does not end (`--file <(yes ...) --count 3`) was read until the disk was full, nothing ever sent."""
    lines = [s.body for s in SampleFactory(12).mix(5)]
    proc = await sentpipe_process(
        *("send", stub.url, "--file", "/dev/stdin", "--count", "3"),
        stdin=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        # Never closed while the command runs: to it, the stream goes on.
        proc.stdin.write(b"\n".join(lines) + b"\n")
        await proc.stdin.drain()
        await asyncio.wait_for(proc.wait(), 60)
        out = await proc.stdout.read()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0
    assert row(out.decode(), "accepted") == "3"
    assert sorted(h.body for h in stub.hits) == sorted(lines[:3])


def _open_files(soft: int, hard: int) -> Callable[[], None]:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return limit


async def test_requests_in_flight_are_not_refused_by_the_open_file_limit(stub: Stub) -> None:
    """Past `ulimit -n` every new connection failed with EMFILE, reported as the receiver's "connection
    error": `--rate`'s 1000 in flight passed the usual 1024. The soft limit is raised as far as the hard one
    lets it, and a `--concurrency` beyond even that is a one-line error."""
    everyone_in = asyncio.Event()

    async def when_all_in_flight(n: int) -> int:
        if stub.in_flight >= 150:
            everyone_in.set()
        await everyone_in.wait()
        return 200

    stub.answer = when_all_in_flight
    args = ("send", stub.url, "--count", "150", "--concurrency", "150", "--no-retry", "--seed", "3")

    async def run(soft: int, hard: int) -> Ran:
        proc = await sentpipe_process(
            *args,
            preexec_fn=_open_files(soft, hard),
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), 120)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.returncode is not None
        return Ran(proc.returncode, out.decode(), err.decode())

    raised = await run(64, 4096)
    assert raised.returncode == 0, raised
    assert row(raised.stdout, "accepted") == "150"
    refused = await run(64, 64)
    assert "--concurrency 150" in one_line_error(refused) and "ulimit -n" in one_line_error(refused)
    assert len(stub.hits) == 150


def _files_in(where: Path) -> list[str]:
    return [p.name for p in where.iterdir()]


async def test_a_sigterm_while_a_stream_is_checked_stops_as_ctrl_c_and_removes_its_copy(
    stub: Stub, tmp_path: Path
) -> None:
    """SIGTERM was turned into Ctrl-C only once sending began: while the events of a stream were still being
    checked (and copied), it ended the process where it stood, status 143, its copy left in $TMPDIR."""
    proc = await sentpipe_process(
        *("send", stub.url, "--file", "/dev/stdin"),
        env={**os.environ, "TMPDIR": str(tmp_path)},
        stdin=True,
    )
    assert proc.stdin is not None
    try:
        # The stream stays open: the check waits for the rest of it, its copy begun.
        proc.stdin.write(SampleFactory(11).mix(1)[0].body + b"\n")
        await proc.stdin.drain()
        for _ in range(1200):
            if _files_in(tmp_path):
                break
            await asyncio.sleep(0.05)
        assert _files_in(tmp_path)
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 130 and err.decode().strip().splitlines()[-1] == "interrupted", err
    assert _files_in(tmp_path) == []
    assert stub.hits == []


def test_an_overlong_line_is_read_past_and_the_next_one_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plan, "MAX_LINE_BYTES", 64)
    good = b'{"field": "templates", "payload": {"template_id": "t", "status": "approved"}}'
    data = io.BytesIO(b'{"a": "' + b"x" * 5000 + b'"}\n' + good + b"\n")
    items = list(read_jsonl(plan._lines(data), skip_bad=True))
    # The good line is 79 bytes with its newline: over 64 too, and still a line of its own.
    assert [str(i) for i in items] == ["line 1: longer than 64 bytes", "line 2: longer than 64 bytes"]
    monkeypatch.setattr(plan, "MAX_LINE_BYTES", 100)
    data.seek(0)
    items = list(read_jsonl(plan._lines(data), skip_bad=True))
    assert [i.body for i in items if not isinstance(i, BadLine)] == [good]


async def test_a_tenant_without_a_secret_or_an_empty_option_is_refused_not_signed_with_the_default(
    tmp_path: Path,
) -> None:
    """`--tenant acme` with no secret for acme used to sign with the default tenant's secret: a test of a
    tenant that does not exist, passing as if it did (or failing with a 401 nobody could explain)."""
    secrets = tmp_path / "secrets.json"
    secrets.write_bytes(b'{"globex": "whsec_' + b"g" * 32 + b'"}')
    env = {"SENTPIPE_SECRETS_FILE": str(secrets)}
    url = f"http://127.0.0.1:{free_port()}/webhooks/sent"
    runs = await asyncio.gather(
        cli("send", url, "--tenant", "acme", env=env),
        cli("trigger", "message.status.updated", url, "--tenant", "acme", env=env),
        cli("send", url, "--secret", "", env=env),
        cli("send", url, "--tenant", "", env=env),
        cli("send", url, "--tenant", "globex", env=env),  # has a secret: gets as far as the network
    )
    errors = [one_line_error(r) for r in runs]
    for e in errors[:2]:
        assert "tenant 'acme' has no secret in SENTPIPE_SECRETS_FILE" in e
    assert "--secret is empty" in errors[2] and "--tenant is empty" in errors[3]
    assert "cannot reach" in errors[4]


async def test_an_unusable_secret_is_refused_naming_where_it_came_from(tmp_path: Path) -> None:
    """An error that said only "webhook secret is not valid base64" left the user to guess between --secret,
    SENTPIPE_WEBHOOK_SECRET and the secrets file; the ingress names the setting at start, and so do these."""
    secrets = tmp_path / "secrets.json"
    secrets.write_bytes(b'{"acme": ["whsec_!!"]}')
    url = f"http://127.0.0.1:{free_port()}/webhooks/sent"
    runs = await asyncio.gather(
        cli("send", url, "--secret", "whsec_", env={}),
        cli("send", url, env={"SENTPIPE_WEBHOOK_SECRET": "whsec_"}),
        cli("trigger", "message.status.updated", url, env={"SENTPIPE_WEBHOOK_SECRET": "whsec_"}),
        cli("send", url, "--tenant", "acme", env={"SENTPIPE_SECRETS_FILE": str(secrets)}),
    )
    errors = [one_line_error(r) for r in runs]
    assert errors[0] == "error: --secret: webhook secret has nothing after 'whsec_'", errors[0]
    for e in errors[1:3]:
        assert e == "error: SENTPIPE_WEBHOOK_SECRET: webhook secret has nothing after 'whsec_'", e
    from_file = "error: SENTPIPE_SECRETS_FILE, tenant 'acme': webhook secret is not valid base64"
    assert errors[3].startswith(from_file), errors


async def test_a_tenant_whose_secrets_file_entry_lists_no_secret_is_refused_by_name(tmp_path: Path) -> None:
    """`{"acme": []}` (every secret rotated out): the README says the tenant's first secret signs, and there
    is none; send and trigger said `IndexError: list index out of range`, naming neither tenant nor file."""
    secrets = tmp_path / "secrets.json"
    secrets.write_bytes(b'{"acme": []}')
    env = {"SENTPIPE_SECRETS_FILE": str(secrets)}
    url = f"http://127.0.0.1:{free_port()}/webhooks/sent"
    runs = await asyncio.gather(
        cli("send", url, "--tenant", "acme", env=env),
        cli("trigger", "message.status.updated", url, "--tenant", "acme", env=env),
    )
    for r in runs:
        e = one_line_error(r)
        assert "tenant 'acme' has no secret in SENTPIPE_SECRETS_FILE" in e and "IndexError" not in e, e


async def test_ctrl_c_ends_a_send_with_status_130_and_says_so(stub: Stub) -> None:
    """Typer returns 130 for Ctrl-C outside standalone mode; `sentpipe` used to drop it and exit 0."""
    proc = await sentpipe_process(
        *("send", stub.url, "--rate", "2", "--count", "100", "--seed", "1"),
    )
    # The first delivery shows the run is under way; the second, that the first's answer is in.
    for _ in range(600):
        if len(stub.hits) >= 2:
            break
        await asyncio.sleep(0.05)
    assert len(stub.hits) >= 2
    proc.send_signal(signal.SIGINT)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 130 and err.decode().strip().splitlines()[-1] == "interrupted", err
    assert len(stub.hits) < 100
    # Where to go on from: no further than what was accepted (--seed makes the same events again).
    resume = re.search(r"--skip (\d+) sends the rest$", err.decode().strip().splitlines()[-2])
    assert resume is not None and 1 <= int(resume[1]) <= len(stub.hits), err


async def test_a_run_that_cannot_keep_to_its_rate_says_so(stub: Stub) -> None:
    """--rate 1000 with one request at a time to a receiver answering in 0.2 s: at most 5 a second went out,
    and the summary's one rate, answers per second, did not say that the pace asked for was not kept."""

    async def slow() -> int:
        await asyncio.sleep(0.2)
        return 200

    stub.answer = lambda n: slow()
    ran = await cli("send", stub.url, "--rate", "1000", "--count", "4", "--concurrency", "1")
    assert ran.returncode == 0, ran
    shown_rate = re.fullmatch(r"(\d+(?:\.\d+)?)/s of (\d+)/s asked", row(ran.stdout, "rate"))
    assert shown_rate, ran.stdout
    kept, asked = shown_rate.groups()
    assert float(kept) <= 5.5 and asked == "1000", ran.stdout
    assert f"first attempts went out at {kept}/s, not the 1000/s asked" in ran.stderr, ran.stderr
    # Without --rate there is no pace to keep: no row, no note.
    stub.answer = lambda n: 200
    plain = await cli("send", stub.url, "--count", "4")
    assert "│ rate " not in plain.stdout and "first attempts" not in plain.stderr, plain


async def test_a_send_interrupted_before_any_answer_still_ends_with_its_summary(stub: Stub) -> None:
    """Ctrl-C while every delivery sent was still waiting for its answer printed "interrupted" and nothing
    else: no summary, so nothing said that two deliveries had gone out."""
    never = asyncio.Event()

    async def no_answer() -> int:
        await never.wait()
        return 200

    stub.answer = lambda n: no_answer()
    proc = await sentpipe_process("send", stub.url, "--count", "5", "--concurrency", "2")
    try:
        for _ in range(600):
            if len(stub.hits) >= 2:
                break
            await asyncio.sleep(0.05)
        assert len(stub.hits) == 2
        proc.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        never.set()
    assert proc.returncode == 130 and err.decode().strip().splitlines()[-1] == "interrupted", err
    stdout = out.decode()
    assert [row(stdout, name) for name in ("events planned", "sent", "accepted", "interrupted")] == [
        "5",
        "2",
        "0",
        "2",
    ], stdout


async def test_an_interrupted_send_counts_every_delivery_sent_in_one_row(stub: Stub) -> None:
    """Ctrl-C while a delivery was in flight left it out of every row: sent 129, accepted 128, rejected 0."""
    release = asyncio.Event()

    async def never_before_release() -> int:
        await release.wait()
        return 200

    # Three accepted, the fourth answered 503 and waiting for its retry, the fifth in flight.
    stub.answer = lambda n: 200 if n <= 3 else 503 if n == 4 else never_before_release()
    proc = await sentpipe_process(
        *("send", stub.url, "--count", "20", "--seed", "2", "--concurrency", "1", "--retry-schedule", "60"),
    )
    try:
        for _ in range(600):
            if len(stub.hits) >= 5:
                break
            await asyncio.sleep(0.05)
        assert len(stub.hits) == 5
        await asyncio.sleep(1.0)  # the run goes on, waiting: its summary counts this time too
        proc.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        release.set()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 130, err
    stdout = out.decode()
    assert [row(stdout, name) for name in ("sent", "accepted", "rejected", "interrupted")] == [
        "5",
        "3",
        "0",
        "2",
    ]
    # 20 events were planned, not sent: the row said "events 20" beside "sent 5".
    assert row(stdout, "events planned") == "20" and "│ events  " not in stdout, stdout
    # The last update was the third acceptance's, a second before the interrupt: it showed 0.01 s.
    assert float(row(stdout, "elapsed").split()[0]) >= 1.0, stdout
    # The resume point is unchanged: the first three events, the ones accepted.
    assert err.decode().strip().splitlines()[-2].endswith("--skip 3 sends the rest"), err


async def test_bad_input_is_a_one_line_error(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    events.write_bytes(b'{"field": "message"}\n\n{"field": \n')
    unreachable = f"http://127.0.0.1:{free_port()}/webhooks/sent"
    runs = await asyncio.gather(
        cli("send", unreachable, "--count", "3"),
        cli("trigger", "message.status.updated", unreachable),
        cli("send", unreachable, "--file", str(events)),
        cli("send", "--type", "message.delivered"),
        cli("trigger", "message.delivered"),
        cli("send", "--file", str(tmp_path / "missing.jsonl")),
        cli("send", "not-a-url"),
        cli("send", unreachable, "--retry-schedule", ""),  # was Sent's whole schedule, up to 127 s a delivery
    )
    errors = [one_line_error(r) for r in runs]
    assert "cannot reach" in errors[0] and unreachable in errors[0]
    assert "cannot reach" in errors[1]
    assert "line 3" in errors[2] and "--on-bad-line skip" in errors[2]
    for e in errors[3:5]:
        assert "message.delivered" in e and all(t.value in e for t in ROUTED_TYPES)
    assert "missing.jsonl" in errors[5]
    assert "not an http(s) URL" in errors[6] and "'http://not-a-url'" in errors[6], errors[6]
    assert "--retry-schedule" in errors[7] or "at least one delay" in errors[7], errors[7]


async def test_trigger_refuses_a_status_the_type_does_not_have_and_sends_one_it_has(stub: Stub) -> None:
    bogus, inbound, approved = await asyncio.gather(
        cli("trigger", "message.status.updated", stub.url, "--status", "bogus"),
        cli("trigger", "message.inbound.received", stub.url, "--status", "delivered"),
        cli("trigger", "template.approval.updated", stub.url, "--status", "APPROVED", "--shape", "guide"),
    )
    assert "--status" in one_line_error(bogus) and "delivered" in one_line_error(bogus)
    assert "--status does not apply to message.inbound.received" in one_line_error(inbound)
    assert approved.returncode == 0, approved
    assert len(stub.hits) == 1  # the refused ones sent nothing
    assert orjson.loads(stub.hits[0].body)["data"]["status"].lower() == "approved"


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024  # type: ignore[union-attr]


async def test_a_long_run_starts_sending_at_once_with_progress_and_bounded_memory(stub: Stub) -> None:
    """`--count` at its ceiling: sending and the progress bar start within seconds and memory stays flat
    (every event made first, this took half a minute and gigabytes before the first request)."""
    proc = await sentpipe_process(
        "send",
        stub.url,
        "--count",
        "1000000",
        "--duplicates",
        "0.1",
        "--shuffle",
        "--concurrency",
        "32",
        env={**os.environ, "TTY_COMPATIBLE": "1", "COLUMNS": "200"},  # progress as on a terminal
        stdout=asyncio.subprocess.DEVNULL,
    )
    try:
        t0 = time.monotonic()
        while len(stub.hits) < 12_000 and time.monotonic() - t0 < 60:  # past the first plan window
            assert proc.returncode is None
            await asyncio.sleep(0.2)
        assert len(stub.hits) >= 12_000, f"{len(stub.hits)} requests after 60 s"
        assert rss_mb(proc.pid) < 300
        assert stub.hits[0].at - t0 < 10  # measured on the same loop clock
    finally:
        proc.kill()
        _, stderr = await proc.communicate()
    assert b"sending" in stderr and b"/1100000" in stderr  # the bar counts towards every delivery


def test_a_url_without_its_scheme_is_refused_naming_what_it_lacks() -> None:
    """`send localhost:8080/webhooks/sent` was "not an http(s) URL: '<unparseable URL>'"."""
    for typed, meant in [
        ("localhost:8080/webhooks/sent", "http://localhost:8080/webhooks/sent"),
        ("127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("[::1]:8080/webhooks/sent", "http://[::1]:8080/webhooks/sent"),
        ("alice:hunter2@x.example/webhooks/sent", "http://x.example/webhooks/sent"),
    ]:
        with pytest.raises(ValueError) as refused:
            check_url(typed)
        assert str(refused.value) == (
            f"not an http(s) URL: it needs http:// or https:// in front, as in {meant!r}"
        ), typed
    # A scheme, but no host: nothing to put in front.
    with pytest.raises(ValueError, match=r"^not an http\(s\) URL: '<unparseable URL>'$"):
        check_url("http:/webhooks/sent")
    with pytest.raises(ValueError, match=r"^not an http\(s\) URL: Invalid IPv6 URL$"):
        check_url("http://[::1/webhooks/sent")


@pytest.mark.parametrize("done", [543_210, 1_100_000])
def test_the_progress_line_shows_its_counts_whole_on_an_80_column_terminal(done: int) -> None:
    """Wider than 80 columns, rich cut the line's columns down, the count first: 543210 of 1100000 read
    "54321…"."""
    screen = io.StringIO()
    console = Console(file=screen, width=80, force_terminal=True, color_system=None)
    stats = Stats(total=1_100_000, done=done, accepted=done - 210, retried=12_345)
    stats.rejected["503"] = 210
    with _live(stats.total, console) as update:
        update(stats)
    line = [part for part in screen.getvalue().split("\x1b[2K") if "sending" in part][-1]
    assert f" {done}/1100000 " in line, line
    assert "not accepted 210" in line and "retried 12345" in line and "0:00:0" in line, line


def test_a_password_in_the_target_url_is_never_printed() -> None:
    """aiohttp sends a URL's user part as Basic auth (a tunnel's password, say): errors and the summary
    printed it."""
    assert shown("https://alice:hunter2@x.example/webhooks/sent") == "https://x.example/webhooks/sent"
    with pytest.raises(ValueError) as refused:
        check_url("ftp://alice:hunter2@x.example/webhooks/sent")
    assert "hunter2" not in str(refused.value) and "alice" not in str(refused.value)
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    with pytest.raises(Unreachable) as unreachable:
        asyncio.run(probe(f"http://alice:hunter2@127.0.0.1:{port}/webhooks/sent", 1.0))
    assert "hunter2" not in str(unreachable.value) and f"127.0.0.1:{port}" in str(unreachable.value)


def test_stale_is_stale_for_the_widest_tolerance_the_ingress_takes() -> None:
    """An hour old: an ingress with SENTPIPE_SIGNATURE_TOLERANCE_S above 3600 (up to a day) accepted every
    `--stale` delivery, and the run failed for the sender's reason."""
    from sentpipe.schemas.signature import SignatureError, Verifier

    widest = Settings.model_fields["signature_tolerance_s"].metadata
    tolerance = min(m.le for m in widest if getattr(m, "le", None) is not None)
    now = 1_800_000_000.0
    delivery = _plan(1)[1][0]
    headers = Signer(SECRET, SigningMode.STALE, clock=lambda: now).headers(delivery)
    with pytest.raises(SignatureError) as caught:
        Verifier([SECRET], tolerance).verify(headers, delivery.body, now)
    assert caught.value.reason.value == "stale_timestamp"
