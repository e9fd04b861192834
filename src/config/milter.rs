//! The `Milters` setting: the mail filters (milter protocol) a message goes through, as
//! Postfix's `smtpd_milters` writes them.
//!
//! A comma- or space-separated list of addresses: `inet:host:port`, `inet:[v6]:port`,
//! `inet6:[v6]:port` or `unix:/path`. Each may be followed by options in braces,
//! `inet:127.0.0.1:11332{name=rspamd, command_timeout=10s, default_action=accept}`, or
//! written Postfix's way with the address inside the braces,
//! `{ inet:127.0.0.1:11332, default_action=accept }`. Options: `name` (the label in logs
//! and metrics; default the address as written), `connect_timeout`, `command_timeout`,
//! `content_timeout` (Postfix's durations: `30`, `30s`, `2m`, `1h`, `1d`, `1w`) and
//! `default_action` (`tempfail`, `accept`, `reject`, `quarantine`) and `shadow` (`yes`:
//! the milter's verdict is recorded, never enforced). An option not given
//! takes the global setting (`MilterConnectTimeout`, ...): see [`MilterSpec::resolve`].

use std::path::PathBuf;
use std::time::Duration;

use super::values::MAX_SECONDS;

/// What a message gets when a milter cannot be reached, times out, closes, or breaks the
/// protocol (Postfix's `milter_default_action`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MilterAction {
    /// 4xx: the client tries again later.
    Tempfail,
    /// Carry on as if the milter were not configured.
    Accept,
    /// 5xx.
    Reject,
    /// Accept the message and quarantine it.
    Quarantine,
}

/// The `MilterDefaultAction` words, in the order the message lists them.
pub const ACTIONS: &[(&str, MilterAction)] = &[
    ("tempfail", MilterAction::Tempfail),
    ("accept", MilterAction::Accept),
    ("reject", MilterAction::Reject),
    ("quarantine", MilterAction::Quarantine),
];

/// What a quarantined message gets (`MilterQuarantine`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MilterQuarantine {
    /// Kept in the quarantine directory, not delivered; the client gets 250.
    Hold,
    /// 5xx.
    Reject,
    /// 4xx.
    Tempfail,
}

impl MilterQuarantine {
    pub fn label(self) -> &'static str {
        match self {
            MilterQuarantine::Hold => "hold",
            MilterQuarantine::Reject => "reject",
            MilterQuarantine::Tempfail => "tempfail",
        }
    }
}

/// The `MilterQuarantine` words.
pub const QUARANTINE_DISPOSITIONS: &[(&str, MilterQuarantine)] = &[
    ("hold", MilterQuarantine::Hold),
    ("reject", MilterQuarantine::Reject),
    ("tempfail", MilterQuarantine::Tempfail),
];

/// Where a milter listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MilterAddress {
    /// A host name or IP address (IPv6 without brackets), resolved when connecting.
    Tcp {
        host: String,
        port: u16,
    },
    Unix(PathBuf),
}

impl std::fmt::Display for MilterAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MilterAddress::Tcp { host, port } if host.contains(':') => {
                write!(f, "inet:[{host}]:{port}")
            }
            MilterAddress::Tcp { host, port } => write!(f, "inet:{host}:{port}"),
            MilterAddress::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// A milter's own timeouts; `None` takes the global setting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MilterTimeouts {
    /// Connecting and negotiating (`connect_timeout`, `MilterConnectTimeout`).
    pub connect: Option<Duration>,
    /// Each stage's answer but the message content's (`command_timeout`,
    /// `MilterCommandTimeout`).
    pub command: Option<Duration>,
    /// Each body chunk's and the end of message's answer (`content_timeout`,
    /// `MilterContentTimeout`).
    pub content: Option<Duration>,
}

/// One entry of `Milters`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MilterSpec {
    /// The label in logs and metrics: the `name` option, else the address as written.
    pub name: String,
    pub address: MilterAddress,
    pub timeouts: MilterTimeouts,
    /// `None` takes `MilterDefaultAction`.
    pub default_action: Option<MilterAction>,
    /// `shadow=yes`: the milter's verdict is recorded, never enforced.
    pub shadow: bool,
}

