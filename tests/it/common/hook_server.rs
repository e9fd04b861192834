//! Test peers for the proxy's HTTP hooks (Stalwart MTA Hooks JSON):
//!
//! - [`HookServer`]: an HTTP/1.1 server inside the test process (hyper), plain, TLS or
//!   mutual TLS, optionally requiring a bearer token read from a file at each request. It
//!   records every request and answers each with the [`Behaviour`] a test's closure picks
//!   from the request's JSON; it counts requests in flight and the most seen at once.
//! - [`HookService`]: `hook_service.py` (aiohttp, Debian's python3-aiohttp) as a child
//!   process answering by a rules file, an independent implementation of the same protocol.
//! - [`TestCa`] / [`Pki`]: a test CA and certificates for either, as PEM files.

use std::fs;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use hyper::body::{Body, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{json, Value};
use tempfile::TempDir;

use super::proxy::{free_port, pid_listens_on};

// ---------------------------------------------------------------------------------------
// Certificates.

/// A certificate and its key as PEM files.
#[derive(Clone, Debug)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A test certificate authority; what it signs is written as PEM files into `dir`.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
    dir: PathBuf,
    /// The CA certificate (PEM): the proxy's `ca_file`, or a server's client CA.
    pub cert_file: PathBuf,
}

impl TestCa {
    /// A new CA named `name`, its certificate written to `dir/<name>.ca.pem`.
    pub fn new(dir: &Path, name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let cert_file = dir.join(format!("{name}.ca.pem"));
        fs::write(&cert_file, issuer.pem()).unwrap();
        TestCa {
            issuer,
            dir: dir.to_path_buf(),
            cert_file,
        }
    }

    /// The CA certificate, DER (for a rustls root store).
    pub fn der(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }

    /// A server certificate for `127.0.0.1` and `localhost`, as `<name>.crt` / `<name>.key`.
    pub fn server_cert(&self, name: &str) -> CertFiles {
        self.leaf(
            name,
            "localhost",
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// A client certificate whose subject CN is `cn`, as `<cn>.crt` / `<cn>.key`.
    pub fn client_cert(&self, cn: &str) -> CertFiles {
        self.leaf(cn, cn, &[], ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn leaf(
        &self,
        file: &str,
        cn: &str,
        names: &[&str],
        usage: ExtendedKeyUsagePurpose,
    ) -> CertFiles {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let files = CertFiles {
            cert: self.dir.join(format!("{file}.crt")),
            key: self.dir.join(format!("{file}.key")),
        };
        fs::write(&files.cert, cert.pem()).unwrap();
        fs::write(&files.key, key.serialize_pem()).unwrap();
        files
    }
}

/// What most TLS hook tests need, in a temp dir of its own: a CA, a server certificate
/// for 127.0.0.1/localhost, and a client certificate with CN `proxsmtpd-client`.
pub struct Pki {
    pub dir: TempDir,
    pub ca: TestCa,
    pub server: CertFiles,
    pub client: CertFiles,
}

/// The subject CN of [`Pki::client`].
pub const CLIENT_CN: &str = "proxsmtpd-client";

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::Builder::new()
            .prefix("hook-pki.")
            .tempdir()
            .unwrap();
        let ca = TestCa::new(dir.path(), "hook-test-ca");
        let server = ca.server_cert("hook-server");
        let client = ca.client_cert(CLIENT_CN);
        Pki {
            dir,
            ca,
            server,
            client,
        }
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn load_chain(path: &Path) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .collect::<Result<_, _>>()
        .unwrap()
}

fn load_key(path: &Path) -> PrivateKeyDer<'static> {
    PrivateKeyDer::from_pem_file(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn roots(ca_file: &Path) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_chain(ca_file) {
        roots.add(cert).unwrap();
    }
    roots
}

/// A rustls client configuration trusting `ca_file`, presenting `client` when given (for
/// tests talking to a hook server directly).
pub fn client_tls_config(ca_file: &Path, client: Option<&CertFiles>) -> Arc<rustls::ClientConfig> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots(ca_file));
    let config = match client {
        Some(c) => builder
            .with_client_auth_cert(load_chain(&c.cert), load_key(&c.key))
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    Arc::new(config)
}

fn server_tls_config(server: &CertFiles, client_ca: Option<&Path>) -> Arc<rustls::ServerConfig> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match client_ca {
        Some(ca) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots(ca)),
                provider(),
            )
            .build()
            .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    Arc::new(
        builder
            .with_single_cert(load_chain(&server.cert), load_key(&server.key))
            .unwrap(),
    )
}

