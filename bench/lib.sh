# bench/lib.sh: what bench/run.sh and bench/syscalls.sh share (sourced by both):
# waiting for a listener, stopping what they started, the smtp-sink upstream, and
# haproxy's configuration.
# Expects HOST, SINK, WORK, SPORT and PPORT to be set; LISTEN_WAIT (times
# 0.05 s) defaults to 200.
# shellcheck shell=bash

listening() { ss -Hltn "sport = :$1" 2>/dev/null | grep -q .; }

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
