//! The session state machine, driven the way the proxy's relay loop drives it, with
//! arbitrary client bytes and arbitrary upstream replies. It must never panic.
//!
//! Input: a policy byte and a TLS byte, then records separated by LF. A record starting
//! with `C` appends the rest of it (LF included) to the client's bytes, `S` to the
//! upstream's, `E` is the client closing, `L` a client line of 5000 bytes (over the command
//! line limit), `G` the proxy reading the upstream's greeting itself; others are ignored.
//! After each record the driver runs until nothing more can happen. A STARTTLS handshake
//! succeeds or fails as the TLS byte says.
//!
//! Beyond not panicking: no command line with a bare CR, a bare LF or a NUL ever goes
//! upstream; at most one command is outstanding upstream at a time; and a reply that
//! answers no outstanding command is never relayed to the client (except a `421`) but
//! ends the connection as a protocol error.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use proxsmtpd::config::FilterType;
use proxsmtpd::protocol::session::{Action, Policy, Session, TlsPolicy};
use proxsmtpd::protocol::command::has_forbidden_bytes;
use proxsmtpd::protocol::line::{Framed, LineReader, COMMAND_LINE_LIMIT};
use proxsmtpd::protocol::reply::ReplyAssembler;

/// The proxy's limit for upstream reply lines.
const REPLY_LINE_LIMIT: usize = 16 * 1024;

fn policy(byte: u8) -> Policy {
    Policy {
        filter_type: match byte % 3 {
            0 => FilterType::Pipe,
            1 => FilterType::File,
            _ => FilterType::Reject,
        },
        filter_reject_reply: b"530 Email Rejected\r\n".to_vec(),
        skip_authenticated: byte & 0x04 != 0,
        xclient: byte & 0x08 != 0,
        client_ip: match (byte >> 4) & 3 {
            0 => None,
            1 => Some("192.0.2.1".parse().expect("literal")),
            _ => Some("2001:db8::1".parse().expect("literal")),
        },
    }
}

fn tls_policy(byte: u8) -> TlsPolicy {
    TlsPolicy {
        offer_starttls: byte & 1 != 0,
        required: byte & 2 != 0,
        implicit: byte & 4 != 0,
    }
}

struct Driver {
    session: Session,
    handshake_fails: bool,
    client_buf: BytesMut,
    client_lines: LineReader,
    client_eof: bool,
    upstream_buf: BytesMut,
    upstream_lines: LineReader,
    assembler: ReplyAssembler,
    /// Commands (or the greeting) sent upstream and not answered yet.
    outstanding: usize,
}

/// Why the driver stops, as the proxy would end the connection.
struct Closed;

impl Driver {
    /// Carries out the actions; a transaction finishes at once (its body is the
    /// transaction's business, not the session's).
    fn perform(&mut self) -> Result<(), Closed> {
        loop {
            let actions = self.session.take_actions();
            if actions.is_empty() {
                return Ok(());
            }
            for action in actions {
                match action {
                    Action::ToClient(bytes) => {
                        assert!(bytes.ends_with(b"\n"), "unterminated reply {bytes:?}")
                    }
                    Action::ToUpstream(bytes) => {
                        assert!(!has_forbidden_bytes(&bytes), "relayed {bytes:?}");
                        self.outstanding += 1;
                        assert!(self.outstanding <= 1, "two commands outstanding upstream");
                    }
                    Action::UpstreamProtocolError(_) => return Err(Closed),
                    Action::PolicyReject => {}
                    Action::BeginData(_) => self.session.transaction_done(),
                    Action::StartTls => {
                        // What the client sent after STARTTLS is dropped, unread.
                        self.client_buf.clear();
                        self.client_lines = LineReader::new(COMMAND_LINE_LIMIT);
                        if self.handshake_fails {
                            return Err(Closed);
                        }
                        self.session.tls_established();
                    }
                }
            }
        }
    }

    /// The relay loop's body without the waiting.
    fn run(&mut self) -> Result<(), Closed> {
        loop {
            while self.session.accepts_client_input() {
                let framed = match self.client_lines.next(&mut self.client_buf) {
                    Some(f) => Some(f),
                    // As the relay does: a departed client's unterminated line is dropped.
                    None if self.client_eof => {
                        self.client_buf.clear();
                        None
                    }
                    None => None,
                };
                match framed {
                    Some(Framed::Line(line)) => self.session.client_line(line),
                    Some(Framed::TooLong) => self.session.client_line_too_long(),
                    None => break,
                }
                self.perform()?;
            }
            match self.next_reply()? {
                Some(reply) => {
                    let answers_a_command = self.outstanding > 0;
                    self.outstanding = self.outstanding.saturating_sub(1);
                    let code = reply.code;
                    self.session.upstream_reply(reply);
                    if !answers_a_command && code != 421 {
                        let actions = self.session.take_actions();
                        assert!(
                            matches!(actions.as_slice(), [Action::UpstreamProtocolError(_)]),
                            "unsolicited {code} not refused: {actions:?}"
                        );
                        return Err(Closed);
                    }
                    self.perform()?;
                }
                None => break,
            }
        }
        if self.client_eof && !self.session.awaiting_upstream() {
            return Err(Closed);
        }
        let _ = self.session.is_idle();
        let _ = self.session.envelope();
        let _ = self.session.authenticated();
        Ok(())
    }

    fn next_reply(&mut self) -> Result<Option<proxsmtpd::protocol::reply::Reply>, Closed> {
        while let Some(framed) = self.upstream_lines.next(&mut self.upstream_buf) {
            let Framed::Line(line) = framed else {
                return Err(Closed);
            };
            if let Some(reply) = self.assembler.push(line).map_err(|_| Closed)? {
                return Ok(Some(reply));
            }
        }
        Ok(None)
    }
}

fuzz_target!(|data: &[u8]| {
    let [policy_byte, tls_byte, records @ ..] = data else {
        return;
    };
    let mut driver = Driver {
        session: Session::with_tls(policy(*policy_byte), tls_policy(*tls_byte)),
        handshake_fails: tls_byte & 8 != 0,
        client_buf: BytesMut::new(),
        client_lines: LineReader::new(COMMAND_LINE_LIMIT),
        client_eof: false,
        upstream_buf: BytesMut::new(),
        upstream_lines: LineReader::new(REPLY_LINE_LIMIT),
        assembler: ReplyAssembler::default(),
        outstanding: 1,
    };
    for record in records.split_inclusive(|&b| b == b'\n') {
        let (&kind, rest) = record
            .split_first()
            .expect("split_inclusive yields non-empty");
        match kind {
            b'C' if !driver.client_eof => driver.client_buf.extend_from_slice(rest),
            b'S' => driver.upstream_buf.extend_from_slice(rest),
            b'E' => driver.client_eof = true,
            b'G' => {
                // The proxy read the greeting itself: nothing is outstanding any more.
                if driver.outstanding > 0 && driver.session.awaiting_greeting() {
                    driver.outstanding = 0;
                }
                driver.session.upstream_greeted();
                if driver.perform().is_err() {
                    return;
                }
            }
            b'L' if !driver.client_eof => {
                driver.client_buf.extend_from_slice(&[b'x'; 5000]);
                driver.client_buf.extend_from_slice(b"\r\n");
            }
            _ => continue,
        }
        if driver.run().is_err() {
            return;
        }
    }
    // The client's last bytes, as if it closed now.
    driver.client_eof = true;
    let _ = driver.run();
});
