//! The HAProxy PROXY protocol, versions 1 and 2, on the SMTP listener.
//!
//! A load balancer that relays TCP opens its own connection to us, so the peer address we
//! see is the balancer's. With the PROXY protocol it first sends a short header naming the
//! real client, then the client's bytes. The header is trusted only from networks the
//! operator lists (see [`is_trusted`]): from anyone else it would let a client claim any
//! address.
//!
//! [`parse`] is sans-IO: it looks at the bytes received so far and says whether they hold a
//! whole header, how long it is, or why it is not one. [`read_header`] drives it over a
//! socket with a timeout and a bounded buffer.
//!
//! Specification: <https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt>.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

/// The longest header accepted, in bytes, either version. A v1 line is at most 107 bytes by
/// the specification. A v2 header may announce up to 16 + 65535 bytes, but its addresses
/// take at most 216 and the TLVs balancers add (cloud endpoint ids, TLS details) a few
/// hundred more, so anything longer is broken or hostile and not worth buffering.
pub const MAX_HEADER_LEN: usize = 4096;

/// "PROXY" and its one space: enough to tell a v1 line from anything else.
const V1_PREFIX: &[u8] = b"PROXY ";
/// The longest v1 line, CRLF included ("PROXY UNKNOWN" with two full IPv6 addresses).
const V1_MAX_LEN: usize = 107;
pub(crate) const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// Signature, version and command, family and protocol, and the 16-bit length.
const V2_FIXED_LEN: usize = 16;

/// The addresses a PROXY header carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyHeader {
    /// The real client. `None` when the sender does not know it (v1 `UNKNOWN`, v2 `LOCAL`,
    /// or a v2 family other than TCP over IPv4 or IPv6): use the socket's peer address then.
    pub source: Option<SocketAddr>,
    /// The address the client connected to, on the same terms as `source`.
    pub destination: Option<SocketAddr>,
}

impl ProxyHeader {
    pub(crate) const UNKNOWN: ProxyHeader = ProxyHeader {
        source: None,
        destination: None,
    };
}

/// What [`parse`] makes of the bytes received so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// A valid beginning of a header; more bytes are needed.
    Incomplete,
    /// A whole header. It occupies the first `header_len` bytes; what follows belongs to
    /// the client.
    Complete {
        header_len: usize,
        header: ProxyHeader,
    },
}

/// Why no PROXY header could be had from a connection.
#[derive(Debug)]
pub enum ProxyError {
    /// The bytes are not a valid PROXY header; the text says what is wrong. It never
    /// quotes the received bytes, so it is safe to log.
    Malformed(String),
    /// No complete header within the size limit (107 bytes for v1, [`MAX_HEADER_LEN`]
    /// for v2).
    TooLarge,
    /// The header did not arrive within the allowed time.
    Timeout(Duration),
    /// The peer closed the connection first, after sending `received` bytes (0 is what a
    /// balancer's TCP health check looks like).
    Closed { received: usize },
    /// Reading from the connection failed.
    Io(io::Error),
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProxyError::Malformed(why) => write!(f, "malformed PROXY protocol header: {why}"),
            ProxyError::TooLarge => write!(
                f,
                "PROXY protocol header too long (the limit is {V1_MAX_LEN} bytes for \
                 version 1 and {MAX_HEADER_LEN} for version 2)"
            ),
            ProxyError::Timeout(t) => {
                write!(f, "no complete PROXY protocol header within {t:?}")
            }
            ProxyError::Closed { received } => write!(
                f,
                "connection closed after {received} bytes, before the PROXY protocol header \
                 was complete"
            ),
            ProxyError::Io(e) => write!(f, "reading the PROXY protocol header: {e}"),
        }
    }
}

impl std::error::Error for ProxyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ProxyError::Io(e) => Some(e),
            _ => None,
        }
    }
}

fn malformed(why: impl Into<String>) -> ProxyError {
    ProxyError::Malformed(why.into())
}

