#!/usr/bin/env bash
# Load soak: many messages at a fixed concurrency through a filter that randomly accepts,
# rejects, drops and fails, with an exact account at the end:
#
#   messages at the upstream + rejections + drops + temporary failures == messages sent
#
# and the proxy's resident memory sampled every few seconds (first/last/max reported).
# The soak is the ignored test `soak::soak` of the integration tests (tests/it/soak.rs):
# the harness's upstream, a load generator of SMTP clients and the RSS sampler, in Rust.
#
# Usage: scripts/soak.sh [--messages N] [--concurrency C] [--binary PATH]
#                        [--rss-interval SECONDS] [--keep]
# Defaults: 100000 messages at concurrency 64, the binary cargo builds (target/release).
# Exit status: 0 when the account is exact and every message got a final reply, 1
# otherwise. The last line of output is machine-readable:
#   SOAK-RESULT sent=.. upstream=.. accepted=.. rejected=.. dropped=.. tempfailed=..
#               no_reply=.. seconds=.. rate=.. rss_first_kib=.. rss_warm_kib=..
#               rss_last_kib=.. rss_max_kib=.. rss_samples=.. leftover=.. alive=..
set -euo pipefail
cd "$(dirname "$0")/.."

messages=100000
concurrency=64
binary=""
rss_interval=2
keep=0
while [ $# -gt 0 ]; do
    case "$1" in
        --messages) messages=$2; shift 2 ;;
        --concurrency) concurrency=$2; shift 2 ;;
        --binary) binary=$2; shift 2 ;;
        --rss-interval) rss_interval=$2; shift 2 ;;
        --keep) keep=1; shift ;;
        -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
        *) echo "soak: unknown option $1" >&2; exit 2 ;;
    esac
done
if [ -n "$binary" ]; then
    binary=$(realpath "$binary")
fi

out=$(mktemp "${TMPDIR:-/tmp}/proxsmtpd-soak.XXXXXX")
trap 'rm -f "$out"' EXIT
# --keep: the proxy's directory (configuration, log, TempDirectory) is kept and named.
keep_env=()
if [ "$keep" = 1 ]; then keep_env=(PROXSMTPD_TEST_KEEP=1); fi
status=0
env SOAK_MESSAGES="$messages" SOAK_CONCURRENCY="$concurrency" SOAK_BINARY="$binary" \
    SOAK_RSS_INTERVAL="$rss_interval" "${keep_env[@]}" \
    cargo test --release --test it -- --ignored --exact soak::soak --nocapture \
    >"$out" || status=1
grep -v '^SOAK-RESULT ' "$out" >&2 || true
result=$(grep '^SOAK-RESULT ' "$out" || true)
if [ -z "$result" ]; then
    echo "soak: no result" >&2
    exit 1
fi
echo "$result"
exit "$status"
