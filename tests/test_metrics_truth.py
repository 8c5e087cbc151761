"""The alert rules and the dashboard against what the code really does: an alert fed the series the code's own
retry schedule produces, and the service-level graph's target lines against the targets the stats and the
alerts use. Pure logic and promtool; tests/test_prometheus_scrape.py checks the names and label values
against a real scrape."""

from __future__ import annotations

import itertools
import json
import random
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from sentpipe.processors.retry import backoff
from sentpipe.settings import Settings

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "deploy" / "prometheus" / "rules.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "sentpipe.json"
SCRAPE_S = 30  # the chart's scrape interval, as in deploy/prometheus/rules_test.yml


def _alert(name: str) -> dict[str, str]:
    """The `expr` and `for` of one alert in rules.yml (PyYAML is not among the project's dependencies; the
    file's layout is fixed: `expr:` inline or as a `|` block, then `for:`)."""
    lines = RULES.read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == f"- alert: {name}"), None)
    assert start is not None, f"no alert {name} in {RULES}"
    rule: dict[str, str] = {}
    i = start + 1
    while i < len(lines) and not lines[i].lstrip().startswith("- "):
        key, _, value = lines[i].strip().partition(":")
        if key == "expr" and value.strip() == "|":
            indent = len(lines[i]) - len(lines[i].lstrip())
            block = []
            while i + 1 < len(lines) and (
                not lines[i + 1].strip() or len(lines[i + 1]) - len(lines[i + 1].lstrip()) > indent
            ):
                i += 1
                block.append(lines[i].strip())
            rule["expr"] = "\n".join(block).strip()
        elif key in ("expr", "for"):
            rule[key] = value.strip()
        i += 1
    assert "expr" in rule, f"{name}: no expr found"
    return rule


def _promtool() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed: `make check-deploy` installs Debian's prometheus package")
    return promtool


def _retry_times(outage_s: tuple[float, float], attempt_s: float, seed: int) -> list[float]:
    """When one retry loop (processors/retry.py `retrying`) counts its retries while a dependency is away:
    each failed attempt takes `attempt_s`, then sleeps `backoff(attempt, ...)` with the default settings."""
    initial = Settings.model_fields["retry_initial_s"].default
    cap = Settings.model_fields["retry_max_s"].default
    state = random.getstate()
    random.seed(seed)
    try:
        t, attempt, times = outage_s[0], 1, []
        while t + attempt_s < outage_s[1]:
            t += attempt_s
            times.append(t)  # the attempt failed: counted, then the backoff
            t += backoff(attempt, initial, cap)
            attempt += 1
    finally:
        random.setstate(state)
    return times


