//! Command line, pid file, signals, config file grammar and startup errors.

use crate::common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::proxy::{free_port, is_listening, pid_alive, run_binary};
use crate::common::{binary, secs, timed, wait_until, Client, Proxy, ProxyBuilder, Upstream};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Writes `conf` into a temp dir; returns the dir guard and the path.
fn conf_file(conf: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("proxsmtpd.conf");
    fs::write(&p, conf).expect("write conf");
    (dir, p)
}

/// Runs the binary in the foreground with `conf`; it must exit (not serve) within 5 s.
fn startup_failure(conf: &str) -> (i32, String, PathBuf, tempfile::TempDir) {
    let (dir, p) = conf_file(conf);
    let out = run_binary(
        &binary(),
        &["-d", "4", "-f", p.to_str().unwrap_or_default()],
        secs(5),
    )
    .unwrap_or_else(|| panic!("the proxy kept running with config:\n{conf}"));
    (
        out.status.code().unwrap_or(-1),
        text(&out.stderr) + &text(&out.stdout),
        p,
        dir,
    )
}

#[test]
fn version_flag_prints_version_and_exits_0() {
    timed(30, || {
        let out = run_binary(&binary(), &["-v"], secs(5)).expect("-v did not exit");
        assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
        let stdout = text(&out.stdout);
        let first = stdout.lines().next().unwrap_or("");
        assert!(
            first.starts_with("proxsmtpd (version "),
            "version line: {stdout:?}"
        );
        assert!(
            first.chars().any(|c| c.is_ascii_digit()),
            "no version number: {stdout:?}"
        );
        assert!(
            stdout.contains("(config: /etc/proxsmtpd.conf)"),
            "default config path not shown: {stdout:?}"
        );
    });
}

/// `--help` lists every option on stdout and exits 0; the usage text of errors is kept.
#[test]
fn help_lists_every_option() {
    timed(30, || {
        let out = run_binary(&binary(), &["--help"], secs(5)).expect("--help did not exit");
        assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
        let help = text(&out.stdout);
        for option in [
            "-d ",
            "-f ",
            "-p ",
            "-v ",
            "--set Name=Value",
            "--admin-listen ADDR",
            "--demo [DIR]",
            "--help",
        ] {
            assert!(
                help.contains(option),
                "{option:?} missing from --help:\n{help}"
            );
        }
        assert!(help.starts_with("usage: proxsmtpd"), "{help}");
        assert!(out.stderr.is_empty(), "{}", text(&out.stderr));
    });
}

#[test]
fn usage_errors_exit_2() {
    timed(30, || {
        for args in [
            &["-x"][..],
            &["stray-argument"],
            &["-f"],
            &["-d", "4", "extra"],
        ] {
            let out = run_binary(&binary(), args, secs(5))
                .unwrap_or_else(|| panic!("{args:?} did not exit"));
            assert_eq!(
                out.status.code(),
                Some(2),
                "{args:?}: {}",
                text(&out.stderr)
            );
            assert!(
                text(&out.stderr).to_lowercase().contains("usage"),
                "{args:?}: no usage text: {}",
                text(&out.stderr)
            );
        }
    });
}

#[test]
fn invalid_debug_level() {
    timed(30, || {
        let out = run_binary(&binary(), &["-d", "9"], secs(5)).expect("-d 9 did not exit");
        assert_eq!(out.status.code(), Some(2), "-d 9: {}", text(&out.stderr));
        let out = run_binary(&binary(), &["-d", "abc"], secs(5)).expect("-d abc did not exit");
        assert_eq!(out.status.code(), Some(1), "-d abc: {}", text(&out.stderr));
        assert!(text(&out.stderr).contains("debug"), "{}", text(&out.stderr));
    });
}

