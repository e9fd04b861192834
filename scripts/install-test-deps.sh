#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian machine (idempotent, quiet).
#   proxsmtp   the C original, for differential tests and benchmarks
#   postfix    smtp-sink / smtp-source, a real MTA as upstream and load client (not started)
#   swaks      a real SMTP client (with --pipelining)
#   haproxy    a TCP proxy to measure against (bench/run.sh starts its own on loopback;
#              the package's service never runs)
#   strace linux-perf
#              system calls and profiles of a running proxy (bench/syscalls.sh,
#              bench/run.sh --profile perf)
#   prometheus promtool and a real Prometheus server
#   spamd spamc clamav-daemon clamdscan
#              the scanners of examples/filters/ (tests/it/scanners.rs starts its own spamd
#              and clamd on loopback; the packages' services and freshclam never run)
#   rspamd     a real milter (tests/it/real_milters.rs starts its own proxy worker in milter
#              mode on loopback; the package's service never runs)
#   opendkim opendkim-tools
#              a real signing milter and opendkim-genkey for its test key
#   clamav-milter
#              clamav-milter in front of the tests' own clamd
#   spamass-milter
#              SpamAssassin's milter in front of the tests' own spamd
#   python3-dkim
#              dkimpy, to verify the signatures opendkim adds
#   lintian man-db
#              the Debian package's checks (scripts/deb.sh --check)
#   openssl    certificates for the TLS tests and deployment checks
#   python3-venv shellcheck
#              the lint of the scripts (scripts/lint.sh), with ruff from PyPI (pinned) in
#              a venv under ~/.cache/proxsmtpd/lint-venv
#   python3-fusepy
#              a FUSE file system whose reads and writes stall (tests/it/faults/slow_spool.rs)
#   python3-aiohttp
#              the HTTP hook service of the hook tests (tests/it/common/hook_service.py)
#   cargo-deb  (cargo install, pinned) builds the Debian package (scripts/deb.sh)
set -euo pipefail
need=()
for pkg in proxsmtp postfix swaks haproxy strace linux-perf prometheus python3 procps iproute2 iptables \
           spamd spamc clamav-daemon clamdscan lintian man-db openssl \
           rspamd opendkim opendkim-tools clamav-milter spamass-milter python3-dkim \
           shellcheck python3-venv python3-fusepy python3-aiohttp; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
    echo "installing: ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # No package may start its daemon while being installed (invoke-rc.d asks policy-rc.d;
    # 101 = action forbidden). An existing policy is left as it is.
    policy=/usr/sbin/policy-rc.d
    own_policy=
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy"
        chmod 0755 "$policy"
        own_policy=1
    fi
    trap '[ -z "$own_policy" ] || rm -f "$policy"' EXIT
    apt-get update -qq
    # Postfix must not ask questions nor start: it is only used as tools and test peers.
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# The packages' own daemons are not wanted: tests start what they need on loopback.
for svc in postfix prometheus prometheus-node-exporter; do
    service "$svc" stop >/dev/null 2>&1 || true
done
# haproxy's service would hold its default config's ports and is never wanted: the
# benchmark runs haproxy itself. Stopped and kept from starting at boot.
service haproxy stop >/dev/null 2>&1 || true
if [ -d /run/systemd/system ]; then
    systemctl disable --now haproxy >/dev/null 2>&1 || true
else
    update-rc.d haproxy disable >/dev/null 2>&1 || true
fi
# The scanners' and milters' services are stopped and kept from starting at boot; nothing
# may download a virus database (freshclam) or rules (sa-update, run by
# spamassassin-maintenance).
for svc in spamd spamassassin clamav-daemon clamav-freshclam \
           clamav-freshclam-once.timer spamassassin-maintenance.timer \
           rspamd opendkim clamav-milter spamass-milter; do
    service "$svc" stop >/dev/null 2>&1 || true
    if [ -d /run/systemd/system ]; then
        systemctl disable --now "$svc" >/dev/null 2>&1 || true
    else
        update-rc.d "$svc" disable >/dev/null 2>&1 || true
    fi
done
# cargo-deb, pinned: the Debian package's layout must not change with a new release.
CARGO_DEB_VERSION=3.8.0
if ! cargo deb --version 2>/dev/null | grep -qx "cargo-deb $CARGO_DEB_VERSION"; then
    echo "installing: cargo-deb $CARGO_DEB_VERSION"
    cargo install cargo-deb --locked --version "$CARGO_DEB_VERSION" --quiet
fi
# ruff, pinned, for scripts/lint.sh: in its own venv (the system Python is externally managed).
RUFF_VERSION=0.17.6
lint_venv=${XDG_CACHE_HOME:-$HOME/.cache}/proxsmtpd/lint-venv
if ! "$lint_venv/bin/ruff" --version 2>/dev/null | grep -qx "ruff $RUFF_VERSION"; then
    echo "installing: ruff $RUFF_VERSION"
    python3 -m venv "$lint_venv"
    "$lint_venv/bin/pip" install --quiet --disable-pip-version-check "ruff==$RUFF_VERSION"
fi
