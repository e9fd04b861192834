//! What the filter's exit status and its last stderr line mean for the message.

/// Most bytes of a stderr line kept (the original's limit).
pub(crate) const MAX_STDERR_LINE: usize = 255;

/// Longest reply line sent to the client, CRLF not counted.
pub(crate) const MAX_REPLY_LEN: usize = 256;

/// Text used when a rejecting filter said nothing.
const DEFAULT_REJECT_TEXT: &str = "Content Rejected";

/// Remembers the last non-blank line a filter wrote to stderr, in bounded memory however
/// much it writes, and whatever way its output is split into chunks.
#[derive(Debug, Default)]
pub(crate) struct StderrTracker {
    /// The line being received: leading whitespace skipped, at most MAX_STDERR_LINE bytes.
    current: Vec<u8>,
    /// The last complete non-blank line, trimmed.
    last: Option<String>,
}

impl StderrTracker {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Takes the next piece of the filter's stderr.
    pub(crate) fn feed(&mut self, mut chunk: &[u8]) {
        while let Some(nl) = memchr::memchr(b'\n', chunk) {
            self.push(&chunk[..nl]);
            if let Some(line) = trimmed(&self.current) {
                self.last = Some(line);
            }
            self.current.clear();
            chunk = &chunk[nl + 1..];
        }
        self.push(chunk);
    }

    /// The last non-blank line, counting an unterminated final line.
    pub(crate) fn last_line(&self) -> Option<String> {
        trimmed(&self.current).or_else(|| self.last.clone())
    }

    fn push(&mut self, mut bytes: &[u8]) {
        if self.current.is_empty() {
            let start = bytes
                .iter()
                .position(|&b| !is_space(b))
                .unwrap_or(bytes.len());
            bytes = &bytes[start..];
        }
        let room = MAX_STDERR_LINE - self.current.len();
        self.current
            .extend_from_slice(&bytes[..bytes.len().min(room)]);
    }
}

/// C `isspace` for the C locale.
fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\x0b' | b'\x0c' | b'\r')
}

/// The line without surrounding whitespace, or None when blank. A multi-byte character
/// cut by the length limit is dropped rather than shown as a replacement character.
fn trimmed(line: &[u8]) -> Option<String> {
    let end = line.iter().rposition(|&b| !is_space(b))? + 1;
    let mut line = &line[..end];
    if let Err(e) = std::str::from_utf8(line) {
        if e.error_len().is_none() {
            line = &line[..e.valid_up_to()];
        }
    }
    let text = String::from_utf8_lossy(line).trim_end().to_string();
    (!text.is_empty()).then_some(text)
}

/// Builds the reply line (with CRLF) for a filter's reject text.
///
/// Kept from the original: a text that starts with its own reply code is sent as is (so a
/// filter can say `451 try later`, `554 5.7.1 spam`, or `250 dropped` for a silent drop);
/// any other text becomes `550 Content Rejected; <text>`.
/// Changed on purpose: only a 2xx, 4xx or 5xx code counts (a 1xx or 3xx is not a final
/// reply, so such text gets the 550 prefix), a `ddd-` continuation marker is sent as
/// `ddd ` so the client never waits for lines that will not come, control characters are
/// removed (a TAB becomes a space) so the text cannot break the reply line, and the line is cut at 256 bytes on a
/// character boundary (at most 256 characters, and never over SMTP's line limit).
pub(crate) fn format_reply(text: &str) -> String {
    let clean: String = text
        .chars()
        .map(|c| if c == '\t' { ' ' } else { c })
        .filter(|c| !c.is_control())
        .collect();
    let clean = clean.trim();
    let mut reply = match reply_code(clean) {
        Some(code) if clean.as_bytes().get(3) == Some(&b'-') => {
            format!("{code} {}", &clean[4..])
        }
        Some(_) => clean.to_string(),
        None if clean.is_empty() => format!("550 Content Rejected; {DEFAULT_REJECT_TEXT}"),
        None => format!("550 Content Rejected; {clean}"),
    };
    if reply.len() > MAX_REPLY_LEN {
        let mut end = MAX_REPLY_LEN;
        while !reply.is_char_boundary(end) {
            end -= 1;
        }
        reply.truncate(end);
    }
    reply.push_str("\r\n");
    reply
}

/// The leading reply code if `text` starts with 2xx, 4xx or 5xx followed by a space, a
/// `-` or nothing.
fn reply_code(text: &str) -> Option<&str> {
    let b = text.as_bytes();
    let code_ok = b.len() >= 3
        && matches!(b[0], b'2' | b'4' | b'5')
        && b[1].is_ascii_digit()
        && b[2].is_ascii_digit();
    let end_ok = matches!(b.get(3), None | Some(b' ' | b'-'));
    (code_ok && end_ok).then(|| &text[..3])
}

