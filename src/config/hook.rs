//! The `Hooks` setting: HTTP policy services a message is sent to as JSON (the MTA Hooks
//! protocol), and the `FilterOrder` words.
//!
//! A comma- or space-separated list of `http://` or `https://host[:port]/path` URLs, each
//! optionally followed by options in braces:
//! `https://policy.example:8443/check{name=policy, stages=mail+rcpt+data, timeout=10s}`,
//! or written with the URL inside the braces, `{ https://policy.example/check, shadow=yes }`.
//! Options: `name` (the label in logs and metrics; default the URL as written), `stages`
//! (a `+`-separated subset of `mail`, `rcpt`, `data`; default `data`), `timeout`
//! (Postfix's durations: `30`, `30s`, `2m`), `default_action` and `oversize_action`
//! (`tempfail`, `accept`, `reject`, `quarantine`), `max_size` (bytes, or with a binary `K`,
//! `M` or `G` suffix), `concurrency` (1 to 4096), `shadow` (`yes`: the verdict is recorded,
//! never enforced), `ca_file`, `client_certificate`, `client_key`, `tls_verify` and
//! `token_file`. An option not given takes the global `Hook*` setting: see
//! [`HookSpec::resolve`].

use std::path::PathBuf;
use std::time::Duration;

use super::milter::{parse_duration, parse_entries, MilterAction, ACTIONS};
use super::values::parse_boolean;

/// Where in the SMTP transaction a hook is asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookStage {
    /// After MAIL FROM.
    Mail,
    /// After each RCPT TO.
    Rcpt,
    /// After the message content.
    Data,
}

/// The `stages` words, in the order a hook is asked.
pub const STAGES: &[(&str, HookStage)] = &[
    ("mail", HookStage::Mail),
    ("rcpt", HookStage::Rcpt),
    ("data", HookStage::Data),
];

impl HookStage {
    /// The word in the configuration, the request's `context.stage` and metric labels.
    pub fn label(self) -> &'static str {
        match self {
            HookStage::Mail => "mail",
            HookStage::Rcpt => "rcpt",
            HookStage::Data => "data",
        }
    }
}

/// One entry of `Hooks`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookSpec {
    /// The label in logs and metrics: the `name` option, else the URL as written.
    pub name: String,
    /// The URL as written (checked: `http` or `https`, a host, an optional port, a path).
    pub url: String,
    /// In `mail`, `rcpt`, `data` order, each once; `data` when not given.
    pub stages: Vec<HookStage>,
    /// `None` takes `HookTimeout`, and so on for each option below.
    pub timeout: Option<Duration>,
    pub default_action: Option<MilterAction>,
    pub max_size: Option<u64>,
    pub oversize_action: Option<MilterAction>,
    pub concurrency: Option<usize>,
    /// `shadow=yes`: the verdict is recorded, never enforced.
    pub shadow: bool,
    pub ca_file: Option<PathBuf>,
    pub client_certificate: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub tls_verify: Option<bool>,
    pub token_file: Option<PathBuf>,
}

/// A hook with every option decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookConfig {
    pub name: String,
    pub url: String,
    pub stages: Vec<HookStage>,
    /// The whole exchange: connecting, sending the request, reading the answer.
    pub timeout: Duration,
    /// What the message gets when the hook fails (no answer, not 2xx, not JSON).
    pub default_action: MilterAction,
    /// Messages larger than this (bytes) are not sent; they get `oversize_action`.
    pub max_size: u64,
    pub oversize_action: MilterAction,
    /// Requests in flight to this hook across the proxy.
    pub concurrency: usize,
    pub shadow: bool,
    /// PEM bundle trusted for the hook's certificate; `None`: the system store.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain and key (both or neither, checked at start-up).
    pub client_certificate: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub tls_verify: bool,
    /// A file holding the bearer token (re-read when it changes).
    pub token_file: Option<PathBuf>,
}

