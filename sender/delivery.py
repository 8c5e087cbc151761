"""The delivery engine: sign each attempt as Sent does, post it, retry on Sent's schedule, keep score."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import ssl
import time
from array import array
from collections import Counter
from collections.abc import AsyncGenerator, Callable, Iterable, Sequence, Sized
from dataclasses import dataclass, field
from enum import StrEnum

import aiohttp
from yarl import URL

from sentpipe.schemas.signature import secret_key, signature_headers
from sentpipe.sender.plan import Delivery

# The integration guide's table: retries after 1, 2, 4, 8, 16, 32, 64 s, then the event is failed.
SENT_RETRY_SCHEDULE: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
# An hour: far beyond Sent's longest wait, and short enough that a typo cannot park a delivery for good.
MAX_RETRY_DELAY_S = 3600.0
USER_AGENT = "sentpipe-sender/0.1"
RESPONSE_KEEP_BYTES = 64 * 1024
# Deliveries started and not yet finished (in flight or waiting for a retry) at most. Waiting holds no request
# slot, so without a bound a receiver that went down mid-run had every delivery of the run started and
# parked at once: 6.5 kB each, gigabytes for a `--count 1000000`.
MAX_UNFINISHED = 10_000
# Far outside any signature tolerance (Standard Webhooks: 5 minutes; SENTPIPE_SIGNATURE_TOLERANCE_S up to a
# day), so --stale is always stale: an hour was accepted by an ingress configured with more.
STALE_BY_S = 2 * 86_400
# A signing key that is not the receiver's, so --bad-signature fails the HMAC, not the header syntax.
WRONG_SECRET = "whsec_bm90LXRoZS1yZWNlaXZlcnMtc2VjcmV0"


class SigningMode(StrEnum):
    VALID = "valid"
    BAD_SIGNATURE = "bad_signature"
    STALE = "stale"


def nearest_rank_quantile(values: Sequence[float], q: float) -> float | None:
    """The exact q-quantile (0 < q <= 1) by nearest rank: a value that occurred, None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


class Unreachable(Exception):
    """The target accepts no connection at all: nothing would be delivered, so stop before starting."""


def parse_schedule(text: str) -> tuple[float, ...]:
    """'0.01,0.02' -> (0.01, 0.02); ValueError on anything but numbers from 0 to MAX_RETRY_DELAY_S."""
    try:
        delays = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"--retry-schedule {text!r} is not a comma-separated list of seconds") from None
    if not delays or any(not (math.isfinite(d) and 0 <= d <= MAX_RETRY_DELAY_S) for d in delays):
        raise ValueError(
            f"--retry-schedule {text!r} needs at least one delay, "
            f"each from 0 to {MAX_RETRY_DELAY_S:g} seconds"
        )
    return delays


def shown(url: str) -> str:
    """The URL as printed: without its user part, whose password aiohttp sends as Basic auth."""
    try:
        return str(URL(url).with_user(None))
    except ValueError:  # not parseable: print nothing of it that could hold a password
        return "<unparseable URL>"


def check_url(url: str) -> URL:
    """The URL as aiohttp will use it; ValueError unless it is an absolute http(s) URL."""
    try:
        parsed = URL(url)
    except ValueError as exc:  # "Invalid IPv6 URL", "Port out of range 0-65535": said without the URL
        raise ValueError(f"not an http(s) URL: {exc}") from None
    if parsed.scheme in ("http", "https") and parsed.host:
        return parsed
    if parsed.scheme not in ("http", "https") and "://" not in url and _is_absolute(guess := f"http://{url}"):
        # `send localhost:8080/webhooks/sent` was "not an http(s) URL: '<unparseable URL>'" (a URL without
        # a scheme is relative, and is not printed lest it holds a password): what it lacks, and the URL
        # it likely meant, shown as every URL is.
        raise ValueError(f"not an http(s) URL: it needs http:// or https:// in front, as in {shown(guess)!r}")
    raise ValueError(f"not an http(s) URL: {shown(url)!r}")


def _is_absolute(url: str) -> bool:
    try:
        return bool(URL(url).host) and not any(c.isspace() for c in url)
    except ValueError:
        return False


