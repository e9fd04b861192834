//! One connection to a milter, over TCP or a unix socket, driving the sans-IO
//! [`MilterSession`]: connect and negotiate within the connect timeout, then for each stage
//! send what the session says and wait for the answer within the command timeout (the
//! content timeout for body chunks and the end of message), a PROGRESS answer restarting
//! the wait.
//!
//! Anything that goes wrong (no connection, a timeout, the milter closing, a broken packet)
//! ends the conversation: that stage and every later one get [`Outcome::Failed`], which
//! carries the milter's `default_action`. Memory stays bounded: the packet decoder refuses
//! a packet over its limit before buffering it, and the modifications collected at the end
//! of message are capped by [`MAX_MODIFICATION_BYTES`].

use std::fmt;
use std::io;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::time::{timeout, timeout_at, Instant};

use crate::config::milter::{MilterAction, MilterAddress, MilterConfig};
use crate::protocol::milter::codec::{Command, ConnectAddress, Limits, PacketDecoder};
use crate::protocol::milter::negotiate::{MacroNames, Negotiated, Offer};
use crate::protocol::milter::reply::Modification;
use crate::protocol::milter::session::{BeginError, Begun, Event, MilterSession, Verdict};
use crate::protocol::milter::{ProtocolError, Stage};
use crate::proxy::io::Stream;

/// The most modification data (header and body bytes) one end of message may carry; a
/// milter sending more is treated as broken.
pub const MAX_MODIFICATION_BYTES: usize = 64 * 1024 * 1024;

/// Why a milter conversation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailureKind {
    /// Connecting failed (refused, no such host or socket).
    Connect(String),
    /// Connecting and negotiating took longer than the connect timeout.
    ConnectTimeout,
    /// No answer within the command or content timeout.
    Timeout(Stage),
    /// The milter closed the connection.
    Closed,
    /// Reading or writing failed.
    Io(String),
    /// The milter broke the protocol.
    Protocol(ProtocolError),
    /// Data after an answer, which nothing asked for.
    Unsolicited,
    /// More modification data than [`MAX_MODIFICATION_BYTES`].
    TooMuchModification,
    /// A stage that cannot be sent now (out of order, or a value that cannot be encoded).
    Usage(BeginError),
}

impl FailureKind {
    /// A short word for metrics labels.
    pub fn label(&self) -> &'static str {
        match self {
            FailureKind::Connect(_) => "connect",
            FailureKind::ConnectTimeout => "connect_timeout",
            FailureKind::Timeout(_) => "timeout",
            FailureKind::Closed => "closed",
            FailureKind::Io(_) => "io",
            FailureKind::Protocol(_) => "protocol",
            FailureKind::Unsolicited => "protocol",
            FailureKind::TooMuchModification => "oversize",
            FailureKind::Usage(_) => "usage",
        }
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FailureKind::Connect(e) => write!(f, "cannot connect: {e}"),
            FailureKind::ConnectTimeout => write!(f, "connect or negotiation timed out"),
            FailureKind::Timeout(stage) => write!(f, "no answer at {stage:?} in time"),
            FailureKind::Closed => write!(f, "the milter closed the connection"),
            FailureKind::Io(e) => write!(f, "I/O error: {e}"),
            FailureKind::Protocol(e) => write!(f, "protocol error: {e}"),
            FailureKind::Unsolicited => write!(f, "data after an answer"),
            FailureKind::TooMuchModification => {
                write!(
                    f,
                    "more than {MAX_MODIFICATION_BYTES} bytes of modifications"
                )
            }
            FailureKind::Usage(e) => e.fmt(f),
        }
    }
}

/// A failed conversation: why, and the action configured for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub kind: FailureKind,
    pub action: MilterAction,
}

/// How a stage ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Carry on (the milter answered continue, does not answer this stage, or opted out).
    Continue,
    /// The milter decided; what the verdict covers depends on the stage (see
    /// [`MilterSession`]).
    Verdict(Verdict),
    /// Body chunk: the milter wants no more of the body.
    Skip,
    /// The conversation is over: apply `action`.
    Failed(Failure),
}

