#!/usr/bin/env bash
# exposition.sh - print the /metrics exposition of a freshly started proxsmtpd.
#
# Usage: deploy/check/exposition.sh [PROXSMTPD_BINARY]   (default target/release/proxsmtpd)
# The binary runs on loopback with its admin server, a self-signed TLS certificate
# (openssl), a milter and two HTTP hooks on ports nothing listens on (default_action=accept,
# so mail flows on; the milter and hook families are there from the start for every
# configured milter and hook), one of the hooks a shadow, and a minimal SMTP upstream
# (python3) that accepts everything. Two messages go through (python3 smtplib), so that the
# families that only appear with traffic (the shadow verdicts) are there too: every metric
# family the binary can export, the certificate's expiry included. The metric names that
# dashboards and alert rules may use are read from this output
# (deploy/check/static_checks.py --exposition). Exit status 1 if the binary does not serve
# /metrics within 10 s or the shadow verdicts do not appear within 10 s of the messages.
set -euo pipefail
exec </dev/null
HERE=$(cd "$(dirname "$0")" && pwd)
BINARY=${1:-$HERE/../../target/release/proxsmtpd}
W=$(mktemp -d /tmp/proxsmtpd-exposition.XXXXXX)
PID=''
SINK_PID=''
# shellcheck disable=SC2317,SC2329  # called by the EXIT trap
cleanup() {
  if [ -n "$PID" ]; then kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; fi
  if [ -n "$SINK_PID" ]; then kill "$SINK_PID" 2>/dev/null || true; wait "$SINK_PID" 2>/dev/null || true; fi
  rm -rf "$W"
}
trap cleanup EXIT
[ -x "$BINARY" ] || { echo "no proxsmtpd binary at $BINARY (cargo build --release)" >&2; exit 1; }
command -v openssl >/dev/null || { echo "openssl is needed for the TLS metrics" >&2; exit 1; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
SMTP=$(free_port) UPSTREAM=$(free_port) ADMIN=$(free_port) MILTER=$(free_port) HOOK=$(free_port)
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
Milters: inet:127.0.0.1:$MILTER{name=probe, connect_timeout=1, default_action=accept}
Hooks: http://127.0.0.1:$HOOK/check{name=probe, timeout=1s, default_action=accept}, http://127.0.0.1:$HOOK/shadow{name=shadow, timeout=1s, shadow=yes}
CONF
# the upstream: accepts every command and every message
python3 - "$UPSTREAM" > "$W/upstream.log" 2>&1 <<'PY' &
import socketserver, sys
class Sink(socketserver.StreamRequestHandler):
    def handle(self):
        self.wfile.write(b"220 sink ESMTP\r\n")
        data = False
        for line in self.rfile:
            if data:
                if line in (b".\r\n", b".\n"):
                    data = False
                    self.wfile.write(b"250 2.0.0 queued\r\n")
                continue
            verb = line[:4].upper()
            if verb == b"DATA":
                data = True
                self.wfile.write(b"354 go ahead\r\n")
            elif verb == b"QUIT":
                self.wfile.write(b"221 bye\r\n")
                return
            elif verb in (b"EHLO", b"HELO"):
                self.wfile.write(b"250-sink\r\n250 8BITMIME\r\n")
            else:
                self.wfile.write(b"250 ok\r\n")
class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
Server(("127.0.0.1", int(sys.argv[1])), Sink).serve_forever()
PY
SINK_PID=$!
# PROXSMTPD_* variables of the caller would override the config file: drop them
unset_args=(); for v in $(compgen -e | grep '^PROXSMTPD_' || true); do unset_args+=(-u "$v"); done
env "${unset_args[@]}" "$BINARY" -d 1 -f "$W/proxsmtpd.conf" > "$W/proxsmtpd.log" 2>&1 &
PID=$!
for _ in $(seq 1 100); do
  if curl -sf "http://127.0.0.1:$ADMIN/metrics" > "$W/metrics" 2>/dev/null; then
    break
  fi
  kill -0 "$PID" 2>/dev/null || break
  sleep 0.1
done
if [ ! -s "$W/metrics" ]; then
  echo "$BINARY served no /metrics on 127.0.0.1:$ADMIN; its log:" >&2
  tail -n 15 "$W/proxsmtpd.log" >&2
  exit 1
fi
# two messages, whatever their replies: the shadow hook's verdicts (error: nothing listens)
python3 - "$SMTP" > "$W/client.log" 2>&1 <<'PY' || true
import smtplib, sys
for i in range(2):
    try:
        with smtplib.SMTP("127.0.0.1", int(sys.argv[1]), timeout=15) as s:
            s.sendmail("probe@example.org", ["probe@example.net"],
                       f"From: probe@example.org\r\nSubject: probe {i}\r\n\r\nprobe\r\n")
    except (OSError, smtplib.SMTPException) as e:
        print(f"message {i}: {e!r}")
PY
for _ in $(seq 1 100); do
  curl -sf "http://127.0.0.1:$ADMIN/metrics" > "$W/metrics" 2>/dev/null || true
  if grep -q '^proxsmtpd_shadow_verdicts_total{' "$W/metrics"; then
    cat "$W/metrics"; exit 0
  fi
  sleep 0.1
done
echo "$BINARY counted no shadow verdict for the messages sent; the client: $(tail -n 2 "$W/client.log")" >&2
echo "its log:" >&2
tail -n 15 "$W/proxsmtpd.log" >&2
exit 1
