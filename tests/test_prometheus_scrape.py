"""A real Prometheus scrapes a running ingress and worker: every metric the dashboard and alert rules use
is really exported, and the rules load."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import psycopg
import pytest

from sentpipe.schemas.events import EventType, frame
from sentpipe.schemas.samples import SampleFactory
from sentpipe.schemas.signature import signature_headers
from sentpipe.settings import Settings
from tests.handlers_fixture import create_fixture_tables
from tests.http_tools import post_all
from tests.pipeline import start_ingress, start_worker, wait_until
from tests.processes import free_port
from tests.test_ops_cli import sentpipe


def _dead_letters(settings: Settings) -> int:
    from tests.kafka_tools import read_topic

    return len(read_topic(settings.kafka_bootstrap, f"{settings.topic_prefix}events.dlq", idle=0.3))


REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "deploy" / "grafana" / "sentpipe.json"
RULES = REPO / "deploy" / "prometheus" / "rules.yml"


def referenced_metrics() -> set[str]:
    text = DASHBOARD.read_text() + RULES.read_text()
    return set(re.findall(r"\bsentpipe_[a-z_]+\b", text))


def _get(url: str) -> dict:  # type: ignore[type-arg]
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())  # type: ignore[no-any-return]


# Grafana's variables as the test's Prometheus sees them (no cluster or namespace label: `.*` matches empty).
VARIABLES = {
    "$cluster": ".*",
    "$namespace": ".*",
    "$ingress_job": "sentpipe-ingress",
    "$worker_job": "sentpipe-worker",
    "$tenant": ".*",
    "$type": ".*",
}
SELECTOR = re.compile(r"\b(sentpipe_[a-z0-9_]+|up|process_[a-z_]+)\b(\{[^{}]*\})?")
BY = re.compile(r"\bby\s*\(([^)]*)\)")
# Labels that Prometheus or the deployment adds, not the code.
TARGET_LABELS = {
    "namespace",
    "job",
    "instance",
    "cluster",
    "service",
    "worker",
    "le",
    "alertname",
    "severity",
}


def queries() -> list[tuple[str, str, str | None]]:
    """(where, expression, legend) of every alert rule and dashboard query, Grafana's variables filled."""
    out: list[tuple[str, str, str | None]] = []
    text = RULES.read_text()
    for m in re.finditer(r"- alert: (\w+)\n\s+expr: (\|\n(?:\s{10,}.*\n)+|.*\n)", text):
        out.append((m.group(1), m.group(2).lstrip("|"), None))
    dash = json.loads(DASHBOARD.read_text())
    for panel in dash["panels"]:
        for t in panel.get("targets", []):
            out.append((f"panel {panel['title']!r}", t["expr"], t.get("legendFormat")))
    for var in dash["templating"]["list"]:
        if var.get("type") == "query":
            out.append((f"variable {var['name']}", var["query"]["query"], None))
    filled = []
    for where, expr, legend in out:
        for var, value in VARIABLES.items():
            expr = expr.replace(var, value)
        filled.append((where, expr, legend))
    return filled


def selector_problems(api: str) -> list[str]:
    """Every selector (name and label matchers, `outcome="accepted"` say) of every rule and dashboard query
    matches series the running processes export, and every `by` label and legend label is one of theirs."""
    problems: list[str] = []
    for where, expr, legend in queries():
        labels: set[str] = set()
        for name, matchers in set(SELECTOR.findall(expr)):
            selector = name + (matchers or "")
            found = _get(f"{api}/series?" + urllib.parse.urlencode({"match[]": selector}))["data"]
            if not found:
                problems.append(f"{where}: {selector} matches no series")
            labels |= {label for series in found for label in series}
        grouped = {x.strip() for by in BY.findall(expr) for x in by.split(",") if x.strip()}
        for label in sorted((grouped - TARGET_LABELS) - labels):
            problems.append(f"{where}: by ({label}) is a label none of its series has")
        shown = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend or ""))
        if grouped and shown - grouped:
            problems.append(f"{where}: legend {legend!r} shows {sorted(shown - grouped)}, not kept by `by`")
    return problems


