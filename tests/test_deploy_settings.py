"""The deployment files against the code that reads them: every SENTPIPE_* variable the Helm chart renders or
a compose file sets is a field of sentpipe/settings.py (an unknown name is silently ignored there:
extra="ignore"), and Settings accepts its value, with every file it names mounted in that container. Probes
and Service ports reach the ports and routes the code serves; the values schema refuses what Settings would
refuse at start (a CrashLoopBackOff instead of a failed `helm install`); every values key does something.

The chart is rendered with the helm that `make check-deploy` installs under .local/bin (or one on PATH); YAML
is read with PyYAML, from this interpreter or from the deploy-tools virtualenv beside helm. Without them the
tests here fail, naming what is missing (`make test` runs `make check-deploy` first).
"""

from __future__ import annotations

import ast
import base64
import concurrent.futures
import functools
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.parse import parse_qs, urlsplit

import pytest
from pydantic import ValidationError

from sentpipe.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy/helm/sentpipe"
PRODUCTION = ROOT / "deploy/helm/values-production.yaml"
COMPOSE = ROOT / "deploy/compose/docker-compose.yml"
SECURED_COMPOSE = ROOT / "deploy/compose/docker-compose.secured.yml"
COMPOSE_PROMETHEUS = ROOT / "deploy/compose/prometheus.yml"
DEPLOY_PYTHON = ROOT / ".local/deploy-tools/venv/bin/python"
KUBE = "1.37.0"
CRDS = (
    *("--api-versions", "monitoring.coreos.com/v1/ServiceMonitor"),
    *("--api-versions", "monitoring.coreos.com/v1/PrometheusRule"),
)

Obj = dict[str, Any]

# Distinctive stand-ins, so a leak into plain text is found by searching the render for them.
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"sentpipe-deploy-settings-test-key").decode()
DB_PASSWORD = "db-pw-4b7e1c"
CONSOLE_TOKEN = "console-token-9f3a2d61"
SECRET = ("--set-string", f"secrets.webhookSecret={WEBHOOK_SECRET}")
# database.url as the values.yaml comment and deploy/README.md document it with database.tls.
TLS_DATABASE_URL = (
    f"postgresql://sentpipe:{DB_PASSWORD}@db.example.com:5432/sentpipe?sslmode=verify-full"
    "&sslrootcert=/etc/sentpipe/tls/database-ca.crt"
    "&sslcert=/etc/sentpipe/tls/database-client.crt&sslkey=/etc/sentpipe/tls/database-client.key"
)
# Values of Secrets the chart does not render (existingSecret, the Kafka user's Secret): valid stand-ins.
EXTERNAL_SECRETS = {
    "SENTPIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
    "SENTPIPE_DATABASE_URL": f"postgresql://sentpipe:{DB_PASSWORD}@db:5432/sentpipe",
    "SENTPIPE_KAFKA_SASL_PASSWORD": "kafka-password-1d2c",
    "SENTPIPE_KAFKA_SSL_KEY_PASSWORD": "key-password-77a1",
    "SENTPIPE_CONSOLE_TOKEN": CONSOLE_TOKEN,
}
SECRET_SETTINGS = set(EXTERNAL_SECRETS)


def _set(*pairs: str) -> tuple[str, ...]:
    return tuple(a for p in pairs for a in ("--set", p))


# Value sets: the defaults, the production example, the documented secured-cluster examples (deploy/README.md
# "Connecting to a secured cluster"), every optional branch, and a Secret managed elsewhere.
CASES: dict[str, tuple[str, ...]] = {
    "default": SECRET,
    "production": ("-f", str(PRODUCTION)),
    "production-console": (
        "-f",
        str(PRODUCTION),
        *_set("console.enabled=true", "console.existingSecret=console-creds"),
    ),
    # mTLS (Strimzi KafkaUser with authentication: tls) and PostgreSQL with verify-full and a client cert.
    "mtls-database-tls": (
        *SECRET,
        *_set(
            "kafka.security.protocol=SSL",
            "kafka.security.tls.caSecret.name=events-cluster-ca-cert",
            "kafka.security.tls.clientSecret.name=sentpipe",
            "kafka.security.tls.clientSecret.keyPasswordKey=user.key-password",
            "database.tls.caSecret.name=pg-ca",
            "database.tls.clientSecret.name=pg-client",
            "worker.split.enabled=true",
            "console.enabled=true",
        ),
        *("--set-string", f"database.url={TLS_DATABASE_URL}"),
        *("--set-string", f"console.token={CONSOLE_TOKEN}"),
    ),
    # A managed service with publicly trusted certificates (Confluent Cloud: PLAIN, no CA file).
    "sasl-ssl-public-ca": (
        *SECRET,
        *_set(
            "kafka.security.protocol=SASL_SSL",
            "kafka.security.sasl.mechanism=PLAIN",
            "kafka.security.sasl.username=api-key",
            "kafka.security.sasl.passwordSecret.name=confluent",
            "kafka.security.tls.checkHostname=false",
            "console.enabled=true",
        ),
        *("--set-string", f"console.token={CONSOLE_TOKEN}"),
    ),
    "sasl-plaintext": (
        *SECRET,
        *_set(
            "kafka.security.protocol=SASL_PLAINTEXT",
            "kafka.security.sasl.mechanism=SCRAM-SHA-256",
            "kafka.security.sasl.username=sentpipe",
            "kafka.security.sasl.passwordSecret.name=sentpipe",
        ),
    ),
    # deploy/check.sh's all-options set.
    "all-options": (
        *SECRET,
        *_set(
            "worker.rocksdb.enabled=true",
            "ingress.autoscaling.enabled=true",
            "ingress.autoscaling.requestsPerSecond.enabled=true",
            "ingress.expose.enabled=true",
            "serviceMonitor.enabled=true",
            "worker.handlerModules[0]=handlers",
            "worker.split.enabled=true",
            "worker.split.projector.resources.requests.cpu=100m",
            "console.enabled=true",
            "ingress.resources.requests.cpu=1500m",
            "prometheusRule.enabled=true",
            "console.metricsUrls[0]=http://sp-sentpipe-ingress:9100/metrics",
            "config.logLevel=DEBUG",
            "config.eventIdSource=content",
        ),
        *("--set-string", f"secrets.tenants.acme[0]={WEBHOOK_SECRET}"),
        *("--set-string", f"console.token={CONSOLE_TOKEN}"),
        *("--set-string", f"database.url=postgresql://sentpipe:{DB_PASSWORD}@db:5432/sentpipe"),
    ),
    "existing-secret": _set(
        "secrets.existingSecret=sentpipe-credentials",
        "secrets.tenantsFile=true",
        "secrets.reloader=true",
        "worker.rocksdb.persistence.enabled=false",
        "ingress.spool.persistence.enabled=false",
        "console.enabled=true",
        "console.existingSecret=console-creds",
        "kafka.topicPrefix=eu.acme.",
    ),
    # The install command of deploy/README.md "Kubernetes (Helm)".
    "readme-install": _set(
        "image.repository=registry.example.com/sentpipe",
        "image.tag=0.1.0",
        "kafka.bootstrap=events-kafka-bootstrap.kafka.svc:9092",
        "kafka.replicationFactor=3",
        "secrets.existingSecret=sentpipe-credentials",
        "ingress.expose.enabled=true",
        "ingress.expose.host=webhooks.example.com",
    ),
}


# --- tools -------------------------------------------------------------------------------------------------
@functools.cache
def helm() -> str:
    local = ROOT / ".local/bin/helm"
    found = str(local) if os.access(local, os.X_OK) else shutil.which("helm")
    if not found:
        pytest.fail("no helm: `make check-deploy` installs it under .local/bin", pytrace=False)
    return found


