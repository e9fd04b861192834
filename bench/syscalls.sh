#!/usr/bin/env bash
# bench/syscalls.sh: system calls and context switches per message, of
# proxsmtpd beside haproxy and the byte relay.
#
#   bench/syscalls.sh [--msgs N] [--conc LIST] [--setups LIST] [--out DIR]
#                     [OURS_BINARY]
#
# Setups (default all four):
#   ours      OURS_BINARY (default target/release/proxsmtpd), no filter, the
#             config bench/run.sh gives it (Listen, OutAddress,
#             MaxConnections: 10000, TempDirectory; -d 1 -f CONF -p PIDFILE)
#   haproxy1  haproxy in TCP mode, nbthread 1, no logging (bench/run.sh's config)
#   haproxy2  the same with nbthread 2
#   relay     examples/byte_relay.rs (built on demand)
# Load: Postfix's smtp-source, one connection per message, 1 KB bodies, into
# the proxy on 127.0.0.1, which relays to smtp-sink on 127.0.0.1. For each
# concurrency in LIST (default 1,32) and each setup, one fresh proxy gets:
#   a warm-up      (not counted: first connections, lazy allocations)
#   an untraced run of N messages (default 2000): context switches, summed
#                  over /proc/PID/task/*/status (voluntary_ctxt_switches,
#                  nonvoluntary_ctxt_switches), and CPU from /proc/PID/stat,
#                  before and after
#   a traced run of N messages: system calls by name, counted by
#                strace -c -f -p PID. Every system call stops the traced
#                thread twice, so the proxy runs several times slower; the
#                counts mostly hold, but a slower proxy can find more events
#                ready per epoll_wait, so epoll_wait and reads that answer
#                EAGAIN can come out lower than at full speed. (perf stat
#                -p PID would count in the kernel at full speed, but perf 6.1
#                attached to a running process counts nothing on this
#                machine's kernel.)
# Context switches are taken from the untraced run because tracing adds them.
#
# Prints one markdown table per concurrency on stdout (progress on stderr):
# syscall | per message for each setup, then the totals, the context switches
# and the CPU per message; writes the same to OUT/syscalls.md and the raw
# counts to OUT/syscalls.tsv (OUT default bench/results).
# Exit status: 0, 1 when a run lost messages or a proxy did not start, 2 on
# bad usage or a missing tool. Environment: BENCH_PORT (first port tried,
# default 24625; the sink uses the next one).
set -u -o pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
SOURCE=/usr/sbin/smtp-source
SINK=/usr/sbin/smtp-sink
HAPROXY=/usr/sbin/haproxy
HOST=127.0.0.1
OURS=$ROOT/target/release/proxsmtpd
RELAY=$ROOT/target/release/examples/byte_relay
MSGS=2000 CONCS="1,32" SETUPS="ours,haproxy1,haproxy2,relay" OUT=$HERE/results
SIZE=1024

# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh"
KNOWN_SETUPS="ours haproxy1 haproxy2 relay"
counting_options "$@"

missing=()
command -v strace >/dev/null || missing+=("strace (apt-get install strace)")
{ [ -x "$SOURCE" ] && [ -x "$SINK" ]; } || missing+=("smtp-source/smtp-sink (apt-get install postfix)")
command -v ss >/dev/null || missing+=("ss (apt-get install iproute2)")
if [[ " $SETUPS " == *" haproxy"* ]] && [ ! -x "$HAPROXY" ]; then missing+=("haproxy (apt-get install haproxy)"); fi
if [[ " $SETUPS " == *" ours "* ]] && [ ! -x "$OURS" ]; then missing+=("$OURS (cargo build --release)"); fi
if [ ${#missing[@]} -gt 0 ]; then
  printf 'syscalls.sh: missing: %s\n' "${missing[@]}" >&2
  exit 2
fi
if [[ " $SETUPS " == *" relay "* ]] && [ ! -x "$RELAY" ]; then
  echo "syscalls.sh: building the byte relay (cargo build --release --example byte_relay)" >&2
  (cd "$ROOT" && cargo build --release --example byte_relay >&2) ||
    { echo "syscalls.sh: $RELAY is missing and could not be built" >&2; exit 2; }
fi

# --- work area, ports, cleanup -------------------------------------------------
WORK=$(mktemp -d /tmp/proxsmtpd-syscalls.XXXXXX) || exit 2
mkdir -p "$WORK/spool" "$OUT" || exit 2
SINK_PID="" PROXY_PID="" TRACER_PID="" CHILD_PID=""
# shellcheck disable=SC2317,SC2329  # called by the EXIT trap
cleanup() {
  stop_pid "$CHILD_PID"; stop_pid "$TRACER_PID" INT; stop_pid "$PROXY_PID"; stop_pid "$SINK_PID"
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

hard=$(ulimit -Hn)
if [ "$hard" = unlimited ] || [ "$hard" -ge 65536 ]; then ulimit -n 65536; else ulimit -n "$hard"; fi

PPORT=${BENCH_PORT:-24625}
for _ in $(seq 30); do
  listening "$PPORT" || listening $((PPORT + 1)) || break
  PPORT=$((PPORT + 10))
done
SPORT=$((PPORT + 1))
if listening "$PPORT" || listening "$SPORT"; then echo "syscalls.sh: no free port pair found" >&2; exit 2; fi

start_proxy() { # setup -> PROXY_PID, or returns 1
  local log=$WORK/proxy-$1.log
  for _ in $(seq 40); do listening "$PPORT" || break; sleep 0.05; done
  if listening "$PPORT"; then echo "syscalls.sh: port $PPORT is still in use" >&2; return 1; fi
  case $1 in
    ours)
      printf 'Listen: %s:%s\nOutAddress: %s:%s\nMaxConnections: 10000\nTempDirectory: %s\n' \
        "$HOST" "$PPORT" "$HOST" "$SPORT" "$WORK/spool" >"$WORK/proxy.conf"
      "$OURS" -d 1 -f "$WORK/proxy.conf" -p "$WORK/proxy.pid" >>"$log" 2>&1 & ;;
    haproxy*)
      haproxy_conf "${1#haproxy}" "$WORK/haproxy.cfg"
      "$HAPROXY" -db -f "$WORK/haproxy.cfg" >>"$log" 2>&1 & ;;
    relay)
      "$RELAY" "$HOST:$PPORT" "$HOST:$SPORT" >>"$log" 2>&1 & ;;
  esac
  PROXY_PID=$!
  if ! wait_listen "$PPORT" "$PROXY_PID"; then
    echo "syscalls.sh: $1 did not listen on $PPORT:" >&2; tail -5 "$log" >&2
    stop_pid "$PROXY_PID"; PROXY_PID=""
    return 1
  fi
}

