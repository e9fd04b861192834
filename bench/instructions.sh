#!/usr/bin/env bash
# bench/instructions.sh: user-space instructions per message, of proxsmtpd
# beside haproxy, counted by valgrind's callgrind: a figure that does not
# depend on the machine's load, for changes too small for the rate and CPU
# figures of bench/run.sh to tell apart from noise.
#
#   bench/instructions.sh [--msgs N] [--conc LIST] [--setups LIST]
#                         [--out DIR] [OURS_BINARY]
#
# Setups (default ours,haproxy1,haproxy2):
#   ours      OURS_BINARY (default target/release/proxsmtpd), no filter, the
#             config bench/run.sh gives it; -d 1 as there (one log line per
#             message)
#   ours2     BENCH_OURS2 (another build), the same way: for A/B comparisons
#   haproxy1  haproxy in TCP mode, nbthread 1, no logging (bench/run.sh's config)
#   haproxy2  the same with nbthread 2
# Load: Postfix's smtp-source, one connection per message, 1 KB bodies, into
# the proxy under callgrind on 127.0.0.1, relaying to smtp-sink. For each
# concurrency in LIST (default 1,32) and each setup, a fresh proxy gets 200
# messages of warm-up, then its counters are zeroed (callgrind_control -z),
# then N messages (default 2000) are sent and the counters dumped.
# Instructions per message = the dump's total / N. Callgrind runs one thread
# at a time and about 50 times slower, so concurrency and wake-ups differ
# from a real run: the figure counts the work, not its timing. Kernel time is
# not counted (bench/syscalls.sh counts the system calls).
#
# Prints a markdown table (setup | concurrency | instructions per message |
# ratio to the first setup) on stdout and writes it to OUT/instructions.md;
# OUT/instructions-SETUP-cCONC.out are the callgrind files, for
# callgrind_annotate (OUT default: a new directory under /tmp).
# Exit status: 0, 1 when a run lost messages or a proxy did not start, 2 on
# bad usage or a missing tool. Environment: BENCH_PORT (first port tried,
# default 24725; the sink uses the next one).
set -u -o pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
SOURCE=/usr/sbin/smtp-source
SINK=/usr/sbin/smtp-sink
HAPROXY=/usr/sbin/haproxy
HOST=127.0.0.1
OURS=$ROOT/target/release/proxsmtpd
OURS2=${BENCH_OURS2:-}
MSGS=2000 CONCS="1,32" SETUPS="ours,haproxy1,haproxy2" OUT=""
WARMUP=200 SIZE=1024

# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh"
KNOWN_SETUPS="ours ours2 haproxy1 haproxy2"
counting_options "$@"

