#!/bin/sh
# SpamAssassin scanner (FilterType: pipe). Runs the message through spamc, which has spamd
# add its X-Spam-* headers; rejects the message when its score reaches REJECT_SCORE and
# delivers the marked message otherwise.
#
# When spamd cannot be reached, or does not answer within SPAMC_TIMEOUT, the message is
# delivered unscanned (fail open), so mail keeps flowing while spamd is down. With
# FAIL_CLOSED=1 it is deferred instead (451: the sending server retries later). Mail larger
# than SPAMC_MAX_SIZE is never sent to spamd and is delivered unscanned, in both modes.
# spamc's own error message goes to stderr before the SMTP reply line.
#
# Settings (environment variables: in FilterCommand as below, or in the proxy's environment):
#   SPAMD_HOST      spamd's host name or IP address (spamc -d), e.g. the name of a spamd
#                   Service; default localhost
#   SPAMD_PORT      spamd's TCP port (spamc -p); default 783
#   SPAMC_MAX_SIZE  largest message scanned, in bytes (spamc -s); default 512000 (500 KB)
#   SPAMC_TIMEOUT   seconds spamc waits for spamd's answer (spamc -t); default 25. Keep it
#                   below the proxy's FilterTimeout (30 s of filter silence, after which the
#                   filter is killed and the message deferred with 451 Local Error).
#   REJECT_SCORE    score at or above which the message is rejected (550); default 10
#   FAIL_CLOSED=1   defer the message when spamd fails, instead of delivering it unscanned
#
#   FilterCommand: SPAMD_HOST=spamd.mail.svc.cluster.local REJECT_SCORE=10 /etc/proxsmtpd/filters/spamassassin.sh
reject_score=${REJECT_SCORE:-10}
set -- -E -l -s "${SPAMC_MAX_SIZE:-512000}" -t "${SPAMC_TIMEOUT:-25}"
[ -n "$SPAMD_HOST" ] && set -- "$@" -d "$SPAMD_HOST"
[ -n "$SPAMD_PORT" ] && set -- "$@" -p "$SPAMD_PORT"
fail_closed=
case ${FAIL_CLOSED:-0} in
    0|no|off|false) ;;
    # -x: an unreachable or silent spamd is an error (exit 69/74...) instead of spamc's
    # default of passing the message through unchanged with exit 0.
    *) fail_closed=1; set -- "$@" -x ;;
esac

in=$(mktemp) && out=$(mktemp) || { echo "451 4.3.0 Temporary local problem" >&2; exit 1; }
trap 'rm -f "$in" "$out"' EXIT
cat > "$in" || { echo "451 4.3.0 Temporary local problem" >&2; exit 1; }
spamc "$@" < "$in" > "$out"
status=$?                                       # 0 = ham, 1 = spam, other = spamc trouble
if [ "$status" -gt 1 ]; then
    if [ -n "$fail_closed" ]; then
        echo "451 4.7.1 Spam scanner unavailable, try again later" >&2
        exit 1
    fi
    echo "spamc failed (exit $status); message delivered unscanned" >&2
    cat "$in"
    exit 0
fi
score=$(sed -n 's/^X-Spam-Status: [A-Za-z]*, score=\([-0-9.]*\).*/\1/p' "$out" | head -n1)
if [ -n "$score" ] && awk -v s="$score" -v t="$reject_score" 'BEGIN { exit !(s >= t) }'; then
    echo "550 5.7.1 Message rejected as spam (score $score)" >&2
    exit 1
fi
cat "$out"
