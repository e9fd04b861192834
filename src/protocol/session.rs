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
//!
//! Commands reach the upstream one at a time: the next is sent only when the reply to the
//! previous one has arrived (the proxy offers no PIPELINING, and the client may pipeline
//! anyway). A reply can so only ever be matched to the command it answers; a reply that
//! arrives when no command is outstanding is a protocol error
//! ([`Action::UpstreamProtocolError`]), except a `421`, which a server may send at any
//! time before it closes.
//!
//! Command lines are checked before anything is relayed: a bare CR, a line ended by a bare
//! LF or a NUL gets `500 5.5.2` (RFC 5321 §2.3.8), and a MAIL/RCPT parameter of an
//! extension the proxy hides gets `555`.
//!
//! STARTTLS (RFC 3207) is decided here too: it is offered and accepted only when the proxy
//! has a certificate ([`TlsPolicy`]); its `220` waits for its turn like any reply, then
//! [`Action::StartTls`] tells the caller to throw away whatever the client sent after the
//! command (the STARTTLS command-injection attack) and to run the handshake. After
//! [`Session::tls_established`] the session starts over: nothing learnt before TLS is kept,
//! and the upstream is told to forget its transaction too.

use std::collections::VecDeque;
use std::net::IpAddr;

use bytes::Bytes;

use crate::config::FilterType;
use crate::protocol::command::{self, Verb};
use crate::protocol::ehlo;
use crate::protocol::reply::Reply;

pub const REPLY_LINE_TOO_LONG: &[u8] = b"500 Line too long\r\n";
pub const REPLY_FORBIDDEN_BYTES: &[u8] =
    b"500 5.5.2 Syntax error: bare CR, bare LF or NUL in command\r\n";
pub const REPLY_NOT_IMPLEMENTED: &[u8] = b"502 Command not implemented\r\n";
pub const REPLY_XCLIENT_REFUSED: &[u8] = b"554 Insufficient authorization\r\n";
pub const REPLY_READY_TO_START_TLS: &[u8] = b"220 2.0.0 Ready to start TLS\r\n";
pub const REPLY_TLS_REQUIRED: &[u8] = b"530 5.7.0 Must issue a STARTTLS command first\r\n";
pub const REPLY_TLS_ACTIVE: &[u8] = b"503 5.5.1 TLS already active\r\n";
pub const REPLY_STARTTLS_SYNTAX: &[u8] = b"501 5.5.4 Syntax error (no parameters allowed)\r\n";
/// Commands accepted from the client but not yet answered; beyond this the client is not
/// read until the upstream catches up (TCP backpressure instead of memory).
const MAX_QUEUED: usize = 1024;

/// The greeting when the proxy read the upstream's own (to start TLS with it).
pub const REPLY_GREETING: &[u8] = b"220 smtp.passthru\r\n";

/// What the session needs to know of the configuration.
#[derive(Debug, Clone)]
pub struct Policy {
    pub filter_type: FilterType,
    /// The formatted FilterReject reply, with CRLF.
    pub filter_reject_reply: Bytes,
    pub skip_authenticated: bool,
    pub xclient: bool,
    /// The client's address, for XCLIENT; `None` for unix-socket clients.
    pub client_ip: Option<IpAddr>,
}

/// TLS towards the client, as far as the session is concerned.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TlsPolicy {
    /// A certificate is loaded: STARTTLS is advertised and accepted.
    pub offer_starttls: bool,
    /// `TlsRequired`: MAIL, RCPT, DATA and AUTH before TLS are refused with 530.
    pub required: bool,
    /// The connection is TLS from its first byte (the implicit-TLS listener).
    pub implicit: bool,
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
    /// The client's STARTTLS was answered `220` (in the actions before this one): discard
    /// every client byte received after the STARTTLS line, run the TLS handshake, then call
    /// [`Session::tls_established`], or end the connection if the handshake fails.
    StartTls,
    /// The upstream sent a reply when no command of ours was outstanding: it is out of
    /// step (or hostile). The caller closes the upstream and answers the client with a 4xx.
    UpstreamProtocolError(String),
    /// With [`Session::set_check_envelope`] on: the client's MAIL or RCPT is held before
    /// it goes upstream, and no further client line is taken, until the caller calls
    /// [`Session::envelope_checked`] (to relay it, or to refuse it with its own reply).
    CheckEnvelope {
        command: EnvelopeCommand,
        line: Bytes,
    },
}