/// What a hook option not given takes: the global `Hook*` settings
/// ([`crate::config::Settings::hook_defaults`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookDefaults {
    pub timeout: Duration,
    pub default_action: MilterAction,
    pub max_size: u64,
    pub oversize_action: MilterAction,
    pub concurrency: usize,
    pub ca_file: Option<PathBuf>,
    pub client_certificate: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub tls_verify: bool,
    pub token_file: Option<PathBuf>,
}

impl HookSpec {
    /// This hook's options, the global `Hook*` settings where it has none.
    pub fn resolve(&self, defaults: &HookDefaults) -> HookConfig {
        let path = |own: &Option<PathBuf>, global: &Option<PathBuf>| own.clone().or(global.clone());
        HookConfig {
            name: self.name.clone(),
            url: self.url.clone(),
            stages: self.stages.clone(),
            timeout: self.timeout.unwrap_or(defaults.timeout),
            default_action: self.default_action.unwrap_or(defaults.default_action),
            max_size: self.max_size.unwrap_or(defaults.max_size),
            oversize_action: self.oversize_action.unwrap_or(defaults.oversize_action),
            concurrency: self.concurrency.unwrap_or(defaults.concurrency),
            shadow: self.shadow,
            ca_file: path(&self.ca_file, &defaults.ca_file),
            client_certificate: path(&self.client_certificate, &defaults.client_certificate),
            client_key: path(&self.client_key, &defaults.client_key),
            tls_verify: self.tls_verify.unwrap_or(defaults.tls_verify),
            token_file: path(&self.token_file, &defaults.token_file),
        }
    }

    /// A URL without options.
    fn at(url: &str) -> Result<HookSpec, String> {
        check_url(url)?;
        Ok(HookSpec {
            name: url.to_string(),
            url: url.to_string(),
            stages: vec![HookStage::Data],
            timeout: None,
            default_action: None,
            max_size: None,
            oversize_action: None,
            concurrency: None,
            shadow: false,
            ca_file: None,
            client_certificate: None,
            client_key: None,
            tls_verify: None,
            token_file: None,
        })
    }
}

impl HookConfig {
    /// Whether this hook is asked at `stage`.
    pub fn runs_at(&self, stage: HookStage) -> bool {
        self.stages.contains(&stage)
    }
}

/// One part of the live filter chain (`FilterOrder`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterKind {
    /// The `Milters`, in their order.
    Milters,
    /// The `Hooks`, in their order.
    Hooks,
    /// The `FilterCommand`.
    Command,
}

/// The `FilterOrder` words.
pub const FILTER_KINDS: &[(&str, FilterKind)] = &[
    ("milters", FilterKind::Milters),
    ("hooks", FilterKind::Hooks),
    ("command", FilterKind::Command),
];

impl FilterKind {
    pub fn label(self) -> &'static str {
        match self {
            FilterKind::Milters => "milters",
            FilterKind::Hooks => "hooks",
            FilterKind::Command => "command",
        }
    }
}

/// The default `FilterOrder`: milters, hooks, then the command.
pub fn default_filter_order() -> Vec<FilterKind> {
    vec![FilterKind::Milters, FilterKind::Hooks, FilterKind::Command]
}

/// Parses the `FilterOrder` value: the three words, each once, comma- or space-separated.
pub fn parse_filter_order(v: &str) -> Result<Vec<FilterKind>, String> {
    let mut order = Vec::new();
    for word in v.split(|c: char| c == ',' || c.is_whitespace()) {
        if word.is_empty() {
            continue;
        }
        let kind = FILTER_KINDS
            .iter()
            .find(|(w, _)| w.eq_ignore_ascii_case(word))
            .map(|(_, k)| *k)
            .ok_or_else(|| format!("{word:?}: expected milters, hooks or command"))?;
        if order.contains(&kind) {
            return Err(format!("{} is listed twice", kind.label()));
        }
        order.push(kind);
    }
    if order.len() != FILTER_KINDS.len() {
        return Err("expected milters, hooks and command, each once, in any order".into());
    }
    Ok(order)
}

