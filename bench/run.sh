#!/usr/bin/env bash
# bench/run.sh: proxsmtpd's benchmark.
#
#   bench/run.sh [--smoke] [--runs N] [--only SCENARIOS] [--setups SETUPS]
#                [--secs S] [--msgs N] [--profile perf|callgrind] [--out DIR]
#                [--no-install] [OURS_BINARY]
#
# Runs every scenario for each setup, interleaved round by round in one run:
#   original  the C proxsmtpd 1.10 (/usr/sbin/proxsmtpd, Debian package proxsmtp)
#   ours      OURS_BINARY (default: target/release/proxsmtpd of this tree)
#   ours2     only when named in --setups: the executable BENCH_OURS2 (another
#             build, or a script that execs one with other settings in its
#             environment), run as ours is, to compare two builds in one run;
#             it runs in the scenarios without a milter, rspamd or a hook. It is
#             copied as ours is; the binary a script execs is not, so keep that
#             one out of target/ while the run lasts
#   relay     in the scenarios without a filter: a byte relay that knows nothing
#             of SMTP (examples/byte_relay.rs), the floor of any TCP proxy here;
#             in the slow-hook scenarios the same relay holding each message's
#             end as long as the hook waits (--hold-dot-ms): the floor of any
#             proxy whose filter takes that long
#   haproxy1  in the scenarios without a filter (sessions_2000 too): haproxy
#   haproxy2  (Debian package haproxy) in TCP mode with nbthread 1 and 2, from
#             a generated config (no logging), the bar a fast TCP proxy sets;
#             the ratio ours/haproxy takes the faster of the two in each round
#   direct    smtp-source -> smtp-sink with no proxy (the machine's SMTP limit)
#   spawn     in the filter scenarios only: the spawn limit, the rate at which
#             this machine runs `sh -c cat` on the same message size at the
#             same concurrency, with no SMTP at all (spawn.py)
#   nofilter  in the milter and hook scenarios only: ours with no filter, no milter,
#             no hook: the base their cost is measured against
#   rspamc    in the rspamd scenarios only: rspamd scanning the same message
#             the same number of times at the same concurrency, sent by
#             rspamc (rspamd's own client) to its normal worker, no SMTP
# Load: Postfix's smtp-source, one connection per message; upstream: smtp-sink.
# The milter scenarios run ours with `Milters:` pointing at a null milter
# (examples/null_milter.rs, every stage answered "continue"); the rspamd
# scenarios at rspamd (Debian package rspamd) in milter mode, started once from
# a generated config (local rules only: no redis, no DNS, no network). rspamd
# takes about half a minute to start, so --smoke leaves its scenarios out
# unless --only names them.
# The hook scenarios run ours with `Hooks:` pointing at a null HTTP hook
# (examples/null_hook.rs, every request answered {"action":"accept"}) against
# nofilter; hook_sleep50_c32 has the hook wait 50 ms before each answer and
# compares ours with the ideal rate, concurrency / 50 ms (ideal_mps), and with
# the byte relay holding each message 50 ms (what this machine allows any proxy);
# hook_jitter50_c32 the same with each wait drawn between 25 and 75 ms (mean 50),
# as a real service's answers vary. --smoke
# runs hook_c1_4k and hook_sleep50_c32 (with the holding relay) only, unless
# --only names the others.
# Everything listens on 127.0.0.1 only.
#
# Prints medians and ratios as markdown tables on stdout (progress on stderr)
# and writes, under --out (default bench/results):
#   latest.tsv         medians, one row per scenario and setup
#   latest-ratios.tsv  ratios (median over rounds of the ratio in a round), targets
#   latest-runs.tsv    every run
#   latest-meta.txt    the machine, the load, the versions
#   latest.md          the printed tables
# (bench/report.py --runs OUT/latest-runs.tsv --meta OUT/latest-meta.txt
#  --out OUT renders them again.)
# (--smoke writes smoke*.tsv / smoke.md instead.) BENCHMARKS.md explains them.
#
# --smoke: one tiny run of every scenario, for ours, relay, haproxy1, haproxy2,
# direct and spawn unless --setups says otherwise; checks that each completes
# with no error and says nothing about speed (it takes about 25 s). Exit
# status: 0 when no run of ours, of the relay, of haproxy, of the direct path
# or of the spawn driver had an error, 1 otherwise
# (the original's errors are reported, not fatal: it is the reference, and
# cannot hold 2,000 sessions), 2 on bad usage or a missing tool.
#
# --profile perf|callgrind: one run per scenario of ours only, with a fixed
# message count (--msgs, default 200 at concurrency 1 and 1000 at 32), while
# `perf record` samples the proxy or the proxy runs under callgrind; the
# profiles land in OUT/profile/. Figures from such a run mean nothing.
#
# SCENARIOS is a comma-separated list of names or shell patterns (cat_*).
# Environment: BENCH_PORT (first port tried for the proxy, default 24525; the
# sink uses the next one).
set -u -o pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
ORIGINAL=/usr/sbin/proxsmtpd
HAPROXY=/usr/sbin/haproxy
SOURCE=/usr/sbin/smtp-source
SINK=/usr/sbin/smtp-sink
RSPAMD=/usr/bin/rspamd
RSPAMC=/usr/bin/rspamc
HOST=127.0.0.1

SMOKE=0 RUNS=5 ONLY="" SETUPS="" SECS=2 INSTALL=1 MSGS="" PROFILE=""
OUT=$HERE/results OURS=$ROOT/target/release/proxsmtpd
RELAY=$ROOT/target/release/examples/byte_relay
MILTER=$ROOT/target/release/examples/null_milter
NULL_HOOK=$ROOT/target/release/examples/null_hook

# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh"

while [ $# -gt 0 ]; do
  case $1 in
    --smoke) SMOKE=1 ;;
    --runs) RUNS=${2:?--runs needs a number}; shift ;;
    --only) ONLY=${2:?--only needs scenario names}; shift ;;
    --setups) SETUPS=${2:?--setups needs a list}; shift ;;
    --secs) SECS=${2:?--secs needs seconds}; shift ;;
    --msgs) MSGS=${2:?--msgs needs a number}; shift ;;
    --profile) PROFILE=${2:?--profile needs perf or callgrind}; shift ;;
    --out) OUT=${2:?--out needs a directory}; shift ;;
    --no-install) INSTALL=0 ;;
    -h|--help) usage 0 ;;
    -*) echo "run.sh: unknown option $1" >&2; usage 2 ;;
    *) OURS=$1 ;;
  esac
  shift
