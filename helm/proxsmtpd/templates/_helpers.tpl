{{/* Names, labels and the proxy container, shared by every template. */}}

{{- define "proxsmtpd.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "proxsmtpd.fullname" -}}
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

{{- define "proxsmtpd.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "proxsmtpd.selectorLabels" -}}
app.kubernetes.io/name: {{ include "proxsmtpd.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "proxsmtpd.baseLabels" -}}
helm.sh/chart: {{ include "proxsmtpd.chart" . }}
{{ include "proxsmtpd.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "proxsmtpd.labels" -}}
{{ include "proxsmtpd.baseLabels" . }}
app.kubernetes.io/component: {{ ternary "mail" "smtp-proxy" (eq .Values.mode "sidecar") }}
{{- end -}}

{{- define "proxsmtpd.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "proxsmtpd.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "proxsmtpd.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "proxsmtpd.outAddress" -}}
{{- $host := .Values.upstream.host | default (ternary "127.0.0.1" "mail" (eq .Values.mode "sidecar")) -}}
{{- printf "%s:%d" $host (int .Values.upstream.port) -}}
{{- end -}}

{{- define "proxsmtpd.onoff" -}}
{{- ternary "on" "off" . -}}
{{- end -}}

{{/* The spool, config and filter mount points; TempDirectory points at the spool. */}}
{{- define "proxsmtpd.spoolDir" -}}/var/spool/proxsmtpd{{- end -}}
{{- define "proxsmtpd.configDir" -}}/etc/proxsmtpd/config{{- end -}}
{{- define "proxsmtpd.filtersDir" -}}/etc/proxsmtpd/filters{{- end -}}

{{/*
terminationGracePeriodSeconds: long enough for the preStop sleep and the drain. A native
sidecar is stopped only after the mail containers have exited, so their shutdown time adds up;
a plain sidecar stops alongside them.
*/}}
{{- define "proxsmtpd.graceNeeded" -}}
{{- $proxy := add .Values.preStopSleepSeconds .Values.config.drainTimeout -}}
{{- if ne .Values.mode "sidecar" -}}
{{- $proxy -}}
{{- else if .Values.sidecar.native -}}
{{- add $proxy .Values.sidecar.mailShutdownSeconds -}}
{{- else -}}
{{- max $proxy .Values.sidecar.mailShutdownSeconds -}}
{{- end -}}
{{- end -}}

{{- define "proxsmtpd.terminationGracePeriodSeconds" -}}
{{- $needed := include "proxsmtpd.graceNeeded" . | int -}}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds -}}
{{- add $needed .Values.terminationGraceMarginSeconds -}}
{{- else if lt (int .Values.terminationGracePeriodSeconds) $needed -}}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be at least %d (preStopSleepSeconds + config.drainTimeout, plus sidecar.mailShutdownSeconds in sidecar mode)" (int .Values.terminationGracePeriodSeconds) $needed) -}}
{{- else -}}
{{- .Values.terminationGracePeriodSeconds -}}
{{- end -}}
{{- end -}}

{{/* A hash of everything the proxy reads from ConfigMaps: a change rolls the pods. */}}
{{- define "proxsmtpd.configChecksum" -}}
{{- $cfg := include (print .Template.BasePath "/configmap.yaml") . -}}
{{- $filters := include (print .Template.BasePath "/filters-configmap.yaml") . -}}
{{- print $cfg $filters | sha256sum -}}
{{- end -}}

{{/*
The proxy container. Parent charts that add the proxy to their own mail pod can use
  initContainers: [ {{ include "proxsmtpd.container" . }} ]   (native sidecar)
together with the volumes of "proxsmtpd.volumes".
*/}}
{{- define "proxsmtpd.container" -}}
name: proxsmtpd
image: {{ include "proxsmtpd.image" . | quote }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
{{- if and (eq .Values.mode "sidecar") .Values.sidecar.native }}
restartPolicy: Always
{{- end }}
args:
  - -f
  - {{ include "proxsmtpd.configDir" . }}/proxsmtpd.conf
  {{- if not (kindIs "invalid" .Values.config.debugLevel) }}
  - -d
  - {{ .Values.config.debugLevel | quote }}
  {{- end }}
env:
  - name: PROXSMTPD_CONTAINER
    value: "on"
  {{- with .Values.extraEnv }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- with .Values.extraEnvFrom }}
envFrom:
  {{- toYaml . | nindent 2 }}
{{- end }}
ports:
  - name: smtp
    containerPort: {{ .Values.ports.smtp }}
    protocol: TCP
  - name: admin
    containerPort: {{ .Values.ports.admin }}
    protocol: TCP
startupProbe:
  httpGet:
    path: /livez
    port: admin
  periodSeconds: {{ .Values.probes.startup.periodSeconds }}
  failureThreshold: {{ .Values.probes.startup.failureThreshold }}
livenessProbe:
  httpGet:
    path: /livez
    port: admin
  periodSeconds: {{ .Values.probes.liveness.periodSeconds }}
  timeoutSeconds: {{ .Values.probes.liveness.timeoutSeconds }}
  failureThreshold: {{ .Values.probes.liveness.failureThreshold }}
readinessProbe:
  httpGet:
    path: /readyz
    port: admin
  periodSeconds: {{ .Values.probes.readiness.periodSeconds }}
  timeoutSeconds: {{ .Values.probes.readiness.timeoutSeconds }}
  failureThreshold: {{ .Values.probes.readiness.failureThreshold }}
lifecycle:
  preStop:
    exec:
      command: ["/bin/sleep", "{{ .Values.preStopSleepSeconds }}"]
securityContext:
  runAsNonRoot: true
  {{- if not (kindIs "invalid" .Values.securityContext.runAsUser) }}
  runAsUser: {{ .Values.securityContext.runAsUser }}
  {{- end }}
  {{- if not (kindIs "invalid" .Values.securityContext.runAsGroup) }}
  runAsGroup: {{ .Values.securityContext.runAsGroup }}
  {{- end }}
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities:
    drop: ["ALL"]
  seccompProfile:
    type: RuntimeDefault
{{- with .Values.resources }}
resources:
  {{- toYaml . | nindent 2 }}
{{- end }}
volumeMounts:
  - name: proxsmtpd-spool
    mountPath: {{ include "proxsmtpd.spoolDir" . }}
  - name: proxsmtpd-config
    mountPath: {{ include "proxsmtpd.configDir" . }}
    readOnly: true
  {{- if .Values.filters.scripts }}
  - name: proxsmtpd-filters
    mountPath: {{ include "proxsmtpd.filtersDir" . }}
    readOnly: true
  {{- end }}
  {{- with .Values.extraVolumeMounts }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end -}}

{{/* The proxy's volumes: spool, config, filter scripts. */}}
{{- define "proxsmtpd.volumes" -}}
- name: proxsmtpd-spool
  emptyDir:
    {{- with .Values.spool.medium }}
    medium: {{ . }}
    {{- end }}
    {{- with .Values.spool.sizeLimit }}
    sizeLimit: {{ . }}
    {{- end }}
- name: proxsmtpd-config
  configMap:
    name: {{ include "proxsmtpd.fullname" . }}-config
{{- if .Values.filters.scripts }}
- name: proxsmtpd-filters
  configMap:
    name: {{ include "proxsmtpd.fullname" . }}-filters
    defaultMode: 0755
{{- end }}
{{- end -}}
