//! HTTP hooks: one client per configured hook, shared by every session. Each client keeps
//! a pool of HTTP/1.1 keep-alive connections; a semaphore bounds the calls in flight per
//! hook (`concurrency`), and the wait for a free slot counts against the hook's timeout,
//! so a saturated hook costs a message its timeout, never more. Sessions never wait for
//! each other's calls: each call takes its own connection from the pool.
//!
//! The request body is built by the caller (the message contents are streamed from the
//! spool); this module sends it, reads at most [`answer_limit`] bytes back and parses the
//! answer. Anything but a 2xx with an answer that parses is a [`HookError`], for which the
//! caller applies the hook's default action.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use crate::config::file_watch::Watcher;
use crate::config::hook::{HookConfig, HookStage};
use crate::config::Settings;
use crate::protocol::hook::answer::{self, Answer};

/// Why a hook gave no usable answer; `kind()` is the `proxsmtpd_hook_errors_total` label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HookError {
    Connect(String),
    Timeout,
    Status(u16),
    Parse(String),
    /// The answer was larger than the hook may send.
    Oversize,
    /// The TLS handshake failed: the hook's certificate refused, or ours.
    Tls(String),
}

impl HookError {
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            HookError::Connect(_) => "connect",
            HookError::Timeout => "timeout",
            HookError::Status(_) => "status",
            HookError::Parse(_) => "parse",
            HookError::Oversize => "oversize",
            HookError::Tls(_) => "tls",
        }
    }
}

impl std::fmt::Display for HookError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HookError::Connect(e) => write!(f, "request failed: {e}"),
            HookError::Timeout => write!(f, "no answer in time"),
            HookError::Status(s) => write!(f, "answered HTTP {s}"),
            HookError::Parse(e) => write!(f, "answer not understood: {e}"),
            HookError::Oversize => write!(f, "answer too large"),
            HookError::Tls(e) => write!(f, "TLS failed: {e}"),
        }
    }
}

/// The most an answer may take: a replacement body can be as large as the message.
fn answer_limit(config: &HookConfig) -> usize {
    let limit = config.max_size.saturating_mul(2).saturating_add(1 << 20);
    usize::try_from(limit.min(512 << 20)).unwrap_or(usize::MAX)
}

/// A value made from files (a mounted Secret), made again when one of them changes, as
/// [`Watcher`] tells a change (a new inode from a Secret's symlink swap, a new size or
/// time). The files are looked at most once per `every` (a stat of a few small local files:
/// cheap enough for the async worker). A new value that cannot be made (an empty token, a
/// certificate written before its key) leaves the last one in use and is said once per
/// change: the next write to the files is tried again.
struct FromFiles<T> {
    /// What the value is made from, for the log: "token file", "TLS files".
    what: &'static str,
    every: Duration,
    make: Box<dyn Fn() -> Result<T, String> + Send + Sync>,
    state: Mutex<FromFilesState<T>>,
}

struct FromFilesState<T> {
    checked: Instant,
    files: Watcher,
    value: T,
}

impl<T: Clone> FromFiles<T> {
    fn load(
        what: &'static str,
        files: Vec<PathBuf>,
        every: Duration,
        make: impl Fn() -> Result<T, String> + Send + Sync + 'static,
    ) -> Result<FromFiles<T>, String> {
        // The files first: one changed while the value is made is seen at the next check.
        let files = Watcher::new(files);
        let value = make()?;
        Ok(FromFiles {
            what,
            every,
            make: Box::new(make),
            state: Mutex::new(FromFilesState {
                checked: Instant::now(),
                files,
                value,
            }),
        })
    }

    fn current(&self, hook: &str) -> T {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.checked.elapsed() >= self.every {
            state.checked = Instant::now();
            if state.files.changed() {
                match (self.make)() {
                    Ok(value) => {
                        tracing::info!("hook {hook}: {} changed, read again", self.what);
                        state.value = value;
                    }
                    Err(e) => tracing::warn!(
                        "hook {hook}: {} changed but cannot be used (the last are kept): {e}",
                        self.what
                    ),
                }
            }
        }
        state.value.clone()
    }
}

/// How often a token file is looked at: a rotated Secret takes effect within a second of
/// the kubelet updating the volume.
const TOKEN_CHECK: Duration = Duration::from_secs(1);

/// How often an https hook's TLS files are looked at (as the listener's certificate is).
const TLS_CHECK: Duration = Duration::from_secs(2);

