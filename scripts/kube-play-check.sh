#!/usr/bin/env bash
# kube-play-check.sh - run what we ship: the chart's pods and the kustomize example as real
# containers with `podman kube play`, and check them the way a cluster would use them.
#
# Cases (each rendered with the real helm / kubectl, then played):
#   sidecar     helm template -f helm/proxsmtpd/ci/sidecar-native-postfix.yaml: the proxy in
#               front of Postfix in one pod, Postfix's queue on a claim (StatefulSet)
#   standalone  helm template -f helm/proxsmtpd/ci/standalone-minimal.yaml, in front of a
#               Postfix pod (deploy/kube-play/postfix-upstream.yaml); the chart's helm test pod
#   kustomize   kubectl kustomize k8s/examples/postfix-sidecar (native sidecar, STARTTLS from
#               the Secret postfix-tls, queue claim)
# For each: the pods run; /readyz answers 200 and /metrics has the message counters; mail
# sent with swaks to the published SMTP port goes through the proxy and the filter of the
# ConfigMap into Postfix, which relays it to an smtp-sink the script runs on the podman
# bridge; reject (and drop) verdicts are honoured; the proxy runs as uid 10025 with a
# read-only root filesystem and no capability; on SIGTERM an open session gets 421 and the
# proxy exits 0. Sidecar cases also: a filter change through the kubelet's `..data` symlink
# swap is reloaded without a restart, and a message queued while the sink is down survives
# the replacement of the pod (then is delivered).
#
# What podman kube play cannot run is listed as `skip` and every change made so that it runs
# as `edit` (deploy/kube-play/prep.py); nothing is dropped silently.
#
# Images: localhost/proxsmtpd:<version> (scripts/image-build.sh --prebuilt) and a Postfix
# image from the same debootstrap Debian base with Debian's postfix package
# (deploy/kube-play/postfix/, built offline: the .deb files are fetched on the host).
#
# Usage: scripts/kube-play-check.sh [--binary PATH] [--no-image-build] [--case NAME]... [--keep]
#   --binary          proxsmtpd binary for the image (default target/release/proxsmtpd)
#   --no-image-build  use the existing localhost/proxsmtpd:<version> image
#   --case            sidecar, standalone or kustomize (default: all three)
#   --keep            keep the work directory (rendered and played YAML, logs)
# Long-running (a few minutes), root and podman needed: not part of scripts/test.sh.
# Prints one line per check and `N passed, M failed` last; exit status 1 if any check failed.
set -uo pipefail
exec </dev/null
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1
BINARY="$ROOT/target/release/proxsmtpd" BUILD=1 KEEP=0 CASES=()
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) BINARY=$2; shift 2 ;;
    --no-image-build) BUILD=0; shift ;;
    --case) CASES+=("$2"); shift 2 ;;
    --keep) KEEP=1; shift ;;
    -h|--help) sed -n '2,34p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