fn subject_cn(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}

// ---------------------------------------------------------------------------------------
// Requests and answers.

/// How the server answers one request.
#[derive(Clone, Debug)]
pub enum Behaviour {
    /// 200 with this JSON (`application/json`).
    Json(Value),
    /// This status and body as given (a 5xx, JSON that does not parse, ...).
    Raw { status: u16, body: String },
    /// Waits, then answers as the inner behaviour.
    Delay(Duration, Box<Behaviour>),
    /// Closes the connection without an answer.
    Close,
}

impl Behaviour {
    /// `{"action": "accept"}`.
    pub fn accept() -> Behaviour {
        Behaviour::Json(json!({"action": "accept"}))
    }

    /// `{"action": action}` (accept, discard, reject, quarantine).
    pub fn action(action: &str) -> Behaviour {
        Behaviour::Json(json!({"action": action}))
    }

    /// A reject with this SMTP response (a 4xx `status` means tempfail).
    pub fn reject(status: u16, enhanced: &str, message: &str) -> Behaviour {
        Behaviour::Json(json!({
            "action": "reject",
            "response": {"status": status, "enhancedStatus": enhanced, "message": message},
        }))
    }

    /// Accept with these modifications (a JSON array of modification objects).
    pub fn modify(modifications: Value) -> Behaviour {
        Behaviour::Json(json!({"action": "accept", "modifications": modifications}))
    }

    pub fn raw(status: u16, body: &str) -> Behaviour {
        Behaviour::Raw {
            status,
            body: body.to_string(),
        }
    }

    pub fn delay(wait: Duration, then: Behaviour) -> Behaviour {
        Behaviour::Delay(wait, Box::new(then))
    }
}

/// One request as the server received it.
#[derive(Clone, Debug)]
pub struct HookRequest {
    pub method: String,
    pub path: String,
    /// Names in lower case, in arrival order.
    pub headers: Vec<(String, String)>,
    /// The body as received (after de-chunking).
    pub body: Vec<u8>,
    /// The body parsed as JSON; `Value::Null` when it does not parse.
    pub json: Value,
    /// The subject CN of the client certificate (mutual TLS only).
    pub client_cn: Option<String>,
    /// False when the bearer token was missing or wrong (answered 401).
    pub authorized: bool,
}

impl HookRequest {
    /// The first header called `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// True when the body came with `Transfer-Encoding: chunked`.
    pub fn chunked(&self) -> bool {
        self.header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    }

    /// `context.stage` (mail, rcpt, data), "" when absent.
    pub fn stage(&self) -> &str {
        stage_of(&self.json)
    }
}

/// `context.stage` of a request's JSON, "" when absent (for behaviour closures).
pub fn stage_of(request: &Value) -> &str {
    request["context"]["stage"].as_str().unwrap_or("")
}

type Respond = dyn Fn(&Value) -> Behaviour + Send + Sync;

// ---------------------------------------------------------------------------------------
// The in-process server.

/// Options of a [`HookServer`]; start it with [`HookServerBuilder::start`].
pub struct HookServerBuilder {
    port: u16,
    tls: Option<CertFiles>,
    client_ca: Option<PathBuf>,
    token_file: Option<PathBuf>,
    respond: Arc<Respond>,
}

impl HookServerBuilder {
    /// Listens on this port of 127.0.0.1 instead of one the system picks.
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// Serves HTTPS with this certificate.
    pub fn tls(mut self, server: &CertFiles) -> Self {
        self.tls = Some(server.clone());
        self
    }

    /// Requires a client certificate signed by this CA (with [`Self::tls`]).
    pub fn client_ca(mut self, ca_file: &Path) -> Self {
        self.client_ca = Some(ca_file.to_path_buf());
        self
    }

    /// Requires `Authorization: Bearer <the file's content, trimmed>`, the file read at
    /// each request; anything else gets 401.
    pub fn token_file(mut self, path: &Path) -> Self {
        self.token_file = Some(path.to_path_buf());
        self
    }

    /// Answers each request with `respond(request JSON)` (Null when the body is no JSON).
    pub fn respond(mut self, f: impl Fn(&Value) -> Behaviour + Send + Sync + 'static) -> Self {
        self.respond = Arc::new(f);
        self
    }