/// How the filter process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Exit {
    /// Normal exit with this status.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
    /// Killed by us after FilterTimeout without activity.
    TimedOut,
    /// The process could not be started.
    SpawnFailed(String),
}

/// What the proxy does with the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Deliver the (filtered) message upstream.
    Deliver,
    /// Send `reply` to the client; the upstream gets RSET and never sees DATA.
    Reply { reply: String, kind: ReplyKind },
    /// The filter failed: the client gets `451 Local Error`, the upstream RSET.
    LocalError { reason: String },
}

/// The class of a filter's reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReplyKind {
    /// 2xx: a silent drop. The client is told the message was accepted; it is not sent.
    Drop,
    /// 4xx: the client should try again later.
    TempFail,
    /// 5xx: the message is refused.
    Reject,
}

/// Decides from the exit and the last stderr line.
pub(crate) fn decide(exit: &Exit, stderr_last: Option<&str>) -> Verdict {
    match exit {
        Exit::Code(0) => Verdict::Deliver,
        // Deviation from the original, which rejected with the shell's message (e.g.
        // `550 Content Rejected; sh: 1: clamdscan: not found`): 126 and 127 are the
        // shell's "cannot execute" and "not found". That is a configuration problem, not a
        // judgement on the message, so it must tempfail and never bounce mail.
        Exit::Code(code @ (126 | 127)) => Verdict::LocalError {
            reason: format!(
                "filter command could not be run (exit {code}): {}",
                stderr_last.unwrap_or("no message")
            ),
        },
        // A shell reports a program it ran that died of signal N as exit 128+N (and prints
        // e.g. `Segmentation fault`): a crash, not a verdict, so the message is deferred.
        Exit::Code(code @ 129..=192) => Verdict::LocalError {
            reason: format!(
                "filter command terminated abnormally (exit {code}, signal {})",
                code - 128
            ),
        },
        Exit::Code(_) => {
            let reply = format_reply(stderr_last.unwrap_or(""));
            let kind = match reply.as_bytes().first() {
                Some(b'2') => ReplyKind::Drop,
                Some(b'4') => ReplyKind::TempFail,
                _ => ReplyKind::Reject,
            };
            Verdict::Reply { reply, kind }
        }
        Exit::Signal(sig) => Verdict::LocalError {
            reason: format!("filter command terminated abnormally (signal {sig})"),
        },
        Exit::TimedOut => Verdict::LocalError {
            reason: "timeout while listening to filter command".to_string(),
        },
        Exit::SpawnFailed(err) => Verdict::LocalError {
            reason: format!("couldn't run filter command: {err}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracker_keeps_last_non_blank_line() {
        let cases: &[(&[u8], Option<&str>)] = &[
            (b"", None),
            (b"\n\n   \n\t\r\n", None),
            (b"virus found\n", Some("virus found")),
            (b"virus found", Some("virus found")),
            (
                b"first line\n554 5.7.1 Go away spammer\n",
                Some("554 5.7.1 Go away spammer"),
            ),
            (b"one\ntwo\n   \n", Some("two")),
            (b"one\ntwo\n   ", Some("two")),
            (b"  \t lead and trail \t \r\n", Some("lead and trail")),
            (b"inner   spaces kept\n", Some("inner   spaces kept")),
            (b"crlf line\r\n", Some("crlf line")),
            (b"caf\xc3\xa9\n", Some("caf\u{e9}")),
            (b"bad \xff byte\n", Some("bad \u{fffd} byte")),
        ];
        for (input, want) in cases {
            // Every way of splitting the input in two must give the same answer.
            for split in 0..=input.len() {
                let mut t = StderrTracker::new();
                t.feed(&input[..split]);
                t.feed(&input[split..]);
                assert_eq!(
                    t.last_line().as_deref(),
                    *want,
                    "{input:?} split at {split}"
                );
            }
            // And so must feeding it byte by byte.
            let mut t = StderrTracker::new();
            for b in input.iter() {
                t.feed(std::slice::from_ref(b));
            }
            assert_eq!(t.last_line().as_deref(), *want, "{input:?} byte by byte");
        }
    }

    #[test]
    fn tracker_is_bounded() {
        let mut t = StderrTracker::new();
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..200 {
            t.feed(&chunk);
        }
        assert_eq!(t.last_line().unwrap().len(), MAX_STDERR_LINE);
        t.feed(b"\n554 no\n");
        assert_eq!(t.last_line().as_deref(), Some("554 no"));
        assert!(t.current.capacity() <= 4 * MAX_STDERR_LINE);

        // Truncation inside a multi-byte character drops the partial character.
        let mut t = StderrTracker::new();
        let mut line = vec![b'a'; MAX_STDERR_LINE - 1];
        line.extend_from_slice("é\n".as_bytes());
        t.feed(&line);
        assert_eq!(t.last_line().unwrap(), "a".repeat(MAX_STDERR_LINE - 1));

        // Leading whitespace does not count against the limit.
        let mut t = StderrTracker::new();
        t.feed(&vec![b' '; 10_000]);
        t.feed(b"word\n");
        assert_eq!(t.last_line().as_deref(), Some("word"));
    }

    #[test]
    fn reply_formatting() {
        let long = "x".repeat(300);
        let cases: &[(&str, String)] = &[
            ("", "550 Content Rejected; Content Rejected\r\n".into()),
            ("   ", "550 Content Rejected; Content Rejected\r\n".into()),
            (
                "virus found",
                "550 Content Rejected; virus found\r\n".into(),
            ),
            (
                "554 5.7.1 Go away spammer",
                "554 5.7.1 Go away spammer\r\n".into(),
            ),
            ("250 Dropped silently", "250 Dropped silently\r\n".into()),
            ("451 4.3.0 try later", "451 4.3.0 try later\r\n".into()),
            ("550-first of many", "550 first of many\r\n".into()),
            ("550", "550\r\n".into()),
            ("550-", "550 \r\n".into()),
            (
                "354 go ahead",
                "550 Content Rejected; 354 go ahead\r\n".into(),
            ),
            ("199 hmm", "550 Content Rejected; 199 hmm\r\n".into()),
            (
                "5500 four digits",
                "550 Content Rejected; 5500 four digits\r\n".into(),
            ),
            (
                "55 two digits",
                "550 Content Rejected; 55 two digits\r\n".into(),
            ),
            (
                "5x0 letters",
                "550 Content Rejected; 5x0 letters\r\n".into(),
            ),
            ("550\tspam", "550 spam\r\n".into()),
            (
                "bad\r\n250 injected",
                "550 Content Rejected; bad250 injected\r\n".into(),
            ),
            (
                "nul\0and\x1besc",
                "550 Content Rejected; nulandesc\r\n".into(),
            ),
            ("  554 spaced  ", "554 spaced\r\n".into()),
            (
                &long,
                format!("550 Content Rejected; {}\r\n", &long[..256 - 22]),
            ),
            (&format!("554 {long}"), format!("554 {}\r\n", &long[..252])),
            (
                &"é".repeat(200),
                format!("550 Content Rejected; {}\r\n", "é".repeat(117)),
            ),
        ];
        for (text, want) in cases {
            let got = format_reply(text);
            assert_eq!(&got, want, "text {text:?}");
            assert!(got.len() <= MAX_REPLY_LEN + 2);
        }
    }

    #[test]
    fn decisions() {
        let local = |reason: &str| Verdict::LocalError {
            reason: reason.into(),
        };
        let reply = |reply: &str, kind| Verdict::Reply {
            reply: reply.into(),
            kind,
        };
        let cases: &[(Exit, Option<&str>, Verdict)] = &[
            (Exit::Code(0), None, Verdict::Deliver),
            (
                Exit::Code(0),
                Some("554 ignored on success"),
                Verdict::Deliver,
            ),
            (
                Exit::Code(1),
                None,
                reply(
                    "550 Content Rejected; Content Rejected\r\n",
                    ReplyKind::Reject,
                ),
            ),
            (
                Exit::Code(1),
                Some("virus found"),
                reply("550 Content Rejected; virus found\r\n", ReplyKind::Reject),
            ),
            (
                Exit::Code(1),
                Some("554 5.7.1 no"),
                reply("554 5.7.1 no\r\n", ReplyKind::Reject),
            ),
            (
                Exit::Code(75),
                Some("451 4.3.0 later"),
                reply("451 4.3.0 later\r\n", ReplyKind::TempFail),
            ),
            (
                Exit::Code(1),
                Some("250 dropped"),
                reply("250 dropped\r\n", ReplyKind::Drop),
            ),
            // The original bounced this as `550 Content Rejected; Killed`.
            (
                Exit::Code(137),
                Some("Killed"),
                local("filter command terminated abnormally (exit 137, signal 9)"),
            ),
            (
                Exit::Code(193),
                Some("554 no"),
                reply("554 no\r\n", ReplyKind::Reject),
            ),
            (
                Exit::Code(127),
                Some("sh: 1: nope: not found"),
                local("filter command could not be run (exit 127): sh: 1: nope: not found"),
            ),
            (
                Exit::Code(126),
                None,
                local("filter command could not be run (exit 126): no message"),
            ),
            (
                Exit::Signal(9),
                Some("554 ignored"),
                local("filter command terminated abnormally (signal 9)"),
            ),
            (
                Exit::TimedOut,
                None,
                local("timeout while listening to filter command"),
            ),
            (
                Exit::SpawnFailed("No such file".into()),
                None,
                local("couldn't run filter command: No such file"),
            ),
        ];
        for (exit, stderr, want) in cases {
            assert_eq!(&decide(exit, *stderr), want, "{exit:?} {stderr:?}");
        }
    }
}
