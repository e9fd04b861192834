//! Line framing for SMTP commands and replies.
//!
//! A line is everything up to and including the first LF (CR is not required, as in the
//! original). Lines longer than the limit are discarded up to their LF and reported once as
//! [`Framed::TooLong`], so the session answers them and stays in step with the client.

use bytes::{Buf, Bytes, BytesMut};

/// The original's limit: a line of 4222 bytes or more (line end included) is too long.
pub const COMMAND_LINE_LIMIT: usize = 4222;

#[derive(Debug, PartialEq, Eq)]
pub enum Framed {
    /// A complete line including its line end.
    Line(Bytes),
    /// A line that exceeded the limit; its bytes were discarded.
    TooLong,
}

#[derive(Debug)]
pub struct LineReader {
    limit: usize,
    discarding: bool,
}

impl LineReader {
    pub fn new(limit: usize) -> Self {
        LineReader {
            limit,
            discarding: false,
        }
    }

    /// Takes the next line out of `buf`, or returns `None` when more bytes are needed.
    pub fn next(&mut self, buf: &mut BytesMut) -> Option<Framed> {
        loop {
            match memchr::memchr(b'\n', buf) {
                Some(pos) => {
                    if self.discarding {
                        buf.advance(pos + 1);
                        self.discarding = false;
                        return Some(Framed::TooLong);
                    }
                    if pos + 1 >= self.limit {
                        buf.advance(pos + 1);
                        return Some(Framed::TooLong);
                    }
                    return Some(Framed::Line(buf.split_to(pos + 1).freeze()));
                }
                None => {
                    if self.discarding {
                        buf.clear();
                        return None;
                    }
                    if buf.len() >= self.limit {
                        self.discarding = true;
                        continue;
                    }
                    return None;
                }
            }
        }
    }

    /// The unterminated bytes left when the peer closes, as a last line. The relay does not
    /// forward them (an upstream would wait for the line's end); framing checks use this to
    /// account for every byte.
    pub fn take_partial(&mut self, buf: &mut BytesMut) -> Option<Framed> {
        if self.discarding {
            self.discarding = false;
            buf.clear();
            return Some(Framed::TooLong);
        }
        if buf.is_empty() {
            None
        } else {
            Some(Framed::Line(buf.split().freeze()))
        }
    }
}

/// The line without its trailing CRLF / LF.
pub fn trim_line_end(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame_all(input: &[u8], limit: usize, split: usize) -> Vec<Framed> {
        let mut reader = LineReader::new(limit);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for chunk in [&input[..split], &input[split..]] {
            buf.extend_from_slice(chunk);
            while let Some(f) = reader.next(&mut buf) {
                out.push(f);
            }
        }
        out
    }

    #[test]
    fn frames_lines_at_every_split() {
        let cases: &[(&[u8], usize, Vec<Framed>)] = &[
            (
                b"EHLO a\r\nMAIL\n",
                100,
                vec![
                    Framed::Line(Bytes::from_static(b"EHLO a\r\n")),
                    Framed::Line(Bytes::from_static(b"MAIL\n")),
                ],
            ),
            (
                b"0123456789\r\nok\r\n",
                8,
                vec![Framed::TooLong, Framed::Line(Bytes::from_static(b"ok\r\n"))],
            ),
            (
                b"0123456\nok\n",
                8,
                vec![Framed::TooLong, Framed::Line(Bytes::from_static(b"ok\n"))],
            ),
            (
                b"012345\nx",
                8,
                vec![Framed::Line(Bytes::from_static(b"012345\n"))],
            ),
        ];
        for (input, limit, want) in cases {
            for split in 0..=input.len() {
                assert_eq!(&frame_all(input, *limit, split), want, "split {split}");
            }
        }
    }

    #[test]
    fn partial_line_at_close() {
        let mut reader = LineReader::new(100);
        let mut buf = BytesMut::from(&b"QUIT"[..]);
        assert_eq!(reader.next(&mut buf), None);
        assert_eq!(
            reader.take_partial(&mut buf),
            Some(Framed::Line(Bytes::from_static(b"QUIT")))
        );
    }
}
