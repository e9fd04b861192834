//! Prometheus metrics of the proxy, named by the operational contract (prefix `proxsmtpd_`).
//!
//! Every labelled series is created at start-up so that dashboards and alerts see a 0 instead of
//! "no data" before the first event. The hot-path methods use pre-resolved children (no label
//! lookup, no allocation). No label ever carries a sender, recipient, message id or client address.

use std::sync::OnceLock;
use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

/// Final outcome of one message, as seen by the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MessageVerdict {
    /// The upstream server accepted the message.
    Accepted,
    /// The client got a 5xx from the filter or the upstream server.
    Rejected,
    /// The filter dropped the message silently.
    Dropped,
    /// The client got a 4xx from the filter or the upstream server.
    TempFailed,
    /// The client got `451 Local Error` because of a local failure.
    LocalError,
}

impl MessageVerdict {
    /// The value of the `verdict` label (also used in logs and traces).
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            MessageVerdict::Accepted => "accepted",
            MessageVerdict::Rejected => "rejected",
            MessageVerdict::Dropped => "dropped",
            MessageVerdict::TempFailed => "tempfailed",
            MessageVerdict::LocalError => "local_error",
        }
    }
}

/// Who decided a message's outcome (the `source` label of `proxsmtpd_messages_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MessageSource {
    /// The filter's verdict (or `FilterType: reject`).
    Filter,
    /// The upstream server's reply (or its loss).
    Upstream,
    /// The proxy itself: the filter could not run, was killed or timed out, or a local
    /// failure (spool) occurred.
    Local,
}

impl MessageSource {
    /// The value of the `source` label.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            MessageSource::Filter => "filter",
            MessageSource::Upstream => "upstream",
            MessageSource::Local => "local",
        }
    }
}

/// The (verdict, source) series that can occur, created at zero at start-up.
const MESSAGE_SERIES: [(MessageVerdict, MessageSource); 7] = [
    (MessageVerdict::Accepted, MessageSource::Upstream),
    (MessageVerdict::Rejected, MessageSource::Filter),
    (MessageVerdict::Rejected, MessageSource::Upstream),
    (MessageVerdict::Dropped, MessageSource::Filter),
    (MessageVerdict::TempFailed, MessageSource::Filter),
    (MessageVerdict::TempFailed, MessageSource::Upstream),
    (MessageVerdict::LocalError, MessageSource::Local),
];

/// The SMTP stage at which talking to the upstream server failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UpstreamStage {
    Connect,
    Greeting,
    Command,
    Data,
    Final,
}

impl UpstreamStage {
    pub(crate) const ALL: [UpstreamStage; 5] = [
        UpstreamStage::Connect,
        UpstreamStage::Greeting,
        UpstreamStage::Command,
        UpstreamStage::Data,
        UpstreamStage::Final,
    ];

    /// The value of the `stage` label.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            UpstreamStage::Connect => "connect",
            UpstreamStage::Greeting => "greeting",
            UpstreamStage::Command => "command",
            UpstreamStage::Data => "data",
            UpstreamStage::Final => "final",
        }
    }
}

const REPLY_CLASSES: [&str; 4] = ["2xx", "3xx", "4xx", "5xx"];

/// The stages whose upstream replies are timed (a connect has no reply).
const REPLY_STAGES: [UpstreamStage; 4] = [
    UpstreamStage::Greeting,
    UpstreamStage::Command,
    UpstreamStage::Data,
    UpstreamStage::Final,
];

/// Upstream reply latency: a local MTA answers in a millisecond, a remote one after a DNS
/// or content check in seconds; the top buckets sit near the default TimeOut.
const REPLY_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    120.0,
];

/// The git revision the binary was built from (`unknown` without git, e.g. from a tarball).
pub(crate) const REVISION: &str = env!("BUILD_REVISION");

/// Filter run time: from fast scripts (a few ms) up to slow content scanners near the timeout.
const FILTER_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// Message size: 1 KiB .. 50 MiB, roughly x4 per step.
const SIZE_BUCKETS: [f64; 10] = [
    1024.0,
    4096.0,
    16384.0,
    65536.0,
    262_144.0,
    1_048_576.0,
    4_194_304.0,
    10_485_760.0,
    26_214_400.0,
    52_428_800.0,
];

/// All metrics of the process, registered in their own [`Registry`].
pub(crate) struct Metrics {
    registry: Registry,
    messages: IntCounterVec,
    filter_duration: Histogram,
    message_size: Histogram,
    connections_total: IntCounter,
    connections_active: IntGauge,
    connections_refused: IntCounter,
    upstream_errors: [IntCounter; 5],
    filter_timeouts: IntCounter,
    filter_spawn_failures: IntCounter,
    replies: [IntCounter; 4],
    config_reload_success: IntCounter,
    config_reload_failure: IntCounter,
    draining: IntGauge,
    max_connections: IntGauge,
    spool_memory: IntGauge,
    config_last_reload_successful: IntGauge,
    config_last_reload_success_timestamp: prometheus::Gauge,
    upstream_reply_duration: [Histogram; 4],
    /// Registered only while a certificate is loaded, so that no 0 (1970) shows before.
    tls_certificate_expiry: prometheus::IntGauge,
    tls_certificate_expiry_registered: std::sync::Mutex<bool>,
    tls_sessions: IntCounterVec,
    tls_handshake_failures: IntCounterVec,
    tls_certificate_reloads: IntCounterVec,
    messages_abandoned: IntCounter,
    milter_replies: IntCounterVec,
    milter_duration: prometheus::HistogramVec,
    milter_errors: IntCounterVec,
    milter_envelope_refusals: IntCounterVec,
    milter_quarantined: IntCounterVec,
    hook_replies: IntCounterVec,
    hook_duration: prometheus::HistogramVec,
    hook_errors: IntCounterVec,
    shadow_verdicts: IntCounterVec,
}

