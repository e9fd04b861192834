//! One proxied connection's two sides and the waiting on them: writes and reads with
//! TimeOut, the check that the upstream is silent before each command, keepalives while a
//! body is coming. What the bytes mean is the [`Relay`]'s.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use super::io::{self as stream_io, Ready, Stream};
use super::observe::{self, ConnectionId};
use super::upstream::ClientInfo;
use crate::config::Settings;
use crate::ops::metrics::UpstreamStage;
use crate::protocol::relay::Relay;
use crate::protocol::reply::Reply;
use crate::protocol::session::Envelope;
use crate::proxy::tls::TlsInfo;

pub(crate) const REPLY_UPSTREAM_UNAVAILABLE: &[u8] =
    b"421 4.4.1 Upstream server unavailable, try again later\r\n";
pub(crate) const REPLY_TIMEOUT: &[u8] = b"421 4.4.2 Timeout exceeded, closing connection\r\n";
pub(crate) const REPLY_UPSTREAM_LOST: &[u8] = b"421 4.4.2 Upstream connection lost\r\n";
pub(crate) const REPLY_SHUTTING_DOWN: &[u8] = b"421 4.3.2 Service shutting down\r\n";
pub(crate) const REPLY_UPSTREAM_PROTOCOL: &[u8] =
    b"421 4.5.0 Upstream protocol error, closing connection\r\n";

pub(super) use super::io::{COMMAND_READ, READ_BUFFER};

/// Why a connection ended early.
#[derive(Debug)]
pub(crate) enum Fatal {
    /// Not a failure: both sides are done.
    Done,
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
pub(crate) struct Conn {
    pub(crate) id: ConnectionId,
    pub(crate) settings: Arc<Settings>,
    pub(crate) info: ClientInfo,
    pub(crate) client: Stream,
    /// The client's TLS, once established.
    pub(crate) tls: Option<TlsInfo>,
    pub(crate) upstream: Stream,
    pub(crate) server: String,
    /// The name the upstream's TLS certificate must carry.
    pub(crate) upstream_tls_name: String,
    /// Both sides' unread bytes and the protocol state: every decision is made there.
    pub(crate) relay: Relay,
    /// When the upstream last saw traffic from us, for KeepAlives.
    pub(crate) upstream_active: Instant,
    /// The session's milters (`Milters`), when there are any.
    pub(crate) milters: Option<crate::proxy::milter::MilterChain>,
    /// The configured HTTP hooks (`Hooks`), when there are any.
    pub(crate) hooks: Option<std::sync::Arc<crate::proxy::hook::Hooks>>,
    /// The current transaction's MAIL and RCPT lines, as the client sent them.
    pub(crate) lines: EnvelopeLines,
    /// Shadow filters run on the current message: its log line waits for them.
    pub(crate) defer_message_log: bool,
    /// The current message's outcome, logged when its shadows are done.
    pub(crate) deferred: Option<(Envelope, crate::proxy::observe::MessageOutcome)>,
    /// Close the session once this reply is written (a hook's `disconnect`).
    pub(crate) close_after_reply: Option<bytes::Bytes>,
}

/// The envelope lines of the current transaction, as the client sent them: what the
/// hooks are told (with their ESMTP parameters) and what is sent again when a filter
/// changes the envelope. Also what the filters decided at MAIL and RCPT for the message.
#[derive(Debug, Default)]
pub(crate) struct EnvelopeLines {
    pub(crate) mail: Option<Vec<u8>>,
    /// RCPT lines by address.
    pub(crate) rcpts: Vec<(String, Vec<u8>)>,
    /// Messages begun (MAIL lines) in the session: the queue id's second part.
    pub(crate) messages: u32,
    /// The hook that discarded the message at MAIL or RCPT.
    pub(crate) discarded_by: Option<String>,
    /// The hook that quarantined the message at MAIL or RCPT, and why.
    pub(crate) quarantined_by: Option<(String, String)>,
}

impl EnvelopeLines {
    /// A new MAIL line: a new transaction.
    pub(crate) fn mail(&mut self, line: &[u8]) {
        self.mail = Some(line.to_vec());
        self.rcpts.clear();
        self.messages += 1;
        self.discarded_by = None;
        self.quarantined_by = None;
    }

