{{/* Chart name, overridable. */}}
{{- define "kubetune.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Name of the operator's objects: the release name, plus the chart name unless the release already says it. */}}
{{- define "kubetune.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "kubetune.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object of the release. */}}
{{- define "kubetune.labels" -}}
helm.sh/chart: {{ include "kubetune.chart" . }}
{{ include "kubetune.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubetune
{{- end }}

{{/* Labels that select the operator pod; they never change across upgrades. */}}
{{- define "kubetune.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubetune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* Labels the operator puts on every trainer pod (contracts: children of a FinetuneJob). */}}
{{- define "kubetune.trainerSelectorLabels" -}}
app.kubernetes.io/name: kubetune-trainer
app.kubernetes.io/managed-by: kubetune
{{- end }}

{{- define "kubetune.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kubetune.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository:tag or repository@digest; the tag defaults to the chart's appVersion. */}}
{{- define "kubetune.image" -}}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository (default .appVersion .image.tag) }}
{{- end }}
{{- end }}

{{/* Namespaces the operator watches; empty means every namespace (cluster-wide mode). */}}
{{- define "kubetune.namespacedMode" -}}
{{- if .Values.watchNamespaces }}true{{ end }}
{{- end }}

{{/* Namespaces that get a trainer NetworkPolicy. */}}
{{- define "kubetune.trainerNamespaces" -}}
{{- if .Values.watchNamespaces }}
{{- toJson .Values.watchNamespaces }}
{{- else if .Values.networkPolicy.trainerNamespaces }}
{{- toJson .Values.networkPolicy.trainerNamespaces }}
{{- else }}
{{- toJson (list .Release.Namespace) }}
{{- end }}
{{- end }}

{{/* Rules on namespaced objects, shared by the cluster-wide ClusterRole and the per-namespace Roles. */}}
{{- define "kubetune.namespacedRules" -}}
# Exactly the verbs the operator calls (tests/integration/test_rbac_verbs.py derives them from its code).
# kopf lists and watches what it indexes and patches a FinetuneJob to retry a handler; the operator
# patches status. Children are written by server-side apply, a patch for which the apiserver also
# checks create when the apply creates the object; get reads a child's owner first. A finished Job is
# deleted once spec.ttlSecondsAfterFinished has passed.
- apiGroups: ["kubetune.io"]
  resources: ["finetunejobs"]
  verbs: ["list", "watch", "patch"]
- apiGroups: ["kubetune.io"]
  resources: ["finetunejobs/status"]
  verbs: ["patch"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
- apiGroups: [""]
  resources: ["configmaps", "services"]
  verbs: ["get", "create", "patch"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "create", "patch"]
{{- end }}
