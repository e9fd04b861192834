//! The DATA receiver: turns what the client sends after our 354 (the wire form) into message
//! content.
//!
//! Rules, chosen so that no SMTP smuggling sequence can end the data early:
//! * A line starts at the body start or right after a real CRLF. A bare CR or bare LF is
//!   normalised to CRLF in the content but does NOT start a line, so `\n.\n`, `\n.\r\n`,
//!   `\r\n.\n`, `\r.\r` and `\r\n.\r` are all data.
//! * The end of data is only `.` CRLF at the start of a line. Bytes after it are left to the
//!   caller (they are pipelined commands).
//! * A `.` at the start of a line is removed (dot-unstuffing), unless a bare CR or LF
//!   follows it: a stuffed line would start with `..`, so that dot is content.
//! * NUL octets are content, but counted ([`DataReceiver::nul_bytes`]): the caller refuses
//!   such a message.
//! * Line length is unlimited; state carries across `feed` calls, so the result does not
//!   depend on how the input is chunked.

use memchr::memchr2;

const CRLF: &[u8] = b"\r\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the body start or right after a real CRLF.
    LineStart,
    /// A `.` at a line start was consumed (and dropped).
    Dot,
    /// `.` CR at a line start: an LF now ends the data.
    DotCr,
    /// Inside a line.
    Mid,
    /// A CR ended the previous chunk; the next byte tells CRLF from a bare CR.
    Cr,
    /// The end-of-data marker has been consumed.
    Done,
}

/// Result of one [`DataReceiver::feed`] call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Feed {
    /// Input bytes used; when `done`, this stops right after the terminator's LF.
    pub consumed: usize,
    /// The end-of-data marker has been seen.
    pub done: bool,
}

/// Streaming, sans-IO DATA receiver.
#[derive(Debug, Clone)]
pub struct DataReceiver {
    state: State,
    content: u64,
    irregular: u64,
    nul: u64,
}

impl Default for DataReceiver {
    fn default() -> Self {
        Self::new()
    }
}

impl DataReceiver {
    /// A receiver at the start of the body, so an immediate `.` CRLF is an empty message.
    pub fn new() -> Self {
        DataReceiver {
            state: State::LineStart,
            content: 0,
            irregular: 0,
            nul: 0,
        }
    }

