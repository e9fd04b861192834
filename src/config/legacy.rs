//! The original `proxsmtpd.conf` format, read exactly as proxsmtpd 1.10 reads it, and
//! [`apply_setting`], the registry's validation of one value, shared by all configuration
//! sources so that their messages are identical.
//!
//! Grammar: LF-separated lines (a last line without LF counts); leading whitespace skipped;
//! empty lines and lines starting with `#` ignored (a `#` later in a line is part of the
//! value); otherwise `name: value`, split at the first colon, both trimmed (CR counts as
//! whitespace, so CRLF files work); names case-insensitive; the last value wins except for
//! `Skip`, which accumulates; the first bad line ends the parse.

use super::names::{self, SettingName};
use super::settings::Settings;
use super::ConfigError;

/// One accepted line of a `proxsmtpd.conf` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegacyLine {
    /// 1-based line number.
    pub line: usize,
    pub setting: &'static SettingName,
    /// The value, trimmed.
    pub value: String,
}

/// Parses `proxsmtpd.conf` text into `settings`, stopping at the first error.
pub fn parse_legacy(text: &str, source: &str, settings: &mut Settings) -> Result<(), ConfigError> {
    read_legacy(text.as_bytes(), source, settings).map(|_| ())
}

/// Parses `proxsmtpd.conf` bytes into `settings` and returns the accepted lines in order.
/// Bytes, because comment lines of old files may be in any encoding; a setting line must
/// be UTF-8.
pub fn read_legacy(
    bytes: &[u8],
    source: &str,
    settings: &mut Settings,
) -> Result<Vec<LegacyLine>, ConfigError> {
    let mut lines = Vec::new();
    for (index, raw) in bytes.split(|b| *b == b'\n').enumerate() {
        let number = index + 1;
        let raw = trim_start_bytes(raw);
        if raw.is_empty() || raw[0] == b'#' {
            continue;
        }
        let invalid_line = |what: &str| {
            ConfigError::new(source, format!("invalid config line: {what}")).with_line(Some(number))
        };
        let Ok(text) = std::str::from_utf8(raw) else {
            let shown = String::from_utf8_lossy(raw);
            return Err(invalid_line(&format!("{} (not UTF-8)", trim(&shown))));
        };
        let Some((name, value)) = text.split_once(':') else {
            return Err(invalid_line(trim(text)));
        };
        let (name, value) = (trim(name), trim(value));
        let Some(setting) = names::by_name(name) else {
            return Err(invalid_line(name));
        };
        apply_setting(settings, setting.name, value).map_err(|message| {
            ConfigError::new(source, message)
                .with_line(Some(number))
                .with_setting(setting.name)
                .with_value(value)
        })?;
        lines.push(LegacyLine {
            line: number,
            setting,
            value: value.to_string(),
        });
    }
    Ok(lines)
}

/// C `isspace` in the C locale.
fn is_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\x0b' | '\x0c' | '\r')
}

fn trim(s: &str) -> &str {
    s.trim_matches(is_space)
}

fn trim_start_bytes(mut b: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = b {
        if !is_space(char::from(*first)) {
            break;
        }
        b = rest;
    }
    b
}

