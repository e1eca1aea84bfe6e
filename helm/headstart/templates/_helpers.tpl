{{/* Names. Kubernetes names are DNS labels: at most 63 characters. */}}

{{- define "headstart.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "headstart.fullname" -}}
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

{{/* "<fullname>-<component>", the full name shortened so that the whole fits 63 characters.
     Takes (dict "ctx" $ "component" "worker"). */}}
{{- define "headstart.componentName" -}}
{{- $base := include "headstart.fullname" .ctx | trunc (int (sub 62 (len .component))) | trimSuffix "-" }}
{{- printf "%s-%s" $base .component }}
{{- end }}

{{- define "headstart.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels. Both take (dict "ctx" $ "component" "api"). */}}

{{- define "headstart.selectorLabels" -}}
app.kubernetes.io/name: {{ include "headstart.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "headstart.labels" -}}
helm.sh/chart: {{ include "headstart.chart" .ctx }}
{{ include "headstart.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: {{ include "headstart.name" .ctx }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
{{- end }}

{{- define "headstart.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "headstart.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Images. Workers default to the "-gpu" variant of the API's tag. */}}

{{- define "headstart.api.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{- define "headstart.worker.image" -}}
{{- $repository := .Values.worker.image.repository | default .Values.image.repository }}
{{- $tag := .Values.worker.image.tag | default (printf "%s-gpu" (.Values.image.tag | default .Chart.AppVersion)) }}
{{- printf "%s:%s" $repository $tag }}
{{- end }}

{{/* The broker. */}}

{{- define "headstart.redis.enabled" -}}
{{- if and (not .Values.broker.url) .Values.broker.redis.enabled }}true{{ end }}
{{- end }}

{{- define "headstart.redis.fullname" -}}
{{- include "headstart.componentName" (dict "ctx" . "component" "redis") }}
{{- end }}

{{/* HEADSTART_QUEUE when the chart knows it: broker.url, or the in-chart Redis. Empty when it
     comes from existingSecret. */}}
{{- define "headstart.brokerUrl" -}}
{{- if .Values.broker.url }}
{{- .Values.broker.url }}
{{- else if .Values.broker.redis.enabled }}
{{- printf "redis://%s:6379/0" (include "headstart.redis.fullname" .) }}
{{- else if not .Values.existingSecret }}
{{- fail "No broker: set broker.url (redis://host:6379/0), enable the in-chart broker (broker.redis.enabled=true), or put HEADSTART_QUEUE in existingSecret" }}
{{- end }}
{{- end }}

{{/* The chart Secret's variables, as YAML: what the values give and must not be in a ConfigMap. */}}
{{- define "headstart.secretEnv" -}}
{{- $values := .Values }}
{{- if $values.existingSecret }}
{{- if or $values.store.accessKeyId $values.store.secretAccessKey $values.apiKeys }}
{{- fail (printf "existingSecret %q is set: put S3 keys and API keys in it (HEADSTART_S3_ACCESS_KEY_ID, HEADSTART_S3_SECRET_ACCESS_KEY, HEADSTART_API_KEYS), not in store.accessKeyId, store.secretAccessKey or apiKeys" $values.existingSecret) }}
{{- end }}
{{- end }}
{{- if ne (empty $values.store.accessKeyId) (empty $values.store.secretAccessKey) }}
{{- fail "store.accessKeyId and store.secretAccessKey go together: set both, or neither to use the AWS credential chain (IRSA, instance role)" }}
{{- end }}
{{- $env := dict }}
{{- with include "headstart.brokerUrl" . }}
{{- $_ := set $env "HEADSTART_QUEUE" . }}
{{- end }}
{{- with $values.store.accessKeyId }}
{{- $_ := set $env "HEADSTART_S3_ACCESS_KEY_ID" . }}
{{- $_ := set $env "HEADSTART_S3_SECRET_ACCESS_KEY" $values.store.secretAccessKey }}
{{- end }}
{{- if $values.apiKeys }}
{{- $keys := list }}
{{- range $values.apiKeys }}
{{- $keys = append $keys (printf "%s:%s" .key .scope) }}
{{- end }}
{{- $_ := set $env "HEADSTART_API_KEYS" (join "," $keys) }}
{{- end }}
{{- toYaml $env }}
{{- end }}

{{- define "headstart.secret.enabled" -}}
{{- if include "headstart.secretEnv" . | fromYaml }}true{{ end }}
{{- end }}

{{/* What every Headstart pod shares. */}}

{{- define "headstart.envFrom" -}}
- configMapRef:
    name: {{ include "headstart.fullname" . }}
{{- if include "headstart.secret.enabled" . }}
- secretRef:
    name: {{ include "headstart.fullname" . }}
{{- end }}
{{- with .Values.existingSecret }}
- secretRef:
    name: {{ . }}
{{- end }}
{{- end }}

{{/* Pod annotations: checksums roll the pods when the ConfigMap or Secret changes; then the
     global annotations, then the component's. Takes (dict "ctx" $ "component" .Values.api
     "scrapePort" 8000), and optionally "extra": more annotations (the proxy's checksum). */}}
{{- define "headstart.podAnnotations" -}}
{{- $ctx := .ctx }}
{{- $annotations := dict
      "checksum/config" (include (print $ctx.Template.BasePath "/configmap.yaml") $ctx | sha256sum)
      "checksum/secret" (include "headstart.secretEnv" $ctx | sha256sum) }}
{{- $annotations = merge $annotations (.extra | default dict) }}
{{- if $ctx.Values.metrics.scrapeAnnotations }}
{{- $_ := set $annotations "prometheus.io/scrape" "true" }}
{{- $_ := set $annotations "prometheus.io/port" (toString .scrapePort) }}
{{- $_ := set $annotations "prometheus.io/path" "/metrics" }}
{{- end }}
{{- toYaml (merge (deepCopy .component.podAnnotations) (deepCopy $ctx.Values.podAnnotations) $annotations) }}
{{- end }}

{{/* Takes (dict "ctx" $ "component" "api" "values" .Values.api). */}}
{{- define "headstart.podLabels" -}}
{{- $labels := include "headstart.labels" (dict "ctx" .ctx "component" .component) | fromYaml }}
{{- toYaml (merge $labels (deepCopy .values.podLabels) (deepCopy .ctx.Values.podLabels)) }}
{{- end }}

{{- define "headstart.tmpVolumeMount" -}}
- name: tmp
  mountPath: /tmp
{{- end }}

{{- define "headstart.tmpVolume" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ . }}
{{- end }}

{{/* Resources with the GPUs added to requests and limits. */}}
{{- define "headstart.worker.resources" -}}
{{- $resources := deepCopy .Values.worker.resources }}
{{- $gpu := .Values.worker.gpu }}
{{- if gt (int $gpu.count) 0 }}
{{- $_ := set $resources "requests" (merge (dict $gpu.resourceName (int $gpu.count)) ($resources.requests | default dict)) }}
{{- $_ := set $resources "limits" (merge (dict $gpu.resourceName (int $gpu.count)) ($resources.limits | default dict)) }}
{{- end }}
{{- toYaml $resources }}
{{- end }}

{{/* TopologySpreadConstraints; a constraint without labelSelector selects the component's pods.
     Takes (dict "ctx" $ "component" "api" "constraints" list). */}}
{{- define "headstart.topologySpreadConstraints" -}}
{{- $selector := include "headstart.selectorLabels" (dict "ctx" .ctx "component" .component) | fromYaml }}
{{- $constraints := list }}
{{- range .constraints }}
{{- $constraint := deepCopy . }}
{{- if not $constraint.labelSelector }}
{{- $_ := set $constraint "labelSelector" (dict "matchLabels" $selector) }}
{{- end }}
{{- $constraints = append $constraints $constraint }}
{{- end }}
{{- toYaml $constraints }}
{{- end }}

{{/* Where KEDA reads the job list: address, databaseIndex, enableTLS. */}}
{{- define "headstart.keda.redis" -}}
{{- $keda := .Values.worker.keda.redis }}
{{- $result := dict "address" $keda.address "databaseIndex" (toString $keda.databaseIndex) "enableTLS" $keda.enableTLS }}
{{- if not $keda.address }}
{{- if .Values.broker.url }}
{{- $url := urlParse .Values.broker.url }}
{{- if not (hasPrefix "redis" $url.scheme) }}
{{- fail (printf "worker.keda scales on a Redis list, but broker.url is %s://" $url.scheme) }}
{{- end }}
{{- if and (contains ":" ($url.userinfo | default "")) (not .Values.worker.keda.authenticationRef) }}
{{- fail "broker.url has a password, which KEDA needs too: create a TriggerAuthentication with it and set worker.keda.authenticationRef" }}
{{- end }}
{{- $address := $url.host }}
{{- if not (regexMatch ":[0-9]+$" $url.host) }}
{{- $address = printf "%s:6379" $url.host }}
{{- end }}
{{- $_ := set $result "address" $address }}
{{- if not $keda.databaseIndex }}
{{- $_ := set $result "databaseIndex" (trimPrefix "/" $url.path | default "0") }}
{{- end }}
{{- if eq $url.scheme "rediss" }}
{{- $_ := set $result "enableTLS" true }}
{{- end }}
{{- else if .Values.broker.redis.enabled }}
{{- $_ := set $result "address" (printf "%s.%s.svc:6379" (include "headstart.redis.fullname" .) .Release.Namespace) }}
{{- $_ := set $result "databaseIndex" "0" }}
{{- else }}
{{- fail "worker.keda.redis.address is required when the broker URL comes from existingSecret (host:port of the Redis that holds the jobs)" }}
{{- end }}
{{- end }}
{{- if not $result.databaseIndex }}
{{- $_ := set $result "databaseIndex" "0" }}
{{- end }}
{{- toYaml $result }}
{{- end }}
