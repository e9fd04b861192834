//! What the proxy tells operators about each connection and message: the original's
//! per-message log line, metrics and span fields, from one place.

use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::ops::metrics::{self, MessageSource, MessageVerdict};
use crate::ops::telemetry;
use crate::protocol::reply::{reply_code, Reply};
use crate::protocol::session::Envelope;
use crate::proxy::tls::TlsInfo;

/// Connection ids as the original shows them: six hex digits from 100000 up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ConnectionId(u32);

impl ConnectionId {
    pub(crate) fn value(self) -> u64 {
        u64::from(self.0)
    }
}

static NEXT_ID: AtomicU32 = AtomicU32::new(0x100000);

impl ConnectionId {
    pub(crate) fn next() -> Self {
        ConnectionId(NEXT_ID.fetch_add(1, Ordering::Relaxed))
    }
}

impl fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:06X}", self.0)
    }
}

/// What the per-message records say about the connection a message came on.
pub(crate) trait Connection {
    fn id(&self) -> ConnectionId;
    /// The client's address; `None` for unix-socket clients.
    fn client(&self) -> Option<std::net::SocketAddr>;
    /// The client's TLS, once established.
    fn tls(&self) -> Option<&TlsInfo>;
}

/// What the message log line says of a connection, kept for a line written after the
/// session went on (a message whose shadow filters were still running).
pub(crate) struct Snapshot {
    id: ConnectionId,
    client: Option<std::net::SocketAddr>,
    tls: Option<TlsInfo>,
}

impl Snapshot {
    pub(crate) fn of(conn: &impl Connection) -> Snapshot {
        Snapshot {
            id: conn.id(),
            client: conn.client(),
            tls: conn.tls().cloned(),
        }
    }
}

impl Connection for Snapshot {
    fn id(&self) -> ConnectionId {
        self.id
    }

    fn client(&self) -> Option<std::net::SocketAddr> {
        self.client
    }

    fn tls(&self) -> Option<&TlsInfo> {
        self.tls.as_ref()
    }
}

/// How a message ended.
#[derive(Debug, Clone)]
pub(crate) struct MessageOutcome {
    pub(crate) verdict: MessageVerdict,
    /// The `status=` item; `None` when no filter is configured (the original logs none).
    pub(crate) status: Option<String>,
    pub(crate) size: u64,
    pub(crate) started: Instant,
    pub(crate) filter_time: Option<Duration>,
    pub(crate) upstream_code: Option<u16>,
    /// The network filter that decided the outcome (or last changed the message):
    /// `milter NAME` or `hook NAME`.
    pub(crate) by: Option<String>,
    /// The shadow filters' verdicts, `filter:verdict` separated by commas.
    pub(crate) shadow: Option<String>,
}

impl MessageOutcome {
    pub(crate) fn new(
        verdict: MessageVerdict,
        status: String,
        size: u64,
        started: Instant,
    ) -> Self {
        MessageOutcome {
            verdict,
            status: Some(status),
            size,
            started,
            filter_time: None,
            upstream_code: None,
            by: None,
            shadow: None,
        }
    }

    pub(crate) fn local_error(size: u64, started: Instant) -> Self {
        MessageOutcome::new(
            MessageVerdict::LocalError,
            "FILTER-ERROR".into(),
            size,
            started,
        )
    }

    /// The upstream's final answer decides the verdict.
    pub(crate) fn from_reply(reply: &Reply, size: u64, started: Instant) -> Self {
        let verdict = match reply.code / 100 {
            2 => MessageVerdict::Accepted,
            4 => MessageVerdict::TempFailed,
            _ => MessageVerdict::Rejected,
        };
        let mut outcome = MessageOutcome::new(verdict, "FILTERED".into(), size, started);
        outcome.upstream_code = Some(reply.code);
        outcome
    }

    pub(crate) fn with_filter(mut self, time: Duration) -> Self {
        self.filter_time = Some(time);
        self
    }

    /// The network filter (`milter NAME`, `hook NAME`) that decided.
    pub(crate) fn by(mut self, filter: String) -> Self {
        self.by = Some(filter);
        self
    }

    fn by_kind(&self, kind: &str) -> Option<&str> {
        self.by
            .as_deref()
            .and_then(|b| b.strip_prefix(kind))
            .and_then(|b| b.strip_prefix(' '))
    }

    pub(crate) fn unfiltered(mut self) -> Self {
        self.status = None;
        self
    }

    pub(crate) fn skipped(mut self) -> Self {
        self.status = Some("SKIPPED".into());
        self
    }