/// What a stage gave: its outcome and, at the end of message, the modifications that came
/// before the final verdict, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageResult {
    pub outcome: Outcome,
    pub modifications: Vec<Modification>,
}

impl StageResult {
    fn of(outcome: Outcome) -> StageResult {
        StageResult {
            outcome,
            modifications: Vec::new(),
        }
    }
}

/// One connection to a milter.
pub struct MilterClient {
    config: MilterConfig,
    stream: Option<Stream>,
    session: MilterSession,
    decoder: PacketDecoder,
    failure: Option<FailureKind>,
}

impl fmt::Debug for MilterClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MilterClient")
            .field("name", &self.config.name)
            .field("failure", &self.failure)
            .finish_non_exhaustive()
    }
}

impl MilterClient {
    /// Connects and negotiates within the connect timeout, offering every action and
    /// protocol flag of `version` (2 to 6). A failure is kept: every stage then returns
    /// [`Outcome::Failed`] (see [`MilterClient::failure`]).
    pub async fn connect(config: MilterConfig, version: u32, macros: MacroNames) -> MilterClient {
        let offer = Offer {
            version,
            ..Offer::default()
        };
        let mut client = MilterClient {
            session: MilterSession::new(offer, macros),
            decoder: PacketDecoder::new(Limits::default()),
            stream: None,
            failure: None,
            config,
        };
        let deadline = Instant::now() + client.config.connect_timeout;
        let result = match timeout_at(deadline, open(&client.config.address)).await {
            Err(_) => Err(FailureKind::ConnectTimeout),
            Ok(Err(e)) => Err(FailureKind::Connect(e.to_string())),
            Ok(Ok(stream)) => {
                client.stream = Some(stream);
                client.negotiate(deadline).await
            }
        };
        if let Err(kind) = result {
            client.fail(kind);
        }
        client
    }

    async fn negotiate(&mut self, deadline: Instant) -> Result<(), FailureKind> {
        let bytes = self.session.start().map_err(FailureKind::Usage)?;
        self.write(&bytes, deadline)
            .await
            .map_err(|e| timeout_kind(e, FailureKind::ConnectTimeout))?;
        let packet = self
            .read_packet(deadline)
            .await
            .map_err(|e| timeout_kind(e, FailureKind::ConnectTimeout))?;
        match self.session.on_packet(&packet) {
            Event::Negotiated => self.nothing_after_answer(),
            Event::ProtocolError(e) => Err(FailureKind::Protocol(e)),
            // The session answers negotiation with one of the two above only.
            _ => Err(FailureKind::Unsolicited),
        }
    }

    /// The configured name (for logs and metrics).
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// What was negotiated, when the milter is usable.
    pub fn negotiated(&self) -> Option<&Negotiated> {
        self.session.negotiated()
    }

    /// Why the conversation ended, if it did.
    pub fn failure(&self) -> Option<&FailureKind> {
        self.failure.as_ref()
    }

    /// Runs one stage: sends the command (with the macros the stage's list names) and waits
    /// for the answer. Abort and quit are sent without waiting. Each stage that asks the
    /// milter is a `milter` span and counts in `proxsmtpd_milter_replies_total` (with its
    /// time in `proxsmtpd_milter_duration_seconds`).
    pub async fn stage(&mut self, command: Command<'_>, macros: &[(&str, &[u8])]) -> StageResult {
        use tracing::Instrument;
        let stage = command.stage();
        let span = tracing::info_span!(
            "milter",
            milter = %self.config.name,
            stage = stage.map(Stage::label).unwrap_or("control"),
        );
        let started = Instant::now();
        let (result, asked) = self.run_stage(command, macros).instrument(span).await;
        if let Some(stage) = stage {
            let action = action_label(&result.outcome);
            if asked || action == "failed" {
                let took = asked.then(|| started.elapsed());
                crate::ops::metrics::global().milter_reply(
                    &self.config.name,
                    stage.label(),
                    action,
                    took,
                );
            }
        }
        result
    }

