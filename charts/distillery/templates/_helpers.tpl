{{/*
Names, labels and the few derived settings every template shares.
*/}}

{{/* The chart name, shortened to what a label value allows. */}}
{{- define "distillery.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every object name: the release name, plus the chart name unless the release name
already contains it. Kept short (40) so suffixes like -operator-metrics still fit in 63 characters.
*/}}
{{- define "distillery.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "distillery.operatorName" -}}
{{- printf "%s-operator" (include "distillery.fullname" .) }}
{{- end }}

{{- define "distillery.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "distillery.labels" -}}
helm.sh/chart: {{ include "distillery.chart" . }}
app.kubernetes.io/name: {{ include "distillery.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: distillery
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of the operator pods (immutable in a Deployment: never add to these). */}}
{{- define "distillery.operatorSelectorLabels" -}}
app.kubernetes.io/name: {{ include "distillery.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "distillery.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "distillery.operatorName" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The operator image: repository@digest, else repository:tag (tag defaults to appVersion). */}}
{{- define "distillery.operatorImage" -}}
{{- $img := .Values.operator.image }}
{{- if $img.digest }}
{{- printf "%s@%s" $img.repository $img.digest }}
{{- else }}
{{- printf "%s:%s" $img.repository (default .Chart.AppVersion $img.tag) }}
{{- end }}
{{- end }}

{{/* A runtime image for a variant: call with (dict "root" $ "variant" "cpu"). */}}
{{- define "distillery.runtimeImage" -}}
{{- $img := .root.Values.runtime.image }}
{{- printf "%s:%s-%s" $img.repository (default .root.Chart.AppVersion $img.tag) .variant }}
{{- end }}

{{/* "true" when kopf peering is on: asked for, or needed because there is more than one replica. */}}
{{- define "distillery.peering" -}}
{{- if or .Values.operator.peering.enabled (gt (int .Values.operator.replicas) 1) }}true{{ end }}
{{- end }}

{{/* The namespaces watched when not cluster-wide, as a JSON list (default: the release namespace). */}}
{{- define "distillery.watchNamespaces" -}}
{{- if .Values.operator.watch.namespaces }}
{{- toJson .Values.operator.watch.namespaces }}
{{- else }}
{{- list .Release.Namespace | toJson }}
{{- end }}
{{- end }}

{{/* The trainer image of DistillationJobs: repository:tag (tag defaults to appVersion). */}}
{{- define "distillery.trainerImage" -}}
{{- $img := .Values.trainer.image }}
{{- printf "%s:%s" $img.repository (default .Chart.AppVersion $img.tag) }}
{{- end }}
