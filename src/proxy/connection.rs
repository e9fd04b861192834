//! One client connection: moves bytes between the client, the upstream and the session.
//!
//! The protocol decisions are made by [`Session`]; this module only reads, writes, waits
//! and enforces the timeouts. The message body is handled in [`super::transaction`].
//!
//! TLS handshakes happen here too: the client's after the session says so (STARTTLS) or at
//! once on the implicit-TLS listener, and the upstream's (`UpstreamTls`) before the client's
//! conversation is relayed: the proxy then greets the upstream itself (EHLO, STARTTLS,
//! handshake) and the session greets the client on its own.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Instant;

use super::io::{self as stream_io, Ready, Rewound, Stream};
use super::observe::{self, ConnectionId};
use super::transaction;
use super::upstream::{self, ClientInfo, TlsStep};
use crate::config::{Settings, UpstreamTls};
use crate::filter::verdict::format_reply;
use crate::ops::metrics::UpstreamStage;
use crate::protocol::line::{Framed, LineReader, COMMAND_LINE_LIMIT};
use crate::protocol::reply::{Reply, ReplyAssembler, ReplyError};
use crate::protocol::session::{Action, Policy, Session, TlsPolicy};
use crate::proxy::tls::{self, ClientTls, ServerTls, Tls, TlsInfo};

pub const REPLY_UPSTREAM_UNAVAILABLE: &[u8] =
    b"421 4.4.1 Upstream server unavailable, try again later\r\n";
pub const REPLY_TIMEOUT: &[u8] = b"421 4.4.2 Timeout exceeded, closing connection\r\n";
pub const REPLY_UPSTREAM_LOST: &[u8] = b"421 4.4.2 Upstream connection lost\r\n";
pub const REPLY_SHUTTING_DOWN: &[u8] = b"421 4.3.2 Service shutting down\r\n";
pub const REPLY_UPSTREAM_PROTOCOL: &[u8] =
    b"421 4.5.0 Upstream protocol error, closing connection\r\n";

/// Upstream reply lines are limited far above what any server sends (RFC 5321 says 512).
const REPLY_LINE_LIMIT: usize = 16 * 1024;
pub(super) const READ_BUFFER: usize = 16 * 1024;

/// Why a connection ended early.
#[derive(Debug)]
pub enum Fatal {
    ClientGone,
    ClientTimeout,
    /// The upstream failed; the client has been told (or cannot be).
    Upstream(String),
    /// The upstream cannot be used before the client is greeted (its TLS failed).
    UpstreamUnavailable(String),
    /// The upstream said something out of turn (a reply before our command or before the
    /// end of the message): nothing it says can be trusted to match a command any more.
    UpstreamProtocol(String),
    Shutdown,
}

/// The two sides of one proxied connection and their buffers.
pub struct Conn {
    pub id: ConnectionId,
    pub settings: Arc<Settings>,
    pub info: ClientInfo,
    pub client: Stream,
    pub client_buf: BytesMut,
    client_lines: LineReader,
    pub client_eof: bool,
    /// The client's TLS, once established.
    pub tls: Option<TlsInfo>,
    pub upstream: Stream,
    pub server: String,
    /// The name the upstream's TLS certificate must carry.
    upstream_tls_name: String,
    upstream_buf: BytesMut,
    upstream_lines: LineReader,
    assembler: ReplyAssembler,
    /// When the upstream last saw traffic from us, for KeepAlives.
    pub upstream_active: Instant,
}