[ ${#CASES[@]} -gt 0 ] || CASES=(sidecar standalone kustomize)
START=$(date +%s)
VERSION=$(sed -n 's/^version *= *"\(.*\)"/\1/p' Cargo.toml | head -n1)
TAG=localhost/proxsmtpd:$VERSION
BASE=localhost/proxsmtpd-base/debian:bookworm-minbase-ca
POSTFIX_IMAGE=localhost/proxsmtpd-kubeplay/postfix:bookworm
CHART=helm/proxsmtpd
PREP=deploy/kube-play/prep.py

PASSED=0 FAILED=0
W=$(mktemp -d /var/tmp/proxsmtpd-kube-play.XXXXXX); chmod 0755 "$W"
SINK_PID="" ANCHOR="" BG_PIDS=() PODS=() VOLUMES=()

start_sink() {
  smtp-sink -u postfix -d "$W/sink/%M." "$GW:$SINK_PORT" 64 >> "$W/sink.log" 2>&1 &
  SINK_PID=$!
  wait_for 5 bash -c "exec 3<>/dev/tcp/$GW/$SINK_PORT"
}
stop_sink() {
  [ -n "$SINK_PID" ] || return 0
  kill "$SINK_PID" 2>/dev/null; wait "$SINK_PID" 2>/dev/null; SINK_PID=""
}
in_sink() { grep -rqs -- "$1" "$W/sink"; }
ok()   { PASSED=$((PASSED + 1)); printf 'ok   %s\n' "$1"; }
fail() { FAILED=$((FAILED + 1)); printf 'FAIL %s\n' "$1"; [ -z "${2:-}" ] || printf '%s\n' "$2" | tail -n 20 | sed 's/^/     /'; }
# check NAME CMD...: run CMD, one pass/fail line; on failure the end of its output.
check() {
  local name=$1; shift
  if "$@" > "$W/out" 2>&1; then ok "$name"; else fail "$name" "$(cat "$W/out")"; return 1; fi
}
info() { printf '     %s\n' "$*"; }
die() { echo "kube-play-check: $*" >&2; summary; exit 1; }
summary() { echo "$PASSED passed, $FAILED failed ($(( $(date +%s) - START )) s)"; }
# wait_for SECONDS CMD...: retry CMD every 0.5 s until it succeeds.
wait_for() {
  local n=$(( $1 * 2 )); shift
  for _ in $(seq 1 "$n"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.5; done
  "$@"
}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# claim KIND NAME...: the pods and volumes a case is about to make must not exist yet (another
# run, or someone else's pods of the same name): nothing of theirs is replaced or removed.
claim() {
  local kind=$1 n taken=(); shift
  for n in "$@"; do podman "$kind" exists "$n" && taken+=("$n"); done
  [ ${#taken[@]} = 0 ] || { echo "podman ${kind}(s) already present, not ours to replace: ${taken[*]}"; return 1; }
  if [ "$kind" = pod ]; then PODS+=("$@"); else VOLUMES+=("$@"); fi
}
# The pods and volumes a case made go away with it (images stay cached).
teardown() {
  local p v
  for p in "${PODS[@]}"; do podman pod rm -f -t 0 "$p" >/dev/null 2>&1; done
  for v in "${VOLUMES[@]}"; do podman volume rm -f "$v" >/dev/null 2>&1; done
  PODS=() VOLUMES=()
}
cleanup() {
  teardown
  local p; for p in "${BG_PIDS[@]}"; do kill "$p" 2>/dev/null; done
  stop_sink
  [ -z "$ANCHOR" ] || podman rm -f -t 0 "$ANCHOR" >/dev/null 2>&1
  if [ "$KEEP" = 1 ]; then echo "work directory kept: $W"; else rm -rf "$W"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- tools, podman configuration ------------------------------------------------------
echo "== tools and images"
QUIET=1 WITH_PODMAN=1 scripts/install-deploy-tools.sh > "$W/tools" 2> "$W/install.log" \
  || { cat "$W/install.log"; die "installing the tools failed"; }
T=$(tail -n1 "$W/tools")
HELM="$T/bin/helm" KUBECTL="$T/bin/kubectl"
# (catatonit: podman builds the pause image of its pods from it)
for t in podman catatonit swaks smtp-sink openssl curl; do command -v "$t" >/dev/null || die "$t missing"; done
# the project's containers.conf: runc, pinned ulimits
export CONTAINERS_CONF="$ROOT/deploy/image/containers.conf"
echo "$(podman --version) / $("$HELM" version --short) / kubectl $("$KUBECTL" version --client 2>/dev/null | head -n1 | awk '{print $3}')"

# --- images -----------------------------------------------------------------------------
if [ "$BUILD" = 1 ]; then
  check "image $TAG (scripts/image-build.sh --prebuilt)" scripts/image-build.sh --prebuilt --binary "$BINARY" --tag "$TAG"
fi
podman image exists "$TAG" || die "no image $TAG"
build_postfix() {
  local ctx="$W/postfix-context"
  mkdir -p "$ctx/debs/partial"
  cp deploy/kube-play/postfix/Containerfile deploy/kube-play/postfix/entrypoint.sh "$ctx/"
  # the packages postfix needs on top of the base image, resolved against its dpkg status
  podman run --rm --network=none "$BASE" cat /var/lib/dpkg/status > "$ctx/status" || return 1
  apt-get install -y -qq --download-only --no-install-recommends -o Debug::NoLocking=1 \
    -o Dir::State::status="$ctx/status" -o Dir::Cache::archives="$ctx/debs" postfix || return 1
  rm -rf "$ctx/debs/partial" "$ctx/debs/lock"
  ls "$ctx"/debs/postfix_*.deb || return 1
  podman build --pull=never --network=none --build-arg BASE="$BASE" \
    --label org.proxsmtpd.kube-play.source="$POSTFIX_SRC" -t "$POSTFIX_IMAGE" "$ctx"
}
# rebuilt when its Containerfile, its entry point or the base image changes
POSTFIX_SRC=$({ podman image inspect -f '{{.Id}}' "$BASE" 2>/dev/null; cat deploy/kube-play/postfix/Containerfile deploy/kube-play/postfix/entrypoint.sh; } | sha256sum | cut -c1-16)
if [ "$(podman image inspect -f '{{index .Labels "org.proxsmtpd.kube-play.source"}}' "$POSTFIX_IMAGE" 2>/dev/null)" = "$POSTFIX_SRC" ]; then
  info "Postfix image $POSTFIX_IMAGE cached"
else
  check "Postfix image $POSTFIX_IMAGE (Debian postfix on the debootstrap base, offline build)" build_postfix
fi
podman image exists "$POSTFIX_IMAGE" || die "no image $POSTFIX_IMAGE"

# --- the sink Postfix relays to: smtp-sink on the podman bridge's host address ------------
GW=$(podman network inspect podman --format '{{range .Subnets}}{{.Gateway}}{{end}}')
[ -n "$GW" ] || die "no gateway of the podman network"
# CNI takes the bridge down with the last container on it: a container of our own holds it up
# while the script runs, so that the sink can listen on the bridge's address throughout.
ANCHOR=kube-play-check-bridge-$$
podman run -d --name "$ANCHOR" --network podman --read-only "$BASE" /bin/sleep infinity > /dev/null 2>&1 \
  || die "cannot start $ANCHOR on the podman network"
wait_for 10 bash -c "ip -4 -o addr show | grep -q ' $GW/'" > /dev/null || die "the podman bridge ($GW) is not up"
SINK_PORT=$(free_port)
mkdir -p "$W/sink"; chown postfix "$W/sink"
start_sink || die "smtp-sink on $GW:$SINK_PORT"
info "smtp-sink on $GW:$SINK_PORT (Postfix's relayhost)"

# --- helpers on played pods --------------------------------------------------------------
# prep ARGS...: prep.py with its report indented; the report also goes to $W/<case>.prep.
prep() { python3 "$PREP" "$@" > "$W/prep.out" 2>&1; local rc=$?; sed 's/^/     /' "$W/prep.out"; return $rc; }
meta() { python3 -c 'import json,sys; m=json.load(open(sys.argv[1])); exec(sys.argv[2])' "$@"; }
cstate() { podman inspect -f "$2" "$1" 2>/dev/null; }
pod_ip() { podman inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$(podman pod inspect -f '{{.InfraContainerID}}' "$1")"; }
# metric PORT 'name{k="v",...}': the sum of the series of that name carrying those labels
# (messages_total also has a source label), empty when there is none.
metric() {
  curl -s "http://127.0.0.1:$1/metrics" | awk -v m="$2" '
    BEGIN {
      name = m; sub(/\{.*/, "", name); labels = ""
      if (index(m, "{")) { labels = substr(m, index(m, "{") + 1); sub(/\}$/, "", labels) }
      n = split(labels, want, ",")
    }
    /^#/ { next }
    {
      series = $1; sname = series; sub(/\{.*/, "", sname)
      if (sname != name) next
      ok = 1
      for (i = 1; i <= n; i++) if (want[i] != "" && index(series, want[i]) == 0) ok = 0
      if (ok) { sum += $2; found = 1 }
    }
    END { if (found) print sum }'
}
metric_ge() { local v; v=$(metric "$1" "$2"); { [ -n "$v" ] && awk -v v="$v" -v n="$3" 'BEGIN {exit !(v >= n)}'; } || { echo "$2 = ${v:-absent}, expected >= $3"; return 1; }; }
# swaks_to PORT RCPT MARK [swaks args...]: one message, the transcript in $W/swaks-MARK.log
swaks_to() {
  local port=$1 rcpt=$2 mark=$3; shift 3
  swaks --server 127.0.0.1 --port "$port" --from sender@example.org --to "$rcpt" \
    --header "Subject: $mark" --body "$mark" --timeout 60 "$@" > "$W/swaks-$mark.log" 2>&1
}
# Every running container of POD, by name.
all_running() {
  local c
  for c in "$@"; do [ "$(cstate "$c" '{{.State.Running}}')" = true ] || { echo "$c: $(cstate "$c" '{{.State.Status}} exit={{.State.ExitCode}}')"; return 1; }; done
}
# A ConfigMap volume as the kubelet lays it out: the files in a timestamped directory,
# `..data` pointing at it and each key a symlink through `..data`. podman writes plain files
# and ignores defaultMode, which the files get here.
kubelet_layout() {
  local vol=$1 mode=$2 d ts f
  d=$(podman volume inspect -f '{{.Mountpoint}}' "$vol") || return 1
  [ -L "$d/..data" ] && return 0
  ts="..$(date -u +%Y_%m_%d_%H_%M_%S.%N)"
  mkdir -m 0755 "$d/$ts"
  for f in "$d"/*; do install -m "$mode" "$f" "$d/$ts/$(basename "$f")"; done
  ln -s "$ts" "$d/..data"
  for f in "$d/$ts"/*; do ln -s "..data/$(basename "$f")" "$d/.tmp-link"; mv -T "$d/.tmp-link" "$d/$(basename "$f")"; done
}
# kubelet_update VOLUME MODE KEY FILE: the kubelet's atomic update of one key: a new
# timestamped directory, a new `..data_tmp` symlink renamed over `..data`, the old one removed.
kubelet_update() {
  local vol=$1 mode=$2 key=$3 src=$4 d old ts
  d=$(podman volume inspect -f '{{.Mountpoint}}' "$vol") || return 1
  { old=$(readlink "$d/..data") && [ -n "$old" ] && [ -d "$d/$old" ]; } || { echo "$vol: no ..data layout"; return 1; }
  ts="..$(date -u +%Y_%m_%d_%H_%M_%S.%N)"
  cp -a "$d/$old" "$d/$ts"
  install -m "$mode" "$src" "$d/$ts/$key"
  ln -s "$ts" "$d/..data_tmp"
  mv -T "$d/..data_tmp" "$d/..data"
  rm -rf "${d:?}/$old"
}

# play_pods CASE FILE: podman kube play, the containers' names from the meta file.
play() { podman kube play "$2" > "$W/$1.play.log" 2>&1 || { grep -v 'systemd' "$W/$1.play.log"; return 1; }; }

# common_checks CASE POD PROXY SMTP_PORT ADMIN_PORT CONTAINERS...: what every case checks.
common_checks() {
  local case=$1 pod=$2 proxy=$3 smtp=$4 admin=$5; shift 5
  local names=() c
  for c in "$@"; do names+=("$pod-$c"); done
  check "[$case] pod $pod: containers $* running" wait_for 60 all_running "${names[@]}"
  check "[$case] /readyz answers 200" wait_for 30 bash -c "[ \"\$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:$admin/readyz)\" = 200 ]"
  check "[$case] /metrics has the message counters" bash -c \
    "curl -s http://127.0.0.1:$admin/metrics | grep -E '^proxsmtpd_messages_total\\{.*verdict=\"(accepted|rejected|dropped|tempfailed)\"' | tee /dev/stderr | [ \$(wc -l) -ge 4 ]"
  check "[$case] proxy runs as uid/gid 10025 ($(podman exec "$proxy" id 2>&1 | cut -c1-60))" \
    bash -c "[ \"\$(podman exec $proxy id -u):\$(podman exec $proxy id -g)\" = 10025:10025 ]"
  check "[$case] proxy root filesystem read-only (inspect + a write refused), no capability" bash -c "
    [ \"\$(podman inspect -f '{{.HostConfig.ReadonlyRootfs}}' $proxy)\" = true ] || { echo ReadonlyRootfs not true; exit 1; }
    ! podman exec $proxy sh -c 'echo x > /kube-play-probe' 2>/dev/null || { echo 'wrote to /'; exit 1; }
    podman exec $proxy grep -E '^Cap(Eff|Prm):' /proc/1/status | tee /dev/stderr | awk '\$2 != \"0000000000000000\" {exit 1}'"
  local mark="kp-$case-pass-$RANDOM"
  # Postfix may still be starting: retry the first message while the upstream is not ready
  check "[$case] a message through the proxy and its filter is taken (250)" \
    wait_for 30 swaks_to "$smtp" rcpt@example.net "$mark"
  check "[$case] ... and Postfix relays it to the sink" wait_for 30 in_sink "$mark"
  local rmark="kp-$case-reject-$RANDOM"
  if swaks_to "$smtp" reject@example.net "$rmark"; then
    fail "[$case] the filter's reject verdict reaches the client (550)" "$(tail -n 8 "$W/swaks-$rmark.log")"
  else
    check "[$case] the filter's reject verdict reaches the client (550)" grep -q '<\*\* *550 5.7.1 Rejected by policy' "$W/swaks-$rmark.log"
  fi
  local dmark=""
  if podman exec "$proxy" grep -q 'drop@' /etc/proxsmtpd/filters/check.sh 2>/dev/null; then
    dmark="kp-$case-drop-$RANDOM"
    check "[$case] the filter's drop verdict: 250 to the client" swaks_to "$smtp" drop@example.net "$dmark"
  fi
  # one more message through, so that anything wrongly relayed would be in the sink by now
  local lmark="kp-$case-last-$RANDOM"
  swaks_to "$smtp" rcpt@example.net "$lmark"; wait_for 30 in_sink "$lmark" >/dev/null
  # shellcheck disable=SC2016  # the single quotes are inside double quotes: the marks are expanded
  check "[$case] rejected${dmark:+ and dropped} messages never reach the sink" bash -c "! grep -rqs -e '$rmark' ${dmark:+-e '$dmark'} '$W/sink'"
  check "[$case] counters: accepted >= 2, rejected >= 1${dmark:+, dropped >= 1}" bash -c "
    $(declare -f metric metric_ge); metric_ge $admin 'proxsmtpd_messages_total{verdict=\"accepted\"}' 2 &&
    metric_ge $admin 'proxsmtpd_messages_total{verdict=\"rejected\"}' 1 ${dmark:+&& metric_ge $admin 'proxsmtpd_messages_total{verdict=\"dropped\"}' 1}"
}

# reload_check CASE POD PROXY SMTP ADMIN VOLUME MODE MAIL_CONTAINER: a filter change through
# the ConfigMap volume, picked up by the running proxy.
reload_check() {
  local case=$1 pod=$2 proxy=$3 smtp=$4 admin=$5 vol=$6 mode=$7 mail=$8
  local before started restarts mstarted key=check.sh lines
  before=$(metric "$admin" 'proxsmtpd_config_reloads_total{result="success"}')
  lines=$(podman logs "$proxy" 2>&1 | grep -c 'changed on disk')
  started=$(cstate "$proxy" '{{.State.StartedAt}}') restarts=$(cstate "$proxy" '{{.RestartCount}}')
  mstarted=$(cstate "$pod-$mail" '{{.State.StartedAt}}')
  cat > "$W/check.sh.new" <<'EOF'
#!/bin/sh
# changed by kube-play-check: blocked@ is refused as well
case "$RECIPIENTS" in
  *reject@*|*blocked@*) echo "550 5.7.1 Rejected by policy (reloaded)" >&2; exit 1 ;;
esac
exec cat
EOF
  check "[$case] filter ConfigMap updated the kubelet way (..data symlink swap in volume $vol)" \
    kubelet_update "$vol" "$mode" "$key" "$W/check.sh.new"
  check "[$case] reload counted: proxsmtpd_config_reloads_total{result=\"success\"} > ${before:-?}" \
    wait_for 20 bash -c "$(declare -f metric); [ \"\$(metric $admin 'proxsmtpd_config_reloads_total{result=\"success\"}')\" -gt ${before:-0} ]"
  check "[$case] log line: configuration or filter changed on disk, then configuration reloaded" bash -c \
    "podman logs $proxy 2>&1 | grep -A1 'changed on disk' | tail -n 2 | cut -c1-160; [ \$(podman logs $proxy 2>&1 | grep -c 'changed on disk') -gt $lines ]"
  local bmark="kp-$case-blocked-$RANDOM"
  swaks_to "$smtp" blocked@example.net "$bmark"
  check "[$case] the new filter applies (blocked@ gets 550 ... (reloaded))" grep -q '550 5.7.1 Rejected by policy (reloaded)' "$W/swaks-$bmark.log"
  check "[$case] no restart: proxy and $mail containers keep their start time, restart count ${restarts}" bash -c "
    [ \"\$(podman inspect -f '{{.State.StartedAt}}' $proxy)\" = '$started' ] && [ \"\$(podman inspect -f '{{.RestartCount}}' $proxy)\" = '$restarts' ] &&
    [ \"\$(podman inspect -f '{{.State.StartedAt}}' $pod-$mail)\" = '$mstarted' ]"
}

# queue_check CASE POD PODS_YAML SMTP CLAIM_VOLUME MAIL CONTAINERS...: a message queued while
# the sink is down survives the replacement of the pod, then is delivered.
queue_check() {
  local case=$1 pod=$2 yaml=$3 smtp=$4 claim=$5 mail=$6 grace=$7; shift 7
  local qmark="kp-$case-queued-$RANDOM"
  stop_sink
  check "[$case] sink down: Postfix takes a message (250) and keeps it queued" bash -c "
    $(declare -f swaks_to); W='$W'; swaks_to $smtp queued@example.net $qmark || { tail -n 5 \$W/swaks-$qmark.log; exit 1; }
    for _ in \$(seq 1 40); do podman exec $pod-$mail postqueue -p | grep -q queued@example.net && exit 0; sleep 0.5; done
    podman exec $pod-$mail postqueue -p; exit 1"
  local old_id; old_id=$(podman pod inspect -f '{{.ID}}' "$pod")
  podman pod stop -t "$grace" "$pod" >/dev/null 2>&1
  podman kube down "$yaml" > "$W/$case.down.log" 2>&1
  check "[$case] pod replaced: kube down, claim volume $claim kept, kube play again" bash -c "
    podman volume exists $claim && ! podman pod exists $old_id 2>/dev/null && podman kube play '$yaml' > '$W/$case.replay.log' 2>&1 && podman pod exists $pod"
  local names=() c; for c in "$@"; do names+=("$pod-$c"); done
  wait_for 60 all_running "${names[@]}" >/dev/null
  check "[$case] the queued message is still in the new pod's queue" \
    wait_for 30 bash -c "podman exec $pod-$mail postqueue -p | grep -q queued@example.net"
  start_sink
  podman exec "$pod-$mail" postqueue -f >/dev/null 2>&1
  check "[$case] ... and is delivered once the sink is back" wait_for 60 in_sink "$qmark"
}

# drain_check CASE POD PROXY SMTP GRACE: an idle session open, SIGTERM as the kubelet sends it
# (podman pod stop -t terminationGracePeriodSeconds): 421 for the session, exit 0.
drain_check() {
  local case=$1 pod=$2 proxy=$3 smtp=$4 grace=$5
  python3 - "$smtp" > "$W/$case.session" 2>&1 <<'EOF' &
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=120)
f = s.makefile("rb")
print(f.readline().decode().strip(), flush=True)
s.sendall(b"EHLO drain.kube-play.invalid\r\n")
while True:
    line = f.readline().decode().strip()
    print(line, flush=True)
    if line[3:4] != "-":
        break
print("IDLE", flush=True)
print("AFTER:", f.readline().decode().strip(), flush=True)
EOF
  local spid=$!; BG_PIDS+=("$spid")
  wait_for 20 grep -q IDLE "$W/$case.session" >/dev/null
  podman pod stop -t "$grace" "$pod" > "$W/$case.stop.log" 2>&1
  wait "$spid" 2>/dev/null
  check "[$case] SIGTERM (pod stop -t $grace): the open idle session gets 421" grep -q '^AFTER: 421' "$W/$case.session"
  # the stopped containers are still there (kube down, which removes them, comes next)
  check "[$case] the proxy drained and exited 0 (its log line, its exit code)" bash -c "
    podman logs $proxy 2>&1 | grep -q 'shutting down: draining sessions' || { echo 'no drain log line'; exit 1; }
    state=\$(podman inspect -f '{{.State.Status}} {{.State.ExitCode}}' $proxy); echo \"\$state\"; [ \"\$state\" = 'exited 0' ]"
}

# --- cases -----------------------------------------------------------------------------
case_sidecar() {
  local c=sidecar smtp admin
  smtp=$(free_port) admin=$(free_port)
  echo "== sidecar: helm template -f $CHART/ci/sidecar-native-postfix.yaml"
  check "[$c] helm template" bash -c "'$HELM' template mail $CHART -n mail -f $CHART/ci/sidecar-native-postfix.yaml > '$W/$c.rendered.yaml'" || return
  prep "$W/$c.rendered.yaml" "$W/$c.pods.yaml" --claims "$W/$c.claims.yaml" --meta "$W/$c.meta.json" \
    --test-pod "$W/$c.test.yaml" --publish smtp="$smtp" --publish admin="$admin" \
    --image docker.io/boky/postfix:v4.5.0="$POSTFIX_IMAGE" \
    --env "postfix:RELAYHOST=[$GW]:$SINK_PORT" --env postfix:POSTFIX_minimal_backoff_time=5s \
    --env postfix:POSTFIX_maximal_backoff_time=10s --env postfix:POSTFIX_queue_run_delay=5s \
    || { fail "[$c] prep.py"; return; }
  play_case "$c" "$smtp" "$admin" proxsmtpd postfix
}

case_kustomize() {
  local c=kustomize smtp admin
  smtp=$(free_port) admin=$(free_port)
  echo "== kustomize: kubectl kustomize k8s/examples/postfix-sidecar"
  check "[$c] kubectl kustomize" bash -c "'$KUBECTL' kustomize k8s/examples/postfix-sidecar > '$W/$c.rendered.yaml'" || return
  # the Secret postfix-tls that cert-manager would write: a self-signed certificate
  mkdir -p "$W/postfix-tls"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj /CN=mail.example.org -keyout "$W/postfix-tls/tls.key" -out "$W/postfix-tls/tls.crt" >/dev/null 2>&1
  chmod 0444 "$W/postfix-tls/tls.key" "$W/postfix-tls/tls.crt"; chmod 0755 "$W/postfix-tls"
  info "Secret postfix-tls: a self-signed certificate for mail.example.org (what tls-certificate.yaml would make)"
  prep "$W/$c.rendered.yaml" "$W/$c.pods.yaml" --claims "$W/$c.claims.yaml" --meta "$W/$c.meta.json" \
    --publish smtp="$smtp" --publish admin="$admin" --secret-dir postfix-tls="$W/postfix-tls" \
    --image docker.io/boky/postfix:v4.5.0="$POSTFIX_IMAGE" \
    --env "postfix:RELAYHOST=[$GW]:$SINK_PORT" --env postfix:POSTFIX_minimal_backoff_time=5s \
    --env postfix:POSTFIX_maximal_backoff_time=10s --env postfix:POSTFIX_queue_run_delay=5s \
    || { fail "[$c] prep.py"; return; }
  play_case "$c" "$smtp" "$admin" proxsmtpd postfix
}

case_standalone() {
  local c=standalone smtp admin ip
  smtp=$(free_port) admin=$(free_port)
  echo "== standalone: helm template -f $CHART/ci/standalone-minimal.yaml, Postfix in a pod of its own"
  check "[$c] helm template" bash -c "'$HELM' template edge $CHART -n mail -f $CHART/ci/standalone-minimal.yaml > '$W/$c.rendered.yaml'" || return
  prep deploy/kube-play/postfix-upstream.yaml "$W/$c.upstream.yaml" --meta "$W/$c.upstream.meta.json" \
    --env "postfix:RELAYHOST=[$GW]:$SINK_PORT" || { fail "[$c] prep.py (upstream)"; return; }
  check "[$c] pod name postfix free" claim pod postfix || return
  check "[$c] Postfix upstream pod played" play "$c-upstream" "$W/$c.upstream.yaml" || return
  check "[$c] Postfix upstream pod running" wait_for 30 all_running postfix-postfix
  ip=$(pod_ip postfix)
  prep "$W/$c.rendered.yaml" "$W/$c.pods.yaml" --claims "$W/$c.claims.yaml" --meta "$W/$c.meta.json" \
    --test-pod "$W/$c.test.yaml" --publish smtp="$smtp" --publish admin="$admin" \
    --host-alias postfix.mail.svc.cluster.local="$ip" || { fail "[$c] prep.py"; return; }
  play_case "$c" "$smtp" "$admin" proxsmtpd
}

# play_case CASE SMTP ADMIN PROXY_CONTAINER [MAIL_CONTAINER]: play, check, tear down.
play_case() {
  local c=$1 smtp=$2 admin=$3 pc=$4 mail=${5:-} pod containers grace v
  pod=$(meta "$W/$c.meta.json" 'print([p["pod"] for p in m["pods"] if not p["test"]][0])')
  read -r -a containers <<< "$(meta "$W/$c.meta.json" 'print(" ".join([p["containers"] for p in m["pods"] if not p["test"]][0]))')"
  grace=$(meta "$W/$c.meta.json" 'print([p["grace"] for p in m["pods"] if not p["test"]][0])')
  mapfile -t v < <(meta "$W/$c.meta.json" 'print("\n".join(m["volumes"]))')
  check "[$c] pod and volume names free ($pod ${v[*]})" bash -c "$(declare -f claim); PODS=() VOLUMES=(); claim pod $pod && claim volume ${v[*]}" || return
  PODS+=("$pod"); VOLUMES+=("${v[@]}")
  if [ -s "$W/$c.claims.yaml" ] && grep -q kind "$W/$c.claims.yaml"; then
    check "[$c] claims played ($(grep -c "^kind: PersistentVolumeClaim" "$W/$c.claims.yaml") PersistentVolumeClaim; the case's podman volumes: $(meta "$W/$c.meta.json" 'print(" ".join(m["volumes"]))'))" play "$c-claims" "$W/$c.claims.yaml"
  fi
  check "[$c] podman kube play" play "$c" "$W/$c.pods.yaml" || return
  # ConfigMap volumes laid out as the kubelet does (files through ..data, defaultMode)
  while read -r vol mode; do
    [ -n "$vol" ] || continue
    check "[$c] ConfigMap volume $vol in the kubelet layout (..data symlink, mode $mode)" kubelet_layout "$vol" "$mode"
  done < <(meta "$W/$c.meta.json" 'print("\n".join(cm["volume"] + " " + cm["mode"] for p in m["pods"] if not p["test"] for cm in p["configmaps"]))')
  sleep 3   # the reload the new layout causes is over before the counters are read
  local proxy="$pod-$pc"
  common_checks "$c" "$pod" "$proxy" "$smtp" "$admin" "${containers[@]}"
  if [ "$c" = kustomize ]; then
    local tmark="kp-$c-tls-$RANDOM"
    check "[$c] STARTTLS with the certificate of the Secret, message relayed" bash -c "
      $(declare -f swaks_to); W='$W'; swaks_to $smtp rcpt@example.net $tmark --tls && grep -q 'TLS started' \$W/swaks-$tmark.log"
  fi
  if [ -n "$mail" ]; then
    local fvol; fvol=$(meta "$W/$c.meta.json" 'print([cm["volume"]+" "+cm["mode"] for p in m["pods"] for cm in p["configmaps"] if "filters" in cm["volume"]][0])')
    # shellcheck disable=SC2086  # "VOLUME MODE": two arguments
    reload_check "$c" "$pod" "$proxy" "$smtp" "$admin" ${fvol} "$mail"
    local claim; claim=$(python3 -c 'import sys,yaml; print([d["metadata"]["name"] for d in yaml.safe_load_all(open(sys.argv[1])) if d][0])' "$W/$c.claims.yaml" 2>/dev/null)
    if [ -n "$claim" ]; then
      queue_check "$c" "$pod" "$W/$c.pods.yaml" "$smtp" "$claim" "$mail" "$grace" "${containers[@]}"
      check "[$c] /readyz 200 after the replacement" wait_for 30 bash -c "[ \"\$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:$admin/readyz)\" = 200 ]"
    else
      fail "[$c] the persistent queue: no claim rendered"
    fi
  fi
  if [ -s "$W/$c.test.yaml" ] && grep -q kind "$W/$c.test.yaml"; then helm_test "$c" "$pod"; fi
  drain_check "$c" "$pod" "$proxy" "$smtp" "$grace"
  podman kube down "$W/$c.pods.yaml" > "$W/$c.down.log" 2>&1
  [ "$c" = standalone ] && podman kube down "$W/$c.upstream.yaml" >/dev/null 2>&1
  teardown
  check "[$c] cleaned up: no pod, no volume left" bash -c "
    for p in $pod postfix; do [ $c != standalone ] && [ \$p = postfix ] && continue; ! podman pod exists \$p || { echo pod \$p; exit 1; }; done
    for x in ${v[*]}; do ! podman volume exists \$x || { echo volume \$x; exit 1; }; done"
}

# helm_test CASE POD: the chart's `helm test` pod, its Service name resolved to the proxy pod
# (hostAliases) and the Service port to the container port (no Service proxy under podman).
helm_test() {
  local c=$1 pod=$2 ip test name
  ip=$(pod_ip "$pod")
  name=$(python3 -c 'import sys,yaml; d=[d for d in yaml.safe_load_all(open(sys.argv[1])) if d][0]; print([e["value"] for e in d["spec"]["containers"][0]["env"] if e["name"]=="SMTP_HOST"][0])' "$W/$c.test.yaml")
  prep "$W/$c.rendered.yaml" "$W/$c.unused.yaml" --test-pod "$W/$c.test-play.yaml" \
    --host-alias "$name=$ip" --env smtp:SMTP_PORT=10025 > /dev/null
  sed -n '/Pod\/.*test/p' "$W/prep.out" | sed 's/^/     /'
  test=$(python3 -c 'import sys,yaml; print([d for d in yaml.safe_load_all(open(sys.argv[1])) if d][0]["metadata"]["name"])' "$W/$c.test-play.yaml")
  check "[$c] pod name $test free" claim pod "$test" || return
  check "[$c] helm test pod $test played" play "$c-test" "$W/$c.test-play.yaml" || return
  check "[$c] helm test pod: PASS, exit 0" bash -c "
    for _ in \$(seq 1 60); do [ \"\$(podman inspect -f '{{.State.Status}}' $test-smtp)\" = exited ] && break; sleep 0.5; done
    podman logs $test-smtp 2>&1 | tail -n 3; [ \"\$(podman inspect -f '{{.State.ExitCode}}' $test-smtp)\" = 0 ] && podman logs $test-smtp 2>&1 | grep -q '^PASS'"
  podman pod rm -f -t 0 "$test" >/dev/null 2>&1
}

for c in "${CASES[@]}"; do
  case "$c" in
    sidecar) case_sidecar ;;
    standalone) case_standalone ;;
    kustomize) case_kustomize ;;
    *) fail "unknown case $c" ;;
  esac
  teardown
done

summary
[ "$FAILED" = 0 ]
