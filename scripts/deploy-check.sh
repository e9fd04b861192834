#!/usr/bin/env bash
# deploy-check.sh - check the deployment artefacts with the real tools their users run.
#
#   chart      helm lint --strict and helm template (helm v4.1.4) with the default values and
#              every helm/proxsmtpd/ci/*.yaml; values.schema.json refusing bad values;
#              the checksum annotation following a filter script change; every rendered
#              object validated strictly (Kubernetes 1.29 and 1.35 schemas, unknown fields
#              are errors; ServiceMonitor/PrometheusRule type-checked); checks on the
#              rendered pod (deploy/check/pod_checks.py; milters reachable in the pod and the
#              quarantine writable; TLS: the Secret mounted whole,
#              never subPath, key readable, env, smtps port and Service port); the rendered
#              PrometheusRule through promtool; the README lists every value; TLS values the
#              templates must refuse; image.flavor minimal refused with any FilterCommand
#              (helm template and lint) and accepted without one (ci/standalone-minimal-image)
#   kustomize  kubectl kustomize k8s/base and k8s/examples/*, validated and checked the same way;
#              the rspamd configuration of k8s/examples/rspamd-milter and of the chart's rspamd
#              sidecar loaded by the real rspamd (rspamadm configtest, its proxy worker a milter);
#              the binary starts with the rendered milter and hook configurations
#              (conf-accepted.sh); the http-hook example's mTLS and token wiring
#   image      hadolint on the Dockerfile (building the image: scripts/image-build.sh)
#   metrics    the /metrics exposition of the binary (deploy/check/exposition.sh: started on
#              loopback with TLS), through promtool check metrics; the metric names that
#              dashboards and rules may use are the families it exports
#   alerts     promtool check rules; promtool test rules (deploy/alerts/tests/: each alert
#              fires and stays silent when it should); dashboards and rules use only metrics
#              the binary exports (a query naming one it does not export is refused); every
#              alert has a runbook_url into docs/runbook.md; the chart's copies are identical
#              to dashboards/ and deploy/alerts/
#   live       a real Prometheus scrapes a running proxsmtpd under scripted traffic, then every
#              dashboard query and alert rule is evaluated over its HTTP API
#              (deploy/check/live-metrics.sh)
#
# Usage: scripts/deploy-check.sh [--binary PATH] [--no-live]
#   --binary   the proxsmtpd binary (default target/release/proxsmtpd, else
#              target/debug/proxsmtpd, else `cargo build --release`). Env DEPLOY_CHECK_BINARY.
# Prints one line per check and `N passed, M failed` last; exit status 1 if any check failed.
# Tools are installed on first use by scripts/install-deploy-tools.sh.
set -uo pipefail
exec </dev/null
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1
BINARY=${DEPLOY_CHECK_BINARY:-}
LIVE=1
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) BINARY=$2; shift 2 ;;
    --no-live) LIVE=0; shift ;;
    -h|--help) sed -n '2,32p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

PASSED=0 FAILED=0
W=$(mktemp -d /tmp/proxsmtpd-deploy-check.XXXXXX)
trap 'rm -rf "$W"' EXIT

# check NAME CMD...: run CMD, one pass/fail line; on failure the end of its output.
check() {
  local name=$1; shift
  if "$@" > "$W/out" 2>&1; then
    PASSED=$((PASSED + 1)); printf 'ok   %s\n' "$name"
  else
    FAILED=$((FAILED + 1)); printf 'FAIL %s\n' "$name"
    grep -v '^OK \|^ok \|^PASS ' "$W/out" | tail -n 25 | sed 's/^/     /'
  fi
}
# fails_with PATTERN CMD...: CMD must fail, and for the reason PATTERN names.
fails_with() {
  local pat=$1; shift
  if "$@" > "$W/fails" 2>&1; then echo "accepted: $*"; return 1; fi
  cat "$W/fails"; grep -q -- "$pat" "$W/fails"
}
# to_file OUT CMD...: CMD's standard output into OUT.
to_file() { local o=$1; shift; "$@" > "$o"; }
# refuse NAME CMD...: CMD must fail (a bad value must be rejected).
refuse() {
  local name=$1; shift
  if "$@" > "$W/out" 2>&1; then
    FAILED=$((FAILED + 1)); printf 'FAIL %s (accepted)\n' "$name"
  else
    PASSED=$((PASSED + 1)); printf 'ok   %s: %s\n' "$name" "$(grep -m1 -i 'error\|fail' "$W/out" | cut -c1-110)"
  fi
}

# --- tools ----------------------------------------------------------------------------
echo "== tools"
if ! T=$(QUIET=1 scripts/install-deploy-tools.sh 2> "$W/install.log" | tail -n 1); then
  cat "$W/install.log"; echo "0 passed, 1 failed"; exit 1
fi
HELM="$T/bin/helm" KUBECTL="$T/bin/kubectl" HADOLINT="$T/bin/hadolint" PY="$T/venv/bin/python"
export HELM_CACHE_HOME="$T/helm/cache" HELM_CONFIG_HOME="$T/helm/config" HELM_DATA_HOME="$T/helm/data"
export DEPLOY_TOOLS_DIR="$T"
echo "$("$HELM" version --short) / kubectl $("$KUBECTL" version --client 2>/dev/null | head -n1 | awk '{print $3}')" \
     "/ hadolint $("$HADOLINT" --version | awk '{print $NF}') / $(promtool --version 2>&1 | head -n1 | awk '{print $1, $3}')"
VALIDATE=("$PY" deploy/check/k8s_strict.py -q -k 1.29.0 -k 1.35.0 --prom-models "$T/node")

