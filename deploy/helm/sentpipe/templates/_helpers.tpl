{{- define "sentpipe.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "sentpipe.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "sentpipe.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "sentpipe.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: sentpipe
{{- end -}}

{{/* Selector labels of one role; call with (dict "ctx" $ "component" "ingress"). */}}
{{- define "sentpipe.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sentpipe.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* By digest when image.digest is set (what runs cannot change under the same name), else by tag. */}}
{{- define "sentpipe.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "sentpipe.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "sentpipe.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "sentpipe.secretName" -}}
{{- default (include "sentpipe.fullname" .) .Values.secrets.existingSecret -}}
{{- end -}}

{{- define "sentpipe.tenantsFile" -}}
{{- if or (and .Values.secrets.existingSecret .Values.secrets.tenantsFile) (and (not .Values.secrets.existingSecret) .Values.secrets.tenants) -}}
true
{{- end -}}
{{- end -}}

{{/* Settings every role reads; secrets come from the Secret, never from the pod spec. */}}
{{- define "sentpipe.env" -}}
- name: SENTPIPE_KAFKA_BOOTSTRAP
  value: {{ .Values.kafka.bootstrap | quote }}
- name: SENTPIPE_TOPIC_PREFIX
  value: {{ .Values.kafka.topicPrefix | quote }}
- name: SENTPIPE_REPLICATION_FACTOR
  value: {{ .Values.kafka.replicationFactor | quote }}
- name: SENTPIPE_RAW_PARTITIONS
  value: {{ .Values.kafka.rawPartitions | quote }}
- name: SENTPIPE_ROUTED_PARTITIONS
  value: {{ .Values.kafka.routedPartitions | quote }}
- name: SENTPIPE_DEFAULT_TENANT
  value: {{ .Values.config.defaultTenant | quote }}
- name: SENTPIPE_EVENT_ID_SOURCE
  value: {{ .Values.config.eventIdSource | quote }}
- name: SENTPIPE_LOG_JSON
  value: {{ .Values.config.logJson | quote }}
- name: SENTPIPE_LOG_LEVEL
  value: {{ .Values.config.logLevel | quote }}
{{- include "sentpipe.kafkaSecurityEnv" . }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Only the roles that talk to PostgreSQL get its URL. */}}
{{- define "sentpipe.databaseEnv" -}}
- name: SENTPIPE_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "sentpipe.secretName" . }}
      key: database-url
{{- end -}}

{{- define "sentpipe.tmpVolume" -}}
- name: tmp
  emptyDir:
    sizeLimit: 64Mi
{{- end -}}

{{/*
The worker workloads, as a JSON list (read it with fromJsonArray). One, `worker` (SENTPIPE_WORKER_ROLE=all),
or with worker.split.enabled two: `router` (route: dedup table + routing) and `projector` (project:
projections + handlers). Per entry: name (the name suffix and the component label), role, replicas and
the partition count bounding them (with the value names for the error), table (holds the dedup table, so
worker.rocksdb applies), projects (talks to PostgreSQL and runs handlers), resources.
*/}}
{{- define "sentpipe.workers" -}}
{{- $w := .Values.worker -}}
{{- $kafka := .Values.kafka -}}
{{- $workers := list -}}
{{- if $w.split.enabled -}}
{{- $p := $w.split.projector -}}
{{- $workers = list
  (dict "name" "router" "role" "route" "table" true "projects" false "resources" $w.resources
    "replicas" $w.replicas "replicasKey" "worker.replicas"
    "partitions" $kafka.rawPartitions "partitionsKey" "kafka.rawPartitions"
    "why" "the extra routers would get no partitions")
  (dict "name" "projector" "role" "project" "table" false "projects" true "resources" (default $w.resources $p.resources)
    "replicas" $p.replicas "replicasKey" "worker.split.projector.replicas"
    "partitions" $kafka.routedPartitions "partitionsKey" "kafka.routedPartitions"
    "why" "the extra projectors would get no partitions") -}}
{{- else -}}
{{- $workers = list
  (dict "name" "worker" "role" "all" "table" true "projects" true "resources" $w.resources
    "replicas" $w.replicas "replicasKey" "worker.replicas"
    "partitions" $kafka.rawPartitions "partitionsKey" "kafka.rawPartitions"
    "why" "the extra workers would get no partitions") -}}
{{- end -}}
{{- range $workers -}}
{{- if gt (int .replicas) (int .partitions) -}}
{{- fail (printf "%s (%d) exceeds %s (%d): %s" .replicasKey (int .replicas) .partitionsKey (int .partitions) .why) -}}
{{- end -}}
{{- end -}}
{{- toJson $workers -}}
{{- end -}}

{{/*
Pod-template checksums of only what each role reads from the Secret, so that a change rolls exactly the
pods that need it: the ingress reads webhook-secret (and tenants.json), the roles that project read
database-url, the router reads neither (a restart would replay its dedup table for nothing). An
existingSecret's contents are not visible to the chart: its name and secrets.existingSecretRevision stand
in for them, so bumping a revision on `helm upgrade` rolls the pods that read that key.
*/}}
{{- define "sentpipe.webhookSecretChecksum" -}}
{{- $s := .Values.secrets -}}
{{- if $s.existingSecret -}}
{{- toJson (list $s.existingSecret $s.tenantsFile $s.existingSecretRevision.webhook) | sha256sum -}}
{{- else -}}
{{- include "sentpipe.secretChecksum" (list . (toJson (list $s.webhookSecret $s.tenants))) -}}
{{- end -}}
{{- end -}}

{{/* The webhook secret alone (the console reads it, not the tenants file). */}}
{{- define "sentpipe.consoleWebhookChecksum" -}}
{{- $s := .Values.secrets -}}
{{- if $s.existingSecret -}}
{{- toJson (list $s.existingSecret $s.existingSecretRevision.webhook) | sha256sum -}}
{{- else -}}
{{- include "sentpipe.secretChecksum" (list . $s.webhookSecret) -}}
{{- end -}}
{{- end -}}

{{- define "sentpipe.databaseUrlChecksum" -}}
{{- $s := .Values.secrets -}}
{{- if $s.existingSecret -}}
{{- toJson (list $s.existingSecret $s.existingSecretRevision.database) | sha256sum -}}
{{- else -}}
{{- include "sentpipe.secretChecksum" (list . .Values.database.url) -}}
{{- end -}}
{{- end -}}

{{/*
The checksum of a secret value, (list $ value), for a pod annotation: more principals can read a pod
(`get pods`) than a Secret, and a plain SHA-256 of a database URL whose other parts are known let them test
password guesses offline at billions a second. Sprig's derivePassword runs scrypt first (about 0.2 s a
guess), salted with the release's namespace and name; the result changes whenever the value does.
*/}}
{{- define "sentpipe.secretChecksum" -}}
{{- $root := index . 0 -}}
{{- $salt := printf "%s/%s" $root.Release.Namespace $root.Release.Name -}}
{{- derivePassword 1 "maximum" (toString (index . 1)) $salt "sentpipe-checksum" | sha256sum -}}
{{- end -}}

{{/*
A topologySpreadConstraints list with each entry's missing labelSelector filled in with the workload's own
selector; call with (dict "constraints" LIST "selector" (include "sentpipe.selectorLabels" ...)).
*/}}
{{- define "sentpipe.spread" -}}
{{- $own := dict "labelSelector" (dict "matchLabels" (.selector | fromYaml)) -}}
{{- range .constraints }}
- {{ toYaml (ternary . (merge (deepCopy .) $own) (hasKey . "labelSelector")) | nindent 2 | trim }}
{{- end -}}
{{- end -}}

{{/* A CRD-backed object the user asked for must not be dropped silently: no alerts would be a surprise. */}}
{{- define "sentpipe.requireApi" -}}
{{- if not (.ctx.Capabilities.APIVersions.Has .api) -}}
{{- fail (printf "%s needs the %s API (Prometheus Operator CRDs), which this cluster does not serve; with `helm template`, pass --api-versions %s" .value .api .api) -}}
{{- end -}}
{{- end -}}

{{/* The Kafka security settings (kafka.security) as SENTPIPE_KAFKA_* variables; the password from its Secret,
files from the TLS volume. Half a configuration fails the render, naming the value to set. */}}
{{- define "sentpipe.kafkaSecurityEnv" -}}
{{- $sec := .Values.kafka.security -}}
{{- $proto := upper $sec.protocol -}}
{{- $sasl := hasPrefix "SASL_" $proto -}}
{{- $tls := hasSuffix "SSL" $proto -}}
{{- if and $sec.tls.clientSecret.keyPasswordKey (not $sec.tls.clientSecret.name) -}}
{{- fail "kafka.security.tls.clientSecret.keyPasswordKey needs kafka.security.tls.clientSecret.name (the Secret with the key and its passphrase)" -}}
{{- end -}}
{{- if and (not $tls) (or $sec.tls.caSecret.name $sec.tls.clientSecret.name) -}}
{{- fail (printf "kafka.security.tls.* is set but kafka.security.protocol is %s: use SSL or SASL_SSL" $sec.protocol) -}}
{{- end -}}
{{- /* As the app refuses SENTPIPE_KAFKA_SASL_* without a SASL protocol: rendered without them, the client
connected with no SASL at all, which a SASL listener refuses. */}}
{{- if and (not $sasl) (or $sec.sasl.username $sec.sasl.passwordSecret.name) -}}
{{- fail (printf "kafka.security.sasl.username / .passwordSecret.name are set but kafka.security.protocol is %s: use SASL_SSL (or SASL_PLAINTEXT)" $sec.protocol) -}}
{{- end -}}
{{- if and $sasl (not (and $sec.sasl.username $sec.sasl.passwordSecret.name)) -}}
{{- fail (printf "kafka.security.protocol %s needs kafka.security.sasl.username and kafka.security.sasl.passwordSecret.name" $sec.protocol) -}}
{{- end }}
- name: SENTPIPE_KAFKA_SECURITY_PROTOCOL
  value: {{ $proto | quote }}
{{- if $sasl }}
- name: SENTPIPE_KAFKA_SASL_MECHANISM
  value: {{ $sec.sasl.mechanism | upper | quote }}
- name: SENTPIPE_KAFKA_SASL_USERNAME
  value: {{ $sec.sasl.username | quote }}
- name: SENTPIPE_KAFKA_SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $sec.sasl.passwordSecret.name }}
      key: {{ $sec.sasl.passwordSecret.key }}
{{- end }}
{{- if $tls }}
{{- if $sec.tls.caSecret.name }}
- name: SENTPIPE_KAFKA_SSL_CA_FILE
  value: /etc/sentpipe/tls/kafka-ca.crt
{{- end }}
{{- if $sec.tls.clientSecret.name }}
- name: SENTPIPE_KAFKA_SSL_CERT_FILE
  value: /etc/sentpipe/tls/kafka-client.crt
- name: SENTPIPE_KAFKA_SSL_KEY_FILE
  value: /etc/sentpipe/tls/kafka-client.key
{{- if $sec.tls.clientSecret.keyPasswordKey }}
- name: SENTPIPE_KAFKA_SSL_KEY_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $sec.tls.clientSecret.name }}
      key: {{ $sec.tls.clientSecret.keyPasswordKey }}
{{- end }}
{{- end }}
- name: SENTPIPE_KAFKA_SSL_CHECK_HOSTNAME
  value: {{ $sec.tls.checkHostname | quote }}
{{- end }}
{{- end -}}

