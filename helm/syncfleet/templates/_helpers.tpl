{{/*
Names and labels. Every object carries the same app.kubernetes.io/* set; pods add their
component (producer, worker, migrate, integrations, test).
*/}}
{{- define "syncfleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "syncfleet.fullname" -}}
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

{{- define "syncfleet.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "syncfleet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "syncfleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "syncfleet.labels" -}}
helm.sh/chart: {{ include "syncfleet.chart" . }}
{{ include "syncfleet.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: syncfleet
{{- end -}}

{{/* Labels of one component's objects: (dict "root" $ "component" "worker"). */}}
{{- define "syncfleet.componentLabels" -}}
{{ include "syncfleet.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Selector of one component: (dict "root" $ "component" "worker"). */}}
{{- define "syncfleet.componentSelector" -}}
{{ include "syncfleet.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "syncfleet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "syncfleet.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* repository@digest when a digest is set (immutable), else repository:tag (appVersion by default). */}}
{{- define "syncfleet.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/*
Where one secret item comes from: (dict "root" $ "item" "databaseUrl") → JSON
{"name", "key", "inChart", "set"}. An item reads the item's own existingSecret, else
secrets.existingSecret, else the chart's Secret (when it has a value there). The key in an
existing Secret defaults to the item's name.
*/}}
{{- define "syncfleet.secretSource" -}}
{{- $s := .root.Values.secrets -}}
{{- $item := index $s .item -}}
{{- $existing := default $s.existingSecret $item.existingSecret -}}
{{- if $existing -}}
{{- dict "name" $existing "key" (default .item $item.key) "inChart" false "set" true | toJson -}}
{{- else -}}
{{- dict "name" (include "syncfleet.fullname" .root) "key" .item "inChart" true "set" (not (empty $item.value)) | toJson -}}
{{- end -}}
{{- end -}}

{{/* One env var read from a secret item: (dict "root" $ "item" "apiTokens" "env" "SYNCFLEET_API__TOKENS" "optional" true). */}}
{{- define "syncfleet.secretEnv" -}}
{{- $src := include "syncfleet.secretSource" . | fromJson -}}
{{- if or $src.set (not $src.inChart) }}
- name: {{ .env }}
  valueFrom:
    secretKeyRef:
      name: {{ $src.name }}
      key: {{ $src.key }}
      {{- if .optional }}
      optional: true
      {{- end }}
{{- end -}}
{{- end -}}

{{/* Whether any item (or integration token) lives in the chart's own Secret. */}}
{{- define "syncfleet.chartSecretNeeded" -}}
{{- $needed := false -}}
{{- range $item := list "databaseUrl" "amqpUrl" "amqpManagementUrl" "redisUrl" "redisNodePassword" "encryptionKey" "apiTokens" -}}
{{- $src := include "syncfleet.secretSource" (dict "root" $ "item" $item) | fromJson -}}
{{- if and $src.inChart $src.set -}}{{- $needed = true -}}{{- end -}}
{{- end -}}
{{- range .Values.integrations -}}
{{- if and (not .token.existingSecret) (not $.Values.secrets.existingSecret) .token.value -}}{{- $needed = true -}}{{- end -}}
{{- end -}}
{{- if $needed -}}true{{- end -}}
{{- end -}}

{{/*
Settings every syncfleet container gets: connection strings and the encryption key from
secrets, the rest as plain SYNCFLEET_* variables (config.rs: `__` nests).
*/}}
{{- define "syncfleet.env" -}}
{{- include "syncfleet.secretEnv" (dict "root" . "item" "databaseUrl" "env" "SYNCFLEET_DATABASE__URL") }}
{{- include "syncfleet.secretEnv" (dict "root" . "item" "amqpUrl" "env" "SYNCFLEET_AMQP__URL") }}
{{- include "syncfleet.secretEnv" (dict "root" . "item" "redisUrl" "env" "SYNCFLEET_REDIS__URL") }}
{{- include "syncfleet.secretEnv" (dict "root" . "item" "redisNodePassword" "env" "SYNCFLEET_REDIS__NODE_PASSWORD" "optional" true) }}
{{- include "syncfleet.secretEnv" (dict "root" . "item" "encryptionKey" "env" "SYNCFLEET_ENCRYPTION_KEY") }}
- name: SYNCFLEET_NOTION__BASE_URL
  value: {{ .Values.config.notionBaseUrl | quote }}
- name: SYNCFLEET_NOTION__VERSION
  value: {{ .Values.config.notionVersion | quote }}
- name: SYNCFLEET_AMQP__PREFIX
  value: {{ .Values.config.amqpPrefix | quote }}
- name: SYNCFLEET_AMQP__PARK_DELAY_MS
  value: {{ .Values.config.parkDelayMs | quote }}
- name: SYNCFLEET_REDIS__KEY_PREFIX
  value: {{ .Values.config.redisKeyPrefix | quote }}
- name: SYNCFLEET_REDIS__MODE
  value: {{ .Values.config.redisMode | quote }}
- name: SYNCFLEET_REDIS__SENTINEL_MASTER
  value: {{ .Values.config.redisSentinelMaster | quote }}
- name: SYNCFLEET_SYNC__OVERLAP_SECS
  value: {{ .Values.config.overlapSecs | quote }}
- name: SYNCFLEET_SYNC__MAX_CHAINS
  value: {{ .Values.config.maxChains | quote }}
- name: SYNCFLEET_LOG_FORMAT
  value: {{ .Values.config.logFormat | quote }}
- name: SYNCFLEET_LOG_LEVEL
  value: {{ .Values.config.logLevel | quote }}
{{- with .Values.otel.endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ . | quote }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* envFrom shared by every syncfleet container. */}}
{{- define "syncfleet.envFrom" -}}
{{- with .Values.extraEnvFrom }}
envFrom:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/*
Pod-level settings shared by every pod of the chart: (dict "root" $ "serviceAccount" true).
Pods never get an API token: syncfleet does not talk to the Kubernetes API.
*/}}
{{- define "syncfleet.podSpec" -}}
{{- $v := .root.Values -}}
{{- if .serviceAccount }}
serviceAccountName: {{ include "syncfleet.serviceAccountName" .root }}
{{- end }}
automountServiceAccountToken: false
{{- with $v.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml $v.podSecurityContext | nindent 2 }}
{{- with $v.priorityClassName }}
priorityClassName: {{ . | quote }}
{{- end }}
{{- with $v.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/*
topologySpreadConstraints of one component; a constraint without a labelSelector gets the
component's selector: (dict "root" $ "component" "worker").
*/}}
{{- define "syncfleet.topologySpread" -}}
{{- $root := .root -}}
{{- $component := .component -}}
{{- with $root.Values.topologySpreadConstraints }}
topologySpreadConstraints:
{{- range . }}
  {{- $c := deepCopy . }}
  {{- if not $c.labelSelector }}
  {{- $_ := set $c "labelSelector" (dict "matchLabels" (include "syncfleet.componentSelector" (dict "root" $root "component" $component) | fromYaml)) }}
  {{- end }}
  - {{ toYaml $c | nindent 4 | trim }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Pod template metadata: (dict "root" $ "component" "worker"). */}}
{{- define "syncfleet.podMetadata" -}}
labels:
  {{- include "syncfleet.componentLabels" . | nindent 2 }}
  {{- with .root.Values.podLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
annotations:
  {{- /* A rotated secret or changed setting rolls the pods. */}}
  checksum/secret: {{ include (print .root.Template.BasePath "/secret.yaml") .root | sha256sum }}
  {{- with .root.Values.podAnnotations }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end -}}

{{/* Volumes and mounts shared by every syncfleet container; /tmp is writable, the root is not. */}}
{{- define "syncfleet.volumes" -}}
volumes:
  - name: tmp
    emptyDir:
      sizeLimit: 64Mi
  {{- with .Values.extraVolumes }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end -}}

{{- define "syncfleet.volumeMounts" -}}
volumeMounts:
  - name: tmp
    mountPath: /tmp
  {{- with .Values.extraVolumeMounts }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end -}}

{{/* Settings that cannot be expressed in values.schema.json. Included by every template. */}}
{{- define "syncfleet.validate" -}}
{{- $w := .Values.worker -}}
{{- if le (int $w.terminationGracePeriodSeconds) (int $w.shutdownGraceSecs) -}}
{{- fail (printf "worker.terminationGracePeriodSeconds (%v) must exceed worker.shutdownGraceSecs (%v): in-flight jobs need that long to checkpoint and requeue before the kubelet kills the pod" $w.terminationGracePeriodSeconds $w.shutdownGraceSecs) -}}
{{- end -}}
{{- if and $w.autoscaling.keda.enabled $w.autoscaling.hpa.enabled -}}
{{- fail "worker.autoscaling.keda.enabled and worker.autoscaling.hpa.enabled are mutually exclusive: both would own the worker Deployment's replica count" -}}
{{- end -}}
{{- if gt (int $w.autoscaling.minReplicas) (int $w.autoscaling.maxReplicas) -}}
{{- fail "worker.autoscaling.minReplicas must not exceed worker.autoscaling.maxReplicas" -}}
{{- end -}}
{{- range $item := list "databaseUrl" "amqpUrl" "redisUrl" "encryptionKey" -}}
{{- $src := include "syncfleet.secretSource" (dict "root" $ "item" $item) | fromJson -}}
{{- if not $src.set -}}
{{- fail (printf "secrets.%s: set secrets.%s.value, or name an existing Secret (secrets.%s.existingSecret or secrets.existingSecret)" $item $item $item) -}}
{{- end -}}
{{- end -}}
{{- if $w.autoscaling.keda.enabled -}}
{{- $src := include "syncfleet.secretSource" (dict "root" $ "item" "amqpManagementUrl") | fromJson -}}
{{- if not $src.set -}}
{{- fail "worker.autoscaling.keda needs secrets.amqpManagementUrl (http://user:password@rabbitmq:15672/<vhost>): KEDA reads ready + unacknowledged messages from RabbitMQ's management API" -}}
{{- end -}}
{{- end -}}
{{- if and $w.autoscaling.hpa.enabled (lt (int $w.autoscaling.minReplicas) 1) -}}
{{- fail "worker.autoscaling.minReplicas must be at least 1 with an HPA (scaling to zero needs KEDA)" -}}
{{- end -}}
{{- range .Values.integrations -}}
{{- if not (or .token.value .token.existingSecret $.Values.secrets.existingSecret) -}}
{{- fail (printf "integrations[%s].token: set token.value, or name an existing Secret (token.existingSecret or secrets.existingSecret)" .slug) -}}
{{- end -}}
{{- end -}}
{{- if and .Values.producer.ingress.enabled (not .Values.producer.enabled) -}}
{{- fail "producer.ingress needs producer.enabled" -}}
{{- end -}}
{{- end -}}
