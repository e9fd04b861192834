//! The `proxsmtpd.conf` reader on arbitrary text, into the default settings.
//!
//! Checks: no panic; the text and bytes entry points agree; a file that parsed applies
//! again to its own result without change (the last value wins, `Skip` only switches on).
//!
//! A `Listen` (or `TlsListen`) host name is resolved while parsing, and a fuzzer would turn
//! that into a stream of DNS queries: such lines are commented out (keeping the line
//! numbers) and their value goes through the `OutAddress` parser instead, which shares the
//! address syntax but resolves nothing. `validate` is skipped for a host-name `OutAddress` for the same reason.
#![no_main]

use std::borrow::Cow;

use libfuzzer_sys::fuzz_target;
use proxsmtpd::config::legacy::read_legacy;
use proxsmtpd::config::{parse_legacy, parse_out_address, validate, OutAddress, Settings};

/// The reader's whitespace (C `isspace`).
fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\x0b' | b'\x0c' | b'\r')
}

fn trim(mut b: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = b {
        if !is_space(*first) {
            break;
        }
        b = rest;
    }
    while let [rest @ .., last] = b {
        if !is_space(*last) {
            break;
        }
        b = rest;
    }
    b
}

/// Settings whose host-name values are resolved while parsing.
const RESOLVING: &[&[u8]] = &[b"listen", b"tlslisten"];

/// The value of a `Listen` line that would be resolved as a host name.
fn listen_host(line: &[u8]) -> Option<&[u8]> {
    let colon = line.iter().position(|&b| b == b':')?;
    let name = trim(&line[..colon]);
    let value = trim(&line[colon + 1..]);
    let resolving = RESOLVING.iter().any(|r| name.eq_ignore_ascii_case(r));
    (resolving && value.first()?.is_ascii_alphabetic()).then_some(value)
}

/// The input with every resolving line commented out.
fn without_resolving(data: &[u8]) -> Cow<'_, [u8]> {
    if !data
        .split(|&b| b == b'\n')
        .any(|l| listen_host(l).is_some())
    {
        return Cow::Borrowed(data);
    }
    let mut out = Vec::with_capacity(data.len() + 8);
    for (i, line) in data.split(|&b| b == b'\n').enumerate() {
        if i > 0 {
            out.push(b'\n');
        }
        if let Some(value) = listen_host(line) {
            let _ = parse_out_address(&String::from_utf8_lossy(value));
            out.push(b'#');
        }
        out.extend_from_slice(line);
    }
    Cow::Owned(out)
}

fuzz_target!(|data: &[u8]| {
    let data = without_resolving(data);

    let mut from_bytes = Settings::default();
    let bytes_result = read_legacy(&data, "fuzz.conf", &mut from_bytes);

    let text = String::from_utf8_lossy(&data);
    let mut settings = Settings::default();
    let result = parse_legacy(&text, "fuzz.conf", &mut settings);
    if let Err(e) = &result {
        assert!(!e.to_string().is_empty());
    }
    if std::str::from_utf8(&data).is_ok() {
        assert_eq!(result.is_ok(), bytes_result.is_ok());
        assert_eq!(settings, from_bytes);
    }

    if result.is_ok() {
        let mut again = settings.clone();
        assert!(parse_legacy(&text, "fuzz.conf", &mut again).is_ok());
        assert_eq!(
            again, settings,
            "applying the file twice changed the settings"
        );
        if !matches!(settings.out_address, Some(OutAddress::Host { .. })) {
            let _ = validate(&settings);
        }
    }
});
