//! Recognising client commands and the envelope values the proxy captures.
//!
//! Matching follows the original: the verb is compared case-insensitively after optional
//! leading whitespace and must be followed by whitespace or the end of the line.

use super::line::trim_line_end;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Helo,
    Ehlo,
    Mail,
    Rcpt,
    Data,
    Rset,
    Quit,
    Auth,
    Starttls,
    Bdat,
    Xclient,
    Xforward,
    Other,
}

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

/// Delimiters that may surround the `MAIL FROM` / `RCPT TO` phrase in the original.
fn is_delimiter(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n' | b':')
}

fn skip_space(line: &[u8]) -> &[u8] {
    let start = line
        .iter()
        .position(|&b| !is_space(b))
        .unwrap_or(line.len());
    &line[start..]
}

/// Whether `line` starts with `word` followed by whitespace or the end of the line.
fn starts_with_word(line: &[u8], word: &[u8]) -> bool {
    line.len() >= word.len()
        && line[..word.len()].eq_ignore_ascii_case(word)
        && line.get(word.len()).is_none_or(|&b| is_space(b))
}

/// The rest of a `MAIL FROM` / `RCPT TO` line after the phrase, if the line is one.
fn after_phrase<'a>(line: &'a [u8], phrase: &[u8]) -> Option<&'a [u8]> {
    let start = line
        .iter()
        .position(|&b| !is_delimiter(b))
        .unwrap_or(line.len());
    let rest = &line[start..];
    if rest.len() > phrase.len()
        && rest[..phrase.len()].eq_ignore_ascii_case(phrase)
        && is_delimiter(rest[phrase.len()])
    {
        Some(&rest[phrase.len()..])
    } else {
        None
    }
}

pub fn classify(line: &[u8]) -> Verb {
    if after_phrase(line, b"MAIL FROM").is_some() {
        return Verb::Mail;
    }
    if after_phrase(line, b"RCPT TO").is_some() {
        return Verb::Rcpt;
    }
    let line = skip_space(line);
    const WORDS: &[(&[u8], Verb)] = &[
        (b"HELO", Verb::Helo),
        (b"EHLO", Verb::Ehlo),
        (b"DATA", Verb::Data),
        (b"RSET", Verb::Rset),
        (b"QUIT", Verb::Quit),
        (b"AUTH", Verb::Auth),
        (b"STARTTLS", Verb::Starttls),
        (b"BDAT", Verb::Bdat),
        (b"XCLIENT", Verb::Xclient),
        (b"XFORWARD", Verb::Xforward),
    ];
    WORDS
        .iter()
        .find(|(word, _)| starts_with_word(line, word))
        .map_or(Verb::Other, |&(_, verb)| verb)
}

/// The envelope address of a `MAIL FROM` / `RCPT TO` line, as the original stores it:
/// `<>` for the null sender, the text inside the angle brackets (ESMTP parameters
/// dropped), or the whole remainder when there are no brackets.
pub fn envelope_address(line: &[u8]) -> Option<String> {
    let rest = after_phrase(line, b"MAIL FROM").or_else(|| after_phrase(line, b"RCPT TO"))?;
    let start = rest
        .iter()
        .position(|&b| !is_delimiter(b))
        .unwrap_or(rest.len());
    let rest = trim_line_end(&rest[start..]);
    let addr: &[u8] = if rest.starts_with(b"<>") {
        b"<>"
    } else if let (Some(b'<'), Some(end)) = (rest.first(), memchr::memchr(b'>', rest)) {
        &rest[1..end]
    } else {
        let end = rest
            .iter()
            .rposition(|&b| !is_space(b))
            .map_or(0, |p| p + 1);
        &rest[..end]
    };
    Some(String::from_utf8_lossy(addr).into_owned())
}