class Signer:
    """Signs one attempt: the delivery's webhook id, a timestamp taken now, the exact body bytes."""

    def __init__(
        self,
        secret: str | Sequence[str],
        mode: SigningMode = SigningMode.VALID,
        clock: Callable[[], float] = time.time,
    ) -> None:
        secrets = (secret,) if isinstance(secret, str) else tuple(secret)
        if not secrets:
            raise ValueError("at least one secret is required")
        for each in secrets:
            secret_key(each)  # a broken secret fails here, once, not on every attempt
        # Several: one signature each, as Sent signs while a webhook's secret is rotated.
        self.secrets = (WRONG_SECRET,) if mode is SigningMode.BAD_SIGNATURE else secrets
        self.mode = mode
        self.clock = clock

    def headers(self, delivery: Delivery) -> dict[str, str]:
        timestamp = int(self.clock())
        if self.mode is SigningMode.STALE:
            timestamp -= STALE_BY_S
        return {
            **signature_headers(self.secrets, delivery.webhook_id, timestamp, delivery.body),
            "x-webhook-event-type": delivery.category,
            "content-type": "application/json",
            "user-agent": USER_AGENT,
        }


@dataclass(frozen=True, slots=True)
class Attempt:
    number: int  # 1 for the first try
    status: int | None  # None when no HTTP answer came (timeout, connection error)
    error: str | None
    latency_s: float
    body: bytes = b""

    @property
    def accepted(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def spooled(self) -> bool:
        """Accepted by sentpipe's ingress into its local spool (the broker was away), not yet on Kafka."""
        return self.accepted and b'"spooled":true' in self.body

    @property
    def outcome(self) -> str:
        """How the summary names a final answer: the status code, or what went wrong."""
        return str(self.status) if self.status is not None else self.error or "error"


@dataclass(frozen=True, slots=True)
class Outcome:
    delivery: Delivery
    attempts: tuple[Attempt, ...]

    @property
    def final(self) -> Attempt:
        return self.attempts[-1]

    @property
    def accepted(self) -> bool:
        return self.final.accepted


@dataclass
class Stats:
    """Running totals; safe to read while `deliver` runs (everything happens on one event loop)."""

    total: int = 0  # deliveries planned (0 when not known beforehand)
    sent: int = 0  # deliveries whose first attempt has started
    done: int = 0
    accepted: int = 0
    spooled: int = 0  # accepted into the ingress's spool (a sentpipe ingress while its broker is away)
    retried: int = 0  # attempts after the first
    duplicates: int = 0  # deliveries that repeat an earlier body
    rejected: Counter[str] = field(default_factory=Counter)  # final non-2xx outcome -> deliveries
    # Every attempt that got an HTTP answer; 8 bytes each, as a run can make millions.
    latencies_s: array[float] = field(default_factory=lambda: array("d"))
    elapsed_s: float = 0.0
    # From the first delivery's first attempt to the last one's: the pace the run kept (`send_rate`).
    sending_s: float = 0.0
    # Events 0 .. accepted_prefix-1 (by Delivery.index) all had their first delivery accepted: where a rerun
    # of the same events resumes (`send --skip`). One byte per event past it still awaiting its outcome.
    accepted_prefix: int = 0
    _accepted_ahead: bytearray = field(default_factory=bytearray, repr=False)
    _first_failed: int | None = None

    @property
    def not_accepted(self) -> int:
        return self.done - self.accepted

    @property
    def interrupted(self) -> int:
        """Deliveries sent that have no outcome: a run stopped (Ctrl-C, SIGTERM) while they were in flight or
        waiting for a retry. Counted apart so that every delivery sent is in one row of the summary."""
        return self.sent - self.done

    @property
    def send_rate(self) -> float | None:
        """First attempts per second, as paced: what `--rate` asked for, when nothing held the run back."""
        return (self.sent - 1) / self.sending_s if self.sent > 1 and self.sending_s > 0 else None

    def percentile(self, q: float) -> float | None:
        """Nearest-rank percentile of answered attempts' latency, None before the first answer."""
        return nearest_rank_quantile(self.latencies_s, q)

    def record_attempt(self, attempt: Attempt) -> None:
        if attempt.number > 1:
            self.retried += 1
        if attempt.status is not None:
            self.latencies_s.append(attempt.latency_s)

    def record_outcome(self, outcome: Outcome) -> None:
        self.done += 1
        if outcome.accepted:
            self.accepted += 1
            if outcome.final.spooled:
                self.spooled += 1
        else:
            self.rejected[outcome.final.outcome] += 1
        if not outcome.delivery.duplicate:
            self._settle(outcome.delivery.index, outcome.accepted)

    def _settle(self, index: int, accepted: bool) -> None:
        if self._first_failed is not None and index >= self._first_failed:
            return  # past an event that failed: the prefix cannot grow beyond it
        ahead, offset = self._accepted_ahead, index - self.accepted_prefix
        if not accepted:
            self._first_failed = index
            del ahead[offset:]
            return
        if offset >= len(ahead):
            ahead.extend(bytes(offset + 1 - len(ahead)))
        ahead[offset] = 1
        if offset == 0:
            n = ahead.find(0)
            n = len(ahead) if n < 0 else n
            del ahead[:n]
            self.accepted_prefix += n


async def post_once(
    session: aiohttp.ClientSession, url: URL | str, delivery: Delivery, signer: Signer, number: int
) -> Attempt:
    """One attempt: freshly signed, posted, answered or failed; never raises for network trouble."""
    headers = signer.headers(delivery)
    started = time.perf_counter()
    try:
        # A 3xx is the receiver's answer, as for Sent: following it would post the signed event elsewhere.
        async with session.post(url, data=delivery.body, headers=headers, allow_redirects=False) as resp:
            # One read gives what has arrived so far: an answer in chunks was cut to its first one (and a
            # `"spooled":true` past it went unseen).
            body = b""
            while len(body) < RESPONSE_KEEP_BYTES and (
                chunk := await resp.content.read(RESPONSE_KEEP_BYTES - len(body))
            ):
                body += chunk
            return Attempt(number, resp.status, None, time.perf_counter() - started, body)
    except TimeoutError:
        return Attempt(number, None, "timeout", time.perf_counter() - started)
    except aiohttp.ClientSSLError:  # a kind of connection error to aiohttp, but not one a retry mends
        return Attempt(number, None, "TLS error", time.perf_counter() - started)
    except aiohttp.ClientConnectionError:
        return Attempt(number, None, "connection error", time.perf_counter() - started)
    # Named for the user, as the others are: the summary had rows "rejected ClientResponseError" (a reply
    # that is not HTTP) and "rejected ClientPayloadError" (a body that ended before its length).
    except aiohttp.ClientPayloadError:
        return Attempt(number, None, "answer cut short", time.perf_counter() - started)
    except aiohttp.ClientResponseError:  # raise_for_status is off: only an answer HTTP cannot parse
        return Attempt(number, None, "malformed answer", time.perf_counter() - started)
    except aiohttp.ClientError as exc:
        return Attempt(number, None, type(exc).__name__, time.perf_counter() - started)


async def deliver(
    url: str,
    deliveries: Iterable[Delivery],
    secret: str | Sequence[str],
    *,
    total: int | None = None,
    schedule: Sequence[float] = SENT_RETRY_SCHEDULE,
    concurrency: int = 8,
    rate: float | None = None,
    timeout_s: float = 10.0,
    mode: SigningMode = SigningMode.VALID,
    clock: Callable[[], float] = time.time,
    on_update: Callable[[Stats], None] | None = None,
    on_outcome: Callable[[Outcome], None] | None = None,
    max_unfinished: int = MAX_UNFINISHED,
) -> Stats:
    """Deliver everything in plan order; returns when each delivery is accepted or out of retries.

    `deliveries` is taken one at a time as slots free up, so a lazy plan is never held whole; `total`
    (default: its length, when it has one) is what progress reports count towards. `concurrency` bounds
    attempts in flight; `rate` (deliveries per second) paces first attempts. A delivery waiting for its
    next retry holds no slot, so one failing event does not stall the rest, as with Sent, whose retries
    are scheduled per event; `max_unfinished` (at least `concurrency`) bounds the deliveries started and
    not finished, so one that keeps failing stalls nothing while a receiver that is down stalls the run.
    """
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    if mode is not SigningMode.VALID:
        # Every answer is meant to be a rejection: retrying it would only repeat the check, slowly.
        schedule = ()
    if rate is not None and not (math.isfinite(rate) and rate > 0):
        raise ValueError("rate must be a finite number of events per second above 0")
    target = check_url(url)
    signer = Signer(secret, mode, clock)
    if total is None:
        total = len(deliveries) if isinstance(deliveries, Sized) else 0
    stats = Stats(total=total)
    slots = asyncio.Semaphore(concurrency)
    unfinished = asyncio.Semaphore(max(concurrency, max_unfinished))
    loop = asyncio.get_running_loop()
    started = loop.time()

    def updated() -> None:
        stats.elapsed_s = loop.time() - started
        if on_update is not None:
            on_update(stats)

    # Before the first delivery, not only at its answer: a run interrupted while its first deliveries were
    # all still in flight (a receiver that is slow, or hangs) ended with no summary at all, saying nothing
    # of the deliveries it had sent.
    updated()
    connector = aiohttp.TCPConnector(limit=concurrency)
    client_timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=client_timeout) as session:

        async def run(delivery: Delivery, first_slot_held: bool) -> None:
            attempts: list[Attempt] = []
            for number in range(1, len(schedule) + 2):
                if number > 1:
                    await asyncio.sleep(schedule[number - 2])
                if not (number == 1 and first_slot_held):
                    await slots.acquire()
                try:
                    attempt = await post_once(session, target, delivery, signer, number)
                finally:
                    slots.release()
                attempts.append(attempt)
                stats.record_attempt(attempt)
                updated()
                # Sent retries every delivery not answered 2xx: any other status (a 4xx too: a wrong secret
                # deployed is a stream of 401s, each failing towards auto-disable), a timeout, no connection.
                if attempt.accepted:
                    break
            outcome = Outcome(delivery, tuple(attempts))
            stats.record_outcome(outcome)
            updated()
            if on_outcome is not None:
                on_outcome(outcome)

        # Only unfinished tasks are kept: a finished one is dropped, its failure (a bug: `run` catches
        # what the network does) kept to raise.
        tasks: set[asyncio.Task[None]] = set()
        failures: list[BaseException] = []

        def finished(task: asyncio.Task[None]) -> None:
            tasks.discard(task)
            unfinished.release()
            if not task.cancelled() and (exc := task.exception()) is not None:
                failures.append(exc)

        try:
            async with contextlib.aclosing(_taken_ahead(deliveries)) as ahead:
                i = -1
                paced_from = first_sent = started
                async for delivery in ahead:
                    i += 1
                    if failures:
                        raise failures[0]
                    if rate is not None:
                        # Paced from the first delivery in hand: from the start, every delivery due while
                        # the session opened and the first plan window was made went out at once.
                        if i == 0:
                            paced_from = loop.time()
                        delay = paced_from + i / rate - loop.time()
                        if delay > 0:
                            await asyncio.sleep(delay)
                    # Taking both before creating the task keeps pending work bounded.
                    await unfinished.acquire()
                    await slots.acquire()
                    stats.sent += 1
                    if stats.sent == 1:
                        first_sent = loop.time()
                    stats.sending_s = loop.time() - first_sent
                    stats.duplicates += delivery.duplicate
                    stats.total = max(stats.total, stats.sent)
                    task = asyncio.create_task(run(delivery, first_slot_held=True))
                    tasks.add(task)
                    task.add_done_callback(finished)
            await asyncio.gather(*tasks)
            if failures:
                raise failures[0]
        finally:
            for task in list(tasks):
                task.cancel()
            # Interrupted (Ctrl-C cancels this), the summary still shows how long the run went: its last
            # update was the last delivery's, perhaps seconds before.
            stats.elapsed_s = loop.time() - started
    updated()
    return stats


