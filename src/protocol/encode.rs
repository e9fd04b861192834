//! The wire encoder: turns message content (the filter's output or the received content, with
//! any line endings) into the DATA wire form sent upstream, optionally inserting a header.
//!
//! Every LF, bare CR and CRLF becomes CRLF, lines starting with `.` get one more `.`, a final
//! line without line end gets CRLF, and `.` CRLF ends the data. So whatever the content, the
//! upstream sees exactly one end-of-data, at the end, and no bare CR or LF (no smuggling
//! sequence can pass through). The output does not depend on how the content is chunked.

use memchr::memchr2;

const CRLF: &[u8] = b"\r\n";

/// Where a header line (such as the configured `Header`) goes into the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderPlacement {
    None,
    /// First line of the message (the `Received:` case).
    Prepend(Vec<u8>),
    /// Immediately before the first blank line (a line that is empty or holds only spaces
    /// and tabs), i.e. at the end of the header block; at the end of the message when it has
    /// no blank line.
    EndOfHeaders(Vec<u8>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pos {
    /// Nothing of the current line seen yet.
    LineStart,
    /// The current line so far is only spaces/tabs, held in `held`: it may be the blank line
    /// the header must precede. Only while the header is still to be placed.
    WsPrefix,
    /// Inside a line whose first bytes have been written.
    Mid,
}

/// Streaming, sans-IO DATA wire encoder.
#[derive(Debug, Clone)]
pub struct WireEncoder {
    /// Wire form of the header still to be written (normalised, stuffed, CRLF-terminated).
    header: Option<Vec<u8>>,
    /// The header waits for the first blank line instead of going first.
    at_end_of_headers: bool,
    pos: Pos,
    /// The previous chunk ended in a CR, already written as CRLF: a leading LF belongs to it.
    skip_lf: bool,
    held: Vec<u8>,
    content: u64,
}

impl WireEncoder {
    pub fn new(header: HeaderPlacement) -> Self {
        let (header, at_end_of_headers) = match header {
            HeaderPlacement::None => (None, false),
            HeaderPlacement::Prepend(h) => (header_wire_form(&h), false),
            HeaderPlacement::EndOfHeaders(h) => (header_wire_form(&h), true),
        };
        WireEncoder {
            header,
            at_end_of_headers,
            pos: Pos::LineStart,
            skip_lf: false,
            held: Vec::new(),
            content: 0,
        }
    }

    /// Appends the wire form of the next piece of content to `out`.
    pub fn encode(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        if chunk.is_empty() {
            return;
        }
        self.content += chunk.len() as u64;
        if !self.at_end_of_headers {
            self.place_header(out);
        }
        let mut i = 0;
        if std::mem::take(&mut self.skip_lf) && chunk[0] == b'\n' {
            i = 1;
        }
        // chunk[run..i] is copied verbatim later: CRLF lines without a leading dot pass
        // through as one copy per chunk instead of one per line.
        let mut run = i;
        while i < chunk.len() {
            match self.pos {
                Pos::Mid => match memchr2(b'\r', b'\n', &chunk[i..]) {
                    None => i = chunk.len(),
                    Some(k) => {
                        let p = i + k;
                        self.pos = Pos::LineStart;
                        if chunk[p] == b'\r' && chunk.get(p + 1) == Some(&b'\n') {
                            i = p + 2;
                        } else {
                            out.extend_from_slice(&chunk[run..p]);
                            out.extend_from_slice(CRLF);
                            i = p + 1;
                            run = i;
                            self.skip_lf = chunk[p] == b'\r' && i == chunk.len();
                        }
                    }
                },
                Pos::LineStart => {
                    let b = chunk[i];
                    if self.searching() {
                        match b {
                            b'\r' | b'\n' => {
                                out.extend_from_slice(&chunk[run..i]);
                                run = i;
                                self.place_header(out);
                                continue;
                            }
                            b' ' | b'\t' => {
                                out.extend_from_slice(&chunk[run..i]);
                                run = i;
                                self.pos = Pos::WsPrefix;
                                continue;
                            }
                            _ => {}
                        }
                    }
                    if b == b'.' {
                        out.extend_from_slice(&chunk[run..i]);
                        run = i;
                        out.push(b'.');
                    }
                    self.pos = Pos::Mid;
                }
                // Entered with run == i: this chunk's whitespace is not written yet.
                Pos::WsPrefix => match chunk[i..].iter().position(|&c| c != b' ' && c != b'\t') {
                    None => {
                        self.held.extend_from_slice(&chunk[i..]);
                        i = chunk.len();
                        run = i;
                    }
                    Some(n) => {
                        if matches!(chunk[i + n], b'\r' | b'\n') {
                            self.place_header(out);
                        }
                        out.extend_from_slice(&self.held);
                        self.held.clear();
                        i += n;
                        self.pos = Pos::Mid;
                    }
                },
            }
        }
        out.extend_from_slice(&chunk[run..i]);
    }

    /// Completes the last line, writes a header still pending and the `.` CRLF terminator.
    pub fn finish(mut self, out: &mut Vec<u8>) {
        self.end_last_line(out);
        out.extend_from_slice(b".\r\n");
    }

    /// Content bytes given to `encode` so far (before normalisation and stuffing).
    pub fn content_bytes(&self) -> u64 {
        self.content
    }

    fn searching(&self) -> bool {
        self.at_end_of_headers && self.header.is_some()
    }

    fn place_header(&mut self, out: &mut Vec<u8>) {
        if let Some(h) = self.header.take() {
            out.extend_from_slice(&h);
        }
    }

    fn end_last_line(&mut self, out: &mut Vec<u8>) {
        match self.pos {
            Pos::LineStart => {}
            Pos::Mid => out.extend_from_slice(CRLF),
            Pos::WsPrefix => {
                // An unterminated whitespace-only last line is still a blank line.
                self.place_header(out);
                out.extend_from_slice(&self.held);
                out.extend_from_slice(CRLF);
            }
        }
        self.pos = Pos::LineStart;
        // No blank line (or no content at all): the header goes last.
        self.place_header(out);
    }
}

/// The header's own wire form. Trailing line ends are dropped: with the CRLF added after the
/// header they would make a blank line and end the header block early. An empty header
/// inserts nothing, for the same reason.
fn header_wire_form(header: &[u8]) -> Option<Vec<u8>> {
    let end = header
        .iter()
        .rposition(|&c| c != b'\r' && c != b'\n')
        .map_or(0, |p| p + 1);
    if end == 0 {
        return None;
    }
    let mut enc = WireEncoder::new(HeaderPlacement::None);
    let mut wire = Vec::with_capacity(end + 4);
    enc.encode(&header[..end], &mut wire);
    enc.end_last_line(&mut wire);
    Some(wire)
}

#[cfg(test)]
mod tests {
    use super::super::test_rng::Rng;
    use super::*;
    use crate::protocol::data::DataReceiver;

    fn encode_chunks(placement: &HeaderPlacement, chunks: &[&[u8]]) -> Vec<u8> {
        let mut enc = WireEncoder::new(placement.clone());
        let mut out = Vec::new();
        for chunk in chunks {
            enc.encode(chunk, &mut out);
        }
        let total: usize = chunks.iter().map(|c| c.len()).sum();
        assert_eq!(enc.content_bytes(), total as u64);
        enc.finish(&mut out);
        out
    }

    /// Content split into lines without their line ends (CRLF, LF or bare CR); a final
    /// unterminated line counts as a line.
    fn lines(content: &[u8]) -> Vec<Vec<u8>> {
        let mut lines = Vec::new();
        let mut cur = Vec::new();
        let mut i = 0;
        while i < content.len() {
            match content[i] {
                b'\r' | b'\n' => {
                    if content[i] == b'\r' && content.get(i + 1) == Some(&b'\n') {
                        i += 1;
                    }
                    lines.push(std::mem::take(&mut cur));
                }
                b => cur.push(b),
            }
            i += 1;
        }
        if !cur.is_empty() {
            lines.push(cur);
        }
        lines
    }

    /// Line-oriented oracle for the encoder.
    fn reference(content: &[u8], placement: &HeaderPlacement) -> Vec<u8> {
        let mut all = lines(content);
        let trim = |h: &[u8]| {
            let end = h.iter().rposition(|&c| c != b'\r' && c != b'\n');
            lines(&h[..end.map_or(0, |p| p + 1)])
        };
        match placement {
            HeaderPlacement::None => {}
            HeaderPlacement::Prepend(h) => {
                all.splice(0..0, trim(h));
            }
            HeaderPlacement::EndOfHeaders(h) => {
                let at = all
                    .iter()
                    .position(|l| l.iter().all(|&c| c == b' ' || c == b'\t'))
                    .unwrap_or(all.len());
                all.splice(at..at, trim(h));
            }
        }
        let mut out = Vec::new();
        for line in all {
            if line.first() == Some(&b'.') {
                out.push(b'.');
            }
            out.extend_from_slice(&line);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b".\r\n");
        out
    }

    fn check_all_splits(content: &[u8], placement: &HeaderPlacement, expected: &[u8]) {
        let show = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        assert_eq!(
            show(&encode_chunks(placement, &[content])),
            show(expected),
            "whole {content:?} {placement:?}"
        );
        let ones: Vec<&[u8]> = content.chunks(1).collect();
        assert_eq!(
            show(&encode_chunks(placement, &ones)),
            show(expected),
            "1-byte chunks {content:?} {placement:?}"
        );
        for a in 0..=content.len() {
            let got = encode_chunks(placement, &[&content[..a], &content[a..]]);
            assert_eq!(
                show(&got),
                show(expected),
                "split {a} {content:?} {placement:?}"
            );
            if content.len() <= 24 {
                for b in a..=content.len() {
                    let got =
                        encode_chunks(placement, &[&content[..a], &content[a..b], &content[b..]]);
                    assert_eq!(show(&got), show(expected), "split {a},{b} {content:?}");
                }
            }
        }
    }

    fn none() -> HeaderPlacement {
        HeaderPlacement::None
    }
    fn eoh(h: &[u8]) -> HeaderPlacement {
        HeaderPlacement::EndOfHeaders(h.to_vec())
    }
    fn pre(h: &[u8]) -> HeaderPlacement {
        HeaderPlacement::Prepend(h.to_vec())
    }

    #[test]
    fn table() {
        let cases: Vec<(&[u8], HeaderPlacement, &[u8])> = vec![
            (b"", none(), b".\r\n"),
            (b".", none(), b"..\r\n.\r\n"),
            (b".\r\n", none(), b"..\r\n.\r\n"),
            (b".\n", none(), b"..\r\n.\r\n"),
            (b"a\r\n.\r\nb\r\n", none(), b"a\r\n..\r\nb\r\n.\r\n"),
            (b"a\n.\nb", none(), b"a\r\n..\r\nb\r\n.\r\n"),
            (b"a\r\n.\n", none(), b"a\r\n..\r\n.\r\n"),
            (b"a\r.\r", none(), b"a\r\n..\r\n.\r\n"),
            (b"a\r\n.\rb", none(), b"a\r\n..\r\nb\r\n.\r\n"),
            (b"..x\r\n", none(), b"...x\r\n.\r\n"),
            (b"x.\r\n.x", none(), b"x.\r\n..x\r\n.\r\n"),
            (b"a\r\r\n", none(), b"a\r\n\r\n.\r\n"),
            (b"a\n\r", none(), b"a\r\n\r\n.\r\n"),
            (b"a\n\r\n", none(), b"a\r\n\r\n.\r\n"),
            (b"\r\n", none(), b"\r\n.\r\n"),
            (b"\n\n", none(), b"\r\n\r\n.\r\n"),
            (b"\r", none(), b"\r\n.\r\n"),
            (b"abc", none(), b"abc\r\n.\r\n"),
            (
                b"\xff\x00\x80\n.\xfe",
                none(),
                b"\xff\x00\x80\r\n..\xfe\r\n.\r\n",
            ),
            // Received: prepend.
            (
                b"Subject: a\r\n\r\nbody\r\n",
                pre(b"Received: from x"),
                b"Received: from x\r\nSubject: a\r\n\r\nbody\r\n.\r\n",
            ),
            (b"", pre(b"Received: from x"), b"Received: from x\r\n.\r\n"),
            (b".a", pre(b"Received: x"), b"Received: x\r\n..a\r\n.\r\n"),
            // End of the header block.
            (
                b"Subject: a\r\n\r\nbody\r\n",
                eoh(b"X-F: y"),
                b"Subject: a\r\nX-F: y\r\n\r\nbody\r\n.\r\n",
            ),
            (
                b"Subject: a\n\nbody\n",
                eoh(b"X-F: y"),
                b"Subject: a\r\nX-F: y\r\n\r\nbody\r\n.\r\n",
            ),
            (
                b"Subject: a\r\rbody",
                eoh(b"X-F: y"),
                b"Subject: a\r\nX-F: y\r\n\r\nbody\r\n.\r\n",
            ),
            (
                b"Subject: a\r\n \t \r\nbody",
                eoh(b"X-F: y"),
                b"Subject: a\r\nX-F: y\r\n \t \r\nbody\r\n.\r\n",
            ),
            (
                b"Subject: a\n\tfolded\n  more\n\nbody\n\nend",
                eoh(b"X-F: y"),
                b"Subject: a\r\n\tfolded\r\n  more\r\nX-F: y\r\n\r\nbody\r\n\r\nend\r\n.\r\n",
            ),
            (
                b"A: 1\r\n.dot: 2\r\n\r\n.\r\n",
                eoh(b"X-F: y"),
                b"A: 1\r\n..dot: 2\r\nX-F: y\r\n\r\n..\r\n.\r\n",
            ),
            (
                b"Subject: a\r\n",
                eoh(b"X-F: y"),
                b"Subject: a\r\nX-F: y\r\n.\r\n",
            ),
            (
                b"Subject: a",
                eoh(b"X-F: y"),
                b"Subject: a\r\nX-F: y\r\n.\r\n",
            ),
            (
                b"Subject: a\r\n  ",
                eoh(b"X-F: y"),
                b"Subject: a\r\nX-F: y\r\n  \r\n.\r\n",
            ),
            (
                b"Subject: a\r\n\t x",
                eoh(b"X-F: y"),
                b"Subject: a\r\n\t x\r\nX-F: y\r\n.\r\n",
            ),
            (b"", eoh(b"X-F: y"), b"X-F: y\r\n.\r\n"),
            (b"\r\nbody", eoh(b"X-F: y"), b"X-F: y\r\n\r\nbody\r\n.\r\n"),
            (b"\nbody", eoh(b"X-F: y"), b"X-F: y\r\n\r\nbody\r\n.\r\n"),
            (
                b"  \nbody",
                eoh(b"X-F: y"),
                b"X-F: y\r\n  \r\nbody\r\n.\r\n",
            ),
            // Header templates: folded, bare LF, trailing line ends, leading dot, empty.
            (
                b"A: 1\r\n\r\nb",
                eoh(b"X-A: 1\r\n\tcont\nX-B: 2"),
                b"A: 1\r\nX-A: 1\r\n\tcont\r\nX-B: 2\r\n\r\nb\r\n.\r\n",
            ),
            (
                b"A: 1\n\nb",
                eoh(b"X-F: y\r\n"),
                b"A: 1\r\nX-F: y\r\n\r\nb\r\n.\r\n",
            ),
            (
                b"A: 1\n\nb",
                pre(b"Received: x\n\n"),
                b"Received: x\r\nA: 1\r\n\r\nb\r\n.\r\n",
            ),
            (
                b"A: 1\n\nb",
                eoh(b"X: a\n.b"),
                b"A: 1\r\nX: a\r\n..b\r\n\r\nb\r\n.\r\n",
            ),
            (b"A: 1\n\nb", eoh(b""), b"A: 1\r\n\r\nb\r\n.\r\n"),
            (b"A: 1\n\nb", pre(b"\r\n"), b"A: 1\r\n\r\nb\r\n.\r\n"),
        ];
        for (content, placement, expected) in &cases {
            assert_eq!(
                String::from_utf8_lossy(&reference(content, placement)),
                String::from_utf8_lossy(expected),
                "reference {content:?} {placement:?}"
            );
            check_all_splits(content, placement, expected);
        }
    }

    #[test]
    fn long_lines() {
        let mut content = vec![b'x'; 100_000];
        content.extend_from_slice(b"\n.");
        content.extend(std::iter::repeat_n(b'\xe9', 100_000));
        content.extend_from_slice(b"\r\n");
        content.extend(std::iter::repeat_n(b' ', 100_000));
        content.extend_from_slice(b"\r\nbody");
        for placement in [none(), eoh(b"X-F: y"), pre(b"Received: x")] {
            let expected = reference(&content, &placement);
            assert_eq!(encode_chunks(&placement, &[&content]), expected);
            let ones: Vec<&[u8]> = content.chunks(1).collect();
            assert_eq!(encode_chunks(&placement, &ones), expected);
            for size in [2, 3, 1000, 65536] {
                let chunks: Vec<&[u8]> = content.chunks(size).collect();
                assert_eq!(encode_chunks(&placement, &chunks), expected, "size {size}");
            }
            for a in [
                100_000, 100_001, 100_002, 150_000, 200_002, 200_003, 250_000, 300_004,
            ] {
                let got = encode_chunks(&placement, &[&content[..a], &content[a..]]);
                assert_eq!(got, expected, "split {a}");
            }
        }
    }

    const ALPHABET: &[u8] = b"..\r\r\n\n  \tab\xff";

    #[test]
    fn random_content_matches_reference_under_random_chunking() {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        for _ in 0..20_000 {
            let content = rng.bytes(ALPHABET, 30);
            let header = rng.bytes(ALPHABET, 6);
            let placement = match rng.below(3) {
                0 => none(),
                1 => pre(&header),
                _ => eoh(&header),
            };
            let expected = reference(&content, &placement);
            let chunks = rng.chunks(&content);
            assert_eq!(
                encode_chunks(&placement, &chunks),
                expected,
                "{content:?} as {chunks:?} {placement:?}"
            );
        }
    }

    /// The receiver applied to the encoder's output gives the normalised content back.
    #[test]
    fn round_trip_through_receiver() {
        let mut rng = Rng(0x1234_5678_9abc_def1);
        for _ in 0..20_000 {
            let content = rng.bytes(ALPHABET, 40);
            let mut normalised = Vec::new();
            for line in lines(&content) {
                normalised.extend_from_slice(&line);
                normalised.extend_from_slice(b"\r\n");
            }
            let mut wire = Vec::new();
            let mut enc = WireEncoder::new(HeaderPlacement::None);
            for chunk in rng.chunks(&content) {
                enc.encode(chunk, &mut wire);
            }
            enc.finish(&mut wire);
            wire.extend_from_slice(b"QUIT\r\n");

            let mut rx = DataReceiver::new();
            let mut got = Vec::new();
            let mut consumed = 0;
            let mut done = false;
            for chunk in rng.chunks(&wire) {
                let f = rx.feed(chunk, &mut got);
                consumed += f.consumed;
                if f.done {
                    done = true;
                    break;
                }
            }
            assert!(done, "{content:?}");
            assert_eq!(consumed, wire.len() - 6, "{content:?}");
            assert_eq!(got, normalised, "{content:?}");
            assert_eq!(rx.irregular_line_endings(), 0);
        }
    }

    #[test]
    #[ignore = "micro-benchmark; run with --ignored --nocapture"]
    fn bench_encode_20mb() {
        // 50 ordinary lines and one that needs stuffing, repeated.
        let mut block = b".dotted line\n".to_vec();
        for _ in 0..50 {
            block.extend_from_slice(
                b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod\r\n",
            );
        }
        let content = block.repeat((20 << 20) / block.len() + 1);
        let runs = [("none", none()), ("end-of-headers", eoh(b"X-F: y"))];
        for (name, placement) in runs.iter().cycle().take(6) {
            let placement = placement.clone();
            let mut out = Vec::with_capacity(content.len() + content.len() / 16);
            let start = std::time::Instant::now();
            let mut enc = WireEncoder::new(placement);
            for chunk in content.chunks(64 * 1024) {
                enc.encode(chunk, &mut out);
            }
            enc.finish(&mut out);
            let secs = start.elapsed().as_secs_f64();
            println!(
                "WireEncoder ({name}): {} MB in {:.3} s = {:.0} MB/s",
                content.len() >> 20,
                secs,
                content.len() as f64 / 1e6 / secs
            );
        }
    }
}