    pub fn start(self) -> HookServer {
        assert!(
            self.client_ca.is_none() || self.tls.is_some(),
            "client_ca needs tls"
        );
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("hook-server")
            .enable_all()
            .build()
            .unwrap();
        let std_listener = std::net::TcpListener::bind(("127.0.0.1", self.port))
            .unwrap_or_else(|e| panic!("hook server: bind 127.0.0.1:{}: {e}", self.port));
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let state = Arc::new(State::default());
        let kept = state.clone();
        let tls = self.tls.as_ref().map(|s| {
            tokio_rustls::TlsAcceptor::from(server_tls_config(s, self.client_ca.as_deref()))
        });
        let shared = Arc::new(Shared {
            state: state.clone(),
            respond: self.respond,
            token_file: self.token_file,
        });
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                state.connections.fetch_add(1, Ordering::SeqCst);
                let shared = shared.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    match tls {
                        None => serve(TokioIo::new(stream), None, shared).await,
                        Some(acceptor) => match acceptor.accept(stream).await {
                            Ok(stream) => {
                                let cn = stream
                                    .get_ref()
                                    .1
                                    .peer_certificates()
                                    .and_then(|c| c.first())
                                    .and_then(|c| subject_cn(c));
                                serve(TokioIo::new(stream), cn, shared).await
                            }
                            Err(_) => {
                                shared
                                    .state
                                    .handshake_failures
                                    .fetch_add(1, Ordering::SeqCst);
                            }
                        },
                    }
                });
            }
        });
        HookServer {
            addr,
            tls: self.tls.is_some(),
            state: kept,
            runtime: Some(runtime),
        }
    }
}

#[derive(Default)]
struct State {
    requests: Mutex<Vec<HookRequest>>,
    arrived: Condvar,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    connections: AtomicUsize,
    handshake_failures: AtomicUsize,
}

struct Shared {
    state: Arc<State>,
    respond: Arc<Respond>,
    token_file: Option<PathBuf>,
}

/// Counts a request in flight for as long as it lives (its answer included, delays too).
struct InFlight(Arc<State>);

impl InFlight {
    fn enter(state: &Arc<State>) -> InFlight {
        let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        state.max_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(state.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The error a handler returns to make hyper drop the connection without an answer.
#[derive(Debug)]
struct CloseConnection;

impl std::fmt::Display for CloseConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection closed by the test's script")
    }
}

impl std::error::Error for CloseConnection {}

async fn serve<I>(io: I, client_cn: Option<String>, shared: Arc<Shared>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let shared = shared.clone();
        let client_cn = client_cn.clone();
        handle(req, client_cn, shared)
    });
    // Errors (a client going away, a scripted close) end the connection; nothing to report.
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(io, service)
        .await;
}

async fn read_body(mut body: Incoming) -> Result<Vec<u8>, hyper::Error> {
    let mut out = Vec::new();
    while let Some(frame) =
        std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await
    {
        if let Ok(data) = frame?.into_data() {
            out.extend_from_slice(&data);
        }
    }
    Ok(out)
}

fn response(status: u16, content_type: &str, body: String) -> Response<String> {
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap())
        .header("content-type", content_type)
        .body(body)
        .unwrap()
}

async fn handle(
    req: Request<Incoming>,
    client_cn: Option<String>,
    shared: Arc<Shared>,
) -> Result<Response<String>, CloseConnection> {
    let state = &*shared.state;
    let _in_flight = InFlight::enter(&shared.state);
    let (parts, body) = req.into_parts();
    // A body cut short: the client is gone, nothing to answer.
    let body = read_body(body).await.map_err(|_| CloseConnection)?;
    let json = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into(),
            )
        })
        .collect();
    let authorized = match &shared.token_file {
        None => true,
        Some(file) => {
            let token = fs::read_to_string(file).unwrap_or_default();
            let want = format!("Bearer {}", token.trim());
            parts
                .headers
                .get("authorization")
                .is_some_and(|v| v.as_bytes() == want.as_bytes())
        }
    };
    let request = HookRequest {
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        headers,
        body,
        json,
        client_cn,
        authorized,
    };
    let json = request.json.clone();
    {
        let mut requests = state.requests.lock().unwrap();
        requests.push(request);
        state.arrived.notify_all();
    }
    if !authorized {
        return Ok(response(401, "text/plain", "bad or missing token\n".into()));
    }
    let mut behaviour = (shared.respond)(&json);
    loop {
        match behaviour {
            Behaviour::Json(v) => return Ok(response(200, "application/json", v.to_string())),
            Behaviour::Raw { status, body } => {
                return Ok(response(status, "application/json", body))
            }
            Behaviour::Delay(wait, then) => {
                tokio::time::sleep(wait).await;
                behaviour = *then;
            }
            Behaviour::Close => return Err(CloseConnection),
        }
    }
}

