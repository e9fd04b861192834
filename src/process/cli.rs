//! Command line: `proxsmtpd [-d level] [-f configfile] [-p pidfile]` and `proxsmtpd -v`.
//!
//! Parsed the way the original's glibc `getopt(argc, argv, "d:f:p:v")` parses it, because
//! init scripts and unit files pass these options unchanged: clustered flags (`-vd4`),
//! attached or separate values (`-d4`, `-d 4`), operands permuted to the end, `--` ends the
//! options. On top of that, two long options set the top layer of the configuration:
//! `--set Name=Value` (any setting, repeatable) and `--admin-listen ADDR`; `--demo [DIR]`
//! runs the embedded demo (with the same options) and `--help` lists every option.

use std::fmt;
use std::path::PathBuf;

/// The configuration file read when `-f` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/proxsmtpd.conf";

/// The highest accepted `-d` value (the original's LOG_DEBUG - LOG_ERR).
const MAX_DEBUG_LEVEL: i64 = 4;

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `-v`: print [`version_text`] to stdout and exit 0.
    Version,
    /// `--help`: print [`help_text`] to stdout and exit 0.
    Help,
    /// Run the proxy.
    Run(RunArgs),
    /// `--demo [DIR]`: run the proxy on the embedded demo configuration.
    Demo(DemoArgs),
}

/// The options of `--demo`: its directory and the options of a normal run (`-d`, `-p`,
/// `--set`, `--admin-listen`) on top of its configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DemoArgs {
    /// Where its files go (`--demo DIR` or `--demo=DIR`); `None` for the default.
    pub dir: Option<PathBuf>,
    pub run: RunArgs,
}

/// The options of a normal run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunArgs {
    /// `-d N`: stay in the foreground and log to stderr at this level. `None`: daemonise.
    pub debug_level: Option<i32>,
    /// `-f path`, else [`DEFAULT_CONFIG_PATH`].
    pub config_path: PathBuf,
    /// `-p path`.
    pub pid_file: Option<PathBuf>,
    /// `--set Name=Value` and `--admin-listen ADDR`, in command line order (later wins).
    pub overrides: Vec<(String, String)>,
}

/// A command line the program must refuse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CliError {
    /// What is wrong, without the `proxsmtpd: ` prefix; empty when only the usage is shown.
    pub message: String,
    /// Whether [`usage_text`] follows the message.
    pub usage: bool,
    /// The process exit status.
    pub exit_code: i32,
}

impl CliError {
    fn usage(message: impl Into<String>) -> CliError {
        CliError {
            message: message.into(),
            usage: true,
            exit_code: 2,
        }
    }

    /// Everything to print on stderr, newline-terminated.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if !self.message.is_empty() {
            out.push_str("proxsmtpd: ");
            out.push_str(&self.message);
            out.push('\n');
        }
        if self.usage {
            out.push_str(&usage_text());
        }
        out
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.render().trim_end())
    }
}

impl std::error::Error for CliError {}

/// The original's two-line usage text, byte for byte (scripts may compare it).
pub fn usage_text() -> String {
    "usage: proxsmtpd [-d debuglevel] [-f configfile] [-p pidfile]\n       proxsmtpd -v\n"
        .to_string()
}

/// The `--help` output: every option.
pub fn help_text() -> String {
    format!(
        "usage: proxsmtpd [-d debuglevel] [-f configfile] [-p pidfile] [--set Name=Value]... [--admin-listen ADDR]
       proxsmtpd --demo [DIR] [-d debuglevel] [--set Name=Value]... [--admin-listen ADDR]
       proxsmtpd -v | --help

SMTP filtering proxy: relays SMTP to OutAddress and runs every message through FilterCommand.

Options:
  -d LEVEL             stay in the foreground and log to stderr; 0 errors ... 4 debug
                       (without -d the process daemonises and logs to syslog)
  -f FILE              configuration file (default {DEFAULT_CONFIG_PATH})
  -p FILE              pid file (a PidFile setting overrides it)
  -v                   print the version and exit
  --set Name=Value     any setting, overriding the file and the environment (repeatable),
                       e.g. --set MaxConnections=128
  --admin-listen ADDR  shorthand for --set AdminListen=ADDR (/livez, /readyz, /metrics)
  --demo [DIR]         run on an embedded default that needs no mail server: a capture
                       server on 127.0.0.1:10026, SMTP on 127.0.0.1:10025, admin on
                       127.0.0.1:9925, files in DIR (default ./proxsmtpd-demo); takes -d,
                       -p, --set and --admin-listen like a normal run
  --help               print this text and exit

Settings can also come from the environment (PROXSMTPD_<SETTING>, e.g. PROXSMTPD_OUT_ADDRESS).
Signals: SIGTERM/SIGINT drain and stop, SIGHUP reloads the configuration.
"
    )
}