def load_yaml(text: str) -> list[Any]:
    """Every document of a YAML stream (PyYAML here, or in the deploy-tools virtualenv)."""
    try:
        import yaml  # type: ignore[import-untyped]
    except ImportError:
        if not os.access(DEPLOY_PYTHON, os.X_OK):
            pytest.fail(
                "no PyYAML: `make check-deploy` installs it in .local/deploy-tools/venv", pytrace=False
            )
        code = "import json, sys, yaml; json.dump(list(yaml.safe_load_all(sys.stdin)), sys.stdout)"
        out = subprocess.run(
            [str(DEPLOY_PYTHON), "-c", code], input=text, capture_output=True, text=True, check=True
        )
        return json.loads(out.stdout)  # type: ignore[no-any-return]
    return list(yaml.safe_load_all(text))


def helm_template(*args: str, release: str = "sp") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [helm(), "template", release, str(CHART), "--namespace", "sp", "--kube-version", KUBE, *CRDS, *args],
        capture_output=True,
        text=True,
    )


@functools.cache
def render_text(*args: str, release: str = "sp") -> str:
    out = helm_template(*args, release=release)
    assert out.returncode == 0, f"helm template {' '.join(args)} failed:\n{out.stderr}"
    return out.stdout


@functools.cache
def render(*args: str, release: str = "sp") -> tuple[Obj, ...]:
    return tuple(d for d in load_yaml(render_text(*args, release=release)) if d)


def refused(*args: str) -> str:
    out = helm_template(*args)
    assert out.returncode != 0, f"helm template {' '.join(args)} was expected to fail"
    return out.stderr


# --- reading the rendered pods -----------------------------------------------------------------------------
def pods(objs: tuple[Obj, ...]) -> Iterator[tuple[str, Obj, Obj]]:
    """(workload name, pod spec, container) for every container of every workload and Job."""
    for o in objs:
        if o["kind"] in ("Deployment", "StatefulSet", "Job"):
            spec = o["spec"]["template"]["spec"]
            for c in [*spec.get("initContainers", []), *spec["containers"]]:
                yield o["metadata"]["name"], o, c


def secrets_of(objs: tuple[Obj, ...]) -> dict[str, dict[str, str]]:
    """Secrets the chart renders: name -> key -> decoded value."""
    return {
        o["metadata"]["name"]: {k: base64.b64decode(v).decode() for k, v in (o.get("data") or {}).items()}
        for o in objs
        if o["kind"] == "Secret"
    }


def provided_file(workload: Obj, container: Obj, path: str, chart_secrets: dict[str, dict[str, str]]) -> str:
    """Why `path` is not a file this container can read, or "" when a volume provides it (from a key the
    Secret has, where the chart renders that Secret)."""
    spec = workload["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for m in container.get("volumeMounts", []):
        root = m["mountPath"].rstrip("/") + "/"
        if not path.startswith(root):
            continue
        rel = path[len(root) :]
        vol = volumes.get(m["name"])
        if vol is None:
            return f"{path}: mounted from volume {m['name']!r}, which the pod does not define"
        sources = vol["projected"]["sources"] if "projected" in vol else [vol] if "secret" in vol else []
        for src in sources:
            sec = src["secret"]
            name = sec.get("name") or sec.get("secretName")
            for item in sec.get("items", []):
                if item["path"] == rel:
                    known = chart_secrets.get(name)
                    if known is not None and item["key"] not in known:
                        return f"{path}: key {item['key']!r} is not in the chart's Secret {name}"
                    return ""
        return f"{path}: volume {m['name']!r} mounted at {m['mountPath']} has no item {rel!r}"
    return f"{path}: no volume is mounted there"


@contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    """os.environ with exactly these SENTPIPE_* variables (the test runner's own are set aside)."""
    with mock.patch.dict(os.environ):
        for name in [n for n in os.environ if n.startswith("SENTPIPE_")]:
            del os.environ[name]
        os.environ.update(env)
        yield


def settings_from(env: dict[str, str]) -> Settings:
    with environment(env):
        return Settings()


def field_of(env_name: str) -> str:
    return env_name.removeprefix("SENTPIPE_").lower()


def container_env(
    objs: tuple[Obj, ...], workload: Obj, container: Obj, files: Path
) -> tuple[dict[str, str], list[str]]:
    """The container's SENTPIPE_* environment as Settings would read it, and the problems found: names that
    are no setting, secrets in plain text, files no volume provides. Secret references resolve to the
    chart's Secret (whose key must exist) or, for a Secret managed elsewhere, a valid stand-in; a file
    setting points at a real file once its volume is shown to provide it."""
    chart_secrets = secrets_of(objs)
    env: dict[str, str] = {}
    problems: list[str] = []
    for e in container.get("env", []):
        name = e["name"]
        if not name.startswith("SENTPIPE_"):
            continue
        if field_of(name) not in Settings.model_fields:
            problems.append(f"{name} is not a setting (sentpipe/settings.py ignores it)")
            continue
        if "value" in e:
            if name in SECRET_SETTINGS:
                problems.append(f"{name} is a plain-text value, not a secretKeyRef")
            value = str(e["value"])
        else:
            ref = e["valueFrom"].get("secretKeyRef")
            if ref is None:
                problems.append(f"{name}: only literal values and secretKeyRefs are expected, not {e}")
                continue
            known = chart_secrets.get(ref["name"])
            if known is None:
                value = EXTERNAL_SECRETS[name]
            elif ref["key"] not in known:
                problems.append(f"{name}: key {ref['key']!r} is not in the chart's Secret {ref['name']}")
                continue
            else:
                value = known[ref["key"]]
        if name.endswith("_FILE"):
            why = provided_file(workload, container, value, chart_secrets)
            if why:
                problems.append(f"{name}={why}")
            stand_in = files / name.lower()
            stand_in.write_text("stand-in\n")
            value = str(stand_in)
        if name == "SENTPIPE_DATABASE_URL":
            # libpq reads sslrootcert / sslcert / sslkey from the container's file system.
            query = parse_qs(urlsplit(value).query)
            for param in ("sslrootcert", "sslcert", "sslkey"):
                for path in query.get(param, []):
                    why = provided_file(workload, container, path, chart_secrets)
                    if why:
                        problems.append(f"{name} {param}={why}")
        env[name] = value
    return env, problems


def service_links(objs: tuple[Obj, ...]) -> dict[str, str]:
    """What the kubelet adds to the environment of every pod in the namespace for each Service with a
    cluster IP, unless the pod sets `enableServiceLinks: false` (pkg/kubelet/envvars; the Services of a
    release exist before its pods, Helm installs them first)."""
    env: dict[str, str] = {}
    for i, o in enumerate(o for o in objs if o["kind"] == "Service"):
        spec = o["spec"]
        if spec.get("clusterIP") == "None":
            continue
        ip, name = f"10.96.0.{10 + i}", o["metadata"]["name"].upper().replace("-", "_")
        ports = spec["ports"]
        env[f"{name}_SERVICE_HOST"] = ip
        env[f"{name}_SERVICE_PORT"] = str(ports[0]["port"])
        for n, p in enumerate(ports):
            proto = p.get("protocol", "TCP")
            if p.get("name"):
                env[f"{name}_SERVICE_PORT_{p['name'].upper().replace('-', '_')}"] = str(p["port"])
            link = f"{name}_PORT_{p['port']}_{proto}"
            env[link] = f"{proto.lower()}://{ip}:{p['port']}"
            env.update({f"{link}_PROTO": proto.lower(), f"{link}_PORT": str(p["port"]), f"{link}_ADDR": ip})
            if n == 0:
                env[f"{name}_PORT"] = env[link]
    return env


def container_settings(objs: tuple[Obj, ...], files: Path) -> Iterator[tuple[str, Obj, Settings]]:
    """(workload/container, container, Settings) for every container, in the environment the kubelet
    gives it (service links included); fails on any problem."""
    links = {k: v for k, v in service_links(objs).items() if k.startswith("SENTPIPE_")}
    for wname, workload, c in pods(objs):
        where = f"{wname}/{c['name']}"
        env, problems = container_env(objs, workload, c, files)
        assert not problems, f"{where}: {problems}"
        if workload["spec"]["template"]["spec"].get("enableServiceLinks", True):
            env = {**links, **env}  # a variable the container sets wins over a link's
        try:
            s = settings_from(env)
        except ValidationError as exc:
            shown = {k: ("<secret>" if k in SECRET_SETTINGS else v) for k, v in env.items()}
            raise AssertionError(
                f"{where}: Settings refuses the rendered environment {shown}:\n{exc}"
            ) from None
        yield where, c, s


# --- the chart's environment against Settings -------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_every_rendered_variable_is_a_setting_with_a_value_settings_accepts(
    case: str, tmp_path: Path
) -> None:
    objs = render(*CASES[case])
    seen = list(container_settings(objs, tmp_path))
    assert {c["args"][0] for _, c, _ in seen} >= {"ingress", "worker", "topics", "db"}, case
    for where, c, s in seen:
        if c["args"][0] in ("ingress", "console"):
            assert not s.uses_development_secret, f"{where} would verify with the public development secret"


