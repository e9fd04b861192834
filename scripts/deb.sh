#!/usr/bin/env bash
# deb.sh - the Debian package proxsmtpd_<version>_<arch>.deb, built with cargo-deb into
# target/debian/, and its checks.
#
# Usage: scripts/deb.sh [--no-build] [--binary PATH]   build the package
#        scripts/deb.sh --check [DEB]                  check a built package (default: the
#                                                      newest in target/debian/)
#   --no-build     package target/release/proxsmtpd as it is (scripts/test.sh builds it)
#   --binary PATH  package this binary instead (e.g. one built in another checkout)
#
# The package metadata is [package.metadata.deb] in Cargo.toml; the files it installs that
# are not built are under debian/ (units, configuration, maintainer scripts) and man/.
# The checks fail, never skip, when cargo-deb or lintian is missing
# (scripts/install-test-deps.sh installs both):
#   - contents: /usr/sbin/proxsmtpd, /etc/proxsmtpd.conf as a conffile, the units, the
#     init script (a conffile, masked under systemd), the sysusers.d file, both manual pages, the example filters; Provides, Conflicts and
#     Replaces proxsmtp; the maintainer scripts parse (sh -n);
#   - the packaged binary prints the packaged manual pages (--man) and its version;
#   - the manual pages render with `man -l` without warnings;
#   - `systemd-analyze verify` accepts the units;
#   - lintian reports no error and no warning (overrides, each explained, in
#     debian/lintian-overrides).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

die() { printf 'deb.sh: FAILED: %s\n' "$*" >&2; exit 1; }
need() { command -v "$1" >/dev/null 2>&1 || die "$1 is missing (scripts/install-test-deps.sh installs it)"; }

