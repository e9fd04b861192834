//! Milter packets: a 4-byte big-endian length (counting the command byte and the data), the
//! command byte, the data. `PacketDecoder` frames the filter's bytes however they arrive;
//! `Command::encode` writes what the MTA sends.

use bytes::{Buf, Bytes, BytesMut};
use std::net::IpAddr;

use super::{cmd, rsp, ProtocolError, Stage, MAX_BODY_CHUNK};

/// One packet as read from the filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub command: u8,
    pub data: Bytes,
}

/// The largest packets accepted from a filter, command byte included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Every packet but `SMFIR_REPLBODY`.
    pub max_packet: usize,
    /// `SMFIR_REPLBODY`: a filter may replace the body in large pieces.
    pub max_body_packet: usize,
}

/// libmilter's default data limit (64 KiB) plus room for the command byte and a header
/// name or reply text on top of a full-size value.
pub const DEFAULT_MAX_PACKET: usize = 64 * 1024 + 1024;
/// Body replacement pieces up to 1 MiB (libmilter's largest negotiable data size).
pub const DEFAULT_MAX_BODY_PACKET: usize = 1024 * 1024 + 1024;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_packet: DEFAULT_MAX_PACKET,
            max_body_packet: DEFAULT_MAX_BODY_PACKET,
        }
    }
}

impl Limits {
    pub fn for_command(&self, command: u8) -> usize {
        if command == rsp::REPLBODY {
            self.max_body_packet
        } else {
            self.max_packet
        }
    }
}

/// Frames the filter's byte stream into packets. Feed bytes as they arrive, then take
/// packets until `Ok(None)`. A length or command that is not acceptable is found as soon as
/// its 5-byte header is in, and nothing from that header on is buffered; the complete
/// packets before it are still returned, then the error, again and again, while further
/// bytes are ignored.
#[derive(Debug)]
pub struct PacketDecoder {
    limits: Limits,
    buf: BytesMut,
    error: Option<ProtocolError>,
}

impl PacketDecoder {
    pub fn new(limits: Limits) -> Self {
        PacketDecoder {
            limits,
            buf: BytesMut::new(),
            error: None,
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Adds bytes read from the filter. Only the current packet's bytes and what follows
    /// them in this call are held; a bad header stops buffering at once.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.error.is_some() {
            return;
        }
        // Check each header as soon as it is complete, so that an oversize packet's data is
        // never kept: walk the headers this call completes. Every header before `at` was
        // checked, and a complete header at `at` implies the packets before it are complete.
        self.buf.extend_from_slice(bytes);
        let mut at = 0;
        while self.buf.len() >= at + 5 {
            match self.check_header(&self.buf[at..at + 5]) {
                Ok(len) => at += 4 + len,
                Err(e) => {
                    self.buf.truncate(at);
                    self.error = Some(e);
                    return;
                }
            }
        }
    }

    /// Bytes buffered and not yet returned as packets.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Whether the decoder failed (and ignores everything from now on).
    pub fn failed(&self) -> bool {
        self.error.is_some()
    }

    /// The packet length (command byte included) from a 5-byte header, if acceptable.
    fn check_header(&self, header: &[u8]) -> Result<usize, ProtocolError> {
        let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if len == 0 {
            return Err(ProtocolError::ZeroLength);
        }
        let command = header[4];
        if !rsp::ALL.contains(&command) {
            return Err(ProtocolError::UnknownCommand(command));
        }
        let limit = self.limits.for_command(command);
        if len > limit {
            return Err(ProtocolError::Oversize {
                command,
                length: len,
                limit,
            });
        }
        Ok(len)
    }

    /// The next complete packet, `Ok(None)` when more bytes are needed.
    pub fn next_packet(&mut self) -> Result<Option<Packet>, ProtocolError> {
        let len = match self.buf.get(..5).map(|h| self.check_header(h)) {
            Some(Ok(len)) if self.buf.len() >= 4 + len => len,
            _ => {
                return match &self.error {
                    Some(e) => {
                        self.buf = BytesMut::new();
                        Err(e.clone())
                    }
                    None => Ok(None),
                };
            }
        };
        self.buf.advance(4);
        let mut packet = self.buf.split_to(len);
        let command = packet[0];
        packet.advance(1);
        Ok(Some(Packet {
            command,
            data: packet.freeze(),
        }))
    }
}