def test_the_documented_release_name_leaves_every_pod_its_settings(tmp_path: Path) -> None:
    """`helm install sentpipe` (README) names the Services sentpipe-ingress and sentpipe-console, and the
    kubelet's service links gave every pod of the namespace SENTPIPE_INGRESS_PORT=tcp://<ip>:8080 and
    SENTPIPE_CONSOLE_PORT: settings, which Settings refused, so the workers crash-looped at start."""
    objs = render(*CASES["all-options"], release="sentpipe")
    assert {"SENTPIPE_INGRESS_PORT", "SENTPIPE_CONSOLE_PORT"} <= set(service_links(objs))
    seen = list(container_settings(objs, tmp_path))
    assert {c["args"][0] for _, c, _ in seen} >= {"ingress", "worker", "console", "topics", "db"}
    for where, c, s in seen:
        if c["args"][0] != "ingress":
            assert s.ingress_port == Settings.model_fields["ingress_port"].default, where


@pytest.mark.parametrize("case", list(CASES))
def test_secrets_stay_in_secrets(case: str) -> None:
    """No secret value in plain text anywhere but a Secret's data: not in an env value, a ConfigMap, a label
    or an annotation (the chart's checksums are hashes)."""
    text = render_text(*CASES[case])
    objs = render(*CASES[case])
    assert not [o for o in objs if o["kind"] == "ConfigMap"], "the chart renders no ConfigMap"
    for needle in (WEBHOOK_SECRET, DB_PASSWORD, CONSOLE_TOKEN):
        assert needle not in text, f"{case}: a secret value is in plain text in the rendered chart"
    # Nor as a plain SHA-256 in a checksum annotation: anyone who can read a pod could test guesses of the
    # database password offline (the rest of the URL is known) at billions a second.
    plain = [WEBHOOK_SECRET, TLS_DATABASE_URL, json.dumps([WEBHOOK_SECRET, {}], separators=(",", ":"))]
    for value in plain:
        assert hashlib.sha256(value.encode()).hexdigest() not in text, f"{case}: an unsalted secret checksum"


def test_the_secured_case_mounts_every_certificate_where_the_settings_point() -> None:
    """The console, the workers that project and the init Job read PostgreSQL; every Kafka client reads the
    Kafka certificates. Each gets the files its settings and database URL name."""
    objs = render(*CASES["mtls-database-tls"])
    readers = {f"{w}/{c['name']}" for w, _, c in pods(objs)}
    assert {
        "sp-sentpipe-console/console",
        "sp-sentpipe-projector/worker",
        "sp-sentpipe-init/migrate",
    } <= readers
    for w, _, c in pods(objs):
        names = {e["name"] for e in c["env"]}
        assert {
            "SENTPIPE_KAFKA_SSL_CA_FILE",
            "SENTPIPE_KAFKA_SSL_CERT_FILE",
            "SENTPIPE_KAFKA_SSL_KEY_FILE",
        } <= names
        (password,) = [e for e in c["env"] if e["name"] == "SENTPIPE_KAFKA_SSL_KEY_PASSWORD"]
        assert password["valueFrom"]["secretKeyRef"] == {"name": "sentpipe", "key": "user.key-password"}
        tls = [m for m in c["volumeMounts"] if m["mountPath"] == "/etc/sentpipe/tls"]
        assert tls and tls[0]["readOnly"] is True, f"{w}/{c['name']}"


# --- probes, ports and scrape targets ---------------------------------------------------------------------
def _routes(path: str, function: str) -> set[str]:
    """The GET paths a function of the code registers (router.add_get("/x", ...))."""
    tree = ast.parse((ROOT / path).read_text())
    (fn,) = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == function]
    return {
        call.args[0].value
        for call in ast.walk(fn)
        if isinstance(call, ast.Call)
        and isinstance(call.func, ast.Attribute)
        and call.func.attr == "add_get"
        and call.args
        and isinstance(call.args[0], ast.Constant)
        and isinstance(call.args[0].value, str)
    }


@functools.cache
def served() -> dict[tuple[str, str], set[str]]:
    """(role, container port name) -> the GET routes the code serves there."""
    return {
        ("ingress", "http"): _routes("ingress/app.py", "create_app"),
        ("ingress", "metrics"): _routes("ingress/app.py", "create_metrics_app"),
        ("worker", "metrics"): _routes("processors/health.py", "health_app"),
        ("console", "http"): _routes("sentpipe/console/app.py", "create_app"),
    }


def listening(role: str, s: Settings) -> dict[str, int]:
    """Container port name -> the port the role binds with these settings."""
    return {
        "ingress": {"http": s.ingress_port, "metrics": s.ingress_metrics_port},
        "worker": {"metrics": s.worker_metrics_port},
        "console": {"http": s.console_port},
    }[role]


def test_the_code_serves_the_probed_routes() -> None:
    assert served()[("ingress", "http")] >= {"/healthz", "/readyz"}
    assert served()[("ingress", "metrics")] == {"/metrics"}
    assert served()[("worker", "metrics")] == {"/metrics", "/livez", "/readyz"}
    assert "/healthz" in served()[("console", "http")]


