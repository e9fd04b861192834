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
{{- with omit .Values.commonLabels "helm.sh/chart" "app.kubernetes.io/name" "app.kubernetes.io/instance" "app.kubernetes.io/version" "app.kubernetes.io/managed-by" "app.kubernetes.io/component" }}
{{ toYaml . }}
{{- end }}
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

{{/*
The proxy's image. image.flavor minimal: the same repository, the tag with the suffix
-minimal (scripts/image-build.sh --flavor minimal); a digest names the image as it is.
*/}}
{{- define "proxsmtpd.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if and (eq (default "full" .Values.image.flavor) "minimal") (not (hasSuffix "-minimal" $tag)) -}}
{{- $tag = printf "%s-minimal" $tag -}}
{{- end -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/*
The helm test pod's image: it needs bash, so with image.flavor minimal the full flavor of
the same repository and tag (without the -minimal suffix, and not the digest, which names
the minimal image).
*/}}
{{- define "proxsmtpd.testImage" -}}
{{- if eq (default "full" .Values.image.flavor) "minimal" -}}
{{- printf "%s:%s" .Values.image.repository (trimSuffix "-minimal" (default .Chart.AppVersion .Values.image.tag)) -}}
{{- else -}}
{{- include "proxsmtpd.image" . -}}
{{- end -}}
{{- end -}}

{{- define "proxsmtpd.outAddress" -}}
{{- $host := .Values.upstream.host -}}
{{- if eq .Values.mode "sidecar" -}}
{{- $host = default "127.0.0.1" $host -}}
{{- else -}}
{{- $host = required "upstream.host is required in standalone mode: the mail server the proxy forwards to, e.g. postfix.mail.svc.cluster.local" $host -}}
{{- end -}}
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

{{/* A hash of everything the proxy reads from the chart's ConfigMaps. */}}
{{- define "proxsmtpd.configChecksum" -}}
{{- $cfg := include (print .Template.BasePath "/configmap.yaml") . -}}
{{- $filters := include (print .Template.BasePath "/filters-configmap.yaml") . -}}
{{- print $cfg $filters | sha256sum -}}
{{- end -}}

{{/*
A hash of the settings the proxy reads once at start (a reload does not apply them): a change
must restart the proxy whatever rollOnConfigChange says.
*/}}
{{- define "proxsmtpd.restartChecksum" -}}
{{- $c := .Values.config -}}
{{- dict "existingConfigMap" $c.existingConfigMap "listen" .Values.ports.smtp "admin" .Values.ports.admin "maxConnections" $c.maxConnections "logFormat" $c.logFormat "drainTimeout" $c.drainTimeout "readinessCheckUpstream" $c.readinessCheckUpstream "reloadWatch" $c.reloadWatch "extraSettings" $c.extraSettings | toJson | sha256sum -}}
{{- end -}}

{{/* rollOnConfigChange, null resolved: roll only when the proxy does not reload by itself. */}}
{{- define "proxsmtpd.rollOnConfigChange" -}}
{{- if .Values.config.existingConfigMap -}}
false
{{- else if kindIs "invalid" .Values.rollOnConfigChange -}}
{{- ternary "false" "true" .Values.config.reloadWatch -}}
{{- else -}}
{{- ternary "true" "false" .Values.rollOnConfigChange -}}
{{- end -}}
{{- end -}}

{{/* The config and filters ConfigMaps the pod mounts: the chart's or existing ones. */}}
{{- define "proxsmtpd.configMapName" -}}
{{- default (printf "%s-config" (include "proxsmtpd.fullname" .)) .Values.config.existingConfigMap -}}
{{- end -}}
{{- define "proxsmtpd.filtersConfigMapName" -}}
{{- default (printf "%s-filters" (include "proxsmtpd.fullname" .)) .Values.filters.existingConfigMap -}}
{{- end -}}
{{- define "proxsmtpd.hasFilters" -}}
{{- if or .Values.filters.scripts .Values.filters.existingConfigMap }}true{{ end -}}
{{- end -}}

{{/* Deployment, or StatefulSet for a sidecar whose mail queue gets a claim per pod. */}}
{{- define "proxsmtpd.workloadKind" -}}
{{- $p := .Values.sidecar.persistence -}}
{{- ternary "StatefulSet" "Deployment" (and (eq .Values.mode "sidecar") $p.enabled (not $p.existingClaim)) -}}
{{- end -}}

{{/* The replicas the pods run with at least (autoscaling: its minimum). */}}
{{- define "proxsmtpd.minReplicas" -}}
{{- ternary .Values.autoscaling.minReplicas .Values.replicaCount .Values.autoscaling.enabled | int -}}
{{- end -}}

{{/* The proxy container's securityContext: restricted defaults, securityContext merged over. */}}
{{- define "proxsmtpd.containerSecurityContext" -}}
{{- $sc := dict "runAsNonRoot" true "allowPrivilegeEscalation" false "readOnlyRootFilesystem" true "capabilities" (dict "drop" (list "ALL")) "seccompProfile" (dict "type" "RuntimeDefault") -}}
{{- range $k, $v := omit .Values.securityContext "fsGroup" -}}
{{- if not (kindIs "invalid" $v) }}{{ $_ := set $sc $k $v }}{{ end -}}
{{- end -}}
{{- toYaml $sc -}}
{{- end -}}

{{/* The pod's securityContext; empty when there is none. */}}
{{- define "proxsmtpd.podSecurityContext" -}}
{{- $psc := dict -}}
{{- if eq .Values.mode "sidecar" -}}
{{- $psc = deepCopy (.Values.sidecar.podSecurityContext | default dict) -}}
{{- else -}}
{{- $psc = dict "runAsNonRoot" true "seccompProfile" (dict "type" "RuntimeDefault") -}}
{{- range $k := list "runAsUser" "runAsGroup" "fsGroup" -}}
{{- $v := index $.Values.securityContext $k -}}
{{- if not (kindIs "invalid" $v) }}{{ $_ := set $psc $k $v }}{{ end -}}
{{- end -}}
{{- end -}}
{{- range $k, $v := .Values.podSecurityContext -}}
{{- $_ := set $psc $k $v -}}
{{- end -}}
{{- if $psc }}{{ toYaml $psc }}{{ end -}}
{{- end -}}

{{/* A PodDisruptionBudget that no eviction can satisfy blocks every node drain: refused. */}}
{{- define "proxsmtpd.validatePdb" -}}
{{- if .Values.pdb.enabled -}}
{{- $replicas := include "proxsmtpd.minReplicas" . | int -}}
{{- $max := .Values.pdb.maxUnavailable -}}
{{- $min := .Values.pdb.minAvailable -}}
{{- $blocks := false -}}
{{- if not (kindIs "invalid" $max) -}}
{{- $blocks = has (toString $max) (list "0" "0%") -}}
{{- else if kindIs "string" $min -}}
{{- $blocks = or (eq $min "100%") (and (hasSuffix "%" $min) (le $replicas 1) (ne $min "0%")) -}}
{{- else -}}
{{- $blocks = ge (int $min) $replicas -}}
{{- end -}}
{{- if $blocks -}}
{{- fail (printf "pdb: with %d replica(s), minAvailable %v / maxUnavailable %v lets no pod be evicted, which blocks every node drain; raise replicaCount, or set pdb.maxUnavailable: 1, or pdb.enabled: false" $replicas $min (ternary "null" (toString $max) (kindIs "invalid" $max))) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The default topology spread: over nodes and zones, when there is more than one pod. */}}
{{- define "proxsmtpd.topologySpreadConstraints" -}}
{{- if .Values.topologySpreadConstraints -}}
{{- toYaml .Values.topologySpreadConstraints -}}
{{- else if and .Values.defaultTopologySpread (or .Values.autoscaling.enabled (gt (int .Values.replicaCount) 1)) -}}
{{- $selector := include "proxsmtpd.selectorLabels" . | fromYaml -}}
{{- $out := list -}}
{{- range $key := list "kubernetes.io/hostname" "topology.kubernetes.io/zone" -}}
{{- $c := dict "maxSkew" 1 "topologyKey" $key "whenUnsatisfiable" "ScheduleAnyway" "labelSelector" (dict "matchLabels" $selector) -}}
{{- if eq (include "proxsmtpd.workloadKind" $) "Deployment" -}}
{{- $_ := set $c "matchLabelKeys" (list "pod-template-hash") -}}
{{- end -}}
{{- $out = append $out $c -}}
{{- end -}}
{{- toYaml $out -}}
{{- end -}}
{{- end -}}

{{/*
The proxy container. Parent charts that add the proxy to their own mail pod can use
  initContainers: [ {{ include "proxsmtpd.container" . }} ]   (native sidecar)
together with the volumes of "proxsmtpd.volumes".
*/}}
{{- define "proxsmtpd.container" -}}
{{- include "proxsmtpd.validateTls" . -}}
{{- include "proxsmtpd.validateHooks" . -}}
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
  {{- include "proxsmtpd.containerSecurityContext" . | nindent 2 }}
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
  {{- if include "proxsmtpd.hasFilters" . }}
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
  {{- if include "proxsmtpd.quarantineVolume" . }}
  - name: proxsmtpd-quarantine
    mountPath: {{ .Values.milter.quarantine.directory }}
  {{- end }}
  {{- if and .Values.hooks .Values.hook.tls.secretName }}
  - name: proxsmtpd-hook-tls
    mountPath: {{ include "proxsmtpd.hookTlsDir" . }}
    readOnly: true
  {{- end }}
  {{- if and .Values.hooks .Values.hook.token.secretName }}
  - name: proxsmtpd-hook-token
    mountPath: {{ include "proxsmtpd.hookTokenDir" . }}
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
    name: {{ include "proxsmtpd.configMapName" . }}
{{- if include "proxsmtpd.hasFilters" . }}
- name: proxsmtpd-filters
  configMap:
    name: {{ include "proxsmtpd.filtersConfigMapName" . }}
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
{{- if include "proxsmtpd.quarantineVolume" . }}
- name: proxsmtpd-quarantine
  {{- with .Values.milter.quarantine.existingClaim }}
  persistentVolumeClaim:
    claimName: {{ . }}
  {{- else }}
  emptyDir:
    {{- with .Values.milter.quarantine.sizeLimit }}
    sizeLimit: {{ . }}
    {{- end }}
  {{- end }}
{{- end }}
{{- if .Values.hooks }}
{{- with .Values.hook.tls.secretName }}
- name: proxsmtpd-hook-tls
  secret:
    secretName: {{ . }}
    defaultMode: {{ include "proxsmtpd.tlsDefaultMode" $ }}
{{- end }}
{{- with .Values.hook.token.secretName }}
- name: proxsmtpd-hook-token
  secret:
    secretName: {{ . }}
    defaultMode: {{ include "proxsmtpd.tlsDefaultMode" $ }}
{{- end }}
{{- end }}
{{- if .Values.rspamd.enabled }}
- name: rspamd-config
  configMap:
    name: {{ include "proxsmtpd.fullname" . }}-rspamd
- name: rspamd-data
  emptyDir: {}
- name: rspamd-run
  emptyDir:
    medium: Memory
    sizeLimit: 16Mi
- name: rspamd-tmp
  emptyDir:
    sizeLimit: 1Gi
{{- end }}
{{- end -}}

{{/* The pod template of the Deployment or StatefulSet (metadata and spec). */}}
{{- define "proxsmtpd.podTemplate" -}}
{{- $sidecar := eq .Values.mode "sidecar" -}}
{{- $p := .Values.sidecar.persistence -}}
{{- if and $sidecar (not .Values.sidecar.mailContainers) -}}
{{- fail "mode sidecar: list the mail pod's containers in sidecar.mailContainers" -}}
{{- end -}}
{{- if and $sidecar .Values.sidecar.native (not (semverCompare ">=1.29.0-0" .Capabilities.KubeVersion.Version)) -}}
{{- fail "sidecar.native needs Kubernetes 1.29 or later (initContainer restartPolicy Always); set sidecar.native=false" -}}
{{- end -}}
{{- if and $p.enabled (not $sidecar) -}}
{{- fail "sidecar.persistence is for the mail queue of sidecar mode (mode: sidecar)" -}}
{{- end -}}
{{- if and $sidecar $p.enabled -}}
{{- $mounted := false -}}
{{- range .Values.sidecar.mailContainers }}{{ range .volumeMounts }}{{ if eq .name $p.volumeName }}{{ $mounted = true }}{{ end }}{{ end }}{{ end -}}
{{- if not $mounted -}}
{{- fail (printf "sidecar.persistence: no mail container mounts the volume %q (sidecar.persistence.volumeName) at its queue directory" $p.volumeName) -}}
{{- end -}}
{{- range .Values.sidecar.mailVolumes }}{{ if eq .name $p.volumeName -}}
{{- fail (printf "sidecar.persistence provides the volume %q: remove it from sidecar.mailVolumes" $p.volumeName) -}}
{{- end }}{{ end -}}
{{- end -}}
{{- if and .Values.filters.command (not .Values.filters.existingConfigMap) (hasPrefix (printf "%s/" (include "proxsmtpd.filtersDir" .)) .Values.filters.command) -}}
{{- $script := index (splitList " " (trimPrefix (printf "%s/" (include "proxsmtpd.filtersDir" .)) .Values.filters.command)) 0 -}}
{{- if not (hasKey .Values.filters.scripts $script) -}}
{{- fail (printf "filters.command runs %s/%s, which is not in filters.scripts" (include "proxsmtpd.filtersDir" .) $script) -}}
{{- end -}}
{{- end -}}
{{- include "proxsmtpd.validatePdb" . -}}
metadata:
  labels:
    {{- include "proxsmtpd.labels" . | nindent 4 }}
    {{- with .Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    {{- /* settings read once at start always restart the proxy; the rest only with rollOnConfigChange */}}
    checksum/restart-settings: {{ include "proxsmtpd.restartChecksum" . }}
    {{- if and (eq (include "proxsmtpd.rollOnConfigChange" .) "true") (not .Values.config.existingConfigMap) }}
    checksum/config: {{ include "proxsmtpd.configChecksum" . }}
    {{- end }}
    {{- if .Values.rspamd.enabled }}
    {{- /* rspamd reads its configuration once at start */}}
    checksum/rspamd: {{ include (print .Template.BasePath "/rspamd-configmap.yaml") . | sha256sum }}
    {{- end }}
    {{- with .Values.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "proxsmtpd.serviceAccountName" . }}
  automountServiceAccountToken: {{ .Values.serviceAccount.automountServiceAccountToken }}
  enableServiceLinks: {{ .Values.enableServiceLinks }}
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  terminationGracePeriodSeconds: {{ include "proxsmtpd.terminationGracePeriodSeconds" . }}
  {{- with include "proxsmtpd.podSecurityContext" . }}
  securityContext:
    {{- . | nindent 4 }}
  {{- end }}
  {{- if $sidecar }}
  {{- if or .Values.sidecar.native .Values.sidecar.mailInitContainers }}
  initContainers:
    {{- with .Values.sidecar.mailInitContainers }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
    {{- if .Values.sidecar.native }}
    - {{- include "proxsmtpd.container" . | nindent 6 }}
    {{- end }}
  {{- end }}
  containers:
    {{- if not .Values.sidecar.native }}
    - {{- include "proxsmtpd.container" . | nindent 6 }}
    {{- end }}
    {{- toYaml .Values.sidecar.mailContainers | nindent 4 }}
    {{- if .Values.rspamd.enabled }}
    - {{- include "proxsmtpd.rspamdContainer" . | nindent 6 }}
    {{- end }}
    {{- with .Values.extraContainers }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- else }}
  containers:
    - {{- include "proxsmtpd.container" . | nindent 6 }}
    {{- if .Values.rspamd.enabled }}
    - {{- include "proxsmtpd.rspamdContainer" . | nindent 6 }}
    {{- end }}
    {{- with .Values.extraContainers }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- end }}
  volumes:
    {{- include "proxsmtpd.volumes" . | nindent 4 }}
    {{- with .Values.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
    {{- if $sidecar }}
    {{- with .Values.sidecar.mailVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
    {{- if and $p.enabled $p.existingClaim }}
    - name: {{ $p.volumeName }}
      persistentVolumeClaim:
        claimName: {{ $p.existingClaim }}
    {{- end }}
    {{- end }}
  {{- with .Values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with include "proxsmtpd.topologySpreadConstraints" . }}
  topologySpreadConstraints:
    {{- . | nindent 4 }}
  {{- end }}
  {{- with .Values.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
{{- end -}}

{{/* One milter's options in Postfix's braces: {name=..., command_timeout=..., ...}. */}}
{{- define "proxsmtpd.milterOptions" -}}
{{- $o := list -}}
{{- with .name }}{{ $o = append $o (printf "name=%s" .) }}{{ end -}}
{{- if not (kindIs "invalid" .connectTimeout) }}{{ $o = append $o (printf "connect_timeout=%v" .connectTimeout) }}{{ end -}}
{{- if not (kindIs "invalid" .commandTimeout) }}{{ $o = append $o (printf "command_timeout=%v" .commandTimeout) }}{{ end -}}
{{- if not (kindIs "invalid" .contentTimeout) }}{{ $o = append $o (printf "content_timeout=%v" .contentTimeout) }}{{ end -}}
{{- with .defaultAction }}{{ $o = append $o (printf "default_action=%s" .) }}{{ end -}}
{{- if .shadow }}{{ $o = append $o "shadow=yes" }}{{ end -}}
{{- if $o }}{{ printf "{%s}" (join ", " $o) }}{{ end -}}
{{- end -}}

{{/*
The milters in order, as a list of {address, name, ...}: the rspamd sidecar first, then
`milters`. A unix socket must lie in a directory the proxy container mounts (a socket on the
image's read-only root file system could never be there).
*/}}
{{- define "proxsmtpd.milterList" -}}
{{- $all := list -}}
{{- if .Values.rspamd.enabled -}}
{{- $all = append $all (merge (dict "address" (printf "inet:127.0.0.1:%v" .Values.rspamd.port) "name" "rspamd") (deepCopy .Values.rspamd.milter)) -}}
{{- end -}}
{{- range $i, $m := .Values.milters -}}
{{- if hasPrefix "unix:" $m.address -}}
{{- $path := trimPrefix "unix:" $m.address -}}
{{- $mounted := false -}}
{{- range $.Values.extraVolumeMounts }}{{ if hasPrefix (printf "%s/" (trimSuffix "/" .mountPath)) $path }}{{ $mounted = true }}{{ end }}{{ end -}}
{{- if not $mounted -}}
{{- fail (printf "milters[%d] %s: no volume of extraVolumeMounts is mounted at a directory above the socket (share the socket's directory with the milter's container through a volume)" $i $m.address) -}}
{{- end -}}
{{- end -}}
{{- $all = append $all $m -}}
{{- end -}}
{{- dict "milters" $all | toJson -}}
{{- end -}}

{{/* The Milters value: each address with its options, comma-separated. */}}
{{- define "proxsmtpd.milters" -}}
{{- $out := list -}}
{{- range (include "proxsmtpd.milterList" . | fromJson).milters -}}
{{- $out = append $out (printf "%s%s" .address (include "proxsmtpd.milterOptions" .)) -}}
{{- end -}}
{{- join ", " $out -}}
{{- end -}}

{{/* Whether held messages need the quarantine volume (a milter or a hook may quarantine). */}}
{{- define "proxsmtpd.quarantineVolume" -}}
{{- if and (or (include "proxsmtpd.milters" .) .Values.hooks) (eq .Values.milter.quarantine.action "hold") }}true{{ end -}}
{{- end -}}

{{- define "proxsmtpd.hookTlsDir" -}}/etc/proxsmtpd/hook-tls{{- end -}}
{{- define "proxsmtpd.hookTokenDir" -}}/etc/proxsmtpd/hook-token{{- end -}}

{{/* A size as written (10M) or a number of bytes (YAML numbers arrive as floats: 1.048576e+07 otherwise). */}}
{{- define "proxsmtpd.size" -}}
{{- if kindIs "string" . }}{{ . }}{{ else }}{{ int64 . }}{{ end -}}
{{- end -}}

{{/* One hook's options in braces: {name=..., stages=mail+rcpt, timeout=..., ...}. */}}
{{- define "proxsmtpd.hookOptions" -}}
{{- $o := list -}}
{{- with .name }}{{ $o = append $o (printf "name=%s" .) }}{{ end -}}
{{- with .stages }}{{ $o = append $o (printf "stages=%s" (join "+" .)) }}{{ end -}}
{{- if not (kindIs "invalid" .timeout) }}{{ $o = append $o (printf "timeout=%v" .timeout) }}{{ end -}}
{{- with .defaultAction }}{{ $o = append $o (printf "default_action=%s" .) }}{{ end -}}
{{- if not (kindIs "invalid" .maxSize) }}{{ $o = append $o (printf "max_size=%s" (include "proxsmtpd.size" .maxSize)) }}{{ end -}}
{{- with .oversizeAction }}{{ $o = append $o (printf "oversize_action=%s" .) }}{{ end -}}
{{- if not (kindIs "invalid" .concurrency) }}{{ $o = append $o (printf "concurrency=%v" .concurrency) }}{{ end -}}
{{- if .shadow }}{{ $o = append $o "shadow=yes" }}{{ end -}}
{{- with .caFile }}{{ $o = append $o (printf "ca_file=%s" .) }}{{ end -}}
{{- with .clientCertificate }}{{ $o = append $o (printf "client_certificate=%s" .) }}{{ end -}}
{{- with .clientKey }}{{ $o = append $o (printf "client_key=%s" .) }}{{ end -}}
{{- if not (kindIs "invalid" .tlsVerify) }}{{ $o = append $o (printf "tls_verify=%s" (ternary "yes" "no" .tlsVerify)) }}{{ end -}}
{{- with .tokenFile }}{{ $o = append $o (printf "token_file=%s" .) }}{{ end -}}
{{- if $o }}{{ printf "{%s}" (join ", " $o) }}{{ end -}}
{{- end -}}

{{/*
The Hooks value: each URL with its options, comma-separated. A hook's own TLS or token file
must lie in a directory the proxy container mounts (extraVolumeMounts, or the chart's
hook.tls / hook.token Secrets), or the proxy could never read it.
*/}}
{{- define "proxsmtpd.hooks" -}}
{{- $dirs := list -}}
{{- range .Values.extraVolumeMounts }}{{ $dirs = append $dirs (printf "%s/" (trimSuffix "/" .mountPath)) }}{{ end -}}
{{- if .Values.hook.tls.secretName }}{{ $dirs = append $dirs (printf "%s/" (include "proxsmtpd.hookTlsDir" .)) }}{{ end -}}
{{- if .Values.hook.token.secretName }}{{ $dirs = append $dirs (printf "%s/" (include "proxsmtpd.hookTokenDir" .)) }}{{ end -}}
{{- $out := list -}}
{{- range $i, $h := .Values.hooks -}}
{{- range $k := list "caFile" "clientCertificate" "clientKey" "tokenFile" -}}
{{- with (get $h $k) -}}
{{- $path := . -}}
{{- $mounted := false -}}
{{- range $dirs }}{{ if hasPrefix . $path }}{{ $mounted = true }}{{ end }}{{ end -}}
{{- if not $mounted -}}
{{- fail (printf "hooks[%d].%s %s: no volume is mounted at a directory above it (extraVolumes and extraVolumeMounts, or hook.tls / hook.token)" $i $k $path) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $out = append $out (printf "%s%s" $h.url (include "proxsmtpd.hookOptions" $h)) -}}
{{- end -}}
{{- join ", " $out -}}
{{- end -}}

{{/* Settings of the hooks and the filter chain that would stop the proxy or do nothing are refused here. */}}
{{- define "proxsmtpd.validateHooks" -}}
{{- if and .Values.hook.tls.clientCertificate (not .Values.hook.tls.secretName) -}}
{{- fail "hook.tls.clientCertificate needs hook.tls.secretName (the Secret with tls.crt and tls.key)" -}}
{{- end -}}
{{- if and .Values.config.filterShadow (not .Values.filters.command) -}}
{{- fail "config.filterShadow needs filters.command (the FilterCommand to run as a shadow filter)" -}}
{{- end -}}
{{- end -}}

{{/* Whether any filter runs as a shadow (then ShadowConcurrency is written). */}}
{{- define "proxsmtpd.hasShadow" -}}
{{- $s := .Values.config.filterShadow -}}
{{- range .Values.hooks }}{{ if .shadow }}{{ $s = true }}{{ end }}{{ end -}}
{{- range (include "proxsmtpd.milterList" . | fromJson).milters }}{{ if .shadow }}{{ $s = true }}{{ end }}{{ end -}}
{{- if $s }}true{{ end -}}
{{- end -}}

{{/* The rspamd sidecar container: its proxy worker in milter mode on loopback. */}}
{{- define "proxsmtpd.rspamdContainer" -}}
name: rspamd
image: "{{ .Values.rspamd.image.repository }}:{{ .Values.rspamd.image.tag }}"
imagePullPolicy: {{ .Values.rspamd.image.pullPolicy }}
ports:
  - name: milter
    containerPort: {{ .Values.rspamd.port }}
    protocol: TCP
readinessProbe:
  tcpSocket:
    port: milter
  periodSeconds: 10
  failureThreshold: 3
securityContext:
  runAsNonRoot: true
  runAsUser: 11333
  runAsGroup: 11333
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities:
    drop: ["ALL"]
  seccompProfile:
    type: RuntimeDefault
{{- with .Values.rspamd.resources }}
resources:
  {{- toYaml . | nindent 2 }}
{{- end }}
volumeMounts:
  - name: rspamd-config
    mountPath: /etc/rspamd/local.d
    readOnly: true
  - name: rspamd-data
    mountPath: /var/lib/rspamd
  - name: rspamd-run
    mountPath: /run/rspamd
  - name: rspamd-tmp
    mountPath: /tmp
{{- end -}}
