//! The settings registry: every setting declared once, with its `proxsmtpd.conf` name,
//! TOML/YAML key (the environment variable is `PROXSMTPD_` + the key in upper case), field
//! and type in [`Settings`], default, value parser and documentation.
//!
//! Everything else derives from it: the `proxsmtpd.conf` reader, the TOML/YAML, environment
//! and `--set` layers and their messages ([`super::legacy::apply_setting`]), the name
//! lookups ([`super::names`]), the manual's settings reference ([`super::reference`],
//! `proxsmtpd --man 5`) and the README's settings table (checked by a unit test in
//! `reference`). A new setting is one entry in the [`registry!`] invocation below.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::address::{
    parse_listen, parse_out_address, ListenAddress, OutAddress, DEFAULT_LISTEN_PORT,
};
use super::cidr::{parse_cidr_list, Cidr};
use super::hook::{
    default_filter_order, parse_concurrency, parse_filter_order, parse_hooks, parse_size,
    FilterKind, HookDefaults, HookSpec,
};
use super::milter::{
    self, parse_duration, parse_milters, MilterAction, MilterQuarantine, MilterSpec,
};
use super::values::{self, Parser};

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

/// How repeated and list values are treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// One value; the last one wins.
    Single,
    /// Repeated `proxsmtpd.conf` lines accumulate; a TOML/YAML array gives each value
    /// (`Skip`).
    Accumulating,
    /// A comma-separated list; a TOML/YAML array is joined with commas.
    CommaList,
}

/// One setting of the registry.
#[derive(Debug, Clone, Copy)]
pub struct Setting {
    /// `proxsmtpd.conf` and command line name (matched case-insensitively there).
    pub name: &'static str,
    /// TOML / YAML key; the environment variable is `PROXSMTPD_` + this in upper case.
    pub key: &'static str,
    pub kind: Kind,
    /// The default, as an operator would write or read it.
    pub default: &'static str,
    /// What it does (plain text, sentences): the manual and the README say this.
    pub doc: &'static str,
    /// Whether proxsmtpd 1.10 had it (else it is one of the newer settings).
    pub original: bool,
    /// Parses the trimmed value into its field of [`Settings`]; the error is the message
    /// every source reports (`invalid setting: FilterTimeout`).
    pub apply: fn(&mut Settings, &str) -> Result<(), String>,
}

impl PartialEq for Setting {
    fn eq(&self, other: &Setting) -> bool {
        self.name == other.name
    }
}

impl Eq for Setting {}

/// Declares [`Settings`], its `Default` and [`SETTINGS`] from one entry per setting:
///
/// ```text
/// CamelCaseName {
///     key: "snake_case_key",
///     field: settings_field: Type = default_value_expression,
///     kind: Single | Accumulating | CommaList,
///     original: bool,            // proxsmtpd 1.10 had it
///     default: "as documented",  // checked against the default value by a unit test
///     parse: values::parser,     // fn(name, trimmed value) -> Result<Type, message>
///     doc: "What it does.",
/// }
/// ```
macro_rules! registry {
    ($(
        $name:ident {
            key: $key:literal,
            field: $field:ident: $ty:ty = $value:expr,
            kind: $kind:ident,
            original: $original:literal,
            default: $default:literal,
            parse: $parse:expr,
            doc: $doc:literal $(,)?
        }
    )*) => {
        /// Every setting: those of the original `proxsmtpd.conf` and the newer ones, as
        /// declared in the registry ([`SETTINGS`]).
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub struct Settings {
            $(
                #[doc = concat!("`", stringify!($name), "` (default: ", $default, "). ", $doc)]
                pub $field: $ty,
            )*
        }

        impl Default for Settings {
            fn default() -> Self {
                Settings {
                    $($field: $value,)*
                }
            }
        }

        /// Every setting, in the order they are applied (the original's settings first).
        pub const SETTINGS: &[Setting] = &[$(
            Setting {
                name: stringify!($name),
                key: $key,
                kind: Kind::$kind,
                default: $default,
                doc: $doc,
                original: $original,
                apply: |settings, value| {
                    let parse: Parser<$ty> = $parse;
                    settings.$field = parse(stringify!($name), value)?;
                    Ok(())
                },
            },
        )*];
    };
}