# --- the binary's metrics ---------------------------------------------------------------
echo "== metrics of the binary"
if [ -z "$BINARY" ]; then
  # the release binary; else a debug one a test run left; else build the release one
  BINARY=target/release/proxsmtpd
  [ -x "$BINARY" ] || [ ! -x target/debug/proxsmtpd ] || BINARY=target/debug/proxsmtpd
  if [ ! -x "$BINARY" ]; then
    echo "building $BINARY (cargo build --release --locked)"
    cargo build --release --locked --quiet > "$W/cargo.log" 2>&1 || tail -n 20 "$W/cargo.log"
  fi
fi
echo "binary: $BINARY"
EXPOSITION="$W/exposition.txt"
check "/metrics of $BINARY (started with TLS)" to_file "$EXPOSITION" deploy/check/exposition.sh "$BINARY"
promtool_metrics() { promtool check metrics < "$1"; }
check "promtool check metrics on it ($(grep -c '^# TYPE proxsmtpd_' "$EXPOSITION") proxsmtpd families)" \
  promtool_metrics "$EXPOSITION"

# --- sources and copies -----------------------------------------------------------------
echo "== dashboards and alert rules"
check "chart copies identical to dashboards/ and deploy/alerts/" deploy/sync-chart-files.sh --check
check "dashboard JSON structure, only metrics the binary exports" "$PY" deploy/check/static_checks.py dashboard "$EXPOSITION" dashboards/*.json
check "alert rules: only metrics the binary exports, severity, summary, description" "$PY" deploy/check/static_checks.py rules "$EXPOSITION" deploy/alerts/*.yaml
# the same checks must refuse a metric the binary does not export
sed 's/proxsmtpd_messages_total/proxsmtpd_messages_lost_total/g' dashboards/proxsmtpd.json > "$W/unknown-metric.json"
rule_files=(deploy/alerts/*.yaml)
sed '0,/proxsmtpd_[a-z_]*_total/s//proxsmtpd_no_such_total/' "${rule_files[0]}" > "$W/unknown-metric.yaml"
check "a dashboard query naming a metric the binary does not export is refused" \
  fails_with "proxsmtpd_messages_lost_total" "$PY" deploy/check/static_checks.py dashboard "$EXPOSITION" "$W/unknown-metric.json"
check "an alert rule naming a metric the binary does not export is refused" \
  fails_with "proxsmtpd_no_such_total" "$PY" deploy/check/static_checks.py rules "$EXPOSITION" "$W/unknown-metric.yaml"
for r in deploy/alerts/*.yaml; do check "promtool check rules $r" promtool check rules "$r"; done
# every alert fires when it should and stays silent when it should not
for t in deploy/alerts/tests/*.yaml; do check "promtool test rules $t" promtool test rules "$t"; done

# --- Helm chart ---------------------------------------------------------------------------
echo "== helm chart"
CHART=helm/proxsmtpd
layout_of() {   # the pod layout a values file asks for
  case "$(basename "$1")" in
    sidecar-native*) echo sidecar-native ;; sidecar-plain*) echo sidecar-plain ;; *) echo standalone ;;
  esac
}
tls_of() {      # what pod_checks.py must find about TLS: on, off (the defaults) or either
  case "$(basename "$1")" in
    tls-*|sidecar-plain*) echo --tls ;; default) echo --no-tls ;;
  esac
}
# promtool on the rules of every rendered PrometheusRule
prometheusrule_rules() {
  "$PY" - "$1" "$2" <<'EOF'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if isinstance(d, dict) and d.get("kind") == "PrometheusRule"]
if not docs:
    sys.exit(3)
yaml.safe_dump({"groups": [g for d in docs for g in d["spec"]["groups"]]}, open(sys.argv[2], "w"), sort_keys=False)
EOF
}
check "chart README lists every value" "$PY" deploy/check/static_checks.py values-doc "$CHART"
check "values.schema.json: a description on every key" "$PY" deploy/check/static_checks.py schema-descriptions "$CHART/values.schema.json"
# the ConfigMaps that ci/*existing-configmaps*.yaml names, as the chart itself would render them
check "render the stand-ins of existing ConfigMaps" to_file "$W/existing-configmaps.yaml" "$HELM" template x "$CHART" \
  -f "$CHART/ci/standalone-minimal.yaml" --set fullnameOverride=mail-proxy -s templates/configmap.yaml -s templates/filters-configmap.yaml
for values in default "$CHART"/ci/*.yaml; do
  # the defaults plus upstream.host, which standalone mode requires
  name=$(basename "$values" .yaml); args=(--set upstream.host=mail.example.org); [ "$values" = default ] || args=(-f "$values")
  out="$W/render-$name.yaml" tls=$(tls_of "$values") extra=()
  case "$name" in
    sidecar-*) extra=(--persistent-queue /var/spool/postfix) ;;
    *existing-configmaps*) extra=(--existing "$W/existing-configmaps.yaml") ;;
  esac
  check "helm lint --strict [$name]" "$HELM" lint --strict "$CHART" "${args[@]}"
  if check "helm template [$name]" to_file "$out" "$HELM" template proxsmtpd "$CHART" -n mail "${args[@]}"; then
    check "strict schemas k8s 1.29+1.35 [$name] ($(grep -c '^kind:' "$out") objects)" "${VALIDATE[@]}" "$out"
    check "pod checks [$name] ($(layout_of "$values")${tls:+ $tls}${extra:+ ${extra[0]}})" "$PY" deploy/check/pod_checks.py "$out" "$(layout_of "$values")" ${tls:+"$tls"} "${extra[@]}"
    if prometheusrule_rules "$out" "$W/rules-$name.yaml" 2>/dev/null; then
      check "promtool check rules on the rendered PrometheusRule [$name]" promtool check rules "$W/rules-$name.yaml"
    fi
  fi
done
# the schema and the templates refuse what would break a pod
refuse "schema refuses an unknown top-level key" "$HELM" template x "$CHART" --set bogus=1
refuse "schema refuses an unknown nested key" "$HELM" template x "$CHART" --set config.filterTimeOut=5
refuse "schema refuses a wrong type" "$HELM" template x "$CHART" --set config.filterTimeout=soon
refuse "schema refuses a newline in a config value" "$HELM" template x "$CHART" --set-string 'config.header=a
Listen: 0.0.0.0:25'
refuse "sidecar mode without mail containers" "$HELM" template x "$CHART" --set mode=sidecar
refuse "native sidecar on Kubernetes 1.28" "$HELM" template x "$CHART" -f "$CHART/ci/sidecar-native-postfix.yaml" --kube-version 1.28.0
refuse "terminationGracePeriodSeconds below preStop + drain" "$HELM" template x "$CHART" --set terminationGracePeriodSeconds=20
refuse "standalone without upstream.host" "$HELM" template x "$CHART"
refuse "a PDB that blocks every drain (1 replica, minAvailable 1)" "$HELM" template x "$CHART" --set upstream.host=m --set replicaCount=1 --set pdb.enabled=true
refuse "a PDB that blocks every drain (maxUnavailable 0)" "$HELM" template x "$CHART" --set upstream.host=m --set pdb.enabled=true --set pdb.maxUnavailable=0
refuse "a PDB that blocks every drain (autoscaling minReplicas 2, minAvailable 2)" "$HELM" template x "$CHART" --set upstream.host=m --set autoscaling.enabled=true --set pdb.enabled=true --set pdb.minAvailable=2
refuse "sidecar.persistence when no mail container mounts the volume" "$HELM" template x "$CHART" -f "$CHART/ci/sidecar-native-postfix.yaml" --set sidecar.persistence.volumeName=other
refuse "sidecar.persistence.existingClaim with 2 replicas" "$HELM" template x "$CHART" -f "$CHART/ci/sidecar-plain-postfix.yaml" --set replicaCount=2
refuse "schema refuses an unknown service.ipFamilies entry" "$HELM" template x "$CHART" --set upstream.host=m --set 'service.ipFamilies={IPv5}'
refuse "FilterCommand naming a script that is not shipped" "$HELM" template x "$CHART" -f "$CHART/ci/standalone-minimal.yaml" --set filters.command=/etc/proxsmtpd/filters/missing.sh
# the minimal image has no /bin/sh, which runs every FilterCommand: refused however it is set.
MIN_IMAGE=(-f "$CHART/ci/standalone-minimal-image.yaml")
check "schema refuses an unknown image.flavor" fails_with "/image/flavor" "$HELM" template x "$CHART" "${MIN_IMAGE[@]}" --set image.flavor=tiny
check "schema refuses image.flavor minimal with filters.command (helm template)" fails_with "/filters/command" "$HELM" template x "$CHART" -f "$CHART/ci/standalone-minimal.yaml" --set image.flavor=minimal
check "schema refuses image.flavor minimal with filters.command (helm lint)" fails_with "/filters/command" "$HELM" lint --strict "$CHART" -f "$CHART/ci/standalone-minimal.yaml" --set image.flavor=minimal
check "schema refuses image.flavor minimal with config.extraSettings.FilterCommand" fails_with "invalid propertyName 'filtercommand'" "$HELM" template x "$CHART" "${MIN_IMAGE[@]}" --set config.extraSettings.filtercommand=/usr/local/bin/check
check "schema refuses image.flavor minimal with PROXSMTPD_FILTER_COMMAND in extraEnv" fails_with "/extraEnv" "$HELM" template x "$CHART" "${MIN_IMAGE[@]}" --set 'extraEnv[0].name=PROXSMTPD_FILTER_COMMAND' --set 'extraEnv[0].value=/usr/local/bin/check'
check "schema accepts image.flavor full with filters.command [standalone-minimal]" "$HELM" lint --strict "$CHART" -f "$CHART/ci/standalone-minimal.yaml" --set image.flavor=full
# TLS: an existing Secret only (no inline keys), and nothing that would stop the proxy
TLS_ON=(--set tls.enabled=true --set tls.secretName=smtp-tls)
refuse "schema refuses an inline certificate (tls.create)" "$HELM" template x "$CHART" "${TLS_ON[@]}" --set tls.create=true
refuse "schema refuses an unknown upstreamTls.mode" "$HELM" template x "$CHART" --set upstreamTls.mode=sometimes
refuse "tls.enabled without tls.secretName" "$HELM" template x "$CHART" --set tls.enabled=true
refuse "tls.required without a certificate" "$HELM" template x "$CHART" --set tls.required=true
refuse "tls.implicitPort without a certificate" "$HELM" template x "$CHART" --set tls.implicitPort=465
refuse "tls.implicitPort equal to service.port" "$HELM" template x "$CHART" "${TLS_ON[@]}" --set tls.implicitPort=25
refuse "upstreamTls.caSecret while upstreamTls.mode is off" "$HELM" template x "$CHART" --set upstreamTls.caSecret=mail-ca
refuse "upstreamTls.caSecret and caConfigMap together" "$HELM" template x "$CHART" --set upstreamTls.mode=required --set upstreamTls.caSecret=a --set upstreamTls.caConfigMap=b
checksum_of() { "$HELM" template x "$CHART" -f "$CHART/ci/standalone-minimal.yaml" --set rollOnConfigChange=true "$@" | sed -n 's/.*checksum\/config: //p'; }
checksum_changes() {
  local a b c
  a=$(checksum_of) b=$(checksum_of --set-string 'filters.scripts.check\.sh=#!/bin/sh
exec cat') c=$(checksum_of --set config.maxConnections=99)
  echo "base $a, script changed $b, setting changed $c"
  [ -n "$a" ] && [ "$a" != "$b" ] && [ "$a" != "$c" ]
}
check "checksum/config changes with a filter script or a setting (rollOnConfigChange=true)" checksum_changes
# pod_template VALUES-FILE [ARGS]: a hash of the rendered workload's pod template (what rolls pods)
pod_template() {
  "$HELM" template x "$CHART" -f "$@" | "$PY" -c '
import hashlib, json, sys, yaml
w = [d for d in yaml.safe_load_all(sys.stdin) if isinstance(d, dict) and d.get("kind") in ("Deployment", "StatefulSet")]
print(hashlib.sha256(json.dumps(w[0]["spec"]["template"], sort_keys=True).encode()).hexdigest()[:16] if len(w) == 1 else "no-workload")'
}
# roll_on_config_change VALUES-FILE ON: with ON=false (and ReloadWatch on), a reloadable setting
# and a filter script change leave the pod template as it was; with true, each changes it; a
# setting read once at start (MaxConnections) changes it either way.
roll_on_config_change() {
  local f=$1 on=$2 base setting script restart
  base=$(pod_template "$f" --set rollOnConfigChange="$on")
  setting=$(pod_template "$f" --set rollOnConfigChange="$on" --set config.filterTimeout=77)
  script=$(pod_template "$f" --set rollOnConfigChange="$on" --set-string 'filters.scripts.check\.sh=#!/bin/sh
exec cat # changed')
  restart=$(pod_template "$f" --set rollOnConfigChange="$on" --set config.maxConnections=99)
  echo "pod template: base $base, FilterTimeout changed $setting, script changed $script, MaxConnections changed $restart"
  [ "$base" != no-workload ] && [ "$restart" != "$base" ] || return 1
  if [ "$on" = true ]; then [ "$setting" != "$base" ] && [ "$script" != "$base" ]
  else [ "$setting" = "$base" ] && [ "$script" = "$base" ]; fi
}
for f in standalone-minimal sidecar-native-postfix; do
  check "rollOnConfigChange=false: a changed setting or script leaves the pod template [$f]" roll_on_config_change "$CHART/ci/$f.yaml" false
  check "rollOnConfigChange=true: a changed setting or script changes the pod template [$f]" roll_on_config_change "$CHART/ci/$f.yaml" true
done
rollout_default() {   # rollOnConfigChange null follows ReloadWatch
  local a b
  a=$(pod_template "$CHART/ci/standalone-minimal.yaml") b=$(pod_template "$CHART/ci/standalone-minimal.yaml" --set config.filterTimeout=77)
  echo "ReloadWatch on: $a / $b"; [ "$a" = "$b" ] || return 1
  a=$(pod_template "$CHART/ci/standalone-minimal.yaml" --set config.reloadWatch=false)
  b=$(pod_template "$CHART/ci/standalone-minimal.yaml" --set config.reloadWatch=false --set config.filterTimeout=77)
  echo "ReloadWatch off: $a / $b"; [ "$a" != "$b" ]
}
check "rollOnConfigChange default: off with ReloadWatch, on without" rollout_default
# holds FILE PYTHON-EXPR...: each expression over the rendered objects must be true
holds() { "$PY" deploy/check/render_asserts.py "$@"; }
check "persistent queue: StatefulSet volumeClaimTemplate mounted at Postfix's queue [sidecar-native-postfix]" holds "$W/render-sidecar-native-postfix.yaml" \
  'kind("StatefulSet") and not kind("Deployment")' \
  '[t["metadata"]["name"] for t in kind("StatefulSet")[0]["spec"]["volumeClaimTemplates"]] == ["postfix-queue"]' \
  '{"name": "postfix-queue", "mountPath": "/var/spool/postfix"} in container("postfix")["volumeMounts"]' \
  'not any(v["name"] == "postfix-queue" for v in pod()["volumes"])'
check "persistent queue: existing claim mounted at Postfix's queue, Recreate [sidecar-plain-postfix]" holds "$W/render-sidecar-plain-postfix.yaml" \
  '[v["persistentVolumeClaim"]["claimName"] for v in pod()["volumes"] if v["name"] == "queue"] == ["postfix-queue"]' \
  '{"name": "queue", "mountPath": "/var/spool/postfix"} in container("postfix")["volumeMounts"]' \
  'kind("Deployment")[0]["spec"]["strategy"] == {"type": "Recreate"} and kind("Deployment")[0]["spec"]["replicas"] == 1'
"$HELM" template x "$CHART" --set upstream.host=m > "$W/spread2.yaml" 2>&1
"$HELM" template x "$CHART" --set upstream.host=m --set replicaCount=1 > "$W/spread1.yaml" 2>&1
check "default topology spread over nodes and zones with 2 replicas" holds "$W/spread2.yaml" \
  '[c["topologyKey"] for c in pod()["topologySpreadConstraints"]] == ["kubernetes.io/hostname", "topology.kubernetes.io/zone"]'
check "no default topology spread with 1 replica" holds "$W/spread1.yaml" '"topologySpreadConstraints" not in pod()'
check "operator options rendered [standalone-operator]" holds "$W/render-standalone-operator.yaml" \
  'all(d["metadata"]["labels"].get("team") == "mail" for d in docs)' \
  '[c["name"] for c in pod()["containers"]] == ["proxsmtpd", "log-shipper"]' \
  'pod()["securityContext"]["supplementalGroups"] == [4000] and pod()["securityContext"]["runAsUser"] == 20025' \
  'container("proxsmtpd")["securityContext"]["seLinuxOptions"] == {"level": "s0:c123,c456"} and container("proxsmtpd")["securityContext"]["readOnlyRootFilesystem"] is True' \
  '{"name": "PROXSMTPD_KEEP_ALIVES", "value": "15"} in container("proxsmtpd")["env"]' \
  'obj("Service", "proxsmtpd")["spec"]["ipFamilyPolicy"] == "PreferDualStack" and obj("Service", "proxsmtpd")["spec"]["ipFamilies"] == ["IPv6", "IPv4"]' \
  'obj("Service", "proxsmtpd")["spec"]["loadBalancerClass"] == "service.k8s.aws/nlb"' \
  'kind("ServiceMonitor")[0]["metadata"]["namespace"] == "monitoring" and kind("PrometheusRule")[0]["metadata"]["namespace"] == "monitoring"' \
  'all(r["annotations"]["runbook_url"].startswith("https://docs.example.org/proxsmtpd/runbook.html#") for r in alerts())' \
  'any("job=\"proxsmtpd-metrics\", namespace=\"mail\"" in str(r["expr"]) for r in alerts())' \
  '"checksum/config" in template()["metadata"]["annotations"]'
MILTERS='inet:127.0.0.1:11332{name=rspamd, command_timeout=10s, default_action=accept}, unix:/run/clamav-milter/milter.sock{name=clamav, content_timeout=5m, default_action=tempfail}, inet:opendkim.mail.svc.cluster.local:8891{name=opendkim, connect_timeout=5, default_action=tempfail}'
check "milters rendered: Milters in order with their options, globals, quarantine, readiness [standalone-milters]" holds "$W/render-standalone-milters.yaml" \
  "setting(\"Milters\") == \"$MILTERS\"" \
  '[setting(n) for n in ("MilterDefaultAction", "MilterConnectTimeout", "MilterCommandTimeout", "MilterContentTimeout", "MilterProtocol", "MilterMacroDaemonName")] == ["tempfail", "10", "30", "300", "6", "mx-filter"]' \
  'setting("MilterQuarantine") == "hold" and setting("MilterQuarantineDirectory") == "/var/spool/proxsmtpd-quarantine" and setting("ReadinessCheckMilters") == "on"' \
  '{"name": "proxsmtpd-quarantine", "mountPath": "/var/spool/proxsmtpd-quarantine"} in container("proxsmtpd")["volumeMounts"]' \
  '[v["emptyDir"] for v in pod()["volumes"] if v["name"] == "proxsmtpd-quarantine"] == [{"sizeLimit": "2Gi"}]' \
  '{"name": "clamav-milter-socket", "mountPath": "/run/clamav-milter"} in container("proxsmtpd")["volumeMounts"]'
check "rspamd sidecar: image, loopback milter port, restricted, proxy worker in milter mode, a roll on its config [standalone-milters]" holds "$W/render-standalone-milters.yaml" \
  '[c["name"] for c in pod()["containers"]] == ["proxsmtpd", "rspamd", "clamav"]' \
  'container("rspamd")["image"] == "docker.io/rspamd/rspamd:3.11" and container("rspamd")["ports"][0]["containerPort"] == 11332' \
  'container("rspamd")["securityContext"]["readOnlyRootFilesystem"] is True and container("rspamd")["securityContext"]["capabilities"] == {"drop": ["ALL"]}' \
  '"milter = yes;" in obj("ConfigMap", "proxsmtpd-rspamd")["data"]["worker-proxy.inc"] and "bind_socket = \"127.0.0.1:11332\";" in obj("ConfigMap", "proxsmtpd-rspamd")["data"]["worker-proxy.inc"]' \
  '"reject = 15;" in obj("ConfigMap", "proxsmtpd-rspamd")["data"]["actions.conf"]' \
  '"checksum/rspamd" in template()["metadata"]["annotations"]'
check "milters: NetworkPolicy egress to OpenDKIM's port, none for loopback rspamd nor the unix socket [standalone-milters]" holds "$W/render-standalone-milters.yaml" \
  '[[p["port"] for p in r["ports"]] for r in kind("NetworkPolicy")[0]["spec"]["egress"]] == [[53, 53], [25], [8891]]' \
  'kind("NetworkPolicy")[0]["spec"]["egress"][2]["to"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "opendkim"}}}]'
check "no milter: no Milter setting, no rspamd, no quarantine volume [default]" holds "$W/render-default.yaml" \
  'not any(l.strip().startswith(("Milter", "ReadinessCheckMilters")) for c in kind("ConfigMap") for l in c["data"].get("proxsmtpd.conf", "").splitlines())' \
  '[c["name"] for c in pod()["containers"]] == ["proxsmtpd"] and not any(v["name"].startswith(("rspamd", "proxsmtpd-quarantine")) for v in pod()["volumes"])'
check "the binary starts with the rendered milter configuration [standalone-milters]" \
  deploy/check/conf-accepted.sh "$BINARY" "$W/render-standalone-milters.yaml" "$PY"
sed 's/{name=clamav, /{name=clamav, command_timeout=soon, /' "$W/render-standalone-milters.yaml" > "$W/render-bad-milter.yaml"
check "... and refuses it with a broken milter option" \
  fails_with "Milters" deploy/check/conf-accepted.sh "$BINARY" "$W/render-bad-milter.yaml" "$PY"
MILTER_CI=(-f "$CHART/ci/standalone-milters.yaml")
refuse "schema refuses a milter address without a port" "$HELM" template x "$CHART" --set upstream.host=m --set 'milters[0].address=inet:rspamd'
refuse "schema refuses an unknown milter option" "$HELM" template x "$CHART" --set upstream.host=m --set 'milters[0].address=inet:rspamd:11332' --set 'milters[0].timeout=5'
refuse "schema refuses a milter name that would break the Milters line" "$HELM" template x "$CHART" --set upstream.host=m --set 'milters[0].address=inet:rspamd:11332' --set 'milters[0].name=a\,b'
refuse "schema refuses an unknown milter default action" "$HELM" template x "$CHART" --set upstream.host=m --set milter.defaultAction=discard
refuse "schema refuses an unknown quarantine action" "$HELM" template x "$CHART" --set upstream.host=m --set milter.quarantine.action=keep
refuse "a unix milter socket in no mounted volume" "$HELM" template x "$CHART" --set upstream.host=m --set 'milters[0].address=unix:/run/opendkim/opendkim.sock'
"$HELM" template x "$CHART" --set upstream.host=m --set 'milters[0].address=inet:127.0.0.1:9999' > "$W/milter-nowhere.yaml" 2>&1
check "pod checks refuse a loopback milter that no container of the pod serves" \
  fails_with "FAIL .*milter inet:127.0.0.1:9999 on loopback" "$PY" deploy/check/pod_checks.py "$W/milter-nowhere.yaml" standalone --no-tls
refuse "rspamd.localConfig replacing the chart's milter worker" "$HELM" template x "$CHART" "${MILTER_CI[@]}" --set-string 'rspamd.localConfig.worker-proxy\.inc=milter = no;'
HOOKS='https://policy.mail.svc.cluster.local:8443/check{name=policy, stages=mail+rcpt+data, timeout=5s, default_action=tempfail, max_size=20M, oversize_action=accept, concurrency=16}, http://classifier.mail.svc.cluster.local/v1/hook{name=classifier, default_action=accept, shadow=yes}'
check "hooks rendered: Hooks in order with their options, globals, TLS and token files, shadows, FilterOrder [standalone-hooks]" holds "$W/render-standalone-hooks.yaml" \
  "setting(\"Hooks\") == \"$HOOKS\"" \
  '[setting(n) for n in ("HookTimeout", "HookDefaultAction", "HookMaxSize", "HookOversizeAction", "HookConcurrency", "HookTlsVerify")] == ["10s", "tempfail", "10M", "accept", "32", "on"]' \
  '[setting(n) for n in ("HookCaFile", "HookClientCertificate", "HookClientKey", "HookTokenFile")] == ["/etc/proxsmtpd/hook-tls/ca.crt", "/etc/proxsmtpd/hook-tls/tls.crt", "/etc/proxsmtpd/hook-tls/tls.key", "/etc/proxsmtpd/hook-token/token"]' \
  'setting("Milters").endswith("shadow=yes}") and setting("FilterShadow") == "on" and setting("ShadowConcurrency") == "32" and setting("FilterOrder") == "hooks milters command"' \
  'setting("MilterQuarantine") == "hold"'
check "hooks: TLS and token Secrets mounted whole and read-only [standalone-hooks]" holds "$W/render-standalone-hooks.yaml" \
  '{"name": "proxsmtpd-hook-tls", "mountPath": "/etc/proxsmtpd/hook-tls", "readOnly": True} in container("proxsmtpd")["volumeMounts"]' \
  '{"name": "proxsmtpd-hook-token", "mountPath": "/etc/proxsmtpd/hook-token", "readOnly": True} in container("proxsmtpd")["volumeMounts"]' \
  'not any("subPath" in m for m in container("proxsmtpd")["volumeMounts"])' \
  '[v["secret"]["secretName"] for v in pod()["volumes"] if v["name"] in ("proxsmtpd-hook-tls", "proxsmtpd-hook-token")] == ["proxsmtpd-hook-client", "proxsmtpd-hook-token"]'
check "hooks: NetworkPolicy egress to the hooks' ports (8443, and 80 for http without a port) [standalone-hooks]" holds "$W/render-standalone-hooks.yaml" \
  '[[p["port"] for p in r["ports"]] for r in kind("NetworkPolicy")[0]["spec"]["egress"]] == [[53, 53], [25], [11332], [8443, 80]]' \
  'kind("NetworkPolicy")[0]["spec"]["egress"][3]["to"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/part-of": "mail-policy"}}}]'
check "no hook: no Hook, FilterShadow, FilterOrder or ShadowConcurrency setting, no hook volume [default]" holds "$W/render-default.yaml" \
  'not any(l.strip().startswith(("Hook", "FilterShadow", "FilterOrder", "ShadowConcurrency")) for c in kind("ConfigMap") for l in c["data"].get("proxsmtpd.conf", "").splitlines())' \
  'not any(v["name"].startswith("proxsmtpd-hook") for v in pod()["volumes"])'
# TODO(hooks merged): passes once the binary parses Hooks, Hook*, shadow=, FilterShadow,
# FilterOrder and ShadowConcurrency; until then the binary refuses the rendered settings.
check "the binary starts with the rendered hook configuration [standalone-hooks]" \
  deploy/check/conf-accepted.sh "$BINARY" "$W/render-standalone-hooks.yaml" "$PY"
sed 's/{name=policy, /{name=policy, timeout=soon, /' "$W/render-standalone-hooks.yaml" > "$W/render-bad-hook.yaml"
check "... and refuses it with a broken hook option" \
  fails_with "invalid setting: Hooks" deploy/check/conf-accepted.sh "$BINARY" "$W/render-bad-hook.yaml" "$PY"
big_sizes() {   # a size in bytes from a values file stays an integer (YAML numbers are floats to helm)
  printf 'upstream: {host: m}\nhooks:\n  - url: https://p:8443/c\n    maxSize: 10485760\nhook:\n  maxSize: 20971520\n' > "$W/big-sizes.yaml"
  "$HELM" template x "$CHART" -f "$W/big-sizes.yaml" -s templates/configmap.yaml > "$W/big-sizes.out" || return 1
  grep -E '^ *(Hooks|HookMaxSize):' "$W/big-sizes.out"
  grep -q '{max_size=10485760}' "$W/big-sizes.out" && grep -q 'HookMaxSize: 20971520$' "$W/big-sizes.out"
}
check "hook sizes in bytes rendered as integers (not 1.048576e+07)" big_sizes
HOOK1=(--set upstream.host=m --set 'hooks[0].url=https://policy:8443/check')
refuse "schema refuses a hook URL that is not http(s)" "$HELM" template x "$CHART" --set upstream.host=m --set 'hooks[0].url=ftp://policy/check'
refuse "schema refuses an unknown hook option" "$HELM" template x "$CHART" "${HOOK1[@]}" --set 'hooks[0].retries=3'
refuse "schema refuses an unknown hook stage" "$HELM" template x "$CHART" "${HOOK1[@]}" --set 'hooks[0].stages={helo}'
refuse "schema refuses a hook name that would break the Hooks line" "$HELM" template x "$CHART" "${HOOK1[@]}" --set 'hooks[0].name=a\,b'
refuse "schema refuses a hook size without a known suffix" "$HELM" template x "$CHART" "${HOOK1[@]}" --set hook.maxSize=10MB
refuse "schema refuses an unknown hook default action" "$HELM" template x "$CHART" "${HOOK1[@]}" --set hook.defaultAction=discard
refuse "schema refuses an unknown hook oversize action" "$HELM" template x "$CHART" "${HOOK1[@]}" --set 'hooks[0].oversizeAction=truncate'
refuse "schema refuses a hook concurrency of 0" "$HELM" template x "$CHART" "${HOOK1[@]}" --set hook.concurrency=0
refuse "schema refuses a hook client certificate without its key" "$HELM" template x "$CHART" "${HOOK1[@]}" --set 'hooks[0].clientCertificate=/etc/hook/tls.crt'
refuse "schema refuses a FilterOrder word twice" "$HELM" template x "$CHART" --set upstream.host=m --set 'config.filterOrder={hooks,hooks,command}'
refuse "schema refuses a FilterOrder without every word" "$HELM" template x "$CHART" --set upstream.host=m --set 'config.filterOrder={hooks,milters}'
refuse "schema refuses a ShadowConcurrency of 0" "$HELM" template x "$CHART" --set upstream.host=m --set config.shadowConcurrency=0
refuse "hook.tls.clientCertificate without hook.tls.secretName" "$HELM" template x "$CHART" "${HOOK1[@]}" --set hook.tls.clientCertificate=true
refuse "config.filterShadow without filters.command" "$HELM" template x "$CHART" --set upstream.host=m --set config.filterShadow=true
"$HELM" template x "$CHART" --set upstream.host=m --set 'hooks[0].url=http://127.0.0.1:9000/check' > "$W/hook-nowhere.yaml" 2>&1
check "pod checks refuse a loopback hook that no container of the pod serves" \
  fails_with "FAIL .*hook http://127.0.0.1:9000/check on loopback" "$PY" deploy/check/pod_checks.py "$W/hook-nowhere.yaml" standalone --no-tls
"$PY" - "$W/render-standalone-hooks.yaml" "$W/hook-subpath.yaml" <<'EOF'
import sys, yaml
docs = list(yaml.safe_load_all(open(sys.argv[1])))
for d in docs:
    if isinstance(d, dict) and d.get("kind") == "Deployment":
        for m in d["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]:
            if m["name"] == "proxsmtpd-hook-token":
                m["mountPath"], m["subPath"] = "/etc/proxsmtpd/hook-token/token", "token"
yaml.safe_dump_all(docs, open(sys.argv[2], "w"))
EOF
check "pod checks refuse the hook token Secret mounted with subPath (a rotated token would never arrive)" \
  fails_with "FAIL .*subPath" "$PY" deploy/check/pod_checks.py "$W/hook-subpath.yaml" standalone --no-tls
refuse "a hook's own token file in no mounted volume" "$HELM" template x "$CHART" "${HOOK1[@]}" --set 'hooks[0].tokenFile=/etc/policy/token'
APP_VERSION=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' "$CHART/Chart.yaml")
check "image.flavor minimal without FilterCommand accepted: tag -minimal, no FilterCommand, test pod on the full image [standalone-minimal-image]" holds "$W/render-standalone-minimal-image.yaml" \
  "container(\"proxsmtpd\")[\"image\"].endswith(\":$APP_VERSION-minimal\")" \
  'not any("FilterCommand" in v for c in kind("ConfigMap") for v in (c.get("data") or {}).values())' \
  'kind("Pod")[0]["spec"]["containers"][0]["image"] + "-minimal" == container("proxsmtpd")["image"]'
check "image.flavor full is the default: the tag as it is, test pod on the same image [standalone-minimal]" holds "$W/render-standalone-minimal.yaml" \
  "container(\"proxsmtpd\")[\"image\"].endswith(\":$APP_VERSION\")" \
  'kind("Pod")[0]["spec"]["containers"][0]["image"] == container("proxsmtpd")["image"]'
check "helm test pod: the chart's image, an SMTP exchange with the Service [standalone-operator]" holds "$W/render-standalone-operator.yaml" \
  '[p["metadata"]["annotations"]["helm.sh/hook"] for p in kind("Pod")] == ["test"]' \
  'kind("Pod")[0]["spec"]["containers"][0]["image"] == container("proxsmtpd")["image"]' \
  '{"name": "SMTP_HOST", "value": "proxsmtpd.mail.svc"} in kind("Pod")[0]["spec"]["containers"][0]["env"]' \
  '"expect 250" in kind("Pod")[0]["spec"]["containers"][0]["args"][0]'

# --- kustomize ----------------------------------------------------------------------------
echo "== kustomize"
for dir in k8s/base k8s/examples/*/; do
  dir=${dir%/}; name=${dir#k8s/}; out="$W/kustomize-${name//\//-}.yaml"
  # the pod each one must give: the base, the rspamd and the http-hook examples are
  # standalone proxies (the rspamd example with rspamd next to the proxy), the Postfix
  # example a native sidecar with TLS
  layout=standalone tls=--no-tls queue=()
  case "$dir" in
    k8s/examples/postfix-sidecar) layout=sidecar-native tls=--tls queue=(--persistent-queue /var/spool/postfix) ;;
  esac
  if check "kubectl kustomize $dir" to_file "$out" "$KUBECTL" kustomize "$dir"; then
    check "strict schemas k8s 1.29+1.35 [$dir] ($(grep -c '^kind:' "$out") objects)" "${VALIDATE[@]}" "$out"
    check "pod checks [$dir] ($layout $tls${queue:+ ${queue[0]}})" "$PY" deploy/check/pod_checks.py "$out" "$layout" "$tls" "${queue[@]}"
  fi
