//! Assembling upstream reply lines into complete (possibly multi-line) replies.

use bytes::Bytes;

/// One complete SMTP reply as the upstream sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The three-digit code shared by all its lines.
    pub code: u16,
    /// The raw lines, each with its line end.
    pub lines: Vec<Bytes>,
}

impl Reply {
    pub fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }

    pub fn raw(&self) -> Vec<u8> {
        self.lines.concat()
    }

    /// The reply as sent, sharing the line's bytes when it has one line (most replies):
    /// no copy and no allocation.
    pub fn bytes(&self) -> Bytes {
        match self.lines.as_slice() {
            [line] => line.clone(),
            lines => Bytes::from(lines.concat()),
        }
    }

    /// A one-line reply of the proxy's own.
    pub fn local(code: u16, text: &str) -> Reply {
        Reply {
            code,
            lines: vec![Bytes::from(format!("{code} {text}\r\n"))],
        }
    }

    /// A reply from a test script: lines separated by `|`, CRLF added to each.
    #[cfg(test)]
    pub(crate) fn scripted(text: &str) -> Reply {
        let lines: Vec<Bytes> = text
            .split('|')
            .map(|l| Bytes::from(format!("{l}\r\n")))
            .collect();
        let code = reply_code(&lines[lines.len() - 1]).unwrap_or(0);
        Reply { code, lines }
    }
}

/// The code at the start of a reply line, if it has three digits.
pub fn reply_code(line: &[u8]) -> Option<u16> {
    match line {
        [a, b, c, ..] if a.is_ascii_digit() && b.is_ascii_digit() && c.is_ascii_digit() => {
            Some(u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(c - b'0'))
        }
        _ => None,
    }
}

/// Whether a line continues a multi-line reply (`250-...`).
fn is_continuation(line: &[u8]) -> bool {
    reply_code(line).is_some() && line.get(3) == Some(&b'-')
}

/// The most lines one reply may have; an upstream sending more is broken or hostile.
pub const MAX_REPLY_LINES: usize = 1000;

#[derive(Debug, PartialEq, Eq)]
pub enum ReplyError {
    TooManyLines,
    /// A line without a three-digit code, or a code other than the first line's: the
    /// reply's meaning is unknown, so it must never be relayed or trusted (a `550-` first
    /// line followed by `250 ` must not pass for an acceptance).
    Malformed,
}

/// Collects lines until a reply is complete. Every line must carry the same three-digit
/// code; anything else is an error, so that a broken upstream can neither make the proxy
/// wait forever nor have garbage relayed as an answer.
#[derive(Debug, Default)]
pub struct ReplyAssembler {
    lines: Vec<Bytes>,
}

impl ReplyAssembler {
    pub fn push(&mut self, line: Bytes) -> Result<Option<Reply>, ReplyError> {
        let Some(code) = reply_code(&line) else {
            self.lines.clear();
            return Err(ReplyError::Malformed);
        };
        if let Some(first) = self.lines.first() {
            if reply_code(first) != Some(code) {
                self.lines.clear();
                return Err(ReplyError::Malformed);
            }
        }
        let more = is_continuation(&line);
        self.lines.push(line);
        if more {
            if self.lines.len() >= MAX_REPLY_LINES {
                self.lines.clear();
                return Err(ReplyError::TooManyLines);
            }
            return Ok(None);
        }
        Ok(Some(Reply {
            code,
            lines: std::mem::take(&mut self.lines),
        }))
    }

    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assemble(lines: &[&'static [u8]]) -> Vec<Reply> {
        let mut a = ReplyAssembler::default();
        lines
            .iter()
            .filter_map(|l| a.push(Bytes::from_static(l)).unwrap())
            .collect()
    }

    #[test]
    fn single_and_multi_line_replies() {
        let r = assemble(&[b"250-a\r\n", b"250-b\r\n", b"250 c\r\n", b"354 go\r\n"]);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].code, 250);
        assert_eq!(r[0].lines.len(), 3);
        assert_eq!(r[1].code, 354);
        // As sent, whatever the number of lines.
        assert_eq!(&r[0].bytes()[..], b"250-a\r\n250-b\r\n250 c\r\n");
        assert_eq!(&r[1].bytes()[..], b"354 go\r\n");
        assert_eq!(r[0].bytes(), r[0].raw());
    }

    #[test]
    fn bare_code_ends_a_reply() {
        let r = assemble(&[b"250\r\n", b"354\n"]);
        let codes: Vec<u16> = r.iter().map(|r| r.code).collect();
        assert_eq!(codes, vec![250, 354]);
    }

    #[test]
    fn malformed_replies_are_errors() {
        let cases: &[&[&[u8]]] = &[
            &[b"garbage\r\n"],
            &[b"25\r\n"],
            &[b"550-no\r\n", b"250 ok\r\n"],
            &[b"250-a\r\n", b"x\r\n"],
        ];
        for lines in cases {
            let mut a = ReplyAssembler::default();
            let results: Vec<_> = lines
                .iter()
                .map(|l| a.push(Bytes::from_static(l)))
                .collect();
            assert_eq!(
                results.last(),
                Some(&Err(ReplyError::Malformed)),
                "{lines:?}"
            );
            assert!(a.is_empty());
        }
    }

    #[test]
    fn too_many_lines_is_an_error() {
        let mut a = ReplyAssembler::default();
        let mut result = Ok(None);
        for _ in 0..MAX_REPLY_LINES {
            result = a.push(Bytes::from_static(b"250-x\r\n"));
        }
        assert_eq!(result, Err(ReplyError::TooManyLines));
    }
}
