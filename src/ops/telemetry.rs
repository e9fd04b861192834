//! OpenTelemetry tracing: SMTP connections and messages as spans, exported over OTLP.
//!
//! Export is switched on by the standard environment variables only:
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT` set (the latter gets
//! `/v1/traces` appended), unless `OTEL_TRACES_EXPORTER` names no `otlp` exporter (e.g. `none`)
//! or `OTEL_SDK_DISABLED=true`. The transport is OTLP over HTTP/protobuf (plain HTTP, as to a
//! collector on the node or in the pod); `OTEL_EXPORTER_OTLP_HEADERS`, `_TIMEOUT`,
//! `OTEL_TRACES_SAMPLER[_ARG]`, `OTEL_BSP_*` and `OTEL_RESOURCE_ATTRIBUTES` are honoured.
//! `OTEL_SERVICE_NAME` defaults to `proxsmtpd`. When export is off there is no layer at all, so
//! tracing costs nothing beyond the spans' bookkeeping in the subscriber.
//!
//! Span conventions (all at INFO level, created through the helpers below):
//! - `smtp.connection` (kind server), one per client connection. Fields: `connection.id`;
//!   `client.address` only when the operator sets `PROXSMTPD_TRACE_ADDRESSES=on`.
//! - `smtp.message`, child of the connection span, one per message transaction. Fields, recorded
//!   when the message is finished: `message.verdict` (the metric's verdict label values),
//!   `message.size_bytes`, `message.recipients` (a count, never addresses),
//!   `filter.duration_ms` (when a filter ran), `upstream.reply_code` (when the upstream
//!   answered). A `local_error` verdict also marks the span status as error.
//!
//! Only spans from this crate reach the exporter: log events (which may carry addresses) and the
//! spans of libraries (including the HTTP client that does the export) are left out.

use std::net::IpAddr;
use std::sync::OnceLock;
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
use opentelemetry_sdk::trace::{SdkTracerProvider, Tracer};
use opentelemetry_sdk::Resource;
use tracing::field::Empty;
use tracing::{Level, Metadata, Span, Subscriber};
use tracing_opentelemetry::OpenTelemetryLayer;
use tracing_subscriber::filter::{FilterFn, Filtered};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

use crate::ops::metrics::MessageVerdict;

/// The layer returned by [`otel_layer`]: the OpenTelemetry layer behind a per-layer filter.
pub(crate) type OtelLayer<S> =
    Filtered<OpenTelemetryLayer<S, Tracer>, FilterFn<fn(&Metadata<'_>) -> bool>, S>;

/// How long dropping an [`OtelGuard`] waits for the last spans to be sent.
const DROP_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// What the exporter needs, resolved from the environment by [`OtelConfig::from_env`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OtelConfig {
    /// Full URL of the traces endpoint; `None` lets the exporter read the `OTEL_*` variables.
    pub(crate) endpoint: Option<String>,
    pub(crate) service_name: String,
}

impl OtelConfig {
    /// `Some` when the environment asks for trace export, `None` when it does not.
    pub(crate) fn from_env() -> Option<OtelConfig> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    fn from_lookup(var: impl Fn(&str) -> Option<String>) -> Option<OtelConfig> {
        let set = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        if set("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
            return None;
        }
        if let Some(exporters) = set("OTEL_TRACES_EXPORTER") {
            if !exporters
                .split(',')
                .any(|e| e.trim().eq_ignore_ascii_case("otlp"))
            {
                return None;
            }
        }
        set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| set("OTEL_EXPORTER_OTLP_ENDPOINT"))?;
        // The standard precedence: OTEL_SERVICE_NAME, then service.name in the resource
        // attributes, then our default instead of the SDK's `unknown_service`.
        let service_name = set("OTEL_SERVICE_NAME")
            .or_else(|| {
                set("OTEL_RESOURCE_ATTRIBUTES")?.split(',').find_map(|kv| {
                    let (k, v) = kv.split_once('=')?;
                    (k.trim() == "service.name" && !v.trim().is_empty())
                        .then(|| v.trim().to_string())
                })
            })
            .unwrap_or_else(|| "proxsmtpd".to_string());
        Some(OtelConfig {
            endpoint: None,
            service_name: service_name.trim().to_string(),
        })
    }
}

/// Why trace export could not be set up (the proxy can run on without it).
#[derive(Debug)]
pub(crate) struct TelemetryError(String);

impl std::fmt::Display for TelemetryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OpenTelemetry trace export: {}", self.0)
    }
}

impl std::error::Error for TelemetryError {}

/// The OTLP layer when the environment asks for it (`Ok(None)` otherwise), and the guard that
/// sends the last spans. Must be called inside a tokio runtime: the batch exporter runs on it.
pub(crate) fn otel_layer<S>() -> Result<Option<(OtelLayer<S>, OtelGuard)>, TelemetryError>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    match OtelConfig::from_env() {
        Some(config) => otel_layer_with(&config).map(Some),
        None => Ok(None),
    }
}

/// Like [`otel_layer`], with explicit settings.
pub(crate) fn otel_layer_with<S>(
    config: &OtelConfig,
) -> Result<(OtelLayer<S>, OtelGuard), TelemetryError>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(TelemetryError(
            "must be set up inside the tokio runtime".into(),
        ));
    }
    // The exporter's HTTP client (reqwest, shared with the hooks, built with rustls and no
    // provider of its own) takes the process-wide one: ring, as everywhere in the proxy.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut builder = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary);
    if let Some(endpoint) = &config.endpoint {
        builder = builder.with_endpoint(endpoint.clone());
    }
    let exporter = builder.build().map_err(|e| TelemetryError(e.to_string()))?;
    let processor =
        BatchSpanProcessor::builder(exporter, opentelemetry_sdk::runtime::Tokio).build();
    let resource = Resource::builder()
        .with_service_name(config.service_name.clone())
        .with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION"),
        ))
        .build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("proxsmtpd");
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_location(false)
        .with_threads(false)
        .with_tracked_inactivity(false)
        .with_target(false)
        .with_filter(FilterFn::new(exported as fn(&Metadata<'_>) -> bool));
    Ok((
        layer,
        OtelGuard {
            provider: Some(provider),
        },
    ))
}

/// Spans of this crate at INFO or above; no events, no library spans.
fn exported(meta: &Metadata<'_>) -> bool {
    meta.is_span() && *meta.level() <= Level::INFO && is_own_target(meta.target())
}

fn is_own_target(target: &str) -> bool {
    let krate = env!("CARGO_CRATE_NAME");
    target
        .strip_prefix(krate)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
}

/// Owns the tracer provider. Prefer [`OtelGuard::shutdown`] at exit; dropping the guard also
/// sends the pending spans, waiting at most five seconds.
pub(crate) struct OtelGuard {
    provider: Option<SdkTracerProvider>,
}

impl OtelGuard {
    /// Sends the pending spans and stops the exporter; safe on any tokio runtime flavour.
    pub(crate) async fn shutdown(mut self) {
        if let Some(provider) = self.provider.take() {
            // The SDK blocks the calling thread until the batch task (on the runtime) is done.
            let _ = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        }
    }
}

impl Drop for OtelGuard {
    fn drop(&mut self) {
        let Some(provider) = self.provider.take() else {
            return;
        };
        // The SDK blocks until the batch task on the runtime has sent the spans. On the only
        // thread of a current-thread runtime that task cannot run while we wait, so waiting
        // would only stall; elsewhere wait with a deadline in case the collector hangs.
        let on_current_thread_runtime = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread);
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("otel-shutdown".into())
            .spawn(move || {
                let _ = provider.shutdown();
                let _ = done_tx.send(());
            });
        if spawned.is_ok() && !on_current_thread_runtime {
            let _ = done_rx.recv_timeout(DROP_FLUSH_TIMEOUT);
        }
    }
}

/// True when `PROXSMTPD_TRACE_ADDRESSES` is on (read once): client addresses go into traces.
pub(crate) fn trace_addresses() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("PROXSMTPD_TRACE_ADDRESSES").is_ok_and(|v| is_on(&v)))
}

fn is_on(value: &str) -> bool {
    ["on", "yes", "true", "1"]
        .iter()
        .any(|v| value.trim().eq_ignore_ascii_case(v))
}

/// The span of one client connection. `client` is recorded only when [`trace_addresses`] is on.
pub(crate) fn connection_span(connection_id: u64, client: IpAddr) -> Span {
    connection_span_with(connection_id, trace_addresses().then_some(client))
}

fn connection_span_with(connection_id: u64, client: Option<IpAddr>) -> Span {
    let span = tracing::info_span!(
        "smtp.connection",
        otel.kind = "server",
        connection.id = saturating_i64(connection_id),
        client.address = Empty,
    );
    if let Some(ip) = client {
        span.record("client.address", tracing::field::display(ip));
    }
    span
}

/// The span of one message transaction, a child of the current (connection) span. Fill it in
/// with [`record_message`] before it ends.
pub(crate) fn message_span() -> Span {
    tracing::info_span!(
        "smtp.message",
        message.verdict = Empty,
        message.size_bytes = Empty,
        message.recipients = Empty,
        filter.duration_ms = Empty,
        filter.decided_by = Empty,
        shadow.verdicts = Empty,
        upstream.reply_code = Empty,
        tls.established = Empty,
        tls.protocol.version = Empty,
        tls.cipher = Empty,
        otel.status_code = Empty,
    )
}

/// The OpenTelemetry layer exports only signed integers as numbers (unsigned ones become
/// strings), so counts and sizes are recorded as `i64`.
fn saturating_i64(n: impl TryInto<i64>) -> i64 {
    n.try_into().unwrap_or(i64::MAX)
}

/// The attributes a finished message's span records (OpenTelemetry names, numbers as i64).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MessageAttributes {
    pub(crate) verdict: MessageVerdict,
    pub(crate) size_bytes: u64,
    pub(crate) recipients: usize,
    /// `None` when no filter ran (e.g. the upstream refused before DATA).
    pub(crate) filter_duration: Option<Duration>,
    /// The upstream server's final reply code, when it answered.
    pub(crate) upstream_reply_code: Option<u16>,
}

/// Records `outcome` on a span made by [`message_span`].
pub(crate) fn record_message(span: &Span, outcome: &MessageAttributes) {
    span.record("message.verdict", outcome.verdict.as_str());
    span.record("message.size_bytes", saturating_i64(outcome.size_bytes));
    span.record("message.recipients", saturating_i64(outcome.recipients));
    if let Some(d) = outcome.filter_duration {
        span.record("filter.duration_ms", saturating_i64(d.as_millis()));
    }
    if let Some(code) = outcome.upstream_reply_code {
        span.record("upstream.reply_code", i64::from(code));
    }
    if outcome.verdict == MessageVerdict::LocalError {
        span.record("otel.status_code", "error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Bytes;
    use axum::extract::State;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};
    use opentelemetry_proto::tonic::trace::v1::{
        span::SpanKind, status::StatusCode, Span as ProtoSpan,
    };
    use prost::Message as _;
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn environment_decides_export() {
        // (environment, service name when export is on)
        type Case = (
            &'static [(&'static str, &'static str)],
            Option<&'static str>,
        );
        let table: &[Case] = &[
            (&[], None),
            (&[("OTEL_SERVICE_NAME", "x")], None),
            (&[("OTEL_EXPORTER_OTLP_ENDPOINT", "")], None),
            (
                &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318")],
                Some("proxsmtpd"),
            ),
            (
                &[(
                    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                    "http://c:4318/v1/traces",
                )],
                Some("proxsmtpd"),
            ),
            (
                &[
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                    ("OTEL_TRACES_EXPORTER", "none"),
                ],
                None,
            ),
            (
                &[
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                    ("OTEL_TRACES_EXPORTER", "console, OTLP"),
                ],
                Some("proxsmtpd"),
            ),
            (
                &[
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                    ("OTEL_SDK_DISABLED", "TRUE"),
                ],
                None,
            ),
            (
                &[
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                    ("OTEL_SDK_DISABLED", "false"),
                ],
                Some("proxsmtpd"),
            ),
            (
                &[
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                    ("OTEL_SERVICE_NAME", "mx-edge"),
                ],
                Some("mx-edge"),
            ),
            (
                &[
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                    ("OTEL_RESOURCE_ATTRIBUTES", "team=mail, service.name=edge"),
                ],
                Some("edge"),
            ),
            (
                &[
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                    ("OTEL_RESOURCE_ATTRIBUTES", "service.name=edge"),
                    ("OTEL_SERVICE_NAME", "mx"),
                ],
                Some("mx"),
            ),
        ];
        for (env, expected) in table {
            let got = OtelConfig::from_lookup(|name| {
                env.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            });
            assert_eq!(
                got.map(|c| c.service_name),
                expected.map(str::to_string),
                "{env:?}"
            );
        }
    }

    #[test]
    fn switches_and_targets() {
        for (value, on) in [
            ("on", true),
            ("ON", true),
            ("yes", true),
            ("1", true),
            ("off", false),
            ("", false),
            ("no", false),
        ] {
            assert_eq!(is_on(value), on, "{value:?}");
        }
        let krate = env!("CARGO_CRATE_NAME");
        for (target, own) in [
            (krate.to_string(), true),
            (format!("{krate}::proxy::session"), true),
            (format!("{krate}x"), false),
            ("hyper::client".to_string(), false),
        ] {
            assert_eq!(is_own_target(&target), own, "{target}");
        }
    }

    #[tokio::test]
    async fn composes_with_a_logging_stack() {
        // The shape the binary uses: registry, filter, log formatter, optional OTLP layer.
        let otel = otel_layer().ok().flatten();
        let (layer, guard) = match otel {
            Some((layer, guard)) => (Some(layer), Some(guard)),
            None => (None, None),
        };
        let subscriber = tracing_subscriber::registry()
            .with(tracing_subscriber::EnvFilter::new("info"))
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::sink),
            )
            .with(layer);
        tracing::subscriber::with_default(subscriber, || {
            let _span = message_span().entered();
            tracing::info!("inside");
        });
        if let Some(guard) = guard {
            guard.shutdown().await;
        }
    }

    #[test]
    fn needs_a_runtime() {
        let config = OtelConfig {
            endpoint: Some("http://127.0.0.1:9/v1/traces".into()),
            service_name: "t".into(),
        };
        assert!(otel_layer_with::<tracing_subscriber::Registry>(&config).is_err());
    }

    /// A minimal OTLP/HTTP receiver: keeps every decoded POST /v1/traces body.
    async fn start_receiver() -> (
        std::net::SocketAddr,
        Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
    ) {
        async fn traces(
            State(store): State<Arc<Mutex<Vec<ExportTraceServiceRequest>>>>,
            body: Bytes,
        ) -> axum::http::StatusCode {
            match ExportTraceServiceRequest::decode(body) {
                Ok(request) => {
                    store.lock().unwrap().push(request);
                    axum::http::StatusCode::OK
                }
                Err(_) => axum::http::StatusCode::BAD_REQUEST,
            }
        }
        let store = Arc::new(Mutex::new(Vec::new()));
        let app = axum::Router::new()
            .route("/v1/traces", axum::routing::post(traces))
            .with_state(store.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (addr, store)
    }

    fn attributes(span: &ProtoSpan) -> HashMap<String, any_value::Value> {
        span.attributes
            .iter()
            .filter_map(|KeyValue { key, value }| Some((key.clone(), value.clone()?.value?)))
            .collect()
    }

    fn int(v: i64) -> Option<any_value::Value> {
        Some(any_value::Value::IntValue(v))
    }

    fn string(v: &str) -> Option<any_value::Value> {
        Some(any_value::Value::StringValue(v.to_string()))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropping_the_guard_sends_pending_spans() {
        let (addr, store) = start_receiver().await;
        let config = OtelConfig {
            endpoint: Some(format!("http://{addr}/v1/traces")),
            service_name: "t".into(),
        };
        let (layer, guard) = otel_layer_with(&config).unwrap();
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            let _connection = connection_span(1, "192.0.2.1".parse().unwrap());
        });
        drop(guard);
        let spans: usize = store
            .lock()
            .unwrap()
            .iter()
            .flat_map(|r| &r.resource_spans)
            .flat_map(|rs| &rs.scope_spans)
            .map(|ss| ss.spans.len())
            .sum();
        assert_eq!(spans, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn spans_reach_an_otlp_receiver() {
        let (addr, store) = start_receiver().await;
        let config = OtelConfig {
            endpoint: Some(format!("http://{addr}/v1/traces")),
            service_name: "proxsmtpd-test".into(),
        };
        let (layer, guard) = otel_layer_with(&config).unwrap();
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            let outcomes = [
                MessageAttributes {
                    verdict: MessageVerdict::Accepted,
                    size_bytes: 4321,
                    recipients: 2,
                    filter_duration: Some(Duration::from_millis(42)),
                    upstream_reply_code: Some(250),
                },
                MessageAttributes {
                    verdict: MessageVerdict::LocalError,
                    size_bytes: 0,
                    recipients: 1,
                    filter_duration: None,
                    upstream_reply_code: None,
                },
            ];
            let connection = connection_span_with(7, None);
            let _in_connection = connection.enter();
            for outcome in &outcomes {
                let message = message_span();
                // Log events must not become span events (they may carry addresses).
                message.in_scope(|| tracing::info!(from = "someone@example.org", "MAIL FROM"));
                record_message(&message, outcome);
            }
            // An address-carrying connection span, for the opt-in case.
            let _with_address = connection_span_with(8, Some("192.0.2.7".parse().unwrap()));
            // Spans of other crates are not exported.
            let _foreign = tracing::info_span!(target: "hyper::proto", "foreign");
        });
        guard.shutdown().await;

        let requests = store.lock().unwrap().clone();
        let resource_spans: Vec<_> = requests.iter().flat_map(|r| &r.resource_spans).collect();
        let service_names: Vec<_> = resource_spans
            .iter()
            .filter_map(|rs| rs.resource.as_ref())
            .flat_map(|r| &r.attributes)
            .filter(|kv| kv.key == "service.name")
            .filter_map(|kv| kv.value.clone()?.value)
            .collect();
        assert!(!service_names.is_empty());
        assert!(service_names
            .iter()
            .all(|v| Some(v.clone()) == string("proxsmtpd-test")));
        let spans: Vec<&ProtoSpan> = resource_spans
            .iter()
            .flat_map(|rs| &rs.scope_spans)
            .flat_map(|ss| &ss.spans)
            .collect();
        let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names.len(), 4, "{names:?}");
        let connections: Vec<&&ProtoSpan> = spans
            .iter()
            .filter(|s| s.name == "smtp.connection")
            .collect();
        let messages: Vec<&&ProtoSpan> =
            spans.iter().filter(|s| s.name == "smtp.message").collect();
        assert_eq!((connections.len(), messages.len()), (2, 2), "{names:?}");

        let connection = connections
            .iter()
            .find(|s| attributes(s).get("connection.id").cloned() == int(7))
            .unwrap();
        assert_eq!(connection.kind, SpanKind::Server as i32);
        assert!(connection.parent_span_id.is_empty());
        let conn_attrs = attributes(connection);
        assert!(!conn_attrs.contains_key("client.address"), "{conn_attrs:?}");
        let other = connections
            .iter()
            .find(|s| s.span_id != connection.span_id)
            .unwrap();
        assert_eq!(
            attributes(other).get("client.address").cloned(),
            string("192.0.2.7")
        );

        for message in &messages {
            assert_eq!(message.trace_id, connection.trace_id);
            assert_eq!(message.parent_span_id, connection.span_id);
            assert!(message.events.is_empty(), "{:?}", message.events);
        }
        let expected: [&[(&str, Option<any_value::Value>)]; 2] = [
            &[
                ("message.verdict", string("accepted")),
                ("message.size_bytes", int(4321)),
                ("message.recipients", int(2)),
                ("filter.duration_ms", int(42)),
                ("upstream.reply_code", int(250)),
            ],
            &[
                ("message.verdict", string("local_error")),
                ("message.size_bytes", int(0)),
                ("message.recipients", int(1)),
                ("filter.duration_ms", None),
                ("upstream.reply_code", None),
            ],
        ];
        for fields in expected {
            let message = messages
                .iter()
                .find(|m| attributes(m).get("message.verdict").cloned() == fields[0].1)
                .unwrap();
            let attrs = attributes(message);
            for (key, value) in fields {
                assert_eq!(
                    attrs.get(*key).cloned(),
                    value.clone(),
                    "{key} in {attrs:?}"
                );
            }
            let status = message.status.clone().unwrap_or_default().code;
            let error = fields[0].1 == string("local_error");
            assert_eq!(status == StatusCode::Error as i32, error);
        }
    }
}
