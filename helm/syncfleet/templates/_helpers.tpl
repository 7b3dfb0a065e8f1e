{{- define "syncfleet.fullname" -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "syncfleet.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "syncfleet.secretName" -}}
{{- default (include "syncfleet.fullname" .) .Values.existingSecret -}}
{{- end -}}

{{- define "syncfleet.image" -}}
{{ .Values.image.repository }}:{{ default .Chart.AppVersion .Values.image.tag }}
{{- end -}}

{{/* Environment shared by every syncfleet container. Secrets come from the Secret only. */}}
{{- define "syncfleet.env" -}}
- name: SYNCFLEET_DATABASE__URL
  valueFrom: {secretKeyRef: {name: {{ include "syncfleet.secretName" . }}, key: databaseUrl}}
- name: SYNCFLEET_AMQP__URL
  valueFrom: {secretKeyRef: {name: {{ include "syncfleet.secretName" . }}, key: amqpUrl}}
- name: SYNCFLEET_REDIS__URL
  valueFrom: {secretKeyRef: {name: {{ include "syncfleet.secretName" . }}, key: redisUrl}}
- name: SYNCFLEET_ENCRYPTION_KEY
  valueFrom: {secretKeyRef: {name: {{ include "syncfleet.secretName" . }}, key: encryptionKey}}
- name: SYNCFLEET_NOTION__BASE_URL
  value: {{ .Values.config.notionBaseUrl | quote }}
- name: SYNCFLEET_NOTION__VERSION
  value: {{ .Values.config.notionVersion | quote }}
- name: SYNCFLEET_AMQP__PREFIX
  value: {{ .Values.config.amqpPrefix | quote }}
- name: SYNCFLEET_SYNC__OVERLAP_SECS
  value: {{ .Values.config.overlapSecs | quote }}
- name: SYNCFLEET_LOG_FORMAT
  value: {{ .Values.config.logFormat | quote }}
- name: SYNCFLEET_LOG_LEVEL
  value: {{ .Values.config.logLevel | quote }}
{{- end -}}