impl Conn {
    pub async fn send_client(&mut self, bytes: &[u8]) -> Result<(), Fatal> {
        observe::replies_sent(bytes);
        let timeout = self.settings.timeout;
        match tokio::time::timeout(timeout, self.client.write_all(bytes)).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(Fatal::ClientGone),
        }
    }

    /// Sends a command (or the last part of a message, with its terminating dot) whose reply
    /// comes next. Anything the upstream has sent before it cannot be that reply: it is a
    /// protocol error, never relayed as the answer.
    pub async fn send_command(&mut self, bytes: &[u8], stage: UpstreamStage) -> Result<(), Fatal> {
        self.ensure_upstream_silent(stage)?;
        self.send_upstream(bytes, stage).await
    }

    /// Fails when the upstream has sent anything not yet taken as a reply.
    pub fn ensure_upstream_silent(&mut self, stage: UpstreamStage) -> Result<(), Fatal> {
        let early = !self.upstream_buf.is_empty()
            || match stream_io::read_ready(&mut self.upstream, &mut self.upstream_buf) {
                Ready::Nothing => false,
                Ready::Data => true,
                Ready::Closed => {
                    return Err(upstream_failure(
                        stage,
                        "server disconnected unexpectedly".into(),
                    ))
                }
            };
        if early {
            return Err(protocol_error(
                stage,
                format!(
                    "protocol error: the server spoke out of turn before our {}",
                    stage.as_str()
                ),
            ));
        }
        Ok(())
    }

    /// Whether the client has closed its side (it would get no reply any more). Bytes it
    /// sent stay where they are for the next read.
    pub fn client_gone(&mut self) -> bool {
        if self.client_eof {
            return true;
        }
        if stream_io::read_ready(&mut self.client, &mut self.client_buf) == Ready::Closed {
            self.client_eof = true;
        }
        self.client_eof
    }

    pub async fn send_upstream(&mut self, bytes: &[u8], stage: UpstreamStage) -> Result<(), Fatal> {
        let timeout = self.settings.timeout;
        self.upstream_active = Instant::now();
        match tokio::time::timeout(timeout, self.upstream.write_all(bytes)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(upstream_failure(stage, format!("write failed: {e}"))),
            Err(_) => Err(upstream_failure(stage, "write timed out".into())),
        }
    }

    /// Takes the next complete reply already buffered, if any.
    fn buffered_reply(&mut self) -> Result<Option<Reply>, String> {
        while let Some(framed) = self.upstream_lines.next(&mut self.upstream_buf) {
            let line = match framed {
                Framed::Line(line) => line,
                Framed::TooLong => return Err("reply line too long".into()),
            };
            if let Some(reply) = self.assembler.push(line).map_err(|e| match e {
                ReplyError::TooManyLines => "reply has too many lines".to_string(),
                ReplyError::Malformed => "malformed reply".to_string(),
            })? {
                return Ok(Some(reply));
            }
        }
        Ok(None)
    }

    /// Reads one complete (multi-line) reply, waiting at most TimeOut.
    pub async fn read_reply(&mut self, stage: UpstreamStage) -> Result<Reply, Fatal> {
        let deadline = Instant::now() + self.settings.timeout;
        loop {
            match self.buffered_reply() {
                Ok(Some(reply)) => {
                    crate::ops::metrics::upstream_reply(stage, self.upstream_active);
                    return Ok(reply);
                }
                Ok(None) => {}
                Err(e) => return Err(upstream_failure(stage, e)),
            }
            self.upstream_buf.reserve(READ_BUFFER);
            match tokio::time::timeout_at(deadline, self.upstream.read_buf(&mut self.upstream_buf))
                .await
            {
                Ok(Ok(0)) => {
                    return Err(upstream_failure(
                        stage,
                        "server disconnected unexpectedly".into(),
                    ))
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(upstream_failure(stage, format!("read failed: {e}"))),
                Err(_) => {
                    return Err(upstream_failure(
                        stage,
                        "network operation timed out".into(),
                    ))
                }
            }
        }
    }

    /// Sends a command of our own and reads its whole reply.
    pub async fn command(&mut self, line: &[u8], stage: UpstreamStage) -> Result<Reply, Fatal> {
        self.send_command(line, stage).await?;
        self.read_reply(stage).await
    }

    /// Sends a NOOP when the upstream has been quiet for KeepAlives seconds.
    pub async fn keepalive_if_due(&mut self) -> Result<(), Fatal> {
        if let Some(interval) = self.settings.keep_alives {
            if self.upstream_active.elapsed() >= interval {
                self.command(b"NOOP\r\n", UpstreamStage::Data).await?;
            }
        }
        Ok(())
    }

    /// When the next keepalive is due, if KeepAlives is on.
    pub fn next_keepalive(&self) -> Option<Instant> {
        self.settings
            .keep_alives
            .map(|interval| self.upstream_active + interval)
    }

    /// Reads more client bytes into the buffer; waits at most until `deadline`, sending
    /// keepalives upstream meanwhile. Returns the number of bytes read (0 = the client
    /// closed).
    pub async fn read_client(&mut self, deadline: Instant) -> Result<usize, Fatal> {
        loop {
            self.client_buf.reserve(READ_BUFFER);
            let wake = match self.next_keepalive() {
                Some(at) if at < deadline => at,
                _ => deadline,
            };
            match tokio::time::timeout_at(wake, self.client.read_buf(&mut self.client_buf)).await {
                Ok(Ok(n)) => return Ok(n),
                Ok(Err(_)) => return Err(Fatal::ClientGone),
                Err(_) if wake >= deadline => return Err(Fatal::ClientTimeout),
                Err(_) => self.keepalive_if_due().await?,
            }
        }
    }
}

