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

/// The reply line `code` + `-` or space + the text of `line` (its own separator replaced).
fn with_separator(line: &[u8], last: bool) -> Vec<u8> {
    let (code, rest) = line.split_at(line.len().min(3));
    let text = match rest.first() {
        Some(b' ' | b'-') => &rest[1..],
        _ => rest,
    };
    let mut out = Vec::with_capacity(line.len() + 1);
    out.extend_from_slice(code);
    out.push(if last { b' ' } else { b'-' });
    out.extend_from_slice(text);
    out
}

/// Rewrites a 2xx HELO/EHLO reply for the client. `offer_starttls` (an EHLO while the proxy
/// has a certificate and the client is not yet using TLS) adds the proxy's own STARTTLS;
/// without it the upstream's lines that are kept pass through byte for byte.
pub fn filter_helo_reply(reply: &Reply, ehlo: bool, offer_starttls: bool) -> Filtered {
    let mut out = Vec::with_capacity(reply.lines.iter().map(|l| l.len()).sum::<usize>() + 16);
    let mut offers_xclient = false;
    let last = reply.lines.len() - 1;
    let trailer: Option<&[u8]> = (ehlo && offer_starttls).then_some(b"250 STARTTLS\r\n");
    for (i, line) in reply.lines.iter().enumerate() {
        let is_last = i == last && trailer.is_none();
        if i == 0 {
            out.extend_from_slice(if is_last {
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
            if is_last {
                out.extend_from_slice(b"250 XFILTERED\r\n");
            }
            continue;
        }
        if i == last && !is_last {
            // The upstream's last line is followed by our STARTTLS.
            out.extend_from_slice(&with_separator(line, false));
        } else {
            out.extend_from_slice(line);
        }
    }
    if let Some(trailer) = trailer {
        out.extend_from_slice(trailer);
    }
    Filtered {
        client_reply: out,
        offers_xclient,
    }
}

/// Whether a 2xx EHLO reply lists the extension `word` (e.g. `STARTTLS`).
pub fn offers(reply: &Reply, word: &[u8]) -> bool {
    reply.code / 100 == 2
        && reply
            .lines
            .iter()
            .skip(1)
            .any(|line| keyword(line).eq_ignore_ascii_case(word))
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
        let f = filter_helo_reply(&r, true, false);
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
        let f = filter_helo_reply(&reply(&["250 sink.example Hello"]), false, false);
        assert_eq!(f.client_reply, b"250 smtp.passthru\r\n");
        assert!(!f.offers_xclient);
    }

    #[test]
    fn keyword_must_be_whole_word() {
        let f = filter_helo_reply(&reply(&["250-x", "250 PIPELININGX"]), true, false);
        assert_eq!(f.client_reply, b"250-smtp.passthru\r\n250 PIPELININGX\r\n");
    }

    #[test]
    fn starttls_offered_by_the_proxy() {
        let cases: &[(&[&str], bool, &str)] = &[
            (&["250 sink"], true, "250-smtp.passthru|250 STARTTLS"),
            (&["250 sink"], false, "250 smtp.passthru"),
            (
                &["250-sink", "250-SIZE 10", "250 8BITMIME"],
                true,
                "250-smtp.passthru|250-SIZE 10|250-8BITMIME|250 STARTTLS",
            ),
            // The upstream's own STARTTLS is hidden; ours takes the place of XFILTERED.
            (
                &["250-sink", "250-SIZE 10", "250 STARTTLS"],
                true,
                "250-smtp.passthru|250-SIZE 10|250 STARTTLS",
            ),
            (
                &["250-sink", "250 STARTTLS"],
                false,
                "250-smtp.passthru|250 XFILTERED",
            ),
            (
                &["250-sink", "250"],
                true,
                "250-smtp.passthru|250-|250 STARTTLS",
            ),
        ];
        for (lines, offer, want) in cases {
            let f = filter_helo_reply(&reply(lines), true, *offer);
            let got = String::from_utf8(f.client_reply).unwrap();
            assert_eq!(
                got,
                format!("{}\r\n", want.replace('|', "\r\n")),
                "{lines:?}"
            );
        }
        // HELO replies carry no extensions.
        let f = filter_helo_reply(&reply(&["250 sink"]), false, true);
        assert_eq!(f.client_reply, b"250 smtp.passthru\r\n");
    }

    #[test]
    fn offers_finds_whole_keywords() {
        let r = reply(&["250-sink", "250-STARTTLSX", "250 starttls"]);
        assert!(offers(&r, b"STARTTLS"));
        assert!(!offers(&reply(&["250-STARTTLS", "250 SIZE"]), b"STARTTLS"));
        let refused = Reply {
            code: 502,
            ..reply(&["502-x", "502 STARTTLS"])
        };
        assert!(!offers(&refused, b"STARTTLS"));
    }
}