@pytest.mark.parametrize(
    "case",
    [
        *CASES,
        "ports-moved",
    ],
)
def test_probes_and_ports_reach_what_the_code_binds(case: str, tmp_path: Path) -> None:
    args = CASES.get(case) or (
        *CASES["all-options"],
        *_set(
            "ingress.port=18080",
            "ingress.metricsPort=19100",
            "worker.metricsPort=19101",
            "console.port=18090",
        ),
    )
    objs = render(*args)
    for where, c, s in container_settings(objs, tmp_path):
        role = c["args"][0]
        if role not in ("ingress", "worker", "console"):
            assert not c.get("ports"), where
            continue
        ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
        assert ports == listening(role, s), (
            f"{where}: container ports {ports}, the code binds {listening(role, s)}"
        )
        for kind in ("livenessProbe", "readinessProbe", "startupProbe"):
            probe = c.get(kind)
            if probe is None:
                continue
            get = probe["httpGet"]
            assert get["port"] in ports, f"{where} {kind}: port {get['port']} is not a container port"
            assert get["path"] in served()[(role, get["port"])], f"{where} {kind}: {get} is not served"
        assert c.get("livenessProbe") and c.get("readinessProbe"), where
    # Services reach a named port of the pods they select, and the ServiceMonitor scrapes /metrics there.
    workloads = [o for o in objs if o["kind"] in ("Deployment", "StatefulSet")]
    services = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Service"}
    for name, svc in services.items():
        sel = svc["spec"]["selector"]
        (target,) = [
            w for w in workloads if sel.items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        (c,) = target["spec"]["template"]["spec"]["containers"]
        names = {p["name"] for p in c["ports"]}
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in names, f"Service {name} port {p}: no such port on {c['name']}"
    for sm in (o for o in objs if o["kind"] == "ServiceMonitor"):
        selected = [
            svc
            for svc in services.values()
            if sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
            and all(e["key"] in svc["metadata"]["labels"] for e in sm["spec"]["selector"]["matchExpressions"])
        ]
        assert selected
        for ep in sm["spec"]["endpoints"]:
            for svc in selected:
                port = [p for p in svc["spec"]["ports"] if p["name"] == ep["port"]]
                assert port, f"ServiceMonitor port {ep['port']} is not on Service {svc['metadata']['name']}"
                role = svc["metadata"]["labels"]["app.kubernetes.io/component"]
                role = "worker" if role in ("router", "projector") else role
                assert ep["path"] in served()[(role, port[0]["targetPort"])]


@pytest.mark.parametrize(
    ("resources", "workers"),
    [
        ({"requests": {"cpu": "250m"}}, 1),
        ({"requests": {"cpu": "1"}}, 1),
        ({"requests": {"cpu": "1500m"}}, 2),
        ({"requests": {"cpu": 2}}, 2),
        ({"requests": {"cpu": "0.5"}}, 1),
        ({"requests": {"cpu": "2.5"}}, 3),
        # Without a request Kubernetes makes the limit the request.
        ({"requests": None, "limits": {"cpu": "3"}}, 3),
        ({"requests": None, "limits": {"cpu": None}}, 1),
        # The app starts at most 256.
        ({"requests": {"cpu": "300"}}, 256),
    ],
)
def test_ingress_workers_follow_the_cpu_request(
    resources: dict[str, Any], workers: int, tmp_path: Path
) -> None:
    objs = render(*SECRET, "--set-json", f"ingress.resources={json.dumps(resources)}")
    (s,) = [s for _, c, s in container_settings(objs, tmp_path) if c["args"][0] == "ingress"]
    assert s.ingress_workers == workers
    # ingress.maxInFlight (96) is per pod: each process takes its share, rounded up.
    assert s.ingress_max_in_flight == math.ceil(96 / workers)
    # ingress.spool.maxBytes (1 GiB) is per pod too, and its processes share the volume: rounded down.
    assert s.spool_max_bytes == 1024**3 // workers


@pytest.mark.parametrize(
    ("max_bytes", "workers", "each"),
    # The floor: one largest body (SENTPIPE_MAX_BODY_BYTES, 1 MiB) and its record's framing (64 KiB).
    [(3 * 1024**3 + 2, 3, 1024**3), (1114112, 1, 1114112), (1114112, 3, 1114112)],
)
def test_the_spool_limit_is_split_among_the_pods_processes(
    max_bytes: int, workers: int, each: int, tmp_path: Path
) -> None:
    """N processes each spooling up to the pod's whole limit would fill N times the volume it fits."""
    objs = render(
        *SECRET,
        *_set(f"ingress.workers={workers}", "ingress.spool.persistence.size=4Gi"),
        *("--set-json", f"ingress.spool.maxBytes={max_bytes}"),
    )
    (s,) = [s for _, c, s in container_settings(objs, tmp_path) if c["args"][0] == "ingress"]
    assert (s.ingress_workers, s.spool_max_bytes) == (workers, each)


SIZE_UNITS = {"": 1, "k": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4, "Ki": 1024, "Mi": 1024**2}
SIZE_UNITS |= {"Gi": 1024**3, "Ti": 1024**4}
# What a spool keeps beside its records (checkpoint, lock, records set aside) and the file system's blocks.
SPOOL_HEADROOM = 64 * 1024**2


def size_bytes(quantity: str) -> int:
    """A Kubernetes size as the values schema allows it: `2Gi`, `1.5Gi`, `1200M`."""
    found = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)([kMGT]i?|Ki)?", quantity)
    assert found, f"unexpected size {quantity!r}"
    return int(float(found[1]) * SIZE_UNITS[found[2] or ""])


@pytest.mark.parametrize(
    "values",
    [
        (),
        _set("ingress.spool.persistence.enabled=false"),
        _set("ingress.workers=4", "ingress.spool.persistence.size=2050Mi"),
        _set("ingress.workers=8", "ingress.spool.maxBytes=1114112", "ingress.spool.persistence.size=73Mi"),
    ],
    ids=["claim", "emptydir", "workers", "floor"],
)
def test_a_full_spool_fits_its_volume(values: tuple[str, ...], tmp_path: Path) -> None:
    """Every process of the pod spooling its SENTPIPE_SPOOL_MAX_BYTES fits the volume under the spool: an
    emptyDir past its sizeLimit gets the pod evicted, and its spooled events, each answered 200, deleted."""
    objs = render(*SECRET, *values)
    (ing,) = [
        o
        for o in objs
        if o["kind"] in ("Deployment", "StatefulSet") and o["metadata"]["name"].endswith("-ingress")
    ]
    (s,) = [s for _, c, s in container_settings(objs, tmp_path) if c["args"][0] == "ingress"]
    claims = {c["metadata"]["name"]: c for c in ing["spec"].get("volumeClaimTemplates", [])}
    volumes = {v["name"]: v for v in ing["spec"]["template"]["spec"]["volumes"]}
    room = (
        claims["spool"]["spec"]["resources"]["requests"]["storage"]
        if "spool" in claims
        else volumes["spool"]["emptyDir"]["sizeLimit"]
    )
    assert s.ingress_workers * s.spool_max_bytes + SPOOL_HEADROOM <= size_bytes(room), (values, room)


@pytest.mark.parametrize(
    "values",
    [
        # 8 GiB of spool on a 1Gi claim (a full disk: 503s), or an emptyDir (evicted with what it acked).
        ("ingress.spool.maxBytes=8589934592", "ingress.spool.persistence.size=1Gi"),
        ("ingress.spool.persistence.enabled=false", "ingress.spool.persistence.size=1Gi"),
        # Each of the processes takes at least one largest body's worth, whatever maxBytes says.
        ("ingress.workers=64", "ingress.spool.maxBytes=1114112", "ingress.spool.persistence.size=128Mi"),
    ],
    ids=["claim", "emptydir", "floor"],
)
def test_a_spool_larger_than_its_volume_is_refused(values: tuple[str, ...]) -> None:
    err = refused(*SECRET, *_set(*values))
    assert (
        "ingress.spool.maxBytes with 64 MiB of headroom does not fit ingress.spool.persistence.size" in err
    ), err
    # The spool off, its size is not used.
    render(*SECRET, *_set(*values, "ingress.spool.enabled=false"))


# --- the values schema refuses what Settings refuses -------------------------------------------------------
@functools.cache
def schema() -> Obj:
    return json.loads((CHART / "values.schema.json").read_text())  # type: ignore[no-any-return]


def schema_node(key: str) -> Obj:
    node: Obj = schema()
    for part in key.split("."):
        node = node["properties"][part]
    return node


