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

{{- define "sentpipe.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
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
Ingress worker processes per pod (SENTPIPE_INGRESS_WORKERS): ingress.workers when set, else the pod's CPU
request rounded up ("250m" -> 1, "1" -> 1, "1500m" -> 2, 2 -> 2), at least 1. One process's event loop uses
about one core; worker i serves metrics on ingress.metricsPort + i.
*/}}
{{- define "sentpipe.ingressWorkers" -}}
{{- $i := .Values.ingress -}}
{{- if $i.workers -}}
{{- int $i.workers -}}
{{- else -}}
{{- $cpu := toString (dig "requests" "cpu" "" ($i.resources | default dict)) -}}
{{- $milli := 1000 -}}
{{- if hasSuffix "m" $cpu -}}
{{- $milli = atoi (trimSuffix "m" $cpu) -}}
{{- else if $cpu -}}
{{- $milli = int (mulf (float64 $cpu) 1000) -}}
{{- end -}}
{{- max 1 (div (add $milli 999) 1000) -}}
{{- end -}}
{{- end -}}