pub fn upstream_failure(stage: UpstreamStage, reason: String) -> Fatal {
    crate::ops::metrics::global().upstream_error(stage);
    Fatal::Upstream(reason)
}

pub fn protocol_error(stage: UpstreamStage, reason: String) -> Fatal {
    crate::ops::metrics::global().upstream_error(stage);
    Fatal::UpstreamProtocol(reason)
}

/// Everything a connection needs from the server.
pub struct Shared {
    pub settings: watch::Receiver<Arc<Settings>>,
    /// Set when draining starts: idle sessions are closed with 421.
    pub shutdown: watch::Receiver<bool>,
    /// Set at the drain deadline: every session is ended with 421.
    pub hard_stop: watch::Receiver<bool>,
    pub tls: Arc<Tls>,
}

/// Runs a TLS handshake as the server on `stream`, `received` being bytes already read
/// from it.
async fn accept_tls(
    server: &ServerTls,
    stream: Stream,
    received: Bytes,
    timeout: std::time::Duration,
) -> Result<Stream, String> {
    let acceptor = server
        .acceptor()
        .ok_or_else(|| "no TLS certificate loaded".to_string())?;
    let handshake = acceptor.accept(Rewound::new(received, stream));
    match tokio::time::timeout(timeout, handshake).await {
        Ok(Ok(tls)) => Ok(Stream::TlsServer(Box::new(tls))),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

/// Logs and counts an established TLS session.
fn tls_established(id: ConnectionId, side: &str, info: &TlsInfo) {
    tracing::info!(
        tls_side = side,
        tls_version = info.version,
        tls_cipher = %info.cipher,
        "{id}: {side} TLS established: {} {}",
        info.version,
        info.cipher
    );
    crate::ops::metrics::global().tls_session(side, info.version);
}

impl Conn {
    /// The client's STARTTLS was answered 220: the handshake, on a clean slate.
    async fn start_client_tls(&mut self, server: &ServerTls) -> Result<(), Fatal> {
        // Anything after the STARTTLS line came in clear text before the handshake; taking
        // it as commands under TLS is the STARTTLS command-injection attack.
        if !self.client_buf.is_empty() {
            tracing::warn!(
                "{}: discarded {} bytes the client sent after STARTTLS",
                self.id,
                self.client_buf.len()
            );
        }
        self.client_buf.clear();
        self.client_lines = LineReader::new(COMMAND_LINE_LIMIT);
        let stream = self.client.detach();
        match accept_tls(server, stream, Bytes::new(), self.settings.timeout).await {
            Ok(stream) => {
                self.client = stream;
                self.tls = self.client.tls_info();
                if let Some(info) = &self.tls {
                    tls_established(self.id, "client", info);
                }
                Ok(())
            }
            Err(e) => {
                tracing::warn!("{}: client TLS handshake failed: {e}", self.id);
                crate::ops::metrics::global().tls_handshake_failure("client");
                Err(Fatal::ClientGone)
            }
        }
    }

    /// `UpstreamTls`: greets the upstream and starts TLS with it when it can (or must).
    async fn start_upstream_tls(&mut self, client: &ClientTls) -> Result<Greeting, String> {
        let result = self.negotiate_upstream_tls(client).await;
        if let Err(Refusal::Tls(_)) = &result {
            // Read and write failures were counted at their stage already.
            crate::ops::metrics::global().upstream_error(UpstreamStage::Connect);
        }
        result.map_err(|r| match r {
            Refusal::Io(reason) | Refusal::Tls(reason) => reason,
        })
    }

    async fn negotiate_upstream_tls(&mut self, client: &ClientTls) -> Result<Greeting, Refusal> {
        let mode = self.settings.upstream_tls;
        let fail = |f: Fatal| {
            Refusal::Io(match f {
                Fatal::Upstream(reason) => reason,
                other => format!("{other:?}"),
            })
        };
        let greeting = self
            .read_reply(UpstreamStage::Greeting)
            .await
            .map_err(fail)?;
        if greeting.code != 220 {
            // A refusal: the client sees it as the greeting, as without TLS.
            return Ok(Greeting::Read(greeting));
        }
        let ehlo = format!("EHLO {}\r\n", local_name());
        let reply = self
            .command(ehlo.as_bytes(), UpstreamStage::Greeting)
            .await
            .map_err(fail)?;
        match upstream::after_ehlo(mode, &reply) {
            TlsStep::Go => {}
            TlsStep::Plain => {
                tracing::info!(
                    "{}: SERVER: no STARTTLS offered, going on in clear text",
                    self.id
                );
                return Ok(Greeting::Consumed);
            }
            TlsStep::Fail(reason) => return Err(Refusal::Tls(reason)),
        }
        let reply = self
            .command(b"STARTTLS\r\n", UpstreamStage::Greeting)
            .await
            .map_err(fail)?;
        match upstream::after_starttls(mode, &reply) {
            TlsStep::Go => {}
            TlsStep::Plain => {
                tracing::warn!(
                    "{}: SERVER: STARTTLS refused ({}), going on in clear text",
                    self.id,
                    reply.code
                );
                return Ok(Greeting::Consumed);
            }
            TlsStep::Fail(reason) => return Err(Refusal::Tls(reason)),
        }
        if !self.upstream_buf.is_empty() {
            // Replies cannot be pipelined behind 220 to STARTTLS: someone injected them.
            return Err(Refusal::Tls(
                "the upstream sent data after its 220 to STARTTLS".into(),
            ));
        }
        let connector = client
            .connector(&self.settings)
            .map_err(|e| Refusal::Tls(e.to_string()))?;
        let name =
            tls::server_name(&self.upstream_tls_name).map_err(|e| Refusal::Tls(e.to_string()))?;
        let stream = self.upstream.detach();
        let handshake = connector.connect(name, stream);
        let result = match tokio::time::timeout(self.settings.timeout, handshake).await {
            Ok(Ok(tls)) => Ok(Stream::TlsClient(Box::new(tls))),
            Ok(Err(e)) => Err(format!("TLS handshake failed: {e}")),
            Err(_) => Err("TLS handshake timed out".into()),
        };
        match result {
            Ok(stream) => {
                self.upstream = stream;
                self.upstream_lines = LineReader::new(REPLY_LINE_LIMIT);
                self.assembler = ReplyAssembler::default();
                self.upstream_active = Instant::now();
                if let Some(info) = self.upstream.tls_info() {
                    tls_established(self.id, "upstream", &info);
                }
                Ok(Greeting::Consumed)
            }
            Err(e) => {
                crate::ops::metrics::global().tls_handshake_failure("upstream");
                Err(Refusal::Tls(e))
            }
        }
    }
}

/// Why the proxy's STARTTLS with the upstream did not happen.
enum Refusal {
    /// Reading or writing failed (already counted).
    Io(String),
    /// The upstream or its certificate is not acceptable.
    Tls(String),
}

/// How the upstream's greeting was dealt with before relaying began.
enum Greeting {
    /// Not read yet: the session relays it.
    Pending,
    /// Read by the proxy: the session relays this reply as the greeting.
    Read(Reply),
    /// Read and answered by the proxy (EHLO, maybe STARTTLS): the session greets the client.
    Consumed,
}

/// The name the proxy gives itself in its EHLO to the upstream.
fn local_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|n| n.into_string().ok())
        .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_graphic()))
        .unwrap_or_else(|| "localhost".into())
}