done
case $RUNS in ''|*[!0-9]*|0) echo "run.sh: --runs must be a positive integer" >&2; exit 2 ;; esac
case $SECS in ''|*[!0-9.]*|*.*.*) echo "run.sh: --secs must be a number of seconds" >&2; exit 2 ;; esac
case $MSGS in ''|[1-9]|[1-9]*[0-9]) ;; *) echo "run.sh: --msgs must be a positive integer" >&2; exit 2 ;; esac
case $PROFILE in ''|perf|callgrind) ;; *) echo "run.sh: --profile takes perf or callgrind" >&2; exit 2 ;; esac
# The smoke run checks our binary and the harness, so by default it leaves
# out the original (whose c32 runs alone take seconds: its listen backlog is 5).
if [ -z "$SETUPS" ]; then
  if [ -n "$PROFILE" ]; then SETUPS=ours
  elif [ $SMOKE = 1 ]; then SETUPS="ours,nofilter,relay,haproxy1,haproxy2,direct,spawn,rspamc"
  else SETUPS="original,ours,nofilter,relay,haproxy1,haproxy2,direct,spawn,rspamc"; fi
fi
SETUPS=${SETUPS//,/ }
for s in $SETUPS; do
  case $s in original|ours|ours2|nofilter|relay|haproxy1|haproxy2|direct|spawn|rspamc) ;; *) echo "run.sh: unknown setup $s" >&2; exit 2 ;; esac
done
has_setup() { [[ " $SETUPS " == *" $1 "* ]]; }
has_haproxy() { has_setup haproxy1 || has_setup haproxy2; }

# --- scenarios --------------------------------------------------------------
# name            kind      concurrency  body bytes  filter
SCENARIO_TABLE="
nofilter_c1_1k    smtp      1            1024        none
nofilter_c32_1k   smtp      32           1024        none
cat_c1_4k         smtp      1            4096        pipe
cat_c32_4k        smtp      32           4096        pipe
file_c1_4k        smtp      1            4096        file
file_c32_4k       smtp      32           4096        file
big_cat_20m       smtp      1            20000000    pipe
sessions_2000     sessions  2000         0           none
sessions_10000    sessions  10000        0           none
milter_c1_4k      smtp      1            4096        milter
milter_c32_4k     smtp      32           4096        milter
rspamd_c1_4k      smtp      1            4096        rspamd
rspamd_c32_4k     smtp      32           4096        rspamd
hook_c1_4k        smtp      1            4096        hook
hook_c32_4k       smtp      32           4096        hook
hook_sleep50_c32  smtp      32           4096        hook50
hook_jitter50_c32 smtp      32           4096        hook50j
"
# The file filter is a scanner's minimum: it reads the whole spooled message
# and accepts it. It has shell syntax, so every proxy runs it through /bin/sh.
# shellcheck disable=SC2016  # $EMAIL is for the filter's shell, not this one
FILE_FILTER='cat "$EMAIL" >/dev/null'

declare -A KIND CONC SIZE FILTER
NAMES=()
while read -r name kind conc size filter; do
  [ -z "$name" ] && continue
  if [ -n "$ONLY" ]; then
    keep=0
    for pat in ${ONLY//,/ }; do
      # shellcheck disable=SC2053  # patterns are wanted here
      [[ $name == $pat ]] && keep=1
    done
    [ $keep = 1 ] || continue
  fi
  # rspamd's start (about 30 s) would triple the smoke run, and 10,000 sessions
  # take half a minute to open: only when named.
  if [ $SMOKE = 1 ] && [ -z "$ONLY" ] && { [ "$filter" = rspamd ] || [ "$name" = sessions_10000 ]; }; then continue; fi
  # One hook scenario checks the hook path, one the slow hook and the holding
  # relay; the others measure speed only.
  if [ $SMOKE = 1 ] && [ -z "$ONLY" ] && [ "${filter#hook}" != "$filter" ] &&
     [ "$name" != hook_c1_4k ] && [ "$name" != hook_sleep50_c32 ]; then continue; fi
  NAMES+=("$name"); KIND[$name]=$kind CONC[$name]=$conc SIZE[$name]=$size FILTER[$name]=$filter
done <<<"$SCENARIO_TABLE"
[ ${#NAMES[@]} -gt 0 ] || { echo "run.sh: --only '$ONLY' matches no scenario" >&2; exit 2; }
has_filter() { # some scenario of this run has this filter
  local n
  for n in "${NAMES[@]}"; do [ "${FILTER[$n]}" = "$1" ] && return 0; done
  return 1
}
hook_delay_ms() { # filter -> the null hook's mean delay before each answer (ms)
  case $1 in hook50|hook50j) echo 50 ;; *) echo 0 ;; esac
}
hook_jitter_ms() { # filter -> how far each delay may be from the mean (ms)
  case $1 in hook50j) echo 25 ;; *) echo 0 ;; esac
}
has_hook() { has_filter hook || has_filter hook50 || has_filter hook50j; }

if [ $SMOKE = 1 ]; then
  RUNS=1
  SESSIONS=50           # sessions held open in a sessions scenario
  PROBES=5              # new clients timed to their greeting while they are open
  RUN_MAX_S=20          # a tiny run that takes this long has hung
  LAT_SECS=0.5 SPAWN_SECS=0.5
  PREFIX=smoke
else
  SESSIONS=""           # as the scenario says
  PROBES=100
  RUN_MAX_S=300
  LAT_SECS=$SECS SPAWN_SECS=$SECS
  PREFIX=latest
fi
LISTEN_WAIT=100         # times 0.05 s for a proxy to listen
if [ -n "$PROFILE" ]; then
  RUNS=1 PREFIX=profile LISTEN_WAIT=600 RUN_MAX_S=900
  command -v "${PROFILE/callgrind/valgrind}" >/dev/null ||
    { echo "run.sh: $PROFILE not found (apt-get install ${PROFILE/callgrind/valgrind})" >&2; exit 2; }
