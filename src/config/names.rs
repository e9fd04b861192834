//! Every setting's names in each configuration source, from the registry
//! ([`super::settings::SETTINGS`]): lookups by name, key and environment variable.

pub use super::settings::{Kind, Setting, SETTINGS};

/// A setting as the name lookups see it.
pub type SettingName = Setting;

impl Setting {
    /// `PROXSMTPD_<KEY>`.
    pub fn env_var(&self) -> String {
        format!("{ENV_PREFIX}{}", self.key.to_ascii_uppercase())
    }
}

/// Prefix of every environment variable read as a setting.
pub const ENV_PREFIX: &str = "PROXSMTPD_";

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