/// A milter with every option decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MilterConfig {
    pub name: String,
    pub address: MilterAddress,
    pub connect_timeout: Duration,
    pub command_timeout: Duration,
    pub content_timeout: Duration,
    pub default_action: MilterAction,
    /// Runs as a shadow filter: its verdict is recorded, never enforced.
    pub shadow: bool,
}

/// The global values the options fall back to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MilterDefaults {
    pub connect_timeout: Duration,
    pub command_timeout: Duration,
    pub content_timeout: Duration,
    pub default_action: MilterAction,
}

impl MilterSpec {
    /// This milter's options, the global settings where it has none.
    pub fn resolve(&self, defaults: &MilterDefaults) -> MilterConfig {
        MilterConfig {
            name: self.name.clone(),
            address: self.address.clone(),
            connect_timeout: self.timeouts.connect.unwrap_or(defaults.connect_timeout),
            command_timeout: self.timeouts.command.unwrap_or(defaults.command_timeout),
            content_timeout: self.timeouts.content.unwrap_or(defaults.content_timeout),
            default_action: self.default_action.unwrap_or(defaults.default_action),
            shadow: self.shadow,
        }
    }
}

/// Parses the `Milters` value; an empty value is no milter. The error says what is wrong
/// (the caller adds the setting's name).
pub fn parse_milters(v: &str) -> Result<Vec<MilterSpec>, String> {
    parse_entries(
        v,
        "milter address",
        |first| !first.contains('='),
        MilterSpec::at,
        |spec, items| apply_options(spec, items),
    )
}

/// The list grammar `Milters` and `Hooks` share: entries separated by commas or spaces,
/// each optionally followed by its options in braces, or written Postfix's way with the
/// entry first inside the braces (`{ entry, options }`: `is_entry` tells the entry from an
/// option). `what` names an entry in the error for braces that follow none.
pub(super) fn parse_entries<'a, T>(
    v: &'a str,
    what: &str,
    is_entry: impl Fn(&str) -> bool,
    at: impl Fn(&str) -> Result<T, String>,
    apply: impl Fn(&mut T, &mut dyn Iterator<Item = &'a str>) -> Result<(), String>,
) -> Result<Vec<T>, String> {
    let mut specs: Vec<T> = Vec::new();
    // Whether the last entry may still take options in braces.
    let mut open = false;
    for token in tokens(v)? {
        match token {
            Token::Word(word) => {
                specs.push(at(word)?);
                open = true;
            }
            Token::Group(group) => {
                let mut items = group.split(',').map(str::trim).filter(|s| !s.is_empty());
                match items.clone().next() {
                    Some(first) if is_entry(first) => {
                        items.next();
                        let mut spec = at(first)?;
                        apply(&mut spec, &mut items)?;
                        specs.push(spec);
                    }
                    // Options of the entry just before.
                    _ => match specs.last_mut() {
                        Some(spec) if open => apply(spec, &mut items)?,
                        _ => return Err(format!("{{{group}}} follows no {what}")),
                    },
                }
                open = false;
            }
        }
    }
    Ok(specs)
}

impl MilterSpec {
    /// An address without options.
    fn at(address: &str) -> Result<MilterSpec, String> {
        Ok(MilterSpec {
            name: address.to_string(),
            address: parse_address(address)?,
            timeouts: MilterTimeouts::default(),
            default_action: None,
            shadow: false,
        })
    }
}

