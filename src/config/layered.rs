//! Layered configuration: built-in defaults < config file < `PROXSMTPD_*` environment <
//! command line.
//!
//! The config file is TOML (`.toml`), YAML (`.yaml`, `.yml`) or, for any other name, the
//! original `proxsmtpd.conf` format. TOML and YAML use the snake_case keys of
//! [`SETTINGS`](super::names::SETTINGS) (`out_address = "127.0.0.1:25"`), the environment
//! uses `PROXSMTPD_` + the key in upper case (`PROXSMTPD_OUT_ADDRESS`), the command line
//! the CamelCase names. Every value, from any source, goes through
//! [`apply_setting`](super::legacy::apply_setting), so messages are the same everywhere;
//! each layer is checked on its own first, so an error names its source (file and line,
//! file and key, or variable). figment then merges the layers, each a provider of strings.

use std::fs;
use std::path::{Path, PathBuf};

use figment::providers::{Format, Toml, Yaml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};

use super::address::resolve;
use super::address::{OutAddress, DEFAULT_OUT_PORT};
use super::legacy::{apply_setting, read_legacy};
use super::names::{self, Kind, SettingName, ENV_PREFIX, SETTINGS};
use super::settings::{Settings, Transparent, UpstreamTls};
use super::{ConfigError, EXIT_UNREADABLE};

/// What to load.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// The config file (`-f`); a missing file is only a warning.
    pub config_path: PathBuf,
    /// The process environment (`std::env::vars()`); only `PROXSMTPD_*` is read.
    pub env: Vec<(String, String)>,
    /// Command line settings as (CamelCase name, value), e.g. `("PidFile", "/run/p.pid")`.
    pub overrides: Vec<(String, String)>,
}

/// The result of [`load`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    pub settings: Settings,
    /// To be printed (none yet; kept so that loading can warn without an API change).
    pub warnings: Vec<String>,
    /// False when the file does not exist (ENOENT, ENOTDIR): defaults apply and the caller
    /// prints `configuration file not found: <path>`, as the original does.
    pub file_found: bool,
    /// Every accepted setting in the order read (file, environment, command line), including
    /// those a higher layer overrode: for the debug log (`parsed option: <name>: <value>`)
    /// and for decisions such as "a `PidFile` line in the file beats `-p`".
    pub parsed: Vec<ParsedOption>,
}

/// The layer a value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layer {
    File,
    Env,
    CommandLine,
}

/// One accepted setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedOption {
    pub layer: Layer,
    /// CamelCase name.
    pub name: &'static str,
    pub value: String,
    /// `file:line`, `file: key`, the variable's name or `command line`.
    pub origin: String,
}

/// The config file's format, by extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileFormat {
    Legacy,
    Toml,
    Yaml,
}

impl FileFormat {
    pub fn of(path: &Path) -> FileFormat {
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        match ext.to_ascii_lowercase().as_str() {
            "toml" => FileFormat::Toml,
            "yaml" | "yml" => FileFormat::Yaml,
            _ => FileFormat::Legacy,
        }
    }
}

/// Loads and merges every layer. Host names in `Listen` are resolved; nothing else is
/// checked across settings (see [`validate`]).
pub fn load(opts: &LoadOptions) -> Result<Loaded, ConfigError> {
    let (file, file_found) = file_layer(&opts.config_path)?;
    let layers = [
        file,
        env_layer(&opts.env)?,
        command_line_layer(&opts.overrides)?,
    ];

    let figment = layers
        .iter()
        .fold(Figment::new(), |figment, layer| figment.merge(layer));
    let mut settings = Settings::default();
    for setting in SETTINGS {
        let Ok(value) = figment.find_value(setting.key) else {
            continue;
        };
        let layer = figment
            .find_metadata(setting.key)
            .and_then(|m| layers.iter().find(|l| l.name == m.name));
        for v in strings(&value) {
            apply_setting(&mut settings, setting.name, &v).map_err(|message| {
                // Each layer was checked alone, so only a name that stopped resolving in
                // between can get here.
                match layer.and_then(|l| l.last_origin(setting)) {
                    Some(origin) => origin.error(setting, &v, message),
                    None => ConfigError::new("", message).with_setting(setting.name),
                }
            })?;
        }
    }

    let parsed = layers
        .iter()
        .flat_map(|l| {
            l.entries.iter().map(|e| ParsedOption {
                layer: l.layer,
                name: e.setting.name,
                value: e.value.clone(),
                origin: e.origin.to_string(),
            })
        })
        .collect();
    Ok(Loaded {
        settings,
        warnings: Vec::new(),
        file_found,
        parsed,
    })
}

/// Checks the settings as a whole, as the original does at startup, and resolves a host
/// name `OutAddress`. Returns warnings to print.
pub fn validate(s: &Settings) -> Result<Vec<String>, ConfigError> {
    let mut warnings = Vec::new();
    match (&s.out_address, s.transparent) {
        (None, Transparent::Off) => {
            return Err(ConfigError::new("", "no OutAddress specified."));
        }
        (Some(_), Transparent::Client | Transparent::Full) => warnings.push(
            "the OutAddress option will be ignored when TransparentProxy is enabled".to_string(),
        ),
        _ => {}
    }
    if let Some(OutAddress::Host { name, port }) = &s.out_address {
        if resolve(name, *port).is_none() {
            // Shown as most likely written.
            let written = match *port {
                DEFAULT_OUT_PORT => name.clone(),
                port => format!("{name}:{port}"),
            };
            return Err(ConfigError::new(
                "",
                format!("invalid OutAddress socket name or ip: {written}"),
            )
            .with_setting("OutAddress"));
        }
    }
    if s.proxy_protocol && s.proxy_protocol_trusted.is_empty() {
        return Err(ConfigError::new(
            "",
            "ProxyProtocol is on but ProxyProtocolTrusted lists no networks",
        )
        .with_setting("ProxyProtocolTrusted"));
    }
    if !s.proxy_protocol && !s.proxy_protocol_trusted.is_empty() {
        warnings.push("ProxyProtocolTrusted has no effect while ProxyProtocol is off".to_string());
    }
    match (&s.tls_certificate, &s.tls_key) {
        (Some(_), None) => {
            return Err(
                ConfigError::new("", "TlsCertificate is set but TlsKey is not")
                    .with_setting("TlsKey"),
            )
        }
        (None, Some(_)) => {
            return Err(
                ConfigError::new("", "TlsKey is set but TlsCertificate is not")
                    .with_setting("TlsCertificate"),
            )
        }
        _ => {}
    }
    check_hook_client_pairs(s)?;
    let certificate = s.tls_certificate.is_some();
    if s.tls_required && !certificate {
        return Err(
            ConfigError::new("", "TlsRequired is on but no TlsCertificate is set")
                .with_setting("TlsRequired"),
        );
    }
    if s.tls_listen.is_some() && !certificate {
        return Err(
            ConfigError::new("", "TlsListen is set but no TlsCertificate is set")
                .with_setting("TlsListen"),
        );
    }
    if s.tls_listen.is_some() && s.tls_listen.as_ref() == Some(&s.listen) {
        return Err(
            ConfigError::new("", "TlsListen must differ from Listen").with_setting("TlsListen")
        );
    }
    if s.upstream_tls == UpstreamTls::Off && (s.upstream_tls_ca.is_some() || !s.upstream_tls_verify)
    {
        warnings.push(
            "UpstreamTlsCa and UpstreamTlsVerify have no effect while UpstreamTls is off"
                .to_string(),
        );
    }
    Ok(warnings)
}

