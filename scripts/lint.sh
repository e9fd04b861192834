#!/usr/bin/env bash
# Lints the project's scripts: shellcheck on every shell script and ruff on every Python
# file under scripts/, bench/, deploy/ and debian/ (the maintainer scripts and the init
# script). Fails on any finding. A finding that is intended is silenced where it occurs,
# with `# shellcheck disable=SCxxxx` or `# noqa: RULE` and the reason on the same line or
# the line above.
#
# Then scripts/check-imports.py: no import cycle in src/, and src/protocol/ free of I/O.
#
# Tools: shellcheck (Debian) and ruff (PyPI, pinned, in ~/.cache/proxsmtpd/lint-venv), both
# installed by scripts/install-test-deps.sh. A missing tool is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
dirs=(scripts bench deploy debian)
ruff=${RUFF:-${XDG_CACHE_HOME:-$HOME/.cache}/proxsmtpd/lint-venv/bin/ruff}
# ruff's rules, fixed here so that a new ruff release changes nothing: pyflakes (F), the
# pycodestyle errors (E4, E7, E9), bugbear (B), shebangs that match the file mode (EXE),
# and files opened without being closed (SIM115).
ruff_rules=E4,E7,E9,F,B,EXE,SIM115

shell_files=() python_files=()
while IFS= read -r -d '' f; do
    case "$f" in
        *.sh) shell_files+=("$f"); continue ;;
        *.py) python_files+=("$f"); continue ;;
    esac
    case "$(head -n 1 "$f")" in
        '#!'*python*) python_files+=("$f") ;;
        '#!'*/sh | '#!'*/sh\ * | '#!'*bash* | '#!'*/dash*) shell_files+=("$f") ;;
    esac
done < <(find "${dirs[@]}" -type d \( -name __pycache__ -o -name results -o -name .ruff_cache \) -prune \
         -o -type f -print0 | sort -z)

status=0
if ! command -v shellcheck >/dev/null; then
    echo "lint: shellcheck is not installed (scripts/install-test-deps.sh)"; status=1
elif shellcheck --external-sources "${shell_files[@]}"; then
    echo "lint: shellcheck $(shellcheck --version | sed -n 's/^version: //p'): ${#shell_files[@]} shell scripts clean"
else
    status=1
fi
if [ ! -x "$ruff" ]; then
    echo "lint: no ruff at $ruff (scripts/install-test-deps.sh)"; status=1
elif "$ruff" check --no-cache --quiet --target-version py311 --select "$ruff_rules" "${python_files[@]}"; then
    echo "lint: $("$ruff" --version): ${#python_files[@]} Python files clean"
else
    status=1
fi
# The shape of src/: no import cycle, and protocol/ free of I/O.
if ! python3 scripts/check-imports.py; then
    status=1
fi
exit $status