/// Serves one accepted client until it leaves.
pub async fn serve(
    mut client: Stream,
    info: ClientInfo,
    mut received: BytesMut,
    id: ConnectionId,
    mut shared: Shared,
) {
    let settings = shared.settings.borrow().clone();
    let peer = info
        .peer
        .map(|p| p.ip().to_string())
        .unwrap_or_else(|| "unix".into());
    tracing::info!("{id}: accepted connection from: {peer}");

    let mut client_tls = None;
    if info.implicit_tls {
        let prefix = received.split().freeze();
        match accept_tls(&shared.tls.server, client, prefix, settings.timeout).await {
            Ok(stream) => {
                client = stream;
                client_tls = client.tls_info();
                if let Some(tls) = &client_tls {
                    tls_established(id, "client", tls);
                }
            }
            Err(e) => {
                tracing::warn!("{id}: client TLS handshake failed: {e}");
                crate::ops::metrics::global().tls_handshake_failure("client");
                return;
            }
        }
    }

    let upstream = match upstream::connect(&settings, &info, settings.timeout).await {
        Ok(u) => u,
        Err(e) => {
            tracing::error!("{id}: SERVER: couldn't connect to upstream: {e}");
            crate::ops::metrics::global().upstream_error(UpstreamStage::Connect);
            observe::replies_sent(REPLY_UPSTREAM_UNAVAILABLE);
            let _ = tokio::time::timeout(
                settings.timeout,
                client.write_all(REPLY_UPSTREAM_UNAVAILABLE),
            )
            .await;
            let _ = client.shutdown().await;
            return;
        }
    };
    tracing::debug!("{id}: SERVER connected to: {}", upstream.server);

    let mut conn = Conn {
        id,
        settings,
        info,
        client,
        client_buf: received,
        client_lines: LineReader::new(COMMAND_LINE_LIMIT),
        client_eof: false,
        tls: client_tls,
        upstream: upstream.stream,
        server: upstream.server,
        upstream_tls_name: upstream.tls_name,
        upstream_buf: BytesMut::with_capacity(READ_BUFFER),
        upstream_lines: LineReader::new(REPLY_LINE_LIMIT),
        assembler: ReplyAssembler::default(),
        upstream_active: Instant::now(),
    };
    let mut hard_stop = shared.hard_stop.clone();
    let result = tokio::select! {
        result = relay(&mut conn, &mut shared) => result,
        _ = hard_stop.wait_for(|stop| *stop) => Err(Fatal::Shutdown),
    };
    match result {
        Ok(()) | Err(Fatal::ClientGone) => {}
        Err(Fatal::ClientTimeout) => {
            tracing::error!("{id}: network operation timed out");
            let _ = conn.send_client(REPLY_TIMEOUT).await;
        }
        Err(Fatal::Upstream(reason)) => {
            tracing::error!("{id}: {reason}");
            let _ = conn.send_client(REPLY_UPSTREAM_LOST).await;
        }
        Err(Fatal::UpstreamProtocol(reason)) => {
            tracing::error!("{id}: SERVER: {reason}");
            let _ = conn.send_client(REPLY_UPSTREAM_PROTOCOL).await;
        }
        Err(Fatal::UpstreamUnavailable(reason)) => {
            tracing::error!("{id}: SERVER: upstream TLS: {reason}");
            let _ = conn.send_client(REPLY_UPSTREAM_UNAVAILABLE).await;
            if !matches!(conn.upstream, Stream::Detached) {
                let _ = conn
                    .send_upstream(b"QUIT\r\n", UpstreamStage::Connect)
                    .await;
            }
        }
        Err(Fatal::Shutdown) => {
            let _ = conn.send_client(REPLY_SHUTTING_DOWN).await;
        }
    }
    let _ = conn.client.shutdown().await;
    let _ = conn.upstream.shutdown().await;
}