done
check "rspamd example: Milters names the rspamd container's loopback port, which its proxy worker binds in milter mode" holds "$W/kustomize-examples-rspamd-milter.yaml" \
  'setting("Milters").startswith("inet:127.0.0.1:11332{name=rspamd,") and setting("ReadinessCheckMilters") == "on"' \
  'container("rspamd")["ports"] == [{"name": "milter", "containerPort": 11332, "protocol": "TCP"}]' \
  '[v["configMap"]["name"] for v in pod()["volumes"] if v["name"] == "rspamd-config"] == [c["metadata"]["name"] for c in kind("ConfigMap") if c["metadata"]["name"].startswith("rspamd-config-")]' \
  '"bind_socket = \"127.0.0.1:11332\";" in [c for c in kind("ConfigMap") if c["metadata"]["name"].startswith("rspamd-config-")][0]["data"]["worker-proxy.inc"]'
check "http-hook example: Hooks names the mail-policy Service's port, mTLS and token files in their Secrets mounted whole, the Secret the hook service reads too" holds "$W/kustomize-examples-http-hook.yaml" \
  'setting("Hooks").startswith("https://mail-policy.mail.svc:8443/check{name=policy,")' \
  'obj("Service", "mail-policy")["spec"]["ports"][0]["port"] == 8443 and obj("Service", "mail-policy")["spec"]["ports"][0]["targetPort"] == "https"' \
  '[setting(n) for n in ("HookCaFile", "HookClientCertificate", "HookClientKey", "HookTokenFile")] == ["/etc/proxsmtpd/hook-tls/ca.crt", "/etc/proxsmtpd/hook-tls/tls.crt", "/etc/proxsmtpd/hook-tls/tls.key", "/etc/proxsmtpd/hook-token/token"]' \
  '[v["secret"]["secretName"] for v in obj("Deployment", "proxsmtpd")["spec"]["template"]["spec"]["volumes"] if v["name"] in ("hook-tls", "hook-token")] == ["proxsmtpd-hook-tls", "proxsmtpd-hook-token"]' \
  '[m for m in obj("Deployment", "proxsmtpd")["spec"]["template"]["spec"]["containers"][0]["volumeMounts"] if m["name"].startswith("hook-")] == [{"name": "hook-tls", "mountPath": "/etc/proxsmtpd/hook-tls", "readOnly": True}, {"name": "hook-token", "mountPath": "/etc/proxsmtpd/hook-token", "readOnly": True}]' \
  '"proxsmtpd-hook-token" in [v["secret"]["secretName"] for v in obj("Deployment", "mail-policy")["spec"]["template"]["spec"]["volumes"] if "secret" in v]' \
  'obj("NetworkPolicy", "mail-policy")["spec"]["ingress"][0]["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "proxsmtpd"}}}]'
