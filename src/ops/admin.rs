//! Admin HTTP server (AdminListen): liveness and readiness probes and the Prometheus scrape.
//!
//! Routes:
//! - `GET /livez`: 200 `ok` while the process serves HTTP at all.
//! - `GET /readyz`, `GET /healthz` (alias): 200 `ok` when every check passes, else 503 listing
//!   the failed checks. Checks: `listener` (SMTP listener bound), `config` (config and filter
//!   loaded), `filter` (FilterCommand names an executable program), `draining` (not shutting
//!   down) and, only when configured, `upstream` (the upstream
//!   server answers; cached so that probes do not hammer it).
//! - `?verbose` on any probe lists every check as `[+]name ok` / `[-]name failed`.
//! - `GET /metrics`: [`crate::ops::metrics::global`] in the Prometheus text format.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{RawQuery, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::ops::metrics;

/// An asynchronous check that the upstream server answers (true = healthy).
pub(crate) type UpstreamCheck =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = bool> + Send>> + Send + Sync>;

/// A synchronous check that the filter command can run (true = runnable).
pub(crate) type FilterCheck = Arc<dyn Fn() -> bool + Send + Sync>;

/// How long one upstream check may take before it counts as failed. Kubernetes gives a probe
/// one second by default, so a slow upstream must not hold the answer much longer.
const UPSTREAM_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Readiness state shared between the proxy core and the admin server.
pub(crate) struct Health {
    listener_bound: AtomicBool,
    config_loaded: AtomicBool,
    draining: AtomicBool,
    filter: Option<FilterCheck>,
    upstream: Option<Upstream>,
    /// ReadinessCheckMilters: every milter accepts connections (same caching and bound).
    milters: Option<Upstream>,
}

struct Upstream {
    check: UpstreamCheck,
    ttl: Duration,
    /// Last result and when it was taken. The async mutex makes concurrent probes share one
    /// check instead of each opening a connection upstream.
    last: tokio::sync::Mutex<Option<(Instant, bool)>>,
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

impl Health {
    /// Not ready: nothing bound or loaded yet, no upstream check.
    pub(crate) fn new() -> Health {
        Health {
            listener_bound: AtomicBool::new(false),
            config_loaded: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            filter: None,
            upstream: None,
            milters: None,
        }
    }

    /// Adds the `filter` check: FilterCommand names something that can run. Evaluated at
    /// each probe, so a reload or a fixed script is seen at once.
    pub(crate) fn with_filter_check(mut self, check: FilterCheck) -> Health {
        self.filter = Some(check);
        self
    }

    /// Adds the opt-in upstream check (ReadinessCheckUpstream). Its result is reused for `ttl`;
    /// a check taking longer than two seconds counts as failed.
    pub(crate) fn with_upstream_check(mut self, check: UpstreamCheck, ttl: Duration) -> Health {
        self.upstream = Some(Upstream {
            check,
            ttl,
            last: tokio::sync::Mutex::new(None),
        });
        self
    }

    /// Adds the opt-in milter check (ReadinessCheckMilters): like the upstream check, for
    /// every configured milter at once.
    pub(crate) fn with_milter_check(mut self, check: UpstreamCheck, ttl: Duration) -> Health {
        self.milters = Some(Upstream {
            check,
            ttl,
            last: tokio::sync::Mutex::new(None),
        });
        self
    }

    pub(crate) fn set_listener_bound(&self) {
        self.listener_bound.store(true, Ordering::SeqCst);
    }

    pub(crate) fn set_config_loaded(&self) {
        self.config_loaded.store(true, Ordering::SeqCst);
    }