    /// [`MilterClient::stage`] without the accounting; also whether an answer was awaited.
    async fn run_stage(
        &mut self,
        command: Command<'_>,
        macros: &[(&str, &[u8])],
    ) -> (StageResult, bool) {
        if let Some(kind) = &self.failure {
            return (StageResult::of(self.failed(kind.clone())), false);
        }
        let wait = match command {
            Command::Body(_) | Command::BodyEob => self.config.content_timeout,
            _ => self.config.command_timeout,
        };
        let stage_of = command.stage();
        let begun = match self.session.begin(command, macros) {
            Ok(b) => b,
            Err(e) => return (StageResult::of(self.fail(FailureKind::Usage(e))), false),
        };
        let deadline = Instant::now() + wait;
        let too_late = FailureKind::Timeout(stage_of.unwrap_or(Stage::Unknown));
        let result = match begun {
            Begun::Skipped => return (StageResult::of(Outcome::Continue), false),
            Begun::NoReply(bytes) => {
                return match self.write(&bytes, deadline).await {
                    Ok(()) => (StageResult::of(Outcome::Continue), false),
                    Err(e) => (StageResult::of(self.fail(timeout_kind(e, too_late))), false),
                }
            }
            Begun::Await(bytes) => {
                if let Err(e) = self.write(&bytes, deadline).await {
                    return (StageResult::of(self.fail(timeout_kind(e, too_late))), true);
                }
                match self.await_answer(wait).await {
                    Ok(result) => result,
                    Err(Wait::TimedOut) => StageResult::of(self.fail(too_late)),
                    Err(Wait::Failed(kind)) => StageResult::of(self.fail(kind)),
                }
            }
        };
        (result, true)
    }

    /// Whether a message transaction is open with this milter (it needs `ABORT` before the
    /// next MAIL).
    pub fn in_message(&self) -> bool {
        self.failure.is_none() && self.session.in_message()
    }

    /// Whether `SMFIP_HDR_LEADSPC` was negotiated: header values carry their own leading
    /// space, both ways.
    pub fn leading_space(&self) -> bool {
        self.session
            .negotiated()
            .is_some_and(|n| n.has_flag(crate::protocol::milter::proto::HDR_LEADSPC))
    }

    async fn await_answer(&mut self, wait: Duration) -> Result<StageResult, Wait> {
        let mut deadline = Instant::now() + wait;
        let mut modifications = Vec::new();
        let mut held = 0usize;
        loop {
            let packet = self.read_packet(deadline).await?;
            let outcome = match self.session.on_packet(&packet) {
                Event::Progress => {
                    deadline = Instant::now() + wait;
                    continue;
                }
                Event::Modification(m) => {
                    held = held.saturating_add(packet.data.len());
                    if held > MAX_MODIFICATION_BYTES {
                        return Err(Wait::Failed(FailureKind::TooMuchModification));
                    }
                    modifications.push(m);
                    continue;
                }
                Event::ProtocolError(e) => return Err(Wait::Failed(FailureKind::Protocol(e))),
                Event::Continue | Event::Negotiated => Outcome::Continue,
                Event::Skip => Outcome::Skip,
                Event::Verdict(v) => Outcome::Verdict(v),
            };
            self.nothing_after_answer().map_err(Wait::Failed)?;
            return Ok(StageResult {
                outcome,
                modifications,
            });
        }
    }

    /// Bytes already buffered after the answer are bytes nobody asked for.
    fn nothing_after_answer(&mut self) -> Result<(), FailureKind> {
        if self.decoder.buffered() > 0 || self.decoder.failed() {
            return Err(FailureKind::Unsolicited);
        }
        Ok(())
    }