MODE=build BUILD=1 BINARY="" DEB=""
while [ $# -gt 0 ]; do
  case "$1" in
    --no-build) BUILD=0; shift ;;
    --binary) BINARY=$2; BUILD=0; shift 2 ;;
    --check) MODE=check; shift; if [ $# -gt 0 ]; then DEB=$1; shift; fi ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "deb.sh: unknown argument: $1" >&2; exit 2 ;;
  esac
done

VERSION=$(sed -n 's/^version *= *"\(.*\)"/\1/p' Cargo.toml | head -n1)
OUT=$ROOT/target/debian

build() {
  need cargo-deb
  if [ "$BUILD" = 1 ]; then
    cargo build --release --locked
  fi
  local target_dir
  target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
  local env=()
  if [ -n "$BINARY" ]; then
    [ -x "$BINARY" ] || die "no executable binary at $BINARY"
    # cargo-deb takes target/release/proxsmtpd from the target directory it is given.
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    install -D -m 0755 "$BINARY" "$tmp/release/proxsmtpd"
    env=(CARGO_TARGET_DIR="$tmp")
    target_dir=$tmp
  fi
  [ -x "$target_dir/release/proxsmtpd" ] || die "no $target_dir/release/proxsmtpd (cargo build --release)"
  # The manual pages in the package are the committed ones: they must be what this binary
  # generates (tests/it/man.rs checks the same).
  for page in "8 man/proxsmtpd.8" "5 man/proxsmtpd.conf.5"; do
    # shellcheck disable=SC2086  # split "SECTION FILE" into $1 and $2
    set -- $page
    "$target_dir/release/proxsmtpd" --man "$1" | cmp -s - "$2" \
      || die "$2 differs from \`proxsmtpd --man $1\`: run scripts/man.sh"
  done
  mkdir -p "$OUT"
  rm -f "$OUT"/proxsmtpd_*.deb
  env "${env[@]}" cargo deb --no-build --strip --output "$OUT/" >/dev/null \
    || die "cargo deb"
  ls "$OUT"/proxsmtpd_*.deb
}

check() {
  need cargo-deb
  need lintian
  need dpkg-deb
  need man
  need systemd-analyze
  if [ -z "$DEB" ]; then
    # the newest package (ls -t: by modification time; the names hold no odd characters)
    # shellcheck disable=SC2012
    DEB=$(ls -t "$OUT"/proxsmtpd_*.deb 2>/dev/null | head -n1 || true)
  fi
  [ -f "$DEB" ] || die "no package to check (scripts/deb.sh first)"
  x=$(mktemp -d)
  trap 'rm -rf "$x"' EXIT
  dpkg-deb -R "$DEB" "$x/root" || die "dpkg-deb -R $DEB"
  local fails=0
  fail() { printf 'deb.sh --check: %s\n' "$*" >&2; fails=$((fails + 1)); }

  # Contents.
  for f in usr/sbin/proxsmtpd etc/proxsmtpd.conf \
           lib/systemd/system/proxsmtpd.service lib/systemd/system/proxsmtp@.service \
           lib/systemd/system/proxsmtp.target usr/lib/sysusers.d/proxsmtpd.conf \
           usr/share/man/man8/proxsmtpd.8.gz usr/share/man/man5/proxsmtpd.conf.5.gz \
           usr/share/doc/proxsmtpd/copyright usr/share/doc/proxsmtpd/changelog.Debian.gz \
           usr/share/doc/proxsmtpd/examples/tag-header.sh \
           usr/share/doc/proxsmtpd/examples/spamassassin.sh \
           usr/share/doc/proxsmtpd/examples/clamav.sh; do
    [ -e "$x/root/$f" ] || fail "missing /$f"
  done
  [ -x "$x/root/usr/sbin/proxsmtpd" ] || fail "/usr/sbin/proxsmtpd is not executable"
  for conffile in /etc/proxsmtpd.conf /etc/init.d/proxsmtp; do
    grep -qx "$conffile" "$x/root/DEBIAN/conffiles" 2>/dev/null || fail "$conffile is not a conffile"
  done
  [ -x "$x/root/etc/init.d/proxsmtp" ] || fail "no executable /etc/init.d/proxsmtp"
  [ "$(readlink "$x/root/lib/systemd/system/proxsmtp.service")" = /dev/null ] \
    || fail "proxsmtp.service (the init script under systemd) is not masked"
  for field in Provides Conflicts Replaces; do
    dpkg-deb -f "$DEB" "$field" | grep -qw proxsmtp || fail "$field does not name proxsmtp"
  done
  [ "$(dpkg-deb -f "$DEB" Version)" = "$VERSION-1" ] || fail "Version is not $VERSION-1"
  for s in preinst postinst prerm postrm; do
    [ -x "$x/root/DEBIAN/$s" ] || { fail "no executable $s"; continue; }
    sh -n "$x/root/DEBIAN/$s" || fail "$s does not parse"
  done
  grep -q 'Type=notify' "$x/root/lib/systemd/system/proxsmtpd.service" || fail "proxsmtpd.service is not Type=notify"
  grep -q 'ExecStart=/usr/sbin/proxsmtpd -f /etc/proxsmtp/%I.conf -p /run/proxsmtp/%i.pid' \
    "$x/root/lib/systemd/system/proxsmtp@.service" || fail "proxsmtp@.service does not run proxsmtp's command line"

  # The packaged binary and its pages.
  local bin=$x/root/usr/sbin/proxsmtpd
  "$bin" -v | grep -q "version $VERSION" || fail "proxsmtpd -v does not say $VERSION"
  for page in "8 man8/proxsmtpd.8.gz" "5 man5/proxsmtpd.conf.5.gz"; do
    # shellcheck disable=SC2086  # split "SECTION FILE" into $1 and $2
    set -- $page
    zcat "$x/root/usr/share/man/$2" | cmp -s - <("$bin" --man "$1") \
      || fail "/usr/share/man/$2 is not what the packaged binary generates"
    local warnings
    warnings=$(LC_ALL=C.UTF-8 MANWIDTH=80 man --warnings -l "$x/root/usr/share/man/$2" 2>&1 >/dev/null || echo "man -l failed")
    [ -z "$warnings" ] || fail "man -l $2: $warnings"
    LC_ALL=C.UTF-8 MANWIDTH=80 man -l "$x/root/usr/share/man/$2" 2>/dev/null | grep -q SYNOPSIS\\\|DESCRIPTION \
      || fail "man -l $2 renders nothing"
  done

  # The units as systemd reads them, with ExecStart naming the packaged binary (the host's
  # /usr/sbin/proxsmtpd may be another one, or none).
  local units=$x/units verify
  mkdir -p "$units"
  for u in proxsmtpd.service proxsmtp@.service proxsmtp.target; do
    sed "s|/usr/sbin/proxsmtpd|$bin|" "$x/root/lib/systemd/system/$u" > "$units/$u"
  done
  cp "$units/proxsmtp@.service" "$units/proxsmtp@example.service"
  verify=$(cd "$units" && { SYSTEMD_LOG_LEVEL=warning systemd-analyze verify --man=no \
      ./proxsmtpd.service ./proxsmtp@example.service ./proxsmtp.target 2>&1 \
    | grep -v -e 'running with root privileges' || true; })
  [ -z "$verify" ] || fail "systemd-analyze verify: $verify"

  # lintian: no error, no warning (info and pedantic tags are shown, not failed on).
  local report
  report=$(lintian --fail-on none "$DEB" 2>&1 | grep -v 'running with root privileges' || true)
  [ -z "$report" ] || printf '%s\n' "$report"
  if printf '%s\n' "$report" | grep -q '^[EW]: '; then
    fail "lintian reports errors or warnings (above)"
  fi

  [ "$fails" = 0 ] || die "$fails check(s) failed for $DEB"
  echo "deb.sh --check: OK $(basename "$DEB")"
}

if [ "$MODE" = build ]; then build; else check; fi