/// The envelope command of [`Action::CheckEnvelope`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvelopeCommand {
    Mail,
    Rcpt,
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
    /// The client's STARTTLS, answered when its turn comes.
    StartTls,
}

impl Pending {
    fn is_upstream(&self) -> bool {
        !matches!(
            self,
            Pending::Local(_) | Pending::Data(_) | Pending::StartTls
        )
    }
}

#[derive(Debug)]
pub struct Session {
    policy: Policy,
    pending: VecDeque<Pending>,
    /// Command lines whose turn to go upstream has not come yet (their entries are in
    /// `pending`, after the one in flight).
    unsent: VecDeque<Bytes>,
    /// A command (or the greeting) has been sent and its reply has not arrived.
    awaiting_reply: bool,
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
    /// Hold MAIL and RCPT for [`Action::CheckEnvelope`].
    check_envelope: bool,
    /// The MAIL or RCPT held for its check, and what it becomes once relayed.
    checking: Option<(Bytes, Pending)>,
    tls: TlsPolicy,
    tls_active: bool,
    /// Between our `220` to STARTTLS and the end of the handshake.
    tls_handshake: bool,
}

impl Session {
    pub fn new(policy: Policy) -> Self {
        Session::with_tls(policy, TlsPolicy::default())
    }

    pub fn with_tls(policy: Policy, tls: TlsPolicy) -> Self {
        Session {
            policy,
            pending: VecDeque::from([Pending::Greeting]),
            unsent: VecDeque::new(),
            awaiting_reply: true,
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
            check_envelope: false,
            checking: None,
            tls,
            tls_active: tls.implicit,
            tls_handshake: false,
        }
    }

    /// The proxy read the upstream's `220` greeting itself (to start TLS with it before
    /// relaying): the client is greeted at once.
    pub fn upstream_greeted(&mut self) {
        if matches!(self.pending.front(), Some(Pending::Greeting)) {
            self.pending.pop_front();
            self.awaiting_reply = false;
            self.reply_to_client(Bytes::from_static(REPLY_GREETING));
            self.send_next();
        }
    }

    /// Whether the client is speaking TLS.
    pub fn tls_active(&self) -> bool {
        self.tls_active
    }

    /// The TLS handshake after [`Action::StartTls`] succeeded. As RFC 3207 requires, the
    /// session returns to its state after the greeting: everything the client said before
    /// (EHLO, the transaction, AUTH) is forgotten, and the upstream is told RSET so that a
    /// transaction begun in clear text cannot be continued under TLS.
    pub fn tls_established(&mut self) {
        self.tls_handshake = false;
        self.tls_active = true;
        self.envelope = Envelope::default();
        self.auth_attempted = false;
        self.authenticated = false;
        self.auth_continuation = false;
        self.last_helo = None;
        self.forward(Bytes::from_static(b"RSET\r\n"), Pending::Swallow);
    }

    /// Whether the next client line may be processed now. After DATA the following bytes
    /// are the body; during the XCLIENT exchange commands wait so they reach the upstream
    /// after it.
    pub fn accepts_client_input(&self) -> bool {
        if self.in_data || self.held.is_some() || self.tls_handshake || self.checking.is_some() {
            return false;
        }
        let waiting_for_helo = self.policy.xclient
            && !self.xclient_sent
            && self
                .pending
                .iter()
                .any(|p| matches!(p, Pending::Helo { .. }));
        !waiting_for_helo
            && self.pending.len() < MAX_QUEUED
            && !self.pending.iter().any(|p| {
                matches!(
                    p,
                    Pending::Data(_) | Pending::Xclient | Pending::HeloAgain | Pending::StartTls
                )
            })
    }