    /// Readiness fails from now on; also sets the `proxsmtpd_draining` gauge.
    pub(crate) fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
        metrics::global().set_draining(true);
    }

    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Every readiness check by name, in a stable order.
    async fn checks(&self) -> Vec<(&'static str, bool)> {
        let mut checks = vec![
            ("listener", self.listener_bound.load(Ordering::SeqCst)),
            ("config", self.config_loaded.load(Ordering::SeqCst)),
        ];
        if let Some(filter) = &self.filter {
            // It looks at the filter's script on disk: on the blocking pool, so that a slow
            // volume holds this probe only.
            let filter = filter.clone();
            let ready = crate::config::file_watch::off_runtime(move || filter()).await;
            checks.push(("filter", ready));
        }
        checks.push(("draining", !self.is_draining()));
        if let Some(upstream) = &self.upstream {
            checks.push(("upstream", upstream.healthy().await));
        }
        if let Some(milters) = &self.milters {
            checks.push(("milters", milters.healthy().await));
        }
        checks
    }

    /// True when every readiness check passes.
    #[cfg(test)]
    async fn is_ready(&self) -> bool {
        self.checks().await.iter().all(|(_, ok)| *ok)
    }
}

impl Upstream {
    async fn healthy(&self) -> bool {
        let mut last = self.last.lock().await;
        if let Some((at, ok)) = *last {
            if at.elapsed() < self.ttl {
                return ok;
            }
        }
        // Spawned so that a probe that gives up early does not cancel the check half-way;
        // its result is still cached for the next probe.
        let check = (self.check)();
        let task = tokio::spawn(tokio::time::timeout(UPSTREAM_CHECK_TIMEOUT, check));
        let ok = matches!(task.await, Ok(Ok(true)));
        *last = Some((Instant::now(), ok));
        ok
    }
}

/// At most this many admin connections are served at once; more are closed as soon as they
/// are accepted. Probes and scrapes need a handful; a flood of idle connections must never
/// take the descriptors SMTP needs (see [`connection_cap`]).
pub(crate) const MAX_CONNECTIONS: usize = 64;

/// A request's headers must arrive within this time, and an idle keep-alive connection is
/// closed after it (hyper's header timer also runs while waiting for the next request).
pub(crate) const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// No admin connection lives longer than this, whatever the peer does (a slow reader of
/// `/metrics`, say): it is then asked to close, and cut off shortly after.
pub(crate) const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// The request line and headers together; probes and scrapers send a few hundred bytes.
/// hyper's smallest read buffer is 8 KiB, which also bounds one read.
const MAX_HEADER_BYTES: usize = 8 * 1024;

/// The admin connection limit for a process allowed `nofile` descriptors: at most
/// [`MAX_CONNECTIONS`], and never more than an eighth of the limit, so that the rest stays
/// for SMTP sessions (two sockets, a spool file and the filter's pipes each).
pub(crate) fn connection_cap(nofile: u64) -> usize {
    let eighth = usize::try_from(nofile / 8).unwrap_or(usize::MAX);
    eighth.clamp(1, MAX_CONNECTIONS)
}

/// Serves the admin routes on `listener` until `shutdown` completes, at most `cap`
/// connections at a time (see [`connection_cap`]).
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    health: Arc<Health>,
    cap: usize,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let router = router(health);
    let slots = Arc::new(tokio::sync::Semaphore::new(cap));
    let mut connections = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        while connections.try_join_next().is_some() {}
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = &mut shutdown => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, typically: wait rather than spin.
                tracing::warn!("admin server: couldn't accept connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            // Closed at once: its descriptor is back before the next accept.
            drop(stream);
            continue;
        };
        let router = router.clone();
        connections.spawn(async move {
            serve_connection(stream, router).await;
            drop(permit);
        });
    }
    connections.shutdown().await;
    Ok(())
}

/// One HTTP/1.1 connection with bounded headers, header and idle timeouts, no request
/// bodies and a bounded lifetime.
async fn serve_connection(stream: tokio::net::TcpStream, router: Router) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use tower::ServiceExt;

    let service =
        hyper::service::service_fn(move |request: axum::http::Request<hyper::body::Incoming>| {
            let router = router.clone();
            async move {
                if has_body(&request) {
                    return Ok::<_, std::convert::Infallible>(payload_too_large());
                }
                router.oneshot(request.map(axum::body::Body::new)).await
            }
        });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES)
        .keep_alive(true);
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => return,
        _ = tokio::time::sleep(CONNECTION_LIFETIME) => {}
    }
    connection.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(HEADER_READ_TIMEOUT, connection).await;
}

