"""Conventions of deploy/prometheus/rules.yml that promtool does not check (run by deploy/check.sh):
a severity and a runbook_url naming a real section of deploy/README.md on every alert, `namespace` and
`job` kept by every aggregation, rate windows of at least four 30 s scrapes, a promtool test per alert
where it fires and one where it stays silent."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy/prometheus/rules.yml"
RULES_TEST = ROOT / "deploy/prometheus/rules_test.yml"


def alert_rules() -> list[dict[str, object]]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r]


def readme_anchors() -> set[str]:
    """GitHub's anchors for deploy/README.md's headings: lower case, spaces to dashes, punctuation dropped."""
    heads = re.findall(r"^#+\s+(.+)$", (ROOT / "deploy/README.md").read_text(), re.M)
    return {re.sub(r"[^a-z0-9 _-]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def test_every_alert_has_a_severity_and_a_runbook_section_that_exists() -> None:
    anchors = readme_anchors()
    for rule in alert_rules():
        labels, notes = rule["labels"], rule["annotations"]
        assert isinstance(labels, dict) and isinstance(notes, dict)
        assert labels["severity"] in ("critical", "warning"), rule["alert"]
        url = notes["runbook_url"]
        assert url == f"deploy/README.md#{str(rule['alert']).lower()}", (rule["alert"], url)
        assert url.split("#")[1] in anchors, f"{rule['alert']}: no section {url} in deploy/README.md"
        assert "runbook" not in notes or "runbook_url" in notes


def test_aggregations_keep_namespace_and_job_and_windows_cover_four_scrapes() -> None:
    for rule in alert_rules():
        expr = str(rule["expr"])
        for by in re.findall(r"\bby\s*\(([^)]*)\)", expr):
            labels = {x.strip() for x in by.split(",")}
            assert "namespace" in labels, f"{rule['alert']}: by ({by}) drops namespace"
            # Only the end-to-end rule joins two jobs (ingress and worker): there namespace alone is the key.
            if rule["alert"] != "SentpipeNothingProjected":
                assert "job" in labels, f"{rule['alert']}: by ({by}) drops job"
        for window in re.findall(r"\[(\d+)([smh])\]", expr):
            seconds = int(window[0]) * {"s": 1, "m": 60, "h": 3600}[window[1]]
            assert seconds >= 120, f"{rule['alert']}: a [{''.join(window)}] window is under 4 x 30 s scrapes"


def test_every_test_starts_from_no_series() -> None:
    for case in yaml.safe_load(RULES_TEST.read_text())["tests"]:
        for series in case["input_series"]:
            where = f"{case['name']}: {series['series']}"
            assert str(series["values"]).startswith("_"), f"{where} starts with a sample"


def test_every_alert_has_a_promtool_test() -> None:
    tested = {
        t["alertname"]
        for case in yaml.safe_load(RULES_TEST.read_text())["tests"]
        for t in case["alert_rule_test"]
    }
    assert {str(r["alert"]) for r in alert_rules()} <= tested


def test_every_alert_is_tested_firing_and_silent() -> None:
    """An alert tested only where it fires may fire on anything (a probe, a blip, a healthy pipeline); one
    tested only where it is silent may never fire. Each needs an expected alert and an expected silence."""
    fires: set[str] = set()
    silent: set[str] = set()
    for case in yaml.safe_load(RULES_TEST.read_text())["tests"]:
        for t in case["alert_rule_test"]:
            (fires if t.get("exp_alerts") else silent).add(t["alertname"])
    alerts = {str(r["alert"]) for r in alert_rules()}
    assert alerts <= fires, f"alerts never tested firing: {sorted(alerts - fires)}"
    assert alerts <= silent, f"alerts never tested staying silent: {sorted(alerts - silent)}"


if __name__ == "__main__":
    for name, fn in list(globals().items()):
        if name.startswith("test_") and callable(fn):
            try:
                fn()
            except AssertionError as exc:
                sys.exit(f"    FAILED  {name}: {exc}")
            print(f"    ok  {name.removeprefix('test_').replace('_', ' ')}")