/// A client certificate needs its key and a key its certificate: the global pair, and
/// each hook's pair once its own options are combined with the globals. The error names
/// the setting to fix.
fn check_hook_client_pairs(s: &Settings) -> Result<(), ConfigError> {
    let global = match (&s.hook_client_certificate, &s.hook_client_key) {
        (Some(_), None) => Some(
            ConfigError::new("", "HookClientCertificate is set but HookClientKey is not")
                .with_setting("HookClientKey"),
        ),
        (None, Some(_)) => Some(
            ConfigError::new("", "HookClientKey is set but HookClientCertificate is not")
                .with_setting("HookClientCertificate"),
        ),
        _ => None,
    };
    if let (Some(e), true) = (&global, s.hooks.is_empty()) {
        return Err(e.clone());
    }
    for hook in &s.hooks {
        let resolved = hook.resolve(&s.hook_defaults());
        let half = match (&resolved.client_certificate, &resolved.client_key) {
            (Some(_), None) => "client_certificate is set but client_key is not",
            (None, Some(_)) => "client_key is set but client_certificate is not",
            _ => continue,
        };
        // A hook that sets neither option takes both from the globals: they are at fault.
        if let (Some(e), None, None) = (&global, &hook.client_certificate, &hook.client_key) {
            return Err(e.clone());
        }
        return Err(ConfigError::new(
            "",
            format!(
                "Hooks: hook {}: {half} (neither by the hook nor by HookClientCertificate and \
                 HookClientKey)",
                hook.name
            ),
        )
        .with_setting("Hooks"));
    }
    Ok(())
}

/// Where one value was written.
#[derive(Debug, Clone)]
struct Origin {
    source: String,
    line: Option<usize>,
    key: Option<String>,
}

impl Origin {
    fn at(source: &str) -> Origin {
        Origin {
            source: source.to_string(),
            line: None,
            key: None,
        }
    }

    fn error(&self, setting: &SettingName, value: &str, message: String) -> ConfigError {
        let mut e = ConfigError::new(&self.source, message)
            .with_line(self.line)
            .with_setting(setting.name)
            .with_value(value);
        e.key = self.key.as_deref().map(Box::from);
        e
    }
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.line, &self.key) {
            (Some(line), _) => write!(f, "{}:{line}", self.source),
            (None, Some(key)) => write!(f, "{}: {key}", self.source),
            (None, None) => write!(f, "{}", self.source),
        }
    }
}

#[derive(Debug)]
struct Entry {
    setting: &'static SettingName,
    value: String,
    origin: Origin,
}

/// One layer's accepted values, in order; a figment provider of strings.
#[derive(Debug)]
struct LayerValues {
    layer: Layer,
    /// Unique among the layers: it identifies the layer in figment's metadata.
    name: String,
    entries: Vec<Entry>,
}

impl LayerValues {
    fn new(layer: Layer, name: String) -> LayerValues {
        LayerValues {
            layer,
            name,
            entries: Vec::new(),
        }
    }

    /// Checks `value` (on a scratch copy, so that each layer is judged alone) and records it.
    fn push(
        &mut self,
        scratch: &mut Settings,
        setting: &'static SettingName,
        value: &str,
        origin: Origin,
    ) -> Result<(), ConfigError> {
        apply_setting(scratch, setting.name, value)
            .map_err(|message| origin.error(setting, value, message))?;
        self.entries.push(Entry {
            setting,
            value: value.to_string(),
            origin,
        });
        Ok(())
    }

    fn last_origin(&self, setting: &SettingName) -> Option<&Origin> {
        let entry = self
            .entries
            .iter()
            .rev()
            .find(|e| e.setting.key == setting.key);
        entry.map(|e| &e.origin)
    }
}

impl Provider for LayerValues {
    fn metadata(&self) -> Metadata {
        Metadata::named(self.name.clone())
    }

    /// Last value wins within a layer, except that accumulating settings collect a list.
    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let mut dict = Dict::new();
        for e in &self.entries {
            let value = Value::from(e.value.clone());
            match (e.setting.kind, dict.get_mut(e.setting.key)) {
                (Kind::Accumulating, Some(Value::Array(_, list))) => list.push(value),
                (Kind::Accumulating, _) => {
                    dict.insert(e.setting.key.to_string(), Value::from(vec![value]));
                }
                _ => {
                    dict.insert(e.setting.key.to_string(), value);
                }
            }
        }
        Ok(Profile::Default.collect(dict))
    }
}

/// A merged value as the strings to apply: a list gives each element.
fn strings(value: &Value) -> Vec<String> {
    match value {
        Value::Array(_, items) => items
            .iter()
            .filter_map(|v| v.as_str())
            .map(String::from)
            .collect(),
        other => other.as_str().map(String::from).into_iter().collect(),
    }
}