/// Parses the `Hooks` value; an empty value is no hook. The error says what is wrong (the
/// caller adds the setting's name).
pub fn parse_hooks(v: &str) -> Result<Vec<HookSpec>, String> {
    // `{ url, options }`: an option is `key=value`, a URL may hold `=` in its query.
    let specs = parse_entries(
        v,
        "hook URL",
        |first| !first.contains('=') || first.contains("://"),
        HookSpec::at,
        |spec, items| apply_options(spec, items),
    )?;
    for (i, spec) in specs.iter().enumerate() {
        if specs[..i].iter().any(|s| s.name == spec.name) {
            return Err(format!(
                "two hooks are named {:?} (give each its own name=)",
                spec.name
            ));
        }
    }
    Ok(specs)
}

/// `http://` or `https://`, a host (name, IPv4 or `[IPv6]`), an optional port, a path;
/// no user name or password, no whitespace, no fragment.
fn check_url(url: &str) -> Result<(), String> {
    let bad = |why: &str| format!("{url:?}: {why}");
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad("a URL has no spaces"));
    }
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(bad("expected http://host[:port]/path or https://..."));
    };
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return Err(bad("the scheme must be http or https"));
    }
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    if authority.contains('@') {
        return Err(bad(
            "no user name or password in the URL (use token_file for a bearer token)",
        ));
    }
    if path.contains('#') {
        return Err(bad("a fragment (#...) is not sent; remove it"));
    }
    let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
        let Some((host, after)) = bracketed.split_once(']') else {
            return Err(bad("unclosed '[' in the host"));
        };
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(bad("not an IPv6 address in brackets"));
        }
        match after {
            "" => (host, None),
            _ => match after.strip_prefix(':') {
                Some(port) => (host, Some(port)),
                None => return Err(bad("expected [address]:port")),
            },
        }
    } else {
        match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(bad("no host"));
    }
    if !authority.starts_with('[')
        && !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
    {
        return Err(bad("the host must be a name, an IPv4 address or [IPv6]"));
    }
    if let Some(port) = port {
        port.parse::<u16>()
            .ok()
            .filter(|p| *p != 0 && port.bytes().all(|b| b.is_ascii_digit()))
            .ok_or_else(|| bad("the port must be 1 to 65535"))?;
    }
    // The HTTP client parses the URL again when the hook starts: what it would refuse
    // (an IPv4 address out of range, say) is refused here, where the error names the line.
    reqwest::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
    Ok(())
}

