//! Milter filter bytes: framed by `PacketDecoder`, then fed to a `MilterSession` that the
//! target drives through stages chosen from the input.
//!
//! Checks: framing does not depend on how the bytes arrive; no decoded packet exceeds the
//! limit for its command; a decoder error sticks and leaves nothing buffered; whatever the
//! session sends frames into well-formed packets; modifications come only at end of message
//! and skip only after a body chunk; after a protocol error the session accepts nothing.
#![no_main]

use fuzz_support::{seed_and_rest, Rng};
use libfuzzer_sys::fuzz_target;
use proxsmtpd::protocol::milter::codec::{Command, ConnectAddress, Limits, Packet, PacketDecoder};
use proxsmtpd::protocol::milter::negotiate::{MacroNames, Offer};
use proxsmtpd::protocol::milter::session::{BeginError, Begun, Event, MilterSession};
use proxsmtpd::protocol::milter::{action, proto, ProtocolError, Stage};

/// All packets of `chunks`, and the error that ended them if any.
fn decode(limits: Limits, chunks: &[&[u8]]) -> (Vec<Packet>, Option<ProtocolError>) {
    let mut decoder = PacketDecoder::new(limits);
    let mut packets = Vec::new();
    for chunk in chunks {
        decoder.feed(chunk);
        loop {
            match decoder.next_packet() {
                Ok(Some(p)) => {
                    assert!(
                        1 + p.data.len() <= limits.for_command(p.command),
                        "packet over the limit"
                    );
                    packets.push(p);
                }
                Ok(None) => break,
                Err(e) => {
                    assert!(decoder.failed());
                    assert_eq!(decoder.buffered(), 0);
                    decoder.feed(b"\0\0\0\x01c");
                    assert_eq!(decoder.next_packet(), Err(e.clone()), "the error sticks");
                    return (packets, Some(e));
                }
            }
        }
    }
    (packets, None)
}

/// Checks that `bytes` are whole MTA packets with sane lengths.
fn check_sent(mut bytes: &[u8]) {
    assert!(!bytes.is_empty());
    while !bytes.is_empty() {
        assert!(bytes.len() >= 5);
        let len = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
        assert!(len >= 1 && 4 + len <= bytes.len(), "sent packet framing");
        assert!(b"ABCDEHKLMNOQRTU".contains(&bytes[4]));
        bytes = &bytes[4 + len..];
    }
}

const SENDER: &[&[u8]] = &[b"<a@example.org>", b"SIZE=10"];
const RCPT: &[&[u8]] = &[b"<b@example.net>"];

fn command(n: usize) -> Command<'static> {
    match n {
        0 => Command::Connect {
            hostname: b"client.example",
            address: ConnectAddress::Inet {
                ip: std::net::IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1)),
                port: 25,
            },
        },
        1 => Command::Helo(b"client.example"),
        2 => Command::Mail(SENDER),
        3 => Command::Rcpt(RCPT),
        4 => Command::Data,
        5 => Command::Header {
            name: b"Subject",
            value: b"hi",
        },
        6 => Command::Eoh,
        7 => Command::Body(b"text\r\n"),
        8 => Command::BodyEob,
        9 => Command::Unknown(b"XYZZY"),
        10 => Command::Abort,
        11 => Command::QuitNc,
        _ => Command::Quit,
    }
}

const MACROS: &[(&str, &[u8])] = &[
    ("j", b"mx.example"),
    ("{daemon_name}", b"proxsmtpd"),
    ("i", b"4XyZ"),
    ("mail_addr", b"a@example.org"),
];

fuzz_target!(|data: &[u8]| {
    let (seed, input) = seed_and_rest(data);
    let mut rng = Rng::new(seed);
    let limits = match rng.below(3) {
        0 => Limits::default(),
        _ => Limits {
            max_packet: 1 + rng.below(64),
            max_body_packet: 1 + rng.below(256),
        },
    };
    let (packets, error) = decode(limits, &[input]);
    assert_eq!(
        (packets.clone(), error.clone()),
        decode(limits, &rng.chunks(input)),
        "framing depends on chunking"
    );

    let mut session = MilterSession::new(Offer::default(), MacroNames::default());
    let opening = session.start().expect("a new session starts");
    check_sent(&opening);
    let packets = packets.into_iter();
    // Half the time the filter's answer to the negotiation is made up from the seed, so that
    // the rest of the input exercises the stages.
    if rng.below(2) == 0 {
        let actions = rng.next_u64() as u32 & action::ALL;
        // Mostly without NO*/NR_* flags, so stages wait for answers.
        let protocol = rng.next_u64() as u32
            & proto::ALL
            & if rng.below(2) == 0 {
                proto::SKIP
            } else {
                u32::MAX
            };
        let mut answer = 6u32.to_be_bytes().to_vec();
        answer.extend_from_slice(&actions.to_be_bytes());
        answer.extend_from_slice(&protocol.to_be_bytes());
        let event = session.on_packet(&Packet {
            command: b'O',
            data: answer.into(),
        });
        assert_eq!(event, Event::Negotiated);
    }

    let mut failed = false;
    for packet in packets {
        // Begin stages until one waits for an answer (or the choice runs out).
        for _ in 0..8 {
            if session.awaiting().is_some() || session.is_closed() || session.negotiated().is_none()
            {
                break;
            }
            // Mostly the next stages of a message, sometimes anything.
            let range = if rng.below(8) == 0 { 13 } else { 10 };
            let n = rng.below(range);
            match session.begin(command(n), MACROS) {
                Ok(Begun::Await(bytes)) => {
                    check_sent(&bytes);
                    assert!(session.awaiting().is_some());
                }
                Ok(Begun::NoReply(bytes)) => {
                    check_sent(&bytes);
                    assert!(session.awaiting().is_none());
                }
                Ok(Begun::Skipped) => assert!(session.awaiting().is_none()),
                Err(BeginError::Closed) => assert!(session.is_closed()),
                Err(BeginError::OutOfOrder(_)) => {}
                Err(e) => panic!("unexpected begin error {e:?}"),
            }
        }
        let awaited = session.awaiting();
        let event = session.on_packet(&packet);
        if failed {
            assert_eq!(event, Event::ProtocolError(ProtocolError::Closed));
            assert!(session.begin(Command::Quit, &[]) == Err(BeginError::Closed));
            continue;
        }
        match &event {
            Event::ProtocolError(_) => {
                failed = true;
                assert!(session.is_closed());
                assert_eq!(session.awaiting(), None);
            }
            Event::Modification(m) => {
                assert_eq!(awaited, Some(Stage::Eom));
                assert_eq!(session.awaiting(), Some(Stage::Eom));
                let n = session.negotiated().expect("negotiated");
                assert!(n.has_action(m.required_action()));
            }
            Event::Progress => assert_eq!(session.awaiting(), awaited),
            Event::Skip => {
                assert_eq!(awaited, Some(Stage::Body));
                assert!(session.awaiting().is_none());
            }
            Event::Negotiated => assert!(session.negotiated().is_some()),
            Event::Continue | Event::Verdict(_) => {
                assert!(awaited.is_some());
                assert!(session.awaiting().is_none());
            }
        }
        if session.is_closed() && !failed {
            // Closed by QUIT: nothing more is accepted either.
            failed = true;
        }
    }
    if let Some(_e) = error {
        // The caller closes the filter connection on a decoder error; the session itself
        // is unaffected by it.
        let _ = session.begin(Command::Quit, &[]);
    }
});
