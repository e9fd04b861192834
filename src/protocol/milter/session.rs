//! One connection to a filter, driven stage by stage: negotiation, then
//! connect -> helo -> (mail -> rcpt* -> data -> header* -> eoh -> body* -> eom | abort)* ->
//! quit. The caller sends what `begin` returns and feeds the filter's packets to
//! `on_packet` until the stage ends.
//!
//! What a filter's verdict covers depends on the stage, as in Postfix:
//! - connect and helo: the whole SMTP connection. After any verdict but `Continue` nothing
//!   more is sent for it (only `QUIT`).
//! - rcpt: reject, tempfail and reply codes cover that recipient only; accept and discard
//!   cover the message.
//! - mail, data, header, eoh, body: the message. After a verdict but `Continue` the rest of
//!   the message is skipped until `ABORT` or the end of message.
//! - eom: modifications first (only here), then one final verdict for the message.
//! - unknown: that command.
//!
//! `CONN_FAIL` and `SHUTDOWN` cover the connection at any stage.

use super::codec::{Command, EncodeError, Packet};
use super::negotiate::{bare_macro_name, MacroNames, Negotiated, Offer};
use super::reply::{Modification, Reply, SmtpReply};
use super::{cmd, proto, ProtocolError, Stage};

/// What to do after `begin`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begun {
    /// Send these bytes, then pass the filter's packets to `on_packet` until an event ends
    /// the stage.
    Await(Vec<u8>),
    /// Send these bytes; the filter does not answer them (an `SMFIP_NR_*` flag, or abort,
    /// quit): the stage is complete, carry on as after "continue".
    NoReply(Vec<u8>),
    /// Nothing to send: the filter opted out of this stage (`SMFIP_NO*`), skipped the rest
    /// of the body, or already decided for the message or connection. Carry on as after
    /// "continue".
    Skipped,
}

/// Why `begin` refused: the caller's mistake, not the filter's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BeginError {
    /// Negotiation is not done, or an answer to the previous stage is still awaited.
    Busy,
    /// This command does not follow the previous stage.
    OutOfOrder(u8),
    /// The session failed or was closed.
    Closed,
    Encode(EncodeError),
}

impl std::fmt::Display for BeginError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BeginError::Busy => write!(f, "milter stage begun while another is in progress"),
            BeginError::OutOfOrder(c) => {
                write!(f, "milter command '{}' out of order", char::from(*c))
            }
            BeginError::Closed => write!(f, "milter session closed"),
            BeginError::Encode(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for BeginError {}

/// A filter's decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Accept without further filtering (of the connection, message, or command).
    Accept,
    /// Reject (5xx chosen by the MTA).
    Reject,
    /// Temporary failure (4xx chosen by the MTA).
    Tempfail,
    /// Accept the message and throw it away.
    Discard,
    /// Reject or tempfail with this SMTP reply.
    Reply(SmtpReply),
    /// Fail the SMTP connection.
    ConnFail,
    /// Close the SMTP connection with 421.
    Shutdown,
}

/// What a filter packet meant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Option negotiation is done; stages can begin.
    Negotiated,
    /// The stage is complete; carry on.
    Continue,
    /// The stage is complete with this decision.
    Verdict(Verdict),
    /// At end of message: a change to apply if the final verdict lets the message through.
    /// More packets follow; the caller collects these.
    Modification(Modification),
    /// The body stage is complete and the filter wants no more body chunks.
    Skip,
    /// The filter is still working: restart the timeout and keep waiting.
    Progress,
    /// The filter broke the protocol; the session accepts nothing more.
    ProtocolError(ProtocolError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Start,
    Negotiating,
    /// Negotiated, no SMTP connection reported yet.
    Ready,
    /// Connected (and maybe HELO); no message in progress.
    Connection,
    Mail,
    Rcpt,
    Data,
    Header,
    Eoh,
    Body,
    Closed,
    Failed,
}

/// One filter connection.
#[derive(Debug)]
pub struct MilterSession {
    offer: Offer,
    macro_names: MacroNames,
    negotiated: Option<Negotiated>,
    phase: Phase,
    /// The stage whose answer is awaited.
    awaiting: Option<Stage>,
    /// The filter decided for the connection: only QUIT is sent from now on.
    connection_decided: bool,
    /// The filter decided for the current message.
    message_decided: bool,
    /// The filter answered a body chunk with SKIP.
    body_skipped: bool,
}

impl MilterSession {
    pub fn new(offer: Offer, macro_names: MacroNames) -> Self {
        MilterSession {
            offer,
            macro_names,
            negotiated: None,
            phase: Phase::Start,
            awaiting: None,
            connection_decided: false,
            message_decided: false,
            body_skipped: false,
        }
    }

    /// The `SMFIC_OPTNEG` packet that opens the conversation; its answer goes to
    /// `on_packet`, which returns `Event::Negotiated`.
    pub fn start(&mut self) -> Result<Vec<u8>, BeginError> {
        match self.phase {
            Phase::Start => {
                self.phase = Phase::Negotiating;
                Ok(self.offer.to_bytes())
            }
            Phase::Closed | Phase::Failed => Err(BeginError::Closed),
            _ => Err(BeginError::OutOfOrder(cmd::OPTNEG)),
        }
    }