fn policy(settings: &Settings, info: &ClientInfo) -> Policy {
    Policy {
        filter_type: settings.filter_type,
        filter_reject_reply: format_reply(&settings.filter_reject).into_bytes(),
        skip_authenticated: settings.skip_authenticated,
        xclient: settings.xclient,
        client_ip: info.peer.map(|p| p.ip()),
    }
}

fn tls_policy(settings: &Settings, tls: &Tls, conn: &Conn) -> TlsPolicy {
    TlsPolicy {
        offer_starttls: tls.server.has_certificate(),
        required: settings.tls_required,
        implicit: conn.tls.is_some(),
    }
}

/// When each side must have finished what it owes: the client its next whole command
/// line, the upstream its whole reply. TimeOut bounds each of these as a whole, not each
/// read, so a peer sending a byte at a time cannot hold a session (and its upstream
/// connection) for ever.
struct Deadlines {
    client: Instant,
    upstream: Instant,
}

impl Deadlines {
    fn new(timeout: std::time::Duration) -> Deadlines {
        let now = Instant::now();
        Deadlines {
            client: now + timeout,
            upstream: now + timeout,
        }
    }
}

/// The command phase: relays until either side leaves.
async fn relay(conn: &mut Conn, shared: &mut Shared) -> Result<(), Fatal> {
    let greeting = match conn.settings.upstream_tls {
        UpstreamTls::Off => Greeting::Pending,
        _ => conn
            .start_upstream_tls(&shared.tls.client)
            .await
            .map_err(Fatal::UpstreamUnavailable)?,
    };
    let mut session = Session::with_tls(
        policy(&conn.settings, &conn.info),
        tls_policy(&conn.settings, &shared.tls, conn),
    );
    let mut deadlines = Deadlines::new(conn.settings.timeout);
    match greeting {
        Greeting::Pending => {}
        Greeting::Read(reply) => session.upstream_reply(reply),
        Greeting::Consumed => session.upstream_greeted(),
    }
    perform(conn, &mut session, shared, &mut deadlines).await?;
    let mut draining = *shared.shutdown.borrow();
    loop {
        // Feed every complete client line the session can take now.
        while session.accepts_client_input() {
            let framed = match conn.client_lines.next(&mut conn.client_buf) {
                Some(f) => Some(f),
                // An unterminated command from a client that left is never forwarded: the
                // upstream would wait for its end.
                None if conn.client_eof => {
                    conn.client_buf.clear();
                    None
                }
                None => None,
            };
            match framed {
                Some(Framed::Line(line)) => {
                    trace_line(conn.id, "CLIENT <", &line);
                    session.client_line(line);
                }
                Some(Framed::TooLong) => session.client_line_too_long(),
                None => break,
            }
            deadlines.client = Instant::now() + conn.settings.timeout;
            perform(conn, &mut session, shared, &mut deadlines).await?;
        }
        // Replies already buffered are handled before waiting for more input.
        match conn.buffered_reply() {
            Ok(Some(reply)) => {
                crate::ops::metrics::upstream_reply(stage_of(&session), conn.upstream_active);
                session.upstream_reply(reply);
                deadlines.upstream = Instant::now() + conn.settings.timeout;
                perform(conn, &mut session, shared, &mut deadlines).await?;
                continue;
            }
            Ok(None) => {}
            Err(e) => return Err(upstream_failure(UpstreamStage::Command, e)),
        }
        if conn.client_eof && !session.awaiting_upstream() {
            return Ok(());
        }
        if draining && session.is_idle() {
            return Err(Fatal::Shutdown);
        }

        let want_client = session.accepts_client_input() && !conn.client_eof;
        let awaiting_upstream = session.awaiting_upstream();
        let due = if awaiting_upstream {
            deadlines.upstream
        } else {
            deadlines.client
        };
        conn.client_buf.reserve(READ_BUFFER);
        conn.upstream_buf.reserve(READ_BUFFER);
        tokio::select! {
            read = conn.client.read_buf(&mut conn.client_buf), if want_client => {
                match read {
                    Ok(0) | Err(_) => conn.client_eof = true,
                    Ok(_) => {}
                }
            }
            read = conn.upstream.read_buf(&mut conn.upstream_buf) => {
                match read {
                    Ok(0) | Err(_) => {
                        // Whatever the upstream said last has been relayed; a client still
                        // waiting for an answer gets a 421 rather than a silent close.
                        if awaiting_upstream {
                            return Err(upstream_failure(stage_of(&session), "server disconnected unexpectedly".into()));
                        }
                        return Ok(());
                    }
                    Ok(_) => {}
                }
            }
            _ = tokio::time::sleep_until(due) => {
                if awaiting_upstream {
                    return Err(upstream_failure(stage_of(&session), "network operation timed out".into()));
                }
                return Err(Fatal::ClientTimeout);
            }
            changed = shared.shutdown.changed(), if !draining => {
                draining = changed.is_err() || *shared.shutdown.borrow();
            }
        }
    }
}

