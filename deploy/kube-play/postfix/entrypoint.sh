#!/bin/sh
# Postfix in the foreground, configured from the environment with the conventions of the
# docker.io/boky/postfix image the chart's examples name:
#   POSTFIX_<parameter>=<value>   postconf -e parameter=value (e.g. POSTFIX_inet_interfaces)
#   ALLOWED_SENDER_DOMAINS        senders of these domains may relay (space separated)
#   RELAYHOST                     relayhost, e.g. [10.88.0.1]:2525
# Postfix listens on 25 and on 587 (submission, the port the proxy forwards to).
set -eu
if [ -n "${ALLOWED_SENDER_DOMAINS:-}" ]; then
  table=""
  for d in $ALLOWED_SENDER_DOMAINS; do table="$table $d=OK"; done
  postconf -e "smtpd_relay_restrictions = permit_mynetworks, check_sender_access inline:{$table }, reject_unauth_destination"
fi
[ -z "${RELAYHOST:-}" ] || postconf -e "relayhost = $RELAYHOST"
env | sed -n 's/^POSTFIX_\([a-z_0-9]*\)=\(.*\)$/\1 = \2/p' | while IFS= read -r kv; do
  postconf -e "$kv"
done
postconf -M '587/inet=587 inet n - n - - smtpd'
# A fresh queue volume gets the queue directories and their owners.
postfix set-permissions >/dev/null 2>&1 || true
postfix check
# Not `exec postfix start-fg`: Postfix's master as process 1 never exits on SIGTERM (it
# re-raises the signal with the default action, which the kernel ignores for process 1), so
# every pod stop would wait for the grace period and end in SIGKILL. A shell as process 1
# passes SIGTERM on to master, which then stops Postfix and exits.
/usr/lib/postfix/sbin/master -d &
master=$!
trap 'kill -TERM $master' TERM INT
wait $master || true
wait $master