/// A running hook server on 127.0.0.1; stopped on drop.
pub struct HookServer {
    pub addr: SocketAddr,
    tls: bool,
    state: Arc<State>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl HookServer {
    /// Options: plain HTTP on a port the system picks, answering `{"action":"accept"}`.
    pub fn builder() -> HookServerBuilder {
        HookServerBuilder {
            port: 0,
            tls: None,
            client_ca: None,
            token_file: None,
            respond: Arc::new(|_| Behaviour::accept()),
        }
    }

    /// A plain HTTP server answering with `respond`.
    pub fn start(respond: impl Fn(&Value) -> Behaviour + Send + Sync + 'static) -> HookServer {
        HookServer::builder().respond(respond).start()
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The URL of `path` (which starts with `/`) on this server, `http://127.0.0.1:PORT/path`
    /// or `https://...` (the server certificate names 127.0.0.1 and localhost).
    pub fn url(&self, path: &str) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}{path}", self.addr.port())
    }

    /// Every request so far, in arrival order (refused ones included, `authorized` false).
    pub fn requests(&self) -> Vec<HookRequest> {
        self.state.requests.lock().unwrap().clone()
    }

    /// The request JSON bodies so far whose `context.stage` is `stage`.
    pub fn stage_requests(&self, stage: &str) -> Vec<Value> {
        self.requests()
            .into_iter()
            .filter(|r| r.stage() == stage)
            .map(|r| r.json)
            .collect()
    }

    /// Waits until at least `n` requests arrived; all of them, or `None` after `timeout`.
    pub fn wait_requests(&self, n: usize, timeout: Duration) -> Option<Vec<HookRequest>> {
        let deadline = Instant::now() + timeout;
        let mut requests = self.state.requests.lock().unwrap();
        while requests.len() < n {
            let left = deadline.checked_duration_since(Instant::now())?;
            requests = self.state.arrived.wait_timeout(requests, left).unwrap().0;
        }
        Some(requests.clone())
    }

    /// Requests being answered now (delays included).
    pub fn in_flight(&self) -> usize {
        self.state.in_flight.load(Ordering::SeqCst)
    }

    /// The most requests in flight at once so far.
    pub fn max_in_flight(&self) -> usize {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// TLS handshakes that failed (no or an untrusted client certificate, ...).
    pub fn handshake_failures(&self) -> usize {
        self.state.handshake_failures.load(Ordering::SeqCst)
    }
}

impl Drop for HookServer {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            // Not `drop`: a runtime may not be dropped (blocking) inside another one.
            rt.shutdown_background();
        }
    }
}

// ---------------------------------------------------------------------------------------
// The Python service.

/// `hook_service.py`, next to this file.
pub const HOOK_SERVICE_PY: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/it/common/hook_service.py"
);

/// Debian's Python, where python3-aiohttp is installed (not whatever `python3` is first
/// on PATH).
const PYTHON: &str = "/usr/bin/python3";

/// Options of a [`HookService`] beyond its rules.
#[derive(Clone, Debug, Default)]
pub struct HookServiceOptions {
    /// Serves HTTPS with this certificate.
    pub tls: Option<CertFiles>,
    /// Requires a client certificate signed by this CA (with `tls`).
    pub client_ca: Option<PathBuf>,
    /// Requires `Authorization: Bearer <the file's content, trimmed>` (read at each request).
    pub token_file: Option<PathBuf>,
}

/// `hook_service.py` running on a free port of 127.0.0.1; killed on drop.
///
/// Rules (a JSON array, the first match wins; no match answers `{"action":"accept"}`), each
/// an object with:
/// - matchers, all optional, all given must hold: `stage` (mail, rcpt, data), `from` (a
///   substring of `envelope.from.address`), `rcpt` (a substring of any `envelope.to[].address`),
///   `contents` (a substring of `message.contents`), `subject` (a substring of the Subject
///   header's value);
/// - what to do: `sleep` (seconds, first), then `answer` (JSON, status 200) or `status` with
///   `body` (a raw body, default empty), or `close: true` (drop the connection).
pub struct HookService {
    pub port: u16,
    tls: bool,
    dir: TempDir,
    child: Child,
    pgid: i32,
}

