#!/usr/bin/env bash
# The whole test suite: installs what it needs, then formatting, lints, unit and
# integration tests, the differential conformance suite, deployment checks and the
# benchmark smoke run. Every step runs; the script fails if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
root=$(pwd)
export CARGO_TERM_COLOR=never
# Every prerequisite is installed above: a test that cannot run fails instead of skipping.
# (Not PROXSMTPD_*: the proxy refuses unknown PROXSMTPD_ variables, and tests pass their
# environment on to it.)
export TESTS_STRICT=1

failed=()
step() {
    local name=$1; shift
    echo "=== $name"
    local start=$SECONDS
    if "$@"; then
        echo "=== $name: ok ($((SECONDS - start)) s)"
    else
        echo "=== $name: FAILED ($((SECONDS - start)) s)"
        failed+=("$name")
    fi
}

step "install test dependencies" scripts/install-test-deps.sh
step "cargo fmt" cargo fmt --all -- --check
step "lint scripts" bash scripts/lint.sh
# Built first so that clippy reuses the compiled dependencies.
step "build" cargo build --release
step "cargo clippy" cargo clippy --release --all-targets -- -D warnings
step "cargo test" cargo test --release --no-fail-fast
# The Debian package around the release binary built above (cargo deb --no-build), then
# its contents, manual pages, units and lintian; fails when cargo-deb or lintian is missing.
step "debian package" bash -c 'scripts/deb.sh --no-build && scripts/deb.sh --check'
step "dependency licences and sources" bash scripts/deny.sh
step "fuzz smoke run" bash scripts/fuzz.sh --smoke

conformance=${CONFORMANCE_DIR:-$root/../shared/conformance}
if [ -x "$conformance/run.sh" ] || [ -f "$conformance/run.sh" ]; then
    step "conformance suite" sh "$conformance/run.sh" "$root/target/release/proxsmtpd"
else
    echo "=== conformance suite: skipped ($conformance not found)"
fi
if [ -f scripts/deploy-check.sh ]; then
    step "deployment checks" bash scripts/deploy-check.sh
fi
if [ -f bench/run.sh ]; then
    step "benchmark smoke run" bash bench/run.sh --smoke
fi

echo
if [ ${#failed[@]} -gt 0 ]; then
    echo "failed steps: ${failed[*]}"
    exit 1
fi
echo "all steps passed"