/// The `-v` output.
pub fn version_text() -> String {
    format!(
        "proxsmtpd (version {})\n          (config: {})\n",
        env!("CARGO_PKG_VERSION"),
        DEFAULT_CONFIG_PATH
    )
}

/// Parses the arguments after argv[0].
///
/// Errors are reported in the original's order: an invalid option, a missing value, a
/// non-numeric `-d` or `-v` act at once, left to right; operands, then an out-of-range
/// `-d`, are only checked once every option has been read (so `-d 9 -v` prints the version).
pub fn parse(args: &[String]) -> Result<Command, CliError> {
    let mut run = RunArgs {
        debug_level: None,
        config_path: PathBuf::from(DEFAULT_CONFIG_PATH),
        pid_file: None,
        overrides: Vec::new(),
    };
    let mut debug: Option<i64> = None;
    let mut operands: Vec<String> = Vec::new();
    let mut demo: Option<Option<String>> = None;
    let mut config_given = false;

    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        if arg == "--" {
            operands.extend(rest.cloned());
            break;
        }
        if let Some(long) = arg.strip_prefix("--") {
            let (name, inline) = match long.split_once('=') {
                Some((name, value)) => (name, Some(value.to_string())),
                None => (long, None),
            };
            match name {
                "help" => return Ok(Command::Help),
                "demo" => {
                    demo = Some(inline.or(demo.flatten()));
                    continue;
                }
                "set" | "admin-listen" => {}
                _ => return Err(CliError::usage(format!("unrecognized option '--{name}'"))),
            }
            let value = match inline.or_else(|| rest.next().cloned()) {
                Some(value) => value,
                None => {
                    return Err(CliError::usage(format!(
                        "option '--{name}' requires an argument"
                    )))
                }
            };
            run.overrides.push(if name == "set" {
                parse_set(&value)?
            } else {
                ("AdminListen".to_string(), value)
            });
            continue;
        }
        // A lone "-" is an operand, as for getopt.
        let mut flags = arg.chars();
        if flags.next() != Some('-') || arg.len() < 2 {
            operands.push(arg.clone());
            continue;
        }
        // Every option but -v takes a value, so only the first flag of a cluster counts:
        // `-vx` is -v, `-d4v` is -d with the value "4v".
        let flag = flags.next().unwrap_or('-');
        if flag == 'v' {
            return Ok(Command::Version);
        }
        if !matches!(flag, 'd' | 'f' | 'p') {
            return Err(CliError::usage(format!("invalid option -- '{flag}'")));
        }
        // The value is the rest of this argument, else the whole next one (even if it
        // starts with '-', as getopt does).
        let attached = flags.as_str();
        let value = if !attached.is_empty() {
            attached.to_string()
        } else if let Some(next) = rest.next() {
            next.clone()
        } else {
            return Err(CliError::usage(format!(
                "option requires an argument -- '{flag}'"
            )));
        };
        match flag {
            'd' => {
                debug = Some(parse_c_long(&value).ok_or_else(|| CliError {
                    message: "invalid debug log level".to_string(),
                    usage: false,
                    exit_code: 1,
                })?)
            }
            'f' => {
                config_given = true;
                run.config_path = PathBuf::from(value)
            }
            _ => run.pid_file = Some(PathBuf::from(value)),
        }
    }

    // `--demo DIR`: the demo takes one operand, its directory.
    let demo_dir = match demo {
        Some(inline) => {
            let dir = match (inline, operands.len()) {
                (Some(dir), 0) => Some(dir),
                (None, 0) => None,
                (None, 1) => operands.pop(),
                _ => return Err(CliError::usage("")),
            };
            if config_given {
                return Err(CliError {
                    message: "--demo writes its own configuration: -f cannot be used with it"
                        .to_string(),
                    usage: false,
                    exit_code: 2,
                });
            }
            Some(dir)
        }
        None => None,
    };
    if !operands.is_empty() {
        return Err(CliError::usage(""));
    }
    if let Some(level) = debug {
        if level > MAX_DEBUG_LEVEL {
            return Err(CliError {
                message: "invalid debug log level (must be between 1 and 4)".to_string(),
                usage: false,
                exit_code: 2,
            });
        }
        // Very negative values only mean "show nothing"; clamping keeps that meaning.
        run.debug_level = Some(i32::try_from(level).unwrap_or(i32::MIN));
    }
    Ok(match demo_dir {
        Some(dir) => Command::Demo(DemoArgs {
            dir: dir.map(PathBuf::from),
            run,
        }),
        None => Command::Run(run),
    })
}