{{/* Certificates from existing Secrets as projected-volume sources; call with (dict "ctx" $ "database" BOOL):
the database's only for pods that use it. Empty when none is configured. */}}
{{- define "sentpipe.tlsSources" -}}
{{- $k := .ctx.Values.kafka.security.tls -}}
{{- $d := .ctx.Values.database.tls -}}
{{- if $k.caSecret.name }}
- secret:
    name: {{ $k.caSecret.name }}
    items:
      - key: {{ $k.caSecret.key }}
        path: kafka-ca.crt
{{- end }}
{{- if $k.clientSecret.name }}
- secret:
    name: {{ $k.clientSecret.name }}
    items:
      - key: {{ $k.clientSecret.certKey }}
        path: kafka-client.crt
      - key: {{ $k.clientSecret.keyKey }}
        path: kafka-client.key
{{- end }}
{{- if and .database $d.caSecret.name }}
- secret:
    name: {{ $d.caSecret.name }}
    items:
      - key: {{ $d.caSecret.key }}
        path: database-ca.crt
{{- end }}
{{- if and .database $d.clientSecret.name }}
- secret:
    name: {{ $d.clientSecret.name }}
    items:
      - key: {{ $d.clientSecret.certKey }}
        path: database-client.crt
      - key: {{ $d.clientSecret.keyKey }}
        path: database-client.key
{{- end }}
{{- end -}}