    /// What was negotiated, once it was.
    pub fn negotiated(&self) -> Option<&Negotiated> {
        self.negotiated.as_ref()
    }

    /// The stage whose answer is awaited.
    pub fn awaiting(&self) -> Option<Stage> {
        self.awaiting
    }

    /// Whether the session broke down or was closed.
    pub fn is_closed(&self) -> bool {
        matches!(self.phase, Phase::Closed | Phase::Failed)
    }

    /// Whether a message transaction is under way (MAIL sent, end of message not): the
    /// filter must be told `ABORT` before another MAIL.
    pub fn in_message(&self) -> bool {
        matches!(
            self.phase,
            Phase::Mail | Phase::Rcpt | Phase::Data | Phase::Header | Phase::Eoh | Phase::Body
        )
    }

    /// Whether the filter decided for the whole connection.
    pub fn connection_decided(&self) -> bool {
        self.connection_decided
    }

    /// Starts a stage (or sends abort / quit). `macros` are the values the caller knows
    /// for this stage; those named in the stage's macro list (the filter's list if it sent
    /// one) are sent first, in the list's order, matching names with or without braces.
    pub fn begin(
        &mut self,
        command: Command<'_>,
        macros: &[(&str, &[u8])],
    ) -> Result<Begun, BeginError> {
        match self.phase {
            Phase::Closed | Phase::Failed => return Err(BeginError::Closed),
            Phase::Start | Phase::Negotiating => return Err(BeginError::Busy),
            _ if self.awaiting.is_some() => return Err(BeginError::Busy),
            _ => {}
        }
        let Some(negotiated) = self.negotiated.as_ref() else {
            return Err(BeginError::Busy);
        };
        let code = command.code();
        let stage = match (command.stage(), &command) {
            (Some(stage), _) => stage,
            (None, Command::Abort) => {
                if !(self.phase == Phase::Connection || self.in_message()) {
                    return Err(BeginError::OutOfOrder(code));
                }
                self.phase = Phase::Connection;
                self.end_message();
                if self.connection_decided {
                    return Ok(Begun::Skipped);
                }
                return Ok(Begun::NoReply(encode(&command)?));
            }
            (None, Command::Quit | Command::QuitNc) => {
                let bytes = encode(&command)?;
                if command == Command::Quit {
                    self.phase = Phase::Closed;
                } else {
                    self.phase = Phase::Ready;
                    self.connection_decided = false;
                    self.end_message();
                }
                return Ok(Begun::NoReply(bytes));
            }
            (None, _) => return Err(BeginError::OutOfOrder(code)),
        };
        let next = match (stage, self.phase) {
            (Stage::Connect, Phase::Ready) => Phase::Connection,
            (Stage::Helo, Phase::Connection) => Phase::Connection,
            (Stage::Mail, Phase::Connection) => Phase::Mail,
            (Stage::Rcpt, Phase::Mail | Phase::Rcpt) => Phase::Rcpt,
            (Stage::Data, Phase::Rcpt) => Phase::Data,
            (Stage::Header, Phase::Data | Phase::Header) => Phase::Header,
            (Stage::Eoh, Phase::Data | Phase::Header) => Phase::Eoh,
            (Stage::Body, Phase::Eoh | Phase::Body) => Phase::Body,
            (Stage::Eom, Phase::Eoh | Phase::Body) => Phase::Connection,
            (Stage::Unknown, p @ (Phase::Connection | Phase::Mail | Phase::Rcpt)) => p,
            _ => return Err(BeginError::OutOfOrder(code)),
        };
        let in_message = !matches!(stage, Stage::Connect | Stage::Helo);
        let skip = self.connection_decided
            || (in_message && self.message_decided && stage != Stage::Unknown)
            || negotiated.has_flag(stage.no_flag())
            || (stage == Stage::Body && self.body_skipped);
        let no_reply = negotiated.has_flag(stage.no_reply_flag());

        let mut out = Vec::new();
        if !skip {
            if let Some(smfim) = stage.macro_stage() {
                let names = self.macro_names.for_stage(negotiated, smfim);
                let pairs: Vec<(&str, &[u8])> = names
                    .iter()
                    .filter_map(|name| {
                        let bare = bare_macro_name(name);
                        macros
                            .iter()
                            .find(|(n, _)| bare_macro_name(n) == bare)
                            .map(|(_, v)| (name.as_str(), *v))
                    })
                    .collect();
                if !pairs.is_empty() {
                    Command::Macro {
                        stage_command: stage.command(),
                        macros: &pairs,
                    }
                    .encode(&mut out)
                    .map_err(BeginError::Encode)?;
                }
            }
            command.encode(&mut out).map_err(BeginError::Encode)?;
        }
        self.phase = next;
        if stage == Stage::Eom {
            self.body_skipped = false;
        }
        if skip {
            if stage == Stage::Eom {
                self.end_message();
            }
            return Ok(Begun::Skipped);
        }
        if no_reply {
            return Ok(Begun::NoReply(out));
        }
        self.awaiting = Some(stage);
        Ok(Begun::Await(out))
    }

    fn end_message(&mut self) {
        self.message_decided = false;
        self.body_skipped = false;
    }

    fn fail(&mut self, e: ProtocolError) -> Event {
        self.phase = Phase::Failed;
        self.awaiting = None;
        Event::ProtocolError(e)
    }

