"""The overview's numbers against what the services' metrics endpoints really said: real HTTP endpoints
serving Prometheus text, scraped as the console scrapes them."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestServer

from sentpipe.console import create_app
from sentpipe.console.app import SAMPLER
from sentpipe.settings import Settings


class Worker:
    """A worker's metrics endpoint: its duplicates counter, or 503 while `down`."""

    def __init__(self) -> None:
        self.duplicates = 0.0
        self.down = False

    async def metrics(self, request: web.Request) -> web.Response:
        if self.down:
            return web.Response(status=503, text="busy")
        text = (
            "# TYPE sentpipe_duplicates_dropped_total counter\n"
            f"sentpipe_duplicates_dropped_total {self.duplicates}\n"
        )
        return web.Response(text=text, content_type="text/plain")


@pytest.fixture
async def workers() -> AsyncIterator[list[tuple[Worker, str]]]:
    out, servers = [], []
    for _ in range(2):
        worker = Worker()
        app = web.Application()
        app.router.add_get("/metrics", worker.metrics)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        out.append((worker, f"http://127.0.0.1:{server.port}/metrics"))
    yield out
    for server in servers:
        await server.close()


async def test_one_worker_missing_a_scrape_is_no_burst_of_duplicates(
    settings: Settings, workers: list[tuple[Worker, str]]
) -> None:
    """Summed over the endpoints before the increase was taken, a worker that missed one scrape took its
    whole counter out of the sum and put it back at the next: the chart showed every duplicate that worker
    had ever dropped as dropped in that minute."""
    (a, url_a), (b, url_b) = workers
    sampler = create_app(settings.model_copy(update={"console_metrics_urls": [url_a, url_b]}))[SAMPLER]
    now = int(time.time() * 1000)  # one minute for every sample: what each adds shows in the last bucket
    a.duplicates, b.duplicates = 10, 1000
    async with ClientSession() as http:
        sampler.scraped.append((now, await sampler._scrape(http)))
        a.duplicates, b.down = 11, True
        sampler.scraped.append((now, await sampler._scrape(http)))
        a.duplicates, b.duplicates, b.down = 12, 1001, False
        sampler.scraped.append((now, await sampler._scrape(http)))
    overview = sampler.overview()
    assert overview["duplicates"][-1] == 3  # 2 dropped by the one, 1 by the other
    assert overview["totals"]["duplicates_dropped_total"] == 1013
    # A worker that restarted starts its counter again: nothing is taken off the others' increase.
    async with ClientSession() as http:
        a.duplicates, b.duplicates = 13, 0
        sampler.scraped.append((now, await sampler._scrape(http)))
    assert sampler.overview()["duplicates"][-1] == 3 + 1


async def test_events_in_the_last_minute_are_those_of_the_last_whole_minute(settings: Settings) -> None:
    """The minute under way was shown: a few seconds into a minute it read about 0 under steady traffic."""
    sampler = create_app(settings)[SAMPLER]
    row = {"kind": "raw", "type": "message.status.updated", "tenant": "acme"}
    while True:
        now_min = int(time.time() * 1000) // 60_000
        sampler.tail.stats.add([{**row, "time": (now_min - 1) * 60_000 + i} for i in range(7)])
        sampler.tail.stats.add([{**row, "time": now_min * 60_000}])
        totals = sampler.overview()["totals"]
        if int(time.time() * 1000) // 60_000 == now_min:  # else read across a minute's turn: again
            break
        sampler = create_app(settings)[SAMPLER]
    assert (totals["events_in_last_minute"], totals["events_in_last_hour"]) == (7, 8), totals


async def test_an_endpoint_listed_twice_is_scraped_once(
    settings: Settings, workers: list[tuple[Worker, str]]
) -> None:
    """SENTPIPE_CONSOLE_METRICS_URLS with one endpoint twice (the same URL, or one with and one without its
    credentials) summed that endpoint's counters twice: every duplicate dropped showed as two."""
    (a, url_a), _ = workers
    with_user = url_a.replace("http://", "http://scraper:pw@")
    sampler = create_app(settings.model_copy(update={"console_metrics_urls": [url_a, url_a, with_user]}))[
        SAMPLER
    ]
    now = int(time.time() * 1000)
    a.duplicates = 10
    async with ClientSession() as http:
        sampler.scraped.append((now, await sampler._scrape(http)))
        a.duplicates = 12
        sampler.scraped.append((now, await sampler._scrape(http)))
    overview = sampler.overview()
    assert overview["totals"]["duplicates_dropped_total"] == 12
    assert overview["duplicates"][-1] == 2