registry! {
    FilterCommand {
        key: "filter_command",
        field: filter_command: Option<String> = None,
        kind: Single,
        original: true,
        default: "unset (no filtering)",
        parse: values::some_text,
        doc: "The command every message is filtered through, run as /bin/sh -c with this value. \
            Specify all the arguments the command needs as on a command line. An empty value \
            runs sh -c \"\", which forwards an empty message.",
    }
    FilterTimeout {
        key: "filter_timeout",
        field: filter_timeout: Duration = Duration::from_secs(30),
        kind: Single,
        original: true,
        default: "30",
        parse: values::seconds::<1>,
        doc: "Seconds of filter inactivity (no output) before it is killed and the message \
            deferred with 451; also how long the filter may take to exit and the grace time \
            between SIGTERM and SIGKILL. Must be greater than 0.",
    }
    FilterType {
        key: "filter_type",
        field: filter_type: FilterType = FilterType::Pipe,
        kind: Single,
        original: true,
        default: "pipe",
        parse: |name, v| {
            values::choice(name, v, &[
                ("pipe", FilterType::Pipe),
                ("file", FilterType::File),
                ("reject", FilterType::Reject),
            ])
        },
        doc: "pipe: the message on the filter's standard input, the message to deliver on its \
            standard output. file: the message in the file named by $EMAIL, edited in place. \
            reject: no filter; every MAIL, RCPT and DATA is refused with FilterReject.",
    }
    FilterReject {
        key: "filter_reject",
        field: filter_reject: String = DEFAULT_FILTER_REJECT.to_string(),
        kind: Single,
        original: true,
        default: "530 Email Rejected",
        parse: values::text,
        doc: "The reply in reject mode; a text without a leading SMTP code becomes \
            550 Content Rejected; <text>.",
    }
    Header {
        key: "header",
        field: header: Option<String> = None,
        kind: Single,
        original: true,
        default: "none",
        parse: values::optional_text,
        doc: "A header line added to every filtered message. %i is the client's IP address, %l \
            the local IP address, %d the date, %% a percent sign; \\r, \\n and \\t are escapes. \
            A header starting with Received: goes first, any other at the end of the header \
            block.",
    }
    KeepAlives {
        key: "keep_alives",
        field: keep_alives: Option<Duration> = None,
        kind: Single,
        original: true,
        default: "0 (off)",
        parse: values::optional_seconds,
        doc: "Seconds of upstream silence after which a NOOP is sent upstream while the message \
            arrives and while the filter runs, so that the upstream does not time out.",
    }
    Listen {
        key: "listen",
        field: listen: ListenAddress = ListenAddress::Tcp(SocketAddr::from(([0, 0, 0, 0], DEFAULT_LISTEN_PORT))),
        kind: Single,
        original: true,
        default: "0.0.0.0:10025",
        parse: |_, v| parse_listen(v),
        doc: "Where to accept SMTP connections: address:port, [IPv6]:port, a bare port (all IPv4 \
            addresses) or the path of a unix socket.",
    }
    MaxConnections {
        key: "max_connections",
        field: max_connections: usize = 64,
        kind: Single,
        original: true,
        default: "64",
        parse: max_connections,
        doc: "The most concurrent client connections (2 to 10239); more are told \
            421 Server busy, too many connections.",
    }
    OutAddress {
        key: "out_address",
        field: out_address: Option<OutAddress> = None,
        kind: Single,
        original: true,
        default: "none; required unless TransparentProxy is on",
        parse: |_, v| parse_out_address(v).map(Some),
        doc: "The upstream SMTP server: host:port, 1.2.3.4:25, [::1]:25, a bare port (connect \
            back to the client's own address on that port, see LOOPBACK FEATURE in \
            proxsmtpd(8)) or a unix socket path. The port defaults to 25. Host names are \
            resolved again for every connection.",
    }
    PidFile {
        key: "pid_file",
        field: pid_file: Option<PathBuf> = None,
        kind: Single,
        original: true,
        default: "none",
        parse: values::optional_path,
        doc: "A file the process id is written to; it overrides the -p option.",
    }
    Skip {
        key: "skip",
        field: skip_authenticated: bool = false,
        kind: Accumulating,
        original: true,
        default: "none",
        parse: |name, v| values::choice(name, v, &[("authenticated", true)]),
        doc: "authenticated: messages of clients that authenticated with the upstream (AUTH \
            answered 235) pass unfiltered. The setting may be repeated.",
    }
    TempDirectory {
        key: "temp_directory",
        field: temp_directory: PathBuf = PathBuf::from("/tmp/"),
        kind: Single,
        original: true,
        default: "/tmp/",
        parse: values::required_path,
        doc: "Where message bodies are spooled (files proxsmtpd.XXXXXX, mode 0600, always \
            removed) when there is a filter, or KeepAlives without one (without a live filter \
            command, small ones wait in memory instead: SpoolMemory); also the filter's \
            TMPDIR. It should not be world-writable.",
    }
    SpoolMemory {
        key: "spool_memory",
        field: spool_memory: u64 = 64 << 20,
        kind: Single,
        original: false,
        default: "64M",
        parse: |name, v| match v {
            "0" => Ok(0),
            _ => parse_size(v).ok_or_else(|| values::invalid_setting(name)),
        },
        doc: "How much memory, in bytes or with a K, M or G suffix, filtered messages may \
            take in all instead of spool files in TempDirectory when no live filter command \
            reads them (milters, hooks, shadows, KeepAlives): each at most 256K, a larger one \
            or one past this total is spooled. 0 spools every message. With a live filter \
            command every message is spooled as it arrives (the command reads a file); a \
            version a milter or hook changes after the command may wait in memory.",
    }
    TimeOut {
        key: "timeout",
        field: timeout: Duration = Duration::from_secs(180),
        kind: Single,
        original: true,
        default: "180",
        parse: values::seconds::<1>,
        doc: "Seconds a client has for each whole command line and the upstream for each whole \
            reply before the connection is closed (421 to the client); also the limit of every \
            write and of connecting upstream.",
    }
    TransparentProxy {
        key: "transparent_proxy",
        field: transparent: Transparent = Transparent::Off,
        kind: Single,
        original: true,
        default: "off",
        parse: transparent_proxy,
        doc: "client (or any true value): connect to the original destination of the \
            intercepted connection; full: also connect from the client's own address \
            (IP_TRANSPARENT). OutAddress is then ignored. See TRANSPARENT PROXY FEATURE in \
            proxsmtpd(8).",
    }
    User {
        key: "user",
        field: user: Option<String> = None,
        kind: Single,
        original: true,
        default: "none",
        parse: values::required_text,
        doc: "The user (name or uid) to switch to once the listening sockets are bound; \
            supplementary groups are dropped.",
    }
    XClient {
        key: "xclient",
        field: xclient: bool = false,
        kind: Single,
        original: true,
        default: "off",
        parse: values::boolean,
        doc: "Send XCLIENT ADDR=<client address> upstream when the upstream offers XCLIENT, then \
            greet it again.",
    }
    AdminListen {
        key: "admin_listen",
        field: admin_listen: Option<SocketAddr> = None,
        kind: Single,
        original: false,
        default: "none (no admin server)",
        parse: values::admin_address,
        doc: "address:port (or a bare port on all IPv4 addresses) of the admin HTTP server: \
            /livez, /readyz, /healthz and /metrics (Prometheus). Never the SMTP port.",
    }
    Container {
        key: "container",
        field: container: bool = false,
        kind: Single,
        original: false,
        default: "off",
        parse: values::boolean,
        doc: "Stay in the foreground without -d and log JSON lines to standard output.",
    }
    DrainTimeout {
        key: "drain_timeout",
        field: drain_timeout: Duration = DEFAULT_DRAIN_TIMEOUT,
        kind: Single,
        original: false,
        default: "30",
        parse: values::seconds::<0>,
        doc: "On SIGTERM or SIGINT, the seconds sessions in a transaction may take to finish \
            before they are told 421 and closed.",
    }
    FilterOrder {
        key: "filter_order",
        field: filter_order: Vec<FilterKind> = default_filter_order(),
        kind: Single,
        original: false,
        default: "milters hooks command",
        parse: |name, v| {
            parse_filter_order(v).map_err(|e| format!("{} ({e})", values::invalid_setting(name)))
        },
        doc: "The order of the filters a message goes through: the words milters (the Milters, \
            in their order), hooks (the Hooks, in their order) and command (FilterCommand), \
            each once, comma- or space-separated. The first filter that rejects, tempfails, \
            discards or quarantines ends the chain.",
    }
    FilterShadow {
        key: "filter_shadow",
        field: filter_shadow: bool = false,
        kind: Single,
        original: false,
        default: "off",
        parse: values::boolean,
        doc: "Run FilterCommand as a shadow filter: it sees every message, its verdict is \
            recorded (proxsmtpd_shadow_verdicts_total, the log line's shadow= field) but never \
            enforced, and the live chain has no command.",
    }
    Hooks {
        key: "hooks",
        field: hooks: Vec<HookSpec> = Vec::new(),
        kind: CommaList,
        original: false,
        default: "none",
        parse: |name, v| {
            parse_hooks(v).map_err(|e| format!("{} ({e})", values::invalid_setting(name)))
        },
        doc: "HTTP policy services asked about each message with a JSON POST (the MTA Hooks \
            protocol, version 1), comma- or space-separated: http:// or \
            https://host[:port]/path, each optionally followed by options in braces, e.g. \
            https://policy:8443/check{name=policy, stages=mail+rcpt+data, \
            timeout=10s, default_action=tempfail, max_size=10M, oversize_action=accept, \
            concurrency=32, shadow=yes, ca_file=/etc/hook/ca.pem, \
            client_certificate=/etc/hook/tls.crt, client_key=/etc/hook/tls.key, \
            tls_verify=yes, token_file=/var/run/secrets/hook/token}. name labels the hook in \
            logs and metrics (default the URL) and must be unique; stages is a +-separated \
            subset of mail, rcpt and data (default data); shadow=yes records the hook's \
            verdict without enforcing it. The other options default to the Hook* settings.",
    }
    HookCaFile {
        key: "hook_ca_file",
        field: hook_ca_file: Option<PathBuf> = None,
        kind: Single,
        original: false,
        default: "the system store (/etc/ssl/certs)",
        parse: values::optional_path,
        doc: "PEM bundle of the certificate authorities trusted for https:// hooks' \
            certificates (a hook's ca_file option overrides it).",
    }
    HookClientCertificate {
        key: "hook_client_certificate",
        field: hook_client_certificate: Option<PathBuf> = None,
        kind: Single,
        original: false,
        default: "none",
        parse: values::optional_path,
        doc: "PEM client certificate chain (leaf first) presented to https:// hooks, with \
            HookClientKey (both or neither; a hook's client_certificate option overrides it).",
    }
    HookClientKey {
        key: "hook_client_key",
        field: hook_client_key: Option<PathBuf> = None,
        kind: Single,
        original: false,
        default: "none",
        parse: values::optional_path,
        doc: "The PEM private key of HookClientCertificate (a hook's client_key option \
            overrides it).",
    }
    HookConcurrency {
        key: "hook_concurrency",
        field: hook_concurrency: usize = 32,
        kind: Single,
        original: false,
        default: "32",
        parse: |name, v| {
            parse_concurrency(v, 4096)
                .ok_or_else(|| format!("{} (must be between 1 and 4096)", values::invalid_setting(name)))
        },
        doc: "Requests in flight to each hook across the proxy (1 to 4096); more wait for one \
            to finish (a hook's concurrency option overrides it).",
    }
    HookDefaultAction {
        key: "hook_default_action",
        field: hook_default_action: MilterAction = MilterAction::Tempfail,
        kind: Single,
        original: false,
        default: "tempfail",
        parse: |name, v| values::choice(name, v, milter::ACTIONS),
        doc: "What a message gets when a hook cannot be reached, times out, answers other than \
            2xx or with JSON that does not parse: tempfail (4xx), accept (go on without that \
            hook), reject (5xx) or quarantine (a hook's default_action option overrides it).",
    }
    HookMaxSize {
        key: "hook_max_size",
        field: hook_max_size: u64 = 10 << 20,
        kind: Single,
        original: false,
        default: "10M",
        parse: |name, v| parse_size(v).ok_or_else(|| values::invalid_setting(name)),
        doc: "The largest message sent to a hook, in bytes or with a K, M or G suffix (binary: \
            10M is 10485760); a larger one gets HookOversizeAction (a hook's max_size option \
            overrides it).",
    }
    HookOversizeAction {
        key: "hook_oversize_action",
        field: hook_oversize_action: MilterAction = MilterAction::Accept,
        kind: Single,
        original: false,
        default: "accept",
        parse: |name, v| values::choice(name, v, milter::ACTIONS),
        doc: "What a message larger than HookMaxSize gets: accept (the hook is not asked), \
            tempfail, reject or quarantine (a hook's oversize_action option overrides it).",
    }
    HookTimeout {
        key: "hook_timeout",
        field: hook_timeout: Duration = Duration::from_secs(10),
        kind: Single,
        original: false,
        default: "10s",
        parse: |name, v| parse_duration(v).ok_or_else(|| values::invalid_setting(name)),
        doc: "How long a hook has for each request, connecting and sending the message \
            included, in Postfix's durations (30, 30s, 2m, 1h); then HookDefaultAction \
            applies (a hook's timeout option overrides it).",
    }
    HookTlsVerify {
        key: "hook_tls_verify",
        field: hook_tls_verify: bool = true,
        kind: Single,
        original: false,
        default: "on",
        parse: values::boolean,
        doc: "Check https:// hooks' certificates and names (a hook's tls_verify option \
            overrides it). Turn it off only for a hook on the same host or pod.",
    }
    HookTokenFile {
        key: "hook_token_file",
        field: hook_token_file: Option<PathBuf> = None,
        kind: Single,
        original: false,
        default: "none",
        parse: values::optional_path,
        doc: "A file holding a bearer token (e.g. a mounted Kubernetes Secret) sent to hooks as \
            Authorization: Bearer TOKEN; re-read when it changes (a hook's token_file option \
            overrides it).",
    }
    Milters {
        key: "milters",
        field: milters: Vec<MilterSpec> = Vec::new(),
        kind: CommaList,
        original: false,
        default: "none",
        parse: |name, v| {
            parse_milters(v).map_err(|e| format!("{} ({e})", values::invalid_setting(name)))
        },
        doc: "Mail filters speaking the milter protocol (rspamd, clamav-milter, OpenDKIM), \
            comma- or space-separated as Postfix's smtpd_milters: inet:host:port, \
            inet6:[address]:port or unix:/path, each optionally followed by options in braces, \
            e.g. inet:127.0.0.1:11332{name=rspamd, connect_timeout=10s, command_timeout=10s, \
            content_timeout=5m, default_action=accept, shadow=no} (or Postfix's { address, \
            options }). \
            name labels the milter in logs and metrics (default the address); the timeouts \
            take Postfix's durations (30, 30s, 2m, 1h) and default to the Milter*Timeout \
            settings; default_action to MilterDefaultAction. shadow=yes makes the milter a shadow \
            filter: its verdict is recorded, never enforced.",
    }
    MilterCommandTimeout {
        key: "milter_command_timeout",
        field: milter_command_timeout: Duration = Duration::from_secs(30),
        kind: Single,
        original: false,
        default: "30",
        parse: values::seconds::<1>,
        doc: "Seconds a milter has to answer each command but the message content; a PROGRESS \
            answer restarts the wait.",
    }
    MilterConnectTimeout {
        key: "milter_connect_timeout",
        field: milter_connect_timeout: Duration = Duration::from_secs(30),
        kind: Single,
        original: false,
        default: "30",
        parse: values::seconds::<1>,
        doc: "Seconds to connect to a milter and negotiate with it.",
    }
    MilterContentTimeout {
        key: "milter_content_timeout",
        field: milter_content_timeout: Duration = Duration::from_secs(300),
        kind: Single,
        original: false,
        default: "300",
        parse: values::seconds::<1>,
        doc: "Seconds a milter has to answer each body chunk and the end of message; a PROGRESS \
            answer restarts the wait.",
    }
    MilterDefaultAction {
        key: "milter_default_action",
        field: milter_default_action: MilterAction = MilterAction::Tempfail,
        kind: Single,
        original: false,
        default: "tempfail",
        parse: |name, v| values::choice(name, v, milter::ACTIONS),
        doc: "What a message gets when a milter cannot be reached, times out, closes or breaks \
            the protocol: tempfail (4xx), accept (go on without that milter), reject (5xx) or \
            quarantine.",
    }
    MilterMacroDaemonName {
        key: "milter_macro_daemon_name",
        field: milter_macro_daemon_name: Option<String> = None,
        kind: Single,
        original: false,
        default: "none (the host name)",
        parse: values::optional_text,
        doc: "The {daemon_name} macro sent to milters.",
    }
    MilterProtocol {
        key: "milter_protocol",
        field: milter_protocol: u32 = 6,
        kind: Single,
        original: false,
        default: "6",
        parse: milter_protocol,
        doc: "The milter protocol version offered to milters (2 to 6).",
    }
    MilterQuarantine {
        key: "milter_quarantine",
        field: milter_quarantine: MilterQuarantine = MilterQuarantine::Hold,
        kind: Single,
        original: false,
        default: "hold",
        parse: |name, v| values::choice(name, v, milter::QUARANTINE_DISPOSITIONS),
        doc: "What a message a milter quarantines gets: hold (kept in \
            MilterQuarantineDirectory with its envelope, not delivered, the client told 250), \
            reject (5xx) or tempfail (4xx). The reason goes to the log and the milter to \
            proxsmtpd_milter_quarantined_total.",
    }
    MilterQuarantineDirectory {
        key: "milter_quarantine_directory",
        field: milter_quarantine_directory: PathBuf = PathBuf::from("/var/lib/proxsmtpd/quarantine"),
        kind: Single,
        original: false,
        default: "/var/lib/proxsmtpd/quarantine",
        parse: values::required_path,
        doc: "Where held messages go (MilterQuarantine hold): NAME.eml, the message as it would \
            have been delivered, and NAME.json, its envelope, client, milter and reason; \
            created (mode 0700) when first needed. Put it on a persistent volume.",
    }
    MinDataRate {
        key: "min_data_rate",
        field: min_data_rate: u64 = DEFAULT_MIN_DATA_RATE,
        kind: Single,
        original: false,
        default: "500",
        parse: values::count,
        doc: "Bytes per second a message body must arrive at, as Postfix's \
            smtpd_min_data_rate: each read earns its bytes / rate seconds, never more than \
            TimeOut ahead; a slower client is told 421 4.4.2. 0 turns it off.",
    }
    ProxyProtocol {
        key: "proxy_protocol",
        field: proxy_protocol: bool = false,
        kind: Single,
        original: false,
        default: "off",
        parse: values::boolean,
        doc: "Expect a PROXY protocol v1 or v2 header from the peers listed in \
            ProxyProtocolTrusted.",
    }
    ProxyProtocolTrusted {
        key: "proxy_protocol_trusted",
        field: proxy_protocol_trusted: Vec<Cidr> = Vec::new(),
        kind: CommaList,
        original: false,
        default: "none",
        parse: |name, v| {
            parse_cidr_list(v).map_err(|e| format!("{} ({e})", values::invalid_setting(name)))
        },
        doc: "Comma-separated networks (10.0.0.0/8, 2001:db8::/32; a bare address is one host) \
            allowed to send a PROXY protocol header.",
    }
    ReadinessCheckUpstream {
        key: "readiness_check_upstream",
        field: readiness_check_upstream: bool = false,
        kind: Single,
        original: false,
        default: "off",
        parse: values::boolean,
        doc: "Make /readyz also require that the upstream accepts connections (checked at most \
            every 10 seconds).",
    }
    ReadinessCheckMilters {
        key: "readiness_check_milters",
        field: readiness_check_milters: bool = false,
        kind: Single,
        original: false,
        default: "off",
        parse: values::boolean,
        doc: "Make /readyz also require that every milter accepts connections (checked at most \
            every 10 seconds).",
    }
    LogFormat {
        key: "log_format",
        field: log_format: LogFormat = LogFormat::Text,
        kind: Single,
        original: false,
        default: "text",
        parse: |name, v| {
            values::choice(name, v, &[("text", LogFormat::Text), ("json", LogFormat::Json)])
        },
        doc: "text, or json: one JSON object per line on standard output, with the per-message \
            summary as fields.",
    }
    ReloadWatch {
        key: "reload_watch",
        field: reload_watch: bool = true,
        kind: Single,
        original: false,
        default: "on",
        parse: values::boolean,
        doc: "Watch the configuration file and the filter script and apply changes to new \
            messages, as SIGHUP does.",
    }
    ShadowConcurrency {
        key: "shadow_concurrency",
        field: shadow_concurrency: usize = 64,
        kind: Single,
        original: false,
        default: "64",
        parse: |name, v| {
            parse_concurrency(v, 65536)
                .ok_or_else(|| format!("{} (must be between 1 and 65536)", values::invalid_setting(name)))
        },
        doc: "Shadow filter runs in flight across the proxy (1 to 65536); beyond that a shadow \
            run is dropped, never queued, and counted as the shadow verdict dropped.",
    }
    TlsCertificate {
        key: "tls_certificate",
        field: tls_certificate: Option<PathBuf> = None,
        kind: Single,
        original: false,
        default: "none",
        parse: values::optional_path,
        doc: "PEM certificate chain (leaf first) offered to clients. With TlsKey it turns on \
            STARTTLS; without them STARTTLS is hidden and refused with 502, as by proxsmtpd \
            1.10. Reloaded when the file changes.",
    }
    TlsKey {
        key: "tls_key",
        field: tls_key: Option<PathBuf> = None,
        kind: Single,
        original: false,
        default: "none",
        parse: values::optional_path,
        doc: "The PEM private key of TlsCertificate (PKCS#8, PKCS#1 or SEC1).",
    }
    TlsRequired {
        key: "tls_required",
        field: tls_required: bool = false,
        kind: Single,
        original: false,
        default: "off",
        parse: values::boolean,
        doc: "Refuse MAIL, RCPT, DATA and AUTH before STARTTLS with \
            530 5.7.0 Must issue a STARTTLS command first.",
    }
    TlsListen {
        key: "tls_listen",
        field: tls_listen: Option<ListenAddress> = None,
        kind: Single,
        original: false,
        default: "none",
        parse: tls_listen,
        doc: "A second listener, same syntax as Listen (e.g. 0.0.0.0:10465), where clients speak \
            TLS from the first byte (implicit TLS, the port 465 style).",
    }
    UpstreamTls {
        key: "upstream_tls",
        field: upstream_tls: UpstreamTls = UpstreamTls::Off,
        kind: Single,
        original: false,
        default: "off",
        parse: |name, v| {
            values::choice(
                name,
                v,
                &[
                    ("off", UpstreamTls::Off),
                    ("opportunistic", UpstreamTls::Opportunistic),
                    ("required", UpstreamTls::Required),
                ],
            )
        },
        doc: "STARTTLS towards the upstream: off, opportunistic (when the upstream offers it) or \
            required (else 421 to the client).",
    }
    UpstreamTlsCa {
        key: "upstream_tls_ca",
        field: upstream_tls_ca: Option<PathBuf> = None,
        kind: Single,
        original: false,
        default: "the system store (/etc/ssl/certs)",
        parse: values::optional_path,
        doc: "PEM bundle of the certificate authorities trusted for the upstream's certificate.",
    }
    UpstreamTlsVerify {
        key: "upstream_tls_verify",
        field: upstream_tls_verify: bool = true,
        kind: Single,
        original: false,
        default: "on",
        parse: values::boolean,
        doc: "Check the upstream's certificate and its name (the OutAddress host name or IP \
            address). Turn it off only for an upstream on the same host or pod.",
    }
}