# value -> the variable it renders; extra values needed for it to be rendered at all.
NUMERIC: list[tuple[str, str, tuple[str, ...]]] = [
    ("kafka.replicationFactor", "SENTPIPE_REPLICATION_FACTOR", ()),
    ("kafka.rawPartitions", "SENTPIPE_RAW_PARTITIONS", _set("worker.replicas=1")),
    ("kafka.routedPartitions", "SENTPIPE_ROUTED_PARTITIONS", ()),
    ("ingress.port", "SENTPIPE_INGRESS_PORT", ()),
    ("ingress.metricsPort", "SENTPIPE_INGRESS_METRICS_PORT", ()),
    ("ingress.workers", "SENTPIPE_INGRESS_WORKERS", ()),
    ("ingress.maxInFlight", "SENTPIPE_INGRESS_MAX_IN_FLIGHT", ()),
    ("ingress.bodyTimeoutSeconds", "SENTPIPE_BODY_TIMEOUT_S", ()),
    ("ingress.stallAfterSeconds", "SENTPIPE_STALL_AFTER_S", ()),
    # A volume the largest spool fits (test_a_full_spool_fits_its_volume).
    ("ingress.spool.maxBytes", "SENTPIPE_SPOOL_MAX_BYTES", _set("ingress.spool.persistence.size=1100Ti")),
    ("worker.metricsPort", "SENTPIPE_WORKER_METRICS_PORT", ()),
    ("worker.stallAfterSeconds", "SENTPIPE_STALL_AFTER_S", ()),
    ("worker.sessionTimeoutSeconds", "SENTPIPE_KAFKA_SESSION_TIMEOUT_S", ()),
    ("worker.startupFailureThreshold", "SENTPIPE_RECOVERY_STALL_AFTER_S", ()),
    ("worker.standbyReplicas", "SENTPIPE_TABLE_STANDBY_REPLICAS", ()),
    ("console.port", "SENTPIPE_CONSOLE_PORT", ("--set-string", f"console.token={CONSOLE_TOKEN}")),
]


@pytest.mark.parametrize(("key", "variable", "extra"), NUMERIC, ids=[k for k, _, _ in NUMERIC])
def test_the_schema_bounds_are_what_settings_accepts(
    key: str, variable: str, extra: tuple[str, ...], tmp_path: Path
) -> None:
    node = schema_node(key)
    assert "maximum" in node, f"values.schema.json: {key} has no maximum, but {variable} has one"
    low = node.get("minimum", node.get("exclusiveMinimum", 0) + 0.5)
    on = _set("console.enabled=true") if key.startswith("console.") else ()
    for edge in (low, node["maximum"]):
        value = int(edge) if float(edge).is_integer() else edge
        objs = render(*SECRET, *on, *extra, "--set-json", f"{key}={value}")
        # ingress.*, worker.*, console.*: rendered in that component's own container.
        component = key.split(".")[0]
        rendered = [
            s
            for _, c, s in container_settings(objs, tmp_path)
            if variable in {e["name"] for e in c["env"]}
            and (component not in ("ingress", "worker", "console") or c["args"][0] == component)
        ]
        assert rendered, f"{key}={value} renders no {variable}"
    err = refused(*SECRET, *on, *extra, "--set", f"{key}={int(node['maximum']) + 1}")
    assert "values don't meet the specifications of the schema" in err, err


def test_the_init_jobs_topics_timeout_is_one_the_command_takes() -> None:
    """init.topicsTimeoutSeconds becomes `topics ensure --timeout`, which refuses what is out of its range."""
    from sentpipe.cli_base import MAX_TIMEOUT_S, MIN_TIMEOUT_S

    node = schema_node("init.topicsTimeoutSeconds")
    assert node["minimum"] >= MIN_TIMEOUT_S and node.get("maximum", math.inf) <= MAX_TIMEOUT_S, node
    (job,) = [
        o
        for o in render(*SECRET, "--set", f"init.topicsTimeoutSeconds={int(MAX_TIMEOUT_S)}")
        if o["kind"] == "Job"
    ]
    (topics,) = job["spec"]["template"]["spec"]["initContainers"]
    assert topics["args"] == ["topics", "ensure", "--timeout", str(int(MAX_TIMEOUT_S))]


STRINGS: list[tuple[str, list[str], list[str]]] = [
    # key, values Settings accepts (the chart must render them), values it refuses (the chart must too)
    # "unknown": the metrics' tenant for path tenants with no secret, which the signature alert leaves out.
    (
        "config.defaultTenant",
        ["acme-eu", "t" * 256, "Ünïcode tenant"],
        ["a/b", "t" * 257, "tab\there", "unknown"],
    ),
    # helm --set: an escaped comma; credentials in the address, which the settings refuse without quoting them
    ("kafka.bootstrap", ["kafka:9092", "b-1:9096\\,b-2:9096"], [" ", "user:s3cret@kafka:9092"]),
    ("kafka.topicPrefix", ["eu.acme.", "p" * 224], ["", "a/b", "p" * 231, "p" * 225]),
    ("worker.appId", ["kept-group", "g" * 233], ["a/b", "g" * 234]),
    (
        "secrets.tenants",
        ['{"acme": ["s"]}', '{"ünï": "s"}'],
        ['{"a/b": ["s"]}', '{"": "s"}', '{"unknown": "s"}'],
    ),
]


@pytest.mark.parametrize(("key", "good", "bad"), STRINGS, ids=[k for k, _, _ in STRINGS])
def test_the_schema_refuses_the_names_settings_refuses(
    key: str, good: list[str], bad: list[str], tmp_path: Path
) -> None:
    flag = "--set-json" if key == "secrets.tenants" else "--set-string"
    for value in good:
        objs = render(*SECRET, flag, f"{key}={value}")
        list(container_settings(objs, tmp_path))
        if key == "secrets.tenants":
            tenants = json.loads(secrets_of(objs)["sp-sentpipe"]["tenants.json"])
            for name in tenants:
                s = settings_from({"SENTPIPE_DEFAULT_TENANT": name})
                assert s.default_tenant == name
    for value in bad:
        err = refused(*SECRET, flag, f"{key}={value}")
        assert "Error:" in err and ("schema" in err or "longer than 233" in err), (value, err)
        if key == "secrets.tenants":
            (name,) = json.loads(value)
            with pytest.raises(ValidationError):
                settings_from({"SENTPIPE_DEFAULT_TENANT": name})


# --- every values key is described by the schema and used by a template -----------------------------------
def _leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict) and node:
        for k, v in node.items():
            yield from _leaves(v, f"{prefix}.{k}" if prefix else k)
    else:
        yield prefix, node


def _schema_paths(node: Obj, prefix: str = "") -> Iterator[str]:
    for k, v in node.get("properties", {}).items():
        path = f"{prefix}.{k}" if prefix else k
        yield path
        yield from _schema_paths(v, path)


@functools.cache
def values() -> Obj:
    (doc,) = load_yaml((CHART / "values.yaml").read_text())
    return doc  # type: ignore[no-any-return]


def test_the_schema_describes_exactly_the_values_keys() -> None:
    keys = [k for k, _ in _leaves(values())]
    described = set(schema_paths())
    prefixes = {".".join(k.split(".")[:i]) for k in keys for i in range(1, k.count(".") + 2)}
    # A key whose default is empty ({}) may have its shape described below it (resources: requests, limits).
    stray = sorted(
        p for p in described - prefixes if p != "global" and not any(p.startswith(k + ".") for k in keys)
    )
    assert not stray, (
        f"values.schema.json accepts keys that values.yaml has not and no template reads: {stray}"
    )
    undescribed = [k for k in keys if not any(k == p or k.startswith(p + ".") for p in described)]
    assert not undescribed, undescribed


# Bases that switch on every branch a key can sit behind.
KEY_BASES: list[tuple[str, ...]] = [
    CASES["all-options"]
    + _set(
        "kafka.security.protocol=SASL_SSL",
        "kafka.security.sasl.username=u",
        "kafka.security.sasl.passwordSecret.name=p",
        "kafka.security.tls.caSecret.name=ca",
        "kafka.security.tls.clientSecret.name=cl",
        "database.tls.caSecret.name=dca",
        "database.tls.clientSecret.name=dcl",
    ),
    CASES["existing-secret"],
    (
        *SECRET,
        *_set(
            "worker.rocksdb.persistence.enabled=false",
            "ingress.spool.persistence.enabled=false",
            "worker.split.enabled=true",
        ),
    ),
]


