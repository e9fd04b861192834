//! The relay core: one connection's command phase, without I/O.
//!
//! [`Relay`] owns what both sides have sent and not yet been taken (the client's bytes and
//! the upstream's), the line readers and the reply assembler, the [`Session`] state machine,
//! and the rules that are not the session's but the connection's: what happens to a line
//! the client left unfinished when it closed, when the connection ends after either side
//! closed, when a draining proxy may close an idle session, which side's deadline runs, and
//! that the client's bytes after STARTTLS are thrown away unread.
//!
//! The caller moves bytes: it appends what it reads to [`Relay::client_buf`] or
//! [`Relay::upstream_buf`] (or reports a close), then takes [`Step`]s from
//! [`Relay::next_step`] and carries each out, in order, until there is none; then it waits
//! for what [`Relay::wants`] names, or its deadline. The same loop runs in the proxy and in
//! the session fuzz target. Time is passed in, never read here.
//!
//! The body of a message is the transaction's: at [`Step::BeginData`] the caller runs it
//! (taking its bytes from the same buffers and its replies from [`Relay::next_reply`]), then
//! calls [`Relay::transaction_done`]. A stage that must wait for a verdict before a command
//! goes upstream (a milter, a hook) is such a step too: nothing more is taken from the
//! client until the caller has carried out the step and asks for the next.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::line::{Framed, LineReader, COMMAND_LINE_LIMIT};
use super::reply::{Reply, ReplyAssembler, ReplyError};
use super::session::{Action, DataMode, Envelope, EnvelopeCommand, Session};

/// Upstream reply lines are limited far above what any server sends (RFC 5321 says 512).
pub const REPLY_LINE_LIMIT: usize = 16 * 1024;

/// What the caller must do next.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    ToClient(Bytes),
    /// A command (or the proxy's own) whose reply comes next: the upstream must not have
    /// said anything before it (see [`Relay::stage`] for the error's stage).
    ToUpstream(Bytes),
    /// The client's STARTTLS was answered: its bytes received after the command (this
    /// many) have been discarded; run the handshake, then call [`Relay::tls_established`]
    /// (or end the connection when it fails).
    StartTls {
        discarded: usize,
    },
    /// The client's DATA is next: run the message transaction, then call
    /// [`Relay::transaction_done`].
    BeginData(DataMode),
    /// FilterType reject refused a DATA: log it as a rejected message.
    PolicyReject,
    /// With [`Relay::check_envelope`] on, the client's MAIL or RCPT waits for a verdict
    /// (a milter's) before it goes upstream: get it, then call [`Relay::envelope_checked`].
    CheckEnvelope {
        command: EnvelopeCommand,
        line: Bytes,
    },
    /// A client command line taken (only when asked for with [`Relay::trace_client_lines`],
    /// for the debug trace).
    ClientLine(Bytes),
    /// An upstream reply with this code was taken at this stage (for latency metrics).
    Replied {
        stage: Stage,
        code: u16,
    },
    /// The connection is over; nothing more will come.
    End(End),
}

/// Which part of the conversation with the upstream a failure belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Greeting,
    Command,
}

/// Why the connection ends.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// The client left with nothing owed to it, or the upstream closed owing nothing.
    Done,
    /// The client did not send its next command line in time.
    ClientTimeout,
    /// The upstream failed (closed, timed out, sent what is not a reply); the client is
    /// owed an answer.
    Upstream { stage: Stage, reason: String },
    /// The upstream spoke out of turn: nothing it says can be matched to a command any more.
    UpstreamProtocol { stage: Stage, reason: String },
    /// The proxy is draining and the session is idle.
    Shutdown,
}

/// What the caller waits for when there is no step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wants {
    /// Read from the client (the upstream is always read: a close or an unsolicited reply
    /// must be seen).
    pub client: bool,
    /// When to call [`Relay::timed_out`]: the upstream's deadline while it owes a reply,
    /// otherwise the client's.
    pub deadline: Instant,
}

/// The side whose clock restarts once the step just handed out has been carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Restart {
    None,
    Client,
    Upstream,
}