pub const DEFAULT_FILTER_REJECT: &str = "530 Email Rejected";
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// 2..10239, with the original's message (which says 1 and 10240).
fn max_connections(_: &'static str, v: &str) -> Result<usize, String> {
    values::integer(v)
        .filter(|n| (2..=10239).contains(n))
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| "invalid setting: MaxConnections (must be between 1 and 10240)".into())
}

/// 2 to 6, as Postfix's milter_protocol.
fn milter_protocol(name: &'static str, v: &str) -> Result<u32, String> {
    values::integer(v)
        .filter(|n| (2..=6).contains(n))
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| {
            format!(
                "{} (must be between 2 and 6)",
                values::invalid_setting(name)
            )
        })
}

/// `client`, `full`, or a boolean (true is `client`).
fn transparent_proxy(name: &'static str, v: &str) -> Result<Transparent, String> {
    Ok(match v.to_ascii_lowercase().as_str() {
        "client" => Transparent::Client,
        "full" => Transparent::Full,
        _ => match values::boolean(name, v)? {
            true => Transparent::Client,
            false => Transparent::Off,
        },
    })
}

/// Empty: none; else the `Listen` syntax, with this setting's name in the message.
fn tls_listen(name: &'static str, v: &str) -> Result<Option<ListenAddress>, String> {
    match v {
        "" => Ok(None),
        v => parse_listen(v)
            .map(Some)
            .map_err(|e| e.replacen("Listen", name, 1)),
    }
}

