//! The settings type: every `proxsmtpd.conf` setting with the original's defaults.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::cidr::Cidr;

/// How the filter command receives the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterType {
    /// The message on the filter's stdin, the filtered message on its stdout.
    Pipe,
    /// The message in a file named by `$EMAIL`, edited in place.
    File,
    /// No filter: every MAIL, RCPT and DATA is refused with `FilterReject`.
    Reject,
}

/// `TransparentProxy` modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transparent {
    Off,
    /// Connect to the original destination of the intercepted connection.
    Client,
    /// As `Client`, and connect from the client's own address (IP_TRANSPARENT).
    Full,
}

/// Where the SMTP listener binds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddress {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// Where each session connects upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutAddress {
    /// An IP literal with a port.
    Ip(SocketAddr),
    /// A host name, resolved again for every connection (as the original does).
    Host { name: String, port: u16 },
    /// A bare port: connect back to the client's own address on that port.
    ClientLoopback(u16),
    /// A unix socket path.
    Unix(PathBuf),
}

/// `UpstreamTls`: STARTTLS towards the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamTls {
    /// Plain text, as the original (the upstream's STARTTLS is hidden from the client).
    Off,
    /// STARTTLS when the upstream offers it; plain text when it does not.
    Opportunistic,
    /// STARTTLS or no delivery: an upstream that does not offer it, or refuses it, fails the
    /// session with `421`.
    Required,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines (syslog, or stderr with `-d`).
    Text,
    /// One JSON object per line, the per-message summary as fields.
    Json,
}

/// Postfix's `smtpd_min_data_rate` default: a 56k modem sends 14 times as fast.
pub const DEFAULT_MIN_DATA_RATE: u64 = 500;