missing=()
{ command -v valgrind && command -v callgrind_control; } >/dev/null || missing+=("valgrind (apt-get install valgrind)")
{ [ -x "$SOURCE" ] && [ -x "$SINK" ]; } || missing+=("smtp-source/smtp-sink (apt-get install postfix)")
command -v ss >/dev/null || missing+=("ss (apt-get install iproute2)")
if [[ " $SETUPS " == *" haproxy"* ]] && [ ! -x "$HAPROXY" ]; then missing+=("haproxy (apt-get install haproxy)"); fi
if [[ " $SETUPS " == *" ours "* ]] && [ ! -x "$OURS" ]; then missing+=("$OURS (cargo build --release)"); fi
if [[ " $SETUPS " == *" ours2 "* ]] && [ ! -x "$OURS2" ]; then missing+=("BENCH_OURS2 (another build of proxsmtpd)"); fi
if [ ${#missing[@]} -gt 0 ]; then
  printf 'instructions.sh: missing: %s\n' "${missing[@]}" >&2
  exit 2
fi

WORK=$(mktemp -d /tmp/proxsmtpd-instructions.XXXXXX) || exit 2
[ -n "$OUT" ] || OUT=$WORK/out
mkdir -p "$WORK/spool" "$OUT" || exit 2
SINK_PID="" PROXY_PID=""
# shellcheck disable=SC2317,SC2329  # called by the EXIT trap
cleanup() {
  stop_pid "$PROXY_PID" TERM 200; stop_pid "$SINK_PID"
  [ "$OUT" = "$WORK/out" ] || rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

PPORT=${BENCH_PORT:-24725}
for _ in $(seq 30); do
  listening "$PPORT" || listening $((PPORT + 1)) || break
  PPORT=$((PPORT + 10))
done
SPORT=$((PPORT + 1))
if listening "$PPORT" || listening "$SPORT"; then echo "instructions.sh: no free port pair found" >&2; exit 2; fi
# Under callgrind a proxy starts in seconds, not milliseconds.
export LISTEN_WAIT=1200  # read by wait_listen in bench/lib.sh

start_proxy() { # setup outfile -> PROXY_PID, or returns 1
  local log=$WORK/proxy-$1.log cmd
  case $1 in
    ours|ours2)
      printf 'Listen: %s:%s\nOutAddress: %s:%s\nMaxConnections: 10000\nTempDirectory: %s\n' \
        "$HOST" "$PPORT" "$HOST" "$SPORT" "$WORK/spool" >"$WORK/proxy.conf"
      local bin=$OURS; [ "$1" = ours2 ] && bin=$OURS2
      cmd=("$bin" -d 1 -f "$WORK/proxy.conf" -p "$WORK/proxy.pid") ;;
    haproxy*)
      haproxy_conf "${1#haproxy}" "$WORK/haproxy.cfg"
      cmd=("$HAPROXY" -db -f "$WORK/haproxy.cfg") ;;
  esac
  valgrind --tool=callgrind --callgrind-out-file="$2" --dump-instr=no \
    --separate-threads=no "${cmd[@]}" >>"$log" 2>&1 &
  PROXY_PID=$!
  if ! wait_listen "$PPORT" "$PROXY_PID"; then
    echo "instructions.sh: $1 did not listen on $PPORT:" >&2; tail -5 "$log" >&2
    stop_pid "$PROXY_PID" TERM 200; PROXY_PID=""
    return 1
  fi
}

load() { # conc msgs: smtp-source through the proxy; false when a message is lost
  local conc=$1 n=$2 s0 s1 rc
  [ "$conc" -gt "$n" ] && conc=$n
  s0=$(sink_count)
  timeout -k 2 1200 "$SOURCE" -s "$conc" -m "$n" -l "$SIZE" -M bench.example \
    -f sender@bench.example -t rcpt@bench.example "$HOST:$PPORT" >"$WORK/source.out" 2>&1
  rc=$?
  for _ in $(seq 100); do
    s1=$(sink_count)
    [ $(( ${s1:-0} - ${s0:-0} )) -ge "$n" ] && break
    sleep 0.05
  done
  if [ $rc -ne 0 ] || [ $(( ${s1:-0} - ${s0:-0} )) -ne "$n" ]; then
    echo "instructions.sh: smtp-source status $rc, sink got $(( ${s1:-0} - ${s0:-0} )) of $n: $(tail -1 "$WORK/source.out")" >&2
    return 1
  fi
}

start_sink
STATUS=0
ROWS=()
for conc in $CONCS; do
  first=""
  for setup in $SETUPS; do
    out=$OUT/instructions-$setup-c$conc.out
    rm -f "$out" "$out".*
    echo "instructions.sh: $setup, concurrency $conc, $MSGS messages" >&2
    start_proxy "$setup" "$out" || { STATUS=1; continue; }
    if load "$conc" "$WARMUP" && callgrind_control -z "$PROXY_PID" >/dev/null &&
       load "$conc" "$MSGS" && callgrind_control -d "$PROXY_PID" >/dev/null; then
      # The dump after zeroing is the file's first part (.1); its summary line
      # is the total of the counted messages.
      total=$(sed -n 's/^summary: //p' "$out.1" 2>/dev/null | head -1)
      if [ -n "$total" ]; then
        per=$(( total / MSGS ))
        [ -n "$first" ] || first=$per
        ROWS+=("| $setup | $conc | $per | $(awk -v a="$per" -v b="$first" 'BEGIN { printf "%.2f", a / b }') |")
      else
        echo "instructions.sh: no callgrind dump for $setup" >&2; STATUS=1
      fi
    else
      STATUS=1
    fi
    stop_pid "$PROXY_PID" TERM 200; PROXY_PID=""
  done
done

{
  echo "| setup | concurrency | user-space instructions per message | ratio to the first setup |"
  echo "|---|---:|---:|---:|"
  printf '%s\n' "${ROWS[@]}"
} | tee "$OUT/instructions.md"
echo "instructions.sh: callgrind files in $OUT" >&2
exit "$STATUS"
