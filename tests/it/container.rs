//! Container mode of the real binary (`Container: on` in the file, or
//! `PROXSMTPD_CONTAINER=on`): it stays in the foreground without `-d` and logs one JSON
//! object per line on stdout, the per-message summary as fields.

use std::fs::{self};
use std::net::SocketAddr;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

use crate::common::proxy::{free_port, pid_listens_on};
use crate::common::{message, secs, timed, wait_until, Client, Daemon, Upstream};

impl Daemon {
    /// Every stdout line as JSON; panics on a line that is not a JSON object.
    fn json_lines(&self) -> Vec<Value> {
        self.stdout()
            .lines()
            .map(|l| match serde_json::from_str::<Value>(l) {
                Ok(v) if v.is_object() => v,
                _ => panic!("stdout line is not a JSON object: {l:?}"),
            })
            .collect()
    }
}

/// The summary events of the messages, in order.
fn summaries(d: &Daemon) -> Vec<Value> {
    d.json_lines()
        .into_iter()
        .filter(|v| v["target"] == "proxsmtpd::message")
        .collect()
}

fn run_container_mode(in_file: bool) {
    let up = Upstream::builder()
        .reply_when("DATA_END", "UPSTREAM-REJECT", "554 5.7.1 Upstream refuses")
        .start();
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir(dir.path().join("tmp")).unwrap();
    let port = free_port();
    let mut conf = format!(
        "Listen: 127.0.0.1:{port}\nOutAddress: {}\nTempDirectory: {}\nFilterCommand: cat\n",
        up.out_address(),
        dir.path().join("tmp").display()
    );
    let mut env = Vec::new();
    if in_file {
        conf.push_str("Container: on\n");
    } else {
        env.push(("PROXSMTPD_CONTAINER", "on"));
    }
    let conf_path = dir.path().join("proxsmtpd.conf");
    fs::write(&conf_path, conf).unwrap();

    // No -d: a daemon would fork and its first process exit; this one must stay and be
    // the one that listens.
    let mut d = Daemon::spawn(&["-f", conf_path.to_str().unwrap()], &env, dir.path());
    let pid = d.pid;
    assert!(
        wait_until(secs(10), || pid_listens_on(pid, port)
            || d.exit_status().is_some()),
        "not listening"
    );
    assert!(
        d.exit_status().is_none(),
        "the process went away: it must run in the foreground"
    );

    let mut c = Client::open(SocketAddr::from(([127, 0, 0, 1], port)));
    let first = message("first", b"Hello.\r\n");
    let t = c.transaction(
        "<alice@example.org>",
        &["<bob@example.net>", "<carol@example.net>"],
        &first,
    );
    assert_eq!(t.final_reply.code, 250);
    let second = message("second", b"UPSTREAM-REJECT\r\n");
    let t = c.transaction("<alice@example.org>", &["<bob@example.net>"], &second);
    assert_eq!(t.final_reply.code, 554);
    c.cmd("QUIT");
    assert!(c.wait_eof(secs(5)));
    assert!(
        wait_until(secs(5), || summaries(&d).len() >= 2),
        "no JSON summary lines on stdout"
    );

    let s = summaries(&d);
    assert_eq!(s.len(), 2, "{s:#?}");
    let want = [
        ("accepted", first.len(), 2, 250),
        ("rejected", second.len(), 1, 554),
    ];
    for (v, (verdict, size, rcpts, code)) in s.iter().zip(want) {
        assert_eq!(v["level"], "INFO", "{v}");
        assert!(v["timestamp"].is_string(), "{v}");
        assert_eq!(v["verdict"], verdict, "{v}");
        assert_eq!(v["size"], size as u64, "{v}");
        assert_eq!(v["recipients"], rcpts, "{v}");
        assert_eq!(v["upstream_code"], code, "{v}");
        assert!(v["duration_ms"].is_u64(), "duration_ms: {v}");
        assert!(v["filter_ms"].is_u64(), "filter_ms: {v}");
        let text = v["message"].as_str().unwrap_or_default();
        assert!(
            text.contains("client=127.0.0.1, from=alice@example.org, to=bob@example.net"),
            "the original's summary line as the message: {v}"
        );
    }
    assert!(
        s[0]["message"]
            .as_str()
            .is_some_and(|m| m.ends_with("status=FILTERED")),
        "{}",
        s[0]
    );

    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    let status = d.wait_exit(secs(10)).expect("did not stop on SIGTERM");
    assert_eq!(status.code(), Some(0), "{status:?}");
    // Every line of stdout, to the last, is JSON; nothing was logged as plain text.
    let lines = d.json_lines();
    assert!(
        lines
            .iter()
            .any(|v| v["message"].as_str().is_some_and(|m| m.contains("stopped"))),
        "no shutdown line: {lines:#?}"
    );
    let stderr = d.stderr();
    assert!(
        !stderr.contains("accepted connection") && !stderr.contains("status=FILTERED"),
        "log lines went to stderr: {stderr}"
    );
}

#[test]
fn container_mode_from_the_config_file() {
    timed(30, || run_container_mode(true));
}

#[test]
fn container_mode_from_the_environment() {
    timed(30, || run_container_mode(false));
}
