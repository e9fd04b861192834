//! The relay core driven as the proxy drives it, with arbitrary client bytes and arbitrary
//! upstream bytes. It must never panic.
//!
//! Input: a policy byte and a TLS byte, then records separated by LF. A record starting
//! with `C` appends the rest of it (LF included) to the client's bytes, `S` to the
//! upstream's, `E` is the client closing, `U` the upstream closing, `T` a deadline passing,
//! `D` the proxy starting to drain, `L` a client line of 5000 bytes (over the command line
//! limit), `G` the proxy reading the upstream's greeting itself; others are ignored. After
//! each record the steps are carried out until there is none. A STARTTLS handshake
//! succeeds or fails as the TLS byte says; a message transaction finishes at once.
//!
//! Beyond not panicking: no command line with a bare CR, a bare LF or a NUL ever goes
//! upstream; at most one command is outstanding upstream at a time; a reply that answers
//! no outstanding command is never relayed to the client (except a `421`) but ends the
//! connection as a protocol error; nothing the client sent after STARTTLS is taken; and
//! after the connection ends, nothing more happens.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use proxsmtpd::config::FilterType;
use proxsmtpd::protocol::command::has_forbidden_bytes;
use proxsmtpd::protocol::relay::{End, Relay, Step};
use proxsmtpd::protocol::session::{Policy, Session, TlsPolicy};

fn policy(byte: u8) -> Policy {
    Policy {
        filter_type: match byte % 3 {
            0 => FilterType::Pipe,
            1 => FilterType::File,
            _ => FilterType::Reject,
        },
        filter_reject_reply: bytes::Bytes::from_static(b"530 Email Rejected\r\n"),
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
    relay: Relay,
    handshake_fails: bool,
    /// Commands (or the greeting) sent upstream and not answered yet.
    outstanding: usize,
    ended: bool,
    /// The last step was a reply that answered no command.
    unsolicited: bool,
    now: Instant,
}

impl Driver {
    /// Carries out every step the relay has, as the proxy would.
    fn run(&mut self) {
        while let Some(step) = self.relay.next_step(self.now) {
            assert!(!self.ended, "a step after the end: {step:?}");
            if std::mem::take(&mut self.unsolicited) {
                assert!(
                    matches!(step, Step::End(End::UpstreamProtocol { .. })),
                    "unsolicited reply not refused: {step:?}"
                );
            }
            self.now += Duration::from_millis(1);
            match step {
                Step::ToClient(bytes) => assert!(bytes.ends_with(b"\n"), "unterminated {bytes:?}"),
                Step::ToUpstream(bytes) => {
                    assert!(!has_forbidden_bytes(&bytes), "relayed {bytes:?}");
                    self.outstanding += 1;
                    assert!(self.outstanding <= 1, "two commands outstanding upstream");
                }
                Step::Replied { code, .. } => {
                    // A reply nobody asked for is relayed only when it is a 421; any other
                    // ends the connection at once.
                    if self.outstanding == 0 && code != 421 {
                        self.unsolicited = true;
                    }
                    self.outstanding = self.outstanding.saturating_sub(1);
                }
                Step::StartTls { .. } => {
                    assert!(self.relay.client_buf.is_empty(), "bytes after STARTTLS kept");
                    if self.handshake_fails {
                        self.ended = true;
                        return;
                    }
                    self.relay.tls_established();
                }
                Step::BeginData(_) => self.relay.transaction_done(self.now),
                Step::CheckEnvelope { .. } => self.relay.envelope_checked(None, self.now),
                Step::PolicyReject | Step::ClientLine(_) => {}
                Step::End(_) => self.ended = true,
            }
        }
        let _ = self.relay.wants();
        let _ = self.relay.session().is_idle();
        let _ = self.relay.envelope();
    }
}

fuzz_target!(|data: &[u8]| {
    let [policy_byte, tls_byte, records @ ..] = data else {
        return;
    };
    let now = Instant::now();
    let session = Session::with_tls(policy(*policy_byte), tls_policy(*tls_byte));
    let mut driver = Driver {
        relay: {
            let mut relay = Relay::new(session, Duration::from_secs(300), now);
            relay.trace_client_lines(policy_byte & 0x40 != 0);
            relay
        },
        handshake_fails: tls_byte & 8 != 0,
        outstanding: 1,
        ended: false,
        now,
        unsolicited: false,
    };
    for record in records.split_inclusive(|&b| b == b'\n') {
        if driver.ended {
            return;
        }
        let (&kind, rest) = record
            .split_first()
            .expect("split_inclusive yields non-empty");
        match kind {
            b'C' if !driver.relay.client_eof => driver.relay.client_buf.extend_from_slice(rest),
            b'S' => driver.relay.upstream_buf.extend_from_slice(rest),
            b'E' => driver.relay.client_closed(),
            b'U' => driver.relay.upstream_closed(),
            b'T' => driver.relay.timed_out(),
            b'D' => driver.relay.drain(),
            b'G' => {
                // The proxy read the greeting itself: nothing is outstanding any more.
                if driver.outstanding > 0 && driver.relay.session().awaiting_greeting() {
                    driver.outstanding = 0;
                }
                driver.relay.greeting_consumed();
            }
            b'L' if !driver.relay.client_eof => {
                driver.relay.client_buf.extend_from_slice(&[b'x'; 5000]);
                driver.relay.client_buf.extend_from_slice(b"\r\n");
            }
            _ => continue,
        }
        driver.run();
    }
    // The client's last bytes, as if it closed now (unless the connection is over).
    if !driver.ended {
        driver.relay.client_closed();
        driver.run();
    }
});