#[derive(Debug)]
pub struct Relay {
    session: Session,
    /// Client bytes received and not yet taken (the caller appends; the transaction reads
    /// the body from here too).
    pub client_buf: BytesMut,
    /// The client closed its side (or its connection failed).
    pub client_eof: bool,
    client_lines: LineReader,
    /// Upstream bytes received and not yet taken as replies.
    pub upstream_buf: BytesMut,
    upstream_lines: LineReader,
    assembler: ReplyAssembler,
    steps: VecDeque<Step>,
    ended: bool,
    draining: bool,
    timeout: Duration,
    /// The client must finish its next command line by then (TimeOut from our answer).
    client_due: Instant,
    /// The upstream must finish the reply it owes by then (TimeOut from our command).
    upstream_due: Instant,
    restart: Restart,
    trace_client_lines: bool,
}

impl Relay {
    /// A connection whose upstream greeting is still to come; `timeout` is TimeOut.
    pub fn new(session: Session, timeout: Duration, now: Instant) -> Relay {
        Relay {
            session,
            client_buf: BytesMut::new(),
            client_eof: false,
            client_lines: LineReader::new(COMMAND_LINE_LIMIT),
            upstream_buf: BytesMut::new(),
            upstream_lines: LineReader::new(REPLY_LINE_LIMIT),
            assembler: ReplyAssembler::default(),
            steps: VecDeque::new(),
            ended: false,
            draining: false,
            timeout,
            client_due: now + timeout,
            upstream_due: now + timeout,
            restart: Restart::None,
            trace_client_lines: false,
        }
    }

    /// Hands out each client command line as [`Step::ClientLine`] before what it causes.
    pub fn trace_client_lines(&mut self, on: bool) {
        self.trace_client_lines = on;
    }

    pub fn session(&self) -> &Session {
        &self.session
    }

    pub fn envelope(&self) -> &Envelope {
        self.session.envelope()
    }

    /// A reloaded TimeOut, from the next deadline on.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// The stage an upstream failure now belongs to.
    pub fn stage(&self) -> Stage {
        if self.session.awaiting_greeting() {
            Stage::Greeting
        } else {
            Stage::Command
        }
    }

    /// The proxy read the upstream's greeting itself and relays it as it is.
    pub fn greeting_read(&mut self, reply: Reply) {
        self.session.upstream_reply(reply);
        self.collect();
    }

    /// The proxy read and answered the upstream's greeting itself (it started TLS with it):
    /// the client is greeted by the session.
    pub fn greeting_consumed(&mut self) {
        self.session.upstream_greeted();
        self.collect();
    }

    /// The upstream connection now speaks TLS: what was read before is gone with the
    /// clear-text layer.
    pub fn upstream_restarted(&mut self) {
        self.upstream_buf.clear();
        self.upstream_lines = LineReader::new(REPLY_LINE_LIMIT);
        self.assembler = ReplyAssembler::default();
    }

    pub fn client_closed(&mut self) {
        self.client_eof = true;
    }

    /// The upstream closed its side (or its connection failed).
    pub fn upstream_closed(&mut self) {
        // Whatever the upstream said last has been relayed; a client still waiting for an
        // answer gets a 4xx rather than a silent close.
        let end = if self.session.awaiting_upstream() {
            End::Upstream {
                stage: self.stage(),
                reason: "server disconnected unexpectedly".into(),
            }
        } else {
            End::Done
        };
        self.end(end);
    }

    /// The deadline of [`Relay::wants`] passed.
    pub fn timed_out(&mut self) {
        let end = if self.session.awaiting_upstream() {
            End::Upstream {
                stage: self.stage(),
                reason: "network operation timed out".into(),
            }
        } else {
            End::ClientTimeout
        };
        self.end(end);
    }

    /// The proxy is shutting down: the session ends as soon as it is idle.
    pub fn drain(&mut self) {
        self.draining = true;
    }

    /// The client's TLS handshake after [`Step::StartTls`] succeeded.
    pub fn tls_established(&mut self) {
        self.session.tls_established();
        self.collect();
    }

    /// Holds each MAIL and RCPT for [`Step::CheckEnvelope`]; off by default.
    pub fn check_envelope(&mut self, on: bool) {
        self.session.set_check_envelope(on);
    }

    /// The check of [`Step::CheckEnvelope`] is done: `None` relays the command,
    /// `Some(reply)` (complete, CRLF included) refuses it with that reply, unrelayed. The
    /// client's clock restarts: the check's time was not its.
    pub fn envelope_checked(&mut self, refusal: Option<Bytes>, now: Instant) {
        self.session.envelope_checked(refusal);
        self.client_due = now + self.timeout;
        self.collect();
    }

    /// The message transaction begun at [`Step::BeginData`] is over, whatever its outcome.
    pub fn transaction_done(&mut self, now: Instant) {
        self.session.transaction_done();
        self.client_due = now + self.timeout;
        self.collect();
    }