fi
MAX_MSGS=60000

# --- tools --------------------------------------------------------------------
install_missing() {
  local pkgs=()
  { [ -x "$SOURCE" ] && [ -x "$SINK" ]; } || pkgs+=(postfix)
  if has_setup original && [ ! -x "$ORIGINAL" ]; then pkgs+=(proxsmtp); fi
  if has_haproxy && [ ! -x "$HAPROXY" ]; then pkgs+=(haproxy); fi
  if has_filter rspamd && { [ ! -x "$RSPAMD" ] || [ ! -x "$RSPAMC" ]; }; then pkgs+=(rspamd); fi
  command -v ps >/dev/null || pkgs+=(procps)
  [ -x /usr/bin/time ] || pkgs+=(time)
  command -v ss >/dev/null || pkgs+=(iproute2)
  command -v timeout >/dev/null || pkgs+=(coreutils)
  command -v python3 >/dev/null || pkgs+=(python3)
  [ ${#pkgs[@]} -eq 0 ] && return 0
  if [ $INSTALL = 0 ] || [ "$(id -u)" != 0 ]; then
    echo "run.sh: missing packages: ${pkgs[*]} (install them as root, e.g. apt-get install ${pkgs[*]})" >&2
    return 1
  fi
  echo "run.sh: installing ${pkgs[*]}" >&2
  # Postfix is wanted only for smtp-source and smtp-sink: leave it
  # unconfigured and keep its daemon (and haproxy's) from being started by
  # the install.
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections 2>/dev/null
  local policy=/usr/sbin/policy-rc.d made_policy=0 rc
  if [ ! -e $policy ]; then
    printf '#!/bin/sh\nexit 101\n' >$policy && chmod 755 $policy && made_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y --no-install-recommends "${pkgs[@]}" >&2 ||
    { apt-get update >&2 && apt-get install -y --no-install-recommends "${pkgs[@]}" >&2; }
  rc=$?
  [ $made_policy = 1 ] && rm -f $policy
  return $rc
}
install_missing || exit 2
if has_setup ours && [ ! -x "$OURS" ]; then
  echo "run.sh: $OURS is not an executable (build it with: cargo build --release)" >&2
  exit 2
fi
if has_setup ours2 && [ ! -x "${BENCH_OURS2:-}" ]; then
  echo "run.sh: setup ours2 needs BENCH_OURS2, an executable" >&2
  exit 2
fi
if has_setup relay && [ ! -x "$RELAY" ]; then
  echo "run.sh: building the byte relay (cargo build --release --example byte_relay)" >&2
  (cd "$ROOT" && cargo build --release --example byte_relay >&2) ||
    { echo "run.sh: $RELAY is missing and could not be built" >&2; exit 2; }
fi
if has_filter milter && [ ! -x "$MILTER" ]; then
  echo "run.sh: building the null milter (cargo build --release --example null_milter)" >&2
  (cd "$ROOT" && cargo build --release --example null_milter >&2) ||
    { echo "run.sh: $MILTER is missing and could not be built" >&2; exit 2; }
fi

if has_hook && [ ! -x "$NULL_HOOK" ]; then
  echo "run.sh: building the null hook (cargo build --release --example null_hook)" >&2
  (cd "$ROOT" && cargo build --release --example null_hook >&2) ||
    { echo "run.sh: $NULL_HOOK is missing and could not be built" >&2; exit 2; }
fi

# --- work area, ports, cleanup -------------------------------------------------
WORK=$(mktemp -d /tmp/proxsmtpd-bench.XXXXXX) || exit 2
mkdir -p "$WORK/spool" "$OUT" || exit 2
chmod 755 "$WORK"
RUNLOG=$WORK/runs.txt
: >"$RUNLOG"
# Run a copy of ours, so that a rebuild during the run cannot mix two binaries.
OURS_SHA=none
if has_setup ours; then
  cp "$OURS" "$WORK/proxsmtpd" || exit 2
  OURS_SHA=$(sha256sum "$WORK/proxsmtpd" | cut -c1-16)
fi
OURS2_SHA=none
if has_setup ours2; then
  cp "$BENCH_OURS2" "$WORK/proxsmtpd2" || exit 2
  OURS2_SHA=$(sha256sum "$WORK/proxsmtpd2" | cut -c1-16)
fi
if has_setup relay; then cp "$RELAY" "$WORK/byte_relay" || exit 2; fi
if has_filter milter; then cp "$MILTER" "$WORK/null_milter" || exit 2; fi
if has_hook; then cp "$NULL_HOOK" "$WORK/null_hook" || exit 2; fi
HOOK_PID="" HOOK_DELAY=""
SINK_PID="" PROXY_PID="" CHILD_PID="" PERF_PID="" MILTER_PID="" RSPAMD_PID=""

# shellcheck disable=SC2317,SC2329  # called by the EXIT trap
cleanup() {
  stop_pid "$CHILD_PID"; stop_pid "$PERF_PID"; stop_pid "$PROXY_PID"; stop_pid "$SINK_PID"
  stop_pid "$MILTER_PID"; stop_pid "$RSPAMD_PID"
  stop_pid "$HOOK_PID"
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

# 2,000 sessions through a proxy take 4,000 descriptors in it and 2,000 in
# the sink and in the client; children inherit the limit.
hard=$(ulimit -Hn)
if [ "$hard" = unlimited ] || [ "$hard" -ge 65536 ]; then ulimit -n 65536; else ulimit -n "$hard"; fi
MOST_SESSIONS=${SESSIONS:-0}
for n in "${NAMES[@]}"; do
  if [ -z "$SESSIONS" ] && [ "${KIND[$n]}" = sessions ] && [ "${CONC[$n]}" -gt "$MOST_SESSIONS" ]; then
    MOST_SESSIONS=${CONC[$n]}
  fi
done
# A proxy holds two descriptors per session. Where the hard limit is lower
# (and cannot be raised without CAP_SYS_RESOURCE), a sessions scenario holds
# what fits, in hundreds, and its report says how many were held.
FD_SESSIONS=$(( ($(ulimit -n) - 256) / 2 / 100 * 100 ))
if [ "$FD_SESSIONS" -lt "$MOST_SESSIONS" ]; then
  echo "run.sh: warning: open-file limit $(ulimit -n) holds $FD_SESSIONS sessions through a proxy, not $MOST_SESSIONS" >&2
fi

PPORT=${BENCH_PORT:-24525}
# Five ports: the proxy, the sink, the null milter, rspamd's normal worker
# (rspamc's) and its milter worker.
ports_busy() { local i; for i in 0 1 2 3 4; do listening $(($1 + i)) && return 0; done; return 1; }
for _ in $(seq 30); do
  ports_busy "$PPORT" || break
  PPORT=$((PPORT + 10))
done
SPORT=$((PPORT + 1)) MPORT=$((PPORT + 2)) RNPORT=$((PPORT + 3)) RMPORT=$((PPORT + 4))
if ports_busy "$PPORT"; then echo "run.sh: no five free ports found" >&2; exit 2; fi

# The null hook's port: the first free one of the five above the proxy's.
HPORT=""
if has_hook; then
  for i in 5 6 7 8 9; do listening $((PPORT + i)) || { HPORT=$((PPORT + i)); break; }; done
  [ -n "$HPORT" ] || { echo "run.sh: no free port for the null hook" >&2; exit 2; }
fi
start_hook() { # delay_ms jitter_ms -> HOOK_PID (the null hook with those), or returns 1
  [ -n "$HOOK_PID" ] && [ "$HOOK_DELAY" = "$1/$2" ] && return 0
  stop_pid "$HOOK_PID"; HOOK_PID=""
  for _ in $(seq 40); do listening "$HPORT" || break; sleep 0.05; done
  "$WORK/null_hook" --listen "$HOST:$HPORT" --delay-ms "$1" --jitter-ms "$2" \
    >>"$WORK/null_hook.log" 2>&1 &
  HOOK_PID=$! HOOK_DELAY=$1/$2
  wait_listen "$HPORT" "$HOOK_PID" && return 0
  echo "run.sh: the null hook did not listen on $HPORT:" >&2
  tail -5 "$WORK/null_hook.log" >&2
  stop_pid "$HOOK_PID"; HOOK_PID=""
  return 1
}

START_S=$SECONDS

sink_alive() { # restarts the sink if it has gone; false if it had
  kill -0 "$SINK_PID" 2>/dev/null && return 0
  wait "$SINK_PID" 2>/dev/null
  echo "run.sh: smtp-sink exited (status $?): $(tail -2 "$WORK/sink.err" | tr '\n' ' ')" >&2
  start_sink
  return 1
}
binary_of() { case $1 in original) echo "$ORIGINAL" ;; ours|nofilter) echo "$WORK/proxsmtpd" ;; ours2) echo "$WORK/proxsmtpd2" ;; esac; }

