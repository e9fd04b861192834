//! The command parser: any client line is classified and its envelope values extracted
//! without panicking, and the verb agrees with the envelope address.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proxsmtpd::protocol::command::{classify, envelope_address, xforward_attribute, Verb};

const XFORWARD_NAMES: &[&str] = &["ADDR", "HELO", "NAME", "PROTO", "SOURCE", "IDENT", ""];

fuzz_target!(|line: &[u8]| {
    let verb = classify(line);
    let address = envelope_address(line);
    // Both read the same `MAIL FROM` / `RCPT TO` phrase.
    assert_eq!(
        address.is_some(),
        matches!(verb, Verb::Mail | Verb::Rcpt),
        "verb {verb:?}, address {address:?}"
    );
    if let Some(addr) = &address {
        assert!(addr.len() <= line.len() * 3, "lossy UTF-8 grows at most 3x");
    }
    for name in XFORWARD_NAMES {
        if let Some(value) = xforward_attribute(line, name) {
            assert!(!value.is_empty() || line.windows(3).any(|w| w == b"=[]"));
        }
    }
    // A name taken from the line itself (the word before its first `=`) reaches the
    // matching code with odd bytes.
    if let Some(eq) = line.iter().position(|&b| b == b'=') {
        let start = line[..eq]
            .iter()
            .rposition(|&b| b == b' ' || b == b'\t')
            .map_or(0, |p| p + 1);
        if let Ok(name) = std::str::from_utf8(&line[start..eq]) {
            let _ = xforward_attribute(line, name);
        }
    }
});
