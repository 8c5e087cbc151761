"""The spool against the real broker, stopped and started by the tests: nothing answered 200 is ever lost.

Every test here needs the local launcher (it stops the broker), and fails, never skips, without it."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import orjson
import pytest

from sentpipe.ingress.spool import Spool, SpoolRecord, process_dir, status_of
from sentpipe.schemas import routing as r
from sentpipe.schemas.events import ROUTED_TYPES
from sentpipe.schemas.samples import SampleFactory
from sentpipe.schemas.topics import Topics
from sentpipe.sender.plan import generate
from sentpipe.settings import Settings
from tests.http_tools import metric_sum, post_signed, scrape
from tests.kafka_tools import read_topic, record_count
from tests.oracle import actual_state, expected_state, row_count
from tests.pipeline import start_worker, wait_caught_up, wait_for, wait_until
from tests.processes import Proc, settings_env, start_ingress
from tests.services import Services


def _need_local_broker(services: Services) -> None:
    if not services.kafka_local:
        pytest.fail(
            "this test stops the broker: run it with the local launcher (unset SENTPIPE_KAFKA_BOOTSTRAP)"
        )


def _get(url: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, orjson.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, orjson.loads(e.read() or b"{}")


def _raw_keys(s: Settings, at_least: int) -> set[str]:
    records = read_topic(s.kafka_bootstrap, Topics(s.topic_prefix).raw, at_least=at_least, timeout=120)
    return {rec.key.decode() for rec in records if rec.key is not None}


def _start_spooling_ingress(
    s: Settings, tmp_path: Path, spool_dir: Path, **extra: object
) -> tuple[Proc, str, int]:
    return start_ingress(s, tmp_path, spool="on", spool_dir=spool_dir, **extra)


def _spooling(base: str) -> bool:
    """/readyz says the broker is away and requests go to the spool (the pod stays in service)."""
    status, body = _get(f"{base}/readyz")
    return status == 200 and body.get("spooling") is True


def test_spool_full_is_503_and_every_200_reaches_the_broker(
    services: Services, settings: Settings, tmp_path: Path
) -> None:
    _need_local_broker(services)
    spool_dir = tmp_path / "spool"
    proc, base, mport = _start_spooling_ingress(
        settings, tmp_path, spool_dir, spool_max_bytes=1024 * 1024, max_body_bytes=256 * 1024
    )
    secret = settings.webhook_secret.get_secret_value()
    f = SampleFactory(5)
    acked: list[str] = []
    try:
        services.stop_kafka()
        try:
            wait_until(lambda: _spooling(base), 30, "/readyz: ready, spooling", proc.tail)
            answers = []
            for i in range(40):  # 64 KiB each: the 1 MiB spool takes about 15
                body = orjson.dumps({**f.inbound().doc, "padding": "x" * 65536, "n": i})
                status, headers, doc = post_signed(f"{base}/webhooks/sent", body, secret)
                answers.append((status, doc.get("error")))
                if status == 200:
                    assert doc["spooled"] is True, doc
                    acked.append(str(doc["event_id"]))
                else:
                    assert (status, doc["error"]) == (503, "spool_full"), doc
                    assert headers.get("Retry-After"), headers
            assert 10 <= len(acked) < 40, answers
            assert answers[len(acked) :] == [(503, "spool_full")] * (40 - len(acked)), answers
            # What was acknowledged is on disk, and nothing else is.
            on_disk = status_of(process_dir(spool_dir, 0))
            assert on_disk.records == len(acked) and on_disk.in_use
            samples = scrape(mport)
            assert metric_sum(samples, "sentpipe_spool_records") == len(acked)
            assert metric_sum(samples, "sentpipe_spool_spooled_total") == len(acked)
            assert _get(f"{base}/readyz")[0] == 503  # full and no broker: out of service
        finally:
            services.start_kafka()
        wait_until(lambda: status_of(process_dir(spool_dir, 0)).records == 0, 120, "spool drained", proc.tail)
        try:
            got = _raw_keys(settings, len(acked))
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{proc.tail(120)}") from None
        assert set(acked) <= got
        samples = scrape(mport)
        assert metric_sum(samples, "sentpipe_spool_drained_total") >= len(acked)
        assert metric_sum(samples, "sentpipe_spool_bytes") == 0
        # Drained and empty: a new event goes straight to the broker again.
        status, _, doc = post_signed(f"{base}/webhooks/sent", f.inbound().body, secret)
        assert status == 200 and "spooled" not in doc, doc
    finally:
        assert proc.stop() == 0, proc.tail()


def test_kill_9_while_spooling_loses_no_acknowledged_event(
    services: Services, settings: Settings, tmp_path: Path
) -> None:
    _need_local_broker(services)
    spool_dir = tmp_path / "spool"
    proc, base, _ = _start_spooling_ingress(settings, tmp_path, spool_dir)
    secret = settings.webhook_secret.get_secret_value()
    f = SampleFactory(9)
    lock = threading.Lock()
    acked: list[str] = []
    stop = threading.Event()
    target = {"url": f"{base}/webhooks/sent"}

    def load(n: int) -> None:
        i = 0
        while not stop.is_set():
            with lock:
                body = orjson.dumps({**f.inbound().doc, "load": [n, i]})
            try:
                status, _, doc = post_signed(target["url"], body, secret)
            except OSError:
                continue  # the ingress is being killed: no answer, nothing acknowledged
            if status == 200:
                with lock:
                    acked.append(str(doc["event_id"]))
            i += 1

    threads = [threading.Thread(target=load, args=(n,)) for n in range(6)]
    restarted: Proc | None = None
    try:
        services.stop_kafka()
        try:
            wait_until(lambda: _spooling(base), 30, "/readyz: ready, spooling", proc.tail)
            for t in threads:
                t.start()
            wait_until(lambda: len(acked) >= 300, 60, "300 events spooled", proc.tail)
            proc.kill()  # SIGKILL in the middle of group commits
            restarted, base2, _ = _start_spooling_ingress(settings, tmp_path, spool_dir)
            target["url"] = f"{base2}/webhooks/sent"
            before = len(acked)
            wait_until(
                lambda: len(acked) >= before + 100, 60, "spooling again after the restart", restarted.tail
            )
            stop.set()
            for t in threads:
                t.join(30)
        finally:
            stop.set()
            services.start_kafka()
        wait_until(
            lambda: status_of(process_dir(spool_dir, 0)).records == 0, 120, "spool drained", restarted.tail
        )
        missing = set(acked) - _raw_keys(settings, len(set(acked)))
        assert not missing, f"{len(missing)} of {len(acked)} acknowledged events missing"
    finally:
        stop.set()
        if restarted is not None:
            assert restarted.stop() == 0, restarted.tail()


def _prefill(directory: Path, s: Settings, n: int, size: int) -> list[str]:
    """Spool `n` raw records as an ingress would have (the broker away), straight through the Spool."""
    import asyncio

    raw = Topics(s.topic_prefix).raw
    keys = [f"prefill-{i:07d}" for i in range(n)]

    async def fill() -> None:
        spool = Spool(directory, s.spool_max_bytes, s.spool_segment_bytes)
        spool.open()
        try:
            for start in range(0, n, 5000):
                batch = []
                for key in keys[start : start + 5000]:
                    headers = r.raw_headers(
                        tenant="default",
                        received_at_ms=int(time.time() * 1000),
                        webhook_id=key,
                        request_id=key,
                        event_type="message.inbound",
                    )
                    batch.append(spool.append(SpoolRecord(raw, key.encode(), b"x" * size, tuple(headers), 1)))
                await asyncio.gather(*batch)
        finally:
            spool.close()

    asyncio.run(fill())
    return keys


def test_kill_9_while_draining_loses_nothing(services: Services, settings: Settings, tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    keys = _prefill(process_dir(spool_dir, 0), settings, 60_000, 2000)
    proc, _, mport = _start_spooling_ingress(settings, tmp_path, spool_dir)
    restarted: Proc | None = None
    try:
        wait_for(
            lambda: metric_sum(scrape(mport), "sentpipe_spool_drained_total"), lambda n: n > 0, 60, "draining"
        )
        proc.kill()
        left = status_of(process_dir(spool_dir, 0)).records
        assert 0 < left < len(keys), f"the kill came too late to test a drain cut short ({left} left)"
        restarted, _, _ = _start_spooling_ingress(settings, tmp_path, spool_dir)
        wait_until(lambda: status_of(process_dir(spool_dir, 0)).records == 0, 180, "drained", restarted.tail)
        got = _raw_keys(settings, len(keys))
        assert got == set(keys), f"{len(set(keys) - got)} missing"
    finally:
        if restarted is not None:
            assert restarted.stop() == 0, restarted.tail()
        proc.kill()


def test_a_torn_last_frame_is_skipped_with_a_warning_and_the_rest_drains(
    settings: Settings, tmp_path: Path
) -> None:
    spool_dir = tmp_path / "spool"
    directory = process_dir(spool_dir, 0)
    keys = _prefill(directory, settings, 50, 300)
    seg = sorted(directory.glob("*.seg"))[-1]
    seg.write_bytes(seg.read_bytes()[:-100])  # the process died in the middle of the last append
    proc, _, mport = _start_spooling_ingress(settings, tmp_path, spool_dir)
    try:
        wait_until(lambda: status_of(directory).segments == 0, 60, "drained", proc.tail)
        assert _raw_keys(settings, 49) == set(keys[:49])
        assert metric_sum(scrape(mport), "sentpipe_spool_corrupt_frames_total") == 1
        assert "torn or corrupt frame" in proc.tail(200)
    finally:
        assert proc.stop() == 0, proc.tail()


def test_spool_commands_show_and_drain_a_left_behind_directory(settings: Settings, tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    keys = _prefill(process_dir(spool_dir, 3), settings, 500, 200)
    env = settings_env(settings, spool_dir=spool_dir)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "sentpipe", "spool", *args],
            env={**env, "COLUMNS": "200"},
            capture_output=True,
            text=True,
            timeout=120,
        )

    shown = cli("status")
    assert shown.returncode == 0, shown.stderr
    assert re.search(r"ingress-3 .*\bno\b.* 500 ", shown.stdout), shown.stdout
    drained = cli("drain")
    assert drained.returncode == 0, drained.stderr
    assert re.search(r"ingress-3 .*drained .* 500 .* 0 ", drained.stdout), drained.stdout
    assert _raw_keys(settings, 500) == set(keys)
    assert status_of(process_dir(spool_dir, 3)).records == 0
    missing = cli("status", "--dir", str(tmp_path / "nowhere"))
    assert missing.returncode == 1 and missing.stderr.startswith("error: no spool directory"), missing.stderr
    # The root itself: its process directories, not "empty" while records wait below it.
    root = cli("status", "--dir", str(spool_dir))
    assert root.returncode == 0 and re.search(r"ingress-3 ", root.stdout), root.stdout
    # Not a spool: refused, and no lock file left in it.
    (tmp_path / "scratch").mkdir()
    (tmp_path / "scratch" / "important.txt").write_text("mine")
    other = cli("drain", "--dir", str(tmp_path / "scratch"))
    assert other.returncode == 1 and "is not a spool directory" in other.stderr, other.stderr
    assert [f.name for f in (tmp_path / "scratch").iterdir()] == ["important.txt"]


@pytest.mark.timeout(900)  # the outage alone is three minutes
def test_a_three_minute_broker_outage_is_invisible_to_sent(
    services: Services, settings: Settings, tmp_path: Path
) -> None:
    """Sent's real retry schedule, 20 events/s, the broker stopped for 3 minutes: every delivery is answered
    200 at its first attempt, and once the broker is back the database equals the oracle."""
    _need_local_broker(services)
    db = settings.database_url.get_secret_value()
    rate, outage_s, seed = 20, 180, 13
    count = rate * (outage_s + 30)
    unique = [smp.body for smp in generate(SampleFactory(seed), ROUTED_TYPES, "mixed", count)]
    proc, base, _ = _start_spooling_ingress(settings, tmp_path, tmp_path / "spool")
    worker = start_worker(settings, tmp_path)
    sender = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sentpipe",
            "send",
            f"{base}/webhooks/sent",
            "--count",
            str(count),
            "--seed",
            str(seed),
            "--shape",
            "mixed",
            "--rate",
            str(rate),
        ],
        env={**settings_env(settings), "COLUMNS": "200"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(10)
        services.stop_kafka()
        try:
            wait_until(lambda: _spooling(base), 30, "/readyz: ready, spooling", proc.tail)
            time.sleep(outage_s)
            # The outage's warning says what Sent sees: an operator reading "refused" took it for 503s.
            logged = proc.log.read_text(errors="replace")
            assert "unreachable (all brokers down): new deliveries go to the spool" in logged, proc.tail()
            assert "refused until" not in logged, proc.tail()
        finally:
            services.start_kafka()
        out, errs = sender.communicate(timeout=outage_s + 300)
        assert sender.returncode == 0, errs
        summary = {k.strip(): v for k, v in re.findall(r"^\W*([a-z][a-z0-9 ]*?)\s*│\s*(\S+)", out, re.M)}
        assert summary.get("accepted") == str(count), out
        assert summary.get("retried") == "0" and summary.get("rejected") == "0", out
        assert int(summary.get("of which spooled", "0")) >= rate * (outage_s - 30), out
        wait_until(lambda: row_count(db) >= len(set(unique)), 300, "every event projected", worker.proc.tail)
        wait_caught_up(settings, 120, "the worker caught up", worker.proc.tail)
    finally:
        if sender.poll() is None:
            sender.kill()
        worker.stop()
        proc.stop()
    exp, got = expected_state(unique), actual_state(db)
    assert (got.message_events, got.inbound, got.template_events) == (
        exp.message_events,
        exp.inbound,
        exp.template_events,
    )
    assert got.message_status == exp.message_status
    assert got.template_status == exp.template_status


def test_an_interrupted_spool_drain_shows_how_far_it_got(settings: Settings, tmp_path: Path) -> None:
    """Ctrl-C in `spool drain` ended in a bare "interrupted": nothing said how many records had reached the
    broker and how many were still spooled. Now the summary table, then one line with both (exit 1)."""
    import signal

    total = 100_000
    spool_dir = tmp_path / "spool"
    directory = process_dir(spool_dir, 4)
    _prefill(directory, settings, total, 100)
    raw = Topics(settings.topic_prefix).raw
    before = record_count(settings.kafka_bootstrap, raw)  # the module's earlier tests' records
    proc = subprocess.Popen(
        [sys.executable, "-m", "sentpipe", "spool", "drain"],
        env=settings_env(settings, spool_dir=spool_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Ctrl-C once the drain has begun: its first records are on the broker.
    wait_until(lambda: record_count(settings.kafka_bootstrap, raw) > before, 120, "the first drained records")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, (out, err)
    line = err.strip().splitlines()[-1]
    found = re.fullmatch(
        r"error: interrupted after (\d+) of (\d+) record\(s\) drained; the rest are still spooled: "
        r"run it again to go on",
        line,
    )
    assert found is not None, err
    drained, of = int(found[1]), int(found[2])
    assert of == total and drained < total, line
    assert re.search(rf"ingress-4 .*interrupted .* {drained} .* {total - drained} ", out), out
    assert status_of(directory).records == total - drained  # what it says is left is what is left
    assert record_count(settings.kafka_bootstrap, raw) - before >= drained
