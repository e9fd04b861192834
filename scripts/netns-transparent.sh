#!/usr/bin/env bash
# netns-transparent.sh - a private test network for the transparent proxy modes.
#
# Three network namespaces joined by veth pairs; nothing in them is routed to the host:
#
#   PREFIX-client            PREFIX-gw                          PREFIX-mta
#   10.77.1.2/24  ---veth---  10.77.1.1/24 | 10.77.2.1/24 ---veth---  10.77.2.2/24
#   default via 10.77.1.1     forwards between the two nets     default via 10.77.2.1
#
# The proxy runs in the gw namespace; an SMTP server listens on 10.77.2.2:25 in the mta
# namespace; a client in the client namespace connects to 10.77.2.2:25 and is intercepted
# in gw:
#
#   MODE=client  nat PREROUTING REDIRECT to CLIENT_PORT (TransparentProxy: client, the
#                proxy reads the original destination with SO_ORIGINAL_DST and connects
#                from its own address, 10.77.2.1).
#   MODE=full    mangle PREROUTING TPROXY to FULL_PORT (TransparentProxy: full, listener
#                with IP_TRANSPARENT, the upstream connection leaves from the client's
#                address 10.77.1.2). The MTA answers 10.77.1.2 through gw (its default
#                route), where a socket match marks those packets so that policy routing
#                (fwmark 1 -> table 100: everything local) hands them to the proxy's
#                socket instead of forwarding them to the client.
#
# Both modes also get a loop probe: a connection made inside gw to gw's own address
# 10.77.1.1, port 25, is redirected to the proxy too, so its original destination equals
# the client's address.
#
# Usage (as root):
#   netns-transparent.sh [-p PREFIX] [-m client|full] up
#   netns-transparent.sh [-p PREFIX] down        # idempotent; kills what runs inside
#   netns-transparent.sh [-p PREFIX] status
# Then, for example:
#   ip netns exec PREFIX-gw proxsmtpd -d 4 -f proxsmtpd.conf   # Listen: 0.0.0.0:10025
#   ip netns exec PREFIX-mta smtp-sink -u nobody 10.77.2.2:25 10 &
#   ip netns exec PREFIX-client swaks --server 10.77.2.2:25 --to a@example.net
#
# Options override the environment: PREFIX (default pxt; lower-case letters and digits,
# at most 12, so that parallel runs use distinct names), MODE (default client),
# CLIENT_PORT (10025), FULL_PORT (10026). VERBOSE=1 traces every command.
set -euo pipefail

PREFIX=${PREFIX:-pxt}
MODE=${MODE:-client}
CLIENT_PORT=${CLIENT_PORT:-10025}
FULL_PORT=${FULL_PORT:-10026}

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
}

while getopts "p:m:h" opt; do
    case $opt in
        p) PREFIX=$OPTARG ;;
        m) MODE=$OPTARG ;;
        *) usage ;;
    esac
done
shift $((OPTIND - 1))
[ $# -eq 1 ] || usage
action=$1

# Interface names are limited to 15 characters; the longest here is PREFIX plus 3.
[[ $PREFIX =~ ^[a-z][a-z0-9]{0,11}$ ]] || {
    echo "netns-transparent.sh: bad prefix '$PREFIX' (a-z, 0-9, at most 12)" >&2
    exit 2
}
case $MODE in
    client) PROXY_PORT=$CLIENT_PORT ;;
    full) PROXY_PORT=$FULL_PORT ;;
    *) echo "netns-transparent.sh: MODE must be client or full" >&2; exit 2 ;;
esac
[ "${VERBOSE:-0}" = 1 ] && set -x

NS_CLIENT=$PREFIX-client
NS_GW=$PREFIX-gw
NS_MTA=$PREFIX-mta
IF_CLIENT=${PREFIX}c0   # in client, towards gw
IF_GW_C=${PREFIX}gc     # in gw, towards client
IF_GW_M=${PREFIX}gm     # in gw, towards mta
IF_MTA=${PREFIX}m0      # in mta, towards gw
CLIENT_IP=10.77.1.2
GW_CLIENT_IP=10.77.1.1
GW_MTA_IP=10.77.2.1
MTA_IP=10.77.2.2
MARK=1
TABLE=100

in_ns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

# Reverse-path filtering would drop the MTA's replies to the client's address that the
# proxy's transparent socket receives in full mode; the namespaces are closed, so it is
# not needed anywhere.
no_rp_filter() {
    local ns=$1; shift
    local dev
    for dev in all default "$@"; do
        in_ns "$ns" sysctl -qw "net.ipv4.conf.$dev.rp_filter=0"
    done
}

