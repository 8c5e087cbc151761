"""Replays and redrives started from the console, against the real broker: what a confirmed run reads, and
how a running one ends when the console is stopped."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import ClientSession, CookieJar, web
from aiohttp.test_utils import TestServer
from pydantic import SecretStr

from sentpipe.console import create_app
from sentpipe.console.app import JOBS, describe_error
from sentpipe.console.jobs import Job
from sentpipe.processors import replay as replay_ops
from sentpipe.processors.offsets import Window, make_window
from sentpipe.schemas.topics import Topics
from sentpipe.settings import Settings
from tests.kafka_tools import end_offsets, wait_topics_ready
from tests.pipeline import own_topics
from tests.test_console_security import TOKEN, sign_in
from tests.test_console_tail import produce
from tests.test_dlq import still_failing_dead_letters


@pytest.fixture
def app(settings: Settings) -> web.Application:
    return create_app(
        settings.model_copy(update={"console_token": SecretStr(TOKEN), "console_metrics_urls": []})
    )


@pytest.fixture
async def server(app: web.Application) -> AsyncIterator[TestServer]:
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield server
    await server.close()


async def run_job(
    client: ClientSession, base: str, csrf: str, path: str, body: dict[str, Any]
) -> dict[str, Any]:
    """Starts a job and polls it to its end; its result."""
    async with client.post(f"{base}{path}", json=body, headers={"X-CSRF-Token": csrf}) as resp:
        job = await resp.json()
        assert resp.status == 202, job
    while job["state"] == "running":
        await asyncio.sleep(0.2)
        async with client.get(f"{base}/api/jobs/{job['id']}") as resp:
            job = await resp.json()
    assert job["state"] == "done", job["error"]
    return job["result"]


async def test_a_confirmed_run_reads_exactly_what_its_dry_run_counted(
    settings: Settings, topics: Topics, server: TestServer
) -> None:
    """ "Replay 3 event(s)" replayed 5 when 2 more had come in since the dry run: the real run looked up
    its end offsets again. The same for a redrive."""
    base = f"http://127.0.0.1:{server.port}"
    # The redrive reads its ledger's offsets: a topic made moments ago may not have its leader yet.
    wait_topics_ready(settings.kafka_bootstrap, [topics.dlq_redriven])
    async with ClientSession(cookie_jar=CookieJar(unsafe=True)) as client:
        status, csrf = await sign_in(client, base)
        assert status == 303
        produce(settings, topics.raw, 3)
        dry = await run_job(client, base, csrf, "/api/replay", {"dry_run": True})
        assert dry["sent"] == 3, dry
        produce(settings, topics.raw, 2)
        done = await run_job(client, base, csrf, "/api/replay", {"dry_run": False})
        assert (done["read"], done["produced"]) == (3, 3), done

        still_failing_dead_letters(settings, topics, 3)
        dry = await run_job(client, base, csrf, "/api/dlq/redrive", {"dry_run": True})
        assert (dry["read"], dry["failed"]) == (3, 3), dry
        still_failing_dead_letters(settings, topics, 2)
        done = await run_job(client, base, csrf, "/api/dlq/redrive", {"dry_run": False})
        assert (done["read"], done["failed"]) == (3, 3), done


async def test_stopping_the_console_stops_a_running_replay_and_waits_for_it(
    settings: Settings, topics: Topics, app: web.Application, server: TestServer
) -> None:
    """SIGTERM never reached a job's thread: the replay went on, and the process with it until SIGKILL,
    perhaps between a send and its ledger record."""
    produce(settings, topics.raw, 20)
    reading = threading.Event()

    def work(progress: replay_ops.Progress, stop: threading.Event) -> replay_ops.RunResult:
        def held(done: int, total: int) -> None:
            if total and not reading.is_set():  # the ranges are known, no record read: hold it here
                reading.set()
                stop.wait()

        return replay_ops.replay(settings, Window(), replay_ops.Filter(), progress=held, stop=stop)

    job = app[JOBS].start(Job("replay", False, "-", "-"), work, lambda job: None, describe_error)
    assert await asyncio.get_running_loop().run_in_executor(None, reading.wait, 60)
    await server.close()  # what SIGTERM ends in (`_serve`): the app's shutdown
    assert job.state == "stopped" and job.finished is not None, job
    assert job.error is not None and "interrupted after 0 of 20 records" in job.error, job.error


async def test_the_stop_button_stops_a_running_replay_where_it_is(
    settings: Settings, topics: Topics, app: web.Application, server: TestServer
) -> None:
    """A replay started by mistake (or too wide) ran to its end: the console had no way to stop it. Stopped,
    it ends `stopped` with the line that says how far it got; a stopped dry run confirms nothing."""
    produce(settings, topics.raw, 20)
    reading = threading.Event()
    confirmed: list[Job] = []

    def work(progress: replay_ops.Progress, stop: threading.Event) -> replay_ops.RunResult:
        def held(done: int, total: int) -> None:
            if total and not reading.is_set():  # the ranges are known, no record read: hold it here
                reading.set()
                stop.wait()

        return replay_ops.replay(
            settings, Window(), replay_ops.Filter(), dry_run=True, progress=held, stop=stop
        )

    base = f"http://127.0.0.1:{server.port}"
    async with ClientSession(cookie_jar=CookieJar(unsafe=True)) as client:
        status, csrf = await sign_in(client, base)
        assert status == 303
        job = app[JOBS].start(Job("replay", True, "-", "-"), work, confirmed.append, describe_error)
        assert await asyncio.get_running_loop().run_in_executor(None, reading.wait, 60)
        async with client.post(f"{base}/api/jobs/{job.id}/stop") as resp:
            assert resp.status == 403  # a POST without the page's CSRF token
        assert job.state == "running" and not job.stop.is_set()
        headers = {"X-CSRF-Token": csrf}
        async with client.post(f"{base}/api/jobs/{job.id}/stop", headers=headers) as resp:
            answer = await resp.json()
            assert resp.status == 202 and answer["id"] == job.id, answer
        for _ in range(300):
            async with client.get(f"{base}/api/jobs/{job.id}") as resp:
                seen = await resp.json()
            if seen["state"] != "running":
                break
            assert seen["stopping"] is True, seen
            await asyncio.sleep(0.1)
        assert seen["state"] == "stopped", seen
        assert "interrupted after 0 of 20 records" in seen["error"], seen
        assert confirmed == []  # on_done (which confirms a dry run) never ran
        async with client.post(f"{base}/api/jobs/{job.id}/stop", headers=headers) as resp:
            assert resp.status == 409 and (await resp.json())["code"] == "job_not_running"
        async with client.post(f"{base}/api/jobs/current/stop", headers=headers) as resp:
            assert resp.status == 409
        async with client.post(f"{base}/api/jobs/no-such-job/stop", headers=headers) as resp:
            assert resp.status == 404


async def test_a_stopped_replay_of_many_partitions_names_every_one_to_go_on_from(settings: Settings) -> None:
    """The job's error was cut at 300 characters: with 12 partitions (the default) or more, the line that says
    where to go on ended "run it with from_offsets 0:1827, ..., 10:1..." and the partitions after the cut
    were not named, so a replay run with what it said never sent their records."""
    wide = own_topics(settings, "wide", raw_partitions=24)
    raw = Topics(wide.topic_prefix).raw
    produce(wide, raw, 60)
    app = create_app(wide.model_copy(update={"console_token": SecretStr(TOKEN), "console_metrics_urls": []}))
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    reading = threading.Event()
    window = make_window(fields=True)

    def work(progress: replay_ops.Progress, stop: threading.Event) -> replay_ops.RunResult:
        def held(done: int, total: int) -> None:
            if total and not reading.is_set():  # the ranges are known, no record read: hold it here
                reading.set()
                stop.wait()

        return replay_ops.replay(wide, window, replay_ops.Filter(), progress=held, stop=stop)

    try:
        job = app[JOBS].start(Job("replay", False, "-", "-"), work, lambda job: None, describe_error)
        assert await asyncio.get_running_loop().run_in_executor(None, reading.wait, 60)
        assert app[JOBS].request_stop(job.id) is job
    finally:
        await server.close()  # waits for the running job
    assert job.state == "stopped" and job.error is not None, job
    m = re.search(r"run it with from_offsets ([0-9:, ]+) \(and its other fields\)$", job.error)
    assert m is not None, job.error
    named = dict(tuple(map(int, spec.split(":"))) for spec in m[1].split(", "))
    holding = {p for p, n in end_offsets(wide.kafka_bootstrap, raw).items() if n}
    assert len(holding) > 12 and named == dict.fromkeys(holding, 0), job.error
    go_on = make_window(from_offsets=m[1].split(", "), fields=True)
    rest = replay_ops.replay(wide, go_on, replay_ops.Filter())
    assert (rest.read, rest.produced) == (60, 60), rest