/// `Name=Value`, split at the first `=`.
fn parse_set(value: &str) -> Result<(String, String), CliError> {
    match value.split_once('=') {
        Some((name, setting)) if is_setting_name(name.trim()) => {
            Ok((name.trim().to_string(), setting.to_string()))
        }
        _ => Err(CliError {
            message: format!("invalid --set value: {value} (expected Name=Value)"),
            usage: false,
            exit_code: 2,
        }),
    }
}

fn is_setting_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Reads an integer the way `strtol(s, &end, 10)` followed by `*end == '\0'` accepts it:
/// leading white space and a sign are allowed, trailing characters are not, and the empty
/// string is 0. Out-of-range values saturate (the original truncated them to an int).
fn parse_c_long(s: &str) -> Option<i64> {
    let trimmed = s.trim_start_matches([' ', '\t', '\n', '\x0b', '\x0c', '\r']);
    let (negative, digits) = match trimmed.as_bytes().first() {
        Some(b'-') => (true, &trimmed[1..]),
        Some(b'+') => (false, &trimmed[1..]),
        _ => (false, trimmed),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        // strtol converts nothing and leaves `end` at the start, which is only '\0' for "".
        return s.is_empty().then_some(0);
    }
    let magnitude = digits.bytes().fold(0i64, |acc, b| {
        acc.saturating_mul(10).saturating_add(i64::from(b - b'0'))
    });
    Some(if negative { -magnitude } else { magnitude })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(debug: Option<i32>, config: &str, pid: Option<&str>, ov: &[(&str, &str)]) -> Command {
        Command::Run(RunArgs {
            debug_level: debug,
            config_path: PathBuf::from(config),
            pid_file: pid.map(PathBuf::from),
            overrides: ov
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
        })
    }

    fn demo(dir: Option<&str>, debug: Option<i32>, ov: &[(&str, &str)]) -> Command {
        let Command::Run(run) = run(debug, DEF, None, ov) else {
            unreachable!()
        };
        Command::Demo(DemoArgs {
            dir: dir.map(PathBuf::from),
            run,
        })
    }

    fn err(message: &str, usage: bool, exit_code: i32) -> CliError {
        CliError {
            message: message.to_string(),
            usage,
            exit_code,
        }
    }

    const DEF: &str = DEFAULT_CONFIG_PATH;
    const LEVEL: &str = "invalid debug log level";
    const RANGE: &str = "invalid debug log level (must be between 1 and 4)";

    #[test]
    fn parses_like_the_original() {
        let cases: Vec<(&[&str], Result<Command, CliError>)> = vec![
            (&[], Ok(run(None, DEF, None, &[]))),
            (&["-d", "4"], Ok(run(Some(4), DEF, None, &[]))),
            (&["-d4"], Ok(run(Some(4), DEF, None, &[]))),
            (&["-d0"], Ok(run(Some(0), DEF, None, &[]))),
            (&["-d", "-1"], Ok(run(Some(-1), DEF, None, &[]))),
            (&["-d", "-4"], Ok(run(Some(-4), DEF, None, &[]))),
            (&["-d", " 3"], Ok(run(Some(3), DEF, None, &[]))),
            (&["-d", "+2"], Ok(run(Some(2), DEF, None, &[]))),
            (&["-d", ""], Ok(run(Some(0), DEF, None, &[]))),
            (
                &["-d", "-99999999999"],
                Ok(run(Some(i32::MIN), DEF, None, &[])),
            ),
            (&["-d", "5"], Err(err(RANGE, false, 2))),
            (&["-d", "99999999999"], Err(err(RANGE, false, 2))),
            (&["-d", "x"], Err(err(LEVEL, false, 1))),
            (&["-dx"], Err(err(LEVEL, false, 1))),
            (&["-d", "4x"], Err(err(LEVEL, false, 1))),
            (&["-d", "4 "], Err(err(LEVEL, false, 1))),
            (&["-d", " "], Err(err(LEVEL, false, 1))),
            (&["-d", "+"], Err(err(LEVEL, false, 1))),
            (&["-d", "0x4"], Err(err(LEVEL, false, 1))),
            (&["-d4v"], Err(err(LEVEL, false, 1))),
            // The value of -d is the next argument even when it looks like an option.
            (&["-d", "-f", "x"], Err(err(LEVEL, false, 1))),
            (
                &["-d"],
                Err(err("option requires an argument -- 'd'", true, 2)),
            ),
            (
                &["-f"],
                Err(err("option requires an argument -- 'f'", true, 2)),
            ),
            (
                &["-p"],
                Err(err("option requires an argument -- 'p'", true, 2)),
            ),
            (&["-f", "/x.conf"], Ok(run(None, "/x.conf", None, &[]))),
            (&["-f/x.conf"], Ok(run(None, "/x.conf", None, &[]))),
            (&["-f", "a", "-f", "b"], Ok(run(None, "b", None, &[]))),
            (&["-fa", "-d", "3"], Ok(run(Some(3), "a", None, &[]))),
            (&["-d4", "x"], Err(err("", true, 2))),
            (
                &["-p", "/run/p.pid"],
                Ok(run(None, DEF, Some("/run/p.pid"), &[])),
            ),
            (
                &["-d", "2", "-f", "c", "-p", "p"],
                Ok(run(Some(2), "c", Some("p"), &[])),
            ),
            (&["-v"], Ok(Command::Version)),
            (&["-v", "-x"], Ok(Command::Version)),
            (&["-vx"], Ok(Command::Version)),
            (&["-d", "9", "-v"], Ok(Command::Version)),
            (&["foo", "-v"], Ok(Command::Version)),
            (&["-x", "-v"], Err(err("invalid option -- 'x'", true, 2))),
            (&["-xv"], Err(err("invalid option -- 'x'", true, 2))),
            (&["-h"], Err(err("invalid option -- 'h'", true, 2))),
            (
                &["-d", "5", "-x"],
                Err(err("invalid option -- 'x'", true, 2)),
            ),
            (&["-dx", "-v"], Err(err(LEVEL, false, 1))),
            // Operands are checked after every option, before the -d range.
            (&["foo"], Err(err("", true, 2))),
            (&["-"], Err(err("", true, 2))),
            (&["-d", "5", "foo"], Err(err("", true, 2))),
            (&["--", "foo"], Err(err("", true, 2))),
            (&["-d4", "--", "-v"], Err(err("", true, 2))),
            (&["-d4", "--"], Ok(run(Some(4), DEF, None, &[]))),
            (&["-d", "5", "-d", "3"], Ok(run(Some(3), DEF, None, &[]))),
            // Long options for the layered settings.
            (
                &["--set", "MaxConnections=10"],
                Ok(run(None, DEF, None, &[("MaxConnections", "10")])),
            ),
            (
                &["--set=Header=X-Filtered: yes=1", "-d1"],
                Ok(run(Some(1), DEF, None, &[("Header", "X-Filtered: yes=1")])),
            ),
            (
                &["--set", "TimeOut=", "--admin-listen", "127.0.0.1:9925"],
                Ok(run(
                    None,
                    DEF,
                    None,
                    &[("TimeOut", ""), ("AdminListen", "127.0.0.1:9925")],
                )),
            ),
            (
                &["--admin-listen=[::1]:9925"],
                Ok(run(None, DEF, None, &[("AdminListen", "[::1]:9925")])),
            ),
            (
                &["--set", "-d"],
                Err(err(
                    "invalid --set value: -d (expected Name=Value)",
                    false,
                    2,
                )),
            ),
            (
                &["--set", "=x"],
                Err(err(
                    "invalid --set value: =x (expected Name=Value)",
                    false,
                    2,
                )),
            ),
            (
                &["--set"],
                Err(err("option '--set' requires an argument", true, 2)),
            ),
            (
                &["--admin-listen"],
                Err(err("option '--admin-listen' requires an argument", true, 2)),
            ),
            (&["--help"], Ok(Command::Help)),
            (&["-d", "4", "--help"], Ok(Command::Help)),
            (
                &["--helpme"],
                Err(err("unrecognized option '--helpme'", true, 2)),
            ),
            (&["--demo"], Ok(demo(None, None, &[]))),
            (&["--demo", "dir"], Ok(demo(Some("dir"), None, &[]))),
            (&["--demo=dir"], Ok(demo(Some("dir"), None, &[]))),
            (
                &["--demo", "--set", "MaxConnections=5", "-d", "4"],
                Ok(demo(None, Some(4), &[("MaxConnections", "5")])),
            ),
            (
                &["-d4", "--demo", "d", "--admin-listen", "127.0.0.1:1"],
                Ok(demo(Some("d"), Some(4), &[("AdminListen", "127.0.0.1:1")])),
            ),
            (&["--demo", "a", "b"], Err(err("", true, 2))),
            (&["--demo=a", "b"], Err(err("", true, 2))),
            (
                &["--demo", "-f", "x.conf"],
                Err(err(
                    "--demo writes its own configuration: -f cannot be used with it",
                    false,
                    2,
                )),
            ),
            (&["--demo", "-v"], Ok(Command::Version)),
            (&["--set", "A=1", "-v"], Ok(Command::Version)),
            (&["-é"], Err(err("invalid option -- 'é'", true, 2))),
        ];
        for (args, want) in cases {
            let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
            assert_eq!(parse(&args), want, "args {args:?}");
        }
    }

    #[test]
    fn texts() {
        let cases = [
            (
                err("invalid option -- 'x'", true, 2).render(),
                "proxsmtpd: invalid option -- 'x'\nusage: proxsmtpd [-d debuglevel] \
                 [-f configfile] [-p pidfile]\n       proxsmtpd -v\n"
                    .to_string(),
            ),
            (
                err("", true, 2).render(),
                "usage: proxsmtpd [-d debuglevel] [-f configfile] [-p pidfile]\n       \
                 proxsmtpd -v\n"
                    .to_string(),
            ),
            (
                err(LEVEL, false, 1).render(),
                format!("proxsmtpd: {LEVEL}\n"),
            ),
            (
                version_text(),
                format!(
                    "proxsmtpd (version {})\n          (config: /etc/proxsmtpd.conf)\n",
                    env!("CARGO_PKG_VERSION")
                ),
            ),
        ];
        for (got, want) in cases {
            assert_eq!(got, want);
        }
        assert_eq!(usage_text().lines().count(), 2);
        let help = help_text();
        for option in [
            "-d ",
            "-f ",
            "-p ",
            "-v ",
            "--set ",
            "--admin-listen ",
            "--demo ",
            "--help ",
        ] {
            assert!(
                help.contains(&format!("\n  {option}")),
                "{option} in\n{help}"
            );
        }
    }
}