/// The value of an XFORWARD attribute (`ADDR`, `HELO`, ...). Attributes are split on
/// whitespace and matched by exact name, unlike the original's substring search which
/// missed `ADDR` after `NAME=addr.example`. Brackets around a value are removed.
pub fn xforward_attribute(line: &[u8], name: &str) -> Option<String> {
    let line = trim_line_end(skip_space(line));
    let args = line.get(b"XFORWARD".len()..)?;
    args.split(|&b| b == b' ' || b == b'\t')
        .filter_map(|attr| {
            let eq = memchr::memchr(b'=', attr)?;
            attr[..eq]
                .eq_ignore_ascii_case(name.as_bytes())
                .then(|| &attr[eq + 1..])
        })
        .find(|value| !value.is_empty())
        .map(|value| {
            let value = value
                .strip_prefix(b"[")
                .and_then(|v| v.strip_suffix(b"]"))
                .unwrap_or(value);
            String::from_utf8_lossy(value).into_owned()
        })
}

/// Whether a command line breaks RFC 5321 §2.3.8: a bare CR, a line ended by a bare LF, or
/// a NUL. Such a line is never relayed: a receiver that ends lines at CRLF only would read
/// it differently from the proxy (two commands for one, or an address the filter never
/// saw), which is how commands are smuggled past a proxy.
pub fn has_forbidden_bytes(line: &[u8]) -> bool {
    let Some(body) = line.strip_suffix(b"\r\n") else {
        // Ended by a bare LF (or not ended at all).
        return true;
    };
    memchr::memchr3(b'\r', b'\n', 0, body).is_some()
}

/// Extensions the proxy hides from the client, with the MAIL/RCPT parameters that only
/// exist with them. A client cannot legitimately use a parameter of an extension it was
/// not offered; relaying it would let the upstream accept something the proxy cannot
/// carry (BODY=BINARYMIME needs BDAT, which the proxy refuses).
const HIDDEN_PARAMETERS: &[(&str, Option<&str>)] = &[
    // RFC 3030: BINARYMIME, only usable with CHUNKING.
    ("BODY", Some("BINARYMIME")),
    // RFC 1845: CHECKPOINT.
    ("TRANSID", None),
];