{{/* The read-only TLS volume (see sentpipe.tlsSources), or nothing. */}}
{{- define "sentpipe.tlsVolume" -}}
{{- $sources := include "sentpipe.tlsSources" . -}}
{{- if $sources }}
- name: tls
  projected:
    # 0440: owned by root, readable by the pod's group (fsGroup) only; libpq refuses a key anyone can read.
    defaultMode: 288
    sources:
      {{- $sources | nindent 6 }}
{{- end }}
{{- end -}}

{{- define "sentpipe.tlsVolumeMount" -}}
{{- if include "sentpipe.tlsSources" . }}
- name: tls
  mountPath: /etc/sentpipe/tls
  readOnly: true
{{- end }}
{{- end -}}

{{/*
Ingress worker processes per pod (SENTPIPE_INGRESS_WORKERS): ingress.workers when set, else the pod's CPU
request rounded up ("250m" -> 1, "1" -> 1, "1500m" -> 2, 2 -> 2), at least 1 and at most 256 (the app's
ceiling). Without a CPU request, the CPU limit, which Kubernetes then makes the request. One process's event
loop uses about one core; the processes' metrics are served as one on ingress.metricsPort (labelled `worker`).
*/}}
{{- define "sentpipe.ingressWorkers" -}}
{{- $i := .Values.ingress -}}
{{- if $i.workers -}}
{{- int $i.workers -}}
{{- else -}}
{{- $res := $i.resources | default dict -}}
{{- $cpu := toString (dig "requests" "cpu" (dig "limits" "cpu" "" $res) $res) -}}
{{- $milli := 1000 -}}
{{- if hasSuffix "m" $cpu -}}
{{- $milli = atoi (trimSuffix "m" $cpu) -}}
{{- else if $cpu -}}
{{- $milli = int (mulf (float64 $cpu) 1000) -}}
{{- end -}}
{{- min 256 (max 1 (div (add $milli 999) 1000)) -}}
{{- end -}}
{{- end -}}