up() {
    if ip netns list | grep -qE "^($NS_CLIENT|$NS_GW|$NS_MTA)( |$)"; then
        echo "netns-transparent.sh: namespaces $PREFIX-* exist; run down first" >&2
        exit 1
    fi
    # From here on a failure (set -e exits) leaves nothing half-built behind.
    trap 'down' EXIT
    local ns
    for ns in "$NS_CLIENT" "$NS_GW" "$NS_MTA"; do
        ip netns add "$ns"
        ip -n "$ns" link set lo up
    done
    # Each veth end is created directly inside its namespace, never in the host's.
    ip link add "$IF_CLIENT" netns "$NS_CLIENT" type veth peer name "$IF_GW_C" netns "$NS_GW"
    ip link add "$IF_GW_M" netns "$NS_GW" type veth peer name "$IF_MTA" netns "$NS_MTA"

    ip -n "$NS_CLIENT" addr add "$CLIENT_IP/24" dev "$IF_CLIENT"
    ip -n "$NS_CLIENT" link set "$IF_CLIENT" up
    ip -n "$NS_CLIENT" route add default via "$GW_CLIENT_IP"

    ip -n "$NS_GW" addr add "$GW_CLIENT_IP/24" dev "$IF_GW_C"
    ip -n "$NS_GW" addr add "$GW_MTA_IP/24" dev "$IF_GW_M"
    ip -n "$NS_GW" link set "$IF_GW_C" up
    ip -n "$NS_GW" link set "$IF_GW_M" up
    in_ns "$NS_GW" sysctl -qw net.ipv4.ip_forward=1
    no_rp_filter "$NS_GW" "$IF_GW_C" "$IF_GW_M"

    ip -n "$NS_MTA" addr add "$MTA_IP/24" dev "$IF_MTA"
    ip -n "$NS_MTA" link set "$IF_MTA" up
    # Replies to the client's own address (full mode) go back through gw.
    ip -n "$NS_MTA" route add default via "$GW_MTA_IP"
    no_rp_filter "$NS_MTA" "$IF_MTA"

    case $MODE in
        client)
            in_ns "$NS_GW" iptables -w -t nat -A PREROUTING -i "$IF_GW_C" -p tcp --dport 25 \
                -j REDIRECT --to-ports "$PROXY_PORT"
            ;;
        full)
            # Packets of connections the proxy already holds (from the client to the
            # intercepted socket, from the MTA to the socket bound to the client's
            # address) are delivered locally; new client connections to port 25 go to
            # the proxy's IP_TRANSPARENT listener.
            in_ns "$NS_GW" iptables -w -t mangle -N DIVERT
            in_ns "$NS_GW" iptables -w -t mangle -A DIVERT -j MARK --set-mark "$MARK"
            in_ns "$NS_GW" iptables -w -t mangle -A DIVERT -j ACCEPT
            in_ns "$NS_GW" iptables -w -t mangle -A PREROUTING -p tcp -m socket --transparent \
                -j DIVERT
            in_ns "$NS_GW" iptables -w -t mangle -A PREROUTING -i "$IF_GW_C" -p tcp --dport 25 \
                -j TPROXY --on-port "$PROXY_PORT" --tproxy-mark "$MARK/$MARK"
            ip -n "$NS_GW" rule add fwmark "$MARK" lookup "$TABLE"
            ip -n "$NS_GW" route add local 0.0.0.0/0 dev lo table "$TABLE"
            ;;
    esac
    # The loop probe (see the top of this file).
    in_ns "$NS_GW" iptables -w -t nat -A OUTPUT -d "$GW_CLIENT_IP" -p tcp --dport 25 \
        -j REDIRECT --to-ports "$PROXY_PORT"
    trap - EXIT
    echo "netns-transparent.sh: $PREFIX up (mode $MODE, proxy port $PROXY_PORT)"
}

down() {
    local ns pid
    for ns in "$NS_CLIENT" "$NS_GW" "$NS_MTA"; do
        ip netns list | grep -qE "^$ns( |$)" || continue
        # A process left inside would keep the namespace (and its veths) alive unnamed.
        for pid in $(ip netns pids "$ns" 2>/dev/null); do
            kill -KILL "$pid" 2>/dev/null || true
        done
        # Removing the namespace removes its veth ends, routes, rules and netfilter tables.
        ip netns del "$ns" 2>/dev/null || true
    done
}

status() {
    local ns
    for ns in "$NS_CLIENT" "$NS_GW" "$NS_MTA"; do
        if ! ip netns list | grep -qE "^$ns( |$)"; then
            echo "== $ns: absent"
            continue
        fi
        echo "== $ns"
        ip -n "$ns" -br addr
        ip -n "$ns" route
        ip netns pids "$ns" | sed 's/^/pid /'
    done
    if ip netns list | grep -qE "^$NS_GW( |$)"; then
        echo "== $NS_GW policy routing and netfilter"
        ip -n "$NS_GW" rule
        ip -n "$NS_GW" route show table "$TABLE" 2>/dev/null || true
        in_ns "$NS_GW" iptables -w -t nat -S
        in_ns "$NS_GW" iptables -w -t mangle -S
    fi
}

case $action in
    up) up ;;
    down) down ;;
    status) status ;;
    *) usage ;;
esac
