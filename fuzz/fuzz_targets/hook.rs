//! HTTP hook answers and the JSON text of a message, from hostile bytes.
//!
//! Checks: any answer parses or is refused without a panic; a rejection's reply is one line
//! with a 4xx or 5xx code, the class of its enhanced code, and no CR, LF or NUL but its end;
//! a replacement body has CRLF line ends only; and the message text, however it is cut into
//! chunks, is valid JSON that reads back as the bytes' lossy UTF-8.
#![no_main]

use fuzz_support::{seed_and_rest, Rng};
use libfuzzer_sys::fuzz_target;
use proxsmtpd::protocol::hook::answer::{self, Action, MAX_MODIFICATIONS};
use proxsmtpd::protocol::hook::json_text::JsonText;
use proxsmtpd::protocol::milter::reply::Modification;

fn check_answer(body: &[u8]) {
    let Ok(a) = answer::parse(body) else {
        return;
    };
    assert!(a.modifications.len() <= MAX_MODIFICATIONS);
    match a.action {
        Action::Reject => {
            let reply = a.reply.as_deref().expect("a rejection has a reply");
            assert!(reply.ends_with(b"\r\n"));
            let line = &reply[..reply.len() - 2];
            assert!(!line.iter().any(|&b| b == b'\r' || b == b'\n' || b == 0));
            assert!(line.len() >= 10 && (line[0] == b'4' || line[0] == b'5'));
            assert_eq!(line[4], line[0], "the enhanced code's class is the reply's");
        }
        _ => assert!(a.reply.is_none()),
    }
    assert!(!a.reason.chars().any(char::is_control));
    for m in &a.modifications {
        if let Modification::ReplBody(body) = m {
            for (i, &b) in body.iter().enumerate() {
                if b == b'\n' {
                    assert!(i > 0 && body[i - 1] == b'\r', "bare LF");
                }
                if b == b'\r' {
                    assert_eq!(body.get(i + 1), Some(&b'\n'), "bare CR");
                }
            }
        }
    }
}

fn check_text(rng: &mut Rng, bytes: &[u8]) {
    let mut out = vec![b'"'];
    let mut text = JsonText::new();
    for chunk in rng.chunks(bytes) {
        text.push(chunk, &mut out);
    }
    text.finish(&mut out);
    out.push(b'"');
    let read: String = serde_json::from_slice(&out).expect("valid JSON string");
    assert_eq!(read, String::from_utf8_lossy(bytes));
}

fuzz_target!(|data: &[u8]| {
    let (seed, rest) = seed_and_rest(data);
    check_answer(rest);
    check_text(&mut Rng::new(seed), rest);
});