/// The first ESMTP parameter of a `MAIL FROM` / `RCPT TO` line that belongs to an
/// extension the proxy hides (for a `555` reply), e.g. `BODY=BINARYMIME`.
pub fn hidden_parameter(line: &[u8]) -> Option<String> {
    let rest = after_phrase(line, b"MAIL FROM").or_else(|| after_phrase(line, b"RCPT TO"))?;
    let rest = trim_line_end(rest);
    // Parameters follow the path; a path in brackets may itself contain spaces (quoted
    // local parts), so start after its closing bracket when there is one.
    let params = match memchr::memchr(b'>', rest) {
        Some(end) => &rest[end + 1..],
        None => {
            let start = rest
                .iter()
                .position(|&b| !is_delimiter(b))
                .unwrap_or(rest.len());
            let path_end = rest[start..]
                .iter()
                .position(|&b| b == b' ' || b == b'\t')
                .map_or(rest.len(), |p| start + p);
            &rest[path_end..]
        }
    };
    params
        .split(|&b| b == b' ' || b == b'\t')
        .filter(|p| !p.is_empty())
        .find(|param| {
            let (key, value) = match memchr::memchr(b'=', param) {
                Some(eq) => (&param[..eq], Some(&param[eq + 1..])),
                None => (&param[..], None),
            };
            HIDDEN_PARAMETERS.iter().any(|(k, v)| {
                key.eq_ignore_ascii_case(k.as_bytes())
                    && match v {
                        None => true,
                        Some(v) => value.is_some_and(|x| x.eq_ignore_ascii_case(v.as_bytes())),
                    }
            })
        })
        .map(|p| String::from_utf8_lossy(p).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_commands() {
        let cases: &[(&[u8], Verb)] = &[
            (b"EHLO client.example\r\n", Verb::Ehlo),
            (b"ehlo\r\n", Verb::Ehlo),
            (b"  HELO x\r\n", Verb::Helo),
            (b"HELOX\r\n", Verb::Other),
            (b"MAIL FROM:<a@b>\r\n", Verb::Mail),
            (b"mail from: <a@b>\r\n", Verb::Mail),
            (b"MAIL FROM <a@b>\r\n", Verb::Mail),
            (b"MAIL  FROM:<a@b>\r\n", Verb::Other),
            (b"RCPT TO:<a@b>\r\n", Verb::Rcpt),
            (b"DATA\r\n", Verb::Data),
            (b"DATA\n", Verb::Data),
            (b"DATAX\r\n", Verb::Other),
            (b"STARTTLS\r\n", Verb::Starttls),
            (b"BDAT 10 LAST\r\n", Verb::Bdat),
            (b"XCLIENT ADDR=1.2.3.4\r\n", Verb::Xclient),
            (b"XFORWARD ADDR=1.2.3.4\r\n", Verb::Xforward),
            (b"AUTH PLAIN xyz\r\n", Verb::Auth),
            (b"RSET\r\n", Verb::Rset),
            (b"QUIT\r\n", Verb::Quit),
            (b"NOOP\r\n", Verb::Other),
            (b"\r\n", Verb::Other),
        ];
        for (line, verb) in cases {
            assert_eq!(classify(line), *verb, "{}", String::from_utf8_lossy(line));
        }
    }

    #[test]
    fn parses_envelope_addresses() {
        let cases: &[(&[u8], Option<&str>)] = &[
            (
                b"MAIL FROM:<alice@example.org>\r\n",
                Some("alice@example.org"),
            ),
            (b"MAIL FROM:<> SIZE=10\r\n", Some("<>")),
            (b"MAIL FROM: <a@b> BODY=8BITMIME\r\n", Some("a@b")),
            (b"RCPT TO:bob@example.net  \r\n", Some("bob@example.net")),
            (b"RCPT TO:a@b NOTIFY=NEVER\r\n", Some("a@b NOTIFY=NEVER")),
            (b"NOOP\r\n", None),
        ];
        for (line, want) in cases {
            assert_eq!(envelope_address(line).as_deref(), *want);
        }
    }

    #[test]
    fn parses_xforward_attributes() {
        let line = b"XFORWARD NAME=addr.example ADDR=[10.0.0.1] HELO=spike.example\r\n";
        assert_eq!(
            xforward_attribute(line, "ADDR").as_deref(),
            Some("10.0.0.1")
        );
        assert_eq!(
            xforward_attribute(line, "helo").as_deref(),
            Some("spike.example")
        );
        assert_eq!(xforward_attribute(line, "PROTO"), None);
        assert_eq!(xforward_attribute(b"XFORWARD ADDR=\r\n", "ADDR"), None);
    }
    #[test]
    fn finds_forbidden_bytes_in_command_lines() {
        let cases: &[(&[u8], bool)] = &[
            (b"RCPT TO:<a@x>\r\n", false),
            (b"NOOP\r\n", false),
            (b"\r\n", false),
            (b"RCPT TO:<a@x>\rRCPT TO:<b@y>\r\n", true),
            (b"RCPT TO:<a@x>\n", true),
            (b"MAIL FROM:<a\0b@x>\r\n", true),
            (b"NOOP\r\r\n", true),
            (b"\n", true),
            (b"NOOP", true),
        ];
        for (line, want) in cases {
            assert_eq!(
                has_forbidden_bytes(line),
                *want,
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn finds_parameters_of_hidden_extensions() {
        let cases: &[(&[u8], Option<&str>)] = &[
            (
                b"MAIL FROM:<a@x> BODY=BINARYMIME\r\n",
                Some("BODY=BINARYMIME"),
            ),
            (
                b"MAIL FROM:<a@x> SIZE=10 body=binarymime\r\n",
                Some("body=binarymime"),
            ),
            (b"MAIL FROM:<a@x> BODY=8BITMIME\r\n", None),
            (b"MAIL FROM:<a@x> SIZE=100 SMTPUTF8\r\n", None),
            (b"MAIL FROM:<> TRANSID=<12@x>\r\n", Some("TRANSID=<12@x>")),
            (
                b"MAIL FROM:a@x BODY=BINARYMIME\r\n",
                Some("BODY=BINARYMIME"),
            ),
            (b"RCPT TO:<b@y> NOTIFY=NEVER\r\n", None),
            (
                b"RCPT TO:<b@y> BODY=BINARYMIME\r\n",
                Some("BODY=BINARYMIME"),
            ),
            (b"MAIL FROM:<\"BODY=BINARYMIME x\"@x>\r\n", None),
            (b"NOOP BODY=BINARYMIME\r\n", None),
        ];
        for (line, want) in cases {
            assert_eq!(
                hidden_parameter(line).as_deref(),
                *want,
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
    }
}