def _alternatives(key: str, default: Any) -> list[tuple[str, str]]:
    """Other values for a key, ones its schema allows (an enum's other members, its examples, a pattern's
    matches)."""
    node = schema_node(key) if key in schema_paths() else {}
    if isinstance(default, bool):
        return [("--set", f"{key}=true"), ("--set", f"{key}=false")]
    if isinstance(default, (int, float)):
        numbers = [int(default) + 2, int(default) + 1, 1, 0]
        return [("--set", f"{key}={n}") for n in numbers]
    if isinstance(default, str):
        words = (
            node.get("enum")
            or node.get("examples")
            or [
                f"{default}x",
                "y",
                "3Gi",
                "a-value-long-enough-for-any-minimum",
                "https://example.com/y",
                "sha256:" + "ab" * 32,
            ]
        )
        pattern = node.get("pattern")
        words = [w for w in words if w != default and (pattern is None or re.search(pattern, w))]
        return [("--set-string", f"{key}={w}") for w in words]
    samples: list[Any] = (
        [["x"], [{"name": "x"}], [{"name": "x", "value": "y"}]]
        if isinstance(default, list)
        else [{"a": "b"}, {"requests": {"cpu": "1"}}]
    )
    return [("--set-json", f"{key}={json.dumps(sample)}") for sample in samples]


@functools.cache
def schema_paths() -> frozenset[str]:
    return frozenset(_schema_paths(schema()))


# About 230 renders of about 0.8 s of CPU each (the secret checksums' scrypt): 100 s on 2 idle cores. The
# bound is for a hang, with room for a machine as busy as three times that.
@pytest.mark.timeout(900)
def test_every_values_key_changes_the_render() -> None:
    """A key no template reads is a setting that silently does nothing."""
    helm()
    baselines = {base: helm_template(*base) for base in KEY_BASES}
    for base, out in baselines.items():
        assert out.returncode == 0, (base, out.stderr)

    def used(item: tuple[str, Any]) -> str | None:
        """None when some value of the key changes the render; else the key and why each value did not."""
        key, default = item
        tried = []
        for base in KEY_BASES:
            for alt in _alternatives(key, default):
                out = helm_template(*base, *alt)
                if out.returncode == 0 and out.stdout != baselines[base].stdout:
                    return None
                first = (out.stderr.strip().splitlines() or ["the same render"])[0]
                tried.append(f"{alt[1]}: {first if out.returncode else 'the same render'}")
        return f"{key} ({'; '.join(tried[:4])})"

    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2))) as pool:
        unused = [k for k in pool.map(used, list(_leaves(values()))) if k]
    assert not unused, f"values.yaml keys no template reads: {unused}"