fn apply_options<'a>(
    spec: &mut HookSpec,
    items: impl Iterator<Item = &'a str>,
) -> Result<(), String> {
    for item in items {
        let Some((key, value)) = item.split_once('=') else {
            return Err(format!("{item:?}: expected option=value"));
        };
        let (key, value) = (key.trim(), value.trim());
        let bad = |why: &str| format!("{key}={value:?}: {why}");
        let action = || {
            ACTIONS
                .iter()
                .find(|(w, _)| w.eq_ignore_ascii_case(value))
                .map(|(_, a)| *a)
                .ok_or_else(|| bad("expected tempfail, accept, reject or quarantine"))
        };
        let path = || {
            (!value.is_empty())
                .then(|| PathBuf::from(value))
                .ok_or_else(|| bad("expected a file path"))
        };
        match key {
            "name" => {
                if value.is_empty() || value.chars().any(|c| c.is_whitespace() || c.is_control()) {
                    return Err(bad("a name is one word"));
                }
                spec.name = value.to_string();
            }
            "stages" => {
                spec.stages = parse_stages(value).ok_or_else(|| {
                    bad("expected mail, rcpt or data, or several joined with + (mail+rcpt+data)")
                })?
            }
            "timeout" => {
                let d = parse_duration(value).ok_or_else(|| {
                    bad("expected a duration greater than 0 (30, 30s, 2m, 1h, 1d, 1w)")
                })?;
                spec.timeout = Some(d);
            }
            "default_action" => spec.default_action = Some(action()?),
            "oversize_action" => spec.oversize_action = Some(action()?),
            "max_size" => {
                let size = parse_size(value).ok_or_else(|| {
                    bad("expected a size greater than 0 in bytes, or with K, M or G (10M)")
                })?;
                spec.max_size = Some(size);
            }
            "concurrency" => {
                spec.concurrency =
                    Some(parse_concurrency(value, 4096).ok_or_else(|| bad("expected 1 to 4096"))?)
            }
            "shadow" => {
                spec.shadow = parse_boolean(value).ok_or_else(|| bad("expected yes or no"))?;
            }
            "tls_verify" => {
                spec.tls_verify =
                    Some(parse_boolean(value).ok_or_else(|| bad("expected yes or no"))?);
            }
            "ca_file" => spec.ca_file = Some(path()?),
            "client_certificate" => spec.client_certificate = Some(path()?),
            "client_key" => spec.client_key = Some(path()?),
            "token_file" => spec.token_file = Some(path()?),
            _ => {
                return Err(format!(
                    "unknown option {key:?} (name, stages, timeout, default_action, max_size, \
                     oversize_action, concurrency, shadow, ca_file, client_certificate, \
                     client_key, tls_verify, token_file)"
                ))
            }
        }
    }
    Ok(())
}

/// `mail+rcpt+data`: any of the three, in any order, repeats allowed; returned in the order
/// they happen, each once.
fn parse_stages(v: &str) -> Option<Vec<HookStage>> {
    let mut given = Vec::new();
    for word in v.split('+').map(str::trim) {
        let stage = STAGES
            .iter()
            .find(|(w, _)| w.eq_ignore_ascii_case(word))
            .map(|(_, s)| *s)?;
        given.push(stage);
    }
    Some(
        STAGES
            .iter()
            .map(|(_, s)| *s)
            .filter(|s| given.contains(s))
            .collect(),
    )
}

/// Bytes: a number and an optional binary unit (`K`, `M`, `G`, case-insensitive; a `B` or
/// `iB` after it is allowed), greater than 0.
pub fn parse_size(v: &str) -> Option<u64> {
    let digits = v.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = v.split_at(digits);
    let unit = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return None,
    };
    let n: u64 = number.parse().ok()?;
    n.checked_mul(unit).filter(|n| *n > 0)
}

