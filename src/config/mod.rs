//! Configuration: the settings type and the readers that fill it.
//!
//! - `settings`: the registry: every setting declared once (names, field and type in
//!   [`Settings`], default, parser, documentation); everything below derives from it.
//! - `values`: the value parsers the registry's settings share.
//! - `names`: lookups of a setting by its names (`proxsmtpd.conf`, TOML/YAML, environment).
//! - `reference`: every setting's default and meaning, in words (the manual pages and the
//!   README's settings table).
//! - `address`: the `Listen` / `OutAddress` syntax.
//! - `cidr`: networks for `ProxyProtocolTrusted`.
//! - `milter`: the `Milters` list (addresses and per-milter options).
//! - `hook`: the `Hooks` list (URLs and per-hook options) and the `FilterOrder` words.
//! - `legacy`: the original `proxsmtpd.conf` reader and the per-setting validation shared by
//!   every layer.
//! - `layered`: defaults < config file < `PROXSMTPD_*` environment < command line, merged
//!   with figment; startup validation.
//!
//! Nothing here does I/O except reading the config file and resolving host names.

pub mod address;
pub mod cidr;
pub mod file_watch;
pub mod hook;
pub mod layered;
pub mod legacy;
pub mod milter;
pub mod names;
pub mod reference;
pub mod settings;
pub mod values;

pub use address::{
    parse_listen, parse_out_address, ListenAddress, OutAddress, DEFAULT_LISTEN_PORT,
    DEFAULT_OUT_PORT,
};
pub use cidr::Cidr;
pub use layered::{load, validate, Layer, LoadOptions, Loaded, ParsedOption};
pub use legacy::{apply_setting, parse_legacy};
pub use names::{SettingName, SETTINGS};
pub use settings::*;

use std::fmt;

/// Exit status for an invalid configuration (as the original).
pub const EXIT_INVALID: i32 = 2;
/// Exit status when the config file exists but cannot be read (as the original).
pub const EXIT_UNREADABLE: i32 = 1;

/// A configuration error, naming where the bad value came from. (Field types are chosen to
/// keep `Result<_, ConfigError>` small.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The config file's path, the environment variable's name, or `command line`; empty for
    /// errors about the configuration as a whole.
    pub source: String,
    /// 1-based line in the config file, when known.
    pub line: Option<usize>,
    /// The setting's CamelCase name, when the error is about one setting.
    pub setting: Option<&'static str>,
    /// The key as written in a TOML or YAML file.
    pub key: Option<Box<str>>,
    /// The offending value, when it helps and is not already in `message`.
    pub value: Option<Box<str>>,
    /// The original's message, e.g. `invalid setting: FilterTimeout`.
    pub message: String,
    /// The process exit status this error calls for.
    pub exit_code: i32,
}

impl ConfigError {
    /// An invalid-configuration error (exit status 2) from `source`.
    pub fn new(source: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError {
            source: source.into(),
            line: None,
            setting: None,
            key: None,
            value: None,
            message: message.into(),
            exit_code: EXIT_INVALID,
        }
    }

    pub fn with_line(mut self, line: Option<usize>) -> ConfigError {
        self.line = line;
        self
    }

    pub fn with_setting(mut self, setting: &'static str) -> ConfigError {
        self.setting = Some(setting);
        self
    }

    pub fn with_key(mut self, key: &str) -> ConfigError {
        self.key = Some(key.into());
        self
    }

    /// Records the offending value unless the message already ends with it.
    pub fn with_value(mut self, value: &str) -> ConfigError {
        if !self.message.ends_with(&format!(": {value}")) {
            self.value = Some(value.into());
        }
        self
    }

    pub fn with_exit_code(mut self, code: i32) -> ConfigError {
        self.exit_code = code;
        self
    }
}

impl fmt::Display for ConfigError {
    /// `<source>:<line>: <message> (value "<value>")`; without a line a TOML/YAML key is
    /// named instead (`<source>: <key>: <message>`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // An open failure already names the file in the original's message.
        let source_in_message = self.line.is_none() && self.message.contains(&self.source);
        if !self.source.is_empty() && !source_in_message {
            write!(f, "{}", self.source)?;
            match (self.line, &self.key) {
                (Some(line), _) => write!(f, ":{line}")?,
                (None, Some(key)) => write!(f, ": {key}")?,
                (None, None) => {}
            }
            write!(f, ": ")?;
        }
        write!(f, "{}", self.message)?;
        if let Some(value) = &self.value {
            write!(f, " (value {value:?})")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display() {
        let e = ConfigError::new("/etc/proxsmtpd.conf", "invalid setting: FilterTimeout")
            .with_line(Some(3))
            .with_value("abc");
        assert_eq!(
            e.to_string(),
            "/etc/proxsmtpd.conf:3: invalid setting: FilterTimeout (value \"abc\")"
        );

        let e = ConfigError::new("c.conf", "invalid OutAddress socket name or ip: 99999")
            .with_line(Some(1))
            .with_value("99999");
        assert_eq!(
            e.to_string(),
            "c.conf:1: invalid OutAddress socket name or ip: 99999"
        );

        let e = ConfigError::new("c.toml", "invalid setting: TimeOut")
            .with_key("timeout")
            .with_value("0");
        assert_eq!(
            e.to_string(),
            "c.toml: timeout: invalid setting: TimeOut (value \"0\")"
        );

        let e = ConfigError::new("PROXSMTPD_FILTER_TYPE", "invalid value for FilterType");
        assert_eq!(
            e.to_string(),
            "PROXSMTPD_FILTER_TYPE: invalid value for FilterType"
        );

        let e = ConfigError::new("", "no OutAddress specified.");
        assert_eq!(e.to_string(), "no OutAddress specified.");

        let e = ConfigError::new("/x", "couldn't open config file: /x: Permission denied")
            .with_exit_code(EXIT_UNREADABLE);
        assert_eq!(
            e.to_string(),
            "couldn't open config file: /x: Permission denied"
        );
    }
}