#[test]
fn pidfile_written_and_removed_on_sigterm_with_idle_client() {
    timed(30, || {
        let up = Upstream::start();
        let mut p = Proxy::start(&up);
        assert!(
            wait_until(secs(3), || p.pid_path.exists()),
            "pid file not written"
        );
        let content = fs::read_to_string(&p.pid_path).expect("pid file");
        assert_eq!(content, format!("{}\n", p.pid()), "pid file content");
        let mut c = p.connect();
        assert_eq!(c.greeting().code, 220);
        assert!(
            wait_until(secs(3), || !p.log().trim().is_empty()),
            "-d 4 logged nothing to stderr"
        );
        let status = p
            .terminate(secs(6))
            .expect("still running 6 s after SIGTERM with an idle client");
        assert_eq!(status.code(), Some(0), "exit status after SIGTERM");
        assert!(
            wait_until(secs(2), || !p.pid_path.exists()),
            "pid file not removed"
        );
        assert!(
            c.wait_eof(secs(3)),
            "client connection not closed at shutdown"
        );
    });
}

#[test]
fn sigint_also_stops_cleanly() {
    timed(30, || {
        let up = Upstream::start();
        let mut p = Proxy::start(&up);
        assert!(
            wait_until(secs(3), || p.pid_path.exists()),
            "pid file not written"
        );
        p.signal(Signal::SIGINT);
        let status = p.terminate(secs(6)).expect("still running after SIGINT");
        assert_eq!(status.code(), Some(0));
        assert!(
            wait_until(secs(2), || !p.pid_path.exists()),
            "pid file not removed"
        );
    });
}

#[test]
fn pidfile_setting_overrides_command_line() {
    timed(30, || {
        let up = Upstream::start();
        let b = ProxyBuilder::new().upstream(&up);
        let from_conf = b.dir().join("from-conf.pid");
        let p = b
            .set("PidFile", from_conf.to_str().unwrap_or_default())
            .start();
        assert!(
            wait_until(secs(3), || from_conf.exists()),
            "PidFile from the config not written"
        );
        assert_eq!(
            fs::read_to_string(&from_conf).expect("pid").trim(),
            p.pid().to_string()
        );
        assert!(
            !p.pid_path.exists(),
            "-p pid file written although PidFile is set"
        );
    });
}

#[test]
fn config_grammar_comments_case_whitespace_first_colon() {
    timed(30, || {
        let up = Upstream::start();
        // Whole-line comments (also indented), case-insensitive names, blanks around the
        // colon, CRLF line ends, and a value that itself contains a colon.
        let raw = format!(
            "# comment\r\n   # indented comment\r\n\r\n  oUtAdDrEsS  :   {}  \r\ntimeout:7\r\nHeader: X-Colon: a:b\r\n",
            up.out_address()
        );
        let p = ProxyBuilder::new().unset("TimeOut").raw(&raw).start();
        let mut c = p.open();
        assert_eq!(c.send_mail(&common::default_message()).code, 250);
        let m = up.expect_one();
        assert!(
            String::from_utf8_lossy(&m.content).contains("X-Colon: a:b\r\n"),
            "header value split at the first colon only: {}",
            common::show(&m.content)
        );
    });
}

#[test]
fn config_errors_exit_2_and_name_the_setting() {
    timed(30, || {
        let port = free_port();
        let base = format!(
            "Listen: 127.0.0.1:{port}\nOutAddress: 127.0.0.1:{}\n",
            free_port()
        );
        let table: &[(&str, &str)] = &[
            ("BogusOption: 1", "BogusOption"),
            ("DebugFiles: 1", "DebugFiles"),
            ("FilterType: bogus", "FilterType"),
            ("FilterTimeout: soon", "FilterTimeout"),
            ("FilterTimeout: 0", "FilterTimeout"),
            ("TimeOut: 0", "TimeOut"),
            ("TimeOut: 10s", "TimeOut"),
            ("KeepAlives: -1", "KeepAlives"),
            ("MaxConnections: 1", "MaxConnections"),
            ("MaxConnections: 10240", "MaxConnections"),
            ("Skip: everyone", "Skip"),
            ("XClient: maybe", "XClient"),
            ("TransparentProxy: sometimes", "TransparentProxy"),
            ("TempDirectory:", "TempDirectory"),
            ("Listen: 127.0.0.1:99999", "Listen"),
            ("OutAddress: 127.0.0.1:99999", "OutAddress"),
            ("OutAddress 127.0.0.1:25", "OutAddress 127.0.0.1"),
        ];
        for (line, name) in table {
            let (code, out, _, _dir) = startup_failure(&format!("{base}{line}\n"));
            assert_eq!(code, 2, "{line:?}: exit status; output:\n{out}");
            assert!(
                out.contains(name),
                "{line:?}: error does not name {name:?}:\n{out}"
            );
            assert!(!is_listening(port), "{line:?}: the proxy listens");
        }
    });
}

