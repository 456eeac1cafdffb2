{{- define "latentmas.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "latentmas.labels" -}}
app.kubernetes.io/name: latentmas
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "latentmas.selector" -}}
app.kubernetes.io/name: latentmas
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "latentmas.serviceAccount" -}}
{{- default (include "latentmas.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "latentmas.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "latentmas.minio" -}}
{{- printf "%s-minio" (include "latentmas.fullname" .) -}}
{{- end -}}
