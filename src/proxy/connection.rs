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

use super::conn::{
    protocol_error, upstream_failure, Conn, Fatal, COMMAND_READ, REPLY_SHUTTING_DOWN,
    REPLY_TIMEOUT, REPLY_UPSTREAM_LOST, REPLY_UPSTREAM_PROTOCOL, REPLY_UPSTREAM_UNAVAILABLE,
};
use super::io::{Rewound, Stream};
use super::milter::MilterChain;
use super::observe::{self, ConnectionId};
use super::signal::FlagSet;
use super::tls::{self, ClientTls, ServerTls, Tls, TlsInfo};
use super::transaction;
use super::upstream::{self, ClientInfo, TlsStep};
use crate::config::milter::MilterDefaults;
use crate::config::{Settings, UpstreamTls};
use crate::filter::verdict::format_reply;
use crate::ops::metrics::UpstreamStage;
use crate::protocol::line::trim_line_end;
use crate::protocol::relay::{End, Relay, Stage, Step};
use crate::protocol::reply::Reply;
use crate::protocol::session::{EnvelopeCommand, Policy, Session, TlsPolicy};

/// Everything a connection needs from the server.
pub(crate) struct Shared {
    pub(crate) settings: watch::Receiver<Arc<Settings>>,
    /// Set when draining starts: idle sessions are closed with 421.
    pub(crate) shutdown: watch::Receiver<bool>,
    /// Set at the drain deadline: every session is ended with 421.
    pub(crate) hard_stop: watch::Receiver<bool>,
    pub(crate) tls: Arc<Tls>,
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
    /// The client's STARTTLS was answered 220 (the relay has dropped what came after it):
    /// the handshake.
    async fn start_client_tls(&mut self, server: &ServerTls) -> Result<(), Fatal> {
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
        // The name the proxy gives itself in its EHLO to the upstream.
        let ehlo = format!("EHLO {}\r\n", super::milter::host_name());
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
        if !self.relay.upstream_buf.is_empty() {
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
                self.relay.upstream_restarted();
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
    /// Read by the proxy: the session relays this reply as the greeting.
    Read(Reply),
    /// Read and answered by the proxy (EHLO, maybe STARTTLS): the session greets the client.
    Consumed,
}

/// Serves one accepted client until it leaves.
pub(crate) async fn serve(
    mut client: Stream,
    info: ClientInfo,
    mut received: BytesMut,
    id: ConnectionId,
    shared: Shared,
) {
    let settings = shared.settings.borrow().clone();
    tracing::info!(
        "{id}: accepted connection from: {}",
        Peer(info.peer.map(|p| p.ip()))
    );

    let mut client_tls = None;
    if info.implicit_tls {
        let prefix = received.split().freeze();
        match Box::pin(accept_tls(
            &shared.tls.server,
            client,
            prefix,
            settings.timeout,
        ))
        .await
        {
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

    // Checked at start and reload, so only a hook file that broke since can fail here;
    // mail is then refused for now, never let through unfiltered.
    let hooks = match super::hook::hooks_for(&settings) {
        Ok(hooks) => hooks,
        Err(e) => {
            tracing::error!("{id}: {e}");
            observe::replies_sent(REPLY_FILTER_UNAVAILABLE);
            let _ =
                tokio::time::timeout(settings.timeout, client.write_all(REPLY_FILTER_UNAVAILABLE))
                    .await;
            let _ = client.shutdown().await;
            return;
        }
    };

    let upstream = match Box::pin(upstream::connect(&settings, &info, settings.timeout)).await {
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

    let session = Session::with_tls(
        policy(&settings, &info),
        tls_policy(&settings, &shared.tls, client_tls.is_some()),
    );
    let mut core = Relay::new(session, settings.timeout, std::time::Instant::now());
    core.client_buf = received;
    core.upstream_buf = upstream.received;
    let milters = milter_chain(&settings);
    // With milters or hooks, each MAIL and RCPT waits for their verdict before it goes
    // upstream (and is recorded for them and for shadow filters).
    core.check_envelope(
        milters.is_some() || hooks.is_some() || super::transaction::shadows_configured(&settings),
    );
    core.trace_client_lines(tracing::enabled!(tracing::Level::DEBUG));
    let mut conn = Conn {
        id,
        settings,
        info,
        client,
        tls: client_tls,
        upstream: upstream.stream,
        server: upstream.server,
        upstream_tls_name: upstream.tls_name,
        relay: core,
        upstream_active: Instant::now(),
        milters,
        hooks,
        lines: Default::default(),
        defer_message_log: false,
        deferred: None,
        close_after_reply: None,
    };
    let hard_stop = FlagSet::new(&shared.hard_stop);
    let result = tokio::select! {
        result = run(&mut conn, &shared) => result,
        () = hard_stop => Err(Fatal::Shutdown),
    };
    match result {
        Ok(()) | Err(Fatal::Done) | Err(Fatal::ClientGone) => {}
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
    close(&mut conn.client).await;
    close(&mut conn.upstream).await;
    if let Some(chain) = conn.milters.take() {
        Box::pin(chain.quit()).await;
    }
}

/// Ends one side of a finished session now, not when the session is dropped (after its
/// milters are told). A plain socket is just closed: the close sends the FIN that a
/// `shutdown` would, without the extra system call. A TLS stream first sends its
/// close_notify.
async fn close(stream: &mut Stream) {
    let mut stream = stream.detach();
    if matches!(stream, Stream::TlsServer(_) | Stream::TlsClient(_)) {
        let _ = stream.shutdown().await;
    }
}

const REPLY_FILTER_UNAVAILABLE: &[u8] = b"421 4.3.0 Filter unavailable, try again later\r\n";

/// The session's milters, from the settings at its start.
fn milter_chain(settings: &Settings) -> Option<MilterChain> {
    if settings.milters.is_empty() {
        return None;
    }
    let defaults = MilterDefaults {
        connect_timeout: settings.milter_connect_timeout,
        command_timeout: settings.milter_command_timeout,
        content_timeout: settings.milter_content_timeout,
        default_action: settings.milter_default_action,
    };
    // Shadow milters get a connection of their own per message (see transaction::shadow).
    let configs: Vec<_> = settings
        .milters
        .iter()
        .filter(|m| !m.shadow)
        .map(|m| m.resolve(&defaults))
        .collect();
    if configs.is_empty() {
        return None;
    }
    Some(MilterChain::new(configs, settings.milter_protocol))
}

/// The client's address as logged, written only when the line is.
struct Peer(Option<std::net::IpAddr>);

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(ip) => ip.fmt(f),
            None => f.write_str("unix"),
        }
    }
}

/// `FilterReject` as a reply, formatted once per value rather than for every session.
fn filter_reject_reply(text: &str) -> Bytes {
    static LAST: std::sync::Mutex<Option<(String, Bytes)>> = std::sync::Mutex::new(None);
    let mut last = LAST
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    match &*last {
        Some((formatted, reply)) if formatted == text => reply.clone(),
        _ => {
            let reply = Bytes::from(format_reply(text));
            *last = Some((text.to_string(), reply.clone()));
            reply
        }
    }
}

fn policy(settings: &Settings, info: &ClientInfo) -> Policy {
    Policy {
        filter_type: settings.filter_type,
        filter_reject_reply: filter_reject_reply(&settings.filter_reject),
        skip_authenticated: settings.skip_authenticated,
        xclient: settings.xclient,
        client_ip: info.peer.map(|p| p.ip()),
    }
}

fn tls_policy(settings: &Settings, tls: &Tls, implicit: bool) -> TlsPolicy {
    TlsPolicy {
        offer_starttls: tls.server.has_certificate(),
        required: settings.tls_required,
        implicit,
    }
}

/// The command phase: pumps bytes between the sockets and the relay and carries out its
/// steps until the connection ends.
async fn run(conn: &mut Conn, shared: &Shared) -> Result<(), Fatal> {
    match conn.settings.upstream_tls {
        UpstreamTls::Off => {}
        _ => match Box::pin(conn.start_upstream_tls(&shared.tls.client))
            .await
            .map_err(Fatal::UpstreamUnavailable)?
        {
            Greeting::Read(reply) => conn.relay.greeting_read(reply),
            Greeting::Consumed => conn.relay.greeting_consumed(),
        },
    }
    let mut draining = false;
    // One wait for the whole session (see [`FlagSet`]). A closed channel drains too.
    let mut drain_starts = FlagSet::new(&shared.shutdown);
    // One timer for the session, moved to each exchange's deadline: a new timer per
    // exchange would be entered into and taken out of the runtime's shared wheel each time.
    let timer = tokio::time::sleep_until(Instant::from_std(conn.relay.wants().deadline));
    tokio::pin!(timer);
    loop {
        while let Some(step) = conn.relay.next_step(std::time::Instant::now()) {
            perform(conn, step, shared).await?;
        }
        // Before any more reading: a drain set meanwhile comes first.
        if !draining && drain_starts.is_set() {
            draining = true;
            conn.relay.drain();
            continue;
        }
        let wants = conn.relay.wants();
        let deadline = Instant::from_std(wants.deadline);
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        let Relay {
            client_buf,
            upstream_buf,
            ..
        } = &mut conn.relay;
        room_for_commands(client_buf);
        room_for_commands(upstream_buf);
        tokio::select! {
            read = conn.client.read_buf(client_buf), if wants.client => {
                if matches!(read, Ok(0) | Err(_)) {
                    conn.relay.client_closed();
                }
            }
            read = conn.upstream.read_buf(upstream_buf) => {
                if matches!(read, Ok(0) | Err(_)) {
                    conn.relay.upstream_closed();
                }
            }
            () = &mut timer => conn.relay.timed_out(),
            () = &mut drain_starts, if !draining => {
                draining = true;
                conn.relay.drain();
            }
        }
    }
}

/// Read room for the command phase ([`COMMAND_READ`]). A larger buffer left by a message is
/// given back once it is empty; the space of lines already taken is reused when nothing
/// holds them any more.
fn room_for_commands(buf: &mut BytesMut) {
    if buf.is_empty() && buf.capacity() > COMMAND_READ {
        *buf = BytesMut::new();
    }
    buf.reserve(COMMAND_READ);
}

fn upstream_stage(stage: Stage) -> UpstreamStage {
    match stage {
        Stage::Greeting => UpstreamStage::Greeting,
        Stage::Command => UpstreamStage::Command,
    }
}

/// Carries out one step of the relay.
async fn perform(conn: &mut Conn, step: Step, shared: &Shared) -> Result<(), Fatal> {
    match step {
        Step::ToUpstream(bytes) => {
            trace_line(conn.id, "SERVER >", &bytes);
            let stage = upstream_stage(conn.relay.stage());
            conn.send_command(&bytes, stage).await
        }
        Step::ToClient(bytes) => {
            trace_line(conn.id, "CLIENT >", &bytes);
            conn.send_client(&bytes).await?;
            // That reply itself (the same buffer), not the next one written: with
            // pipelining, replies owed to earlier commands go out first.
            let closes = conn
                .close_after_reply
                .as_ref()
                .is_some_and(|r| r.as_ptr() == bytes.as_ptr() && r.len() == bytes.len());
            if closes {
                tracing::info!("{}: closing the session as a hook asked", conn.id);
                return Err(Fatal::Done);
            }
            Ok(())
        }
        Step::ClientLine(line) => {
            trace_line(conn.id, "CLIENT <", &line);
            Ok(())
        }
        Step::Replied { stage, .. } => {
            crate::ops::metrics::upstream_reply(upstream_stage(stage), conn.upstream_active);
            Ok(())
        }
        Step::PolicyReject => {
            observe::policy_reject(conn, conn.relay.envelope());
            Ok(())
        }
        Step::CheckEnvelope { command, line } => {
            match command {
                EnvelopeCommand::Mail => conn.lines.mail(&line),
                EnvelopeCommand::Rcpt => {
                    let address =
                        crate::protocol::command::envelope_address(&line).unwrap_or_default();
                    conn.lines.rcpts.push((address, line.to_vec()));
                }
            }
            let mut refusal = match conn.milters.take() {
                Some(mut chain) => {
                    let client = conn.milter_client();
                    let refusal = Box::pin(chain.envelope(command, &line, &client)).await;
                    conn.milters = Some(chain);
                    refusal
                }
                None => None,
            };
            let mut disconnect = false;
            if refusal.is_none() {
                if let Some((reply, close)) = hooks_envelope(conn, command, &line).await {
                    refusal = Some(reply);
                    disconnect = close;
                }
            }
            if let Some(reply) = &refusal {
                tracing::info!(
                    "{}: filter refused {}: {}",
                    conn.id,
                    observe::printable(&String::from_utf8_lossy(trim_line_end(&line))),
                    observe::printable(&String::from_utf8_lossy(trim_line_end(reply)))
                );
            }
            let refusal = refusal.map(Bytes::from);
            if disconnect {
                conn.close_after_reply = refusal.clone();
            }
            conn.relay
                .envelope_checked(refusal, std::time::Instant::now());
            Ok(())
        }
        Step::BeginData(mode) => {
            // A reloaded configuration applies from the next message on.
            conn.settings = shared.settings.borrow().clone();
            conn.relay.set_timeout(conn.settings.timeout);
            let envelope = conn.relay.envelope().clone();
            let result = Box::pin(transaction::run(conn, &envelope, mode)).await;
            conn.relay.transaction_done(std::time::Instant::now());
            result
        }
        Step::StartTls { discarded } => {
            if discarded > 0 {
                tracing::warn!(
                    "{}: discarded {discarded} bytes the client sent after STARTTLS",
                    conn.id
                );
            }
            Box::pin(conn.start_client_tls(&shared.tls.server)).await?;
            conn.relay.tls_established();
            Ok(())
        }
        Step::End(End::Done) => Err(Fatal::Done),
        Step::End(End::ClientTimeout) => Err(Fatal::ClientTimeout),
        Step::End(End::Shutdown) => Err(Fatal::Shutdown),
        Step::End(End::Upstream { stage, reason }) => {
            Err(upstream_failure(upstream_stage(stage), reason))
        }
        Step::End(End::UpstreamProtocol { stage, reason }) => {
            Err(protocol_error(upstream_stage(stage), reason))
        }
    }
}

/// Asks the live hooks configured for the MAIL or RCPT stage about `line`: `None` relays
/// it, `Some((reply, disconnect))` refuses it (a refused RCPT is that recipient alone),
/// closing the session after that reply when the hook asked. A discard or a quarantine is
/// kept for the message's data stage.
async fn hooks_envelope(
    conn: &mut Conn,
    command: EnvelopeCommand,
    line: &[u8],
) -> Option<(Vec<u8>, bool)> {
    use crate::config::hook::HookStage;
    use crate::config::milter::MilterAction;
    use crate::protocol::hook::answer::Action;
    use crate::protocol::hook::request::{self, Address, Envelope as HookEnvelope};
    let hooks = conn.hooks.clone()?;
    let stage = match command {
        EnvelopeCommand::Mail => HookStage::Mail,
        EnvelopeCommand::Rcpt => HookStage::Rcpt,
    };
    if hooks.live_at(stage).next().is_none() || conn.lines.discarded_by.is_some() {
        return None;
    }
    let mail = conn.lines.mail.clone().unwrap_or_default();
    let sender = crate::protocol::command::envelope_address(&mail).unwrap_or_default();
    let from = Address::from_line(&sender, &mail);
    let mut to: Vec<Address> = Vec::new();
    if stage == HookStage::Rcpt {
        let (_, accepted) = conn.hook_envelope(conn.relay.envelope());
        to = accepted;
        let address = crate::protocol::command::envelope_address(line).unwrap_or_default();
        to.push(Address::from_line(&address, line));
    }
    let body = request::render(&conn.hook_context(stage), &HookEnvelope { from, to }, None).before;
    for hook in hooks.live_at(stage) {
        let name = hook.name().to_string();
        let (action, reply, disconnect, reason) = match hook.ask(stage, body.clone().into()).await {
            Ok(answer) => (
                answer.action,
                answer.reply.clone(),
                answer.disconnect,
                answer.reason.clone(),
            ),
            Err(e) => match hook.config.default_action {
                MilterAction::Accept => continue,
                MilterAction::Reject => (
                    Action::Reject,
                    Some(super::milter::REPLY_REJECT.to_vec()),
                    false,
                    String::new(),
                ),
                MilterAction::Tempfail => (
                    Action::Reject,
                    Some(super::milter::REPLY_TEMPFAIL.to_vec()),
                    false,
                    String::new(),
                ),
                MilterAction::Quarantine => {
                    (Action::Quarantine, None, false, format!("hook failed: {e}"))
                }
            },
        };
        match action {
            Action::Accept => {}
            Action::Reject => {
                let reply = reply.unwrap_or_else(|| super::milter::REPLY_REJECT.to_vec());
                return Some((reply, disconnect));
            }
            Action::Discard => {
                // The whole message, as for milters.
                conn.lines.discarded_by = Some(name);
                return None;
            }
            Action::Quarantine => {
                conn.lines
                    .quarantined_by
                    .get_or_insert((format!("hook {name}"), reason));
            }
        }
    }
    None
}

/// The original's debug trace of every relayed line, cut at 79 characters.
fn trace_line(id: ConnectionId, direction: &str, bytes: &Bytes) {
    if tracing::enabled!(tracing::Level::DEBUG) {
        for line in bytes.split_inclusive(|&b| b == b'\n') {
            let text = String::from_utf8_lossy(trim_line_end(line));
            let cut = observe::printable(&text.chars().take(79).collect::<String>());
            tracing::debug!("{id}: {direction} {cut}");
        }
    }
}
