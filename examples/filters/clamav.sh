#!/bin/sh
# ClamAV-style scanner (FilterType: file). Scans $EMAIL in place with clamdscan: a virus
# is rejected with its name, a scanner failure defers the message (4xx) so that no mail is
# lost or bounced while clamd is down, a clean message is delivered unchanged.
#   FilterType: file
#   FilterCommand: /etc/proxsmtpd/filters/clamav.sh
result=$(clamdscan --no-summary --stdout - < "$EMAIL" 2>&1)
case $? in
    0) exit 0 ;;
    1) virus=$(printf '%s\n' "$result" | sed -n 's/^.*: \(.*\) FOUND$/\1/p' | head -n1)
       echo "554 5.7.1 Virus found: ${virus:-unknown}" >&2
       exit 1 ;;
    *) echo "451 4.3.0 Virus scanner unavailable, try again later" >&2
       exit 1 ;;
esac