    /// Consumes wire bytes, appending message content to `out`. After `done`, further calls
    /// consume nothing.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Feed {
        let start_len = out.len();
        let mut i = 0;
        // input[run..i] is copied verbatim later: CRLF lines without a leading dot pass
        // through as one copy per chunk instead of one per line.
        let mut run = 0;
        while i < input.len() {
            match self.state {
                State::Mid => match memchr2(b'\r', b'\n', &input[i..]) {
                    None => i = input.len(),
                    Some(k) => {
                        let p = i + k;
                        match (input[p], input.get(p + 1)) {
                            (b'\r', Some(b'\n')) => {
                                i = p + 2;
                                self.state = State::LineStart;
                            }
                            (b'\r', None) => {
                                // Hold the CR: only the next chunk tells CRLF from bare CR.
                                out.extend_from_slice(&input[run..p]);
                                i = p + 1;
                                run = i;
                                self.state = State::Cr;
                            }
                            _ => {
                                out.extend_from_slice(&input[run..p]);
                                self.bare_line_end(out);
                                i = p + 1;
                                run = i;
                            }
                        }
                    }
                },
                State::LineStart => {
                    if input[i] == b'.' {
                        out.extend_from_slice(&input[run..i]);
                        i += 1;
                        run = i;
                        self.state = State::Dot;
                    } else {
                        self.state = State::Mid;
                    }
                }
                // In the states below nothing is pending in the run (run == i).
                State::Dot => match input[i] {
                    b'\r' => {
                        i += 1;
                        run = i;
                        self.state = State::DotCr;
                    }
                    b'\n' => {
                        // `.` + bare LF is no stuffing (that would be `..`) but a
                        // smuggling attempt: keep the dot as content.
                        out.push(b'.');
                        self.bare_line_end(out);
                        i += 1;
                        run = i;
                        self.state = State::Mid;
                    }
                    _ => self.state = State::Mid,
                },
                State::DotCr => {
                    if input[i] == b'\n' {
                        i += 1;
                        run = i;
                        self.state = State::Done;
                    } else {
                        // `.` + bare CR: as `.` + bare LF, the dot is content.
                        out.push(b'.');
                        self.bare_line_end(out);
                        self.state = State::Mid;
                    }
                }
                State::Cr => {
                    if input[i] == b'\n' {
                        out.extend_from_slice(CRLF);
                        i += 1;
                        run = i;
                        self.state = State::LineStart;
                    } else {
                        self.bare_line_end(out);
                        self.state = State::Mid;
                    }
                }
                State::Done => break,
            }
        }
        out.extend_from_slice(&input[run..i]);
        self.content += (out.len() - start_len) as u64;
        self.nul += memchr::memchr_iter(0, &out[start_len..]).count() as u64;
        Feed {
            consumed: i,
            done: self.state == State::Done,
        }
    }

    /// Content bytes appended to `out` so far.
    pub fn content_bytes(&self) -> u64 {
        self.content
    }

    /// Bare CRs and bare LFs seen so far (each normalised to CRLF).
    pub fn irregular_line_endings(&self) -> u64 {
        self.irregular
    }

    /// NUL octets in the content so far. A receiver that drops NULs would see
    /// `CRLF NUL . CRLF` as the end of data, so the proxy refuses such messages.
    pub fn nul_bytes(&self) -> u64 {
        self.nul
    }

    fn bare_line_end(&mut self, out: &mut Vec<u8>) {
        out.extend_from_slice(CRLF);
        self.irregular += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_rng::Rng;
    use super::*;

    /// What the receiver yields for `wire`, fed as the given chunks: (content, done,
    /// total consumed, irregular count).
    fn run_chunks(chunks: &[&[u8]]) -> (Vec<u8>, bool, usize, u64) {
        let mut rx = DataReceiver::new();
        let mut out = Vec::new();
        let mut consumed = 0;
        for chunk in chunks {
            let f = rx.feed(chunk, &mut out);
            consumed += f.consumed;
            if f.done {
                assert_eq!(rx.content_bytes(), out.len() as u64);
                return (out, true, consumed, rx.irregular_line_endings());
            }
            assert_eq!(
                f.consumed,
                chunk.len(),
                "must consume everything until done"
            );
        }
        assert_eq!(rx.content_bytes(), out.len() as u64);
        (out, false, consumed, rx.irregular_line_endings())
    }

    /// A line-oriented restatement of the rules, used as the oracle. At the end of input a
    /// CR (and a line-start dot) is still held, as the streaming receiver holds it.
    fn reference(wire: &[u8]) -> (Vec<u8>, bool, usize, u64) {
        let mut out = Vec::new();
        let mut irregular = 0;
        let mut line_start = true;
        let mut i = 0;
        while i < wire.len() {
            if line_start {
                if wire[i..].starts_with(b".\r\n") {
                    return (out, true, i + 3, irregular);
                }
                if wire[i] == b'.' {
                    // A dot before a bare CR/LF is content; before anything else, stuffing.
                    match (wire.get(i + 1), wire.get(i + 2)) {
                        (None, _) | (Some(b'\r'), None) => break,
                        (Some(b'\n'), _) | (Some(b'\r'), Some(_)) => out.push(b'.'),
                        _ => {}
                    }
                    i += 1;
                }
                line_start = false;
                continue;
            }
            match wire[i] {
                b'\r' if i + 1 == wire.len() => break,
                b'\r' if wire[i + 1] == b'\n' => {
                    out.extend_from_slice(b"\r\n");
                    line_start = true;
                    i += 2;
                }
                b'\r' | b'\n' => {
                    out.extend_from_slice(b"\r\n");
                    irregular += 1;
                    i += 1;
                }
                b => {
                    out.push(b);
                    i += 1;
                }
            }
        }
        (out, false, wire.len(), irregular)
    }

    /// Checks `wire` split at every byte boundary (and pairs of boundaries when short), and
    /// in 1-byte chunks, against `expected`.
    fn check_all_splits(wire: &[u8], expected: &(Vec<u8>, bool, usize, u64)) {
        assert_eq!(&run_chunks(&[wire]), expected, "whole {wire:?}");
        let ones: Vec<&[u8]> = wire.chunks(1).collect();
        assert_eq!(&run_chunks(&ones), expected, "1-byte chunks {wire:?}");
        for a in 0..=wire.len() {
            let got = run_chunks(&[&wire[..a], &wire[a..]]);
            assert_eq!(&got, expected, "split at {a} of {wire:?}");
            if wire.len() <= 24 {
                for b in a..=wire.len() {
                    let got = run_chunks(&[&wire[..a], &wire[a..b], &wire[b..]]);
                    assert_eq!(&got, expected, "split at {a},{b} of {wire:?}");
                }
            }
        }
    }

    #[test]
    fn table() {
        // (wire, content, done, consumed, irregular); consumed is the whole input when not done.
        type Case = (&'static [u8], &'static [u8], bool, usize, u64);
        let cases: &[Case] = &[
            (b".\r\n", b"", true, 3, 0),
            (b".\r\nQUIT\r\n", b"", true, 3, 0),
            (b"a\r\n.\r\n", b"a\r\n", true, 6, 0),
            (b"a\r\n.\r\nQUIT\r\n", b"a\r\n", true, 6, 0),
            (
                b"a\r\nb\r\n.\r\nRSET\r\nQUIT\r\n",
                b"a\r\nb\r\n",
                true,
                9,
                0,
            ),
            (b"\r\n.\r\n", b"\r\n", true, 5, 0),
            (b"..\r\n.\r\n", b".\r\n", true, 7, 0),
            (b"..a\r\n.\r\n", b".a\r\n", true, 8, 0),
            (b".a\r\n.\r\n", b"a\r\n", true, 7, 0),
            (b"a.\r\n.\r\n", b"a.\r\n", true, 7, 0),
            (b"...\r\n.\r\n", b"..\r\n", true, 8, 0),
            (b". \r\n.\r\n", b" \r\n", true, 7, 0),
            // Smuggling vectors: never an end of data.
            (b"a\n.\n", b"a\r\n.\r\n", false, 4, 2),
            (b"a\n.\r\n", b"a\r\n.\r\n", false, 5, 1),
            (b"a\r\n.\n", b"a\r\n.\r\n", false, 5, 1),
            (b"a\r.\r", b"a\r\n.", false, 4, 1),
            (b"a\r.\rb", b"a\r\n.\r\nb", false, 5, 2),
            (b"a\r\n.\r", b"a\r\n", false, 5, 0),
            (b"a\r\n.\rb", b"a\r\n.\r\nb", false, 6, 1),
            (b"a\r\n.\r.\r\n", b"a\r\n.\r\n.\r\n", false, 8, 1),
            (b"\n.\r\n", b"\r\n.\r\n", false, 4, 1),
            (b"\n.\n", b"\r\n.\r\n", false, 3, 2),
            (b"\r.\r\n", b"\r\n.\r\n", false, 4, 1),
            (b".\n", b".\r\n", false, 2, 1),
            (b".\r.\r\n", b".\r\n.\r\n", false, 5, 1),
            (b".\r\r\n.\r\n", b".\r\n\r\n", true, 7, 1),
            (b"a\n.\nb\r\n.\r\n", b"a\r\n.\r\nb\r\n", true, 10, 2),
            (b"a\n\r\n.\r\n", b"a\r\n\r\n", true, 7, 1),
            (b"a\r\r\n.\r\n", b"a\r\n\r\n", true, 7, 1),
            (b"a\n\r.\r\n", b"a\r\n\r\n.\r\n", false, 6, 2),
            // A held CR / dot at the end of input produces nothing yet.
            (b"a\r", b"a", false, 2, 0),
            (b".", b"", false, 1, 0),
            (b"a\r\n.", b"a\r\n", false, 4, 0),
            (b"", b"", false, 0, 0),
            // 8-bit and NUL bytes pass through.
            (
                b"\xff\x00\x80\r\n.\xfe\r\n.\r\n",
                b"\xff\x00\x80\r\n\xfe\r\n",
                true,
                12,
                0,
            ),
        ];
        for &(wire, content, done, consumed, irregular) in cases {
            let expected = (content.to_vec(), done, consumed, irregular);
            assert_eq!(reference(wire), expected, "reference for {wire:?}");
            check_all_splits(wire, &expected);
        }
    }

    #[test]
    fn feeding_after_done_consumes_nothing() {
        let mut rx = DataReceiver::new();
        let mut out = Vec::new();
        let f = rx.feed(b"x\r\n.\r\nMAIL", &mut out);
        assert_eq!(
            f,
            Feed {
                consumed: 6,
                done: true
            }
        );
        let f = rx.feed(b"MAIL FROM:<>\r\n", &mut out);
        assert_eq!(
            f,
            Feed {
                consumed: 0,
                done: true
            }
        );
        assert_eq!(out, b"x\r\n");
    }

    #[test]
    fn nul_octets_are_counted_at_every_split() {
        let cases: &[(&[u8], u64)] = &[
            (b"a\r\n.\r\n", 0),
            (b"a\r\n\0.\r\n.\r\n", 1),
            (b"\0\0\0\r\n.\r\n", 3),
            (b"x\0\r\n.\0\r\n.\r\n", 2),
        ];
        for &(wire, want) in cases {
            for split in 0..=wire.len() {
                let mut rx = DataReceiver::new();
                let mut out = Vec::new();
                let first = rx.feed(&wire[..split], &mut out);
                rx.feed(&wire[first.consumed..], &mut out);
                assert_eq!(rx.nul_bytes(), want, "{wire:?} split {split}");
            }
        }
    }

    #[test]
    fn out_is_appended_to() {
        let mut rx = DataReceiver::new();
        let mut out = b"prefix".to_vec();
        rx.feed(b"ab\r\n.\r\n", &mut out);
        assert_eq!(out, b"prefixab\r\n");
        assert_eq!(rx.content_bytes(), 4);
    }

    #[test]
    fn long_lines() {
        let mut wire = vec![b'x'; 100_000];
        wire.extend_from_slice(b"\r\n.");
        wire.extend(std::iter::repeat_n(b'y', 100_000));
        wire.extend_from_slice(b"\n.\r\n.\r\n");
        let expected = reference(&wire);
        assert!(expected.1);
        assert_eq!(expected.0.len(), 200_000 + 2 + 2 + 3);
        assert_eq!(run_chunks(&[&wire]), expected);
        let ones: Vec<&[u8]> = wire.chunks(1).collect();
        assert_eq!(run_chunks(&ones), expected);
        for size in [2, 3, 7, 1000, 4096, 65536] {
            let chunks: Vec<&[u8]> = wire.chunks(size).collect();
            assert_eq!(run_chunks(&chunks), expected, "chunk size {size}");
        }
        for a in [
            99_999, 100_000, 100_001, 100_002, 100_003, 200_003, 200_004, 200_005,
        ] {
            assert_eq!(run_chunks(&[&wire[..a], &wire[a..]]), expected, "split {a}");
        }
    }

    #[test]
    fn random_inputs_match_reference_under_random_chunking() {
        const ALPHABET: &[u8] = b"..\r\r\n\nab \xff";
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..20_000 {
            let wire = rng.bytes(ALPHABET, 29);
            let expected = reference(&wire);
            let chunks = rng.chunks(&wire);
            assert_eq!(run_chunks(&chunks), expected, "{wire:?} as {chunks:?}");
        }
    }

    #[test]
    #[ignore = "micro-benchmark; run with --ignored --nocapture"]
    fn bench_receive_20mb() {
        // 50 ordinary lines and one stuffed line, repeated.
        let mut block = b"..stuffed line\r\n".to_vec();
        for _ in 0..50 {
            block.extend_from_slice(
                b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod\r\n",
            );
        }
        let mut wire = block.repeat((20 << 20) / block.len() + 1);
        wire.extend_from_slice(b".\r\n");
        for _ in 0..3 {
            let mut out = Vec::with_capacity(wire.len());
            let start = std::time::Instant::now();
            let mut rx = DataReceiver::new();
            let mut done = false;
            for chunk in wire.chunks(64 * 1024) {
                done = rx.feed(chunk, &mut out).done;
            }
            let secs = start.elapsed().as_secs_f64();
            assert!(done);
            println!(
                "DataReceiver: {} MB in {:.3} s = {:.0} MB/s",
                wire.len() >> 20,
                secs,
                wire.len() as f64 / 1e6 / secs
            );
        }
    }
}
