#!/usr/bin/env bash
# exposition.sh - print the /metrics exposition of a freshly started proxsmtpd.
#
# Usage: deploy/check/exposition.sh [PROXSMTPD_BINARY]   (default target/release/proxsmtpd)
# The binary runs on loopback with an upstream that does not answer (no mail flows), its
# admin server, a self-signed TLS certificate (openssl) and a milter on a port nothing
# listens on (the milter families are there from the start for every configured milter), so
# that every metric family it can export is there, the certificate's expiry included. The metric names that dashboards
# and alert rules may use are read from this output (deploy/check/static_checks.py
# --exposition). Exit status 1 if the binary does not serve /metrics within 10 s.
set -euo pipefail
exec </dev/null
HERE=$(cd "$(dirname "$0")" && pwd)
BINARY=${1:-$HERE/../../target/release/proxsmtpd}
W=$(mktemp -d /tmp/proxsmtpd-exposition.XXXXXX)
PID=
# shellcheck disable=SC2317,SC2329  # called by the EXIT trap
cleanup() {
  if [ -n "$PID" ]; then kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; fi
  rm -rf "$W"
}
trap cleanup EXIT
[ -x "$BINARY" ] || { echo "no proxsmtpd binary at $BINARY (cargo build --release)" >&2; exit 1; }
command -v openssl >/dev/null || { echo "openssl is needed for the TLS metrics" >&2; exit 1; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
SMTP=$(free_port) UPSTREAM=$(free_port) ADMIN=$(free_port) MILTER=$(free_port)
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=localhost \
  -keyout "$W/tls.key" -out "$W/tls.crt" 2> "$W/openssl.log" || { cat "$W/openssl.log" >&2; exit 1; }
mkdir -p "$W/spool"
cat > "$W/proxsmtpd.conf" <<CONF
Listen: 127.0.0.1:$SMTP
OutAddress: 127.0.0.1:$UPSTREAM
AdminListen: 127.0.0.1:$ADMIN
TempDirectory: $W/spool
TlsCertificate: $W/tls.crt
TlsKey: $W/tls.key
Milters: inet:127.0.0.1:$MILTER{name=probe}
CONF
# PROXSMTPD_* variables of the caller would override the config file: drop them
unset_args=(); for v in $(compgen -e | grep '^PROXSMTPD_' || true); do unset_args+=(-u "$v"); done
env "${unset_args[@]}" "$BINARY" -d 1 -f "$W/proxsmtpd.conf" > "$W/proxsmtpd.log" 2>&1 &
PID=$!
for _ in $(seq 1 100); do
  if curl -sf "http://127.0.0.1:$ADMIN/metrics" > "$W/metrics" 2>/dev/null; then
    cat "$W/metrics"; exit 0
  fi
  kill -0 "$PID" 2>/dev/null || break
  sleep 0.1
done
echo "$BINARY served no /metrics on 127.0.0.1:$ADMIN; its log:" >&2
tail -n 15 "$W/proxsmtpd.log" >&2
exit 1