enum Token<'a> {
    Word(&'a str),
    /// The text between `{` and `}`.
    Group(&'a str),
}

fn is_separator(c: char) -> bool {
    c == ',' || c.is_whitespace()
}

/// Splits a list value into words and brace groups (shared with `Hooks`).
fn tokens(v: &str) -> Result<Vec<Token<'_>>, String> {
    let mut out = Vec::new();
    let mut rest = v;
    loop {
        rest = rest.trim_start_matches(is_separator);
        let Some(c) = rest.chars().next() else {
            return Ok(out);
        };
        match c {
            '{' => {
                let Some(end) = rest.find('}') else {
                    return Err(format!("unclosed '{{' in {rest:?}"));
                };
                let group = &rest[1..end];
                if group.contains('{') {
                    return Err(format!("nested '{{' in {:?}", &rest[..=end]));
                }
                out.push(Token::Group(group));
                rest = &rest[end + 1..];
            }
            '}' => return Err("'}' without '{'".to_string()),
            _ => {
                let end = rest
                    .find(|c: char| is_separator(c) || c == '{' || c == '}')
                    .unwrap_or(rest.len());
                out.push(Token::Word(&rest[..end]));
                rest = &rest[end..];
            }
        }
    }
}

/// `inet:host:port`, `inet:[v6]:port`, `inet6:[v6]:port`, `unix:/path`.
fn parse_address(v: &str) -> Result<MilterAddress, String> {
    let bad = |why: &str| format!("{v:?}: {why}");
    let Some((kind, rest)) = v.split_once(':') else {
        return Err(bad(
            "expected inet:host:port, inet6:[address]:port or unix:/path",
        ));
    };
    match kind.to_ascii_lowercase().as_str() {
        "unix" | "local" => {
            if !rest.starts_with('/') {
                return Err(bad("the unix socket path must be absolute"));
            }
            Ok(MilterAddress::Unix(PathBuf::from(rest)))
        }
        kind @ ("inet" | "inet6") => {
            let (host, port) = if let Some(bracketed) = rest.strip_prefix('[') {
                let Some((host, port)) = bracketed.split_once("]:") else {
                    return Err(bad("expected [address]:port"));
                };
                if host.parse::<std::net::Ipv6Addr>().is_err() {
                    return Err(bad("not an IPv6 address in brackets"));
                }
                (host, port)
            } else {
                if kind == "inet6" {
                    return Err(bad("expected inet6:[address]:port"));
                }
                let Some((host, port)) = rest.rsplit_once(':') else {
                    return Err(bad("expected inet:host:port"));
                };
                if host.is_empty() || host.contains(':') {
                    return Err(bad("expected inet:host:port (IPv6 in brackets)"));
                }
                (host, port)
            };
            let port = port
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0 && port.bytes().all(|b| b.is_ascii_digit()))
                .ok_or_else(|| bad("the port must be 1 to 65535"))?;
            Ok(MilterAddress::Tcp {
                host: host.to_string(),
                port,
            })
        }
        _ => Err(bad("expected inet:, inet6: or unix:")),
    }
}

fn apply_options<'a>(
    spec: &mut MilterSpec,
    items: impl Iterator<Item = &'a str>,
) -> Result<(), String> {
    for item in items {
        let Some((key, value)) = item.split_once('=') else {
            return Err(format!("{item:?}: expected option=value"));
        };
        let (key, value) = (key.trim(), value.trim());
        let bad = |why: &str| format!("{key}={value:?}: {why}");
        match key {
            "name" => {
                if value.is_empty() || value.chars().any(|c| c.is_whitespace() || c.is_control()) {
                    return Err(bad("a name is one word"));
                }
                spec.name = value.to_string();
            }
            "connect_timeout" | "command_timeout" | "content_timeout" => {
                let d = parse_duration(value).ok_or_else(|| {
                    bad("expected a duration greater than 0 (30, 30s, 2m, 1h, 1d, 1w)")
                })?;
                let slot = match key {
                    "connect_timeout" => &mut spec.timeouts.connect,
                    "command_timeout" => &mut spec.timeouts.command,
                    _ => &mut spec.timeouts.content,
                };
                *slot = Some(d);
            }
            "default_action" => {
                let action = ACTIONS
                    .iter()
                    .find(|(w, _)| w.eq_ignore_ascii_case(value))
                    .map(|(_, a)| *a)
                    .ok_or_else(|| bad("expected tempfail, accept, reject or quarantine"))?;
                spec.default_action = Some(action);
            }
            "shadow" => {
                spec.shadow =
                    super::values::parse_boolean(value).ok_or_else(|| bad("expected yes or no"))?;
            }
            _ => {
                return Err(format!(
                    "unknown option {key:?} (name, connect_timeout, command_timeout, \
                     content_timeout, default_action, shadow)"
                ))
            }
        }
    }
    Ok(())
}