# Deliveries of a lazy plan made at a time in a worker thread, the next batch while this one is sent:
# making events and plans is CPU work that, done on the loop, would stall it once per plan window (and
# inflate every latency measured across the stall).
TAKE_AHEAD = 1000


async def _taken_ahead(deliveries: Iterable[Delivery]) -> AsyncGenerator[Delivery, None]:
    if isinstance(deliveries, Sequence):  # already made: nothing to take off the loop
        for delivery in deliveries:
            yield delivery
        return
    it = iter(deliveries)

    def take() -> list[Delivery]:
        return list(itertools.islice(it, TAKE_AHEAD))

    batch = await asyncio.to_thread(take)
    while batch:
        # Only one `take` runs at a time: the next starts once the previous one has returned.
        following = asyncio.ensure_future(asyncio.to_thread(take))
        try:
            for delivery in batch:
                yield delivery
        except GeneratorExit:
            following.cancel()
            raise
        batch = await following


async def probe(url: str, timeout_s: float = 5.0) -> None:
    """Raise Unreachable unless a connection to the URL's host and port can be opened (with the TLS
    handshake, for https: a certificate the system does not trust was a "connection error" retried for
    two minutes per delivery)."""
    target = check_url(url)
    host, port = target.host, target.port
    assert host is not None and port is not None  # check_url guarantees an absolute http(s) URL
    tls = ssl.create_default_context() if target.scheme == "https" else None
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port, ssl=tls), timeout_s)
    except TimeoutError:
        raise Unreachable(f"cannot reach {shown(url)}: no connection within {timeout_s:g}s") from None
    except ssl.SSLError as exc:
        why = getattr(exc, "verify_message", None) or exc.reason or type(exc).__name__
        raise Unreachable(f"TLS handshake with {shown(url)} failed: {why}") from None
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise Unreachable(f"cannot reach {shown(url)}: {reason}") from None
    writer.close()
    # The connection has served its purpose; how it closes does not matter.
    with contextlib.suppress(OSError):
        await writer.wait_closed()