    /// Interprets one packet from the filter.
    pub fn on_packet(&mut self, packet: &Packet) -> Event {
        match self.phase {
            Phase::Closed | Phase::Failed => return Event::ProtocolError(ProtocolError::Closed),
            Phase::Negotiating => {
                return match Negotiated::from_reply(&self.offer, packet) {
                    Ok(n) => {
                        self.negotiated = Some(n);
                        self.phase = Phase::Ready;
                        Event::Negotiated
                    }
                    Err(e) => self.fail(e),
                };
            }
            _ => {}
        }
        let Some(stage) = self.awaiting else {
            return self.fail(ProtocolError::Unexpected {
                command: packet.command,
                stage: None,
            });
        };
        let unexpected = ProtocolError::Unexpected {
            command: packet.command,
            stage: Some(stage),
        };
        let reply = match Reply::parse(packet) {
            Ok(r) => r,
            Err(ProtocolError::Unexpected { .. }) => return self.fail(unexpected),
            Err(e) => return self.fail(e),
        };
        let verdict = match reply {
            Reply::Progress => return Event::Progress,
            Reply::Continue => {
                self.finish_stage(stage);
                return Event::Continue;
            }
            Reply::Skip => {
                if stage != Stage::Body {
                    return self.fail(unexpected);
                }
                if !self
                    .negotiated
                    .as_ref()
                    .is_some_and(|n| n.has_flag(proto::SKIP))
                {
                    return self.fail(ProtocolError::NotNegotiated {
                        command: packet.command,
                    });
                }
                self.body_skipped = true;
                self.awaiting = None;
                return Event::Skip;
            }
            Reply::Modification(m) => {
                if stage != Stage::Eom {
                    return self.fail(unexpected);
                }
                if !self
                    .negotiated
                    .as_ref()
                    .is_some_and(|n| n.has_action(m.required_action()))
                {
                    return self.fail(ProtocolError::NotNegotiated {
                        command: packet.command,
                    });
                }
                return Event::Modification(m);
            }
            Reply::Accept => Verdict::Accept,
            Reply::Reject => Verdict::Reject,
            Reply::Tempfail => Verdict::Tempfail,
            Reply::Discard => Verdict::Discard,
            Reply::ReplyCode(r) => Verdict::Reply(r),
            Reply::ConnFail => Verdict::ConnFail,
            Reply::Shutdown => Verdict::Shutdown,
        };
        match (stage, &verdict) {
            (Stage::Connect | Stage::Helo, Verdict::Discard) => return self.fail(unexpected),
            (_, Verdict::ConnFail | Verdict::Shutdown) | (Stage::Connect | Stage::Helo, _) => {
                self.connection_decided = true;
            }
            (Stage::Rcpt, Verdict::Reject | Verdict::Tempfail | Verdict::Reply(_)) => {}
            (Stage::Unknown, _) => {}
            _ => self.message_decided = true,
        }
        self.finish_stage(stage);
        Event::Verdict(verdict)
    }

    fn finish_stage(&mut self, stage: Stage) {
        self.awaiting = None;
        if stage == Stage::Eom {
            self.end_message();
        }
    }
}