fn read_token(path: &std::path::Path) -> Result<String, String> {
    let value = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read token file {}: {e}", path.display()))?
        .trim()
        .to_string();
    // A bearer token is printable ASCII without spaces (RFC 6750): an empty file (a Secret
    // being rewritten) or a stray control character would be sent on every call.
    if value.is_empty() {
        return Err(format!("token file {} is empty", path.display()));
    }
    if !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "token file {}: a token is printable ASCII without spaces or control characters",
            path.display()
        ));
    }
    Ok(value)
}

/// One configured hook: its settings, HTTP client and call slots.
pub(crate) struct Hook {
    pub(crate) config: HookConfig,
    /// The URL, parsed once: parsing it per request (its host through IDNA) showed in
    /// profiles.
    url: reqwest::Url,
    http: HttpClient,
    slots: Semaphore,
    token: Option<FromFiles<String>>,
}

/// The HTTP client: an https hook's is built again when its CA, certificate or key change,
/// so a renewed certificate takes effect without a restart.
enum HttpClient {
    Fixed(reqwest::Client),
    FromTlsFiles(FromFiles<reqwest::Client>),
}

fn build_client(config: &HookConfig, https: bool) -> Result<reqwest::Client, String> {
    let name = &config.name;
    let builder = reqwest::Client::builder()
        .http1_only()
        .pool_max_idle_per_host(config.concurrency)
        .pool_idle_timeout(Duration::from_secs(60))
        .tcp_nodelay(true)
        .connect_timeout(config.timeout)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .user_agent(concat!("proxsmtpd/", env!("CARGO_PKG_VERSION")));
    // Always our own TLS configuration (ring, as everywhere in the proxy): reqwest
    // would otherwise look for a process-wide default provider, even for http://.
    let tls = if https {
        let client = match (&config.client_certificate, &config.client_key) {
            (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
            _ => None,
        };
        super::tls::hook_client_config(config.ca_file.as_deref(), config.tls_verify, client)
    } else {
        super::tls::hook_client_config(None, false, None)
    };
    builder
        .use_preconfigured_tls(tls.map_err(|e| format!("hook {name}: {e}"))?)
        .build()
        .map_err(|e| format!("hook {name}: cannot build its HTTP client: {e}"))
}

impl Hook {
    fn new(config: HookConfig) -> Result<Hook, String> {
        let name = &config.name;
        // Checked when the configuration was read (config::hook::check_url). The scheme
        // is taken from the parsed URL, which writes it in lower case: `HTTPS://` is
        // https, with the hook's certificate checked.
        let url = reqwest::Url::parse(&config.url)
            .map_err(|e| format!("hook {name}: invalid URL {}: {e}", config.url))?;
        let https = url.scheme() == "https";
        let tls_files: Vec<PathBuf> = [
            &config.ca_file,
            &config.client_certificate,
            &config.client_key,
        ]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
        let http = if https && !tls_files.is_empty() {
            let tls_config = config.clone();
            HttpClient::FromTlsFiles(FromFiles::load(
                "TLS files",
                tls_files,
                TLS_CHECK,
                move || build_client(&tls_config, true),
            )?)
        } else {
            HttpClient::Fixed(build_client(&config, https)?)
        };
        let token = config
            .token_file
            .clone()
            .map(|path| {
                FromFiles::load("token file", vec![path.clone()], TOKEN_CHECK, move || {
                    read_token(&path)
                })
            })
            .transpose()
            .map_err(|e| format!("hook {name}: {e}"))?;
        Ok(Hook {
            slots: Semaphore::new(config.concurrency),
            config,
            url,
            http,
            token,
        })
    }

    /// The HTTP client; an https hook's as its TLS files now are.
    fn client(&self) -> reqwest::Client {
        match &self.http {
            HttpClient::Fixed(client) => client.clone(),
            HttpClient::FromTlsFiles(client) => client.current(&self.config.name),
        }
    }

    pub(crate) fn name(&self) -> &str {
        &self.config.name
    }

    /// Sends one request and reads the answer, within the hook's timeout (the wait for a
    /// free slot included). Counted in the hook metrics and traced as a `hook` span.
    pub(crate) async fn ask(
        &self,
        stage: HookStage,
        body: reqwest::Body,
    ) -> Result<Answer, HookError> {
        use tracing::Instrument;
        let span = tracing::info_span!("hook", hook = %self.config.name, stage = stage.label());
        let started = Instant::now();
        let result = tokio::time::timeout(self.config.timeout, self.exchange(body))
            .instrument(span)
            .await
            .unwrap_or(Err(HookError::Timeout));
        let metrics = crate::ops::metrics::global();
        let took = started.elapsed();
        match &result {
            Ok(answer) => {
                metrics.hook_reply(self.name(), stage.label(), answer.action.label(), took)
            }
            Err(e) => {
                metrics.hook_reply(self.name(), stage.label(), "failed", took);
                metrics.hook_error(self.name(), e.kind());
                tracing::warn!("hook {} ({}): {e}", self.name(), stage.label());
            }
        }
        result
    }

    async fn exchange(&self, body: reqwest::Body) -> Result<Answer, HookError> {
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| HookError::Connect("hook closed".into()))?;
        let mut request = self
            .client()
            .post(self.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(reqwest::header::ACCEPT, "application/json")
            .body(body);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token.current(&self.config.name));
        }
        let mut response = request.send().await.map_err(request_error)?;
        let status = response.status();
        if !status.is_success() {
            return Err(HookError::Status(status.as_u16()));
        }
        let limit = answer_limit(&self.config);
        if response.content_length().is_some_and(|n| n > limit as u64) {
            return Err(HookError::Oversize);
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(request_error)? {
            if body.len() + chunk.len() > limit {
                return Err(HookError::Oversize);
            }
            body.extend_from_slice(&chunk);
        }
        answer::parse(&body).map_err(HookError::Parse)
    }
}

