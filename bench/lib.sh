# bench/lib.sh: what bench/run.sh and bench/syscalls.sh share (sourced by both):
# waiting for a listener, stopping what they started, the smtp-sink upstream, and
# haproxy's configuration.
# Expects HOST, SINK, WORK, SPORT and PPORT to be set; LISTEN_WAIT (times
# 0.05 s) defaults to 200.
# shellcheck shell=bash

listening() { ss -Hltn "sport = :$1" 2>/dev/null | grep -q .; }

usage() { # [status]: the calling script's header comment, as its help
  sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit "${1:-0}"
}

# The options of the scripts that count per message (syscalls.sh, instructions.sh):
# sets MSGS, CONCS and SETUPS (space-separated), OUT and OURS from the arguments and
# exits 2 on a bad one. KNOWN_SETUPS lists the setups the script has.
# shellcheck disable=SC2034  # the settings are the calling script's
counting_options() {
  local me=${0##*/} c s
  while [ $# -gt 0 ]; do
    case $1 in
      --msgs) MSGS=${2:?--msgs needs a number}; shift ;;
      --conc) CONCS=${2:?--conc needs a list}; shift ;;
      --setups) SETUPS=${2:?--setups needs a list}; shift ;;
      --out) OUT=${2:?--out needs a directory}; shift ;;
      -h|--help) usage 0 ;;
      -*) echo "$me: unknown option $1" >&2; usage 2 ;;
      *) OURS=$1 ;;
    esac
    shift
  done
  case $MSGS in [1-9]|[1-9]*[0-9]) ;; *) echo "$me: --msgs must be a positive integer" >&2; exit 2 ;; esac
  CONCS=${CONCS//,/ } SETUPS=${SETUPS//,/ }
  for c in $CONCS; do
    case $c in [1-9]|[1-9]*[0-9]) ;; *) echo "$me: bad concurrency $c" >&2; exit 2 ;; esac
  done
  for s in $SETUPS; do
    case " $KNOWN_SETUPS " in *" $s "*) ;; *) echo "$me: unknown setup $s" >&2; exit 2 ;; esac
  done
}

stop_pid() { # pid [signal] [tenths of a second]: stop one process we started, by its PID only
  local pid=$1 sig=${2:-TERM} wait_tenths=${3:-100}
  [ -n "$pid" ] || return 0
  kill "-$sig" "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null; return 0; }
  for _ in $(seq "$wait_tenths"); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null
  wait "$pid" 2>/dev/null
  return 0
}

wait_listen() { # port pid: wait until pid listens on port
  for _ in $(seq "${LISTEN_WAIT:-200}"); do
    listening "$1" && return 0
    kill -0 "$2" 2>/dev/null || return 1
    sleep 0.05
  done
  return 1
}

start_sink() { # -> SINK_PID; exits the script when the sink cannot start
  local user=(); [ "$(id -u)" = 0 ] && user=(-u nobody)
  # Fast sink: no delays, accepts everything; -c counts messages on stdout;
  # -m: room for the 10,000-session scenario and its probes; -t: its first
  # sessions wait idle while the last ones open (the default is 100 s).
  "$SINK" -c "${user[@]}" -m 12000 -t 600 "$HOST:$SPORT" 4096 >"$WORK/sink.out" 2>>"$WORK/sink.err" &
  SINK_PID=$!
  wait_listen "$SPORT" "$SINK_PID" || {
    echo "${0##*/}: smtp-sink did not start:" >&2; cat "$WORK/sink.err" >&2; exit 2;
  }
}

sink_count() { # messages received so far (last mesg= counter of smtp-sink -c)
  tail -c 300 "$WORK/sink.out" | tr '\r' '\n' | sed -n 's/.*mesg=\([0-9]*\).*/\1/p' | tail -1
}

# haproxy in TCP mode between the load and the sink: no logging (no log
# line in the config), room for the 10,000-session scenario (the same
# 10,240 connections as ours' MaxConnections), timeouts long
# enough for idle held sessions. haproxy refuses to start unless the
# open-file limit holds two descriptors per connection.
haproxy_conf() { # threads file
  local maxconn=$(( ($(ulimit -n) - 256) / 2 ))
  [ "$maxconn" -gt 10240 ] && maxconn=10240
  cat >"$2" <<EOF_CFG
global
    nbthread $1
    maxconn $maxconn
defaults
    mode tcp
    timeout connect 5s
    timeout client 120s
    timeout server 120s
    maxconn $maxconn
frontend smtp_in
    bind $HOST:$PPORT
    default_backend smtp_sink
backend smtp_sink
    server sink $HOST:$SPORT
EOF_CFG
}
