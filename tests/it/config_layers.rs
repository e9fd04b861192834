//! Layered configuration of the real binary: built-in defaults < config file (legacy,
//! TOML or YAML) < `PROXSMTPD_*` environment < command line (`--set`, `--admin-listen`);
//! errors name their source.

use crate::common;

use std::fs::{self};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::common::metrics::http_get;
use crate::common::proxy::{free_port, pid_listens_on};
use crate::common::{message, secs, timed, wait_until, Client, Daemon, ProxyBuilder, Upstream};

impl Daemon {
    /// Waits until this process listens on `port`; panics with its output otherwise.
    fn wait_listening(&mut self, port: u16) {
        let pid = self.pid;
        let ok = wait_until(secs(10), || {
            pid_listens_on(pid, port) || self.exit_status().is_some()
        });
        assert!(
            ok && self.exit_status().is_none(),
            "proxsmtpd is not listening on {port}; output:\n{}",
            self.log()
        );
    }

    fn stop(&mut self) {
        let _ = kill(Pid::from_raw(self.pid), Signal::SIGTERM);
        let status = self.wait_exit(secs(10)).expect("proxsmtpd did not stop");
        assert_eq!(status.code(), Some(0), "{status:?}\n{}", self.log());
    }
}

/// Runs the binary expecting it to refuse to start; returns the exit code and its output.
fn refused(args: &[&str], env: &[(&str, &str)], dir: &Path) -> (Option<i32>, String) {
    let mut d = Daemon::spawn(args, env, dir);
    let status = d.wait_exit(secs(10)).unwrap_or_else(|| {
        panic!(
            "proxsmtpd {args:?} with {env:?} should have refused to start; output:\n{}",
            d.log()
        )
    });
    (status.code(), d.log())
}

#[derive(Clone, Copy, Debug)]
enum Format {
    Legacy,
    Toml,
    Yaml,
}

/// The config file of the layer test in `format`.
fn config_file(format: Format, dir: &Path, listen: u16, up: &Upstream, filter: &str) -> PathBuf {
    let tmp = dir.join("tmp").display().to_string();
    let (name, text) = match format {
        Format::Legacy => (
            "proxsmtpd.conf",
            format!(
                "# legacy format\nListen: 127.0.0.1:{listen}\nOutAddress: {}\nTempDirectory: {tmp}\n\
                 Header: X-Layer: file\nFilterCommand: {filter}\nMaxConnections: 10\nTimeOut: 20\n\
                 ReloadWatch: off\n",
                up.out_address()
            ),
        ),
        Format::Toml => (
            "proxsmtpd.toml",
            format!(
                "# TOML\nlisten = \"127.0.0.1:{listen}\"\nout_address = \"{}\"\n\
                 temp_directory = \"{tmp}\"\nheader = \"X-Layer: file\"\n\
                 filter_command = \"{filter}\"\nmax_connections = 10\ntimeout = 20\n\
                 reload_watch = false\n",
                up.out_address()
            ),
        ),
        Format::Yaml => (
            "proxsmtpd.yaml",
            format!(
                "# YAML\nlisten: \"127.0.0.1:{listen}\"\nout_address: \"{}\"\n\
                 temp_directory: {tmp}\nheader: \"X-Layer: file\"\n\
                 filter_command: {filter}\nmax_connections: 10\ntimeout: 20\n\
                 reload_watch: false\n",
                up.out_address()
            ),
        ),
    };
    let path = dir.join(name);
    fs::write(&path, text).unwrap();
    path
}

fn header(content: &[u8], name: &str) -> String {
    String::from_utf8_lossy(content)
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")).map(str::to_string))
        .unwrap_or_else(|| "<none>".into())
}

/// Sends one message to `port`; returns (X-Layer, X-Filter) of what the upstream got.
fn deliver_one(port: u16, up: &Upstream, n: usize) -> (String, String) {
    let mut c = Client::open(SocketAddr::from(([127, 0, 0, 1], port)));
    let r = c.send_mail(&message(&format!("m{n}"), b"body\r\n"));
    assert_eq!(r.code, 250, "{r:?}");
    c.cmd("QUIT");
    let d = up.wait_delivered(n, secs(5));
    let content = &d[n - 1].content;
    (header(content, "X-Layer"), header(content, "X-Filter"))
}

