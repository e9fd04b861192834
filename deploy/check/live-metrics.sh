#!/usr/bin/env bash
# live-metrics.sh - a real Prometheus scrapes proxsmtpd under scripted traffic; then every
# dashboard query and alert rule is evaluated through the Prometheus HTTP API.
#
# Usage: deploy/check/live-metrics.sh [PROXSMTPD_BINARY]   (default target/release/proxsmtpd)
# Upstream smtp-sink <- proxsmtpd (AdminListen, test-filter.sh) <- smtp-source/swaks:
# accepted mail of three sizes, rejected, dropped and temp-failed mail, filter timeouts,
# upstream errors (the sink stopped for a moment), connections refused at MaxConnections,
# config reloads (SIGHUP, good and bad config); with openssl on the host also TLS: STARTTLS
# and implicit-TLS mail (TLS 1.3 and 1.2, Python's ssl client), a failed handshake,
# certificate reloads through a Secret-like `..data` symlink swap (a good pair, a broken
# one, the good one again). Every message also goes through two milters: rspamd (Debian;
# the configuration of k8s/examples/rspamd-milter, its proxy worker in milter mode, with
# thresholds no test message reaches) and one on a port nothing listens on
# (default_action=accept: connect errors, the mail flows on); and through three HTTP hooks:
# a loopback hook service (python3 http.server) asked at MAIL and at the data stage, which
# accepts all but the messages to hookreject@ (rejected at the data stage); one on a port
# nothing listens on (default_action=accept: connect errors, failed calls); and a shadow
# hook on the same service that rejects every message over 10 kB, so that it disagrees
# with the live chain on some messages (live accept, shadow reject) and agrees on others.
# Prometheus (Debian prometheus) scrapes every second with the target labels a Kubernetes
# ServiceMonitor gives (namespace, pod) and loads deploy/alerts/*.rules.yaml.
# Checks: `promtool check metrics` on the exposition, then deploy/check/promql_check.py; and
# promql_check.py must fail on a dashboard and a rule that name a metric the binary does not
# export.
# Env: DEPLOY_TOOLS_DIR (tools cache, for the venv python with PyYAML).
set -euo pipefail
exec </dev/null   # nothing below may wait for a terminal
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
BINARY=${1:-$ROOT/target/release/proxsmtpd}
TOOLS=${DEPLOY_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/proxsmtpd-deploy-tools}
PY="$TOOLS/venv/bin/python"; [ -x "$PY" ] || PY=python3

W=$(mktemp -d /tmp/proxsmtpd-live.XXXXXX)
PIDS=()
# shellcheck disable=SC2317,SC2329  # called by the EXIT trap
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$W"
}
trap cleanup EXIT
say() { printf '%s\n' "$*"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() {   # wait_http URL SECONDS: until it answers 200
  local i
  for ((i = 0; i < $2 * 10; i++)); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "$1" 2>/dev/null)" = 200 ] && return 0
    sleep 0.1
  done
  return 1
}

ADMIN=$(free_port) PROM=$(free_port) SMTP=$(free_port) SINK=$(free_port) SMTPS=$(free_port)
RSPAMD=$(free_port) RSPAMD_NORMAL=$(free_port) RSPAMD_CONTROLLER=$(free_port) MILTER_DOWN=$(free_port)
HOOK=$(free_port) HOOK_DOWN=$(free_port)
TLS=0; command -v openssl >/dev/null && TLS=1