    /// Whether the upstream's greeting is still awaited (for the error's stage).
    pub fn awaiting_greeting(&self) -> bool {
        self.pending.iter().any(|p| matches!(p, Pending::Greeting))
    }

    /// Whether the upstream owes us a reply.
    pub fn awaiting_upstream(&self) -> bool {
        self.pending.iter().any(Pending::is_upstream)
    }

    /// No command is outstanding and no mail transaction has begun: safe to close with 421.
    pub fn is_idle(&self) -> bool {
        self.pending.is_empty()
            && !self.in_data
            && self.envelope.sender.is_none()
            && self.checking.is_none()
    }

    /// The argument of the client's last accepted HELO or EHLO.
    pub fn helo_name(&self) -> Option<&[u8]> {
        let line = crate::protocol::line::trim_line_end(self.last_helo.as_deref()?);
        let arg = line.splitn(2, |&b| b == b' ').nth(1)?;
        let arg = arg.trim_ascii();
        (!arg.is_empty()).then_some(arg)
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

    /// Hands back an emptied [`Session::take_actions`] vector, so that the next actions
    /// reuse its allocation.
    pub fn return_actions(&mut self, mut emptied: Vec<Action>) {
        if self.actions.is_empty() {
            emptied.clear();
            self.actions = emptied;
        }
    }

    /// Holds each MAIL and RCPT for a check before it goes upstream
    /// ([`Action::CheckEnvelope`]); off by default.
    pub fn set_check_envelope(&mut self, on: bool) {
        self.check_envelope = on;
    }

    /// The check of [`Action::CheckEnvelope`] is done: `None` relays the held command,
    /// `Some(reply)` (a complete reply, CRLF included) answers it instead, and it is not
    /// relayed. Client lines are taken again.
    pub fn envelope_checked(&mut self, refusal: Option<Bytes>) {
        let Some((line, pending)) = self.checking.take() else {
            return;
        };
        match refusal {
            None => self.forward(line, pending),
            Some(reply) => self.local_reply_bytes(reply),
        }
        self.release();
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
        if command::has_forbidden_bytes(&line) {
            if self.auth_continuation {
                // The upstream waits for the answer to its challenge: cancel the exchange
                // (RFC 4954: `*`), so its 501 answers the client and both stay in step.
                self.auth_continuation = false;
                self.forward(Bytes::from_static(b"*\r\n"), Pending::Auth);
            } else {
                self.local_reply(REPLY_FORBIDDEN_BYTES);
            }
        } else if self.auth_continuation {
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
        let tls_missing = self.tls.required && !self.tls_active;
        match command::classify(&line) {
            Verb::Mail | Verb::Rcpt | Verb::Data | Verb::Auth if tls_missing => {
                self.local_reply(REPLY_TLS_REQUIRED)
            }
            Verb::Starttls if self.tls_active => self.local_reply(REPLY_TLS_ACTIVE),
            Verb::Starttls if self.tls.offer_starttls => {
                if has_parameters(&line) {
                    self.local_reply(REPLY_STARTTLS_SYNTAX);
                } else {
                    self.pending.push_back(Pending::StartTls);
                }
            }
            Verb::Data if reject_mode => {
                let reply = self.policy.filter_reject_reply.clone();
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
                let reply = self.policy.filter_reject_reply.clone();
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
            Verb::Mail | Verb::Rcpt if command::hidden_parameter(&line).is_some() => {
                let param = command::hidden_parameter(&line).unwrap_or_default();
                let shown: String = param.chars().take(64).collect();
                let reply = format!("555 5.5.4 Unsupported parameter: {shown}\r\n");
                self.local_reply_bytes(Bytes::from(reply));
            }
            // `Skip: authenticated` skips the milters as it skips the filter.
            verb @ (Verb::Mail | Verb::Rcpt)
                if self.check_envelope
                    && !(self.policy.skip_authenticated && self.authenticated) =>
            {
                let addr = command::envelope_address(&line).unwrap_or_default();
                let (command, pending) = if verb == Verb::Mail {
                    (EnvelopeCommand::Mail, Pending::Mail(addr))
                } else {
                    (EnvelopeCommand::Rcpt, Pending::Rcpt(addr))
                };
                self.checking = Some((line.clone(), pending));
                self.actions.push(Action::CheckEnvelope { command, line });
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
        let index = match self.pending.iter().position(Pending::is_upstream) {
            Some(index) if self.awaiting_reply => index,
            _ if reply.code == 421 => {
                // A server may announce its closing at any time: the client should see it.
                self.reply_to_client(reply.bytes());
                return;
            }
            _ => {
                self.actions.push(Action::UpstreamProtocolError(format!(
                    "protocol error: reply {} with no command outstanding",
                    reply.code
                )));
                return;
            }
        };
        self.awaiting_reply = false;
        let pending = self.pending.remove(index).expect("index from position");
        let positive = reply.is_positive();
        match pending {
            Pending::Greeting => {
                if reply.code == 220 {
                    self.reply_to_client(Bytes::from(ehlo::rewrite_greeting(&reply)));
                } else {
                    self.reply_to_client(reply.bytes());
                }
            }
            Pending::Helo { ehlo, line } => {
                if positive {
                    let offer_starttls = self.tls.offer_starttls && !self.tls_active;
                    let filtered = ehlo::filter_helo_reply(&reply, ehlo, offer_starttls);
                    // HELO clients get XCLIENT on trust, as the original does.
                    self.xclient_supported = filtered.offers_xclient || !ehlo;
                    self.last_helo = Some(line);
                    self.reset_transaction();
                    self.reply_to_client(Bytes::from(filtered.client_reply));
                } else {
                    self.reply_to_client(reply.bytes());
                }
            }
            Pending::Mail(addr) => {
                if positive {
                    self.envelope.sender = Some(addr);
                }
                self.reply_to_client(reply.bytes());
            }
            Pending::Rcpt(addr) => {
                if positive {
                    self.envelope.recipients.push(addr);
                }
                self.reply_to_client(reply.bytes());
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
                self.reply_to_client(reply.bytes());
            }
            Pending::Rset => {
                if positive {
                    self.reset_transaction();
                }
                self.reply_to_client(reply.bytes());
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
                self.reply_to_client(reply.bytes());
            }
            Pending::Relay => self.reply_to_client(reply.bytes()),
            Pending::Xclient => {
                match (positive, self.last_helo.clone()) {
                    (true, Some(helo)) => {
                        // XCLIENT restarts the upstream session: greet it again so that
                        // servers requiring HELO accept the following MAIL.
                        self.actions.push(Action::ToUpstream(helo));
                        self.pending.push_front(Pending::HeloAgain);
                        self.awaiting_reply = true;
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
            Pending::Local(_) | Pending::Data(_) | Pending::StartTls => {
                unreachable!("not an upstream entry")
            }
        }
        self.send_next();
        self.release();
    }

    /// Sends the next queued command once the previous one is answered.
    fn send_next(&mut self) {
        if !self.awaiting_reply {
            if let Some(line) = self.unsent.pop_front() {
                self.awaiting_reply = true;
                self.actions.push(Action::ToUpstream(line));
            }
        }
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
        self.pending.push_back(pending);
        if self.awaiting_reply {
            self.unsent.push_back(line);
        } else {
            self.awaiting_reply = true;
            self.actions.push(Action::ToUpstream(line));
        }
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
                Pending::StartTls => {
                    self.pending.pop_front();
                    self.tls_handshake = true;
                    self.reply_to_client(Bytes::from_static(REPLY_READY_TO_START_TLS));
                    self.actions.push(Action::StartTls);
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

/// Whether a command line has anything after its verb.
fn has_parameters(line: &[u8]) -> bool {
    let text = crate::protocol::line::trim_line_end(line);
    let start = text
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(text.len());
    text[start..]
        .iter()
        .position(|b| b.is_ascii_whitespace())
        .is_some_and(|end| text[start + end..].iter().any(|b| !b.is_ascii_whitespace()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn policy() -> Policy {
        Policy {
            filter_type: FilterType::Pipe,
            filter_reject_reply: Bytes::from_static(b"530 Email Rejected\r\n"),
            skip_authenticated: false,
            xclient: false,
            client_ip: Some("127.0.0.1".parse().unwrap()),
        }
    }

    fn reply(text: &str) -> Reply {
        Reply::scripted(text)
    }

    /// Feeds a script of events and returns the actions as readable strings.
    fn run(session: &mut Session, script: &[&str]) -> Vec<String> {
        let mut out = Vec::new();
        for step in script {
            if *step == "TLS" {
                session.tls_established();
            } else if let Some(line) = step.strip_prefix("C: ") {
                session.client_line(Bytes::from(format!("{line}\r\n")));
            } else if let Some(text) = step.strip_prefix("S: ") {
                session.upstream_reply(reply(text));
            } else if *step == "DONE" {
                session.transaction_done();
            } else if *step == "CHECKED" {
                session.envelope_checked(None);
            } else if let Some(reply) = step.strip_prefix("REFUSE: ") {
                session.envelope_checked(Some(Bytes::from(format!("{reply}\r\n"))));
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
                    Action::StartTls => "START-TLS".to_string(),
                    Action::UpstreamProtocolError(e) => format!("PROTOCOL-ERROR {e}"),
                    Action::CheckEnvelope { command, line } => format!(
                        "CHECK {command:?} {}",
                        String::from_utf8_lossy(&line).trim_end()
                    ),
                });
            }
        }
        out
    }

    /// With the envelope check on, MAIL and RCPT wait for it; a refused one is answered with
    /// the check's reply and never relayed, the others go on.
    #[test]
    fn envelope_check_holds_mail_and_rcpt() {
        let mut s = Session::new(policy());
        s.set_check_envelope(true);
        let out = run(
            &mut s,
            &[
                "S: 220 sink.example ESMTP",
                "C: EHLO client",
                "S: 250 sink.example",
                "C: MAIL FROM:<a@x>",
                "CHECKED",
                "S: 250 ok",
                "C: RCPT TO:<b@y>",
                "REFUSE: 550 5.7.1 Command rejected",
                "C: RCPT TO:<c@y>",
                "CHECKED",
                "S: 250 ok",
                "C: MAIL FROM:<d@x>",
            ],
        );
        assert_eq!(
            out,
            vec![
                ">cl 220 smtp.passthru",
                ">up EHLO client",
                ">cl 250 smtp.passthru",
                "CHECK Mail MAIL FROM:<a@x>",
                ">up MAIL FROM:<a@x>",
                ">cl 250 ok",
                "CHECK Rcpt RCPT TO:<b@y>",
                ">cl 550 5.7.1 Command rejected",
                "CHECK Rcpt RCPT TO:<c@y>",
                ">up RCPT TO:<c@y>",
                ">cl 250 ok",
                "CHECK Mail MAIL FROM:<d@x>",
            ]
        );
        assert_eq!(s.envelope().recipients, ["c@y"]);
        assert!(
            !s.accepts_client_input(),
            "a held command stops client input"
        );
        assert!(!s.is_idle());
        s.envelope_checked(Some(Bytes::from_static(b"451 4.7.1 later\r\n")));
        assert!(s.accepts_client_input());
        assert_eq!(
            s.take_actions(),
            [Action::ToClient(Bytes::from_static(b"451 4.7.1 later\r\n"))]
        );
        // Off (the default), nothing is held.
        let mut s = Session::new(policy());
        let out = run(&mut s, &["S: 220 sink.example ESMTP", "C: MAIL FROM:<a@x>"]);
        assert_eq!(out, [">cl 220 smtp.passthru", ">up MAIL FROM:<a@x>"]);
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
        // One command at a time upstream: EHLO waits for the greeting, RCPT for MAIL's reply.
        assert_eq!(
            out,
            vec![
                ">cl 220 smtp.passthru",
                ">up EHLO c",
                ">cl 250 smtp.passthru",
                ">cl 502 Command not implemented",
                ">up MAIL FROM:<a@x>",
                ">cl 250 mail ok",
                ">up RCPT TO:<b@y>",
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

    /// `Skip: authenticated` skips the milters' envelope check as it skips the filter.
    #[test]
    fn authenticated_clients_skip_the_envelope_check() {
        let mut s = Session::new(Policy {
            skip_authenticated: true,
            ..policy()
        });
        s.set_check_envelope(true);
        let out = run(
            &mut s,
            &[
                "S: 220 x",
                "C: MAIL FROM:<a@x>",
                "CHECKED",
                "S: 250 ok",
                "C: AUTH PLAIN AGEAcw==",
                "S: 235 ok",
                "C: MAIL FROM:<b@x>",
            ],
        );
        assert_eq!(out[1], "CHECK Mail MAIL FROM:<a@x>");
        assert_eq!(out.last().unwrap(), ">up MAIL FROM:<b@x>");
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

    #[test]
    fn a_reply_is_matched_only_to_the_command_it_answers() {
        // (script, what the last step must produce)
        let cases: &[(&[&str], &[&str])] = &[
            // An extra reply after the greeting, before any command.
            (
                &["S: 220 x", "S: 250 early"],
                &["PROTOCOL-ERROR protocol error: reply 250 with no command outstanding"],
            ),
            // Two replies to one command: the second is not the next command's.
            (
                &[
                    "S: 220 x",
                    "C: EHLO c",
                    "S: 250 x",
                    "C: MAIL FROM:<a@x>",
                    "S: 250 ok",
                    "S: 250 ok",
                ],
                &["PROTOCOL-ERROR protocol error: reply 250 with no command outstanding"],
            ),
            // A reply to a command the client has sent but the proxy has not relayed yet.
            (
                &[
                    "C: EHLO c",
                    "C: MAIL FROM:<a@x>",
                    "S: 220 x",
                    "S: 250 x",
                    "S: 250 ok",
                    "S: 554 no",
                ],
                &["PROTOCOL-ERROR protocol error: reply 554 with no command outstanding"],
            ),
        ];
        for (script, want) in cases {
            let mut s = Session::new(policy());
            let (last, before) = script.split_last().unwrap();
            run(&mut s, before);
            assert_eq!(run(&mut s, &[last]), *want, "{script:?}");
        }
    }

    #[test]
    fn command_lines_with_forbidden_bytes_are_answered_and_never_relayed() {
        for line in [
            "RCPT TO:<a@x>\rRCPT TO:<b@y>\r\n",
            "RCPT TO:<a@x>\n",
            "MAIL FROM:<a\0b@x>\r\n",
        ] {
            let mut s = Session::new(policy());
            run(&mut s, &["S: 220 x", "C: EHLO c", "S: 250 x"]);
            s.client_line(Bytes::from(line));
            let out: Vec<Action> = s.take_actions();
            assert_eq!(
                out,
                vec![Action::ToClient(Bytes::from_static(REPLY_FORBIDDEN_BYTES))],
                "{line:?}"
            );
            // Still in step: the next command goes through.
            let out = run(&mut s, &["C: MAIL FROM:<a@x>", "S: 250 ok"]);
            assert_eq!(out, vec![">up MAIL FROM:<a@x>", ">cl 250 ok"], "{line:?}");
        }
        // The answer to an AUTH challenge with a NUL cancels the exchange upstream.
        let mut s = Session::new(policy());
        run(
            &mut s,
            &[
                "S: 220 x",
                "C: EHLO c",
                "S: 250 x",
                "C: AUTH PLAIN",
                "S: 334 ",
            ],
        );
        s.client_line(Bytes::from_static(b"AG\0Fi\r\n"));
        let out: Vec<Action> = s.take_actions();
        assert_eq!(out, vec![Action::ToUpstream(Bytes::from_static(b"*\r\n"))]);
        let out = run(&mut s, &["S: 501 5.7.0 cancelled"]);
        assert_eq!(out, vec![">cl 501 5.7.0 cancelled"]);
    }

    #[test]
    fn parameters_of_hidden_extensions_get_555() {
        let mut s = Session::new(policy());
        let out = run(
            &mut s,
            &[
                "S: 220 x",
                "C: EHLO c",
                "S: 250-x|250-BINARYMIME|250 CHUNKING",
                "C: MAIL FROM:<a@x> BODY=BINARYMIME",
                "C: MAIL FROM:<a@x> BODY=8BITMIME",
                "S: 250 ok",
            ],
        );
        assert_eq!(
            out,
            vec![
                ">cl 220 smtp.passthru",
                ">up EHLO c",
                ">cl 250-smtp.passthru|250 XFILTERED",
                ">cl 555 5.5.4 Unsupported parameter: BODY=BINARYMIME",
                ">up MAIL FROM:<a@x> BODY=8BITMIME",
                ">cl 250 ok",
            ]
        );
    }

    fn tls(offer: bool, required: bool, implicit: bool) -> TlsPolicy {
        TlsPolicy {
            offer_starttls: offer,
            required,
            implicit,
        }
    }

    #[test]
    fn starttls_restarts_the_session() {
        let mut s = Session::with_tls(policy(), tls(true, false, false));
        let out = run(
            &mut s,
            &[
                "S: 220 x",
                "C: EHLO c",
                "S: 250-x|250 SIZE 10",
                "C: MAIL FROM:<a@x>",
                "S: 250 ok",
                "C: STARTTLS",
            ],
        );
        assert_eq!(
            out[out.len() - 2..],
            [">cl 220 2.0.0 Ready to start TLS", "START-TLS"]
        );
        assert_eq!(out[2], ">cl 250-smtp.passthru|250-SIZE 10|250 STARTTLS");
        assert!(
            !s.accepts_client_input(),
            "nothing is read until the handshake is done"
        );
        assert_eq!(s.envelope().sender.as_deref(), Some("a@x"));
        let out = run(
            &mut s,
            &[
                "TLS",
                "C: EHLO c",
                "S: 250 reset",
                "S: 250-x|250 SIZE 10",
                "C: STARTTLS",
                "C: RCPT TO:<b@y>",
                "S: 503 need MAIL",
            ],
        );
        assert_eq!(
            out,
            vec![
                ">up RSET",
                ">up EHLO c",
                ">cl 250-smtp.passthru|250 SIZE 10",
                ">cl 503 5.5.1 TLS already active",
                ">up RCPT TO:<b@y>",
                ">cl 503 need MAIL",
            ]
        );
        assert!(s.tls_active());
        assert_eq!(s.envelope(), &Envelope::default());
    }

    #[test]
    fn starttls_waits_for_earlier_replies_and_blocks_later_commands() {
        let mut s = Session::with_tls(policy(), tls(true, false, false));
        run(&mut s, &["S: 220 x"]);
        s.client_line(Bytes::from_static(b"NOOP\r\n"));
        assert!(s.accepts_client_input());
        s.client_line(Bytes::from_static(b"STARTTLS\r\n"));
        assert!(!s.accepts_client_input(), "lines after STARTTLS must wait");
        let out = run(&mut s, &["S: 250 noop"]);
        assert_eq!(
            out,
            vec![
                ">up NOOP",
                ">cl 250 noop",
                ">cl 220 2.0.0 Ready to start TLS",
                "START-TLS"
            ]
        );
        assert!(!s.accepts_client_input());
        assert!(!s.awaiting_upstream());
    }

    #[test]
    fn starttls_answers() {
        let cases: &[(TlsPolicy, &str, &str)] = &[
            (
                tls(false, false, false),
                "STARTTLS",
                ">cl 502 Command not implemented",
            ),
            (
                tls(true, false, false),
                "STARTTLS now",
                ">cl 501 5.5.4 Syntax error (no parameters allowed)",
            ),
            (
                tls(true, false, false),
                " starttls \t",
                ">cl 220 2.0.0 Ready to start TLS",
            ),
            (
                tls(false, false, true),
                "STARTTLS",
                ">cl 503 5.5.1 TLS already active",
            ),
        ];
        for (t, line, want) in cases {
            let mut s = Session::with_tls(policy(), *t);
            let out = run(&mut s, &["S: 220 x", &format!("C: {line}")]);
            assert_eq!(out[1], *want, "{line:?} with {t:?}");
        }
    }

    #[test]
    fn required_tls_refuses_the_transaction_before_starttls() {
        let mut s = Session::with_tls(policy(), tls(true, true, false));
        let out = run(
            &mut s,
            &[
                "S: 220 x",
                "C: EHLO c",
                "S: 250 x",
                "C: MAIL FROM:<a@x>",
                "C: RCPT TO:<b@y>",
                "C: DATA",
                "C: AUTH PLAIN AGFiAGM=",
                "C: NOOP",
                "S: 250 noop",
                "C: STARTTLS",
                "TLS",
                "C: MAIL FROM:<a@x>",
                "S: 250 reset",
                "S: 250 ok",
            ],
        );
        let refused = ">cl 530 5.7.0 Must issue a STARTTLS command first";
        assert_eq!(
            out,
            vec![
                ">cl 220 smtp.passthru",
                ">up EHLO c",
                ">cl 250-smtp.passthru|250 STARTTLS",
                refused,
                refused,
                refused,
                refused,
                ">up NOOP",
                ">cl 250 noop",
                ">cl 220 2.0.0 Ready to start TLS",
                "START-TLS",
                ">up RSET",
                ">up MAIL FROM:<a@x>",
                ">cl 250 ok",
            ]
        );
        // Implicit TLS satisfies the requirement from the start.
        let mut s = Session::with_tls(policy(), tls(false, true, true));
        let out = run(
            &mut s,
            &[
                "S: 220 x",
                "C: EHLO c",
                "S: 250-x|250 STARTTLS",
                "C: MAIL FROM:<a@x>",
            ],
        );
        assert_eq!(
            out[2..],
            [">cl 250-smtp.passthru|250 XFILTERED", ">up MAIL FROM:<a@x>"]
        );
    }

    #[test]
    fn starttls_forgets_authentication() {
        let mut s = Session::with_tls(
            Policy {
                skip_authenticated: true,
                ..policy()
            },
            tls(true, false, false),
        );
        run(&mut s, &["S: 220 x", "C: AUTH PLAIN AGFiAGM=", "S: 235 ok"]);
        assert!(s.authenticated());
        run(&mut s, &["C: STARTTLS", "TLS"]);
        assert!(!s.authenticated());
    }

    #[test]
    fn greeting_read_by_the_proxy() {
        let mut s = Session::new(policy());
        s.upstream_greeted();
        let out = run(&mut s, &["C: EHLO c", "S: 250 x"]);
        assert_eq!(
            out,
            vec![
                ">cl 220 smtp.passthru",
                ">up EHLO c",
                ">cl 250 smtp.passthru"
            ]
        );
    }

    #[test]
    fn parameters() {
        for (line, want) in [
            (&b"STARTTLS\r\n"[..], false),
            (b"STARTTLS \r\n", false),
            (b"  STARTTLS\t \n", false),
            (b"STARTTLS x\r\n", true),
            (b"STARTTLS\tx", true),
            (b"", false),
        ] {
            assert_eq!(has_parameters(line), want, "{line:?}");
        }
    }
}
