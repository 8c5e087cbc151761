"""Static checks of the deployment files that need no services: the dashboard and the alert rules use only
metrics that sentpipe exports, and no signing secret is committed. deploy/check.sh covers the rest
(helm, kubeconform, promtool, compose schema, hadolint)."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.metrics import MetricWrapperBase

import sentpipe.metrics
from sentpipe.loop_metrics import LoopCounter, LoopHistogram
from sentpipe.settings import UNKNOWN_TENANT, tenant_name_problem

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy/grafana/sentpipe.json"
RULES = ROOT / "deploy/prometheus/rules.yml"
RULES_TEST = ROOT / "deploy/prometheus/rules_test.yml"
COMPOSE_PROMETHEUS = ROOT / "deploy/compose/prometheus.yml"

METRIC_REF = re.compile(r"\bsentpipe_[a-z0-9_]+")
# Sent's signing secrets: whsec_ followed by base64 of the key.
SECRET = re.compile(r"whsec_[A-Za-z0-9+/]{16,}={0,2}")

# The series names prometheus_client exposes for each metric type.
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "enum": ("",),
}


def exported_series() -> set[str]:
    names: set[str] = set()
    for collector in vars(sentpipe.metrics).values():
        if not isinstance(collector, (MetricWrapperBase, LoopCounter, LoopHistogram)):
            continue
        for family in collector.describe():
            names.update(family.name + suffix for suffix in SUFFIXES[family.type])
    return names


def test_every_metric_is_served_by_a_role() -> None:
    """A metric no role's registry holds would be declared and updated but never scraped."""
    served = {family.name for reg in sentpipe.metrics.SERVED.values() for family in reg.collect()}
    unserved = [
        name
        for name, collector in vars(sentpipe.metrics).items()
        if isinstance(collector, (MetricWrapperBase, LoopCounter, LoopHistogram))
        and {family.name for family in collector.describe()} - served
    ]
    assert not unserved, f"add these to a role in sentpipe.metrics.SERVED: {unserved}"


def referenced(path: Path) -> set[str]:
    return set(METRIC_REF.findall(path.read_text()))


def test_metrics_module_exports_sentpipe_metrics() -> None:
    series = exported_series()
    assert "sentpipe_ingress_requests_total" in series
    assert "sentpipe_end_to_end_lag_seconds_bucket" in series


@pytest.mark.parametrize("path", [DASHBOARD, RULES, RULES_TEST], ids=lambda p: p.name)
def test_every_referenced_metric_exists(path: Path) -> None:
    refs = referenced(path)
    assert refs, f"{path.name} references no sentpipe metric"
    unknown = sorted(refs - exported_series())
    assert not unknown, f"{path.relative_to(ROOT)} uses metrics not defined in sentpipe/metrics.py: {unknown}"


def test_dashboard_is_valid_json_with_panels() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "sentpipe"
    panels = [p for p in dash["panels"] if p.get("type") != "row"]
    assert len(panels) >= 10
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    for panel in panels:
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        assert panel["datasource"]["uid"] == "${datasource}", f"panel {panel['title']!r} pins a data source"
        for target in panel["targets"]:
            assert target["expr"].strip()


def _unit_of(panel: dict[str, Any], target: dict[str, Any]) -> str | None:
    """The unit Grafana shows one query's series in: an override naming its query (refId) or its legend,
    else the panel's default."""
    unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit")
    for override in panel.get("fieldConfig", {}).get("overrides", []):
        matcher = override["matcher"]
        if (matcher["id"], matcher.get("options")) in (
            ("byFrameRefID", target["refId"]),
            ("byName", target.get("legendFormat")),
        ):
            for prop in override["properties"]:
                if prop["id"] == "unit":
                    unit = prop["value"]
    return unit


def test_every_dashboard_query_in_seconds_is_drawn_in_seconds() -> None:
    """A duration drawn as a plain number on an axis of record counts reads as records: the spool's oldest
    age (300 at SentpipeSpoolBacklog's threshold) was drawn on the records' axis, unit `short`."""
    wrong = [
        f"{panel['title']!r} {target['refId']}: {_unit_of(panel, target)}"
        for panel in json.loads(DASHBOARD.read_text())["panels"]
        for target in panel.get("targets", [])
        if re.search(r"\bsentpipe_[a-z0-9_]+_seconds(_bucket)?\b", target["expr"])
        and _unit_of(panel, target) != "s"
    ]
    assert not wrong, f"queries of durations not shown in seconds: {wrong}"


def test_alert_job_names_match_the_compose_scrape_config() -> None:
    alerted = set(re.findall(r'job="([^"]+)"', RULES.read_text()))
    scraped = set(re.findall(r"job_name:\s*([\w.-]+)", COMPOSE_PROMETHEUS.read_text()))
    assert alerted == {"sentpipe-ingress", "sentpipe-worker"}
    assert alerted <= scraped


