#!/usr/bin/env bash
# The whole test suite: installs what it needs, then formatting, lints, unit and
# integration tests, the differential conformance suite, deployment checks and the
# benchmark smoke run. Every step runs; the script fails if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
root=$(pwd)
export CARGO_TERM_COLOR=never
# Every prerequisite is installed above: a test that cannot run fails instead of skipping
# (PROXSMTPD_TEST_STRICT=0 in the environment lets it skip; the skipped tests are listed at
# the end). Set for `cargo test` only: the proxy refuses unknown PROXSMTPD_ variables, and
# later steps start it with this environment.
strict=${PROXSMTPD_TEST_STRICT:-1}
unset PROXSMTPD_TEST_STRICT
# Where the harness lists skipped tests (CARGO_TARGET_TMPDIR of the test binary).
skipped_list=${CARGO_TARGET_DIR:-$root/target}/tmp/skipped-tests.txt
rm -f "$skipped_list"

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
step "cargo test" env PROXSMTPD_TEST_STRICT="$strict" cargo test --release --no-fail-fast
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
if [ -s "$skipped_list" ]; then
    echo "skipped tests (a prerequisite is missing):"
    sed 's/^/  /' "$skipped_list"
fi
if [ ${#failed[@]} -gt 0 ]; then
    echo "failed steps: ${failed[*]}"
    exit 1
fi
echo "all steps passed"
