#!/usr/bin/env bash
# Checks the dependency tree against deny.toml: licences, bans (duplicate versions only
# warn) and sources (crates.io only).
#
# `advisories` is not checked: it needs the RustSec advisory database fetched over the
# network, which this build environment cannot reach (see deny.toml).
#
# Installs cargo-deny when missing; after that it works offline.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! cargo deny --version >/dev/null 2>&1; then
    echo "installing cargo-deny"
    cargo install cargo-deny --version '~0.20' --locked --quiet
fi
# Offline checks need every dependency's manifest locally; fetch them only when missing.
if ! cargo metadata --format-version 1 --offline >/dev/null 2>&1; then
    cargo fetch
fi
exec cargo deny --offline check licenses bans sources