    pub(crate) fn rcpt(&self, address: &str) -> Option<&[u8]> {
        self.rcpts
            .iter()
            .rev()
            .find(|(a, _)| a.eq_ignore_ascii_case(address))
            .map(|(_, l)| l.as_slice())
    }
}

impl Conn {
    /// The current message's queue id: the connection's id and the message's number (the
    /// milters' `i` macro, the hooks' `queue.id`).
    pub(crate) fn queue_id(&self) -> String {
        format!("{}.{}", self.id, self.lines.messages)
    }

    /// The context of a hook request at `stage`.
    pub(crate) fn hook_context(
        &self,
        stage: crate::config::hook::HookStage,
    ) -> crate::protocol::hook::request::Context {
        use crate::protocol::hook::request::{Client, Context, Protocol, Queue, Server, Tls};
        let client = self.milter_client();
        Context {
            stage: stage.label(),
            client: Client {
                ip: client.addr.map_or_else(String::new, |a| a.ip().to_string()),
                port: client.addr.map_or(0, |a| a.port()),
                ptr: None,
                helo: client.helo,
                active_connections: 1,
            },
            tls: client.tls.map(|(version, cipher)| Tls { version, cipher }),
            server: Server {
                name: Some(crate::proxy::hook::server_name().to_string()),
                port: self.info.local.map_or(0, |a| a.port()),
                ip: self.info.local.map(|a| a.ip().to_string()),
            },
            queue: Some(Queue {
                id: self.queue_id(),
            }),
            protocol: Protocol { version: 1 },
        }
    }

    /// The envelope a hook is told of: the sender and recipients with the parameters of
    /// the client's lines.
    pub(crate) fn hook_envelope(
        &self,
        envelope: &Envelope,
    ) -> (
        crate::protocol::hook::request::Address,
        Vec<crate::protocol::hook::request::Address>,
    ) {
        use crate::protocol::hook::request::Address;
        let sender = envelope.sender.as_deref().unwrap_or("<>");
        let from = match &self.lines.mail {
            Some(line) => Address::from_line(sender, line),
            None => Address::bare(sender),
        };
        let to = envelope
            .recipients
            .iter()
            .map(|r| match self.lines.rcpt(r) {
                Some(line) => Address::from_line(r, line),
                None => Address::bare(r),
            })
            .collect();
        (from, to)
    }

    /// The client as milters are told of it.
    pub(crate) fn milter_client(&self) -> crate::proxy::milter::ClientInfo {
        // A client that forwards for another (XFORWARD accepted by the upstream) speaks
        // for that one: the milters are told of the original client, as Postfix does.
        let envelope = self.relay.envelope();
        let forwarded = envelope
            .remote
            .as_deref()
            .and_then(|a| {
                a.trim_start_matches("IPv6:")
                    .parse::<std::net::IpAddr>()
                    .ok()
            })
            .map(|ip| std::net::SocketAddr::new(ip, 0));
        let addr = forwarded.or(self.info.peer);
        let hostname = addr.map_or_else(|| "localhost".to_string(), |a| format!("[{}]", a.ip()));
        let helo = match (forwarded, &envelope.remote_helo) {
            (Some(_), Some(helo)) => Some(helo.clone()),
            _ => self
                .relay
                .session()
                .helo_name()
                .map(|h| String::from_utf8_lossy(h).into_owned()),
        };
        let daemon_name = self
            .settings
            .milter_macro_daemon_name
            .clone()
            .unwrap_or_else(crate::proxy::milter::host_name);
        crate::proxy::milter::ClientInfo {
            hostname,
            addr,
            helo,
            daemon_name,
            tls: self
                .tls
                .as_ref()
                .map(|t| (t.version.to_string(), t.cipher.clone())),
            connection_id: self.id.to_string(),
        }
    }