# TODO(hooks merged): passes once the binary parses the Hook* settings.
check "the binary starts with the http-hook example's proxsmtpd.conf" \
  deploy/check/conf-accepted.sh "$BINARY" "$W/kustomize-examples-http-hook.yaml" "$PY"
# rspamd_loads NAME RENDERED-FILE CONFIGMAP-PREFIX: the files of that ConfigMap as rspamd's
# local.d, through the real rspamd (Debian): its configtest, and the proxy worker it ends
# up with binds 127.0.0.1:11332 in milter mode and scans the messages itself.
rspamd_loads() {
  local d="$W/rspamd-$1"
  rm -rf "$d"; mkdir -p "$d/local.d"
  "$PY" deploy/check/rspamd_config.py extract "$2" "$3" "$d/local.d" || return 1
  # not --strict: offline, the stock fuzzy_check servers do not resolve, which it counts as errors
  (cd "$d" && rspamadm --var="LOCAL_CONFDIR=$d" configtest) > "$d/configtest.txt" 2>&1
  cat "$d/configtest.txt"; grep -qx "syntax OK" "$d/configtest.txt" || return 1
  (cd "$d" && rspamadm --var="LOCAL_CONFDIR=$d" configdump -j worker) | "$PY" deploy/check/rspamd_config.py milter-worker 127.0.0.1:11332
}
check "the binary starts with the rspamd example's proxsmtpd.conf" \
  deploy/check/conf-accepted.sh "$BINARY" "$W/kustomize-examples-rspamd-milter.yaml" "$PY"