/// Every setting: those of the original `proxsmtpd.conf` and the newer ones. Each has a
/// CamelCase name (`proxsmtpd.conf`, command line), a snake_case key (TOML, YAML) and an
/// environment variable `PROXSMTPD_<KEY>`; see [`super::names::SETTINGS`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// `FilterCommand`: run as `/bin/sh -c <value>` for every message; `None` when unset
    /// (no filtering). `Some("")` runs `sh -c ""`, which forwards an empty message.
    pub filter_command: Option<String>,
    /// `FilterTimeout` (seconds, > 0, default 30): the filter's inactivity timeout, its
    /// wait-for-exit limit and the grace time between SIGTERM and SIGKILL.
    pub filter_timeout: Duration,
    /// `FilterType`: `pipe` (default), `file` or `reject`.
    pub filter_type: FilterType,
    /// `FilterReject`: the reply in `reject` mode (default `530 Email Rejected`).
    pub filter_reject: String,
    /// `Header`: a header line added to every filtered message; `None` when unset or empty.
    /// Leading whitespace removed.
    pub header: Option<String>,
    /// `KeepAlives` (seconds, >= 0): NOOPs upstream while the client sends and the filter
    /// runs; `None` when 0 (off, the default).
    pub keep_alives: Option<Duration>,
    /// `Listen`: where the SMTP listener binds (default `0.0.0.0:10025`).
    pub listen: ListenAddress,
    /// `MaxConnections` (2..10239, default 64).
    pub max_connections: usize,
    /// `OutAddress`: the upstream; required unless `TransparentProxy` is on.
    pub out_address: Option<OutAddress>,
    /// `PidFile`: `None` when unset or empty. In the file it overrides `-p`.
    pub pid_file: Option<PathBuf>,
    /// `Skip: authenticated`: pass messages of authenticated sessions unfiltered.
    pub skip_authenticated: bool,
    /// `TempDirectory` (default `/tmp/`): where messages are spooled; also the filter's TMPDIR.
    pub temp_directory: PathBuf,
    /// `TimeOut` (seconds, > 0, default 180): the time a client has for each whole command
    /// line, the upstream for each whole reply, and the limit of every write and connect.
    pub timeout: Duration,
    /// `MinDataRate` (bytes per second, >= 0, default 500): the slowest a message body may
    /// arrive; every read earns its bytes / rate seconds, capped at TimeOut. 0 turns it off.
    pub min_data_rate: u64,
    /// `TransparentProxy`: off (default), `client` (or any true boolean) or `full`.
    pub transparent: Transparent,
    /// `User`: user name or uid to switch to.
    pub user: Option<String>,
    /// `XClient`: send `XCLIENT ADDR=` upstream (default off).
    pub xclient: bool,
    /// `AdminListen`: `ip:port` (or a bare port on all IPv4 addresses) of the admin HTTP
    /// server (`/livez`, `/readyz`, `/healthz`, `/metrics`); `None` (default, or an empty
    /// value) runs no admin server.
    pub admin_listen: Option<SocketAddr>,
    /// `Container`: stay in the foreground without `-d` and log JSON lines to stdout.
    /// Default off.
    pub container: bool,
    /// `DrainTimeout` (seconds, >= 0, default 30): on SIGTERM/SIGINT, how long sessions in a
    /// transaction may go on before they are told 421 and closed.
    pub drain_timeout: Duration,
    /// `ProxyProtocol`: expect a PROXY protocol v1 or v2 header from peers listed in
    /// `ProxyProtocolTrusted` (default off).
    pub proxy_protocol: bool,
    /// `ProxyProtocolTrusted`: comma-separated networks (`10.0.0.0/8, 2001:db8::/32`, a bare
    /// address is a single host) allowed to send a PROXY header. Empty by default.
    pub proxy_protocol_trusted: Vec<Cidr>,
    /// `ReadinessCheckUpstream`: make `/readyz` also check (cached) that the upstream
    /// answers. Default off, so an upstream outage does not take every instance out.
    pub readiness_check_upstream: bool,
    /// `LogFormat`: `text` (default) or `json`. Container mode logs JSON whatever this says.
    pub log_format: LogFormat,
    /// `ReloadWatch` (default on): watch the config file and the filter command's files and
    /// apply changes to new messages, as SIGHUP does.
    pub reload_watch: bool,
    /// `TlsCertificate`: PEM certificate chain (leaf first) offered to clients, e.g. a
    /// Kubernetes TLS Secret's `tls.crt`. With `TlsKey` it turns on STARTTLS; without them
    /// STARTTLS is hidden and refused with 502, as in the original. Reloaded when the file
    /// changes; a broken new pair is refused and the running one kept.
    pub tls_certificate: Option<PathBuf>,
    /// `TlsKey`: the PEM private key of `TlsCertificate` (PKCS#8, PKCS#1 or SEC1).
    pub tls_key: Option<PathBuf>,
    /// `TlsRequired` (default off): refuse MAIL, RCPT, DATA and AUTH before STARTTLS with
    /// `530 5.7.0 Must issue a STARTTLS command first`.
    pub tls_required: bool,
    /// `TlsListen`: a second listener (same syntax as `Listen`, give the port, e.g.
    /// `0.0.0.0:10465`) where clients speak TLS from the first byte (implicit TLS, the port
    /// 465 style). `None` (default, or an empty value) opens none.
    pub tls_listen: Option<ListenAddress>,
    /// `UpstreamTls`: `off` (default), `opportunistic` or `required`.
    pub upstream_tls: UpstreamTls,
    /// `UpstreamTlsCa`: PEM bundle of the CAs trusted for the upstream's certificate;
    /// `None` (default) uses the system's store (`/etc/ssl/certs`).
    pub upstream_tls_ca: Option<PathBuf>,
    /// `UpstreamTlsVerify` (default on): check the upstream's certificate against the CAs
    /// and its name (the `OutAddress` host name or IP address). Turn off only for an
    /// upstream on the same host or pod.
    pub upstream_tls_verify: bool,
}

pub const DEFAULT_LISTEN_PORT: u16 = 10025;
pub const DEFAULT_OUT_PORT: u16 = 25;
pub const DEFAULT_FILTER_REJECT: &str = "530 Email Rejected";
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

impl Default for Settings {
    fn default() -> Self {
        Settings {
            filter_command: None,
            filter_timeout: Duration::from_secs(30),
            filter_type: FilterType::Pipe,
            filter_reject: DEFAULT_FILTER_REJECT.to_string(),
            header: None,
            keep_alives: None,
            listen: ListenAddress::Tcp(SocketAddr::from(([0, 0, 0, 0], DEFAULT_LISTEN_PORT))),
            max_connections: 64,
            out_address: None,
            pid_file: None,
            skip_authenticated: false,
            temp_directory: PathBuf::from("/tmp/"),
            timeout: Duration::from_secs(180),
            min_data_rate: DEFAULT_MIN_DATA_RATE,
            transparent: Transparent::Off,
            user: None,
            xclient: false,
            admin_listen: None,
            container: false,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            proxy_protocol: false,
            proxy_protocol_trusted: Vec::new(),
            readiness_check_upstream: false,
            log_format: LogFormat::Text,
            reload_watch: true,
            tls_certificate: None,
            tls_key: None,
            tls_required: false,
            tls_listen: None,
            upstream_tls: UpstreamTls::Off,
            upstream_tls_ca: None,
            upstream_tls_verify: true,
        }
    }
}