    /// Who decided the outcome: the upstream when its reply is known (whatever the filter
    /// said before), the filter when its verdict was sent without asking the upstream
    /// (reject, defer, drop), the proxy itself for a local error; a message lost with the
    /// upstream connection (no reply, no filter verdict) is the upstream's.
    pub(crate) fn source(&self) -> MessageSource {
        match self.verdict {
            MessageVerdict::LocalError => MessageSource::Local,
            MessageVerdict::Dropped => MessageSource::Filter,
            _ if self.by.is_some() && self.upstream_code.is_none() => MessageSource::Filter,
            _ if self.upstream_code.is_some() => MessageSource::Upstream,
            MessageVerdict::Accepted => MessageSource::Upstream,
            _ if self.filter_time.is_some() => MessageSource::Filter,
            _ => MessageSource::Upstream,
        }
    }
}

/// Client-supplied text as it may appear in a log line: control characters (CR, LF, ESC,
/// ...) are shown as `\xNN`, so a sender cannot forge or hide log lines.
pub(crate) fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.push_str(&format!("\\x{:02X}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    out
}

fn summary(conn: &impl Connection, envelope: &Envelope, status: Option<&str>) -> String {
    let mut line = String::with_capacity(128);
    if let Some(peer) = conn.client() {
        line.push_str(&format!("client={}", peer.ip()));
    } else {
        line.push_str("client=");
    }
    if let Some(sender) = &envelope.sender {
        line.push_str(&format!(", from={}", printable(sender)));
    }
    for rcpt in &envelope.recipients {
        line.push_str(&format!(", to={}", printable(rcpt)));
    }
    if let Some(status) = status {
        line.push_str(&format!(", status={}", printable(status)));
    }
    line
}

/// Logs the per-message line and records the message in metrics and its span.
pub(crate) fn message(conn: &impl Connection, envelope: &Envelope, outcome: MessageOutcome) {
    let elapsed = outcome.started.elapsed();
    let verdict = outcome.verdict.as_str();
    telemetry::record_message(
        &tracing::Span::current(),
        &telemetry::MessageAttributes {
            verdict: outcome.verdict,
            size_bytes: outcome.size,
            recipients: envelope.recipients.len(),
            filter_duration: outcome.filter_time,
            upstream_reply_code: outcome.upstream_code,
        },
    );
    let tls = conn.tls();
    let span = tracing::Span::current();
    record_tls(&span, tls);
    if let Some(by) = &outcome.by {
        span.record("filter.decided_by", by.as_str());
    }
    if let Some(shadow) = &outcome.shadow {
        span.record("shadow.verdicts", shadow.as_str());
    }
    tracing::info!(
        target: "proxsmtpd::message",
        verdict,
        size = outcome.size,
        recipients = envelope.recipients.len(),
        duration_ms = elapsed.as_millis() as u64,
        filter_ms = outcome.filter_time.map(|t| t.as_millis() as u64),
        upstream_code = outcome.upstream_code,
        tls = tls.is_some(),
        tls_version = tls.map(|t| t.version),
        tls_cipher = tls.map(|t| t.cipher.as_str()),
        milter = outcome.by_kind("milter"),
        hook = outcome.by_kind("hook"),
        shadow = outcome.shadow.as_deref(),
        "{}: {}",
        conn.id(),
        summary(conn, envelope, outcome.status.as_deref())
    );
    metrics::global().message(outcome.verdict, outcome.source(), outcome.size);
}

/// The client left before the answer to its message; nothing was delivered.
pub(crate) fn abandoned(conn: &impl Connection, envelope: &Envelope, size: u64) {
    tracing::warn!(
        target: "proxsmtpd::message",
        verdict = "abandoned",
        size,
        recipients = envelope.recipients.len(),
        "{}: {}",
        conn.id(),
        summary(conn, envelope, Some("CLIENT-GONE"))
    );
    metrics::global().message_abandoned();
}

/// FilterType reject refused a DATA.
pub(crate) fn policy_reject(conn: &impl Connection, envelope: &Envelope) {
    tracing::info!(
        target: "proxsmtpd::message",
        verdict = "rejected",
        "{}: {}",
        conn.id(),
        summary(conn, envelope, Some("REJECTED"))
    );
    metrics::global().message(MessageVerdict::Rejected, MessageSource::Filter, 0);
}

/// Counts every final reply line written to a client by its class.
pub(crate) fn replies_sent(bytes: &[u8]) {
    for line in bytes.split_inclusive(|&b| b == b'\n') {
        if line.get(3) != Some(&b'-') {
            if let Some(code) = reply_code(line) {
                metrics::global().reply_sent(code);
            }
        }
    }
}

/// Records on a [`telemetry::message_span`] whether the client used TLS, and which (OpenTelemetry's
/// `tls.*` attributes: `tls.protocol.version` is `1.2` or `1.3`).
fn record_tls(span: &tracing::Span, tls: Option<&TlsInfo>) {
    span.record("tls.established", tls.is_some());
    if let Some(tls) = tls {
        let version = tls.version.strip_prefix("TLSv").unwrap_or(tls.version);
        span.record("tls.protocol.version", version);
        span.record("tls.cipher", tls.cipher.as_str());
    }
}