def test_the_alert_leaving_out_tenants_without_a_secret_names_the_label_no_tenant_may_take() -> None:
    """SentpipeSignatureFailuresAll leaves out the label of path tenants with no secret; the settings refuse
    that name for a configured tenant, which would otherwise be counted among them and never page."""
    assert RULES.read_text().count(f'tenant!="{UNKNOWN_TENANT}"') == 2
    assert tenant_name_problem(UNKNOWN_TENANT) is not None


def deploy_files() -> list[Path]:
    files = [ROOT / "Dockerfile", ROOT / ".dockerignore"]
    for folder in ("deploy/compose", "deploy/helm"):
        files += [p for p in sorted((ROOT / folder).rglob("*")) if p.is_file()]
    return [p for p in files if p.exists()]


def test_no_signing_secret_is_committed() -> None:
    files = deploy_files()
    assert any(p.name == "docker-compose.yml" for p in files)
    leaks = [
        f"{p.relative_to(ROOT)}: {m.group()[:12]}..."
        for p in files
        for m in SECRET.finditer(p.read_text(errors="replace"))
    ]
    assert not leaks, f"signing secrets in deployment files: {leaks}"


def test_compose_requires_the_webhook_secret_from_the_environment() -> None:
    compose = (ROOT / "deploy/compose/docker-compose.yml").read_text()
    assert re.search(r"SENTPIPE_WEBHOOK_SECRET: \$\{SENTPIPE_WEBHOOK_SECRET:\?", compose)


# --- the image -------------------------------------------------------------------------------------------
def test_the_image_installs_the_lock_with_hashes_before_the_source() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["rocksdb"]]
    lock = (ROOT / "requirements.lock").read_text()
    pinned = {m.group(1).lower(): m.group(0) for m in re.finditer(r"^([A-Za-z0-9_.-]+)==\S+", lock, re.M)}
    for requirement in wanted:
        name = re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower()
        assert name in pinned, f"{name} (pyproject.toml) is not in requirements.lock: run `make lock`"
    blocks = re.split(r"\n(?=[A-Za-z0-9_.-]+==)", lock.split("\n\n", 1)[-1])
    assert all("--hash=sha256:" in b for b in blocks if "==" in b), "every locked requirement needs a hash"
    docker = (ROOT / "Dockerfile").read_text()
    assert (
        docker.index("COPY requirements.lock") < docker.index("--require-hashes") < docker.index("COPY . .")
    )
    assert ".env" in (ROOT / ".dockerignore").read_text()


def test_the_image_base_is_pinned_by_digest() -> None:
    docker = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", docker, re.M)
    assert base, "the Dockerfile names its base in ARG PYTHON_IMAGE"
    assert re.fullmatch(r"python:3\.11-slim-bookworm@sha256:[0-9a-f]{64}", base.group(1)), base.group(1)
    stages = re.findall(r"^FROM (\S+)", docker, re.M)
    assert stages and all(s == "${PYTHON_IMAGE}" for s in stages), stages


@pytest.mark.parametrize(
    ("answers", "healthy"),
    [
        ({"/livez": 200, "/readyz": 200}, True),
        ({"/livez": 200, "/readyz": 503}, False),  # the dedup table still restoring
        ({"/livez": 503, "/readyz": 200}, False),  # stalled
    ],
)
def test_the_compose_worker_is_healthy_only_when_live_and_ready(
    answers: dict[str, int], healthy: bool
) -> None:
    """Run the compose worker's healthcheck command against a stand-in for the worker's probes."""
    import subprocess
    import sys
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Probes(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(answers.get(self.path, 404))
            self.end_headers()

        def log_message(self, *_: object) -> None:
            pass

    compose = (ROOT / "deploy/compose/docker-compose.yml").read_text()
    worker = re.search(r"^  worker:\n(.*?)^  \w", compose, re.M | re.S)
    assert worker
    line = re.search(r"^      test: (\[.*\])$", worker.group(1), re.M)
    assert line, "the worker's healthcheck test is one flow sequence"
    kind, program, flag, code = json.loads(line.group(1))  # a YAML flow sequence of double-quoted strings
    assert (kind, program, flag) == ("CMD", "python", "-c")
    server = ThreadingHTTPServer(("127.0.0.1", 0), Probes)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        code = code.replace("127.0.0.1:9101", f"127.0.0.1:{server.server_port}")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30)
    finally:
        server.shutdown()
    assert (done.returncode == 0) is healthy, done.stderr.decode()[-300:]


def test_the_chart_derives_the_app_id_as_the_app_does() -> None:
    """deploy/check_chart.py renders the chart's `sentpipe.appId` against this table; the app must agree."""
    from sentpipe.settings import default_app_id

    source = (ROOT / "deploy/check_chart.py").read_text()
    table = re.search(r"^APP_IDS = (\{.*?\})$", source, re.M | re.S)
    assert table is not None
    for prefix, want in ast.literal_eval(table.group(1)).items():
        assert default_app_id(prefix) == want, prefix