def test_prometheus_sees_every_metric_the_dashboard_and_rules_use(
    settings: Settings, topics, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.fail("prometheus is not installed: `make check-deploy` installs Debian's prometheus package")
    db = settings.database_url.get_secret_value()
    create_fixture_tables(db)
    f = SampleFactory(41)
    statuses = [s.body for s in f.message_lifecycle()]
    inbound = [f.inbound().body for _ in range(5)]
    templates = [s.body for s in f.template_history()]
    poison = frame(inbound[0], webhook_id=None).event_id
    with psycopg.connect(db, autocommit=True) as c:
        c.execute("INSERT INTO poison VALUES (%s)", (poison,))
        c.execute("INSERT INTO flaky VALUES (%s)", (frame(templates[0], webhook_id=None).event_id,))

    ingress, url, ingress_metrics = start_ingress(settings, tmp_path)
    worker = start_worker(settings, tmp_path, handler_modules=["tests.handlers_fixture"])
    prom_port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        f"""global: {{scrape_interval: 1s, evaluation_interval: 1s}}
rule_files: ["{RULES}"]
scrape_configs:
  - job_name: sentpipe-ingress
    static_configs: [{{targets: ["127.0.0.1:{ingress_metrics}"]}}]
  - job_name: sentpipe-worker
    static_configs: [{{targets: ["127.0.0.1:{worker.metrics_port}"]}}]
"""
    )
    prom = subprocess.Popen(
        [
            prometheus,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "prometheus.log").open("wb"),
    )
    api = f"http://127.0.0.1:{prom_port}/api/v1"
    try:
        secret = settings.webhook_secret.get_secret_value()
        everything = statuses + inbound + templates
        assert (
            asyncio.run(post_all(f"{url}/webhooks/sent", everything + everything[:3], secret)).count(200)
            == len(everything) + 3
        )
        # A bad signature and a signed-but-malformed body: the ingress's failure metrics.
        bad = {
            **signature_headers("whsec_" + "QUJD" * 8, "x", int(time.time()), b"{}"),
            "content-type": "application/json",
        }
        for body, headers in (
            (b"{}", bad),
            (
                b"nope",
                {
                    **signature_headers(secret, "y", int(time.time()), b"nope"),
                    "content-type": "application/json",
                },
            ),
        ):
            with contextlib.suppress(urllib.error.HTTPError):
                urllib.request.urlopen(
                    urllib.request.Request(f"{url}/webhooks/sent", data=body, headers=headers)
                )
        wanted = referenced_metrics() | {"sentpipe_replay_events_total"}
        assert wanted, "no sentpipe metrics referenced: the dashboard or rules moved?"

        def missing() -> set[str]:
            names = set(_get(f"{api}/label/__name__/values")["data"])
            return wanted - names

        wait_until(
            lambda: not missing(),
            120,
            "every referenced metric scraped",
            lambda: f"missing: {sorted(missing())}\n{worker.proc.tail()}",
        )
        # Each process serves its own role's series: a worker once exported sentpipe_ingress_accepting 0 (and
        # the spool's), an ingress the worker's stall and dedup gauges.
        for job, others in (
            ("sentpipe-worker", "sentpipe_(ingress|spool)_.+"),
            (
                "sentpipe-ingress",
                "sentpipe_(events|duplicates|raw|dedup|handler|retries|end|consumer|worker|replay)_.+",
            ),
        ):
            selector = f'{{job="{job}",__name__=~"{others}"}}'
            found = _get(f"{api}/series?" + urllib.parse.urlencode({"match[]": selector}))["data"]
            assert not found, f"{job} exports another role's series: {sorted({s['__name__'] for s in found})}"
        up = _get(f"{api}/query?query=up")["data"]["result"]
        assert {res["metric"]["job"]: res["value"][1] for res in up} == {
            "sentpipe-ingress": "1",
            "sentpipe-worker": "1",
        }

        # A real replay and a real redrive: the worker counts what it applies of them.
        def applied(mode: str) -> float:
            res = _get(
                f"{api}/query?query=sentpipe_replay_events_total{{mode=%22{mode}%22,outcome=%22applied%22}}"
            )
            return sum(float(x["value"][1]) for x in res["data"]["result"])

        assert applied("replay") == 0 and applied("redrive") == 0
        wait_until(lambda: _dead_letters(settings) >= 1, 60, "the poisoned event dead-lettered")
        with psycopg.connect(db, autocommit=True) as c:
            c.execute("DELETE FROM poison")
        res = sentpipe(settings, "replay", "--type", "message.status.updated")
        assert res.returncode == 0, res.stderr
        res = sentpipe(settings, "dlq", "redrive", "--stage", "handler")
        assert res.returncode == 0, res.stderr
        wait_until(
            lambda: applied("replay") >= len(statuses), 60, "replayed records counted", worker.proc.tail
        )
        wait_until(lambda: applied("redrive") >= 1, 60, "the redriven record counted", worker.proc.tail)

        groups = _get(f"{api}/rules")["data"]["groups"]
        assert sum(len(g["rules"]) for g in groups) > 0
        assert all(rule["health"] != "err" for g in groups for rule in g["rules"])

        # The names are there; so must be the label values the rules and panels select and group by.
        problems = selector_problems(api)
        assert not problems, "\n".join(problems)

        # Label values stay bounded whatever a request says: a tenant in the path that has no secret is
        # counted as "unknown", an event type nobody knows as a known label, never as the text sent.
        stranger = "t" + uuid.uuid4().hex
        odd_type = "x_" + uuid.uuid4().hex
        doc = {"field": odd_type, "timestamp": "2026-01-01T00:00:00Z", "payload": {"id": stranger}}
        body = json.dumps(doc).encode()
        for path, key in ((f"/webhooks/sent/{stranger}", "whsec_" + "QUJD" * 8), ("/webhooks/sent", secret)):
            headers = {
                **signature_headers(key, stranger, int(time.time()), body),
                "content-type": "application/json",
            }
            with contextlib.suppress(urllib.error.HTTPError):
                urllib.request.urlopen(urllib.request.Request(f"{url}{path}", data=body, headers=headers))

        def count(selector: str) -> float:
            res = _get(f"{api}/query?" + urllib.parse.urlencode({"query": f"sum({selector})"}))
            return sum(float(x["value"][1]) for x in res["data"]["result"])

        probe = 'sentpipe_ingress_requests_total{tenant="unknown", outcome="signature_unknown_tenant"}'
        wait_until(lambda: count(probe) >= 1, 30, "the unknown tenant's request counted as tenant unknown")
        unrouted = 'sentpipe_events_routed_total{type="unrouted"}'
        wait_until(lambda: count(unrouted) >= 1, 60, "the unknown type routed as unrouted", worker.proc.tail)
        tenants = {*settings.tenant_secrets(), "unknown"}
        types = {t.value for t in EventType} | {"unknown"}
        every = _get(f"{api}/series?" + urllib.parse.urlencode({"match[]": '{__name__=~"sentpipe_.*"}'}))
        for series in every["data"]:
            values = set(series.values()) - {series["__name__"]}
            assert not any(stranger in v or odd_type in v or secret in v for v in values), series
            assert series.get("tenant", "unknown") in tenants, series
            assert series.get("type", "unknown") in types, series
    finally:
        prom.terminate()
        prom.wait(20)
        worker.stop()
        ingress.stop()
