#!/usr/bin/env bash
# deb-upgrade-test.sh - upgrade a Debian bookworm system from Debian's proxsmtp to the
# proxsmtpd package and check that nothing an operator set up is lost.
#
# Usage: scripts/deb-upgrade-test.sh [--no-podman] [DEB]
#   DEB          default: the newest target/debian/*.deb, made by scripts/deb.sh
#   --no-podman  leave out step 6 (systemd in a podman container)
#
# In a bookworm root made with debootstrap (kept in target/deb-upgrade/ between runs):
#   0. a fresh install makes the _proxsmtp user and /etc/proxsmtpd.conf; purge removes it;
#   1. install Debian's proxsmtp, give it /etc/proxsmtp/test.conf and a filter script, run
#      the proxsmtp@test unit's command line (systemd does not run in a chroot) and send
#      three messages: one delivered with the filter's header, one rejected by the filter
#      (554), one silently dropped (250, nothing delivered);
#   2. install our package over it (dpkg -i, Conflicts/Replaces proxsmtp): the
#      configuration, the filter and the _proxsmtp user are still there; run our
#      proxsmtp@test unit's ExecStart (as its User=) and send the same messages: the same
#      replies and the same deliveries; the same through /etc/init.d/proxsmtp start/stop;
#   3. edit /etc/proxsmtpd.conf, upgrade to a newer revision of our package: the edit is
#      kept (conffile);
#   4. systemd-analyze verify on the installed units;
#   5. apt-get remove: /etc/proxsmtpd.conf and /etc/proxsmtp/test.conf are left;
#   6. the same under a running systemd, in a podman container of the same root: proxsmtp
#      with proxsmtp@test enabled and running (Type=forking), then our package installed:
#      its postinst restarts the instance, now Type=notify, active with the same pid file
#      and the same replies; reload and stop through systemctl; proxsmtpd.service with an
#      edited /etc/proxsmtpd.conf starts (READY=1) and serves.
# Long-running (debootstrap, apt): not part of scripts/test.sh. Needs root, debootstrap,
# smtp-sink (postfix) and python3 on the host.
# Env: DEBIAN_MIRROR (default http://deb.debian.org/debian).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PODMAN=1
if [ "${1:-}" = --no-podman ]; then PODMAN=0; shift; fi
WORK=$ROOT/target/deb-upgrade
BASE=$WORK/bookworm-base.tar
R=$WORK/root

step() { printf '== %s\n' "$*" >&2; }
die() { printf 'deb-upgrade-test: FAILED: %s\n' "$*" >&2; exit 1; }
for tool in debootstrap smtp-sink python3 systemd-analyze dpkg-deb cargo-deb; do
  command -v "$tool" >/dev/null || die "$tool is missing"
done
# the newest package (ls -t: by modification time; the names hold no odd characters)
# shellcheck disable=SC2012
DEB=${1:-$(ls -t target/debian/proxsmtpd_*.deb 2>/dev/null | head -n1 || true)}
[ -f "$DEB" ] || die "no package (scripts/deb.sh first)"
DEB=$(readlink -f "$DEB")

