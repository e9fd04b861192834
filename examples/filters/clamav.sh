#!/bin/sh
# ClamAV scanner (FilterType: file). Streams $EMAIL to clamd with clamdscan (clamd needs no
# access to the proxy's files, so it may run in another pod): a virus is rejected (554) with
# its name, a clean message is delivered unchanged. When the scan fails (clamd down or
# unreachable, a wrong address) the message is deferred (451: the sending server retries
# later), so that no mail is lost, bounced or delivered unscanned; FAIL_OPEN=1 delivers it
# unscanned instead. clamdscan's own output (the virus line, its error message) goes to
# stderr before the SMTP reply line.
#
# Settings (environment variables: in FilterCommand as below, or in the proxy's environment):
#   CLAMD_ADDRESS  where clamd listens: host:port over TCP (clamd's TCPSocket, usually 3310;
#                  e.g. a clamd Service, clamav.mail.svc.cluster.local:3310), [IPv6]:port,
#                  a host alone (port 3310), or the path of clamd's unix socket
#                  (/run/clamav/clamd.ctl). Takes precedence over CLAMD_CONFIG.
#   CLAMD_CONFIG   a clamd.conf-style file for clamdscan --config-file, naming the socket
#                  with LocalSocket, or TCPSocket (port) and TCPAddr (host);
#                  default clamdscan's own, /etc/clamav/clamd.conf
#   FAIL_OPEN=1    deliver the message unscanned when the scan fails, instead of deferring
#
#   FilterType: file
#   FilterCommand: CLAMD_ADDRESS=clamav.mail.svc.cluster.local:3310 /etc/proxsmtpd/filters/clamav.sh
scan_failed() {
    [ -n "$1" ] && printf '%s\n' "$1" >&2
    case ${FAIL_OPEN:-0} in
        0|no|off|false)
            echo "451 4.3.0 Virus scanner unavailable, try again later" >&2
            exit 1 ;;
        *)  echo "virus scan failed; message delivered unscanned" >&2
            exit 0 ;;
    esac
}

config=$CLAMD_CONFIG
if [ -n "$CLAMD_ADDRESS" ]; then
    case $CLAMD_ADDRESS in
        /*)      line="LocalSocket $CLAMD_ADDRESS" ;;
        \[*\]:*) host=${CLAMD_ADDRESS%]:*}; line="TCPSocket ${CLAMD_ADDRESS##*]:}
TCPAddr ${host#\[}" ;;
        \[*\])   host=${CLAMD_ADDRESS%]}; line="TCPSocket 3310
TCPAddr ${host#\[}" ;;
        *:*)     line="TCPSocket ${CLAMD_ADDRESS##*:}
TCPAddr ${CLAMD_ADDRESS%:*}" ;;
        *)       line="TCPSocket 3310
TCPAddr $CLAMD_ADDRESS" ;;
    esac
    config=$(mktemp) || scan_failed "cannot create a temporary file"
    trap 'rm -f "$config"' EXIT
    printf '%s\n' "$line" > "$config" || scan_failed "cannot write $config"
fi
result=$(clamdscan ${config:+"--config-file=$config"} --no-summary --stdout - < "$EMAIL" 2>&1)
case $? in
    0) exit 0 ;;
    1) printf '%s\n' "$result" >&2
       virus=$(printf '%s\n' "$result" | sed -n 's/^.*: \(.*\) FOUND$/\1/p' | head -n1)
       echo "554 5.7.1 Virus found: ${virus:-unknown}" >&2
       exit 1 ;;
    *) scan_failed "${result:-clamdscan failed}" ;;
esac