ctx_switches() { # pid -> "voluntary involuntary", summed over its threads
  cat "/proc/$1"/task/*/status 2>/dev/null |
    awk '$1 == "voluntary_ctxt_switches:" { v += $2 } $1 == "nonvoluntary_ctxt_switches:" { n += $2 }
         END { print v + 0, n + 0 }'
}
cpu_ticks() { # pid -> utime+stime, all threads
  local s
  s=$(cat "/proc/$1/stat" 2>/dev/null) || { echo 0; return; }
  s=${s##*) }
  # shellcheck disable=SC2086  # split into fields on purpose
  set -- $s
  echo $(( ${12} + ${13} ))
}
threads() { find "/proc/$1/task" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l; }
HZ=$(getconf CLK_TCK)

load() { # conc msgs: smtp-source through the proxy; false when a message is lost
  local conc=$1 n=$2 s0 s1 rc
  [ "$conc" -gt "$n" ] && conc=$n
  s0=$(sink_count)
  timeout -k 2 600 "$SOURCE" -s "$conc" -m "$n" -l "$SIZE" -M bench.example \
    -f sender@bench.example -t rcpt@bench.example "$HOST:$PPORT" >"$WORK/source.out" 2>&1 &
  CHILD_PID=$!
  wait "$CHILD_PID"; rc=$?
  CHILD_PID=""
  for _ in $(seq 100); do
    s1=$(sink_count)
    [ $(( ${s1:-0} - ${s0:-0} )) -ge "$n" ] && break
    sleep 0.05
  done
  if [ $rc -ne 0 ] || [ $(( ${s1:-0} - ${s0:-0} )) -ne "$n" ]; then
    echo "syscalls.sh: smtp-source status $rc, sink got $(( ${s1:-0} - ${s0:-0} )) of $n: $(tail -1 "$WORK/source.out")" >&2
    return 1
  fi
}

start_tracer() { # pid outfile
  strace -c -f -q -p "$1" -o "$2" >>"$WORK/tracer.log" 2>&1 &
  TRACER_PID=$!
  sleep 1  # strace attaches asynchronously
}
stop_tracer() {
  stop_pid "$TRACER_PID" INT; TRACER_PID=""
}
# strace -c's table -> "name count" lines. Its columns: % time, seconds,
# usecs/call, calls, [errors,] syscall.
parse_counts() { # file
  awk '$1 ~ /^[0-9.]+$/ && $NF != "total" && NF >= 5 { print $NF, $4 }' "$1"
}

# --- the runs -------------------------------------------------------------------
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
echo "syscalls.sh: setups: $SETUPS; concurrency: $CONCS; $MSGS messages each; ports $PPORT/$SPORT" >&2
start_sink
status=0
RAW=$WORK/raw.tsv
printf 'conc\tsetup\tkey\tcount\n' >"$RAW"
for conc in $CONCS; do
  for setup in $SETUPS; do
    echo "syscalls.sh: c$conc $setup" >&2
    start_proxy "$setup" || { status=1; continue; }
    warm=$(( conc * 2 > 50 ? conc * 2 : 50 ))
    if ! load "$conc" "$warm"; then status=1; stop_pid "$PROXY_PID"; PROXY_PID=""; continue; fi
    # Untraced: context switches and CPU.
    read -r v0 n0 < <(ctx_switches "$PROXY_PID"); t0=$(cpu_ticks "$PROXY_PID")
    load "$conc" "$MSGS" || status=1
    read -r v1 n1 < <(ctx_switches "$PROXY_PID"); t1=$(cpu_ticks "$PROXY_PID")
    {
      printf '%s\t%s\t#voluntary\t%s\n' "$conc" "$setup" $((v1 - v0))
      printf '%s\t%s\t#involuntary\t%s\n' "$conc" "$setup" $((n1 - n0))
      printf '%s\t%s\t#cpu_us\t%s\n' "$conc" "$setup" $(( (t1 - t0) * 1000000 / HZ ))
      printf '%s\t%s\t#threads\t%s\n' "$conc" "$setup" "$(threads "$PROXY_PID")"
    } >>"$RAW"
    # Traced: system calls.
    start_tracer "$PROXY_PID" "$WORK/trace.$conc.$setup"
    load "$conc" "$MSGS" || status=1
    stop_tracer
    parse_counts "$WORK/trace.$conc.$setup" | while read -r name count; do
      printf '%s\t%s\t%s\t%s\n' "$conc" "$setup" "$name" "$count"
    done >>"$RAW"
    if ! parse_counts "$WORK/trace.$conc.$setup" | grep -q .; then
      echo "syscalls.sh: strace counted nothing for $setup:" >&2; tail -3 "$WORK/tracer.log" >&2; status=1
    fi
    stop_pid "$PROXY_PID"; PROXY_PID=""
  done
done
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)
cp "$RAW" "$OUT/syscalls.tsv"

# --- the tables -------------------------------------------------------------------
{
  echo "Measured $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(nproc) CPUs, kernel $(uname -r); load average" \
    "$LOAD_START at the start, $LOAD_END at the end; $MSGS messages of $SIZE bytes per run," \
    "one connection each; system calls counted with strace -c -f (which slows the proxy" \
    "several times, so that the counts are those of a slowed proxy)," \
    "context switches and CPU in a separate untraced run. Ours $(sha256sum "$OURS" | cut -c1-16)" \
    "(sha256 prefix), haproxy $(dpkg-query -W -f '${Version}' haproxy 2>/dev/null)."
  awk -F'\t' -v msgs="$MSGS" -v setups="$SETUPS" -v concs="$CONCS" '
    NR == 1 { next }
    { v[$1, $2, $3] += $4; if ($3 !~ /^#/) { names[$3] = 1; tot[$1, $2] += $4 } }
    function per(x) { x /= msgs; return x >= 100 ? sprintf("%.0f", x) : sprintf("%.2f", x) }
    END {
      ns = split(setups, S, " "); nc = split(concs, C, " ")
      for (ci = 1; ci <= nc; ci++) {
        c = C[ci]
        # rows in order of the first setup (ours when measured), then the others
        n = 0
        for (name in names) {
          m = 0
          for (si = 1; si <= ns; si++) if (v[c, S[si], name] > m) m = v[c, S[si], name]
          if (m / msgs < 0.005) continue
          key[++n] = name
          w[name] = v[c, S[1], name] * 1e6 + m
        }
        for (i = 2; i <= n; i++) { x = key[i]; for (j = i - 1; j >= 1 && w[key[j]] < w[x]; j--) key[j + 1] = key[j]; key[j + 1] = x }
        printf "\n#### Concurrency %s: per message\n\n| syscall |", c
        for (si = 1; si <= ns; si++) printf " %s |", S[si]
        printf "\n|---|"
        for (si = 1; si <= ns; si++) printf "---:|"
        printf "\n"
        for (i = 1; i <= n; i++) {
          printf "| %s |", key[i]
          for (si = 1; si <= ns; si++) printf " %s |", per(v[c, S[si], key[i]])
          printf "\n"
        }
        printf "| **all system calls** |"
        for (si = 1; si <= ns; si++) printf " **%s** |", per(tot[c, S[si]])
        printf "\n| context switches, voluntary |"
        for (si = 1; si <= ns; si++) printf " %s |", per(v[c, S[si], "#voluntary"])
        printf "\n| context switches, involuntary |"
        for (si = 1; si <= ns; si++) printf " %s |", per(v[c, S[si], "#involuntary"])
        printf "\n| **context switches** |"
        for (si = 1; si <= ns; si++) printf " **%s** |", per(v[c, S[si], "#voluntary"] + v[c, S[si], "#involuntary"])
        printf "\n| CPU µs (untraced, 10 ms ticks) |"
        for (si = 1; si <= ns; si++) printf " %s |", per(v[c, S[si], "#cpu_us"])
        printf "\n| threads (at the end) |"
        for (si = 1; si <= ns; si++) printf " %s |", v[c, S[si], "#threads"]
        printf "\n"
      }
    }' "$RAW"
} >"$WORK/syscalls.md"
cp "$WORK/syscalls.md" "$OUT/syscalls.md"
cat "$WORK/syscalls.md"
exit $status