/// Which stage an upstream failure in the command phase belongs to.
fn stage_of(session: &Session) -> UpstreamStage {
    if session.awaiting_greeting() {
        UpstreamStage::Greeting
    } else {
        UpstreamStage::Command
    }
}

/// Carries out the session's actions in order.
async fn perform(
    conn: &mut Conn,
    session: &mut Session,
    shared: &Shared,
    deadlines: &mut Deadlines,
) -> Result<(), Fatal> {
    loop {
        let actions = session.take_actions();
        if actions.is_empty() {
            return Ok(());
        }
        for action in actions {
            match action {
                Action::ToUpstream(bytes) => {
                    trace_line(conn.id, "SERVER >", &bytes);
                    conn.send_command(&bytes, stage_of(session)).await?;
                    deadlines.upstream = Instant::now() + conn.settings.timeout;
                }
                Action::ToClient(bytes) => {
                    trace_line(conn.id, "CLIENT >", &bytes);
                    conn.send_client(&bytes).await?;
                    // The client's turn begins with our answer.
                    deadlines.client = Instant::now() + conn.settings.timeout;
                }
                Action::UpstreamProtocolError(reason) => {
                    return Err(protocol_error(stage_of(session), reason));
                }
                Action::PolicyReject => observe::policy_reject(conn, session.envelope()),
                Action::BeginData(mode) => {
                    // A reloaded configuration applies from the next message on.
                    conn.settings = shared.settings.borrow().clone();
                    let result = transaction::run(conn, session.envelope(), mode).await;
                    session.transaction_done();
                    result?;
                    deadlines.client = Instant::now() + conn.settings.timeout;
                }
                Action::StartTls => {
                    conn.start_client_tls(&shared.tls.server).await?;
                    session.tls_established();
                }
            }
        }
    }
}

/// The original's debug trace of every relayed line, cut at 79 characters.
fn trace_line(id: ConnectionId, direction: &str, bytes: &Bytes) {
    if tracing::enabled!(tracing::Level::DEBUG) {
        for line in bytes.split_inclusive(|&b| b == b'\n') {
            let text = String::from_utf8_lossy(crate::protocol::line::trim_line_end(line));
            let cut = observe::printable(&text.chars().take(79).collect::<String>());
            tracing::debug!("{id}: {direction} {cut}");
        }
    }
}