/// The `kind` label of `proxsmtpd_hook_errors_total`.
pub(crate) const HOOK_ERROR_KINDS: [&str; 6] =
    ["connect", "timeout", "status", "parse", "oversize", "tls"];

/// The `action` label of `proxsmtpd_hook_replies_total` (failed: no usable answer, the
/// hook's default action applied; skipped: the message was over the hook's max_size).
pub(crate) const HOOK_ACTIONS: [&str; 6] = [
    "accept",
    "reject",
    "discard",
    "quarantine",
    "failed",
    "skipped",
];

/// The `kind` label of `proxsmtpd_milter_errors_total`.
pub(crate) const MILTER_ERROR_KINDS: [&str; 8] = [
    "connect",
    "connect_timeout",
    "timeout",
    "closed",
    "io",
    "protocol",
    "oversize",
    "usage",
];

/// The `action` label of `proxsmtpd_milter_replies_total`.
pub(crate) const MILTER_ACTIONS: [&str; 9] = [
    "continue",
    "accept",
    "reject",
    "tempfail",
    "discard",
    "replycode",
    "skip",
    "quarantine",
    "failed",
];

static GLOBAL: OnceLock<Metrics> = OnceLock::new();

/// The process-wide metrics, created on first use.
pub(crate) fn global() -> &'static Metrics {
    GLOBAL.get_or_init(Metrics::new)
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh, independent set of metrics (the process uses [`global`]; tests use their own).
    pub(crate) fn new() -> Metrics {
        let registry = Registry::new();
        // The definitions below are static, so a failure is a programming error that the unit
        // tests catch; it can never be caused by input.
        let reg = Registrar(&registry);

        let build_info = reg.gauge_vec(
            "proxsmtpd_build_info",
            "Build information; the value is always 1.",
            &["version", "revision"],
        );
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), REVISION])
            .set(1);

        let messages = reg.counter_vec(
            "proxsmtpd_messages_total",
            "Messages finished, by the outcome the client saw and who decided it.",
            &["verdict", "source"],
        );
        let upstream_reply = prometheus::HistogramVec::new(
            HistogramOpts::new(
                "proxsmtpd_upstream_reply_duration_seconds",
                "Time from the last write to the upstream server to its complete reply, by stage.",
            )
            .buckets(REPLY_BUCKETS.to_vec()),
            &["stage"],
        )
        .map(|h| reg.add(h))
        .expect("valid metric definition");
        let upstream_errors = reg.counter_vec(
            "proxsmtpd_upstream_errors_total",
            "Failures talking to the upstream server, by SMTP stage.",
            &["stage"],
        );
        let replies = reg.counter_vec(
            "proxsmtpd_replies_total",
            "SMTP replies sent to clients, by class.",
            &["class"],
        );
        let reloads = reg.counter_vec(
            "proxsmtpd_config_reloads_total",
            "Configuration reloads, by result.",
            &["result"],
        );

        let metrics = Metrics {
            messages,
            filter_duration: reg.histogram(
                "proxsmtpd_filter_duration_seconds",
                "Time the filter took per message.",
                &FILTER_BUCKETS,
            ),
            message_size: reg.histogram(
                "proxsmtpd_message_size_bytes",
                "Size of the message data received from clients.",
                &SIZE_BUCKETS,
            ),
            connections_total: reg.counter(
                "proxsmtpd_connections_total",
                "Client connections accepted.",
            ),
            connections_active: reg.gauge(
                "proxsmtpd_connections_active",
                "Client connections currently open.",
            ),
            connections_refused: reg.counter(
                "proxsmtpd_connections_refused_total",
                "Client connections refused because MaxConnections was reached.",
            ),
            upstream_errors: UpstreamStage::ALL
                .map(|s| upstream_errors.with_label_values(&[s.as_str()])),
            filter_timeouts: reg.counter(
                "proxsmtpd_filter_timeouts_total",
                "Filter runs that exceeded FilterTimeout.",
            ),
            filter_spawn_failures: reg.counter(
                "proxsmtpd_filter_spawn_failures_total",
                "Filter commands that could not be started.",
            ),
            replies: REPLY_CLASSES.map(|c| replies.with_label_values(&[c])),
            config_reload_success: reloads.with_label_values(&["success"]),
            config_reload_failure: reloads.with_label_values(&["failure"]),
            draining: reg.gauge(
                "proxsmtpd_draining",
                "1 while the process drains connections before exiting.",
            ),
            max_connections: reg.gauge(
                "proxsmtpd_max_connections",
                "The configured MaxConnections (concurrent clients).",
            ),
            spool_memory: reg.gauge(
                "proxsmtpd_spool_memory_bytes",
                "Bytes of memory holding filtered messages instead of spool files (within SpoolMemory).",
            ),
            config_last_reload_successful: reg.gauge(
                "proxsmtpd_config_last_reload_successful",
                "1 when the configuration in force came from the last load attempt, 0 after a refused reload.",
            ),
            config_last_reload_success_timestamp: reg.add(
                prometheus::Gauge::new(
                    "proxsmtpd_config_last_reload_success_timestamp_seconds",
                    "When the configuration was last loaded successfully (start or reload), as a Unix time.",
                )
                .expect("valid metric definition"),
            ),
            upstream_reply_duration: REPLY_STAGES
                .map(|s| upstream_reply.with_label_values(&[s.as_str()])),
            tls_certificate_expiry: IntGauge::new(
                "proxsmtpd_tls_certificate_expiry_timestamp_seconds",
                "When the client-facing TLS certificate (the leaf) expires, as a Unix time (notAfter).",
            )
            .expect("valid metric definition"),
            tls_certificate_expiry_registered: std::sync::Mutex::new(false),
            // `side` tells client TLS (STARTTLS or the implicit-TLS listener) from the
            // proxy's own TLS towards the upstream; `version` shows what is left to retire.
            tls_sessions: reg.counter_vec(
                "proxsmtpd_tls_sessions_total",
                "TLS handshakes completed, by side (client, upstream) and protocol version.",
                &["side", "version"],
            ),
            tls_handshake_failures: reg.counter_vec(
                "proxsmtpd_tls_handshake_failures_total",
                "TLS handshakes that failed, by side (client, upstream).",
                &["side"],
            ),
            tls_certificate_reloads: reg.counter_vec(
                "proxsmtpd_tls_certificate_reloads_total",
                "Loads of a changed TLS certificate, by result.",
                &["result"],
            ),
            messages_abandoned: reg.counter(
                "proxsmtpd_messages_abandoned_total",
                "Messages not delivered because the client left before its verdict.",
            ),
            milter_replies: reg.counter_vec(
                "proxsmtpd_milter_replies_total",
                "Milter answers, by milter (its configured name), stage and action (failed: no answer, the milter's default action applied).",
                &["milter", "stage", "action"],
            ),
            milter_duration: prometheus::HistogramVec::new(
                HistogramOpts::new(
                    "proxsmtpd_milter_duration_seconds",
                    "Time a milter took to answer, by milter and stage.",
                )
                .buckets(REPLY_BUCKETS.to_vec()),
                &["milter", "stage"],
            )
            .map(|h| reg.add(h))
            .expect("valid metric definition"),
            milter_errors: reg.counter_vec(
                "proxsmtpd_milter_errors_total",
                "Milter conversations that failed, by milter and kind (connect, connect_timeout, timeout, closed, io, protocol, oversize, usage).",
                &["milter", "kind"],
            ),
            milter_envelope_refusals: reg.counter_vec(
                "proxsmtpd_milter_envelope_refusals_total",
                "Envelope commands the upstream refused when a milter's sender or recipient change was applied, by command (mail, rcpt).",
                &["command"],
            ),
            milter_quarantined: reg.counter_vec(
                "proxsmtpd_milter_quarantined_total",
                "Messages a milter quarantined, by milter and what MilterQuarantine did with them (hold, reject, tempfail).",
                &["milter", "disposition"],
            ),
            hook_replies: reg.counter_vec(
                "proxsmtpd_hook_replies_total",
                "HTTP hook answers, by hook (its configured name), stage (mail, rcpt, data) and action (failed: no usable answer, the hook's default action applied; skipped: over max_size).",
                &["hook", "stage", "action"],
            ),
            hook_duration: prometheus::HistogramVec::new(
                HistogramOpts::new(
                    "proxsmtpd_hook_duration_seconds",
                    "Time an HTTP hook took to answer, the wait for a free connection included, by hook and stage.",
                )
                .buckets(REPLY_BUCKETS.to_vec()),
                &["hook", "stage"],
            )
            .map(|h| reg.add(h))
            .expect("valid metric definition"),
            hook_errors: reg.counter_vec(
                "proxsmtpd_hook_errors_total",
                "HTTP hook calls that failed, by hook and kind (connect, timeout, status, parse, oversize, tls).",
                &["hook", "kind"],
            ),
            shadow_verdicts: reg.counter_vec(
                "proxsmtpd_shadow_verdicts_total",
                "Verdicts of shadow filters (recorded, never enforced) beside the live chain's for the same message, by filter (milter:NAME, hook:NAME, command), live and shadow verdict (accept, reject, tempfail, discard, quarantine, error, dropped).",
                &["filter", "live", "shadow"],
            ),
            registry,
        };
        for command in ["mail", "rcpt"] {
            metrics
                .milter_envelope_refusals
                .with_label_values(&[command]);
        }
        for (verdict, source) in MESSAGE_SERIES {
            metrics
                .messages
                .with_label_values(&[verdict.as_str(), source.as_str()]);
        }
        // Every TLS series starts at zero, so that rates and alerts work from the start.
        for side in ["client", "upstream"] {
            for version in ["TLSv1.2", "TLSv1.3"] {
                metrics.tls_sessions.with_label_values(&[side, version]);
            }
            metrics.tls_handshake_failures.with_label_values(&[side]);
        }
        for result in ["success", "failure"] {
            metrics.tls_certificate_reloads.with_label_values(&[result]);
        }
        metrics.register_process_collector();
        metrics
    }

    #[cfg(target_os = "linux")]
    fn register_process_collector(&self) {
        let collector = prometheus::process_collector::ProcessCollector::for_self();
        // Process metrics are a convenience; running without them is fine.
        let _ = self.registry.register(Box::new(collector));
    }

    #[cfg(not(target_os = "linux"))]
    fn register_process_collector(&self) {}

    /// A client connection was accepted.
    pub(crate) fn connection_opened(&self) {
        self.connections_total.inc();
        self.connections_active.inc();
    }

    /// An accepted client connection ended (pairs with [`Metrics::connection_opened`]).
    pub(crate) fn connection_closed(&self) {
        self.connections_active.dec();
    }

    /// A connection was turned away at MaxConnections (not counted in `connections_total`).
    pub(crate) fn connection_refused(&self) {
        self.connections_refused.inc();
    }

    /// A message finished with `verdict`, decided by `source`; `size_bytes` is the DATA size
    /// received from the client.
    pub(crate) fn message(&self, verdict: MessageVerdict, source: MessageSource, size_bytes: u64) {
        self.messages
            .with_label_values(&[verdict.as_str(), source.as_str()])
            .inc();
        // f64 is exact up to 2^53 bytes, far beyond any message.
        self.message_size.observe(size_bytes as f64);
    }

    /// The client left before the answer to its message: it was not delivered (the client
    /// will send it again).
    pub(crate) fn message_abandoned(&self) {
        self.messages_abandoned.inc();
    }

    /// The filter finished (whatever its verdict) after `duration`.
    pub(crate) fn filter_finished(&self, duration: Duration) {
        self.filter_duration.observe(duration.as_secs_f64());
    }

    pub(crate) fn filter_timeout(&self) {
        self.filter_timeouts.inc();
    }

    pub(crate) fn filter_spawn_failure(&self) {
        self.filter_spawn_failures.inc();
    }

    pub(crate) fn upstream_error(&self, stage: UpstreamStage) {
        self.upstream_errors[stage as usize].inc();
    }

    /// A reply with `code` was sent to a client; codes outside 200..=599 are not counted.
    pub(crate) fn reply_sent(&self, code: u16) {
        if let Some(counter) = (code / 100)
            .checked_sub(2)
            .and_then(|i| self.replies.get(usize::from(i)))
        {
            counter.inc();
        }
    }

    /// A reload was applied (`ok`) or refused; also sets the last-reload gauges.
    pub(crate) fn config_reload(&self, ok: bool) {
        if ok {
            self.config_reload_success.inc();
            self.config_loaded();
        } else {
            self.config_reload_failure.inc();
            self.config_last_reload_successful.set(0);
        }
    }

    /// The configuration was loaded at start (or reloaded): the last load succeeded, now.
    pub(crate) fn config_loaded(&self) {
        self.config_last_reload_successful.set(1);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        self.config_last_reload_success_timestamp
            .set(now.as_secs_f64());
    }

    /// The MaxConnections in force (at start and after each reload).
    pub(crate) fn set_max_connections(&self, max: usize) {
        self.max_connections
            .set(i64::try_from(max).unwrap_or(i64::MAX));
    }

    /// An upstream reply at `stage` arrived `duration` after the proxy last wrote upstream.
    /// Connect has no reply and is not timed.
    pub(crate) fn upstream_reply(&self, stage: UpstreamStage, duration: Duration) {
        if let Some(i) = REPLY_STAGES.iter().position(|s| *s == stage) {
            self.upstream_reply_duration[i].observe(duration.as_secs_f64());
        }
    }

    /// The notAfter of the client-facing certificate in force, as a Unix time; `None` when
    /// no certificate is loaded (the series then disappears).
    pub(crate) fn set_tls_certificate_expiry(&self, not_after: Option<i64>) {
        let mut registered = self
            .tls_certificate_expiry_registered
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match not_after {
            Some(t) => {
                self.tls_certificate_expiry.set(t);
                if !*registered {
                    *registered = self
                        .registry
                        .register(Box::new(self.tls_certificate_expiry.clone()))
                        .is_ok();
                }
            }
            None => {
                if *registered {
                    let _ = self
                        .registry
                        .unregister(Box::new(self.tls_certificate_expiry.clone()));
                    *registered = false;
                }
            }
        }
    }

    /// A TLS handshake completed; `side` is `client` or `upstream`, `version` e.g. `TLSv1.3`.
    pub(crate) fn tls_session(&self, side: &str, version: &str) {
        self.tls_sessions.with_label_values(&[side, version]).inc();
    }

    pub(crate) fn tls_handshake_failure(&self, side: &str) {
        self.tls_handshake_failures.with_label_values(&[side]).inc();
    }

    pub(crate) fn tls_certificate_reload(&self, ok: bool) {
        let result = if ok { "success" } else { "failure" };
        self.tls_certificate_reloads
            .with_label_values(&[result])
            .inc();
    }

    /// Starts every series of a configured milter at zero (errors of each kind, each
    /// action at end of message), so that its rates and alerts work before mail flows.
    pub(crate) fn milter_configured(&self, milter: &str) {
        for kind in MILTER_ERROR_KINDS {
            self.milter_errors.with_label_values(&[milter, kind]);
        }
        for action in MILTER_ACTIONS {
            self.milter_replies
                .with_label_values(&[milter, "eom", action]);
        }
        self.milter_duration.with_label_values(&[milter, "eom"]);
    }

    /// A milter's answer at `stage` (one of [`MILTER_STAGES`]), after `duration`.
    pub(crate) fn milter_reply(
        &self,
        milter: &str,
        stage: &str,
        action: &str,
        duration: Option<Duration>,
    ) {
        self.milter_replies
            .with_label_values(&[milter, stage, action])
            .inc();
        if let Some(d) = duration {
            self.milter_duration
                .with_label_values(&[milter, stage])
                .observe(d.as_secs_f64());
        }
    }

    pub(crate) fn milter_error(&self, milter: &str, kind: &str) {
        self.milter_errors.with_label_values(&[milter, kind]).inc();
    }

    /// The upstream refused a MAIL or RCPT redone after a milter changed the envelope.
    pub(crate) fn milter_envelope_refusal(&self, command: &str) {
        self.milter_envelope_refusals
            .with_label_values(&[command])
            .inc();
    }

    pub(crate) fn milter_quarantined(&self, milter: &str, disposition: &str) {
        self.milter_quarantined
            .with_label_values(&[milter, disposition])
            .inc();
    }

    /// Starts every series of a configured hook at zero, so that its rates and alerts work
    /// before mail flows.
    pub(crate) fn hook_configured(&self, hook: &str, stages: &[&str]) {
        for kind in HOOK_ERROR_KINDS {
            self.hook_errors.with_label_values(&[hook, kind]);
        }
        for stage in stages {
            for action in HOOK_ACTIONS {
                self.hook_replies.with_label_values(&[hook, stage, action]);
            }
            self.hook_duration.with_label_values(&[hook, stage]);
        }
    }

    /// A hook's answer (or failure: action `failed`) at `stage`, after `duration`.
    pub(crate) fn hook_reply(&self, hook: &str, stage: &str, action: &str, duration: Duration) {
        self.hook_replies
            .with_label_values(&[hook, stage, action])
            .inc();
        self.hook_duration
            .with_label_values(&[hook, stage])
            .observe(duration.as_secs_f64());
    }

    pub(crate) fn hook_skipped(&self, hook: &str, stage: &str) {
        self.hook_replies
            .with_label_values(&[hook, stage, "skipped"])
            .inc();
    }

    pub(crate) fn hook_error(&self, hook: &str, kind: &str) {
        self.hook_errors.with_label_values(&[hook, kind]).inc();
    }

    /// A shadow filter's verdict on a message, beside the live chain's.
    pub(crate) fn shadow_verdict(&self, filter: &str, live: &str, shadow: &str) {
        self.shadow_verdicts
            .with_label_values(&[filter, live, shadow])
            .inc();
    }

    /// Bytes of messages taken into memory (positive) or given back (negative).
    pub(crate) fn spool_memory_add(&self, bytes: i64) {
        self.spool_memory.add(bytes);
    }

    pub(crate) fn set_draining(&self, draining: bool) {
        self.draining.set(i64::from(draining));
    }

    /// All metrics in the OpenMetrics 1.0 text format ([`OPENMETRICS_CONTENT_TYPE`]).
    pub(crate) fn render_openmetrics(&self) -> String {
        encode_openmetrics(&self.registry.gather())
    }

    /// All metrics in the Prometheus text exposition format (version 0.0.4).
    pub(crate) fn render(&self) -> String {
        let mut buf = Vec::new();
        let encoder = prometheus::TextEncoder::new();
        match encoder.encode(&self.registry.gather(), &mut buf) {
            // The text encoder only writes UTF-8.
            Ok(()) => String::from_utf8_lossy(&buf).into_owned(),
            // A comment keeps the exposition valid for the scraper while saying what went wrong.
            Err(e) => format!("# error encoding metrics: {e}\n"),
        }
    }
}

