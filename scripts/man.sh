#!/usr/bin/env bash
# man.sh - regenerate the manual pages under man/ from the code (src/process/man.rs and the
# settings list in src/config/reference.rs), with the release binary:
#   scripts/man.sh [BINARY]      (default target/release/proxsmtpd, built when missing)
# tests/it/man.rs fails while the committed pages differ from what the binary prints.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/release/proxsmtpd}
[ -x "$bin" ] || cargo build --release --locked --quiet
"$bin" --man 8 > man/proxsmtpd.8
"$bin" --man 5 > man/proxsmtpd.conf.5
echo "man/proxsmtpd.8 man/proxsmtpd.conf.5 regenerated"
