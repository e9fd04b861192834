#!/bin/sh
# Example pipe filter: the message arrives on stdin and goes out on stdout. A non-zero exit
# rejects it, with the last line on stderr as the SMTP reply (a 250 reply drops it silently).
case "$RECIPIENTS" in
  *reject@*) echo "550 5.7.1 Rejected by policy" >&2; exit 1 ;;
  *drop@*)   echo "250 2.0.0 Dropped" >&2; exit 1 ;;
esac
exec cat