/// Looks for a PROXY header (v1 or v2) at the start of `buf`, the bytes received so far.
///
/// Never looks past the header: bytes after `header_len` are the client's. Checks run as
/// soon as the bytes they need have arrived, so garbage is refused early and a header split
/// anywhere gives the same answer once whole.
pub fn parse(buf: &[u8]) -> Result<Parsed, ProxyError> {
    if starts_like(buf, V2_SIGNATURE) {
        parse_v2(buf)
    } else if starts_like(buf, V1_PREFIX) {
        parse_v1(buf)
    } else {
        Err(malformed(
            "no PROXY protocol signature (the connection does not start with \"PROXY \" or \
             the version 2 signature)",
        ))
    }
}

/// Whether `buf` agrees with `signature` on the bytes both have.
fn starts_like(buf: &[u8], signature: &[u8]) -> bool {
    let n = buf.len().min(signature.len());
    buf[..n] == signature[..n]
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, ProxyError> {
    let window = &buf[..buf.len().min(V1_MAX_LEN)];
    let Some(lf) = memchr::memchr(b'\n', window) else {
        return if buf.len() >= V1_MAX_LEN {
            Err(ProxyError::TooLarge)
        } else {
            Ok(Parsed::Incomplete)
        };
    };
    // The prefix holds no LF, so the line is at least as long as the prefix.
    let line = window[..lf]
        .strip_suffix(b"\r")
        .ok_or_else(|| malformed("version 1 line ends in a bare LF instead of CRLF"))?;
    let header = parse_v1_fields(&line[V1_PREFIX.len()..])?;
    Ok(Parsed::Complete {
        header_len: lf + 1,
        header,
    })
}

/// Parses what follows "PROXY " on a v1 line, CRLF excluded.
fn parse_v1_fields(fields: &[u8]) -> Result<ProxyHeader, ProxyError> {
    let mut fields = fields.split(|&b| b == b' ');
    let v6 = match fields.next().unwrap_or_default() {
        // The specification has receivers ignore whatever follows UNKNOWN.
        b"UNKNOWN" => return Ok(ProxyHeader::UNKNOWN),
        b"TCP4" => false,
        b"TCP6" => true,
        _ => return Err(malformed("version 1 protocol is not TCP4, TCP6 or UNKNOWN")),
    };
    let fields: Vec<&[u8]> = fields.collect();
    let [src, dst, sport, dport] = fields[..] else {
        return Err(malformed(
            "version 1 line needs exactly a source and destination address and port after \
             the protocol, separated by single spaces",
        ));
    };
    let source = SocketAddr::new(v1_address(src, v6, "source")?, v1_port(sport, "source")?);
    let destination = SocketAddr::new(
        v1_address(dst, v6, "destination")?,
        v1_port(dport, "destination")?,
    );
    Ok(ProxyHeader {
        source: Some(source),
        destination: Some(destination),
    })
}

/// An address of the announced family. The standard parsers are as strict as the
/// specification: IPv4 in four decimal parts without leading zeros, IPv6 without zone.
fn v1_address(field: &[u8], v6: bool, which: &str) -> Result<IpAddr, ProxyError> {
    let text = std::str::from_utf8(field).ok();
    let ip = if v6 {
        text.and_then(|t| t.parse::<Ipv6Addr>().ok())
            .map(IpAddr::V6)
    } else {
        text.and_then(|t| t.parse::<Ipv4Addr>().ok())
            .map(IpAddr::V4)
    };
    let family = if v6 { "IPv6" } else { "IPv4" };
    ip.ok_or_else(|| {
        malformed(format!(
            "version 1 {which} address is not a valid {family} address"
        ))
    })
}

/// A port: 0 to 65535 in decimal, without sign or leading zeros (which the specification
/// forbids to avoid any confusion with octal).
fn v1_port(field: &[u8], which: &str) -> Result<u16, ProxyError> {
    let canonical = matches!(field, [b'0'] | [b'1'..=b'9', ..])
        && field.len() <= 5
        && field.iter().all(u8::is_ascii_digit);
    // At most five digits, so the sum fits.
    let value = canonical.then(|| {
        field
            .iter()
            .fold(0u32, |n, &d| n * 10 + u32::from(d - b'0'))
    });
    value.and_then(|v| u16::try_from(v).ok()).ok_or_else(|| {
        malformed(format!(
            "version 1 {which} port is not a decimal number from 0 to 65535"
        ))
    })
}

fn parse_v2(buf: &[u8]) -> Result<Parsed, ProxyError> {
    // The signature matched as far as it arrived; check each later byte once it is here.
    let Some(&version_command) = buf.get(V2_SIGNATURE.len()) else {
        return Ok(Parsed::Incomplete);
    };
    let version = version_command >> 4;
    if version != 2 {
        return Err(malformed(format!(
            "version {version} after the version 2 signature"
        )));
    }
    let local = match version_command & 0x0f {
        0x0 => true,
        0x1 => false,
        command => {
            return Err(malformed(format!(
                "version 2 command {command:#x} is neither LOCAL nor PROXY"
            )))
        }
    };
    let Some(&family) = buf.get(13) else {
        return Ok(Parsed::Incomplete);
    };
    // LOCAL (a balancer's own health check) has the family ignored by specification.
    // Otherwise only the seven defined family/protocol pairs are valid; each fixes the
    // size of the address block that must open the variable part.
    let address_len = match (local, family) {
        (true, _) | (false, 0x00) => 0,
        (false, 0x11 | 0x12) => 12,
        (false, 0x21 | 0x22) => 36,
        (false, 0x31 | 0x32) => 216,
        (false, _) => {
            return Err(malformed(format!(
                "version 2 address family and protocol {family:#04x} is not defined"
            )))
        }
    };
    let Some(&[hi, lo]) = buf.get(14..V2_FIXED_LEN) else {
        return Ok(Parsed::Incomplete);
    };
    let len = usize::from(u16::from_be_bytes([hi, lo]));
    if V2_FIXED_LEN + len > MAX_HEADER_LEN {
        return Err(ProxyError::TooLarge);
    }
    if len < address_len {
        return Err(malformed(format!(
            "version 2 length {len} is too short for the addresses of family {family:#04x} \
             ({address_len} bytes)"
        )));
    }
    let header_len = V2_FIXED_LEN + len;
    // What follows the addresses is TLVs; none of them matters to an SMTP proxy, and the
    // length field alone delimits the header.
    let Some(block) = buf.get(V2_FIXED_LEN..header_len) else {
        return Ok(Parsed::Incomplete);
    };
    // Datagram and UNIX families fall back to the socket's addresses, as the
    // specification allows for families a receiver does not support.
    let addresses = match (local, family) {
        (false, 0x11) => socket_addresses::<4, Ipv4Addr>(block),
        (false, 0x21) => socket_addresses::<16, Ipv6Addr>(block),
        _ => Some((None, None)),
    };
    let (source, destination) =
        addresses.ok_or_else(|| malformed("version 2 address block is truncated"))?;
    Ok(Parsed::Complete {
        header_len,
        header: ProxyHeader {
            source,
            destination,
        },
    })
}

/// Source and destination from a v2 TCP address block: both addresses (`N` bytes each),
/// then both ports, in network byte order.
fn socket_addresses<const N: usize, A>(
    block: &[u8],
) -> Option<(Option<SocketAddr>, Option<SocketAddr>)>
where
    A: From<[u8; N]>,
    IpAddr: From<A>,
{
    let (src, rest) = block.split_first_chunk::<N>()?;
    let (dst, rest) = rest.split_first_chunk::<N>()?;
    let (sport, rest) = rest.split_first_chunk::<2>()?;
    let (dport, _) = rest.split_first_chunk::<2>()?;
    let addr = |ip: &[u8; N], port: &[u8; 2]| {
        SocketAddr::new(IpAddr::from(A::from(*ip)), u16::from_be_bytes(*port))
    };
    Some((Some(addr(src, sport)), Some(addr(dst, dport))))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sa(s: &str) -> Option<SocketAddr> {
        Some(s.parse().unwrap())
    }

    pub(crate) fn header(src: &str, dst: &str) -> ProxyHeader {
        ProxyHeader {
            source: sa(src),
            destination: sa(dst),
        }
    }

    /// A v2 header: signature, version/command byte, family byte, then `block` with its
    /// length.
    pub(crate) fn v2(version_command: u8, family: u8, block: &[u8]) -> Vec<u8> {
        v2_with_len(version_command, family, block.len() as u16, block)
    }

    pub(crate) fn v2_with_len(version_command: u8, family: u8, len: u16, block: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.push(version_command);
        out.push(family);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(block);
        out
    }

    pub(crate) fn inet4_block() -> Vec<u8> {
        let mut b = vec![192, 0, 2, 1, 198, 51, 100, 7];
        b.extend_from_slice(&54321u16.to_be_bytes());
        b.extend_from_slice(&25u16.to_be_bytes());
        b
    }

    pub(crate) fn inet6_block() -> Vec<u8> {
        let mut b = "2001:db8::1".parse::<Ipv6Addr>().unwrap().octets().to_vec();
        b.extend_from_slice(&"2001:db8::25".parse::<Ipv6Addr>().unwrap().octets());
        b.extend_from_slice(&65535u16.to_be_bytes());
        b.extend_from_slice(&587u16.to_be_bytes());
        b
    }

    pub(crate) fn with_tlvs(mut block: Vec<u8>) -> Vec<u8> {
        // PP2_TYPE_AUTHORITY "mx.example.org", then PP2_TYPE_NOOP padding.
        block.extend_from_slice(&[0x02, 0x00, 0x0e]);
        block.extend_from_slice(b"mx.example.org");
        block.extend_from_slice(&[0x04, 0x00, 0x03, 0, 0, 0]);
        block
    }

    /// Valid headers and what they carry.
    fn valid_cases() -> Vec<(&'static str, Vec<u8>, ProxyHeader)> {
        let v4 = header("192.0.2.1:54321", "198.51.100.7:25");
        let v6 = header("[2001:db8::1]:65535", "[2001:db8::25]:587");
        let unknown = ProxyHeader::UNKNOWN;
        let long_unknown = format!("PROXY UNKNOWN {}\r\n", "x".repeat(V1_MAX_LEN - 16));
        assert_eq!(long_unknown.len(), V1_MAX_LEN);
        let mut unix_block = vec![b'/'; 216];
        unix_block[1] = 0;
        vec![
            (
                "v1 tcp4",
                b"PROXY TCP4 192.0.2.1 198.51.100.7 54321 25\r\n".to_vec(),
                v4,
            ),
            (
                "v1 tcp4 extremes",
                b"PROXY TCP4 255.255.255.255 0.0.0.0 65535 0\r\n".to_vec(),
                header("255.255.255.255:65535", "0.0.0.0:0"),
            ),
            (
                "v1 tcp6",
                b"PROXY TCP6 2001:db8::1 2001:db8::25 65535 587\r\n".to_vec(),
                v6,
            ),
            (
                "v1 tcp6 full length",
                b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff \
                  FFFF:0:0:0:0:0:0:1 1 2\r\n"
                    .to_vec(),
                header("[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:1", "[ffff::1]:2"),
            ),
            (
                "v1 tcp6 mapped",
                b"PROXY TCP6 ::ffff:192.0.2.1 ::1 10 20\r\n".to_vec(),
                header("[::ffff:192.0.2.1]:10", "[::1]:20"),
            ),
            ("v1 unknown", b"PROXY UNKNOWN\r\n".to_vec(), unknown),
            (
                "v1 unknown with addresses",
                b"PROXY UNKNOWN 192.0.2.1 198.51.100.7 1 2\r\n".to_vec(),
                unknown,
            ),
            (
                "v1 unknown at 107 bytes",
                long_unknown.into_bytes(),
                unknown,
            ),
            ("v2 proxy tcp4", v2(0x21, 0x11, &inet4_block()), v4),
            ("v2 proxy tcp6", v2(0x21, 0x21, &inet6_block()), v6),
            (
                "v2 proxy tcp4 with tlvs",
                v2(0x21, 0x11, &with_tlvs(inet4_block())),
                v4,
            ),
            (
                "v2 proxy tcp6 with tlvs",
                v2(0x21, 0x21, &with_tlvs(inet6_block())),
                v6,
            ),
            ("v2 local", v2(0x20, 0x00, &[]), unknown),
            (
                "v2 local ignores family and addresses",
                v2(0x20, 0xff, &inet4_block()),
                unknown,
            ),
            (
                "v2 local with an address too short for its family",
                v2(0x20, 0x21, &[1, 2, 3]),
                unknown,
            ),
            ("v2 proxy unspec", v2(0x21, 0x00, &[]), unknown),
            (
                "v2 proxy unspec with tlvs",
                v2(0x21, 0x00, &with_tlvs(Vec::new())),
                unknown,
            ),
            ("v2 proxy udp4", v2(0x21, 0x12, &inet4_block()), unknown),
            ("v2 proxy udp6", v2(0x21, 0x22, &inet6_block()), unknown),
            ("v2 proxy unix stream", v2(0x21, 0x31, &unix_block), unknown),
            ("v2 proxy unix dgram", v2(0x21, 0x32, &unix_block), unknown),
            (
                "v2 at the size limit",
                v2(
                    0x21,
                    0x11,
                    &[inet4_block(), vec![0; MAX_HEADER_LEN - 16 - 12]].concat(),
                ),
                v4,
            ),
        ]
    }

    /// Invalid input and a fragment of the expected error's text.
    fn invalid_cases() -> Vec<(&'static str, Vec<u8>, &'static str)> {
        let v1 = |s: &str| s.as_bytes().to_vec();
        let no_signature = "no PROXY protocol signature";
        let v1_fields = "exactly a source and destination";
        let v1_proto = "not TCP4, TCP6 or UNKNOWN";
        let src_v4 = "source address is not a valid IPv4";
        let dst_v4 = "destination address is not a valid IPv4";
        let src_v6 = "source address is not a valid IPv6";
        let src_port = "source port is not a decimal";
        let dst_port = "destination port is not a decimal";
        let too_long = "too long";
        let mut bad_sig = v2(0x21, 0x11, &inet4_block());
        bad_sig[11] = b'\r';
        vec![
            ("smtp command", v1("EHLO example.org\r\n"), no_signature),
            ("http request", v1("GET / HTTP/1.1\r\n"), no_signature),
            (
                "lowercase proxy",
                v1("proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n"),
                no_signature,
            ),
            ("proxy without space", v1("PROXY\r\n"), no_signature),
            (
                "tls client hello",
                vec![0x16, 0x03, 0x01, 0x02, 0x00],
                no_signature,
            ),
            ("v2 signature one byte off", bad_sig, no_signature),
            (
                "v1 bare lf",
                v1("PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n"),
                "bare LF",
            ),
            ("v1 unknown bare lf", v1("PROXY UNKNOWN\n"), "bare LF"),
            ("v1 empty protocol", v1("PROXY \r\n"), v1_proto),
            (
                "v1 lowercase protocol",
                v1("PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n"),
                v1_proto,
            ),
            (
                "v1 udp4",
                v1("PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n"),
                v1_proto,
            ),
            ("v1 unknown glued", v1("PROXY UNKNOWNX\r\n"), v1_proto),
            (
                "v1 double space before protocol",
                v1("PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n"),
                v1_proto,
            ),
            (
                "v1 tab separator",
                v1("PROXY TCP4\t1.2.3.4 5.6.7.8 1 2\r\n"),
                v1_proto,
            ),
            ("v1 tcp4 alone", v1("PROXY TCP4\r\n"), v1_fields),
            (
                "v1 missing port",
                v1("PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n"),
                v1_fields,
            ),
            (
                "v1 extra field",
                v1("PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n"),
                v1_fields,
            ),
            (
                "v1 double space",
                v1("PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n"),
                v1_fields,
            ),
            (
                "v1 trailing space",
                v1("PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n"),
                v1_fields,
            ),
            (
                "v1 ipv4 leading zero",
                v1("PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n"),
                src_v4,
            ),
            (
                "v1 ipv4 three parts",
                v1("PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n"),
                src_v4,
            ),
            (
                "v1 ipv4 octet too big",
                v1("PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n"),
                src_v4,
            ),
            (
                "v1 ipv4 hostname",
                v1("PROXY TCP4 localhost 5.6.7.8 1 2\r\n"),
                src_v4,
            ),
            (
                "v1 ipv4 non-ascii",
                v1("PROXY TCP4 1.2.3.\u{663} 5.6.7.8 1 2\r\n"),
                src_v4,
            ),
            (
                "v1 tcp4 with ipv6",
                v1("PROXY TCP4 ::1 5.6.7.8 1 2\r\n"),
                src_v4,
            ),
            (
                "v1 tcp4 bad destination",
                v1("PROXY TCP4 1.2.3.4 5.6.7 1 2\r\n"),
                dst_v4,
            ),
            (
                "v1 tcp6 with ipv4",
                v1("PROXY TCP6 1.2.3.4 ::1 1 2\r\n"),
                src_v6,
            ),
            (
                "v1 tcp6 with zone",
                v1("PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n"),
                src_v6,
            ),
            (
                "v1 tcp6 with brackets",
                v1("PROXY TCP6 [::1] ::1 1 2\r\n"),
                src_v6,
            ),
            (
                "v1 tcp6 too many groups",
                v1("PROXY TCP6 1:2:3:4:5:6:7:8:9 ::1 1 2\r\n"),
                src_v6,
            ),
            (
                "v1 port leading zero",
                v1("PROXY TCP4 1.2.3.4 5.6.7.8 025 2\r\n"),
                src_port,
            ),
            (
                "v1 port zero zero",
                v1("PROXY TCP4 1.2.3.4 5.6.7.8 00 2\r\n"),
                src_port,
            ),
            (
                "v1 port plus",
                v1("PROXY TCP4 1.2.3.4 5.6.7.8 +25 2\r\n"),
                src_port,
            ),
            (
                "v1 port minus",
                v1("PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n"),
                src_port,
            ),
            (
                "v1 port too big",
                v1("PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n"),
                src_port,
            ),
            (
                "v1 port six digits",
                v1("PROXY TCP4 1.2.3.4 5.6.7.8 100000 2\r\n"),
                src_port,
            ),
            (
                "v1 port hex",
                v1("PROXY TCP4 1.2.3.4 5.6.7.8 0x19 2\r\n"),
                src_port,
            ),
            (
                "v1 port letters",
                v1("PROXY TCP4 1.2.3.4 5.6.7.8 smtp 2\r\n"),
                src_port,
            ),
            (
                "v1 destination port empty",
                v1("PROXY TCP6 ::1 ::2 1 \r\n"),
                dst_port,
            ),
            (
                "v1 destination port with cr",
                v1("PROXY TCP6 ::1 ::2 1 2\r\r\n"),
                dst_port,
            ),
            (
                "v1 108 bytes",
                format!("PROXY UNKNOWN {}\r\n", "x".repeat(V1_MAX_LEN - 15)).into_bytes(),
                too_long,
            ),
            (
                "v1 no line end",
                v1(&format!("PROXY TCP4 {}", "1".repeat(200))),
                too_long,
            ),
            (
                "v2 version 1",
                v2(0x11, 0x11, &inet4_block()),
                "version 1 after",
            ),
            (
                "v2 version 0",
                v2(0x01, 0x11, &inet4_block()),
                "version 0 after",
            ),
            (
                "v2 version 3",
                v2(0x31, 0x11, &inet4_block()),
                "version 3 after",
            ),
            (
                "v2 command 2",
                v2(0x22, 0x11, &inet4_block()),
                "command 0x2",
            ),
            (
                "v2 command f",
                v2(0x2f, 0x11, &inet4_block()),
                "command 0xf",
            ),
            (
                "v2 family 4",
                v2(0x21, 0x41, &inet4_block()),
                "family and protocol 0x41",
            ),
            (
                "v2 protocol 3",
                v2(0x21, 0x13, &inet4_block()),
                "family and protocol 0x13",
            ),
            (
                "v2 inet unspec protocol",
                v2(0x21, 0x10, &inet4_block()),
                "0x10 is not defined",
            ),
            (
                "v2 unspec stream",
                v2(0x21, 0x01, &[]),
                "0x01 is not defined",
            ),
            (
                "v2 tcp4 short",
                v2(0x21, 0x11, &inet4_block()[..11]),
                "length 11 is too short",
            ),
            (
                "v2 tcp4 empty",
                v2(0x21, 0x11, &[]),
                "length 0 is too short",
            ),
            (
                "v2 tcp6 with ipv4 length",
                v2(0x21, 0x21, &inet4_block()),
                "length 12 is too short",
            ),
            (
                "v2 udp6 short",
                v2(0x21, 0x22, &inet6_block()[..35]),
                "length 35 is too short",
            ),
            (
                "v2 unix short",
                v2(0x21, 0x31, &[0; 108]),
                "length 108 is too short",
            ),
            (
                "v2 one byte over the limit",
                v2(0x21, 0x11, &vec![0; MAX_HEADER_LEN - 15]),
                too_long,
            ),
            (
                "v2 maximum length field",
                v2_with_len(0x21, 0x11, u16::MAX, &[]),
                too_long,
            ),
            (
                "v2 local oversized",
                v2_with_len(0x20, 0x00, 8192, &[]),
                too_long,
            ),
        ]
    }

    /// The outcome as comparable text (errors hold no `PartialEq`).
    fn outcome(buf: &[u8]) -> Result<Parsed, String> {
        parse(buf).map_err(|e| e.to_string())
    }

    #[test]
    fn valid_headers() {
        for (name, input, want) in valid_cases() {
            assert_eq!(
                outcome(&input),
                Ok(Parsed::Complete {
                    header_len: input.len(),
                    header: want
                }),
                "{name}"
            );
        }
    }

    #[test]
    fn invalid_headers() {
        for (name, input, want) in invalid_cases() {
            match outcome(&input) {
                Err(e) => assert!(e.contains(want), "{name}: {e:?} lacks {want:?}"),
                Ok(p) => panic!("{name}: accepted as {p:?}"),
            }
        }
    }

    #[test]
    fn empty_input_is_incomplete() {
        assert_eq!(outcome(b""), Ok(Parsed::Incomplete));
    }

    /// Every prefix of a valid header is incomplete, and the client's bytes after it are
    /// never taken, even when they look like another header.
    #[test]
    fn valid_headers_split_at_every_byte() {
        for (name, header, want) in valid_cases() {
            for trailer in [
                &b""[..],
                b"EHLO a\r\n",
                b"PROXY UNKNOWN\r\n",
                b"\n",
                V2_SIGNATURE,
            ] {
                let input = [&header[..], trailer].concat();
                let complete = Ok(Parsed::Complete {
                    header_len: header.len(),
                    header: want,
                });
                for cut in 0..=input.len() {
                    let got = outcome(&input[..cut]);
                    if cut < header.len() {
                        assert_eq!(got, Ok(Parsed::Incomplete), "{name} cut at {cut}");
                    } else {
                        assert_eq!(got, complete, "{name} + {trailer:?} cut at {cut}");
                    }
                }
            }
        }
    }

    /// Every prefix of an invalid header is either still plausible or already refused for
    /// the same reason as the whole.
    #[test]
    fn invalid_headers_split_at_every_byte() {
        for (name, input, _) in invalid_cases() {
            let whole = outcome(&input);
            assert!(whole.is_err(), "{name}");
            for cut in 0..input.len() {
                let got = outcome(&input[..cut]);
                assert!(
                    got == Ok(Parsed::Incomplete) || got == whole,
                    "{name} cut at {cut}: {got:?}, whole gives {whole:?}"
                );
            }
        }
    }

    #[test]
    fn garbage_is_refused_at_once() {
        for input in [&b"E"[..], b"\r\r", b"PROXX", b"\r\n\r\n\0\r\nQUIT\r"] {
            assert!(parse(input).is_err(), "{input:?}");
        }
        // Enough of the v2 fixed part to see a bad version, an oversize or a short block.
        assert!(parse(&v2(0x31, 0x11, &[])[..13]).is_err());
        assert!(parse(&v2_with_len(0x21, 0x11, 5000, &[])[..16]).is_err());
        assert!(parse(&v2_with_len(0x21, 0x21, 12, &[])[..16]).is_err());
    }
}