# tls_version NAME [CERT-CONTENT]: a certificate pair in $W/tls/NAME (self-signed for
# localhost; with CERT-CONTENT, that text instead of the certificate), made current the way
# the kubelet updates a Secret volume: the `..data` symlink swapped in one rename.
tls_version() {
  local dir="$W/tls/$1"
  mkdir -p "$dir"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=localhost \
    -keyout "$dir/tls.key" -out "$dir/tls.crt" 2>> "$W/openssl.log"
  [ -z "${2:-}" ] || printf '%s\n' "$2" > "$dir/tls.crt"
  tls_current "$1"
  [ -L "$W/tls/tls.crt" ] || ln -s ..data/tls.crt "$W/tls/tls.crt"
  [ -L "$W/tls/tls.key" ] || ln -s ..data/tls.key "$W/tls/tls.key"
}
tls_current() { ln -sfn "$1" "$W/tls/..data_tmp" && mv -T "$W/tls/..data_tmp" "$W/tls/..data"; }

# --- the metrics source -------------------------------------------------------------------
start_sink() {
  smtp-sink -u postfix "127.0.0.1:$SINK" 128 >> "$W/sink.log" 2>&1 &
  SINK_PID=$!; PIDS+=("$SINK_PID")
  for _ in $(seq 1 50); do (exec 3<>"/dev/tcp/127.0.0.1/$SINK") 2>/dev/null && return 0; sleep 0.1; done
  say "FAIL smtp-sink did not start"; return 1
}