impl Settings {
    /// The global `Hook*` settings, what a hook's options not given take.
    pub fn hook_defaults(&self) -> HookDefaults {
        HookDefaults {
            timeout: self.hook_timeout,
            default_action: self.hook_default_action,
            max_size: self.hook_max_size,
            oversize_action: self.hook_oversize_action,
            concurrency: self.hook_concurrency,
            ca_file: self.hook_ca_file.clone(),
            client_certificate: self.hook_client_certificate.clone(),
            client_key: self.hook_client_key.clone(),
            tls_verify: self.hook_tls_verify,
            token_file: self.hook_token_file.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    /// Names (case-insensitively) and keys are one per setting; keys are snake_case.
    #[test]
    fn registry_entries_are_unique() {
        let names: HashSet<String> = SETTINGS.iter().map(|s| s.name.to_lowercase()).collect();
        let keys: HashSet<&str> = SETTINGS.iter().map(|s| s.key).collect();
        assert_eq!(names.len(), SETTINGS.len(), "duplicate name");
        assert_eq!(keys.len(), SETTINGS.len(), "duplicate key");
        for s in SETTINGS {
            assert!(
                s.key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{}: key {:?} is not snake_case",
                s.name,
                s.key
            );
        }
    }

    /// Each entry's parser writes its own field, and its messages name its setting.
    #[test]
    fn parsers_reach_their_fields() {
        let s = |name: &str, value: &str| {
            let setting = SETTINGS.iter().find(|s| s.name == name).unwrap();
            let mut settings = Settings::default();
            (setting.apply)(&mut settings, value).map(|()| settings)
        };
        assert_eq!(s("TimeOut", "7").unwrap().timeout, Duration::from_secs(7));
        assert_eq!(
            s("TimeOut", "7").unwrap().filter_timeout,
            Duration::from_secs(30)
        );
        assert!(s("Skip", "authenticated").unwrap().skip_authenticated);
        assert_eq!(
            s("TransparentProxy", "full").unwrap().transparent,
            Transparent::Full
        );
        assert_eq!(
            s("Milters", "inet:h:1{name=m}").unwrap().milters[0].name,
            "m"
        );
        assert_eq!(
            s("Milters", "inet:h").unwrap_err(),
            "invalid setting: Milters (\"inet:h\": expected inet:host:port)"
        );
        assert_eq!(
            s("MilterDefaultAction", "Accept")
                .unwrap()
                .milter_default_action,
            MilterAction::Accept
        );
        assert_eq!(
            s("MilterDefaultAction", "discard").unwrap_err(),
            "invalid value for MilterDefaultAction (must specify 'tempfail' or 'accept' or \
             'reject' or 'quarantine')"
        );
        assert_eq!(s("MilterProtocol", "2").unwrap().milter_protocol, 2);
        assert_eq!(
            s("MilterProtocol", "7").unwrap_err(),
            "invalid setting: MilterProtocol (must be between 2 and 6)"
        );
        assert_eq!(
            s("MilterContentTimeout", "0").unwrap_err(),
            "invalid setting: MilterContentTimeout"
        );
        assert_eq!(
            s("Hooks", "http://h/{name=p, shadow=yes}").unwrap().hooks[0].name,
            "p"
        );
        assert_eq!(
            s("Hooks", "ftp://h/").unwrap_err(),
            "invalid setting: Hooks (\"ftp://h/\": the scheme must be http or https)"
        );
        assert_eq!(
            s("HookTimeout", "2m").unwrap().hook_timeout,
            Duration::from_secs(120)
        );
        assert_eq!(
            s("HookTimeout", "30").unwrap().hook_timeout,
            Duration::from_secs(30)
        );
        assert_eq!(
            s("HookTimeout", "0").unwrap_err(),
            "invalid setting: HookTimeout"
        );
        assert_eq!(
            s("HookDefaultAction", "quarantine")
                .unwrap()
                .hook_default_action,
            MilterAction::Quarantine
        );
        assert_eq!(
            s("HookOversizeAction", "tempfail")
                .unwrap()
                .hook_oversize_action,
            MilterAction::Tempfail
        );
        assert_eq!(s("HookMaxSize", "123").unwrap().hook_max_size, 123);
        assert_eq!(s("SpoolMemory", "0").unwrap().spool_memory, 0);
        assert_eq!(s("SpoolMemory", "16M").unwrap().spool_memory, 16 << 20);
        assert_eq!(
            s("SpoolMemory", "-1").unwrap_err(),
            "invalid setting: SpoolMemory"
        );
        assert_eq!(s("HookMaxSize", "10K").unwrap().hook_max_size, 10240);
        assert_eq!(s("HookMaxSize", "10M").unwrap().hook_max_size, 10 << 20);
        assert_eq!(s("HookMaxSize", "1G").unwrap().hook_max_size, 1 << 30);
        assert_eq!(
            s("HookMaxSize", "1.5M").unwrap_err(),
            "invalid setting: HookMaxSize"
        );
        assert_eq!(s("HookConcurrency", "4096").unwrap().hook_concurrency, 4096);
        assert_eq!(
            s("HookConcurrency", "4097").unwrap_err(),
            "invalid setting: HookConcurrency (must be between 1 and 4096)"
        );
        assert_eq!(s("ShadowConcurrency", "1").unwrap().shadow_concurrency, 1);
        assert_eq!(
            s("ShadowConcurrency", "0").unwrap_err(),
            "invalid setting: ShadowConcurrency (must be between 1 and 65536)"
        );
        assert!(!s("HookTlsVerify", "off").unwrap().hook_tls_verify);
        assert!(s("FilterShadow", "yes").unwrap().filter_shadow);
        assert_eq!(
            s("HookTokenFile", "/run/t").unwrap().hook_token_file,
            Some(PathBuf::from("/run/t"))
        );
        assert_eq!(
            s("FilterOrder", "command hooks milters")
                .unwrap()
                .filter_order,
            [FilterKind::Command, FilterKind::Hooks, FilterKind::Milters]
        );
        assert_eq!(
            s("FilterOrder", "hooks, milters, command, hooks").unwrap_err(),
            "invalid setting: FilterOrder (hooks is listed twice)"
        );
        assert_eq!(
            Settings::default().filter_order,
            [FilterKind::Milters, FilterKind::Hooks, FilterKind::Command]
        );
        assert!(s("Milters", "inet:h:1{shadow=on}").unwrap().milters[0].shadow);
        assert_eq!(
            s("TlsListen", "0").unwrap_err(),
            "invalid TlsListen socket name or ip: 0"
        );
    }
}
