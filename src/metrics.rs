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
pub enum MessageVerdict {
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
    pub const ALL: [MessageVerdict; 5] = [
        MessageVerdict::Accepted,
        MessageVerdict::Rejected,
        MessageVerdict::Dropped,
        MessageVerdict::TempFailed,
        MessageVerdict::LocalError,
    ];

    /// The value of the `verdict` label (also used in logs and traces).
    pub fn as_str(self) -> &'static str {
        match self {
            MessageVerdict::Accepted => "accepted",
            MessageVerdict::Rejected => "rejected",
            MessageVerdict::Dropped => "dropped",
            MessageVerdict::TempFailed => "tempfailed",
            MessageVerdict::LocalError => "local_error",
        }
    }
}

/// The SMTP stage at which talking to the upstream server failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamStage {
    Connect,
    Greeting,
    Command,
    Data,
    Final,
}

impl UpstreamStage {
    pub const ALL: [UpstreamStage; 5] = [
        UpstreamStage::Connect,
        UpstreamStage::Greeting,
        UpstreamStage::Command,
        UpstreamStage::Data,
        UpstreamStage::Final,
    ];

    /// The value of the `stage` label.
    pub fn as_str(self) -> &'static str {
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
pub struct Metrics {
    registry: Registry,
    messages: [IntCounter; 5],
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
    tls_sessions: IntCounterVec,
    tls_handshake_failures: IntCounterVec,
    tls_certificate_reloads: IntCounterVec,
    messages_abandoned: IntCounter,
}

static GLOBAL: OnceLock<Metrics> = OnceLock::new();

/// The process-wide metrics, created on first use.
pub fn global() -> &'static Metrics {
    GLOBAL.get_or_init(Metrics::new)
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh, independent set of metrics (the process uses [`global`]; tests use their own).
    pub fn new() -> Metrics {
        let registry = Registry::new();
        // The definitions below are static, so a failure is a programming error that the unit
        // tests catch; it can never be caused by input.
        let reg = Registrar(&registry);

        let build_info = reg.gauge_vec(
            "proxsmtpd_build_info",
            "Build information; the value is always 1.",
            &["version"],
        );
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);

        let messages = reg.counter_vec(
            "proxsmtpd_messages_total",
            "Messages finished, by the outcome the client saw.",
            &["verdict"],
        );
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
            messages: MessageVerdict::ALL.map(|v| messages.with_label_values(&[v.as_str()])),
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
            registry,
        };
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

    /// The registry holding every metric, for callers that add their own collectors.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// A client connection was accepted.
    pub fn connection_opened(&self) {
        self.connections_total.inc();
        self.connections_active.inc();
    }

    /// An accepted client connection ended (pairs with [`Metrics::connection_opened`]).
    pub fn connection_closed(&self) {
        self.connections_active.dec();
    }

    /// A connection was turned away at MaxConnections (not counted in `connections_total`).
    pub fn connection_refused(&self) {
        self.connections_refused.inc();
    }

    /// A message finished with `verdict`; `size_bytes` is the DATA size received from the client.
    pub fn message(&self, verdict: MessageVerdict, size_bytes: u64) {
        self.messages[verdict as usize].inc();
        // f64 is exact up to 2^53 bytes, far beyond any message.
        self.message_size.observe(size_bytes as f64);
    }

    /// The client left before the answer to its message: it was not delivered (the client
    /// will send it again).
    pub fn message_abandoned(&self) {
        self.messages_abandoned.inc();
    }

    /// The filter finished (whatever its verdict) after `duration`.
    pub fn filter_finished(&self, duration: Duration) {
        self.filter_duration.observe(duration.as_secs_f64());
    }

    pub fn filter_timeout(&self) {
        self.filter_timeouts.inc();
    }

    pub fn filter_spawn_failure(&self) {
        self.filter_spawn_failures.inc();
    }

    pub fn upstream_error(&self, stage: UpstreamStage) {
        self.upstream_errors[stage as usize].inc();
    }

    /// A reply with `code` was sent to a client; codes outside 200..=599 are not counted.
    pub fn reply_sent(&self, code: u16) {
        if let Some(counter) = (code / 100)
            .checked_sub(2)
            .and_then(|i| self.replies.get(usize::from(i)))
        {
            counter.inc();
        }
    }

    pub fn config_reload(&self, ok: bool) {
        if ok {
            self.config_reload_success.inc();
        } else {
            self.config_reload_failure.inc();
        }
    }

    /// A TLS handshake completed; `side` is `client` or `upstream`, `version` e.g. `TLSv1.3`.
    pub fn tls_session(&self, side: &str, version: &str) {
        self.tls_sessions.with_label_values(&[side, version]).inc();
    }

    pub fn tls_handshake_failure(&self, side: &str) {
        self.tls_handshake_failures.with_label_values(&[side]).inc();
    }

    pub fn tls_certificate_reload(&self, ok: bool) {
        let result = if ok { "success" } else { "failure" };
        self.tls_certificate_reloads
            .with_label_values(&[result])
            .inc();
    }

    pub fn set_draining(&self, draining: bool) {
        self.draining.set(i64::from(draining));
    }

    /// All metrics in the Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
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
                format!("proxsmtpd_build_info{{version=\"{version}\"}}"),
                1.0,
            ),
            ("proxsmtpd_connections_total".into(), 0.0),
            ("proxsmtpd_connections_active".into(), 0.0),
            ("proxsmtpd_connections_refused_total".into(), 0.0),
            ("proxsmtpd_filter_timeouts_total".into(), 0.0),
            ("proxsmtpd_filter_spawn_failures_total".into(), 0.0),
            ("proxsmtpd_draining".into(), 0.0),
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
        for v in [
            "accepted",
            "rejected",
            "dropped",
            "tempfailed",
            "local_error",
        ] {
            expected.push((format!("proxsmtpd_messages_total{{verdict=\"{v}\"}}"), 0.0));
        }
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
        m.message(MessageVerdict::Accepted, 2000);
        m.message(MessageVerdict::LocalError, 10);
        m.message(MessageVerdict::TempFailed, 0);
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
            ("proxsmtpd_messages_total{verdict=\"accepted\"}", 1.0),
            ("proxsmtpd_messages_total{verdict=\"local_error\"}", 1.0),
            ("proxsmtpd_messages_total{verdict=\"tempfailed\"}", 1.0),
            ("proxsmtpd_messages_total{verdict=\"rejected\"}", 0.0),
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
    }

    #[test]
    fn global_is_one_instance() {
        assert!(std::ptr::eq(global(), global()));
        assert!(global().render().contains("proxsmtpd_messages_total"));
    }

    #[test]
    fn promtool_accepts_the_exposition() {
        let m = Metrics::new();
        m.message(MessageVerdict::Rejected, 123_456);
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
