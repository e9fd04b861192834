//! Upstream replies: bytes framed into lines by `LineReader` and assembled into replies by
//! `ReplyAssembler`, as the proxy reads its upstream.
//!
//! Checks: framing does not depend on how the bytes arrive; framed lines (plus discarded
//! over-long lines) account for every input byte; every reply's code is its last line's
//! code, only its last line lacks the continuation mark, and it has at most
//! `MAX_REPLY_LINES` lines.
#![no_main]

use bytes::{Bytes, BytesMut};
use fuzz_support::{seed_and_rest, Rng};
use libfuzzer_sys::fuzz_target;
use proxsmtpd::protocol::line::{Framed, LineReader};
use proxsmtpd::protocol::reply::{reply_code, Reply, ReplyAssembler, ReplyError, MAX_REPLY_LINES};

/// The proxy's limit for upstream reply lines.
const REPLY_LINE_LIMIT: usize = 16 * 1024;

/// All frames of `chunks` in order, the partial line at the end included.
fn frame(limit: usize, chunks: &[&[u8]]) -> Vec<Framed> {
    let mut reader = LineReader::new(limit);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        while let Some(f) = reader.next(&mut buf) {
            out.push(f);
        }
    }
    out.extend(reader.take_partial(&mut buf));
    assert!(buf.is_empty(), "take_partial leaves nothing behind");
    out
}

fn check_reply(reply: &Reply) {
    let (last, rest) = reply.lines.split_last().expect("a reply has a line");
    assert_eq!(Some(reply.code), reply_code(last));
    assert!(reply
        .lines
        .iter()
        .all(|l| reply_code(l) == Some(reply.code)));
    assert!(reply.lines.len() <= MAX_REPLY_LINES);
    for line in rest {
        assert!(reply_code(line).is_some() && line.get(3) == Some(&b'-'));
    }
    assert!(!(reply_code(last).is_some() && last.get(3) == Some(&b'-')));
    assert_eq!(reply.raw(), reply.lines.concat());
    assert_eq!(reply.is_positive(), (200..300).contains(&reply.code));
}

fuzz_target!(|data: &[u8]| {
    let (seed, input) = seed_and_rest(data);
    let mut rng = Rng::new(seed);
    // Small limits reach the over-long path with short inputs.
    let limit = match rng.below(3) {
        0 => REPLY_LINE_LIMIT,
        _ => 2 + rng.below(64),
    };

    let whole = frame(limit, &[input]);
    assert_eq!(
        whole,
        frame(limit, &rng.chunks(input)),
        "framing depends on chunking"
    );

    let mut kept = 0;
    let mut too_long = 0;
    let mut assembler = ReplyAssembler::default();
    for (i, f) in whole.iter().enumerate() {
        let line = match f {
            Framed::Line(line) => line,
            Framed::TooLong => {
                too_long += 1;
                continue;
            }
        };
        kept += line.len();
        assert!(!line.is_empty());
        let last = i + 1 == whole.len();
        if !last || line.ends_with(b"\n") {
            assert!(
                line.len() < limit,
                "line of {} with limit {limit}",
                line.len()
            );
            assert_eq!(memchr_count(line), 1, "one LF, at the end");
            assert!(line.ends_with(b"\n"));
        }
        match assembler.push(Bytes::clone(line)) {
            Ok(Some(reply)) => {
                check_reply(&reply);
                assert!(assembler.is_empty());
            }
            Ok(None) => assert!(!assembler.is_empty()),
            // The proxy drops the upstream here; start over as a new connection would.
            Err(ReplyError::TooManyLines | ReplyError::Malformed) => {
                assert!(assembler.is_empty());
                assembler = ReplyAssembler::default();
            }
        }
    }
    if too_long == 0 {
        assert_eq!(
            kept,
            input.len(),
            "without over-long lines every byte is framed"
        );
    } else {
        assert!(kept < input.len());
    }
});

fn memchr_count(line: &[u8]) -> usize {
    line.iter().filter(|&&b| b == b'\n').count()
}
