"""Assertions on the Helm chart's rendered objects, beyond schema validity (run by deploy/check.sh).

    python deploy/check_chart.py HELM_BINARY KUBE_VERSION

Each check renders the chart with edge values and asserts what a cluster would do with the result: probes
that reach the worker's own event loop, secrets that roll exactly the pods that read them, no render-time
randomness, no Faust web port, NetworkPolicies, budgets that never block a drain, a PrometheusRule that
carries every alert. Prints one line per check; exits non-zero on the first failure.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy/helm/sentpipe"
RULES = CHART / "files/rules.yml"
HELM, KUBE = sys.argv[1], sys.argv[2]
SECRET = ["--set", "secrets.webhookSecret=not-a-real-secret"]
CRDS = [
    *("--api-versions", "monitoring.coreos.com/v1/ServiceMonitor"),
    *("--api-versions", "monitoring.coreos.com/v1/PrometheusRule"),
]
Objects = list[dict[str, Any]]


def render(*args: str) -> Objects:
    out = subprocess.run(
        [HELM, "template", "sp", str(CHART), "--namespace", "sp", "--kube-version", KUBE, *CRDS, *args],
        capture_output=True,
        text=True,
    )
    if out.returncode:
        raise AssertionError(f"helm template {' '.join(args)} failed:\n{out.stderr}")
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def refused(*args: str) -> str:
    out = subprocess.run(
        [HELM, "template", "sp", str(CHART), "--kube-version", KUBE, *args], capture_output=True, text=True
    )
    assert out.returncode != 0, f"helm template {' '.join(args)} was expected to fail"
    return out.stderr


def kinds(objs: Objects, kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def workloads(objs: Objects) -> dict[str, dict[str, Any]]:
    return {**kinds(objs, "Deployment"), **kinds(objs, "StatefulSet")}


def pod(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["template"]  # type: ignore[no-any-return]


def annotations(obj: dict[str, Any]) -> dict[str, str]:
    return pod(obj)["metadata"].get("annotations") or {}


def checksums(objs: Objects) -> dict[str, dict[str, str]]:
    return {
        name: {k: v for k, v in annotations(o).items() if k.startswith("checksum/")}
        for name, o in workloads(objs).items()
    }


CHECKS: list[tuple[str, Callable[[], None]]] = []


def check(what: str) -> Callable[[Callable[[], None]], Callable[[], None]]:
    def add(fn: Callable[[], None]) -> Callable[[], None]:
        CHECKS.append((what, fn))
        return fn

    return add


@check("no signing secret: the chart refuses to render (it generates none)")
def _() -> None:
    assert "secrets.webhookSecret is required" in refused()


@check("two renders are identical (no randAlphaNum or lookup churn for Argo CD / helm template)")
def _() -> None:
    assert render(*SECRET) == render(*SECRET)


@check("worker probes: HTTP /livez and /readyz on the metrics port; no Faust web port anywhere")
def _() -> None:
    for values in ([], ["--set", "worker.split.enabled=true"]):
        objs = render(*SECRET, *values)
        for name, w in workloads(objs).items():
            if name.endswith("-ingress"):
                continue
            (c,) = pod(w)["spec"]["containers"]
            assert c["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "metrics"}, name
            assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}, name
            assert c["startupProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}, name
            assert [p["name"] for p in c["ports"]] == ["metrics"], name
            assert all(e["name"] != "SENTPIPE_WORKER_WEB_PORT" for e in c["env"]), name
        for name, svc in kinds(objs, "Service").items():
            assert all(p["port"] != 6066 and p["name"] != "web" for p in svc["spec"]["ports"]), name


@check("webhook secret rotation rolls the ingress only; a database URL change, the projecting workers only")
def _() -> None:
    split = ["--set", "worker.split.enabled=true"]
    base = checksums(render(*SECRET, *split))
    assert set(base["sp-sentpipe-ingress"]) == {"checksum/webhook-secret"}
    assert base["sp-sentpipe-router"] == {}, "the router reads nothing from the Secret"
    assert set(base["sp-sentpipe-projector"]) == {"checksum/database-url"}
    rotated = checksums(render("--set", "secrets.webhookSecret=rotated", *split))
    tenants = checksums(render(*SECRET, "--set", "secrets.tenants.acme[0]=t1", *split))
    db = checksums(render(*SECRET, "--set", "database.url=postgresql://other@db/sentpipe", *split))
    for changed, rolls in ((rotated, "sp-sentpipe-ingress"), (tenants, "sp-sentpipe-ingress")):
        assert [n for n in base if base[n] != changed[n]] == [rolls]
    assert [n for n in base if base[n] != db[n]] == ["sp-sentpipe-projector"]
    whole = checksums(render(*SECRET))
    assert set(whole["sp-sentpipe-worker"]) == {"checksum/database-url"}  # role all projects


@check("existingSecret: a revision bump rolls the pods reading that key; reloader annotates the ingress only")
def _() -> None:
    ex = ["--set", "secrets.existingSecret=creds", "--set", "secrets.tenantsFile=true"]
    base = render(*ex)
    assert not kinds(base, "Secret").get("sp-sentpipe"), "no chart Secret with existingSecret"
    same = checksums(base)
    hooked = checksums(render(*ex, "--set", "secrets.existingSecretRevision.webhook=2026-12-01"))
    assert [n for n in same if same[n] != hooked[n]] == ["sp-sentpipe-ingress"]
    dbrev = checksums(render(*ex, "--set", "secrets.existingSecretRevision.database=2"))
    assert [n for n in same if same[n] != dbrev[n]] == ["sp-sentpipe-worker"]
    rel = workloads(render(*ex, "--set", "secrets.reloader=true"))
    annotated = {n for n, o in rel.items() if (o["metadata"].get("annotations") or {})}
    assert annotated == {"sp-sentpipe-ingress"}, annotated
    reload = rel["sp-sentpipe-ingress"]["metadata"]["annotations"]
    assert reload == {"secret.reloader.stakater.com/reload": "creds"}, reload


@check("the console rolls for its token, webhook secret or database URL, not for tenants; has a policy")
def _() -> None:
    on = ["--set", "console.enabled=true", "--set", "console.token=a-console-token-of-20"]
    base = checksums(render(*SECRET, *on))["sp-sentpipe-console"]
    assert set(base) == {"checksum/webhook-secret", "checksum/database-url", "checksum/console-token"}, base
    tenants = checksums(render(*SECRET, *on, "--set", "secrets.tenants.acme[0]=t1"))["sp-sentpipe-console"]
    assert tenants == base, "a tenants change must not restart the console"
    for change in (
        ["--set", "secrets.webhookSecret=rotated"],
        ["--set", "database.url=postgresql://other@db/sentpipe"],
        ["--set", "console.token=another-console-token"],
    ):
        # The last --set wins.
        assert checksums(render(*SECRET, *on, *change))["sp-sentpipe-console"] != base, change
    ex = ["--set", "secrets.existingSecret=creds", "--set", "console.existingSecret=console-creds"]
    same = checksums(render(*ex, "--set", "console.enabled=true"))["sp-sentpipe-console"]
    bumped = render(*ex, "--set", "console.enabled=true", "--set-string", "console.existingSecretRevision=2")
    assert checksums(bumped)["sp-sentpipe-console"] != same
    rel = workloads(render(*ex, "--set", "console.enabled=true", "--set", "secrets.reloader=true"))
    reload = rel["sp-sentpipe-console"]["metadata"]["annotations"]
    assert reload == {"secret.reloader.stakater.com/reload": "creds,console-creds"}, reload
    pol = kinds(render(*SECRET, *on), "NetworkPolicy")["sp-sentpipe-console"]["spec"]
    assert [r["ports"][0]["port"] for r in pol["ingress"]] == ["http"]
    assert pol["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "console"
    assert "sp-sentpipe-console" not in kinds(render(*SECRET), "NetworkPolicy")


@check("NetworkPolicies admit the webhook and metrics ports of the ingress and only metrics of every worker")
def _() -> None:
    pols = kinds(render(*SECRET, "--set", "worker.split.enabled=true"), "NetworkPolicy")
    ing, wrk = pols["sp-sentpipe-ingress"]["spec"], pols["sp-sentpipe-worker"]["spec"]
    assert [r["ports"][0]["port"] for r in ing["ingress"]] == ["http", "metrics"]
    assert [r["ports"][0]["port"] for r in wrk["ingress"]] == ["metrics"]
    assert wrk["podSelector"]["matchExpressions"][0]["values"] == ["worker", "router", "projector"]
    assert ing["policyTypes"] == wrk["policyTypes"] == ["Ingress"]
    peer = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    scoped = kinds(
        render(*SECRET, "--set-json", f"networkPolicy.metricsFrom={json.dumps(peer)}"), "NetworkPolicy"
    )
    assert scoped["sp-sentpipe-worker"]["spec"]["ingress"][0]["from"] == peer
    assert not kinds(render(*SECRET, "--set", "networkPolicy.enabled=false"), "NetworkPolicy")


@check("one replica: no PodDisruptionBudget (it would block node drains); minAvailable >= replicas refused")
def _() -> None:
    one = ["--set", "ingress.replicas=1", "--set", "worker.replicas=1"]
    assert not kinds(render(*SECRET, *one), "PodDisruptionBudget")
    assert set(kinds(render(*SECRET), "PodDisruptionBudget")) == {"sp-sentpipe-ingress", "sp-sentpipe-worker"}
    err = refused(*SECRET, "--set", "ingress.replicas=2", "--set", "ingress.pdb.minAvailable=2")
    assert "must be below the ingress replicas" in err, err


@check("worker.replicas 0 renders (offsets reset needs an empty group), with no budget")
def _() -> None:
    for split in ([], ["--set", "worker.split.enabled=true", "--set", "worker.split.projector.replicas=0"]):
        objs = render(*SECRET, "--set", "worker.replicas=0", *split)
        for name, w in workloads(objs).items():
            if not name.endswith("-ingress"):
                assert w["spec"]["replicas"] == 0, name
        assert set(kinds(objs, "PodDisruptionBudget")) == {"sp-sentpipe-ingress"}


@check("rocksdb + persistence: the table role is a StatefulSet with a claim; the projector a Deployment")
def _() -> None:
    objs = render(*SECRET, "--set", "worker.split.enabled=true")
    sts = kinds(objs, "StatefulSet")
    assert set(sts) == {"sp-sentpipe-router", "sp-sentpipe-ingress"}, set(sts)  # the ingress: its spool
    assert sts["sp-sentpipe-router"]["spec"]["volumeClaimTemplates"]
    assert "sp-sentpipe-projector" in kinds(objs, "Deployment")


@check("spool: the ingress a StatefulSet with a claim per pod (emptyDir without persistence, none when off)")
def _() -> None:
    def env(w: dict[str, Any]) -> dict[str, str]:
        return {e["name"]: e.get("value", "") for e in pod(w)["spec"]["containers"][0]["env"]}

    def mounts(w: dict[str, Any]) -> dict[str, str]:
        return {v["name"]: v["mountPath"] for v in pod(w)["spec"]["containers"][0]["volumeMounts"]}

    ing = kinds(render(*SECRET), "StatefulSet")["sp-sentpipe-ingress"]
    (claim,) = ing["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "spool" and mounts(ing)["spool"] == env(ing)["SENTPIPE_SPOOL_DIR"]
    assert env(ing)["SENTPIPE_SPOOL"] == "on" and ing["spec"]["serviceName"] == "sp-sentpipe-ingress"
    hpa = render(*SECRET, "--set", "ingress.autoscaling.enabled=true")
    assert kinds(hpa, "HorizontalPodAutoscaler")["sp-sentpipe-ingress"]["spec"]["scaleTargetRef"]["kind"] == (
        "StatefulSet"
    )
    ephemeral = kinds(render(*SECRET, "--set", "ingress.spool.persistence.enabled=false"), "Deployment")
    vols = {v["name"]: v for v in pod(ephemeral["sp-sentpipe-ingress"])["spec"]["volumes"]}
    assert "emptyDir" in vols["spool"], vols
    off = kinds(render(*SECRET, "--set", "ingress.spool.enabled=false"), "Deployment")["sp-sentpipe-ingress"]
    assert env(off)["SENTPIPE_SPOOL"] == "off" and "spool" not in mounts(off)


@check("standby table replicas only where another router can hold them; the projector has no table")
def _() -> None:
    def standbys(objs: Objects) -> dict[str, str]:
        out = {}
        for name, w in workloads(objs).items():
            for e in pod(w)["spec"]["containers"][0]["env"]:
                if e["name"] == "SENTPIPE_TABLE_STANDBY_REPLICAS":
                    out[name] = e["value"]
        return out

    assert standbys(render(*SECRET, "--set", "worker.split.enabled=true")) == {"sp-sentpipe-router": "1"}
    assert standbys(render(*SECRET, "--set", "worker.replicas=1")) == {"sp-sentpipe-worker": "0"}


@check("soft spreading over nodes by default, each workload counting its own pods")
def _() -> None:
    for name, w in workloads(render(*SECRET, "--set", "worker.split.enabled=true")).items():
        (tsc,) = pod(w)["spec"]["topologySpreadConstraints"]
        assert tsc["topologyKey"] == "kubernetes.io/hostname" and tsc["whenUnsatisfiable"] == "ScheduleAnyway"
        assert tsc["labelSelector"]["matchLabels"] == w["spec"]["selector"]["matchLabels"], name


@check("image.digest pins every container to repository@digest")
def _() -> None:
    digest = "sha256:" + "ab" * 32
    objs = render(*SECRET, "--set", f"image.digest={digest}")
    images = {
        c["image"]
        for o in objs
        if o["kind"] in ("Deployment", "StatefulSet", "Job")
        for c in pod(o)["spec"].get("initContainers", []) + pod(o)["spec"]["containers"]
    }
    assert images == {f"sentpipe@{digest}"}, images


@check("PrometheusRule: every alert of files/rules.yml, runbook_url rebased; refused without the CRD")
def _() -> None:
    objs = render(
        *SECRET,
        "--set",
        "prometheusRule.enabled=true",
        "--set",
        "prometheusRule.runbookBaseUrl=https://docs.example/x/",
    )
    (rule,) = kinds(objs, "PrometheusRule").values()
    want = yaml.safe_load(RULES.read_text())["groups"]
    got = rule["spec"]["groups"]
    assert [r["alert"] for g in got for r in g["rules"]] == [r["alert"] for g in want for r in g["rules"]]
    for g in got:
        for r in g["rules"]:
            assert r["annotations"]["runbook_url"].startswith("https://docs.example/x/deploy/README.md#"), r
    err = refused(*SECRET, "--set", "prometheusRule.enabled=true")
    assert "--api-versions monitoring.coreos.com/v1/PrometheusRule" in err, err


@check("secured cluster: every certificate a setting or the database URL names is mounted where it is read")
def _() -> None:
    secured = [
        *SECRET,
        *("--set", "kafka.security.protocol=SASL_SSL", "--set", "kafka.security.sasl.username=u"),
        *("--set", "kafka.security.sasl.passwordSecret.name=kafka-user"),
        *(
            "--set",
            "kafka.security.tls.caSecret.name=kafka-ca",
            "--set",
            "kafka.security.tls.clientSecret.name=u",
        ),
        *("--set", "database.tls.caSecret.name=pg-ca", "--set", "database.tls.clientSecret.name=pg-client"),
        *("--set", "console.enabled=true", "--set", "console.token=a-console-token-of-20"),
    ]
    for split in ([], ["--set", "worker.split.enabled=true"]):
        objs = render(*secured, *split)
        for name, w in {**workloads(objs), **kinds(objs, "Job")}.items():
            spec = pod(w)["spec"]
            for c in [*spec.get("initContainers", []), *spec["containers"]]:
                files = {
                    f"{m['mountPath']}/{item['path']}"
                    for m in c.get("volumeMounts", [])
                    for v in spec["volumes"]
                    if v["name"] == m["name"] and "projected" in v
                    for src in v["projected"]["sources"]
                    for item in src["secret"]["items"]
                }
                env = {e["name"] for e in c["env"]}
                named = {e["value"] for e in c["env"] if e["name"].endswith("_FILE") and "value" in e}
                if "SENTPIPE_DATABASE_URL" in env:  # the URL's sslrootcert / sslcert / sslkey
                    named |= {
                        f"/etc/sentpipe/tls/database-{f}" for f in ("ca.crt", "client.crt", "client.key")
                    }
                assert named <= files, (name, c["name"], sorted(named - files))


# sentpipe.settings.default_app_id's answers (tests/test_deploy_static.py holds the app to the same table).
APP_IDS = {
    "sent.": "sentpipe",
    "acme.": "sentpipe-acme",
    ".eu.acme.": "sentpipe-eu.acme",
    "...": "sentpipe-default",
}


@check("the app id follows the topic prefix as the app derives it, unless worker.appId is set")
def _() -> None:
    for prefix, want in APP_IDS.items():
        for values in ([], ["--set", "worker.appId=kept-group"]):
            objs = render(*SECRET, "--set", f"kafka.topicPrefix={prefix}", *values)
            named = [w for w in workloads(objs) if w.endswith(("-worker", "-console"))]
            assert named, list(workloads(objs))
            for name in named:
                envs = {
                    e["name"]: e.get("value")
                    for c in pod(workloads(objs)[name])["spec"]["containers"]
                    for e in c["env"]
                }
                assert envs["SENTPIPE_APP_ID"] == ("kept-group" if values else want), (prefix, name, envs)


def main() -> int:
    for what, fn in CHECKS:
        try:
            fn()
        except AssertionError as exc:
            print(f"    FAILED  {what}\n{exc}", file=sys.stderr)
            return 1
        print(f"    ok  {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
