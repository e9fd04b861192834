//! A JSON string written piece by piece: the message contents go to a hook as one JSON
//! string, read from the spool in chunks, so it is never held whole in memory.
//!
//! Mail need not be UTF-8 and JSON must be: bytes that are not UTF-8 become U+FFFD (as
//! `String::from_utf8_lossy` does). A character cut between two chunks is kept back until
//! the next one completes it.

/// Escapes chunks of bytes into the inside of a JSON string (the quotes are the caller's).
#[derive(Debug, Default)]
pub struct JsonText {
    /// The start of a UTF-8 sequence the last chunk ended in (at most 3 bytes).
    pending: Vec<u8>,
}

impl JsonText {
    pub fn new() -> JsonText {
        JsonText::default()
    }

    /// Escapes `chunk` onto `out`.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        if self.pending.is_empty() {
            self.escape_all(chunk, out);
        } else {
            let mut joined = std::mem::take(&mut self.pending);
            joined.extend_from_slice(chunk);
            self.escape_all(&joined, out);
        }
    }

    fn escape_all(&mut self, mut bytes: &[u8], out: &mut Vec<u8>) {
        loop {
            match std::str::from_utf8(bytes) {
                Ok(text) => {
                    escape_str(text, out);
                    return;
                }
                Err(e) => {
                    let (valid, rest) = bytes.split_at(e.valid_up_to());
                    escape_str(
                        std::str::from_utf8(valid).unwrap_or_else(|_| unreachable!()),
                        out,
                    );
                    match e.error_len() {
                        Some(bad) => {
                            out.extend_from_slice("\u{FFFD}".as_bytes());
                            bytes = &rest[bad..];
                        }
                        None => {
                            // An incomplete sequence at the end: the next chunk may finish it.
                            self.pending = rest.to_vec();
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Ends the text: a sequence still incomplete becomes U+FFFD.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if !std::mem::take(&mut self.pending).is_empty() {
            out.extend_from_slice("\u{FFFD}".as_bytes());
        }
    }
}

/// Escapes `text` as the inside of a JSON string (RFC 8259 section 7).
fn escape_str(text: &str, out: &mut Vec<u8>) {
    let bytes = text.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escaped: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        if escaped.is_empty() {
            out.extend_from_slice(format!("\\u{b:04x}").as_bytes());
        } else {
            out.extend_from_slice(escaped);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
}

/// The JSON string of `bytes`, quotes included, as [`JsonText`] writes it.
pub fn quoted(bytes: &[u8]) -> Vec<u8> {
    let mut out = vec![b'"'];
    let mut text = JsonText::new();
    text.push(bytes, &mut out);
    text.finish(&mut out);
    out.push(b'"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The string serde_json reads back from the pieces `chunks` make.
    fn round_trip(chunks: &[&[u8]]) -> String {
        let mut out = vec![b'"'];
        let mut text = JsonText::new();
        for c in chunks {
            text.push(c, &mut out);
        }
        text.finish(&mut out);
        out.push(b'"');
        serde_json::from_slice::<String>(&out).expect("valid JSON string")
    }

    #[test]
    fn text_reads_back_as_it_was_or_lossy() {
        let cases: &[(&[&[u8]], &str)] = &[
            (&[b"plain"], "plain"),
            (&[b"a\"b\\c\r\n\td"], "a\"b\\c\r\n\td"),
            (
                &[b"nul\x00 bell\x07 esc\x1b del\x7f"],
                "nul\0 bell\x07 esc\x1b del\x7f",
            ),
            // é (C3 A9) cut between chunks, and € (E2 82 AC) cut twice.
            (&[b"caf\xc3", b"\xa9 ", b"\xe2", b"\x82", b"\xac"], "café €"),
            (&[b"latin1 \xe9t\xe9"], "latin1 \u{FFFD}t\u{FFFD}"),
            (&[b"cut at the end \xe2\x82"], "cut at the end \u{FFFD}"),
            (&[b"", b"x", b""], "x"),
            (&[b"\xff\xfe"], "\u{FFFD}\u{FFFD}"),
        ];
        for (chunks, expected) in cases {
            assert_eq!(&round_trip(chunks), expected, "{chunks:?}");
        }
    }

    #[test]
    fn every_split_of_a_mixed_text_gives_the_same_string() {
        let message = "Subject: h\u{e9}llo \u{1F600}\r\n\r\nline \"one\"\\\r\n\x01end".as_bytes();
        let whole = round_trip(&[message]);
        for cut in 0..=message.len() {
            let (a, b) = message.split_at(cut);
            assert_eq!(round_trip(&[a, b]), whole, "cut at {cut}");
        }
    }

    #[test]
    fn quoted_is_a_json_string() {
        assert_eq!(quoted(b"a\"b"), b"\"a\\\"b\"");
    }
}