start_milter() { # the null milter -> MILTER_PID
  "$WORK/null_milter" "$HOST:$MPORT" >>"$WORK/null_milter.log" 2>&1 &
  MILTER_PID=$!
  wait_listen "$MPORT" "$MILTER_PID" || {
    echo "run.sh: the null milter did not listen on $MPORT:" >&2; cat "$WORK/null_milter.log" >&2; exit 2;
  }
}

# rspamd from a generated config: rspamd's own rules (lua/regexp, local
# checks only) and the metrics, actions and groups of the Debian package; no
# redis, a DNS server that answers nothing (127.0.0.1:1, so no lookup leaves
# the machine), no hyperscan (its compile at start takes minutes on two cores;
# the rules then run on PCRE). A normal worker for rspamc and a proxy worker
# in milter mode that scans itself, each with one process per CPU (rspamd's
# default for the normal worker).
start_rspamd() { # -> RSPAMD_PID; false when it does not come up
  local d=$WORK/rspamd user=() n
  n=$(nproc)
  mkdir -p "$d"; chmod 777 "$d"
  [ "$(id -u)" = 0 ] && user=(-u root -g root)
  cat >"$d/rspamd.conf" <<EOF_RSPAMD
lua = "/usr/share/rspamd/rules/rspamd.lua";
.include "/etc/rspamd/metrics.conf"
.include "/etc/rspamd/actions.conf"
.include "/etc/rspamd/groups.conf"
options {
  pidfile = "$d/rspamd.pid";
  filters = "regexp,chartable";
  dbdir = "$d";
  cache_file = "$d/symbols.cache";
  hs_cache_dir = "$d";
  disable_hyperscan = true;
  stats_file = "$d/stats.ucl";
  history_file = "$d/history";
  dynamic_conf = "$d/dynamic";
  control_socket = "$d/rspamd.sock mode=0600";
  tempdir = "$d";
  url_tld = "/usr/share/rspamd/effective_tld_names.dat";
  explicit_modules = [];
  dns { nameserver = ["127.0.0.1:1"]; timeout = 100ms; retransmits = 0; }
  task_timeout = 8s;
}
logging { type = "file"; filename = "$d/rspamd.log"; level = "error"; }
worker "normal" { bind_socket = "$HOST:$RNPORT"; count = $n; }
worker "rspamd_proxy" {
  bind_socket = "$HOST:$RMPORT";
  count = $n;
  milter = yes;
  timeout = 120s;
  upstream "local" { default = yes; self_scan = yes; }
}
EOF_RSPAMD
  echo "run.sh: starting rspamd (about 30 s)" >&2
  "$RSPAMD" -f -i -c "$d/rspamd.conf" "${user[@]}" >>"$d/out.log" 2>&1 &
  RSPAMD_PID=$!
  if ! LISTEN_WAIT=3600 wait_listen "$RMPORT" "$RSPAMD_PID" ||
     ! LISTEN_WAIT=600 wait_listen "$RNPORT" "$RSPAMD_PID"; then
    echo "run.sh: rspamd did not listen on $RMPORT and $RNPORT:" >&2
    tail -5 "$d/out.log" "$d/rspamd.log" >&2
    stop_pid "$RSPAMD_PID"; RSPAMD_PID=""
    return 1
  fi
}