# --- compose ------------------------------------------------------------------------------------------------
# What the compose files' headers tell the user to export.
COMPOSE_ENV = {
    "SENTPIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
    "SENTPIPE_CONSOLE_TOKEN": CONSOLE_TOKEN,
}
SECURED_ENV = {
    **COMPOSE_ENV,
    "SENTPIPE_KAFKA_BOOTSTRAP": "broker-1.example.com:9093",
    "SENTPIPE_KAFKA_SASL_USERNAME": "sentpipe",
    "SENTPIPE_KAFKA_SASL_PASSWORD": "kafka-password-1d2c",
    "SENTPIPE_DATABASE_URL": (
        f"postgresql://sentpipe:{DB_PASSWORD}@db.example.com:5432/sentpipe?sslmode=verify-full"
        "&sslrootcert=/etc/sentpipe/tls/database-ca.crt"
    ),
}
INTERPOLATION = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}."""

    def one(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        value = env.get(name)
        empty = value is None or (value == "" and op is not None and op.startswith(":"))
        if op is None:
            return value or ""
        if op.endswith("-"):
            return arg if empty else str(value)
        if empty:
            raise AssertionError(f"compose needs {name}: {arg}")
        return str(value)

    return INTERPOLATION.sub(one, text.replace("$$", "\0")).replace("\0", "$")


def compose_services(files: list[Path], env: dict[str, str]) -> dict[str, Obj]:
    """The services after merging the files in order (environment maps merged, the rest replaced)."""
    merged: dict[str, Obj] = {}
    for path in files:
        (doc,) = load_yaml(path.read_text())
        for name, svc in doc["services"].items():
            into = merged.setdefault(name, {})
            for k, v in svc.items():
                if k == "environment":
                    into["environment"] = {**into.get("environment", {}), **v}
                elif k == "volumes":  # merged by the path mounted in the container
                    targets = {m.split(":")[1] for m in v}
                    into["volumes"] = [
                        m for m in into.get("volumes", []) if m.split(":")[1] not in targets
                    ] + v
                else:
                    into[k] = v
    for svc in merged.values():
        if isinstance(svc.get("environment"), dict):
            svc["environment"] = {
                k: interpolate(str(v), env) for k, v in svc["environment"].items() if v is not None
            }
        svc["volumes"] = [interpolate(v, env) for v in svc.get("volumes", [])]
    return merged


def sentpipe_services(services: dict[str, Obj]) -> dict[str, Obj]:
    return {n: s for n, s in services.items() if str(s.get("image", "")).startswith("sentpipe")}


def compose_settings(name: str, svc: Obj, tmp: Path) -> Settings:
    env: dict[str, str] = {}
    for var, value in svc["environment"].items():
        if not var.startswith("SENTPIPE_"):
            continue
        assert field_of(var) in Settings.model_fields, f"{name}: {var} is not a setting (ignored)"
        if var.endswith("_FILE"):
            mounts = [v.split(":")[1] for v in svc["volumes"]]
            assert any(value.startswith(m.rstrip("/") + "/") for m in mounts), (
                f"{name}: {var}={value} not mounted"
            )
            stand_in = tmp / var.lower()
            stand_in.write_text("stand-in\n")
            value = str(stand_in)
        env[var] = value
    if "SENTPIPE_SPOOL_DIR" in env:
        mounts = [v.split(":")[1] for v in svc["volumes"]]
        assert env["SENTPIPE_SPOOL_DIR"] in mounts, f"{name}: the spool is not on a volume"
    try:
        return settings_from(env)
    except ValidationError as exc:
        raise AssertionError(f"compose service {name}: Settings refuses its environment:\n{exc}") from None


def cli_port(svc: Obj, default: int) -> int:
    cmd = svc.get("command") or []
    return int(cmd[cmd.index("--port") + 1]) if "--port" in cmd else default


@pytest.mark.parametrize("secured", [False, True], ids=["compose", "compose-secured"])
def test_compose_environments_are_settings_that_settings_accepts(secured: bool, tmp_path: Path) -> None:
    files = [COMPOSE, SECURED_COMPOSE] if secured else [COMPOSE]
    services = sentpipe_services(compose_services(files, SECURED_ENV if secured else COMPOSE_ENV))
    assert set(services) == {"init", "ingress", "worker", "console"}
    scraped = {
        job: int(port)
        for job, port in re.findall(
            r"job_name: (sentpipe-\w+).*?port: (\d+)", COMPOSE_PROMETHEUS.read_text(), re.S
        )
    }
    for name, svc in services.items():
        s = compose_settings(name, svc, tmp_path)
        if secured:
            assert s.kafka_security_protocol == "SASL_SSL" and s.kafka_ssl_ca_file is not None, (
                f"{name} is not on the secured cluster: {s.kafka_security_protocol} to {s.kafka_bootstrap}"
            )
            assert s.kafka_bootstrap == SECURED_ENV["SENTPIPE_KAFKA_BOOTSTRAP"], name
            if name != "ingress":
                url = s.database_url.get_secret_value()
                assert url == SECURED_ENV["SENTPIPE_DATABASE_URL"], f"{name} still reads the bundled database"
                (ca,) = parse_qs(urlsplit(url).query)["sslrootcert"]
                assert any(ca.startswith(v.split(":")[1] + "/") for v in svc["volumes"]), name
        health = json.dumps(svc.get("healthcheck", {}))
        if name == "ingress":
            assert f"{s.ingress_port}:{s.ingress_port}" in svc["ports"][0]
            assert scraped["sentpipe-ingress"] == s.ingress_metrics_port
            assert not s.uses_development_secret
        if name == "worker":
            assert f"127.0.0.1:{s.worker_metrics_port}/" in health
            assert scraped["sentpipe-worker"] == s.worker_metrics_port
        if name == "console":
            port = cli_port(svc, s.console_port)
            assert f"127.0.0.1:{port}/healthz" in health and svc["ports"][0].endswith(f":{port}")
            assert s.console_metrics_urls == [
                f"http://ingress:{scraped['sentpipe-ingress']}/metrics",
                f"http://worker:{scraped['sentpipe-worker']}/metrics",
            ]


def test_the_secured_override_covers_every_sentpipe_service() -> None:
    """A service left out keeps the bundled broker (PLAINTEXT, kafka:9092) and database."""
    (base,) = load_yaml(COMPOSE.read_text())
    (secured,) = load_yaml(SECURED_COMPOSE.read_text())
    ours = {n for n, s in base["services"].items() if str(s.get("image", "")).startswith("sentpipe")}
    assert ours <= set(secured["services"]), (
        f"not in {SECURED_COMPOSE.name}: {sorted(ours - set(secured['services']))}"
    )


def test_the_image_environment_is_settings() -> None:
    docker = (ROOT / "Dockerfile").read_text()
    names = set(re.findall(r"\b(SENTPIPE_\w+)=", docker))
    assert names, "the Dockerfile sets SENTPIPE_DATA_DIR"
    assert all(field_of(n) in Settings.model_fields for n in names), names
    s = settings_from({})
    assert f"127.0.0.1:{s.ingress_port}/healthz" in docker
    expose = re.search(r"^EXPOSE (.+)$", docker, re.M)
    assert expose and set(expose.group(1).split()) == {
        str(p) for p in (s.ingress_port, s.ingress_metrics_port, s.worker_metrics_port)
    }


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


def test_the_console_is_given_time_to_stop_a_running_replay_or_redrive() -> None:
    """Stopped, the console lets a replay or redrive finish the record in hand and write its ledger, for up to
    STOP_TIMEOUT_S; Kubernetes' default 30 s and compose's 10 s killed it first, maybe between a send and its
    ledger record (the next redrive sends that one again). Then the server and the live tail stop too: 50 s
    cut the tail's close (55 s in all)."""
    from sentpipe.console.app import STOP_BOUND_S

    objs = render(*CASES["production-console"])
    (console,) = [o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-console")]
    assert console["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > STOP_BOUND_S
    grace = compose_services([COMPOSE], COMPOSE_ENV)["console"]["stop_grace_period"]
    assert grace.endswith("s") and float(grace[:-1]) > STOP_BOUND_S


def _seconds_of(duration: str) -> float:
    """A compose duration as this file writes them: `45s`, `1m30s`."""
    found = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", duration)
    assert found and duration, f"unexpected duration {duration!r}"
    return int(found[1] or 0) * 60 + int(found[2] or 0)


# A slower broker's produce timeout (the ingress's stop is 5 x SENTPIPE_PRODUCE_TIMEOUT_S + 15 s), given for
# every role or the ingress alone, with the grace periods it needs.
SLOW_PRODUCE = {
    "slow-produce": (
        *SECRET,
        *_set("extraEnv[0].name=SENTPIPE_PRODUCE_TIMEOUT_S", "ingress.terminationGracePeriodSeconds=70"),
        *("--set-string", "extraEnv[0].value=10"),
    ),
    "slow-produce-ingress": (
        *SECRET,
        *_set(
            "ingress.extraEnv[0].name=SENTPIPE_PRODUCE_TIMEOUT_S", "ingress.terminationGracePeriodSeconds=95"
        ),
        *_set("ingress.preStopSleepSeconds=10", "worker.terminationGracePeriodSeconds=55"),
        *("--set-string", "ingress.extraEnv[0].value=14"),
    ),
}


@pytest.mark.parametrize("case", ["default", "production", "all-options", *SLOW_PRODUCE])
def test_the_grace_periods_cover_the_ingress_and_worker_stop(case: str, tmp_path: Path) -> None:
    """The kubelet and compose SIGKILL a container at its grace period: it must cover the code's own bound on
    a stop, measured from SIGTERM (for a pod, after its preStop sleep): the ingress's in-flight requests,
    its spool write and producer flush (`stop_deadline_s`), the worker's STOP_DEADLINE_S. The ingress pod had
    30 s, preStop included, against 5 + 35 s: a set of workers was killed before the supervisor's deadline,
    and a slow flush before its own."""
    from sentpipe.ingress.server import stop_deadline_s
    from sentpipe.processors.worker import STOP_DEADLINE_S

    objs = render(*(CASES.get(case) or SLOW_PRODUCE[case]))
    by_name = {o["metadata"]["name"]: o for o in objs if o["kind"] in ("Deployment", "StatefulSet")}
    checked = set()
    for where, c, s in container_settings(objs, tmp_path):
        role = c["args"][0]
        if role not in ("ingress", "worker"):
            continue
        spec = by_name[where.split("/")[0]]["spec"]["template"]["spec"]
        pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
        slept = float(pre_stop[1]) if pre_stop[:1] == ["sleep"] else 0.0
        needed = stop_deadline_s(s) if role == "ingress" else STOP_DEADLINE_S
        grace = spec["terminationGracePeriodSeconds"]
        assert grace - slept >= needed, f"{where}: {grace} s - {slept} s preStop < {needed} s"
        checked.add(role)
    assert checked == {"ingress", "worker"}
    services = compose_services([COMPOSE], COMPOSE_ENV)
    for name, needed in (
        ("ingress", stop_deadline_s(compose_settings("ingress", services["ingress"], tmp_path))),
        ("worker", STOP_DEADLINE_S),
    ):
        grace_s = _seconds_of(services[name].get("stop_grace_period", "10s"))
        assert grace_s >= needed, f"compose {name}: stop_grace_period {grace_s} s < {needed} s"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        # Kubernetes' default grace period: the pod was killed 20 s into a stop that may take 40 s.
        (
            ("ingress.terminationGracePeriodSeconds=30",),
            "ingress.terminationGracePeriodSeconds (30) leaves 25 s after ingress.preStopSleepSeconds,"
            " and the ingress's stop takes up to 40 s",
        ),
        (
            ("ingress.preStopSleepSeconds=15",),
            "ingress.terminationGracePeriodSeconds (50) leaves 35 s after ingress.preStopSleepSeconds",
        ),
        # A produce timeout raised for a slow broker lengthens the stop past the default grace period.
        (
            ("ingress.extraEnv[0].name=SENTPIPE_PRODUCE_TIMEOUT_S", "=ingress.extraEnv[0].value=10"),
            "the ingress's stop takes up to 65 s",
        ),
        (
            ("extraEnv[0].name=SENTPIPE_PRODUCE_TIMEOUT_S", "=extraEnv[0].value=7.5"),
            "the ingress's stop takes up to 52.5 s",
        ),
        (
            ("worker.terminationGracePeriodSeconds=30",),
            "worker.terminationGracePeriodSeconds (30) is shorter than the worker's own stop (up to 55 s",
        ),
    ],
    ids=["ingress-grace", "pre-stop", "produce-timeout-ingress", "produce-timeout-all", "worker-grace"],
)
def test_a_grace_period_shorter_than_the_stop_is_refused(values: tuple[str, ...], message: str) -> None:
    """The kubelet SIGKILLs at the grace period: an ingress still answering requests and flushing its producer
    (Sent counts each cut request as a failure), a worker before it committed what it had processed."""
    # A value starting with "=" is a string (an env entry's value).
    args = [a for v in values for a in (("--set-string", v[1:]) if v.startswith("=") else ("--set", v))]
    err = refused(*SECRET, *args)
    assert message in err, err


