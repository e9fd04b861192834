//! The names of every setting in each configuration source.

/// One setting's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SettingName {
    /// `proxsmtpd.conf` and command line name (matched case-insensitively there).
    pub name: &'static str,
    /// TOML / YAML key; the environment variable is `PROXSMTPD_` + this in upper case.
    pub key: &'static str,
    pub kind: Kind,
}

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

impl SettingName {
    /// `PROXSMTPD_<KEY>`.
    pub fn env_var(&self) -> String {
        format!("{ENV_PREFIX}{}", self.key.to_ascii_uppercase())
    }
}

/// Prefix of every environment variable read as a setting.
pub const ENV_PREFIX: &str = "PROXSMTPD_";

const fn s(name: &'static str, key: &'static str) -> SettingName {
    SettingName {
        name,
        key,
        kind: Kind::Single,
    }
}

/// Every setting, in the order they are applied (the original's settings first).
pub const SETTINGS: &[SettingName] = &[
    s("FilterCommand", "filter_command"),
    s("FilterTimeout", "filter_timeout"),
    s("FilterType", "filter_type"),
    s("FilterReject", "filter_reject"),
    s("Header", "header"),
    s("KeepAlives", "keep_alives"),
    s("Listen", "listen"),
    s("MaxConnections", "max_connections"),
    s("OutAddress", "out_address"),
    s("PidFile", "pid_file"),
    SettingName {
        name: "Skip",
        key: "skip",
        kind: Kind::Accumulating,
    },
    s("TempDirectory", "temp_directory"),
    s("TimeOut", "timeout"),
    s("TransparentProxy", "transparent_proxy"),
    s("User", "user"),
    s("XClient", "xclient"),
    s("AdminListen", "admin_listen"),
    s("Container", "container"),
    s("DrainTimeout", "drain_timeout"),
    s("MinDataRate", "min_data_rate"),
    s("ProxyProtocol", "proxy_protocol"),
    SettingName {
        name: "ProxyProtocolTrusted",
        key: "proxy_protocol_trusted",
        kind: Kind::CommaList,
    },
    s("ReadinessCheckUpstream", "readiness_check_upstream"),
    s("LogFormat", "log_format"),
    s("ReloadWatch", "reload_watch"),
    s("TlsCertificate", "tls_certificate"),
    s("TlsKey", "tls_key"),
    s("TlsRequired", "tls_required"),
    s("TlsListen", "tls_listen"),
    s("UpstreamTls", "upstream_tls"),
    s("UpstreamTlsCa", "upstream_tls_ca"),
    s("UpstreamTlsVerify", "upstream_tls_verify"),
];

/// Looks up a `proxsmtpd.conf` / command line name, case-insensitively.
pub fn by_name(name: &str) -> Option<&'static SettingName> {
    SETTINGS.iter().find(|s| s.name.eq_ignore_ascii_case(name))
}

/// Looks up a TOML / YAML key (exact).
pub fn by_key(key: &str) -> Option<&'static SettingName> {
    SETTINGS.iter().find(|s| s.key == key)
}

/// Looks up an environment variable (exact, `PROXSMTPD_OUT_ADDRESS`).
pub fn by_env_var(var: &str) -> Option<&'static SettingName> {
    SETTINGS.iter().find(|s| s.env_var() == var)
}

/// The setting a misspelt name most likely means (case, `_` and `-` ignored), for hints.
pub fn guess(written: &str) -> Option<&'static SettingName> {
    let fold = |s: &str| {
        s.chars()
            .filter(|c| *c != '_' && *c != '-')
            .collect::<String>()
            .to_ascii_lowercase()
    };
    let written = fold(written);
    SETTINGS
        .iter()
        .find(|s| fold(s.name) == written || fold(s.key) == written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_consistent() {
        for s in SETTINGS {
            assert_eq!(by_name(&s.name.to_ascii_lowercase()), Some(s));
            assert_eq!(by_key(s.key), Some(s));
            assert_eq!(by_env_var(&s.env_var()), Some(s));
            assert_eq!(guess(s.name), Some(s));
        }
        assert_eq!(by_name("DebugFiles"), None);
        assert_eq!(by_key("OutAddress"), None);
        assert_eq!(by_env_var("PROXSMTPD_out_address"), None);
        assert_eq!(guess("OUT_ADDRESS").map(|s| s.name), Some("OutAddress"));
        assert_eq!(guess("time-out").map(|s| s.name), Some("TimeOut"));
        assert_eq!(
            by_name("outaddress").map(|s| s.env_var()),
            Some("PROXSMTPD_OUT_ADDRESS".to_string())
        );
    }
}