SINK_PID=""
cleanup() {
  if [ -n "$SINK_PID" ]; then kill "$SINK_PID" 2>/dev/null || true; fi
  stop_proxies
  for m in proc dev/pts dev; do umount "$R/$m" 2>/dev/null || true; done
}
# Every proxy started in the root: by its pid file.
stop_proxies() {
  local f
  for f in "$R"/run/proxsmtp/*.pid; do
    [ -f "$f" ] || continue
    kill "$(cat "$f")" 2>/dev/null || true
  done
  for _ in $(seq 1 50); do
    ls "$R"/run/proxsmtp/*.pid >/dev/null 2>&1 || return 0
    sleep 0.2
  done
}
trap cleanup EXIT
in_root() { chroot "$R" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 "$@"; }

# --- the bookworm root ----------------------------------------------------------------
mkdir -p "$WORK"
if [ ! -f "$BASE" ]; then
  step "debootstrap bookworm (minbase + systemd, adduser) -> $BASE"
  rm -rf "$WORK/base"
  debootstrap --variant=minbase --include=systemd,adduser bookworm "$WORK/base" "$MIRROR" \
    > "$WORK/debootstrap.log" 2>&1 || { tail -n 20 "$WORK/debootstrap.log" >&2; die "debootstrap"; }
  tar -C "$WORK/base" -cf "$BASE" .
  rm -rf "$WORK/base"
fi
rm -rf "$R"
mkdir -p "$R"
tar -C "$R" -xf "$BASE"
mount -t proc proc "$R/proc"
mount --bind /dev "$R/dev"
cp /etc/resolv.conf "$R/etc/resolv.conf"
# Nothing may start a service from a maintainer script (there is no init in a chroot).
printf '#!/bin/sh\nexit 101\n' > "$R/usr/sbin/policy-rc.d"
chmod 0755 "$R/usr/sbin/policy-rc.d"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
SINK_PORT=$(free_port) PORT=$(free_port)
DUMP=$WORK/sink
rm -rf "$DUMP"; mkdir -p "$DUMP"; chmod 0777 "$DUMP"
step "smtp-sink on 127.0.0.1:$SINK_PORT"
smtp-sink -u postfix -d "$DUMP/%M." "127.0.0.1:$SINK_PORT" 16 > "$WORK/sink.log" 2>&1 &
SINK_PID=$!

# --- 0. a fresh install (no proxsmtp before): the user comes from sysusers.d ------------
step "fresh install of $(basename "$DEB")"
cp "$DEB" "$R/tmp/new.deb"
in_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
in_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq /tmp/new.deb > "$WORK/apt.log" 2>&1 \
  || { tail -n 20 "$WORK/apt.log" >&2; die "fresh install"; }
in_root getent passwd _proxsmtp >/dev/null || die "fresh install: no _proxsmtp user"
[ -f "$R/etc/proxsmtpd.conf" ] || die "fresh install: no /etc/proxsmtpd.conf"
in_root dpkg-query -L proxsmtpd | grep -q '^/usr/share/doc/proxsmtpd/examples/tag-header.sh$' \
  || die "fresh install: no example filters"
in_root env DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq proxsmtpd > "$WORK/apt.log" 2>&1 \
  || { tail -n 20 "$WORK/apt.log" >&2; die "purge"; }
[ ! -e "$R/etc/proxsmtpd.conf" ] || die "purge left /etc/proxsmtpd.conf"
in_root userdel _proxsmtp 2>/dev/null || true
in_root groupdel _proxsmtp 2>/dev/null || true
echo "fresh install: user, conffile and examples there; purge removes the conffile"

# --- 1. Debian's proxsmtp -------------------------------------------------------------
step "apt-get install proxsmtp"
in_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends proxsmtp \
  > "$WORK/apt.log" 2>&1 || { tail -n 20 "$WORK/apt.log" >&2; die "apt-get install proxsmtp"; }
in_root getent passwd _proxsmtp >/dev/null || die "proxsmtp did not create _proxsmtp"

# write_config ETC PORT: the operator's filter and /etc/proxsmtp/test.conf under ETC.
write_config() {
  local etc=$1 port=$2
  mkdir -p "$etc/proxsmtp"
  cat > "$etc/proxsmtp/filter.sh" <<'EOF'
#!/bin/sh
# Test filter: REJECT in the message -> 554, DROP -> silently dropped, else a header added.
msg=$(cat)
case "$msg" in
  *REJECT*) echo "554 5.7.1 Rejected by the test filter" >&2; exit 1 ;;
  *DROP*) echo "250 Dropped by the test filter" >&2; exit 1 ;;
esac
printf 'X-Test-Filter: passed\r\n%s\r\n' "$msg"
EOF
  chmod 0755 "$etc/proxsmtp/filter.sh"
  cat > "$etc/proxsmtp/test.conf" <<EOF
# operator's configuration, written before the upgrade
Listen: 127.0.0.1:$port
OutAddress: 127.0.0.1:$SINK_PORT
FilterCommand: /etc/proxsmtp/filter.sh
TempDirectory: /var/tmp
User: _proxsmtp
EOF
}
write_config "$R/etc" "$PORT"
CONF_SUM=$(md5sum < "$R/etc/proxsmtp/test.conf")

# The unit's ExecStart with the instance name, as systemd would run it.
exec_start() {
  sed -n 's/^ExecStart=//p' "$R/lib/systemd/system/proxsmtp@.service" | sed 's/%[iI]/test/g'
}

# send MARK: three messages, one line per message: "<final reply code> <delivered yes/no>".
send() {
  local mark=$1
  python3 - "$PORT" "$mark" <<'EOF'
import smtplib, sys
port, mark = int(sys.argv[1]), sys.argv[2]
for kind in ("PASS", "REJECT", "DROP"):
    body = f"Subject: {mark}-{kind}\r\n\r\n{kind} {mark}-{kind}\r\n"
    s = smtplib.SMTP("127.0.0.1", port, timeout=30)
    s.ehlo("client.example")
    s.mail("sender@example.org")
    s.rcpt("rcpt@example.net")
    code, _ = s.data(body.encode())
    s.quit()
    print(f"{kind} {code}")
EOF
}
delivered() { # MARK KIND: whether the sink got the message, and with the filter's header
  local f
  sleep 0.5
  f=$(grep -l "Subject: $1-$2" "$DUMP"/* 2>/dev/null | head -n1 || true)
  if [ -z "$f" ]; then echo "$2 not-delivered"
  elif grep -q '^X-Test-Filter: passed' "$f"; then echo "$2 delivered-filtered"
  else echo "$2 delivered-unfiltered"; fi
}
run_and_send() { # NAME USERSPEC|initscript
  local name=$1 user=$2
  mkdir -p "$R/run/proxsmtp"
  in_root chown _proxsmtp:_proxsmtp /run/proxsmtp
  if [ "$user" = initscript ]; then
    step "$name: /etc/init.d/proxsmtp start"
    in_root /etc/init.d/proxsmtp start >&2 || die "$name: the init script did not start it"
  else
    step "$name: $(exec_start) (as ${user:-root})"
    # shellcheck disable=SC2046
    chroot ${user:+--userspec=$user} "$R" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin $(exec_start) \
      || die "$name did not start"
  fi
  for _ in $(seq 1 50); do
    python3 -c "import socket,sys; socket.create_connection(('127.0.0.1',$PORT),1)" 2>/dev/null && break
    sleep 0.2
  done
  send "$name" > "$WORK/$name.replies" || die "$name: SMTP conversation failed"
  for kind in PASS REJECT DROP; do delivered "$name" "$kind"; done > "$WORK/$name.delivered"
  if [ "$user" = initscript ]; then
    in_root /etc/init.d/proxsmtp stop >&2 || die "$name: the init script did not stop it"
  fi
  stop_proxies
  cat "$WORK/$name.replies" "$WORK/$name.delivered" | sed "s/^/  $name: /" >&2
}
# The original forks as root and switches to User itself; ours runs as the unit's User=.
run_and_send original ""
grep -qx 'PASS 250' "$WORK/original.replies" || die "the original did not deliver (test setup)"

# --- 2. our package over it -----------------------------------------------------------
step "dpkg -i $(basename "$DEB")"
cp "$DEB" "$R/tmp/new.deb"
in_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq /tmp/new.deb > "$WORK/apt.log" 2>&1 \
  || { tail -n 20 "$WORK/apt.log" >&2; die "installing our package"; }
# shellcheck disable=SC2016  # ${Status} is dpkg-query's, not the shell's
in_root dpkg-query -W -f='${Status}\n' proxsmtp 2>/dev/null | grep -q 'not-installed\|config-files' \
  || die "proxsmtp still installed"
[ "$(md5sum < "$R/etc/proxsmtp/test.conf")" = "$CONF_SUM" ] || die "/etc/proxsmtp/test.conf changed"
[ -x "$R/etc/proxsmtp/filter.sh" ] || die "the filter script is gone"
in_root getent passwd _proxsmtp >/dev/null || die "_proxsmtp is gone"
in_root /usr/sbin/proxsmtpd -v | grep -q "version" || die "proxsmtpd -v"
grep -q '^Type=notify' "$R/lib/systemd/system/proxsmtp@.service" || die "not our unit"
run_and_send ours _proxsmtp:_proxsmtp
diff "$WORK/original.replies" "$WORK/ours.replies" >&2 || die "replies differ from the original's"
diff <(sed 's/^/x /' "$WORK/original.delivered") <(sed 's/^/x /' "$WORK/ours.delivered") >&2 \
  || die "deliveries differ from the original's"
# Without systemd: proxsmtp's init script, taken over (and made executable again).
[ -x "$R/etc/init.d/proxsmtp" ] || die "/etc/init.d/proxsmtp is not executable after the upgrade"
run_and_send initscript initscript
diff "$WORK/original.replies" "$WORK/initscript.replies" >&2 || die "init script: replies differ"
diff <(sed 's/^/x /' "$WORK/original.delivered") <(sed 's/^/x /' "$WORK/initscript.delivered") >&2 \
  || die "init script: deliveries differ"
[ ! -e "$R/run/proxsmtp/test.pid" ] || die "init script stop left the pid file"
echo "same replies and deliveries as the original"

# --- 3. conffile kept on upgrade ------------------------------------------------------
step "edit /etc/proxsmtpd.conf, upgrade to revision 2"
printf "# operator's edit\nOutAddress: 127.0.0.1:2525\n" >> "$R/etc/proxsmtpd.conf"
EDIT_SUM=$(md5sum < "$R/etc/proxsmtpd.conf")
x=$(mktemp -d)
dpkg-deb -R "$DEB" "$x"
sed -i 's/^Version: \(.*\)-1$/Version: \1-2/' "$x/DEBIAN/control"
dpkg-deb --root-owner-group -b "$x" "$R/tmp/new2.deb" >/dev/null
rm -rf "$x"
in_root env DEBIAN_FRONTEND=noninteractive dpkg -i --force-confdef --force-confold /tmp/new2.deb \
  > "$WORK/apt.log" 2>&1 || { tail -n 20 "$WORK/apt.log" >&2; die "upgrade"; }
[ "$(md5sum < "$R/etc/proxsmtpd.conf")" = "$EDIT_SUM" ] || die "the edited /etc/proxsmtpd.conf was replaced"
echo "edited conffile kept on upgrade"

# --- 4. the installed units -----------------------------------------------------------
step "systemd-analyze verify --root"
verify=$(SYSTEMD_LOG_LEVEL=warning systemd-analyze verify --man=no --root="$R" \
  proxsmtpd.service proxsmtp@test.service proxsmtp.target 2>&1 | grep -v 'running with root privileges' || true)
[ -z "$verify" ] || die "systemd-analyze verify: $verify"

# --- 5. remove --------------------------------------------------------------------------
step "apt-get remove proxsmtpd"
in_root env DEBIAN_FRONTEND=noninteractive apt-get remove -y -qq proxsmtpd > "$WORK/apt.log" 2>&1 \
  || { tail -n 20 "$WORK/apt.log" >&2; die "apt-get remove"; }
[ ! -e "$R/usr/sbin/proxsmtpd" ] || die "the binary is still there"
[ "$(md5sum < "$R/etc/proxsmtpd.conf")" = "$EDIT_SUM" ] || die "/etc/proxsmtpd.conf not left as it was"
[ -f "$R/etc/proxsmtp/test.conf" ] || die "/etc/proxsmtp/test.conf removed"

# --- 6. under systemd, in podman --------------------------------------------------------
if [ "$PODMAN" = 1 ]; then
  command -v podman >/dev/null || die "podman is missing (or run with --no-podman)"
  # rootful podman where crun cannot manage cgroups (as for scripts/image-build.sh)
  export CONTAINERS_CONF=$ROOT/deploy/image/containers.conf
  IMAGE=localhost/proxsmtpd-debtest/bookworm-systemd:base
  if ! podman image exists "$IMAGE"; then
    step "podman import $BASE -> $IMAGE"
    podman import --change 'CMD ["/lib/systemd/systemd"]' "$BASE" "$IMAGE" >/dev/null 2>&1
  fi
  CTR=proxsmtpd-debtest-$$
  PORT=$(free_port)
  step "podman run $IMAGE with systemd as process 1"
  podman run -d --name "$CTR" --systemd=always --network=host \
    -v "$(dirname "$DEB"):/debs:ro" "$IMAGE" /lib/systemd/systemd >/dev/null
  trap 'podman rm -f -t 5 "$CTR" >/dev/null 2>&1 || true; cleanup' EXIT
  in_ctr() { podman exec -e DEBIAN_FRONTEND=noninteractive "$CTR" "$@"; }
  state=""
  for _ in $(seq 1 50); do
    state=$(in_ctr systemctl is-system-running 2>/dev/null || true)
    case "$state" in running|degraded) break ;; esac
    sleep 0.2
  done
  case "$state" in running|degraded) ;; *) die "systemd in the container: $state" ;; esac
  unit_show() { in_ctr systemctl show "$1" -p "$2" --value; }
  wait_active() {
    for _ in $(seq 1 50); do
      [ "$(unit_show "$1" ActiveState)" = active ] && return 0
      sleep 0.2
    done
    in_ctr journalctl -u "$1" --no-pager | tail -n 10 >&2
    die "$1 is not active"
  }

  step "systemd: proxsmtp with proxsmtp@test enabled"
  in_ctr apt-get update -qq >/dev/null
  in_ctr apt-get install -y -qq --no-install-recommends proxsmtp > "$WORK/apt.log" 2>&1 \
    || { tail -n 20 "$WORK/apt.log" >&2; die "apt-get install proxsmtp (container)"; }
  CETC=$WORK/ctr-etc
  rm -rf "$CETC"
  write_config "$CETC" "$PORT"
  podman cp "$CETC/proxsmtp/." "$CTR:/etc/proxsmtp/"
  in_ctr systemctl enable --now proxsmtp@test >/dev/null 2>&1 || die "enable proxsmtp@test"
  wait_active proxsmtp@test
  [ "$(unit_show proxsmtp@test Type)" = forking ] || die "not proxsmtp's unit"
  send systemd-original > "$WORK/systemd-original.replies" || die "SMTP to proxsmtp under systemd"

  step "systemd: our package over it"
  in_ctr apt-get install -y -qq "/debs/$(basename "$DEB")" > "$WORK/apt.log" 2>&1 \
    || { tail -n 20 "$WORK/apt.log" >&2; die "installing our package (container)"; }
  wait_active proxsmtp@test
  [ "$(unit_show proxsmtp@test Type)" = notify ] || die "proxsmtp@test is not our Type=notify unit"
  main=$(unit_show proxsmtp@test MainPID)
  [ "$(in_ctr cat /run/proxsmtp/test.pid)" = "$main" ] || die "pid file is not the MainPID $main"
  [ "$(in_ctr ps -o user= -p "$main")" = _proxsmtp ] || die "not running as _proxsmtp"
  # The new binary: only it tells systemd READY=1 with this status (/proc/PID/exe of another
  # user's process is not readable without CAP_SYS_PTRACE, which podman drops).
  unit_show proxsmtp@test StatusText | grep -q "listening on 127.0.0.1:$PORT" \
    || die "no READY=1 status text from the new binary"
  send systemd-ours > "$WORK/systemd-ours.replies" || die "SMTP to ours under systemd"
  diff "$WORK/systemd-original.replies" "$WORK/systemd-ours.replies" >&2 \
    || die "replies under systemd differ from the original's"
  echo "under systemd: the enabled instance was restarted as Type=notify, same replies"

  in_ctr systemctl reload proxsmtp@test || die "systemctl reload"
  wait_active proxsmtp@test
  [ "$(unit_show proxsmtp@test MainPID)" = "$main" ] || die "reload restarted the process"
  in_ctr systemctl stop proxsmtp.target || die "systemctl stop proxsmtp.target"
  [ "$(unit_show proxsmtp@test ActiveState)" = inactive ] || die "the instance did not stop with the target"
  [ "$(unit_show proxsmtp@test Result)" = success ] || die "stop result: $(unit_show proxsmtp@test Result)"

  step "systemd: proxsmtpd.service with /etc/proxsmtpd.conf"
  PORT=$(free_port)
  in_ctr sh -c "printf 'Listen: 127.0.0.1:$PORT\nOutAddress: 127.0.0.1:$SINK_PORT\nFilterCommand: /etc/proxsmtp/filter.sh\n' >> /etc/proxsmtpd.conf"
  in_ctr systemctl enable --now proxsmtpd >/dev/null 2>&1 || die "enable --now proxsmtpd"
  wait_active proxsmtpd
  send systemd-main > "$WORK/systemd-main.replies" || die "SMTP to proxsmtpd.service"
  diff "$WORK/systemd-original.replies" "$WORK/systemd-main.replies" >&2 || die "proxsmtpd.service replies"
  in_ctr systemctl stop proxsmtpd || die "systemctl stop proxsmtpd"
  [ "$(unit_show proxsmtpd Result)" = success ] || die "proxsmtpd.service stop result"
  echo "under systemd: reload, stop, proxsmtpd.service: OK"
fi
echo "deb-upgrade-test: OK"