/// 1 to `max`, decimal digits only.
pub fn parse_concurrency(v: &str, max: usize) -> Option<usize> {
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse::<usize>().ok().filter(|n| (1..=max).contains(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(url: &str) -> HookSpec {
        HookSpec::at(url).unwrap()
    }

    #[test]
    fn lists() {
        let cases: Vec<(&str, Vec<HookSpec>)> = vec![
            ("", vec![]),
            (" , ", vec![]),
            (
                "http://127.0.0.1:8080/check",
                vec![plain("http://127.0.0.1:8080/check")],
            ),
            (
                "https://policy.mail.svc:8443/check{name=policy, stages=mail+rcpt+data, \
                 timeout=10s, default_action=tempfail, max_size=10M, oversize_action=accept, \
                 concurrency=32, shadow=yes, ca_file=/etc/hook/ca.pem, \
                 client_certificate=/etc/hook/tls.crt, client_key=/etc/hook/tls.key, \
                 tls_verify=yes, token_file=/var/run/secrets/hook/token} http://h/x",
                vec![
                    HookSpec {
                        name: "policy".into(),
                        url: "https://policy.mail.svc:8443/check".into(),
                        stages: vec![HookStage::Mail, HookStage::Rcpt, HookStage::Data],
                        timeout: Some(Duration::from_secs(10)),
                        default_action: Some(MilterAction::Tempfail),
                        max_size: Some(10 << 20),
                        oversize_action: Some(MilterAction::Accept),
                        concurrency: Some(32),
                        shadow: true,
                        ca_file: Some("/etc/hook/ca.pem".into()),
                        client_certificate: Some("/etc/hook/tls.crt".into()),
                        client_key: Some("/etc/hook/tls.key".into()),
                        tls_verify: Some(true),
                        token_file: Some("/var/run/secrets/hook/token".into()),
                    },
                    plain("http://h/x"),
                ],
            ),
            (
                "{ http://[::1]:99/a?b=c, stages = data+MAIL+mail, tls_verify=off }, \
                 HTTPS://h",
                vec![
                    HookSpec {
                        stages: vec![HookStage::Mail, HookStage::Data],
                        tls_verify: Some(false),
                        ..plain("http://[::1]:99/a?b=c")
                    },
                    plain("HTTPS://h"),
                ],
            ),
            (
                "http://a/{name=a} http://b/{name=b,stages=rcpt}",
                vec![
                    HookSpec {
                        name: "a".into(),
                        ..plain("http://a/")
                    },
                    HookSpec {
                        name: "b".into(),
                        stages: vec![HookStage::Rcpt],
                        ..plain("http://b/")
                    },
                ],
            ),
        ];
        for (input, want) in cases {
            assert_eq!(parse_hooks(input), Ok(want), "{input:?}");
        }
    }

    #[test]
    fn errors() {
        let cases = [
            ("policy.example/check", "expected http://host"),
            ("ftp://h/x", "the scheme must be http or https"),
            ("http:///x", "no host"),
            ("http://user:pw@h/x", "no user name or password"),
            ("http://h:0/x", "the port must be 1 to 65535"),
            ("http://h:65536/x", "the port must be 1 to 65535"),
            ("http://h:/x", "the port must be 1 to 65535"),
            ("http://h:+1/x", "the port must be 1 to 65535"),
            ("http://::1/x", "no host"),
            ("http://[h]/x", "not an IPv6 address"),
            ("http://[::1/x", "unclosed '['"),
            ("http://[::1]x/", "expected [address]:port"),
            ("http://h%20x/", "the host must be a name"),
            ("http://999.1.1.1/x", "invalid IPv4 address"),
            ("http://h/x#frag", "a fragment"),
            ("http://h/x{", "unclosed '{'"),
            ("{name=x}", "follows no hook URL"),
            ("http://h/{name=x}{shadow=yes}", "follows no hook URL"),
            ("http://h/ http://h/", "two hooks are named \"http://h/\""),
            (
                "http://a/{name=p} http://b/{name=p}",
                "two hooks are named \"p\"",
            ),
            ("http://h/{retries=1}", "unknown option \"retries\""),
            ("http://h/{name}", "\"name\": expected http://host"),
            ("{http://h/, name}", "\"name\": expected option=value"),
            ("http://h/{name=}", "a name is one word"),
            (
                "http://h/{stages=}",
                "stages=\"\": expected mail, rcpt or data",
            ),
            ("http://h/{stages=mail+}", "expected mail, rcpt or data"),
            ("http://h/{stages=helo}", "expected mail, rcpt or data"),
            ("http://h/{timeout=0}", "greater than 0"),
            ("http://h/{timeout=1ms}", "greater than 0"),
            (
                "http://h/{default_action=discard}",
                "expected tempfail, accept",
            ),
            (
                "http://h/{oversize_action=skip}",
                "expected tempfail, accept",
            ),
            ("http://h/{max_size=0}", "expected a size greater than 0"),
            ("http://h/{max_size=10T}", "expected a size greater than 0"),
            ("http://h/{max_size=-1}", "expected a size greater than 0"),
            ("http://h/{concurrency=0}", "expected 1 to 4096"),
            ("http://h/{concurrency=4097}", "expected 1 to 4096"),
            ("http://h/{shadow=maybe}", "expected yes or no"),
            ("http://h/{tls_verify=maybe}", "expected yes or no"),
            ("http://h/{ca_file=}", "expected a file path"),
        ];
        for (input, want) in cases {
            let err = parse_hooks(input).expect_err(input);
            assert!(err.contains(want), "{input:?}: {err:?} lacks {want:?}");
        }
    }

    #[test]
    fn sizes() {
        let cases = [
            ("123", Some(123)),
            ("10K", Some(10 << 10)),
            ("10k", Some(10 << 10)),
            ("10M", Some(10 << 20)),
            ("10MiB", Some(10 << 20)),
            ("1G", Some(1 << 30)),
            ("1gb", Some(1 << 30)),
            ("0", None),
            ("0M", None),
            ("", None),
            ("M", None),
            ("1.5M", None),
            ("1 M", None),
            ("99999999999999999999", None),
            ("99999999999G", None),
        ];
        for (input, want) in cases {
            assert_eq!(parse_size(input), want, "{input:?}");
        }
    }

    #[test]
    fn filter_orders() {
        use FilterKind::*;
        assert_eq!(
            parse_filter_order("milters hooks command"),
            Ok(default_filter_order())
        );
        assert_eq!(
            parse_filter_order(" Command, hooks,milters "),
            Ok(vec![Command, Hooks, Milters])
        );
        for (input, want) in [
            ("milters hooks", "each once"),
            ("", "each once"),
            ("milters hooks command milters", "milters is listed twice"),
            (
                "milters hooks filter",
                "\"filter\": expected milters, hooks or command",
            ),
        ] {
            let err = parse_filter_order(input).expect_err(input);
            assert!(err.contains(want), "{input:?}: {err:?} lacks {want:?}");
        }
    }

    #[test]
    fn resolve_takes_the_globals_where_unset() {
        let settings = HookDefaults {
            timeout: Duration::from_secs(10),
            default_action: MilterAction::Tempfail,
            max_size: 10 << 20,
            oversize_action: MilterAction::Accept,
            concurrency: 32,
            ca_file: Some("/g/ca.pem".into()),
            client_certificate: None,
            client_key: None,
            tls_verify: true,
            token_file: Some("/g/token".into()),
        };
        let spec =
            &parse_hooks("http://h/{name=p, stages=rcpt, concurrency=2, shadow=on}").unwrap()[0];
        let got = spec.resolve(&settings);
        assert_eq!(
            got,
            HookConfig {
                name: "p".into(),
                url: "http://h/".into(),
                stages: vec![HookStage::Rcpt],
                timeout: Duration::from_secs(10),
                default_action: MilterAction::Tempfail,
                max_size: 10 << 20,
                oversize_action: MilterAction::Accept,
                concurrency: 2,
                shadow: true,
                ca_file: Some("/g/ca.pem".into()),
                client_certificate: None,
                client_key: None,
                tls_verify: true,
                token_file: Some("/g/token".into()),
            }
        );
        assert!(got.runs_at(HookStage::Rcpt));
        assert!(!got.runs_at(HookStage::Data));
        let own = &parse_hooks(
            "http://h/{ca_file=/h/ca.pem, tls_verify=no, timeout=2m, max_size=1K, \
             default_action=reject, oversize_action=quarantine}",
        )
        .unwrap()[0];
        let got = own.resolve(&settings);
        assert_eq!(
            (
                got.ca_file,
                got.tls_verify,
                got.timeout,
                got.max_size,
                got.default_action,
                got.oversize_action,
                got.concurrency,
                got.stages,
            ),
            (
                Some("/h/ca.pem".into()),
                false,
                Duration::from_secs(120),
                1024,
                MilterAction::Reject,
                MilterAction::Quarantine,
                32,
                vec![HookStage::Data],
            )
        );
        assert_eq!(HookStage::Rcpt.label(), "rcpt");
        assert_eq!(FilterKind::Hooks.label(), "hooks");
    }
}