    /// Ends the conversation politely (`SMFIC_QUIT`) and closes the connection.
    pub async fn quit(mut self) {
        if self.failure.is_none() {
            if let Ok(Begun::NoReply(bytes)) = self.session.begin(Command::Quit, &[]) {
                let deadline = Instant::now() + self.config.command_timeout;
                let _ = self.write(&bytes, deadline).await;
            }
        }
        if let Some(mut stream) = self.stream.take() {
            let _ = timeout(self.config.command_timeout, stream.shutdown()).await;
        }
    }

    async fn write(&mut self, bytes: &[u8], deadline: Instant) -> Result<(), Wait> {
        let Some(stream) = self.stream.as_mut() else {
            return Err(Wait::Failed(FailureKind::Closed));
        };
        match timeout_at(deadline, stream.write_all(bytes)).await {
            Err(_) => Err(Wait::TimedOut),
            Ok(Err(e)) => Err(Wait::Failed(io_kind(e))),
            Ok(Ok(())) => Ok(()),
        }
    }

    /// The next packet, reading as needed until `deadline`.
    async fn read_packet(
        &mut self,
        deadline: Instant,
    ) -> Result<crate::protocol::milter::codec::Packet, Wait> {
        let mut buf = [0u8; 8192];
        loop {
            match self.decoder.next_packet() {
                Ok(Some(p)) => return Ok(p),
                Ok(None) => {}
                Err(e) => return Err(Wait::Failed(FailureKind::Protocol(e))),
            }
            let Some(stream) = self.stream.as_mut() else {
                return Err(Wait::Failed(FailureKind::Closed));
            };
            match timeout_at(deadline, stream.read(&mut buf)).await {
                Err(_) => return Err(Wait::TimedOut),
                Ok(Err(e)) => return Err(Wait::Failed(io_kind(e))),
                Ok(Ok(0)) => return Err(Wait::Failed(FailureKind::Closed)),
                Ok(Ok(n)) => self.decoder.feed(&buf[..n]),
            }
        }
    }

    fn fail(&mut self, kind: FailureKind) -> Outcome {
        tracing::warn!(milter = %self.config.name, "milter {}: {kind}", self.config.name);
        crate::ops::metrics::global().milter_error(&self.config.name, kind.label());
        self.stream = None;
        self.failure = Some(kind.clone());
        self.failed(kind)
    }

    fn failed(&self, kind: FailureKind) -> Outcome {
        Outcome::Failed(Failure {
            kind,
            action: self.config.default_action,
        })
    }
}

/// The `action` label of an outcome.
fn action_label(outcome: &Outcome) -> &'static str {
    match outcome {
        Outcome::Continue => "continue",
        Outcome::Skip => "skip",
        Outcome::Failed(_) => "failed",
        Outcome::Verdict(v) => match v {
            Verdict::Accept => "accept",
            Verdict::Reject => "reject",
            Verdict::Tempfail | Verdict::ConnFail | Verdict::Shutdown => "tempfail",
            Verdict::Discard => "discard",
            Verdict::Reply(_) => "replycode",
        },
    }
}

/// Why waiting ended without an answer.
enum Wait {
    TimedOut,
    Failed(FailureKind),
}

fn timeout_kind(w: Wait, on_timeout: FailureKind) -> FailureKind {
    match w {
        Wait::TimedOut => on_timeout,
        Wait::Failed(k) => k,
    }
}

fn io_kind(e: io::Error) -> FailureKind {
    match e.kind() {
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::ConnectionAborted => FailureKind::Closed,
        _ => FailureKind::Io(e.to_string()),
    }
}

async fn open(address: &MilterAddress) -> io::Result<Stream> {
    match address {
        MilterAddress::Tcp { host, port } => {
            let stream = TcpStream::connect((host.as_str(), *port)).await?;
            let _ = stream.set_nodelay(true);
            Ok(Stream::Tcp(stream))
        }
        MilterAddress::Unix(path) => Ok(Stream::Unix(UnixStream::connect(path).await?)),
    }
}

/// Postfix's replies for a milter's reject and tempfail (and for a failed milter whose
/// default action says so).
pub const REPLY_REJECT: &[u8] = b"550 5.7.1 Command rejected\r\n";
pub const REPLY_TEMPFAIL: &[u8] = b"451 4.7.1 Service unavailable - try again later\r\n";

