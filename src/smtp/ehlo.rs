//! Rewriting the upstream's greeting and HELO/EHLO replies.
//!
//! The receiving MTA must not see its own host name come back (it would look like a mail
//! loop), so the first line of the greeting and of the HELO/EHLO reply is replaced with
//! `smtp.passthru`. Extensions the proxy cannot carry through are removed from the EHLO
//! reply; when the removed line was the last one, `250 XFILTERED` keeps the reply well-formed.

use super::line::trim_line_end;
use super::reply::Reply;

/// Extensions hidden from the client: the proxy handles DATA itself and refuses the rest.
const HIDDEN: &[&[u8]] = &[
    b"PIPELINING",
    b"STARTTLS",
    b"CHUNKING",
    b"BINARYMIME",
    b"CHECKPOINT",
    b"XCLIENT",
    b"XEXCH50",
];

/// The upstream's 220 greeting with its first line replaced; the shape of a multi-line
/// greeting is kept (the original passed those through unchanged, host name included).
pub fn rewrite_greeting(reply: &Reply) -> Vec<u8> {
    if reply.lines.len() == 1 {
        return b"220 smtp.passthru\r\n".to_vec();
    }
    let mut out = b"220-smtp.passthru\r\n".to_vec();
    for line in &reply.lines[1..] {
        out.extend_from_slice(line);
    }
    out
}

/// The keyword of an EHLO reply line (`250-SIZE 1000` gives `SIZE`).
fn keyword(line: &[u8]) -> &[u8] {
    let text = trim_line_end(line.get(4..).unwrap_or(b""));
    let end = text
        .iter()
        .position(|&b| b == b' ' || b == b'\t')
        .unwrap_or(text.len());
    &text[..end]
}

/// What the client sees of a 2xx HELO/EHLO reply, and whether the upstream offers XCLIENT.
pub struct Filtered {
    pub client_reply: Vec<u8>,
    pub offers_xclient: bool,
}

pub fn filter_helo_reply(reply: &Reply, ehlo: bool) -> Filtered {
    let mut out = Vec::with_capacity(reply.lines.iter().map(|l| l.len()).sum());
    let mut offers_xclient = false;
    let last = reply.lines.len() - 1;
    for (i, line) in reply.lines.iter().enumerate() {
        if i == 0 {
            out.extend_from_slice(if last == 0 {
                b"250 smtp.passthru\r\n"
            } else {
                b"250-smtp.passthru\r\n"
            });
            continue;
        }
        let word = keyword(line);
        if ehlo && word.eq_ignore_ascii_case(b"XCLIENT") {
            offers_xclient = true;
        }
        if ehlo && HIDDEN.iter().any(|h| word.eq_ignore_ascii_case(h)) {
            if i == last {
                out.extend_from_slice(b"250 XFILTERED\r\n");
            }
            continue;
        }
        out.extend_from_slice(line);
    }
    Filtered {
        client_reply: out,
        offers_xclient,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn reply(lines: &[&str]) -> Reply {
        Reply {
            code: 250,
            lines: lines
                .iter()
                .map(|l| Bytes::from(format!("{l}\r\n")))
                .collect(),
        }
    }

    #[test]
    fn filters_ehlo_like_the_original() {
        let r = reply(&[
            "250-sink.example",
            "250-PIPELINING",
            "250-SIZE 10240000",
            "250-VRFY",
            "250-ETRN",
            "250-STARTTLS",
            "250-AUTH PLAIN LOGIN",
            "250-XCLIENT NAME ADDR PROTO HELO",
            "250-XFORWARD NAME ADDR PROTO HELO",
            "250-ENHANCEDSTATUSCODES",
            "250-8BITMIME",
            "250-DSN",
            "250-SMTPUTF8",
            "250 CHUNKING",
        ]);
        let f = filter_helo_reply(&r, true);
        assert!(f.offers_xclient);
        assert_eq!(
            String::from_utf8(f.client_reply).unwrap(),
            "250-smtp.passthru\r\n250-SIZE 10240000\r\n250-VRFY\r\n250-ETRN\r\n\
             250-AUTH PLAIN LOGIN\r\n250-XFORWARD NAME ADDR PROTO HELO\r\n\
             250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250-DSN\r\n250-SMTPUTF8\r\n250 XFILTERED\r\n"
        );
    }

    #[test]
    fn helo_reply_first_line_rewritten() {
        let f = filter_helo_reply(&reply(&["250 sink.example Hello"]), false);
        assert_eq!(f.client_reply, b"250 smtp.passthru\r\n");
        assert!(!f.offers_xclient);
    }

    #[test]
    fn keyword_must_be_whole_word() {
        let f = filter_helo_reply(&reply(&["250-x", "250 PIPELININGX"]), true);
        assert_eq!(f.client_reply, b"250-smtp.passthru\r\n250 PIPELININGX\r\n");
    }
}
