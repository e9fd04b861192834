#!/usr/bin/env bash
# image-build.sh - build the proxsmtpd container image with podman, offline, then run it and
# check that mail through it reaches an upstream and that /readyz answers 200.
#
# Usage: scripts/image-build.sh [--full | --prebuilt [--binary PATH]] [--flavor full|minimal]
#                               [--tag IMAGE] [--debug-out DIR] [--no-run-check] [--keep-context]
#   --full      (default) both Dockerfile stages: the builder stage compiles the crate inside
#               a local Rust base image, with the crates vendored into the build context
#               (`cargo vendor`), so `podman build --network=none` works.
#   --prebuilt  only the runtime stage (target runtime-prebuilt) around a binary built on
#               this host (`cargo build --release --locked`, or --binary PATH).
#   --flavor    full (default): Debian bookworm-slim with /bin/sh for FilterCommand scripts.
#               minimal: FROM scratch with only the stripped binary, the shared libraries ldd
#               names, CA roots and passwd/group for 10025; no shell, no package manager (no
#               FilterCommand). Its debug info goes to DIR/proxsmtpd-<version>.debug (the
#               binary names it with a gnu-debuglink), DIR from --debug-out (default
#               target/image).
#   --tag       image name (default localhost/proxsmtpd:<Cargo.toml version>, with the suffix
#               -minimal for the minimal flavor).
#   --check-only  build nothing: only run the checks of step 4 on the image --tag names.
#
# Base images are never pulled. They are made here from Debian packages and tagged with the
# names the Dockerfile uses:
#   docker.io/library/debian:bookworm-slim  debootstrap --variant=minbase bookworm
#   docker.io/library/rust:1-bookworm       the same plus gcc and libc6-dev, with this host's
#                                           Rust toolchain (rustc --print sysroot) copied in
# Long-running (a full build compiles every dependency): not part of the default tests.
# Env: DEBIAN_MIRROR (default http://deb.debian.org/debian), DEPLOY_TOOLS_DIR.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
MODE=full TAG="" RUN_CHECK=1 KEEP_CTX=0 BINARY="" CHECK_ONLY=0 FLAVOR=full DEBUG_OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --full) MODE=full; shift ;;
    --prebuilt) MODE=prebuilt; shift ;;
    --binary) BINARY=$2; shift 2 ;;
    --tag) TAG=$2; shift 2 ;;
    --flavor) FLAVOR=$2; shift 2 ;;
    --debug-out) DEBUG_OUT=$2; shift 2 ;;
    --no-run-check) RUN_CHECK=0; shift ;;
    --check-only) CHECK_ONLY=1; shift ;;
    --keep-context) KEEP_CTX=1; shift ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

VERSION=$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$ROOT/Cargo.toml" | head -n1)
case "$FLAVOR" in
  full) SUFFIX="" ;;
  minimal) SUFFIX=-minimal ;;
  *) echo "--flavor must be full or minimal, not $FLAVOR" >&2; exit 2 ;;
esac
TAG=${TAG:-localhost/proxsmtpd:$VERSION$SUFFIX}
DEBUG_OUT=${DEBUG_OUT:-$ROOT/target/image}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
# podman, buildah, runc, debootstrap, smtp-sink, swaks
QUIET=1 WITH_PODMAN=1 "$ROOT/scripts/install-deploy-tools.sh" >/dev/null
export CONTAINERS_CONF="$ROOT/deploy/image/containers.conf"

step() { printf '== %s\n' "$*" >&2; }
die() { printf 'image-build: FAILED: %s\n' "$*" >&2; exit 1; }

