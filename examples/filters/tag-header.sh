#!/bin/sh
# Header tagger (FilterType: pipe). Adds a header with the envelope sender and the number
# of recipients at the top of the message and passes it on unchanged otherwise.
#   FilterCommand: /etc/proxsmtpd/filters/tag-header.sh
count=$(printf '%s\n' "$RECIPIENTS" | grep -c .)
printf 'X-Envelope-Sender: %s\r\nX-Envelope-Recipients: %s\r\n' "$SENDER" "$count"
exec cat