/// This host's name: `{daemon_name}` and `j` unless MilterMacroDaemonName says otherwise.
/// Read once: a host name does not change under a running proxy, and asking the kernel
/// at every MAIL, RCPT and DATA shows in the system-call count.
pub fn host_name() -> String {
    static NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NAME.get_or_init(|| {
        nix::unistd::gethostname()
            .ok()
            .and_then(|n| n.into_string().ok())
            .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_graphic()))
            .unwrap_or_else(|| "localhost".into())
    })
    .clone()
}

/// The SMTP client as the connect and helo stages report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientInfo {
    /// The client's host name, or `[address]` when it has none.
    pub hostname: String,
    /// `None` for a unix-socket client.
    pub addr: Option<std::net::SocketAddr>,
    /// The HELO/EHLO argument, once given.
    pub helo: Option<String>,
    /// `{daemon_name}` and `j`.
    pub daemon_name: String,
    /// `{tls_version}` and `{cipher}` when the client uses TLS.
    pub tls: Option<(String, String)>,
    /// The connection's id: `i` (the queue id) is this id and the message's number.
    pub connection_id: String,
}

/// MAIL or RCPT.
pub use crate::protocol::session::EnvelopeCommand;

/// The milters of one SMTP session, in order: each is connected (and told of the client
/// and its HELO) at its first use, told `ABORT` before a new MAIL when a message was open
/// with it, asked about each MAIL and RCPT until one refuses, and then about the message
/// ([`MilterChain::message_milters`]).
#[derive(Debug)]
pub struct MilterChain {
    configs: Vec<MilterConfig>,
    version: u32,
    clients: Vec<Option<MilterClient>>,
    /// Per milter: its reply for every command of the connection, after it decided at
    /// connect or helo.
    decided: Vec<Option<Vec<u8>>>,
    /// Per milter: it accepted the connection.
    skipped: Vec<bool>,
    /// The milter that discarded the current message at MAIL or RCPT: its commands are
    /// relayed, and the message is answered 250 and delivered nowhere.
    discarded_by: Option<String>,
    /// Messages begun (MAIL commands seen): the second part of the `i` macro.
    messages: u32,
    /// The current transaction's MAIL line and its RCPT lines by address, as the client
    /// sent them: what is sent again when a milter changes the envelope.
    mail_line: Option<Vec<u8>>,
    rcpt_lines: Vec<(String, Vec<u8>)>,
}

impl MilterChain {
    pub fn new(configs: Vec<MilterConfig>, version: u32) -> MilterChain {
        let n = configs.len();
        MilterChain {
            configs,
            version,
            clients: (0..n).map(|_| None).collect(),
            decided: vec![None; n],
            skipped: vec![false; n],
            discarded_by: None,
            messages: 0,
            mail_line: None,
            rcpt_lines: Vec::new(),
        }
    }

    /// The `i` macro: the connection's id and the message's number.
    pub fn queue_id(&self, connection_id: &str) -> String {
        format!("{connection_id}.{}", self.messages)
    }