/// The content type of [`Metrics::render_openmetrics`].
pub(crate) const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A number as OpenMetrics writes it: `+Inf`, `-Inf`, `NaN`, integral values with `.0`
/// (as Prometheus' own exposition does for `le`), others in the shortest exact form.
fn openmetrics_number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.1}")
    } else {
        format!("{v}")
    }
}

/// Escapes a label value or HELP text: backslash, double quote and line feed.
fn openmetrics_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// One sample line: `name{labels,extra} value`.
fn openmetrics_sample(
    out: &mut String,
    name: &str,
    labels: &[prometheus::proto::LabelPair],
    extra: Option<(&str, String)>,
    value: f64,
) {
    out.push_str(name);
    let mut pairs: Vec<(&str, String)> = labels
        .iter()
        .map(|l| (l.name(), openmetrics_escape(l.value())))
        .collect();
    pairs.extend(extra);
    if !pairs.is_empty() {
        out.push('{');
        for (i, (k, v)) in pairs.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&format!("{k}=\"{v}\""));
        }
        out.push('}');
    }
    out.push(' ');
    out.push_str(&openmetrics_number(value));
    out.push('\n');
}

/// Metric families in the OpenMetrics 1.0 text format: a counter family is named without
/// its `_total` suffix (a counter whose name lacks one is exposed as `unknown`), histograms
/// carry their `+Inf` bucket, and the exposition ends with `# EOF`.
pub(crate) fn encode_openmetrics(families: &[prometheus::proto::MetricFamily]) -> String {
    use prometheus::proto::MetricType;
    let mut out = String::new();
    for mf in families {
        let name = mf.name();
        let (family, kind) = match mf.get_field_type() {
            MetricType::COUNTER => match name.strip_suffix("_total") {
                Some(base) => (base, "counter"),
                None => (name, "unknown"),
            },
            MetricType::GAUGE => (name, "gauge"),
            MetricType::HISTOGRAM => (name, "histogram"),
            MetricType::SUMMARY => (name, "summary"),
            MetricType::UNTYPED => (name, "unknown"),
        };
        out.push_str(&format!("# TYPE {family} {kind}\n"));
        if !mf.help().is_empty() {
            out.push_str(&format!(
                "# HELP {family} {}\n",
                openmetrics_escape(mf.help())
            ));
        }
        for m in mf.get_metric() {
            let labels = m.get_label();
            match mf.get_field_type() {
                MetricType::COUNTER => {
                    openmetrics_sample(&mut out, name, labels, None, m.get_counter().get_value())
                }
                MetricType::GAUGE => {
                    openmetrics_sample(&mut out, name, labels, None, m.get_gauge().get_value())
                }
                MetricType::HISTOGRAM => {
                    let h = m.get_histogram();
                    let bucket = format!("{name}_bucket");
                    let mut inf_seen = false;
                    for b in h.get_bucket() {
                        inf_seen |= b.upper_bound() == f64::INFINITY;
                        openmetrics_sample(
                            &mut out,
                            &bucket,
                            labels,
                            Some(("le", openmetrics_number(b.upper_bound()))),
                            b.cumulative_count() as f64,
                        );
                    }
                    if !inf_seen {
                        openmetrics_sample(
                            &mut out,
                            &bucket,
                            labels,
                            Some(("le", "+Inf".into())),
                            h.get_sample_count() as f64,
                        );
                    }
                    openmetrics_sample(
                        &mut out,
                        &format!("{name}_count"),
                        labels,
                        None,
                        h.get_sample_count() as f64,
                    );
                    openmetrics_sample(
                        &mut out,
                        &format!("{name}_sum"),
                        labels,
                        None,
                        h.get_sample_sum(),
                    );
                }
                MetricType::SUMMARY => {
                    let sm = m.get_summary();
                    for q in sm.get_quantile() {
                        openmetrics_sample(
                            &mut out,
                            name,
                            labels,
                            Some(("quantile", openmetrics_number(q.quantile()))),
                            q.value(),
                        );
                    }
                    openmetrics_sample(
                        &mut out,
                        &format!("{name}_count"),
                        labels,
                        None,
                        sm.sample_count() as f64,
                    );
                    openmetrics_sample(
                        &mut out,
                        &format!("{name}_sum"),
                        labels,
                        None,
                        sm.sample_sum(),
                    );
                }
                // Nothing here registers untyped metrics.
                MetricType::UNTYPED => {}
            }
        }
    }
    out.push_str("# EOF\n");
    out
}