/// Why a command cannot be encoded. These are the caller's values, not the filter's fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EncodeError {
    /// A NUL byte inside a NUL-terminated field would shift every field after it.
    EmbeddedNul,
    /// A body chunk larger than `MAX_BODY_CHUNK` (split it with `body_chunks`).
    ChunkTooLarge(usize),
    /// The packet would not fit the 32-bit length field.
    TooLong,
}

impl std::fmt::Display for EncodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EncodeError::EmbeddedNul => write!(f, "NUL byte inside a milter string field"),
            EncodeError::ChunkTooLarge(n) => {
                write!(f, "body chunk of {n} bytes exceeds {MAX_BODY_CHUNK}")
            }
            EncodeError::TooLong => write!(f, "milter packet too long"),
        }
    }
}

impl std::error::Error for EncodeError {}

/// The client's address as `SMFIC_CONNECT` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectAddress<'a> {
    /// TCP: family `'4'` or `'6'`, the port, the address in text form.
    Inet { ip: IpAddr, port: u16 },
    /// A local socket: family `'L'`, port 0, the socket path.
    Unix { path: &'a [u8] },
    /// Not known: family `'U'` and nothing after it.
    Unknown,
}

/// A command from the MTA to the filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command<'a> {
    /// `SMFIC_OPTNEG`: version, actions, protocol flags.
    OptNeg {
        version: u32,
        actions: u32,
        protocol: u32,
    },
    /// `SMFIC_MACRO`: the command byte of the stage the macros belong to, then name/value
    /// pairs.
    Macro {
        stage_command: u8,
        macros: &'a [(&'a str, &'a [u8])],
    },
    /// `SMFIC_CONNECT`: the client's host name (`[addr]` when unknown), its address.
    Connect {
        hostname: &'a [u8],
        address: ConnectAddress<'a>,
    },
    /// `SMFIC_HELO`: the HELO/EHLO argument.
    Helo(&'a [u8]),
    /// `SMFIC_MAIL`: the sender (`<a@b>`) followed by ESMTP parameters, one per field.
    Mail(&'a [&'a [u8]]),
    /// `SMFIC_RCPT`: the recipient followed by ESMTP parameters.
    Rcpt(&'a [&'a [u8]]),
    Data,
    /// `SMFIC_HEADER`: name and value of one header field.
    Header {
        name: &'a [u8],
        value: &'a [u8],
    },
    Eoh,
    /// `SMFIC_BODY`: one chunk of at most `MAX_BODY_CHUNK` bytes.
    Body(&'a [u8]),
    BodyEob,
    Abort,
    Quit,
    /// `SMFIC_QUIT_NC`: end this conversation but keep the connection for a new one.
    QuitNc,
    /// `SMFIC_UNKNOWN`: the unrecognised SMTP command line.
    Unknown(&'a [u8]),
}

impl Command<'_> {
    /// The command byte.
    pub fn code(&self) -> u8 {
        match self {
            Command::OptNeg { .. } => cmd::OPTNEG,
            Command::Macro { .. } => cmd::MACRO,
            Command::Connect { .. } => cmd::CONNECT,
            Command::Helo(_) => cmd::HELO,
            Command::Mail(_) => cmd::MAIL,
            Command::Rcpt(_) => cmd::RCPT,
            Command::Data => cmd::DATA,
            Command::Header { .. } => cmd::HEADER,
            Command::Eoh => cmd::EOH,
            Command::Body(_) => cmd::BODY,
            Command::BodyEob => cmd::BODYEOB,
            Command::Abort => cmd::ABORT,
            Command::Quit => cmd::QUIT,
            Command::QuitNc => cmd::QUIT_NC,
            Command::Unknown(_) => cmd::UNKNOWN,
        }
    }

    /// The stage this command starts; `None` for negotiation, macros, abort and quit, which
    /// start none.
    pub fn stage(&self) -> Option<Stage> {
        Some(match self {
            Command::Connect { .. } => Stage::Connect,
            Command::Helo(_) => Stage::Helo,
            Command::Mail(_) => Stage::Mail,
            Command::Rcpt(_) => Stage::Rcpt,
            Command::Data => Stage::Data,
            Command::Header { .. } => Stage::Header,
            Command::Eoh => Stage::Eoh,
            Command::Body(_) => Stage::Body,
            Command::BodyEob => Stage::Eom,
            Command::Unknown(_) => Stage::Unknown,
            Command::OptNeg { .. }
            | Command::Macro { .. }
            | Command::Abort
            | Command::Quit
            | Command::QuitNc => return None,
        })
    }

    /// Appends the packet to `out`. On error nothing is appended.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let start = out.len();
        out.extend_from_slice(&[0, 0, 0, 0, self.code()]);
        let result = self.encode_data(out);
        let len = out.len() - start - 4;
        match result.and_then(|()| u32::try_from(len).map_err(|_| EncodeError::TooLong)) {
            Ok(len) => {
                out[start..start + 4].copy_from_slice(&len.to_be_bytes());
                Ok(())
            }
            Err(e) => {
                out.truncate(start);
                Err(e)
            }
        }
    }

    /// The packet as a new vector.
    pub fn to_bytes(&self) -> Result<Vec<u8>, EncodeError> {
        let mut out = Vec::new();
        self.encode(&mut out)?;
        Ok(out)
    }

    fn encode_data(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        match *self {
            Command::OptNeg {
                version,
                actions,
                protocol,
            } => {
                out.extend_from_slice(&version.to_be_bytes());
                out.extend_from_slice(&actions.to_be_bytes());
                out.extend_from_slice(&protocol.to_be_bytes());
            }
            Command::Macro {
                stage_command,
                macros,
            } => {
                out.push(stage_command);
                for (name, value) in macros {
                    put_str(out, name.as_bytes())?;
                    put_str(out, value)?;
                }
            }
            Command::Connect { hostname, address } => {
                put_str(out, hostname)?;
                match address {
                    ConnectAddress::Inet { ip, port } => {
                        out.push(if ip.is_ipv4() { b'4' } else { b'6' });
                        out.extend_from_slice(&port.to_be_bytes());
                        put_str(out, ip.to_string().as_bytes())?;
                    }
                    ConnectAddress::Unix { path } => {
                        out.push(b'L');
                        out.extend_from_slice(&0u16.to_be_bytes());
                        put_str(out, path)?;
                    }
                    ConnectAddress::Unknown => out.push(b'U'),
                }
            }
            Command::Helo(name) => put_str(out, name)?,
            Command::Mail(args) | Command::Rcpt(args) => {
                for arg in args {
                    put_str(out, arg)?;
                }
            }
            Command::Header { name, value } => {
                put_str(out, name)?;
                put_str(out, value)?;
            }
            Command::Body(chunk) => {
                if chunk.len() > MAX_BODY_CHUNK {
                    return Err(EncodeError::ChunkTooLarge(chunk.len()));
                }
                out.extend_from_slice(chunk);
            }
            Command::Unknown(line) => put_str(out, line)?,
            Command::Data
            | Command::Eoh
            | Command::BodyEob
            | Command::Abort
            | Command::Quit
            | Command::QuitNc => {}
        }
        Ok(())
    }
}

