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
{{- define "proxsmtpd.tlsDir" -}}/etc/proxsmtpd/tls{{- end -}}
{{- define "proxsmtpd.upstreamCaDir" -}}/etc/proxsmtpd/upstream-ca{{- end -}}

{{/* upstreamTls.mode as a string: an unquoted `off` in a values file arrives as false. */}}
{{- define "proxsmtpd.upstreamTlsMode" -}}
{{- $mode := toString .Values.upstreamTls.mode -}}
{{- ternary "off" $mode (eq $mode "false") -}}
{{- end -}}

{{/*
Mode of the TLS Secret's files. The key must be readable by the proxy's non-root user: with
an fsGroup the kubelet gives the files that group, so 0440 suffices; without one they stay
root's and only 0444 lets the proxy read them.
*/}}
{{- define "proxsmtpd.tlsDefaultMode" -}}
{{- $psc := ternary (.Values.sidecar.podSecurityContext | default dict) .Values.securityContext (eq .Values.mode "sidecar") -}}
{{- ternary "0444" "0440" (kindIs "invalid" $psc.fsGroup) -}}
{{- end -}}

{{/* TLS values that would stop the proxy at startup, or do nothing, are refused here. */}}
{{- define "proxsmtpd.validateTls" -}}
{{- $tls := .Values.tls -}}
{{- $up := .Values.upstreamTls -}}
{{- if and $tls.enabled (not $tls.secretName) -}}
{{- fail "tls.enabled needs tls.secretName: an existing kubernetes.io/tls Secret (e.g. the one a cert-manager Certificate writes)" -}}
{{- end -}}
{{- if and (not $tls.enabled) (or $tls.required $tls.implicitPort) -}}
{{- fail "tls.required and tls.implicitPort need tls.enabled and a certificate in tls.secretName" -}}
{{- end -}}
{{- if and $tls.implicitPort (eq (int $tls.implicitPort) (int .Values.service.port)) -}}
{{- fail (printf "tls.implicitPort (%d) must differ from service.port" (int $tls.implicitPort)) -}}
{{- end -}}
{{- if and $tls.implicitPort (has (int .Values.ports.smtps) (list (int .Values.ports.smtp) (int .Values.ports.admin))) -}}
{{- fail (printf "ports.smtps (%d) must differ from ports.smtp and ports.admin" (int .Values.ports.smtps)) -}}
{{- end -}}
{{- if and $up.caSecret $up.caConfigMap -}}
{{- fail "upstreamTls: set caSecret or caConfigMap, not both" -}}
{{- end -}}
{{- if and (eq (include "proxsmtpd.upstreamTlsMode" .) "off") (or $up.caSecret $up.caConfigMap (not $up.verify)) -}}
{{- fail "upstreamTls.caSecret, caConfigMap and verify have no effect while upstreamTls.mode is off" -}}
{{- end -}}
{{- end -}}

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
{{- include "proxsmtpd.validateTls" . -}}
{{- $upstreamTls := include "proxsmtpd.upstreamTlsMode" . -}}
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
  {{- if .Values.tls.enabled }}
  - name: PROXSMTPD_TLS_CERTIFICATE
    value: {{ include "proxsmtpd.tlsDir" . }}/tls.crt
  - name: PROXSMTPD_TLS_KEY
    value: {{ include "proxsmtpd.tlsDir" . }}/tls.key
  {{- if .Values.tls.required }}
  - name: PROXSMTPD_TLS_REQUIRED
    value: "on"
  {{- end }}
  {{- if .Values.tls.implicitPort }}
  - name: PROXSMTPD_TLS_LISTEN
    value: "0.0.0.0:{{ .Values.ports.smtps }}"
  {{- end }}
  {{- end }}
  {{- if ne $upstreamTls "off" }}
  - name: PROXSMTPD_UPSTREAM_TLS
    value: {{ $upstreamTls }}
  {{- if or .Values.upstreamTls.caSecret .Values.upstreamTls.caConfigMap }}
  - name: PROXSMTPD_UPSTREAM_TLS_CA
    value: {{ include "proxsmtpd.upstreamCaDir" . }}/{{ .Values.upstreamTls.caKey }}
  {{- end }}
  {{- if not .Values.upstreamTls.verify }}
  - name: PROXSMTPD_UPSTREAM_TLS_VERIFY
    value: "off"
  {{- end }}
  {{- end }}
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
  {{- if and .Values.tls.enabled .Values.tls.implicitPort }}
  - name: smtps
    containerPort: {{ .Values.ports.smtps }}
    protocol: TCP
  {{- end }}
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
  {{- /* whole directories, never subPath: a renewed certificate must reach the pod */}}
  {{- if .Values.tls.enabled }}
  - name: proxsmtpd-tls
    mountPath: {{ include "proxsmtpd.tlsDir" . }}
    readOnly: true
  {{- end }}
  {{- if and (ne $upstreamTls "off") (or .Values.upstreamTls.caSecret .Values.upstreamTls.caConfigMap) }}
  - name: proxsmtpd-upstream-ca
    mountPath: {{ include "proxsmtpd.upstreamCaDir" . }}
    readOnly: true
  {{- end }}
  {{- with .Values.extraVolumeMounts }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end -}}

{{/* The proxy's volumes: spool, config, filter scripts, TLS certificate, upstream CA. */}}
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
{{- if .Values.tls.enabled }}
- name: proxsmtpd-tls
  secret:
    secretName: {{ .Values.tls.secretName }}
    defaultMode: {{ include "proxsmtpd.tlsDefaultMode" . }}
{{- end }}
{{- if ne (include "proxsmtpd.upstreamTlsMode" .) "off" }}
{{- with .Values.upstreamTls.caSecret }}
- name: proxsmtpd-upstream-ca
  secret:
    secretName: {{ . }}
    defaultMode: 0444
{{- end }}
{{- with .Values.upstreamTls.caConfigMap }}
- name: proxsmtpd-upstream-ca
  configMap:
    name: {{ . }}
    defaultMode: 0444
{{- end }}
{{- end }}
{{- end -}}