fn file_layer(path: &Path) -> Result<(LayerValues, bool), ConfigError> {
    let source = path.display().to_string();
    let mut layer = LayerValues::new(Layer::File, format!("config file {source}"));
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if is_missing(&e) => return Ok((layer, false)),
        Err(e) => {
            return Err(ConfigError::new(
                &source,
                format!("couldn't open config file: {source}: {}", strerror(&e)),
            )
            .with_exit_code(EXIT_UNREADABLE))
        }
    };
    match FileFormat::of(path) {
        FileFormat::Legacy => {
            let lines = read_legacy(&bytes, &source, &mut Settings::default())?;
            layer.entries = lines
                .into_iter()
                .map(|l| Entry {
                    setting: l.setting,
                    value: l.value,
                    origin: Origin {
                        line: Some(l.line),
                        ..Origin::at(&source)
                    },
                })
                .collect();
        }
        format => structured_file(&mut layer, format, &bytes, &source)?,
    }
    Ok((layer, true))
}

/// ENOENT or ENOTDIR, as the original treats them: no file, defaults apply.
fn is_missing(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::NotFound || e.raw_os_error() == Some(nix::libc::ENOTDIR)
}

/// The C library's text for an OS error (`Permission denied`), as the original prints.
fn strerror(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => nix::errno::Errno::from_raw(code).desc().to_string(),
        None => e.to_string(),
    }
}

/// A TOML or YAML file: a flat table of snake_case keys.
fn structured_file(
    layer: &mut LayerValues,
    format: FileFormat,
    bytes: &[u8],
    source: &str,
) -> Result<(), ConfigError> {
    let format_name = if format == FileFormat::Toml {
        "TOML"
    } else {
        "YAML"
    };
    let text = std::str::from_utf8(bytes)
        .map_err(|_| ConfigError::new(source, format!("invalid {format_name}: not UTF-8 text")))?;
    let dict = if text
        .lines()
        .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
    {
        // An empty YAML document is null, not a table; treat it as an empty table.
        Dict::new()
    } else {
        let data = match format {
            FileFormat::Toml => Toml::string(text).data(),
            _ => Yaml::string(text).data(),
        };
        let mut data =
            data.map_err(|e| ConfigError::new(source, format!("invalid {format_name}: {e}")))?;
        data.remove(&Profile::Default).unwrap_or_default()
    };

    let mut scratch = Settings::default();
    for (key, value) in &dict {
        let origin = Origin {
            line: key_line(text, key),
            key: Some(key.clone()),
            ..Origin::at(source)
        };
        let Some(setting) = names::by_key(key) else {
            let hint = names::guess(key).map(|s| format!(" (did you mean {}?)", s.key));
            let mut e = ConfigError::new(
                source,
                format!("unknown setting{}", hint.unwrap_or_default()),
            )
            .with_line(origin.line);
            e.key = Some(key.as_str().into());
            return Err(e);
        };
        let values = file_values(setting, value).map_err(|message| {
            let mut e = ConfigError::new(source, message)
                .with_line(origin.line)
                .with_setting(setting.name);
            e.key = Some(key.as_str().into());
            e
        })?;
        for v in values {
            layer.push(&mut scratch, setting, &v, origin.clone())?;
        }
    }
    Ok(())
}

/// A TOML/YAML value as the strings `apply_setting` takes: numbers in decimal, booleans as
/// `true`/`false`, null as empty; arrays only where the setting is a list.
fn file_values(setting: &SettingName, value: &Value) -> Result<Vec<String>, String> {
    match (value, setting.kind) {
        (Value::Array(_, items), Kind::Accumulating) => items.iter().map(scalar).collect(),
        (Value::Array(_, items), Kind::CommaList) => {
            let items: Result<Vec<String>, String> = items.iter().map(scalar).collect();
            Ok(vec![items?.join(",")])
        }
        (Value::Array(..), Kind::Single) => {
            Err(format!("{} takes one value, not a list", setting.name))
        }
        _ => scalar(value).map(|v| vec![v]),
    }
}

fn scalar(value: &Value) -> Result<String, String> {
    Ok(match value {
        Value::String(_, s) => s.clone(),
        Value::Char(_, c) => c.to_string(),
        Value::Bool(_, b) => b.to_string(),
        Value::Num(_, n) => match (n.to_i128(), n.to_u128()) {
            (Some(i), _) => i.to_string(),
            (None, Some(u)) => u.to_string(),
            (None, None) => n.to_f64().map(|f| f.to_string()).unwrap_or_default(),
        },
        Value::Empty(..) => String::new(),
        Value::Array(..) => return Err("expected a value, found a list".to_string()),
        Value::Dict(..) => return Err("expected a value, found a table".to_string()),
    })
}

/// The line where `key` is set in a flat TOML or YAML file, if exactly one line starts
/// with it (cheap, and honest: no line rather than a wrong one).
fn key_line(text: &str, key: &str) -> Option<usize> {
    let mut found = text.lines().enumerate().filter(|(_, line)| {
        let line = line.trim_start();
        [key.to_string(), format!("\"{key}\""), format!("'{key}'")]
            .iter()
            .any(|k| {
                line.strip_prefix(k.as_str())
                    .is_some_and(|rest| rest.trim_start().starts_with(['=', ':']))
            })
    });
    match (found.next(), found.next()) {
        (Some((index, _)), None) => Some(index + 1),
        _ => None,
    }
}

fn env_layer(env: &[(String, String)]) -> Result<LayerValues, ConfigError> {
    let mut layer = LayerValues::new(Layer::Env, "environment".to_string());
    let mut vars: Vec<&(String, String)> = env
        .iter()
        .filter(|(name, _)| {
            name.starts_with(ENV_PREFIX) && !is_service_link(name) && !is_process_option(name)
        })
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let mut scratch = Settings::default();
    for (var, value) in vars {
        let Some(setting) = names::by_env_var(var) else {
            let hint = names::guess(var.strip_prefix(ENV_PREFIX).unwrap_or(var))
                .map(|s| format!(" (did you mean {}?)", s.env_var()));
            return Err(ConfigError::new(
                var.as_str(),
                format!("not a proxsmtpd setting{}", hint.unwrap_or_default()),
            ));
        };
        layer.push(&mut scratch, setting, value, Origin::at(var))?;
    }
    Ok(layer)
}

/// Variables read by other parts of the process rather than the configuration:
/// `PROXSMTPD_TRACE_ADDRESSES` (client addresses in traces, see `telemetry`).
fn is_process_option(var: &str) -> bool {
    var == "PROXSMTPD_TRACE_ADDRESSES"
}

