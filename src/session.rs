//! The per-connection SMTP relay state machine, without I/O.
//!
//! The session takes client command lines and complete upstream replies and says what to
//! send where ([`Action`]). Every command forwarded upstream, and every reply the proxy makes
//! itself, takes a place in one queue, so replies reach the client in command order however
//! many commands the client pipelines (the original matched each reply to "the last client
//! line" and lost pipelined mail). A reply of our own waits for its turn in the queue.
//!
//! The body of a message is not handled here: when the client's DATA reaches the head of
//! the queue, the session emits [`Action::BeginData`], the caller runs the transaction and
//! then calls [`Session::transaction_done`].

use std::collections::VecDeque;
use std::net::IpAddr;

use bytes::Bytes;

use crate::config::FilterType;
use crate::smtp::command::{self, Verb};
use crate::smtp::ehlo;
use crate::smtp::reply::Reply;

pub const REPLY_LINE_TOO_LONG: &[u8] = b"500 Line too long\r\n";
pub const REPLY_NOT_IMPLEMENTED: &[u8] = b"502 Command not implemented\r\n";
pub const REPLY_XCLIENT_REFUSED: &[u8] = b"554 Insufficient authorization\r\n";

/// What the session needs to know of the configuration.
#[derive(Debug, Clone)]
pub struct Policy {
    pub filter_type: FilterType,
    /// The formatted FilterReject reply, with CRLF.
    pub filter_reject_reply: Vec<u8>,
    pub skip_authenticated: bool,
    pub xclient: bool,
    /// The client's address, for XCLIENT; `None` for unix-socket clients.
    pub client_ip: Option<IpAddr>,
}

/// How the body of a message is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataMode {
    /// Spool, filter (if a FilterCommand is set), then deliver.
    Filter,
    /// `Skip: authenticated`: straight through, no filter, no header.
    Passthrough,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    ToUpstream(Bytes),
    ToClient(Bytes),
    /// The client's DATA is next: the caller runs the message transaction.
    BeginData(DataMode),
    /// FilterType reject refused a DATA: log it as a rejected message.
    PolicyReject,
}

/// The transaction as the upstream accepted it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// `<>` for the null sender.
    pub sender: Option<String>,
    pub recipients: Vec<String>,
    /// XFORWARD ADDR and HELO accepted by the upstream in this transaction.
    pub remote: Option<String>,
    pub remote_helo: Option<String>,
}

#[derive(Debug)]
enum Pending {
    Greeting,
    Helo {
        ehlo: bool,
        line: Bytes,
    },
    Mail(String),
    Rcpt(String),
    Xforward {
        addr: Option<String>,
        helo: Option<String>,
    },
    Rset,
    Auth,
    Relay,
    /// Our XCLIENT; its reply is not shown to the client.
    Xclient,
    /// The client's EHLO/HELO sent again after XCLIENT reset the upstream session.
    HeloAgain,
    /// A command of our own whose reply is dropped (RSET after a reject).
    Swallow,
    /// A reply of our own, sent to the client when its turn comes.
    Local(Bytes),
    Data(DataMode),
}

impl Pending {
    fn is_upstream(&self) -> bool {
        !matches!(self, Pending::Local(_) | Pending::Data(_))
    }
}

#[derive(Debug)]
pub struct Session {
    policy: Policy,
    pending: VecDeque<Pending>,
    actions: Vec<Action>,
    envelope: Envelope,
    in_data: bool,
    auth_attempted: bool,
    authenticated: bool,
    auth_continuation: bool,
    xclient_supported: bool,
    xclient_sent: bool,
    last_helo: Option<Bytes>,
    /// A client line held back while XCLIENT is being negotiated.
    held: Option<Bytes>,
}

impl Session {
    pub fn new(policy: Policy) -> Self {
        Session {
            policy,
            pending: VecDeque::from([Pending::Greeting]),
            actions: Vec::new(),
            envelope: Envelope::default(),
            in_data: false,
            auth_attempted: false,
            authenticated: false,
            auth_continuation: false,
            xclient_supported: false,
            xclient_sent: false,
            last_helo: None,
            held: None,
        }
    }

    /// Whether the next client line may be processed now. After DATA the following bytes
    /// are the body; during the XCLIENT exchange commands wait so they reach the upstream
    /// after it.
    pub fn accepts_client_input(&self) -> bool {
        if self.in_data || self.held.is_some() {
            return false;
        }
        let waiting_for_helo = self.policy.xclient
            && !self.xclient_sent
            && self
                .pending
                .iter()
                .any(|p| matches!(p, Pending::Helo { .. }));
        !waiting_for_helo
            && !self
                .pending
                .iter()
                .any(|p| matches!(p, Pending::Data(_) | Pending::Xclient | Pending::HeloAgain))
    }