tree_ticks() { # pid -> clock ticks of it and its children (each with all threads)
  local t=0 p s
  [ -n "$1" ] || { echo 0; return; }
  for p in $1 $(pgrep -P "$1" 2>/dev/null); do s=$(cpu_ticks "$p"); t=$((t + ${s%% *})); done
  echo $t
}
filter_ticks() { # filter: CPU of the milter it stands for (no process of the proxy's)
  case $1 in
    milter) tree_ticks "$MILTER_PID" ;;
    rspamd) tree_ticks "$RSPAMD_PID" ;;
    hook|hook50|hook50j) tree_ticks "$HOOK_PID" ;;
    *) echo 0 ;;
  esac
}

# haproxy_conf (bench/lib.sh) runs haproxy with -db: one process in the
# foreground, so that PROXY_PID is haproxy itself and stop_pid ends it.
start_proxy() { # setup filter -> PROXY_PID, or returns 1
  local bin conf=$WORK/proxy.conf wrap=()
  bin=$(binary_of "$1")
  if [ "$PROFILE" = callgrind ] && [ "$1" = ours ]; then
    # callgrind runs the proxy in the same process: PROXY_PID stays its pid.
    wrap=(valgrind --tool=callgrind --quiet "--callgrind-out-file=$OUT/profile/callgrind.$SCENARIO.out")
  fi
  {
    echo "Listen: $HOST:$PPORT"
    echo "OutAddress: $HOST:$SPORT"
    # The highest MaxConnections allowed: 10,000 sessions held and the probes beside.
    echo "MaxConnections: 10239"
    echo "TempDirectory: $WORK/spool"
    case $2 in
      pipe) echo "FilterType: pipe"; echo "FilterCommand: cat" ;;
      file) echo "FilterType: file"; echo "FilterCommand: $FILE_FILTER" ;;
      milter) echo "Milters: inet:$HOST:$MPORT{name=null}" ;;
      rspamd) echo "Milters: inet:$HOST:$RMPORT{name=rspamd}" ;;
      # HookConcurrency as the load's concurrency (its default): no call waits for a slot.
      hook|hook50|hook50j)
        echo "Hooks: http://$HOST:$HPORT/check{name=null}"; echo "HookConcurrency: 32" ;;
    esac
  } >"$conf"
  echo "=== $(date -u +%T) $1 $2" >>"$WORK/proxy-$1.log"
  # The port must be free: a listener left over would pass wait_listen below.
  for _ in $(seq 40); do listening "$PPORT" || break; sleep 0.05; done
  if listening "$PPORT"; then
    echo "run.sh: port $PPORT is still in use before starting $1" >&2
    return 1
  fi
  if [ "$1" = relay ]; then
    # In the slow-hook scenarios the relay holds each message's end as long as the hook
    # takes: the floor of any proxy with that filter.
    "$WORK/byte_relay" "$HOST:$PPORT" "$HOST:$SPORT" --hold-dot-ms "$(hook_delay_ms "$2")" \
      --hold-jitter-ms "$(hook_jitter_ms "$2")" >>"$WORK/proxy-$1.log" 2>&1 &
  elif [ "${1#haproxy}" != "$1" ]; then
    haproxy_conf "${1#haproxy}" "$WORK/haproxy.cfg"
    "$HAPROXY" -db -f "$WORK/haproxy.cfg" >>"$WORK/proxy-$1.log" 2>&1 &
  else
    "${wrap[@]}" "$bin" -d 1 -f "$conf" -p "$WORK/proxy.pid" >>"$WORK/proxy-$1.log" 2>&1 &
  fi
  PROXY_PID=$!
  if ! wait_listen "$PPORT" "$PROXY_PID"; then
    echo "run.sh: $1 proxy did not listen on $PPORT:" >&2
    tail -5 "$WORK/proxy-$1.log" >&2
    stop_pid "$PROXY_PID"; PROXY_PID=""
    return 1
  fi
  if [ "$PROFILE" = perf ] && [ "$1" = ours ]; then
    perf record -q -F 499 --call-graph dwarf -p "$PROXY_PID" \
      -o "$OUT/profile/perf.$SCENARIO.data" >>"$WORK/perf.log" 2>&1 &
    PERF_PID=$!
    sleep 0.5  # perf attaches asynchronously
  fi
}
stop_proxy() {
  if [ -n "$PERF_PID" ]; then
    kill -INT "$PERF_PID" 2>/dev/null; wait "$PERF_PID" 2>/dev/null; PERF_PID=""
  fi
  stop_pid "$PROXY_PID"; PROXY_PID=""
}