fn encode(command: &Command<'_>) -> Result<Vec<u8>, BeginError> {
    command.to_bytes().map_err(BeginError::Encode)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::milter::codec::ConnectAddress;
    use crate::protocol::milter::{action, rsp};
    use bytes::Bytes;
    use std::net::{IpAddr, Ipv4Addr};

    fn pkt(command: u8, data: &[u8]) -> Packet {
        Packet {
            command,
            data: Bytes::copy_from_slice(data),
        }
    }

    fn wire(command: u8, data: &[u8]) -> Vec<u8> {
        let mut v = ((data.len() + 1) as u32).to_be_bytes().to_vec();
        v.push(command);
        v.extend_from_slice(data);
        v
    }

    fn optneg(actions: u32, protocol: u32, symlists: &[u8]) -> Packet {
        let mut d = 6u32.to_be_bytes().to_vec();
        d.extend_from_slice(&actions.to_be_bytes());
        d.extend_from_slice(&protocol.to_be_bytes());
        d.extend_from_slice(symlists);
        pkt(b'O', &d)
    }

    fn negotiated_with(actions: u32, protocol: u32, symlists: &[u8]) -> MilterSession {
        let mut s = MilterSession::new(Offer::default(), MacroNames::default());
        assert_eq!(s.start().unwrap(), Offer::default().to_bytes());
        assert_eq!(
            s.on_packet(&optneg(actions, protocol, symlists)),
            Event::Negotiated
        );
        s
    }

    fn negotiated(actions: u32, protocol: u32) -> MilterSession {
        negotiated_with(actions, protocol, b"")
    }

    const CONNECT: Command<'static> = Command::Connect {
        hostname: b"client.example",
        address: ConnectAddress::Inet {
            ip: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
            port: 4567,
        },
    };
    const SENDER: &[&[u8]] = &[b"<a@example.org>"];
    const RCPT: &[&[u8]] = &[b"<b@example.net>"];

    /// Begins a stage that awaits an answer and answers it with `reply`.
    fn step(s: &mut MilterSession, command: Command<'_>, reply: Packet) -> Event {
        assert!(
            matches!(s.begin(command, &[]), Ok(Begun::Await(_))),
            "{command:?}"
        );
        s.on_packet(&reply)
    }

    fn cont() -> Packet {
        pkt(rsp::CONTINUE, b"")
    }

    /// Connect, helo, mail, rcpt, data, one header, eoh, one body chunk: all continued.
    fn through_body(s: &mut MilterSession) {
        for command in [
            CONNECT,
            Command::Helo(b"client.example"),
            Command::Mail(SENDER),
            Command::Rcpt(RCPT),
            Command::Data,
            Command::Header {
                name: b"Subject",
                value: b"hi",
            },
            Command::Eoh,
            Command::Body(b"text\r\n"),
        ] {
            assert_eq!(step(s, command, cont()), Event::Continue, "{command:?}");
        }
    }

    #[test]
    fn a_whole_conversation_byte_exact() {
        let mut s = negotiated(action::ADDHDRS | action::CHGBODY, 0);
        let macros: &[(&str, &[u8])] = &[
            ("{client_addr}", b"192.0.2.1"),
            ("j", b"mx.example"),
            ("daemon_name", b"proxsmtpd"),
            ("{unlisted}", b"x"),
        ];
        // Macros in the list's order, with the list's spelling, then the command.
        assert_eq!(
            s.begin(CONNECT, macros),
            Ok(Begun::Await(
                [
                    wire(
                        b'D',
                        b"Cj\0mx.example\0{daemon_name}\0proxsmtpd\0{client_addr}\x00192.0.2.1\0"
                    ),
                    wire(b'C', b"client.example\x004\x11\xd7192.0.2.1\0"),
                ]
                .concat()
            ))
        );
        assert_eq!(s.awaiting(), Some(Stage::Connect));
        assert_eq!(s.on_packet(&cont()), Event::Continue);
        assert_eq!(s.awaiting(), None);
        // No macro of the helo list is known: no macro packet.
        assert_eq!(
            s.begin(Command::Helo(b"c.example"), macros),
            Ok(Begun::Await(wire(b'H', b"c.example\0")))
        );
        assert_eq!(s.on_packet(&pkt(rsp::PROGRESS, b"")), Event::Progress);
        assert_eq!(s.awaiting(), Some(Stage::Helo), "progress keeps waiting");
        assert_eq!(s.on_packet(&cont()), Event::Continue);
        let mail: &[&[u8]] = &[b"<a@example.org>", b"SIZE=10"];
        assert_eq!(
            s.begin(
                Command::Mail(mail),
                &[("i", b"4XyZ"), ("{mail_addr}", b"a@example.org")]
            ),
            Ok(Begun::Await(
                [
                    wire(b'D', b"Mi\x004XyZ\0{mail_addr}\0a@example.org\0"),
                    wire(b'M', b"<a@example.org>\0SIZE=10\0"),
                ]
                .concat()
            ))
        );
        assert_eq!(s.on_packet(&cont()), Event::Continue);
        assert_eq!(
            s.begin(Command::Rcpt(RCPT), &[("{rcpt_addr}", b"b@example.net")]),
            Ok(Begun::Await(
                [
                    wire(b'D', b"R{rcpt_addr}\0b@example.net\0"),
                    wire(b'R', b"<b@example.net>\0"),
                ]
                .concat()
            ))
        );
        assert_eq!(s.on_packet(&cont()), Event::Continue);
        assert_eq!(
            s.begin(Command::Data, &[("i", b"4XyZ")]),
            Ok(Begun::Await(
                [wire(b'D', b"Ti\x004XyZ\0"), wire(b'T', b"")].concat()
            ))
        );
        assert_eq!(s.on_packet(&cont()), Event::Continue);
        assert_eq!(
            s.begin(
                Command::Header {
                    name: b"Subject",
                    value: b"hi"
                },
                &[("i", b"4XyZ")]
            ),
            Ok(Begun::Await(wire(b'L', b"Subject\0hi\0")))
        );
        assert_eq!(s.on_packet(&cont()), Event::Continue);
        assert_eq!(
            s.begin(Command::Eoh, &[("i", b"4XyZ")]),
            Ok(Begun::Await(
                [wire(b'D', b"Ni\x004XyZ\0"), wire(b'N', b"")].concat()
            ))
        );
        assert_eq!(s.on_packet(&cont()), Event::Continue);
        assert_eq!(
            s.begin(Command::Body(b"body\r\n"), &[]),
            Ok(Begun::Await(wire(b'B', b"body\r\n")))
        );
        assert_eq!(s.on_packet(&cont()), Event::Continue);
        assert_eq!(
            s.begin(Command::BodyEob, &[("i", b"4XyZ")]),
            Ok(Begun::Await(
                [wire(b'D', b"Ei\x004XyZ\0"), wire(b'E', b"")].concat()
            ))
        );
        assert_eq!(
            s.on_packet(&pkt(rsp::ADDHEADER, b"X-Scanned\0yes\0")),
            Event::Modification(Modification::AddHeader {
                name: Bytes::from_static(b"X-Scanned"),
                value: Bytes::from_static(b"yes"),
            })
        );
        assert_eq!(
            s.on_packet(&pkt(rsp::REPLBODY, b"new\r\n")),
            Event::Modification(Modification::ReplBody(Bytes::from_static(b"new\r\n")))
        );
        assert_eq!(s.on_packet(&pkt(rsp::PROGRESS, b"")), Event::Progress);
        assert_eq!(
            s.on_packet(&pkt(rsp::ACCEPT, b"")),
            Event::Verdict(Verdict::Accept)
        );
        // A second message on the same connection, then quit.
        assert_eq!(step(&mut s, Command::Mail(SENDER), cont()), Event::Continue);
        assert_eq!(
            s.begin(Command::Abort, &[]),
            Ok(Begun::NoReply(wire(b'A', b"")))
        );
        assert_eq!(step(&mut s, Command::Mail(SENDER), cont()), Event::Continue);
        assert_eq!(
            s.begin(Command::Quit, &[]),
            Ok(Begun::NoReply(wire(b'Q', b"")))
        );
        assert!(s.is_closed());
        assert_eq!(s.begin(Command::Abort, &[]), Err(BeginError::Closed));
        assert_eq!(
            s.on_packet(&cont()),
            Event::ProtocolError(ProtocolError::Closed)
        );
    }

    /// Every stage in order, with the stage under test's flag set.
    fn run_stages(s: &mut MilterSession) -> Vec<(Stage, Begun)> {
        let mut out = Vec::new();
        let commands = [
            (Stage::Connect, CONNECT),
            (Stage::Helo, Command::Helo(b"h")),
            (Stage::Unknown, Command::Unknown(b"XYZZY")),
            (Stage::Mail, Command::Mail(SENDER)),
            (Stage::Rcpt, Command::Rcpt(RCPT)),
            (Stage::Data, Command::Data),
            (
                Stage::Header,
                Command::Header {
                    name: b"A",
                    value: b"b",
                },
            ),
            (Stage::Eoh, Command::Eoh),
            (Stage::Body, Command::Body(b"x")),
            (Stage::Eom, Command::BodyEob),
        ];
        for (stage, command) in commands {
            let begun = s.begin(command, &[("i", b"Q1")]).unwrap();
            if let Begun::Await(_) = begun {
                assert_eq!(s.on_packet(&cont()), Event::Continue);
            }
            out.push((stage, begun));
        }
        out
    }

    const ALL_STAGES: [Stage; 10] = [
        Stage::Connect,
        Stage::Helo,
        Stage::Unknown,
        Stage::Mail,
        Stage::Rcpt,
        Stage::Data,
        Stage::Header,
        Stage::Eoh,
        Stage::Body,
        Stage::Eom,
    ];

    #[test]
    fn no_flags_skip_their_stage() {
        for flagged in ALL_STAGES {
            if flagged == Stage::Eom {
                continue;
            }
            let mut s = negotiated(0, flagged.no_flag());
            for (stage, begun) in run_stages(&mut s) {
                if stage == flagged {
                    assert_eq!(begun, Begun::Skipped, "{stage:?} skipped");
                } else {
                    assert!(
                        matches!(begun, Begun::Await(_)),
                        "{stage:?} with {flagged:?}"
                    );
                }
            }
        }
    }

    /// The length of the packet `run_stages` sends for a stage.
    fn command_len(stage: Stage) -> usize {
        match stage {
            Stage::Connect => CONNECT.to_bytes().unwrap().len(),
            Stage::Helo => 7,
            Stage::Unknown => 11,
            Stage::Mail => 5 + SENDER[0].len() + 1,
            Stage::Rcpt => 5 + RCPT[0].len() + 1,
            Stage::Header => 9,
            Stage::Body => 6,
            Stage::Data | Stage::Eoh | Stage::Eom => 5,
        }
    }

    #[test]
    fn nr_flags_send_without_waiting() {
        for flagged in ALL_STAGES {
            if flagged == Stage::Eom {
                continue;
            }
            let mut s = negotiated(0, flagged.no_reply_flag());
            for (stage, begun) in run_stages(&mut s) {
                if stage == flagged {
                    let Begun::NoReply(bytes) = begun else {
                        panic!("{stage:?}: {begun:?}");
                    };
                    // The stage's command, after its macros if it has any.
                    assert_eq!(
                        bytes[bytes.len() - command_len(stage)..][4],
                        stage.command()
                    );
                    // `i` is in the default lists of mail, rcpt, data, eoh and eom.
                    if matches!(
                        stage,
                        Stage::Mail | Stage::Rcpt | Stage::Data | Stage::Eoh | Stage::Eom
                    ) {
                        assert_eq!(
                            &bytes[..9],
                            &wire(b'D', &[stage.command(), b'i', 0, b'Q', b'1', 0])[..9]
                        );
                    } else {
                        assert_eq!(bytes.len(), command_len(stage));
                    }
                } else {
                    assert!(
                        matches!(begun, Begun::Await(_)),
                        "{stage:?} with {flagged:?}"
                    );
                }
            }
        }
        // An answer to a stage that expects none is a protocol error.
        let mut s = negotiated(0, proto::NR_CONN);
        assert!(matches!(s.begin(CONNECT, &[]), Ok(Begun::NoReply(_))));
        assert_eq!(
            s.on_packet(&cont()),
            Event::ProtocolError(ProtocolError::Unexpected {
                command: rsp::CONTINUE,
                stage: None
            })
        );
    }

    #[test]
    fn skip_ends_the_body() {
        let mut s = negotiated(0, proto::SKIP);
        through_body(&mut s);
        assert_eq!(
            step(&mut s, Command::Body(b"more"), pkt(rsp::SKIP, b"")),
            Event::Skip
        );
        assert_eq!(s.begin(Command::Body(b"rest"), &[]), Ok(Begun::Skipped));
        assert_eq!(step(&mut s, Command::BodyEob, cont()), Event::Continue);
        // The next message gets its body again.
        for command in [
            Command::Mail(SENDER),
            Command::Rcpt(RCPT),
            Command::Data,
            Command::Eoh,
            Command::Body(b"x"),
        ] {
            assert_eq!(step(&mut s, command, cont()), Event::Continue);
        }

        // Without SMFIP_SKIP it is not allowed.
        let mut s = negotiated(0, 0);
        through_body(&mut s);
        assert_eq!(
            step(&mut s, Command::Body(b"more"), pkt(rsp::SKIP, b"")),
            Event::ProtocolError(ProtocolError::NotNegotiated { command: rsp::SKIP })
        );
    }

    #[test]
    fn replies_not_valid_at_the_stage() {
        let unexpected = |command, stage| {
            Event::ProtocolError(ProtocolError::Unexpected {
                command,
                stage: Some(stage),
            })
        };
        // (commands continued first, the command answered, the answer, the event)
        let add_header = pkt(rsp::ADDHEADER, b"X\0y\0");
        let cases: Vec<(usize, Command, Packet, Event)> = vec![
            (
                0,
                CONNECT,
                add_header.clone(),
                unexpected(rsp::ADDHEADER, Stage::Connect),
            ),
            (
                0,
                CONNECT,
                pkt(rsp::DISCARD, b""),
                unexpected(rsp::DISCARD, Stage::Connect),
            ),
            (
                1,
                Command::Helo(b"h"),
                pkt(rsp::DISCARD, b""),
                unexpected(rsp::DISCARD, Stage::Helo),
            ),
            (
                2,
                Command::Mail(SENDER),
                pkt(rsp::SKIP, b""),
                unexpected(rsp::SKIP, Stage::Mail),
            ),
            (
                3,
                Command::Rcpt(RCPT),
                add_header.clone(),
                unexpected(rsp::ADDHEADER, Stage::Rcpt),
            ),
            (
                4,
                Command::Data,
                pkt(rsp::QUARANTINE, b"why\0"),
                unexpected(rsp::QUARANTINE, Stage::Data),
            ),
            (
                1,
                Command::Helo(b"h"),
                optneg(0, 0, b""),
                unexpected(b'O', Stage::Helo),
            ),
            (
                1,
                Command::Helo(b"h"),
                pkt(rsp::SETSYMLIST, b""),
                unexpected(b'l', Stage::Helo),
            ),
            (
                1,
                Command::Helo(b"h"),
                pkt(rsp::REPLYCODE, b"250 ok\0"),
                Event::ProtocolError(ProtocolError::BadReplyCode),
            ),
            (
                1,
                Command::Helo(b"h"),
                pkt(rsp::CONTINUE, b"junk"),
                Event::ProtocolError(ProtocolError::Malformed {
                    command: rsp::CONTINUE,
                    reason: "unexpected data",
                }),
            ),
        ];
        let prefix = [
            CONNECT,
            Command::Helo(b"h"),
            Command::Mail(SENDER),
            Command::Rcpt(RCPT),
        ];
        for (n, command, reply, want) in cases {
            let mut s = negotiated(action::ALL, proto::SKIP);
            for c in &prefix[..n] {
                assert_eq!(step(&mut s, *c, cont()), Event::Continue);
            }
            assert_eq!(step(&mut s, command, reply.clone()), want, "{reply:?}");
            // Nothing more is accepted.
            assert!(s.is_closed());
            assert_eq!(
                s.on_packet(&cont()),
                Event::ProtocolError(ProtocolError::Closed)
            );
            assert_eq!(s.begin(Command::Quit, &[]), Err(BeginError::Closed));
        }
    }

    #[test]
    fn modifications_need_their_action() {
        let mods: &[(u8, &[u8], u32)] = &[
            (rsp::ADDHEADER, b"A\0b\0", action::ADDHDRS),
            (rsp::INSHEADER, b"\0\0\0\0A\0b\0", action::ADDHDRS),
            (rsp::CHGHEADER, b"\0\0\0\x01A\0\0", action::CHGHDRS),
            (rsp::REPLBODY, b"x", action::CHGBODY),
            (rsp::CHGFROM, b"<x>\0", action::CHGFROM),
            (rsp::ADDRCPT, b"<x>\0", action::ADDRCPT),
            (rsp::ADDRCPT_PAR, b"<x>\0A=B\0", action::ADDRCPT_PAR),
            (rsp::DELRCPT, b"<x>\0", action::DELRCPT),
            (rsp::QUARANTINE, b"why\0", action::QUARANTINE),
        ];
        for &(command, data, needed) in mods {
            // Negotiated: accepted at end of message.
            let mut s = negotiated(needed, 0);
            through_body(&mut s);
            let event = step(&mut s, Command::BodyEob, pkt(command, data));
            assert!(matches!(event, Event::Modification(_)), "{event:?}");
            assert_eq!(s.awaiting(), Some(Stage::Eom));
            assert_eq!(s.on_packet(&cont()), Event::Continue);
            assert_eq!(s.awaiting(), None);
            // Everything else negotiated but this: refused.
            let mut s = negotiated(action::ALL & !needed, 0);
            through_body(&mut s);
            assert_eq!(
                step(&mut s, Command::BodyEob, pkt(command, data)),
                Event::ProtocolError(ProtocolError::NotNegotiated { command })
            );
            assert!(s.is_closed());
        }
    }

    #[test]
    fn eom_verdicts() {
        let reply = SmtpReply::parse(Bytes::from_static(b"550 5.7.1 spam")).unwrap();
        let cases: Vec<(Packet, Event)> = vec![
            (cont(), Event::Continue),
            (pkt(rsp::ACCEPT, b""), Event::Verdict(Verdict::Accept)),
            (pkt(rsp::REJECT, b""), Event::Verdict(Verdict::Reject)),
            (pkt(rsp::TEMPFAIL, b""), Event::Verdict(Verdict::Tempfail)),
            (pkt(rsp::DISCARD, b""), Event::Verdict(Verdict::Discard)),
            (
                pkt(rsp::REPLYCODE, b"550 5.7.1 spam\0"),
                Event::Verdict(Verdict::Reply(reply)),
            ),
            (pkt(rsp::CONN_FAIL, b""), Event::Verdict(Verdict::ConnFail)),
            (pkt(rsp::SHUTDOWN, b""), Event::Verdict(Verdict::Shutdown)),
        ];
        for (answer, want) in cases {
            let mut s = negotiated(0, 0);
            through_body(&mut s);
            assert_eq!(step(&mut s, Command::BodyEob, answer), want);
            assert_eq!(s.awaiting(), None);
            let next = s.begin(Command::Mail(SENDER), &[]).unwrap();
            if matches!(want, Event::Verdict(Verdict::ConnFail | Verdict::Shutdown)) {
                assert_eq!(next, Begun::Skipped);
            } else {
                assert!(
                    matches!(next, Begun::Await(_)),
                    "a new message after {want:?}"
                );
            }
        }
    }

    #[test]
    fn verdict_scopes() {
        // Connect: any decision ends filtering for the connection; quit is still sent.
        for answer in [rsp::ACCEPT, rsp::REJECT, rsp::TEMPFAIL] {
            let mut s = negotiated(0, 0);
            assert!(matches!(
                step(&mut s, CONNECT, pkt(answer, b"")),
                Event::Verdict(_)
            ));
            assert!(s.connection_decided());
            assert_eq!(s.begin(Command::Helo(b"h"), &[]), Ok(Begun::Skipped));
            assert_eq!(s.begin(Command::Mail(SENDER), &[]), Ok(Begun::Skipped));
            assert_eq!(s.begin(Command::Abort, &[]), Ok(Begun::Skipped));
            assert_eq!(
                s.begin(Command::Quit, &[]),
                Ok(Begun::NoReply(wire(b'Q', b"")))
            );
        }
        // Rcpt: reject covers that recipient only.
        let mut s = negotiated(0, 0);
        for c in [CONNECT, Command::Mail(SENDER)] {
            assert_eq!(step(&mut s, c, cont()), Event::Continue);
        }
        let reply = pkt(rsp::REPLYCODE, b"550-5.1.1 no\r\n550 5.1.1 such user\0");
        assert!(matches!(
            step(&mut s, Command::Rcpt(RCPT), reply),
            Event::Verdict(Verdict::Reply(_))
        ));
        assert_eq!(
            step(&mut s, Command::Rcpt(RCPT), pkt(rsp::TEMPFAIL, b"")),
            Event::Verdict(Verdict::Tempfail)
        );
        assert_eq!(step(&mut s, Command::Rcpt(RCPT), cont()), Event::Continue);
        // Accept at rcpt covers the message: the rest of it is skipped, through EOM.
        assert_eq!(
            step(&mut s, Command::Rcpt(RCPT), pkt(rsp::ACCEPT, b"")),
            Event::Verdict(Verdict::Accept)
        );
        for c in [
            Command::Rcpt(RCPT),
            Command::Data,
            Command::Eoh,
            Command::Body(b"x"),
            Command::BodyEob,
        ] {
            assert_eq!(s.begin(c, &[]), Ok(Begun::Skipped), "{c:?}");
        }
        assert!(matches!(
            s.begin(Command::Mail(SENDER), &[]),
            Ok(Begun::Await(_))
        ));
        assert_eq!(
            s.on_packet(&pkt(rsp::REJECT, b"")),
            Event::Verdict(Verdict::Reject)
        );
        // After a rejected MAIL the caller aborts; the next message is filtered again.
        assert_eq!(s.begin(Command::Rcpt(RCPT), &[]), Ok(Begun::Skipped));
        assert_eq!(
            s.begin(Command::Abort, &[]),
            Ok(Begun::NoReply(wire(b'A', b"")))
        );
        assert_eq!(step(&mut s, Command::Mail(SENDER), cont()), Event::Continue);
        // Unknown commands are answered on their own.
        assert_eq!(
            step(&mut s, Command::Unknown(b"XYZZY"), pkt(rsp::REJECT, b"")),
            Event::Verdict(Verdict::Reject)
        );
        assert_eq!(step(&mut s, Command::Rcpt(RCPT), cont()), Event::Continue);
    }

    #[test]
    fn commands_out_of_order() {
        let mut s = MilterSession::new(Offer::default(), MacroNames::default());
        assert_eq!(s.begin(CONNECT, &[]), Err(BeginError::Busy));
        s.start().unwrap();
        assert_eq!(s.start(), Err(BeginError::OutOfOrder(b'O')));
        assert_eq!(s.begin(CONNECT, &[]), Err(BeginError::Busy));
        assert_eq!(s.on_packet(&optneg(0, 0, b"")), Event::Negotiated);
        let cases: Vec<(usize, Command)> = vec![
            (0, Command::Helo(b"h")),
            (0, Command::Mail(SENDER)),
            (0, Command::Abort),
            (1, CONNECT),
            (1, Command::Rcpt(RCPT)),
            (1, Command::Data),
            (1, Command::BodyEob),
            (2, Command::Data),
            (2, Command::Helo(b"h")),
            (2, Command::Mail(SENDER)),
            (
                3,
                Command::Header {
                    name: b"a",
                    value: b"b",
                },
            ),
            (3, Command::Body(b"x")),
            (4, Command::Rcpt(RCPT)),
            (4, Command::Unknown(b"X")),
            (
                5,
                Command::Header {
                    name: b"a",
                    value: b"b",
                },
            ),
            (5, Command::Eoh),
            (6, Command::Eoh),
            (
                6,
                Command::Header {
                    name: b"a",
                    value: b"b",
                },
            ),
        ];
        let prefix = [
            CONNECT,
            Command::Mail(SENDER),
            Command::Rcpt(RCPT),
            Command::Data,
            Command::Eoh,
            Command::Body(b"x"),
        ];
        for (n, command) in cases {
            let mut s = negotiated(0, 0);
            for c in &prefix[..n] {
                assert_eq!(step(&mut s, *c, cont()), Event::Continue);
            }
            assert_eq!(
                s.begin(command, &[]),
                Err(BeginError::OutOfOrder(command.code())),
                "{command:?} after {n}"
            );
            assert_eq!(
                s.begin(
                    Command::Macro {
                        stage_command: b'C',
                        macros: &[]
                    },
                    &[]
                ),
                Err(BeginError::OutOfOrder(b'D'))
            );
        }
        // One stage at a time.
        let mut s = negotiated(0, 0);
        assert!(matches!(s.begin(CONNECT, &[]), Ok(Begun::Await(_))));
        assert_eq!(s.begin(Command::Helo(b"h"), &[]), Err(BeginError::Busy));
        assert_eq!(s.begin(Command::Quit, &[]), Err(BeginError::Busy));
        // Encoding errors leave the state alone.
        let mut s = negotiated(0, 0);
        assert_eq!(
            s.begin(
                Command::Connect {
                    hostname: b"a\0",
                    address: ConnectAddress::Unknown
                },
                &[]
            ),
            Err(BeginError::Encode(EncodeError::EmbeddedNul))
        );
        assert_eq!(s.awaiting(), None);
        assert!(matches!(s.begin(CONNECT, &[]), Ok(Begun::Await(_))));
    }

    #[test]
    fn quit_nc_starts_over() {
        let mut s = negotiated(0, 0);
        assert!(matches!(
            step(&mut s, CONNECT, pkt(rsp::REJECT, b"")),
            Event::Verdict(_)
        ));
        assert_eq!(
            s.begin(Command::QuitNc, &[]),
            Ok(Begun::NoReply(wire(b'K', b"")))
        );
        assert!(!s.is_closed());
        assert_eq!(step(&mut s, CONNECT, cont()), Event::Continue);
        assert_eq!(step(&mut s, Command::Helo(b"h"), cont()), Event::Continue);
    }

    #[test]
    fn negotiation_failure_closes() {
        let mut s = MilterSession::new(Offer::default(), MacroNames::default());
        s.start().unwrap();
        assert_eq!(
            s.on_packet(&optneg(0x400, 0, b"")),
            Event::ProtocolError(ProtocolError::ActionsNotOffered {
                requested: 0x400,
                offered: action::ALL
            })
        );
        assert!(s.is_closed());
        assert_eq!(s.begin(CONNECT, &[]), Err(BeginError::Closed));
        // A reply before anything was asked.
        let mut s = negotiated(0, 0);
        assert_eq!(
            s.on_packet(&cont()),
            Event::ProtocolError(ProtocolError::Unexpected {
                command: rsp::CONTINUE,
                stage: None
            })
        );
    }

    #[test]
    fn filter_macro_lists_replace_the_defaults() {
        // Connect: only {client_addr}; helo: nothing at all.
        let mut s = negotiated_with(
            action::SETSYMLIST,
            0,
            b"\0\0\0\0{client_addr}\0\0\0\0\x01\0",
        );
        let macros: &[(&str, &[u8])] = &[
            ("j", b"mx"),
            ("client_addr", b"192.0.2.1"),
            ("{cipher}", b"AES"),
        ];
        assert_eq!(
            s.begin(CONNECT, macros),
            Ok(Begun::Await(
                [
                    wire(b'D', b"C{client_addr}\x00192.0.2.1\0"),
                    CONNECT.to_bytes().unwrap(),
                ]
                .concat()
            ))
        );
        assert_eq!(s.on_packet(&cont()), Event::Continue);
        assert_eq!(
            s.begin(Command::Helo(b"h"), macros),
            Ok(Begun::Await(wire(b'H', b"h\0")))
        );
    }
}