    /// Whether the upstream owes us a reply.
    pub fn awaiting_upstream(&self) -> bool {
        self.pending.iter().any(Pending::is_upstream)
    }

    /// No command is outstanding and no mail transaction has begun: safe to close with 421.
    pub fn is_idle(&self) -> bool {
        self.pending.is_empty() && !self.in_data && self.envelope.sender.is_none()
    }

    pub fn envelope(&self) -> &Envelope {
        &self.envelope
    }

    pub fn authenticated(&self) -> bool {
        self.authenticated
    }

    pub fn take_actions(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.actions)
    }

    /// The caller finished the DATA transaction (whatever its outcome).
    pub fn transaction_done(&mut self) {
        self.in_data = false;
        self.reset_transaction();
    }

    pub fn client_line_too_long(&mut self) {
        self.local_reply(REPLY_LINE_TOO_LONG);
        self.release();
    }

    pub fn client_line(&mut self, line: Bytes) {
        if self.auth_continuation {
            // The answer to a 334 challenge is data, whatever it looks like.
            self.auth_continuation = false;
            self.forward(line, Pending::Auth);
        } else if self.should_send_xclient() {
            self.send_xclient();
            self.held = Some(line);
        } else {
            self.command(line);
        }
        self.release();
    }

    fn command(&mut self, line: Bytes) {
        let skipped = self.policy.skip_authenticated && self.authenticated;
        let reject_mode = self.policy.filter_type == FilterType::Reject && !skipped;
        match command::classify(&line) {
            Verb::Data if reject_mode => {
                let reply = Bytes::from(self.policy.filter_reject_reply.clone());
                self.pending.push_back(Pending::Local(reply));
                self.forward(Bytes::from_static(b"RSET\r\n"), Pending::Swallow);
                self.actions.push(Action::PolicyReject);
                self.reset_transaction();
            }
            Verb::Data => {
                let mode = if skipped {
                    DataMode::Passthrough
                } else {
                    DataMode::Filter
                };
                self.pending.push_back(Pending::Data(mode));
            }
            Verb::Mail | Verb::Rcpt if reject_mode => {
                let reply = Bytes::from(self.policy.filter_reject_reply.clone());
                self.local_reply_bytes(reply);
                self.reset_transaction();
            }
            verb @ (Verb::Helo | Verb::Ehlo) => {
                let pending = Pending::Helo {
                    ehlo: verb == Verb::Ehlo,
                    line: line.clone(),
                };
                self.forward(line, pending);
            }
            Verb::Starttls | Verb::Bdat => self.local_reply(REPLY_NOT_IMPLEMENTED),
            Verb::Xclient => {
                tracing::warn!("client attempted use of privileged XCLIENT feature");
                self.local_reply(REPLY_XCLIENT_REFUSED);
            }
            Verb::Auth => {
                self.auth_attempted = true;
                self.forward(line, Pending::Auth);
            }
            Verb::Mail => {
                let addr = command::envelope_address(&line).unwrap_or_default();
                self.forward(line, Pending::Mail(addr));
            }
            Verb::Rcpt => {
                let addr = command::envelope_address(&line).unwrap_or_default();
                self.forward(line, Pending::Rcpt(addr));
            }
            Verb::Xforward => {
                let pending = Pending::Xforward {
                    addr: command::xforward_attribute(&line, "ADDR"),
                    helo: command::xforward_attribute(&line, "HELO"),
                };
                self.forward(line, pending);
            }
            Verb::Rset => self.forward(line, Pending::Rset),
            Verb::Quit | Verb::Other => self.forward(line, Pending::Relay),
        }
    }

    /// A complete reply from the upstream.
    pub fn upstream_reply(&mut self, reply: Reply) {
        let Some(index) = self.pending.iter().position(Pending::is_upstream) else {
            // Unsolicited (e.g. a 421 before the upstream closes): the client should see it.
            self.reply_to_client(Bytes::from(reply.raw()));
            return;
        };
        let pending = self.pending.remove(index).expect("index from position");
        let positive = reply.is_positive();
        match pending {
            Pending::Greeting => {
                if reply.code == 220 {
                    self.reply_to_client(Bytes::from(ehlo::rewrite_greeting(&reply)));
                } else {
                    self.reply_to_client(Bytes::from(reply.raw()));
                }
            }
            Pending::Helo { ehlo, line } => {
                if positive {
                    let filtered = ehlo::filter_helo_reply(&reply, ehlo);
                    // HELO clients get XCLIENT on trust, as the original does.
                    self.xclient_supported = filtered.offers_xclient || !ehlo;
                    self.last_helo = Some(line);
                    self.reset_transaction();
                    self.reply_to_client(Bytes::from(filtered.client_reply));
                } else {
                    self.reply_to_client(Bytes::from(reply.raw()));
                }
            }
            Pending::Mail(addr) => {
                if positive {
                    self.envelope.sender = Some(addr);
                }
                self.reply_to_client(Bytes::from(reply.raw()));
            }
            Pending::Rcpt(addr) => {
                if positive {
                    self.envelope.recipients.push(addr);
                }
                self.reply_to_client(Bytes::from(reply.raw()));
            }
            Pending::Xforward { addr, helo } => {
                if positive {
                    if addr.is_some() {
                        self.envelope.remote = addr;
                    }
                    if helo.is_some() {
                        self.envelope.remote_helo = helo;
                    }
                }
                self.reply_to_client(Bytes::from(reply.raw()));
            }
            Pending::Rset => {
                if positive {
                    self.reset_transaction();
                }
                self.reply_to_client(Bytes::from(reply.raw()));
            }
            Pending::Auth => {
                match reply.code {
                    334 => self.auth_continuation = true,
                    235 if self.auth_attempted => {
                        tracing::debug!("client authenticated successfully");
                        self.authenticated = true;
                    }
                    _ => {}
                }
                self.reply_to_client(Bytes::from(reply.raw()));
            }
            Pending::Relay => self.reply_to_client(Bytes::from(reply.raw())),
            Pending::Xclient => {
                match (positive, self.last_helo.clone()) {
                    (true, Some(helo)) => {
                        // XCLIENT restarts the upstream session: greet it again so that
                        // servers requiring HELO accept the following MAIL.
                        self.actions.push(Action::ToUpstream(helo));
                        self.pending.push_front(Pending::HeloAgain);
                    }
                    (positive, _) => {
                        if !positive {
                            tracing::warn!("server didn't accept XCLIENT");
                        }
                        self.resume_held();
                    }
                }
            }
            Pending::HeloAgain => self.resume_held(),
            Pending::Swallow => {}
            Pending::Local(_) | Pending::Data(_) => unreachable!("not an upstream entry"),
        }
        self.release();
    }

    fn should_send_xclient(&self) -> bool {
        self.policy.xclient
            && !self.xclient_sent
            && self.xclient_supported
            && self.policy.client_ip.is_some()
    }

    fn send_xclient(&mut self) {
        let Some(ip) = self.policy.client_ip else {
            return;
        };
        let addr = match ip {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => format!("IPV6:{v6}"),
        };
        self.xclient_sent = true;
        self.forward(
            Bytes::from(format!("XCLIENT ADDR={addr}\r\n")),
            Pending::Xclient,
        );
    }

    fn resume_held(&mut self) {
        if let Some(line) = self.held.take() {
            self.command(line);
        }
    }

    fn forward(&mut self, line: Bytes, pending: Pending) {
        self.actions.push(Action::ToUpstream(line));
        self.pending.push_back(pending);
    }

    fn local_reply(&mut self, reply: &'static [u8]) {
        self.local_reply_bytes(Bytes::from_static(reply));
    }

    fn local_reply_bytes(&mut self, reply: Bytes) {
        self.pending.push_back(Pending::Local(reply));
    }

    fn reply_to_client(&mut self, bytes: Bytes) {
        self.actions.push(Action::ToClient(bytes));
    }

    /// Sends our own replies and starts DATA once everything before them is answered.
    fn release(&mut self) {
        while let Some(front) = self.pending.front() {
            match front {
                Pending::Local(_) => {
                    if let Some(Pending::Local(reply)) = self.pending.pop_front() {
                        self.reply_to_client(reply);
                    }
                }
                Pending::Data(mode) => {
                    let mode = *mode;
                    self.pending.pop_front();
                    self.in_data = true;
                    self.actions.push(Action::BeginData(mode));
                    return;
                }
                _ => return,
            }
        }
    }

    fn reset_transaction(&mut self) {
        self.envelope = Envelope::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn policy() -> Policy {
        Policy {
            filter_type: FilterType::Pipe,
            filter_reject_reply: b"530 Email Rejected\r\n".to_vec(),
            skip_authenticated: false,
            xclient: false,
            client_ip: Some("127.0.0.1".parse().unwrap()),
        }
    }

    fn reply(text: &str) -> Reply {
        let lines: Vec<Bytes> = text
            .split('|')
            .map(|l| Bytes::from(format!("{l}\r\n")))
            .collect();
        let code = crate::smtp::reply::reply_code(&lines[lines.len() - 1]).unwrap_or(0);
        Reply { code, lines }
    }

    /// Feeds a script of events and returns the actions as readable strings.
    fn run(session: &mut Session, script: &[&str]) -> Vec<String> {
        let mut out = Vec::new();
        for step in script {
            if let Some(line) = step.strip_prefix("C: ") {
                session.client_line(Bytes::from(format!("{line}\r\n")));
            } else if let Some(text) = step.strip_prefix("S: ") {
                session.upstream_reply(reply(text));
            } else if *step == "DONE" {
                session.transaction_done();
            }
            for action in session.take_actions() {
                out.push(match action {
                    Action::ToUpstream(b) => {
                        format!(">up {}", String::from_utf8_lossy(&b).trim_end())
                    }
                    Action::ToClient(b) => format!(
                        ">cl {}",
                        String::from_utf8_lossy(&b).trim_end().replace("\r\n", "|")
                    ),
                    Action::BeginData(mode) => format!("DATA {mode:?}"),
                    Action::PolicyReject => "POLICY-REJECT".to_string(),
                });
            }
        }
        out
    }

    #[test]
    fn relays_a_transaction_and_captures_the_envelope() {
        let mut s = Session::new(policy());
        let out = run(
            &mut s,
            &[
                "S: 220 sink.example ESMTP",
                "C: EHLO client",
                "S: 250-sink.example|250-PIPELINING|250 SIZE 100",
                "C: MAIL FROM:<a@x>",
                "S: 250 ok",
                "C: RCPT TO:<b@y>",
                "S: 250 ok",
                "C: RCPT TO:<c@y>",
                "S: 550 no such user",
                "C: DATA",
            ],
        );
        assert_eq!(
            out,
            vec![
                ">cl 220 smtp.passthru",
                ">up EHLO client",
                ">cl 250-smtp.passthru|250 SIZE 100",
                ">up MAIL FROM:<a@x>",
                ">cl 250 ok",
                ">up RCPT TO:<b@y>",
                ">cl 250 ok",
                ">up RCPT TO:<c@y>",
                ">cl 550 no such user",
                "DATA Filter",
            ]
        );
        assert_eq!(s.envelope().sender.as_deref(), Some("a@x"));
        assert_eq!(s.envelope().recipients, vec!["b@y"]);
        assert!(!s.accepts_client_input());
        run(&mut s, &["DONE"]);
        assert!(s.accepts_client_input());
        assert_eq!(s.envelope(), &Envelope::default());
    }

    #[test]
    fn pipelined_commands_get_replies_in_order() {
        let mut s = Session::new(policy());
        let out = run(
            &mut s,
            &[
                "C: EHLO c",
                "C: STARTTLS",
                "S: 220 hi",
                "S: 250 sink",
                "C: MAIL FROM:<a@x>",
                "C: RCPT TO:<b@y>",
                "C: XCLIENT ADDR=1.2.3.4",
                "C: DATA",
                "S: 250 mail ok",
                "S: 250 rcpt ok",
            ],
        );
        assert_eq!(
            out,
            vec![
                ">up EHLO c",
                ">cl 220 smtp.passthru",
                ">cl 250 smtp.passthru",
                ">cl 502 Command not implemented",
                ">up MAIL FROM:<a@x>",
                ">up RCPT TO:<b@y>",
                ">cl 250 mail ok",
                ">cl 250 rcpt ok",
                ">cl 554 Insufficient authorization",
                "DATA Filter",
            ]
        );
        assert_eq!(s.envelope().recipients, vec!["b@y"]);
    }

    #[test]
    fn greeting_variants() {
        for (greeting, want) in [
            ("220 sink.example", ">cl 220 smtp.passthru"),
            (
                "220-sink.example|220 more",
                ">cl 220-smtp.passthru|220 more",
            ),
            ("554 go away", ">cl 554 go away"),
            ("421 busy", ">cl 421 busy"),
        ] {
            let mut s = Session::new(policy());
            let step = format!("S: {greeting}");
            assert_eq!(run(&mut s, &[&step]), vec![want]);
        }
    }

    #[test]
    fn reject_mode_refuses_mail_rcpt_and_data() {
        let mut s = Session::new(Policy {
            filter_type: FilterType::Reject,
            ..policy()
        });
        let out = run(
            &mut s,
            &[
                "S: 220 x",
                "C: MAIL FROM:<a@x>",
                "C: RCPT TO:<b@y>",
                "C: DATA",
                "C: NOOP",
                "S: 250 reset",
                "S: 250 noop",
            ],
        );
        assert_eq!(
            out,
            vec![
                ">cl 220 smtp.passthru",
                ">cl 530 Email Rejected",
                ">cl 530 Email Rejected",
                ">up RSET",
                "POLICY-REJECT",
                ">cl 530 Email Rejected",
                ">up NOOP",
                ">cl 250 noop",
            ]
        );
    }

    #[test]
    fn auth_success_enables_skip() {
        let mut s = Session::new(Policy {
            skip_authenticated: true,
            ..policy()
        });
        let out = run(
            &mut s,
            &[
                "S: 220 x",
                "C: AUTH LOGIN",
                "S: 334 VXNlcm5hbWU6",
                "C: DATA",
                "S: 334 UGFzc3dvcmQ6",
                "C: c2VjcmV0",
                "S: 235 ok",
                "C: DATA",
            ],
        );
        assert_eq!(out.last().unwrap(), "DATA Passthrough");
        assert!(s.authenticated());
        // The base64 answer "DATA" was forwarded as data, not taken as a command.
        assert!(out.contains(&">up DATA".to_string()));
    }

    #[test]
    fn stray_235_does_not_authenticate() {
        let mut s = Session::new(policy());
        run(&mut s, &["S: 220 x", "C: NOOP", "S: 235 ok"]);
        assert!(!s.authenticated());
    }

    #[test]
    fn xclient_is_sent_once_before_the_next_command_and_helo_repeated() {
        let mut s = Session::new(Policy {
            xclient: true,
            ..policy()
        });
        let out = run(
            &mut s,
            &[
                "S: 220 x",
                "C: EHLO c",
                "S: 250-x|250 XCLIENT ADDR NAME",
                "C: MAIL FROM:<a@x>",
                "S: 220 again",
                "S: 250 hello again",
                "S: 250 2.1.0 Ok",
                "C: RCPT TO:<b@y>",
            ],
        );
        assert_eq!(
            out,
            vec![
                ">cl 220 smtp.passthru",
                ">up EHLO c",
                ">cl 250-smtp.passthru|250 XFILTERED",
                ">up XCLIENT ADDR=127.0.0.1",
                ">up EHLO c",
                ">up MAIL FROM:<a@x>",
                ">cl 250 2.1.0 Ok",
                ">up RCPT TO:<b@y>",
            ]
        );
    }

    #[test]
    fn xclient_not_sent_when_not_offered() {
        let mut s = Session::new(Policy {
            xclient: true,
            ..policy()
        });
        let out = run(
            &mut s,
            &["S: 220 x", "C: EHLO c", "S: 250 x", "C: MAIL FROM:<a@x>"],
        );
        assert!(!out.iter().any(|l| l.contains("XCLIENT")));
    }

    #[test]
    fn xforward_values_captured_only_when_accepted() {
        let mut s = Session::new(policy());
        run(
            &mut s,
            &[
                "S: 220 x",
                "C: XFORWARD NAME=spike ADDR=168.100.189.2",
                "S: 250 ok",
                "C: XFORWARD HELO=spike.example",
                "S: 550 no",
            ],
        );
        assert_eq!(s.envelope().remote.as_deref(), Some("168.100.189.2"));
        assert_eq!(s.envelope().remote_helo, None);
    }

    #[test]
    fn long_line_answered_in_turn() {
        let mut s = Session::new(policy());
        run(&mut s, &["S: 220 x", "C: NOOP"]);
        s.client_line_too_long();
        let mut out: Vec<String> = s.take_actions().iter().map(|a| format!("{a:?}")).collect();
        assert!(out.is_empty(), "500 must wait for the NOOP reply: {out:?}");
        out = run(&mut s, &["S: 250 noop"]);
        assert_eq!(out, vec![">cl 250 noop", ">cl 500 Line too long"]);
    }

    #[test]
    fn unsolicited_reply_is_relayed() {
        let mut s = Session::new(policy());
        let out = run(&mut s, &["S: 220 x", "S: 421 shutting down"]);
        assert_eq!(out, vec![">cl 220 smtp.passthru", ">cl 421 shutting down"]);
    }
}
