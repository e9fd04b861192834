#!/bin/sh
# SpamAssassin-style scanner (FilterType: pipe). Runs the message through spamc, which adds
# its X-Spam-* headers; rejects when the score is above the reject threshold, delivers the
# marked message otherwise. spamc fails open (exit 0, message unchanged) when spamd is
# down, so mail keeps flowing; set FAIL_CLOSED=1 to defer instead.
#   FilterCommand: REJECT_SCORE=10 /etc/proxsmtpd/filters/spamassassin.sh
reject_score=${REJECT_SCORE:-10}
out=$(mktemp) || { echo "451 4.3.0 Temporary local problem" >&2; exit 1; }
trap 'rm -f "$out"' EXIT
spamc -E > "$out"
status=$?                                       # 0 = ham, 1 = spam, other = spamc trouble
if [ "$status" -gt 1 ] && [ -n "$FAIL_CLOSED" ]; then
    echo "451 4.7.1 Spam scanner unavailable, try again later" >&2
    exit 1
fi
score=$(sed -n 's/^X-Spam-Status: [A-Za-z]*, score=\([-0-9.]*\).*/\1/p' "$out" | head -n1)
if [ -n "$score" ] && awk -v s="$score" -v t="$reject_score" 'BEGIN { exit !(s >= t) }'; then
    echo "550 5.7.1 Message rejected as spam (score $score)" >&2
    exit 1
fi
cat "$out"