/// What a failed request is: a timeout, a TLS failure (counted apart: a certificate
/// problem is not an outage), or another connection error.
fn request_error(e: reqwest::Error) -> HookError {
    if e.is_timeout() {
        HookError::Timeout
    } else if is_tls(&e) {
        HookError::Tls(error_chain(&e))
    } else {
        HookError::Connect(error_chain(&e))
    }
}

/// Whether rustls' error is among the causes. An `io::Error`'s `source()` skips its inner
/// error (and the TLS connector wraps rustls' error in two of them), so the walk goes into
/// the inner error instead.
fn is_tls(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(err) = next {
        if err.is::<rustls::Error>() {
            return true;
        }
        next = match err
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => err.source(),
        };
    }
    false
}

/// An error with its causes: reqwest's own message alone says little ("error sending
/// request"), the cause says why (connection refused, certificate unknown).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The configured hooks, in order.
pub(crate) struct Hooks {
    pub(crate) list: Vec<Arc<Hook>>,
}

impl Hooks {
    /// The live hooks asked at `stage`.
    pub(crate) fn live_at(&self, stage: HookStage) -> impl Iterator<Item = &Arc<Hook>> {
        self.list
            .iter()
            .filter(move |h| !h.config.shadow && h.config.runs_at(stage))
    }

    pub(crate) fn has_live(&self) -> bool {
        self.list.iter().any(|h| !h.config.shadow)
    }
}

/// The hooks of the current settings, built once and kept while a reload leaves them as
/// they are (so their connection pools survive a reload).
static CURRENT: Mutex<Option<(Vec<HookConfig>, Arc<Hooks>)>> = Mutex::new(None);

/// The hooks `settings` configures (`None` when there are none). Fails with a message for
/// the operator when a hook's TLS material or token cannot be read.
pub(crate) fn hooks_for(settings: &Settings) -> Result<Option<Arc<Hooks>>, String> {
    if settings.hooks.is_empty() {
        return Ok(None);
    }
    let defaults = settings.hook_defaults();
    let configs: Vec<HookConfig> = settings
        .hooks
        .iter()
        .map(|h| h.resolve(&defaults))
        .collect();
    let mut current = CURRENT.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some((c, hooks)) = current.as_ref() {
        if *c == configs {
            return Ok(Some(hooks.clone()));
        }
    }
    let list = configs
        .iter()
        .cloned()
        .map(|c| Hook::new(c).map(Arc::new))
        .collect::<Result<Vec<_>, _>>()?;
    for hook in &list {
        let stages: Vec<&str> = hook.config.stages.iter().map(|s| s.label()).collect();
        crate::ops::metrics::global().hook_configured(hook.name(), &stages);
    }
    let hooks = Arc::new(Hooks { list });
    *current = Some((configs, hooks.clone()));
    Ok(Some(hooks))
}

/// The host name hooks are told the server has (`context.server.name`).
pub(crate) fn server_name() -> &'static str {
    static NAME: OnceLock<String> = OnceLock::new();
    NAME.get_or_init(crate::proxy::milter::host_name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_printable_ascii_and_not_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let cases: [(&str, Option<&str>); 6] = [
            ("s3cr3t.token-_~+/=\n", Some("s3cr3t.token-_~+/=")),
            ("  padded \r\n", Some("padded")),
            ("", None),
            ("\n", None),
            ("two words", None),
            ("in\rjection", None),
        ];
        for (content, expected) in cases {
            std::fs::write(&path, content).unwrap();
            let read = read_token(&path).ok();
            assert_eq!(read.as_deref(), expected, "{content:?}");
        }
    }
}