cpu_ticks() { # pid -> "self children" clock ticks (all threads; reaped children)
  local s
  s=$(cat "/proc/$1/stat" 2>/dev/null) || { echo "0 0"; return; }
  s=${s##*) }
  # shellcheck disable=SC2086  # split into fields on purpose
  set -- $s
  echo "$(( ${12} + ${13} )) $(( ${14} + ${15} ))"
}
vm_kb() { awk -v k="$2:" '$1 == k {print $2}' "/proc/$1/status" 2>/dev/null; }
overflows() { # system-wide TcpExt ListenOverflows (SYNs dropped: accept queue full)
  awk '/^TcpExt:/ { if (!h) { n = split($0, k); h = 1 } else { split($0, v); for (i = 1; i <= n; i++) if (k[i] == "ListenOverflows") print v[i] } }' /proc/net/netstat
}
HZ=$(getconf CLK_TCK)

# Runs a helper in the background so that the EXIT trap can stop it.
run_child() { # timeout_s outfile cmd...
  local tmo=$1 out=$2 rc; shift 2
  timeout -k 2 "$tmo" "$@" >"$out" 2>&1 &
  CHILD_PID=$!
  wait "$CHILD_PID"; rc=$?
  CHILD_PID=""
  return $rc
}

# --- one run of each kind ---------------------------------------------------------
# Each sets RESULT to one line of key=value pairs. They run in this shell, not
# in $(...), so that the EXIT trap knows every process they start.
RESULT=""
run_smtp() { # scenario setup msgs
  local sc=$1 setup=$2 n=$3 conc=${CONC[$1]} size=${SIZE[$1]} port=$SPORT filter=${FILTER[$1]}
  local tmo rc c0="0 0" c1="0 0" rss=0 o0 o1 s0 s1 t0 t1 lat="" err="" errors=0 f0 f1
  tmo=$RUN_MAX_S
  [ "$conc" -gt "$n" ] && conc=$n
  [ "$setup" = nofilter ] && filter=none
  if [ "$setup" != direct ]; then
    start_proxy "$setup" "$filter" ||
      { RESULT="scenario=$sc setup=$setup msgs=$n errors=1 error=proxy_did_not_start"; return; }
    port=$PPORT
    c0=$(cpu_ticks "$PROXY_PID")
  fi
  s0=$(sink_count); o0=$(overflows); f0=$(filter_ticks "$filter")
  t0=$EPOCHREALTIME
  run_child "$tmo" "$WORK/source.out" "$SOURCE" -s "$conc" -m "$n" -l "$size" -M bench.example \
    -f sender@bench.example -t rcpt@bench.example "$HOST:$port"
  rc=$?
  t1=$EPOCHREALTIME
  o1=$(overflows); f1=$(filter_ticks "$filter")
  if [ -n "$PROXY_PID" ]; then
    c1=$(cpu_ticks "$PROXY_PID")
    rss=$(vm_kb "$PROXY_PID" VmHWM)
  fi
  # smtp-sink counts a message when it sees the final dot: every one must arrive.
  for _ in $(seq 40); do
    s1=$(sink_count)
    [ $(( ${s1:-0} - ${s0:-0} )) -ge "$n" ] && break
    sleep 0.05
  done
  if [ $rc -ne 0 ]; then
    errors=1; err="smtp-source_rc_$rc:$(tail -1 "$WORK/source.out" | tr -c 'A-Za-z0-9:._\n-' '_' | cut -c1-80)"
  elif [ $(( ${s1:-0} - ${s0:-0} )) -ne "$n" ]; then
    errors=1; err="sink_got_$(( ${s1:-0} - ${s0:-0} ))_of_$n"
  fi
  # Latency at concurrency 1: sequential messages from the latency client
  # (not when profiling, so that a profile's counts are smtp-source's messages).
  if [ "$conc" = 1 ] && [ "$size" -le 65536 ] && [ $errors = 0 ] && [ -z "$PROFILE" ]; then
    if run_child "$tmo" "$WORK/latency.out" python3 "$HERE/latency.py" --port "$port" \
         --size "$size" --secs "$LAT_SECS" --count 20000; then
      lat=$(tail -1 "$WORK/latency.out")
    else
      errors=1; err="latency:$(tail -1 "$WORK/latency.out" | tr ' ' '_' | cut -c1-80)"
    fi
  fi
  stop_proxy
  RESULT=$(awk -v sc="$sc" -v setup="$setup" -v n="$n" -v conc="$conc" -v t0="$t0" -v t1="$t1" \
      -v c0="$c0" -v c1="$c1" -v hz="$HZ" -v rss="${rss:-0}" -v o0="${o0:-0}" -v o1="${o1:-0}" \
      -v errors="$errors" -v err="$err" -v lat="$lat" -v f0="$f0" -v f1="$f1" 'BEGIN {
    split(c0, a, " "); split(c1, b, " ");
    secs = t1 - t0; if (secs <= 0) secs = 1e-6
    # A milter is the filter of its scenario: its CPU counts as the filter CPU.
    self = (b[1] - a[1]) / hz; kids = (b[2] - a[2] + f1 - f0) / hz
    printf "scenario=%s setup=%s msgs=%d conc=%d secs=%.4f mps=%.2f cpu_self_s=%.3f cpu_child_s=%.3f", sc, setup, n, conc, secs, n / secs, self, kids
    printf " cpu_us_per_msg=%.1f child_us_per_msg=%.1f rss_kb=%d overflows=%d errors=%d", self * 1e6 / n, kids * 1e6 / n, rss, o1 - o0, errors
    if (lat != "") printf " %s", lat
    if (err != "") printf " error=%s", err
    printf "\n" }')
}

# rspamd alone: rspamc sends the message N times to rspamd's normal worker,
# CONC requests at a time, with the envelope smtp-source gives the proxy; the
# message is what smtp-source sends (its headers and SIZE bytes of X lines).
run_rspamc() { # scenario msgs
  local sc=$1 n=$2 conc=${CONC[$1]} size=${SIZE[$1]} dir=$WORK/rspamc tmo rc t0 t1 r0 r1 got err="" errors=0
  local args=() i
  tmo=$RUN_MAX_S
  [ "$conc" -gt "$n" ] && conc=$n
  mkdir -p "$dir"
  awk -v size="$size" 'BEGIN {
    printf "From: <sender@bench.example>\nTo: <rcpt@bench.example>\n"
    printf "Date: Mon,  7 Dec 2026 12:00:00 +0000 (UTC)\nMessage-Id: <1.0001.0000@bench.example>\n\n"
    for (left = size; left > 0; left -= 80) {
      line = ""; w = (left >= 80) ? 79 : left - 1
      for (j = 0; j < w; j++) line = line "X"
      print line
    } }' >"$dir/m"
  for ((i = 0; i < n; i++)); do args+=(m); done
  r0=$(tree_ticks "$RSPAMD_PID")
  t0=$EPOCHREALTIME
  # Relative names (env -C) keep 60,000 of them within the argument limit.
  run_child "$tmo" "$dir/out" env -C "$dir" "$RSPAMC" -h "$HOST:$RNPORT" -n "$conc" -t 60 \
    -F sender@bench.example -r rcpt@bench.example -i "$HOST" --helo bench.example "${args[@]}"
  rc=$?
  t1=$EPOCHREALTIME
  r1=$(tree_ticks "$RSPAMD_PID")
  got=$(grep -c '^Action:' "$dir/out")
  if [ $rc -ne 0 ]; then
    errors=1; err="rspamc_rc_$rc:$(tail -1 "$dir/out" | tr -c 'A-Za-z0-9:._\n-' '_' | cut -c1-80)"
  elif [ "${got:-0}" -ne "$n" ]; then
    errors=1; err="rspamc_scanned_${got:-0}_of_$n"
  fi
  RESULT=$(awk -v sc="$sc" -v n="$n" -v conc="$conc" -v t0="$t0" -v t1="$t1" -v r0="$r0" -v r1="$r1" \
      -v hz="$HZ" -v errors="$errors" -v err="$err" 'BEGIN {
    secs = t1 - t0; if (secs <= 0) secs = 1e-6
    kids = (r1 - r0) / hz
    printf "scenario=%s setup=rspamc msgs=%d conc=%d secs=%.4f mps=%.2f cpu_child_s=%.3f child_us_per_msg=%.1f errors=%d", sc, n, conc, secs, n / secs, kids, kids * 1e6 / n, errors
    if (err != "") printf " error=%s", err
    printf "\n" }')
}
run_measured() { # scenario setup msgs: one timed run of an smtp scenario
  if [ "$2" = rspamc ]; then run_rspamc "$1" "$3"; else run_smtp "$1" "$2" "$3"; fi
  # A hook that waits D ms per answer (on average) allows at most CONC / D messages a second.
  local d
  d=$(hook_delay_ms "${FILTER[$1]}")
  if [ "$d" != 0 ]; then RESULT="$RESULT ideal_mps=$(( ${CONC[$1]} * 1000 / d ))"; fi
}

