#!/usr/bin/env bash
# conf-accepted.sh - the proxsmtpd binary starts with the proxsmtpd.conf of a rendered manifest.
#
# Usage: deploy/check/conf-accepted.sh BINARY RENDERED.yaml [PYTHON]
# Takes the proxsmtpd.conf key of the rendered ConfigMaps, moves what names the pod's world to
# this host (Listen, AdminListen and OutAddress on free loopback ports, TempDirectory and
# MilterQuarantineDirectory into a temporary directory; the hooks' Secrets mounted at
# /etc/proxsmtpd/hook-tls and /etc/proxsmtpd/hook-token replaced by a throwaway CA, client
# certificate, key and token made here), starts the binary with it and requires /livez
# within 10 s: every other setting (Milters, Hooks and their options included) is parsed by
# the real binary. Prints the /readyz?verbose answer and the milter and hook labels of
# /metrics. Exit status 1 if the binary refuses the configuration.
set -euo pipefail
exec </dev/null
BINARY=$1 RENDERED=$2 PY=${3:-python3}
W=$(mktemp -d /tmp/proxsmtpd-conf.XXXXXX)
PID=
# shellcheck disable=SC2317,SC2329  # called by the EXIT trap
cleanup() {
  if [ -n "$PID" ]; then kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; fi
  rm -rf "$W"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
"$PY" -c '
import sys, yaml
confs = [d["data"]["proxsmtpd.conf"] for d in yaml.safe_load_all(open(sys.argv[1]))
         if isinstance(d, dict) and d.get("kind") == "ConfigMap" and "proxsmtpd.conf" in (d.get("data") or {})]
if len(confs) != 1:
    sys.exit(f"{len(confs)} proxsmtpd.conf in {sys.argv[1]}")
sys.stdout.write(confs[0])' "$RENDERED" > "$W/rendered.conf"
ADMIN=$(free_port)
mkdir -p "$W/spool" "$W/quarantine" "$W/hook-tls" "$W/hook-token"
# what the hooks' Secrets would hold: the CA (ca.crt) and a client certificate it signed
# (tls.crt, tls.key), and a token
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=hook-ca \
  -keyout "$W/hook-tls/ca.key" -out "$W/hook-tls/ca.crt" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=proxsmtpd \
  -keyout "$W/hook-tls/tls.key" -out "$W/hook-tls/tls.csr" 2>/dev/null
# with extensions, so that it is an X.509 v3 certificate (OpenSSL 3.0 makes a v1 one
# without, which rustls refuses)
printf 'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n' > "$W/hook-tls/client.ext"
openssl x509 -req -in "$W/hook-tls/tls.csr" -CA "$W/hook-tls/ca.crt" -CAkey "$W/hook-tls/ca.key" \
  -CAcreateserial -days 2 -extfile "$W/hook-tls/client.ext" -out "$W/hook-tls/tls.crt" 2>/dev/null
head -c 24 /dev/urandom | base64 > "$W/hook-token/token"
sed -e "s#^Listen:.*#Listen: 127.0.0.1:$(free_port)#" -e "s#^AdminListen:.*#AdminListen: 127.0.0.1:$ADMIN#" \
    -e "s#^OutAddress:.*#OutAddress: 127.0.0.1:$(free_port)#" -e "s#^TempDirectory:.*#TempDirectory: $W/spool#" \
    -e "s#^MilterQuarantineDirectory:.*#MilterQuarantineDirectory: $W/quarantine#" \
    -e "s#^FilterCommand:.*#FilterCommand: cat#" \
    -e "s#/etc/proxsmtpd/hook-tls/#$W/hook-tls/#g" -e "s#/etc/proxsmtpd/hook-token/#$W/hook-token/#g" \
    "$W/rendered.conf" > "$W/proxsmtpd.conf"
# a token key other than `token` (hook.token.key) names a file that must exist too
sed -n "s#^HookTokenFile: \($W/hook-token/.*\)#\1#p" "$W/proxsmtpd.conf" | while read -r f; do
  [ -e "$f" ] || cp "$W/hook-token/token" "$f"; done
grep -E '^(Milter|ReadinessCheckMilters|Hook|Filter(Shadow|Order)|ShadowConcurrency)' "$W/proxsmtpd.conf" || true
unset_args=(); for v in $(compgen -e | grep '^PROXSMTPD_' || true); do unset_args+=(-u "$v"); done
env "${unset_args[@]}" "$BINARY" -d 1 -f "$W/proxsmtpd.conf" > "$W/proxsmtpd.log" 2>&1 &
PID=$!
for _ in $(seq 1 100); do
  if curl -sf "http://127.0.0.1:$ADMIN/livez" > /dev/null 2>&1; then
    echo "/readyz: $(curl -s "http://127.0.0.1:$ADMIN/readyz?verbose" | tr '\n' ' ')"
    echo "milters in /metrics: $(curl -s "http://127.0.0.1:$ADMIN/metrics" | sed -n 's/^proxsmtpd_milter_errors_total{.*milter="\([^"]*\)".*/\1/p' | sort -u | tr '\n' ' ')"
    echo "hooks in /metrics: $(curl -s "http://127.0.0.1:$ADMIN/metrics" | sed -n 's/^proxsmtpd_hook_errors_total{.*hook="\([^"]*\)".*/\1/p' | sort -u | tr '\n' ' ')"
    exit 0
  fi
  kill -0 "$PID" 2>/dev/null || break
  sleep 0.1
done
echo "$BINARY refused the configuration of $RENDERED:"
tail -n 5 "$W/proxsmtpd.log"
exit 1