@pytest.mark.parametrize("produce_timeout", [None, "2.5", "12"])
def test_the_chart_refuses_exactly_the_grace_periods_below_the_codes_stop_bound(
    produce_timeout: str | None, tmp_path: Path
) -> None:
    """The chart's arithmetic is the code's: the shortest grace period it takes is the code's bound."""
    from sentpipe.ingress.server import stop_deadline_s
    from sentpipe.processors.worker import STOP_DEADLINE_S

    env = () if produce_timeout is None else ("--set-string", f"extraEnv[0].value={produce_timeout}")
    env = (*env, *_set("extraEnv[0].name=SENTPIPE_PRODUCE_TIMEOUT_S")) if env else ()
    s = settings_from({} if produce_timeout is None else {"SENTPIPE_PRODUCE_TIMEOUT_S": produce_timeout})
    ingress = 5 + math.ceil(stop_deadline_s(s))
    worker = math.ceil(STOP_DEADLINE_S)
    grace = (
        f"ingress.terminationGracePeriodSeconds={ingress}",
        f"worker.terminationGracePeriodSeconds={worker}",
    )
    render(*SECRET, *env, *_set(*grace))
    err = refused(*SECRET, *env, *_set(grace[0], f"worker.terminationGracePeriodSeconds={worker - 1}"))
    assert f"worker.terminationGracePeriodSeconds ({worker - 1}) is shorter" in err, err
    err = refused(*SECRET, *env, *_set(f"ingress.terminationGracePeriodSeconds={ingress - 1}", grace[1]))
    assert f"ingress.terminationGracePeriodSeconds ({ingress - 1}) leaves" in err, err


# Settings by which `topics ensure` shapes the topics and every role names, sizes or keys their records.
SHARED_SETTINGS = (
    "max_body_bytes",
    "raw_retention_ms",
    "dlq_retention_ms",
    "topic_prefix",
    "raw_partitions",
    "routed_partitions",
    "replication_factor",
    "default_tenant",
    "event_id_source",
    "kafka_bootstrap",
)


@pytest.mark.parametrize(
    "values",
    [
        CASES["all-options"],
        (
            *CASES["production-console"],
            *_set("extraEnv[0].name=SENTPIPE_MAX_BODY_BYTES"),
            *("--set-string", "extraEnv[0].value=4194304"),
        ),
    ],
    ids=["all-options", "body-limit"],
)
def test_every_role_and_the_init_job_read_the_shared_settings_alike(
    values: tuple[str, ...], tmp_path: Path
) -> None:
    seen = {where: s for where, _, s in container_settings(render(*values), tmp_path)}
    for name in SHARED_SETTINGS:
        assert len({getattr(s, name) for s in seen.values()}) == 1, (
            name,
            {w: getattr(s, name) for w, s in seen.items()},
        )


@pytest.mark.parametrize(
    ("role", "name", "value"),
    [
        # The topics stayed sized for 1 MiB bodies: the ingress refused to start, asking for a `topics ensure`
        # the init Job ran without it; the routed topics and the router's producer stayed sized for 1 MiB too.
        ("ingress", "SENTPIPE_MAX_BODY_BYTES", "4194304"),
        ("worker", "SENTPIPE_RAW_RETENTION_MS", "86400000"),
        ("console", "SENTPIPE_TOPIC_PREFIX", "eu."),
    ],
)
def test_a_shared_setting_in_one_roles_extra_env_is_refused(role: str, name: str, value: str) -> None:
    on = ("--set-string", f"console.token={CONSOLE_TOKEN}", *_set("console.enabled=true"))
    err = refused(
        *SECRET,
        *on,
        *_set(f"{role}.extraEnv[0].name={name}"),
        "--set-string",
        f"{role}.extraEnv[0].value={value}",
    )
    assert f"{name} in {role}.extraEnv would reach the {role} alone" in err, err


@pytest.mark.parametrize(
    "values",
    [
        ("--set-string", "secrets.webhookSecret= "),
        (*SECRET, "--set-json", 'secrets.tenants={"acme": [""]}'),
        (*SECRET, "--set-json", 'secrets.tenants={"acme": ["whsec_abc", "  "]}'),
        (*SECRET, "--set-json", 'secrets.tenants={"acme": " "}'),
    ],
    ids=["webhook-secret", "tenant-empty", "tenant-blank-in-rotation", "tenant-blank"],
)
def test_a_blank_signing_secret_is_refused_at_render_as_the_ingress_refuses_it(
    values: tuple[str, ...], tmp_path: Path
) -> None:
    """Rendered, a blank secret was an ingress in CrashLoopBackOff ("webhook secret is empty")."""
    err = refused(*values)
    assert "values don't meet the specifications of the schema" in err, err
    # What the ingress says of the same secret.
    from sentpipe.ingress.app import StartupError, verifiers_for

    tenants = tmp_path / "tenants.json"
    tenants.write_text(json.dumps({"acme": ["  "]}))
    with pytest.raises(StartupError, match="webhook secret is empty"):
        verifiers_for(settings_from({"SENTPIPE_WEBHOOK_SECRET": " "}))
    with pytest.raises(StartupError, match="webhook secret is empty"):
        verifiers_for(
            settings_from({"SENTPIPE_WEBHOOK_SECRET": WEBHOOK_SECRET, "SENTPIPE_SECRETS_FILE": str(tenants)})
        )


# Half configurations the pods would refuse (or silently not do) at start; what Settings says of the same.
HALVES: list[tuple[tuple[str, ...], str, dict[str, str] | None]] = [
    # The SASL user without a SASL protocol: the chart rendered a PLAINTEXT (or SSL) client with no SASL at
    # all, which the broker's SASL listener refuses; Settings refuses the same settings at start.
    (
        ("kafka.security.sasl.username=sentpipe", "kafka.security.sasl.passwordSecret.name=sentpipe"),
        "kafka.security.sasl.username / .passwordSecret.name are set but kafka.security.protocol is"
        " PLAINTEXT",
        {"SENTPIPE_KAFKA_SASL_USERNAME": "sentpipe", "SENTPIPE_KAFKA_SASL_PASSWORD": "pw"},
    ),
    (
        ("kafka.security.protocol=SSL", "kafka.security.sasl.passwordSecret.name=sentpipe"),
        "kafka.security.sasl.username / .passwordSecret.name are set but kafka.security.protocol is SSL",
        {"SENTPIPE_KAFKA_SECURITY_PROTOCOL": "SSL", "SENTPIPE_KAFKA_SASL_PASSWORD": "pw"},
    ),
    # A passphrase for a client key the chart was not given: dropped, the mTLS the user meant never set up.
    (
        ("kafka.security.protocol=SSL", "kafka.security.tls.clientSecret.keyPasswordKey=user.key-password"),
        "kafka.security.tls.clientSecret.keyPasswordKey needs kafka.security.tls.clientSecret.name",
        None,
    ),
    # A preStop sleep as long as the grace period: the kubelet kills the pod before it ever gets SIGTERM.
    (
        ("ingress.preStopSleepSeconds=50",),
        "ingress.preStopSleepSeconds (50) leaves nothing of ingress.terminationGracePeriodSeconds (50)",
        None,
    ),
    # Both listeners of the ingress on one port: the second bind fails, the pod crash-loops.
    (("ingress.metricsPort=8080",), "ingress.port and ingress.metricsPort are both 8080", None),
]


@pytest.mark.parametrize(
    ("values", "message", "env"),
    HALVES,
    ids=["sasl-plaintext", "sasl-ssl", "key-password", "pre-stop", "ports"],
)
def test_the_chart_refuses_half_a_configuration(
    values: tuple[str, ...], message: str, env: dict[str, str] | None
) -> None:
    err = refused(*SECRET, *_set(*values))
    assert message in err, err
    if env is not None:
        with pytest.raises(ValidationError, match="SECURITY_PROTOCOL is"):
            settings_from(env)