impl HookService {
    /// Starts the service with these rules; `None` after [`super::skipped`] (a failure
    /// under `PROXSMTPD_TEST_STRICT=1`) when python3 or aiohttp is missing.
    pub fn start(rules: &Value, options: &HookServiceOptions) -> Option<HookService> {
        if !Path::new(PYTHON).is_file() {
            super::skipped(&format!(
                "{PYTHON} is not installed: this test needs the Debian packages python3 and \
                 python3-aiohttp (scripts/install-test-deps.sh installs them)"
            ));
            return None;
        }
        let python = PYTHON;
        let has_aiohttp = super::command(python)
            .args(["-c", "import aiohttp"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !has_aiohttp {
            super::skipped(
                "python3 cannot import aiohttp: this test needs the Debian package \
                 python3-aiohttp (scripts/install-test-deps.sh installs it)",
            );
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("hook-service.")
            .tempdir()
            .unwrap();
        let port = free_port();
        let rules_file = dir.path().join("rules.json");
        fs::write(&rules_file, rules.to_string()).unwrap();
        let mut args: Vec<String> = vec![
            HOOK_SERVICE_PY.into(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--rules".into(),
            rules_file.display().to_string(),
            "--log".into(),
            dir.path().join("requests.jsonl").display().to_string(),
        ];
        if let Some(tls) = &options.tls {
            args.extend(["--cert".into(), tls.cert.display().to_string()]);
            args.extend(["--key".into(), tls.key.display().to_string()]);
        }
        if let Some(ca) = &options.client_ca {
            assert!(options.tls.is_some(), "client_ca needs tls");
            args.extend(["--client-ca".into(), ca.display().to_string()]);
        }
        if let Some(token) = &options.token_file {
            args.extend(["--token-file".into(), token.display().to_string()]);
        }
        let output = fs::File::create(dir.path().join("service.log")).unwrap();
        let child = super::command(python)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(output.try_clone().unwrap())
            .stderr(output)
            .process_group(0)
            .spawn()
            .expect("start hook_service.py");
        let pgid = child.id() as i32;
        super::register_process_group(pgid);
        let mut service = HookService {
            port,
            tls: options.tls.is_some(),
            dir,
            child,
            pgid,
        };
        let start = Instant::now();
        while !pid_listens_on(service.pgid, port) {
            if let Ok(Some(status)) = service.child.try_wait() {
                panic!(
                    "hook_service.py exited ({status}); its log:\n{}",
                    service.log()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "hook_service.py not listening after 15 s; its log:\n{}",
                service.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(service)
    }

    /// The URL of `path` on this service (`http://` or `https://127.0.0.1:PORT/path`).
    pub fn url(&self, path: &str) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}{path}", self.port)
    }

    /// Replaces the rules (the service reads them at each request).
    pub fn set_rules(&self, rules: &Value) {
        let tmp = self.dir.path().join("rules.json.new");
        fs::write(&tmp, rules.to_string()).unwrap();
        fs::rename(&tmp, self.dir.path().join("rules.json")).unwrap();
    }

    /// Every request so far, from the service's log, in arrival order.
    pub fn requests(&self) -> Vec<HookRequest> {
        let text = fs::read_to_string(self.dir.path().join("requests.jsonl")).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .map(|v| {
                let body = v["body"].as_str().unwrap_or("").as_bytes().to_vec();
                HookRequest {
                    method: v["method"].as_str().unwrap_or("").into(),
                    path: v["path"].as_str().unwrap_or("").into(),
                    headers: v["headers"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|h| {
                            (
                                h[0].as_str().unwrap_or("").to_ascii_lowercase(),
                                h[1].as_str().unwrap_or("").into(),
                            )
                        })
                        .collect(),
                    json: serde_json::from_slice(&body).unwrap_or(Value::Null),
                    body,
                    client_cn: v["client_cn"].as_str().map(str::to_string),
                    authorized: v["authorized"].as_bool().unwrap_or(false),
                }
            })
            .collect()
    }

    /// Waits until at least `n` requests are logged; all of them, or `None` after `timeout`.
    pub fn wait_requests(&self, n: usize, timeout: Duration) -> Option<Vec<HookRequest>> {
        super::wait_for(timeout, || {
            let r = self.requests();
            (r.len() >= n).then_some(r)
        })
    }

    /// The service's own output (for assertion messages).
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("service.log")).unwrap_or_default()
    }
}

impl Drop for HookService {
    fn drop(&mut self) {
        let _ = killpg(Pid::from_raw(self.pgid), Signal::SIGKILL);
        let _ = self.child.wait();
        super::unregister_process_group(self.pgid);
    }
}

/// Writes `token` (with a final newline, as a mounted Secret may have) to `dir/name`.
pub fn write_token(dir: &Path, name: &str, token: &str) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, format!("{token}\n")).unwrap();
    path
}