    /// Takes the next complete upstream reply already received, if any.
    pub fn next_reply(&mut self) -> Result<Option<Reply>, String> {
        while let Some(framed) = self.upstream_lines.next(&mut self.upstream_buf) {
            let line = match framed {
                Framed::Line(line) => line,
                Framed::TooLong => return Err("reply line too long".into()),
            };
            let reply = self.assembler.push(line).map_err(|e| match e {
                ReplyError::TooManyLines => "reply has too many lines".to_string(),
                ReplyError::Malformed => "malformed reply".to_string(),
            })?;
            if reply.is_some() {
                return Ok(reply);
            }
        }
        Ok(None)
    }

    /// What to wait for when [`Relay::next_step`] has nothing.
    pub fn wants(&self) -> Wants {
        let awaiting_upstream = self.session.awaiting_upstream();
        Wants {
            client: !self.client_eof && self.session.accepts_client_input(),
            deadline: if awaiting_upstream {
                self.upstream_due
            } else {
                self.client_due
            },
        }
    }

    /// The next thing to do, or `None` when more input (or the deadline) is needed. `now`
    /// is when the previous step was carried out.
    pub fn next_step(&mut self, now: Instant) -> Option<Step> {
        match std::mem::replace(&mut self.restart, Restart::None) {
            Restart::None => {}
            // The client's turn begins with our answer; the upstream's with our command.
            Restart::Client => self.client_due = now + self.timeout,
            Restart::Upstream => self.upstream_due = now + self.timeout,
        }
        loop {
            if let Some(step) = self.steps.pop_front() {
                return Some(self.hand_out(step));
            }
            if self.ended {
                return None;
            }
            if self.take_client_line(now) || self.take_reply(now) {
                continue;
            }
            if self.client_eof && !self.session.awaiting_upstream() {
                self.end(End::Done);
            } else if self.draining && self.session.is_idle() {
                self.end(End::Shutdown);
            } else {
                return None;
            }
        }
    }

    fn hand_out(&mut self, mut step: Step) -> Step {
        match &mut step {
            Step::ToClient(_) => self.restart = Restart::Client,
            Step::ToUpstream(_) => self.restart = Restart::Upstream,
            Step::StartTls { discarded } => {
                *discarded = self.client_buf.len();
                // Anything after the STARTTLS line came in clear text before the handshake;
                // taking it as commands under TLS is the STARTTLS command-injection attack.
                self.client_buf.clear();
                self.client_lines = LineReader::new(COMMAND_LINE_LIMIT);
            }
            _ => {}
        }
        step
    }

    /// Feeds the session the next complete client line, when it takes one now.
    fn take_client_line(&mut self, now: Instant) -> bool {
        if !self.session.accepts_client_input() {
            return false;
        }
        match self.client_lines.next(&mut self.client_buf) {
            Some(Framed::Line(line)) => {
                if self.trace_client_lines {
                    self.steps.push_back(Step::ClientLine(line.clone()));
                }
                self.session.client_line(line)
            }
            Some(Framed::TooLong) => self.session.client_line_too_long(),
            None => {
                // An unterminated command from a client that left is never forwarded: the
                // upstream would wait for its end.
                if self.client_eof {
                    self.client_buf.clear();
                }
                return false;
            }
        }
        self.client_due = now + self.timeout;
        self.collect();
        true
    }

    /// Feeds the session the next complete upstream reply already received.
    fn take_reply(&mut self, now: Instant) -> bool {
        match self.next_reply() {
            Ok(Some(reply)) => {
                self.steps.push_back(Step::Replied {
                    stage: self.stage(),
                    code: reply.code,
                });
                self.session.upstream_reply(reply);
                self.upstream_due = now + self.timeout;
                self.collect();
                true
            }
            Ok(None) => false,
            Err(reason) => {
                self.end(End::Upstream {
                    stage: Stage::Command,
                    reason,
                });
                true
            }
        }
    }

    /// Turns the session's actions into steps.
    fn collect(&mut self) {
        let mut actions = self.session.take_actions();
        for action in actions.drain(..) {
            let step = match action {
                Action::ToUpstream(bytes) => Step::ToUpstream(bytes),
                Action::ToClient(bytes) => Step::ToClient(bytes),
                Action::BeginData(mode) => Step::BeginData(mode),
                Action::PolicyReject => Step::PolicyReject,
                Action::CheckEnvelope { command, line } => Step::CheckEnvelope { command, line },
                Action::StartTls => Step::StartTls { discarded: 0 },
                Action::UpstreamProtocolError(reason) => {
                    let stage = self.stage();
                    self.end(End::UpstreamProtocol { stage, reason });
                    return;
                }
            };
            self.steps.push_back(step);
        }
        self.session.return_actions(actions);
    }

