#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian machine (idempotent, quiet).
#   proxsmtp   the C original, for differential tests and benchmarks
#   postfix    smtp-sink / smtp-source, a real MTA as upstream and load client (not started)
#   swaks      a real SMTP client (with --pipelining)
#   prometheus promtool and a real Prometheus server
set -euo pipefail
need=()
for pkg in proxsmtp postfix swaks prometheus python3 procps iproute2 iptables; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
    echo "installing: ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # Postfix must not ask questions nor start: it is only used as tools and test peers.
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# The packages' own daemons are not wanted: tests start what they need on loopback.
for svc in postfix prometheus prometheus-node-exporter; do
    service "$svc" stop >/dev/null 2>&1 || true
done