fn put_str(out: &mut Vec<u8>, s: &[u8]) -> Result<(), EncodeError> {
    if memchr::memchr(0, s).is_some() {
        return Err(EncodeError::EmbeddedNul);
    }
    out.extend_from_slice(s);
    out.push(0);
    Ok(())
}

/// The body cut into `SMFIC_BODY`-sized chunks (none for an empty body).
pub fn body_chunks(body: &[u8]) -> impl Iterator<Item = &[u8]> {
    body.chunks(MAX_BODY_CHUNK)
}

/// A header value as the filter expects it: unless `SMFIP_HDR_LEADSPC` was negotiated, the
/// one space after the colon is not part of the value (as sendmail and Postfix send it).
pub fn header_value(raw_value: &[u8], leading_space: bool) -> &[u8] {
    if leading_space {
        raw_value
    } else {
        raw_value.strip_prefix(b" ").unwrap_or(raw_value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn packet(command: u8, data: &[u8]) -> Vec<u8> {
        let mut v = ((data.len() + 1) as u32).to_be_bytes().to_vec();
        v.push(command);
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn encodes_every_command_byte_exact() {
        let sender: &[&[u8]] = &[b"<a@example.org>", b"SIZE=100", b"BODY=8BITMIME"];
        let rcpt: &[&[u8]] = &[b"<b@example.net>"];
        let macros: &[(&str, &[u8])] = &[("j", b"mx.example"), ("{daemon_name}", b"proxsmtpd")];
        let cases: Vec<(Command, Vec<u8>)> = vec![
            (
                Command::OptNeg {
                    version: 6,
                    actions: 0x1ff,
                    protocol: 0x1f_ffff,
                },
                b"\x00\x00\x00\x0dO\x00\x00\x00\x06\x00\x00\x01\xff\x00\x1f\xff\xff".to_vec(),
            ),
            (
                Command::Macro {
                    stage_command: b'C',
                    macros,
                },
                packet(b'D', b"Cj\0mx.example\0{daemon_name}\0proxsmtpd\0"),
            ),
            (
                Command::Macro {
                    stage_command: b'T',
                    macros: &[],
                },
                b"\x00\x00\x00\x02DT".to_vec(),
            ),
            (
                Command::Connect {
                    hostname: b"client.example",
                    address: ConnectAddress::Inet {
                        ip: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
                        port: 25,
                    },
                },
                packet(b'C', b"client.example\x004\x00\x19192.0.2.1\0"),
            ),
            (
                Command::Connect {
                    hostname: b"[2001:db8::1]",
                    address: ConnectAddress::Inet {
                        ip: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
                        port: 40000,
                    },
                },
                packet(b'C', b"[2001:db8::1]\x006\x9c\x402001:db8::1\0"),
            ),
            (
                Command::Connect {
                    hostname: b"localhost",
                    address: ConnectAddress::Unix {
                        path: b"/run/smtp.sock",
                    },
                },
                packet(b'C', b"localhost\0L\x00\x00/run/smtp.sock\0"),
            ),
            (
                Command::Connect {
                    hostname: b"unknown",
                    address: ConnectAddress::Unknown,
                },
                packet(b'C', b"unknown\0U"),
            ),
            (
                Command::Helo(b"client.example"),
                packet(b'H', b"client.example\0"),
            ),
            (
                Command::Mail(sender),
                packet(b'M', b"<a@example.org>\0SIZE=100\0BODY=8BITMIME\0"),
            ),
            (Command::Rcpt(rcpt), packet(b'R', b"<b@example.net>\0")),
            (Command::Data, b"\x00\x00\x00\x01T".to_vec()),
            (
                Command::Header {
                    name: b"Subject",
                    value: b"hello",
                },
                packet(b'L', b"Subject\0hello\0"),
            ),
            (Command::Eoh, b"\x00\x00\x00\x01N".to_vec()),
            (Command::Body(b"line\r\n"), packet(b'B', b"line\r\n")),
            (Command::Body(b""), b"\x00\x00\x00\x01B".to_vec()),
            (Command::BodyEob, b"\x00\x00\x00\x01E".to_vec()),
            (Command::Abort, b"\x00\x00\x00\x01A".to_vec()),
            (Command::Quit, b"\x00\x00\x00\x01Q".to_vec()),
            (Command::QuitNc, b"\x00\x00\x00\x01K".to_vec()),
            (Command::Unknown(b"XYZZY arg"), packet(b'U', b"XYZZY arg\0")),
        ];
        for (command, want) in cases {
            assert_eq!(command.to_bytes().unwrap(), want, "{command:?}");
            // Appending keeps what was there.
            let mut out = b"xx".to_vec();
            command.encode(&mut out).unwrap();
            assert_eq!(&out[2..], &want[..]);
        }
    }

    #[test]
    fn refuses_what_cannot_be_framed() {
        let nul_arg: &[&[u8]] = &[b"<a\0b>"];
        let bad: Vec<(Command, EncodeError)> = vec![
            (Command::Helo(b"a\0b"), EncodeError::EmbeddedNul),
            (Command::Mail(nul_arg), EncodeError::EmbeddedNul),
            (
                Command::Header {
                    name: b"X",
                    value: b"\0",
                },
                EncodeError::EmbeddedNul,
            ),
            (
                Command::Macro {
                    stage_command: b'C',
                    macros: &[("{x\0}", b"v")],
                },
                EncodeError::EmbeddedNul,
            ),
            (
                Command::Body(&[b'x'; MAX_BODY_CHUNK + 1]),
                EncodeError::ChunkTooLarge(MAX_BODY_CHUNK + 1),
            ),
        ];
        for (command, want) in bad {
            let mut out = b"keep".to_vec();
            assert_eq!(command.encode(&mut out), Err(want));
            assert_eq!(out, b"keep", "nothing appended on error");
        }
        assert!(Command::Body(&[b'x'; MAX_BODY_CHUNK]).to_bytes().is_ok());
    }

    #[test]
    fn body_is_split_into_protocol_chunks() {
        let body = vec![b'a'; 2 * MAX_BODY_CHUNK + 10];
        let chunks: Vec<&[u8]> = body_chunks(&body).collect();
        assert_eq!(
            chunks.iter().map(|c| c.len()).collect::<Vec<_>>(),
            vec![MAX_BODY_CHUNK, MAX_BODY_CHUNK, 10]
        );
        assert_eq!(body_chunks(b"").count(), 0);
        assert_eq!(body_chunks(&body[..MAX_BODY_CHUNK]).count(), 1);
    }

    #[test]
    fn header_value_drops_one_space_unless_negotiated() {
        assert_eq!(header_value(b"  two", false), b" two");
        assert_eq!(header_value(b" one", true), b" one");
        assert_eq!(header_value(b"\tx", false), b"\tx");
    }

    type Decoded = Vec<Result<Packet, ProtocolError>>;

    fn decode_all(
        input: &[u8],
        limits: Limits,
        split: usize,
    ) -> Vec<Result<Packet, ProtocolError>> {
        let mut d = PacketDecoder::new(limits);
        let mut out = Vec::new();
        for chunk in [&input[..split], &input[split..]] {
            d.feed(chunk);
            loop {
                match d.next_packet() {
                    Ok(Some(p)) => out.push(Ok(p)),
                    Ok(None) => break,
                    Err(e) => {
                        out.push(Err(e));
                        return out;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn decodes_packets_at_every_split() {
        let small = Limits {
            max_packet: 8,
            max_body_packet: 20,
        };
        let p = |c: u8, d: &'static [u8]| {
            Ok(Packet {
                command: c,
                data: Bytes::from_static(d),
            })
        };
        let cases: Vec<(Vec<u8>, Limits, Decoded)> = vec![
            (
                [packet(b'c', b""), packet(b'h', b"X\0y\0")].concat(),
                Limits::default(),
                vec![p(b'c', b""), p(b'h', b"X\0y\0")],
            ),
            // A partial packet at the end waits for more.
            (
                [packet(b'a', b""), packet(b'r', b"")[..3].to_vec()].concat(),
                Limits::default(),
                vec![p(b'a', b"")],
            ),
            (
                b"\x00\x00\x00\x00c".to_vec(),
                Limits::default(),
                vec![Err(ProtocolError::ZeroLength)],
            ),
            (
                [packet(b'c', b""), packet(b'Z', b"")].concat(),
                Limits::default(),
                vec![p(b'c', b""), Err(ProtocolError::UnknownCommand(b'Z'))],
            ),
            // The limit counts the command byte: 8 is fine, 9 is not.
            (packet(b'y', b"4501234"), small, vec![p(b'y', b"4501234")]),
            (
                packet(b'y', b"45012345"),
                small,
                vec![Err(ProtocolError::Oversize {
                    command: b'y',
                    length: 9,
                    limit: 8,
                })],
            ),
            // Body replacement has its own, larger limit.
            (
                packet(b'b', b"0123456789abcdef"),
                small,
                vec![p(b'b', b"0123456789abcdef")],
            ),
            (
                b"\xff\xff\xff\xffb".to_vec(),
                small,
                vec![Err(ProtocolError::Oversize {
                    command: b'b',
                    length: 0xffff_ffff,
                    limit: 20,
                })],
            ),
        ];
        for (input, limits, want) in cases {
            for split in 0..=input.len() {
                assert_eq!(decode_all(&input, limits, split), want, "split {split}");
            }
        }
    }

    #[test]
    fn oversize_is_refused_before_buffering_and_sticks() {
        let mut d = PacketDecoder::new(Limits::default());
        let mut header = ((DEFAULT_MAX_PACKET + 1) as u32).to_be_bytes().to_vec();
        header.push(b'h');
        d.feed(&header);
        assert_eq!(d.buffered(), 0);
        assert!(d.failed());
        d.feed(&vec![b'x'; 100_000]);
        assert_eq!(d.buffered(), 0, "nothing is buffered after an error");
        assert!(matches!(
            d.next_packet(),
            Err(ProtocolError::Oversize { .. })
        ));
        assert!(d.next_packet().is_err());
        // A bad second header in the same feed is caught too; the good packet before it is
        // still delivered.
        let mut d = PacketDecoder::new(Limits::default());
        d.feed(&[packet(b'c', b""), header, b"xyz".to_vec()].concat());
        assert!(d.failed());
        assert_eq!(d.buffered(), 5);
        assert_eq!(d.next_packet().unwrap().unwrap().command, b'c');
        assert!(d.next_packet().is_err());
        assert_eq!(d.buffered(), 0);
    }
}
