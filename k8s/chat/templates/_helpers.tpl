{{- define "chat.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "chat.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "chat.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* An image reference: repository@digest when a digest is set, else repository:tag. */}}
{{- define "chat.image" -}}
{{- if .digest -}}
{{ .repository }}@{{ .digest }}
{{- else -}}
{{ .repository }}:{{ .tag }}
{{- end -}}
{{- end -}}

{{- define "chat.jwtSecretName" -}}
{{- .Values.jwt.existingSecret | default (printf "%s-jwt" (include "chat.fullname" .)) -}}
{{- end -}}

{{- define "chat.urlSecretName" -}}
{{- printf "%s-urls" (include "chat.fullname" .) -}}
{{- end -}}

{{/* REDIS_URL, MONGODB_URI and the other settings both services share. */}}
{{- define "chat.backendEnv" -}}
- name: REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.existingSecret | default (include "chat.urlSecretName" .) }}
      key: {{ if .Values.redis.existingSecret }}{{ .Values.redis.existingSecretKey }}{{ else }}redis-url{{ end }}
- name: REDIS_PREFIX
  value: {{ .Values.redis.prefix | quote }}
- name: MONGODB_URI
  valueFrom:
    secretKeyRef:
      name: {{ .Values.mongodb.existingSecret | default (include "chat.urlSecretName" .) }}
      key: {{ if .Values.mongodb.existingSecret }}{{ .Values.mongodb.existingSecretKey }}{{ else }}mongodb-uri{{ end }}
- name: MONGODB_DB
  value: {{ .Values.mongodb.database | quote }}
- name: INGEST_PARTITIONS
  value: {{ .Values.ingest.partitions | quote }}
- name: INGEST_MAX_BACKLOG
  value: {{ .Values.ingest.maxBacklog | quote }}
- name: INGEST_MIN_REPLICAS
  value: {{ .Values.ingest.minReplicas | quote }}
- name: INGEST_REPLICA_TIMEOUT_MS
  value: {{ .Values.ingest.replicaTimeoutMs | quote }}
- name: IDEMPOTENCY_TTL_SECS
  value: {{ .Values.ingest.idempotencyTtlSeconds | quote }}
- name: LOG_FORMAT
  value: {{ .Values.logFormat | quote }}
{{- end -}}

{{- define "chat.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "chat.containerSecurityContext" -}}
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: true
runAsNonRoot: true
runAsUser: 65532
capabilities:
  drop: ["ALL"]
{{- end -}}