    /// Asks the milters about a MAIL or RCPT command line (CRLF included or not): `None`
    /// relays it, `Some(reply)` (complete, CRLF included) refuses it.
    pub async fn envelope(
        &mut self,
        command: EnvelopeCommand,
        line: &[u8],
        client: &ClientInfo,
    ) -> Option<Vec<u8>> {
        let args = envelope_args(line);
        let arg_refs: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
        let addr = args
            .first()
            .map(|a| crate::protocol::milter::message::bare_address(a))
            .unwrap_or_default()
            .to_vec();
        if command == EnvelopeCommand::Mail {
            self.discarded_by = None;
            self.messages += 1;
            self.mail_line = Some(line.to_vec());
            self.rcpt_lines.clear();
        } else {
            self.rcpt_lines
                .push((String::from_utf8_lossy(&addr).into_owned(), line.to_vec()));
        }
        let queue_id = self.queue_id(&client.connection_id);
        if self.discarded_by.is_some() {
            return None;
        }
        for i in 0..self.configs.len() {
            match self.connected(i, client).await {
                Ok(true) => {}
                Ok(false) => continue,
                Err(reply) => return Some(reply),
            }
            let Some(milter) = self.clients[i].as_mut() else {
                continue;
            };
            let result = match command {
                EnvelopeCommand::Mail => {
                    if milter.in_message() {
                        milter.stage(Command::Abort, &[]).await;
                    }
                    let macros: [(&str, &[u8]); 2] =
                        [("{mail_addr}", &addr), ("i", queue_id.as_bytes())];
                    milter.stage(Command::Mail(&arg_refs), &macros).await
                }
                EnvelopeCommand::Rcpt => {
                    let macros: [(&str, &[u8]); 2] =
                        [("{rcpt_addr}", &addr), ("i", queue_id.as_bytes())];
                    milter.stage(Command::Rcpt(&arg_refs), &macros).await
                }
            };
            if result.outcome == Outcome::Verdict(Verdict::Discard) {
                // The whole message, as Postfix takes it: the milters are done with it.
                self.discarded_by = Some(self.configs[i].name.clone());
                return None;
            }
            match refusal(&result.outcome) {
                // Accept ends this milter's part in the message (its later stages are
                // skipped by its session); the next milters are still asked, as Postfix
                // and sendmail do: one milter's "clean" is not another's "not spam".
                Decision::Next | Decision::Accept => {}
                Decision::Refuse(reply) => return Some(reply),
            }
        }
        None
    }

    /// The milter that discarded the current message at MAIL or RCPT.
    pub fn discarded_by(&self) -> Option<&str> {
        self.discarded_by.as_deref()
    }

    /// The MAIL line of the current transaction, as the client sent it.
    pub fn mail_line(&self) -> Option<&[u8]> {
        self.mail_line.as_deref()
    }

    /// The RCPT line the client sent for `address` (compared case-insensitively).
    pub fn rcpt_line(&self, address: &str) -> Option<&[u8]> {
        self.rcpt_lines
            .iter()
            .rev()
            .find(|(a, _)| a.eq_ignore_ascii_case(address))
            .map(|(_, l)| l.as_slice())
    }

    /// The milters the current message goes to, in order: those told of the transaction
    /// (one that accepted it at MAIL or RCPT has its stages skipped by its session).
    pub fn message_milters(&self) -> Vec<usize> {
        (0..self.configs.len())
            .filter(|&i| self.clients[i].is_some() && !self.skipped[i])
            .collect()
    }

    /// Milter `i` of [`MilterChain::message_milters`].
    pub fn milter(&mut self, i: usize) -> Option<&mut MilterClient> {
        self.clients.get_mut(i).and_then(Option::as_mut)
    }

