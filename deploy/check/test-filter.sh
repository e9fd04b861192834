#!/bin/sh
# Filter used by the live metrics check: the recipient chooses the verdict.
case "$RECIPIENTS" in
  *reject@*)   echo "550 5.7.1 Rejected by the test filter" >&2; exit 1 ;;
  *drop@*)     echo "250 2.0.0 Dropped by the test filter" >&2; exit 1 ;;
  *tempfail@*) echo "451 4.3.0 Try again later" >&2; exit 75 ;;
  *slow@*)     sleep 5 ;;
esac
exec cat