{{/* The router's consumer group (SENTPIPE_APP_ID): worker.appId, or, when that is empty, what the app derives
from the topic prefix (sentpipe/settings.py default_app_id; deploy/check_chart.py renders both ways). */}}
{{- define "sentpipe.appId" -}}
{{- if .Values.worker.appId -}}
{{- .Values.worker.appId -}}
{{- else if eq .Values.kafka.topicPrefix "sent." -}}
sentpipe
{{- else -}}
{{- $id := printf "sentpipe-%s" (default "default" (trimAll "." .Values.kafka.topicPrefix)) -}}
{{- /* settings.py MAX_APP_ID: the changelog "<app id>-dedup-changelog" must stay a legal topic name. */}}
{{- if gt (len $id) 233 -}}
{{- fail (printf "the app id derived from kafka.topicPrefix (%s) is longer than 233 characters: shorten the prefix or set worker.appId" $id) -}}
{{- end -}}
{{- $id -}}
{{- end -}}
{{- end -}}

{{/* A Kubernetes quantity as the values schema allows it for sizes (digits, an optional fraction, then Ki, Mi,
Gi, Ti, k, M, G or T) in bytes, e.g. "2Gi" -> 2147483648. */}}
{{- define "sentpipe.quantityBytes" -}}
{{- $q := toString . -}}
{{- $number := regexFind "^[0-9]+(\\.[0-9]+)?" $q -}}
{{- $units := dict "" 1 "k" 1000 "M" 1000000 "G" 1000000000 "T" 1000000000000 "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 -}}
{{- $unit := trimPrefix $number $q -}}
{{- if or (not $number) (not (hasKey $units $unit)) -}}
{{- fail (printf "%q is not a size (e.g. 2Gi)" $q) -}}
{{- end -}}
{{- mulf (float64 $number) (index $units $unit) | floor | int64 -}}
{{- end -}}

{{/*
Settings every role, and the init Job's `topics ensure`, must read alike: they name the topics, size their
record limits and retention, or say whose an event is. In one role's extraEnv they reached that role alone:
SENTPIPE_MAX_BODY_BYTES in ingress.extraEnv left the topics sized for 1 MiB bodies (the ingress then refused
to start, asking for a `topics ensure` the init Job ran without it) and the routed topics and the router's
producer sized for them too. Refused there; extraEnv (every role) or the chart's own value takes them.
*/}}
{{- define "sentpipe.sharedSettingsInOneRole" -}}
{{- $shared := list "SENTPIPE_MAX_BODY_BYTES" "SENTPIPE_RAW_RETENTION_MS" "SENTPIPE_DLQ_RETENTION_MS" "SENTPIPE_TOPIC_PREFIX" "SENTPIPE_RAW_PARTITIONS" "SENTPIPE_ROUTED_PARTITIONS" "SENTPIPE_REPLICATION_FACTOR" "SENTPIPE_DEFAULT_TENANT" "SENTPIPE_EVENT_ID_SOURCE" "SENTPIPE_KAFKA_BOOTSTRAP" -}}
{{- range $role := list "ingress" "worker" "console" -}}
{{- range (index $.Values $role).extraEnv -}}
{{- if has .name $shared -}}
{{- fail (printf "%s in %s.extraEnv would reach the %s alone, but every role and the init Job's `topics ensure` must read it alike: set it in extraEnv (or its chart value: kafka.*, config.*)" .name $role $role) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