@pytest.mark.parametrize(
    ("attempt_s", "seed"),
    # A dead database answers at once (connection refused) or after the pool's 5 s timeout.
    [(0.0, 1), (0.0, 2), (5.0, 3)],
)
def test_the_retry_alert_fires_while_one_worker_retries_at_the_code_s_backoff(
    tmp_path: Path, attempt_s: float, seed: int
) -> None:
    """One projector retrying against a database that is away for 20 minutes: the alert whose runbook is
    "a dependency is down or slow" has to fire, and has to resolve once the retries stop."""
    promtool = _promtool()
    # The rule's expression and `for:`, without its labels and annotations: the condition is under test.
    rule = {"alert": "SentpipeRetriesSustained", **_alert("SentpipeRetriesSustained")}
    # JSON is YAML: promtool reads both files as they are written here.
    (tmp_path / "rules.yml").write_text(json.dumps({"groups": [{"name": "r", "rules": [rule]}]}))
    outage = (60.0, 60.0 + 20 * 60)
    times = _retry_times(outage, attempt_s, seed)
    samples = [sum(1 for t in times if t <= s) for s in range(0, 40 * 60, SCRAPE_S)]
    test = {
        "rule_files": ["rules.yml"],
        "evaluation_interval": f"{SCRAPE_S}s",
        "tests": [
            {
                "interval": f"{SCRAPE_S}s",
                "input_series": [
                    {
                        "series": 'sentpipe_retries_total{namespace="sp", job="sentpipe-worker", '
                        'instance="10.0.1.1:9101", stage="project"}',
                        # No sample before the process exists, then created at zero (processors/worker.py).
                        "values": "_x2 " + " ".join(str(v) for v in samples),
                    }
                ],
                "alert_rule_test": [
                    {
                        "eval_time": "18m",
                        "alertname": "SentpipeRetriesSustained",
                        "exp_alerts": [
                            {"exp_labels": {"namespace": "sp", "job": "sentpipe-worker", "stage": "project"}}
                        ],
                    },
                    # Ten minutes after the outage: the retries stopped, the alert resolved.
                    {"eval_time": "32m", "alertname": "SentpipeRetriesSustained", "exp_alerts": []},
                ],
            }
        ],
    }
    (tmp_path / "test.yml").write_text(json.dumps(test))
    res = subprocess.run(
        [promtool, "test", "rules", "test.yml"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    rate = len(times) / (outage[1] - outage[0])
    assert res.returncode == 0, (
        f"{len(times)} retries ({rate:.3f}/s) in the outage:\n{res.stdout}{res.stderr}"
    )


def _thresholds(panel: dict[str, Any], legend: str) -> tuple[list[float], str]:
    """The threshold values and their draw style that apply to the series named `legend` in `panel`."""
    defaults = panel["fieldConfig"]["defaults"]
    steps = defaults.get("thresholds", {}).get("steps", [])
    style = defaults.get("custom", {}).get("thresholdsStyle", {}).get("mode", "off")
    for override in panel["fieldConfig"].get("overrides", []):
        if override["matcher"] == {"id": "byName", "options": legend}:
            for prop in override["properties"]:
                if prop["id"] == "thresholds":
                    steps = prop["value"]["steps"]
                elif prop["id"] == "custom.thresholdsStyle":
                    style = prop["value"]["mode"]
    return [s["value"] for s in steps if s["value"] is not None], style


def test_the_service_level_graph_draws_the_targets_the_stats_and_the_alert_use() -> None:
    """deploy/README.md: the service-level row shows the 2xx ratio against 99.9% and projection lag p99
    against 30 s "over the time range and as a graph with the target lines"."""
    panels = {p["title"]: p for p in json.loads(DASHBOARD.read_text())["panels"]}
    ratio_stat = panels["Deliveries answered 2xx (target 99.9%)"]
    lag_stat = panels["Projection lag p99 (target 30 s)"]
    graph = panels["2xx ratio and projection lag p99 against their targets"]
    ratio_target = ratio_stat["fieldConfig"]["defaults"]["thresholds"]["steps"][-1]["value"]
    lag_target = lag_stat["fieldConfig"]["defaults"]["thresholds"]["steps"][-1]["value"]
    alert = re.search(r"\)\s*>\s*([0-9.]+)\s*$", str(_alert("SentpipeEndToEndLagHigh")["expr"]))
    assert alert is not None
    assert (ratio_target, lag_target, float(alert.group(1))) == (0.999, 30, 30)
    legends = {t["legendFormat"] for t in graph["targets"]}
    assert legends == {"2xx ratio", "projection lag p99"}
    for legend, target in (("2xx ratio", ratio_target), ("projection lag p99", lag_target)):
        values, style = _thresholds(graph, legend)
        assert style != "off", f"{legend!r}: its thresholds are not drawn, so no target line"
        assert target in values, f"{legend!r}: no threshold at its target {target} (has {values})"


def test_the_end_to_end_lag_buckets_read_a_backlog_s_p99_near_its_value() -> None:
    """histogram_quantile draws a straight line through the bucket a quantile falls in: with bounds 60 then
    300, every lag between read as anywhere up to 300 s."""
    from sentpipe.metrics import END_TO_END_LAG_SECONDS

    bounds = [b for b in END_TO_END_LAG_SECONDS._upper_bounds if b != float("inf")]
    wide = [(lo, hi) for lo, hi in itertools.pairwise(bounds) if lo >= 1.0 and hi / lo > 2.5]
    assert not wide, f"buckets too wide to read a p99 from: {wide}"
    assert bounds[-1] >= 3600.0, "an hour's backlog must still fall in a bucket"