#[test]
fn config_error_names_file_and_line() {
    // deviation from 1.10: the original names only the setting, not the file and line.
    timed(30, || {
        let conf = format!(
            "# line 1\nOutAddress: 127.0.0.1:{}\n\nBogusOption: 1\n",
            free_port()
        );
        let (code, out, path, _dir) = startup_failure(&conf);
        assert_eq!(code, 2, "{out}");
        assert!(
            out.contains(&path.display().to_string()),
            "error does not name the file:\n{out}"
        );
        assert!(
            out.contains(&format!("{}:4", path.display())) || out.contains("line 4"),
            "error does not name line 4:\n{out}"
        );
    });
}

#[test]
fn missing_outaddress_exits_2() {
    timed(30, || {
        let (code, out, _, _dir) = startup_failure(&format!("Listen: 127.0.0.1:{}\n", free_port()));
        assert_eq!(code, 2, "{out}");
        assert!(out.contains("OutAddress"), "{out}");
    });
}

#[test]
fn missing_config_file_warns_then_needs_outaddress() {
    timed(30, || {
        let out = run_binary(
            &binary(),
            &["-d", "4", "-f", "/nonexistent/proxsmtpd.conf"],
            secs(5),
        )
        .expect("kept running");
        let all = text(&out.stderr) + &text(&out.stdout);
        assert_eq!(out.status.code(), Some(2), "{all}");
        assert!(
            all.contains("/nonexistent/proxsmtpd.conf"),
            "no warning naming the file: {all}"
        );
        assert!(all.contains("OutAddress"), "{all}");
    });
}

#[test]
fn daemonises_without_d_and_writes_daemon_pid() {
    timed(30, || {
        let up = Upstream::start();
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let conf = dir.path().join("proxsmtpd.conf");
        let pidf = dir.path().join("proxsmtpd.pid");
        fs::write(
            &conf,
            format!(
                "Listen: 127.0.0.1:{port}\nOutAddress: {}\nTempDirectory: {}\n",
                up.out_address(),
                dir.path().display()
            ),
        )
        .expect("conf");
        let out = run_binary(
            &binary(),
            &[
                "-f",
                conf.to_str().unwrap_or(""),
                "-p",
                pidf.to_str().unwrap_or(""),
            ],
            secs(5),
        )
        .expect("the starting process did not return (no daemonising)");
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        assert!(
            wait_until(secs(5), || pidf.exists() && is_listening(port)),
            "daemon did not write its pid / listen"
        );
        let pid: i32 = fs::read_to_string(&pidf)
            .expect("pid")
            .trim()
            .parse()
            .expect("pid number");
        let guard = DaemonGuard(pid);
        assert!(pid_alive(pid), "pid {pid} from the pid file is not running");
        let mut c = Client::connect(([127, 0, 0, 1], port).into());
        assert_eq!(c.greeting().code, 220);
        c.close();
        kill(Pid::from_raw(pid), Signal::SIGTERM).expect("SIGTERM");
        assert!(
            wait_until(secs(6), || !pid_alive(pid)),
            "daemon still running after SIGTERM"
        );
        assert!(
            wait_until(secs(2), || !pidf.exists()),
            "daemon left its pid file"
        );
        drop(guard);
    });
}

/// Kills a daemonised proxy if the test fails half-way.
struct DaemonGuard(i32);

impl Drop for DaemonGuard {
    fn drop(&mut self) {
        if pid_alive(self.0) {
            let _ = kill(Pid::from_raw(self.0), Signal::SIGKILL);
        }
    }
}

#[test]
fn unknown_binary_path_helper_sanity() {
    // The harness must point at an existing binary; a clear message beats 100 spawn errors.
    let b = binary();
    assert!(
        Path::new(&b).exists(),
        "binary under test {} does not exist (build it or set PROXSMTPD_BIN)",
        b.display()
    );
    let _ = Duration::ZERO;
}