run_sessions() { # scenario setup
  local sc=$1 setup=$2 port=$SPORT pid=0 tmo line rc rss="" count=${SESSIONS:-${CONC[$1]}}
  [ "$count" -gt "$FD_SESSIONS" ] && count=$FD_SESSIONS
  # Four at a time as the original's listen backlog (5) allows; the scenario
  # beyond its reach opens sixteen at a time.
  local conc=4
  [ "$count" -gt 2000 ] && conc=16
  tmo=$RUN_MAX_S
  if [ "$setup" != direct ]; then
    start_proxy "$setup" none ||
      { RESULT="scenario=$sc setup=$setup errors=1 error=proxy_did_not_start"; return; }
    port=$PPORT pid=$PROXY_PID
  fi
  run_child "$tmo" "$WORK/sessions.out" python3 "$HERE/sessions.py" --port "$port" \
    --upstream-port "$SPORT" --count "$count" --probes "$PROBES" --connect-conc "$conc" \
    --pid "$pid" --deadline $((tmo - 3))
  rc=$?
  line=$(tail -1 "$WORK/sessions.out")
  [ "$pid" != 0 ] && rss=$(vm_kb "$pid" VmHWM)
  if [ "$pid" != 0 ] && ! kill -0 "$pid" 2>/dev/null; then line="$line proxy_died=1"; fi
  stop_proxy
  case $line in *errors=*) ;; *) line="errors=1 error=sessions_rc_$rc" ;; esac
  [ $rc -ne 0 ] && case $line in *errors=0*) line="${line/errors=0/errors=1}" ;; esac
  RESULT="scenario=$sc setup=$setup rss_kb=${rss:-nan} $line"
}

run_spawn() { # scenario
  local sc=$1 tmo line
  tmo=$RUN_MAX_S
  if run_child "$tmo" "$WORK/spawn.out" python3 "$HERE/spawn.py" --conc "${CONC[$sc]}" \
       --size "${SIZE[$sc]}" --secs "$SPAWN_SECS" --command cat; then
    line=$(tail -1 "$WORK/spawn.out")
  else
    line="$(tail -1 "$WORK/spawn.out") errors=1"
  fi
  RESULT="scenario=$sc setup=spawn $line"
}

field() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<" $2"; }

# Message count for one smtp run: about SECS seconds, at least two messages
# per session. Probe runs double as warm-up and are not recorded: the first
# one is never trusted alone (a cold start can be ten times slower).
NMSG=0
calibrate() { # scenario setup -> NMSG
  local sc=$1 setup=$2 conc=${CONC[$1]} n line secs floor k
  if [ "${SIZE[$sc]}" -gt 1000000 ]; then NMSG=1; return; fi
  floor=$(( conc > 1 ? 2 * conc : 10 ))
  if [ -n "$MSGS" ]; then NMSG=$MSGS; return; fi
  if [ -n "$PROFILE" ]; then NMSG=$(( conc > 1 ? 1000 : 200 )); return; fi
  if [ $SMOKE = 1 ]; then NMSG=$(( conc > 1 ? conc : 5 )); return; fi
  n=$(( floor > 20 ? floor : 20 ))
  for k in 1 2 3 4; do
    run_measured "$sc" "$setup" "$n"; line=$RESULT
    echo "probe: $line" >&2
    secs=$(field secs "$line")
    [ "$(field errors "$line")" = 0 ] || break
    awk -v s="${secs:-0}" -v k="$k" 'BEGIN { exit !((k >= 2 && s >= 0.3) || s >= 1.5) }' && break
    n=$(awk -v n="$n" -v s="${secs:-0}" -v lo="$floor" -v m=$MAX_MSGS 'BEGIN {
      f = (s > 0.003) ? 0.5 / s : 100; if (f > 100) f = 100; v = int(n * f) + 1
      if (v < lo) v = lo; print (v > m) ? m : v }')
  done
  NMSG=$(awk -v n="$n" -v s="${secs:-0}" -v t="$SECS" -v lo="$floor" -v hi=$MAX_MSGS 'BEGIN {
    v = (s > 0) ? int(n * t / s) : n; if (v < lo) v = lo; if (v > hi) v = hi; print v }')
}

# --- the run ----------------------------------------------------------------------
echo "run.sh: setups: $SETUPS; ours: $OURS; runs: $RUNS; ports $PPORT-$RMPORT; work $WORK" >&2
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
start_sink
has_filter milter && start_milter
only_setups() { # the setups of this run among $*
  local s out=""
  for s in $SETUPS; do [[ " $* " == *" $s "* ]] && out="$out $s"; done
  echo "$out"
}

record() { echo "round=$1 $2" >>"$RUNLOG"; echo "run: round=$1 $2" >&2; }