# rspamd on loopback, in $W/rspamd: the example's local.d with this run's ports; its other
# workers moved off their fixed ports (another rspamd may hold them)
start_rspamd() {
  local d="$W/rspamd" i
  mkdir -p "$d/local.d" "$d/db" "$d/run"
  cp "$ROOT"/k8s/examples/rspamd-milter/rspamd/* "$d/local.d/"
  sed -i "s/127.0.0.1:11332/127.0.0.1:$RSPAMD/" "$d/local.d/worker-proxy.inc"
  printf 'bind_socket = "127.0.0.1:%s";\n' "$RSPAMD_NORMAL" > "$d/local.d/worker-normal.inc"
  printf 'bind_socket = "127.0.0.1:%s";\n' "$RSPAMD_CONTROLLER" > "$d/local.d/worker-controller.inc"
  printf 'reject = 1000;\nadd_header = 999;\ngreylist = 998;\nrewrite_subject = 997;\n' > "$d/local.d/actions.conf"
  (cd "$d" && exec rspamd -f -i -u "$(id -un)" -g "$(id -gn)" --var "LOCAL_CONFDIR=$d" --var "DBDIR=$d/db" \
     --var "RUNDIR=$d/run" --var "LOGDIR=$d") > "$W/rspamd.log" 2>&1 &
  PIDS+=("$!")
  # loading its rules takes rspamd a while on a busy machine
  for ((i = 0; i < 900; i++)); do (exec 3<>"/dev/tcp/127.0.0.1/$RSPAMD") 2>/dev/null && return 0; sleep 0.1; done
  say "FAIL rspamd did not listen on 127.0.0.1:$RSPAMD within 90 s"; tail -n 10 "$W/rspamd.log" | sed 's/^/     /'; return 1
}
# the HTTP hook service (Stalwart MTA Hooks JSON): /live rejects the messages to
# hookreject@ at the data stage, /shadow rejects every message over 10 kB; anything else is
# accepted. Requests may come chunked (large messages are streamed).
start_hook() {
  python3 - "$HOOK" > "$W/hook.log" 2>&1 <<'PY' &
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Hook(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            data = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def do_POST(self):
        request = json.loads(self.body())
        stage = request["context"]["stage"]
        to = [r["address"] for r in request["envelope"]["to"]]
        size = (request.get("message") or {}).get("size", 0)
        action = "accept"
        if self.path == "/live" and stage == "data" and any(a.startswith("hookreject@") for a in to):
            action = "reject"
        if self.path == "/shadow" and size > 10000:
            action = "reject"
        answer = {"action": action}
        if action == "reject":
            answer["response"] = {"status": 550, "enhancedStatus": "5.7.1", "message": "Rejected by the test hook"}
        out = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass

ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Hook).serve_forever()
PY
  PIDS+=("$!")
  for _ in $(seq 1 50); do (exec 3<>"/dev/tcp/127.0.0.1/$HOOK") 2>/dev/null && return 0; sleep 0.1; done
  say "FAIL the hook service did not start"; tail -n 10 "$W/hook.log" | sed 's/^/     /'; return 1
}
command -v rspamd > /dev/null || { say "FAIL no rspamd (Debian rspamd; scripts/install-deploy-tools.sh)"; exit 1; }
start_rspamd || exit 1
start_hook || exit 1
[ -x "$BINARY" ] || { say "FAIL no proxsmtpd binary at $BINARY (cargo build --release)"; exit 1; }
mkdir -p "$W/spool"
cat > "$W/proxsmtpd.conf" <<EOF
Listen: 127.0.0.1:$SMTP
OutAddress: 127.0.0.1:$SINK
AdminListen: 127.0.0.1:$ADMIN
TempDirectory: $W/spool
FilterCommand: $HERE/test-filter.sh
FilterTimeout: 1
MaxConnections: 4
TimeOut: 10
DrainTimeout: 5
Milters: inet:127.0.0.1:$RSPAMD{name=rspamd, default_action=accept}, inet:127.0.0.1:$MILTER_DOWN{name=down, connect_timeout=1, default_action=accept}
MilterQuarantineDirectory: $W/quarantine
Hooks: http://127.0.0.1:$HOOK/live{name=policy, stages=mail+data, timeout=5s}, http://127.0.0.1:$HOOK_DOWN/check{name=down, timeout=1s, default_action=accept}, http://127.0.0.1:$HOOK/shadow{name=classifier, timeout=5s, shadow=yes}
EOF
if [ "$TLS" = 1 ]; then
  tls_version v1
  printf 'TlsCertificate: %s\nTlsKey: %s\nTlsListen: 127.0.0.1:%s\n' \
    "$W/tls/tls.crt" "$W/tls/tls.key" "$SMTPS" >> "$W/proxsmtpd.conf"
else
  say "note: no openssl on this host: no TLS traffic (the TLS series stay at 0)"
fi
start_sink
# PROXSMTPD_* variables of the caller would override the config file: drop them
unset_args=(); for v in $(compgen -e | grep '^PROXSMTPD_' || true); do unset_args+=(-u "$v"); done
env "${unset_args[@]}" "$BINARY" -d 2 -f "$W/proxsmtpd.conf" > "$W/proxsmtpd.log" 2>&1 &
PROXY_PID=$!; PIDS+=("$PROXY_PID")
if ! wait_http "http://127.0.0.1:$ADMIN/readyz" 10; then
  say "FAIL $BINARY did not answer 200 on /readyz (AdminListen 127.0.0.1:$ADMIN) within 10 s;"
  say "     its log:"
  tail -n 15 "$W/proxsmtpd.log" | sed 's/^/     /'
  exit 1
fi
wait_http "http://127.0.0.1:$ADMIN/metrics" 5 || { say "FAIL no /metrics on the admin server"; exit 1; }

# --- Prometheus -------------------------------------------------------------------------
mkdir -p "$W/rules"
cp "$ROOT"/deploy/alerts/*.yaml "$W/rules/"
cat > "$W/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - $W/rules/*.yaml
scrape_configs:
  - job_name: proxsmtpd
    static_configs:
      - targets: ["127.0.0.1:$ADMIN"]
        labels:
          namespace: proxsmtpd-check
          pod: proxsmtpd-check-0
EOF
prometheus --config.file="$W/prometheus.yml" --storage.tsdb.path="$W/tsdb" \
  --web.listen-address="127.0.0.1:$PROM" --log.level=warn > "$W/prometheus.log" 2>&1 &
PIDS+=("$!")
wait_http "http://127.0.0.1:$PROM/-/ready" 20 || { say "FAIL prometheus did not start"; tail -n 20 "$W/prometheus.log"; exit 1; }
START=$(date +%s)
# two scrapes before any traffic, so that rates and increases see every change
for _ in $(seq 1 100); do
  n=$(curl -s "http://127.0.0.1:$PROM/api/v1/query" --data-urlencode 'query=count_over_time(up[1m])' \
      | python3 -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; print(r[0]["value"][1] if r else 0)' 2>/dev/null || echo 0)
  [ "${n%.*}" -ge 2 ] 2>/dev/null && break
  sleep 0.2
done

# --- traffic ----------------------------------------------------------------------------
swaks_to() {   # swaks_to RCPT [more swaks args]: one message, any reply is fine
  swaks --silent 2 --server 127.0.0.1 --port "$SMTP" --from sender@example.org --to "$1" \
    --timeout 15 "${@:2}" >> "$W/swaks.log" 2>&1 || true
}
say "traffic: accepted mail of 3 sizes, rejected (by the filter and by the hook), dropped, temp-failed, filter timeouts"
for len in 800 20000 300000; do
  smtp-source -s 2 -m 20 -l "$len" -f sender@example.org -t ok@example.net "127.0.0.1:$SMTP" \
    >> "$W/source.log" 2>&1 || say "note: smtp-source -l $len: $(tail -n 1 "$W/source.log")"
done
for _ in $(seq 1 12); do swaks_to reject@example.net; done
for _ in $(seq 1 4); do swaks_to hookreject@example.net; done
for _ in $(seq 1 4); do swaks_to drop@example.net; swaks_to tempfail@example.net; done
swaks_to slow@example.net & s1=$!
swaks_to slow@example.net & s2=$!
wait "$s1" "$s2"
say "traffic: upstream stopped for a moment (upstream errors)"
kill "$SINK_PID"; wait "$SINK_PID" 2>/dev/null || true
for _ in $(seq 1 3); do swaks_to ok@example.net; done
start_sink
say "traffic: MaxConnections reached (refused connections)"
python3 - "$SMTP" <<'EOF'
import socket, sys, time
held = []
for _ in range(7):
  s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5)
  held.append(s)
time.sleep(1.5)
for s in held:
  s.close()
EOF
if [ "$TLS" = 1 ]; then
  say "traffic: TLS (STARTTLS and implicit TLS, 1.3 and 1.2), a failed handshake, certificate reloads"
  python3 - "$SMTP" "$SMTPS" > "$W/tls-traffic.log" 2>&1 <<'EOF' || say "note: TLS traffic: $(tail -n 1 "$W/tls-traffic.log")"
import smtplib, socket, ssl, sys
smtp, smtps = int(sys.argv[1]), int(sys.argv[2])
msg = "From: sender@example.org\r\nTo: ok@example.net\r\nSubject: over TLS\r\n\r\nEncrypted.\r\n"
def context(version):
  ctx = ssl.create_default_context()
  ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE   # self-signed, made here
  ctx.minimum_version = ctx.maximum_version = version
  return ctx
failed = 0
for version, n in ((ssl.TLSVersion.TLSv1_3, 4), (ssl.TLSVersion.TLSv1_2, 2)):
  for _ in range(n):
      try:
          with smtplib.SMTP("127.0.0.1", smtp, timeout=15) as s:
              s.starttls(context=context(version))
              s.sendmail("sender@example.org", ["ok@example.net"], msg)
          with smtplib.SMTP_SSL("127.0.0.1", smtps, timeout=15, context=context(version)) as s:
              s.sendmail("sender@example.org", ["ok@example.net"], msg)
      except (OSError, smtplib.SMTPException) as e:
          failed += 1
          print(f"TLS session failed: {e!r}")
# a client that speaks SMTP on the implicit-TLS port: a failed handshake
with socket.create_connection(("127.0.0.1", smtps), timeout=5) as s:
  s.sendall(b"EHLO plain.example\r\n")
  try:
      s.recv(1024)
  except OSError:
      pass
sys.exit(1 if failed else 0)
EOF
  tls_version v2; sleep 3                                 # a renewed certificate
  tls_version v3 "-----BEGIN CERTIFICATE-----"; sleep 3   # a broken one: refused
  tls_current v2; sleep 3                                 # the good one again
fi
say "traffic: config reloads (SIGHUP with a good and with a broken config)"
kill -HUP "$PROXY_PID"; sleep 1
cp "$W/proxsmtpd.conf" "$W/proxsmtpd.conf.good"
echo "NoSuchSetting: 1" >> "$W/proxsmtpd.conf"
kill -HUP "$PROXY_PID"; sleep 1
cp "$W/proxsmtpd.conf.good" "$W/proxsmtpd.conf"
kill -HUP "$PROXY_PID"
for _ in $(seq 1 10); do swaks_to ok@example.net; done
kill -0 "$PROXY_PID" 2>/dev/null || { say "FAIL proxsmtpd died during the traffic"; tail -n 20 "$W/proxsmtpd.log"; exit 1; }
sleep 3   # the last scrapes and rule evaluations
END=$(date +%s)

# --- checks -----------------------------------------------------------------------------
status=0
curl -s "http://127.0.0.1:$ADMIN/metrics" > "$W/exposition.txt"
say "counters at the end: $(grep -E '^proxsmtpd_(messages_total|filter_timeouts_total|connections_refused_total|upstream_errors_total|config_reloads_total|tls_[a-z_]+_total|milter_replies_total\{[^}]*stage="eom"|milter_errors_total|hook_replies_total|hook_errors_total|shadow_verdicts_total)' "$W/exposition.txt" \
  | grep -v ' 0$' | sed -E 's/^proxsmtpd_//; s/_total//' | tr '\n' ' ')"
if promtool check metrics < "$W/exposition.txt" > "$W/promtool.txt" 2>&1; then
  say "PASS promtool check metrics on the /metrics exposition ($(grep -c '^proxsmtpd_' "$W/exposition.txt") samples)"
else
  say "FAIL promtool check metrics:"; sed 's/^/     /' "$W/promtool.txt"; status=1
fi
dash_args=(); for d in "$ROOT"/dashboards/*.json; do dash_args+=(--dashboard "$d"); done
rule_args=(); for r in "$ROOT"/deploy/alerts/*.yaml; do rule_args+=(--rules "$r"); done
"$PY" "$HERE/promql_check.py" --url "http://127.0.0.1:$PROM" --start "$START" --end "$END" \
  --rate-interval 1m "${dash_args[@]}" "${rule_args[@]}" || status=1
# the same check on a dashboard and a rule naming a metric the binary does not export: it must fail
sed 's/proxsmtpd_messages_total/proxsmtpd_messages_lost_total/g' "$ROOT/dashboards/proxsmtpd.json" > "$W/unknown-metric.json"
sed '0,/proxsmtpd_[a-z_]*_total/s//proxsmtpd_no_such_total/' "${rule_args[1]}" > "$W/unknown-metric.yaml"
for bad in "--dashboard $W/unknown-metric.json proxsmtpd_messages_lost_total" "--rules $W/unknown-metric.yaml proxsmtpd_no_such_total"; do
  read -r opt file metric <<< "$bad"
  what=${opt#--}; what=${what%s}
  if "$PY" "$HERE/promql_check.py" --url "http://127.0.0.1:$PROM" --start "$START" --end "$END" \
       --rate-interval 1m "$opt" "$file" > "$W/unknown.txt" 2>&1; then
    say "FAIL promql_check.py accepted a $what naming $metric, which the binary does not export"; status=1
  elif grep -q "^FAIL .*$metric" "$W/unknown.txt"; then
    say "PASS promql_check.py refuses a $what naming $metric, which the binary does not export"
  else
    say "FAIL promql_check.py failed on a $what naming $metric, but not for that metric:"
    sed 's/^/     /' "$W/unknown.txt" | tail -n 10; status=1
  fi
done
exit $status
