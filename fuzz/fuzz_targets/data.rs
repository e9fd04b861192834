//! The DATA receiver, and the wire encoder through it.
//!
//! Receiver checks, for any wire bytes: the content never holds a bare CR or LF; a call
//! consumes no more than it is given, all of it until the end of data, nothing after; the
//! result does not depend on chunking; the end of data is a `.` CRLF at a line start; every
//! NUL octet of the content is counted.
//! Round trip: the encoder's output for any content (fed in any chunks) is received back as
//! the normalised content, ending exactly at the encoder's terminator.
#![no_main]

use fuzz_support::{normalise, only_crlf, seed_and_rest, Rng};
use libfuzzer_sys::fuzz_target;
use proxsmtpd::protocol::data::DataReceiver;
use proxsmtpd::protocol::encode::{HeaderPlacement, WireEncoder};

/// What the receiver made of the chunks: content, done, bytes consumed, bare line ends.
#[derive(Debug, PartialEq, Eq)]
struct Received {
    content: Vec<u8>,
    done: bool,
    consumed: usize,
    irregular: u64,
}

fn receive(chunks: &[&[u8]]) -> Received {
    let mut rx = DataReceiver::new();
    let mut content = Vec::new();
    let mut consumed = 0;
    let mut done = false;
    for chunk in chunks {
        let f = rx.feed(chunk, &mut content);
        assert!(f.consumed <= chunk.len(), "consumed more than given");
        if done {
            assert_eq!(f.consumed, 0, "consumed after the end of data");
            assert!(f.done);
            continue;
        }
        consumed += f.consumed;
        done = f.done;
        if !done {
            assert_eq!(
                f.consumed,
                chunk.len(),
                "stopped early before the end of data"
            );
        }
    }
    assert_eq!(rx.content_bytes(), content.len() as u64);
    // Every NUL of the content is counted: the proxy refuses such messages.
    assert_eq!(
        rx.nul_bytes(),
        content.iter().filter(|&&b| b == 0).count() as u64,
        "NUL count"
    );
    Received {
        content,
        done,
        consumed,
        irregular: rx.irregular_line_endings(),
    }
}

fn check_receiver(wire: &[u8], rng: &mut Rng) {
    let whole = receive(&[wire]);
    assert!(
        only_crlf(&whole.content),
        "bare CR or LF in {:?}",
        whole.content
    );
    if whole.done {
        let ended = &wire[..whole.consumed];
        assert!(
            ended == b".\r\n" || ended.ends_with(b"\r\n.\r\n"),
            "end of data without CRLF . CRLF"
        );
    } else {
        assert_eq!(whole.consumed, wire.len());
    }
    assert_eq!(
        whole,
        receive(&rng.chunks(wire)),
        "result depends on chunking"
    );
    let ones: Vec<&[u8]> = wire.chunks(1).collect();
    assert_eq!(whole, receive(&ones), "result differs byte by byte");
}

/// The encoder's output for `content` fed in random chunks.
fn encode(content: &[u8], placement: HeaderPlacement, rng: &mut Rng) -> Vec<u8> {
    let mut enc = WireEncoder::new(placement);
    let mut wire = Vec::new();
    for chunk in rng.chunks(content) {
        enc.encode(chunk, &mut wire);
    }
    assert_eq!(enc.content_bytes(), content.len() as u64);
    enc.finish(&mut wire);
    wire
}

/// The header with its trailing line ends removed, as the encoder inserts it.
fn trimmed_header(header: &[u8]) -> &[u8] {
    let end = header
        .iter()
        .rposition(|&c| c != b'\r' && c != b'\n')
        .map_or(0, |p| p + 1);
    &header[..end]
}

fn check_round_trip(content: &[u8], placement: HeaderPlacement, rng: &mut Rng) {
    let mut wire = encode(content, placement.clone(), rng);
    assert!(only_crlf(&wire), "encoder wrote a bare CR or LF");
    assert!(wire == b".\r\n" || wire.ends_with(b"\r\n.\r\n"));
    let encoded_len = wire.len();
    // Pipelined commands after the message must be left alone.
    wire.extend_from_slice(b"QUIT\r\n");
    let got = receive(&rng.chunks(&wire));
    assert!(got.done, "no end of data in the encoder's output");
    assert_eq!(
        got.consumed, encoded_len,
        "end of data before the terminator"
    );
    assert_eq!(got.irregular, 0);
    let body = normalise(content);
    match placement {
        HeaderPlacement::None => assert_eq!(got.content, body),
        HeaderPlacement::Prepend(h) => {
            let mut want = normalise(trimmed_header(&h));
            want.extend_from_slice(&body);
            assert_eq!(got.content, want);
        }
        HeaderPlacement::EndOfHeaders(h) => {
            // Where the header goes is the encoder's own table tests' business; here the
            // header and the content must both come through whole.
            let header = normalise(trimmed_header(&h));
            assert_eq!(got.content.len(), body.len() + header.len());
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let (seed, input) = seed_and_rest(data);
    let mut rng = Rng::new(seed);
    check_receiver(input, &mut rng);

    check_round_trip(input, HeaderPlacement::None, &mut rng);
    // A header taken from the front of the input, the content from the rest.
    let split = if input.is_empty() {
        0
    } else {
        rng.below(input.len().min(64) + 1)
    };
    let (header, content) = input.split_at(split);
    let placement = if rng.below(2) == 0 {
        HeaderPlacement::Prepend(header.to_vec())
    } else {
        HeaderPlacement::EndOfHeaders(header.to_vec())
    };
    check_round_trip(content, placement, &mut rng);
});