[ -n "$PROFILE" ] && mkdir -p "$OUT/profile"
for sc in "${NAMES[@]}"; do
  SCENARIO=$sc
  kind=${KIND[$sc]}
  setups_here=$SETUPS
  # The spawn limit belongs to the scenarios that spawn a filter per message,
  # the byte relay to the SMTP scenarios without a filter, haproxy to those
  # and to the sessions scenario. The milter scenarios compare ours with a
  # milter to ours without one (the original has no milters), the rspamd
  # scenarios ours with rspamd to rspamd alone.
  case ${FILTER[$sc]} in
    milter) setups_here=$(only_setups ours ours2 nofilter) ;;
    rspamd) setups_here=$(only_setups ours rspamc) ;;
    # The null hook against no filter; the slow hook against its ideal rate.
    hook) setups_here=$(only_setups ours ours2 nofilter) ;;
    # The slow hook against its ideal rate, and against the byte relay holding each
    # message as long (the floor of any proxy on this machine).
    hook50|hook50j) setups_here=$(only_setups ours ours2 relay) ;;
    *)
      setups_here=${setups_here/nofilter/} setups_here=${setups_here/rspamc/}
      if [ "${FILTER[$sc]}" = none ] || [ "${SIZE[$sc]}" -gt 1000000 ]; then
        setups_here=${setups_here/spawn/}
      fi
      if [ "${FILTER[$sc]}" != none ] || [ "$kind" != smtp ]; then
        setups_here=${setups_here/relay/}
      fi
      if [ "${FILTER[$sc]}" != none ]; then
        setups_here=${setups_here/haproxy1/} setups_here=${setups_here/haproxy2/}
      fi
      ;;
  esac
  # rspamd runs for the rspamd scenarios only (they are next to each other).
  if [ "${FILTER[$sc]}" = rspamd ] && [ -z "$RSPAMD_PID" ]; then
    if ! start_rspamd; then
      for setup in $setups_here; do
        record 1 "scenario=$sc setup=$setup errors=1 error=rspamd_did_not_start"
      done
      continue
    fi
  elif [ "${FILTER[$sc]}" != rspamd ] && [ -n "$RSPAMD_PID" ]; then
    stop_pid "$RSPAMD_PID"; RSPAMD_PID=""
  fi
  # The null hook runs for the hook scenarios, with the delay of each.
  if [ "${FILTER[$sc]#hook}" != "${FILTER[$sc]}" ]; then
    if ! start_hook "$(hook_delay_ms "${FILTER[$sc]}")" "$(hook_jitter_ms "${FILTER[$sc]}")"; then
      for setup in $setups_here; do
        record 1 "scenario=$sc setup=$setup errors=1 error=null_hook_did_not_start"
      done
      continue
    fi
  fi
  # shellcheck disable=SC2086
  set -- $setups_here
  [ $# -gt 0 ] || continue
  declare -A N=()
  if [ "$kind" = smtp ]; then
    for setup in $setups_here; do
      [ "$setup" = spawn ] && continue
      calibrate "$sc" "$setup"; N[$setup]=$NMSG
    done
  fi
  for round in $(seq "$RUNS"); do
    # Rotate the order each round so that no setup always runs first.
    # shellcheck disable=SC2206
    order=($setups_here)
    shift_by=$(( (round - 1) % ${#order[@]} ))
    order=("${order[@]:shift_by}" "${order[@]:0:shift_by}")
    for setup in "${order[@]}"; do
      # A run during which the sink went away says nothing about the proxy:
      # it is done once more with a new sink.
      for attempt in 1 2; do
        case $kind/$setup in
          */spawn) run_spawn "$sc" ;;
          smtp/*) run_measured "$sc" "$setup" "${N[$setup]}" ;;
          sessions/*) run_sessions "$sc" "$setup" ;;
        esac
        sink_alive && break
        [ $attempt = 1 ] && echo "run.sh: repeating $sc/$setup round $round" >&2
      done
      record "$round" "$RESULT"
    done
  done
  unset N
done
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

# --- report -----------------------------------------------------------------------
{
  echo "date=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "kernel=$(uname -r)"
  echo "cpus=$(nproc)"
  echo "load_start=$LOAD_START"
  echo "load_end=$LOAD_END"
  echo "runs=$RUNS"
  echo "secs_per_run=$SECS"
  echo "smoke=$SMOKE"
  echo "profile=$PROFILE"
  echo "wall_s=$((SECONDS - START_S))"
  echo "ours=$OURS"
  echo "ours_sha256=$OURS_SHA"
  echo "ours2=${BENCH_OURS2:-}"
  echo "ours2_sha256=$OURS2_SHA"
  echo "tree=$(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo none)"
  echo "postfix=$(dpkg-query -W -f '${Version}' postfix 2>/dev/null)"
  echo "proxsmtp=$(dpkg-query -W -f '${Version}' proxsmtp 2>/dev/null)"
  echo "haproxy=$(dpkg-query -W -f '${Version}' haproxy 2>/dev/null)"
  echo "rspamd=$(dpkg-query -W -f '${Version}' rspamd 2>/dev/null)"
  echo "file_filter=$FILE_FILTER"
  echo "sessions=${SESSIONS:-as named}"
} >"$WORK/meta.txt"
cp "$WORK/meta.txt" "$OUT/$PREFIX-meta.txt"
python3 "$HERE/report.py" --runs "$RUNLOG" --meta "$WORK/meta.txt" --out "$OUT" --prefix "$PREFIX"
rc=$?
if [ -n "$PROFILE" ]; then
  echo "run.sh: profiles in $OUT/profile/:" >&2
  ls -1 "$OUT/profile" >&2
  [ "$PROFILE" = perf ] && echo "  read with: perf report -i $OUT/profile/perf.SCENARIO.data --no-children" >&2
  [ "$PROFILE" = callgrind ] && echo "  read with: callgrind_annotate $OUT/profile/callgrind.SCENARIO.out | head -40" >&2
fi
echo "run.sh: done in $((SECONDS - START_S)) s; results in $OUT/$PREFIX.tsv" >&2
exit $rc
