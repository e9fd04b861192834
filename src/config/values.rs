//! Value parsers shared by the settings of the registry ([`super::settings`]): each takes
//! the setting's CamelCase name and the trimmed value and returns the typed value or the
//! original's message (`invalid setting: FilterTimeout`), whatever source the value came
//! from.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

/// A value parser: (setting name, trimmed value) to the typed value or the message.
pub type Parser<T> = fn(&'static str, &str) -> Result<T, String>;

/// Longest duration a setting can hold (2^32-1 s, about 136 years): large enough to mean
/// "never", small enough that deadline arithmetic cannot overflow.
pub const MAX_SECONDS: u64 = u32::MAX as u64;

/// `invalid setting: <name>`.
pub fn invalid_setting(name: &str) -> String {
    format!("invalid setting: {name}")
}

/// `invalid value for <name>`.
pub fn invalid_value(name: &str) -> String {
    format!("invalid value for {name}")
}

/// Any text, empty included.
pub fn text(_: &'static str, v: &str) -> Result<String, String> {
    Ok(v.to_string())
}

/// Any text, empty included; set.
pub fn some_text(_: &'static str, v: &str) -> Result<Option<String>, String> {
    Ok(Some(v.to_string()))
}

/// Text; empty is unset.
pub fn optional_text(_: &'static str, v: &str) -> Result<Option<String>, String> {
    Ok(non_empty(v))
}

/// Non-empty text.
pub fn required_text(name: &'static str, v: &str) -> Result<Option<String>, String> {
    non_empty(v).map(Some).ok_or_else(|| invalid_setting(name))
}

/// A path; empty is unset.
pub fn optional_path(_: &'static str, v: &str) -> Result<Option<PathBuf>, String> {
    Ok(non_empty(v).map(PathBuf::from))
}

/// A non-empty path.
pub fn required_path(name: &'static str, v: &str) -> Result<PathBuf, String> {
    non_empty(v)
        .map(PathBuf::from)
        .ok_or_else(|| invalid_setting(name))
}

/// The original's booleans, case-insensitive.
pub fn boolean(name: &'static str, v: &str) -> Result<bool, String> {
    parse_boolean(v).ok_or_else(|| invalid_value(name))
}

/// One of `options`, case-insensitive; the message lists them as the original does:
/// `invalid value for FilterType (must specify 'pipe' or 'file' or 'reject')`.
pub fn choice<T: Copy>(name: &str, v: &str, options: &[(&str, T)]) -> Result<T, String> {
    options
        .iter()
        .find(|(word, _)| word.eq_ignore_ascii_case(v))
        .map(|(_, value)| *value)
        .ok_or_else(|| {
            let words: Vec<String> = options.iter().map(|(w, _)| format!("'{w}'")).collect();
            format!(
                "{} (must specify {})",
                invalid_value(name),
                words.join(" or ")
            )
        })
}

/// Whole seconds of at least `MIN`.
pub fn seconds<const MIN: i64>(name: &'static str, v: &str) -> Result<Duration, String> {
    parse_seconds(v, MIN).ok_or_else(|| invalid_setting(name))
}

/// Whole seconds, 0 (off) as `None`.
pub fn optional_seconds(name: &'static str, v: &str) -> Result<Option<Duration>, String> {
    let d = seconds::<0>(name, v)?;
    Ok((!d.is_zero()).then_some(d))
}

/// A non-negative integer.
pub fn count(name: &'static str, v: &str) -> Result<u64, String> {
    integer(v)
        .and_then(|n| u64::try_from(n).ok())
        .ok_or_else(|| invalid_setting(name))
}

/// Empty: none; a bare port: all IPv4 addresses; else `ip:port` / `[v6]:port`.
pub fn admin_address(name: &'static str, v: &str) -> Result<Option<SocketAddr>, String> {
    admin_listen(v).ok_or_else(|| invalid_setting(name))
}

pub fn non_empty(v: &str) -> Option<String> {
    (!v.is_empty()).then(|| v.to_string())
}

/// The original's booleans, case-insensitive.
pub fn parse_boolean(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "0" | "no" | "false" | "f" | "off" => Some(false),
        "1" | "yes" | "true" | "t" | "on" => Some(true),
        _ => None,
    }
}

/// An integer as `strtol(v, &end, 10)` with `*end == '\0'` reads it: optional sign, decimal
/// digits, the whole value; an empty value is 0 and out-of-range values saturate.
pub fn integer(v: &str) -> Option<i64> {
    if v.is_empty() {
        return Some(0);
    }
    let (negative, digits) = match v.as_bytes()[0] {
        b'-' => (true, &v[1..]),
        b'+' => (false, &v[1..]),
        _ => (false, v),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let magnitude = digits.bytes().fold(0i64, |n, b| {
        n.saturating_mul(10).saturating_add(i64::from(b - b'0'))
    });
    Some(if negative {
        magnitude.saturating_neg()
    } else {
        magnitude
    })
}

/// Whole seconds of at least `min`.
fn parse_seconds(v: &str, min: i64) -> Option<Duration> {
    let n = integer(v).filter(|n| *n >= min)?;
    let n = u64::try_from(n).ok()?.min(MAX_SECONDS);
    Some(Duration::from_secs(n))
}

fn admin_listen(v: &str) -> Option<Option<SocketAddr>> {
    if v.is_empty() {
        return Some(None);
    }
    if v.len() <= 5 && v.bytes().all(|b| b.is_ascii_digit()) {
        let port = v.parse::<u16>().ok().filter(|p| *p != 0)?;
        return Some(Some(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))));
    }
    let addr: SocketAddr = v.parse().ok()?;
    (addr.port() != 0).then_some(Some(addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_like_strtol() {
        let cases = [
            ("", Some(0)),
            ("0", Some(0)),
            ("-0", Some(0)),
            ("+12", Some(12)),
            ("-12", Some(-12)),
            ("0012", Some(12)),
            ("99999999999999999999", Some(i64::MAX)),
            ("-99999999999999999999", Some(-i64::MAX)),
            ("12a", None),
            ("1 2", None),
            ("0x10", None),
            ("-", None),
            ("--1", None),
            ("1e3", None),
        ];
        for (input, want) in cases {
            assert_eq!(integer(input), want, "{input:?}");
        }
    }

    #[test]
    fn choices_list_their_words() {
        let options = [("on", 1), ("off", 0)];
        assert_eq!(choice("X", "ON", &options), Ok(1));
        assert_eq!(
            choice("X", "maybe", &options),
            Err("invalid value for X (must specify 'on' or 'off')".to_string())
        );
    }
}