if command -v rspamadm > /dev/null; then
  check "rspamd $(rspamadm --version 2>/dev/null | awk '{print $NF}') loads the rspamd example's configuration: proxy worker in milter mode on 127.0.0.1:11332" \
    rspamd_loads example "$W/kustomize-examples-rspamd-milter.yaml" rspamd-config-
  check "rspamd loads the chart's rspamd configuration: the same [standalone-milters]" \
    rspamd_loads chart "$W/render-standalone-milters.yaml" proxsmtpd-rspamd
else
  FAILED=$((FAILED + 1)); echo "FAIL rspamd configuration checks: no rspamadm (Debian rspamd; scripts/install-deploy-tools.sh)"
fi

# --- image --------------------------------------------------------------------------------
echo "== image"
check "hadolint Dockerfile" "$HADOLINT" Dockerfile

# --- live: Prometheus, dashboards and alerts on real metrics ------------------------------
if [ "$LIVE" = 1 ]; then
  echo "== live metrics"
  deploy/check/live-metrics.sh "$BINARY" > "$W/live.log" 2>&1
  live_rc=$?
  while IFS= read -r line; do
    case "$line" in
      PASS\ *) PASSED=$((PASSED + 1)); printf 'ok   live: %s\n' "${line#PASS }" ;;
      FAIL\ *) FAILED=$((FAILED + 1)); printf 'FAIL live: %s\n' "${line#FAIL }" ;;
      "     "*) printf '%s\n' "$line" ;;
      *) printf '     %s\n' "$line" ;;
    esac
  done < "$W/live.log"
  if [ "$live_rc" != 0 ] && ! grep -q '^FAIL ' "$W/live.log"; then
    FAILED=$((FAILED + 1)); echo "FAIL live metrics check (exit $live_rc)"
  fi
fi

echo "$PASSED passed, $FAILED failed"
[ "$FAILED" = 0 ]