WORK=$(mktemp -d /var/tmp/proxsmtpd-image.XXXXXX)
CONTAINER="" SINK_PID=""
cleanup() {
  if [ -n "$CONTAINER" ]; then podman rm -f -v "$CONTAINER" >/dev/null 2>&1 || true; fi
  if [ -n "$SINK_PID" ]; then kill "$SINK_PID" 2>/dev/null || true; fi
  if [ "$KEEP_CTX" = 1 ]; then echo "build context kept in $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

# import_rootfs NAME DIR [podman-import --change ...]: a directory tree as an image.
import_rootfs() {
  local name=$1 dir=$2; shift 2
  rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/* \
         "$dir"/usr/share/doc/* "$dir"/usr/share/man/* "$dir"/usr/share/info/*
  tar --numeric-owner -C "$dir" -c . | podman import "$@" - "$name" >/dev/null
}

# debootstrap_image NAME INCLUDE-PACKAGES: a minbase Debian bookworm image, once.
debootstrap_image() {
  local name=$1 include=$2 dir="$WORK/rootfs-$RANDOM"
  local args=(--variant=minbase)
  [ -n "$include" ] && args+=(--include="$include")
  step "debootstrap bookworm ${include:+(+ $include) }-> $name"
  debootstrap "${args[@]}" bookworm "$dir" "$MIRROR" > "$WORK/debootstrap.log" 2>&1 \
    || { tail -n 20 "$WORK/debootstrap.log" >&2; die "debootstrap for $name"; }
  echo "$dir"
}

if [ "$CHECK_ONLY" = 0 ]; then
# --- 1. base images -------------------------------------------------------------------
# With ca-certificates: the runtime stage verifies upstream TLS against the system roots
# and installs them only when missing, which a build without network cannot do.
DEBIAN_LOCAL=localhost/proxsmtpd-base/debian:bookworm-minbase-ca
if ! podman image exists "$DEBIAN_LOCAL"; then
  dir=$(debootstrap_image "$DEBIAN_LOCAL" ca-certificates | tail -n1)
  import_rootfs "$DEBIAN_LOCAL" "$dir" --change 'CMD ["/bin/bash"]'
  rm -rf "$dir"
fi
podman tag "$DEBIAN_LOCAL" docker.io/library/debian:bookworm-slim

if [ "$MODE" = full ]; then
  SYSROOT=$(rustc --print sysroot)
  RUST_VERSION=$(rustc --version | awk '{print $2}')
  RUST_LOCAL=localhost/proxsmtpd-base/rust:$RUST_VERSION-bookworm
  if ! podman image exists "$RUST_LOCAL"; then
    dir=$(debootstrap_image "$RUST_LOCAL" gcc,libc6-dev | tail -n1)
    step "copy the Rust $RUST_VERSION toolchain from $SYSROOT"
    mkdir -p "$dir/usr/local/rust"
    # the documentation is most of a toolchain's size and is not needed to compile
    tar -C "$SYSROOT" --exclude=./share/doc -c . | tar -C "$dir/usr/local/rust" -x
    import_rootfs "$RUST_LOCAL" "$dir" \
      --change 'ENV PATH=/usr/local/rust/bin:/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'ENV CARGO_HOME=/usr/local/cargo' \
      --change 'CMD ["/bin/bash"]'
    rm -rf "$dir"
  fi
  podman tag "$RUST_LOCAL" docker.io/library/rust:1-bookworm
fi

# --- 2. build context -------------------------------------------------------------------
CTX="$WORK/context"
mkdir -p "$CTX/deploy"
cp -r "$ROOT/Dockerfile" "$ROOT/.dockerignore" "$ROOT/Cargo.toml" "$ROOT/Cargo.lock" "$ROOT/src" "$CTX/"
cp -r "$ROOT/deploy/image" "$CTX/deploy/"
if [ "$MODE" = full ]; then
  step "cargo vendor (crates for the offline builder stage)"
  (cd "$CTX" && cargo vendor --locked --quiet vendor >/dev/null) || die "cargo vendor"
  TARGET=runtime
  [ "$FLAVOR" = full ] || TARGET=runtime-minimal
else
  if [ -z "$BINARY" ]; then
    step "cargo build --release --locked (host binary for the runtime-prebuilt stage)"
    (cd "$ROOT" && cargo build --release --locked --quiet) || die "cargo build on the host"
    BINARY="$ROOT/target/release/proxsmtpd"
  fi
  [ -x "$BINARY" ] || die "no executable binary at $BINARY"
  if [ "$FLAVOR" = full ]; then
    install -D -m 0755 "$BINARY" "$CTX/prebuilt/proxsmtpd"
    TARGET=runtime-prebuilt
  else
    # stripped, its debug info kept in a separate file the binary names (gnu-debuglink)
    step "strip the binary; debug info -> $DEBUG_OUT/proxsmtpd-$VERSION.debug"
    mkdir -p "$CTX/prebuilt" "$DEBUG_OUT"
    DEBUG_FILE="$DEBUG_OUT/proxsmtpd-$VERSION.debug"
    objcopy --only-keep-debug "$BINARY" "$DEBUG_FILE" || die "objcopy --only-keep-debug"
    objcopy --strip-all --add-gnu-debuglink="$DEBUG_FILE" "$BINARY" "$CTX/prebuilt/proxsmtpd" \
      || die "objcopy --strip-all"
    chmod 0755 "$CTX/prebuilt/proxsmtpd"; chmod 0644 "$DEBUG_FILE"
    echo "binary $(stat -c %s "$BINARY") bytes -> stripped $(stat -c %s "$CTX/prebuilt/proxsmtpd")," \
      "debug info $(stat -c %s "$DEBUG_FILE") in $DEBUG_FILE"
    TARGET=runtime-minimal-prebuilt
  fi
fi

# --- 3. podman build ------------------------------------------------------------------
step "podman build --target $TARGET -t $TAG"
REVISION=$(git -C "$ROOT" rev-parse --verify -q HEAD 2>/dev/null || echo unknown)
podman build --pull=never --network=none --target "$TARGET" \
  --build-arg VERSION="$VERSION" --build-arg REVISION="$REVISION" \
  --build-arg CREATED="$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
  -t "$TAG" "$CTX" > "$WORK/build.log" 2>&1 \
  || { tail -n 30 "$WORK/build.log" >&2; die "podman build (stage log above)"; }
podman image inspect "$TAG" --format 'user={{.Config.User}} ports={{.Config.ExposedPorts}} size={{.Size}}'
if [ "$FLAVOR" = minimal ] && [ "$MODE" = full ]; then
  # the debug info of the binary compiled in the builder stage (Dockerfile stage debug-info)
  step "podman build --target debug-info -> $DEBUG_OUT/proxsmtpd-$VERSION.debug"
  podman build --pull=never --network=none --target debug-info -t "$TAG-debug-info" "$CTX" \
    >> "$WORK/build.log" 2>&1 || { tail -n 30 "$WORK/build.log" >&2; die "podman build debug-info"; }
  mkdir -p "$DEBUG_OUT"
  cid=$(podman create "$TAG-debug-info" /proxsmtpd.debug)
  podman cp "$cid:/proxsmtpd.debug" "$DEBUG_OUT/proxsmtpd-$VERSION.debug"; podman rm "$cid" >/dev/null
  podman rmi "$TAG-debug-info" >/dev/null
fi

fi
[ "$RUN_CHECK" = 1 ] || { echo "image-build: built $TAG (run check skipped)"; exit 0; }

# --- 4. run it: read-only root, spool on the image's volume, mail through it to smtp-sink
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
SINK_PORT=$(free_port) SMTP_PORT=$(free_port) ADMIN_PORT=$(free_port)
# smtp-sink drops privileges to the postfix user: the dump directory must be its own
DUMP="$WORK/sink"; chmod 0755 "$WORK"; mkdir -p "$DUMP"; chown postfix "$DUMP"
step "smtp-sink on 127.0.0.1:$SINK_PORT"
smtp-sink -u postfix -d "$DUMP/%M." "127.0.0.1:$SINK_PORT" 64 > "$WORK/sink.log" 2>&1 &
SINK_PID=$!

step "podman run $TAG (read-only root, all capabilities dropped, uid from the image)"
CONTAINER=proxsmtpd-image-check-$$
# The spool is the image's VOLUME (an anonymous volume that keeps the image's 10025 owner);
# everything else is read-only.
podman run -d --name "$CONTAINER" --network=host --read-only \
  --cap-drop=ALL --security-opt=no-new-privileges \
  -e PROXSMTPD_OUT_ADDRESS="127.0.0.1:$SINK_PORT" \
  -e PROXSMTPD_LISTEN="127.0.0.1:$SMTP_PORT" \
  -e PROXSMTPD_ADMIN_LISTEN="127.0.0.1:$ADMIN_PORT" \
  "$TAG" >/dev/null

ready=""
for _ in $(seq 1 100); do
  code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$ADMIN_PORT/readyz" || true)
  [ "$code" = 200 ] && { ready=1; break; }
  [ "$(podman inspect -f '{{.State.Running}}' "$CONTAINER")" = true ] || break
  sleep 0.2
done
if [ -z "$ready" ]; then
  podman logs "$CONTAINER" 2>&1 | tail -n 20 >&2
  die "the container never answered 200 on /readyz (state: $(podman inspect -f '{{.State.Status}} exit={{.State.ExitCode}}' "$CONTAINER"))"
fi
echo "/readyz: 200"

MARK="image-check-$$-$RANDOM"
swaks --silent 2 --server 127.0.0.1 --port "$SMTP_PORT" --from sender@example.org \
  --to rcpt@example.net --header "Subject: $MARK" --body "$MARK" > "$WORK/swaks.log" 2>&1 \
  || { cat "$WORK/swaks.log" >&2; die "swaks through the container"; }
for _ in $(seq 1 50); do grep -rqs "$MARK" "$DUMP" && break; sleep 0.1; done
grep -rqs "$MARK" "$DUMP" || die "the message did not reach the upstream smtp-sink"
echo "mail through the container reached the upstream"

# The checks below look at the container from the host (/proc of its processes, its
# exported file tree): no shell or tool inside the image is needed, so both flavors are
# checked the same way. Process 1 is proxsmtpd as a small init with the proxy as its child
# (README, "Container mode"); SIGTERM to it drains the proxy and the container exits 0.
pid1=$(podman inspect -f '{{.State.Pid}}' "$CONTAINER")
{ [ -n "$pid1" ] && [ "$pid1" != 0 ] && [ -r "/proc/$pid1/status" ]; } || die "no host pid for the container's process 1"
# uid_of PID: the real and effective uid of a process
uid_of() { awk '/^Uid:/ {print $2 "/" $3}' "/proc/$1/status"; }
init_comm=$(cat "/proc/$pid1/comm")
init_kids=$(cat "/proc/$pid1/task/$pid1/children")
child=${init_kids%% *}
{ [ "$init_comm" = proxsmtpd ] && [ -n "$child" ]; } \
  || die "process 1 should be proxsmtpd with the proxy as its child (comm=$init_comm children=$init_kids)"
echo "process 1: $init_comm, its child: $(cat "/proc/$child/comm")"
{ [ "$(uid_of "$pid1")" = 10025/10025 ] && [ "$(uid_of "$child")" = 10025/10025 ]; } \
  || die "uid of process 1 / its child: $(uid_of "$pid1") / $(uid_of "$child"), not 10025"
echo "container uid: 10025 (process 1 and the proxy; image user $(podman inspect -f '{{.Config.User}}' "$CONTAINER"))"
# the root filesystem is read-only (the spool volume aside)
[ "$(podman inspect -f '{{.HostConfig.ReadonlyRootfs}}' "$CONTAINER")" = true ] || die "root filesystem not read-only"
awk '$2 == "/" {print $4}' "/proc/$pid1/mounts" | grep -q '^ro\(,\|$\)' \
  || die "/ is not mounted read-only inside the container: $(awk '$2 == "/"' "/proc/$pid1/mounts")"
echo "root filesystem: read-only"
# the file tree: the full flavor keeps /bin/sh for FilterCommand, the minimal one has no
# shell and no package manager
podman export "$CONTAINER" | tar -t > "$WORK/files.txt"
has() { grep -qx "\./$1\|$1" "$WORK/files.txt"; }
if [ "$FLAVOR" = minimal ]; then
  for f in bin/sh usr/bin/sh bin/bash usr/bin/bash bin/dash usr/bin/dash usr/bin/busybox \
           usr/bin/apt usr/bin/apt-get usr/bin/dpkg usr/bin/env; do
    has "$f" && die "the minimal image has $f"
  done
  echo "no shell, no package manager: $(grep -vc '/$' "$WORK/files.txt") files and links, /bin/sh absent"
else
  has bin/sh || has usr/bin/sh || die "the full image has no /bin/sh (FilterCommand needs it)"
  echo "/bin/sh present (FilterCommand scripts)"
fi
step "podman stop (SIGTERM to process 1)"
podman stop -t 20 "$CONTAINER" >/dev/null
exit_code=$(podman inspect -f '{{.State.ExitCode}}' "$CONTAINER")
[ "$exit_code" = 0 ] || { podman logs "$CONTAINER" 2>&1 | tail -n 20 >&2; die "exit code after SIGTERM: $exit_code"; }
echo "stopped on SIGTERM, exit code 0"
echo "image-build: OK $TAG ($FLAVOR, $(podman image inspect -f '{{.Size}}' "$TAG") bytes)"