    /// Ends the connection after the steps already queued: nothing more is taken in.
    fn end(&mut self, end: End) {
        if !self.ended {
            self.ended = true;
            self.steps.push_back(Step::End(end));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FilterType;
    use crate::protocol::session::{Policy, TlsPolicy};

    const TIMEOUT: Duration = Duration::from_secs(30);

    fn relay_with(tls: TlsPolicy) -> (Relay, Instant) {
        let policy = Policy {
            filter_type: FilterType::Pipe,
            filter_reject_reply: Bytes::from_static(b"530 Email Rejected\r\n"),
            skip_authenticated: false,
            xclient: false,
            client_ip: None,
        };
        let now = Instant::now();
        (
            Relay::new(Session::with_tls(policy, tls), TIMEOUT, now),
            now,
        )
    }

    fn relay() -> (Relay, Instant) {
        relay_with(TlsPolicy::default())
    }

    fn with_tls() -> (Relay, Instant) {
        relay_with(TlsPolicy {
            offer_starttls: true,
            required: false,
            implicit: false,
        })
    }

    /// Runs a script against the relay and returns what it did, one line per step.
    /// `C:` client bytes (CRLF added unless the text ends with `\`), `S:` upstream reply,
    /// `CLIENT-EOF`, `UPSTREAM-EOF`, `TIMEOUT`, `DRAIN`, `TLS`, `DONE` (the transaction
    /// finished), `+N` N seconds pass.
    fn run(r: &mut Relay, mut now: Instant, script: &[&str]) -> Vec<String> {
        let mut out = Vec::new();
        for line in script {
            match *line {
                "CLIENT-EOF" => r.client_closed(),
                "UPSTREAM-EOF" => r.upstream_closed(),
                "TIMEOUT" => r.timed_out(),
                "DRAIN" => r.drain(),
                "TLS" => r.tls_established(),
                "DONE" => r.transaction_done(now),
                _ => {
                    if let Some(secs) = line.strip_prefix('+') {
                        now += Duration::from_secs(secs.parse().unwrap());
                    } else if *line == "CHECKED" {
                        r.envelope_checked(None, now);
                    } else if let Some(reply) = line.strip_prefix("REFUSE: ") {
                        r.envelope_checked(Some(Bytes::from(format!("{reply}\r\n"))), now);
                    } else if let Some(text) = line.strip_prefix("C: ") {
                        match text.strip_suffix('\\') {
                            Some(partial) => r.client_buf.extend_from_slice(partial.as_bytes()),
                            None => r
                                .client_buf
                                .extend_from_slice(format!("{text}\r\n").as_bytes()),
                        }
                    } else if let Some(text) = line.strip_prefix("S: ") {
                        r.upstream_buf
                            .extend_from_slice(format!("{text}\r\n").as_bytes());
                    } else {
                        panic!("bad script line {line}");
                    }
                }
            }
            while let Some(step) = r.next_step(now) {
                out.push(match step {
                    Step::ToClient(b) => format!(">cl {}", String::from_utf8_lossy(&b).trim_end()),
                    Step::ToUpstream(b) => {
                        format!(">up {}", String::from_utf8_lossy(&b).trim_end())
                    }
                    Step::StartTls { discarded } => format!("START-TLS discarded {discarded}"),
                    Step::BeginData(mode) => format!("DATA {mode:?}"),
                    Step::PolicyReject => "POLICY-REJECT".into(),
                    Step::CheckEnvelope { command, line } => format!(
                        "CHECK {command:?} {}",
                        String::from_utf8_lossy(&line).trim_end()
                    ),
                    Step::Replied { stage, code } => format!("replied {code} {stage:?}"),
                    Step::ClientLine(b) => {
                        format!("<cl {}", String::from_utf8_lossy(&b).trim_end())
                    }
                    Step::End(end) => format!("END {end:?}"),
                });
            }
        }
        out
    }

    const GREETED: &[&str] = &["S: 220 sink", "C: EHLO c", "S: 250 sink"];

    fn greeted() -> (Relay, Instant) {
        let (mut r, now) = relay();
        run(&mut r, now, GREETED);
        (r, now)
    }

    /// A held MAIL or RCPT stops the client's pipelined lines until its check is done; a
    /// refused one is answered by the check and never goes upstream.
    #[test]
    fn envelope_check_holds_the_pipeline() {
        let (mut r, now) = relay();
        r.check_envelope(true);
        let out = run(
            &mut r,
            now,
            &[
                "S: 220 sink",
                "C: EHLO c",
                "S: 250 sink",
                "C: MAIL FROM:<a@x>",
                "C: RCPT TO:<b@y>",
                "C: RCPT TO:<c@y>",
                "+5",
                "CHECKED",
                "S: 250 ok",
                "REFUSE: 550 5.7.1 Command rejected",
                "CHECKED",
                "S: 250 ok",
            ],
        );
        let out: Vec<&str> = out
            .iter()
            .filter(|l| !l.starts_with("replied"))
            .map(String::as_str)
            .collect();
        assert_eq!(
            out,
            [
                ">cl 220 smtp.passthru",
                ">up EHLO c",
                ">cl 250 smtp.passthru",
                "CHECK Mail MAIL FROM:<a@x>",
                ">up MAIL FROM:<a@x>",
                // The next pipelined line is checked while MAIL awaits its reply; replies
                // still reach the client in order.
                "CHECK Rcpt RCPT TO:<b@y>",
                ">cl 250 ok",
                ">cl 550 5.7.1 Command rejected",
                "CHECK Rcpt RCPT TO:<c@y>",
                ">up RCPT TO:<c@y>",
                ">cl 250 ok",
            ]
        );
        assert_eq!(r.envelope().recipients, ["c@y"]);
    }

    fn ends(out: &[String]) -> Vec<&str> {
        out.iter()
            .filter(|l| l.starts_with("END") || l.starts_with(">"))
            .map(String::as_str)
            .collect()
    }

    #[test]
    fn end_of_input_rules() {
        let long_reply = format!("S: 250 {}", "x".repeat(20_000));
        let cases: &[(&str, &[&str], &[&str])] = &[
            (
                "a client that leaves owing nothing ends the connection",
                &["CLIENT-EOF"],
                &["END Done"],
            ),
            (
                "an unterminated command of a departed client is never relayed",
                &["C: MAIL FROM:<a@x>\\", "CLIENT-EOF"],
                &["END Done"],
            ),
            (
                "a client that leaves after a command still gets its reply relayed first",
                &["C: NOOP", "CLIENT-EOF", "S: 250 ok"],
                &[">up NOOP", ">cl 250 ok", "END Done"],
            ),
            (
                "the upstream closing while it owes a reply is a failure of that command",
                &["C: NOOP", "UPSTREAM-EOF"],
                &[
                    ">up NOOP",
                    "END Upstream { stage: Command, reason: \"server disconnected unexpectedly\" }",
                ],
            ),
            (
                "the upstream closing owing nothing just ends the connection",
                &["UPSTREAM-EOF"],
                &["END Done"],
            ),
            (
                "a reply line too long is an upstream failure",
                &["C: NOOP", &long_reply],
                &[
                    ">up NOOP",
                    "END Upstream { stage: Command, reason: \"reply line too long\" }",
                ],
            ),
            (
                "a reply with no command outstanding is a protocol error",
                &["S: 250 surprise"],
                &["END UpstreamProtocol { stage: Command, reason: \"protocol error: reply 250 with no command outstanding\" }"],
            ),
            (
                "a 421 with no command outstanding is relayed",
                &["S: 421 bye"],
                &[">cl 421 bye"],
            ),
            (
                "nothing happens after the end",
                &["UPSTREAM-EOF", "C: NOOP", "S: 250 x"],
                &["END Done"],
            ),
        ];
        for (name, script, want) in cases {
            let (mut r, now) = greeted();
            let out = run(&mut r, now, script);
            assert_eq!(ends(&out), *want, "{name}");
        }
    }

    #[test]
    fn the_greeting_stage() {
        let (mut r, now) = relay();
        let out = run(&mut r, now, &["C: EHLO early", "UPSTREAM-EOF"]);
        assert_eq!(
            out,
            ["END Upstream { stage: Greeting, reason: \"server disconnected unexpectedly\" }"]
        );
        let (mut r, now) = relay();
        assert_eq!(run(&mut r, now, &["TIMEOUT"]).len(), 1);
        let (mut r, now) = relay();
        let out = run(&mut r, now, &["S: 220 sink", "C: EHLO c"]);
        assert_eq!(
            out,
            [
                "replied 220 Greeting",
                ">cl 220 smtp.passthru",
                ">up EHLO c"
            ]
        );
    }

    #[test]
    fn draining_ends_only_an_idle_session() {
        let (mut r, now) = greeted();
        assert_eq!(run(&mut r, now, &["DRAIN"]), ["END Shutdown"]);

        // In a transaction: the session goes on until the transaction is over.
        let (mut r, now) = greeted();
        let out = run(
            &mut r,
            now,
            &["C: MAIL FROM:<a@x>", "S: 250 ok", "DRAIN", "C: NOOP"],
        );
        assert_eq!(
            ends(&out),
            [">up MAIL FROM:<a@x>", ">cl 250 ok", ">up NOOP"]
        );
        let out = run(&mut r, now, &["S: 250 ok", "C: RSET", "S: 250 reset"]);
        assert_eq!(
            ends(&out),
            [">cl 250 ok", ">up RSET", ">cl 250 reset", "END Shutdown"]
        );

        // While a command is outstanding: its reply first.
        let (mut r, now) = greeted();
        let out = run(&mut r, now, &["C: NOOP", "DRAIN", "S: 250 ok"]);
        assert_eq!(ends(&out), [">up NOOP", ">cl 250 ok", "END Shutdown"]);
    }

    #[test]
    fn deadlines_follow_whose_turn_it_is() {
        let (mut r, start) = greeted();
        // The client's turn: TimeOut from our last answer.
        assert!(r.wants().client);
        let client_due = r.wants().deadline;
        assert!(client_due >= start + TIMEOUT);
        assert_eq!(run(&mut r, start, &["TIMEOUT"]), ["END ClientTimeout"]);

        // The upstream's turn: TimeOut from our command, whatever the client does.
        let (mut r, start) = greeted();
        let later = start + Duration::from_secs(10);
        run(&mut r, later, &["C: NOOP"]);
        r.next_step(later);
        assert_eq!(r.wants().deadline, later + TIMEOUT);
        assert_eq!(
            run(&mut r, later, &["TIMEOUT"]),
            ["END Upstream { stage: Command, reason: \"network operation timed out\" }"]
        );

        // A partial line does not move the client's deadline; a whole one does.
        let (mut r, start) = greeted();
        let due = r.wants().deadline;
        run(&mut r, start + Duration::from_secs(20), &["C: NO\\"]);
        assert_eq!(r.wants().deadline, due);
    }

    #[test]
    fn the_client_is_not_read_while_a_transaction_or_handshake_runs() {
        let (mut r, now) = greeted();
        let out = run(
            &mut r,
            now,
            &[
                "C: MAIL FROM:<a@x>",
                "S: 250 ok",
                "C: RCPT TO:<b@y>",
                "S: 250 ok",
                "C: DATA",
            ],
        );
        assert_eq!(out.last().map(String::as_str), Some("DATA Filter"));
        assert!(!r.wants().client);
        // The body stays in the buffer for the transaction.
        let out = run(&mut r, now, &["C: Subject: x", "C: ."]);
        assert!(out.is_empty(), "{out:?}");
        assert_eq!(&r.client_buf[..], b"Subject: x\r\n.\r\n");
        r.client_buf.clear();
        run(&mut r, now, &["DONE"]);
        assert!(r.wants().client);
    }

    #[test]
    fn client_lines_are_handed_out_for_the_trace_when_asked() {
        let (mut r, now) = greeted();
        r.trace_client_lines(true);
        let out = run(&mut r, now, &["C: NOOP", "S: 250 ok"]);
        assert_eq!(
            out,
            ["<cl NOOP", ">up NOOP", "replied 250 Command", ">cl 250 ok"]
        );
    }

    #[test]
    fn bytes_after_starttls_are_discarded() {
        let (mut r, now) = with_tls();
        run(&mut r, now, GREETED);
        let out = run(&mut r, now, &["C: STARTTLS\r\nMAIL FROM:<evil@x>"]);
        assert_eq!(
            out,
            [">cl 220 2.0.0 Ready to start TLS", "START-TLS discarded 20",]
        );
        assert!(r.client_buf.is_empty());
        let out = run(&mut r, now, &["TLS", "S: 250 reset", "C: EHLO again"]);
        assert_eq!(out, [">up RSET", "replied 250 Command", ">up EHLO again"]);
    }
}
