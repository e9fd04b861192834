#!/usr/bin/env bash
# sync-chart-files.sh - copy the dashboards and alert rules into the Helm chart.
#
# The sources of truth are dashboards/*.json and deploy/alerts/*.yaml. A chart cannot reach
# files outside its directory (nor follow symlinks when packaged), so it carries copies in
# helm/proxsmtpd/files/. Edit the sources, run this script, commit both.
#   --check   change nothing; exit 1 if a copy differs from its source or is missing/extra
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CHECK=0; [ "${1:-}" = --check ] && CHECK=1
status=0
sync_dir() {   # sync_dir SRC_DIR PATTERN DEST_DIR
  local src=$1 pat=$2 dst=$3 f name
  mkdir -p "$dst"
  for f in "$src"/$pat; do
    name=$(basename "$f")
    if ! cmp -s "$f" "$dst/$name"; then
      if [ "$CHECK" = 1 ]; then echo "differs: ${dst#"$ROOT"/}/$name (source ${f#"$ROOT"/})"; status=1
      else cp "$f" "$dst/$name"; echo "copied ${f#"$ROOT"/} -> ${dst#"$ROOT"/}/"; fi
    fi
  done
  for f in "$dst"/$pat; do
    [ -e "$f" ] || continue
    name=$(basename "$f")
    if [ ! -e "$src/$name" ]; then
      if [ "$CHECK" = 1 ]; then echo "extra: ${f#"$ROOT"/} has no source in ${src#"$ROOT"/}"; status=1
      else rm -f "$f"; echo "removed ${f#"$ROOT"/}"; fi
    fi
  done
}
sync_dir "$ROOT/dashboards" '*.json' "$ROOT/helm/proxsmtpd/files/dashboards"
sync_dir "$ROOT/deploy/alerts" '*.yaml' "$ROOT/helm/proxsmtpd/files/alerts"
exit $status