    pub(crate) async fn send_client(&mut self, bytes: &[u8]) -> Result<(), Fatal> {
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
    pub(crate) async fn send_command(
        &mut self,
        bytes: &[u8],
        stage: UpstreamStage,
    ) -> Result<(), Fatal> {
        self.ensure_upstream_silent(stage)?;
        self.send_upstream(bytes, stage).await
    }

    /// Fails when the upstream has sent anything not yet taken as a reply.
    pub(crate) fn ensure_upstream_silent(&mut self, stage: UpstreamStage) -> Result<(), Fatal> {
        let early = !self.relay.upstream_buf.is_empty()
            || match stream_io::read_ready(&mut self.upstream, &mut self.relay.upstream_buf) {
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
    pub(crate) fn client_gone(&mut self) -> bool {
        if self.relay.client_eof {
            return true;
        }
        if stream_io::read_ready(&mut self.client, &mut self.relay.client_buf) == Ready::Closed {
            self.relay.client_closed();
        }
        self.relay.client_eof
    }

    pub(crate) async fn send_upstream(
        &mut self,
        bytes: &[u8],
        stage: UpstreamStage,
    ) -> Result<(), Fatal> {
        let timeout = self.settings.timeout;
        self.upstream_active = Instant::now();
        match tokio::time::timeout(timeout, self.upstream.write_all(bytes)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(upstream_failure(stage, format!("write failed: {e}"))),
            Err(_) => Err(upstream_failure(stage, "write timed out".into())),
        }
    }

    /// Reads one complete (multi-line) reply, waiting at most TimeOut.
    pub(crate) async fn read_reply(&mut self, stage: UpstreamStage) -> Result<Reply, Fatal> {
        let deadline = Instant::now() + self.settings.timeout;
        loop {
            match self.relay.next_reply() {
                Ok(Some(reply)) => {
                    crate::ops::metrics::upstream_reply(stage, self.upstream_active);
                    return Ok(reply);
                }
                Ok(None) => {}
                Err(e) => return Err(upstream_failure(stage, e)),
            }
            self.relay.upstream_buf.reserve(COMMAND_READ);
            match tokio::time::timeout_at(
                deadline,
                self.upstream.read_buf(&mut self.relay.upstream_buf),
            )
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
    pub(crate) async fn command(
        &mut self,
        line: &[u8],
        stage: UpstreamStage,
    ) -> Result<Reply, Fatal> {
        self.send_command(line, stage).await?;
        self.read_reply(stage).await
    }

    /// Sends a NOOP when the upstream has been quiet for KeepAlives seconds.
    pub(crate) async fn keepalive_if_due(&mut self) -> Result<(), Fatal> {
        if let Some(interval) = self.settings.keep_alives {
            if self.upstream_active.elapsed() >= interval {
                self.command(b"NOOP\r\n", UpstreamStage::Data).await?;
            }
        }
        Ok(())
    }

    /// When the next keepalive is due, if KeepAlives is on.
    pub(crate) fn next_keepalive(&self) -> Option<Instant> {
        self.settings
            .keep_alives
            .map(|interval| self.upstream_active + interval)
    }

    /// Reads more client bytes into the buffer; waits at most until `deadline`, sending
    /// keepalives upstream meanwhile. Returns the number of bytes read (0 = the client
    /// closed).
    pub(crate) async fn read_client(&mut self, deadline: Instant) -> Result<usize, Fatal> {
        loop {
            self.relay.client_buf.reserve(READ_BUFFER);
            let wake = match self.next_keepalive() {
                Some(at) if at < deadline => at,
                _ => deadline,
            };
            match tokio::time::timeout_at(wake, self.client.read_buf(&mut self.relay.client_buf))
                .await
            {
                Ok(Ok(n)) => return Ok(n),
                Ok(Err(_)) => return Err(Fatal::ClientGone),
                Err(_) if wake >= deadline => return Err(Fatal::ClientTimeout),
                Err(_) => self.keepalive_if_due().await?,
            }
        }
    }
}

pub(crate) fn upstream_failure(stage: UpstreamStage, reason: String) -> Fatal {
    crate::ops::metrics::global().upstream_error(stage);
    Fatal::Upstream(reason)
}

pub(crate) fn protocol_error(stage: UpstreamStage, reason: String) -> Fatal {
    crate::ops::metrics::global().upstream_error(stage);
    Fatal::UpstreamProtocol(reason)
}

impl observe::Connection for Conn {
    fn id(&self) -> ConnectionId {
        self.id
    }

    fn client(&self) -> Option<std::net::SocketAddr> {
        self.info.peer
    }

    fn tls(&self) -> Option<&TlsInfo> {
        self.tls.as_ref()
    }
}