/// The admin server has no route that takes a body; a request announcing one is refused
/// rather than read.
fn has_body<B>(request: &axum::http::Request<B>) -> bool {
    let headers = request.headers();
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0")
}

fn payload_too_large() -> Response {
    (
        StatusCode::PAYLOAD_TOO_LARGE,
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            (header::CONNECTION, "close"),
        ],
        "request bodies are not accepted\n",
    )
        .into_response()
}

fn router(health: Arc<Health>) -> Router {
    Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics_text))
        .with_state(health)
}

async fn livez(RawQuery(query): RawQuery) -> Response {
    report("livez", &[("ping", true)], wants_verbose(query.as_deref()))
}

async fn readyz(State(health): State<Arc<Health>>, RawQuery(query): RawQuery) -> Response {
    report(
        "readyz",
        &health.checks().await,
        wants_verbose(query.as_deref()),
    )
}

async fn healthz(State(health): State<Arc<Health>>, RawQuery(query): RawQuery) -> Response {
    report(
        "healthz",
        &health.checks().await,
        wants_verbose(query.as_deref()),
    )
}

async fn metrics_text(headers: axum::http::HeaderMap) -> Response {
    let accept = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join(",");
    if wants_openmetrics(&accept) {
        (
            [(header::CONTENT_TYPE, metrics::OPENMETRICS_CONTENT_TYPE)],
            metrics::global().render_openmetrics(),
        )
            .into_response()
    } else {
        (
            [(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
            metrics::global().render(),
        )
            .into_response()
    }
}

/// Whether an `Accept` header prefers OpenMetrics to the Prometheus text format: its best
/// `application/openmetrics-text` range has a q above 0 and at least that of `text/plain`
/// (or of a wildcard, when text/plain is not named).
fn wants_openmetrics(accept: &str) -> bool {
    let mut openmetrics: Option<f32> = None;
    let mut text: Option<f32> = None;
    let mut wildcard: Option<f32> = None;
    for range in accept.split(',') {
        let mut parts = range.split(';');
        let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let q = parts
            .filter_map(|p| p.split_once('='))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
            .map_or(Some(1.0), |(_, v)| v.trim().parse::<f32>().ok())
            .unwrap_or(0.0);
        let slot = match media.as_str() {
            "application/openmetrics-text" => &mut openmetrics,
            "text/plain" => &mut text,
            "*/*" | "text/*" => &mut wildcard,
            _ => continue,
        };
        *slot = Some(slot.map_or(q, |old: f32| old.max(q)));
    }
    match openmetrics {
        Some(q) if q > 0.0 => q >= text.or(wildcard).unwrap_or(0.0),
        _ => false,
    }
}

/// `?verbose`, `?verbose=`, `?verbose=true`, `?verbose=1` ask for the per-check listing.
fn wants_verbose(query: Option<&str>) -> bool {
    query.unwrap_or("").split('&').any(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        key == "verbose" && matches!(value, "" | "true" | "1")
    })
}

/// The Kubernetes-style probe answer: `ok`, or the checks and a summary line.
fn report(probe: &str, checks: &[(&str, bool)], verbose: bool) -> Response {
    let ok = checks.iter().all(|(_, ok)| *ok);
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = if ok && !verbose {
        "ok\n".to_string()
    } else {
        let mut body = String::new();
        // Without ?verbose only the failures are worth a line.
        for (name, passed) in checks.iter().filter(|(_, passed)| verbose || !passed) {
            let line = if *passed {
                format!("[+]{name} ok\n")
            } else {
                format!("[-]{name} failed\n")
            };
            body.push_str(&line);
        }
        let verdict = if ok { "passed" } else { "failed" };
        body.push_str(&format!("{probe} check {verdict}\n"));
        body
    };
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Starts the server on a loopback port; returns its address and the shutdown trigger.
    async fn start(
        health: Arc<Health>,
    ) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(serve(listener, health, MAX_CONNECTIONS, async {
            let _ = rx.await;
        }));
        (addr, tx)
    }

    /// One HTTP/1.1 GET; returns (status, content type, body).
    async fn get(addr: std::net::SocketAddr, target: &str) -> (u16, String, String) {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {target} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.unwrap();
        let raw = String::from_utf8(raw).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        let content_type = head
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("content-type")
                    .then(|| value.trim().to_string())
            })
            .unwrap_or_default();
        (status, content_type, body.to_string())
    }

    #[tokio::test]
    async fn probes_follow_the_lifecycle() {
        let health = Arc::new(Health::new());
        let (addr, stop) = start(health.clone()).await;

        // (stage, target, status, exact body)
        type Case = (&'static str, u16, &'static str);
        let starting: &[Case] = &[
            ("/livez", 200, "ok\n"),
            (
                "/readyz",
                503,
                "[-]listener failed\n[-]config failed\nreadyz check failed\n",
            ),
            (
                "/healthz",
                503,
                "[-]listener failed\n[-]config failed\nhealthz check failed\n",
            ),
            (
                "/readyz?verbose",
                503,
                "[-]listener failed\n[-]config failed\n[+]draining ok\nreadyz check failed\n",
            ),
        ];
        let ready: &[Case] = &[
            ("/livez", 200, "ok\n"),
            ("/livez?verbose", 200, "[+]ping ok\nlivez check passed\n"),
            ("/readyz", 200, "ok\n"),
            ("/healthz", 200, "ok\n"),
            ("/readyz?verbose=false", 200, "ok\n"),
            (
                "/readyz?x=1&verbose=true",
                200,
                "[+]listener ok\n[+]config ok\n[+]draining ok\nreadyz check passed\n",
            ),
            (
                "/healthz?verbose",
                200,
                "[+]listener ok\n[+]config ok\n[+]draining ok\nhealthz check passed\n",
            ),
            ("/nothing", 404, ""),
        ];
        let draining: &[Case] = &[
            ("/livez", 200, "ok\n"),
            ("/readyz", 503, "[-]draining failed\nreadyz check failed\n"),
            (
                "/healthz",
                503,
                "[-]draining failed\nhealthz check failed\n",
            ),
        ];

        for (target, status, body) in starting {
            assert_eq!(
                get(addr, target).await,
                (
                    *status,
                    "text/plain; charset=utf-8".into(),
                    body.to_string()
                ),
                "{target}"
            );
        }
        health.set_listener_bound();
        assert!(!health.is_ready().await);
        health.set_config_loaded();
        assert!(health.is_ready().await);
        for (target, status, body) in ready {
            let (s, _, b) = get(addr, target).await;
            assert_eq!((s, b.as_str()), (*status, *body), "{target}");
        }
        health.set_draining();
        for (target, status, body) in draining {
            let (s, _, b) = get(addr, target).await;
            assert_eq!((s, b.as_str()), (*status, *body), "{target}");
        }
        let _ = stop.send(());
    }

    #[tokio::test]
    async fn metrics_route_serves_the_text_format() {
        metrics::global().connection_refused();
        let (addr, stop) = start(Arc::new(Health::new())).await;
        let (status, content_type, body) = get(addr, "/metrics").await;
        assert_eq!(status, 200);
        assert_eq!(content_type, "text/plain; version=0.0.4");
        assert!(
            body.contains("# TYPE proxsmtpd_messages_total counter\n"),
            "{body}"
        );
        assert!(
            body.contains("proxsmtpd_connections_refused_total "),
            "{body}"
        );
        let _ = stop.send(());
    }

    #[tokio::test]
    async fn upstream_check_is_cached_and_bounded() {
        let calls = Arc::new(AtomicUsize::new(0));
        let healthy = Arc::new(AtomicBool::new(true));
        let slow = Arc::new(AtomicBool::new(false));
        let check: UpstreamCheck = {
            let (calls, healthy, slow) = (calls.clone(), healthy.clone(), slow.clone());
            Arc::new(move || {
                calls.fetch_add(1, Ordering::SeqCst);
                let (ok, slow) = (healthy.load(Ordering::SeqCst), slow.load(Ordering::SeqCst));
                Box::pin(async move {
                    if slow {
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                    }
                    ok
                })
            })
        };
        let ttl = Duration::from_millis(300);
        let health = Arc::new(Health::new().with_upstream_check(check, ttl));
        health.set_listener_bound();
        health.set_config_loaded();
        let (addr, stop) = start(health.clone()).await;

        assert_eq!(get(addr, "/readyz").await.0, 200);
        healthy.store(false, Ordering::SeqCst);
        // Within the TTL the cached success is reused, without a new check.
        let (status, _, body) = get(addr, "/readyz?verbose").await;
        assert_eq!((status, body.as_str()), (200, "[+]listener ok\n[+]config ok\n[+]draining ok\n[+]upstream ok\nreadyz check passed\n"));
        assert_eq!(calls.load(Ordering::SeqCst), 1);

        tokio::time::sleep(ttl).await;
        let (status, _, body) = get(addr, "/readyz").await;
        assert_eq!(
            (status, body.as_str()),
            (503, "[-]upstream failed\nreadyz check failed\n")
        );
        assert_eq!(calls.load(Ordering::SeqCst), 2);

        // A hanging upstream fails the check after the bound instead of hanging the probe.
        tokio::time::sleep(ttl).await;
        healthy.store(true, Ordering::SeqCst);
        slow.store(true, Ordering::SeqCst);
        let started = Instant::now();
        assert_eq!(get(addr, "/readyz").await.0, 503);
        assert!(started.elapsed() < UPSTREAM_CHECK_TIMEOUT + Duration::from_secs(1));
        let _ = stop.send(());
    }

    #[tokio::test]
    async fn serve_returns_on_shutdown() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, Arc::new(Health::new()), 4, async {
            let _ = rx.await;
        }));
        tx.send(()).unwrap();
        let result = tokio::time::timeout(Duration::from_secs(5), server).await;
        assert!(matches!(result, Ok(Ok(Ok(())))));
    }

    #[test]
    fn accept_negotiation() {
        let prometheus_2 = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        let table: &[(&str, bool)] = &[
            ("", false),
            ("*/*", false),
            ("text/plain", false),
            (prometheus_2, true),
            ("application/openmetrics-text", true),
            ("Application/OpenMetrics-Text; version=1.0.0", true),
            ("text/plain;q=1,application/openmetrics-text;q=0.5", false),
            ("application/openmetrics-text;q=0", false),
            ("application/openmetrics-text;q=0.2,*/*;q=0.1", true),
            ("application/openmetrics-text;q=0.2,*/*", false),
        ];
        for (accept, want) in table {
            assert_eq!(wants_openmetrics(accept), *want, "{accept:?}");
        }
    }

    #[test]
    fn connection_cap_leaves_most_descriptors_to_smtp() {
        for (nofile, cap) in [
            (0, 1),
            (16, 2),
            (256, 32),
            (512, 64),
            (1024, 64),
            (1 << 20, 64),
        ] {
            assert_eq!(connection_cap(nofile), cap, "{nofile}");
        }
    }

    #[test]
    fn verbose_query_forms() {
        let table: &[(Option<&str>, bool)] = &[
            (None, false),
            (Some(""), false),
            (Some("verbose"), true),
            (Some("verbose="), true),
            (Some("verbose=true"), true),
            (Some("verbose=1"), true),
            (Some("verbose=false"), false),
            (Some("verbose=0"), false),
            (Some("a=b&verbose"), true),
            (Some("verbosex"), false),
            (Some("x=verbose"), false),
        ];
        for (query, expected) in table {
            assert_eq!(wants_verbose(*query), *expected, "{query:?}");
        }
    }
}