fn admin_up(addr: &str) -> bool {
    let addr: SocketAddr = addr.parse().unwrap();
    wait_until(secs(5), || {
        http_get(&addr, "/livez").is_ok_and(|(s, _)| s == 200)
    })
}

fn layers_override_each_other(format: Format) {
    let up = Upstream::start();
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir(dir.path().join("tmp")).unwrap();
    let filter = dir.path().join("filter.sh");
    fs::write(
        &filter,
        "#!/bin/sh\nprintf 'X-Filter: from-file\\r\\n'\ncat\n",
    )
    .unwrap();
    fs::set_permissions(&filter, fs::Permissions::from_mode(0o755)).unwrap();
    let (p_file, p_env, p_cli) = (free_port(), free_port(), free_port());
    let conf = config_file(format, dir.path(), p_file, &up, filter.to_str().unwrap());
    let conf = conf.to_str().unwrap();
    let admin_env = format!("127.0.0.1:{}", free_port());
    let admin_cli = format!("127.0.0.1:{}", free_port());
    let listen_env = format!("127.0.0.1:{p_env}");
    let env = [
        ("PROXSMTPD_LISTEN", listen_env.as_str()),
        ("PROXSMTPD_HEADER", "X-Layer: env"),
        ("PROXSMTPD_ADMIN_LISTEN", admin_env.as_str()),
    ];
    let from = |layer: &str| (layer.to_string(), "from-file".to_string());

    // The file over the defaults (Listen is 0.0.0.0:10025 by default).
    let mut d = Daemon::spawn(&["-d", "3", "-f", conf], &[], dir.path());
    d.wait_listening(p_file);
    assert_eq!(
        deliver_one(p_file, &up, 1),
        from("file"),
        "{format:?}: file only"
    );
    d.stop();

    // The environment over the file; what it does not set stays from the file.
    let mut d = Daemon::spawn(&["-d", "3", "-f", conf], &env, dir.path());
    d.wait_listening(p_env);
    assert!(
        !pid_listens_on(d.pid, p_file),
        "{format:?}: the file's Listen was used"
    );
    assert_eq!(
        deliver_one(p_env, &up, 2),
        from("env"),
        "{format:?}: env over file"
    );
    assert!(admin_up(&admin_env), "{format:?}: PROXSMTPD_ADMIN_LISTEN");
    d.stop();

    // The command line over the environment.
    let listen_cli = format!("Listen=127.0.0.1:{p_cli}");
    let args = [
        "-d",
        "3",
        "-f",
        conf,
        "--set",
        &listen_cli,
        "--set=Header=X-Layer: cli",
        "--admin-listen",
        &admin_cli,
    ];
    let mut d = Daemon::spawn(&args, &env, dir.path());
    d.wait_listening(p_cli);
    assert!(!pid_listens_on(d.pid, p_env) && !pid_listens_on(d.pid, p_file));
    assert_eq!(
        deliver_one(p_cli, &up, 3),
        from("cli"),
        "{format:?}: cli over env"
    );
    assert!(admin_up(&admin_cli), "{format:?}: --admin-listen");
    assert!(
        http_get(&admin_env.parse().unwrap(), "/livez").is_err(),
        "{format:?}: the environment's AdminListen was used"
    );
    d.stop();
}

#[test]
fn layers_override_each_other_with_a_legacy_file() {
    timed(40, || layers_override_each_other(Format::Legacy));
}

#[test]
fn layers_override_each_other_with_a_toml_file() {
    timed(40, || layers_override_each_other(Format::Toml));
}

#[test]
fn layers_override_each_other_with_a_yaml_file() {
    timed(40, || layers_override_each_other(Format::Yaml));
}

/// (what, args, environment, texts the error must contain)
type ErrorCase<'a> = (&'a str, Vec<&'a str>, Vec<(&'a str, &'a str)>, Vec<String>);