    /// Connects milter `i` and tells it of the client, once: `Ok(true)` when it is to be
    /// asked, `Ok(false)` when it is skipped (it accepted the connection, or failed with
    /// default action accept), `Err(reply)` when it refuses the whole connection.
    async fn connected(&mut self, i: usize, client: &ClientInfo) -> Result<bool, Vec<u8>> {
        if let Some(reply) = &self.decided[i] {
            return Err(reply.clone());
        }
        if self.skipped[i] {
            return Ok(false);
        }
        if self.clients[i].is_none() {
            let mut milter =
                MilterClient::connect(self.configs[i].clone(), self.version, MacroNames::default())
                    .await;
            let ip = client.addr.map(|a| a.ip().to_string()).unwrap_or_default();
            let port = client
                .addr
                .map(|a| a.port().to_string())
                .unwrap_or_default();
            let underscore = format!("{} [{ip}]", client.hostname);
            let version = concat!("proxsmtpd ", env!("CARGO_PKG_VERSION"));
            let macros: [(&str, &[u8]); 7] = [
                ("j", client.daemon_name.as_bytes()),
                ("{daemon_name}", client.daemon_name.as_bytes()),
                ("v", version.as_bytes()),
                ("_", underscore.as_bytes()),
                ("{client_addr}", ip.as_bytes()),
                ("{client_port}", port.as_bytes()),
                ("{client_name}", client.hostname.as_bytes()),
            ];
            let address = match client.addr {
                Some(a) => ConnectAddress::Inet {
                    ip: a.ip(),
                    port: a.port(),
                },
                None => ConnectAddress::Unknown,
            };
            let connect = Command::Connect {
                hostname: client.hostname.as_bytes(),
                address,
            };
            let mut outcome = milter.stage(connect, &macros).await.outcome;
            if outcome == Outcome::Continue {
                if let Some(helo) = &client.helo {
                    let (tls_version, cipher) = client
                        .tls
                        .as_ref()
                        .map(|(v, c)| (v.as_bytes(), c.as_bytes()))
                        .unwrap_or_default();
                    let mut macros: Vec<(&str, &[u8])> = Vec::new();
                    if client.tls.is_some() {
                        macros.push(("{tls_version}", tls_version));
                        macros.push(("{cipher}", cipher));
                    }
                    outcome = milter
                        .stage(Command::Helo(helo.as_bytes()), &macros)
                        .await
                        .outcome;
                }
            }
            match refusal(&outcome) {
                Decision::Next => {}
                // Accept at connect: nothing more is asked of this milter.
                Decision::Accept => self.skipped[i] = true,
                Decision::Refuse(reply) => {
                    self.decided[i] = Some(reply.clone());
                    self.clients[i] = Some(milter);
                    return Err(reply);
                }
            }
            self.clients[i] = Some(milter);
        }
        // A failed milter is not asked again: its stages answer its default action at once.
        Ok(!self.skipped[i])
    }

    /// Ends every conversation (`QUIT`).
    pub async fn quit(self) {
        for milter in self.clients.into_iter().flatten() {
            milter.quit().await;
        }
    }
}

enum Decision {
    Next,
    Accept,
    Refuse(Vec<u8>),
}

/// What an envelope stage's outcome means for the command. A milter asking to end the
/// connection (CONN_FAIL, SHUTDOWN) and a failed one with default action quarantine (which
/// only a message can get) are answered with a temporary failure. (Discard is taken care of
/// before: see [`MilterChain::envelope`].)
fn refusal(outcome: &Outcome) -> Decision {
    match outcome {
        Outcome::Continue | Outcome::Skip => Decision::Next,
        Outcome::Verdict(Verdict::Accept) => Decision::Accept,
        Outcome::Verdict(Verdict::Reject) => Decision::Refuse(REPLY_REJECT.to_vec()),
        Outcome::Verdict(Verdict::Reply(r)) => {
            let mut reply = r.text.to_vec();
            reply.extend_from_slice(b"\r\n");
            Decision::Refuse(reply)
        }
        Outcome::Verdict(Verdict::Tempfail | Verdict::Discard)
        | Outcome::Verdict(Verdict::ConnFail | Verdict::Shutdown) => {
            Decision::Refuse(REPLY_TEMPFAIL.to_vec())
        }
        Outcome::Failed(f) => match f.action {
            MilterAction::Accept => Decision::Next,
            MilterAction::Reject => Decision::Refuse(REPLY_REJECT.to_vec()),
            MilterAction::Tempfail | MilterAction::Quarantine => {
                Decision::Refuse(REPLY_TEMPFAIL.to_vec())
            }
        },
    }
}

/// The address and ESMTP parameters of a MAIL or RCPT line: what follows the first colon,
/// split at spaces.
fn envelope_args(line: &[u8]) -> Vec<Vec<u8>> {
    let line = crate::protocol::line::trim_line_end(line);
    let rest = match line.iter().position(|&b| b == b':') {
        Some(i) => &line[i + 1..],
        None => &[][..],
    };
    rest.split(|b| b.is_ascii_whitespace())
        .filter(|a| !a.is_empty())
        .map(<[u8]>::to_vec)
        .collect()
}