/// Kubernetes puts `<SERVICE>_SERVICE_HOST`, `<SERVICE>_PORT`, `<SERVICE>_PORT_25_TCP...`
/// into every pod of a namespace with a Service named `proxsmtpd`; no setting has these
/// names, and refusing them would stop the pod from starting.
fn is_service_link(var: &str) -> bool {
    let Some(rest) = var.strip_prefix(ENV_PREFIX) else {
        return false;
    };
    rest == "PORT"
        || rest == "SERVICE_HOST"
        || rest == "SERVICE_PORT"
        || rest.starts_with("SERVICE_PORT_")
        || rest
            .strip_prefix("PORT_")
            .is_some_and(|r| r.starts_with(|c: char| c.is_ascii_digit()))
}

fn command_line_layer(overrides: &[(String, String)]) -> Result<LayerValues, ConfigError> {
    const SOURCE: &str = "command line";
    let mut layer = LayerValues::new(Layer::CommandLine, SOURCE.to_string());
    let mut scratch = Settings::default();
    for (name, value) in overrides {
        let setting = names::by_name(name)
            .ok_or_else(|| ConfigError::new(SOURCE, format!("unknown setting: {name}")))?;
        layer.push(&mut scratch, setting, value, Origin::at(SOURCE))?;
    }
    Ok(layer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::address::ListenAddress;
    use crate::config::settings::{FilterType, LogFormat};
    use std::time::Duration;

    fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
        let path = dir.path().join(name);
        fs::write(&path, text).unwrap();
        path
    }

    fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
        vars.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn opts(path: &Path, vars: &[(&str, &str)], cli: &[(&str, &str)]) -> LoadOptions {
        LoadOptions {
            config_path: path.to_path_buf(),
            env: env(vars),
            overrides: env(cli),
        }
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn missing_file_is_not_an_error() {
        let dir = tempfile::tempdir().unwrap();
        for missing in [dir.path().join("none.conf"), dir.path().join("none.toml")] {
            let loaded = load(&opts(&missing, &[], &[])).unwrap();
            assert!(!loaded.file_found);
            assert!(loaded.warnings.is_empty());
            assert_eq!(loaded.settings, Settings::default());
        }
        // ENOTDIR counts as missing, as in the original.
        let file = write(&dir, "plain", "");
        let loaded = load(&opts(&file.join("x.conf"), &[], &[])).unwrap();
        assert!(!loaded.file_found);
    }

    #[test]
    fn unreadable_file_exits_1() {
        let dir = tempfile::tempdir().unwrap();
        let e = load(&opts(dir.path(), &[], &[])).unwrap_err();
        assert_eq!(e.exit_code, 1);
        let shown = format!(
            "couldn't open config file: {}: Is a directory",
            dir.path().display()
        );
        assert_eq!(e.message, shown);
        assert_eq!(e.to_string(), shown);
    }

    /// Each layer overrides the one below it, setting by setting.
    #[test]
    fn layers_override_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            &dir,
            "proxsmtpd.conf",
            "OutAddress: 10026\nTimeOut: 10\nFilterTimeout: 11\nKeepAlives: 12\nHeader: X-File: 1\n",
        );
        let vars = [
            ("PROXSMTPD_TIMEOUT", "20"),
            ("PROXSMTPD_FILTER_TIMEOUT", "21"),
            ("HOME", "/root"),
            ("PROXSMTPD", "not a setting variable"),
        ];
        let cli = [("TimeOut", "30")];
        let loaded = load(&opts(&path, &vars, &cli)).unwrap();
        let s = &loaded.settings;
        assert!(loaded.file_found);
        assert!(loaded.warnings.is_empty());
        assert_eq!(s.timeout, secs(30), "command line beats environment");
        assert_eq!(s.filter_timeout, secs(21), "environment beats file");
        assert_eq!(s.keep_alives, Some(secs(12)), "file beats defaults");
        assert_eq!(s.header.as_deref(), Some("X-File: 1"));
        assert_eq!(s.out_address, Some(OutAddress::ClientLoopback(10026)));
        assert_eq!(s.max_connections, 64, "defaults stay");

        let parsed: Vec<(Layer, &str, &str, &str)> = loaded
            .parsed
            .iter()
            .map(|p| (p.layer, p.name, p.value.as_str(), p.origin.as_str()))
            .collect();
        let conf = path.display().to_string();
        assert_eq!(
            parsed,
            vec![
                (
                    Layer::File,
                    "OutAddress",
                    "10026",
                    format!("{conf}:1").as_str()
                ),
                (Layer::File, "TimeOut", "10", format!("{conf}:2").as_str()),
                (
                    Layer::File,
                    "FilterTimeout",
                    "11",
                    format!("{conf}:3").as_str()
                ),
                (
                    Layer::File,
                    "KeepAlives",
                    "12",
                    format!("{conf}:4").as_str()
                ),
                (
                    Layer::File,
                    "Header",
                    "X-File: 1",
                    format!("{conf}:5").as_str()
                ),
                (
                    Layer::Env,
                    "FilterTimeout",
                    "21",
                    "PROXSMTPD_FILTER_TIMEOUT"
                ),
                (Layer::Env, "TimeOut", "20", "PROXSMTPD_TIMEOUT"),
                (Layer::CommandLine, "TimeOut", "30", "command line"),
            ]
        );
    }

    #[test]
    fn empty_values_override_too() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            &dir,
            "p.conf",
            "Header: X-A: 1\nPidFile: /run/a.pid\nOutAddress: 25\n",
        );
        let vars = [("PROXSMTPD_HEADER", ""), ("PROXSMTPD_FILTER_COMMAND", "")];
        let s = load(&opts(&path, &vars, &[])).unwrap().settings;
        assert_eq!(s.header, None);
        assert_eq!(s.filter_command.as_deref(), Some(""));
        assert_eq!(s.pid_file, Some(PathBuf::from("/run/a.pid")));
    }

    #[test]
    fn skip_accumulates_in_file_and_is_replaced_by_higher_layers() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, "p.conf", "Skip: authenticated\nSkip: AUTHENTICATED\n");
        let loaded = load(&opts(&path, &[], &[])).unwrap();
        assert!(loaded.settings.skip_authenticated);
        assert_eq!(loaded.parsed.len(), 2);
        let s = load(&opts(
            &dir.path().join("none"),
            &[("PROXSMTPD_SKIP", "authenticated")],
            &[],
        ))
        .unwrap()
        .settings;
        assert!(s.skip_authenticated);
    }

    const TOML: &str = r#"