/// Every error names where the bad value came from: file and line, variable, or the
/// command line; the exit status is 2 (invalid configuration).
#[test]
fn errors_name_their_source() {
    timed(60, || {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let file = |name: &str, text: &str| {
            let p = d.join(name);
            fs::write(&p, text).unwrap();
            p.display().to_string()
        };
        let good = file(
            "good.conf",
            "OutAddress: 127.0.0.1:25\nListen: 127.0.0.1:1\n",
        );
        let legacy = file(
            "bad.conf",
            "# comment\nOutAddress: 127.0.0.1:25\nTimeOut: soon\nListen: 127.0.0.1:1\n",
        );
        let toml_value = file(
            "bad-value.toml",
            "out_address = \"127.0.0.1:25\"\ntimeout = 0\n",
        );
        let toml_syntax = file(
            "bad-syntax.toml",
            "out_address = \"127.0.0.1:25\"\n\ntimeout = = 5\n",
        );
        let yaml_key = file(
            "bad-key.yaml",
            "out_address: \"127.0.0.1:25\"\nMaxConnections: 5\n",
        );
        let yaml_value = file(
            "bad-value.yaml",
            "out_address: \"127.0.0.1:25\"\nfilter_type: smoke-signals\n",
        );
        let hooks_legacy = file(
            "hooks.conf",
            "OutAddress: 127.0.0.1:25\n\nHooks: https://policy.example/check{stages=helo}\n",
        );
        let hooks_toml = file(
            "hooks.toml",
            "out_address = \"127.0.0.1:25\"\nhook_max_size = \"10T\"\n",
        );
        // Passes the hook list's own syntax check, but no HTTP client can reach it.
        let hooks_address = file(
            "hooks-address.toml",
            "out_address = \"127.0.0.1:25\"\nhooks = \"http://999.1.1.1/check\"\n",
        );
        let hooks_yaml = file(
            "hooks.yaml",
            "out_address: \"127.0.0.1:25\"\nfilter_order: milters hooks\n",
        );
        let cases: Vec<ErrorCase> = vec![
            (
                "legacy file, Hooks option",
                vec!["-d", "3", "-f", &hooks_legacy],
                vec![],
                vec![
                    format!("{hooks_legacy}:3"),
                    "invalid setting: Hooks".into(),
                    "stages=\"helo\"".into(),
                ],
            ),
            (
                "TOML HookMaxSize",
                vec!["-d", "3", "-f", &hooks_toml],
                vec![],
                vec![format!("{hooks_toml}:2"), "HookMaxSize".into()],
            ),
            (
                "TOML Hooks with an IPv4 address out of range",
                vec!["-d", "3", "-f", &hooks_address],
                vec![],
                vec![
                    format!("{hooks_address}:2"),
                    "Hooks".into(),
                    "invalid IPv4 address".into(),
                ],
            ),
            (
                "YAML FilterOrder",
                vec!["-d", "3", "-f", &hooks_yaml],
                vec![],
                vec![format!("{hooks_yaml}:2"), "FilterOrder".into()],
            ),
            (
                "environment Hooks",
                vec!["-d", "3", "-f", &good],
                vec![("PROXSMTPD_HOOKS", "http://a/{name=x}, http://b/{name=x}")],
                vec!["PROXSMTPD_HOOKS".into(), "two hooks are named \"x\"".into()],
            ),
            (
                "command line ShadowConcurrency",
                vec!["-d", "3", "-f", &good, "--set", "ShadowConcurrency=0"],
                vec![],
                vec!["command line".into(), "ShadowConcurrency".into()],
            ),
            (
                "hook client certificate without key",
                vec!["-d", "3", "-f", &good],
                vec![
                    ("PROXSMTPD_HOOKS", "https://policy.example/check"),
                    ("PROXSMTPD_HOOK_CLIENT_CERTIFICATE", "/etc/hook/tls.crt"),
                ],
                vec!["HookClientCertificate is set but HookClientKey is not".into()],
            ),
            (
                "legacy file",
                vec!["-d", "3", "-f", &legacy],
                vec![],
                vec![format!("{legacy}:3"), "TimeOut".into()],
            ),
            (
                "TOML value",
                vec!["-d", "3", "-f", &toml_value],
                vec![],
                vec![format!("{toml_value}:2"), "TimeOut".into()],
            ),
            (
                "TOML syntax",
                vec!["-d", "3", "-f", &toml_syntax],
                vec![],
                vec![toml_syntax.clone(), "line 3".into()],
            ),
            (
                "YAML unknown key",
                vec!["-d", "3", "-f", &yaml_key],
                vec![],
                vec![
                    format!("{yaml_key}:2"),
                    "unknown setting".into(),
                    "did you mean max_connections".into(),
                ],
            ),
            (
                "YAML value",
                vec!["-d", "3", "-f", &yaml_value],
                vec![],
                vec![format!("{yaml_value}:2"), "FilterType".into()],
            ),
            (
                "environment value",
                vec!["-d", "3", "-f", &good],
                vec![("PROXSMTPD_TIMEOUT", "soon")],
                vec!["PROXSMTPD_TIMEOUT".into(), "TimeOut".into()],
            ),
            (
                "environment name",
                vec!["-d", "3", "-f", &good],
                vec![("PROXSMTPD_TIME_OUT", "5")],
                vec!["PROXSMTPD_TIME_OUT".into(), "PROXSMTPD_TIMEOUT".into()],
            ),
            (
                "command line value",
                vec!["-d", "3", "-f", &good, "--set", "MaxConnections=1000000"],
                vec![],
                vec!["command line".into(), "MaxConnections".into()],
            ),
            (
                "command line name",
                vec!["-d", "3", "-f", &good, "--set", "MaxConections=5"],
                vec![],
                vec!["command line".into(), "MaxConections".into()],
            ),
        ];
        let mut failures = Vec::new();
        for (what, args, env, want) in &cases {
            let (code, out) = refused(args, env, d);
            let missing: Vec<&String> = want.iter().filter(|w| !out.contains(w.as_str())).collect();
            if code != Some(2) || !missing.is_empty() {
                failures.push(format!(
                    "{what}: exit {code:?}, missing {missing:?} in:\n{}",
                    out.trim_end()
                ));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    });
}

/// Every setting has its `PROXSMTPD_<KEY>` variable: none is "not a proxsmtpd setting",
/// and a value it refuses is reported with the variable's name.
#[test]
fn every_setting_is_reachable_from_the_environment() {
    timed(90, || {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("none.conf");
        let mut failures = Vec::new();
        for setting in proxsmtpd::config::SETTINGS {
            let var = setting.env_var();
            assert_eq!(
                var,
                format!("PROXSMTPD_{}", setting.key.to_ascii_uppercase())
            );
            // No OutAddress anywhere (unless this is it): the run stops at validation at
            // the latest, after the variable has been read.
            let (code, out) = refused(
                &["-d", "3", "-f", missing.to_str().unwrap()],
                &[(var.as_str(), "\u{7f}bad\u{7f}")],
                dir.path(),
            );
            if out.contains("not a proxsmtpd setting") || code.is_none_or(|c| c == 0) {
                failures.push(format!("{var}: exit {code:?}: {}", out.trim_end()));
            } else if !out.contains("no OutAddress specified") && !out.contains(&var) {
                // Refused for its value (or with another setting): it must say which variable.
                let names_setting = out.contains(setting.name);
                if !names_setting {
                    failures.push(format!("{var}: error names neither: {}", out.trim_end()));
                }
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    });
}

/// Kubernetes adds `PROXSMTPD_SERVICE_HOST`, `PROXSMTPD_PORT_25_TCP...` to every pod of a
/// namespace with a Service named `proxsmtpd`; they are not settings and must not stop the
/// proxy.
#[test]
fn kubernetes_service_variables_are_not_settings() {
    timed(20, || {
        let up = Upstream::start();
        let p = ProxyBuilder::new()
            .upstream(&up)
            .env("PROXSMTPD_SERVICE_HOST", "10.96.0.25")
            .env("PROXSMTPD_SERVICE_PORT", "25")
            .env("PROXSMTPD_SERVICE_PORT_SMTP", "25")
            .env("PROXSMTPD_PORT", "tcp://10.96.0.25:25")
            .env("PROXSMTPD_PORT_25_TCP", "tcp://10.96.0.25:25")
            .env("PROXSMTPD_PORT_25_TCP_PROTO", "tcp")
            .env("PROXSMTPD_PORT_25_TCP_PORT", "25")
            .env("PROXSMTPD_PORT_25_TCP_ADDR", "10.96.0.25")
            .start();
        assert_eq!(p.open().send_mail(&common::default_message()).code, 250);
    });
}
