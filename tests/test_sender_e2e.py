"""`sentpipe send --duplicates 0.3 --shuffle` against the running pipeline ends in the oracle's state."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sentpipe.schemas.events import ROUTED_TYPES
from sentpipe.schemas.samples import SampleFactory
from sentpipe.sender.plan import generate
from sentpipe.settings import Settings
from tests.http_tools import scrape
from tests.oracle import actual_state, expected_state, row_count
from tests.pipeline import start_ingress, start_worker, wait_caught_up, wait_for
from tests.processes import settings_env


def test_sender_with_duplicates_and_shuffle_yields_the_oracle_state(
    settings: Settings, tmp_path: Path
) -> None:
    db = settings.database_url.get_secret_value()
    count, seed = 400, 7
    unique = [s.body for s in generate(SampleFactory(seed), ROUTED_TYPES, "mixed", count)]
    ingress, url, _ = start_ingress(settings, tmp_path)
    worker = start_worker(settings, tmp_path)
    try:
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "sentpipe",
                "send",
                f"{url}/webhooks/sent",
                "--count",
                str(count),
                "--seed",
                str(seed),
                "--shape",
                "mixed",
                "--duplicates",
                "0.3",
                "--shuffle",
                "--concurrency",
                "16",
            ],
            env=settings_env(settings),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert res.returncode == 0, res.stderr
        assert "accepted" in res.stdout + res.stderr
        n_unique = len(set(unique))
        wait_for(lambda: row_count(db), lambda n: n >= n_unique, 120, "events projected", worker.proc.tail)
        # Every record there is applied, duplicates and late status updates too, before the comparison.
        wait_caught_up(settings, 60, "the worker caught up", worker.proc.tail)
    finally:
        worker.stop()
        ingress.stop()
    exp, got = expected_state(unique), actual_state(db)
    assert (got.message_events, got.inbound, got.template_events) == (
        exp.message_events,
        exp.inbound,
        exp.template_events,
    )
    assert got.message_status == exp.message_status
    assert got.template_status == exp.template_status


def _accepted(metrics_port: int) -> float:
    samples = scrape(metrics_port)
    return sum(
        v
        for k, v in samples.items()
        if k.startswith("sentpipe_ingress_requests_total{") and 'outcome="accepted"' in k
    )


@pytest.mark.parametrize("sigint", ["handled", "ignored"])
def test_a_send_stopped_with_sigterm_says_what_was_accepted(
    settings: Settings, tmp_path: Path, sigint: str
) -> None:
    """SIGTERM ended `send` where it stood, without a word (and Ctrl-C printed only "interrupted"): the
    operator could not tell how many deliveries were accepted. It stops as Ctrl-C does now, with the
    summary of what was done before it. Also when started with SIGINT ignored (a shell script's `cmd &`),
    where the SIGTERM was dropped and the send ran to its end."""
    ingress, url, metrics_port = start_ingress(settings, tmp_path)
    try:
        args = ["send", f"{url}/webhooks/sent", "--count", "100000", "--rate", "200"]
        proc = subprocess.Popen(
            [sys.executable, "-m", "sentpipe", *args],
            env=settings_env(settings),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
            if sigint == "ignored"
            else None,
        )
        # Signalled once the ingress has accepted some: after a fixed 3 s, a loaded machine had not yet
        # started the run (status -15) or accepted anything (no summary), and the test failed.
        try:
            wait_for(lambda: _accepted(metrics_port), lambda n: n >= 20, 120, "accepted", ingress.tail)
        except BaseException:
            proc.kill()  # never left sending for minutes after the test
            proc.communicate()
            raise
        proc.send_signal(signal.SIGTERM)
        try:
            out, errs = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            pytest.fail("send went on for a minute after its SIGTERM")
    finally:
        ingress.stop()
    assert proc.returncode == 130 and "Traceback" not in errs, errs
    assert errs.strip().splitlines()[-1] == "interrupted", errs
    accepted = re.search(r"accepted\D+(\d+)", out)
    assert accepted is not None and int(accepted[1]) > 0, out
