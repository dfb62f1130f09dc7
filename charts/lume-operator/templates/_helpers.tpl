{{/* Names, labels and the pieces several templates share. */}}

{{- define "lume-operator.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name: the release name alone when it already says lume-operator. */}}
{{- define "lume-operator.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "lume-operator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "lume-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: lume-operator
{{- end }}

{{- define "lume-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lume-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "lume-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "lume-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository:tag, or repository@digest when a digest is given. */}}
{{- define "lume-operator.image" -}}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository (.image.tag | default .default) }}
{{- end }}
{{- end }}

{{- define "lume-operator.prefectServerName" -}}
{{- printf "%s-prefect-server" (include "lume-operator.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The Prefect API the operator defaults to: given, else the bundled server's, else none. */}}
{{- define "lume-operator.prefectApiUrl" -}}
{{- if .Values.prefectApiUrl }}
{{- .Values.prefectApiUrl }}
{{- else if .Values.prefectServer.enabled }}
{{- printf "http://%s.%s.svc:%d/api" (include "lume-operator.prefectServerName" .) .Release.Namespace (int .Values.prefectServer.service.port) }}
{{- end }}
{{- end }}

{{/*
Pod and container security contexts that pass the Pod Security Standard `restricted` (and so
`baseline`): non-root with a fixed non-zero uid, no privilege escalation, every capability
dropped, the runtime's default seccomp profile, a read-only root filesystem.
*/}}
{{- define "lume-operator.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "lume-operator.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
privileged: false
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
The namespaces the operator watches, as a JSON list: none in cluster-wide mode, else
watchNamespaces, else the release's own namespace.
*/}}
{{- define "lume-operator.watchNamespaces" -}}
{{- if .Values.clusterWide }}
{{- if .Values.watchNamespaces }}
{{- fail "clusterWide: true watches every namespace: leave watchNamespaces empty" }}
{{- end }}
{{- list | toJson }}
{{- else if .Values.watchNamespaces }}
{{- .Values.watchNamespaces | toJson }}
{{- else }}
{{- list .Release.Namespace | toJson }}
{{- end }}
{{- end }}

{{- define "lume-operator.prefectAuthSecret" -}}
{{- required "prefectServer.auth.existingSecret is required: the bundled Prefect server uses basic auth (see values.yaml)" .Values.prefectServer.auth.existingSecret }}
{{- end }}