/// Postfix's time form: a number and an optional unit (`s`, `m`, `h`, `d`, `w`; seconds
/// without one), greater than 0, at most [`MAX_SECONDS`].
pub fn parse_duration(v: &str) -> Option<Duration> {
    let digits = v.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = v.split_at(digits);
    let unit = match unit.to_ascii_lowercase().as_str() {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        "w" => 7 * 86400,
        _ => return None,
    };
    let n: u64 = number.parse().ok()?;
    let secs = n.checked_mul(unit)?;
    (secs > 0 && secs <= MAX_SECONDS).then(|| Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16) -> MilterAddress {
        MilterAddress::Tcp {
            host: host.to_string(),
            port,
        }
    }

    fn plain(name: &str, address: MilterAddress) -> MilterSpec {
        MilterSpec {
            name: name.to_string(),
            address,
            timeouts: MilterTimeouts::default(),
            default_action: None,
            shadow: false,
        }
    }

    #[test]
    fn lists() {
        let secs = |n| Some(Duration::from_secs(n));
        let cases: Vec<(&str, Vec<MilterSpec>)> = vec![
            ("", vec![]),
            (" , ", vec![]),
            (
                "inet:127.0.0.1:11332",
                vec![plain("inet:127.0.0.1:11332", tcp("127.0.0.1", 11332))],
            ),
            (
                "inet:localhost:8891, unix:/run/clamav/milter.sock inet6:[::1]:99",
                vec![
                    plain("inet:localhost:8891", tcp("localhost", 8891)),
                    plain(
                        "unix:/run/clamav/milter.sock",
                        MilterAddress::Unix("/run/clamav/milter.sock".into()),
                    ),
                    plain("inet6:[::1]:99", tcp("::1", 99)),
                ],
            ),
            (
                "inet:[2001:db8::1]:25",
                vec![plain("inet:[2001:db8::1]:25", tcp("2001:db8::1", 25))],
            ),
            (
                "inet:h:1{name=rspamd, connect_timeout=10s, command_timeout=2m, \
                 content_timeout=300, default_action=accept} inet:h:2",
                vec![
                    MilterSpec {
                        name: "rspamd".into(),
                        address: tcp("h", 1),
                        timeouts: MilterTimeouts {
                            connect: secs(10),
                            command: secs(120),
                            content: secs(300),
                        },
                        default_action: Some(MilterAction::Accept),
                        shadow: false,
                    },
                    plain("inet:h:2", tcp("h", 2)),
                ],
            ),
            (
                "inet:h:1{shadow=yes}, inet:h:2{shadow=off}",
                vec![
                    MilterSpec {
                        shadow: true,
                        ..plain("inet:h:1", tcp("h", 1))
                    },
                    plain("inet:h:2", tcp("h", 2)),
                ],
            ),
            (
                "inet:h:1 { default_action = Quarantine }",
                vec![MilterSpec {
                    default_action: Some(MilterAction::Quarantine),
                    ..plain("inet:h:1", tcp("h", 1))
                }],
            ),
            (
                "{ inet:h:1, command_timeout=1h }, {unix:/s}",
                vec![
                    MilterSpec {
                        timeouts: MilterTimeouts {
                            command: secs(3600),
                            ..MilterTimeouts::default()
                        },
                        ..plain("inet:h:1", tcp("h", 1))
                    },
                    plain("unix:/s", MilterAddress::Unix("/s".into())),
                ],
            ),
        ];
        for (input, want) in cases {
            assert_eq!(parse_milters(input), Ok(want), "{input:?}");
        }
    }

    #[test]
    fn errors() {
        let cases = [
            ("127.0.0.1:11332", "expected inet:, inet6: or unix:"),
            ("localhost", "expected inet:host:port, inet6:"),
            ("tcp:h:1", "expected inet:, inet6: or unix:"),
            ("inet:h", "expected inet:host:port"),
            ("inet::1", "expected inet:host:port"),
            ("inet:::1:25", "IPv6 in brackets"),
            ("inet:h:0", "the port must be 1 to 65535"),
            ("inet:h:65536", "the port must be 1 to 65535"),
            ("inet:h:+25", "the port must be 1 to 65535"),
            ("inet6:h:25", "expected inet6:[address]:port"),
            ("inet6:[h]:25", "not an IPv6 address"),
            ("inet:[::1]25", "expected [address]:port"),
            ("unix:run/m.sock", "must be absolute"),
            ("unix:", "must be absolute"),
            ("inet:h:1{", "unclosed '{'"),
            ("inet:h:1}", "'}' without '{'"),
            ("inet:h:1{a{b}}", "nested '{'"),
            ("{name=x}", "follows no milter address"),
            ("inet:h:1{name=x}{name=y}", "follows no milter address"),
            ("inet:h:1{timeout=1s}", "unknown option \"timeout\""),
            ("inet:h:1{name}", "expected inet:host:port"),
            ("inet:h:1{name=}", "a name is one word"),
            ("inet:h:1{command_timeout=0}", "greater than 0"),
            ("inet:h:1{command_timeout=10x}", "greater than 0"),
            ("inet:h:1{command_timeout=s}", "greater than 0"),
            ("inet:h:1{command_timeout=-1s}", "greater than 0"),
            (
                "inet:h:1{default_action=discard}",
                "expected tempfail, accept",
            ),
            ("{inet:h:1, connect_timeout}", "expected option=value"),
            (
                "inet:h:1{shadow=maybe}",
                "shadow=\"maybe\": expected yes or no",
            ),
        ];
        for (input, want) in cases {
            let err = parse_milters(input).expect_err(input);
            assert!(err.contains(want), "{input:?}: {err:?} lacks {want:?}");
        }
    }

    #[test]
    fn durations() {
        let cases = [
            ("1", Some(1)),
            ("10s", Some(10)),
            ("2m", Some(120)),
            ("2M", Some(120)),
            ("1h", Some(3600)),
            ("1d", Some(86400)),
            ("1w", Some(604800)),
            ("4294967295", Some(MAX_SECONDS)),
            ("4294967296", None),
            ("99999999999999999999w", None),
            ("0", None),
            ("0s", None),
            ("", None),
            ("1.5s", None),
            ("1 s", None),
            ("1ms", None),
        ];
        for (input, want) in cases {
            assert_eq!(
                parse_duration(input),
                want.map(Duration::from_secs),
                "{input:?}"
            );
        }
    }

    #[test]
    fn resolve_takes_the_globals_where_unset() {
        let defaults = MilterDefaults {
            connect_timeout: Duration::from_secs(30),
            command_timeout: Duration::from_secs(31),
            content_timeout: Duration::from_secs(300),
            default_action: MilterAction::Tempfail,
        };
        let spec = &parse_milters("inet:h:1{command_timeout=5s, name=m, shadow=true}").unwrap()[0];
        assert_eq!(
            spec.resolve(&defaults),
            MilterConfig {
                name: "m".into(),
                address: tcp("h", 1),
                connect_timeout: Duration::from_secs(30),
                command_timeout: Duration::from_secs(5),
                content_timeout: Duration::from_secs(300),
                default_action: MilterAction::Tempfail,
                shadow: true,
            }
        );
        assert_eq!(tcp("::1", 2).to_string(), "inet:[::1]:2");
        assert_eq!(tcp("h", 2).to_string(), "inet:h:2");
    }
}