/// Records the latency of an upstream reply at `stage`, `since` the proxy last wrote
/// upstream (see [`Metrics::upstream_reply`]).
pub(crate) fn upstream_reply(stage: UpstreamStage, since: tokio::time::Instant) {
    global().upstream_reply(stage, since.elapsed());
}

/// Creates metrics and registers them, so that each definition is written once.
struct Registrar<'a>(&'a Registry);

impl Registrar<'_> {
    fn add<C: prometheus::core::Collector + Clone + 'static>(&self, c: C) -> C {
        self.0
            .register(Box::new(c.clone()))
            .expect("metric names are unique");
        c
    }

    fn counter(&self, name: &str, help: &str) -> IntCounter {
        self.add(IntCounter::new(name, help).expect("valid metric definition"))
    }

    fn gauge(&self, name: &str, help: &str) -> IntGauge {
        self.add(IntGauge::new(name, help).expect("valid metric definition"))
    }

    fn counter_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        self.add(
            IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition"),
        )
    }

    fn gauge_vec(&self, name: &str, help: &str, labels: &[&str]) -> prometheus::IntGaugeVec {
        self.add(
            prometheus::IntGaugeVec::new(Opts::new(name, help), labels)
                .expect("valid metric definition"),
        )
    }

    fn histogram(&self, name: &str, help: &str, buckets: &[f64]) -> Histogram {
        self.add(
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
                .expect("valid metric definition"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the sample line `series` (name with labels) in `text`.
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn every_series_exists_at_zero_from_the_start() {
        let text = Metrics::new().render();
        let version = env!("CARGO_PKG_VERSION");
        let mut expected: Vec<(String, f64)> = vec![
            (
                format!("proxsmtpd_build_info{{revision=\"{REVISION}\",version=\"{version}\"}}"),
                1.0,
            ),
            ("proxsmtpd_connections_total".into(), 0.0),
            ("proxsmtpd_connections_active".into(), 0.0),
            ("proxsmtpd_connections_refused_total".into(), 0.0),
            ("proxsmtpd_filter_timeouts_total".into(), 0.0),
            ("proxsmtpd_filter_spawn_failures_total".into(), 0.0),
            ("proxsmtpd_draining".into(), 0.0),
            ("proxsmtpd_spool_memory_bytes".into(), 0.0),
            ("proxsmtpd_messages_abandoned_total".into(), 0.0),
            ("proxsmtpd_filter_duration_seconds_count".into(), 0.0),
            (
                "proxsmtpd_filter_duration_seconds_bucket{le=\"0.005\"}".into(),
                0.0,
            ),
            (
                "proxsmtpd_filter_duration_seconds_bucket{le=\"120\"}".into(),
                0.0,
            ),
            ("proxsmtpd_message_size_bytes_count".into(), 0.0),
            (
                "proxsmtpd_message_size_bytes_bucket{le=\"1024\"}".into(),
                0.0,
            ),
            (
                "proxsmtpd_message_size_bytes_bucket{le=\"52428800\"}".into(),
                0.0,
            ),
            (
                "proxsmtpd_config_reloads_total{result=\"success\"}".into(),
                0.0,
            ),
            (
                "proxsmtpd_config_reloads_total{result=\"failure\"}".into(),
                0.0,
            ),
        ];
        for (v, source) in [
            ("accepted", "upstream"),
            ("rejected", "filter"),
            ("rejected", "upstream"),
            ("dropped", "filter"),
            ("tempfailed", "filter"),
            ("tempfailed", "upstream"),
            ("local_error", "local"),
        ] {
            expected.push((
                format!("proxsmtpd_messages_total{{source=\"{source}\",verdict=\"{v}\"}}"),
                0.0,
            ));
        }
        expected.push(("proxsmtpd_max_connections".into(), 0.0));
        expected.push(("proxsmtpd_config_last_reload_successful".into(), 0.0));
        for s in ["greeting", "command", "data", "final"] {
            expected.push((
                format!("proxsmtpd_upstream_reply_duration_seconds_count{{stage=\"{s}\"}}"),
                0.0,
            ));
        }
        assert!(
            !text.contains("proxsmtpd_tls_certificate_expiry_timestamp_seconds"),
            "no certificate, no expiry series:\n{text}"
        );
        for s in ["connect", "greeting", "command", "data", "final"] {
            expected.push((
                format!("proxsmtpd_upstream_errors_total{{stage=\"{s}\"}}"),
                0.0,
            ));
        }
        for c in ["2xx", "3xx", "4xx", "5xx"] {
            expected.push((format!("proxsmtpd_replies_total{{class=\"{c}\"}}"), 0.0));
        }
        for (series, value) in expected {
            assert_eq!(sample(&text, &series), Some(value), "{series} in\n{text}");
        }
    }

    #[test]
    fn events_move_the_right_series() {
        let m = Metrics::new();
        m.connection_opened();
        m.connection_opened();
        m.connection_closed();
        m.connection_refused();
        m.message(MessageVerdict::Accepted, MessageSource::Upstream, 2000);
        m.message(MessageVerdict::LocalError, MessageSource::Local, 10);
        m.message(MessageVerdict::TempFailed, MessageSource::Filter, 0);
        m.set_max_connections(17);
        m.upstream_reply(UpstreamStage::Final, Duration::from_millis(30));
        m.upstream_reply(UpstreamStage::Connect, Duration::from_millis(30));
        m.set_tls_certificate_expiry(Some(1_900_000_000));
        m.filter_finished(Duration::from_millis(30));
        m.filter_timeout();
        m.filter_spawn_failure();
        m.upstream_error(UpstreamStage::Data);
        m.config_reload(true);
        m.config_reload(false);
        m.config_reload(false);
        m.set_draining(true);
        // Table: (reply code, counted class or none)
        for code in [250, 354, 221, 421, 451, 550, 0, 99, 199, 600, 999, u16::MAX] {
            m.reply_sent(code);
        }
        let text = m.render();
        let table: &[(&str, f64)] = &[
            ("proxsmtpd_connections_total", 2.0),
            ("proxsmtpd_connections_active", 1.0),
            ("proxsmtpd_connections_refused_total", 1.0),
            (
                "proxsmtpd_messages_total{source=\"upstream\",verdict=\"accepted\"}",
                1.0,
            ),
            (
                "proxsmtpd_messages_total{source=\"local\",verdict=\"local_error\"}",
                1.0,
            ),
            (
                "proxsmtpd_messages_total{source=\"filter\",verdict=\"tempfailed\"}",
                1.0,
            ),
            (
                "proxsmtpd_messages_total{source=\"upstream\",verdict=\"tempfailed\"}",
                0.0,
            ),
            (
                "proxsmtpd_messages_total{source=\"filter\",verdict=\"rejected\"}",
                0.0,
            ),
            ("proxsmtpd_max_connections", 17.0),
            ("proxsmtpd_config_last_reload_successful", 0.0),
            (
                "proxsmtpd_upstream_reply_duration_seconds_count{stage=\"final\"}",
                1.0,
            ),
            (
                "proxsmtpd_upstream_reply_duration_seconds_bucket{stage=\"final\",le=\"0.025\"}",
                0.0,
            ),
            (
                "proxsmtpd_upstream_reply_duration_seconds_bucket{stage=\"final\",le=\"0.05\"}",
                1.0,
            ),
            (
                "proxsmtpd_tls_certificate_expiry_timestamp_seconds",
                1_900_000_000.0,
            ),
            ("proxsmtpd_message_size_bytes_count", 3.0),
            ("proxsmtpd_message_size_bytes_sum", 2010.0),
            ("proxsmtpd_message_size_bytes_bucket{le=\"1024\"}", 2.0),
            ("proxsmtpd_message_size_bytes_bucket{le=\"4096\"}", 3.0),
            ("proxsmtpd_filter_duration_seconds_count", 1.0),
            (
                "proxsmtpd_filter_duration_seconds_bucket{le=\"0.025\"}",
                0.0,
            ),
            ("proxsmtpd_filter_duration_seconds_bucket{le=\"0.05\"}", 1.0),
            ("proxsmtpd_filter_timeouts_total", 1.0),
            ("proxsmtpd_filter_spawn_failures_total", 1.0),
            ("proxsmtpd_upstream_errors_total{stage=\"data\"}", 1.0),
            ("proxsmtpd_upstream_errors_total{stage=\"connect\"}", 0.0),
            ("proxsmtpd_config_reloads_total{result=\"success\"}", 1.0),
            ("proxsmtpd_config_reloads_total{result=\"failure\"}", 2.0),
            ("proxsmtpd_draining", 1.0),
            ("proxsmtpd_replies_total{class=\"2xx\"}", 2.0),
            ("proxsmtpd_replies_total{class=\"3xx\"}", 1.0),
            ("proxsmtpd_replies_total{class=\"4xx\"}", 2.0),
            ("proxsmtpd_replies_total{class=\"5xx\"}", 1.0),
        ];
        for (series, value) in table {
            assert_eq!(sample(&text, series), Some(*value), "{series}");
        }
        m.set_draining(false);
        assert_eq!(sample(&m.render(), "proxsmtpd_draining"), Some(0.0));
        m.set_tls_certificate_expiry(None);
        assert!(!m
            .render()
            .contains("proxsmtpd_tls_certificate_expiry_timestamp_seconds"));
        m.set_tls_certificate_expiry(Some(5));
        assert_eq!(
            sample(
                &m.render(),
                "proxsmtpd_tls_certificate_expiry_timestamp_seconds"
            ),
            Some(5.0)
        );
    }

    #[test]
    fn config_reload_gauges() {
        let m = Metrics::new();
        m.config_loaded();
        let text = m.render();
        assert_eq!(
            sample(&text, "proxsmtpd_config_last_reload_successful"),
            Some(1.0)
        );
        let at = sample(
            &text,
            "proxsmtpd_config_last_reload_success_timestamp_seconds",
        )
        .unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!((now - at).abs() < 60.0, "{at} vs {now}");
        m.config_reload(false);
        let text = m.render();
        assert_eq!(
            sample(&text, "proxsmtpd_config_last_reload_successful"),
            Some(0.0)
        );
        assert_eq!(
            sample(
                &text,
                "proxsmtpd_config_last_reload_success_timestamp_seconds"
            ),
            Some(at)
        );
        m.config_reload(true);
        assert_eq!(
            sample(&m.render(), "proxsmtpd_config_last_reload_successful"),
            Some(1.0)
        );
    }

    /// OpenMetrics, checked line by line against the 1.0 text format's grammar: families
    /// declared once before their samples, counters without `_total` in TYPE/HELP and with
    /// it on samples, histogram buckets ending at `+Inf`, `# EOF` last and nothing after it.
    #[test]
    fn openmetrics_exposition() {
        let m = Metrics::new();
        m.message(MessageVerdict::Rejected, MessageSource::Upstream, 100);
        m.upstream_reply(UpstreamStage::Greeting, Duration::from_millis(2));
        let text = m.render_openmetrics();
        assert!(text.ends_with("\n# EOF\n"), "{text}");
        assert_eq!(text.matches("# EOF").count(), 1);
        for want in [
            "# TYPE proxsmtpd_messages counter\n",
            "# HELP proxsmtpd_messages Messages finished",
            "proxsmtpd_messages_total{source=\"upstream\",verdict=\"rejected\"} 1.0\n",
            "# TYPE proxsmtpd_upstream_reply_duration_seconds histogram\n",
            "proxsmtpd_upstream_reply_duration_seconds_bucket{stage=\"greeting\",le=\"+Inf\"} 1.0\n",
            "proxsmtpd_upstream_reply_duration_seconds_bucket{stage=\"greeting\",le=\"1.0\"} 1.0\n",
            "proxsmtpd_upstream_reply_duration_seconds_count{stage=\"greeting\"} 1.0\n",
            "# TYPE proxsmtpd_build_info gauge\n",
            "# TYPE proxsmtpd_draining gauge\n",
        ] {
            assert!(text.contains(want), "{want:?} not in\n{text}");
        }
        assert!(!text.contains("# TYPE proxsmtpd_messages_total"), "{text}");
        let mut declared: Vec<(String, String)> = Vec::new();
        for line in text.lines() {
            if line == "# EOF" {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (family, kind) = rest.split_once(' ').unwrap();
                assert!(
                    !declared.iter().any(|(f, _)| f == family),
                    "{family} declared twice"
                );
                declared.push((family.to_string(), kind.to_string()));
                continue;
            }
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let family = rest.split(' ').next().unwrap();
                assert_eq!(
                    declared.last().map(|d| d.0.as_str()),
                    Some(family),
                    "{line}"
                );
                continue;
            }
            assert!(!line.starts_with('#'), "unexpected comment {line}");
            // A sample belongs to the family declared last, with a suffix its type allows.
            let (family, kind) = declared.last().expect("sample before any TYPE");
            let name = line.split(['{', ' ']).next().unwrap();
            let suffix = name
                .strip_prefix(family.as_str())
                .unwrap_or_else(|| panic!("sample {name} outside its family {family}"));
            let allowed: &[&str] = match kind.as_str() {
                "counter" => &["_total", "_created"],
                "gauge" | "unknown" => &[""],
                "histogram" => &["_bucket", "_count", "_sum", "_created"],
                "summary" => &["", "_count", "_sum", "_created"],
                other => panic!("type {other}"),
            };
            assert!(allowed.contains(&suffix), "{name} in {kind} {family}");
            let value = line.rsplit(' ').next().unwrap();
            assert!(
                matches!(value, "+Inf" | "-Inf" | "NaN") || value.parse::<f64>().is_ok(),
                "{line}"
            );
        }
        // Every family of the text format is there.
        let families = m.registry.gather().len();
        assert_eq!(declared.len(), families);
    }

    #[test]
    fn openmetrics_numbers_and_escapes() {
        for (v, want) in [
            (0.0, "0.0"),
            (1.0, "1.0"),
            (0.005, "0.005"),
            (120.0, "120.0"),
            (1.5e15, "1500000000000000"),
            (f64::INFINITY, "+Inf"),
            (f64::NEG_INFINITY, "-Inf"),
            (f64::NAN, "NaN"),
        ] {
            assert_eq!(openmetrics_number(v), want);
        }
        assert_eq!(openmetrics_escape("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
    }

    #[test]
    fn global_is_one_instance() {
        assert!(std::ptr::eq(global(), global()));
        assert!(global().render().contains("proxsmtpd_messages_total"));
    }

    #[test]
    fn promtool_accepts_the_exposition() {
        let m = Metrics::new();
        m.message(MessageVerdict::Rejected, MessageSource::Filter, 123_456);
        m.filter_finished(Duration::from_secs(3));
        let text = m.render();
        let child = std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) => {
                println!("note: promtool not runnable ({e}); skipping the lint check");
                return;
            }
        };
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().expect("stdin is piped");
            stdin
                .write_all(text.as_bytes())
                .expect("promtool reads stdin");
        }
        let out = child.wait_with_output().expect("promtool finishes");
        assert!(
            out.status.success(),
            "promtool check metrics failed:\n{}{}\n--- exposition ---\n{text}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
    }
}