/// Applies one setting by its CamelCase name (case-insensitive) with the registry's parser.
/// The value is trimmed. On error returns the original's message, e.g.
/// `invalid setting: FilterTimeout`.
pub fn apply_setting(settings: &mut Settings, name: &str, value: &str) -> Result<(), String> {
    let Some(setting) = names::by_name(name) else {
        return Err(format!("invalid config line: {name}"));
    };
    (setting.apply)(settings, trim(value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::address::{ListenAddress, OutAddress};
    use crate::config::cidr::Cidr;
    use crate::config::settings::{FilterType, LogFormat, Transparent, UpstreamTls};
    use crate::config::values::MAX_SECONDS;
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    fn applied(name: &str, value: &str) -> Result<Settings, String> {
        let mut s = Settings::default();
        apply_setting(&mut s, name, value).map(|()| s)
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    /// Every setting: accepted values and the resulting change.
    #[test]
    fn accepted_values() {
        type Check = fn(&Settings) -> bool;
        let cases: &[(&str, &str, Check)] = &[
            ("FilterCommand", "/usr/bin/filter -x", |s| {
                s.filter_command.as_deref() == Some("/usr/bin/filter -x")
            }),
            ("FilterCommand", "", |s| {
                s.filter_command.as_deref() == Some("")
            }),
            ("FilterCommand", "grep # x", |s| {
                s.filter_command.as_deref() == Some("grep # x")
            }),
            ("FilterTimeout", "5", |s| s.filter_timeout == secs(5)),
            ("FilterTimeout", "+5", |s| s.filter_timeout == secs(5)),
            ("FilterTimeout", "007", |s| s.filter_timeout == secs(7)),
            ("FilterTimeout", "4294967297", |s| {
                s.filter_timeout == secs(MAX_SECONDS)
            }),
            ("FilterTimeout", "99999999999999999999999", |s| {
                s.filter_timeout == secs(MAX_SECONDS)
            }),
            ("FilterType", "pipe", |s| s.filter_type == FilterType::Pipe),
            ("FilterType", "FILE", |s| s.filter_type == FilterType::File),
            ("FilterType", "Reject", |s| {
                s.filter_type == FilterType::Reject
            }),
            ("FilterReject", "554 No", |s| s.filter_reject == "554 No"),
            ("FilterReject", "", |s| s.filter_reject.is_empty()),
            ("Header", "X-Filtered: by %l", |s| {
                s.header.as_deref() == Some("X-Filtered: by %l")
            }),
            ("Header", "   X-H: 1", |s| {
                s.header.as_deref() == Some("X-H: 1")
            }),
            ("Header", "", |s| s.header.is_none()),
            ("KeepAlives", "0", |s| s.keep_alives.is_none()),
            ("KeepAlives", "", |s| s.keep_alives.is_none()),
            ("KeepAlives", "-0", |s| s.keep_alives.is_none()),
            ("KeepAlives", "10", |s| s.keep_alives == Some(secs(10))),
            ("Listen", "127.0.0.1:2525", |s| {
                s.listen == ListenAddress::Tcp("127.0.0.1:2525".parse().unwrap())
            }),
            ("Listen", "[::1]", |s| {
                s.listen == ListenAddress::Tcp("[::1]:10025".parse().unwrap())
            }),
            ("MaxConnections", "2", |s| s.max_connections == 2),
            ("MaxConnections", "10239", |s| s.max_connections == 10239),
            ("OutAddress", "10026", |s| {
                s.out_address == Some(OutAddress::ClientLoopback(10026))
            }),
            ("OutAddress", "[::1]:25", |s| {
                s.out_address == Some(OutAddress::Ip("[::1]:25".parse().unwrap()))
            }),
            ("PidFile", "/run/p.pid", |s| {
                s.pid_file == Some(PathBuf::from("/run/p.pid"))
            }),
            ("PidFile", "", |s| s.pid_file.is_none()),
            ("Skip", "authenticated", |s| s.skip_authenticated),
            ("Skip", "AUTHENTICATED", |s| s.skip_authenticated),
            ("TempDirectory", "/var/spool/p", |s| {
                s.temp_directory.as_path() == Path::new("/var/spool/p")
            }),
            ("TempDirectory", "rel", |s| {
                s.temp_directory.as_path() == Path::new("rel")
            }),
            ("TimeOut", "1", |s| s.timeout == secs(1)),
            ("TransparentProxy", "off", |s| {
                s.transparent == Transparent::Off
            }),
            ("TransparentProxy", "0", |s| {
                s.transparent == Transparent::Off
            }),
            ("TransparentProxy", "yes", |s| {
                s.transparent == Transparent::Client
            }),
            ("TransparentProxy", "T", |s| {
                s.transparent == Transparent::Client
            }),
            ("TransparentProxy", "Client", |s| {
                s.transparent == Transparent::Client
            }),
            ("TransparentProxy", "FULL", |s| {
                s.transparent == Transparent::Full
            }),
            ("User", "_proxsmtp", |s| {
                s.user.as_deref() == Some("_proxsmtp")
            }),
            ("User", "1000", |s| s.user.as_deref() == Some("1000")),
            ("XClient", "on", |s| s.xclient),
            ("XClient", "TRUE", |s| s.xclient),
            ("XClient", "f", |s| !s.xclient),
            ("AdminListen", "127.0.0.1:9925", |s| {
                s.admin_listen == Some("127.0.0.1:9925".parse().unwrap())
            }),
            ("AdminListen", "[::]:9925", |s| {
                s.admin_listen == Some("[::]:9925".parse().unwrap())
            }),
            ("AdminListen", "9925", |s| {
                s.admin_listen == Some("0.0.0.0:9925".parse().unwrap())
            }),
            ("AdminListen", "", |s| s.admin_listen.is_none()),
            ("Container", "yes", |s| s.container),
            ("DrainTimeout", "0", |s| s.drain_timeout.is_zero()),
            ("DrainTimeout", "120", |s| s.drain_timeout == secs(120)),
            ("MinDataRate", "0", |s| s.min_data_rate == 0),
            ("MinDataRate", "2000", |s| s.min_data_rate == 2000),
            ("ProxyProtocol", "1", |s| s.proxy_protocol),
            (
                "ProxyProtocolTrusted",
                "10.0.0.0/8, 2001:db8::/32,192.0.2.1",
                |s| {
                    s.proxy_protocol_trusted
                        == vec![
                            "10.0.0.0/8".parse::<Cidr>().unwrap(),
                            "2001:db8::/32".parse().unwrap(),
                            "192.0.2.1".parse().unwrap(),
                        ]
                },
            ),
            ("ProxyProtocolTrusted", "", |s| {
                s.proxy_protocol_trusted.is_empty()
            }),
            ("ReadinessCheckUpstream", "on", |s| {
                s.readiness_check_upstream
            }),
            ("LogFormat", "json", |s| s.log_format == LogFormat::Json),
            ("LogFormat", "Text", |s| s.log_format == LogFormat::Text),
            ("ReloadWatch", "off", |s| !s.reload_watch),
            ("TlsCertificate", "/etc/tls/tls.crt", |s| {
                s.tls_certificate == Some(PathBuf::from("/etc/tls/tls.crt"))
            }),
            ("TlsCertificate", "", |s| s.tls_certificate.is_none()),
            ("TlsKey", "/etc/tls/tls.key", |s| {
                s.tls_key == Some(PathBuf::from("/etc/tls/tls.key"))
            }),
            ("TlsRequired", "yes", |s| s.tls_required),
            ("TlsListen", "127.0.0.1:10465", |s| {
                s.tls_listen == Some(ListenAddress::Tcp("127.0.0.1:10465".parse().unwrap()))
            }),
            ("TlsListen", "", |s| s.tls_listen.is_none()),
            ("UpstreamTls", "Opportunistic", |s| {
                s.upstream_tls == UpstreamTls::Opportunistic
            }),
            ("UpstreamTls", "required", |s| {
                s.upstream_tls == UpstreamTls::Required
            }),
            ("UpstreamTls", "off", |s| s.upstream_tls == UpstreamTls::Off),
            ("UpstreamTlsCa", "/etc/ssl/ca.pem", |s| {
                s.upstream_tls_ca == Some(PathBuf::from("/etc/ssl/ca.pem"))
            }),
            ("UpstreamTlsVerify", "off", |s| !s.upstream_tls_verify),
            (
                "Hooks",
                "http://h:8080/c{name=c, stages=rcpt} https://p/x",
                |s| {
                    s.hooks.len() == 2 && s.hooks[0].name == "c" && s.hooks[1].name == "https://p/x"
                },
            ),
            ("Hooks", "", |s| s.hooks.is_empty()),
            ("HookTimeout", "45", |s| s.hook_timeout == secs(45)),
            ("HookTimeout", "1h", |s| s.hook_timeout == secs(3600)),
            ("HookDefaultAction", "ACCEPT", |s| {
                s.hook_default_action == crate::config::milter::MilterAction::Accept
            }),
            ("HookOversizeAction", "reject", |s| {
                s.hook_oversize_action == crate::config::milter::MilterAction::Reject
            }),
            ("HookMaxSize", "20m", |s| s.hook_max_size == 20 << 20),
            ("HookConcurrency", "1", |s| s.hook_concurrency == 1),
            ("HookCaFile", "/etc/hook/ca.pem", |s| {
                s.hook_ca_file == Some(PathBuf::from("/etc/hook/ca.pem"))
            }),
            ("HookClientCertificate", "/c.pem", |s| {
                s.hook_client_certificate == Some(PathBuf::from("/c.pem"))
            }),
            ("HookClientKey", "/k.pem", |s| {
                s.hook_client_key == Some(PathBuf::from("/k.pem"))
            }),
            ("HookTlsVerify", "no", |s| !s.hook_tls_verify),
            ("HookTokenFile", "", |s| s.hook_token_file.is_none()),
            ("FilterShadow", "on", |s| s.filter_shadow),
            ("FilterOrder", "hooks,milters,command", |s| {
                use crate::config::hook::FilterKind::*;
                s.filter_order == [Hooks, Milters, Command]
            }),
            ("ShadowConcurrency", "65536", |s| {
                s.shadow_concurrency == 65536
            }),
            // Names are case-insensitive; values are trimmed of C whitespace.
            ("filtertimeout", " 9\r", |s| s.filter_timeout == secs(9)),
            ("MAXCONNECTIONS", "\t100 ", |s| s.max_connections == 100),
        ];
        for (name, value, check) in cases {
            let s = applied(name, value).unwrap_or_else(|e| panic!("{name}: {value:?}: {e}"));
            assert!(check(&s), "{name}: {value:?} gave {s:?}");
        }
    }

    /// Every setting: rejected values and the original's message.
    #[test]
    fn rejected_values() {
        let cases = [
            ("FilterTimeout", "0", "invalid setting: FilterTimeout"),
            ("FilterTimeout", "", "invalid setting: FilterTimeout"),
            ("FilterTimeout", "-5", "invalid setting: FilterTimeout"),
            ("FilterTimeout", "10x", "invalid setting: FilterTimeout"),
            ("FilterTimeout", "5:6", "invalid setting: FilterTimeout"),
            ("FilterTimeout", "1.5", "invalid setting: FilterTimeout"),
            ("FilterTimeout", "+", "invalid setting: FilterTimeout"),
            ("FilterType", "smtp", "invalid value for FilterType (must specify 'pipe' or 'file' or 'reject')"),
            ("FilterType", "", "invalid value for FilterType (must specify 'pipe' or 'file' or 'reject')"),
            ("KeepAlives", "-1", "invalid setting: KeepAlives"),
            ("KeepAlives", "0x5", "invalid setting: KeepAlives"),
            ("KeepAlives", "5 5", "invalid setting: KeepAlives"),
            ("Listen", "x y", "invalid Listen socket name or ip: x y"),
            ("Listen", "127.0.0.1:0", "invalid Listen socket name or ip: 127.0.0.1:0"),
            ("MaxConnections", "1", "invalid setting: MaxConnections (must be between 1 and 10240)"),
            ("MaxConnections", "10240", "invalid setting: MaxConnections (must be between 1 and 10240)"),
            ("MaxConnections", "", "invalid setting: MaxConnections (must be between 1 and 10240)"),
            ("MaxConnections", "many", "invalid setting: MaxConnections (must be between 1 and 10240)"),
            ("OutAddress", "99999", "invalid OutAddress socket name or ip: 99999"),
            ("OutAddress", "", "invalid OutAddress socket name or ip: "),
            ("Skip", "", "invalid value for Skip (must specify 'authenticated')"),
            ("Skip", "auth", "invalid value for Skip (must specify 'authenticated')"),
            ("TempDirectory", "", "invalid setting: TempDirectory"),
            ("TimeOut", "0", "invalid setting: TimeOut"),
            ("TimeOut", "abc", "invalid setting: TimeOut"),
            ("TransparentProxy", "maybe", "invalid value for TransparentProxy"),
            ("TransparentProxy", "", "invalid value for TransparentProxy"),
            ("User", "", "invalid setting: User"),
            ("XClient", "maybe", "invalid value for XClient"),
            ("XClient", "", "invalid value for XClient"),
            ("AdminListen", "127.0.0.1", "invalid setting: AdminListen"),
            ("AdminListen", "0", "invalid setting: AdminListen"),
            ("AdminListen", "localhost:9925", "invalid setting: AdminListen"),
            ("AdminListen", "127.0.0.1:0", "invalid setting: AdminListen"),
            ("Container", "sure", "invalid value for Container"),
            ("DrainTimeout", "-1", "invalid setting: DrainTimeout"),
            ("MinDataRate", "-1", "invalid setting: MinDataRate"),
            ("MinDataRate", "fast", "invalid setting: MinDataRate"),
            ("ProxyProtocol", "v2", "invalid value for ProxyProtocol"),
            ("ProxyProtocolTrusted", "10.0.0.1/8", "invalid setting: ProxyProtocolTrusted (\"10.0.0.1/8\": 10.0.0.1/8 has host bits set)"),
            ("ProxyProtocolTrusted", "lb.example", "invalid setting: ProxyProtocolTrusted (\"lb.example\" is not an IP address or network)"),
            ("ReadinessCheckUpstream", "2", "invalid value for ReadinessCheckUpstream"),
            ("LogFormat", "xml", "invalid value for LogFormat (must specify 'text' or 'json')"),
            ("TlsRequired", "maybe", "invalid value for TlsRequired"),
            ("TlsListen", "x y", "invalid TlsListen socket name or ip: x y"),
            ("UpstreamTls", "yes", "invalid value for UpstreamTls (must specify 'off' or 'opportunistic' or 'required')"),
            ("UpstreamTlsVerify", "", "invalid value for UpstreamTlsVerify"),
            ("LogFormat", "", "invalid value for LogFormat (must specify 'text' or 'json')"),
            ("ReloadWatch", "", "invalid value for ReloadWatch"),
            ("Hooks", "http://h/x y{name=a}", "invalid setting: Hooks (\"y\": expected http://host[:port]/path or https://...)"),
            ("Hooks", "https://u@h/", "invalid setting: Hooks (\"https://u@h/\": no user name or password in the URL (use token_file for a bearer token))"),
            ("HookTimeout", "", "invalid setting: HookTimeout"),
            ("HookDefaultAction", "discard", "invalid value for HookDefaultAction (must specify 'tempfail' or 'accept' or 'reject' or 'quarantine')"),
            ("HookMaxSize", "0", "invalid setting: HookMaxSize"),
            ("HookConcurrency", "", "invalid setting: HookConcurrency (must be between 1 and 4096)"),
            ("HookTlsVerify", "sure", "invalid value for HookTlsVerify"),
            ("FilterShadow", "2", "invalid value for FilterShadow"),
            ("FilterOrder", "", "invalid setting: FilterOrder (expected milters, hooks and command, each once, in any order)"),
            ("ShadowConcurrency", "-1", "invalid setting: ShadowConcurrency (must be between 1 and 65536)"),
            ("DebugFiles", "1", "invalid config line: DebugFiles"),
            ("Bogus", "1", "invalid config line: Bogus"),
        ];
        for (name, value, want) in cases {
            assert_eq!(
                applied(name, value).err().as_deref(),
                Some(want),
                "{name}: {value:?}"
            );
        }
    }

    fn parse(text: &str) -> Result<Settings, ConfigError> {
        let mut s = Settings::default();
        parse_legacy(text, "test.conf", &mut s).map(|()| s)
    }

    fn parse_err(text: &str) -> (Option<usize>, String, String) {
        let e = parse(text).expect_err(text);
        assert_eq!(e.exit_code, 2);
        assert_eq!(e.source, "test.conf");
        (e.line, e.message.clone(), e.to_string())
    }

    #[test]
    fn grammar() {
        let s = parse(
            "# comment\n\n   \t\n  # indented comment\n  OutAddress: 10026\nFilterCommand: grep -v '#' | cat\n",
        )
        .unwrap();
        assert_eq!(s.out_address, Some(OutAddress::ClientLoopback(10026)));
        assert_eq!(s.filter_command.as_deref(), Some("grep -v '#' | cat"));

        // CRLF lines, a last line without LF, case-insensitive names, spaces around the colon.
        let s = parse("outaddress : 127.0.0.1:2525\r\nFILTERTYPE:\tfile\r\nTimeOut:7").unwrap();
        assert_eq!(
            s.out_address,
            Some(OutAddress::Ip("127.0.0.1:2525".parse().unwrap()))
        );
        assert_eq!(s.filter_type, FilterType::File);
        assert_eq!(s.timeout, secs(7));

        // Last value wins.
        let s = parse("TimeOut: 5\nTimeOut: 6\nHeader: X-A: 1\nHeader:\n").unwrap();
        assert_eq!(s.timeout, secs(6));
        assert_eq!(s.header, None);

        // Skip accumulates: a later line does not undo it.
        let s = parse("Skip: authenticated\nSkip: Authenticated\n").unwrap();
        assert!(s.skip_authenticated);

        // Empty and comment-only files leave the defaults.
        assert_eq!(parse("").unwrap(), Settings::default());
        assert_eq!(parse("\n# x\n\r\n").unwrap(), Settings::default());

        // A `#` after a value is part of it.
        let s = parse("Header: X-Tag: a # b\n").unwrap();
        assert_eq!(s.header.as_deref(), Some("X-Tag: a # b"));
    }

    #[test]
    fn grammar_errors() {
        let cases = [
            // The first colon splits: this is name `OutAddress 127.0.0.1`.
            (
                "OutAddress 127.0.0.1:1\n",
                1,
                "invalid config line: OutAddress 127.0.0.1",
            ),
            ("# ok\nnocolon\n", 2, "invalid config line: nocolon"),
            ("  nocolon  \r\n", 1, "invalid config line: nocolon"),
            (":x\n", 1, "invalid config line: "),
            ("Bogus: 1\n", 1, "invalid config line: Bogus"),
            ("DebugFiles: 1\n", 1, "invalid config line: DebugFiles"),
            (
                "TimeOut: 5\n\nMaxConnections: 1",
                3,
                "invalid setting: MaxConnections (must be between 1 and 10240)",
            ),
            // The first bad line is reported, even if a later line is bad in another way.
            (
                "FilterTimeout: 0\nnocolon\n",
                1,
                "invalid setting: FilterTimeout",
            ),
            (
                "nocolon\nFilterTimeout: 0\n",
                1,
                "invalid config line: nocolon",
            ),
        ];
        for (text, line, message) in cases {
            let (got_line, got_message, _) = parse_err(text);
            assert_eq!(
                (got_line, got_message.as_str()),
                (Some(line), message),
                "{text:?}"
            );
        }
    }

    #[test]
    fn error_display_names_file_line_and_value() {
        let (_, _, shown) = parse_err("OutAddress: 1\nFilterTimeout: ten\n");
        assert_eq!(
            shown,
            "test.conf:2: invalid setting: FilterTimeout (value \"ten\")"
        );
        let (_, _, shown) = parse_err("OutAddress: 99999\n");
        assert_eq!(
            shown,
            "test.conf:1: invalid OutAddress socket name or ip: 99999"
        );
        let e = parse("\n\nXClient: maybe").unwrap_err();
        assert_eq!(e.setting, Some("XClient"));
    }

    #[test]
    fn non_utf8() {
        let mut s = Settings::default();
        // Old files may have Latin-1 comments.
        let lines = read_legacy(b"# caf\xe9\nTimeOut: 9\n", "t", &mut s).unwrap();
        assert_eq!(lines.len(), 1);
        assert_eq!((lines[0].line, lines[0].setting.name), (2, "TimeOut"));
        let e = read_legacy(b"Header: caf\xe9\n", "t", &mut s).unwrap_err();
        assert_eq!(e.line, Some(1));
        assert!(
            e.message.starts_with("invalid config line: Header: caf"),
            "{e}"
        );
    }
}