# proxsmtpd
out_address = "127.0.0.1:2525"
filter_command = "/usr/local/bin/scan"
filter_timeout = 45
filter_type = "file"
xclient = true
max_connections = 200
skip = ["authenticated"]
header = "X-Scanned: %l"
proxy_protocol = true
proxy_protocol_trusted = ["10.0.0.0/8", "2001:db8::/32"]
admin_listen = "127.0.0.1:9925"
log_format = "json"
drain_timeout = 0
reload_watch = false
"#;

    const YAML: &str = r#"
# proxsmtpd
out_address: "127.0.0.1:2525"
filter_command: /usr/local/bin/scan
filter_timeout: 45
filter_type: file
xclient: true
max_connections: 200
skip: authenticated
header: "X-Scanned: %l"
proxy_protocol: on
proxy_protocol_trusted: 10.0.0.0/8, 2001:db8::/32
admin_listen: 127.0.0.1:9925
log_format: json
drain_timeout: 0
reload_watch: no
"#;

    #[test]
    fn toml_and_yaml_files() {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in [
            ("c.toml", TOML),
            ("c.TOML", TOML),
            ("c.yaml", YAML),
            ("c.yml", YAML),
        ] {
            let path = write(&dir, name, text);
            let loaded = load(&opts(&path, &[], &[])).unwrap_or_else(|e| panic!("{name}: {e}"));
            let s = &loaded.settings;
            assert_eq!(
                s.out_address,
                Some(OutAddress::Ip("127.0.0.1:2525".parse().unwrap()))
            );
            assert_eq!(s.filter_command.as_deref(), Some("/usr/local/bin/scan"));
            assert_eq!(s.filter_timeout, secs(45));
            assert_eq!(s.filter_type, FilterType::File);
            assert!(s.xclient);
            assert_eq!(s.max_connections, 200);
            assert!(s.skip_authenticated);
            assert_eq!(s.header.as_deref(), Some("X-Scanned: %l"));
            assert!(s.proxy_protocol);
            assert_eq!(s.proxy_protocol_trusted.len(), 2);
            assert_eq!(s.admin_listen, Some("127.0.0.1:9925".parse().unwrap()));
            assert_eq!(s.log_format, LogFormat::Json);
            assert_eq!(s.drain_timeout, Duration::ZERO);
            assert!(!s.reload_watch);
            let timeout = loaded
                .parsed
                .iter()
                .find(|p| p.name == "FilterTimeout")
                .unwrap();
            assert_eq!(timeout.origin, format!("{}:5", path.display()), "{name}");
        }
    }

    #[test]
    fn structured_files_with_legacy_format_names_are_legacy() {
        let dir = tempfile::tempdir().unwrap();
        // Any other extension is the original format, whatever it contains.
        let path = write(&dir, "proxsmtpd.cfg", "out_address = \"127.0.0.1\"\n");
        let e = load(&opts(&path, &[], &[])).unwrap_err();
        assert_eq!(
            e.message,
            "invalid config line: out_address = \"127.0.0.1\""
        );
    }

    #[test]
    fn empty_structured_files() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["e.toml", "e.yaml"] {
            let path = write(&dir, name, "# nothing yet\n\n");
            let loaded = load(&opts(&path, &[], &[])).unwrap();
            assert!(loaded.file_found);
            assert_eq!(loaded.settings, Settings::default());
        }
    }

    /// File errors name the file, the key and (when found) the line; messages are the same
    /// as for `proxsmtpd.conf`.
    #[test]
    fn structured_file_errors() {
        let dir = tempfile::tempdir().unwrap();
        // (file name, text, line, key, message)
        type Case<'a> = (&'a str, &'a str, Option<usize>, Option<&'a str>, &'a str);
        let cases: &[Case] = &[
            (
                "a.toml",
                "timeout = 5\nfilter_timeout = 0\n",
                Some(2),
                Some("filter_timeout"),
                "invalid setting: FilterTimeout",
            ),
            (
                "b.toml",
                "filter_timeout = \"ten\"\n",
                Some(1),
                Some("filter_timeout"),
                "invalid setting: FilterTimeout",
            ),
            (
                "c.toml",
                "filter_timeout = 1.5\n",
                Some(1),
                Some("filter_timeout"),
                "invalid setting: FilterTimeout",
            ),
            (
                "d.toml",
                "max_connections = 1\n",
                Some(1),
                Some("max_connections"),
                "invalid setting: MaxConnections (must be between 1 and 10240)",
            ),
            (
                "e.toml",
                "out_address = 99999\n",
                Some(1),
                Some("out_address"),
                "invalid OutAddress socket name or ip: 99999",
            ),
            (
                "f.toml",
                "OutAddress = \"10026\"\n",
                Some(1),
                Some("OutAddress"),
                "unknown setting (did you mean out_address?)",
            ),
            (
                "g.toml",
                "debug_files = true\n",
                Some(1),
                Some("debug_files"),
                "unknown setting",
            ),
            (
                "h.toml",
                "timeout = [1, 2]\n",
                Some(1),
                Some("timeout"),
                "TimeOut takes one value, not a list",
            ),
            (
                "i.toml",
                "[listen]\nport = 25\n",
                None,
                Some("listen"),
                "expected a value, found a table",
            ),
            (
                "j.yaml",
                "filter_type: smtp\n",
                Some(1),
                Some("filter_type"),
                "invalid value for FilterType (must specify 'pipe' or 'file' or 'reject')",
            ),
            (
                "k.yaml",
                "xclient: maybe\n",
                Some(1),
                Some("xclient"),
                "invalid value for XClient",
            ),
            (
                "l.yml",
                "out_adress: 25\n",
                Some(1),
                Some("out_adress"),
                "unknown setting",
            ),
            (
                "m.yaml",
                "skip: [authenticated, nobody]\n",
                Some(1),
                Some("skip"),
                "invalid value for Skip (must specify 'authenticated')",
            ),
        ];
        for (name, text, line, key, message) in cases {
            let path = write(&dir, name, text);
            let e = load(&opts(&path, &[], &[])).unwrap_err();
            assert_eq!(
                (
                    e.source.as_str(),
                    e.line,
                    e.key.as_deref(),
                    e.message.as_str(),
                    e.exit_code
                ),
                (path.to_str().unwrap(), *line, *key, *message, 2),
                "{name}"
            );
        }
        let path = write(&dir, "a.toml", "timeout = 5\nfilter_timeout = 0\n");
        let shown = load(&opts(&path, &[], &[])).unwrap_err().to_string();
        assert_eq!(
            shown,
            format!(
                "{}:2: invalid setting: FilterTimeout (value \"0\")",
                path.display()
            )
        );
        let path = write(
            &dir,
            "m.conf",
            "TimeOut: 5\nMilters: inet:h:1{default_action=no}\n",
        );
        let shown = load(&opts(&path, &[], &[])).unwrap_err().to_string();
        assert!(
            shown.starts_with(&format!(
                "{}:2: invalid setting: Milters (default_action=\"no\": expected tempfail",
                path.display()
            )),
            "{shown}"
        );
        let path = write(&dir, "i.toml", "[listen]\nport = 25\n");
        let shown = load(&opts(&path, &[], &[])).unwrap_err().to_string();
        assert_eq!(
            shown,
            format!(
                "{}: listen: expected a value, found a table",
                path.display()
            )
        );
    }

    #[test]
    fn syntax_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        for (name, text, prefix) in [
            ("bad.toml", "timeout = \n", "invalid TOML: "),
            ("bad.yaml", "timeout: [\n", "invalid YAML: "),
            ("list.yaml", "- timeout\n", "invalid YAML: "),
        ] {
            let path = write(&dir, name, text);
            let e = load(&opts(&path, &[], &[])).unwrap_err();
            assert_eq!(
                (e.source.as_str(), e.exit_code),
                (path.to_str().unwrap(), 2),
                "{name}"
            );
            assert!(e.message.starts_with(prefix), "{name}: {e}");
        }
    }

    #[test]
    fn legacy_errors_name_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, "p.conf", "OutAddress: 25\n\nTimeOut: 0\n");
        let e = load(&opts(&path, &[], &[])).unwrap_err();
        assert_eq!((e.line, e.setting), (Some(3), Some("TimeOut")));
        assert_eq!(
            e.to_string(),
            format!(
                "{}:3: invalid setting: TimeOut (value \"0\")",
                path.display()
            )
        );
    }

    #[test]
    fn environment_errors_name_the_variable() {
        let none = Path::new("/nonexistent/proxsmtpd.conf");
        let cases = [
            ("PROXSMTPD_FILTER_TIMEOUT", "0", "PROXSMTPD_FILTER_TIMEOUT: invalid setting: FilterTimeout (value \"0\")"),
            ("PROXSMTPD_OUT_ADDRESS", "99999", "PROXSMTPD_OUT_ADDRESS: invalid OutAddress socket name or ip: 99999"),
            ("PROXSMTPD_FILTER_TYPE", "smtp", "PROXSMTPD_FILTER_TYPE: invalid value for FilterType (must specify 'pipe' or 'file' or 'reject') (value \"smtp\")"),
            ("PROXSMTPD_OUTADDRESS", "25", "PROXSMTPD_OUTADDRESS: not a proxsmtpd setting (did you mean PROXSMTPD_OUT_ADDRESS?)"),
            ("PROXSMTPD_out_address", "25", "PROXSMTPD_out_address: not a proxsmtpd setting (did you mean PROXSMTPD_OUT_ADDRESS?)"),
            ("PROXSMTPD_DEBUG_FILES", "1", "PROXSMTPD_DEBUG_FILES: not a proxsmtpd setting"),
        ];
        for (var, value, shown) in cases {
            let e = load(&opts(none, &[(var, value)], &[])).unwrap_err();
            assert_eq!((e.source.as_str(), e.exit_code), (var, 2));
            assert_eq!(e.to_string(), shown);
        }
    }

    #[test]
    fn kubernetes_service_links_are_ignored() {
        let vars = [
            ("PROXSMTPD_PORT", "tcp://10.0.0.7:10025"),
            ("PROXSMTPD_PORT_10025_TCP", "tcp://10.0.0.7:10025"),
            ("PROXSMTPD_PORT_10025_TCP_ADDR", "10.0.0.7"),
            ("PROXSMTPD_SERVICE_HOST", "10.0.0.7"),
            ("PROXSMTPD_SERVICE_PORT", "10025"),
            ("PROXSMTPD_SERVICE_PORT_SMTP", "10025"),
        ];
        let loaded = load(&opts(Path::new("/nonexistent/p.conf"), &vars, &[])).unwrap();
        assert_eq!(loaded.settings, Settings::default());
        assert!(loaded.parsed.is_empty());
    }

    /// Every setting can be set from the environment and from the command line.
    #[test]
    fn every_setting_reachable() {
        let sample = |name: &str| match name {
            "FilterCommand" => "cat",
            "FilterTimeout" | "TimeOut" | "KeepAlives" | "DrainTimeout" => "7",
            "FilterType" => "reject",
            "FilterReject" => "554 no",
            "Header" => "X-A: b",
            "Listen" => "[::1]:2525",
            "MaxConnections" => "9",
            "MinDataRate" => "250",
            "OutAddress" => "[::1]:26",
            "PidFile" => "/run/x.pid",
            "Skip" => "authenticated",
            "TempDirectory" => "/var/tmp",
            "TransparentProxy" => "full",
            "User" => "nobody",
            "AdminListen" => "127.0.0.1:9925",
            "ProxyProtocolTrusted" => "10.0.0.0/8",
            "LogFormat" => "json",
            "ReloadWatch" => "off",
            "TlsCertificate" => "/etc/tls/tls.crt",
            "TlsKey" => "/etc/tls/tls.key",
            "TlsListen" => "[::1]:2465",
            "UpstreamTls" => "required",
            "UpstreamTlsCa" => "/etc/ssl/ca.pem",
            "UpstreamTlsVerify" => "off",
            "Milters" => "inet:[::1]:11332{name=m, command_timeout=2m}, unix:/run/m.sock",
            "MilterCommandTimeout" | "MilterConnectTimeout" | "MilterContentTimeout" => "7",
            "MilterDefaultAction" => "accept",
            "MilterMacroDaemonName" => "mx.example",
            "MilterProtocol" => "2",
            "MilterQuarantine" => "reject",
            "MilterQuarantineDirectory" => "/srv/quarantine",
            "FilterOrder" => "command, milters, hooks",
            "Hooks" => "https://[::1]:8443/check{name=h, stages=mail+data}, http://h/x",
            "HookTimeout" => "2m",
            "HookDefaultAction" | "HookOversizeAction" => "reject",
            "HookMaxSize" => "1G",
            "SpoolMemory" => "1M",
            "HookConcurrency" => "5",
            "ShadowConcurrency" => "65536",
            "HookCaFile" => "/etc/hook/ca.pem",
            "HookClientCertificate" => "/etc/hook/tls.crt",
            "HookClientKey" => "/etc/hook/tls.key",
            "HookTokenFile" => "/run/secrets/hook/token",
            "HookTlsVerify" => "off",
            _ => "on",
        };
        let none = Path::new("/nonexistent/p.conf");
        for setting in SETTINGS {
            let value = sample(setting.name);
            let mut want = Settings::default();
            apply_setting(&mut want, setting.name, value).unwrap();
            assert_ne!(
                want,
                Settings::default(),
                "{}: sample changes nothing",
                setting.name
            );

            let var = setting.env_var();
            let from_env = load(&opts(none, &[(var.as_str(), value)], &[])).unwrap();
            assert_eq!(from_env.settings, want, "{var}");
            let from_cli = load(&opts(none, &[], &[(setting.name, value)])).unwrap();
            assert_eq!(from_cli.settings, want, "{}", setting.name);
        }
    }

    /// A TOML array of milters is the list, braces and commas inside an entry included.
    #[test]
    fn milters_from_a_toml_array() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            &dir,
            "m.toml",
            "milters = [\"inet:h:1{name=a, default_action=reject}\", \"unix:/s\"]\n",
        );
        let milters = load(&opts(&path, &[], &[])).unwrap().settings.milters;
        let names: Vec<&str> = milters.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["a", "unix:/s"]);
        assert_eq!(
            milters[0].default_action,
            Some(crate::config::milter::MilterAction::Reject)
        );
    }

    /// A TOML or YAML array of hooks is the list, braces and commas inside an entry
    /// included; a hook option error names the file and line.
    #[test]
    fn hooks_from_toml_and_yaml() {
        use crate::config::hook::{FilterKind, HookStage};
        let dir = tempfile::tempdir().unwrap();
        let toml = write(
            &dir,
            "h.toml",
            "hooks = [\"https://p.example/check{name=a, stages=rcpt+mail, shadow=yes}\", \
             \"http://127.0.0.1:8080/\"]\nfilter_order = \"hooks command milters\"\n\
             hook_max_size = \"1K\"\n",
        );
        let yaml = write(
            &dir,
            "h.yaml",
            "hooks:\n  - https://p.example/check{name=a, stages=rcpt+mail, shadow=yes}\n  \
             - http://127.0.0.1:8080/\nfilter_order: hooks, command, milters\n\
             hook_max_size: 1K\n",
        );
        for path in [toml, yaml] {
            let s = load(&opts(&path, &[], &[])).unwrap().settings;
            let names: Vec<&str> = s.hooks.iter().map(|h| h.name.as_str()).collect();
            assert_eq!(names, ["a", "http://127.0.0.1:8080/"], "{path:?}");
            assert_eq!(s.hooks[0].stages, [HookStage::Mail, HookStage::Rcpt]);
            assert!(s.hooks[0].shadow && !s.hooks[1].shadow);
            assert_eq!(
                s.filter_order,
                [FilterKind::Hooks, FilterKind::Command, FilterKind::Milters]
            );
            assert_eq!(s.hook_max_size, 1024);
        }
        let cases = [
            (
                "h.conf",
                "TimeOut: 5\n\nHooks: http://h/{stages=helo}\n",
                "3: invalid setting: Hooks (stages=\"helo\": expected mail, rcpt or data",
            ),
            (
                "h2.toml",
                "timeout = 5\nhooks = [\"http://a/{name=x}\", \"http://b/{name=x}\"]\n",
                "2: invalid setting: Hooks (two hooks are named \"x\"",
            ),
            (
                "o.yaml",
                "timeout: 5\nfilter_order: milters hooks\n",
                "2: invalid setting: FilterOrder (expected milters, hooks and command",
            ),
            (
                "c.conf",
                "HookConcurrency: 0\n",
                "1: invalid setting: HookConcurrency (must be between 1 and 4096)",
            ),
            (
                "s.conf",
                "\nShadowConcurrency: 65537\n",
                "2: invalid setting: ShadowConcurrency (must be between 1 and 65536)",
            ),
            (
                "t.conf",
                "HookTimeout: 1ms\n",
                "1: invalid setting: HookTimeout (value \"1ms\")",
            ),
            (
                "m.conf",
                "HookMaxSize: 10T\n",
                "1: invalid setting: HookMaxSize (value \"10T\")",
            ),
            (
                "a.conf",
                "HookOversizeAction: skip\n",
                "1: invalid value for HookOversizeAction (must specify 'tempfail'",
            ),
            (
                "v.conf",
                "Milters: inet:h:1{shadow=perhaps}\n",
                "1: invalid setting: Milters (shadow=\"perhaps\": expected yes or no)",
            ),
        ];
        for (name, text, want) in cases {
            let path = write(&dir, name, text);
            let shown = load(&opts(&path, &[], &[])).unwrap_err().to_string();
            let want = format!("{}:{want}", path.display());
            assert!(shown.starts_with(&want), "{shown}\nlacks {want}");
        }
    }

    /// Until milters filter mail, listing one is refused at start-up, not ignored.
    #[test]
    fn command_line_errors() {
        let none = Path::new("/nonexistent/p.conf");
        let e = load(&opts(none, &[], &[("PidFile", "/a"), ("Bogus", "1")])).unwrap_err();
        assert_eq!(e.to_string(), "command line: unknown setting: Bogus");
        let e = load(&opts(none, &[], &[("Listen", "0")])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "command line: invalid Listen socket name or ip: 0"
        );
    }

    #[test]
    fn pid_file_from_file_is_visible_to_the_caller() {
        // The original lets a `PidFile:` line beat `-p`; `parsed` tells the caller.
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, "p.conf", "PidFile:\n");
        let loaded = load(&opts(&path, &[], &[])).unwrap();
        assert!(loaded
            .parsed
            .iter()
            .any(|p| p.layer == Layer::File && p.name == "PidFile"));
        assert_eq!(loaded.settings.pid_file, None);
    }

    #[test]
    fn listen_host_names_resolve_when_loaded() {
        let none = Path::new("/nonexistent/p.conf");
        let s = load(&opts(none, &[("PROXSMTPD_LISTEN", "localhost:2526")], &[]))
            .unwrap()
            .settings;
        assert_eq!(
            s.listen,
            ListenAddress::Tcp("127.0.0.1:2526".parse().unwrap())
        );
    }

    #[test]
    fn validation() {
        let base = Settings::default();
        let e = validate(&base).unwrap_err();
        assert_eq!(
            (e.to_string().as_str(), e.exit_code),
            ("no OutAddress specified.", 2)
        );

        let transparent = Settings {
            transparent: Transparent::Full,
            ..base.clone()
        };
        assert_eq!(validate(&transparent), Ok(vec![]));

        let both = Settings {
            out_address: Some(OutAddress::ClientLoopback(25)),
            transparent: Transparent::Client,
            ..base.clone()
        };
        assert_eq!(
            validate(&both),
            Ok(vec![
                "the OutAddress option will be ignored when TransparentProxy is enabled"
                    .to_string()
            ])
        );

        let host = |name: &str| Settings {
            out_address: Some(OutAddress::Host {
                name: name.to_string(),
                port: 25,
            }),
            ..base.clone()
        };
        assert_eq!(validate(&host("localhost")), Ok(vec![]));
        let e = validate(&host("no-such-host.invalid")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid OutAddress socket name or ip: no-such-host.invalid"
        );

        let proxy = Settings {
            out_address: Some(OutAddress::ClientLoopback(25)),
            proxy_protocol: true,
            ..base.clone()
        };
        assert_eq!(validate(&proxy).unwrap_err().exit_code, 2);
        let trusted_only = Settings {
            out_address: Some(OutAddress::ClientLoopback(25)),
            proxy_protocol_trusted: vec!["10.0.0.0/8".parse().unwrap()],
            ..base.clone()
        };
        assert_eq!(validate(&trusted_only).unwrap().len(), 1);
    }

    #[test]
    fn tls_validation() {
        let base = Settings {
            out_address: Some(OutAddress::ClientLoopback(25)),
            ..Settings::default()
        };
        let with = |f: fn(&mut Settings)| {
            let mut s = base.clone();
            f(&mut s);
            validate(&s)
        };
        let pair = |s: &mut Settings| {
            s.tls_certificate = Some("/t/tls.crt".into());
            s.tls_key = Some("/t/tls.key".into());
        };
        type Case = (fn(&mut Settings), Option<&'static str>);
        let cases: &[Case] = &[
            (
                |s| s.tls_certificate = Some("/t/tls.crt".into()),
                Some("TlsCertificate is set but TlsKey is not"),
            ),
            (
                |s| s.tls_key = Some("/t/tls.key".into()),
                Some("TlsKey is set but TlsCertificate is not"),
            ),
            (
                |s| s.tls_required = true,
                Some("TlsRequired is on but no TlsCertificate is set"),
            ),
            (
                |s| s.tls_listen = Some(ListenAddress::Tcp("127.0.0.1:465".parse().unwrap())),
                Some("TlsListen is set but no TlsCertificate is set"),
            ),
            (
                |s| {
                    s.tls_certificate = Some("/t/tls.crt".into());
                    s.tls_key = Some("/t/tls.key".into());
                    s.tls_listen = Some(s.listen.clone());
                },
                Some("TlsListen must differ from Listen"),
            ),
            (
                |s| {
                    s.tls_certificate = Some("/t/tls.crt".into());
                    s.tls_key = Some("/t/tls.key".into());
                    s.tls_required = true;
                    s.tls_listen = Some(ListenAddress::Tcp("127.0.0.1:465".parse().unwrap()));
                },
                None,
            ),
        ];
        for (change, error) in cases {
            match (with(*change), error) {
                (Err(e), Some(want)) => assert_eq!(e.to_string(), *want),
                (Ok(w), None) => assert!(w.is_empty(), "{w:?}"),
                (got, want) => panic!("{got:?}, expected {want:?}"),
            }
        }
        let mut s = base.clone();
        pair(&mut s);
        s.upstream_tls_verify = false;
        assert_eq!(
            validate(&s).unwrap().len(),
            1,
            "UpstreamTlsVerify without UpstreamTls"
        );
        s.upstream_tls = UpstreamTls::Opportunistic;
        assert_eq!(validate(&s), Ok(vec![]));
    }

    /// Client certificate and key come in pairs, per hook once combined with the globals;
    /// the error names the setting to fix.
    #[test]
    fn hook_client_pairs() {
        let base = Settings {
            out_address: Some(OutAddress::ClientLoopback(25)),
            ..Settings::default()
        };
        let check = |hooks: &str, cert: Option<&str>, key: Option<&str>| {
            let s = Settings {
                hooks: crate::config::hook::parse_hooks(hooks).unwrap(),
                hook_client_certificate: cert.map(PathBuf::from),
                hook_client_key: key.map(PathBuf::from),
                ..base.clone()
            };
            validate(&s).map_err(|e| (e.setting, e.to_string()))
        };
        let ok = Ok(vec![]);
        assert_eq!(check("", None, None), ok);
        assert_eq!(check("", Some("/c"), Some("/k")), ok);
        assert_eq!(check("http://h/", Some("/c"), Some("/k")), ok);
        assert_eq!(
            check("http://h/{client_key=/hk}", Some("/c"), None),
            ok,
            "the hook completes the global certificate"
        );
        assert_eq!(
            check(
                "http://h/{client_certificate=/hc, client_key=/hk}",
                None,
                None
            ),
            ok
        );
        let global_cert = (
            Some("HookClientKey"),
            "HookClientCertificate is set but HookClientKey is not".to_string(),
        );
        assert_eq!(check("", Some("/c"), None), Err(global_cert.clone()));
        assert_eq!(check("http://h/", Some("/c"), None), Err(global_cert));
        assert_eq!(
            check("http://h/", None, Some("/k")),
            Err((
                Some("HookClientCertificate"),
                "HookClientKey is set but HookClientCertificate is not".to_string()
            ))
        );
        let (setting, message) =
            check("http://h/{name=p, client_certificate=/hc}", None, None).unwrap_err();
        assert_eq!(setting, Some("Hooks"));
        assert!(
            message.starts_with("Hooks: hook p: client_certificate is set but client_key is not"),
            "{message}"
        );
        let (setting, message) =
            check("http://h/{name=q, client_key=/hk}", None, None).unwrap_err();
        assert_eq!(setting, Some("Hooks"));
        assert!(
            message.starts_with("Hooks: hook q: client_key is set but client_certificate is not"),
            "{message}"
        );
    }
}
