//! The PROXY protocol header parser (versions 1 and 2) on the first bytes of a connection.
//!
//! Checks: no panic; a complete header lies within the input and the size limits (a v1 line
//! ends in CRLF within 107 bytes); its source and destination are both known or both
//! unknown; the answer depends on the header's bytes alone (a prefix of it is incomplete,
//! the header alone or followed by other bytes parses the same); an incomplete input stays
//! under the limit and so do its prefixes; known addresses round-trip through a v1 line and
//! a v2 header written back from them.
#![no_main]

use std::net::SocketAddr;

use libfuzzer_sys::fuzz_target;
use proxsmtpd::protocol::proxy_header::{parse, Parsed, ProxyHeader, MAX_HEADER_LEN};

const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
const V1_MAX_LEN: usize = 107;

/// Cut points to try below `len`: all the short ones, then a few spread over the rest.
fn cuts(len: usize) -> impl Iterator<Item = usize> {
    (0..len.min(20)).chain(
        [
            len / 4,
            len / 2,
            len.saturating_sub(2),
            len.saturating_sub(1),
        ]
        .into_iter()
        .filter(move |&k| k < len),
    )
}

fn complete(buf: &[u8]) -> Option<(usize, ProxyHeader)> {
    match parse(buf) {
        Ok(Parsed::Complete { header_len, header }) => Some((header_len, header)),
        _ => None,
    }
}

/// The v1 line a sender would write for these addresses (both of one family).
fn v1_line(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let proto = if src.is_ipv4() { "TCP4" } else { "TCP6" };
    format!(
        "PROXY {proto} {} {} {} {}\r\n",
        src.ip(),
        dst.ip(),
        src.port(),
        dst.port()
    )
    .into_bytes()
}

/// The v2 PROXY header a sender would write for these addresses (both of one family).
fn v2_header(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut out = V2_SIGNATURE.to_vec();
    out.push(0x21); // version 2, PROXY
    let mut block = Vec::new();
    match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            out.push(0x11);
            block.extend_from_slice(&s.ip().octets());
            block.extend_from_slice(&d.ip().octets());
        }
        (SocketAddr::V6(s), SocketAddr::V6(d)) => {
            out.push(0x21);
            block.extend_from_slice(&s.ip().octets());
            block.extend_from_slice(&d.ip().octets());
        }
        _ => unreachable!("checked by the caller"),
    }
    block.extend_from_slice(&src.port().to_be_bytes());
    block.extend_from_slice(&dst.port().to_be_bytes());
    out.extend_from_slice(&(block.len() as u16).to_be_bytes());
    out.extend_from_slice(&block);
    out
}

fuzz_target!(|data: &[u8]| {
    let is_v1 = data.starts_with(b"PROXY ");
    match parse(data) {
        Ok(Parsed::Complete { header_len, header }) => {
            assert!(
                header_len <= data.len(),
                "header of {header_len} bytes in {} bytes",
                data.len()
            );
            assert!(header_len <= MAX_HEADER_LEN);
            if is_v1 {
                assert!(header_len <= V1_MAX_LEN, "v1 line of {header_len} bytes");
                assert!(data[..header_len].ends_with(b"\r\n"));
            } else {
                assert!(data.starts_with(V2_SIGNATURE) && header_len >= 16);
            }
            assert_eq!(
                header.source.is_some(),
                header.destination.is_some(),
                "{header:?}"
            );
            // The header's bytes alone decide, whatever comes after them.
            let head = &data[..header_len];
            assert_eq!(complete(head), Some((header_len, header)));
            let mut longer = head.to_vec();
            longer.extend_from_slice(b"EHLO client.example\r\n\0\xff");
            assert_eq!(complete(&longer), Some((header_len, header)));
            for k in cuts(header_len) {
                assert_eq!(
                    parse(&head[..k]).ok(),
                    Some(Parsed::Incomplete),
                    "prefix of {k} bytes"
                );
            }
            if let (Some(src), Some(dst)) = (header.source, header.destination) {
                assert_eq!(src.is_ipv4(), dst.is_ipv4(), "one family: {header:?}");
                for written in [v1_line(src, dst), v2_header(src, dst)] {
                    assert_eq!(
                        complete(&written),
                        Some((written.len(), header)),
                        "{header:?} written back as {written:?}"
                    );
                }
            }
        }
        Ok(Parsed::Incomplete) => {
            assert!(
                data.len() < MAX_HEADER_LEN,
                "incomplete after {} bytes",
                data.len()
            );
            if is_v1 {
                assert!(
                    data.len() < V1_MAX_LEN,
                    "incomplete v1 line of {} bytes",
                    data.len()
                );
            }
            for k in cuts(data.len()) {
                assert_eq!(
                    parse(&data[..k]).ok(),
                    Some(Parsed::Incomplete),
                    "prefix of {k} bytes"
                );
            }
        }
        Err(_) => {
            // Refused: more bytes cannot make it a header.
            let mut longer = data.to_vec();
            longer.extend_from_slice(b"\r\n");
            assert!(
                parse(&longer).is_err(),
                "refused, then accepted with more bytes"
            );
        }
    }
});
